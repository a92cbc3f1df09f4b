//! Monitors: checks run from nodes, their state per node, uptime and latency.

use nebula_desired::map::monitors::MonitorDecl;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A monitor and how it stands on each node that runs it (`GET /api/v1/monitors`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MonitorView {
    pub name: String,
    /// `http`, `tcp`, `ping`, `dns` or `docker`.
    pub kind: String,
    /// What it checks (a URL, `host:port`, a host, `A name @server`).
    pub target: String,
    /// `map`, `api` or `built-in`.
    pub source: String,
    /// The service whose health check it runs (`monitor: true`).
    pub service: Option<String>,
    pub interval_secs: u64,
    pub timeout_secs: f64,
    pub created_by: Option<String>,
    /// `up` when every node sees it up, `down` when any sees it down, `pending` before the
    /// first result, `idle` when no node runs it.
    pub status: String,
    pub nodes: Vec<MonitorNodeView>,
}

/// One node's view of a monitor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MonitorNodeView {
    pub node: String,
    /// `up`, `down` or `pending` (no result yet).
    pub status: String,
    /// Since when (RFC 3339) it is up or down.
    pub since: Option<String>,
    pub last_check: Option<String>,
    pub latency_ms: Option<f64>,
    pub http_status: Option<u16>,
    /// How a ping went out (`icmp` or `tcp`).
    pub method: Option<String>,
    pub error: Option<String>,
    /// The HTTPS certificate's expiry (RFC 3339).
    pub certificate_expires: Option<String>,
    /// Percent of checks up over 24 hours, 7 days and 30 days (`null`: no checks).
    pub uptime_24h: Option<f64>,
    pub uptime_7d: Option<f64>,
    pub uptime_30d: Option<f64>,
}

/// A monitor with its recent results and hours (`GET /api/v1/monitors/{name}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MonitorDetail {
    pub monitor: MonitorView,
    pub series: Vec<MonitorSeries>,
}

/// One node's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MonitorSeries {
    pub node: String,
    /// The last checks, oldest first.
    pub recent: Vec<MonitorPoint>,
    /// The last 25 hours, oldest first.
    pub hours: Vec<MonitorHour>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MonitorPoint {
    /// Unix milliseconds.
    pub at_ms: i64,
    pub up: bool,
    pub latency_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MonitorHour {
    /// The hour's start, Unix milliseconds.
    pub hour_ms: i64,
    pub checks: i64,
    pub up: i64,
    pub latency_avg_ms: f64,
    pub latency_max_ms: f64,
}

/// `POST /api/v1/monitors`: a monitor in the map's `monitors:` format, under a name.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMonitor {
    pub name: String,
    pub monitor: MonitorDecl,
}
