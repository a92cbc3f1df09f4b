//! Nodes: the fleet table, one node, removal, wake.

use nebula_protocol::{Labels, NodeFacts};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A node as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct NodeView {
    pub id: Uuid,
    pub name: String,
    pub status: NodeStatus,
    pub labels: Labels,
    /// What the agent reported about its host (the protocol's `NodeFacts`: hostname, OS,
    /// kernel, architecture, CPUs, memory, GPUs, container runtime).
    #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
    pub facts: NodeFacts,
    pub agent_version: String,
    pub enrolled_at: String,
    pub last_seen_at: Option<String>,
    pub connected_since: Option<String>,
    pub remote_addr: Option<String>,
    /// Replicas on PostgreSQL: the replica holding the node's connection (a follower relays
    /// the session to the leader).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_replica: Option<String>,
    pub cert_not_after: Option<String>,
    /// The latest telemetry, summarised (absent before the first sample).
    pub telemetry: Option<TelemetrySummary>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Online,
    Offline,
    /// Woken through a relay; not registered yet.
    Waking,
    /// Woken, but it did not register within `wake_timeout`.
    WakeFailed,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Online => "online",
            NodeStatus::Offline => "offline",
            NodeStatus::Waking => "waking",
            NodeStatus::WakeFailed => "wake_failed",
        }
    }
}

/// The figures a fleet table shows per node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct TelemetrySummary {
    pub sampled_at: String,
    pub cpu_percent: f32,
    pub load1: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub gpus: usize,
    pub gpu_utilization_percent: Option<f32>,
    pub gpu_memory_used_bytes: Option<u64>,
    pub gpu_memory_total_bytes: Option<u64>,
    pub containers_total: usize,
    pub containers_running: usize,
    pub containers_unhealthy: usize,
}

/// `DELETE /api/v1/nodes/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NodeRemoved {
    pub removed: String,
    pub id: Uuid,
}

/// A wake in progress (or failed) for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Wake {
    pub node: String,
    /// The node that sent the packet or ran the command.
    pub relay: String,
    pub job: Uuid,
    /// Unix milliseconds.
    pub started_at: i64,
    /// Unix milliseconds: the node must register by then.
    pub until: i64,
    pub failed: bool,
}
