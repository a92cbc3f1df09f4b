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

/// Carry out a task. `resumed`: the step was already under way before the driver (re)started,
/// so an action that may not be repeated (a rollback) is only waited for.
pub async fn run(
    cp: Arc<ControlPlane>,
    cx: OpCtx,
    at: Place,
    task: Task,
    resumed: bool,
) -> Outcome {
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
        } => deploy(&cp, &cx, &service, rollback, revision.as_deref(), resumed).await,
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
        fresh: true,
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

/// How long a deploy step waits for its service at most (a step `timeout` may end it sooner).
const DEPLOY_WAIT: Duration = Duration::from_secs(30 * 60);

/// Apply (reconcile now) or roll back a service, then wait until it is converged with every
/// replica healthy, or has failed.
async fn deploy(
    cp: &Arc<ControlPlane>,
    cx: &OpCtx,
    service: &str,
    rollback: bool,
    revision: Option<&str>,
    resumed: bool,
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
    if rollback && !resumed {
        let pin = cp
            .rollback_service(service, revision, cx)
            .await
            .map_err(|e| e.to_string())?;
        pinned = Some(pin.revision);
    } else if !resumed {
        cp.request_reconcile(cx).map_err(|e| e.to_string())?;
    }
    let until = tokio::time::Instant::now() + DEPLOY_WAIT;
    // The reconciler's first pass after the change: a status read before it may still say
    // `converged` for the revision that ran before.
    tokio::time::sleep(Duration::from_millis(500)).await;
    loop {
        let services = cp.services().await.map_err(|e| e.to_string())?;
        let s = services
            .iter()
            .find(|s| s.name == service)
            .ok_or_else(|| format!("`{service}` is no longer declared"))?;
        let want = pinned.as_deref().or(s.revision.as_deref());
        let at_revision = want.is_some() && s.revision.as_deref() == want;
        match s.status.as_str() {
            "converged" if at_revision && s.healthy >= s.replicas => {
                return Ok(json!({
                    "service": service,
                    "revision": s.revision,
                    "healthy": s.healthy,
                    "replicas": s.replicas,
                    "rolled_back": rollback,
                }))
            }
            "failed" | "refused" => {
                return Err(format!(
                    "`{service}` {}: {}",
                    s.status,
                    s.message.clone().unwrap_or_default()
                ))
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= until {
            return Err(format!(
                "`{service}` is still {} after {}",
                s.status,
                humantime::format_duration(DEPLOY_WAIT)
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
