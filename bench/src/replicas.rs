//! `nebula-bench replicas`: N simulated agents on three replicas of one PostgreSQL database.
//! Each agent has its own enrolled identity and QUIC connection and behaves as the real agent
//! does with several controller addresses: the agents are spread over the three replicas (a
//! follower relays its agents' sessions to the leader), and when its connection is lost an
//! agent tries the next address at once with up to 250 ms of jitter, backing off only after
//! every address failed in a row. The bench measures each replica's RSS and CPU with the fleet
//! connected and sending telemetry, then kills a follower (how long until its agents are back
//! through the others), then the leader (how long until another replica leads, and until every
//! agent has a session again: the followers' relayed sessions move to the new leader too).
//! Last, the two killed replicas are started again, and the bench measures how long the
//! leader takes to spread the sessions over the three again (`session-balance`, at most 5% of
//! the fleet each 30 s), honouring `MOVE` closes as the real agent does.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nebula_agent::identity::Identity;
use nebula_agent::tls;
use nebula_protocol::telemetry::Datagram;
use nebula_protocol::{
    self as proto, close, AgentMessage, Hello, NodeFacts, ServerHello, CONTROLLER_SERVER_NAME,
};
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fleet::{enroll_one, inventory, sample};
use crate::{cpu_ns, join_token, rss_kib, stats, ControllerProc};

const AGENTS_PER_ENDPOINT: usize = 500;

/// When each agent last became connected, and to which replica (its QUIC address).
type Connected = Arc<Mutex<Vec<Option<(Instant, SocketAddr)>>>>;

/// A session: the connection and both halves of the session stream (kept open: a dropped
/// receiving half would stop the controller's next message, which ends the session).
async fn session(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    identity: &Identity,
) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let cfg = tls::session_config(identity, Duration::from_secs(5), Duration::from_secs(15))?;
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        endpoint.connect_with(cfg, addr, CONTROLLER_SERVER_NAME)?,
    )
    .await??;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = Hello {
        version: proto::PROTOCOL_VERSION,
        agent_version: "sim".into(),
        facts: NodeFacts {
            hostname: identity.state.name.clone(),
            ..Default::default()
        },
    };
    proto::write_message(&mut send, &hello).await?;
    match proto::read_message::<ServerHello, _>(&mut recv, 1 << 20).await? {
        ServerHello::Welcome(_) => Ok((conn, send, recv)),
        ServerHello::Refused(r) => anyhow::bail!("refused: {r}"),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_agent(
    idx: usize,
    endpoint: quinn::Endpoint,
    addrs: Arc<Vec<SocketAddr>>,
    start_at: usize,
    identity: Identity,
    interval: Duration,
    connected: Connected,
    gate: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    let mut rng = rand::rngs::StdRng::from_entropy();
    let inv = inventory(idx, 5, false);
    let mut next = start_at;
    let mut failed_in_a_row = 0usize;
    let mut backoff = Duration::from_millis(500);
    // Where a `MOVE` close sent this agent (protocol 1.11), dialled next at once.
    let mut moved_to: Option<SocketAddr> = None;
    while !shutdown.is_cancelled() {
        let target = moved_to.take().unwrap_or(addrs[next % addrs.len()]);
        let attempt = {
            let _permit = gate.acquire().await;
            session(&endpoint, target, &identity).await
        };
        match attempt {
            Ok((conn, mut send, _recv)) => {
                failed_in_a_row = 0;
                backoff = Duration::from_millis(500);
                connected.lock().unwrap()[idx] = Some((Instant::now(), target));
                let _ =
                    proto::write_message(&mut send, &AgentMessage::TelemetryInventory(inv.clone()))
                        .await;
                let mut seq = 0u64;
                let phase =
                    Duration::from_micros(rng.gen_range(0..interval.as_micros().max(1) as u64));
                let mut tick = tokio::time::Instant::now() + phase;
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            conn.close(0u32.into(), b"simulation over");
                            return;
                        }
                        _ = conn.closed() => break,
                        _ = tokio::time::sleep_until(tick) => {
                            seq += 1;
                            if let Ok(b) = proto::encode(&Datagram::Sample(sample(&mut rng, seq, &inv))) {
                                let _ = conn.send_datagram(b.into());
                            }
                            tick += interval;
                        }
                    }
                }
                connected.lock().unwrap()[idx] = None;
                moved_to = move_hint(&conn);
                if moved_to.is_some() {
                    continue;
                }
            }
            Err(_) => failed_in_a_row += 1,
        }
        next += 1;
        let pause = if failed_in_a_row > 0 && failed_in_a_row.is_multiple_of(addrs.len()) {
            let d = backoff;
            backoff = (backoff * 2).min(Duration::from_secs(8));
            d / 2 + Duration::from_millis(rng.gen_range(0..=d.as_millis() as u64 / 2))
        } else {
            Duration::from_millis(rng.gen_range(0..=250))
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// The replica a `MOVE` close names, as the real agent reads it.
fn move_hint(conn: &quinn::Connection) -> Option<SocketAddr> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == close::MOVE.into() => {
            close::named_address(close::MOVE, &c.reason)?.parse().ok()
        }
        _ => None,
    }
}

fn usage(p: &ControllerProc, window: Duration, before: u64) -> (f64, u64) {
    let cores = (cpu_ns(p.child.id()) - before) as f64 / window.as_nanos() as f64;
    (cores, rss_kib(p.child.id()))
}

/// `n` simulated agents enrolled (256 at a time), spread over the endpoints.
async fn enroll_all(
    n: usize,
    endpoints: &[quinn::Endpoint],
    gate: &Arc<Semaphore>,
    token: &nebula_protocol::JoinToken,
    addr: SocketAddr,
) -> anyhow::Result<Vec<Identity>> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (ep, gate, token) = (
            endpoints[i / AGENTS_PER_ENDPOINT].clone(),
            gate.clone(),
            token.clone(),
        );
        set.spawn(async move {
            let _p = gate.acquire().await;
            (
                i,
                enroll_one(&ep, addr, &token, &format!("sim-{i:05}")).await,
            )
        });
    }
    let mut slots: Vec<Option<Identity>> = (0..n).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, id) = r?;
        slots[i] = Some(id?);
    }
    Ok(slots.into_iter().map(|s| s.expect("enrolled")).collect())
}

/// Each replica's CPU (cores) and RSS over `window`.
async fn steady(
    all: &[Option<ControllerProc>],
    lead: usize,
    window: Duration,
) -> Vec<serde_json::Value> {
    let before: Vec<u64> = all
        .iter()
        .map(|p| p.as_ref().map(|p| cpu_ns(p.child.id())).unwrap_or(0))
        .collect();
    tokio::time::sleep(window).await;
    all.iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let p = p.as_ref()?;
            let (cores, rss) = usage(p, window, before[i]);
            Some(json!({"replica": i, "leader": i == lead, "cpu_cores": cores, "rss_mib": rss as f64 / 1024.0}))
        })
        .collect()
}

/// Kill replica `i` (SIGKILL) and wait for it; when it was killed.
fn kill(all: &mut [Option<ControllerProc>], i: usize) -> anyhow::Result<Instant> {
    let killed = Instant::now();
    if let Some(mut p) = all[i].take() {
        p.child.kill()?;
        p.child.wait()?;
    }
    Ok(killed)
}

/// The terms seen over `window`, starting with `term`: the one replica left kept its lease
/// through the storm when there is no other (a new term means it lost the lease, closing every
/// session).
async fn terms_for(
    c: &reqwest::Client,
    all: &[Option<ControllerProc>],
    term: i64,
    window: Duration,
) -> Vec<i64> {
    let mut terms = vec![term];
    let hold = Instant::now();
    while hold.elapsed() < window {
        if let Some((_, t)) = crate::failover::leader(c, all).await {
            if !terms.contains(&t) {
                terms.push(t);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    terms
}

/// Agents with a session (on the replica at `on`, or anywhere).
fn count_on(connected: &Connected, on: Option<SocketAddr>) -> usize {
    connected
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.is_some_and(|(_, at)| on.is_none_or(|r| r == at)))
        .count()
}

/// Wait until each of `who` has a session again that started after `at`; how long each took.
async fn wait_back(
    connected: &Connected,
    who: Vec<usize>,
    at: Instant,
    what: &str,
) -> anyhow::Result<Vec<f64>> {
    loop {
        let back: Option<Vec<f64>> = {
            let c = connected.lock().unwrap();
            who.iter()
                .map(|&i| match c[i] {
                    Some((t, _)) if t > at => Some(t.duration_since(at).as_secs_f64()),
                    _ => None,
                })
                .collect()
        };
        if let Some(times) = back {
            return Ok(times);
        }
        anyhow::ensure!(
            at.elapsed() < Duration::from_secs(600),
            "after {what}: not every agent came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn replicas_bench(
    url: &str,
    n: usize,
    interval: Duration,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let interval_s = humantime::format_duration(interval).to_string();
    let flags = [
        "--telemetry-interval",
        interval_s.as_str(),
        "--max-unauthenticated-per-source",
        "1024",
    ];
    let mut all = crate::failover::three_replicas(work.path(), url, &flags)?;
    let c = reqwest::Client::new();
    let (lead, term, _) = crate::failover::wait_leader(&c, &all, 0).await?;
    let quic: Arc<Vec<SocketAddr>> = Arc::new(
        all.iter()
            .map(|p| {
                p.as_ref()
                    .map(|p| p.quic)
                    .unwrap_or(([127, 0, 0, 1], 0).into())
            })
            .collect(),
    );
    let leader = all[lead].as_ref().expect("the leader runs");
    let token = join_token(&c, leader.http, leader.admin.trim(), n).await?;
    println!("enrolling {n} agents through the leader");
    let t0 = Instant::now();
    let endpoints: Vec<quinn::Endpoint> = (0..n.div_ceil(AGENTS_PER_ENDPOINT))
        .map(|_| tls::client_endpoint(quic[lead]))
        .collect::<Result<_, _>>()?;
    let gate = Arc::new(Semaphore::new(256));
    let ids = enroll_all(n, &endpoints, &gate, &token, quic[lead]).await?;
    let enrolled = t0.elapsed();
    let connected: Connected = Arc::new(Mutex::new(vec![None; n]));
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    for (i, id) in ids.into_iter().enumerate() {
        tracker.spawn(run_agent(
            i,
            endpoints[i / AGENTS_PER_ENDPOINT].clone(),
            quic.clone(),
            i % 3,
            id,
            interval,
            connected.clone(),
            gate.clone(),
            shutdown.clone(),
        ));
    }
    let t1 = Instant::now();
    while count_on(&connected, None) < n {
        anyhow::ensure!(
            t1.elapsed() < Duration::from_secs(600),
            "only {} of {n} connected",
            count_on(&connected, None)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_connected = t0.elapsed();
    let spread: Vec<usize> = quic
        .iter()
        .map(|a| count_on(&connected, Some(*a)))
        .collect();
    println!(
        "all {n} connected {:.1} s after the start, per replica {spread:?}",
        all_connected.as_secs_f64()
    );
    // Steady state: each replica's CPU and memory while the fleet sends telemetry.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let window = Duration::from_secs(30);
    let steady = steady(&all, lead, window).await;
    println!("steady: {}", serde_json::to_string(&steady)?);

    // A follower dies: its agents come back through the other two.
    let follower = (lead + 1) % 3;
    let on_follower: Vec<usize> = (connected.lock().unwrap().iter().enumerate())
        .filter_map(|(i, c)| c.is_some_and(|(_, at)| at == quic[follower]).then_some(i))
        .collect();
    let killed = kill(&mut all, follower)?;
    let follower_agents = on_follower.len();
    let follower_back = wait_back(&connected, on_follower, killed, "the follower's kill").await?;
    let follower_all_back_s = follower_back.iter().cloned().fold(0.0, f64::max);
    println!(
        "a follower killed: its {follower_agents} agents back through the others after {follower_all_back_s:.2} s"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;

    // The leader dies: how long until another leads, and until every agent is back.
    let killed = kill(&mut all, lead)?;
    let (next, next_term, _) = crate::failover::wait_leader(&c, &all, term).await?;
    let new_leader_s = killed.elapsed().as_secs_f64();
    let per_agent = wait_back(&connected, (0..n).collect(), killed, "the leader's kill").await?;
    let all_back_s = per_agent.iter().cloned().fold(0.0, f64::max);
    println!("new leader (term {next_term}, replica {next}) after {new_leader_s:.2} s; all {n} agents back after {all_back_s:.2} s");
    let terms = terms_for(&c, &all, next_term, Duration::from_secs(30)).await;
    let lease_losses = terms.len() - 1;
    println!("terms from the take-over to 30 s after every agent was back: {terms:?} ({lease_losses} lease losses)");

    let restart = spread_after_restart(
        &mut all,
        work.path(),
        url,
        &flags,
        [follower, lead],
        (next, next_term),
        &connected,
    )
    .await?;
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    let result = json!({
        "bench": "replicas",
        "agents": n,
        "telemetry_interval_s": interval.as_secs_f64(),
        "replicas": 3,
        "enrolled_s": enrolled.as_secs_f64(),
        "all_connected_s": all_connected.as_secs_f64(),
        "sessions_per_replica": spread,
        "steady_window_s": window.as_secs_f64(),
        "steady": steady,
        "after_follower_kill": {
            "agents": follower_agents,
            "all_agents_back_s": follower_all_back_s,
            "agent_back_s": stats(follower_back),
        },
        "after_leader_kill": {
            "new_leader_s": new_leader_s,
            "all_agents_back_s": all_back_s,
            "agent_back_s": stats(per_agent),
            "lease_losses_until_30s_after_all_back": lease_losses,
        },
        "after_restarting_the_two": restart,
        "note": "agents dial the replica they were given (spread over the three); followers hold their agents' QUIC connections and relay the sessions to the leader, which serves every session; agents notice a killed replica at their idle timeout (15 s); after the two killed replicas restart, the leader moves at most 5% of the fleet to them every balance interval (30 s)",
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "command": format!("nebula-bench replicas --database-url postgres://… --agents {n} --interval {interval_s}"),
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&result)? + "\n")?;
    Ok(())
}

/// Start the `killed` replicas again and wait until the leader (`leads`: index and term) has
/// spread the sessions over the three; what it took.
async fn spread_after_restart(
    all: &mut [Option<ControllerProc>],
    work: &std::path::Path,
    url: &str,
    flags: &[&str],
    killed: [usize; 2],
    leads: (usize, i64),
    connected: &Connected,
) -> anyhow::Result<serde_json::Value> {
    // The two killed replicas come back (new ports, as after a host's restart): the leader
    // moves agents to them, at most 5% of the fleet each balance interval, until every
    // replica holds its share (within 5%).
    for i in killed {
        let dir = work.join(format!("r{i}"));
        all[i] = Some(crate::failover::start(&dir, url, flags)?);
    }
    let restarted = Instant::now();
    let addrs: Vec<SocketAddr> = all.iter().flatten().map(|p| p.quic).collect();
    let n = connected.lock().unwrap().len();
    let share = n.div_ceil(3);
    let mut progress = Vec::new();
    let per_replica = loop {
        let counts: Vec<usize> = addrs
            .iter()
            .map(|a| count_on(connected, Some(*a)))
            .collect();
        let t = restarted.elapsed().as_secs();
        if progress
            .last()
            .is_none_or(|(at, _): &(u64, Vec<usize>)| t >= at + 30)
        {
            println!("{t} s after the restart: sessions per replica {counts:?}");
            progress.push((t, counts.clone()));
        }
        if counts.iter().sum::<usize>() == n && counts.iter().all(|&c| c <= share + share / 20) {
            break counts;
        }
        anyhow::ensure!(
            restarted.elapsed() < Duration::from_secs(1200),
            "not spread 20 minutes after the restart: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let balanced_s = restarted.elapsed().as_secs_f64();
    let leader = all[leads.0].as_ref().expect("the leader runs");
    let moved =
        crate::fleet::metrics_text(&reqwest::Client::new(), leader.http, leader.admin.trim())
            .await?
            .lines()
            .find_map(|l| l.strip_prefix("nebula_sessions_moved_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
    let kept = crate::failover::leader(&reqwest::Client::new(), all)
        .await
        .is_some_and(|(i, t)| (i, t) == leads);
    println!("spread again {balanced_s:.1} s after the restart: {per_replica:?}, {moved} sessions moved, lease kept: {kept}");
    Ok(json!({
        "spread_s": balanced_s,
        "sessions_per_replica": per_replica,
        "sessions_moved": moved,
        "leader_kept_its_lease": kept,
        "progress": progress.iter().map(|(t, c)| json!({"s": t, "sessions_per_replica": c})).collect::<Vec<_>>(),
    }))
}
