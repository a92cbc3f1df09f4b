//! Containers across the fleet: the list, one container, actions on it, its log.

use nebula_protocol::Labels;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::jobs::JobView;

/// A container as telemetry shows it (`GET /api/v1/containers` lists them fleet-wide).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ContainerRow {
    pub node: String,
    pub id: String,
    pub name: String,
    pub image: String,
    pub labels: Labels,
    pub created: String,
    pub state: String,
    pub health: String,
    pub restart_count: u32,
    pub cpu_percent: Option<f32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    pub net_rx_bytes: Option<u64>,
    pub net_tx_bytes: Option<u64>,
    /// Deployed by Nebula for this node (labelled `nebula.managed=true`).
    #[serde(default)]
    pub managed: bool,
    /// The service it belongs to, when managed.
    #[serde(default)]
    pub service: Option<String>,
    /// Published ports: `127.0.0.1:8080->80/tcp`, `80/tcp` (not published on the host).
    #[serde(default)]
    pub ports: Vec<String>,
    /// When it last started (RFC 3339); absent from agents before 1.6 and for containers
    /// that never ran.
    #[serde(default)]
    pub started_at: Option<String>,
    /// Seconds since it started, while it runs.
    #[serde(default)]
    pub uptime_secs: Option<u64>,
}

/// What a node's `[docker]` config allows: `none`, `managed` or `all` for each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DockerPolicyView {
    pub control: String,
    pub exec: String,
    pub logs: String,
}

/// `GET /api/v1/nodes/{node}/containers/{container}`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ContainerView {
    pub container: ContainerRow,
    /// The node's policy as its agent reported it (absent while it is offline, or for agents
    /// before 1.6).
    pub policy: Option<DockerPolicyView>,
    /// What the node would refuse, by rule, for this container (`control`, `exec`, `logs`):
    /// its words, naming the config key that would allow it.
    pub refusals: Labels,
}

/// `POST /api/v1/nodes/{node}/containers/{container}/actions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ContainerActionRequest {
    /// `start`, `stop`, `restart`, `kill`, `remove` (or `rm`), `pull`.
    pub action: String,
}

/// The job that carries an action out, and what to know before it lands.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ContainerActionView {
    pub job: JobView,
    /// Set for a container Nebula manages: the reconciler puts it back as the map says.
    pub warning: Option<String>,
}

/// One log line (`GET .../logs` sends them in batches as server-sent `logs` events, each a JSON
/// array of these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ContainerLogLine {
    /// When the container wrote it, RFC 3339 with milliseconds.
    pub t: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub line: String,
}
