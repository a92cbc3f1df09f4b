//! Models across the fleet, the AI gateway's usage, and the agent builds served.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `GET /api/v1/models/inventory`: per node and backend, the models on disk and loaded.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ModelsInventory {
    pub nodes: Vec<NodeModels>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct NodeModels {
    pub node: String,
    pub node_id: Uuid,
    pub online: bool,
    pub backends: Vec<BackendView>,
}

/// An inference backend on a node.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct BackendView {
    pub name: String,
    /// ollama, openai (an OpenAI-compatible server such as llama.cpp's) or sd-webui.
    pub kind: String,
    pub url: String,
    /// How the agent found it: config or discovery.
    pub source: String,
    pub healthy: bool,
    pub error: Option<String>,
    pub models: Vec<ModelView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ModelView {
    pub name: String,
    pub digest: Option<String>,
    pub size_bytes: u64,
    pub vram_bytes: Option<u64>,
    pub context_length: Option<u32>,
    pub loaded: bool,
    /// The gateway's breaker for the model on this node: closed, open or half-open.
    pub breaker: String,
}

/// `GET /api/v1/ai/usage`: requests and tokens per API token, model and node.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct AiUsage {
    pub usage: Vec<UsageRow>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UsageRow {
    pub token: String,
    pub model: String,
    pub node: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// `GET /api/v1/models/desired`: the map's `models:` per node, and what nodes hold beyond it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct ModelsView {
    pub desired: Vec<ModelStatus>,
    pub extra: Vec<ExtraModel>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ModelStatus {
    pub model: String,
    pub node: String,
    /// `present`, `pulling`, `failed` or `waiting` (node offline or not reporting models).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ExtraModel {
    pub node: String,
    pub backend: String,
    pub model: String,
}

/// `GET /api/v1/agent/releases`: the agent builds this controller serves, and the key that
/// signs them.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct AgentReleases {
    pub releases: Vec<AgentReleaseView>,
    pub public_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct AgentReleaseView {
    pub version: String,
    pub os: String,
    pub arch: String,
    pub path: String,
    pub sha256: String,
}
