//! Desired state: the service map in force, the reconciler that makes the fleet match it, and
//! the deployment history.
//!
//! Tasks (on the controller's tracker, stopped by its token):
//! * [`reconciler`]: one run at a time, on a timer (`reconcile_interval`) and when triggered
//!   (desired state applied, a node online, a container stopped, a deploy finished). A run
//!   reads the full desired and observed state, computes [`plan::plan`], and starts a deploy job
//!   per action whose dependencies are done. A trigger only says "run soon".
//! * [`watch_file`]: when `service_map` is configured, a `notify` watcher on its directory;
//!   saves are debounced, parsed and applied; a broken file is refused (logged, an event, shown
//!   by the API) and the last good map stays in force.
//! * one watcher per deploy job, which records the outcome in the history when the job ends.
//!
//! State shared by them lives in [`DesiredState`] (one mutex, never held across an await).
//! A revision that failed its health gate is not retried until a map is applied again; a
//! rollback pins a service to an earlier revision until the map changes that service.

use crate::authz::{Change, Op, OpCtx};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

pub use nebula_types::api::desired::{
    Applied, FileRejection, PlanView, ServiceContainer, ServiceView,
};

use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::events::Event;
use crate::store::desired::{DesiredRecord, PinRecord};
use crate::store::millis;
use crate::{ControlPlane, OpError};

mod inline;
pub mod models;
mod pinning;
pub use nebula_desired::{map, plan};
mod reconciler;

pub use reconciler::{reconciler, watch_file, watch_path};

use map::{FleetNames, MapErrors, Problem};
use plan::{Desired, Plan, RevisionSpec};

/// The map in force.
#[derive(Debug, Clone)]
pub struct Active {
    pub record: DesiredRecord,
    /// Resolved, its secret references pinned to versions (`crate::secrets::refs`): what
    /// revisions, plans and deploys are made from.
    pub desired: Desired,
    /// Resolved as written (references without versions).
    pub raw: Desired,
    pub warnings: Vec<Problem>,
}

#[derive(Debug, Clone)]
pub(crate) struct Pin {
    pub record: PinRecord,
    pub spec: RevisionSpec,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct InFlight {
    pub job: Uuid,
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub active: Option<Arc<Active>>,
    pub file_error: Option<FileRejection>,
    pub in_flight: BTreeMap<(String, String), InFlight>,
    pub blocked: BTreeMap<(String, String), String>,
    pub revisions: BTreeMap<String, RevisionSpec>,
    pub pins: BTreeMap<String, Pin>,
    pub reasons: BTreeSet<String>,
    /// Unix ms a node went offline (nodes never seen online count from the controller's start).
    pub offline_since: HashMap<Uuid, i64>,
    pub started_at: i64,
    /// Pulls of desired models, by (model, node).
    pub model_pulls: BTreeMap<(String, String), models::ModelPull>,
    /// The map in force and the secret versions it was last pinned with: a reconcile run
    /// with nothing changed pins nothing again.
    pub pinned_with: Option<(std::sync::Weak<Active>, BTreeMap<String, u32>)>,
}

/// Shared state of the desired-state machinery.
#[derive(Debug, Default)]
pub struct DesiredState {
    inner: Mutex<Inner>,
    pub(crate) trigger: Notify,
}

impl DesiredState {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ask for a reconcile run soon, saying why.
    pub fn kick(&self, reason: &str) {
        self.lock().reasons.insert(reason.to_owned());
        self.trigger.notify_one();
    }

    pub fn active(&self) -> Option<Arc<Active>> {
        self.lock().active.clone()
    }

    pub fn file_error(&self) -> Option<FileRejection> {
        self.lock().file_error.clone()
    }
}

/// Why applying a map failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the service map is not valid: {0}")]
    Map(MapErrors),
    #[error(transparent)]
    Op(#[from] OpError),
}

/// A managed container as telemetry shows it.
#[derive(Debug, Clone)]
pub(crate) struct ServiceContainerRaw {
    pub name: String,
    pub service: String,
    pub revision: String,
    pub state: String,
    pub health: String,
}

/// The revision in force among `containers`: `wanted` when any of its containers runs, else
/// the revision most running containers have (ties: the greater name, so it is stable).
fn serving_revision(wanted: Option<&str>, containers: &[ServiceContainer]) -> Option<String> {
    let running = || containers.iter().filter(|c| c.state == "running");
    if let Some(w) = wanted {
        if running().any(|c| c.revision == w) {
            return Some(w.to_owned());
        }
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for c in running() {
        *counts.entry(c.revision.as_str()).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(rev, n)| (*n, *rev))
        .map(|(rev, _)| rev.to_owned())
        .or_else(|| wanted.map(str::to_owned))
}

fn short_revision(r: &str) -> &str {
    r.get(..12).unwrap_or(r)
}

/// The problems of a map naming secrets the store does not have, as map errors.
fn secrets_missing(missing: Vec<String>) -> MapErrors {
    MapErrors(
        missing
            .into_iter()
            .map(|message| Problem {
                line: 1,
                column: 1,
                message,
            })
            .collect(),
    )
}

pub(crate) fn digest(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

impl ControlPlane {
    async fn fleet_names(&self) -> Result<FleetNames, OpError> {
        Ok(FleetNames(Some(
            self.store
                .list_nodes()
                .await?
                .into_iter()
                .map(|n| n.name)
                .collect(),
        )))
    }

    /// Load the map in force, pins, known revisions and failures at start; re-attach watchers to
    /// deploys that were running; then read the watched file when there is one.
    pub async fn load_desired(self: &Arc<Self>) -> Result<(), OpError> {
        let latest = self.store.latest_desired().await?;
        let pins = self.store.pins().await?;
        let specs = self.store.revision_specs().await?;
        let history = self.store.deployments(None, 2000).await?;
        let unfinished = self.store.unfinished_deployments().await?;
        // Accepted before: the fleet is not checked again (nodes may have gone since).
        let checked = match &latest {
            Some(rec) => match map::check(&rec.document, &FleetNames(None)) {
                Ok(checked) => {
                    let (pinned, problems) = self.pin_desired(&checked.desired).await?;
                    for p in problems {
                        tracing::warn!("{p}");
                    }
                    Some((checked, pinned))
                }
                Err(e) => {
                    tracing::error!(
                        version = rec.version,
                        "the stored service map no longer validates: {e}"
                    );
                    None
                }
            },
            None => None,
        };
        {
            let mut st = self.desired.lock();
            st.started_at = millis(std::time::SystemTime::now());
            for (rev, spec) in specs {
                if let Ok(spec) = serde_json::from_str(&spec) {
                    st.revisions.insert(rev, spec);
                }
            }
            for p in pins {
                if let Ok(spec) = serde_json::from_str(&p.spec) {
                    st.pins.insert(p.service.clone(), Pin { record: p, spec });
                }
            }
            if let (Some(rec), Some((checked, pinned))) = (latest, checked) {
                let since = rec.created_at;
                for d in history.iter().filter(|d| d.started_at >= since) {
                    if matches!(d.outcome.as_str(), "failed" | "rolled-back" | "timed-out") {
                        let key = if d.action == "remove" {
                            (d.service.clone(), plan::removal_key(&d.node))
                        } else {
                            (d.service.clone(), d.revision.clone())
                        };
                        st.blocked
                            .entry(key)
                            .or_insert_with(|| d.message.clone().unwrap_or_default());
                    }
                }
                st.active = Some(Arc::new(Active {
                    record: rec,
                    raw: checked.desired,
                    desired: pinned,
                    warnings: checked.warnings,
                }));
            }
        }
        for d in unfinished {
            match d.job_id {
                Some(job) => {
                    self.desired
                        .lock()
                        .in_flight
                        .insert((d.service.clone(), d.node.clone()), InFlight { job });
                    reconciler::watch_deploy(self.clone(), d);
                }
                None => {
                    let now = millis(std::time::SystemTime::now());
                    self.store
                        .finish_deployment(
                            d.id,
                            "failed",
                            Some("never dispatched"),
                            &d.previous,
                            now,
                        )
                        .await?;
                }
            }
        }
        // A deploy job without its history row (a leader died between writing the two): its
        // service stays claimed until the job ends, so no second deploy starts beside it.
        let claimed: std::collections::HashSet<Uuid> = (self.desired.lock().in_flight.values())
            .map(|f| f.job)
            .collect();
        for (job, service, node) in self.jobs.unfinished_deploys() {
            if !claimed.contains(&job) {
                tracing::warn!(%job, %service, %node, "a deploy job without its history row: the service waits for it");
                reconciler::watch_unrecorded(self.clone(), job, service, node);
            }
        }
        if let Some(path) = self.config.service_map.clone() {
            reconciler::apply_file(self, &path).await;
        }
        Ok(())
    }

    /// Accept a new service map (from the API or the watched file): parse and validate it, store
    /// it when it differs from the one in force, and trigger a reconcile. Applying again also
    /// retries revisions that failed. A map that does not validate changes nothing.
    pub async fn apply_desired(
        self: &Arc<Self>,
        document: &str,
        source: &str,
        cx: &OpCtx,
    ) -> Result<Applied, ApplyError> {
        self.authorize(cx, Op::ApplyMap)?;
        let by = cx.actor.as_str();
        let fleet = self.fleet_names().await?;
        let checked = map::check(document, &fleet).map_err(ApplyError::Map)?;
        // Every secret it names must be in the store before anything changes.
        let (_, missing) = self.pin_desired(&checked.desired).await?;
        if !missing.is_empty() {
            return Err(ApplyError::Map(secrets_missing(missing)));
        }
        let (stored, inline_warnings) = self.keep_inline_secrets(cx, document).await?;
        let checked = if stored == document {
            checked
        } else {
            map::check(&stored, &fleet).map_err(ApplyError::Map)?
        };
        let (pinned, missing) = self.pin_desired(&checked.desired).await?;
        if !missing.is_empty() {
            return Err(ApplyError::Map(secrets_missing(missing)));
        }
        let mut warnings = checked.warnings.clone();
        warnings.extend(inline_warnings);
        // The digest of the document as given: the watched file is compared with it.
        let digest = digest(document);
        let current = self.desired.active();
        let changed = current.as_ref().is_none_or(|a| a.record.digest != digest);
        let record = if changed {
            self.store
                .insert_desired(
                    &stored,
                    &digest,
                    source,
                    by,
                    millis(std::time::SystemTime::now()),
                )
                .await
                .map_err(OpError::from)?
        } else {
            current
                .as_ref()
                .expect("unchanged implies present")
                .record
                .clone()
        };
        let version = record.version;
        let mut dropped_pins = Vec::new();
        {
            let mut st = self.desired.lock();
            // A new map version ends pins on the services it changes.
            for (name, pin) in &st.pins {
                let svc = pinned.services.get(name);
                if svc.is_none_or(|s| s.revision != pin.record.base_revision) {
                    dropped_pins.push(name.clone());
                }
            }
            for name in &dropped_pins {
                st.pins.remove(name);
            }
            st.blocked.clear();
            st.model_pulls.clear();
            if source.starts_with("file:") {
                st.file_error = None;
            }
            st.active = Some(Arc::new(Active {
                record,
                desired: pinned,
                raw: checked.desired,
                warnings: warnings.clone(),
            }));
        }
        for name in dropped_pins {
            self.store.delete_pin(&name).await.map_err(OpError::from)?;
        }
        self.record(
            cx,
            Change {
                action: "desired.apply",
                target: format!("v{version}"),
                detail: serde_json::json!({ "source": source, "changed": changed }),
                event: Some(Event::DesiredApplied {
                    version,
                    source: source.to_owned(),
                    by: by.to_owned(),
                }),
            },
        );
        let plan = self.current_plan().await?.plan;
        self.desired.kick("desired state applied");
        // Monitors declared in the map go out to their nodes now.
        self.monitors.assign_now.activate();
        Ok(Applied {
            version,
            changed,
            warnings,
            plan,
        })
    }

    /// Record a refused file (the API and an event say why).
    pub(crate) fn reject_file(&self, path: &str, errors: &MapErrors) {
        tracing::warn!(
            path,
            "service map refused; the last good one stays in force: {errors}"
        );
        self.desired.lock().file_error = Some(FileRejection {
            path: path.to_owned(),
            at: millis(std::time::SystemTime::now()),
            problems: errors.0.clone(),
        });
        self.events.publish(Event::DesiredRejected {
            source: format!("file:{path}"),
            error: errors.to_string(),
        });
    }

    /// Ask the reconciler for a run now.
    pub fn request_reconcile(&self, cx: &OpCtx) -> Result<(), OpError> {
        self.authorize(cx, Op::Reconcile)?;
        self.desired.kick(&format!("asked by {}", cx.actor));
        self.record(
            cx,
            crate::authz::Change {
                action: "map.reconcile",
                target: self
                    .desired
                    .active()
                    .map(|a| a.record.version.to_string())
                    .unwrap_or_default(),
                detail: serde_json::json!({}),
                event: None,
            },
        );
        Ok(())
    }

    /// The plan for the map in force against what runs now.
    pub async fn current_plan(&self) -> Result<PlanView, OpError> {
        let active = self.desired.active();
        let observed = self.observe().await?;
        let Some(active) = active else {
            return Ok(PlanView {
                version: None,
                warnings: Vec::new(),
                plan: Plan::default(),
            });
        };
        let effective = self.effective(&active.desired);
        Ok(PlanView {
            version: Some(active.record.version),
            warnings: active.warnings.clone(),
            plan: plan::plan(&effective, &observed),
        })
    }

    /// The plan in force as `cx` may see it: inline `env` values are `***` for a role that may
    /// not read them (secret references are shown to everyone).
    pub async fn current_plan_for(&self, cx: &OpCtx) -> Result<PlanView, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        let mut view = self.current_plan().await?;
        if !cx.may(Op::ReadMapValues) {
            view.redact_inline_values();
        }
        Ok(view)
    }

    /// The plan a proposed map would have (nothing is stored).
    /// Inline `env` values in it (the running revisions' included) are `***` for a role that
    /// may not read them.
    pub async fn preview_plan(&self, cx: &OpCtx, document: &str) -> Result<PlanView, ApplyError> {
        self.authorize(cx, Op::PreviewPlan)?;
        let fleet = self.fleet_names().await?;
        let checked = map::check(document, &fleet).map_err(ApplyError::Map)?;
        let (pinned, missing) = self.pin_desired(&checked.desired).await?;
        if !missing.is_empty() {
            return Err(ApplyError::Map(secrets_missing(missing)));
        }
        let observed = self.observe().await?;
        let mut warnings = checked.warnings;
        warnings.extend(inline::preview_warnings(document));
        let mut view = PlanView {
            version: None,
            warnings,
            plan: plan::plan(&pinned, &observed),
        };
        if !cx.may(Op::ReadMapValues) {
            view.redact_inline_values();
        }
        Ok(view)
    }

    /// The map with rollback pins applied.
    pub(crate) fn effective(&self, desired: &Desired) -> Desired {
        let st = self.desired.lock();
        let mut out = desired.clone();
        for (name, pin) in &st.pins {
            if let Some(svc) = out.services.get_mut(name) {
                if svc.revision == pin.record.base_revision {
                    svc.spec = pin.spec.container.clone();
                    svc.revision = pin.record.revision.clone();
                    if pin.spec.host_access.is_empty() {
                        out.host_access.remove(name);
                    } else {
                        out.host_access
                            .insert(name.clone(), pin.spec.host_access.clone());
                    }
                    if pin.spec.files.is_empty() {
                        out.files.remove(name);
                    } else {
                        out.files.insert(name.clone(), pin.spec.files.clone());
                    }
                }
            }
        }
        out
    }

    /// Every declared service (and orphan), desired against actual.
    pub async fn services(&self) -> Result<Vec<ServiceView>, OpError> {
        let active = self.desired.active();
        let (observed, details) = self.observe_detailed().await?;
        let history = self.store.deployments(None, 2000).await?;
        let effective = active.as_ref().map(|a| self.effective(&a.desired));
        let plan = effective
            .as_ref()
            .map(|d| plan::plan(d, &observed))
            .unwrap_or_default();
        let (in_flight, blocked) = {
            let st = self.desired.lock();
            (st.in_flight.clone(), st.blocked.clone())
        };
        let mut containers: BTreeMap<String, Vec<ServiceContainer>> = BTreeMap::new();
        for (node, c) in details {
            containers
                .entry(c.service.clone())
                .or_default()
                .push(ServiceContainer {
                    node,
                    name: c.name.clone(),
                    revision: c.revision.clone(),
                    state: c.state.clone(),
                    health: c.health.clone(),
                });
        }
        let mut out = Vec::new();
        let names: BTreeSet<String> = effective
            .iter()
            .flat_map(|d| d.services.keys().cloned())
            .chain(containers.keys().cloned())
            .collect();
        for name in names {
            let svc = effective.as_ref().and_then(|d| d.services.get(&name));
            let mine = containers.remove(&name).unwrap_or_default();
            let last = history.iter().find(|d| d.service == name).cloned();
            // The revision in force: the wanted one once any of it runs, else what runs (the
            // last good revision after a failed update rolled back).
            let serving = serving_revision(svc.map(|s| s.revision.as_str()), &mine);
            let of_serving = |c: &&ServiceContainer| serving.as_deref() == Some(&c.revision);
            let running = mine
                .iter()
                .filter(of_serving)
                .filter(|c| c.state == "running")
                .count() as u32;
            let healthy = mine
                .iter()
                .filter(of_serving)
                .filter(|c| {
                    c.state == "running" && c.health != "unhealthy" && c.health != "starting"
                })
                .count() as u32;
            let serving_other = serving.filter(|r| svc.is_some_and(|s| s.revision != *r));
            let deploy_jobs: Vec<Uuid> = in_flight
                .iter()
                .filter(|((s, _), f)| *s == name && !f.job.is_nil())
                .map(|(_, f)| f.job)
                .collect();
            let deploying = !deploy_jobs.is_empty();
            let has_action = plan.actions.iter().any(|a| a.service() == name);
            let waiting = plan.waiting.iter().find(|w| w.service == name);
            let refused = plan.refused.iter().find(|w| w.service == name);
            let failed = svc.and_then(|s| blocked.get(&(name.clone(), s.revision.clone())));
            let (status, message) = match svc {
                None => (
                    "orphan",
                    Some("no longer declared; its containers are removed".to_owned()),
                ),
                Some(_) if deploying => ("deploying", None),
                Some(s) if failed.is_some() => (
                    "failed",
                    failed.map(|reason| match &serving_other {
                        Some(old) => format!(
                            "revision {} failed: {reason}; revision {} runs and serves",
                            short_revision(&s.revision),
                            short_revision(old)
                        ),
                        None => reason.clone(),
                    }),
                ),
                Some(_) if has_action => ("pending", None),
                Some(_) if refused.is_some() => ("refused", refused.map(|w| w.reason.clone())),
                Some(_) if waiting.is_some() => ("waiting", waiting.map(|w| w.reason.clone())),
                Some(_) => ("converged", None),
            };
            let map_revision = active
                .as_ref()
                .and_then(|a| a.desired.services.get(&name))
                .map(|s| s.revision.clone());
            out.push(ServiceView {
                name: name.clone(),
                declared: svc.is_some(),
                image: svc.map(|s| s.spec.image.clone()),
                revision: svc.map(|s| s.revision.clone()),
                pinned_over: match (svc, map_revision) {
                    (Some(s), Some(m)) if s.revision != m => Some(m),
                    _ => None,
                },
                replicas: svc.map(|s| s.replicas).unwrap_or(0),
                serving_revision: serving_other,
                running,
                healthy,
                status: status.to_owned(),
                message,
                containers: mine,
                deploy_jobs,
                last_deployment: last,
            });
        }
        Ok(out)
    }

    /// Pin `service` to an earlier revision (default: the newest deployed one that differs from
    /// the revision wanted now) until the map changes the service.
    pub async fn rollback_service(
        &self,
        service: &str,
        to: Option<&str>,
        cx: &OpCtx,
    ) -> Result<PinRecord, OpError> {
        self.authorize(cx, Op::RollbackService)?;
        let by = cx.actor.as_str();
        let active = self
            .desired
            .active()
            .ok_or_else(|| OpError::Conflict("no service map is in force".into()))?;
        let map_svc = active.desired.services.get(service).ok_or_else(|| {
            OpError::NotFound(format!("no service named `{service}` is declared"))
        })?;
        let current = self.effective(&active.desired).services[service]
            .revision
            .clone();
        let history = self.store.deployments(Some(service), 1000).await?;
        let target = match to {
            Some(prefix) => {
                if prefix.len() < 4 {
                    return Err(OpError::Invalid(
                        "give at least 4 characters of the revision".into(),
                    ));
                }
                let found: BTreeSet<&str> = history
                    .iter()
                    .filter(|d| d.action != "remove" && d.revision.starts_with(prefix))
                    .map(|d| d.revision.as_str())
                    .collect();
                match found.len() {
                    0 => {
                        return Err(OpError::NotFound(format!(
                            "`{service}` was never deployed at a revision starting with `{prefix}`"
                        )))
                    }
                    1 => found.into_iter().next().expect("one").to_owned(),
                    _ => {
                        return Err(OpError::Invalid(format!(
                            "`{prefix}` matches several revisions"
                        )))
                    }
                }
            }
            None => history
                .iter()
                .find(|d| d.outcome == "deployed" && d.action != "remove" && d.revision != current)
                .map(|d| d.revision.clone())
                .ok_or_else(|| {
                    OpError::Conflict(format!(
                        "`{service}` has no earlier revision that deployed successfully"
                    ))
                })?,
        };
        let spec_json = history
            .iter()
            .find(|d| d.revision == target)
            .map(|d| d.spec.clone())
            .expect("target comes from the history");
        let spec: RevisionSpec = serde_json::from_str(&spec_json)
            .map_err(|e| OpError::Invalid(format!("stored spec of {target} is unreadable: {e}")))?;
        let record = PinRecord {
            service: service.to_owned(),
            revision: target.clone(),
            spec: spec_json,
            base_revision: map_svc.revision.clone(),
            created_by: by.to_owned(),
            created_at: millis(std::time::SystemTime::now()),
        };
        self.store.set_pin(&record).await?;
        {
            let mut st = self.desired.lock();
            st.blocked.remove(&(service.to_owned(), target.clone()));
            st.pins.insert(
                service.to_owned(),
                Pin {
                    record: record.clone(),
                    spec,
                },
            );
        }
        self.record(
            cx,
            Change {
                action: "service.rollback",
                target: service.to_owned(),
                detail: serde_json::json!({ "from": current, "to": target }),
                event: Some(Event::ServiceRolledBack {
                    service: service.to_owned(),
                    from: current.clone(),
                    to: target.clone(),
                    by: by.to_owned(),
                }),
            },
        );
        self.desired.kick("rollback");
        Ok(record)
    }
}
