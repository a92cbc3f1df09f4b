//! Steps the controller carries out itself (sleep, notify, deploy), and the gateway's routing
//! as the AI steps see it. Each acts with the run's context (its starter's role) and is
//! audited like the same operation asked for by hand.

use std::sync::Arc;
use std::time::Duration;

use nebula_workflows::engine::Outcome;
use serde_json::json;
use uuid::Uuid;

use super::steps::{self, Route, Routed, Task};
use crate::authz::{Change, Op, OpCtx};
use crate::jobs::JobKey;
use crate::ControlPlane;

/// The gateway's routing over the fleet as it is now.
pub struct FleetRoute<'a>(pub &'a ControlPlane);

fn pick(cands: Vec<crate::ai::Candidate>, node: Option<&str>) -> Option<Routed> {
    cands
        .into_iter()
        .find(|c| node.is_none_or(|n| c.node == n))
        .map(|c| Routed {
            node: c.node,
            backend: c.backend,
            model: c.model,
        })
}

impl Route for FleetRoute<'_> {
    fn text(&self, model: &str, node: Option<&str>) -> Result<Routed, String> {
        let cp = self.0;
        let cands = cp.ai.candidates(
            model,
            0,
            |id| cp.registry.is_online(id),
            |id| cp.telemetry.free_vram(id),
            false,
        );
        pick(cands, node).ok_or_else(|| match node {
            Some(n) => format!(
                "`{n}` does not serve model `{model}` now (GET /v1/models lists where it is)"
            ),
            None => {
                format!("no online node serves model `{model}` now (GET /v1/models lists them)")
            }
        })
    }

    fn image(&self, model: Option<&str>, node: Option<&str>) -> Result<Routed, String> {
        let cp = self.0;
        let cands = cp.ai.image_candidates(
            model,
            |id| cp.registry.is_online(id),
            |id| cp.telemetry.free_vram(id),
        );
        pick(cands, node).ok_or_else(|| {
            let what = model.map_or("an image backend".to_owned(), |m| {
                format!("checkpoint `{m}`")
            });
            match node {
                Some(n) => format!("`{n}` has no healthy Stable Diffusion backend with {what} now"),
                None => {
                    format!("no online node has a healthy Stable Diffusion backend with {what}")
                }
            }
        })
    }
}

/// Where a step's task is: its run, step and attempt (the key of anything it makes).
#[derive(Debug, Clone)]
pub struct Place {
    pub run: Uuid,
    pub step: String,
    pub attempt: u32,
    pub workflow: String,
}

impl Place {
    fn key(&self) -> String {
        format!("{}/{}/{}", self.run, self.step, self.attempt)
    }
}

/// Carry out a task. It may run again for the same attempt (after a restart): what it makes
/// is found again (the sleep job by its key, a rollback by its pin), a message goes under the
/// same id.
pub async fn run(cp: Arc<ControlPlane>, cx: OpCtx, at: Place, task: Task) -> Outcome {
    let r = match task {
        Task::Sleep { node } => sleep(&cp, &cx, &at, &node).await,
        Task::Notify {
            sink,
            title,
            message,
            severity,
        } => notify(&cp, &cx, &at, &sink, &title, &message, &severity).await,
        Task::Deploy {
            service,
            rollback,
            revision,
        } => deploy(&cp, &cx, &service, rollback, revision.as_deref()).await,
        Task::Agent { agent, prompt } => ask(&cp, &cx, &agent, &prompt).await,
    };
    match r {
        Ok(out) => Outcome::Succeeded(steps::cap(out)),
        Err(e) => Outcome::Failed(e),
    }
}

/// The node's sleep command as a job keyed by the step's attempt (found again, not made twice,
/// after a restart), waited for.
async fn sleep(
    cp: &Arc<ControlPlane>,
    cx: &OpCtx,
    at: &Place,
    node: &str,
) -> Result<serde_json::Value, String> {
    cp.authorize(cx, Op::SleepNode).map_err(|e| e.to_string())?;
    let job = cp.sleep_job(node).map_err(|e| e.to_string())?;
    let key = JobKey {
        id: Uuid::now_v7(),
        key: at.key(),
        fresh: false,
    };
    let rec = cp
        .create_job_keyed(job, Some(key), cx)
        .await
        .map_err(|e| format!("the sleep job was not made: {e}"))?;
    cp.record(
        cx,
        Change {
            action: "node.sleep",
            target: node.to_owned(),
            detail: json!({ "job": rec.id, "run": at.run, "step": at.step }),
            event: None,
        },
    );
    let done = cp
        .wait_job(rec.id, Duration::from_secs(120))
        .await
        .map_err(|e| e.to_string())?;
    if done.state == crate::jobs::JobState::Succeeded {
        Ok(json!({"node": node, "job": rec.id}))
    } else {
        Err(format!(
            "the sleep command ended {}: {}",
            done.state,
            done.error.clone().unwrap_or_default()
        ))
    }
}

/// One message through a sink, with an id made from the step's attempt (a receiver that
/// dedupes by it sees a message resent after a restart once).
async fn notify(
    cp: &Arc<ControlPlane>,
    cx: &OpCtx,
    at: &Place,
    sink: &str,
    title: &str,
    message: &str,
    severity: &str,
) -> Result<serde_json::Value, String> {
    cp.authorize(cx, Op::ManageAlerts)
        .map_err(|e| e.to_string())?;
    let id = format!("msg_{}_{}_{}", at.run.simple(), at.step, at.attempt);
    let link = cp
        .config
        .public_url
        .as_deref()
        .map(|u| format!("{}/ui/workflows/runs/{}", u.trim_end_matches('/'), at.run));
    let data = json!({
        "title": if title.is_empty() { format!("Workflow {}", at.workflow) } else { title.to_owned() },
        "text": message,
        "severity": severity,
        "workflow": at.workflow,
        "run": at.run,
        "step": at.step,
        "link": link,
    });
    cp.send_to_sink(sink, &id, "workflow.notify", data)
        .await
        .map_err(|e| format!("the message was not delivered: {e}"))?;
    cp.record(
        cx,
        Change {
            action: "workflow.notify",
            target: sink.to_owned(),
            detail: json!({ "run": at.run, "step": at.step, "message": id }),
            event: None,
        },
    );
    Ok(json!({"sink": sink, "message_id": id}))
}

/// An agent's answer to the step's prompt; its tools act as the run (its starter's role).
async fn ask(
    cp: &Arc<ControlPlane>,
    cx: &OpCtx,
    agent: &str,
    prompt: &str,
) -> Result<serde_json::Value, String> {
    let caller = crate::ai::gateway::Caller::of(cx);
    let messages = vec![json!({"role": "user", "content": prompt})];
    let r = cp
        .ask_agent(&caller, agent, messages, 0)
        .await
        .map_err(|e| e.to_string())?;
    if !r.finished {
        return Err(r.text);
    }
    Ok(json!({
        "text": r.text,
        "agent": r.agent,
        "turns": r.turns,
        "model": r.model,
        "node": r.node,
        "tool_calls": r.tool_calls,
    }))
}

/// How long a deploy step waits for its service at most (a step `timeout` may end it sooner).
const DEPLOY_WAIT: Duration = Duration::from_secs(30 * 60);

/// Apply (reconcile now) or roll back a service, then wait until it is converged with every
/// replica healthy (seen twice, a second apart), or has failed. A run rolls a service back
/// once: a pin this run made already is waited for, not made again (a retry would otherwise
/// roll back one revision further).
async fn deploy(
    cp: &Arc<ControlPlane>,
    cx: &OpCtx,
    service: &str,
    rollback: bool,
    revision: Option<&str>,
) -> Result<serde_json::Value, String> {
    let declared = cp
        .desired
        .active()
        .is_some_and(|a| a.desired.services.contains_key(service));
    if !declared {
        return Err(format!(
            "no service named `{service}` is declared in the service map"
        ));
    }
    let mut pinned = None;
    if rollback {
        let pins = cp.store.pins().await.map_err(|e| e.to_string())?;
        let mine = pins
            .into_iter()
            .find(|p| p.service == service && p.created_by == cx.actor);
        pinned = Some(match mine {
            Some(p) => p.revision,
            None => {
                cp.rollback_service(service, revision, cx)
                    .await
                    .map_err(|e| e.to_string())?
                    .revision
            }
        });
    } else {
        cp.request_reconcile(cx).map_err(|e| e.to_string())?;
    }
    let until = tokio::time::Instant::now() + DEPLOY_WAIT;
    let mut converged = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let services = cp.services().await.map_err(|e| e.to_string())?;
        let s = services
            .iter()
            .find(|s| s.name == service)
            .ok_or_else(|| format!("`{service}` is no longer declared"))?;
        if !rollback {
            if let Some(map) = &s.pinned_over {
                return Err(format!(
                    "`{service}` is pinned to revision {} over the map's {map} (a rollback); change the service in the map to deploy it again",
                    s.revision.as_deref().unwrap_or("?")
                ));
            }
        }
        let want = pinned.as_deref().or(s.revision.as_deref());
        let at_revision = want.is_some() && s.revision.as_deref() == want;
        match s.status.as_str() {
            "converged" if at_revision && s.healthy >= s.replicas => {
                converged += 1;
                if converged >= 2 {
                    return Ok(json!({
                        "service": service,
                        "revision": s.revision,
                        "healthy": s.healthy,
                        "replicas": s.replicas,
                        "rolled_back": rollback,
                    }));
                }
            }
            "failed" | "refused" => {
                return Err(format!(
                    "`{service}` {}: {}",
                    s.status,
                    s.message.clone().unwrap_or_default()
                ))
            }
            _ => converged = 0,
        }
        if tokio::time::Instant::now() >= until {
            return Err(format!(
                "`{service}` is still {} after {}",
                s.status,
                humantime::format_duration(DEPLOY_WAIT)
            ));
        }
    }
}
