//! `nebula-bench`: benchmarks that print figures and write them as JSON under `bench/results/`.
//!
//! `nebula-bench enroll --agents 200` starts a real controller process (`nebula serve`, release
//! build next to this binary), then N in-process agents together, each with its own key, state
//! dir and QUIC connection, and measures: enroll-and-connect time per agent (median, p99, total),
//! controller RSS with N connected, and the time for all N to reconnect after the controller is
//! killed (SIGKILL) and after it is stopped gracefully (SIGTERM), then started again.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use nebula_agent::{Agent, AgentConfig, AgentStatus};
use nebula_protocol::{JoinToken, NodeFacts};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Parser, Debug)]
#[command(name = "nebula-bench", about = "Nebula Command benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

mod containers;
mod dashboard;
mod deploy;
mod failover;
mod fleet;
mod footprint;
mod gateway;
mod gpu;
mod jobs;
mod monitors;
mod replicas;
mod workflows;

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Concurrent runs of a workflow of no-op steps against the same chains of bare jobs: the
    /// workflow engine's time per step, the controller's CPU and memory.
    Workflows {
        #[arg(long, default_value_t = 100)]
        agents: usize,
        #[arg(long, default_value_t = 1000)]
        runs: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value = "bench/results/workflows.json")]
        out: PathBuf,
    },
    /// N simulated agents on three replicas of one PostgreSQL: each replica's RSS and CPU, and
    /// the time until every agent is back after the leader is killed.
    Replicas {
        /// An empty PostgreSQL database for the replicas.
        #[arg(long)]
        database_url: String,
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        interval: Duration,
        #[arg(long, default_value = "bench/results/replicas.json")]
        out: PathBuf,
    },
    /// Three replicas on one PostgreSQL: time to a new leader after killing the leader.
    Failover {
        /// An empty PostgreSQL database for the replicas.
        #[arg(long)]
        database_url: String,
        #[arg(long, default_value_t = 20)]
        kills: usize,
        #[arg(long, default_value_t = 5)]
        stops: usize,
        #[arg(long, default_value = "bench/results/failover.json")]
        out: PathBuf,
    },
    /// The agent's RSS and CPU next to prometheus-node-exporter, with containers running.
    Footprint {
        #[arg(long, default_value_t = 20)]
        containers: usize,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        interval: Duration,
        #[arg(long, default_value = "bench/results/footprint.json")]
        out: PathBuf,
    },
    /// NVML sampling cost: raw calls vs the agent's collector (needs an NVIDIA GPU).
    Gpu {
        #[arg(long, default_value_t = 10_000)]
        iterations: usize,
        #[arg(long, default_value = "bench/results/gpu.json")]
        out: PathBuf,
    },
    /// Simulate a fleet of N agents sending telemetry to a real controller.
    Fleet {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        interval: Duration,
        #[arg(long, default_value_t = 20)]
        containers: usize,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Output file (default: bench/results/fleet-<N>.json).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// No-op jobs: round trip (idle and with a telemetry-heavy fleet) and throughput.
    Jobs {
        /// Agents serving jobs (the agent's real job runner).
        #[arg(long, default_value_t = 100)]
        agents: usize,
        /// More agents that only send telemetry during the second round-trip run (0: skip).
        #[arg(long, default_value_t = 10_000)]
        background: usize,
        #[arg(long, default_value_t = 2000)]
        round_trips: usize,
        /// Clients creating jobs at once in the throughput run.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        throughput_for: Duration,
        /// Measurements repeated (medians are reported too).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value = "bench/results/jobs.json")]
        out: PathBuf,
    },
    /// The dashboard's overview with N simulated agents: render time and weight.
    Dashboard {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        #[arg(long, default_value_t = 50)]
        requests: usize,
        #[arg(long, default_value = "bench/results/dashboard.json")]
        out: std::path::PathBuf,
    },
    /// Apply N services over 3 real agents (real containers) vs `docker run` in a shell loop.
    Deploy {
        #[arg(long, default_value_t = 50)]
        services: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value = "bench/results/deploy.json")]
        out: PathBuf,
    },
    /// The planner on a synthetic fleet: first plan, steady state, one edit.
    Plan {
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 21)]
        iterations: usize,
        #[arg(long, default_value = "bench/results/plan.json")]
        out: PathBuf,
    },
    /// The AI gateway's added latency (concurrency 1 and 64) and time to first token, against
    /// calling the backend directly.
    Gateway {
        /// Requests per path and concurrency level.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// Streamed answers from llama.cpp per path, for time to first token.
        #[arg(long, default_value_t = 30)]
        ttft_runs: usize,
        /// How long the paced backend takes to answer (the concurrency-64 figure).
        #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
        service: Duration,
        /// Run only these parts (concurrency_1, concurrency_64, concurrency_64_lockstep,
        /// concurrency_64_saturated, first_token, first_token_new_question,
        /// first_token_idle_backend, stream_filters); all of them when not given.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        #[arg(long, default_value = "bench/results/gateway.json")]
        out: PathBuf,
    },
    /// A container's log through Nebula against `docker logs` (lines/s, controller CPU per
    /// 10k lines), and a keystroke's round trip through `container exec` against the runtime's
    /// exec API directly.
    Containers {
        #[arg(long, default_value_t = 200_000)]
        lines: usize,
        #[arg(long, default_value_t = 200)]
        round_trips: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value = "bench/results/containers.json")]
        out: PathBuf,
    },
    /// Monitors and alert rules at scale: M monitors over N simulated agents reporting at
    /// their interval, every rule evaluated over the fleet; controller CPU and memory.
    Monitors {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        #[arg(long, default_value_t = 10_000)]
        monitors: usize,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        interval: Duration,
        #[arg(long, default_value_t = 10)]
        rules: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        evaluate_every: Duration,
        #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "bench/results/monitors.json")]
        out: PathBuf,
    },
    /// Enroll and connect N agents at once; controller RSS; reconnect after restarts.
    Enroll {
        #[arg(long, default_value_t = 200)]
        agents: usize,
        /// Output file (default: bench/results/enroll-<N>.json).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::Fleet {
            agents,
            interval,
            containers,
            duration,
            out,
        } => {
            let out =
                out.unwrap_or_else(|| PathBuf::from(format!("bench/results/fleet-{agents}.json")));
            rt.block_on(fleet::fleet_bench(fleet::FleetArgs {
                agents,
                interval,
                containers,
                duration,
                out,
            }))
        }
        Cmd::Workflows {
            agents,
            runs,
            steps,
            out,
        } => rt.block_on(workflows::workflows_bench(workflows::WorkflowArgs {
            agents,
            runs,
            steps,
            out,
        })),
        Cmd::Jobs {
            agents,
            background,
            round_trips,
            concurrency,
            throughput_for,
            runs,
            out,
        } => rt.block_on(jobs::jobs_bench(jobs::JobsArgs {
            agents,
            background,
            round_trips,
            concurrency,
            throughput_for,
            runs,
            out,
        })),
        Cmd::Gpu { iterations, out } => gpu::gpu_bench(iterations, &out),
        Cmd::Dashboard {
            agents,
            requests,
            out,
        } => rt.block_on(dashboard::dashboard_bench(agents, requests, &out)),
        Cmd::Deploy {
            services,
            runs,
            out,
        } => rt.block_on(deploy::deploy_bench(services, runs, &out)),
        Cmd::Gateway {
            requests,
            ttft_runs,
            service,
            only,
            out,
        } => rt.block_on(gateway::gateway_bench(
            requests, ttft_runs, service, &only, &out,
        )),
        Cmd::Plan {
            services,
            nodes,
            iterations,
            out,
        } => deploy::plan_bench(services, nodes, iterations, &out),
        Cmd::Footprint {
            containers,
            duration,
            interval,
            out,
        } => rt.block_on(footprint::footprint_bench(footprint::FootprintArgs {
            containers,
            duration,
            interval,
            out,
        })),
        Cmd::Containers {
            lines,
            round_trips,
            runs,
            out,
        } => rt.block_on(containers::containers_bench(containers::ContainersArgs {
            lines,
            round_trips,
            runs,
            out,
        })),
        Cmd::Replicas {
            database_url,
            agents,
            interval,
            out,
        } => rt.block_on(replicas::replicas_bench(
            &database_url,
            agents,
            interval,
            &out,
        )),
        Cmd::Failover {
            database_url,
            kills,
            stops,
            out,
        } => rt.block_on(failover::failover_bench(&database_url, kills, stops, &out)),
        Cmd::Monitors {
            agents,
            monitors,
            interval,
            rules,
            evaluate_every,
            duration,
            out,
        } => rt.block_on(monitors::monitors_bench(monitors::MonitorsArgs {
            agents,
            monitors,
            interval,
            rules,
            evaluate_every,
            duration,
            out,
        })),
        Cmd::Enroll { agents, out } => {
            let out =
                out.unwrap_or_else(|| PathBuf::from(format!("bench/results/enroll-{agents}.json")));
            rt.block_on(enroll_bench(agents, &out))
        }
    }
}

/// A controller child process.
struct ControllerProc {
    child: Child,
    http: SocketAddr,
    quic: SocketAddr,
    /// The admin API token (kept in `<dir>/admin.token`, the same across restarts).
    admin: String,
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nebula_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("nebula");
    if !p.exists() {
        bail!(
            "{} not found: build it first (cargo build --release --bins)",
            p.display()
        );
    }
    Ok(p)
}

/// Flags for a controller whose simulated agents all dial from 127.0.0.1: the per-source cap on
/// enrollment connections (64 by default, for real fleets) is raised so that a bench measures
/// the enrollment path rather than the cap (with the cap, `join` would wait out "busy").
pub(crate) const ONE_ADDRESS: &[&str] = &["--max-unauthenticated-per-source", "1024"];

fn start_controller(
    dir: &Path,
    http: &str,
    quic: &str,
    extra: &[&str],
) -> anyhow::Result<ControllerProc> {
    let token_file = dir.join("admin.token");
    if !token_file.exists() {
        std::fs::write(&token_file, format!("nbl_bench_{:016}", std::process::id()))?;
    }
    let admin = std::fs::read_to_string(&token_file)?;
    let mut child = Command::new(nebula_bin()?)
        .args(["serve", "--http-listen", http, "--quic-listen", quic])
        .args(extra)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--admin-token-file")
        .arg(dir.join("admin.token"))
        // NEBULA_BENCH_CONTROLLER_LOG (a RUST_LOG filter) shows the controller's own log.
        .env(
            "RUST_LOG",
            std::env::var("NEBULA_BENCH_CONTROLLER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut http = None;
        let mut quic = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("API: http://") {
                http = a.trim().parse::<SocketAddr>().ok();
            }
            if let Some(a) = line.strip_prefix("QUIC: ") {
                quic = a.trim().parse::<SocketAddr>().ok();
            }
            if let (Some(h), Some(q)) = (http, quic) {
                let _ = tx.send((h, q));
                http = None;
            }
        }
    });
    let (http, quic) = rx
        .recv_timeout(Duration::from_secs(30))
        .context("controller did not start")?;
    Ok(ControllerProc {
        child,
        http,
        quic,
        admin,
    })
}

/// A child process killed (and reaped) when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Run `docker` and return its stdout, or its stderr as the error.
fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker").args(args).output()?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A join token for `uses` agents, through the controller's API.
async fn join_token(
    client: &reqwest::Client,
    http: SocketAddr,
    admin: &str,
    uses: usize,
) -> anyhow::Result<JoinToken> {
    let resp: serde_json::Value = client
        .post(format!("http://{http}/api/v1/tokens"))
        .bearer_auth(admin)
        .json(&json!({"uses": uses, "ttl": "2h"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(resp["token"]
        .as_str()
        .context("no token in the answer")?
        .parse()?)
}

/// CPU time of a process in nanoseconds, from the scheduler's own accounting
/// (`/proc/<pid>/task/*/schedstat`, exact), rather than the 10 ms ticks of `/proc/<pid>/stat`,
/// which overstate short bursts of a mostly idle process.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(|a, b| a.total_cmp(b));
    json!({
        "n": v.len(),
        "median": percentile(&v, 0.5),
        "p99": percentile(&v, 0.99),
        "max": v.last().copied().unwrap_or(0.0),
    })
}

/// Each agent's connection events (time of each `Connected`).
type Events = Arc<Mutex<Vec<Vec<Instant>>>>;

async fn wait_all_connected_after(
    events: &Events,
    since: Instant,
    timeout: Duration,
) -> anyhow::Result<Vec<f64>> {
    let deadline = Instant::now() + timeout;
    loop {
        let done: Option<Vec<f64>> = {
            let ev = events.lock().expect("events lock");
            ev.iter()
                .map(|e| {
                    e.iter()
                        .find(|t| **t > since)
                        .map(|t| t.duration_since(since).as_secs_f64() * 1e3)
                })
                .collect()
        };
        if let Some(d) = done {
            return Ok(d);
        }
        if Instant::now() > deadline {
            bail!("not all agents reconnected within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Longer than the usual limit for a reason: one benchmark scenario read top to bottom (start
/// the processes, load, measure, write the figures); split up, one measurement would be
/// scattered over helpers that each hold part of its state.
async fn enroll_bench(n: usize, out: &Path) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut ctl = start_controller(dir.path(), "127.0.0.1:0", "127.0.0.1:0", ONE_ADDRESS)?;
    let admin = ctl.admin.clone();
    let (http, quic) = (ctl.http, ctl.quic);
    println!("controller pid {} http {http} quic {quic}", ctl.child.id());
    let client = reqwest::Client::new();
    let token = join_token(&client, http, &admin, n).await?;
    let idle_rss = rss_kib(ctl.child.id());

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let events: Events = Arc::new(Mutex::new(vec![Vec::new(); n]));
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut first_connect = Vec::new();
    for i in 0..n {
        let (tx, rx) = tokio::sync::oneshot::channel::<anyhow::Result<f64>>();
        first_connect.push(rx);
        let agent = Agent::new(AgentConfig {
            controller: Some(quic.to_string()),
            state_dir: dir.path().join(format!("agent-{i}")),
            name: Some(format!("sim-{i:05}")),
            ..AgentConfig::default()
        })
        .with_facts(NodeFacts {
            hostname: format!("sim-{i:05}"),
            os: "Linux".into(),
            arch: "x86_64".into(),
            cpu_count: 4,
            memory_bytes: 8 << 30,
            ..Default::default()
        });
        let token = token.clone();
        let barrier = barrier.clone();
        let shutdown = shutdown.clone();
        let events = events.clone();
        tracker.spawn(async move {
            let mut status = agent.status();
            barrier.wait().await;
            let t0 = Instant::now();
            if let Err(e) = agent.join(&token).await {
                let _ = tx.send(Err(anyhow::anyhow!("join: {e:#}")));
                return;
            }
            let watcher = {
                let events = events.clone();
                async move {
                    let mut tx = Some(tx);
                    while status.changed().await.is_ok() {
                        if matches!(*status.borrow(), AgentStatus::Connected { .. }) {
                            let now = Instant::now();
                            events.lock().expect("events lock")[i].push(now);
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(Ok(now.duration_since(t0).as_secs_f64() * 1e3));
                            }
                        }
                    }
                }
            };
            tokio::select! {
                _ = watcher => {}
                r = agent.run(shutdown) => {
                    if let Err(e) = r {
                        eprintln!("agent {i}: {e:#}");
                    }
                }
            }
        });
    }
    println!("starting {n} agents together");
    let start = Instant::now();
    barrier.wait().await;
    let mut connect_ms = Vec::with_capacity(n);
    for rx in first_connect {
        connect_ms.push(rx.await.context("agent task ended")??);
    }
    let total_ms = start.elapsed().as_secs_f64() * 1e3;
    // The API agrees that all are online.
    let online = count_online(&client, http, &admin).await?;
    if online != n {
        bail!("API shows {online} online, expected {n}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_connected = rss_kib(ctl.child.id());
    println!(
        "enroll+connect: median {:.1} ms, p99 {:.1} ms, all {n} in {total_ms:.0} ms; controller RSS {:.1} MiB",
        percentile(&sorted(&connect_ms), 0.5),
        percentile(&sorted(&connect_ms), 0.99),
        rss_connected as f64 / 1024.0
    );

    // Restart by SIGKILL: agents notice at their next keep-alive (stateless reset).
    let (http_s, quic_s) = (http.to_string(), quic.to_string());
    let _ = ctl.child.kill();
    let _ = ctl.child.wait();
    let killed = Instant::now();
    drop(ctl);
    let ctl2 = start_controller(dir.path(), &http_s, &quic_s, ONE_ADDRESS)?;
    let up = Instant::now();
    let after_kill = wait_all_connected_after(&events, killed, Duration::from_secs(120)).await?;
    let kill_all_ms = after_kill.iter().cloned().fold(0.0, f64::max);
    let kill_from_up_ms = kill_all_ms - up.duration_since(killed).as_secs_f64() * 1e3;
    println!("after SIGKILL: all {n} back {kill_all_ms:.0} ms after the kill ({kill_from_up_ms:.0} ms after the new controller was up)");

    // Graceful restart: agents are told at once.
    let stopped = Instant::now();
    let mut ctl2 = ctl2;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(ctl2.child.id().to_string())
        .status();
    let _ = ctl2.child.wait();
    drop(ctl2);
    let ctl3 = start_controller(dir.path(), &http_s, &quic_s, ONE_ADDRESS)?;
    let up3 = Instant::now();
    let after_term = wait_all_connected_after(&events, stopped, Duration::from_secs(120)).await?;
    let term_all_ms = after_term.iter().cloned().fold(0.0, f64::max);
    let term_from_up_ms = term_all_ms - up3.duration_since(stopped).as_secs_f64() * 1e3;
    println!("after SIGTERM: all {n} back {term_all_ms:.0} ms after the stop ({term_from_up_ms:.0} ms after the new controller was up)");
    let online = count_online(&client, ctl3.http, &admin).await?;
    let rss_after = rss_kib(ctl3.child.id());

    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    drop(ctl3);

    let result = json!({
        "bench": "enroll",
        "command": format!("cargo run --release -p nebula-bench -- enroll --agents {n}"),
        "agents": n,
        "machine": {"cpus": std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1)},
        "enroll_and_connect_ms": stats(connect_ms),
        "enroll_and_connect_total_ms": total_ms,
        "controller_rss_mib": {
            "idle": idle_rss as f64 / 1024.0,
            "with_agents_connected": rss_connected as f64 / 1024.0,
            "after_restarts_with_agents_connected": rss_after as f64 / 1024.0,
        },
        "reconnect_after_sigkill_ms": {
            "all_back_after_kill": kill_all_ms,
            "all_back_after_new_controller_up": kill_from_up_ms,
            "per_agent_from_kill": stats(after_kill),
        },
        "reconnect_after_sigterm_ms": {
            "all_back_after_stop": term_all_ms,
            "all_back_after_new_controller_up": term_from_up_ms,
            "per_agent_from_stop": stats(after_term),
        },
        "online_after_restarts": online,
        "notes": "agents use default settings (keep-alive 5 s, idle timeout 15 s); after SIGKILL an agent learns of the restart at its next keep-alive, answered by a stateless reset from the new process; every simulated agent dials from 127.0.0.1, so the per-source cap on enrollments (64 by default) is raised to 1024 and the bench measures the enrollment path, not the cap",
    });
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("wrote {}", out.display());
    Ok(())
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

async fn count_online(
    client: &reqwest::Client,
    http: SocketAddr,
    admin: &str,
) -> anyhow::Result<usize> {
    let v: serde_json::Value = client
        .get(format!(
            "http://{http}/api/v1/nodes?status=online&limit=1000"
        ))
        .bearer_auth(admin)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v["items"].as_array().map(|a| a.len()).unwrap_or(0))
}
