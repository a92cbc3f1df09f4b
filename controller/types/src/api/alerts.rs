//! Alerts: what fires now, where notifications go, silences, and the delivery history.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An alert instance (`GET /api/v1/alerts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AlertView {
    pub fingerprint: String,
    pub rule: String,
    /// `info`, `warning`, `critical`.
    pub severity: String,
    /// `pending`, `firing`, `resolved` (a resolution not sent yet).
    pub state: String,
    pub labels: BTreeMap<String, String>,
    pub summary: String,
    pub value: Option<f64>,
    pub active_since: String,
    pub fired_at: Option<String>,
    pub acknowledged_by: Option<String>,
    /// Muted by a silence now.
    pub silenced: bool,
}

/// `POST /api/v1/alerts/sinks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSink {
    pub name: String,
    /// `webhook` (JSON, signed per Standard Webhooks), `ntfy` (the topic's URL), `discord`
    /// (a Discord webhook's URL) or `email` (`smtp://[USER@]HOST[:PORT]?from=..&to=..&tls=`).
    #[serde(default = "webhook")]
    pub kind: String,
    pub url: String,
    /// `info` (default), `warning` or `critical`: less severe alerts are not sent here.
    #[serde(default)]
    pub min_severity: Option<String>,
    /// An `email` sink's SMTP password (with a user in its url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Which alerts it takes beyond the severity (default: all).
    #[serde(default)]
    pub filters: SinkFilters,
}

/// Which alerts a sink takes: each list given must hold the alert's rule, node or service,
/// and every label given must match. Empty: any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SinkFilters {
    pub rules: Vec<String>,
    pub nodes: Vec<String>,
    pub services: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

impl SinkFilters {
    pub fn is_empty(&self) -> bool {
        self == &SinkFilters::default()
    }

    /// Does an alert of `rule` with `labels` pass?
    pub fn take(&self, rule: &str, labels: &BTreeMap<String, String>) -> bool {
        let within = |list: &[String], label: &str| {
            list.is_empty() || labels.get(label).is_some_and(|v| list.contains(v))
        };
        (self.rules.is_empty() || self.rules.iter().any(|r| r == rule))
            && within(&self.nodes, "node")
            && within(&self.services, "service")
            && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

fn webhook() -> String {
    "webhook".into()
}

/// A sink (its secret is shown once, when it is created).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SinkView {
    pub name: String,
    pub kind: String,
    pub url: String,
    pub min_severity: String,
    pub filters: SinkFilters,
    pub created_by: String,
    pub created_at: String,
}

/// The sink and its signing secret (`whsec_...`), shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CreatedSink {
    pub sink: SinkView,
    pub secret: String,
}

/// `POST /api/v1/alerts/silences`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSilence {
    /// `label=value` or `label!=value`; `alertname` is the rule.
    pub matchers: Vec<String>,
    /// How long from now (`2h`).
    pub duration: String,
    #[serde(default)]
    pub comment: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SilenceView {
    pub id: String,
    pub matchers: Vec<String>,
    pub starts_at: String,
    pub ends_at: String,
    pub created_by: String,
    pub comment: String,
}

/// One notification for one sink and how its delivery went (`GET /api/v1/alerts/notifications`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NotificationView {
    pub id: String,
    pub sink: String,
    /// `pending`, `sent`, `failed` (given up).
    pub state: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub created_at: String,
    pub sent_at: Option<String>,
    /// The body as sent.
    #[schemars(with = "serde_json::Value")]
    pub payload: serde_json::Value,
}
