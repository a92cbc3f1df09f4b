//! What starts a run besides a person: a schedule (5-field cron in a named time zone), a
//! webhook (GitHub, GitLab or Standard Webhooks signatures), an event of the fleet. Pure: the
//! clock, the secret and the request are passed in.
//!
//! ```yaml
//! on:
//!   schedule:
//!     - { cron: "30 2 * * *", timezone: Europe/Berlin, overlap: skip, catch_up: 1h }
//!   webhook: { scheme: github, secret: github-hook, inputs: { ref: "${{ trigger.body.ref }}" } }
//!   events:
//!     - { on: container-changed, if: "trigger.event.state == 'exited'" }
//! ```

use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use chrono::{TimeZone, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::expr::{self, Scope};

/// A webhook delivery older (or newer) than this is refused (Standard Webhooks' timestamp).
pub const WEBHOOK_TOLERANCE: Duration = Duration::from_secs(300);

/// Everything that starts a workflow on its own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Triggers {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<Schedule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventTrigger>,
}

/// A run at each time a cron expression names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Minute, hour, day of month, month, day of week (`30 2 * * 1-5`).
    pub cron: String,
    /// An IANA zone (`Europe/Berlin`); the times are wall-clock times there.
    #[serde(default = "utc")]
    pub timezone: String,
    /// When the previous scheduled run is still open.
    #[serde(default)]
    pub overlap: Overlap,
    /// A time missed while no controller led (a restart, a failover) still runs once when it
    /// is at most this old (default: none is caught up).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub catch_up: Option<Duration>,
    /// The run's inputs (may read `trigger.time`).
    #[serde(default)]
    #[schemars(with = "std::collections::BTreeMap<String, Json>")]
    pub inputs: serde_json::Map<String, Json>,
}

fn utc() -> String {
    "UTC".into()
}

/// What a scheduled time does while the previous scheduled run is open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Overlap {
    /// This time is skipped.
    #[default]
    Skip,
    /// Both run.
    Allow,
    /// The open run is cancelled.
    Replace,
}

/// A run per signed delivery to `POST /hooks/workflows/NAME`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub scheme: Scheme,
    /// The secret store's entry holding the shared secret.
    pub secret: String,
    /// The run's inputs (may read `trigger.body`, `trigger.headers`).
    #[serde(default)]
    #[schemars(with = "std::collections::BTreeMap<String, Json>")]
    pub inputs: serde_json::Map<String, Json>,
}

/// How a delivery proves it comes from the holder of the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// `X-Hub-Signature-256: sha256=HEX(HMAC-SHA256(secret, body))`; a body delivered again
    /// (same signature) starts nothing.
    Github,
    /// `X-Gitlab-Token: SECRET` (a token, not a signature: use it only over HTTPS);
    /// `X-Gitlab-Event-UUID` drops GitLab's retries.
    Gitlab,
    /// `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,BASE64(HMAC-SHA256(key,
    /// id.timestamp.body))` with a `whsec_` key.
    Standard,
}

/// A run per event of a kind (when its condition holds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventTrigger {
    pub on: EventKind,
    /// Reads `trigger.event` (`trigger.event.name == 'db'`).
    #[serde(default, rename = "if", skip_serializing_if = "Option::is_none")]
    pub cond: Option<String>,
    #[serde(default)]
    #[schemars(with = "std::collections::BTreeMap<String, Json>")]
    pub inputs: serde_json::Map<String, Json>,
}

/// The fleet's events a workflow can start on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    NodeOnline,
    NodeOffline,
    JobFailed,
    DeployFailed,
    ContainerChanged,
    MonitorDown,
    MonitorUp,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::NodeOnline => "node-online",
            EventKind::NodeOffline => "node-offline",
            EventKind::JobFailed => "job-failed",
            EventKind::DeployFailed => "deploy-failed",
            EventKind::ContainerChanged => "container-changed",
            EventKind::MonitorDown => "monitor-down",
            EventKind::MonitorUp => "monitor-up",
        }
    }
}

/// A parsed schedule.
///
/// Times are wall-clock times in the zone, found by cron on the zone's local time; across a
/// change of the clocks they behave as Vixie cron and GitHub do: a time in the hour that does
/// not exist (spring) runs at the first minute after the gap when the minute and hour are fixed
/// (`30 2 * * *`) and is skipped for intervals (`*/15 * * * *`); a time in the hour that happens
/// twice (autumn) runs once when fixed and in both copies for intervals (so an interval never
/// pauses for an hour).
#[derive(Debug, Clone)]
pub struct Timetable {
    cron: croner::Cron,
    tz: chrono_tz::Tz,
    /// Minute and hour are plain numbers (no `*` or `/`).
    fixed: bool,
}

impl Timetable {
    pub fn new(s: &Schedule) -> Result<Timetable, String> {
        let fields: Vec<&str> = s.cron.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "cron `{}` has {} fields; it takes 5 (minute hour day-of-month month day-of-week)",
                s.cron,
                fields.len()
            ));
        }
        let cron =
            croner::Cron::from_str(&s.cron).map_err(|e| format!("cron `{}`: {e}", s.cron))?;
        let tz = chrono_tz::Tz::from_str(&s.timezone).map_err(|_| {
            format!(
                "`{}` is not a time zone (use an IANA name such as Europe/Berlin)",
                s.timezone
            )
        })?;
        let fixed = fields[..2]
            .iter()
            .all(|f| !f.contains('*') && !f.contains('/') && !f.contains('-'));
        Ok(Timetable { cron, tz, fixed })
    }

    /// The instants a wall-clock time of the zone stands for, as this schedule runs them.
    fn instants(&self, wall: chrono::NaiveDateTime) -> Vec<i64> {
        use chrono::LocalResult;
        match self.tz.from_local_datetime(&wall) {
            LocalResult::Single(t) => vec![t.timestamp_millis()],
            LocalResult::Ambiguous(a, b) if self.fixed => {
                let _ = b;
                vec![a.timestamp_millis()]
            }
            LocalResult::Ambiguous(a, b) => vec![a.timestamp_millis(), b.timestamp_millis()],
            LocalResult::None if self.fixed => (1..=180)
                .find_map(|m| {
                    self.tz
                        .from_local_datetime(&(wall + chrono::Duration::minutes(m)))
                        .earliest()
                })
                .map(|t| {
                    // The first minute after the gap, not `wall` pushed by the gap's length.
                    let t = t.timestamp_millis();
                    t - t.rem_euclid(60_000)
                })
                .into_iter()
                .collect(),
            LocalResult::None => Vec::new(),
        }
    }

    /// The first time after `after_ms` (unix ms) it names.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let after = Utc.timestamp_millis_opt(after_ms).single()?;
        let local = |ms: i64| {
            Utc.timestamp_millis_opt(ms)
                .single()
                .map(|t| t.with_timezone(&self.tz).naive_local())
        };
        // Wall times are searched from a little before this one: in a repeated hour, the next
        // instant may have an earlier wall time.
        let mut wall = after.with_timezone(&self.tz).naive_local() - chrono::Duration::hours(3);
        let mut best: Option<i64> = None;
        for _ in 0..100_000 {
            let floating = Utc.from_utc_datetime(&wall);
            wall = self
                .cron
                .find_next_occurrence(&floating, false)
                .ok()?
                .naive_utc();
            for t in self.instants(wall) {
                if t > after_ms && best.is_none_or(|b| t < b) {
                    best = Some(t);
                }
            }
            if let Some(b) = best {
                // No later wall time can stand for an earlier instant than this.
                if wall > local(b)? + chrono::Duration::hours(3) {
                    break;
                }
            }
        }
        best
    }

    /// The latest time in `(since, now]`, if any: what a scheduler that last looked at `since`
    /// runs now (once, however many it missed).
    pub fn due(&self, since: i64, now: i64) -> Option<i64> {
        let mut t = self.next_after(since)?;
        if t > now {
            return None;
        }
        // Step forward to the latest one not after `now` (bounded: a schedule every minute
        // missed for a day is 1,440 steps).
        for _ in 0..100_000 {
            match self.next_after(t) {
                Some(n) if n <= now => t = n,
                _ => break,
            }
        }
        Some(t)
    }
}

/// Whether a due time is still worth running at `now` (a scheduler may have been down).
pub fn in_window(s: &Schedule, due: i64, now: i64, tick: Duration) -> bool {
    let window = s.catch_up.unwrap_or_default().max(tick * 5);
    now - due <= window.as_millis() as i64
}

/// Check a delivery's signature; returns its delivery id (for dropping replays), if it has one.
pub fn verify(
    scheme: Scheme,
    secret: &str,
    header: &dyn Fn(&str) -> Option<String>,
    body: &[u8],
    now_ms: i64,
) -> Result<Option<String>, String> {
    use ring::hmac;
    match scheme {
        Scheme::Github => {
            let sig = header("x-hub-signature-256").ok_or("no X-Hub-Signature-256 header")?;
            let hex_sig = sig
                .strip_prefix("sha256=")
                .ok_or("X-Hub-Signature-256 is not `sha256=...`")?;
            let given = hex::decode(hex_sig).map_err(|_| "X-Hub-Signature-256 is not hex")?;
            let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
            hmac::verify(&key, body, &given).map_err(|_| "the signature does not match")?;
            // The delivery header is not signed (a replay could change it): the signature,
            // which is the same for GitHub's redelivery of the same body, is the id.
            Ok(Some(format!("sha256:{}", hex::encode(&given))))
        }
        Scheme::Gitlab => {
            let token = header("x-gitlab-token").ok_or("no X-Gitlab-Token header")?;
            if !constant_time_eq(token.as_bytes(), secret.as_bytes()) {
                return Err("the token does not match".into());
            }
            Ok(header("x-gitlab-event-uuid").or_else(|| header("idempotency-key")))
        }
        Scheme::Standard => {
            let id = header("webhook-id").ok_or("no webhook-id header")?;
            let ts = header("webhook-timestamp").ok_or("no webhook-timestamp header")?;
            let sigs = header("webhook-signature").ok_or("no webhook-signature header")?;
            let secs: i64 = ts
                .parse()
                .map_err(|_| "webhook-timestamp is not a number")?;
            if (now_ms / 1000 - secs).unsigned_abs() > WEBHOOK_TOLERANCE.as_secs() {
                return Err("webhook-timestamp is too far from now".into());
            }
            let raw = secret.strip_prefix("whsec_").unwrap_or(secret);
            let key_bytes = base64::engine::general_purpose::STANDARD
                .decode(raw)
                .map_err(|_| "the secret is not `whsec_` and base64")?;
            let key = hmac::Key::new(hmac::HMAC_SHA256, &key_bytes);
            let mut signed = format!("{id}.{ts}.").into_bytes();
            signed.extend_from_slice(body);
            let ok = sigs.split_whitespace().any(|s| {
                s.strip_prefix("v1,")
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .is_some_and(|given| hmac::verify(&key, &signed, &given).is_ok())
            });
            if !ok {
                return Err("no signature matches".into());
            }
            Ok(Some(id))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A trigger's run inputs, rendered against what started it (`{"trigger": ...}`).
pub fn inputs(
    template: &serde_json::Map<String, Json>,
    trigger: &Json,
) -> Result<Json, expr::ExprError> {
    let scope = Scope {
        context: serde_json::json!({ "trigger": trigger }),
        ..Default::default()
    };
    expr::render(&Json::Object(template.clone()), &scope)
}

/// Whether an event trigger's condition holds for `trigger` (`{"kind", "event"}`).
pub fn matches(t: &EventTrigger, trigger: &Json) -> Result<bool, expr::ExprError> {
    let scope = Scope {
        context: serde_json::json!({ "trigger": trigger }),
        needs_ok: true,
        ..Default::default()
    };
    match &t.cond {
        None => Ok(true),
        Some(c) => expr::condition(Some(c), &scope),
    }
}

/// Check the triggers when a workflow is defined: cron and zone, expressions, names.
pub fn check(t: &Triggers) -> Vec<String> {
    let mut out = Vec::new();
    for s in &t.schedule {
        if let Err(e) = Timetable::new(s) {
            out.push(e);
        }
        if s.catch_up
            .is_some_and(|c| c > Duration::from_secs(7 * 24 * 3600))
        {
            out.push(format!("schedule `{}`: catch_up is at most 7 days", s.cron));
        }
        out.extend(check_inputs(&s.inputs, "a schedule's"));
    }
    if let Some(w) = &t.webhook {
        if !nebula_protocol::validate::valid_name(&w.secret) {
            out.push(format!(
                "webhook secret `{}` is not a secret's name",
                w.secret
            ));
        }
        out.extend(check_inputs(&w.inputs, "the webhook's"));
    }
    for e in &t.events {
        if let Some(c) = &e.cond {
            let wrapped = if c.contains("${{") {
                c.clone()
            } else {
                format!("${{{{ {c} }}}}")
            };
            out.extend(check_inputs_value(
                &Json::String(wrapped),
                "an event's condition",
            ));
        }
        out.extend(check_inputs(&e.inputs, "an event's"));
    }
    out
}

fn check_inputs(m: &serde_json::Map<String, Json>, whose: &str) -> Vec<String> {
    check_inputs_value(&Json::Object(m.clone()), &format!("{whose} inputs"))
}

fn check_inputs_value(v: &Json, what: &str) -> Vec<String> {
    match expr::references(v) {
        Err(e) => vec![format!("{what}: {e}")],
        Ok(names) => names
            .iter()
            .filter(|n| n.split('.').next() != Some("trigger"))
            .map(|n| format!("{what}: `{n}` is unknown (a trigger's expressions read `trigger`)"))
            .collect(),
    }
}

#[cfg(test)]
mod tests;
