//! Health monitors: which checks exist (the map's `monitors:` and services' `monitor: true`,
//! the ones made through the API, and built-ins for the container runtime, Ollama and
//! PostgreSQL where a node has them), which nodes run each (by name, by labels, or where the
//! service runs), and what they report (kept in memory for the status board and rolled up per
//! hour into the store for uptime over 24 hours, 7 and 30 days).
//!
//! Tasks: `monitor-assign` (every replica, every few seconds and at once on a change: works
//! out each node's set, which its session sends when it changed) and `monitor-writer` (every
//! replica, adds the hours counted in memory to the store).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use nebula_desired::map::monitors::{DesiredMonitor, MonitorDecl};
use nebula_protocol::monitors::{
    MonitorResult, MonitorSpec, MAX_ERROR_BYTES, MAX_RESULTS_PER_BATCH, MAX_TIMEOUT_MS,
};
use nebula_store::monitors::HourRollup;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use crate::ControlPlane;

mod builtin;
pub mod ops;

/// `[monitors]` in the controller's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorsConfig {
    /// Built-in monitors: each node's container runtime, Ollama backends, PostgreSQL
    /// containers with a published port.
    pub builtin: bool,
    /// How often each node's set is worked out again (it also is at once on a change).
    #[serde(with = "humantime_serde")]
    pub assign_interval: Duration,
    /// How often the hours counted in memory are added to the store.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
}

impl Default for MonitorsConfig {
    fn default() -> Self {
        MonitorsConfig {
            builtin: true,
            assign_interval: Duration::from_secs(10),
            flush_interval: Duration::from_secs(60),
        }
    }
}

/// Where a monitor comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Map,
    Api,
    BuiltIn,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Map => "map",
            Source::Api => "api",
            Source::BuiltIn => "built-in",
        }
    }
}

/// One monitor and the nodes that run it now.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorDef {
    pub name: String,
    pub source: Source,
    pub monitor: DesiredMonitor,
    pub created_by: Option<String>,
    /// Node names, as assigned at the last pass.
    pub nodes: Vec<String>,
}

/// Each node's monitors, by node id.
pub type Assignments = HashMap<Uuid, Arc<Vec<MonitorSpec>>>;

/// Recent results kept per monitor and node (for charts and the uptime bar).
pub const RECENT: usize = 60;
const HOURS: usize = 25;
const DAYS: usize = 31;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// One check's outcome as kept in memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub at_ms: i64,
    pub up: bool,
    pub latency_us: u64,
}

/// A day's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Day {
    pub day: i64,
    pub checks: i64,
    pub up: i64,
}

/// What one node reported for one monitor.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub last: Option<MonitorResult>,
    /// When it last went up or down.
    pub since_ms: i64,
    pub recent: VecDeque<Point>,
    pub hours: VecDeque<HourRollup>,
    pub days: VecDeque<Day>,
}

impl Stats {
    fn add(&mut self, hour: HourRollup) {
        match self.hours.iter().rposition(|h| h.hour <= hour.hour) {
            Some(i) if self.hours[i].hour == hour.hour => merge(&mut self.hours[i], &hour),
            Some(i) => self.hours.insert(i + 1, hour),
            None => self.hours.push_front(hour),
        }
        while self.hours.len() > HOURS {
            self.hours.pop_front();
        }
        let day = hour.hour * HOUR_MS / DAY_MS;
        let (checks, up) = (hour.checks, hour.up);
        match self.days.iter().rposition(|d| d.day <= day) {
            Some(i) if self.days[i].day == day => {
                self.days[i].checks = self.days[i].checks.saturating_add(checks);
                self.days[i].up = self.days[i].up.saturating_add(up);
            }
            Some(i) => self.days.insert(i + 1, Day { day, checks, up }),
            None => self.days.push_front(Day { day, checks, up }),
        }
        while self.days.len() > DAYS {
            self.days.pop_front();
        }
    }

    /// Percent of checks up over the last `hours` hours (`None`: no checks), in whole buckets:
    /// up to 24 hours, the current hour and the ones before it (24 in all); beyond, the
    /// current day (UTC) and the days before it (7 or 30 in all).
    pub fn uptime(&self, now_ms: i64, hours: i64) -> Option<f64> {
        let (checks, up) = if hours <= 24 {
            let from = now_ms / HOUR_MS - hours + 1;
            self.hours
                .iter()
                .filter(|h| h.hour >= from)
                .fold((0, 0), |(c, u), h| (c + h.checks, u + h.up))
        } else {
            let from = now_ms / DAY_MS - hours / 24 + 1;
            self.days
                .iter()
                .filter(|d| d.day >= from)
                .fold((0, 0), |(c, u), d| (c + d.checks, u + d.up))
        };
        (checks > 0).then(|| up as f64 * 100.0 / checks as f64)
    }
}

fn merge(into: &mut HourRollup, h: &HourRollup) {
    into.checks = into.checks.saturating_add(h.checks);
    into.up = into.up.saturating_add(h.up);
    into.latency_sum_us = into.latency_sum_us.saturating_add(h.latency_sum_us);
    into.latency_max_us = into.latency_max_us.max(h.latency_max_us);
}

fn hour_of(r: &MonitorResult) -> HourRollup {
    let lat = i64::try_from(r.latency_us).unwrap_or(i64::MAX);
    HourRollup {
        hour: r.at_ms.div_euclid(HOUR_MS),
        checks: 1,
        up: i64::from(r.up),
        latency_sum_us: lat,
        latency_max_us: lat,
    }
}

type Key = (String, String);

/// Monitors in the control plane.
#[derive(Debug)]
pub struct MonitorBook {
    defs: RwLock<Arc<BTreeMap<String, MonitorDef>>>,
    /// The monitors made through the API, as stored (loaded at start, kept on change).
    pub(crate) api: RwLock<Arc<Vec<nebula_store::monitors::MonitorRecord>>>,
    assignments: watch::Sender<Arc<Assignments>>,
    stats: Mutex<HashMap<Key, Stats>>,
    /// Hours counted since the last write to the store.
    pending: Mutex<HashMap<(String, String, i64), HourRollup>>,
    /// Work the sets out again now.
    pub(crate) assign_now: crate::tasks::Activator,
    /// The port each built-in PostgreSQL monitor checks, as last published.
    builtin_ports: Mutex<HashMap<String, u16>>,
}

impl Default for MonitorBook {
    fn default() -> Self {
        MonitorBook {
            defs: RwLock::default(),
            api: RwLock::default(),
            assignments: watch::channel(Arc::new(Assignments::new())).0,
            stats: Mutex::default(),
            pending: Mutex::default(),
            assign_now: crate::tasks::Activator::default(),
            builtin_ports: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MonitorBook {
    /// Every monitor, by name.
    pub fn defs(&self) -> Arc<BTreeMap<String, MonitorDef>> {
        self.defs.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The port a built-in monitor checks: the one published now (remembered), else the one
    /// published last.
    pub(crate) fn builtin_port(&self, name: &str, published: Option<u16>) -> Option<u16> {
        let mut ports = lock(&self.builtin_ports);
        match published {
            Some(p) => {
                ports.insert(name.to_owned(), p);
                Some(p)
            }
            None => ports.get(name).copied(),
        }
    }

    /// Sessions watch this for their node's set.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Assignments>> {
        self.assignments.subscribe()
    }

    /// What a node reported for a monitor.
    pub fn stats(&self, monitor: &str, node: &str) -> Option<Stats> {
        lock(&self.stats)
            .get(&(monitor.to_owned(), node.to_owned()))
            .cloned()
    }

    /// Every (monitor, node) with its last result, for the alert rules.
    pub fn latest(&self) -> Vec<(String, String, MonitorResult)> {
        lock(&self.stats)
            .iter()
            .filter_map(|((m, n), s)| Some((m.clone(), n.clone(), s.last.clone()?)))
            .collect()
    }

    /// Results from a node: only for monitors assigned to it, and only what a real run can
    /// report (a latency within the longest timeout, a plausible certificate expiry, `icmp` or
    /// `tcp` as a ping's method, an error cut to its limit); results more than a day old are
    /// dropped (a queue kept through a long disconnect), times ahead of the controller's clock
    /// taken as now, and an older result never replaces a newer one as the last. Returns the
    /// (monitor, up) pairs that changed state.
    pub fn ingest(
        &self,
        node_id: Uuid,
        node: &str,
        mut batch: Vec<MonitorResult>,
        now_ms: i64,
    ) -> Vec<(String, bool)> {
        batch.truncate(MAX_RESULTS_PER_BATCH);
        let assigned = self.assignments.borrow().get(&node_id).cloned();
        let Some(assigned) = assigned else {
            return Vec::new();
        };
        let mut changed = Vec::new();
        let mut stats = lock(&self.stats);
        let mut pending = lock(&self.pending);
        for mut r in batch {
            if !assigned.iter().any(|s| s.name == r.name) {
                continue;
            }
            if r.at_ms < now_ms.saturating_sub(DAY_MS) {
                continue;
            }
            r.at_ms = r.at_ms.min(now_ms);
            r.latency_us = r.latency_us.min(u64::from(MAX_TIMEOUT_MS) * 1000);
            r.cert_expires_ms = r
                .cert_expires_ms
                .filter(|e| (0..=now_ms.saturating_add(100 * 365 * DAY_MS)).contains(e));
            r.method = r.method.filter(|m| m == "icmp" || m == "tcp");
            if let Some(e) = r.error.as_mut().filter(|e| e.len() > MAX_ERROR_BYTES) {
                let mut cut = MAX_ERROR_BYTES;
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.truncate(cut);
            }
            let key = (r.name.clone(), node.to_owned());
            let s = stats.entry(key).or_default();
            let newest = s.last.as_ref().is_none_or(|l| l.at_ms <= r.at_ms);
            let flipped = newest && s.last.as_ref().is_none_or(|l| l.up != r.up);
            if flipped {
                s.since_ms = r.at_ms;
                changed.push((r.name.clone(), r.up));
            }
            let hour = hour_of(&r);
            s.add(hour);
            let p = pending
                .entry((r.name.clone(), node.to_owned(), hour.hour))
                .or_insert(HourRollup {
                    hour: hour.hour,
                    ..HourRollup::default()
                });
            merge(p, &hour);
            s.recent.push_back(Point {
                at_ms: r.at_ms,
                up: r.up,
                latency_us: r.latency_us,
            });
            while s.recent.len() > RECENT {
                s.recent.pop_front();
            }
            if newest {
                s.last = Some(r);
            }
        }
        changed
    }

    /// The hours counted since the last call.
    pub(crate) fn take_pending(&self) -> Vec<(String, String, HourRollup)> {
        lock(&self.pending)
            .drain()
            .map(|((m, n, _), h)| (m, n, h))
            .collect()
    }

    /// Hours that could not be written go back, to be written with the next ones.
    pub(crate) fn requeue(&self, rows: Vec<(String, String, HourRollup)>) {
        let mut pending = lock(&self.pending);
        for (m, n, h) in rows {
            let p = pending.entry((m, n, h.hour)).or_insert(HourRollup {
                hour: h.hour,
                ..HourRollup::default()
            });
            merge(p, &h);
        }
    }

    /// The stored hours of the last 30 days, at start and when a replica takes over: they
    /// replace the hours and days it had (the leader before it wrote the hours since); the
    /// latest results stay.
    pub(crate) fn load(&self, rows: Vec<(String, String, HourRollup)>) {
        let mut stats = lock(&self.stats);
        for s in stats.values_mut() {
            s.hours.clear();
            s.days.clear();
        }
        for (m, n, h) in rows {
            stats.entry((m, n)).or_default().add(h);
        }
    }

    /// Publish a new set of monitors and assignments; true when a node's set changed.
    fn publish(&self, defs: BTreeMap<String, MonitorDef>, next: Assignments) -> bool {
        // Results stay in memory when a monitor leaves the set (a built-in whose node has not
        // reported yet after a restart comes back with its history); lists and rules read
        // only the monitors defined now.
        *self.defs.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(defs);
        self.assignments.send_if_modified(|cur| {
            if **cur == next {
                false
            } else {
                *cur = Arc::new(next);
                true
            }
        })
    }
}

/// Work out every monitor and each node's set; publish when something changed.
pub async fn assign(cp: &ControlPlane) -> anyhow::Result<serde_json::Value> {
    let nodes = cp.store.list_nodes().await?;
    let active = cp.desired.active();
    let mut defs = BTreeMap::new();
    if let Some(a) = &active {
        for (name, m) in &a.desired.monitors {
            defs.insert(name.clone(), (Source::Map, m.clone(), None));
        }
    }
    // Read again each pass: with several controllers, another one may have changed them.
    let api = Arc::new(cp.store.monitors().await?);
    *cp.monitors.api.write().unwrap_or_else(|p| p.into_inner()) = api.clone();
    for rec in api.iter() {
        if defs.contains_key(&rec.name) {
            continue; // the map's own wins
        }
        match serde_json::from_str::<MonitorDecl>(&rec.spec)
            .map_err(|e| e.to_string())
            .and_then(|d| nebula_desired::map::monitors::monitor(&d, &|_| true))
        {
            Ok(m) => {
                defs.insert(
                    rec.name.clone(),
                    (Source::Api, m, Some(rec.created_by.clone())),
                );
            }
            Err(e) => tracing::warn!(monitor = %rec.name, "stored monitor skipped: {e}"),
        }
    }
    if cp.config.monitors.builtin {
        for (name, m) in builtin::monitors(cp, &nodes) {
            defs.entry(name).or_insert((Source::BuiltIn, m, None));
        }
    }
    // Which nodes run what.
    let extra = |n: &str| {
        active
            .as_ref()
            .and_then(|a| a.desired.nodes.as_ref()?.get(n).cloned())
            .unwrap_or_default()
    };
    let running = builtin::service_nodes(cp, &nodes);
    let mut next: HashMap<Uuid, Vec<MonitorSpec>> = HashMap::new();
    let mut out = BTreeMap::new();
    for (name, (source, m, created_by)) in defs {
        let mut on = Vec::new();
        for n in &nodes {
            let picked = if let Some(svc) = &m.service {
                running.get(svc).is_some_and(|s| s.contains(&n.id))
            } else if !m.nodes.is_empty() {
                m.nodes.contains(&n.name)
            } else {
                let mut labels = n.labels.clone();
                labels.extend(extra(&n.name));
                nebula_placement::labels_match(&labels, &m.labels)
            };
            if picked {
                on.push(n.name.clone());
                let specs = next.entry(n.id).or_default();
                if specs.len() < nebula_protocol::monitors::MAX_MONITORS_PER_NODE {
                    specs.push(MonitorSpec {
                        name: name.clone(),
                        check: m.check.clone(),
                        interval_ms: u32::try_from(m.interval.as_millis()).unwrap_or(u32::MAX),
                        timeout_ms: u32::try_from(m.timeout.as_millis()).unwrap_or(u32::MAX),
                    });
                }
            }
        }
        out.insert(
            name.clone(),
            MonitorDef {
                name,
                source,
                monitor: m,
                created_by,
                nodes: on,
            },
        );
    }
    let total = out.len();
    let assignments: Assignments = next.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
    let nodes_with = assignments.len();
    let changed = cp.monitors.publish(out, assignments);
    Ok(serde_json::json!({ "monitors": total, "nodes": nodes_with, "changed": changed }))
}

/// Add the hours counted in memory to the store; a failed batch is counted again.
pub async fn flush(cp: &ControlPlane) -> anyhow::Result<serde_json::Value> {
    let rows = cp.monitors.take_pending();
    if rows.is_empty() {
        return Ok(serde_json::json!({ "rows": 0 }));
    }
    let n = rows.len();
    if let Err(e) = cp.store.add_monitor_hours(&rows).await {
        cp.monitors.requeue(rows);
        return Err(anyhow::Error::from(e).context("writing monitor hours (will retry)"));
    }
    Ok(serde_json::json!({ "rows": n }))
}

/// Load what the store holds (API monitors, the last 30 days of hours), at start.
pub async fn load(cp: &ControlPlane) -> anyhow::Result<()> {
    let recs = cp.store.monitors().await?;
    *cp.monitors.api.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(recs);
    let now_hour = nebula_protocol::time::UnixMillis::now().as_i64() / HOUR_MS;
    let rows = cp.store.monitor_hours(now_hour - 24 * 31).await?;
    cp.monitors.load(rows);
    Ok(())
}

/// Hours older than this many days are deleted by the retention sweep.
pub const KEEP_DAYS: i64 = 31;

#[cfg(test)]
mod tests {
    use super::*;

    fn result(at_ms: i64, up: bool, latency_us: u64) -> MonitorResult {
        MonitorResult {
            name: "m".into(),
            at_ms,
            up,
            latency_us,
            status: None,
            cert_expires_ms: None,
            method: None,
            error: None,
        }
    }

    #[test]
    fn results_are_taken_only_as_a_real_run_could_report_them() {
        let book = MonitorBook::default();
        let node = Uuid::now_v7();
        let spec = MonitorSpec {
            name: "m".into(),
            check: nebula_protocol::monitors::MonitorCheck::Docker,
            interval_ms: 30_000,
            timeout_ms: 5_000,
        };
        book.publish(
            BTreeMap::new(),
            HashMap::from([(node, Arc::new(vec![spec]))]),
        );
        let now = 100 * DAY_MS;
        let mut wild = result(now + 3_600_000, false, u64::MAX);
        wild.cert_expires_ms = Some(i64::MAX);
        wild.method = Some("x".repeat(10_000));
        let mut other = result(now, true, 10);
        other.name = "not-assigned".into();
        let changed = book.ingest(
            node,
            "n",
            vec![wild, other, result(now - 2 * DAY_MS, true, 10)],
            now,
        );
        assert_eq!(changed, vec![("m".to_owned(), false)]);
        let s = book.stats("m", "n").unwrap();
        let last = s.last.as_ref().unwrap();
        assert_eq!(last.at_ms, now, "a time ahead is taken as now");
        assert_eq!(last.latency_us, u64::from(MAX_TIMEOUT_MS) * 1000);
        assert_eq!((last.cert_expires_ms, last.method.as_deref()), (None, None));
        assert_eq!(s.recent.len(), 1, "the day-old one is dropped");
        assert!(book.stats("not-assigned", "n").is_none());
        // An older result arriving late does not become the last.
        book.ingest(node, "n", vec![result(now - 60_000, true, 10)], now);
        let s = book.stats("m", "n").unwrap();
        assert!(!s.last.unwrap().up);
        assert_eq!(
            book.take_pending()
                .iter()
                .map(|(_, _, h)| h.checks)
                .sum::<i64>(),
            2
        );
        // A take-over loads the stored hours again: they replace the hours (never counted
        // twice), and the latest result stays.
        let stored = HourRollup {
            hour: now / HOUR_MS,
            checks: 5,
            up: 4,
            latency_sum_us: 50,
            latency_max_us: 10,
        };
        for _ in 0..2 {
            book.load(vec![("m".into(), "n".into(), stored)]);
        }
        let s = book.stats("m", "n").unwrap();
        assert_eq!(s.hours.iter().map(|h| h.checks).sum::<i64>(), 5);
        assert_eq!(s.days.iter().map(|d| d.checks).sum::<i64>(), 5);
        assert!(!s.last.unwrap().up, "the latest result stays");
    }

    #[test]
    fn uptime_over_hours_and_days() {
        let mut s = Stats::default();
        let now = 100 * DAY_MS + 5 * HOUR_MS;
        // Yesterday: all down; the last two hours: three up of four.
        for i in 0..4 {
            s.add(hour_of(&result(now - DAY_MS - i * 1000, false, 10)));
        }
        for (i, up) in [true, true, false, true].into_iter().enumerate() {
            s.add(hour_of(&result(now - (i as i64) * 40 * 60_000, up, 10)));
        }
        assert_eq!(s.uptime(now, 24), Some(75.0));
        assert_eq!(s.uptime(now, 7 * 24), Some(37.5));
        assert_eq!(
            s.uptime(now + 40 * DAY_MS, 30 * 24),
            None,
            "nothing in range"
        );
        let h = s.hours.iter().find(|h| h.hour == now / HOUR_MS).unwrap();
        assert_eq!((h.checks, h.up), (1, 1));
    }
}
