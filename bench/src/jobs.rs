//! `nebula-bench jobs`: no-op jobs through the real API, controller and QUIC streams, served by
//! the agent's real job runner (journal included) in 100 simulated agents.
//!
//! Figures: the round trip of one job at a time (create -> result, `POST /api/v1/jobs` with
//! `wait`), p50/p99, with the fleet otherwise idle and again while 10,000 more simulated agents
//! keep their telemetry flowing; and throughput with many jobs in flight across the 100 agents.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::fleet::SimFleet;
use crate::{cpu_ns, join_token, percentile, rss_kib, start_controller, stats};

pub struct JobsArgs {
    pub agents: usize,
    pub background: usize,
    pub round_trips: usize,
    pub concurrency: usize,
    pub throughput_for: Duration,
    pub runs: usize,
    pub out: std::path::PathBuf,
}

/// POST a body and require the job(s) it answers with to have succeeded.
async fn post_ok(
    client: &reqwest::Client,
    url: &str,
    admin: &str,
    body: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let resp: serde_json::Value = client
        .post(url)
        .bearer_auth(admin)
        .json(body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let ok = resp["state"] == "succeeded" || (resp["failed"] == 0 && resp["succeeded"].is_number());
    anyhow::ensure!(ok, "not every job succeeded: {resp}");
    Ok(resp)
}

/// Sequential no-op jobs, round-robin over the agents; milliseconds each.
async fn round_trips(
    client: &reqwest::Client,
    url: &str,
    admin: &str,
    names: &[String],
    n: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let body = json!({"node": names[i % names.len()], "work": {"kind": "noop"}, "wait": "10s"});
        let t = Instant::now();
        post_ok(client, url, admin, &body).await?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        // The first 50 warm connections and caches up.
        if i >= 50 {
            out.push(ms);
        }
    }
    Ok(out)
}

/// `concurrency` clients, each creating no-op jobs back to back for `dur`; jobs per second.
async fn throughput(
    url: &str,
    admin: &str,
    names: &[String],
    concurrency: usize,
    dur: Duration,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let done = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + dur;
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (url, admin, names, done) = (
            url.to_owned(),
            admin.to_owned(),
            names.to_vec(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut lat = Vec::new();
            let mut i = w;
            while Instant::now() < stop_at {
                let body = json!({"node": names[i % names.len()], "work": {"kind": "noop"}, "wait": "10s"});
                i += concurrency;
                let t = Instant::now();
                post_ok(&client, &url, &admin, &body).await?;
                        lat.push(t.elapsed().as_secs_f64() * 1e3);
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(lat)
        }));
    }
    let t0 = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok((done.load(Ordering::Relaxed) as f64 / secs, all))
}

/// `clients` fan-out requests at a time, each a no-op job on every agent; jobs per second.
async fn fan_out(
    url: &str,
    admin: &str,
    names: &[String],
    clients: usize,
    dur: Duration,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let done = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + dur;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (url, admin, names, done) = (
            url.to_owned(),
            admin.to_owned(),
            names.to_vec(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let body = json!({"nodes": names, "work": {"kind": "noop"}, "timeout": "30s"});
            let mut lat = Vec::new();
            while Instant::now() < stop_at {
                let t = Instant::now();
                let resp = post_ok(&client, &url, &admin, &body).await?;
                let ok = resp["succeeded"].as_u64().unwrap_or(0);
                anyhow::ensure!(
                    ok as usize == names.len(),
                    "not every job succeeded: {}",
                    resp["failed"]
                );
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                done.fetch_add(ok, Ordering::Relaxed);
            }
            anyhow::Ok(lat)
        }));
    }
    let t0 = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((
        done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64(),
        all,
    ))
}

/// Longer than the usual limit for a reason: one benchmark scenario read top to bottom (start
/// the processes, load, measure, write the figures); split up, one measurement would be
/// scattered over helpers that each hold part of its state.
pub async fn jobs_bench(a: JobsArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = start_controller(
        dir.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--max-jobs-per-node", "256"],
    )?;
    let (http, quic, admin, pid) = (ctl.http, ctl.quic, ctl.admin.clone(), ctl.child.id());
    let client = reqwest::Client::new();
    let url = format!("http://{http}/api/v1/jobs");
    let token = join_token(&client, http, &admin, a.agents + a.background).await?;
    let jobs_dir = dir.path().join("agents");
    let fleet = SimFleet::start(
        quic,
        &token,
        a.agents,
        "job",
        Duration::from_secs(5),
        0,
        Some(&jobs_dir),
    )
    .await?;
    anyhow::ensure!(
        fleet.failed == 0,
        "{} job agents failed to connect",
        fleet.failed
    );
    println!(
        "controller pid {pid}; {} agents serving jobs (the agent's job runner and journal)",
        a.agents
    );

    let fan_url = format!("http://{http}/api/v1/inventory/execute");
    let mut runs = Vec::new();
    for run in 1..=a.runs {
        println!("-- run {run} of {}", a.runs);
        let idle = round_trips(&client, &url, &admin, &fleet.names, a.round_trips).await?;
        let mut sorted = idle.clone();
        sorted.sort_by(|x, y| x.total_cmp(y));
        println!(
            "round trip, {} agents idle: p50 {:.2} ms, p99 {:.2} ms ({} jobs)",
            a.agents,
            percentile(&sorted, 0.5),
            percentile(&sorted, 0.99),
            sorted.len()
        );

        let commits0 = commits(&client, http, &admin).await?;
        let cpu0 = cpu_ns(pid);
        let (rate, lat) =
            throughput(&url, &admin, &fleet.names, a.concurrency, a.throughput_for).await?;
        let tp_cpu = (cpu_ns(pid) - cpu0) as f64 / 1e9 / a.throughput_for.as_secs_f64();
        let commit_rate =
            (commits(&client, http, &admin).await? - commits0) / a.throughput_for.as_secs_f64();
        println!(
            "store commits {commit_rate:.0}/s ({:.1} jobs per commit)",
            rate / commit_rate.max(1.0)
        );
        let mut tl = lat.clone();
        tl.sort_by(|x, y| x.total_cmp(y));
        println!(
            "throughput, {} clients over {} agents: {rate:.0} jobs/s (latency p50 {:.1} ms, p99 {:.1} ms; controller {tp_cpu:.2} cores, RSS {} MiB)",
            a.concurrency,
            a.agents,
            percentile(&tl, 0.5),
            percentile(&tl, 0.99),
            rss_kib(pid) / 1024
        );

        // The same no-op jobs created in bulk: one fan-out request (`POST /api/v1/inventory/execute`)
        // creates a job on each of the agents and answers with every result.
        let cpu0 = cpu_ns(pid);
        let (fan_rate, fan_lat) =
            fan_out(&fan_url, &admin, &fleet.names, 4, a.throughput_for).await?;
        let fan_cpu = (cpu_ns(pid) - cpu0) as f64 / 1e9 / a.throughput_for.as_secs_f64();
        println!(
            "throughput by fan-out (4 clients, {} jobs per request): {fan_rate:.0} jobs/s (controller {fan_cpu:.2} cores)",
            fleet.names.len()
        );
        runs.push(json!({
            "round_trip_idle_ms": stats(idle),
            "throughput": {
                "clients": a.concurrency,
                "jobs_per_s": rate,
                "latency_ms": stats(lat),
                "controller_cpu_cores": tp_cpu,
                "controller_cpu_us_per_job": tp_cpu * 1e6 / rate.max(1.0),
                "store_commits_per_s": commit_rate,
            },
            "throughput_fan_out": {
                "clients": 4,
                "jobs_per_request": a.agents,
                "jobs_per_s": fan_rate,
                "request_ms": stats(fan_lat),
                "controller_cpu_cores": fan_cpu,
                "controller_cpu_us_per_job": fan_cpu * 1e6 / fan_rate.max(1.0),
            },
        }));
    }

    let mut busy = None;
    if a.background > 0 {
        let bg = SimFleet::start(
            quic,
            &token,
            a.background,
            "bg",
            Duration::from_secs(5),
            20,
            None,
        )
        .await?;
        println!(
            "{} background agents sending telemetry every 5 s ({} failed); waiting one interval",
            a.background - bg.failed,
            bg.failed
        );
        tokio::time::sleep(Duration::from_secs(6)).await;
        let mut under_runs = Vec::new();
        for run in 1..=a.runs {
            let sent0 = bg.counters.sent.load(Ordering::Relaxed);
            let t0 = Instant::now();
            let under = round_trips(&client, &url, &admin, &fleet.names, a.round_trips).await?;
            let sent_rate = (bg.counters.sent.load(Ordering::Relaxed) - sent0) as f64
                / t0.elapsed().as_secs_f64();
            let mut s2 = under.clone();
            s2.sort_by(|x, y| x.total_cmp(y));
            println!(
                "run {run}: round trip with {} agents' telemetry ({sent_rate:.0} samples/s): p50 {:.2} ms, p99 {:.2} ms",
                a.background,
                percentile(&s2, 0.5),
                percentile(&s2, 0.99)
            );
            under_runs.push(json!({"round_trip_ms": stats(under), "samples_per_s": sent_rate}));
        }
        busy = Some((under_runs, bg.failed));
        bg.shutdown.cancel();
        bg.tracker.close();
        bg.tracker.wait().await;
    }
    fleet.shutdown.cancel();
    fleet.tracker.close();
    fleet.tracker.wait().await;
    drop(ctl);

    let mut result = json!({
        "bench": "jobs",
        "command": format!(
            "cargo run --release -p nebula-bench -- jobs --agents {} --background {} --round-trips {} --concurrency {} --throughput-for {} --runs {}",
            a.agents, a.background, a.round_trips, a.concurrency,
            humantime::format_duration(a.throughput_for), a.runs
        ),
        "machine": {"cpus": std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1), "note": "clients, simulated agents and controller share this machine"},
        "path": "POST /api/v1/jobs {node, work: noop, wait} -> SQLite group commit -> QUIC stream -> agent job runner (journal) -> result stored -> HTTP answer",
        "agents": a.agents,
        "runs": runs,
    });
    let median_of = |runs: &[serde_json::Value], path: &[&str]| -> f64 {
        let mut v: Vec<f64> = runs
            .iter()
            .filter_map(|r| path.iter().try_fold(r, |r, k| r.get(k))?.as_f64())
            .collect();
        v.sort_by(|x, y| x.total_cmp(y));
        percentile(&v, 0.5)
    };
    let mut median = json!({
        "round_trip_idle_p50_ms": median_of(&runs, &["round_trip_idle_ms", "median"]),
        "round_trip_idle_p99_ms": median_of(&runs, &["round_trip_idle_ms", "p99"]),
        "throughput_jobs_per_s": median_of(&runs, &["throughput", "jobs_per_s"]),
        "throughput_fan_out_jobs_per_s": median_of(&runs, &["throughput_fan_out", "jobs_per_s"]),
        "controller_cpu_us_per_job": median_of(&runs, &["throughput", "controller_cpu_us_per_job"]),
    });
    if let Some((under_runs, failed)) = busy {
        median["round_trip_with_telemetry_p50_ms"] =
            json!(median_of(&under_runs, &["round_trip_ms", "median"]));
        median["round_trip_with_telemetry_p99_ms"] =
            json!(median_of(&under_runs, &["round_trip_ms", "p99"]));
        result["with_telemetry"] = json!({
            "background_agents": a.background,
            "connect_failures": failed,
            "runs": under_runs,
        });
    }
    println!("medians of {} runs: {median}", a.runs);
    result["median"] = median;
    if let Some(parent) = a.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("wrote {}", a.out.display());
    Ok(())
}

/// Store write transactions so far (the count of the store write latency histogram).
async fn commits(
    client: &reqwest::Client,
    http: std::net::SocketAddr,
    admin: &str,
) -> anyhow::Result<f64> {
    let body = crate::fleet::metrics_text(client, http, admin).await?;
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix("nebula_store_write_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}
