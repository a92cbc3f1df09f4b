//! Alerting in the control plane: the built-in rules read what the controller observes (nodes,
//! containers, telemetry), the pure engine (`nebula-alerts`) decides what fires and when to
//! tell, and every notification is written to the outbox with the engine's new state in one
//! transaction before a sender delivers it (`sinks`).
//!
//! Tasks: `alert-evaluator` (leader, every `alerts.evaluate_interval`) and `alert-sender`
//! (leader, every second and when the evaluator queued something).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nebula_alerts::{EngineState, Labels, Notification, Rule, Silence};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ControlPlane;

mod figures;
mod observe;
mod ops;
pub mod rules;
pub use nebula_types::api::alerts::CreateSilence;
pub mod sinks;

/// `[alerts]` in the controller's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// How often the rules are evaluated.
    #[serde(with = "humantime_serde")]
    pub evaluate_interval: Duration,
    /// A new group waits this long before its first notification.
    #[serde(with = "humantime_serde")]
    pub group_wait: Duration,
    /// A group's changes go out at most this often.
    #[serde(with = "humantime_serde")]
    pub group_interval: Duration,
    /// A group still firing is notified again this often.
    #[serde(with = "humantime_serde")]
    pub repeat_interval: Duration,
    /// A node offline this long is unreachable.
    #[serde(with = "humantime_serde")]
    pub node_unreachable_for: Duration,
    /// A managed container not running this long is down.
    #[serde(with = "humantime_serde")]
    pub container_down_for: Duration,
    /// CPU and memory thresholds (percent), averaged over `resource_window` with at least
    /// `resource_min_samples` samples, held for `resource_for`.
    pub cpu_percent: f64,
    pub memory_percent: f64,
    #[serde(with = "humantime_serde")]
    pub resource_window: Duration,
    pub resource_min_samples: usize,
    #[serde(with = "humantime_serde")]
    pub resource_for: Duration,
    /// A firing alert stays firing this long after its condition stops.
    #[serde(with = "humantime_serde")]
    pub keep_firing_for: Duration,
    /// A service deploying, pending, waiting or refused this long has not converged.
    #[serde(with = "humantime_serde")]
    pub service_for: Duration,
    /// A node certificate that expires within this is about to.
    #[serde(with = "humantime_serde")]
    pub certificate_warning: Duration,
    /// Disk (fullest filesystem, percent), load (1-minute average per CPU core), hottest GPU
    /// (°C) and GPU memory (percent) thresholds, with the CPU and memory timing.
    pub disk_percent: f64,
    pub load_per_core: f64,
    pub gpu_temperature_c: f64,
    pub vram_percent: f64,
    /// A monitor down this long on a node fires.
    #[serde(with = "humantime_serde")]
    pub monitor_down_for: Duration,
    /// A monitored HTTPS certificate that expires within this is about to.
    #[serde(with = "humantime_serde")]
    pub monitor_certificate_warning: Duration,
    /// An inference backend unhealthy (or a model's breaker open) this long fires.
    #[serde(with = "humantime_serde")]
    pub ai_unavailable_for: Duration,
    /// An agent on another version than the controller this long is reported.
    #[serde(with = "humantime_serde")]
    pub agent_outdated_for: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            evaluate_interval: Duration::from_secs(15),
            group_wait: Duration::from_secs(30),
            group_interval: Duration::from_secs(300),
            repeat_interval: Duration::from_secs(4 * 3600),
            node_unreachable_for: Duration::from_secs(60),
            container_down_for: Duration::from_secs(30),
            cpu_percent: 90.0,
            memory_percent: 90.0,
            resource_window: Duration::from_secs(300),
            resource_min_samples: 3,
            resource_for: Duration::from_secs(300),
            keep_firing_for: Duration::from_secs(60),
            service_for: Duration::from_secs(600),
            certificate_warning: Duration::from_secs(7 * 86_400),
            disk_percent: 90.0,
            load_per_core: 2.0,
            gpu_temperature_c: 85.0,
            vram_percent: 95.0,
            monitor_down_for: Duration::from_secs(60),
            monitor_certificate_warning: Duration::from_secs(14 * 86_400),
            ai_unavailable_for: Duration::from_secs(120),
            agent_outdated_for: Duration::from_secs(3600),
        }
    }
}

/// Agents built from another version than this controller are behind (or ahead).
const CONTROLLER_VERSION: &str = env!("CARGO_PKG_VERSION");

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The engine's state in memory (loaded from the store at the first evaluation).
#[derive(Debug, Default)]
pub struct AlertBook {
    state: std::sync::Mutex<Option<EngineState>>,
    /// The state as last stored, so that an evaluation that changed nothing writes nothing.
    stored: std::sync::Mutex<String>,
    /// Wakes the sender when the evaluator queued notifications.
    pub(crate) send_now: crate::tasks::Activator,
    /// Sink kinds served by other parts of the controller, by kind.
    channels: std::sync::RwLock<std::collections::HashMap<String, Arc<dyn sinks::Channel>>>,
}

impl std::fmt::Debug for dyn sinks::Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Channel")
    }
}

impl AlertBook {
    /// Forget the state in memory: the next evaluation reads it from the store (a replica
    /// taking over, after another leader changed it).
    pub(crate) fn forget(&self) {
        *self.lock() = None;
        self.stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<EngineState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serve sinks of `kind` (a kind not built in) with `channel`.
    pub fn register_channel(&self, kind: &str, channel: Arc<dyn sinks::Channel>) {
        self.channels
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(kind.to_owned(), channel);
    }

    pub(crate) fn channel(&self, kind: &str) -> Option<Arc<dyn sinks::Channel>> {
        self.channels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kind)
            .cloned()
    }

    pub(crate) fn has_channel(&self, kind: &str) -> bool {
        self.channel(kind).is_some()
    }

    /// The alerts as they are now (pending and firing, and resolutions not yet sent).
    pub fn current(&self) -> Vec<nebula_alerts::Alert> {
        self.lock()
            .as_ref()
            .map(|s| s.alerts.values().cloned().collect())
            .unwrap_or_default()
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The silences in force, as the engine reads them.
pub(crate) fn engine_silences(records: &[crate::store::alerts::SilenceRecord]) -> Vec<Silence> {
    records
        .iter()
        .map(|r| Silence {
            id: r.id.clone(),
            matchers: serde_json::from_str(&r.matchers).unwrap_or_default(),
            starts_at: r.starts_at,
            ends_at: r.ends_at,
            created_by: r.created_by.clone(),
            comment: r.comment.clone(),
        })
        .collect()
}

/// One step of the engine: every rule takes what was seen (instances of nodes out of view
/// stay as they were), then what is due is flushed.
pub(crate) fn step(
    state: &mut EngineState,
    rules: &BTreeMap<String, Rule>,
    seen: &observe::Seen,
    silences: &[Silence],
    now: i64,
) -> Vec<Notification> {
    // Alerts of a rule that is gone (removed from the map) resolve: the rule is kept for this
    // step with no observations, so its alerts go inactive and their resolution is sent.
    let mut retired = BTreeMap::new();
    for a in state.alerts.values() {
        if !rules.contains_key(&a.rule) && !retired.contains_key(&a.rule) {
            retired.insert(
                a.rule.clone(),
                Rule {
                    name: a.rule.clone(),
                    severity: a.severity,
                    timing: nebula_alerts::RuleTiming {
                        for_ms: 0,
                        keep_firing_for_ms: 0,
                        group_wait_ms: 0,
                        group_interval_ms: 0,
                        repeat_interval_ms: i64::MAX / 4,
                    },
                    group_by: vec!["node".into()],
                    inhibits_by: Vec::new(),
                },
            );
        }
    }
    let gone: std::collections::BTreeSet<String> = retired.keys().cloned().collect();
    let all: std::borrow::Cow<'_, BTreeMap<String, Rule>> = if retired.is_empty() {
        std::borrow::Cow::Borrowed(rules)
    } else {
        let mut r = rules.clone();
        r.extend(retired);
        std::borrow::Cow::Owned(r)
    };
    let rules = all.as_ref();
    for rule in rules.values() {
        let obs = seen
            .by_rule
            .get(&rule.name)
            .filter(|_| !gone.contains(&rule.name))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let view = seen
            .views
            .get(&rule.name)
            .filter(|_| !gone.contains(&rule.name));
        state.observe_where(rule, obs, now, |labels| {
            view.is_none_or(|v| labels.get("node").is_some_and(|n| v.contains(n)))
        });
    }
    state.flush(rules, silences, now)
}

/// One evaluation: observe, step the engine, flush, and store the new state with the
/// notifications for every sink that takes them (one transaction). On a failed write the
/// state stays as it was, so the next evaluation produces the same notifications again.
pub async fn evaluate(cp: &Arc<ControlPlane>) -> anyhow::Result<serde_json::Value> {
    let cfg = &cp.config.alerts;
    let own = cp
        .desired
        .active()
        .map(|a| a.desired.alert_rules.clone())
        .unwrap_or_default();
    let catalogue = rules::catalogue(cfg, &own);
    let now = nebula_protocol::time::UnixMillis::now().as_i64();
    let mut state = {
        let loaded = cp.alerts.lock().clone();
        match loaded {
            Some(s) => s,
            None => match cp.store.alert_engine().await? {
                Some(json) => serde_json::from_str(&json).unwrap_or_default(),
                None => EngineState::default(),
            },
        }
    };
    let seen = observe::Seen::gather(cp, cfg, &catalogue.thresholds).await?;
    let silences = engine_silences(&cp.store.silences(now).await?);
    let notes = step(&mut state, &catalogue.rules, &seen, &silences, now);
    let sinks = cp.store.sinks().await?;
    let mut outbox = Vec::new();
    for note in &notes {
        for sink in &sinks {
            if let Some(payload) = sinks::payload_for(sink, note) {
                outbox.push(crate::store::alerts::OutboxRecord {
                    id: format!("msg_{}", Uuid::now_v7().simple()),
                    sink: sink.name.clone(),
                    payload,
                    state: "pending".into(),
                    attempts: 0,
                    next_at: now,
                    last_error: None,
                    created_at: now,
                    sent_at: None,
                });
            }
        }
    }
    let json = serde_json::to_string(&state)?;
    let unchanged =
        outbox.is_empty() && *cp.alerts.stored.lock().unwrap_or_else(|p| p.into_inner()) == json;
    if !unchanged {
        let fence = cp.ha.fence()?;
        cp.store
            .save_alert_step(fence.as_ref(), &json, &outbox, now)
            .await?;
        *cp.alerts.stored.lock().unwrap_or_else(|p| p.into_inner()) = json;
    }
    let (firing, pending) = state
        .alerts
        .values()
        .fold((0, 0), |(f, p), a| match a.state {
            nebula_alerts::AlertState::Firing => (f + 1, p),
            nebula_alerts::AlertState::Pending => (f, p + 1),
            nebula_alerts::AlertState::Resolved => (f, p),
        });
    *cp.alerts.lock() = Some(state);
    if !outbox.is_empty() {
        cp.alerts.send_now.activate();
    }
    Ok(serde_json::json!({
        "observations": seen.by_rule.values().map(Vec::len).sum::<usize>(),
        "firing": firing,
        "pending": pending,
        "notifications": notes.len(),
        "queued": outbox.len(),
    }))
}

#[cfg(test)]
mod paused_tests;
