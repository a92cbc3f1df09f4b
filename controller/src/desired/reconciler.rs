//! The reconcile loop, the observed-state builder, deploy watchers and the file watcher.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nebula_protocol::deploy::{
    labels, DeploySpec, DeployWithFiles, DeployWithHostAccess, UndeploySpec,
};
use nebula_protocol::jobs::JobOutput;
use nebula_protocol::telemetry::ContainerState;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::plan::{self, Action, Observed, ObservedContainer, ObservedNode};
use super::{InFlight, ServiceContainerRaw};
use crate::events::Event;
use crate::jobs::model::{JobState, Target, Work};
use crate::jobs::NewJob;
use crate::store::desired::DeploymentRecord;
use crate::store::millis;
use crate::{ControlPlane, OpError};

/// Triggers that arrive together are taken in one run.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// After a deploy ends, wait this long for the node's telemetry to show it before planning.
const SETTLE_AFTER_DEPLOY: Duration = Duration::from_millis(700);
/// File saves arrive as bursts of events.
const FILE_DEBOUNCE: Duration = Duration::from_millis(300);

/// What one event means to the reconciler.
enum Noted {
    /// Nothing to do.
    Nothing,
    /// Run soon.
    Run,
    /// Run once the node's telemetry inventory has had a moment to arrive.
    Settle,
    /// The event bus is gone (shutdown).
    Closed,
}

/// Record what `ev` changes in the reconciler's state.
fn note(cp: &ControlPlane, ev: Result<Event, RecvError>) -> Noted {
    match ev {
        Ok(Event::NodeOnline { id, name }) => {
            let mut st = cp.desired.lock();
            st.offline_since.remove(&id);
            st.reasons.insert(format!("node {name} online"));
            Noted::Settle
        }
        Ok(Event::NodeOffline { id, .. }) => {
            cp.desired
                .lock()
                .offline_since
                .insert(id, millis(SystemTime::now()));
            Noted::Nothing
        }
        Ok(Event::ContainerChanged { state, .. }) if state != "running" => {
            cp.desired
                .lock()
                .reasons
                .insert("a container stopped".into());
            Noted::Run
        }
        Ok(Event::EventsMissed { .. }) | Err(RecvError::Lagged(_)) => {
            cp.desired.lock().reasons.insert("events missed".into());
            Noted::Run
        }
        Ok(_) => Noted::Nothing,
        Err(RecvError::Closed) => Noted::Closed,
    }
}

/// Run the reconciler until shutdown. Triggers that arrive while it waits or runs are taken
/// together in the next run: a burst of reconnects (a controller restart) is one run, not one
/// per node, and every wait ends at once on shutdown.
pub async fn reconciler(cp: Arc<ControlPlane>, cx: crate::tasks::TaskCx) {
    let shutdown = cx.cancel.clone();
    let mut events = cp.events.subscribe();
    let interval = cp.config.reconcile_interval;
    let mut next_timer = tokio::time::Instant::now() + Duration::from_secs(1).min(interval);
    loop {
        let noted = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = cp.desired.trigger.notified() => Noted::Run,
            _ = tokio::time::sleep_until(next_timer) => {
                cp.desired.lock().reasons.insert("timer".into());
                Noted::Run
            }
            ev = events.recv() => note(&cp, ev),
        };
        let mut settle = match noted {
            Noted::Nothing => continue,
            Noted::Closed => return,
            Noted::Run => false,
            Noted::Settle => true,
        };
        // Wait out the debounce (longer when a node just came online), then take everything
        // queued meanwhile into this run.
        let mut until = tokio::time::Instant::now() + DEBOUNCE;
        loop {
            if settle {
                until = until.max(tokio::time::Instant::now() + SETTLE_AFTER_DEPLOY);
                settle = false;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(until) => {}
            }
            loop {
                match events.try_recv() {
                    Ok(ev) => match note(&cp, Ok(ev)) {
                        Noted::Settle => settle = true,
                        Noted::Closed => return,
                        Noted::Nothing | Noted::Run => {}
                    },
                    Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
                        let _ = note(&cp, Err(RecvError::Lagged(n)));
                    }
                    Err(_) => break,
                }
            }
            if !settle {
                break;
            }
        }
        let reasons: Vec<String> = std::mem::take(&mut cp.desired.lock().reasons)
            .into_iter()
            .collect();
        let trigger = if reasons.is_empty() {
            "timer".to_owned()
        } else {
            reasons.join(", ")
        };
        let run = run_once(&cp, &trigger);
        let started = std::time::SystemTime::now();
        let t0 = std::time::Instant::now();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = run => {
                if let Err(e) = &r {
                    warn!("reconcile run failed (the next run retries): {e:#}");
                }
                let r = r
                    .map(|mut v| {
                        v["trigger"] = trigger.as_str().into();
                        v
                    })
                    .map_err(anyhow::Error::from);
                let why = if trigger == "timer" {
                    crate::tasks::Trigger::Period
                } else {
                    crate::tasks::Trigger::Activated
                };
                cx.report.finished(started, t0.elapsed(), why, r);
            }
        }
        next_timer = tokio::time::Instant::now() + interval;
    }
}

/// One run: read everything, plan, start what can start. Answers with a summary of the plan.
async fn run_once(cp: &Arc<ControlPlane>, trigger: &str) -> Result<serde_json::Value, OpError> {
    if cp.desired.active().is_none() {
        return Ok(serde_json::json!({"map": null}));
    }
    // A secret changed somewhere this controller did not see: the services using it roll.
    cp.repin_secrets("a secret the map uses changed").await;
    let Some(active) = cp.desired.active() else {
        return Ok(serde_json::json!({"map": null}));
    };
    let started = std::time::Instant::now();
    let effective = cp.effective(&active.desired);
    let observed = cp.observe().await?;
    let plan = plan::plan(&effective, &observed);
    cp.metrics.reconcile_runs.inc();
    cp.metrics
        .plan_seconds
        .observe(started.elapsed().as_secs_f64());
    debug!(
        trigger,
        actions = plan.actions.len(),
        waiting = plan.waiting.len(),
        unchanged = plan.unchanged,
        "reconcile run"
    );
    for action in &plan.actions {
        if !action.after().is_empty() {
            continue;
        }
        let key = (action.service().to_owned(), action.node().to_owned());
        if cp.desired.lock().in_flight.contains_key(&key) {
            continue;
        }
        if let Err(e) = start(cp, &effective, action, active.record.version, trigger).await {
            warn!(
                service = action.service(),
                node = action.node(),
                "starting a deploy: {e}"
            );
        }
    }
    if let Err(e) = super::models::reconcile(cp, &active.desired).await {
        warn!("starting model pulls: {e}");
    }
    Ok(serde_json::json!({
        "map_version": active.record.version,
        "actions": plan.actions.len(),
        "waiting": plan.waiting.len(),
        "unchanged": plan.unchanged,
    }))
}

async fn start(
    cp: &Arc<ControlPlane>,
    desired: &plan::Desired,
    action: &Action,
    version: i64,
    trigger: &str,
) -> Result<(), OpError> {
    let service = action.service().to_owned();
    let node = action.node().to_owned();
    let (work, revision, spec_json, previous, deadline) = match action {
        Action::Remove { node_id, .. } => (
            Work::Undeploy(UndeploySpec {
                service: service.clone(),
                node: node_id.to_string(),
            }),
            String::new(),
            "null".to_owned(),
            Vec::new(),
            Duration::from_secs(300),
        ),
        Action::Create {
            node_id, replicas, ..
        }
        | Action::Repair {
            node_id, replicas, ..
        }
        | Action::Update {
            node_id, replicas, ..
        } => {
            let svc = &desired.services[&service];
            let previous = match action {
                Action::Update { from, .. } => from.clone(),
                _ => Vec::new(),
            };
            let deploy = DeploySpec {
                service: service.clone(),
                revision: svc.revision.clone(),
                node: node_id.to_string(),
                replicas: *replicas,
                container: svc.spec.clone(),
                strategy: svc.strategy,
                health_timeout_ms: svc.health_timeout.as_millis().min(u32::MAX as u128) as u32,
            };
            let host_access = desired.host_access(&service);
            let files = desired.files(&service);
            let spec = plan::RevisionSpec {
                container: svc.spec.clone(),
                host_access: host_access.clone(),
                files: files.to_vec(),
            };
            // Only a service with host access needs a 1.5 agent, one with secret files a 1.8
            // agent: every other one goes as before, so older agents keep running it.
            let work = if !files.is_empty() {
                Work::DeployWithFiles(Box::new(DeployWithFiles {
                    deploy,
                    host_access: host_access.clone(),
                    files: files.to_vec(),
                    contents: Vec::new(),
                }))
            } else if host_access.is_empty() {
                Work::Deploy(Box::new(deploy))
            } else {
                Work::DeployWithHostAccess(Box::new(DeployWithHostAccess {
                    deploy,
                    host_access: host_access.clone(),
                }))
            };
            (
                work,
                svc.revision.clone(),
                serde_json::to_string(&spec).expect("a spec serializes"),
                previous,
                // Pulling, two health gates (the new revision and, after a rollback, the old).
                svc.health_timeout * 2 + Duration::from_secs(900),
            )
        }
    };
    let verb = if trigger.contains("rollback") && action.verb() == "update" {
        "rollback"
    } else {
        action.verb()
    };
    // Claimed before the job exists, so that no other run starts a second deploy here.
    let key = (service.clone(), node.clone());
    cp.desired
        .lock()
        .in_flight
        .insert(key.clone(), InFlight { job: Uuid::nil() });
    let created = cp
        .create_job(
            NewJob {
                work,
                target: Target::Node(node.clone()),
                deadline: Some(deadline),
                idempotent: false,
                max_attempts: Some(1),
            },
            &crate::authz::OpCtx::internal("reconciler"),
        )
        .await;
    let rec = match created {
        Ok(rec) => rec,
        Err(e) => {
            cp.desired.lock().in_flight.remove(&key);
            return Err(e);
        }
    };
    let deployment = DeploymentRecord {
        id: Uuid::now_v7(),
        service: service.clone(),
        node_id: action.node_id(),
        node: node.clone(),
        action: verb.to_owned(),
        revision: revision.clone(),
        previous,
        spec: spec_json,
        trigger: trigger.to_owned(),
        outcome: "running".into(),
        message: None,
        job_id: Some(rec.id),
        desired_version: Some(version),
        started_at: millis(SystemTime::now()),
        finished_at: None,
    };
    if let Err(e) = cp.store.insert_deployment(&deployment).await {
        // The job runs anyway; its outcome still clears the claim and reaches the log.
        warn!(%service, %node, "recording a deploy in the history: {e}");
    }
    {
        let mut st = cp.desired.lock();
        if let Ok(spec) = serde_json::from_str(&deployment.spec) {
            st.revisions.insert(revision.clone(), spec);
        }
        st.in_flight.insert(key, InFlight { job: rec.id });
    }
    info!(%service, %node, action = verb, %revision, job = %rec.id, "deploy started");
    cp.events.publish(Event::DeployStarted {
        service,
        node,
        action: verb.to_owned(),
        revision,
        job: rec.id,
    });
    watch_deploy(cp.clone(), deployment);
    Ok(())
}

/// An agent older than 1.5 refuses a deploy with host access (older than 1.8, one with secret
/// files) as a job kind it does not know (`job kind #8 is not supported by nebula-agent X;
/// upgrade the agent`): say what that means.
fn explain_refusal(work: &Work, node: &str, error: String) -> String {
    let needs = match work {
        Work::DeployWithHostAccess(_) => Some((
            "host access (privileged, network_mode, pid, cap_add or devices",
            "1.5",
        )),
        Work::DeployWithFiles(_) => Some(("secret files (`secrets:`", "1.8")),
        _ => None,
    };
    match needs {
        Some((what, version))
            if error.contains("job kind #") && error.contains("not supported") =>
        {
            format!(
                "nebula-agent on {node} is too old for {what} need an agent that speaks \
                 protocol {version} or newer): upgrade the agent on {node}, or run the service \
                 without them ({error})"
            )
        }
        _ => error,
    }
}

/// Wait for a deploy job's end on the controller's tracker, then record the outcome.
pub(super) fn watch_deploy(cp: Arc<ControlPlane>, d: DeploymentRecord) {
    let tracker = cp.tracker.clone();
    let shutdown = cp.shutdown.clone();
    tracker.spawn(async move {
        let Some(job) = d.job_id else { return };
        let rec = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = cp.wait_job(job, Duration::from_secs(3600)) => match r {
                    Ok(rec) if rec.state.is_terminal() => break rec,
                    Ok(_) => continue,
                    Err(e) => {
                        warn!(%job, "watching a deploy job: {e}");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                },
            }
        };
        let report = match &rec.output {
            Some(JobOutput::Deploy(r)) => Some(r.clone()),
            _ => None,
        };
        let (outcome, message) = match (rec.state, &report) {
            (_, Some(r)) => (
                r.outcome.as_str().to_owned(),
                rec.error.clone().or_else(|| r.health_output.clone()),
            ),
            (JobState::Succeeded, None) => ("deployed".to_owned(), None),
            (state, None) => (
                match state {
                    JobState::Cancelled => "cancelled",
                    JobState::TimedOut => "timed-out",
                    JobState::Lost => "lost",
                    _ => "failed",
                }
                .to_owned(),
                rec.error
                    .clone()
                    .map(|e| explain_refusal(&rec.work, &d.node, e))
                    .or(rec.reason.clone()),
            ),
        };
        // An undeploy that removed containers reads better as `removed`.
        let outcome = if d.action == "remove" && outcome == "deployed" {
            "removed".to_owned()
        } else {
            outcome
        };
        let previous = report
            .as_ref()
            .map(|r| r.previous.clone())
            .unwrap_or_else(|| d.previous.clone());
        // A replica that no longer leads leaves the outcome to the leader, which watches the
        // same deployment since it took over.
        if cp.ha.fence().is_err() {
            return;
        }
        let now = millis(SystemTime::now());
        let stored = if outcome == "unchanged" {
            cp.store.delete_deployment(d.id).await
        } else {
            cp.store
                .finish_deployment(d.id, &outcome, message.as_deref(), &previous, now)
                .await
        };
        if let Err(e) = stored {
            warn!(service = %d.service, "recording a deploy outcome: {e}");
        }
        {
            let mut st = cp.desired.lock();
            st.in_flight.remove(&(d.service.clone(), d.node.clone()));
            // Failures wait for the map to be applied again; a deploy lost with its node or
            // cancelled by a person is simply planned again.
            if matches!(outcome.as_str(), "failed" | "rolled-back" | "timed-out") {
                let why = message.clone().unwrap_or_else(|| outcome.clone());
                let key = if d.action == "remove" {
                    (d.service.clone(), plan::removal_key(&d.node))
                } else {
                    (d.service.clone(), d.revision.clone())
                };
                st.blocked.insert(key, why);
            }
        }
        match outcome.as_str() {
            "deployed" | "unchanged" | "removed" => {
                info!(service = %d.service, node = %d.node, %outcome, "deploy finished")
            }
            _ => warn!(
                service = %d.service,
                node = %d.node,
                %outcome,
                message = message.as_deref().unwrap_or(""),
                "deploy failed"
            ),
        }
        cp.metrics
            .deploys_finished
            .get_or_create(&vec![("outcome", outcome.clone())])
            .inc();
        cp.events.publish(Event::DeployFinished {
            service: d.service.clone(),
            node: d.node.clone(),
            revision: d.revision.clone(),
            outcome,
            message,
        });
        tokio::time::sleep(SETTLE_AFTER_DEPLOY).await;
        cp.desired.kick("a deploy finished");
    });
}

/// Hold a service's claim on a node while a deploy job that has no history row runs (see
/// `load_desired`), then plan again.
pub(super) fn watch_unrecorded(cp: Arc<ControlPlane>, job: Uuid, service: String, node: String) {
    let key = (service, node);
    {
        let mut st = cp.desired.lock();
        if st.in_flight.contains_key(&key) {
            return;
        }
        st.in_flight.insert(key.clone(), InFlight { job });
    }
    let shutdown = cp.shutdown.clone();
    cp.tracker.clone().spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = cp.wait_job(job, Duration::from_secs(3600)) => match r {
                    Ok(rec) if rec.state.is_terminal() => break,
                    Ok(_) => continue,
                    Err(OpError::NotFound(_)) => break,
                    Err(e) => {
                        warn!(%job, "watching a deploy job: {e}");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                },
            }
        }
        {
            let mut st = cp.desired.lock();
            if st.in_flight.get(&key).is_some_and(|f| f.job == job) {
                st.in_flight.remove(&key);
            }
        }
        cp.desired.kick("a deploy finished");
    });
}

impl ControlPlane {
    /// What runs: every node (an offline one only within `job_lost_grace` of leaving) with the
    /// managed containers that carry its id, from telemetry; deploys in flight; failed revisions;
    /// the deploy policy each connected node reported (kept with its session in the registry).
    pub(crate) async fn observe(&self) -> Result<Observed, OpError> {
        Ok(self.observe_detailed().await?.0)
    }

    /// [`ControlPlane::observe`], with each managed container's state and health by node name
    /// (what views show), read in the same pass.
    pub(crate) async fn observe_detailed(
        &self,
    ) -> Result<(Observed, Vec<(String, ServiceContainerRaw)>), OpError> {
        let candidates = self.candidates(&HashMap::new()).await?;
        let now = millis(SystemTime::now());
        let grace = self.config.job_lost_grace.as_millis() as i64;
        let mut policies = std::collections::BTreeMap::new();
        let (offline_since, started_at, in_flight, blocked, revisions) = {
            let st = self.desired.lock();
            (
                st.offline_since.clone(),
                st.started_at,
                st.in_flight.keys().cloned().collect(),
                st.blocked.clone(),
                st.revisions.clone(),
            )
        };
        let mut nodes = Vec::new();
        let mut details = Vec::new();
        for c in candidates {
            let view = self.telemetry.view(c.id);
            let inventory = view.as_ref().and_then(|v| v.inventory.clone());
            if !c.online {
                let since = offline_since.get(&c.id).copied().unwrap_or(started_at);
                if now - since > grace {
                    continue;
                }
            }
            let mut containers = Vec::new();
            if let (Some(view), Some(inv)) = (&view, &inventory) {
                for raw in managed(c.id, inv, view.latest.as_deref()) {
                    containers.push(ObservedContainer {
                        name: raw.name.clone(),
                        service: raw.service.clone(),
                        revision: raw.revision.clone(),
                        running: raw.state == "running" || raw.state == "unknown",
                    });
                    details.push((c.name.clone(), raw));
                }
            }
            // Until its inventory arrives, a connected node is not known well enough to act on.
            let docker = inventory
                .as_ref()
                .is_some_and(|i| i.container_runtime.is_some());
            let known = inventory.is_some();
            if let Some(policy) = c
                .online
                .then(|| self.registry.deploy_policy(c.id))
                .flatten()
            {
                policies.insert(c.id, policy);
            }
            nodes.push(ObservedNode {
                id: c.id,
                name: c.name,
                labels: c.labels,
                online: c.online && known,
                gpus: c.gpu_count as u32,
                max_free_vram_mb: c.gpu_free_bytes.iter().copied().max().unwrap_or(0) >> 20,
                containers,
                docker: docker || !known,
                known,
            });
        }
        Ok((
            Observed {
                nodes,
                in_flight,
                blocked,
                revisions,
                policies,
            },
            details,
        ))
    }
}

/// Managed containers in an inventory that carry this node's id.
fn managed(
    node: Uuid,
    inv: &nebula_protocol::telemetry::TelemetryInventory,
    latest: Option<&nebula_protocol::telemetry::TelemetrySample>,
) -> Vec<ServiceContainerRaw> {
    let node_id = node.to_string();
    let aligned =
        latest.filter(|s| s.epoch == inv.epoch && s.containers.len() == inv.containers.len());
    inv.containers
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            c.labels.get(labels::MANAGED).map(String::as_str) == Some("true")
                && c.labels.get(labels::NODE) == Some(&node_id)
                && c.labels.contains_key(labels::SERVICE)
        })
        .map(|(i, c)| {
            let (state, health) = match aligned.map(|s| &s.containers[i]) {
                Some(s) => (s.state.as_str(), s.health.as_str()),
                None => (ContainerState::Unknown.as_str(), "none"),
            };
            ServiceContainerRaw {
                name: c.name.clone(),
                service: c.labels[labels::SERVICE].clone(),
                revision: c.labels.get(labels::REVISION).cloned().unwrap_or_default(),
                state: state.to_owned(),
                health: health.to_owned(),
            }
        })
        .collect()
}

/// Read the watched file and apply it; a refusal is recorded, not returned.
pub(super) async fn apply_file(cp: &Arc<ControlPlane>, path: &Path) {
    let shown = path.display().to_string();
    let text = match tokio::fs::read_to_string(path).await {
        Ok(t) => t,
        Err(e) => {
            let errors = super::map::MapErrors(vec![super::map::Problem {
                line: 1,
                column: 1,
                message: format!("cannot read the file: {e}"),
            }]);
            cp.reject_file(&shown, &errors);
            return;
        }
    };
    if cp
        .desired
        .active()
        .is_some_and(|a| a.record.digest == super::digest(&text))
    {
        return;
    }
    match cp
        .apply_desired(
            &text,
            &format!("file:{shown}"),
            &crate::authz::OpCtx::internal("file"),
        )
        .await
    {
        Ok(applied) => info!(
            path = %shown,
            version = applied.version,
            actions = applied.plan.actions.len(),
            "service map applied"
        ),
        Err(super::ApplyError::Map(errors)) => cp.reject_file(&shown, &errors),
        Err(super::ApplyError::Op(e)) => warn!(path = %shown, "applying the service map: {e}"),
    }
}

/// Watch the configured service map and apply it when saved.
pub async fn watch_file(cp: Arc<ControlPlane>, shutdown: CancellationToken) {
    let Some(path) = cp.config.service_map.clone() else {
        return;
    };
    let path = std::path::absolute(&path).unwrap_or(path);
    info!(path = %path.display(), "watching the service map");
    watch_path(&path, shutdown, || apply_file(&cp, &path)).await;
}

/// Call `changed` each time `path` is saved (a burst of events counted once), until
/// `shutdown`. The directory is watched, not the file: editors save by writing a new file and
/// renaming it.
pub async fn watch_path<F, Fut>(path: &Path, shutdown: CancellationToken, mut changed: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use notify::{RecursiveMode, Watcher};
    let path = std::path::absolute(path).unwrap_or(path.to_path_buf());
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| ".".into());
    let name = path.file_name().map(|n| n.to_owned());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher =
        match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                if ev
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(|n| n.to_owned()) == name)
                {
                    let _ = tx.send(());
                }
            }
        }) {
            Ok(w) => w,
            Err(e) => {
                warn!(
                    "cannot watch {}: {e}; changes need a restart or the API",
                    path.display()
                );
                return;
            }
        };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        warn!(
            "cannot watch {}: {e}; changes need a restart or the API",
            dir.display()
        );
        return;
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            got = rx.recv() => {
                if got.is_none() {
                    return;
                }
                // Take the whole burst of events of one save.
                tokio::time::sleep(FILE_DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
                changed().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy() -> DeploySpec {
        DeploySpec {
            service: "web".into(),
            revision: "abc".into(),
            node: uuid::Uuid::nil().to_string(),
            replicas: 1,
            container: nebula_protocol::deploy::ContainerSpec {
                image: "web:1".into(),
                command: None,
                env: Vec::new(),
                ports: Vec::new(),
                volumes: Vec::new(),
                restart: nebula_protocol::deploy::RestartPolicy::No,
                gpus: nebula_protocol::deploy::GpuRequest::None,
                health: None,
            },
            strategy: nebula_protocol::deploy::UpdateStrategy::StartFirst,
            health_timeout_ms: 1000,
        }
    }

    #[test]
    fn an_old_agents_refusal_of_host_access_says_to_upgrade_it() {
        let old = "refused by the agent: job kind #8 is not supported by nebula-agent 0.1.0; \
                   upgrade the agent"
            .to_owned();
        let with_host = Work::DeployWithHostAccess(Box::new(DeployWithHostAccess {
            deploy: deploy(),
            host_access: nebula_protocol::deploy::HostAccess {
                privileged: true,
                ..Default::default()
            },
        }));
        let told = explain_refusal(&with_host, "box", old.clone());
        assert!(
            told.contains("nebula-agent on box is too old for host access"),
            "{told}"
        );
        assert!(told.contains("privileged, network_mode"), "{told}");
        assert!(told.contains(&old), "the agent's words stay: {told}");
        let with_files = Work::DeployWithFiles(Box::new(DeployWithFiles {
            deploy: deploy(),
            host_access: Default::default(),
            files: Vec::new(),
            contents: Vec::new(),
        }));
        let told = explain_refusal(&with_files, "box", old.clone());
        assert!(told.contains("too old for secret files"), "{told}");
        assert!(told.contains("protocol 1.8"), "{told}");
        // Other failures, and plain deploys, keep their own words.
        let plain = Work::Deploy(Box::new(deploy()));
        assert_eq!(explain_refusal(&plain, "box", old.clone()), old);
        assert_eq!(
            explain_refusal(&with_host, "box", "pulling failed".into()),
            "pulling failed"
        );
    }
}
