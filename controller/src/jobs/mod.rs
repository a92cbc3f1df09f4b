//! The job engine: durable jobs, routed to nodes, one QUIC stream each.
//!
//! Tasks (all on the controller's tracker, stopped by its token):
//!
//! * the **writer** ([`writer`]): the only task that writes jobs, log lines and audit entries.
//!   It takes everything queued on its channel, writes it in one transaction (group commit), then
//!   publishes the batch's state changes on the event bus and to the jobs' `watch` channels. A job
//!   is dispatched only after the writer has committed its row.
//! * the **scheduler** (the `job-scheduler` task, [`schedule_pass`]): runs when kicked (a job
//!   created, a node online, a slot freed) and every 250 ms. Each pass looks at every unfinished
//!   job: routes queued ones,
//!   re-sends jobs whose node came back, expires deadlines, turns leases that ran out into `lost`
//!   (and retries idempotent jobs), and calls the wake hook for jobs that wait for offline nodes.
//! * one **stream task** per dispatched job ([`stream`]): opens the job's stream on the node's
//!   connection, sends the request, follows the agent's events and reports them to the table. A
//!   cancel reaches it over an unbounded channel.
//!
//! Shared state is the [`JobTable`] (one mutex over the unfinished jobs; finished jobs live only
//! in the store). A state change is made in the table under the lock, then queued for the writer.

use nebula_protocol::time::UnixMillis;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nebula_protocol::jobs::{JobRequest, JobResult, JobStatus};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::authz::{Change, Op, OpCtx};
use crate::events::Event;
use crate::store::jobs::JobBatch;
use crate::{ControlPlane, OpError};

pub use nebula_types::jobs as model;
pub mod router;
mod stream;

pub use model::{AuditRecord, JobLogLine, JobRecord, JobState, Selector, Target, Work};
use router::{Candidate, Decision};

/// How often the scheduler looks at unfinished jobs without being kicked.
const TICK: Duration = Duration::from_millis(250);
/// How long past its deadline a job may take to report before the controller ends it.
const DEADLINE_SLACK: Duration = Duration::from_secs(5);
/// Log lines kept in memory per unfinished job (for log streams that join late).
const RECENT_LOGS: usize = 1000;
/// Most writes taken into one transaction.
const MAX_BATCH: usize = 4096;

/// A model job not finished yet: id, node, what it does, its latest progress.
pub type ModelJobInFlight = (Uuid, Option<String>, String, Option<(f32, String)>);

/// What a person asks for.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub work: Work,
    pub target: Target,
    /// From now; `None`: the configured default.
    pub deadline: Option<Duration>,
    pub idempotent: bool,
    /// Tries in all for an idempotent job; `None`: the configured default.
    pub max_attempts: Option<u32>,
}

/// The unfinished jobs.
pub struct JobTable {
    inner: Mutex<TableInner>,
    /// The scheduler's "run now".
    pub(crate) kick: crate::tasks::Activator,
    writes: mpsc::UnboundedSender<Write>,
    writes_rx: Mutex<Option<mpsc::UnboundedReceiver<Write>>>,
    nodes: Mutex<Option<Arc<Vec<NodeMeta>>>>,
}

#[derive(Default)]
struct TableInner {
    active: HashMap<Uuid, Active>,
    in_flight: HashMap<Uuid, usize>,
    /// Jobs created (or re-queued) since the last pass: a kicked pass looks at these only.
    fresh: Vec<Uuid>,
    /// The next pass looks at every job (a node came or went, a lease may have run out).
    full: bool,
    /// Queued jobs the last pass left waiting (a freed slot only matters when there are some).
    waiting: usize,
}

struct Active {
    rec: JobRecord,
    watch: watch::Sender<Arc<JobRecord>>,
    /// Live log lines, made when the first watcher comes (most jobs have none).
    logs: Option<broadcast::Sender<JobLogLine>>,
    recent: VecDeque<JobLogLine>,
    /// The live stream task's cancel channel; `None` while no stream carries the job.
    stream: Option<mpsc::UnboundedSender<String>>,
    /// When a detached job becomes lost.
    lease_until: Option<Instant>,
    cancel: Option<String>,
    deadline_cancel_sent: bool,
    /// Counted in `in_flight` for `rec.node_id`.
    counted: bool,
    /// The agent's latest progress report (percent, message); not stored.
    progress: Option<(f32, String)>,
}

/// A node as routing needs it from the store.
#[derive(Debug, Clone)]
struct NodeMeta {
    id: Uuid,
    name: String,
    labels: nebula_protocol::Labels,
    gpu_count: usize,
}

enum Write {
    Job {
        rec: Box<JobRecord>,
        from: Option<JobState>,
        /// `None`: an intermediate record watchers must not take for the outcome (the `lost`
        /// just before a retry).
        watch: Option<watch::Sender<Arc<JobRecord>>>,
        /// Set to `true` once the row is committed.
        committed: Option<watch::Sender<bool>>,
    },
    Log(Uuid, JobLogLine),
    Audit(AuditRecord),
}

impl std::fmt::Debug for JobTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobTable")
            .field("active", &self.lock().active.len())
            .finish()
    }
}

impl Default for JobTable {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        JobTable {
            inner: Mutex::new(TableInner::default()),
            kick: Default::default(),
            writes: tx,
            writes_rx: Mutex::new(Some(rx)),
            nodes: Mutex::new(None),
        }
    }
}

impl JobTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, TableInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ask the scheduler for a pass over every job soon.
    pub fn kick(&self) {
        self.lock().full = true;
        self.kick.activate();
    }

    /// A job is ready to be routed: a pass over the new jobs soon.
    fn kick_fresh(&self, t: &mut TableInner, id: Uuid) {
        t.fresh.push(id);
        self.kick.activate();
    }

    /// A slot on a node was freed: worth a full pass only when jobs are waiting.
    fn kick_if_waiting(&self, t: &mut TableInner) {
        if t.waiting > 0 {
            t.full = true;
            self.kick.activate();
        }
    }

    /// The node list changed (enrolled, removed, facts): reload it at the next pass.
    pub fn nodes_changed(&self) {
        *self.nodes.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.kick();
    }

    /// Unfinished jobs right now.
    pub fn active_count(&self) -> usize {
        self.lock().active.len()
    }

    fn write(&self, w: Write) {
        // The writer lives as long as the controller; after shutdown, writes are dropped.
        let _ = self.writes.send(w);
    }

    /// Queue a job's current record for the writer (and its watchers, after the commit).
    fn persist(&self, a: &Active, from: Option<JobState>) {
        self.write(Write::Job {
            rec: Box::new(a.rec.clone()),
            from,
            watch: Some(a.watch.clone()),
            committed: None,
        });
    }

    /// Like [`JobTable::persist`], without telling the job's watchers.
    fn persist_quietly(&self, a: &Active, from: Option<JobState>) {
        self.write(Write::Job {
            rec: Box::new(a.rec.clone()),
            from,
            watch: None,
            committed: None,
        });
    }
}

fn new_active(rec: JobRecord) -> Active {
    Active {
        watch: watch::channel(Arc::new(rec.clone())).0,
        logs: None,
        recent: VecDeque::new(),
        stream: None,
        lease_until: None,
        cancel: None,
        deadline_cancel_sent: false,
        counted: false,
        progress: None,
        rec,
    }
}

/// What watching a job gives: its record as it changes, and its log lines.
pub struct JobWatch {
    pub record: watch::Receiver<Arc<JobRecord>>,
    pub logs: broadcast::Receiver<JobLogLine>,
    /// Recent lines already received (older ones are in the store).
    pub recent: Vec<JobLogLine>,
}

impl ControlPlane {
    /// Create a job: check it, route it when a node is free now (else the scheduler will),
    /// persist it, and dispatch it once stored.
    pub async fn create_job(
        self: &Arc<Self>,
        new: NewJob,
        cx: &OpCtx,
    ) -> Result<JobRecord, OpError> {
        self.authorize(cx, Op::RunJob)?;
        let by = cx.actor.as_str();
        new.work.validate().map_err(OpError::Invalid)?;
        if let Target::Node(name) = &new.target {
            // The cached node list first; the store when the name is not in it (yet).
            let known = self.node_meta().await?.iter().any(|n| &n.name == name)
                || self.store.node_by_name(name).await?.is_some();
            if !known {
                return Err(OpError::NotFound(format!("no node named `{name}`")));
            }
        }
        if let Target::Selector(sel) = &new.target {
            for (k, v) in &sel.labels {
                nebula_protocol::validate::validate_label(k, v).map_err(OpError::Invalid)?;
            }
        }
        let max_attempts = match (new.idempotent, new.max_attempts) {
            (false, _) => 1,
            (true, Some(n)) if (1..=10).contains(&n) => n,
            (true, Some(n)) => {
                return Err(OpError::Invalid(format!(
                    "max_attempts must be between 1 and 10, not {n}"
                )))
            }
            (true, None) => self.config.job_max_attempts,
        };
        let deadline = new.deadline.unwrap_or(self.config.job_default_deadline);
        if deadline.is_zero() || deadline > Duration::from_secs(30 * 24 * 3600) {
            return Err(OpError::Invalid(
                "deadline must be between 1ms and 30 days from now".into(),
            ));
        }
        let now = UnixMillis::now().as_i64();
        let rec = JobRecord {
            id: Uuid::now_v7(),
            work: new.work,
            target: new.target,
            state: JobState::Queued,
            node_id: None,
            node: None,
            attempt: 1,
            max_attempts,
            idempotent: new.idempotent,
            created_by: by.to_owned(),
            created_at: now,
            dispatched_at: None,
            started_at: None,
            finished_at: None,
            deadline: Some(now + deadline.as_millis() as i64),
            routing: None,
            reason: None,
            exit_code: None,
            error: None,
            output: None,
            excluded: Vec::new(),
            logs_next: 0,
        };
        // Route it now when a node is free: the row is then written once, already assigned,
        // and the stream opens as soon as it is committed. Otherwise it is queued for the
        // scheduler.
        let nodes = self.node_meta().await?;
        let (committed, _) = watch::channel(false);
        let mut wait = committed.subscribe();
        let rec = {
            let mut t = self.jobs.lock();
            let mut a = new_active(rec);
            let candidates: Vec<Candidate> = nodes
                .iter()
                .filter(|n| match &a.rec.target {
                    Target::Node(name) => &n.name == name,
                    Target::Selector(_) => true,
                })
                .map(|n| self.candidate(n, t.in_flight.get(&n.id).copied().unwrap_or(0)))
                .collect();
            // Older jobs waiting for a slot go first: the scheduler routes them in order.
            let decision = if t.waiting > 0 {
                Decision::Wait {
                    reason: "waiting behind older jobs".into(),
                    asleep: Vec::new(),
                }
            } else {
                router::route(
                    &a.rec.target,
                    &candidates,
                    &[],
                    self.config.max_jobs_per_node,
                )
            };
            let conn = match &decision {
                Decision::Run { node, .. } => self.registry.connection(*node),
                Decision::Wait { .. } => None,
            };
            match (decision, conn) {
                (Decision::Run { node, name, why }, Some(conn)) => {
                    a.rec.node_id = Some(node);
                    a.rec.node = Some(name);
                    a.rec.routing = Some(why);
                    a.rec.state = JobState::Dispatched;
                    a.rec.dispatched_at = Some(now);
                    a.counted = true;
                    *t.in_flight.entry(node).or_default() += 1;
                    self.jobs.write(Write::Job {
                        rec: Box::new(a.rec.clone()),
                        from: None,
                        watch: Some(a.watch.clone()),
                        committed: Some(committed),
                    });
                    self.start_stream_locked(&mut a, conn, Some(wait.clone()));
                }
                _ => {
                    self.jobs.write(Write::Job {
                        rec: Box::new(a.rec.clone()),
                        from: None,
                        watch: Some(a.watch.clone()),
                        committed: Some(committed),
                    });
                    self.jobs.kick_fresh(&mut t, a.rec.id);
                }
            }
            let rec = a.rec.clone();
            t.active.insert(rec.id, a);
            rec
        };
        // The job's own events come from the writer once its row is stored.
        self.record(
            cx,
            Change {
                action: "job.create",
                target: rec.id.to_string(),
                detail: serde_json::json!({"work": rec.work, "target": rec.target, "idempotent": rec.idempotent}),
                event: None,
            },
        );
        // Answer once the job is stored.
        if wait.wait_for(|c| *c).await.is_err() {
            return Err(OpError::Invalid("the controller is shutting down".into()));
        }
        Ok(rec)
    }

    /// A job by id: from the table while it runs, else from the store.
    pub async fn job(&self, id: Uuid) -> Result<Option<JobRecord>, OpError> {
        if let Some(a) = self.jobs.lock().active.get(&id) {
            return Ok(Some(a.rec.clone()));
        }
        Ok(self.store.job(id).await?)
    }

    /// Follow a job (`None` when it has finished: read it from the store).
    pub fn watch_job(&self, id: Uuid) -> Option<JobWatch> {
        let mut t = self.jobs.lock();
        let a = t.active.get_mut(&id)?;
        Some(JobWatch {
            record: a.watch.subscribe(),
            logs: a
                .logs
                .get_or_insert_with(|| broadcast::channel(256).0)
                .subscribe(),
            recent: a.recent.iter().cloned().collect(),
        })
    }

    /// Wait until the job has finished (and is stored) or `timeout` passes; returns the latest
    /// record either way.
    pub async fn wait_job(&self, id: Uuid, timeout: Duration) -> Result<JobRecord, OpError> {
        let until = tokio::time::Instant::now() + timeout;
        let Some(mut w) = self.watch_job(id) else {
            // Finished, or finishing: its final record may still be on its way to the store.
            loop {
                let rec = self
                    .store
                    .job(id)
                    .await?
                    .ok_or_else(|| OpError::NotFound(format!("no job {id}")))?;
                if rec.state.is_terminal() || tokio::time::Instant::now() >= until {
                    return Ok(rec);
                }
                if self.jobs.lock().active.contains_key(&id) {
                    // Back in the table (a retry): wait on it there.
                    let left = until.saturating_duration_since(tokio::time::Instant::now());
                    return Box::pin(self.wait_job(id, left)).await;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        loop {
            let rec = w.record.borrow_and_update().clone();
            if rec.state.is_terminal() {
                return Ok((*rec).clone());
            }
            match tokio::time::timeout_at(until, w.record.changed()).await {
                Ok(Ok(())) => {}
                // Every sender is gone only after the final record was sent and seen above.
                Ok(Err(_)) => return Ok((*w.record.borrow().clone()).clone()),
                Err(_) => return Ok((*rec).clone()),
            }
        }
    }

    /// Cancel a job. Queued jobs end at once; a running job is stopped by its agent.
    pub async fn cancel_job(&self, id: Uuid, cx: &OpCtx) -> Result<JobRecord, OpError> {
        self.authorize(cx, Op::CancelJob)?;
        let by = cx.actor.as_str();
        let reason = format!("cancelled by {by}");
        let rec = match self.cancel_locked(id, &reason) {
            Some(rec) => rec,
            None => {
                return match self.store.job(id).await? {
                    Some(r) => Err(OpError::Conflict(format!(
                        "job {id} has already ended ({})",
                        r.state
                    ))),
                    None => Err(OpError::NotFound(format!("no job {id}"))),
                };
            }
        };
        info!(job = %id, by, "job cancel requested");
        self.record(
            cx,
            Change {
                action: "job.cancel",
                target: id.to_string(),
                detail: serde_json::json!({"state": rec.state}),
                event: None,
            },
        );
        Ok(rec)
    }

    /// Mark a job cancelled (queued) or ask its agent to stop it; `None` when it is not active.
    fn cancel_locked(&self, id: Uuid, reason: &str) -> Option<JobRecord> {
        let mut t = self.jobs.lock();
        let a = t.active.get_mut(&id)?;
        if a.cancel.is_some() {
            return Some(a.rec.clone());
        }
        a.cancel = Some(reason.to_owned());
        if a.rec.state == JobState::Queued {
            let rec = a.rec.clone();
            self.finish_locked(&mut t, id, JobState::Cancelled, |r| {
                r.reason = Some(reason.to_owned());
            });
            Some(JobRecord {
                state: JobState::Cancelled,
                ..rec
            })
        } else {
            if let Some(s) = &a.stream {
                let _ = s.send(reason.to_owned());
            }
            Some(a.rec.clone())
        }
    }

    /// Record an audit entry (written with the next batch).
    pub fn audit(&self, actor: &str, action: &str, target: &str, detail: serde_json::Value) {
        self.jobs.write(Write::Audit(AuditRecord {
            id: Uuid::now_v7(),
            at: UnixMillis::now().as_i64(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            detail,
        }));
    }

    /// Move a job to a final state under the table lock; `edit` fills in the details.
    fn finish_locked(
        &self,
        t: &mut TableInner,
        id: Uuid,
        state: JobState,
        edit: impl FnOnce(&mut JobRecord),
    ) {
        let Some(mut a) = t.active.remove(&id) else {
            return;
        };
        let from = a.rec.state;
        a.rec.state = state;
        a.rec.finished_at = Some(UnixMillis::now().as_i64());
        edit(&mut a.rec);
        release(&mut t.in_flight, &mut a);
        info!(job = %id, state = %state, node = ?a.rec.node, "job ended");
        self.jobs.persist(&a, Some(from));
        self.jobs.kick_if_waiting(t);
    }

    /// The agent's result arrived.
    pub(crate) fn job_finished(&self, id: Uuid, attempt: u32, result: JobResult) {
        let mut t = self.jobs.lock();
        let Some(a) = t.active.get_mut(&id) else {
            return;
        };
        if a.rec.attempt != attempt {
            return;
        }
        let state = match result.status {
            JobStatus::Succeeded => JobState::Succeeded,
            JobStatus::Failed | JobStatus::Refused => JobState::Failed,
            JobStatus::Cancelled => JobState::Cancelled,
            JobStatus::TimedOut => JobState::TimedOut,
            JobStatus::Interrupted => JobState::Lost,
        };
        let error = match (result.status, result.error) {
            (JobStatus::Refused, Some(e)) => Some(format!("refused by the agent: {e}")),
            (_, e) => e,
        };
        if state == JobState::Lost {
            let why = error.unwrap_or_else(|| "interrupted on the node".into());
            self.lose_locked(&mut t, id, why);
            return;
        }
        self.finish_locked(&mut t, id, state, |r| {
            r.exit_code = result.exit_code;
            r.error = error;
            r.output = match result.output {
                nebula_protocol::jobs::JobOutput::None => None,
                o => Some(o),
            };
        });
    }

    /// The job is lost on its node: retry it if it may be, else end it as `lost`.
    fn lose_locked(&self, t: &mut TableInner, id: Uuid, why: String) {
        let Some(a) = t.active.get_mut(&id) else {
            return;
        };
        let node = a.rec.node.clone().unwrap_or_default();
        if a.rec.idempotent && a.rec.attempt < a.rec.max_attempts && a.cancel.is_none() {
            let from = a.rec.state;
            warn!(job = %id, %node, attempt = a.rec.attempt, "job lost ({why}); retrying");
            // Record the loss, then the retry.
            a.rec.state = JobState::Lost;
            a.rec.reason = Some(format!("attempt {} lost on {node}: {why}", a.rec.attempt));
            self.jobs.persist_quietly(a, Some(from));
            if let Some(n) = a.rec.node_id {
                if !a.rec.excluded.contains(&n) {
                    a.rec.excluded.push(n);
                }
            }
            let TableInner {
                active, in_flight, ..
            } = &mut *t;
            let Some(a) = active.get_mut(&id) else {
                return;
            };
            release(in_flight, a);
            a.rec.state = JobState::Queued;
            a.rec.attempt += 1;
            a.rec.node_id = None;
            a.rec.node = None;
            a.rec.dispatched_at = None;
            a.rec.started_at = None;
            a.rec.routing = None;
            a.rec.logs_next = 0;
            a.rec.reason = Some(format!(
                "retrying (attempt {} of {}) after attempt {} was lost on {node}: {why}",
                a.rec.attempt,
                a.rec.max_attempts,
                a.rec.attempt - 1
            ));
            a.stream = None;
            a.lease_until = None;
            self.jobs.persist(a, Some(JobState::Lost));
            self.jobs.kick_fresh(t, id);
        } else {
            warn!(job = %id, %node, "job lost: {why}");
            let reason = format!("lost on {node}: {why}");
            self.finish_locked(t, id, JobState::Lost, |r| r.reason = Some(reason));
        }
    }

    /// A stream task ended without a result: the job waits for its node to come back.
    pub(crate) fn job_detached(&self, id: Uuid, attempt: u32, why: &str) {
        let mut t = self.jobs.lock();
        if let Some(a) = t.active.get_mut(&id) {
            if a.rec.attempt == attempt && !a.rec.state.is_terminal() {
                debug!(job = %id, "job stream ended without a result ({why}); waiting for the node");
                a.stream = None;
                a.lease_until = Some(Instant::now() + self.config.job_lost_grace);
            }
        }
        drop(t);
        self.jobs.kick();
    }

    /// The agent acknowledged or started the job.
    pub(crate) fn job_progress(&self, id: Uuid, attempt: u32, started: bool) {
        let mut t = self.jobs.lock();
        if let Some(a) = t.active.get_mut(&id) {
            if a.rec.attempt != attempt {
                return;
            }
            a.lease_until = None;
            if started && a.rec.state != JobState::Running {
                let from = a.rec.state;
                a.rec.state = JobState::Running;
                a.rec.started_at.get_or_insert(UnixMillis::now().as_i64());
                self.jobs.persist(a, Some(from));
            }
        }
    }

    /// The agent's progress figure for a running job.
    pub(crate) fn job_percent(&self, id: Uuid, attempt: u32, percent: f32, message: String) {
        let node = {
            let mut t = self.jobs.lock();
            let Some(a) = t.active.get_mut(&id) else {
                return;
            };
            if a.rec.attempt != attempt {
                return;
            }
            a.progress = Some((percent, message.clone()));
            a.rec.node.clone()
        };
        self.events.publish(crate::events::Event::JobProgress {
            id,
            node,
            permille: (percent.clamp(0.0, 100.0) * 10.0).round() as u16,
            message,
        });
    }

    /// Model jobs not finished yet: id, node, what, latest progress (percent, message).
    pub fn model_jobs_in_flight(&self) -> Vec<ModelJobInFlight> {
        let t = self.jobs.lock();
        t.active
            .values()
            .filter_map(|a| match &a.rec.work {
                Work::Model {
                    action, name, file, ..
                } => Some((
                    a.rec.id,
                    a.rec.node.clone().or_else(|| match &a.rec.target {
                        Target::Node(n) => Some(n.clone()),
                        _ => None,
                    }),
                    format!(
                        "{} {}",
                        serde_json::to_value(action)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        name.clone().or_else(|| file.clone()).unwrap_or_default()
                    ),
                    a.progress.clone(),
                )),
                _ => None,
            })
            .collect()
    }

    /// The latest progress of a job still running.
    pub fn job_progress_of(&self, id: Uuid) -> Option<(f32, String)> {
        self.jobs.lock().active.get(&id)?.progress.clone()
    }

    /// Log lines from the agent.
    pub(crate) fn job_logs(
        &self,
        id: Uuid,
        attempt: u32,
        lines: Vec<nebula_protocol::jobs::LogLine>,
    ) {
        let mut t = self.jobs.lock();
        let Some(a) = t.active.get_mut(&id) else {
            return;
        };
        if a.rec.attempt != attempt {
            return;
        }
        for l in lines {
            if l.seq < a.rec.logs_next {
                continue;
            }
            a.rec.logs_next = l.seq + 1;
            let line = JobLogLine {
                attempt,
                seq: l.seq,
                at: l.at_unix_ms,
                stream: l.stream.as_str().to_owned(),
                line: l.line,
            };
            if let Some(tx) = &a.logs {
                let _ = tx.send(line.clone());
            }
            a.recent.push_back(line.clone());
            if a.recent.len() > RECENT_LOGS {
                a.recent.pop_front();
            }
            self.jobs.write(Write::Log(id, line));
        }
    }

    /// Load unfinished jobs after a restart: queued ones are routed again; jobs that were out
    /// on nodes wait (leased) for their node to come back and report.
    pub async fn recover_jobs(&self) -> Result<usize, OpError> {
        let mut jobs = self.store.active_jobs().await?;
        for j in &mut jobs {
            // Lines may have been stored after the record was last written.
            j.logs_next = j
                .logs_next
                .max(self.store.next_log_seq(j.id, j.attempt).await?);
        }
        let n = jobs.len();
        let lease = Instant::now() + self.config.job_lost_grace;
        let mut t = self.jobs.lock();
        for rec in jobs {
            let node = rec.node_id;
            let out = matches!(rec.state, JobState::Dispatched | JobState::Running);
            let mut a = new_active(rec);
            if out {
                a.lease_until = Some(lease);
                if let Some(node) = node {
                    *t.in_flight.entry(node).or_default() += 1;
                    a.counted = true;
                }
            }
            t.active.insert(a.rec.id, a);
        }
        drop(t);
        if n > 0 {
            info!(jobs = n, "unfinished jobs recovered");
        }
        self.jobs.kick();
        Ok(n)
    }

    /// Routing candidates: every enrolled node with its live state.
    pub(crate) async fn candidates(
        &self,
        in_flight: &HashMap<Uuid, usize>,
    ) -> Result<Vec<Candidate>, OpError> {
        let nodes = self.node_meta().await?;
        Ok(nodes
            .iter()
            .map(|n| self.candidate(n, in_flight.get(&n.id).copied().unwrap_or(0)))
            .collect())
    }

    fn candidate(&self, n: &NodeMeta, in_flight: usize) -> Candidate {
        let online = self.registry.is_online(n.id);
        let mut c = Candidate {
            id: n.id,
            name: n.name.clone(),
            labels: n.labels.clone(),
            online,
            gpu_count: n.gpu_count,
            in_flight,
            ..Candidate::default()
        };
        if let Some(view) = self.telemetry.view(n.id) {
            if let Some(inv) = &view.inventory {
                c.gpu_count = c.gpu_count.max(inv.gpus.len());
                c.models = inv
                    .models
                    .iter()
                    .map(|m| (m.name.clone(), m.loaded))
                    .collect();
                if let Some(latest) = &view.latest {
                    c.cpu_percent = Some(latest.host.cpu_percent);
                    c.gpu_free_bytes = inv
                        .gpus
                        .iter()
                        .zip(&latest.gpus)
                        .filter_map(|(g, s)| {
                            s.memory_used_bytes
                                .map(|u| g.memory_total_bytes.saturating_sub(u))
                        })
                        .collect();
                }
            }
        }
        c
    }

    async fn node_meta(&self) -> Result<Arc<Vec<NodeMeta>>, OpError> {
        if let Some(n) = self
            .jobs
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(n);
        }
        let nodes: Arc<Vec<NodeMeta>> = Arc::new(
            self.store
                .list_nodes()
                .await?
                .into_iter()
                .map(|n| NodeMeta {
                    id: n.id,
                    gpu_count: n.facts.gpus.len(),
                    name: n.name,
                    labels: n.labels,
                })
                .collect(),
        );
        *self.jobs.nodes.lock().unwrap_or_else(|p| p.into_inner()) = Some(nodes.clone());
        Ok(nodes)
    }

    /// Routing found that only these offline nodes fit `job`: wake one that can be woken (the
    /// job is dispatched when it registers, within its deadline).
    fn wake_hook(self: &Arc<Self>, job: Uuid, asleep: &[Uuid]) {
        let _ = job;
        self.wake_on_demand(asleep);
    }

    /// One scheduler pass: over every unfinished job, or (kicked by new jobs) over those only.
    async fn schedule(self: &Arc<Self>, full: bool) -> Result<(), OpError> {
        // Candidates are built once per pass: every node for selectors, only the named nodes
        // for jobs that name one (the common case, and cheap).
        let (full, ids, selectors, mut named, in_flight) = {
            let mut t = self.jobs.lock();
            let full = full || std::mem::take(&mut t.full);
            let mut ids: Vec<Uuid> = if full {
                t.fresh.clear();
                t.active.keys().copied().collect()
            } else {
                std::mem::take(&mut t.fresh)
            };
            ids.sort_unstable();
            ids.dedup();
            let mut selectors = false;
            let mut named: Vec<String> = Vec::new();
            for a in ids.iter().filter_map(|id| t.active.get(id)) {
                if a.rec.state == JobState::Queued && a.stream.is_none() {
                    match &a.rec.target {
                        Target::Selector(_) => selectors = true,
                        Target::Node(n) => named.push(n.clone()),
                    }
                }
            }
            (full, ids, selectors, named, t.in_flight.clone())
        };
        let mut candidates = if selectors {
            self.candidates(&in_flight).await?
        } else if named.is_empty() {
            Vec::new()
        } else {
            let nodes = self.node_meta().await?;
            named.sort_unstable();
            named.dedup();
            nodes
                .iter()
                .filter(|n| named.binary_search(&n.name).is_ok())
                .map(|n| self.candidate(n, in_flight.get(&n.id).copied().unwrap_or(0)))
                .collect()
        };
        let now = Instant::now();
        let now_ms = UnixMillis::now().as_i64();
        let capacity = self.config.max_jobs_per_node;
        let mut t = self.jobs.lock();
        // Jobs may have been dispatched while the candidates were built: count them.
        for c in candidates.iter_mut() {
            c.in_flight = t.in_flight.get(&c.id).copied().unwrap_or(0);
        }
        let mut waiting = 0;
        for id in ids {
            let Some(a) = t.active.get_mut(&id) else {
                continue;
            };
            let past_deadline = a.rec.deadline.is_some_and(|d| now_ms >= d);
            match a.rec.state {
                JobState::Queued => {
                    if past_deadline {
                        let why = a
                            .rec
                            .reason
                            .clone()
                            .unwrap_or_else(|| "no node was free".into());
                        self.finish_locked(&mut t, id, JobState::TimedOut, |r| {
                            r.reason =
                                Some(format!("deadline passed before the job could run: {why}"));
                        });
                        continue;
                    }
                    match router::route(&a.rec.target, &candidates, &a.rec.excluded, capacity) {
                        Decision::Run { node, name, why } => {
                            let Some(conn) = self.registry.connection(node) else {
                                continue;
                            };
                            a.rec.node_id = Some(node);
                            a.rec.node = Some(name);
                            a.rec.routing = Some(why);
                            a.rec.reason = None;
                            a.rec.state = JobState::Dispatched;
                            a.rec.dispatched_at = Some(now_ms);
                            a.counted = true;
                            // Stored (with its node) before the agent can see it: a restart
                            // then sends it to the same node again, never to another one.
                            let (committed, wait) = watch::channel(false);
                            self.jobs.write(Write::Job {
                                rec: Box::new(a.rec.clone()),
                                from: Some(JobState::Queued),
                                watch: Some(a.watch.clone()),
                                committed: Some(committed),
                            });
                            self.start_stream_locked(a, conn, Some(wait));
                            *t.in_flight.entry(node).or_default() += 1;
                            if let Some(c) = candidates.iter_mut().find(|c| c.id == node) {
                                c.in_flight += 1;
                            }
                        }
                        Decision::Wait { reason, asleep } => {
                            waiting += 1;
                            if a.rec.reason.as_deref() != Some(reason.as_str()) {
                                debug!(job = %id, %reason, "job waits");
                                a.rec.reason = Some(reason);
                                self.jobs.persist(a, None);
                            }
                            if !asleep.is_empty() {
                                self.wake_hook(id, &asleep);
                            }
                        }
                    }
                }
                JobState::Dispatched | JobState::Running => {
                    self.check_dispatched_locked(&mut t, id, now, now_ms);
                }
                _ => {}
            }
        }
        if full {
            t.waiting = waiting;
        } else {
            t.waiting += waiting;
        }
        Ok(())
    }

    /// A dispatched or running job at a scheduling pass: its deadline (cancel, then give up on
    /// a node that never reports the end), and, when its stream is gone, sending it again to its
    /// node once that is back or losing it when the lease runs out.
    fn check_dispatched_locked(
        self: &Arc<Self>,
        t: &mut TableInner,
        id: Uuid,
        now: Instant,
        now_ms: i64,
    ) {
        let Some(a) = t.active.get_mut(&id) else {
            return;
        };
        let deadline_over = a
            .rec
            .deadline
            .is_some_and(|d| now_ms >= d + DEADLINE_SLACK.as_millis() as i64);
        if a.stream.is_some() {
            if deadline_over && !a.deadline_cancel_sent {
                a.deadline_cancel_sent = true;
                if let Some(s) = &a.stream {
                    let _ = s.send("the job's deadline passed".into());
                }
            } else if a.deadline_cancel_sent
                && a.rec
                    .deadline
                    .is_some_and(|d| now_ms >= d + 3 * DEADLINE_SLACK.as_millis() as i64)
            {
                self.finish_locked(t, id, JobState::TimedOut, |r| {
                    r.reason =
                        Some("deadline passed and the node did not report the job's end".into());
                });
            }
            return;
        }
        // Detached: re-send when the node is back, else wait out the lease.
        let conn = a.rec.node_id.and_then(|n| self.registry.connection(n));
        if let Some(conn) = conn {
            debug!(job = %id, "node is back; sending the job again");
            self.start_stream_locked(a, conn, None);
            return;
        }
        let lease = *a
            .lease_until
            .get_or_insert(now + self.config.job_lost_grace);
        if now >= lease {
            let grace = humantime::format_duration(self.config.job_lost_grace);
            self.lose_locked(t, id, format!("the node did not come back within {grace}"));
        }
    }

    /// Spawn the stream task for a job (first delivery or a re-send).
    /// `stored`: the stream opens only once this turns `true` (the assignment is committed).
    fn start_stream_locked(
        self: &Arc<Self>,
        a: &mut Active,
        conn: quinn::Connection,
        stored: Option<watch::Receiver<bool>>,
    ) {
        let req = JobRequest {
            id: a.rec.id,
            attempt: a.rec.attempt,
            deadline_unix_ms: a.rec.deadline,
            logs_from: a.rec.logs_next,
            spec: a.rec.work.to_spec(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(reason) = &a.cancel {
            let _ = tx.send(reason.clone());
        }
        a.stream = Some(tx);
        a.lease_until = None;
        let cp = self.clone();
        self.tracker.spawn(async move {
            if let Some(mut stored) = stored {
                if stored.wait_for(|c| *c).await.is_err() {
                    return;
                }
            }
            stream::run(cp, conn, req, rx).await
        });
    }
}

/// Give back a job's slot on its node.
fn release(in_flight: &mut HashMap<Uuid, usize>, a: &mut Active) {
    if a.counted {
        a.counted = false;
        if let Some(n) = a.rec.node_id {
            if let Some(c) = in_flight.get_mut(&n) {
                *c = c.saturating_sub(1);
            }
        }
    }
    a.stream = None;
}

/// One pass of the scheduler task: every unfinished job on its period (and at start), only the
/// jobs that kicked it when activated.
pub async fn schedule_pass(
    cp: &Arc<ControlPlane>,
    trigger: crate::tasks::Trigger,
) -> anyhow::Result<serde_json::Value> {
    let full = trigger != crate::tasks::Trigger::Activated;
    cp.schedule(full).await?;
    Ok(serde_json::json!({ "full": full }))
}

/// How often the scheduler makes a full pass without being kicked.
pub const SCHEDULER_PERIOD: Duration = TICK;

/// The writer task: group commits until shutdown, then whatever is left.
pub async fn writer(cp: Arc<ControlPlane>, shutdown: CancellationToken) {
    let Some(mut rx) = cp
        .jobs
        .writes_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    else {
        return;
    };
    let mut buf: Vec<Write> = Vec::with_capacity(MAX_BATCH);
    loop {
        let got = tokio::select! {
            n = rx.recv_many(&mut buf, MAX_BATCH) => n,
            _ = shutdown.cancelled() => {
                // Drain what is queued (stream tasks may still report for a moment).
                tokio::time::sleep(Duration::from_millis(100)).await;
                while let Ok(w) = rx.try_recv() {
                    buf.push(w);
                }
                commit(&cp, std::mem::take(&mut buf)).await;
                return;
            }
        };
        if got == 0 {
            return;
        }
        commit(&cp, std::mem::take(&mut buf)).await;
    }
}

async fn commit(cp: &ControlPlane, writes: Vec<Write>) {
    if writes.is_empty() {
        return;
    }
    let mut batch = JobBatch::default();
    let mut index: HashMap<Uuid, usize> = HashMap::new();
    let mut after = Vec::new();
    for w in writes {
        match w {
            Write::Job {
                rec,
                from,
                watch,
                committed,
            } => {
                let rec = *rec;
                after.push((rec.clone(), from, watch, committed));
                match index.get(&rec.id) {
                    Some(&i) => batch.jobs[i] = rec,
                    None => {
                        index.insert(rec.id, batch.jobs.len());
                        batch.jobs.push(rec);
                    }
                }
            }
            Write::Log(id, line) => batch.logs.push((id, line)),
            Write::Audit(a) => batch.audit.push(a),
        }
    }
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match cp.store.write_job_batch(&batch).await {
            Ok(()) => break,
            Err(e) => {
                warn!(
                    jobs = batch.jobs.len(),
                    "writing jobs failed (retrying): {:#}",
                    anyhow::Error::from(e)
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    cp.metrics
        .store_write_seconds
        .observe(started.elapsed().as_secs_f64());
    cp.metrics.jobs_active.set(cp.jobs.active_count() as i64);
    for (rec, from, watch, committed) in after {
        if from != Some(rec.state) && rec.state.is_terminal() && watch.is_some() {
            cp.metrics
                .jobs_finished
                .get_or_create(&vec![("state", rec.state.as_str())])
                .inc();
        }
        if from != Some(rec.state) {
            cp.events.publish(Event::JobChanged {
                id: rec.id,
                kind: rec.work.kind().to_owned(),
                state: rec.state.as_str().to_owned(),
                node: rec.node.clone(),
            });
        }
        if let Some(w) = watch {
            w.send_replace(Arc::new(rec));
        }
        if let Some(c) = committed {
            c.send_replace(true);
        }
    }
}
