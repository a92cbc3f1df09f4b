//! Desired state: the service map in force, plans, services (desired against actual) and
//! their deployment history.

use nebula_desired::map::Problem;
use nebula_desired::plan::Plan;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `GET /api/v1/desired`: the map in force (`version: None` when there is none), and why the
/// watched file was not taken, if it was not.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DesiredView {
    pub version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The YAML text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<String>,
    #[serde(default)]
    pub warnings: Vec<Problem>,
    pub file_error: Option<FileRejection>,
}

/// Why the watched service-map file was not taken (the map in force stays).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FileRejection {
    pub path: String,
    /// Unix milliseconds.
    pub at: i64,
    pub problems: Vec<Problem>,
}

/// `PUT /api/v1/desired`: the version stored and the plan it starts.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Applied {
    pub version: i64,
    /// False when the map was the one in force already (failed revisions are retried anyway).
    pub changed: bool,
    pub warnings: Vec<Problem>,
    pub plan: Plan,
}

/// A plan with what it was computed from.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PlanView {
    /// The map version planned (`None`: a proposed map, or none in force).
    pub version: Option<i64>,
    pub warnings: Vec<Problem>,
    #[serde(flatten)]
    pub plan: Plan,
}

impl PlanView {
    /// The plan as someone who may not read inline values sees it: `env.*` changes keep
    /// their secret references, `***` in place of any other text.
    pub fn redact_inline_values(&mut self) {
        redact_changes(&mut self.plan);
    }
}

/// `env.*` field changes of a plan's updates, redacted (see [`PlanView::redact_inline_values`]).
pub fn redact_changes(plan: &mut Plan) {
    use nebula_desired::map::secrets::redact_inline;
    use nebula_desired::plan::Action;
    for a in plan.actions.iter_mut() {
        if let Action::Update { changes, .. } = a {
            for c in changes.iter_mut().filter(|c| c.field.starts_with("env.")) {
                for v in [&mut c.from, &mut c.to].into_iter().flatten() {
                    if let serde_json::Value::String(s) = v {
                        *s = redact_inline(s);
                    }
                }
            }
        }
    }
}

/// One container of a service as observed.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ServiceContainer {
    pub node: String,
    pub name: String,
    pub revision: String,
    pub state: String,
    pub health: String,
}

/// A service: desired against actual.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ServiceView {
    pub name: String,
    /// False for an orphan (managed containers of a service the map no longer declares).
    pub declared: bool,
    pub image: Option<String>,
    /// The revision wanted now (the map's, or a rollback pin's).
    pub revision: Option<String>,
    /// The map's own revision when a rollback pin overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_over: Option<String>,
    pub replicas: u32,
    /// The revision that runs when it is not the wanted one (after a failed update rolled
    /// back, or while an update is under way); `running` and `healthy` count its containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_revision: Option<String>,
    /// Containers of the revision in force (the wanted one once any runs, else
    /// `serving_revision`) that run, and that run healthy.
    pub running: u32,
    pub healthy: u32,
    /// converged, deploying, pending, refused (a node's deploy policy would refuse it; the
    /// message is its agent's), waiting, failed, orphan.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub containers: Vec<ServiceContainer>,
    /// The deploy jobs running now, if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deploy_jobs: Vec<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_deployment: Option<DeploymentRecord>,
}

/// One deployment of a revision of a service to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeploymentRecord {
    pub id: Uuid,
    pub service: String,
    pub node_id: Uuid,
    pub node: String,
    /// create, update, repair, remove, rollback.
    pub action: String,
    pub revision: String,
    pub previous: Vec<String>,
    /// The container spec deployed (JSON; kept for rollbacks, not shown).
    #[serde(skip)]
    pub spec: String,
    pub trigger: String,
    /// running, deployed, removed, rolled-back, failed, cancelled, timed-out, lost.
    pub outcome: String,
    pub message: Option<String>,
    pub job_id: Option<Uuid>,
    pub desired_version: Option<i64>,
    /// Unix milliseconds.
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

/// `GET /api/v1/services/{name}`: the service (absent once it is gone) and its history.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ServiceDetail {
    pub service: Option<ServiceView>,
    pub history: Vec<DeploymentRecord>,
}

/// `POST /api/v1/services/{name}/rollback`: the revision pinned, until when.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RolledBack {
    pub service: String,
    pub revision: String,
    pub until: String,
}

/// `POST /api/v1/services/{name}/rollback`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// A revision (or a unique prefix of at least 4 characters); absent: the previous one.
    pub to: Option<String>,
}

/// `POST /api/v1/reconcile`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ReconcileStarted {
    pub reconcile: String,
}
