//! Monitors and alert rules at fleet scale: N simulated agents (each its own enrolled identity
//! and QUIC connection) take the monitors the controller assigns them from a service map with
//! M monitors and report a result for each at its interval, as real agents do; the controller
//! also evaluates every alert rule (built-in and the map's own) over all nodes and monitors.
//! Figures: the controller's CPU and memory, results ingested, rule evaluations per minute
//! and the evaluator's time per pass.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use nebula_agent::identity::Identity;
use nebula_agent::tls;
use nebula_protocol::monitors::{MonitorResult, MonitorSpec};
use nebula_protocol::{
    self as proto, AgentMessage, ControllerMessage, Hello, NodeFacts, ServerHello,
    CONTROLLER_SERVER_NAME,
};
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{cpu_ns, join_token, percentile, rss_kib, start_controller, stats};

pub struct MonitorsArgs {
    pub agents: usize,
    pub monitors: usize,
    pub interval: Duration,
    pub rules: usize,
    pub evaluate_every: Duration,
    pub duration: Duration,
    pub out: std::path::PathBuf,
}

#[derive(Default)]
struct Counters {
    assigned: AtomicU64,
    results: AtomicU64,
    connected: AtomicU64,
}

/// The map: `monitors` HTTP checks spread over the agents, and `rules` threshold rules.
fn map(agents: usize, monitors: usize, interval: Duration, rules: usize) -> String {
    let mut m = String::from("monitors:\n");
    let every = humantime::format_duration(interval);
    for i in 0..monitors {
        // Flow style: 10,000 of them fit well under the map's 1 MiB limit.
        m.push_str(&format!(
            "  m-{i:05}: {{http: \"http://10.{}.{}.{}:8080/\", interval: {every}, timeout: 5s, nodes: [mon-{:05}]}}\n",
            i / 65_536 % 256,
            i / 256 % 256,
            i % 256,
            i % agents
        ));
    }
    m.push_str("alert_rules:\n");
    let metrics = [
        "cpu",
        "memory",
        "load",
        "gpu_temperature",
        "vram",
        "disk",
        "gpu_utilization",
    ];
    for r in 0..rules {
        m.push_str(&format!(
            "  own-{r:02}:\n    metric: {}\n    above: {}\n    window: 2m\n    for: 1m\n",
            metrics[r % metrics.len()],
            50 + r
        ));
    }
    m
}

/// A session: handshake done, `Welcome` read.
async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    identity: &Identity,
) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let cfg = tls::session_config(identity, Duration::from_secs(5), Duration::from_secs(30))?;
    let conn = endpoint
        .connect_with(cfg, addr, CONTROLLER_SERVER_NAME)?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = Hello {
        version: proto::PROTOCOL_VERSION,
        agent_version: "sim".into(),
        facts: NodeFacts {
            hostname: identity.state.name.clone(),
            os: "Ubuntu".into(),
            cpu_count: 8,
            memory_bytes: 32 << 30,
            ..Default::default()
        },
    };
    proto::write_message(&mut send, &hello).await?;
    match proto::read_message::<ServerHello, _>(&mut recv, 1 << 20).await? {
        ServerHello::Welcome(_) => Ok((conn, send, recv)),
        ServerHello::Refused(r) => bail!("refused: {r}"),
    }
}

async fn run_agent(
    gate: Arc<Semaphore>,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    identity: Identity,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Handshakes bounded and retried, as real agents starting together would be.
    let permit = gate.acquire_owned().await?;
    let mut attempt = 0;
    let (conn, mut send, mut recv) = loop {
        match connect(&endpoint, addr, &identity).await {
            Ok(c) => break c,
            Err(e) if attempt >= 5 => return Err(e),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
        }
    };
    drop(permit);
    // Telemetry as the fleet bench sends it (two containers; a GPU on every fourth node), so
    // the threshold and container rules have figures to judge.
    let idx: usize = identity
        .state
        .name
        .trim_start_matches("mon-")
        .parse()
        .unwrap_or(0);
    let inv = crate::fleet::inventory(idx, 2, idx.is_multiple_of(4));
    proto::write_message(&mut send, &AgentMessage::TelemetryInventory(inv.clone())).await?;
    counters.connected.fetch_add(1, Ordering::Relaxed);
    let mut frames = proto::FrameReader::new(1 << 24);
    let mut specs: Vec<(MonitorSpec, tokio::time::Instant)> = Vec::new();
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    let mut telemetry = tokio::time::interval(Duration::from_secs(10));
    let mut seq = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = frames.read_message::<ControllerMessage, _>(&mut recv) => match msg {
                Ok(ControllerMessage::Monitors(list)) => {
                    counters.assigned.fetch_add(list.len() as u64, Ordering::Relaxed);
                    let now = tokio::time::Instant::now();
                    // Each starts at its own offset in its interval, as the agent spreads them.
                    specs = list
                        .into_iter()
                        .map(|s| {
                            let off = rng.gen_range(0..u64::from(s.interval_ms).max(1));
                            (s, now + Duration::from_millis(off))
                        })
                        .collect();
                }
                Ok(_) => {}
                Err(_) => break,
            },
            _ = telemetry.tick() => {
                seq += 1;
                let sample = crate::fleet::sample(&mut rng, seq, &inv);
                if let Ok(bytes) = proto::encode(&nebula_protocol::telemetry::Datagram::Sample(sample)) {
                    let _ = conn.send_datagram(bytes.into());
                }
            }
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                let at_ms = nebula_protocol::time::UnixMillis::now().as_i64();
                let mut batch = Vec::new();
                for (s, due) in specs.iter_mut() {
                    if *due <= now {
                        *due += Duration::from_millis(s.interval_ms.into());
                        let up = rng.gen_bool(0.99);
                        batch.push(MonitorResult {
                            name: s.name.clone(),
                            at_ms,
                            up,
                            latency_us: rng.gen_range(300..40_000),
                            status: Some(if up { 200 } else { 503 }),
                            cert_expires_ms: None,
                            method: None,
                            error: (!up).then(|| "HTTP 503".to_owned()),
                        });
                    }
                }
                if !batch.is_empty() {
                    let n = batch.len() as u64;
                    if proto::write_message(&mut send, &AgentMessage::MonitorResults(batch)).await.is_err() {
                        break;
                    }
                    counters.results.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }
    conn.close(0u32.into(), b"simulation over");
    Ok(())
}

/// `GET /api/v1/monitors`, as the dashboard and CLI read it.
async fn monitors_list(
    client: &reqwest::Client,
    http: SocketAddr,
    admin: &str,
) -> anyhow::Result<Vec<serde_json::Value>> {
    Ok(client
        .get(format!("http://{http}/api/v1/monitors"))
        .bearer_auth(admin)
        .send()
        .await?
        .json()
        .await?)
}

/// The alert evaluator's passes so far: (started_at, took_ms, observations).
async fn evaluator_runs(
    client: &reqwest::Client,
    http: SocketAddr,
    admin: &str,
) -> anyhow::Result<Option<(i64, u64, u64)>> {
    let tasks: Vec<serde_json::Value> = client
        .get(format!("http://{http}/api/v1/tasks"))
        .bearer_auth(admin)
        .send()
        .await?
        .json()
        .await?;
    Ok(tasks
        .iter()
        .find(|t| t["name"] == "alert-evaluator")
        .and_then(|t| {
            let last = &t["last"];
            Some((
                last["started_at"].as_i64()?,
                last["took_ms"].as_u64()?,
                last["result"]["observations"].as_u64()?,
            ))
        }))
}

// Longer than the usual limit: one scenario, read top to bottom (start, enroll and connect,
// apply, warm up, measure, report), as the other benches are.
pub async fn monitors_bench(a: MonitorsArgs) -> anyhow::Result<()> {
    let n = a.agents;
    let dir = tempfile::tempdir()?;
    let every = humantime::format_duration(a.evaluate_every).to_string();
    let ctl = start_controller(
        dir.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[
            "--telemetry-interval",
            "10s",
            "--alert-interval",
            &every,
            "--monitor-assign-interval",
            "10s",
            crate::ONE_ADDRESS[0],
            crate::ONE_ADDRESS[1],
        ],
    )?;
    let (http, quic, admin, pid) = (ctl.http, ctl.quic, ctl.admin.clone(), ctl.child.id());
    let client = reqwest::Client::new();
    let token = join_token(&client, http, &admin, n).await?;
    println!(
        "controller pid {pid}; {n} agents, {} monitors every {}, {} rules of the map's own, evaluated every {every}",
        a.monitors,
        humantime::format_duration(a.interval),
        a.rules
    );

    // Enroll, then connect every agent.
    let endpoints: Vec<quinn::Endpoint> = (0..n.div_ceil(500))
        .map(|_| tls::client_endpoint(quic))
        .collect::<Result<_, _>>()?;
    let gate = Arc::new(Semaphore::new(256));
    let mut identities = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(256) {
        let mut hs = Vec::new();
        for &i in chunk {
            let ep = endpoints[i / 500].clone();
            let token = token.clone();
            hs.push(tokio::spawn(async move {
                crate::fleet::enroll_one(&ep, quic, &token, &format!("mon-{i:05}")).await
            }));
        }
        for h in hs {
            identities.push(h.await??);
        }
    }
    let counters = Arc::new(Counters::default());
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    for (i, id) in identities.into_iter().enumerate() {
        tracker.spawn(run_agent(
            gate.clone(),
            endpoints[i / 500].clone(),
            quic,
            id,
            counters.clone(),
            shutdown.clone(),
        ));
    }
    let t = Instant::now();
    while counters.connected.load(Ordering::Relaxed) < n as u64 {
        if t.elapsed() > Duration::from_secs(120) {
            bail!(
                "only {} of {n} agents connected",
                counters.connected.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("{n} agents connected in {:.1} s", t.elapsed().as_secs_f64());

    // The map: every monitor assigned within the assign interval.
    let text = map(n, a.monitors, a.interval, a.rules);
    let applied = Instant::now();
    let resp = client
        .put(format!("http://{http}/api/v1/desired"))
        .bearer_auth(&admin)
        .header("content-type", "application/yaml")
        .body(text.clone())
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("the map was refused: {}", resp.text().await?);
    }
    while counters.assigned.load(Ordering::Relaxed) < a.monitors as u64 {
        if applied.elapsed() > Duration::from_secs(60) {
            bail!(
                "only {} monitors assigned",
                counters.assigned.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let assign_s = applied.elapsed().as_secs_f64();
    println!(
        "{} monitors ({} KiB of map) at their nodes {assign_s:.1} s after the apply",
        a.monitors,
        text.len() / 1024
    );

    // Warm up one interval (every monitor reports once), then measure.
    tokio::time::sleep(a.interval + Duration::from_secs(2)).await;
    let cpu0 = cpu_ns(pid);
    let res0 = counters.results.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut rss = Vec::new();
    let mut passes = std::collections::BTreeMap::new();
    let mut list_ms = Vec::new();
    while t0.elapsed() < a.duration {
        if let Some((at, took, obs)) = evaluator_runs(&client, http, &admin).await? {
            passes.insert(at, (took, obs));
        }
        // The status board's list, as the dashboard and CLI read it.
        let s = Instant::now();
        let list = monitors_list(&client, http, &admin).await?;
        list_ms.push(s.elapsed().as_secs_f64() * 1e3);
        if list.len() < a.monitors {
            bail!("the list has {} monitors", list.len());
        }
        rss.push(rss_kib(pid) as f64 / 1024.0);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_ns(pid) - cpu0) as f64 / 1e9;
    let results = counters.results.load(Ordering::Relaxed) - res0;
    // Every monitor has a result from its node.
    let list = monitors_list(&client, http, &admin).await?;
    let reporting = list
        .iter()
        .filter(|m| m["nodes"][0]["status"] != "pending" && m["nodes"][0]["uptime_24h"].is_number())
        .count();
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    drop(ctl);

    let evaluations: u64 = passes.values().map(|(_, o)| o).sum();
    let per_min = evaluations as f64 / secs * 60.0;
    let mut took: Vec<f64> = passes.values().map(|(t, _)| *t as f64).collect();
    took.sort_by(|x, y| x.total_cmp(y));
    let obs_per_pass = passes.values().map(|(_, o)| *o).max().unwrap_or(0);
    rss.sort_by(|x, y| x.total_cmp(y));
    let rss_max = rss.last().copied().unwrap_or(0.0);
    println!(
        "steady {secs:.0} s: {:.0} results/s ingested (expected {:.0}/s), {reporting} of {} monitors reporting ({} of the map, the rest built in); \
         {} evaluator passes, {obs_per_pass} rule evaluations each, {per_min:.0} per minute, pass p50 {:.0} ms max {:.0} ms; \
         controller CPU {:.2} cores, RSS max {rss_max:.0} MiB; GET /api/v1/monitors p50 {:.0} ms",
        results as f64 / secs,
        list.len() as f64 / a.interval.as_secs_f64(),
        list.len(),
        a.monitors,
        passes.len(),
        percentile(&took, 0.5),
        took.last().copied().unwrap_or(0.0),
        cpu / secs,
        percentile(&{ let mut l = list_ms.clone(); l.sort_by(|x, y| x.total_cmp(y)); l }, 0.5),
    );
    let result = json!({
        "bench": "monitors",
        "command": format!(
            "cargo run --release -p nebula-bench -- monitors --agents {n} --monitors {} --interval {} --rules {} --evaluate-every {every} --duration {}",
            a.monitors,
            humantime::format_duration(a.interval),
            a.rules,
            humantime::format_duration(a.duration)
        ),
        "machine": {"cpus": std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1), "note": "simulator and controller share this machine"},
        "agents": n,
        "monitors": a.monitors,
        "monitor_interval_s": a.interval.as_secs_f64(),
        "map_bytes": text.len(),
        "assigned_after_apply_s": assign_s,
        "steady_window_s": secs,
        "results_per_s": results as f64 / secs,
        "results_expected_per_s": list.len() as f64 / a.interval.as_secs_f64(),
        "monitors_total": list.len(),
        "monitors_reporting": reporting,
        "notes": "every simulated node also reports telemetry every 10 s (two containers, a GPU on every fourth), so the threshold and container rules judge real figures; the simulated nodes name a container runtime, so each also gets the built-in runtime monitor",
        "evaluator": {
            "every_s": a.evaluate_every.as_secs_f64(),
            "passes": passes.len(),
            "rule_evaluations_per_pass": obs_per_pass,
            "rule_evaluations_per_min": per_min,
            "pass_ms": stats(took),
        },
        "controller_cpu_cores": cpu / secs,
        "controller_rss_mib": {"max": rss_max, "median": percentile(&rss, 0.5)},
        "list_monitors_ms": stats(list_ms),
    });
    if let Some(parent) = a.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("wrote {}", a.out.display());
    Ok(())
}
