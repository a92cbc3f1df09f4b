//! The gateway's last tier: when no node has a model at all, pull it onto the node that can
//! serve it best (Ollama, [`nebula_placement::Order::Pull`]) and wait until that node reports it.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::Response;
use nebula_protocol::ai::model_base;
use serde_json::json;
use uuid::Uuid;

use super::super::pulls;
use super::super::{AiConfig, Claim};
use super::{error, Caller};
use crate::ControlPlane;

/// Pull `model` for `caller` when it may. `Ok(Some(why))`: the pull failed or was not allowed
/// (the request goes on and says why when nothing else serves it); `Err`: the answer to give
/// now (the caller is at its limit of pulls in flight).
pub(super) async fn pull_tier(
    cp: &Arc<ControlPlane>,
    cfg: &AiConfig,
    caller: &Caller,
    model: &str,
) -> Result<Option<String>, Response> {
    if let Err(refused) = pulls::may_pull(cfg, caller.scope, model) {
        return Ok(refused.reason().map(str::to_owned));
    }
    match pull_on_demand(cp, model, cfg, &caller.name).await {
        Ok(()) | Err(PullError::NoNode) => Ok(None),
        Err(PullError::Failed(e)) => Ok(Some(e)),
        Err(PullError::OverLimit(n)) => Err(error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "too_many_pulls",
            format!(
                "no online node serves model `{model}`, and this token has {n} model pulls in flight, its limit (ai.max_pulls_per_token): retry when one is done"
            ),
        )),
    }
}

/// Gives back a pull claim that has no job yet.
struct Unclaim<'a> {
    cp: &'a ControlPlane,
    key: &'a (Uuid, String),
}

impl Drop for Unclaim<'_> {
    fn drop(&mut self) {
        self.cp.ai.set_pull_in_flight(self.key.clone(), None);
    }
}

/// Why a pull on demand gave no model.
enum PullError {
    /// No node can pull it: the request goes on as if there were no such tier.
    NoNode,
    /// The caller has this many pulls in flight, its `max_pulls_per_token`: none was started.
    OverLimit(u32),
    /// The pull failed, or its model did not show up: why.
    Failed(String),
}

/// Pull `model` onto the best node with a healthy Ollama (most free VRAM, fewest requests in
/// flight) for `who` and wait until that node reports it. One pull per node and model at a
/// time: other requests for it wait on the same job. A node whose pull failed is passed over
/// for that model for `failed_pull_cooldown` ([`super::AiFleet::pull_failed`]). The job and
/// its audit rows name `who`, and count against its `max_pulls_per_token`.
async fn pull_on_demand(
    cp: &Arc<ControlPlane>,
    model: &str,
    cfg: &AiConfig,
    who: &str,
) -> Result<(), PullError> {
    let Some((node_id, node)) = cp.ai.pull_target(
        model,
        cfg.failed_pull_cooldown,
        |id| cp.registry.is_online(id),
        |id| cp.telemetry.free_vram(id),
    ) else {
        return Err(PullError::NoNode);
    };
    let key = (node_id, model_base(model).to_owned());
    // Model jobs not over yet: a claim whose job is not among them is not in flight.
    let live: std::collections::HashSet<Uuid> = cp
        .model_jobs_in_flight()
        .into_iter()
        .map(|(id, ..)| id)
        .collect();
    let job = match cp
        .ai
        .claim_pull(&key, who, cfg.max_pulls_per_token, |j| live.contains(&j))
    {
        Claim::OverLimit(n) => return Err(PullError::OverLimit(n)),
        Claim::Joined(Some(job)) => job,
        Claim::Joined(None) => {
            // Another request is starting this pull: wait for its job.
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                match cp.ai.pull_job(&key) {
                    Some(Some(job)) => break job,
                    Some(None) if tokio::time::Instant::now() < until => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    // Over already (or stuck): route with what the fleet has now.
                    _ => return Ok(()),
                }
            }
        }
        Claim::Start => {
            // Dropped before the job exists (the client went away), the claim would stay taken
            // with no job, and no pull of this model onto this node would ever start again.
            let claim = Unclaim { cp, key: &key };
            let rec = cp
                .create_job(
                    crate::jobs::NewJob {
                        work: crate::jobs::model::Work::Model {
                            action: crate::jobs::model::ModelActionKind::Pull,
                            name: Some(model.to_owned()),
                            url: None,
                            file: None,
                            sha256: None,
                            backend: None,
                        },
                        target: crate::jobs::model::Target::Node(node.clone()),
                        deadline: Some(cfg.load_timeout),
                        idempotent: false,
                        max_attempts: Some(1),
                    },
                    // Allowed by the gateway's own rule (`ai.pull_on_demand`), checked above;
                    // audited under the token that asked.
                    &crate::authz::OpCtx::internal(who),
                )
                .await
                .map_err(|e| {
                    PullError::Failed(format!("starting a pull of `{model}` on {node}: {e}"))
                })?;
            cp.audit(
                who,
                "ai.pull_on_demand",
                model,
                json!({"node": node, "job": rec.id}),
            );
            tracing::info!(%model, %node, %who, job = %rec.id, "pulling a model for a request");
            std::mem::forget(claim);
            cp.ai.set_pull_in_flight(key.clone(), Some(rec.id));
            rec.id
        }
    };
    let deadline = tokio::time::Instant::now() + cfg.load_timeout;
    let outcome = loop {
        let rec = cp
            .job(job)
            .await
            .map_err(|e| PullError::Failed(e.to_string()))?;
        match rec {
            Some(r) if r.state.is_terminal() => {
                if r.state == crate::jobs::model::JobState::Succeeded {
                    break Ok(());
                }
                let why = format!(
                    "pulling `{model}` on {node} failed: {}",
                    r.error.or(r.reason).unwrap_or_default()
                );
                // The node could not pull it (a name its registry does not have, its Ollama
                // down): asking it again at every request would start a job each time, and
                // delay each request that another node or the fallback could answer. A pull cut
                // short (a deadline, a lost node) may be tried again.
                if r.state == crate::jobs::model::JobState::Failed {
                    cp.ai
                        .pull_failed(node_id, model, &why, cfg.failed_pull_cooldown);
                }
                break Err(why);
            }
            None => break Err(format!("the pull of `{model}` on {node} vanished")),
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            break Err(format!(
                "pulling `{model}` on {node} took longer than the load timeout"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    cp.ai.set_pull_in_flight(key, None);
    outcome.map_err(PullError::Failed)?;
    // The agent reads its backends again right after the job: wait for the model to show up.
    while tokio::time::Instant::now() < deadline {
        if !cp
            .ai
            .candidates(model, 0, |id| id == node_id, |_| 0, true)
            .is_empty()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(PullError::Failed(format!(
        "{node} pulled `{model}` but does not report it"
    )))
}
