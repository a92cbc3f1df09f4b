//! The fleet simulator: N simulated agents, each with its own enrolled identity (key generated
//! here, certificate from the controller) and its own QUIC connection (several share one UDP
//! socket), sending realistic telemetry samples to a real controller process.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use nebula_agent::identity::{new_key_and_csr, AgentState, Identity};
use nebula_agent::jobs::{JobRunner, RunnerConfig};
use nebula_agent::tls;
use nebula_protocol::telemetry::{
    ContainerHealth, ContainerInfo, ContainerSample, ContainerState, Datagram, DiskInfo, GpuInfo,
    GpuSample, HostSample, NetRate, TelemetryInventory, TelemetrySample,
};
use nebula_protocol::{
    self as proto, AgentMessage, EnrollRequest, EnrollResponse, Hello, JoinToken, NodeFacts,
    ServerHello, CONTROLLER_SERVER_NAME,
};
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{cpu_ns, join_token, percentile, rss_kib, start_controller, stats};

/// Agents per shared UDP socket (one quinn endpoint each).
const AGENTS_PER_ENDPOINT: usize = 500;

pub struct FleetArgs {
    pub agents: usize,
    pub interval: Duration,
    pub containers: usize,
    pub duration: Duration,
    pub out: std::path::PathBuf,
}

pub(crate) fn inventory(i: usize, containers: usize, gpu: bool) -> TelemetryInventory {
    TelemetryInventory {
        epoch: 1,
        disks: vec![
            DiskInfo {
                mount: "/".into(),
                filesystem: "ext4".into(),
                total_bytes: 512 << 30,
            },
            DiskInfo {
                mount: "/data".into(),
                filesystem: "xfs".into(),
                total_bytes: 4 << 40,
            },
        ],
        interfaces: vec!["eth0".into(), "tailscale0".into()],
        gpus: if gpu {
            vec![GpuInfo {
                uuid: format!("GPU-sim-{i:05}"),
                name: "NVIDIA GeForce RTX 4090".into(),
                memory_total_bytes: 24 << 30,
                power_limit_mw: Some(450_000),
            }]
        } else {
            Vec::new()
        },
        containers: (0..containers)
            .map(|c| ContainerInfo {
                id: format!("{:064x}", (i as u128) << 32 | c as u128),
                name: format!("svc-{c:02}"),
                image: format!("registry.example/app-{c:02}:1.{c}"),
                labels: [
                    ("nebula.service".to_owned(), format!("svc-{c:02}")),
                    ("nebula.managed".to_owned(), "true".to_owned()),
                ]
                .into(),
                created_unix: 1_764_000_000,
            })
            .collect(),
        container_runtime: Some("docker 27.3.1".into()),
        gpu_driver: gpu.then(|| "560.35.03".into()),
        os: "Ubuntu 24.04".into(),
        kernel: "6.8.0-45-generic".into(),
        models: Vec::new(),
    }
}

pub(crate) fn sample(rng: &mut impl Rng, seq: u64, inv: &TelemetryInventory) -> TelemetrySample {
    let cores = 8;
    TelemetrySample {
        epoch: inv.epoch,
        seq,
        taken_at_ms: nebula_protocol::time::UnixMillis::now().as_u64(),
        host: HostSample {
            cpu_percent: rng.gen_range(2.0..60.0),
            per_core_percent: (0..cores).map(|_| rng.gen_range(0.0..100.0)).collect(),
            load: [rng.gen_range(0.0..4.0), 1.0, 0.8],
            memory_used_bytes: rng.gen_range(4u64 << 30..28u64 << 30),
            memory_total_bytes: 32 << 30,
            swap_used_bytes: 0,
            swap_total_bytes: 2 << 30,
            uptime_secs: 864_000 + seq * 5,
        },
        disks_used_bytes: vec![
            rng.gen_range(50u64 << 30..400u64 << 30),
            rng.gen_range(1u64 << 40..3u64 << 40),
        ],
        interfaces: vec![
            NetRate {
                rx_bytes_per_sec: rng.gen_range(0..50_000_000),
                tx_bytes_per_sec: rng.gen_range(0..5_000_000),
            },
            NetRate {
                rx_bytes_per_sec: rng.gen_range(0..100_000),
                tx_bytes_per_sec: rng.gen_range(0..100_000),
            },
        ],
        gpus: inv
            .gpus
            .iter()
            .map(|_| GpuSample {
                utilization_percent: Some(rng.gen_range(0..100)),
                memory_used_bytes: Some(rng.gen_range(1u64 << 30..22u64 << 30)),
                temperature_c: Some(rng.gen_range(35..80)),
                power_mw: Some(rng.gen_range(30_000..400_000)),
                ..Default::default()
            })
            .collect(),
        containers: inv
            .containers
            .iter()
            .map(|_| ContainerSample {
                state: ContainerState::Running,
                health: ContainerHealth::Healthy,
                restart_count: 0,
                cpu_percent: Some(rng.gen_range(0.0..25.0)),
                memory_used_bytes: Some(rng.gen_range(20u64 << 20..900u64 << 20)),
                memory_limit_bytes: Some(1 << 30),
                net_rx_bytes: Some(rng.gen_range(0..1u64 << 32)),
                net_tx_bytes: Some(rng.gen_range(0..1u64 << 32)),
            })
            .collect(),
    }
}

pub(crate) async fn enroll_one(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    token: &JoinToken,
    name: &str,
) -> anyhow::Result<Identity> {
    let (key, csr_der) = new_key_and_csr()?;
    let conn = endpoint
        .connect_with(
            tls::enroll_config(token.ca_sha256)?,
            addr,
            CONTROLLER_SERVER_NAME,
        )?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let req = EnrollRequest {
        version: proto::PROTOCOL_VERSION,
        token_id: token.id.clone(),
        token_secret: token.secret.clone(),
        csr_der,
        name: name.to_owned(),
        labels: Default::default(),
        facts: NodeFacts {
            hostname: name.to_owned(),
            ..Default::default()
        },
    };
    proto::write_message(&mut send, &req).await?;
    send.finish()?;
    let resp: EnrollResponse = proto::read_message(&mut recv, 1 << 20).await?;
    conn.close(0u32.into(), b"enrolled");
    match resp {
        EnrollResponse::Enrolled(e) => Ok(Identity {
            state: AgentState {
                controller: addr.to_string(),
                node_id: e.node_id,
                name: e.name,
                settings: Some(e.settings),
                replicas: Vec::new(),
                term: 0,
            },
            key_der: key.serialize_der(),
            cert_der: e.cert_der,
            ca_der: e.ca_der,
        }),
        EnrollResponse::Refused(r) => bail!("refused: {r}"),
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub sent: AtomicU64,
    send_errors: AtomicU64,
    too_big: AtomicU64,
}

/// A probe: send a sample now and report its seq.
pub(crate) type Probe = oneshot::Sender<u64>;

#[allow(clippy::too_many_arguments)]
async fn run_agent(
    gate: Arc<Semaphore>,
    idx: usize,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    identity: Identity,
    interval: Duration,
    containers: usize,
    ready: oneshot::Sender<anyhow::Result<Instant>>,
    mut probes: mpsc::Receiver<Probe>,
    counters: Arc<Counters>,
    runner: Option<Arc<JobRunner>>,
    shutdown: CancellationToken,
) {
    let connect = || async {
        let cfg = tls::session_config(&identity, Duration::from_secs(5), Duration::from_secs(15))?;
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
                os_version: "24.04".into(),
                arch: "x86_64".into(),
                cpu_count: 8,
                memory_bytes: 32 << 30,
                ..Default::default()
            },
        };
        proto::write_message(&mut send, &hello).await?;
        match proto::read_message::<ServerHello, _>(&mut recv, 1 << 20).await? {
            ServerHello::Welcome(_) => {}
            ServerHello::Refused(r) => bail!("refused: {r}"),
        }
        anyhow::Ok((conn, send, recv))
    };
    // Handshakes are bounded like enrollments (agents of a real fleet do not all start in the
    // same millisecond), and retried like a real agent would.
    let permit = gate.acquire_owned().await;
    let mut attempt = 0;
    let (conn, mut send, _recv) = loop {
        match connect().await {
            Ok(c) => break c,
            Err(e) if attempt >= 4 => {
                let _ = ready.send(Err(e));
                return;
            }
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
        }
    };
    drop(permit);
    let _ = ready.send(Ok(Instant::now()));
    let inv = inventory(idx, containers, idx.is_multiple_of(4));
    if proto::write_message(&mut send, &AgentMessage::TelemetryInventory(inv.clone()))
        .await
        .is_err()
    {
        return;
    }
    let mut rng = rand::rngs::StdRng::from_entropy();
    // Spread agents over the interval, as real ones started at different times would be.
    let phase = Duration::from_micros(rng.gen_range(0..interval.as_micros().max(1) as u64));
    let mut next = tokio::time::Instant::now() + phase;
    let mut seq = 0u64;
    let send_one = |rng: &mut rand::rngs::StdRng, seq: u64| {
        let bytes = match proto::encode(&Datagram::Sample(sample(rng, seq, &inv))) {
            Ok(b) => b,
            Err(_) => return,
        };
        if conn.max_datagram_size().is_some_and(|m| bytes.len() > m) {
            counters.too_big.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match conn.send_datagram(bytes.into()) {
            Ok(()) => counters.sent.fetch_add(1, Ordering::Relaxed),
            Err(_) => counters.send_errors.fetch_add(1, Ordering::Relaxed),
        };
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next) => {
                seq += 1;
                send_one(&mut rng, seq);
                next += interval;
            }
            p = probes.recv() => {
                let Some(p) = p else { continue };
                seq += 1;
                send_one(&mut rng, seq);
                let _ = p.send(seq);
            }
            // Jobs: the agent's real job runner serves each stream the controller opens.
            bi = conn.accept_bi(), if runner.is_some() => {
                let Ok((s, r)) = bi else { break };
                if let Some(runner) = &runner {
                    runner.spawn_stream(s, r);
                }
            }
        }
    }
    if let Some(runner) = &runner {
        runner.shutdown().await;
    }
    conn.close(0u32.into(), b"simulation over");
}

pub async fn fleet_bench(a: FleetArgs) -> anyhow::Result<()> {
    let n = a.agents;
    let dir = tempfile::tempdir()?;
    let interval_s = humantime::format_duration(a.interval).to_string();
    let ctl = start_controller(
        dir.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[
            "--telemetry-interval",
            &interval_s,
            crate::ONE_ADDRESS[0],
            crate::ONE_ADDRESS[1],
        ],
    )?;
    let admin = ctl.admin.clone();
    let pid = ctl.child.id();
    let (http, quic) = (ctl.http, ctl.quic);
    println!(
        "controller pid {pid}; {n} agents, {} containers each, a sample every {interval_s}",
        a.containers
    );
    let client = reqwest::Client::new();
    let token = join_token(&client, http, &admin, n).await?;

    let fleet = SimFleet::start(quic, &token, n, "sim", a.interval, a.containers, None).await?;
    let SimFleet {
        probe_tx,
        counters,
        shutdown,
        tracker,
        enrolled_at,
        all_connected,
        failed,
        ..
    } = fleet;

    // Warm up one interval, then measure a steady window.
    tokio::time::sleep(a.interval + Duration::from_secs(1)).await;
    let m0 = scrape(&client, http, &admin).await?;
    let cpu0 = cpu_ns(pid);
    let sent0 = counters.sent.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut rss_samples = Vec::new();
    let mut latencies = Vec::new();
    let mut rng = rand::rngs::StdRng::from_entropy();
    while t0.elapsed() < a.duration {
        // One probe: a sample sent now, then polled until the API shows it.
        let (name, tx) = &probe_tx[rng.gen_range(0..probe_tx.len())];
        let (stx, srx) = oneshot::channel();
        let sent_at = Instant::now();
        if tx.send(stx).await.is_ok() {
            if let Ok(seq) = srx.await {
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    let v: serde_json::Value = client
                        .get(format!(
                            "http://{http}/api/v1/nodes/{name}/telemetry?since=1s"
                        ))
                        .bearer_auth(&admin)
                        .send()
                        .await?
                        .json()
                        .await?;
                    if v["latest"]["seq"].as_u64().is_some_and(|s| s >= seq) {
                        latencies.push(sent_at.elapsed().as_secs_f64() * 1e3);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        rss_samples.push(rss_kib(pid) as f64 / 1024.0);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_ns(pid);
    let m1 = scrape(&client, http, &admin).await?;
    let sent1 = counters.sent.load(Ordering::Relaxed);
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    drop(ctl);

    let accepted = m1.accepted - m0.accepted;
    let dropped = m1.dropped - m0.dropped;
    let cpu_cores = (cpu1 - cpu0) as f64 / 1e9 / secs;
    rss_samples.sort_by(|x, y| x.total_cmp(y));
    let rss_max = rss_samples.last().copied().unwrap_or(0.0);
    let expected = n as f64 / a.interval.as_secs_f64();
    let mut lat = latencies.clone();
    lat.sort_by(|x, y| x.total_cmp(y));
    println!(
        "steady {secs:.0} s: accepted {:.0}/s (expected {expected:.0}/s), dropped {dropped}, sim sent {:.0}/s, \
         controller CPU {:.2} cores, RSS max {rss_max:.0} MiB; send->visible p50 {:.1} ms p99 {:.1} ms ({} probes)",
        accepted as f64 / secs,
        (sent1 - sent0) as f64 / secs,
        cpu_cores,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.len()
    );
    let result = json!({
        "bench": "fleet",
        "command": format!(
            "cargo run --release -p nebula-bench -- fleet --agents {n} --interval {interval_s} --containers {} --duration {}",
            a.containers,
            humantime::format_duration(a.duration)
        ),
        "agents": n,
        "containers_per_agent": a.containers,
        "interval_s": a.interval.as_secs_f64(),
        "machine": {"cpus": std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1), "note": "simulator and controller share this machine"},
        "notes": "every simulated agent dials from 127.0.0.1: the per-source cap on enrollments is raised to 1024 (--max-unauthenticated-per-source); every other limit before authentication is at its default",
        "enrolled_s": enrolled_at.as_secs_f64(),
        "all_connected_s": all_connected.as_secs_f64(),
        "connect_failures": failed,
        "steady_window_s": secs,
        "samples_accepted_per_s": accepted as f64 / secs,
        "samples_expected_per_s": expected,
        "samples_sent_per_s": (sent1 - sent0) as f64 / secs,
        "samples_dropped": dropped,
        "sim_send_errors": counters.send_errors.load(Ordering::Relaxed),
        "sim_too_big_for_datagram": counters.too_big.load(Ordering::Relaxed),
        "controller_cpu_cores": cpu_cores,
        "controller_rss_mib": {"max": rss_max, "median": percentile(&rss_samples, 0.5)},
        "controller_rss_per_agent_kib": rss_max * 1024.0 / n as f64,
        "send_to_visible_ms": stats(latencies),
    });
    if let Some(parent) = a.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("wrote {}", a.out.display());
    Ok(())
}

struct Scraped {
    accepted: u64,
    dropped: u64,
}

/// The controller's `/metrics` text.
pub(crate) async fn metrics_text(
    client: &reqwest::Client,
    http: SocketAddr,
    admin: &str,
) -> anyhow::Result<String> {
    Ok(client
        .get(format!("http://{http}/metrics"))
        .bearer_auth(admin)
        .send()
        .await?
        .text()
        .await?)
}

async fn scrape(
    client: &reqwest::Client,
    http: SocketAddr,
    admin: &str,
) -> anyhow::Result<Scraped> {
    let body = metrics_text(client, http, admin).await?;
    let mut s = Scraped {
        accepted: 0,
        dropped: 0,
    };
    for line in body.lines() {
        let v = || {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64
        };
        if line.starts_with("nebula_telemetry_samples_accepted_total ") {
            s.accepted = v();
        } else if line.starts_with("nebula_telemetry_samples_dropped_total{") {
            s.dropped += v();
        }
    }
    Ok(s)
}

/// N simulated agents, enrolled and connected, sending telemetry until `shutdown`.
pub(crate) struct SimFleet {
    pub names: Vec<String>,
    pub probe_tx: Vec<(String, mpsc::Sender<Probe>)>,
    pub counters: Arc<Counters>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub enrolled_at: Duration,
    pub all_connected: Duration,
    pub failed: usize,
}

impl SimFleet {
    /// Enroll `n` agents named `<prefix>-NNNNN` with `token`, then connect them all. With
    /// `jobs_dir`, each agent also runs the real agent's job runner (its journal in a directory
    /// of its own below `jobs_dir`) and serves the job streams the controller opens.
    pub(crate) async fn start(
        quic: SocketAddr,
        token: &JoinToken,
        n: usize,
        prefix: &str,
        interval: Duration,
        containers: usize,
        jobs_dir: Option<&std::path::Path>,
    ) -> anyhow::Result<SimFleet> {
        let endpoints: Vec<quinn::Endpoint> = (0..n.div_ceil(AGENTS_PER_ENDPOINT))
            .map(|_| tls::client_endpoint(quic))
            .collect::<Result<_, _>>()?;
        let start = Instant::now();
        // Enroll: many at once, bounded so the simulator does not flood its own sockets.
        let gate = Arc::new(Semaphore::new(256));
        let tracker = TaskTracker::new();
        let mut enrolled = Vec::with_capacity(n);
        for i in 0..n {
            let ep = endpoints[i / AGENTS_PER_ENDPOINT].clone();
            let token = token.clone();
            let gate = gate.clone();
            let prefix = prefix.to_owned();
            enrolled.push(tracker.spawn(async move {
                let _p = gate.acquire_owned().await?;
                let mut last = None;
                for _ in 0..5 {
                    match enroll_one(&ep, quic, &token, &format!("{prefix}-{i:05}")).await {
                        Ok(id) => return Ok(id),
                        Err(e) => {
                            last = Some(e);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                Err(last.unwrap_or_else(|| anyhow::anyhow!("enrollment failed")))
            }));
        }
        let mut identities = Vec::with_capacity(n);
        for h in enrolled {
            identities.push(h.await??);
        }
        let enrolled_at = start.elapsed();
        println!("enrolled {n} in {:.1} s", enrolled_at.as_secs_f64());

        let shutdown = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let mut ready = Vec::with_capacity(n);
        let mut probe_tx = Vec::with_capacity(n);
        let mut names = Vec::with_capacity(n);
        for (i, identity) in identities.into_iter().enumerate() {
            names.push(identity.state.name.clone());
            let runner = match jobs_dir {
                Some(dir) => Some(JobRunner::new(
                    RunnerConfig::defaults(
                        NodeFacts {
                            hostname: identity.state.name.clone(),
                            ..Default::default()
                        },
                        Some(identity.state.node_id),
                    ),
                    &dir.join(&identity.state.name),
                )?),
                None => None,
            };
            let (rtx, rrx) = oneshot::channel();
            let (ptx, prx) = mpsc::channel(4);
            ready.push(rrx);
            probe_tx.push((identity.state.name.clone(), ptx));
            let ep = endpoints[i / AGENTS_PER_ENDPOINT].clone();
            tracker.spawn(run_agent(
                gate.clone(),
                i,
                ep,
                quic,
                identity,
                interval,
                containers,
                rtx,
                prx,
                counters.clone(),
                runner,
                shutdown.clone(),
            ));
            if i % 256 == 255 {
                tokio::task::yield_now().await;
            }
        }
        let mut failed = 0usize;
        for r in ready {
            match r.await {
                Ok(Ok(_)) => {}
                _ => failed += 1,
            }
        }
        let all_connected = start.elapsed();
        println!(
            "{} connected {:.1} s after the start ({failed} failed)",
            n - failed,
            all_connected.as_secs_f64()
        );

        Ok(SimFleet {
            names,
            probe_tx,
            counters,
            shutdown,
            tracker,
            enrolled_at,
            all_connected,
            failed,
        })
    }
}
