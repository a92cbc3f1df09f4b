//! Jobs end to end: a real controller process, real agents (processes, or the agent library
//! in this process where GPUs and models must be injected), real QUIC.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::inproc::{gpu, model, InProcAgent};
use common::{bin, metric, wait_for, Agent, Controller, ControllerOpts};
use common::{JobRecord, JobState};
use nebula_protocol::jobs::{JobOutput, ProbeOutput};
use nebula_types::api::jobs::FanOut;
use nebula_types::jobs::JobLogLine;
use serde_json::{json, Value};

/// An agent config with an allow-list: custom commands (fixed argv), git-pull inside `repos`;
/// `extra` lines go into the `[exec]` table.
fn exec_config(dir: &Path, extra: &str) -> String {
    let runs = dir.join("runs.log");
    let pids = dir.join("pids");
    std::fs::create_dir_all(&pids).unwrap();
    format!(
        r#"
[jobs]
max_concurrent = 32

[exec]
git_dirs = ["{repos}"]
{extra}

[exec.commands.hello]
argv = ["sh", "-c", "echo hello from $(hostname); echo line two; echo to stderr >&2"]

[exec.commands.fail]
argv = ["sh", "-c", "echo about to fail; exit 3"]

[exec.commands.sleeper]
argv = ["sh", "-c", "echo $$ > {pids}/$$; echo sleeping; sleep 60; echo woke"]

[exec.commands.slow]
argv = ["sh", "-c", "echo run >> {runs}; echo started; sleep 4; echo finished"]
"#,
        repos = dir.join("repos").display(),
        runs = runs.display(),
        pids = pids.display(),
    )
}

fn git(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An origin repository and two clones: one inside the allowed directory, one outside.
fn repos(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let origin = dir.join("origin");
    std::fs::create_dir_all(&origin).unwrap();
    git(&origin, &["init", "-q", "-b", "main"]);
    std::fs::write(origin.join("README"), "v1\n").unwrap();
    git(&origin, &["add", "."]);
    git(&origin, &["commit", "-q", "-m", "one"]);
    let inside = dir.join("repos/app");
    let outside = dir.join("elsewhere/app");
    for d in [&inside, &outside] {
        std::fs::create_dir_all(d.parent().unwrap()).unwrap();
        git(
            d.parent().unwrap(),
            &["clone", "-q", origin.to_str().unwrap(), "app"],
        );
    }
    // A new commit upstream, for the pull to fetch.
    std::fs::write(origin.join("README"), "v2\n").unwrap();
    git(&origin, &["commit", "-q", "-am", "two"]);
    (inside, outside)
}

async fn logs(c: &Controller, id: uuid::Uuid) -> Vec<String> {
    // follow=false: what is stored, then the end.
    let resp = c
        .client
        .get(c.url(&format!("/api/v1/jobs/{id}/logs?follow=false")))
        .bearer_auth(&c.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    text.split("\n\n")
        .filter(|b| b.contains("event: log"))
        .filter_map(|b| b.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str::<JobLogLine>(d).unwrap().line)
        .collect()
}

/// A probe job's result.
fn probe(job: &JobRecord) -> &ProbeOutput {
    match &job.output {
        Some(JobOutput::Probe(p)) => p,
        other => panic!("not a probe's output: {other:?}"),
    }
}

/// One agent named `box` with this config, joined and online.
async fn one_box(c: &Controller, state: &Path, config: &str) -> Agent {
    let token = c.token(1, "1h", json!({})).await;
    let a = Agent::join_with_config(c, &token, state, "box", &[], config);
    c.wait_status("box", common::NodeStatus::Online, Duration::from_secs(20))
        .await;
    a
}

/// Run the `nebula` CLI against the controller (on a blocking thread).
async fn cli(c: &Controller, args: &[&str]) -> std::process::Output {
    let url = c.url("");
    let token = c.admin_token.clone();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin("nebula"))
            .arg("--controller")
            .arg(&url)
            .args(&args)
            .env("NEBULA_TOKEN", token)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn pid_alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie (reaped later) counts as gone.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_output_and_the_agent_enforces_its_allow_list() {
    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (inside, outside) = repos(dir.path());
    let _a = one_box(&c, &dir.path().join("state"), &exec_config(dir.path(), "")).await;

    // The CLI streams the output live and exits with the job's status.
    let out = cli(&c, &["run", "box", "hello"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("hello from"), "{stdout}");
    assert!(stdout.contains("line two"), "{stdout}");
    assert!(stderr.contains("to stderr"), "{stderr}");
    assert!(stderr.contains("succeeded on box"), "{stderr}");

    let failed = cli(&c, &["run", "box", "fail"]).await;
    assert_eq!(
        failed.status.code(),
        Some(3),
        "the remote exit status comes back"
    );
    assert!(String::from_utf8_lossy(&failed.stdout).contains("about to fail"));

    // The same job through the API: stored record and logs.
    let job = c
        .job(json!({"node": "box", "work": {"kind": "exec", "op": "hello"}, "wait": "20s"}))
        .await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(job.exit_code, Some(0));
    assert!(job.routing.as_deref().unwrap().contains("targeted by name"));
    let lines = logs(&c, job.id).await;
    assert!(
        lines.iter().any(|l| l.starts_with("hello from")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == "to stderr"), "{lines:?}");

    // Not on the allow-list: refused by the agent, nothing run.
    for (op, args, why) in [
        ("reboot", json!([]), "not an allowed operation"),
        ("sh", json!(["touch /tmp/pwned"]), "exec.allow_any = false"),
        ("hello", json!(["--extra"]), "takes no arguments"),
        (
            "systemctl-restart",
            json!(["sshd.service"]),
            "systemd_units",
        ),
        (
            "git-pull",
            json!([outside.to_str().unwrap()]),
            "outside the directories",
        ),
        (
            "git-pull",
            json!([format!("{}/../../elsewhere/app", inside.display())]),
            "outside the directories",
        ),
    ] {
        let j = c
            .job(json!({"node": "box", "work": {"kind": "exec", "op": op, "args": args}, "wait": "20s"}))
            .await;
        assert_eq!(j.state, JobState::Failed, "{op}: {j:?}");
        let err = j.error.as_deref().unwrap();
        assert!(err.starts_with("refused by the agent"), "{err}");
        assert!(err.contains(why), "{op}: {err}");
    }
    // The outside clone was not touched; the inside one pulls for real.
    let head = |p: &Path| {
        String::from_utf8(
            std::process::Command::new("git")
                .args(["-C", p.to_str().unwrap(), "rev-parse", "HEAD"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
    };
    let outside_before = head(&outside);
    let pulled = c
        .job(json!({"node": "box", "work": {"kind": "exec", "op": "git-pull", "args": [inside]}, "wait": "20s"}))
        .await;
    assert_eq!(pulled.state, JobState::Succeeded, "{pulled:?}");
    assert_eq!(head(&inside), head(&dir.path().join("origin")));
    assert_eq!(head(&outside), outside_before);
    let lines = logs(&c, pulled.id).await;
    assert!(
        lines.iter().any(|l| l.contains("README")),
        "git's output is streamed: {lines:?}"
    );

    // Inventory lists the repository, clean, on main at origin's commit.
    let inv = c
        .job(json!({"node": "box", "work": {"kind": "inventory"}, "wait": "20s"}))
        .await;
    assert_eq!(inv.state, JobState::Succeeded, "{inv:?}");
    let Some(JobOutput::Inventory(report)) = &inv.output else {
        panic!("not an inventory: {inv:?}");
    };
    assert_eq!(report.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(report.facts.arch, std::env::consts::ARCH);
    let repos = &report.repositories;
    assert_eq!(repos.len(), 1, "{repos:?}");
    assert_eq!(repos[0].branch.as_deref(), Some("main"));
    assert!(!repos[0].dirty);
    assert_eq!(repos[0].commit, head(&inside).trim());

    // Probes: a TCP connect and an HTTP GET from the node (to the controller's own API).
    let tcp = c
        .job(json!({"node": "box", "work": {"kind": "probe", "tcp": c.http.to_string()}, "wait": "20s"}))
        .await;
    assert!(probe(&tcp).ok, "{tcp:?}");
    let http = c
        .job(json!({"node": "box", "work": {"kind": "probe", "http": c.url("/healthz"), "timeout": "2s"}, "wait": "20s"}))
        .await;
    assert_eq!(probe(&http).status, Some(200), "{http:?}");
    assert!(probe(&http).latency_us > 0);
    let closed = c
        .job(json!({"node": "box", "work": {"kind": "probe", "tcp": "127.0.0.1:1"}, "wait": "20s"}))
        .await;
    assert_eq!(closed.state, JobState::Succeeded);
    assert!(!probe(&closed).ok, "{closed:?}");
    assert!(probe(&closed)
        .error
        .as_deref()
        .unwrap()
        .contains("127.0.0.1:1"));

    // The audit log names who created what.
    let audit: common::Page<nebula_types::jobs::AuditRecord> =
        c.get_as("/api/v1/audit?action=job.create&limit=100").await;
    let items = &audit.items;
    assert!(items.len() >= 10, "{audit:?}");
    assert!(items.iter().all(|e| e.actor == "admin"));
    assert!(items
        .iter()
        .any(|e| e.target == job.id.to_string() && e.detail["work"]["op"] == "hello"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_process_and_a_deadline_times_it_out() {
    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let _a = one_box(&c, &dir.path().join("state"), &exec_config(dir.path(), "")).await;
    let pids = dir.path().join("pids");
    let read_pid = || -> Option<i32> {
        let e = std::fs::read_dir(&pids).ok()?.flatten().next()?;
        let pid = e.file_name().to_str()?.parse().ok()?;
        std::fs::remove_file(e.path()).ok()?;
        Some(pid)
    };

    let job = c
        .job(json!({"node": "box", "work": {"kind": "exec", "op": "sleeper"}}))
        .await;
    let id = job.id;
    c.wait_job(id, "sleeper running", Duration::from_secs(20), |j| {
        j.state == JobState::Running
    })
    .await;
    let pid = wait_for("the sleeper's pid", Duration::from_secs(10), || async {
        read_pid()
    })
    .await;
    assert!(pid_alive(pid));
    let (status, v) = c
        .api(
            reqwest::Method::POST,
            &format!("/api/v1/jobs/{}/cancel", id),
            None,
        )
        .await;
    assert_eq!(status, 202, "{v}");
    let done = c
        .wait_job(id, "cancelled", Duration::from_secs(20), |j| {
            j.state == JobState::Cancelled
        })
        .await;
    assert!(
        done.error
            .as_deref()
            .unwrap()
            .contains("cancelled by admin"),
        "{done:?}"
    );
    wait_for(
        "the process to be gone",
        Duration::from_secs(10),
        || async { (!pid_alive(pid)).then_some(()) },
    )
    .await;
    // Cancelling again: the job has ended.
    let (status, _) = c
        .api(
            reqwest::Method::POST,
            &format!("/api/v1/jobs/{}/cancel", id),
            None,
        )
        .await;
    assert_eq!(status, 409);

    // A deadline that passes stops the process and ends the job as timed_out.
    let job = c
        .job(json!({"node": "box", "work": {"kind": "exec", "op": "sleeper"}, "deadline": "2s"}))
        .await;
    let pid = wait_for("the sleeper's pid", Duration::from_secs(10), || async {
        read_pid()
    })
    .await;
    let done = c
        .wait_job(job.id, "timed out", Duration::from_secs(20), |j| {
            j.state == JobState::TimedOut
        })
        .await;
    assert!(
        done.error.as_deref().unwrap().contains("deadline"),
        "{done:?}"
    );
    wait_for(
        "the process to be gone",
        Duration::from_secs(10),
        || async { (!pid_alive(pid)).then_some(()) },
    )
    .await;
    let lines = logs(&c, job.id).await;
    assert!(lines.iter().any(|l| l == "sleeping"), "{lines:?}");
    assert!(!lines.iter().any(|l| l == "woke"), "{lines:?}");

    // The audit log has the cancel.
    let audit: common::Page<nebula_types::jobs::AuditRecord> =
        c.get_as("/api/v1/audit?action=job.cancel").await;
    assert_eq!(audit.items[0].target, id.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_a_controller_restart_and_none_runs_twice() {
    let mut c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _a = one_box(&c, &state, &exec_config(dir.path(), "")).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        let j = c
            .job(json!({"node": "box", "work": {"kind": "exec", "op": "slow"}}))
            .await;
        ids.push(j.id);
    }
    for &id in &ids {
        c.wait_job(id, "job running", Duration::from_secs(20), |j| {
            j.state == JobState::Running
        })
        .await;
    }
    // SIGKILL the controller while all 20 run (each takes 4 s), and start it again.
    c.restart_hard().await;
    for &id in &ids {
        let done = c
            .wait_job(
                id,
                "job to finish after the restart",
                Duration::from_secs(40),
                |j| {
                    j.state != JobState::Running
                        && j.state != JobState::Dispatched
                        && j.state != JobState::Queued
                },
            )
            .await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
        assert_eq!(done.attempt, 1);
        assert_eq!(done.exit_code, Some(0));
        let lines = logs(&c, id).await;
        assert_eq!(
            lines.iter().filter(|l| *l == "finished").count(),
            1,
            "the agent's result, once: {lines:?}"
        );
    }
    // Each ran exactly once: 20 side effects, one `started` line per job in the journal.
    let runs = std::fs::read_to_string(dir.path().join("runs.log")).unwrap();
    assert_eq!(runs.lines().count(), 20, "{runs}");
    let journal = std::fs::read_to_string(state.join("jobs.journal")).unwrap();
    for id in &ids {
        let id = &id.to_string();
        let started = journal
            .lines()
            .filter(|l| l.contains(id) && l.contains("\"event\":\"started\""))
            .count();
        let finished = journal
            .lines()
            .filter(|l| l.contains(id) && l.contains("\"event\":\"finished\""))
            .count();
        assert_eq!(
            (started, finished),
            (1, 1),
            "job {id} in the journal:\n{journal}"
        );
    }
    // Every job ended exactly once: one `job.create` each, and the list shows 20 succeeded.
    let list: common::Page<JobRecord> = c.get_as("/api/v1/jobs?state=succeeded&limit=100").await;
    assert_eq!(list.items.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_loses_its_job_and_an_idempotent_job_moves_on() {
    let c = Controller::start(ControllerOpts {
        extra: vec!["--job-lost-grace", "2s"],
        ..ControllerOpts::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token = c.token(2, "1h", json!({"pool": "batch"})).await;
    let cfg = exec_config(dir.path(), "");
    let mut a = Agent::join_with_config(&c, &token, &dir.path().join("a"), "a", &[], &cfg);
    c.wait_status("a", common::NodeStatus::Online, Duration::from_secs(20))
        .await;

    // Non-idempotent, on a: lost when a dies and does not come back.
    let plain = c
        .job(json!({"node": "a", "work": {"kind": "exec", "op": "sleeper"}}))
        .await;
    c.wait_job(plain.id, "running on a", Duration::from_secs(20), |j| {
        j.state == JobState::Running
    })
    .await;
    // Idempotent, by selector, while only a is online: it lands on a too.
    let retry = c
        .job(json!({"selector": {"labels": {"pool": "batch"}}, "work": {"kind": "exec", "op": "sleeper"}, "idempotent": true}))
        .await;
    c.wait_job(retry.id, "running on a", Duration::from_secs(20), |j| {
        j.state == JobState::Running && j.node.as_deref() == Some("a")
    })
    .await;
    let _b = Agent::join_with_config(&c, &token, &dir.path().join("b"), "b", &[], &cfg);
    c.wait_status("b", common::NodeStatus::Online, Duration::from_secs(20))
        .await;
    a.proc.kill();

    let lost = c
        .wait_job(
            plain.id,
            "the job to be lost",
            Duration::from_secs(30),
            |j| j.state == JobState::Lost,
        )
        .await;
    assert!(
        lost.reason
            .as_deref()
            .unwrap()
            .contains("did not come back within 2s"),
        "{lost:?}"
    );
    assert_eq!(lost.attempt, 1);
    let moved = c
        .wait_job(
            retry.id,
            "the retry to run on b",
            Duration::from_secs(30),
            |j| j.state == JobState::Running && j.node.as_deref() == Some("b"),
        )
        .await;
    assert_eq!(moved.attempt, 2, "{moved:?}");
    let a_id = c.node("a").await.unwrap().id;
    assert_eq!(moved.excluded, vec![a_id]);
    assert!(
        moved.routing.as_deref().unwrap().contains("chose b"),
        "{moved:?}"
    );
    c.api(
        reqwest::Method::POST,
        &format!("/api/v1/jobs/{}/cancel", moved.id),
        None,
    )
    .await;
    c.wait_job(retry.id, "cancelled", Duration::from_secs(20), |j| {
        j.state == JobState::Cancelled
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_follows_labels_gpus_vram_and_models_and_waits_for_offline_nodes() {
    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let token = c.token(4, "1h", json!({})).await;
    let join = |name: &'static str, labels: &'static [(&str, &str)], gpus, models| {
        let (c, token, dir) = (&c, &token, dir.path());
        async move {
            InProcAgent::join(
                c,
                token,
                dir,
                name,
                |cfg| {
                    cfg.labels = labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                },
                gpus,
                models,
            )
            .await
        }
    };
    let _cpu = join("cpu-1", &[("zone", "cloud")], vec![], vec![]).await;
    // 22 GiB free, llama3 on disk only.
    let _small = join(
        "gpu-disk",
        &[("zone", "home")],
        vec![gpu(24, 2)],
        vec![model("llama3:8b", false)],
    )
    .await;
    // 40 GiB free, no models.
    let mut big = join("gpu-big", &[("zone", "home")], vec![gpu(48, 8)], vec![]).await;
    // 12 GiB free, llama3 loaded.
    let _loaded = join(
        "gpu-loaded",
        &[("zone", "home")],
        vec![gpu(24, 12)],
        vec![model("llama3:8b", true)],
    )
    .await;
    for n in ["cpu-1", "gpu-disk", "gpu-big", "gpu-loaded"] {
        c.wait_status(n, common::NodeStatus::Online, Duration::from_secs(20))
            .await;
    }
    // GPU figures arrive with the first telemetry samples.
    wait_for(
        "GPU telemetry from every GPU node",
        Duration::from_secs(20),
        || async {
            let nodes = c.nodes().await;
            let with_gpu = nodes
                .iter()
                .filter(|n| {
                    n.telemetry
                        .as_ref()
                        .is_some_and(|t| t.gpu_memory_used_bytes.is_some())
                })
                .count();
            (with_gpu == 3).then_some(())
        },
    )
    .await;
    let run = |selector: Value| {
        let c = &c;
        async move {
            let j = c
                .job(json!({"selector": selector, "work": {"kind": "noop"}, "wait": "20s"}))
                .await;
            assert_eq!(j.state, JobState::Succeeded, "{j:?}");
            (
                j.node.clone().unwrap(),
                j.routing.as_deref().unwrap().to_owned(),
            )
        }
    };
    assert_eq!(run(json!({"labels": {"zone": "cloud"}})).await.0, "cpu-1");
    assert_eq!(run(json!({"gpu": false})).await.0, "cpu-1");
    let (node, why) = run(json!({"gpu": true})).await;
    assert_eq!(node, "gpu-big", "most free VRAM: {why}");
    assert!(why.contains("40.0 GiB VRAM free"), "{why}");
    assert_eq!(
        run(json!({"min_free_vram_mb": 16_000, "labels": {"zone": "home"}}))
            .await
            .0,
        "gpu-big"
    );
    assert_eq!(
        run(json!({"min_free_vram_mb": 20_000, "model": "llama3:8b"}))
            .await
            .0,
        "gpu-disk"
    );
    let (node, why) = run(json!({"model": "llama3:8b"})).await;
    assert_eq!(
        node, "gpu-loaded",
        "loaded beats on disk and free VRAM: {why}"
    );
    assert!(why.contains("model llama3:8b loaded"), "{why}");

    // Nothing matches: the job waits with a reason, then expires with it.
    let j = c
        .job(json!({"selector": {"model": "mixtral"}, "work": {"kind": "noop"}, "deadline": "2s"}))
        .await;
    let waiting = c
        .wait_job(j.id, "a waiting reason", Duration::from_secs(10), |j| {
            j.reason.is_some()
        })
        .await;
    assert_eq!(waiting.state, JobState::Queued);
    assert!(waiting
        .reason
        .as_deref()
        .unwrap()
        .contains("no node matches selector {model=mixtral}"));
    let expired = c
        .wait_job(j.id, "expiry", Duration::from_secs(10), |j| {
            j.state == JobState::TimedOut
        })
        .await;
    let reason = expired.reason.as_deref().unwrap();
    assert!(
        reason.contains("deadline passed") && reason.contains("model=mixtral"),
        "{reason}"
    );

    // Only an offline node fits: the job waits for it, then runs there when it is back.
    big.stop().await;
    c.wait_status(
        "gpu-big",
        common::NodeStatus::Offline,
        Duration::from_secs(20),
    )
    .await;
    let j = c
        .job(json!({"selector": {"min_free_vram_mb": 30_000}, "work": {"kind": "noop"}, "deadline": "60s"}))
        .await;
    let waiting = c
        .wait_job(j.id, "waiting for gpu-big", Duration::from_secs(10), |j| {
            j.reason.is_some()
        })
        .await;
    assert!(
        waiting
            .reason
            .as_deref()
            .unwrap()
            .contains("only offline nodes (gpu-big)"),
        "{waiting:?}"
    );
    big.start();
    let done = c
        .wait_job(
            j.id,
            "the job to run on gpu-big",
            Duration::from_secs(30),
            |j| j.state == JobState::Succeeded,
        )
        .await;
    assert_eq!(done.node.as_deref(), Some("gpu-big"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_over_five_nodes_gives_five_results() {
    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let token = c.token(5, "1h", json!({"site": "lab"})).await;
    let mut agents = Vec::new();
    for i in 0..5 {
        let name: &'static str = ["n1", "n2", "n3", "n4", "n5"][i];
        agents.push(
            InProcAgent::join(
                &c,
                &token,
                dir.path(),
                name,
                |cfg| {
                    // n3 does not allow the command: it must fail alone.
                    if name != "n3" {
                        cfg.exec.commands.insert(
                            "hello".into(),
                            nebula_agent::config::CommandConfig {
                                argv: vec!["echo".into(), format!("hi from {name}")],
                                cwd: None,
                                accept_args: false,
                            },
                        );
                    }
                },
                vec![],
                vec![],
            )
            .await,
        );
    }
    for n in ["n1", "n2", "n3", "n4", "n5"] {
        c.wait_status(n, common::NodeStatus::Online, Duration::from_secs(20))
            .await;
    }
    let (status, out) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/inventory/execute",
            Some(json!({"selector": {"labels": {"site": "lab"}}, "work": {"kind": "exec", "op": "hello"}, "timeout": "30s"})),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    let out: FanOut = serde_json::from_value(out).unwrap();
    let results = &out.results;
    assert_eq!(results.len(), 5, "{out:?}");
    assert_eq!(out.succeeded, 4);
    assert_eq!(out.failed, 1);
    for r in results {
        let node = r.node.as_str();
        if node == "n3" {
            assert_eq!(r.state, "failed");
            assert!(
                r.error
                    .as_deref()
                    .unwrap()
                    .contains("not an allowed operation"),
                "{r:?}"
            );
        } else {
            assert_eq!(r.state, "succeeded", "{r:?}");
            assert_eq!(r.log_tail.last().unwrap(), &format!("hi from {node}"));
        }
    }
    // Counted in the metrics, by final state.
    let metrics = c.metrics().await;
    let count = |state: &str| -> f64 {
        metric(
            &metrics,
            &format!("nebula_jobs_finished_total{{state=\"{state}\"}}"),
        )
    };
    assert_eq!(
        (count("succeeded"), count("failed")),
        (4.0, 1.0),
        "{metrics}"
    );
    // Named nodes, and the inventory of every node.
    let (status, out) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/inventory/execute",
            Some(json!({"nodes": ["n1", "n2"], "work": {"kind": "noop"}})),
        )
        .await;
    assert_eq!(status, 200);
    let out: FanOut = serde_json::from_value(out).unwrap();
    assert_eq!(out.succeeded, 2);
    let inv: FanOut = c.get_as("/api/v1/inventory").await;
    assert_eq!(inv.results.len(), 5);
    assert!(inv.results.iter().all(|r| matches!(
        &r.output,
        Some(JobOutput::Inventory(i)) if i.agent_version == env!("CARGO_PKG_VERSION")
    )));
    // Unknown nodes and bad bodies are refused and create nothing.
    let jobs = || async {
        let page: common::Page<JobRecord> = c.get_as("/api/v1/jobs?limit=1000").await;
        page.items.len()
    };
    let before = jobs().await;
    for (path, body, code) in [
        (
            "/api/v1/inventory/execute",
            json!({"nodes": ["nope"], "work": {"kind": "noop"}}),
            404,
        ),
        (
            "/api/v1/inventory/execute",
            json!({"nodes": [], "work": {"kind": "noop"}}),
            400,
        ),
        (
            "/api/v1/inventory/execute",
            json!({"work": {"kind": "exec"}}),
            422,
        ),
        (
            "/api/v1/jobs",
            json!({"node": "nope", "work": {"kind": "noop"}}),
            404,
        ),
        (
            "/api/v1/jobs",
            json!({"node": "n1", "selector": {}, "work": {"kind": "noop"}}),
            400,
        ),
        (
            "/api/v1/jobs",
            json!({"node": "n1", "work": {"kind": "rm-rf"}}),
            422,
        ),
        (
            "/api/v1/jobs",
            json!({"node": "n1", "work": {"kind": "noop"}, "deadline": "soon"}),
            400,
        ),
        (
            "/api/v1/jobs",
            json!({"node": "n1", "work": {"kind": "probe", "http": "file:///etc/passwd"}}),
            400,
        ),
        (
            "/api/v1/jobs",
            json!({"node": "n1", "work": {"kind": "noop"}, "priority": 9}),
            422,
        ),
        (
            "/api/v1/jobs",
            json!({"node": "n1", "work": {"kind": "noop"}, "idempotent": true, "max_attempts": 99}),
            400,
        ),
    ] {
        let (status, v) = c.api(reqwest::Method::POST, path, Some(body.clone())).await;
        assert_eq!(status, code, "{body}: {v}");
        assert!(!common::error_of(&v).message.is_empty(), "{v}");
    }
    let after = jobs().await;
    assert_eq!(before, after);
    let (status, _) = c
        .api(reqwest::Method::GET, "/api/v1/jobs/not-a-uuid", None)
        .await;
    assert_eq!(status, 400);
    let (status, _) = c
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/jobs/{}", uuid::Uuid::now_v7()),
            None,
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_runs_at_most_its_configured_number_of_jobs_at_once() {
    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = exec_config(dir.path(), "").replace("max_concurrent = 32", "max_concurrent = 1");
    let _a = one_box(&c, &dir.path().join("state"), &config).await;
    let first = c
        .job(json!({"node": "box", "work": {"kind": "exec", "op": "sleeper"}}))
        .await;
    c.wait_job(
        first.id,
        "the first job running",
        Duration::from_secs(20),
        |j| j.state == JobState::Running,
    )
    .await;
    let second = c
        .job(json!({"node": "box", "work": {"kind": "exec", "op": "hello"}}))
        .await;
    // The agent has it (dispatched) but no slot is free: it does not start.
    let held = c
        .wait_job(
            second.id,
            "the second job dispatched",
            Duration::from_secs(20),
            |j| j.state == JobState::Dispatched,
        )
        .await;
    assert!(held.started_at.is_none(), "{held:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still: common::JobView = c.get_as(&format!("/api/v1/jobs/{}", second.id)).await;
    let still = still.record;
    assert_eq!(
        still.state,
        JobState::Dispatched,
        "started while the only slot was taken: {still:?}"
    );
    // Freeing the slot lets it run.
    c.api(
        reqwest::Method::POST,
        &format!("/api/v1/jobs/{}/cancel", first.id),
        None,
    )
    .await;
    let done = c
        .wait_job(
            second.id,
            "the second job to run",
            Duration::from_secs(20),
            |j| j.state == JobState::Succeeded,
        )
        .await;
    assert!(done.started_at.unwrap() >= still.dispatched_at.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_restart_restarts_only_allowed_containers_on_the_real_engine() {
    use common::docker::{self, Containers};
    let ctrs = Containers::new();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let web = format!("nebula-job-web-{}", &tag[..8]);
    let other = format!("nebula-job-other-{}", &tag[..8]);
    ctrs.run(&web, &[docker::IMAGE, "sleep", "600"]);
    ctrs.run(&other, &[docker::IMAGE, "sleep", "600"]);
    let started = |name: &str| docker::docker(&["inspect", "-f", "{{.State.StartedAt}}", name]);
    let (web_before, other_before) = (started(&web), started(&other));

    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = exec_config(dir.path(), &format!("docker_containers = [\"{web}\"]"));
    let _a = one_box(&c, &dir.path().join("state"), &config).await;

    let ok = c
        .job(json!({"node": "box", "work": {"kind": "exec", "op": "docker-restart", "args": [web]}, "wait": "60s"}))
        .await;
    assert_eq!(ok.state, JobState::Succeeded, "{ok:?}");
    assert_ne!(started(&web), web_before, "the container was restarted");
    let refused = c
        .job(json!({"node": "box", "work": {"kind": "exec", "op": "docker-restart", "args": [other]}, "wait": "60s"}))
        .await;
    assert_eq!(refused.state, JobState::Failed);
    assert!(
        refused
            .error
            .as_deref()
            .unwrap()
            .contains("docker_containers"),
        "{refused:?}"
    );
    assert_eq!(
        started(&other),
        other_before,
        "a container not on the list is untouched"
    );
}
