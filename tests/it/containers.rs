//! Docker controls end to end: a real controller and agents on the real Docker Engine. Every
//! container in the fleet, actions as jobs under each node's `[docker]` policy, and logs
//! followed live from the agent over QUIC to server-sent events and the CLI.

use crate::common;
use crate::common::Sse;

use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime};

use common::docker::{self, docker, IMAGE};
use common::*;
use nebula_types::api::containers::{
    ContainerActionView, ContainerLogLine, ContainerRow, ContainerView,
};
use nebula_types::jobs::JobState;
use serde_json::{json, Value};

/// A name no other test uses.
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

impl Sse {
    async fn open(c: &Controller, token: &str, path: &str) -> Result<Sse, (u16, Value)> {
        let resp = c
            .client
            .get(c.url(path))
            .bearer_auth(token)
            .header("accept", "text/event-stream")
            .send()
            .await
            .expect("GET logs");
        if resp.status() != 200 {
            let status = resp.status().as_u16();
            return Err((status, resp.json().await.unwrap_or(Value::Null)));
        }
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Ok(Sse::new(resp))
    }

    /// Log lines, batch by batch, with the time each batch arrived, until `enough` says stop
    /// or the stream ends (`end` or `error` events are returned as the last item's event).
    async fn lines(
        &mut self,
        timeout: Duration,
        mut enough: impl FnMut(&[(Instant, ContainerLogLine)]) -> bool,
    ) -> (Vec<(Instant, ContainerLogLine)>, Option<String>) {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while !enough(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some((event, data)) = self.next(left).await else {
                return (got, None);
            };
            match event.as_str() {
                "logs" => {
                    let now = Instant::now();
                    let batch: Vec<ContainerLogLine> = serde_json::from_str(&data).unwrap();
                    got.extend(batch.into_iter().map(|l| (now, l)));
                }
                other => return (got, Some(format!("{other} {data}"))),
            }
        }
        (got, None)
    }
}

/// The number in `tick N` / `err N`.
fn number(line: &str) -> u64 {
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn unix_ms(t: &str) -> i64 {
    humantime::parse_rfc3339_weak(t)
        .unwrap()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Wait until `name` shows in the fleet's container list, running.
async fn listed(c: &Controller, name: &str) -> ContainerRow {
    wait_for(
        &format!("{name} in the container list"),
        Duration::from_secs(20),
        || async {
            let page: Page<ContainerRow> = c.get_as(&format!("/api/v1/containers?q={name}")).await;
            page.items
                .into_iter()
                .find(|r| r.name == name && r.state == "running")
        },
    )
    .await
}

async fn act(c: &Controller, token: &str, node: &str, name: &str, action: &str) -> (u16, Value) {
    let resp = c
        .client
        .post(c.url(&format!("/api/v1/nodes/{node}/containers/{name}/actions")))
        .bearer_auth(token)
        .json(&json!({ "action": action }))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Act and wait for the job to end; returns the finished job's state and error.
async fn act_done(c: &Controller, node: &str, name: &str, action: &str) -> ContainerActionView {
    let (status, v) = act(c, &c.admin_token, node, name, action).await;
    assert_eq!(status, 202, "{action} {name}: {v}");
    let view: ContainerActionView = serde_json::from_value(v).unwrap();
    let job = c
        .wait_job(
            view.job.record.id,
            &format!("{action} {name} to finish"),
            Duration::from_secs(30),
            |j| j.state.is_terminal(),
        )
        .await;
    assert_eq!(job.state, JobState::Succeeded, "{action} {name}: {job:?}");
    view
}

fn docker_state(name: &str) -> String {
    docker(&["inspect", "-f", "{{.State.Status}}", name])
}

async fn api_token(c: &Controller, name: &str, role: &str) -> String {
    let (status, v) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/api-tokens",
            Some(json!({"name": name, "role": role})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    v["token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_log_arrives_in_order_within_a_second_with_tail_and_since() {
    let ctrs = docker::Containers::new();
    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (_agent, _) = join_ready(&c, dir.path(), "logs-node", &[], None).await;
    let name = unique("ticker");
    ctrs.run(
        &name,
        &[
            IMAGE,
            "sh",
            "-c",
            "i=0; while true; do echo \"tick $i\"; echo \"err $i\" >&2; i=$((i+1)); sleep 0.1; done",
        ],
    );
    let row = listed(&c, &name).await;
    assert!(!row.managed && row.service.is_none(), "{row:?}");
    assert_eq!(row.state, "running");
    let logs = format!("/api/v1/nodes/logs-node/containers/{name}/logs");

    // Follow from now: 20 stdout lines, consecutive, each within a second of being written.
    let mut sse = Sse::open(&c, &c.admin_token, &format!("{logs}?follow=true&tail=0"))
        .await
        .unwrap();
    let (got, end) = sse
        .lines(Duration::from_secs(15), |g| {
            g.iter().filter(|(_, l)| l.stream == "stdout").count() >= 20
        })
        .await;
    assert_eq!(end, None, "the stream ended early");
    let out: Vec<&(Instant, ContainerLogLine)> =
        got.iter().filter(|(_, l)| l.stream == "stdout").collect();
    let first = number(&out[0].1.line);
    for (i, (_, l)) in out.iter().enumerate() {
        assert_eq!(number(&l.line), first + i as u64, "in order: {:?}", out);
    }
    let errs: Vec<u64> = got
        .iter()
        .filter(|(_, l)| l.stream == "stderr")
        .map(|(_, l)| number(&l.line))
        .collect();
    assert!(
        !errs.is_empty() && errs.windows(2).all(|w| w[1] == w[0] + 1),
        "{errs:?}"
    );
    // Latency: arrival against the runtime's timestamp (same host clock).
    let started = Instant::now();
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut worst = 0i64;
    for (arrived, l) in &got {
        let arrived_ms = now_ms - started.duration_since(*arrived).as_millis() as i64;
        worst = worst.max(arrived_ms - unix_ms(&l.t));
    }
    eprintln!(
        "api log lateness: worst {worst} ms over {} lines",
        got.len()
    );
    assert!(worst < 1000, "a line took {worst} ms to arrive");
    drop(sse);

    // The CLI follows too (stdout to stdout, stderr to stderr).
    let mut cmd = std::process::Command::new(bin("nebula"));
    cmd.args(["container", "logs", "logs-node", &name, "-f", "--tail", "0"])
        .env("NEBULA_CONTROLLER", c.url(""))
        .env("NEBULA_TOKEN", &c.admin_token);
    let cli = Proc::spawn(cmd);
    let text = wait_for(
        "the CLI to print 10 lines",
        Duration::from_secs(15),
        || async {
            let t = cli.stdout.text();
            (t.lines().filter(|l| l.starts_with("tick ")).count() >= 10).then_some(t)
        },
    )
    .await;
    let nums: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("tick "))
        .map(number)
        .collect();
    assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "{nums:?}");
    assert!(
        !cli.stdout.text().contains("err "),
        "stderr lines stay off stdout"
    );
    assert!(cli.stderr.text().contains("err "), "{}", cli.stderr.text());
    drop(cli);

    // --tail: exactly the last N lines of what is there, then the end.
    let mut sse = Sse::open(&c, &c.admin_token, &format!("{logs}?follow=false&tail=4"))
        .await
        .unwrap();
    let (tail, end) = sse.lines(Duration::from_secs(10), |_| false).await;
    assert_eq!(tail.len(), 4, "{tail:?}");
    assert_eq!(end.as_deref().map(|e| e.starts_with("end")), Some(true));
    // --since: only lines written from then on.
    let mut sse = Sse::open(&c, &c.admin_token, &format!("{logs}?follow=false"))
        .await
        .unwrap();
    let (all, _) = sse.lines(Duration::from_secs(10), |_| false).await;
    assert!(all.len() > 40, "{}", all.len());
    let cut = &all[all.len() / 2].1;
    let since = cut.t.clone();
    let mut sse = Sse::open(
        &c,
        &c.admin_token,
        &format!("{logs}?follow=false&since={since}"),
    )
    .await
    .unwrap();
    let (later, _) = sse.lines(Duration::from_secs(10), |_| false).await;
    assert!(!later.is_empty());
    assert!(
        later.iter().all(|(_, l)| unix_ms(&l.t) >= unix_ms(&since)),
        "a line before {since}"
    );
    let expected_first = all
        .iter()
        .find(|(_, l)| unix_ms(&l.t) >= unix_ms(&since))
        .unwrap();
    assert_eq!(later[0].1, expected_first.1);
    assert!(later.len() < all.len());

    // Bad input: an unknown container, a bad name, a bad `since`.
    let (status, v) = c
        .api(
            reqwest::Method::GET,
            "/api/v1/nodes/logs-node/containers/nope-404/logs",
            None,
        )
        .await;
    assert_eq!(status, 404, "{v}");
    let (status, _) = c
        .api(
            reqwest::Method::GET,
            &format!("{logs}?since=yesterday-ish"),
            None,
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = c
        .api(
            reqwest::Method::GET,
            "/api/v1/nodes/nowhere/containers/x/logs",
            None,
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_on_containers_follow_each_nodes_policy_and_roles() {
    let ctrs = docker::Containers::new();
    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // Two agents on the same Docker Engine: one keeps to its managed containers and reads no
    // logs, the other may touch any container.
    let strict = "[docker]\ncontrol = \"managed\"\nlogs = \"none\"\n";
    let (_s, _) = join_ready(&c, dir.path(), "strict", &[], Some(strict)).await;
    let open = "[docker]\ncontrol = \"all\"\n";
    let (_o, _) = join_ready(&c, dir.path(), "open", &[], Some(open)).await;
    let name = unique("victim");
    ctrs.run(&name, &[IMAGE, "sleep", "3600"]);
    listed(&c, &name).await;
    wait_for("both nodes to list it", Duration::from_secs(20), || async {
        let page: Page<ContainerRow> = c.get_as(&format!("/api/v1/containers?q={name}")).await;
        (page.items.len() == 2).then_some(())
    })
    .await;

    // What each node allows, as the container page shows it.
    let v: ContainerView = c
        .get_as(&format!("/api/v1/nodes/strict/containers/{name}"))
        .await;
    assert_eq!(v.policy.as_ref().unwrap().control, "managed");
    assert!(v.refusals["control"].contains("docker.control = \"managed\""));
    assert!(v.refusals["logs"].contains("docker.logs = \"none\""));
    let v: ContainerView = c
        .get_as(&format!("/api/v1/nodes/open/containers/{name}"))
        .await;
    assert!(!v.refusals.contains_key("control"), "{v:?}");

    // Refused on the strict node, by the rule's name, and nothing changes.
    let (status, v) = act(&c, &c.admin_token, "strict", &name, "stop").await;
    assert_eq!(status, 403, "{v}");
    let message = error_of(&v).message;
    assert!(
        message.contains("docker.control = \"managed\""),
        "{message}"
    );
    assert!(
        message.contains("docker.control = \"all\""),
        "says what allows it: {message}"
    );
    // The agent checks for itself: the same action sent as a plain job is refused there.
    let job = c
        .job(json!({"node": "strict", "work": {"kind": "container", "container": name, "action": "stop"}}))
        .await;
    let job = c
        .wait_job(job.id, "the refused job", Duration::from_secs(20), |j| {
            j.state.is_terminal()
        })
        .await;
    assert_eq!(job.state, JobState::Failed);
    let err = job.error.unwrap_or_default();
    assert!(
        err.contains("refused by the agent") && err.contains("docker.control"),
        "{err}"
    );
    assert_eq!(docker_state(&name), "running");
    let (status, v) = c
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/nodes/strict/containers/{name}/logs?follow=false"),
            None,
        )
        .await;
    assert_eq!(status, 403, "{v}");
    assert!(error_of(&v).message.contains("docker.logs = \"none\""));

    // Roles: a viewer reads logs but may not act.
    let viewer = api_token(&c, "watcher", "viewer").await;
    let (status, _) = act(&c, &viewer, "open", &name, "stop").await;
    assert_eq!(status, 403);
    assert_eq!(docker_state(&name), "running");
    let sse = Sse::open(
        &c,
        &viewer,
        &format!("/api/v1/nodes/open/containers/{name}/logs?follow=false"),
    )
    .await;
    assert!(sse.is_ok(), "viewers read logs");

    // Allowed on the open node: stop, start, kill, remove, each as a job; no warning for an
    // unmanaged container.
    let done = act_done(&c, "open", &name, "stop").await;
    assert_eq!(done.warning, None);
    assert_eq!(docker_state(&name), "exited");
    act_done(&c, "open", &name, "start").await;
    assert_eq!(docker_state(&name), "running");
    act_done(&c, "open", &name, "restart").await;
    assert_eq!(docker_state(&name), "running");
    act_done(&c, "open", &name, "kill").await;
    assert_eq!(docker_state(&name), "exited");
    act_done(&c, "open", &name, "rm").await;
    let gone = std::process::Command::new("docker")
        .args(["inspect", &name])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "removed");
    // Every action is in the audit, with who did it.
    let audit: Page<nebula_types::jobs::AuditRecord> = c.get_as("/api/v1/audit?limit=200").await;
    let target = format!("open/{name}");
    for action in [
        "container.stop",
        "container.start",
        "container.kill",
        "container.remove",
    ] {
        assert!(
            audit
                .items
                .iter()
                .any(|a| a.action == action && a.target == target && a.actor == "admin"),
            "{action} audited: {:?}",
            audit
                .items
                .iter()
                .map(|a| (&a.action, &a.target))
                .collect::<Vec<_>>()
        );
    }

    // Bad input changes nothing.
    let (status, _) = act(&c, &c.admin_token, "open", "x", "explode").await;
    assert_eq!(status, 400);
    let (status, _) = act(&c, &c.admin_token, "open", "no-such-container", "stop").await;
    assert_eq!(status, 404);
    let (status, _) = act(&c, &c.admin_token, "nowhere", &name, "stop").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_container_stopped_by_hand_is_put_back_as_the_warning_says() {
    docker::ensure_image();
    let cleanup = docker::Managed::default();
    let c = Controller::start(ControllerOpts {
        extra: vec!["--reconcile-interval", "1s"],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, node_id) = join_ready(&c, dir.path(), "keeper", &[], None).await;
    cleanup.add(&node_id);
    let map = format!(
        "version: 1\nnodes:\n  keeper: {{}}\nservices:\n  sleeper:\n    image: {IMAGE}\n    command: sleep 3600\n    placement: {{ node: keeper }}\n"
    );
    let (status, v) = c.put_map(&map).await;
    assert_eq!(status, 200, "{v}");
    let row = wait_for("the managed container", Duration::from_secs(60), || async {
        let page: Page<ContainerRow> = c.get_as("/api/v1/containers?managed=true").await;
        page.items
            .into_iter()
            .find(|r| r.service.as_deref() == Some("sleeper") && r.state == "running")
    })
    .await;
    assert!(row.managed);
    // The unmanaged filter leaves it out.
    let page: Page<ContainerRow> = c
        .get_as("/api/v1/containers?managed=false&node=keeper")
        .await;
    assert!(page.items.iter().all(|r| r.name != row.name));

    let done = act_done(&c, "keeper", &row.name, "stop").await;
    let warning = done.warning.expect("a warning for a managed container");
    assert!(
        warning.contains("sleeper") && warning.contains("reconciler will put it back"),
        "{warning}"
    );
    // As the warning said: the reconciler runs it again.
    wait_for(
        "the service to run again",
        Duration::from_secs(60),
        || async {
            let page: Page<ContainerRow> = c.get_as("/api/v1/containers?managed=true").await;
            page.items
                .into_iter()
                .find(|r| r.service.as_deref() == Some("sleeper") && r.state == "running")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_holds_memory_to_a_bound_and_loses_nothing() {
    let ctrs = docker::Containers::new();
    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = join_ready(&c, dir.path(), "flood", &[], None).await;
    let name = unique("flood");
    // About 40 MB of numbered lines, written as fast as the runtime takes them; then it waits
    // (so that a follower stays open). The log is kept whole whatever the daemon's rotation.
    let pad = "x".repeat(190);
    ctrs.run(
        &name,
        &[
            "--log-opt",
            "max-size=200m",
            "--log-opt",
            "max-file=1",
            IMAGE,
            "sh",
            "-c",
            &format!("seq 1 200000 | sed 's/$/ {pad}/'; echo done; sleep 3600"),
        ],
    );
    listed(&c, &name).await;
    wait_for(
        "the flood to be written",
        Duration::from_secs(120),
        || async {
            let out = std::process::Command::new("docker")
                .args(["logs", "--tail", "1", &name])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .contains("done")
                .then_some(())
        },
    )
    .await;

    let controller_pid = c.proc.child.id();
    let agent_pid = agent.proc.child.id();
    let (c0, a0) = (rss_bytes(controller_pid), rss_bytes(agent_pid));
    assert!(c0 > 0 && a0 > 0);
    // A client that asks to follow the log and then reads nothing (HTTP/1.0: the body is not
    // chunked, so what it reads later is the event stream as sent).
    let mut stalled = std::net::TcpStream::connect(c.http).unwrap();
    write!(
        stalled,
        "GET /api/v1/nodes/flood/containers/{name}/logs?follow=true HTTP/1.0\r\nHost: {}\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
        c.http, c.admin_token
    )
    .unwrap();
    // Everything the log holds would fit in memory many times over; the bound keeps growth
    // to the stream's buffers.
    let mut peak = (0u64, 0u64);
    for _ in 0..16 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak.0 = peak.0.max(rss_bytes(controller_pid).saturating_sub(c0));
        peak.1 = peak.1.max(rss_bytes(agent_pid).saturating_sub(a0));
    }
    eprintln!(
        "stalled reader: controller grew {} KiB, agent {} KiB",
        peak.0 >> 10,
        peak.1 >> 10
    );
    const BOUND: u64 = 16 << 20;
    assert!(peak.0 < BOUND, "the controller grew {} MiB", peak.0 >> 20);
    assert!(peak.1 < BOUND, "the agent grew {} MiB", peak.1 >> 20);
    // The other streams are not held up: the API answers at once.
    let t = Instant::now();
    c.get("/api/v1/nodes").await;
    assert!(t.elapsed() < Duration::from_secs(2));

    // The reader resumes: the lines come in order, from the first.
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut text = String::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut seen = 0u64;
    while seen < 20_000 {
        let n = stalled.read(&mut buf).expect("reading the resumed stream");
        assert!(n > 0, "the stream ended");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        // Count whole `data:` lines of log batches seen so far.
        while let Some(pos) = text.find("\n\n") {
            let block: String = text.drain(..pos + 2).collect();
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            if !block.contains("event: logs") {
                continue;
            }
            let lines: Vec<ContainerLogLine> = serde_json::from_str(data).unwrap();
            for l in lines {
                let n: u64 = l.line.split(' ').next().unwrap().parse().unwrap();
                assert_eq!(n, seen + 1, "in order, none lost");
                seen = n;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_every_container_with_ports_uptime_and_filters() {
    let ctrs = docker::Containers::new();
    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, _) = join_ready(&c, dir.path(), "lister", &[], None).await;
    let name = unique("published");
    ctrs.run(&name, &["-p", "127.0.0.1::80", IMAGE, "sleep", "3600"]);
    let row = wait_for("ports and start time", Duration::from_secs(20), || async {
        let r = listed(&c, &name).await;
        (!r.ports.is_empty() && r.uptime_secs.is_some()).then_some(r)
    })
    .await;
    assert!(
        row.ports[0].starts_with("127.0.0.1:") && row.ports[0].ends_with("->80/tcp"),
        "{:?}",
        row.ports
    );
    assert!(row.started_at.is_some());
    // The CLI reads the same list (a busy host's agent may miss one listing; look again).
    let text = wait_for("the CLI to list it", Duration::from_secs(20), || async {
        let out = c.cli(&["containers", &name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines().any(|l| l.contains(&name)).then_some(text)
    })
    .await;
    assert!(text.starts_with("NODE"), "{text}");
    let line = text.lines().find(|l| l.contains(&name)).expect("listed");
    assert!(
        line.contains("lister") && line.contains("running"),
        "{line}"
    );
    assert!(line.contains("->80/tcp") && line.contains(" no"), "{line}");
    // Filters: --managed leaves it out, --unmanaged keeps it; an unknown state is refused.
    let out = c.cli(&["containers", &name, "--managed"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&name));
    let unmanaged = || c.cli(&["containers", &name, "--unmanaged"]);
    let out = wait_for(
        "--unmanaged to list it",
        Duration::from_secs(20),
        || async {
            let out = unmanaged();
            String::from_utf8_lossy(&out.stdout)
                .contains(&name)
                .then_some(out)
        },
    )
    .await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&name),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.cli(&["containers", "--state", "sleepy"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a container state"));
    // `container show` says what the node allows.
    let out = c.cli(&["container", "show", "lister", &name]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("control=managed exec=managed logs=all"),
        "{text}"
    );
    assert!(text.contains("no control"), "{text}");
}

/// An exec WebSocket as a terminal client would use it.
struct Terminal {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    screen: String,
}

impl Terminal {
    async fn open(
        c: &Controller,
        token: &str,
        node: &str,
        name: &str,
        query: &str,
    ) -> Result<Terminal, u16> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!(
            "ws://{}/api/v1/nodes/{node}/containers/{name}/exec?{query}",
            c.http
        );
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Ok((socket, _)) => Ok(Terminal {
                socket,
                screen: String::new(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("exec socket: {e}"),
        }
    }

    async fn send(&mut self, keys: &str) {
        use futures::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        self.socket
            .send(Message::binary(keys.as_bytes().to_vec()))
            .await
            .unwrap();
    }

    async fn control(&mut self, json: Value) {
        use futures::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        self.socket
            .send(Message::text(json.to_string()))
            .await
            .unwrap();
    }

    /// Read output until `want` shows (returns the time it took), or a control message comes
    /// (returned as the error).
    async fn until(&mut self, want: &str) -> Result<Duration, Value> {
        use futures::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        let t = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while !self.screen.contains(want) {
            let msg = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no `{want}` in: {:?}", self.screen))
                .expect("the socket closed")
                .unwrap();
            match msg {
                Message::Binary(b) => {
                    assert!(b[0] == 1 || b[0] == 2, "output is tagged by stream");
                    self.screen.push_str(&String::from_utf8_lossy(&b[1..]));
                }
                Message::Text(t) => return Err(serde_json::from_str(t.as_str()).unwrap()),
                _ => {}
            }
        }
        let elapsed = t.elapsed();
        self.screen.clear();
        Ok(elapsed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_a_shell_with_a_real_terminal_under_each_nodes_policy() {
    let ctrs = docker::Containers::new();
    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (_s, _) = join_ready(&c, dir.path(), "strict", &[], None).await;
    let open = "[docker]\nexec = \"all\"\n";
    let (_o, _) = join_ready(&c, dir.path(), "open", &[], Some(open)).await;
    let name = unique("shell");
    ctrs.run(&name, &[IMAGE, "sleep", "3600"]);
    listed(&c, &name).await;
    wait_for("both nodes to list it", Duration::from_secs(20), || async {
        let page: Page<ContainerRow> = c.get_as(&format!("/api/v1/containers?q={name}")).await;
        (page.items.len() == 2).then_some(())
    })
    .await;

    // A shell with a terminal: an echo round trip, the terminal's size, a resize, the exit.
    let mut t = Terminal::open(&c, &c.admin_token, "open", &name, "cmd=sh&rows=24&cols=80")
        .await
        .unwrap();
    t.send("echo hello-$((6*7))\r").await;
    t.until("hello-42").await.unwrap();
    t.send("stty size\r").await;
    t.until("24 80").await.unwrap();
    t.control(json!({"resize": {"rows": 40, "cols": 132}}))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    t.send("stty size\r").await;
    t.until("40 132").await.unwrap();
    t.send("tty\r").await;
    t.until("/dev/pts/").await.unwrap();
    t.send("exit 3\r").await;
    let end = t.until("never printed").await.unwrap_err();
    assert_eq!(end, json!({"exit": 3}));

    // The CLI without a terminal: stdout and stderr apart, the exit status passed on, piped
    // input read to its end.
    let out = c.cli(&[
        "container",
        "exec",
        "open",
        &name,
        "-T",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 5",
    ]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err"));
    let mut cmd = std::process::Command::new(bin("nebula"));
    cmd.args([
        "container",
        "exec",
        "open",
        &name,
        "-T",
        "--",
        "sh",
        "-c",
        "n=0; while read l; do n=$((n+1)); done; echo $n",
    ])
    .env("NEBULA_CONTROLLER", c.url(""))
    .env("NEBULA_TOKEN", &c.admin_token)
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"one\ntwo\nthree\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{:?} {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");

    // Refused: where the node's policy says no (by the rule's name), and for a viewer.
    let (status, v) = c
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/nodes/strict/containers/{name}/exec"),
            None,
        )
        .await;
    assert_eq!(status, 400, "a plain GET is not a WebSocket: {v}");
    let refused = Terminal::open(&c, &c.admin_token, "strict", &name, "cmd=sh").await;
    assert_eq!(refused.err(), Some(403));
    let out = c.cli(&["container", "exec", "strict", &name, "-T", "--", "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("docker.exec = \"managed\""),
        "{err}"
    );
    let viewer = api_token(&c, "peeker", "viewer").await;
    let refused = Terminal::open(&c, &viewer, "open", &name, "cmd=sh").await;
    assert_eq!(refused.err(), Some(403));

    // Audited: who, where, what, how long and how it ended; never what was typed.
    let audit: Page<nebula_types::jobs::AuditRecord> = c.get_as("/api/v1/audit?limit=200").await;
    let target = format!("open/{name}");
    let opened: Vec<_> = audit
        .items
        .iter()
        .filter(|a| a.action == "container.exec" && a.target == target)
        .collect();
    assert_eq!(opened.len(), 3, "three sessions on the open node");
    assert!(opened.iter().all(|a| a.actor == "admin"));
    let ended: Vec<_> = audit
        .items
        .iter()
        .filter(|a| a.action == "container.exec.end" && a.target == target)
        .collect();
    assert_eq!(ended.len(), 3);
    assert!(ended.iter().any(|a| a.detail["exit_code"] == 3));
    assert!(ended
        .iter()
        .all(|a| a.detail["duration_ms"].as_u64().is_some()));
    let all = serde_json::to_string(&audit.items).unwrap();
    assert!(!all.contains("hello-"), "keystrokes stay out of the audit");
}

/// An image of its own (a one-file root filesystem imported under a unique name), so that no
/// other test's image is ever in a prune.
pub(crate) fn unique_image(tag: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("marker"), tag).unwrap();
    let tar = std::process::Command::new("tar")
        .args(["-C", dir.path().to_str().unwrap(), "-cf", "-", "."])
        .output()
        .unwrap();
    assert!(tar.status.success());
    let mut import = std::process::Command::new("docker")
        .args(["import", "-", tag])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    import.stdin.take().unwrap().write_all(&tar.stdout).unwrap();
    let out = import.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_removes_what_its_preview_showed_and_no_more() {
    let ctrs = docker::Containers::new();
    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (_s, _) = join_ready(&c, dir.path(), "keeps", &[], None).await;
    let open = "[docker]\ncontrol = \"all\"\n";
    let (_o, _) = join_ready(&c, dir.path(), "frees", &[], Some(open)).await;
    let tag = unique("prune");
    // Two unused images, an unused volume with data, and a volume and an image in use.
    let unused_a = unique_image(&format!("nebula-test/{tag}-a:1"));
    let unused_b = unique_image(&format!("nebula-test/{tag}-b:1"));
    let spare = format!("{tag}-spare");
    let kept = format!("{tag}-kept");
    let late = format!("{tag}-late");
    for v in [&spare, &kept, &late] {
        docker(&["volume", "create", v]);
    }
    let user = unique("user");
    ctrs.run(
        &user,
        &[
            "-v",
            &format!("{kept}:/data"),
            IMAGE,
            "sh",
            "-c",
            "echo x > /data/f; sleep 3600",
        ],
    );
    listed(&c, &user).await;
    let cleanup_volumes = [spare.clone(), kept.clone(), late.clone()];
    struct Volumes([String; 3]);
    impl Drop for Volumes {
        fn drop(&mut self) {
            // Dropped before the containers that mount them: those go first.
            for v in &self.0 {
                let users = docker(&["ps", "-aq", "--filter", &format!("volume={v}")]);
                for id in users.lines().filter(|l| !l.is_empty()) {
                    let _ = std::process::Command::new("docker")
                        .args(["rm", "-f", id])
                        .output();
                }
                let _ = std::process::Command::new("docker")
                    .args(["volume", "rm", "-f", v])
                    .output();
            }
        }
    }
    let _volumes = Volumes(cleanup_volumes);

    // The listing: sizes and users.
    let v: nebula_types::api::containers::StorageView =
        c.get_as("/api/v1/nodes/frees/storage").await;
    let a = v.images.iter().find(|i| i.id == unused_a).expect("listed");
    assert!(a.containers.is_empty() && a.size_bytes > 0, "{a:?}");
    let busybox = v
        .images
        .iter()
        .find(|i| i.tags.iter().any(|t| t == IMAGE))
        .unwrap();
    assert!(busybox.containers.contains(&user), "{busybox:?}");
    let k = v.volumes.iter().find(|x| x.name == kept).unwrap();
    assert_eq!(k.containers, vec![user.clone()]);
    assert!(v.disk.images_bytes >= a.size_bytes && v.disk.reclaimable_bytes >= a.size_bytes);
    let out = c.cli(&["images", "frees"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{tag}-a:1")) && text.contains("unused"),
        "{text}"
    );
    let out = c.cli(&["volumes", "frees"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with(&kept)).unwrap();
    assert!(line.contains(&user), "{line}");

    // The preview: this test's unused images and volumes, and not what is in use.
    let preview: nebula_types::api::containers::PrunePreview = c
        .get_as(&format!(
            "/api/v1/nodes/frees/storage/prune?volumes=true&match={tag}"
        ))
        .await;
    let mut shown: Vec<String> = preview
        .images
        .iter()
        .map(|i| i.id.clone())
        .chain(preview.volumes.iter().map(|v| v.name.clone()))
        .collect();
    shown.sort();
    let mut expected = vec![
        unused_a.clone(),
        unused_b.clone(),
        spare.clone(),
        late.clone(),
    ];
    expected.sort();
    assert_eq!(shown, expected);

    // Refused: volumes where the node keeps to managed containers, and for a viewer.
    let body = json!({"images": [], "volumes": [spare]});
    let (status, v) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/nodes/keeps/storage/prune",
            Some(body.clone()),
        )
        .await;
    assert_eq!(status, 403, "{v}");
    assert!(
        error_of(&v).message.contains("docker.control = \"all\""),
        "{v}"
    );
    let viewer = api_token(&c, "looker", "viewer").await;
    let resp = c
        .client
        .post(c.url("/api/v1/nodes/frees/storage/prune"))
        .bearer_auth(&viewer)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    // Between the preview and the prune, a container starts using one volume: it stays.
    let late_user = unique("late");
    ctrs.run(
        &late_user,
        &["-v", &format!("{late}:/data"), IMAGE, "sleep", "3600"],
    );
    let body = json!({
        "images": preview.images.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
        "volumes": preview.volumes.iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
    });
    let (status, v) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/nodes/frees/storage/prune",
            Some(body),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let done: nebula_types::api::containers::PruneResult = serde_json::from_value(v).unwrap();
    let mut removed = done.removed.clone();
    removed.sort();
    let mut want = vec![unused_a.clone(), unused_b.clone(), spare.clone()];
    want.sort();
    assert_eq!(
        removed, want,
        "what the preview showed, less what is in use now"
    );
    assert_eq!(done.skipped.len(), 1);
    assert_eq!(done.skipped[0].0, late);
    assert!(done.skipped[0].1.contains(&late_user), "{:?}", done.skipped);
    assert!(done.reclaimed_bytes > 0);
    // And the runtime agrees.
    for id in [&unused_a, &unused_b] {
        let r = std::process::Command::new("docker")
            .args(["image", "inspect", id])
            .output()
            .unwrap();
        assert!(!r.status.success(), "{id} removed");
    }
    let left = docker(&["volume", "ls", "--format", "{{.Name}}"]);
    assert!(
        !left.lines().any(|l| l == spare)
            && left.lines().any(|l| l == kept)
            && left.lines().any(|l| l == late)
    );
    docker(&["image", "inspect", IMAGE]);
    let audit: Page<nebula_types::jobs::AuditRecord> = c.get_as("/api/v1/audit?limit=100").await;
    assert!(audit
        .items
        .iter()
        .any(|a| a.action == "node.prune" && a.target == "frees"));
}

/// Podman's API socket, as `scripts/test` starts it (Debian's podman package, its own storage
/// under `target/podman/`). Without it these tests fail: they never pass by skipping.
fn podman_socket() -> String {
    let path = std::env::var("NEBULA_TEST_PODMAN_SOCK").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/podman/podman.sock").to_owned()
    });
    let ok = std::process::Command::new("docker")
        .args([
            "-H",
            &format!("unix://{path}"),
            "version",
            "--format",
            "{{.Server.Version}}",
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "Podman's API socket is not up at {path}; scripts/test starts it (podman system service)"
    );
    path
}

/// `docker` against Podman's socket (the same Docker-compatible API the agent speaks).
fn podman(sock: &str, args: &[&str]) -> String {
    let host = format!("unix://{sock}");
    let mut all = vec!["-H", host.as_str()];
    all.extend_from_slice(args);
    docker(&all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_podman_reports_deploys_follows_logs_and_runs_commands() {
    docker::ensure_image();
    let sock = podman_socket();
    // The local test image, into Podman's store (no registry is reachable).
    let saved = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("docker save {IMAGE} | docker -H unix://{sock} load"),
        ])
        .output()
        .unwrap();
    assert!(
        saved.status.success(),
        "{}",
        String::from_utf8_lossy(&saved.stderr)
    );
    let name = unique("pod");
    struct Gone(String, String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let host = format!("unix://{}", self.0);
            let ids = std::process::Command::new("docker")
                .args([
                    "-H",
                    &host,
                    "ps",
                    "-aq",
                    "--filter",
                    &format!("label={}", self.1),
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for id in ids.lines().filter(|l| !l.is_empty()) {
                let _ = std::process::Command::new("docker")
                    .args(["-H", &host, "rm", "-f", id])
                    .output();
            }
        }
    }
    let label = format!("nebula.test={name}");
    let _gone = Gone(sock.clone(), label.clone());
    let c = Controller::start(ControllerOpts {
        extra: vec!["--reconcile-interval", "1s"],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config =
        format!("[docker]\nsocket = \"unix://{sock}\"\ncontrol = \"all\"\nexec = \"all\"\n");
    let (_a, node_id) = join_ready(&c, dir.path(), "podnode", &[], Some(&config)).await;
    struct Managed(String, String);
    impl Drop for Managed {
        fn drop(&mut self) {
            let host = format!("unix://{}", self.0);
            let ids = std::process::Command::new("docker")
                .args([
                    "-H",
                    &host,
                    "ps",
                    "-aq",
                    "--filter",
                    &format!("label=nebula.node={}", self.1),
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for id in ids.lines().filter(|l| !l.is_empty()) {
                let _ = std::process::Command::new("docker")
                    .args(["-H", &host, "rm", "-f", id])
                    .output();
            }
        }
    }
    let _managed = Managed(sock.clone(), node_id.clone());

    // Telemetry: the runtime is Podman, and its containers are listed.
    let node = c.node("podnode").await.unwrap();
    let runtime = node.facts.container_runtime.clone().unwrap_or_default();
    assert!(runtime.starts_with("podman "), "{runtime}");
    podman(
        &sock,
        &[
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            &label,
            IMAGE,
            "sh",
            "-c",
            "i=0; while true; do echo \"pod $i\"; i=$((i+1)); sleep 0.1; done",
        ],
    );
    let row = listed(&c, &name).await;
    assert_eq!(row.node, "podnode");

    // Logs, followed.
    let logs = format!("/api/v1/nodes/podnode/containers/{name}/logs?follow=true&tail=0");
    let mut sse = Sse::open(&c, &c.admin_token, &logs).await.unwrap();
    let (got, end) = sse.lines(Duration::from_secs(15), |g| g.len() >= 10).await;
    assert_eq!(end, None);
    let nums: Vec<u64> = got.iter().map(|(_, l)| number(&l.line)).collect();
    assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "{nums:?}");
    drop(sse);

    // A command, with its output and status.
    let out = c.cli(&[
        "container",
        "exec",
        "podnode",
        &name,
        "-T",
        "--",
        "sh",
        "-c",
        "echo in-podman; exit 7",
    ]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "in-podman\n");
    let mut t = Terminal::open(
        &c,
        &c.admin_token,
        "podnode",
        &name,
        "cmd=sh&rows=30&cols=100",
    )
    .await
    .unwrap();
    t.send("stty size\r").await;
    t.until("30 100").await.unwrap();
    t.send("exit\r").await;
    assert_eq!(t.until("never").await.unwrap_err(), json!({"exit": 0}));

    // A deploy from the local image.
    let map = format!(
        "version: 1\nnodes:\n  podnode: {{}}\nservices:\n  podsvc:\n    image: {IMAGE}\n    command: sleep 3600\n    placement: {{ node: podnode }}\n"
    );
    let (status, v) = c.put_map(&map).await;
    assert_eq!(status, 200, "{v}");
    wait_for(
        "the service to run on Podman",
        Duration::from_secs(90),
        || async {
            let page: Page<ContainerRow> = c
                .get_as("/api/v1/containers?node=podnode&managed=true")
                .await;
            page.items
                .into_iter()
                .find(|r| r.service.as_deref() == Some("podsvc") && r.state == "running")
        },
    )
    .await;
    let running = podman(
        &sock,
        &[
            "ps",
            "--filter",
            "label=nebula.service=podsvc",
            "--format",
            "{{.Names}}",
        ],
    );
    assert!(!running.is_empty(), "Podman runs the service's container");
}
