//! How alerts behave, as a pure state machine: the controller feeds it what each rule sees at
//! each evaluation and the time, and it answers with the notifications to send. No clock, no
//! I/O: the whole state is a serde value the controller stores after every step, so a restart
//! neither repeats a notification nor loses a resolution.
//!
//! Semantics follow Prometheus and Alertmanager, which set what people expect:
//!
//! * **Instances.** A rule yields one instance per label set (`node`, `container`, ...). An
//!   instance whose condition holds is *pending*; after it has held for the rule's `for` it is
//!   *firing*; when the condition stops holding it stays firing for `keep_firing_for` (so a
//!   flapping signal does not storm), then it is *resolved*. A pending instance whose condition
//!   stops is dropped without a word.
//! * **Groups.** Instances are grouped by rule and node (by default). A new group waits
//!   `group_wait` before its first notification (so that alerts that start together go
//!   together); after that, changes go out at most every `group_interval`; a group still firing
//!   with nothing new is notified again every `repeat_interval`. A resolution is sent once.
//! * **Inhibition.** A firing instance of an inhibiting rule (node unreachable) mutes the other
//!   instances of the same node: their state is kept, nothing is sent for them.
//! * **Silences.** Matchers on labels with a start and an end; silenced instances are kept and
//!   not sent. When a silence ends, a still-firing instance is sent at the next flush.
//!
//! Times are Unix milliseconds.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub type Labels = BTreeMap<String, String>;

/// How one rule behaves in time, and how its alerts are routed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleTiming {
    /// The condition must hold this long before the alert fires.
    pub for_ms: i64,
    /// A firing alert stays firing this long after its condition stops.
    pub keep_firing_for_ms: i64,
    pub group_wait_ms: i64,
    pub group_interval_ms: i64,
    pub repeat_interval_ms: i64,
}

impl Default for RuleTiming {
    fn default() -> Self {
        RuleTiming {
            for_ms: 0,
            keep_firing_for_ms: 0,
            group_wait_ms: 30_000,
            group_interval_ms: 5 * 60_000,
            repeat_interval_ms: 4 * 3_600_000,
        }
    }
}

/// A rule as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    pub severity: Severity,
    pub timing: RuleTiming,
    /// Labels that name a group (default `node`): instances of this rule with the same values
    /// are notified together.
    pub group_by: Vec<String>,
    /// A firing instance mutes the other alerts that share these labels' values (`node` for
    /// "node unreachable"); empty: inhibits nothing.
    pub inhibits_by: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// What a rule sees for one instance at one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub labels: Labels,
    /// The condition holds.
    pub active: bool,
    /// The figure behind it (for the message), e.g. 93.5 (% CPU).
    pub value: Option<f64>,
    /// Words for people: "CPU 93% over 5m (threshold 90%)".
    pub summary: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Pending,
    Firing,
    Resolved,
}

/// One alert instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub rule: String,
    pub severity: Severity,
    pub labels: Labels,
    pub state: AlertState,
    pub summary: String,
    pub value: Option<f64>,
    /// When the condition started holding (this time).
    pub active_since: i64,
    pub fired_at: Option<i64>,
    /// When the condition last held.
    pub last_active: i64,
    pub resolved_at: Option<i64>,
    /// Acknowledged by someone: still shown, not repeated.
    pub acknowledged_by: Option<String>,
}

impl Alert {
    /// `rule{k=v,...}`: the instance's identity.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.rule, &self.labels)
    }
}

pub fn fingerprint(rule: &str, labels: &Labels) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{rule}{{{}}}", inner.join(","))
}

/// A silence: alerts whose labels (and `alertname`, the rule) match every matcher are not sent
/// between `starts_at` and `ends_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Silence {
    pub id: String,
    pub matchers: Vec<Matcher>,
    pub starts_at: i64,
    pub ends_at: i64,
    pub created_by: String,
    pub comment: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Matcher {
    pub label: String,
    pub value: String,
    /// `!=` instead of `=`.
    #[serde(default)]
    pub negate: bool,
}

impl Matcher {
    /// `node=gpu-box`, `alertname!=deploy_failed`.
    pub fn parse(s: &str) -> Result<Matcher, String> {
        let (label, value, negate) = if let Some((l, v)) = s.split_once("!=") {
            (l, v, true)
        } else if let Some((l, v)) = s.split_once('=') {
            (l, v, false)
        } else {
            return Err(format!(
                "a matcher reads label=value or label!=value, not `{s}`"
            ));
        };
        let label = label.trim();
        if label.is_empty()
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            return Err(format!("`{label}` is not a label name"));
        }
        Ok(Matcher {
            label: label.to_owned(),
            value: value.trim().to_owned(),
            negate,
        })
    }

    fn matches(&self, rule: &str, labels: &Labels) -> bool {
        let got = if self.label == "alertname" {
            Some(rule)
        } else {
            labels.get(&self.label).map(String::as_str)
        };
        (got == Some(self.value.as_str())) != self.negate
    }
}

impl Silence {
    pub fn active_at(&self, now: i64) -> bool {
        self.starts_at <= now && now < self.ends_at
    }

    pub fn silences(&self, rule: &str, labels: &Labels) -> bool {
        !self.matchers.is_empty() && self.matchers.iter().all(|m| m.matches(rule, labels))
    }
}

/// A group's routing state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub created_at: i64,
    /// When the group was last notified (`None`: never).
    pub last_flush: Option<i64>,
    /// The fingerprints and states last sent, to tell a change from a repeat.
    pub last_sent: BTreeMap<String, AlertState>,
}

/// Everything the engine remembers; stored by the controller after each step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineState {
    /// By fingerprint.
    pub alerts: BTreeMap<String, Alert>,
    /// By group key.
    pub groups: BTreeMap<String, Group>,
}

/// One message for the sinks: a group's alerts as they are now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub group: String,
    /// `firing` while any alert in it fires, else `resolved`.
    pub status: AlertState,
    pub alerts: Vec<Alert>,
    /// Why now: a new or changed group, or a repeat.
    pub repeat: bool,
    pub at: i64,
}

impl EngineState {
    /// Take one rule's observations at `now` (every instance it sees; one it no longer lists
    /// counts as inactive). Returns nothing: notifications come from [`EngineState::flush`].
    pub fn observe(&mut self, rule: &Rule, seen: &[Observation], now: i64) {
        self.observe_where(rule, seen, now, |_| true);
    }

    /// [`EngineState::observe`] where only part of the world could be looked at: an instance
    /// that is not listed counts as inactive only when `observed` says its labels were in view
    /// (a node whose figures are not in yet, after a restart or while it is offline, leaves its
    /// alerts as they were rather than resolving them).
    pub fn observe_where(
        &mut self,
        rule: &Rule,
        seen: &[Observation],
        now: i64,
        observed: impl Fn(&Labels) -> bool,
    ) {
        let mut listed = BTreeSet::new();
        for o in seen {
            let fp = fingerprint(&rule.name, &o.labels);
            listed.insert(fp.clone());
            self.step(rule, &fp, Some(o), now);
        }
        let gone: Vec<String> = self
            .alerts
            .iter()
            .filter(|(fp, a)| a.rule == rule.name && !listed.contains(*fp) && observed(&a.labels))
            .map(|(fp, _)| fp.clone())
            .collect();
        for fp in gone {
            self.step(rule, &fp, None, now);
        }
    }

    fn step(&mut self, rule: &Rule, fp: &str, o: Option<&Observation>, now: i64) {
        let active = o.is_some_and(|o| o.active);
        match (self.alerts.get_mut(fp), active) {
            (None, false) => {}
            (None, true) => {
                let o = o.expect("active implies observed");
                let mut a = Alert {
                    rule: rule.name.clone(),
                    severity: rule.severity,
                    labels: o.labels.clone(),
                    state: AlertState::Pending,
                    summary: o.summary.clone(),
                    value: o.value,
                    active_since: now,
                    fired_at: None,
                    last_active: now,
                    resolved_at: None,
                    acknowledged_by: None,
                };
                if rule.timing.for_ms <= 0 {
                    a.state = AlertState::Firing;
                    a.fired_at = Some(now);
                }
                self.alerts.insert(fp.to_owned(), a);
            }
            (Some(a), true) => {
                let o = o.expect("active implies observed");
                a.summary = o.summary.clone();
                a.value = o.value;
                a.last_active = now;
                match a.state {
                    AlertState::Pending if now - a.active_since >= rule.timing.for_ms => {
                        a.state = AlertState::Firing;
                        a.fired_at = Some(now);
                    }
                    AlertState::Resolved => {
                        // It came back: a new episode.
                        a.state = if rule.timing.for_ms <= 0 {
                            AlertState::Firing
                        } else {
                            AlertState::Pending
                        };
                        a.active_since = now;
                        a.fired_at = (a.state == AlertState::Firing).then_some(now);
                        a.resolved_at = None;
                        a.acknowledged_by = None;
                    }
                    _ => {}
                }
            }
            (Some(a), false) => match a.state {
                AlertState::Pending => {
                    self.alerts.remove(fp);
                }
                AlertState::Firing if now - a.last_active >= rule.timing.keep_firing_for_ms => {
                    a.state = AlertState::Resolved;
                    a.resolved_at = Some(now);
                    if let Some(o) = o {
                        a.summary = o.summary.clone();
                        a.value = o.value;
                    }
                }
                _ => {}
            },
        }
    }

    /// The group an alert of `rule` belongs to.
    fn group_key(rule: &Rule, labels: &Labels) -> String {
        let by: Vec<String> = rule
            .group_by
            .iter()
            .map(|l| format!("{l}={}", labels.get(l).map(String::as_str).unwrap_or("")))
            .collect();
        format!("{}{{{}}}", rule.name, by.join(","))
    }

    /// True when a firing alert of an inhibiting rule shares the labels it inhibits by.
    fn inhibited(&self, a: &Alert, rules: &BTreeMap<String, Rule>) -> bool {
        self.alerts.values().any(|src| {
            src.state == AlertState::Firing
                && src.rule != a.rule
                && rules.get(&src.rule).is_some_and(|r| {
                    !r.inhibits_by.is_empty()
                        && r.inhibits_by.iter().all(|l| {
                            src.labels.contains_key(l) && src.labels.get(l) == a.labels.get(l)
                        })
                })
        })
    }

    /// The notifications due at `now`, with the groups' routing state updated as sent. Call
    /// after the evaluations of one tick; resolved alerts that have been sent are forgotten.
    pub fn flush(
        &mut self,
        rules: &BTreeMap<String, Rule>,
        silences: &[Silence],
        now: i64,
    ) -> Vec<Notification> {
        // What each group would say now (alerts that are muted are left out).
        let mut members: BTreeMap<String, Vec<Alert>> = BTreeMap::new();
        for a in self.alerts.values() {
            let Some(rule) = rules.get(&a.rule) else {
                continue;
            };
            if a.state == AlertState::Pending {
                continue;
            }
            let muted = silences
                .iter()
                .any(|s| s.active_at(now) && s.silences(&a.rule, &a.labels))
                || self.inhibited(a, rules);
            if muted {
                continue;
            }
            members
                .entry(Self::group_key(rule, &a.labels))
                .or_default()
                .push(a.clone());
        }
        let mut out = Vec::new();
        for (key, alerts) in members {
            let Some(rule) = rules.get(&alerts[0].rule) else {
                continue;
            };
            let t = &rule.timing;
            let group = self.groups.entry(key.clone()).or_insert_with(|| Group {
                created_at: now,
                ..Group::default()
            });
            let current: BTreeMap<String, AlertState> =
                alerts.iter().map(|a| (a.fingerprint(), a.state)).collect();
            // Only what is news: a resolution of something never sent as firing is not.
            let changed = current
                .iter()
                .any(|(fp, st)| match group.last_sent.get(fp) {
                    Some(prev) => prev != st,
                    None => *st == AlertState::Firing,
                });
            let firing = current.values().any(|s| *s == AlertState::Firing);
            let due = match group.last_flush {
                None => changed && now - group.created_at >= t.group_wait_ms,
                Some(last) if changed => now - last >= t.group_interval_ms,
                Some(last) => {
                    firing
                        && alerts.iter().any(|a| a.acknowledged_by.is_none())
                        && now - last >= t.repeat_interval_ms
                }
            };
            if !due {
                continue;
            }
            out.push(Notification {
                group: key.clone(),
                status: if firing {
                    AlertState::Firing
                } else {
                    AlertState::Resolved
                },
                alerts: alerts
                    .iter()
                    .filter(|a| {
                        a.state == AlertState::Firing
                            || group.last_sent.contains_key(&a.fingerprint())
                    })
                    .cloned()
                    .collect(),
                repeat: !changed,
                at: now,
            });
            group.last_flush = Some(now);
            group.last_sent = current
                .into_iter()
                .filter(|(_, st)| *st == AlertState::Firing)
                .collect();
        }
        // Resolved alerts are done once no group still has to send their resolution.
        let sent_or_never: BTreeSet<String> = self
            .groups
            .values()
            .flat_map(|g| g.last_sent.keys().cloned())
            .collect();
        self.alerts
            .retain(|fp, a| a.state != AlertState::Resolved || sent_or_never.contains(fp));
        // Groups live while they have alerts, or owe a resolution.
        let live: BTreeSet<String> = self
            .alerts
            .values()
            .filter_map(|a| rules.get(&a.rule).map(|r| Self::group_key(r, &a.labels)))
            .collect();
        self.groups
            .retain(|k, g| live.contains(k) || !g.last_sent.is_empty());
        out
    }

    /// Mark an alert acknowledged: it is still shown and its resolution still sent, but it is
    /// not repeated.
    pub fn acknowledge(&mut self, fingerprint: &str, by: &str) -> bool {
        match self.alerts.get_mut(fingerprint) {
            Some(a) if a.state == AlertState::Firing => {
                a.acknowledged_by = Some(by.to_owned());
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests;
