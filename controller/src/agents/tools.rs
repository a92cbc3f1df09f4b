//! The tools an agent may call: each one a Nebula operation, offered to the model as an
//! OpenAI function. A call is refused unless the agent's definition lists the tool and the
//! caller's role allows the operation; a destructive one (exec, deploy) waits for a person
//! unless the agent's `approval` is `never`. Every call, refused or not, is audited.

use std::sync::Arc;
use std::time::Duration;

use nebula_types::api::agents::ToolCallView;
use nebula_workflows::agent::{Agent, Approval, Tool};
use serde_json::{json, Value as Json};

use crate::ai::gateway::Caller;
use crate::authz::{Op, OpCtx};
use crate::jobs::{JobState, NewJob, Target, Work};
use crate::ControlPlane;

/// What a tool result may say to the model (bytes).
const MAX_RESULT: usize = 16 * 1024;

/// The OpenAI function definition of a tool.
pub fn schema(tool: Tool) -> Json {
    let (description, parameters) = match tool {
        Tool::ReadFleet => (
            "The fleet now: every node (online or not, labels) and every service (status, revision, healthy replicas).",
            json!({"type": "object", "properties": {}}),
        ),
        Tool::Probe => (
            "An HTTP GET (`http`: a URL) or a TCP connect (`tcp`: HOST:PORT) from a node; says whether it worked, the status and the latency.",
            json!({"type": "object", "properties": {
                "node": {"type": "string"}, "http": {"type": "string"}, "tcp": {"type": "string"}},
                "required": ["node"]}),
        ),
        Tool::Exec => (
            "Run an operation from a node's allow-list (`op`, with `args`, each one argument); returns the exit status and the output's last lines.",
            json!({"type": "object", "properties": {
                "node": {"type": "string"}, "op": {"type": "string"},
                "args": {"type": "array", "items": {"type": "string"}}},
                "required": ["node", "op"]}),
        ),
        Tool::Deploy => (
            "Deploy a service of the service map now (`action`: `apply`), or roll it back (`rollback`, to `revision` or the newest good one before).",
            json!({"type": "object", "properties": {
                "service": {"type": "string"}, "action": {"type": "string", "enum": ["apply", "rollback"]},
                "revision": {"type": "string"}},
                "required": ["service"]}),
        ),
        Tool::Wake => (
            "Wake a sleeping node through its Wake-on-LAN relays.",
            json!({"type": "object", "properties": {"node": {"type": "string"}}, "required": ["node"]}),
        ),
        Tool::AskAgent => (
            "Ask another agent a question and get its answer.",
            json!({"type": "object", "properties": {
                "agent": {"type": "string"}, "question": {"type": "string"}},
                "required": ["agent", "question"]}),
        ),
    };
    json!({"type": "function", "function": {"name": tool.as_str(), "description": description, "parameters": parameters}})
}

/// The operation a tool call needs of its caller.
fn op_of(tool: Tool, args: &Json) -> Op {
    match tool {
        Tool::ReadFleet => Op::ReadFleet,
        Tool::Probe | Tool::Exec => Op::RunJob,
        Tool::Deploy if args.get("action").and_then(Json::as_str) == Some("rollback") => {
            Op::RollbackService
        }
        Tool::Deploy => Op::Reconcile,
        Tool::Wake => Op::WakeNode,
        Tool::AskAgent => Op::Chat,
    }
}

fn text(args: &Json, key: &str) -> Result<String, String> {
    args.get(key)
        .and_then(Json::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("`{key}` (text) is required"))
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_RESULT {
        let mut end = MAX_RESULT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(" [cut]");
    }
    s
}

/// Check and carry out one tool call; what the model is told, and what is audited. (Boxed: a
/// call may ask another agent, whose answer may hold tool calls of its own.)
pub fn call<'a>(
    cp: &'a Arc<ControlPlane>,
    agent: &'a Agent,
    caller: &'a Caller,
    name: &'a str,
    raw_args: &'a str,
    depth: u32,
) -> futures::future::BoxFuture<'a, ToolCallView> {
    Box::pin(async move {
        let args: Result<Json, String> = if raw_args.trim().is_empty() {
            Ok(json!({}))
        } else {
            serde_json::from_str(raw_args).map_err(|e| format!("the arguments are not JSON: {e}"))
        };
        let shown = args
            .clone()
            .unwrap_or_else(|_| Json::String(raw_args.chars().take(2048).collect()));
        let view = |outcome: &str, result: String| ToolCallView {
            tool: name.to_owned(),
            arguments: shown.clone(),
            outcome: outcome.to_owned(),
            result: cut(result),
        };
        // Who the call acts as; an `ai` token's requests are audited under the token's name.
        let audit_cx = caller.principal.clone().unwrap_or_else(|| {
            OpCtx::new(
                caller.name.clone(),
                crate::authz::Role::Viewer,
                crate::authz::Via::Api,
            )
        });
        let done = match check(cp, agent, caller, name, &args) {
            Err((outcome, why)) => view(outcome, why),
            Ok((tool, cx, args)) => match run(cp, &cx, caller, tool, &args, depth).await {
                Ok(out) => view("executed", out),
                Err(e) => view("failed", e),
            },
        };
        super::audit_call(cp, &audit_cx, &agent.name, &done);
        done
    })
}

type Checked = (Tool, OpCtx, Json);

/// Whether the call may go ahead: the tool, who it acts as and its arguments, or the outcome
/// and why not.
fn check(
    cp: &ControlPlane,
    agent: &Agent,
    caller: &Caller,
    name: &str,
    args: &Result<Json, String>,
) -> Result<Checked, (&'static str, String)> {
    let tool =
        Tool::parse(name).ok_or_else(|| ("refused", format!("there is no tool named `{name}`")))?;
    if !agent.may(tool) {
        let allowed: Vec<&str> = agent.tools.iter().map(|t| t.as_str()).collect();
        return Err((
            "refused",
            format!(
                "agent `{}` may not use `{name}` (its tools: {})",
                agent.name,
                if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                }
            ),
        ));
    }
    let Some(cx) = caller.principal.clone() else {
        return Err((
            "refused",
            "requests made with an `ai` token call no tools".into(),
        ));
    };
    let args = args.clone().map_err(|e| ("failed", e))?;
    if let Err(e) = cp.authorize(&cx, op_of(tool, &args)) {
        return Err((
            "refused",
            format!(
                "the caller ({}, {}) may not: {e}",
                cx.actor,
                cx.role.as_str()
            ),
        ));
    }
    if tool.destructive() && agent.approval == Approval::Destructive {
        return Err((
            "needs_approval",
            format!(
                "`{name}` changes the fleet and needs a person's approval; agent `{}` may not do it alone (its `approval` is `destructive`). Tell the user what you would run instead.",
                agent.name
            ),
        ));
    }
    Ok((tool, cx, args))
}

async fn run(
    cp: &Arc<ControlPlane>,
    cx: &OpCtx,
    caller: &Caller,
    tool: Tool,
    args: &Json,
    depth: u32,
) -> Result<String, String> {
    match tool {
        Tool::ReadFleet => read_fleet(cp, cx).await,
        Tool::Probe => {
            let work = Work::Probe {
                http: args.get("http").and_then(Json::as_str).map(str::to_owned),
                tcp: args.get("tcp").and_then(Json::as_str).map(str::to_owned),
                timeout: Some(Duration::from_secs(10)),
            };
            job(cp, cx, &text(args, "node")?, work, true).await
        }
        Tool::Exec => {
            let list = args
                .get("args")
                .and_then(Json::as_array)
                .cloned()
                .unwrap_or_default();
            let argv = list
                .iter()
                .map(|a| {
                    a.as_str()
                        .map(str::to_owned)
                        .ok_or("each of `args` is text")
                })
                .collect::<Result<Vec<_>, _>>()?;
            let work = Work::Exec {
                op: text(args, "op")?,
                args: argv,
            };
            job(cp, cx, &text(args, "node")?, work, false).await
        }
        Tool::Deploy => {
            let service = text(args, "service")?;
            if args.get("action").and_then(Json::as_str) == Some("rollback") {
                let to = args.get("revision").and_then(Json::as_str);
                let pin = cp
                    .rollback_service(&service, to, cx)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(format!(
                    "`{service}` is pinned to revision {} until the map changes it",
                    pin.revision
                ))
            } else {
                cp.request_reconcile(cx).map_err(|e| e.to_string())?;
                Ok(format!(
                    "a reconcile of the fleet was asked for; `{service}` follows the map"
                ))
            }
        }
        Tool::Wake => {
            let node = text(args, "node")?;
            let w = cp.wake_node(&node, cx).await.map_err(|e| e.to_string())?;
            Ok(serde_json::to_string(&w).unwrap_or_else(|_| format!("waking `{node}`")))
        }
        Tool::AskAgent => {
            if depth + 1 > super::MAX_DEPTH {
                return Err(format!(
                    "agents may ask agents at most {} deep",
                    super::MAX_DEPTH
                ));
            }
            let other = text(args, "agent")?;
            let question = text(args, "question")?;
            let messages = vec![json!({"role": "user", "content": question})];
            let r = cp
                .ask_agent(caller, &other, messages, depth + 1)
                .await
                .map_err(|e| e.to_string())?;
            Ok(r.text)
        }
    }
}

async fn read_fleet(cp: &Arc<ControlPlane>, cx: &OpCtx) -> Result<String, String> {
    let nodes = cp.nodes_view(cx).await.map_err(|e| e.to_string())?;
    let services = cp.services().await.map_err(|e| e.to_string())?;
    let out = json!({
        "nodes": nodes.iter().map(|n| json!({"name": n.name, "status": n.status, "labels": n.labels})).collect::<Vec<_>>(),
        "services": services.iter().map(|s| json!({
            "name": s.name, "status": s.status, "revision": s.revision,
            "healthy": s.healthy, "replicas": s.replicas, "message": s.message})).collect::<Vec<_>>(),
    });
    Ok(out.to_string())
}

/// A job on one node, waited for: its state, exit status and output's last lines.
async fn job(
    cp: &Arc<ControlPlane>,
    cx: &OpCtx,
    node: &str,
    work: Work,
    idempotent: bool,
) -> Result<String, String> {
    work.validate()?;
    let rec = cp
        .create_job(
            NewJob {
                work,
                target: Target::Node(node.to_owned()),
                deadline: Some(Duration::from_secs(120)),
                idempotent,
                max_attempts: Some(1),
            },
            cx,
        )
        .await
        .map_err(|e| e.to_string())?;
    let done = cp
        .wait_job(rec.id, Duration::from_secs(150))
        .await
        .map_err(|e| e.to_string())?;
    let lines = cp
        .store
        .job_logs(rec.id, None, 200)
        .await
        .map_err(|e| e.to_string())?;
    let skip = lines.len().saturating_sub(40);
    let tail: Vec<String> = lines
        .into_iter()
        .skip(skip)
        .filter(|l| l.stream != "agent")
        .map(|l| l.line)
        .collect();
    Ok(json!({
        "job": rec.id,
        "state": done.state.as_str(),
        "succeeded": done.state == JobState::Succeeded,
        "exit_code": done.exit_code,
        "error": done.error,
        "result": done.output,
        "output": tail,
    })
    .to_string())
}
