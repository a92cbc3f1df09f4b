//! Step types: what each takes (`with`) and where it runs.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a step does. Steps that run on a node are jobs of the job engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    /// A job that does nothing (a round trip to the node).
    Noop,
    /// An operation from the node's allow-list: `with: {op, args}`.
    Exec,
    /// A probe from the node: `with: {http | tcp, timeout}`.
    ServiceCheck,
    /// A model pull onto the node: `with: {name, backend}`.
    ModelPull,
    /// Wake a node by name through its relays: `with: {node}`.
    Wake,
    /// Wait for a person to approve (dashboard, CLI, API): `with: {message}`.
    Approval,
    /// An HTTP request from the node: `with: {url, method, headers, body, timeout, max_bytes,
    /// fail_on_status}`.
    Http,
    /// A text answer from a model, through the gateway's routing (or on `node`): `with:
    /// {model, prompt, system, messages, max_tokens, temperature}`.
    AiText,
    /// An image from a Stable Diffusion backend, through the gateway's routing: `with:
    /// {prompt, negative_prompt, width, height, steps, seed}`.
    AiImage,
    /// Put a node to sleep with its allow-listed sleep command: `with: {node}`.
    Sleep,
    /// A message through an alert sink: `with: {sink, message, title, severity}`.
    Notify,
    /// Deploy a service of the service map and wait until it is healthy, or roll it back to an
    /// earlier revision: `with: {service, action, revision}`.
    Deploy,
    /// Ask an AI agent (its tools act with the run's role): `with: {agent, prompt}`.
    Agent,
}

/// Where a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On a node: `node` or `selector` is required.
    Node,
    /// On the node the gateway's routing picks, unless `node` names one.
    Routed,
    /// On the controller (it may start jobs of its own).
    Controller,
}

impl StepKind {
    pub const ALL: [StepKind; 13] = [
        StepKind::Noop,
        StepKind::Exec,
        StepKind::ServiceCheck,
        StepKind::ModelPull,
        StepKind::Wake,
        StepKind::Approval,
        StepKind::Http,
        StepKind::AiText,
        StepKind::AiImage,
        StepKind::Sleep,
        StepKind::Notify,
        StepKind::Deploy,
        StepKind::Agent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Noop => "noop",
            StepKind::Exec => "exec",
            StepKind::ServiceCheck => "service-check",
            StepKind::ModelPull => "model-pull",
            StepKind::Wake => "wake",
            StepKind::Approval => "approval",
            StepKind::Http => "http",
            StepKind::AiText => "ai-text",
            StepKind::AiImage => "ai-image",
            StepKind::Sleep => "sleep",
            StepKind::Notify => "notify",
            StepKind::Deploy => "deploy",
            StepKind::Agent => "agent",
        }
    }

    /// The `with` keys it takes: (name, required).
    pub fn params(self) -> &'static [(&'static str, bool)] {
        match self {
            StepKind::Noop => &[],
            StepKind::Exec => &[("op", true), ("args", false)],
            StepKind::ServiceCheck => &[("http", false), ("tcp", false), ("timeout", false)],
            StepKind::ModelPull => &[("name", true), ("backend", false)],
            StepKind::Wake | StepKind::Sleep => &[("node", true)],
            StepKind::Approval => &[("message", false)],
            StepKind::Http => &[
                ("url", true),
                ("method", false),
                ("headers", false),
                ("body", false),
                ("timeout", false),
                ("max_bytes", false),
                ("fail_on_status", false),
            ],
            StepKind::AiText => &[
                ("model", true),
                ("prompt", false),
                ("system", false),
                ("messages", false),
                ("max_tokens", false),
                ("temperature", false),
            ],
            StepKind::AiImage => &[
                ("prompt", true),
                ("model", false),
                ("negative_prompt", false),
                ("width", false),
                ("height", false),
                ("steps", false),
                ("seed", false),
            ],
            StepKind::Notify => &[
                ("sink", true),
                ("message", true),
                ("title", false),
                ("severity", false),
            ],
            StepKind::Deploy => &[("service", true), ("action", false), ("revision", false)],
            StepKind::Agent => &[("agent", true), ("prompt", true)],
        }
    }

    pub fn placement(self) -> Placement {
        match self {
            StepKind::Wake
            | StepKind::Approval
            | StepKind::Sleep
            | StepKind::Notify
            | StepKind::Deploy
            | StepKind::Agent => Placement::Controller,
            StepKind::AiText | StepKind::AiImage => Placement::Routed,
            StepKind::Noop
            | StepKind::Exec
            | StepKind::ServiceCheck
            | StepKind::ModelPull
            | StepKind::Http => Placement::Node,
        }
    }
}
