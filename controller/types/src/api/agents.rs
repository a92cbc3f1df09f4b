//! AI agents: what `/api/v1/agents` lists and what asking one returns.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An agent as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentView {
    pub name: String,
    pub persona: String,
    pub description: String,
    pub model: String,
    pub node: Option<String>,
    /// The operations it may call: `read_fleet`, `probe`, `exec`, `deploy`, `wake`,
    /// `ask_agent`.
    pub tools: Vec<String>,
    /// `destructive` (exec and deploy need a person) or `never`.
    pub approval: String,
    pub max_turns: u32,
    /// `builtin`, `file` (workflows.yml) or `api`.
    pub source: String,
    pub system: String,
}

/// `POST /api/v1/agents/{name}/ask`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AskAgent {
    pub message: String,
}

/// One tool call the model asked for, and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolCallView {
    pub tool: String,
    pub arguments: serde_json::Value,
    /// `executed`, `failed`, `refused` (the agent's tools or the caller's role do not allow
    /// it) or `needs_approval` (a destructive tool of an agent whose `approval` is
    /// `destructive`).
    pub outcome: String,
    /// What the model was told.
    pub result: String,
}

/// An agent's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentReply {
    pub agent: String,
    pub persona: String,
    pub text: String,
    /// False when it ran out of turns before a final answer.
    pub finished: bool,
    pub turns: u32,
    pub model: Option<String>,
    /// The node whose backend answered last.
    pub node: Option<String>,
    pub tool_calls: Vec<ToolCallView>,
}
