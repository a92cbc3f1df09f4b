//! Workflows: definitions, runs and their steps, approvals.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A workflow (`GET /api/v1/workflows`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkflowView {
    pub name: String,
    pub description: String,
    /// `file` (workflows.yml) or `api`.
    pub source: String,
    pub steps: usize,
    pub updated_by: String,
    /// RFC 3339.
    pub updated_at: String,
    /// The checked definition (steps with their `needs` resolved).
    pub definition: serde_json::Value,
}

/// `PUT /api/v1/workflows/{name}`: the workflow as YAML or JSON text (the same shape as one
/// entry under `workflows:` in workflows.yml).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PutWorkflow {
    pub definition: String,
}

/// `POST /api/v1/workflows/{name}/runs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    /// The run's inputs (those with defaults may be left out).
    #[serde(default)]
    pub inputs: serde_json::Map<String, serde_json::Value>,
}

/// A run (`GET /api/v1/workflow-runs/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunView {
    pub id: Uuid,
    pub workflow: String,
    /// `queued` (waiting for its concurrency group), `running`, `succeeded`, `failed` or
    /// `cancelled`.
    pub state: String,
    pub inputs: serde_json::Value,
    /// What started it: `{"kind": "manual", "by": ...}`, a schedule, a webhook, an event.
    pub trigger: serde_json::Value,
    pub concurrency_group: Option<String>,
    pub cancel_requested: bool,
    pub created_by: String,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    /// Every step in the order written, with its latest attempt (`GET` of one run only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepView>,
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepView {
    pub id: String,
    /// Its type (`exec`, `service-check`, `approval`, ...).
    pub kind: String,
    pub needs: Vec<String>,
    /// `pending`, `waiting` (to try again), `running`, `approval`, `succeeded`, `failed`,
    /// `timed_out`, `cancelled` or `skipped`.
    pub state: String,
    /// 0 before its first attempt.
    pub attempt: u32,
    /// The job of its latest attempt (steps that run on a node).
    pub job: Option<Uuid>,
    pub outputs: serde_json::Value,
    pub error: Option<String>,
    pub not_before: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

/// `POST /api/v1/workflow-runs/{id}/approve`: a decision on a step that waits for one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Decide {
    pub step: String,
    /// `false`: rejected (the step fails).
    #[serde(default = "yes")]
    pub approve: bool,
    #[serde(default)]
    pub comment: String,
}

fn yes() -> bool {
    true
}

/// `POST /hooks/workflows/{name}`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Delivered {
    /// The run it started (for a replay: the one the first delivery started).
    pub run: Option<Uuid>,
    /// This delivery id was taken before: nothing was started.
    pub duplicate: bool,
}
