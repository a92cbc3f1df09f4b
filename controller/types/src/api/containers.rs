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

/// `GET /api/v1/nodes/{name}/storage`: a node's images and volumes and what they take.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct StorageView {
    pub node: String,
    pub disk: DiskUsageView,
    pub images: Vec<ImageView>,
    pub volumes: Vec<VolumeView>,
}

/// Bytes the container runtime takes on a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskUsageView {
    pub images_bytes: u64,
    pub containers_bytes: u64,
    /// Volumes whose size the agent could read.
    pub volumes_bytes: u64,
    /// What removing every unused image and volume would free.
    pub reclaimable_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ImageView {
    pub id: String,
    pub tags: Vec<String>,
    pub size_bytes: u64,
    pub created: String,
    /// Containers (running or not) made from it; none: unused.
    pub containers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VolumeView {
    pub name: String,
    pub driver: String,
    pub size_bytes: Option<u64>,
    /// Containers (running or not) that mount it; none: unused.
    pub containers: Vec<String>,
}

/// `GET /api/v1/nodes/{name}/storage/prune`: what a prune would remove now.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PrunePreview {
    pub node: String,
    pub images: Vec<ImageView>,
    /// Listed only when asked for (`?volumes=true`): volumes hold data.
    pub volumes: Vec<VolumeView>,
    pub bytes: u64,
}

/// `POST /api/v1/nodes/{name}/storage/prune`: remove exactly these (a preview's ids and
/// names); each is checked again on the node and left when something uses it by then.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(default)]
    pub volumes: Vec<String>,
}

/// What a prune did.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PruneResult {
    pub node: String,
    pub job: uuid::Uuid,
    pub removed: Vec<String>,
    /// `[name, why]` for each one left.
    pub skipped: Vec<(String, String)>,
    pub reclaimed_bytes: u64,
}
