//! Runs that start on their own: the `workflow-triggers` task (schedules, and the fleet's
//! events) and webhook deliveries (`POST /hooks/workflows/NAME`).
//!
//! A triggered run acts with the operator role, in the name of its trigger (`schedule:NAME`,
//! `webhook:NAME`, `event:KIND`): whoever could define the workflow chose what it does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nebula_types::api::workflows::{Delivered, RunView};
use nebula_types::auth::Role;
use nebula_types::events::Event;
use nebula_workflows::spec::Workflow;
use nebula_workflows::trigger::{self, EventKind, Overlap, Schedule, Timetable};
use serde_json::{json, Value as Json};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::driver::now;
use crate::authz::{OpCtx, Via};
use crate::{ControlPlane, OpError};

/// How often schedules are looked at.
pub const TICK: Duration = Duration::from_secs(1);
/// How long the workflows' definitions are kept between reads (they are read again at once
/// when one changes here; this catches a change made while another replica led).
const DEFS_TTL: Duration = Duration::from_secs(30);
/// Deliveries are remembered this long (senders retry for hours, not weeks).
const DELIVERIES_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Event-started runs of one workflow that may be open at once (a burst of events beyond it is
/// dropped, with a warning, rather than queued without end).
const MAX_EVENT_RUNS: usize = 16;
/// The largest webhook body taken.
pub const MAX_WEBHOOK_BODY: usize = 1 << 20;

fn trigger_ctx(actor: String) -> OpCtx {
    OpCtx::new(actor, Role::Operator, Via::Internal)
}

async fn definitions(cp: &ControlPlane) -> Vec<Workflow> {
    match cp.store.workflow_defs().await {
        Ok(defs) => defs
            .iter()
            .filter_map(|d| serde_json::from_str(&d.definition).ok())
            .collect(),
        Err(e) => {
            warn!("reading workflows for their triggers: {e}");
            Vec::new()
        }
    }
}

/// The `workflow-triggers` task.
pub async fn run(cp: Arc<ControlPlane>, cancel: CancellationToken) {
    let mut events = cp.events.subscribe();
    let mut defs: Vec<Workflow> = Vec::new();
    let mut read_at: Option<Instant> = None;
    let mut version = u64::MAX;
    let mut pruned_at: Option<Instant> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                fresh(&cp, &mut defs, &mut version, &mut read_at).await;
                schedules(&cp, &defs).await;
                if pruned_at.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
                    let before = now() - DELIVERIES_KEPT.as_millis() as i64;
                    if let Err(e) = cp.store.prune_deliveries(before).await {
                        warn!("forgetting old webhook deliveries: {e}");
                    }
                    pruned_at = Some(Instant::now());
                }
            }
            ev = events.recv() => match ev {
                Ok(e) => {
                    fresh(&cp, &mut defs, &mut version, &mut read_at).await;
                    on_event(&cp, &defs, e).await
                }
                Err(RecvError::Lagged(n)) => warn!("workflow event triggers missed {n} events"),
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// Read the definitions again when one changed (or they are old).
async fn fresh(
    cp: &ControlPlane,
    defs: &mut Vec<Workflow>,
    version: &mut u64,
    read_at: &mut Option<Instant>,
) {
    let now_version = cp
        .workflows
        .version
        .load(std::sync::atomic::Ordering::Relaxed);
    if now_version != *version || read_at.is_none_or(|t| t.elapsed() > DEFS_TTL) {
        *version = now_version;
        *defs = definitions(cp).await;
        *read_at = Some(Instant::now());
    }
}

fn schedule_key(s: &Schedule) -> String {
    format!("{} {}", s.cron, s.timezone)
}

async fn schedules(cp: &Arc<ControlPlane>, defs: &[Workflow]) {
    if defs.iter().all(|w| w.on.schedule.is_empty()) {
        return;
    }
    let marks: HashMap<(String, String), i64> = match cp.store.schedule_marks().await {
        Ok(m) => m.into_iter().map(|(w, s, t)| ((w, s), t)).collect(),
        Err(e) => {
            warn!("reading the schedules' marks: {e}");
            return;
        }
    };
    let now = now();
    for w in defs {
        for s in &w.on.schedule {
            let Ok(table) = Timetable::new(s) else {
                continue;
            };
            let key = schedule_key(s);
            let Some(&last) = marks.get(&(w.name.clone(), key.clone())) else {
                // A schedule seen for the first time runs from now on.
                mark(cp, &w.name, &key, now).await;
                continue;
            };
            // Times older than the catch-up window are not looked for.
            let window = s.catch_up.unwrap_or_default().max(TICK * 5).as_millis() as i64;
            let Some(due) = table.due(last.max(now - window), now) else {
                continue;
            };
            // Marked before it fires: a failover after this never fires the same time twice.
            if !mark(cp, &w.name, &key, now).await {
                return;
            }
            if trigger::in_window(s, due, now, TICK) {
                fire(cp, w, s, due).await;
            }
        }
    }
}

/// Record a schedule's last look; `false` when this replica no longer leads or the write failed.
async fn mark(cp: &ControlPlane, workflow: &str, key: &str, now: i64) -> bool {
    let Ok(fence) = cp.ha.fence() else {
        return false;
    };
    match cp
        .store
        .set_schedule_mark(fence.as_ref(), workflow, key, now)
        .await
    {
        Ok(()) => true,
        Err(e) => {
            warn!("recording a schedule's mark: {e}");
            false
        }
    }
}

fn started_by(r: &crate::store::workflows::RunRecord, kind: &str) -> bool {
    serde_json::from_str::<Json>(&r.trigger).is_ok_and(|t| t["kind"] == kind)
}

async fn fire(cp: &Arc<ControlPlane>, w: &Workflow, s: &Schedule, due: i64) {
    let trigger = json!({
        "kind": "schedule",
        "cron": s.cron,
        "timezone": s.timezone,
        "time": crate::store::rfc3339_millis(crate::store::from_millis(due)),
    });
    let cx = trigger_ctx(format!("schedule:{}", w.name));
    let open: Vec<_> = match cp.store.open_runs_of(&w.name).await {
        Ok(runs) => runs
            .into_iter()
            .filter(|r| started_by(r, "schedule"))
            .collect(),
        Err(e) => {
            warn!("reading a workflow's open runs: {e}");
            return;
        }
    };
    if !open.is_empty() {
        match s.overlap {
            Overlap::Skip => {
                info!(workflow = %w.name, "scheduled run skipped: the previous one is still open");
                cp.audit(
                    &cx.actor,
                    "workflow.schedule_skipped",
                    &w.name,
                    json!({"time": trigger["time"], "open": open.iter().map(|r| r.id).collect::<Vec<_>>()}),
                );
                return;
            }
            Overlap::Allow => {}
            Overlap::Replace => {
                for r in &open {
                    let _ = cp.workflow_cancel(&cx, r.id).await;
                }
            }
        }
    }
    start(cp, &cx, w, &s.inputs, trigger).await;
}

async fn start(
    cp: &ControlPlane,
    cx: &OpCtx,
    w: &Workflow,
    template: &serde_json::Map<String, Json>,
    trigger: Json,
) -> Option<RunView> {
    let inputs = match trigger::inputs(template, &trigger) {
        Ok(i) => i,
        Err(e) => {
            warn!(workflow = %w.name, "a trigger's inputs did not render: {e}");
            return None;
        }
    };
    match cp.start_run(cx, &w.name, inputs, trigger).await {
        Ok(run) => {
            info!(workflow = %w.name, run = %run.id, by = %cx.actor, "run started");
            Some(run)
        }
        Err(e) => {
            warn!(workflow = %w.name, by = %cx.actor, "a triggered run was not started: {e}");
            None
        }
    }
}

/// What an event is to event triggers.
fn event_of(e: &Event) -> Option<(EventKind, Json)> {
    Some(match e {
        Event::NodeOnline { id, name } => (EventKind::NodeOnline, json!({"id": id, "name": name})),
        Event::NodeOffline { id, name } => {
            (EventKind::NodeOffline, json!({"id": id, "name": name}))
        }
        Event::JobChanged {
            id,
            kind,
            state,
            node,
        } if matches!(state.as_str(), "failed" | "timed_out" | "lost") => (
            EventKind::JobFailed,
            json!({"id": id, "kind": kind, "state": state, "node": node}),
        ),
        Event::DeployFinished {
            service,
            node,
            revision,
            outcome,
            message,
        } if matches!(outcome.as_str(), "failed" | "rolled-back") => (
            EventKind::DeployFailed,
            json!({"service": service, "node": node, "revision": revision, "outcome": outcome, "message": message}),
        ),
        Event::ContainerChanged {
            node,
            container,
            name,
            state,
            health,
            ..
        } => (
            EventKind::ContainerChanged,
            json!({"node": node, "container": container, "name": name, "state": state, "health": health}),
        ),
        Event::MonitorChanged { monitor, node, up } => (
            if *up {
                EventKind::MonitorUp
            } else {
                EventKind::MonitorDown
            },
            json!({"monitor": monitor, "node": node}),
        ),
        _ => return None,
    })
}

async fn on_event(cp: &Arc<ControlPlane>, defs: &[Workflow], e: Event) {
    let Some((kind, event)) = event_of(&e) else {
        return;
    };
    if kind == EventKind::JobFailed {
        // A workflow's own step failing does not start workflows (no loops).
        let id = event["id"].as_str().and_then(|s| s.parse().ok());
        if let Some(id) = id {
            if let Ok(Some(job)) = cp.job(id).await {
                if job.key.is_some() {
                    return;
                }
            }
        }
    }
    let trigger = json!({"kind": "event", "event_kind": kind.as_str(), "event": event});
    for w in defs {
        for t in w.on.events.iter().filter(|t| t.on == kind) {
            match trigger::matches(t, &trigger) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(err) => {
                    warn!(workflow = %w.name, "an event trigger's condition failed: {err}");
                    continue;
                }
            }
            let open = cp
                .store
                .open_runs_of(&w.name)
                .await
                .map(|r| r.iter().filter(|r| started_by(r, "event")).count())
                .unwrap_or(0);
            if open >= MAX_EVENT_RUNS {
                warn!(workflow = %w.name, "{open} event-started runs are open: this event starts none");
                continue;
            }
            let cx = trigger_ctx(format!("event:{}", kind.as_str()));
            start(cp, &cx, w, &t.inputs, trigger.clone()).await;
        }
    }
}

impl ControlPlane {
    /// A webhook delivery: its signature checked with the workflow's secret, a replayed
    /// delivery id dropped, then a run started with the body as `trigger.body`.
    pub async fn workflow_webhook(
        &self,
        name: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<Delivered, OpError> {
        let def = self
            .store
            .workflow_def(name)
            .await?
            .ok_or_else(|| OpError::NotFound(format!("no workflow named `{name}`")))?;
        let w: Workflow = serde_json::from_str(&def.definition)
            .map_err(|e| OpError::Invalid(format!("workflow `{name}` does not read: {e}")))?;
        let hook =
            w.on.webhook
                .clone()
                .ok_or_else(|| OpError::NotFound(format!("workflow `{name}` takes no webhook")))?;
        let secret = match self.reveal_secret(&hook.secret, None).await {
            Ok((_, v)) => v,
            Err(_) => {
                return Err(OpError::Conflict(format!(
                    "the webhook's secret `{}` is not in the secret store",
                    hook.secret
                )))
            }
        };
        let header = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let actor = format!("webhook:{name}");
        let delivery = match trigger::verify(hook.scheme, secret.expose(), &header, body, now()) {
            Ok(d) => d,
            Err(why) => {
                self.audit(
                    &actor,
                    "workflow.webhook_refused",
                    name,
                    json!({"why": why}),
                );
                return Err(OpError::Forbidden(format!("webhook refused: {why}")));
            }
        };
        if let Some(d) = &delivery {
            if !self.store.claim_delivery(name, d, now()).await? {
                let run = self
                    .store
                    .delivery_run(name, d)
                    .await?
                    .and_then(|r| r.parse().ok());
                return Ok(Delivered {
                    run,
                    duplicate: true,
                });
            }
        }
        let parsed: Json = serde_json::from_slice(body)
            .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(body).into_owned()));
        let shown: serde_json::Map<String, Json> = headers
            .iter()
            .filter(|(k, _)| {
                let k = k.to_ascii_lowercase();
                k.starts_with("x-github-event")
                    || k.starts_with("x-gitlab-event")
                    || k == "content-type"
            })
            .map(|(k, v)| (k.to_ascii_lowercase(), Json::String(v.clone())))
            .collect();
        let trigger =
            json!({"kind": "webhook", "delivery": delivery, "headers": shown, "body": parsed});
        let inputs = trigger::inputs(&hook.inputs, &trigger)
            .map_err(|e| OpError::Invalid(format!("the webhook's inputs: {e}")))?;
        let cx = OpCtx::new(actor, Role::Operator, Via::Api);
        let run = match self.start_run(&cx, name, inputs, trigger).await {
            Ok(r) => r,
            Err(e) => {
                // Refused, nothing started: the sender's retry may start it. (After a timeout
                // the run may have been stored: the claim stays.)
                if let (Some(d), false) = (&delivery, matches!(e, OpError::Conflict(_))) {
                    self.store.unclaim_delivery(name, d).await?;
                }
                return Err(e);
            }
        };
        if let Some(d) = &delivery {
            self.store.set_delivery_run(name, d, run.id).await?;
        }
        Ok(Delivered {
            run: Some(run.id),
            duplicate: false,
        })
    }
}
