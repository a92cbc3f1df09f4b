//! Workflows: definitions (`workflows.yml`, watched like the service map, and the API), runs
//! started by people, and the `workflow-driver` task that carries them out.
//!
//! The engine's rules are pure and live in `nebula-workflows`; this module stores and acts.
//! Every change to a run goes through the driver (one task, leader scope): operations send it
//! a command and answer once the driver has stored the change. Steps that run on a node are
//! jobs of the job engine (routing, leases, logs, audit and the agent's journal apply), made
//! in the name of whoever started the run and with that person's role.

mod advance;
mod driver;
mod local;
mod steps;
pub mod triggers;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use nebula_types::api::workflows::{Decide, RunView, StepView, WorkflowView};
use nebula_types::auth::Role;
use nebula_workflows::engine::{self, StepRun};
use nebula_workflows::spec::{self, Workflow};
use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::authz::{Change, Op, OpCtx};
use crate::store::workflows::{RunRecord, WorkflowDefRecord};
use crate::{ControlPlane, OpError};

/// How long an operation waits for the driver to store its change.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Runs listed at most.
const MAX_LIST: u32 = 500;

/// A run to admit.
pub(crate) struct NewRun {
    pub workflow: Arc<Workflow>,
    pub inputs: Json,
    pub trigger: Json,
    pub group: Option<String>,
    pub created_by: String,
    pub created_role: Role,
}

pub(crate) type Decision = Decide;

pub(crate) enum Cmd {
    Start {
        run: Box<NewRun>,
        reply: oneshot::Sender<Result<RunRecord, OpError>>,
    },
    Cancel {
        id: Uuid,
        by: String,
        reply: oneshot::Sender<Result<RunRecord, OpError>>,
    },
    Decide {
        id: Uuid,
        decision: Decision,
        by: String,
        reply: oneshot::Sender<Result<(), OpError>>,
    },
}

/// The driver's mailbox.
pub struct WorkflowBook {
    tx: mpsc::UnboundedSender<Cmd>,
    rx: Mutex<mpsc::UnboundedReceiver<Cmd>>,
    /// Raised whenever a definition changes (the triggers read them again).
    pub(crate) version: std::sync::atomic::AtomicU64,
}

impl WorkflowBook {
    fn changed(&self) {
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Default for WorkflowBook {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        WorkflowBook {
            tx,
            rx: Mutex::new(rx),
            version: Default::default(),
        }
    }
}

impl std::fmt::Debug for WorkflowBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowBook").finish_non_exhaustive()
    }
}

/// The `workflow-driver` task.
pub async fn drive(cp: Arc<ControlPlane>, cancel: CancellationToken) {
    let mut rx = cp.workflows.rx.lock().await;
    driver::Driver::new(cp.clone()).run(&mut rx, cancel).await;
}

fn rfc3339(ms: i64) -> String {
    crate::store::rfc3339_millis(crate::store::from_millis(ms))
}

fn run_view(rec: &RunRecord) -> RunView {
    RunView {
        id: rec.id,
        workflow: rec.workflow.clone(),
        state: rec.state.clone(),
        inputs: serde_json::from_str(&rec.inputs).unwrap_or(Json::Null),
        trigger: serde_json::from_str(&rec.trigger).unwrap_or(Json::Null),
        concurrency_group: rec.group.clone(),
        cancel_requested: rec.cancelled,
        created_by: rec.created_by.clone(),
        created_at: rfc3339(rec.created_at),
        started_at: rec.started_at.map(rfc3339),
        finished_at: rec.finished_at.map(rfc3339),
        error: rec.error.clone(),
        steps: Vec::new(),
    }
}

fn def_view(d: &WorkflowDefRecord) -> Result<WorkflowView, OpError> {
    let w: Workflow = serde_json::from_str(&d.definition)
        .map_err(|e| OpError::Invalid(format!("workflow `{}` does not read: {e}", d.name)))?;
    Ok(WorkflowView {
        name: d.name.clone(),
        description: w.description.clone(),
        source: d.source.clone(),
        steps: w.steps.len(),
        updated_by: d.updated_by.clone(),
        updated_at: rfc3339(d.updated_at),
        definition: serde_json::to_value(&w).unwrap_or(Json::Null),
    })
}

impl ControlPlane {
    async fn send<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, OpError>>) -> Cmd,
    ) -> Result<T, OpError> {
        let (tx, rx) = oneshot::channel();
        self.workflows
            .tx
            .send(make(tx))
            .map_err(|_| OpError::Conflict("the workflow driver has stopped".into()))?;
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(OpError::Conflict(
                "the change was not stored (this controller stopped leading); try again".into(),
            )),
            Err(_) => Err(OpError::Conflict(
                "the workflow driver did not answer (is this replica leading?); try again".into(),
            )),
        }
    }

    /// Every workflow.
    pub async fn workflows_list(&self, cx: &OpCtx) -> Result<Vec<WorkflowView>, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        self.store
            .workflow_defs()
            .await?
            .iter()
            .map(def_view)
            .collect()
    }

    pub async fn workflow_get(&self, cx: &OpCtx, name: &str) -> Result<WorkflowView, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        let d = self
            .store
            .workflow_def(name)
            .await?
            .ok_or_else(|| OpError::NotFound(format!("no workflow named `{name}`")))?;
        def_view(&d)
    }

    /// Define (or replace) a workflow through the API, from YAML or JSON text.
    pub async fn workflow_put(
        &self,
        cx: &OpCtx,
        name: &str,
        text: &str,
    ) -> Result<WorkflowView, OpError> {
        self.authorize(cx, Op::ManageWorkflows)?;
        let w = spec::check_one(name, text).map_err(|e| OpError::Invalid(e.to_string()))?;
        if let Some(old) = self.store.workflow_def(name).await? {
            if old.source == "file" {
                return Err(OpError::Conflict(format!(
                    "workflow `{name}` is defined in workflows.yml; change it there"
                )));
            }
        }
        let rec = WorkflowDefRecord {
            name: name.to_owned(),
            source: "api".into(),
            definition: serde_json::to_string(&w).map_err(|e| OpError::Invalid(e.to_string()))?,
            updated_by: cx.actor.clone(),
            updated_at: driver::now(),
        };
        self.store.put_workflow_def(&rec).await?;
        self.workflows.changed();
        self.record(
            cx,
            Change {
                action: "workflow.put",
                target: name.to_owned(),
                detail: json!({"steps": w.steps.len()}),
                event: None,
            },
        );
        def_view(&rec)
    }

    pub async fn workflow_delete(&self, cx: &OpCtx, name: &str) -> Result<(), OpError> {
        self.authorize(cx, Op::ManageWorkflows)?;
        match self.store.workflow_def(name).await? {
            None => return Err(OpError::NotFound(format!("no workflow named `{name}`"))),
            Some(d) if d.source == "file" => {
                return Err(OpError::Conflict(format!(
                    "workflow `{name}` is defined in workflows.yml; remove it there"
                )))
            }
            Some(_) => {}
        }
        self.store.delete_workflow_def(name).await?;
        self.workflows.changed();
        self.record(
            cx,
            Change {
                action: "workflow.delete",
                target: name.to_owned(),
                detail: json!({}),
                event: None,
            },
        );
        Ok(())
    }

    /// Start a run by hand (the API, the CLI, the dashboard).
    pub async fn workflow_run(
        &self,
        cx: &OpCtx,
        name: &str,
        inputs: Json,
    ) -> Result<RunView, OpError> {
        let trigger = json!({"kind": "manual", "by": cx.actor, "via": cx.via.as_str()});
        self.start_run(cx, name, inputs, trigger).await
    }

    /// Start a run of `name` (checked against the caller's role and the workflow's inputs).
    pub(crate) async fn start_run(
        &self,
        cx: &OpCtx,
        name: &str,
        inputs: Json,
        trigger: Json,
    ) -> Result<RunView, OpError> {
        self.authorize(cx, Op::RunWorkflow)?;
        let d = self
            .store
            .workflow_def(name)
            .await?
            .ok_or_else(|| OpError::NotFound(format!("no workflow named `{name}`")))?;
        let w: Workflow = serde_json::from_str(&d.definition)
            .map_err(|e| OpError::Invalid(format!("workflow `{name}` does not read: {e}")))?;
        // Its steps act with the starter's role: refuse now what they could not do.
        for op in w.steps.iter().flat_map(|s| steps::ops(s.kind)) {
            self.authorize(cx, *op)?;
        }
        let inputs = engine::check_inputs(&w, &inputs).map_err(OpError::Invalid)?;
        let group = match &w.concurrency {
            None => None,
            Some(c) => {
                let scope = nebula_workflows::expr::Scope {
                    context: json!({"inputs": inputs, "trigger": trigger, "steps": {}, "run": {"workflow": name}}),
                    ..Default::default()
                };
                match nebula_workflows::expr::render(&Json::String(c.group.clone()), &scope) {
                    Ok(Json::String(g)) => Some(g),
                    Ok(other) => Some(other.to_string()),
                    Err(e) => return Err(OpError::Invalid(format!("concurrency group: {e}"))),
                }
            }
        };
        let new = NewRun {
            workflow: Arc::new(w),
            inputs,
            trigger,
            group,
            created_by: cx.actor.clone(),
            created_role: cx.role,
        };
        let rec = self
            .send(|reply| Cmd::Start {
                run: Box::new(new),
                reply,
            })
            .await?;
        self.record(
            cx,
            Change {
                action: "workflow.run",
                target: rec.id.to_string(),
                detail: json!({"workflow": name, "state": rec.state, "group": rec.group}),
                event: None,
            },
        );
        Ok(run_view(&rec))
    }

    pub async fn workflow_cancel(&self, cx: &OpCtx, id: Uuid) -> Result<RunView, OpError> {
        self.authorize(cx, Op::RunWorkflow)?;
        self.run_record(id).await?;
        let by = cx.actor.clone();
        let rec = self
            .send(|reply| Cmd::Cancel {
                id,
                by: format!("cancelled by {by}"),
                reply,
            })
            .await?;
        self.record(
            cx,
            Change {
                action: "workflow.cancel",
                target: id.to_string(),
                detail: json!({"workflow": rec.workflow}),
                event: None,
            },
        );
        Ok(run_view(&rec))
    }

    /// Approve (or reject) a step that waits for a person.
    pub async fn workflow_decide(
        &self,
        cx: &OpCtx,
        id: Uuid,
        decision: Decide,
    ) -> Result<RunView, OpError> {
        self.authorize(cx, Op::ApproveStep)?;
        self.run_record(id).await?;
        let (step, approve, comment) = (
            decision.step.clone(),
            decision.approve,
            decision.comment.clone(),
        );
        let by = cx.actor.clone();
        self.send(|reply| Cmd::Decide {
            id,
            decision,
            by,
            reply,
        })
        .await?;
        self.record(
            cx,
            Change {
                action: if approve {
                    "workflow.approve"
                } else {
                    "workflow.reject"
                },
                target: id.to_string(),
                detail: json!({"step": step, "comment": comment}),
                event: None,
            },
        );
        self.workflow_run_get(cx, id).await
    }

    async fn run_record(&self, id: Uuid) -> Result<RunRecord, OpError> {
        self.store
            .workflow_run(id)
            .await?
            .ok_or_else(|| OpError::NotFound(format!("no workflow run {id}")))
    }

    /// Runs, newest first.
    pub async fn workflow_runs(
        &self,
        cx: &OpCtx,
        workflow: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RunView>, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        let runs = self
            .store
            .workflow_runs(workflow, limit.clamp(1, MAX_LIST))
            .await?;
        Ok(runs.iter().map(run_view).collect())
    }

    /// One run with every step's latest attempt.
    pub async fn workflow_run_get(&self, cx: &OpCtx, id: Uuid) -> Result<RunView, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        let rec = self.run_record(id).await?;
        let rows = self.store.workflow_steps(id).await?;
        let latest = driver::latest(&rows);
        let w: Option<Workflow> = serde_json::from_str(&rec.definition).ok();
        let mut view = run_view(&rec);
        for s in w.iter().flat_map(|w| &w.steps) {
            let (run, job) = latest
                .get(&s.id)
                .cloned()
                .unwrap_or((StepRun::pending(), None));
            let finished = rows
                .iter()
                .rev()
                .find(|r| r.step == s.id)
                .and_then(|r| r.finished_at);
            view.steps.push(StepView {
                id: s.id.clone(),
                kind: s.kind.as_str().to_owned(),
                needs: s.needs.clone(),
                state: run.state.as_str().to_owned(),
                attempt: run.attempt,
                job,
                outputs: run.outputs,
                error: run.error,
                not_before: run.not_before.map(rfc3339),
                started_at: run.started_at.map(rfc3339),
                finished_at: finished.map(rfc3339),
            });
        }
        Ok(view)
    }

    /// Read `workflows.yml` and make its workflows the file's set (the last good set stays
    /// when it does not check).
    pub async fn load_workflows_file(&self, path: &Path) -> Result<usize, OpError> {
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| OpError::Invalid(format!("{}: {e}", path.display())))?;
        let (checked, agents) = spec::check_file(&text)
            .map_err(|e| OpError::Invalid(format!("{}: {e}", path.display())))?;
        let now = driver::now();
        let record = |name: &str, definition: String| WorkflowDefRecord {
            name: name.to_owned(),
            source: "file".into(),
            definition,
            updated_by: format!("file:{}", path.display()),
            updated_at: now,
        };
        let defs: Vec<WorkflowDefRecord> = checked
            .values()
            .map(|w| record(&w.name, serde_json::to_string(w).unwrap_or_default()))
            .collect();
        let agent_defs: Vec<WorkflowDefRecord> = agents
            .values()
            .map(|a| record(&a.name, serde_json::to_string(a).unwrap_or_default()))
            .collect();
        self.store
            .replace_file_workflows(&defs, &agent_defs)
            .await?;
        self.workflows.changed();
        self.audit(
            &format!("file:{}", path.display()),
            "workflow.file",
            &path.display().to_string(),
            json!({"workflows": checked.keys().collect::<Vec<_>>(), "agents": agents.keys().collect::<Vec<_>>()}),
        );
        Ok(defs.len())
    }
}

/// The `workflows-file-watch` task: loads the configured `workflows.yml` at start and when it
/// is saved.
pub async fn watch_file(cp: Arc<ControlPlane>, shutdown: CancellationToken) {
    let Some(path) = cp.config.workflows_file.clone() else {
        return;
    };
    let load = |cp: Arc<ControlPlane>, path: std::path::PathBuf| async move {
        for _ in 0..5 {
            match cp.load_workflows_file(&path).await {
                Ok(n) => {
                    info!(path = %path.display(), workflows = n, "workflows loaded");
                    return;
                }
                Err(OpError::Store(e)) => {
                    warn!(
                        "storing the workflows of {}: {e}; trying again",
                        path.display()
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    warn!("workflows.yml refused, the last good set stays: {e}");
                    return;
                }
            }
        }
    };
    load(cp.clone(), path.clone()).await;
    crate::desired::watch_path(&path, shutdown, || load(cp.clone(), path.clone())).await;
}
