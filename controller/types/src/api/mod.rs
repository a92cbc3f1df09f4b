//! The HTTP API's request and response bodies, shared by the controller (which serves them),
//! the `nebula` CLI and the tests (which read them), and described in the OpenAPI document
//! through their JSON Schemas. Pure data: the controller builds them from its state.

pub mod access;
pub mod agents;
pub mod alerts;
pub mod containers;
pub mod desired;
pub mod discord;
pub mod jobs;
pub mod models;
pub mod monitors;
pub mod nodes;
pub mod secrets;
pub mod tasks;
pub mod telemetry;
pub mod workflows;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One page of a list, and the cursor of the next one (`None`: the last page).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Health {
    pub status: String,
    pub online_nodes: usize,
}

/// An error answer: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "Error")]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A machine-readable code and words for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorDetail {
    /// forbidden, not_found, bad_request, ...
    pub code: String,
    pub message: String,
    /// Each problem found, for errors that have several (a service map's, with line and
    /// column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problems: Option<serde_json::Value>,
}
