//! `nebula-bench workflows`: many concurrent runs of a 10-step workflow of no-op jobs, against
//! the same chains of 10 no-op jobs made one after another by clients through the API (the bare
//! job round trip), on the same controller and simulated agents (the agent's real job runner).
//!
//! Figures: the time per step (from the previous step's end to this one's, as the controller
//! stamps them) against the time per bare job (the client's `POST /api/v1/jobs` with `wait`),
//! median and p99, so the difference is what the workflow engine adds per step; the
//! controller's CPU and memory while the runs go.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fleet::SimFleet;
use crate::{cpu_ns, join_token, percentile, rss_kib, start_controller, stats};

pub struct WorkflowArgs {
    pub agents: usize,
    pub runs: usize,
    pub steps: usize,
    pub out: std::path::PathBuf,
}

fn workflow_file(steps: usize) -> String {
    let mut s = String::from("workflows:\n  bench:\n    steps:\n");
    for i in 0..steps {
        s.push_str(&format!(
            "      - {{ id: s{i}, type: noop, selector: {{}} }}\n"
        ));
    }
    s
}

fn ms(v: &Value) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(v.as_str()?).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64)
}

/// `clients` clients, each making a chain of `steps` no-op jobs one after another; the
/// milliseconds of each job, create to result.
async fn bare_chains(
    url: &str,
    admin: &str,
    clients: usize,
    steps: usize,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (url, admin) = (url.to_owned(), admin.to_owned());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut lat = Vec::new();
            for _ in 0..steps {
                let t = Instant::now();
                let r: Value = client
                    .post(&url)
                    .bearer_auth(&admin)
                    .json(&json!({"selector": {}, "work": {"kind": "noop"}, "wait": "120s"}))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                anyhow::ensure!(r["state"] == "succeeded", "a job did not succeed: {r}");
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all, t0.elapsed().as_secs_f64()))
}

/// Longer than the usual limit for a reason: one benchmark scenario read top to bottom (start
/// the processes, load, measure, write the figures).
pub async fn workflows_bench(a: WorkflowArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("workflows.yml");
    std::fs::write(&file, workflow_file(a.steps))?;
    let file_arg = file.display().to_string();
    let ctl = start_controller(
        dir.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--max-jobs-per-node", "256", "--workflows", &file_arg],
    )?;
    let (http, quic, admin, pid) = (ctl.http, ctl.quic, ctl.admin.clone(), ctl.child.id());
    let client = reqwest::Client::new();
    let token = join_token(&client, http, &admin, a.agents).await?;
    let fleet = SimFleet::start(
        quic,
        &token,
        a.agents,
        "wf",
        Duration::from_secs(5),
        0,
        Some(&dir.path().join("agents")),
    )
    .await?;
    anyhow::ensure!(
        fleet.failed == 0,
        "{} agents failed to connect",
        fleet.failed
    );
    println!("controller pid {pid}; {} agents serving jobs", a.agents);

    // The bare chains first (they also warm the controller up).
    let jobs_url = format!("http://{http}/api/v1/jobs");
    let (bare, bare_secs) = bare_chains(&jobs_url, &admin, a.runs, a.steps).await?;
    let mut sorted = bare.clone();
    sorted.sort_by(|x, y| x.total_cmp(y));
    println!(
        "bare: {} chains of {} jobs in {bare_secs:.1} s; per job p50 {:.1} ms, p99 {:.1} ms",
        a.runs,
        a.steps,
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99)
    );

    // The workflow runs, all started at once.
    let cpu0 = cpu_ns(pid);
    let t0 = Instant::now();
    let runs_url = format!("http://{http}/api/v1/workflows/bench/runs");
    let mut starts = Vec::new();
    for _ in 0..a.runs {
        let (client, url, admin) = (client.clone(), runs_url.clone(), admin.clone());
        starts.push(tokio::spawn(async move {
            let r: Value = client
                .post(&url)
                .bearer_auth(&admin)
                .json(&json!({}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            anyhow::Ok(r["id"].as_str().unwrap_or_default().to_owned())
        }));
    }
    let mut open: BTreeSet<String> = BTreeSet::new();
    for s in starts {
        open.insert(s.await??);
    }
    let started_secs = t0.elapsed().as_secs_f64();
    let mut peak_rss = 0;
    let mut done: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while !open.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} runs still open after 10 minutes",
            open.len()
        );
        peak_rss = peak_rss.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ids: Vec<String> = open.iter().cloned().collect();
        for id in ids {
            let r: Value = client
                .get(format!("http://{http}/api/v1/workflow-runs/{id}"))
                .bearer_auth(&admin)
                .send()
                .await?
                .json()
                .await?;
            match r["state"].as_str() {
                Some("running" | "queued") => break,
                Some("succeeded") => {
                    open.remove(&id);
                    done.push(r);
                }
                _ => anyhow::bail!("run {id} did not succeed: {r}"),
            }
        }
    }
    let total_secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_ns(pid) - cpu0) as f64 / 1e9 / total_secs;
    // Per step: from the previous step's end (the run's start for the first) to its own end.
    let mut per_step = Vec::new();
    let mut first_dispatch = Vec::new();
    for r in &done {
        let steps = r["steps"].as_array().cloned().unwrap_or_default();
        let mut prev = ms(&r["started_at"]).unwrap_or(0);
        for (i, s) in steps.iter().enumerate() {
            let (Some(start), Some(end)) = (ms(&s["started_at"]), ms(&s["finished_at"])) else {
                anyhow::bail!("a step without times: {s}");
            };
            if i == 0 {
                first_dispatch.push((start - prev) as f64);
            }
            per_step.push((end - prev) as f64);
            prev = end;
        }
    }
    let mut ws = per_step.clone();
    ws.sort_by(|x, y| x.total_cmp(y));
    let (wf50, wf99) = (percentile(&ws, 0.5), percentile(&ws, 0.99));
    let (b50, b99) = (percentile(&sorted, 0.5), percentile(&sorted, 0.99));
    println!(
        "workflow: {} runs of {} steps started in {started_secs:.1} s, all done in {total_secs:.1} s; per step p50 {wf50:.1} ms, p99 {wf99:.1} ms",
        a.runs, a.steps
    );
    println!(
        "overhead per step over the bare job: p50 {:.1} ms, p99 {:.1} ms; controller {cpu:.2} cores, peak RSS {} MiB",
        wf50 - b50,
        wf99 - b99,
        peak_rss / 1024
    );
    fleet.shutdown.cancel();
    fleet.tracker.close();
    fleet.tracker.wait().await;
    drop(ctl);
    let result = json!({
        "bench": "workflows",
        "command": format!(
            "cargo run --release -p nebula-bench -- workflows --agents {} --runs {} --steps {}",
            a.agents, a.runs, a.steps
        ),
        "machine": {"cpus": std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1), "note": "clients, simulated agents and controller share this machine"},
        "path": "one run: the driver stores each pass (SQLite), then makes the step's job (keyed), which goes over QUIC to the agent's job runner; the job's end event advances the run",
        "runs": a.runs,
        "steps": a.steps,
        "agents": a.agents,
        "bare_job_ms": stats(bare),
        "bare_chains_secs": bare_secs,
        "workflow_step_ms": stats(per_step),
        "first_step_dispatch_ms": stats(first_dispatch),
        "overhead_per_step_ms": {"median": wf50 - b50, "p99": wf99 - b99},
        "workflow_total_secs": total_secs,
        "runs_started_secs": started_secs,
        "controller_cpu_cores": cpu,
        "controller_peak_rss_mib": peak_rss / 1024,
    });
    if let Some(parent) = a.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("wrote {}", a.out.display());
    Ok(())
}
