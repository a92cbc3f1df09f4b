//! AI agents: personas with a system prompt, a model and the Nebula operations they may call
//! as tools ([`nebula_workflows::agent`]). An agent's answer is a loop through the gateway
//! (every turn routed and accounted like any chat request) in OpenAI's tool-call format; each
//! tool call is checked against the agent's tools and the caller's role, and audited
//! ([`tools`]). Agents answer the API (`POST /api/v1/agents/{name}/ask`, and
//! `/v1/chat/completions` with `model: agent/NAME`), workflow `agent` steps and the CLI.

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use nebula_types::api::agents::{AgentReply, AgentView, ToolCallView};
use nebula_workflows::agent::{self, Agent, Approval};
use serde_json::{json, Value as Json};

use crate::ai::gateway::Caller;
use crate::authz::{Change, Op, OpCtx};
use crate::store::workflows::{Defs, WorkflowDefRecord};
use crate::{ControlPlane, OpError};

pub mod tools;

/// How deep agents may ask agents (`ask_agent`).
pub const MAX_DEPTH: u32 = 2;
/// Tool calls run per model turn (more are answered with a refusal).
pub const MAX_CALLS_PER_TURN: usize = 8;
/// The largest answer read from the gateway per turn.
const MAX_ANSWER: usize = 4 << 20;

fn view(a: &Agent, source: &str) -> AgentView {
    AgentView {
        name: a.name.clone(),
        persona: a.persona.clone(),
        description: a.description.clone(),
        model: a.model.clone(),
        node: a.node.clone(),
        tools: a.tools.iter().map(|t| t.as_str().to_owned()).collect(),
        approval: match a.approval {
            Approval::Destructive => "destructive",
            Approval::Never => "never",
        }
        .to_owned(),
        max_turns: a.max_turns,
        source: source.to_owned(),
        system: a.system.clone(),
    }
}

/// The model named by a chat request when it is `agent/NAME`.
pub fn agent_model(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Model {
        model: Option<String>,
    }
    let m: Model = serde_json::from_slice(body).ok()?;
    m.model?.strip_prefix("agent/").map(str::to_owned)
}

impl ControlPlane {
    /// The agents in force, with where each comes from: the stored ones (file or API), then
    /// the built-ins no stored one replaces.
    async fn agents_in_force(&self) -> Result<Vec<(Agent, String)>, OpError> {
        let mut out: Vec<(Agent, String)> = Vec::new();
        for d in self.store.defs(Defs::Agents).await? {
            match serde_json::from_str::<Agent>(&d.definition) {
                Ok(a) => out.push((a, d.source)),
                Err(e) => tracing::warn!(agent = %d.name, "a stored agent does not read: {e}"),
            }
        }
        for b in agent::builtins() {
            if !out.iter().any(|(a, _)| a.name == b.name) {
                out.push((b, "builtin".into()));
            }
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    pub(crate) async fn find_agent(&self, name: &str) -> Result<Agent, OpError> {
        self.agents_in_force()
            .await?
            .into_iter()
            .find(|(a, _)| a.name == name)
            .map(|(a, _)| a)
            .ok_or_else(|| OpError::NotFound(format!("no agent named `{name}`")))
    }

    pub async fn agent_views(&self, cx: &OpCtx) -> Result<Vec<AgentView>, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        Ok(self
            .agents_in_force()
            .await?
            .iter()
            .map(|(a, s)| view(a, s))
            .collect())
    }

    pub async fn agent_view(&self, cx: &OpCtx, name: &str) -> Result<AgentView, OpError> {
        self.agent_views(cx)
            .await?
            .into_iter()
            .find(|a| a.name == name)
            .ok_or_else(|| OpError::NotFound(format!("no agent named `{name}`")))
    }

    /// Define (or replace) an agent from YAML or JSON text; a built-in of the same name is
    /// replaced, not changed.
    pub async fn put_agent(
        &self,
        cx: &OpCtx,
        name: &str,
        text: &str,
    ) -> Result<AgentView, OpError> {
        self.authorize(cx, Op::ManageWorkflows)?;
        let a = agent::check_one(name, text).map_err(|e| OpError::Invalid(e.to_string()))?;
        if let Some(d) = self.store.def(Defs::Agents, name).await? {
            if d.source == "file" {
                return Err(OpError::Conflict(format!(
                    "agent `{name}` is defined in workflows.yml; change it there"
                )));
            }
        }
        self.store
            .put_def(
                Defs::Agents,
                &WorkflowDefRecord {
                    name: name.to_owned(),
                    source: "api".into(),
                    definition: serde_json::to_string(&a).unwrap_or_default(),
                    updated_by: cx.actor.clone(),
                    updated_at: nebula_protocol::time::UnixMillis::now().as_i64(),
                },
            )
            .await?;
        self.record(
            cx,
            Change {
                action: "agent.put",
                target: name.to_owned(),
                detail: json!({"model": a.model, "tools": view(&a, "api").tools}),
                event: None,
            },
        );
        Ok(view(&a, "api"))
    }

    /// Remove a stored agent (a built-in of that name is in force again).
    pub async fn delete_agent(&self, cx: &OpCtx, name: &str) -> Result<(), OpError> {
        self.authorize(cx, Op::ManageWorkflows)?;
        if !self.store.delete_def(Defs::Agents, name).await? {
            return Err(OpError::NotFound(format!("no stored agent named `{name}`")));
        }
        self.record(
            cx,
            Change {
                action: "agent.delete",
                target: name.to_owned(),
                detail: json!({}),
                event: None,
            },
        );
        Ok(())
    }

    /// Ask an agent: `messages` (OpenAI chat messages, the last one the question) go to its
    /// model with its system prompt and tools, until it answers without a tool call or runs
    /// out of turns. Whoever may ask the gateway may ask an agent (as a plain model); what its
    /// tools may do is the caller's role's business, call by call.
    pub async fn ask_agent(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        messages: Vec<Json>,
        depth: u32,
    ) -> Result<AgentReply, OpError> {
        let agent = self.find_agent(name).await?;
        let mut convo = vec![json!({"role": "system", "content": agent.system})];
        convo.extend(messages);
        let offered: Vec<Json> = agent.tools.iter().map(|t| tools::schema(*t)).collect();
        let mut reply = AgentReply {
            agent: agent.name.clone(),
            persona: agent.persona.clone(),
            text: String::new(),
            finished: false,
            turns: 0,
            model: None,
            node: None,
            tool_calls: Vec::new(),
        };
        for turn in 1..=agent.max_turns {
            reply.turns = turn;
            let mut body = json!({"model": agent.model, "messages": convo, "stream": false});
            if !offered.is_empty() {
                body["tools"] = json!(offered);
            }
            if let Some(t) = agent.temperature {
                body["temperature"] = json!(t);
            }
            let (message, node, model) = self.turn(caller, &agent, body).await?;
            reply.node = node;
            reply.model = model;
            let calls = message
                .get("tool_calls")
                .and_then(Json::as_array)
                .cloned()
                .unwrap_or_default();
            if calls.is_empty() {
                reply.text = message
                    .get("content")
                    .and_then(Json::as_str)
                    .unwrap_or_default()
                    .to_owned();
                reply.finished = true;
                return Ok(reply);
            }
            convo.push(message);
            for (n, call) in calls.into_iter().enumerate() {
                let id = call
                    .get("id")
                    .and_then(Json::as_str)
                    .unwrap_or("call")
                    .to_owned();
                let name = call
                    .pointer("/function/name")
                    .and_then(Json::as_str)
                    .unwrap_or_default();
                let args = call
                    .pointer("/function/arguments")
                    .map(|a| {
                        a.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| a.to_string())
                    })
                    .unwrap_or_default();
                let done = if n < MAX_CALLS_PER_TURN {
                    tools::call(self, &agent, caller, name, &args, depth).await
                } else {
                    // Answered (each call id needs a tool message), not run.
                    ToolCallView {
                        tool: name.to_owned(),
                        arguments: Json::Null,
                        outcome: "refused".into(),
                        result: format!("at most {MAX_CALLS_PER_TURN} tool calls are run per turn"),
                    }
                };
                convo.push(json!({"role": "tool", "tool_call_id": id, "content": done.result}));
                reply.tool_calls.push(done);
            }
        }
        reply.text = format!(
            "{} stopped after {} turns without a final answer.",
            agent.persona, agent.max_turns
        );
        Ok(reply)
    }

    /// One model turn through the gateway: the assistant's message, the node that answered and
    /// the model's name.
    async fn turn(
        self: &Arc<Self>,
        caller: &Caller,
        agent: &Agent,
        body: Json,
    ) -> Result<(Json, Option<String>, Option<String>), OpError> {
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        let mut caller = caller.clone();
        // Node affinity: only that node may answer.
        caller.only_node = agent.node.clone();
        let resp =
            crate::ai::gateway::serve_for(self.clone(), caller, bytes, "/v1/chat/completions")
                .await;
        let status = resp.status();
        let node = resp
            .headers()
            .get(crate::ai::gateway::NODE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = axum::body::to_bytes(resp.into_body(), MAX_ANSWER)
            .await
            .map_err(|e| OpError::Conflict(format!("reading the model's answer: {e}")))?;
        let v: Json = serde_json::from_slice(&body).unwrap_or(Json::Null);
        if !status.is_success() {
            let why = v
                .pointer("/error/message")
                .and_then(Json::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(300).collect());
            return Err(OpError::Conflict(format!(
                "agent `{}`: the model `{}` answered {status}: {why}",
                agent.name, agent.model
            )));
        }
        let message = v
            .pointer("/choices/0/message")
            .cloned()
            .filter(Json::is_object)
            .ok_or_else(|| OpError::Conflict("the model's answer has no message".into()))?;
        let model = v.get("model").and_then(Json::as_str).map(str::to_owned);
        Ok((message, node, model))
    }
}

/// The gateway for a caller already authenticated, agents included: a chat request whose model
/// is `agent/NAME` is that agent's answer, anything else goes to the models
/// ([`crate::ai::gateway::serve_for`]). The dashboard's chat and the Discord bot call this.
pub async fn serve_for(
    cp: Arc<ControlPlane>,
    caller: Caller,
    body: Bytes,
    path: &'static str,
) -> Response {
    if path == "/v1/chat/completions" {
        if let Some(agent) = agent_model(&body) {
            return chat_completion(cp, caller, agent, body).await;
        }
    }
    crate::ai::gateway::serve_for(cp, caller, body, path).await
}

/// `POST /v1/chat/completions` (API tokens): a model's answer, or an agent's.
pub async fn chat_completions(
    axum::extract::State(cp): axum::extract::State<Arc<ControlPlane>>,
    req: axum::extract::Request,
) -> Response {
    let (caller, body, _budget) = match crate::ai::gateway::caller_and_body(&cp, req).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    serve_for(cp, caller, body, "/v1/chat/completions").await
}

/// `/v1/chat/completions` with `model: agent/NAME`: the agent's answer as a chat completion
/// (streamed as one chunk when asked), with its tool calls under `nebula.tool_calls`.
pub async fn chat_completion(
    cp: Arc<ControlPlane>,
    caller: Caller,
    name: String,
    body: Bytes,
) -> Response {
    use crate::ai::gateway::error;
    let v: Json = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
                format!("the body is not JSON: {e}"),
            )
        }
    };
    // The conversation as given, without system prompts (the agent has its own).
    let messages: Vec<Json> = v
        .get("messages")
        .and_then(Json::as_array)
        .map(|l| {
            l.iter()
                .filter(|m| {
                    matches!(
                        m.get("role").and_then(Json::as_str),
                        Some("user" | "assistant")
                    )
                })
                .filter_map(|m| {
                    let content = m.get("content").and_then(Json::as_str)?;
                    Some(json!({"role": m["role"], "content": content}))
                })
                .collect()
        })
        .unwrap_or_default();
    if !messages.iter().any(|m| m["role"] == "user") {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_messages",
            "give at least one user message (text content)",
        );
    }
    let stream = v.get("stream").and_then(Json::as_bool).unwrap_or(false);
    let reply = match cp.ask_agent(&caller, &name, messages, 0).await {
        Ok(r) => r,
        Err(OpError::NotFound(m)) => {
            return error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                m,
            )
        }
        Err(OpError::Forbidden(m)) => {
            return error(StatusCode::FORBIDDEN, "permission_error", "forbidden", m)
        }
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "agent_failed",
                e.to_string(),
            )
        }
    };
    let id = format!("chatcmpl-agent-{}", uuid::Uuid::now_v7().simple());
    let created = nebula_protocol::time::UnixMillis::now().as_i64() / 1000;
    let model = format!("agent/{name}");
    let extra = json!({"tool_calls": reply.tool_calls, "turns": reply.turns, "finished": reply.finished, "node": reply.node});
    if stream {
        let chunk = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": reply.text}, "finish_reason": null}], "nebula": extra});
        let last = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        let text = format!("data: {chunk}\n\ndata: {last}\n\ndata: [DONE]\n\n");
        return (
            [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
            text,
        )
            .into_response();
    }
    axum::Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text}, "finish_reason": if reply.finished { "stop" } else { "length" }}],
        "nebula": extra,
    }))
    .into_response()
}

/// The audit row of a tool call.
pub(crate) fn audit_call(cp: &ControlPlane, cx: &OpCtx, agent: &str, call: &ToolCallView) {
    let mut args = call.arguments.to_string();
    if args.len() > 2048 {
        let mut end = 2048;
        while !args.is_char_boundary(end) {
            end -= 1;
        }
        args.truncate(end);
    }
    cp.record(
        cx,
        Change {
            action: "agent.tool",
            target: agent.to_owned(),
            detail: json!({"tool": call.tool, "arguments": args, "outcome": call.outcome, "result": call.result.chars().take(500).collect::<String>()}),
            event: None,
        },
    );
}
