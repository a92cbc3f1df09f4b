//! Agent footprint: a real `nebula-agent` (release build) and Debian's
//! `prometheus-node-exporter`, side by side, with N containers running, for a fixed time. Each
//! one's RSS and CPU are read from /proc. The node exporter only works when scraped, so it is
//! scraped at the agent's interval (the fair comparison).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use crate::{cpu_ns, docker, join_token, percentile, rss_kib, start_controller, KillOnDrop};

pub struct FootprintArgs {
    pub containers: usize,
    pub duration: Duration,
    pub interval: Duration,
    pub out: std::path::PathBuf,
}

pub async fn footprint_bench(a: FootprintArgs) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(root.join("scripts/build-test-image")).status()?;
    if !status.success() {
        bail!("building the test image failed");
    }
    let label = format!("nebula.bench={}", std::process::id());
    let cleanup = || {
        if let Ok(ids) = docker(&["ps", "-aq", "--filter", &format!("label={label}")]) {
            for id in ids.lines() {
                let _ = docker(&["rm", "-f", id]);
            }
        }
    };
    cleanup();
    for i in 0..a.containers {
        docker(&[
            "run",
            "-d",
            "--label",
            &label,
            "--name",
            &format!("fp-{}-{i}", std::process::id()),
            "nebula-test/busybox:1",
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/www",
        ])?;
    }
    let result = run(&a).await;
    cleanup();
    result
}

/// Longer than the usual limit for a reason: one benchmark scenario read top to bottom (start
/// the processes, load, measure, write the figures); split up, one measurement would be
/// scattered over helpers that each hold part of its state.
async fn run(a: &FootprintArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let interval_s = humantime::format_duration(a.interval).to_string();
    let ctl = start_controller(
        dir.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--telemetry-interval", &interval_s],
    )?;
    let admin = ctl.admin.clone();
    let client = reqwest::Client::new();
    let token = join_token(&client, ctl.http, &admin, 1).await?;
    // Measure the agent as it ships: stripped of debug info, and without RUST_BACKTRACE (which
    // makes every error capture and symbolise a backtrace).
    let agent_bin = dir.path().join("nebula-agent");
    std::fs::copy(
        std::env::current_exe()?.with_file_name("nebula-agent"),
        &agent_bin,
    )?;
    let stripped = Command::new("strip")
        .arg(&agent_bin)
        .status()
        .is_ok_and(|s| s.success());
    let agent = KillOnDrop(
        Command::new(&agent_bin)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .args([
                "join",
                "--controller",
                &ctl.quic.to_string(),
                "--name",
                "footprint",
            ])
            .arg("--token")
            .arg(token.to_string())
            .arg("--state-dir")
            .arg(dir.path().join("agent"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", agent_bin.display()))?,
    );
    let exporter_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let exporter = KillOnDrop(
        Command::new("prometheus-node-exporter")
            .arg(format!("--web.listen-address=127.0.0.1:{exporter_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "starting prometheus-node-exporter (apt-get install prometheus-node-exporter)",
            )?,
    );
    // Wait for the agent to report all containers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: serde_json::Value = client
            .get(format!(
                "http://{}/api/v1/containers?node=footprint&state=running",
                ctl.http
            ))
            .bearer_auth(&admin)
            .send()
            .await?
            .json()
            .await
            .unwrap_or_default();
        if v["items"]
            .as_array()
            .is_some_and(|i| i.len() >= a.containers)
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the agent did not report {} containers: {v}", a.containers);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("agent reports {} containers; warming up", a.containers);
    tokio::time::sleep(a.interval * 2).await;

    let (apid, epid) = (agent.0.id(), exporter.0.id());
    let seq0 = latest_seq(&client, ctl.http, &admin).await?;
    let (a0, e0) = (cpu_ns(apid), cpu_ns(epid));
    let t0 = Instant::now();
    let mut arss = Vec::new();
    let mut erss = Vec::new();
    let mut next_scrape = Instant::now();
    let mut scrapes = 0u64;
    while t0.elapsed() < a.duration {
        if Instant::now() >= next_scrape {
            let body = client
                .get(format!("http://127.0.0.1:{exporter_port}/metrics"))
                .send()
                .await?
                .text()
                .await?;
            if body.contains("node_cpu_seconds_total") {
                scrapes += 1;
            }
            next_scrape += a.interval;
        }
        arss.push(rss_kib(apid) as f64 / 1024.0);
        erss.push(rss_kib(epid) as f64 / 1024.0);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let (a1, e1) = (cpu_ns(apid), cpu_ns(epid));
    let seq1 = latest_seq(&client, ctl.http, &admin).await?;
    let samples = seq1.saturating_sub(seq0).max(1);
    drop(agent);
    drop(exporter);
    drop(ctl);
    let pct = |ns: u64| ns as f64 / 1e9 / secs * 100.0;
    arss.sort_by(|x, y| x.total_cmp(y));
    erss.sort_by(|x, y| x.total_cmp(y));
    let agent_cpu_ms_per_sample = (a1 - a0) as f64 / 1e6 / samples as f64;
    println!(
        "over {secs:.0} s with {} containers: nebula-agent RSS median {:.1} MiB (max {:.1}), CPU {:.3}% of a core, \
         {:.2} ms CPU per sample ({samples} samples); node-exporter RSS median {:.1} MiB (max {:.1}), CPU {:.3}% ({scrapes} scrapes)",
        a.containers,
        percentile(&arss, 0.5),
        arss.last().copied().unwrap_or(0.0),
        pct(a1 - a0),
        agent_cpu_ms_per_sample,
        percentile(&erss, 0.5),
        erss.last().copied().unwrap_or(0.0),
        pct(e1 - e0),
    );
    let result = json!({
        "bench": "footprint",
        "command": format!(
            "cargo run --release -p nebula-bench -- footprint --containers {} --duration {} --interval {interval_s}",
            a.containers,
            humantime::format_duration(a.duration)
        ),
        "containers": a.containers,
        "agent_binary": if stripped { "release build, stripped" } else { "release build (strip not found)" },
        "interval_s": a.interval.as_secs_f64(),
        "window_s": secs,
        "cpu_time_source": "/proc/<pid>/task/*/schedstat (ns)",
        "nebula_agent": {
            "rss_mib": {"median": percentile(&arss, 0.5), "max": arss.last()},
            "cpu_percent_of_one_core": pct(a1 - a0),
            "samples": samples,
            "cpu_ms_per_sample": agent_cpu_ms_per_sample,
        },
        "prometheus_node_exporter": {
            "rss_mib": {"median": percentile(&erss, 0.5), "max": erss.last()},
            "cpu_percent_of_one_core": pct(e1 - e0),
            "scrapes": scrapes,
        },
    });
    if let Some(parent) = a.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("wrote {}", a.out.display());
    Ok(())
}

async fn latest_seq(
    client: &reqwest::Client,
    http: std::net::SocketAddr,
    admin: &str,
) -> anyhow::Result<u64> {
    let v: serde_json::Value = client
        .get(format!(
            "http://{http}/api/v1/nodes/footprint/telemetry?since=1s"
        ))
        .bearer_auth(admin)
        .send()
        .await?
        .json()
        .await?;
    Ok(v["latest"]["seq"].as_u64().unwrap_or(0))
}
