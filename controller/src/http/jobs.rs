//! `/api/v1/jobs`, `/api/v1/inventory` and `/api/v1/audit`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::Stream;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

use super::{ApiError, ApiResult, Page};
use crate::authz::{Op, OpCtx};
use crate::jobs::{JobLogLine, JobRecord, JobState, NewJob, Selector, Target, Work};
use crate::store::jobs::{AuditFilter, JobFilter};
use crate::ControlPlane;
pub use nebula_types::api::jobs::{CreateJob, FanOut, JobView, NodeResult, Progress};

/// Longest a request may wait for jobs to finish.
const MAX_WAIT: Duration = Duration::from_secs(300);

fn parse_duration(what: &str, s: &str) -> ApiResult<Duration> {
    humantime::parse_duration(s)
        .map_err(|e| ApiError::bad_request(format!("`{what}`: {e} (write e.g. 30s, 10m, 2h)")))
}

fn parse_uuid(s: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| ApiError::bad_request(format!("`{s}` is not a job id")))
}

fn target(node: Option<String>, selector: Option<Selector>) -> ApiResult<Target> {
    match (node, selector) {
        (Some(n), None) => Ok(Target::Node(n)),
        (None, Some(s)) => Ok(Target::Selector(s)),
        _ => Err(ApiError::bad_request(
            "give exactly one of `node` (a node name) or `selector`",
        )),
    }
}

/// Deploys are the reconciler's: people change the service map instead.
fn refuse_internal(work: &Work) -> ApiResult<()> {
    if work.is_internal() {
        return Err(ApiError::bad_request(format!(
            "`{}` jobs come from the reconciler; change the service map (PUT /api/v1/desired) instead",
            work.kind()
        )));
    }
    Ok(())
}

pub(super) async fn create_job(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: Result<Json<CreateJob>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(b) = body?;
    refuse_internal(&b.work)?;
    let target = target(b.node, b.selector)?;
    let deadline = b
        .deadline
        .as_deref()
        .map(|d| parse_duration("deadline", d))
        .transpose()?;
    let wait = b
        .wait
        .as_deref()
        .map(|d| parse_duration("wait", d))
        .transpose()?;
    let rec = cp
        .create_job(
            NewJob {
                work: b.work,
                target,
                deadline,
                idempotent: b.idempotent,
                max_attempts: b.max_attempts,
            },
            &who,
        )
        .await?;
    match wait {
        Some(w) => {
            let rec = cp.wait_job(rec.id, w.min(MAX_WAIT)).await?;
            let status = if rec.state.is_terminal() {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            Ok((status, Json(rec)).into_response())
        }
        None => Ok((StatusCode::CREATED, Json(rec)).into_response()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JobQuery {
    state: Option<String>,
    node: Option<String>,
    kind: Option<String>,
    created_by: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

pub(super) async fn list_jobs(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    query: Result<Query<JobQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Page<JobRecord>>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
    }
    let state = match q.state.as_deref() {
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown state `{s}` (one of: {})",
                JobState::ALL.map(|s| s.as_str()).join(", ")
            ))
        })?),
        None => None,
    };
    let before = q.cursor.as_deref().map(parse_uuid).transpose()?;
    let mut items = cp
        .store
        .list_jobs(&JobFilter {
            state,
            node: q.node,
            kind: q.kind,
            created_by: q.created_by,
            before,
            limit: limit + 1,
        })
        .await?;
    // Unfinished jobs: show their live state (the store may be a batch behind).
    for j in items.iter_mut() {
        if !j.state.is_terminal() {
            if let Ok(Some(live)) = cp.job(j.id).await {
                *j = live;
            }
        }
    }
    if !who.may(Op::ReadMapValues) {
        items.iter_mut().for_each(|j| j.work.redact_inline_values());
    }
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|j| j.id.to_string())
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor }))
}

pub(super) async fn get_job(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    let id = parse_uuid(&id)?;
    let mut record = cp
        .job(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
    if !who.may(Op::ReadMapValues) {
        record.work.redact_inline_values();
    }
    let progress = cp
        .job_progress_of(id)
        .map(|(percent, message)| Progress { percent, message });
    Ok(Json(JobView { record, progress }))
}

pub(super) async fn cancel_job(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<JobRecord>)> {
    let id = parse_uuid(&id)?;
    let rec = cp.cancel_job(id, &who).await?;
    Ok((StatusCode::ACCEPTED, Json(rec)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogQuery {
    /// `false`: send what is stored, then end, even while the job runs.
    follow: Option<bool>,
}

/// `GET /api/v1/jobs/{id}/logs`: server-sent events. `log` events carry one line each (JSON),
/// `state` events the job record when its state changes, and a final `end` event the finished
/// job; then the stream closes.
pub(super) async fn job_logs(
    State(cp): State<Arc<ControlPlane>>,
    Path(id): Path<String>,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let id = parse_uuid(&id)?;
    log_stream(cp, id, q.follow.unwrap_or(true)).await
}

/// A job's log as server-sent events: `log` per stored then live line, `state`, then `end`
/// (the API's and the dashboard's job pages both read it).
pub async fn log_stream(
    cp: Arc<ControlPlane>,
    id: Uuid,
    follow: bool,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    if cp.job(id).await?.is_none() {
        return Err(ApiError::not_found(format!("no job {id}")));
    }
    let (tx, rx) = mpsc::channel::<SseEvent>(256);
    let shutdown = cp.shutdown.clone();
    let cp2 = cp.clone();
    cp.tracker.spawn(async move {
        tokio::select! {
            _ = stream_logs(cp2, id, follow, tx) => {}
            _ = shutdown.cancelled() => {}
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|ev| (Ok(ev), rx))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn log_event(l: &JobLogLine) -> SseEvent {
    SseEvent::default()
        .event("log")
        .data(serde_json::to_string(l).unwrap_or_default())
}

fn record_event(name: &str, r: &JobRecord) -> SseEvent {
    SseEvent::default()
        .event(name)
        .data(serde_json::to_string(r).unwrap_or_default())
}

/// Feed one log stream: stored lines, then live ones, then the end. Returns when the client
/// has gone or the job has ended.
async fn stream_logs(cp: Arc<ControlPlane>, id: Uuid, follow: bool, tx: mpsc::Sender<SseEvent>) {
    // Subscribe first, so no line falls between what is stored and what is live.
    let watch = if follow { cp.watch_job(id) } else { None };
    let mut last: Option<(u32, u64)> = None;
    let send_line = |l: &JobLogLine, last: &mut Option<(u32, u64)>| {
        let key = (l.attempt, l.seq);
        if last.is_some_and(|k| key <= k) {
            return None;
        }
        *last = Some(key);
        Some(log_event(l))
    };
    // Stored lines, a page at a time.
    loop {
        let page = match cp.store.job_logs(id, last, 1000).await {
            Ok(p) => p,
            Err(_) => return,
        };
        let n = page.len();
        for l in &page {
            if let Some(ev) = send_line(l, &mut last) {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        }
        if n < 1000 {
            break;
        }
    }
    let Some(mut w) = watch else {
        // Not in the table: finished, or its final write still on its way to the store. Take the
        // record once it is stored as final (a following stream waits up to 10 s for that);
        // its last lines were committed with it or before, so read the store again after it.
        let rec = if follow {
            cp.wait_job(id, Duration::from_secs(10)).await.ok()
        } else {
            cp.job(id).await.ok().flatten()
        };
        if let Ok(page) = cp.store.job_logs(id, last, 10_000).await {
            for l in &page {
                if let Some(ev) = send_line(l, &mut last) {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
            }
        }
        if let Some(rec) = rec {
            let name = if rec.state.is_terminal() {
                "end"
            } else {
                "state"
            };
            let _ = tx.send(record_event(name, &rec)).await;
        }
        return;
    };
    for l in &w.recent {
        if let Some(ev) = send_line(l, &mut last) {
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    }
    let mut state = w.record.borrow_and_update().state;
    let current = w.record.borrow().clone();
    if tx.send(record_event("state", &current)).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            line = w.logs.recv() => match line {
                Ok(l) => {
                    if let Some(ev) = send_line(&l, &mut last) {
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Too slow for the live feed: catch up from the store.
                    if let Ok(page) = cp.store.job_logs(id, last, 10_000).await {
                        for l in &page {
                            if let Some(ev) = send_line(l, &mut last) {
                                if tx.send(ev).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            changed = w.record.changed() => {
                if changed.is_err() {
                    break;
                }
                let rec = w.record.borrow_and_update().clone();
                if rec.state.is_terminal() {
                    break;
                }
                if rec.state != state {
                    state = rec.state;
                    if tx.send(record_event("state", &rec)).await.is_err() {
                        return;
                    }
                }
            }
            _ = tx.closed() => return,
        }
    }
    // The job ended: lines still in the live channel, then the record once it is stored (the
    // writer publishes it on the watch after its commit).
    while let Ok(l) = w.logs.try_recv() {
        if let Some(ev) = send_line(&l, &mut last) {
            let _ = tx.send(ev).await;
        }
    }
    let rec = loop {
        let rec = w.record.borrow_and_update().clone();
        if rec.state.is_terminal() {
            break rec;
        }
        match tokio::time::timeout(Duration::from_secs(10), w.record.changed()).await {
            Ok(Ok(())) => {}
            _ => break rec,
        }
    };
    if let Ok(page) = cp.store.job_logs(id, last, 10_000).await {
        for l in &page {
            if let Some(ev) = send_line(l, &mut last) {
                let _ = tx.send(ev).await;
            }
        }
    }
    let _ = tx.send(record_event("end", &rec)).await;
}

// ----- inventory and fan-out -----

/// Run `work` on every listed (or selected) node at once; wait for all.
async fn fan_out(
    cp: &Arc<ControlPlane>,
    who: &OpCtx,
    nodes: Vec<(String, bool)>,
    work: Work,
    timeout: Duration,
) -> ApiResult<FanOut> {
    refuse_internal(&work)?;
    work.validate().map_err(ApiError::bad_request)?;
    let mut results = Vec::new();
    let mut online_nodes = Vec::new();
    for (name, online) in nodes {
        if online {
            online_nodes.push(name);
        } else {
            results.push(NodeResult {
                node: name,
                job_id: None,
                state: "offline".into(),
                exit_code: None,
                error: Some("the node is offline".into()),
                output: None,
                log_tail: Vec::new(),
            });
        }
    }
    // Created together (they share the store's group commits), then awaited together.
    let creates = online_nodes.iter().map(|name| {
        cp.create_job(
            NewJob {
                work: work.clone(),
                target: Target::Node(name.clone()),
                deadline: Some(timeout),
                idempotent: false,
                max_attempts: None,
            },
            who,
        )
    });
    let created = futures::future::join_all(creates).await;
    let mut pending = Vec::new();
    for (name, rec) in online_nodes.into_iter().zip(created) {
        pending.push((name, rec?.id));
    }
    let waits = pending
        .iter()
        .map(|(_, id)| cp.wait_job(*id, timeout + Duration::from_secs(10)));
    let done = futures::future::join_all(waits).await;
    for ((name, id), rec) in pending.into_iter().zip(done) {
        let rec = rec?;
        let log_tail = if rec.logs_next > 0 || rec.attempt > 1 {
            let lines = cp.store.job_logs(id, None, 100_000).await?;
            let skip = lines.len().saturating_sub(100);
            lines.into_iter().skip(skip).map(|l| l.line).collect()
        } else {
            Vec::new()
        };
        results.push(NodeResult {
            node: name,
            job_id: Some(id),
            state: rec.state.as_str().to_owned(),
            exit_code: rec.exit_code,
            error: rec
                .error
                .or(rec.reason.filter(|_| rec.state != JobState::Succeeded)),
            output: rec.output,
            log_tail,
        });
    }
    results.sort_by(|a, b| a.node.cmp(&b.node));
    let succeeded = results.iter().filter(|r| r.state == "succeeded").count();
    Ok(FanOut {
        failed: results.len() - succeeded,
        succeeded,
        results,
    })
}

/// The nodes a fan-out goes to: named ones (which must exist) or all matching a selector.
async fn pick_nodes(
    cp: &ControlPlane,
    names: Option<Vec<String>>,
    selector: Option<Selector>,
) -> ApiResult<Vec<(String, bool)>> {
    let all = cp.store.list_nodes().await?;
    let online = |id| cp.registry.get(id).is_some();
    match (names, selector) {
        (Some(names), None) => {
            let mut out = Vec::new();
            for n in names {
                let node = all
                    .iter()
                    .find(|x| x.name == n)
                    .ok_or_else(|| ApiError::not_found(format!("no node named `{n}`")))?;
                out.push((node.name.clone(), online(node.id)));
            }
            out.dedup();
            Ok(out)
        }
        (None, selector) => {
            let sel = selector.unwrap_or_default();
            Ok(all
                .iter()
                .filter(|n| sel.labels.iter().all(|(k, v)| n.labels.get(k) == Some(v)))
                .filter(|n| match sel.gpu {
                    Some(g) => g != n.facts.gpus.is_empty(),
                    None => true,
                })
                .map(|n| (n.name.clone(), online(n.id)))
                .collect())
        }
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "give `nodes` or `selector`, not both",
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InventoryQuery {
    /// Comma-separated node names (default: every node).
    nodes: Option<String>,
    timeout: Option<String>,
}

/// `GET /api/v1/inventory`: an inventory job on every (or each named) online node, now.
pub(super) async fn inventory(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    query: Result<Query<InventoryQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<FanOut>> {
    // Reading an inventory creates jobs, which operators may do.
    cp.authorize(&who, Op::ReadInventory)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let timeout = q
        .timeout
        .as_deref()
        .map(|t| parse_duration("timeout", t))
        .transpose()?
        .unwrap_or(Duration::from_secs(15))
        .min(MAX_WAIT);
    let names = q.nodes.map(|n| {
        n.split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    });
    let nodes = pick_nodes(&cp, names, None).await?;
    Ok(Json(
        fan_out(&cp, &who, nodes, Work::Inventory, timeout).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExecuteBody {
    #[serde(default)]
    nodes: Option<Vec<String>>,
    #[serde(default)]
    selector: Option<Selector>,
    work: Work,
    #[serde(default)]
    timeout: Option<String>,
}

/// `POST /api/v1/inventory/execute`: one operation on many nodes, a result per node.
pub(super) async fn execute(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: Result<Json<ExecuteBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Json<FanOut>> {
    let Json(b) = body?;
    let timeout = b
        .timeout
        .as_deref()
        .map(|t| parse_duration("timeout", t))
        .transpose()?
        .unwrap_or(Duration::from_secs(60))
        .min(MAX_WAIT);
    if b.nodes
        .as_ref()
        .is_some_and(|n| n.is_empty() || n.len() > 1000)
    {
        return Err(ApiError::bad_request("`nodes` lists 1 to 1000 node names"));
    }
    let nodes = pick_nodes(&cp, b.nodes, b.selector).await?;
    if nodes.is_empty() {
        return Err(ApiError::bad_request("no node matches"));
    }
    Ok(Json(fan_out(&cp, &who, nodes, b.work, timeout).await?))
}

// ----- audit -----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    actor: Option<String>,
    action: Option<String>,
    /// The front end: `api`, `dashboard`, `discord`, `internal`.
    via: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

pub(super) async fn audit(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Page<crate::jobs::AuditRecord>>> {
    cp.authorize(&who, Op::ReadAudit)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
    }
    if q.via
        .as_deref()
        .is_some_and(|v| v.is_empty() || !v.bytes().all(|b| b.is_ascii_lowercase()))
    {
        return Err(ApiError::bad_request(
            "via: api, dashboard, discord or internal",
        ));
    }
    let before = q
        .cursor
        .as_deref()
        .map(|c| Uuid::parse_str(c).map_err(|_| ApiError::bad_request("bad cursor")))
        .transpose()?;
    let mut items = cp
        .store
        .list_audit(&AuditFilter {
            actor: q.actor,
            action: q.action,
            via: q.via,
            before,
            limit: limit + 1,
        })
        .await?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|a| a.id.to_string())
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor }))
}
