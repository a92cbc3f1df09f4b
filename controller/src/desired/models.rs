//! Desired models (`models:` in the service map): every target node's backend must have each
//! model. A missing one is pulled (a `model` job, one at a time per node and model; a failed pull
//! is not retried until the map is applied again). Models on nodes that the map does not ask for
//! are reported as extra and left alone.

pub use nebula_types::api::models::{ExtraModel, ModelStatus, ModelsView};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nebula_protocol::ai::same_model;
use tracing::{info, warn};
use uuid::Uuid;

use super::plan::{Desired, DesiredModel};
use crate::jobs::model::{JobState, ModelActionKind, Target, Work};
use crate::jobs::NewJob;
use crate::{ControlPlane, OpError};

/// A pull the reconciler started.
#[derive(Debug, Clone)]
pub(crate) struct ModelPull {
    pub job: Uuid,
    /// Set when the pull failed: not retried until the map is applied again.
    pub failed: Option<String>,
}

/// The nodes a declaration targets: (name, id).
fn targets(decl: &DesiredModel, nodes: &[crate::store::NodeRecord]) -> Vec<(String, Uuid)> {
    nodes
        .iter()
        .filter(|n| {
            if decl.nodes.is_empty() {
                nebula_placement::labels_match(&decl.labels, &n.labels)
            } else {
                decl.nodes.contains(&n.name)
            }
        })
        .map(|n| (n.name.clone(), n.id))
        .collect()
}

fn has_model(cp: &ControlPlane, node: Uuid, decl: &DesiredModel, model: &str) -> Option<bool> {
    let inv = cp.ai.inventory();
    let (_, inv) = inv.values().find(|(id, _)| *id == node)?;
    Some(inv.backends.iter().any(|b| {
        decl.backend.as_ref().is_none_or(|n| &b.name == n)
            && b.models.iter().any(|m| same_model(&m.name, model))
    }))
}

/// Start the pulls the map needs.
pub(crate) async fn reconcile(cp: &Arc<ControlPlane>, desired: &Desired) -> Result<(), OpError> {
    if desired.models.is_empty() {
        return Ok(());
    }
    let nodes = cp.store.list_nodes().await?;
    for (model, decl) in &desired.models {
        for (node, id) in targets(decl, &nodes) {
            if !cp.registry.is_online(id) || has_model(cp, id, decl, model) != Some(false) {
                continue;
            }
            let key = (model.clone(), node.clone());
            let existing = cp.desired.lock().model_pulls.get(&key).cloned();
            if let Some(p) = existing {
                if p.failed.is_some() {
                    continue;
                }
                match cp.job(p.job).await? {
                    Some(rec) if !rec.state.is_terminal() => continue,
                    Some(rec) if rec.state != JobState::Succeeded => {
                        let why = rec
                            .error
                            .or(rec.reason)
                            .unwrap_or_else(|| rec.state.as_str().into());
                        warn!(%model, %node, "model pull failed: {why}");
                        cp.desired.lock().model_pulls.insert(
                            key,
                            ModelPull {
                                job: p.job,
                                failed: Some(why),
                            },
                        );
                        continue;
                    }
                    // Pulled: the inventory shows it at the agent's next report.
                    Some(rec)
                        if rec.finished_at.is_some_and(|t| {
                            crate::store::millis(std::time::SystemTime::now()) - t < 30_000
                        }) =>
                    {
                        continue
                    }
                    _ => {}
                }
            }
            let rec = cp
                .create_job(
                    NewJob {
                        work: Work::Model {
                            action: ModelActionKind::Pull,
                            name: Some(model.clone()),
                            url: None,
                            file: None,
                            sha256: None,
                            backend: decl.backend.clone(),
                        },
                        target: Target::Node(node.clone()),
                        deadline: Some(Duration::from_secs(6 * 3600)),
                        idempotent: false,
                        max_attempts: Some(1),
                    },
                    &crate::authz::OpCtx::internal("reconciler"),
                )
                .await?;
            info!(%model, %node, job = %rec.id, "pulling a desired model");
            cp.desired.lock().model_pulls.insert(
                key,
                ModelPull {
                    job: rec.id,
                    failed: None,
                },
            );
        }
    }
    Ok(())
}

impl ControlPlane {
    /// Desired models against what the nodes hold, and what they hold beyond it.
    pub async fn models_view(&self) -> Result<ModelsView, OpError> {
        let Some(active) = self.desired.active() else {
            return Ok(ModelsView::default());
        };
        let nodes = self.store.list_nodes().await?;
        let pulls = self.desired.lock().model_pulls.clone();
        let mut view = ModelsView::default();
        let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (model, decl) in &active.desired.models {
            for (node, id) in targets(decl, &nodes) {
                wanted.entry(node.clone()).or_default().push(model.clone());
                let pull = pulls.get(&(model.clone(), node.clone()));
                let present = has_model(self, id, decl, model);
                let (state, percent, message) = match (present, pull) {
                    (Some(true), _) => ("present", None, None),
                    (_, Some(p)) if p.failed.is_some() => ("failed", None, p.failed.clone()),
                    (_, Some(p)) => match self.job_progress_of(p.job) {
                        Some((pct, msg)) => ("pulling", Some(pct), Some(msg)),
                        None => ("pulling", None, None),
                    },
                    _ if !self.registry.is_online(id) => {
                        ("waiting", None, Some("node offline".into()))
                    }
                    _ => ("waiting", None, None),
                };
                view.desired.push(ModelStatus {
                    model: model.clone(),
                    node,
                    state: state.to_owned(),
                    percent,
                    job: pull.map(|p| p.job),
                    message,
                });
            }
        }
        for (node, (_, inv)) in self.ai.inventory() {
            let mine = wanted.get(&node);
            for b in &inv.backends {
                for m in &b.models {
                    if !mine.is_some_and(|w| w.iter().any(|x| same_model(x, &m.name))) {
                        view.extra.push(ExtraModel {
                            node: node.clone(),
                            backend: b.name.clone(),
                            model: m.name.clone(),
                        });
                    }
                }
            }
        }
        Ok(view)
    }
}
