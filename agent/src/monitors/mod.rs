//! Monitors: the checks the controller assigned to this node, each run on its own schedule
//! (an interval, started at an offset derived from its name so a set does not run all at
//! once), with at most [`CONCURRENT_CHECKS`] in flight. Results go to the session in batches;
//! while no session is up they queue (at most [`QUEUED_RESULTS`], then the newest are dropped)
//! and go out on the next one. The set survives reconnects: the controller sends it again on
//! every session and the runner keeps what did not change running.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nebula_protocol::monitors::{
    MonitorResult, MonitorSpec, MAX_MONITORS_PER_NODE, MAX_TIMEOUT_MS, MIN_INTERVAL_MS,
};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub mod checks;
pub mod dns;
pub mod ping;

/// Checks running at the same moment, at most.
pub const CONCURRENT_CHECKS: usize = 64;
/// Results waiting for a session, at most.
pub const QUEUED_RESULTS: usize = 4096;

/// Start the runner: the session sets the specs, and reads the results.
pub fn spawn(
    docker_socket: Option<String>,
    tracker: &tokio_util::task::TaskTracker,
    stop: CancellationToken,
) -> (
    watch::Sender<Vec<MonitorSpec>>,
    mpsc::Receiver<MonitorResult>,
) {
    let (specs_tx, specs_rx) = watch::channel(Vec::new());
    let (results_tx, results_rx) = mpsc::channel(QUEUED_RESULTS);
    let ctx = Arc::new(checks::CheckContext { docker_socket });
    tracker.spawn(run(specs_rx, results_tx, ctx, stop));
    (specs_tx, results_rx)
}

/// The set as the runner uses it: at most [`MAX_MONITORS_PER_NODE`], intervals and timeouts
/// within bounds, one entry per name.
pub fn sanitize(mut specs: Vec<MonitorSpec>) -> Vec<MonitorSpec> {
    specs.truncate(MAX_MONITORS_PER_NODE);
    let mut seen = std::collections::HashSet::new();
    specs.retain(|s| seen.insert(s.name.clone()));
    for s in &mut specs {
        s.interval_ms = s.interval_ms.max(MIN_INTERVAL_MS);
        s.timeout_ms = s.timeout_ms.clamp(100, MAX_TIMEOUT_MS.min(s.interval_ms));
    }
    specs
}

async fn run(
    mut specs: watch::Receiver<Vec<MonitorSpec>>,
    results: mpsc::Sender<MonitorResult>,
    ctx: Arc<checks::CheckContext>,
    stop: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(CONCURRENT_CHECKS));
    let mut running: HashMap<String, (MonitorSpec, CancellationToken)> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = specs.changed() => if changed.is_err() { break },
        }
        let wanted = sanitize(specs.borrow_and_update().clone());
        let names: std::collections::HashSet<&str> =
            wanted.iter().map(|s| s.name.as_str()).collect();
        running.retain(|name, (_, cancel)| {
            let keep = names.contains(name.as_str());
            if !keep {
                cancel.cancel();
            }
            keep
        });
        let mut started = 0;
        for spec in wanted {
            if running.get(&spec.name).is_some_and(|(s, _)| *s == spec) {
                continue;
            }
            if let Some((_, cancel)) = running.remove(&spec.name) {
                cancel.cancel();
            }
            let cancel = stop.child_token();
            let task = monitor(
                spec.clone(),
                results.clone(),
                ctx.clone(),
                limit.clone(),
                cancel.clone(),
            );
            tokio::spawn(task);
            running.insert(spec.name.clone(), (spec, cancel));
            started += 1;
        }
        info!(
            monitors = running.len(),
            started, "monitors assigned by the controller"
        );
    }
    for (_, (_, cancel)) in running {
        cancel.cancel();
    }
}

/// Where in its interval a monitor runs: spread by its name, stable across restarts.
fn offset(name: &str, interval: Duration) -> Duration {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let ms = interval.as_millis().max(1) as u64;
    Duration::from_millis(h % ms)
}

async fn monitor(
    spec: MonitorSpec,
    results: mpsc::Sender<MonitorResult>,
    ctx: Arc<checks::CheckContext>,
    limit: Arc<Semaphore>,
    cancel: CancellationToken,
) {
    let interval = Duration::from_millis(spec.interval_ms.into());
    let start = tokio::time::Instant::now() + offset(&spec.name, interval);
    let mut ticks = tokio::time::interval_at(start, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Ok(_permit) = limit.acquire().await else {
            return;
        };
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = checks::run(&ctx, &spec) => r,
        };
        if results.try_send(result).is_err() {
            debug!(monitor = %spec.name, "monitor result dropped: the queue is full");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nebula_protocol::monitors::MonitorCheck;

    fn spec(name: &str, interval_ms: u32, timeout_ms: u32) -> MonitorSpec {
        MonitorSpec {
            name: name.into(),
            check: MonitorCheck::Tcp {
                address: "127.0.0.1:1".into(),
            },
            interval_ms,
            timeout_ms,
        }
    }

    #[test]
    fn a_set_is_bounded_and_deduplicated() {
        let mut many: Vec<_> = (0..MAX_MONITORS_PER_NODE + 5)
            .map(|i| spec(&format!("m{i}"), 1, 999_999))
            .collect();
        many.insert(1, spec("m0", 60_000, 1000));
        let s = sanitize(many);
        assert_eq!(
            s.len(),
            MAX_MONITORS_PER_NODE - 1,
            "cut at the limit, then one per name"
        );
        assert_eq!(
            s[0].interval_ms, MIN_INTERVAL_MS,
            "too short an interval is raised"
        );
        assert_eq!(
            s[0].timeout_ms, MIN_INTERVAL_MS,
            "a timeout never outlasts its interval"
        );
        assert_eq!(s.iter().filter(|m| m.name == "m0").count(), 1);
    }

    #[test]
    fn offsets_spread_within_the_interval() {
        let i = Duration::from_secs(30);
        let offs: std::collections::HashSet<_> =
            (0..100).map(|n| offset(&format!("m{n}"), i)).collect();
        assert!(offs.len() > 90, "offsets differ: {}", offs.len());
        assert!(offs.iter().all(|o| *o < i));
        assert_eq!(offset("a", i), offset("a", i));
    }

    #[tokio::test(start_paused = true)]
    async fn a_monitor_runs_every_interval_and_stops_when_removed() {
        let tracker = tokio_util::task::TaskTracker::new();
        let stop = CancellationToken::new();
        let (tx, mut rx) = spawn(None, &tracker, stop.clone());
        tx.send_replace(vec![spec("closed-port", 5_000, 200)]);
        let mut got = Vec::new();
        for _ in 0..3 {
            let r = rx.recv().await.expect("a result");
            got.push((r, tokio::time::Instant::now()));
        }
        assert!(got.iter().all(|(r, _)| r.name == "closed-port" && !r.up));
        let gap = got[2].1 - got[1].1;
        assert!(
            gap >= Duration::from_millis(4_900) && gap <= Duration::from_millis(5_300),
            "runs 5 s apart: {gap:?}"
        );
        tx.send_replace(Vec::new());
        tokio::time::sleep(Duration::from_millis(10)).await;
        while rx.try_recv().is_ok() {}
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(rx.try_recv().is_err(), "a removed monitor does not run");
        stop.cancel();
    }
}
