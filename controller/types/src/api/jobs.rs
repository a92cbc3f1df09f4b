//! Jobs: creating one, a job with its progress, and fan-out over nodes.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::jobs::{JobRecord, Selector, Work};

/// `POST /api/v1/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// Run on this node...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// ...or on the best node matching this selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// What to run: `{"kind": "exec", ...}` and the other kinds of work.
    #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
    pub work: Work,
    /// From now, e.g. `10m` (default: the controller's job_default_deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// Safe to run again: retried (possibly elsewhere) when lost.
    #[serde(default)]
    pub idempotent: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Answer when the job has finished (or after this long, with its state then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
}

/// A job and, while it runs, the agent's latest progress figure.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct JobView {
    #[serde(flatten)]
    pub record: JobRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// How far a running job is, as its agent last said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Progress {
    pub percent: f32,
    pub message: String,
}

/// One node's answer in a fan-out.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct NodeResult {
    pub node: String,
    /// `None` when no job was created (the node was offline).
    pub job_id: Option<Uuid>,
    pub state: String,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    #[schemars(with = "Option<serde_json::Value>")]
    pub output: Option<nebula_protocol::jobs::JobOutput>,
    /// The last lines of the job's log (at most 100).
    pub log_tail: Vec<String>,
}

/// `POST /api/v1/inventory/execute`: every node's result.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct FanOut {
    pub results: Vec<NodeResult>,
    pub succeeded: usize,
    pub failed: usize,
}
