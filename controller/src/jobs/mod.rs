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

use tokio::sync::{broadcast, mpsc, watch};
use tracing::info;
use uuid::Uuid;

use crate::authz::{Change, Op, OpCtx};
use crate::{ControlPlane, OpError};

pub use nebula_types::jobs as model;
mod progress;
pub mod router;
mod schedule;
mod stream;
mod writer;

pub use schedule::{schedule_pass, SCHEDULER_PERIOD};
pub use writer::writer;

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

/// A job's id and idempotency key, chosen by its creator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobKey {
    pub id: Uuid,
    pub key: String,
    /// The creator has just made `id` and knows no job holds the key yet: it is not looked
    /// up (a creator that may be repeating itself, after a restart, says `false`).
    pub fresh: bool,
}

/// The unfinished jobs.
pub struct JobTable {
    inner: Mutex<TableInner>,
    /// The scheduler's "run now".
    pub(crate) kick: crate::tasks::Activator,
    writes: mpsc::UnboundedSender<(u64, Write)>,
    writes_rx: Mutex<Option<mpsc::UnboundedReceiver<(u64, Write)>>>,
    nodes: Mutex<Option<Arc<Vec<NodeMeta>>>>,
    /// Raised at every take-over: writes queued before it are dropped by the writer (the new
    /// leadership read the jobs from the store; an older write may undo another leader's).
    epoch: std::sync::atomic::AtomicU64,
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
            epoch: Default::default(),
        }
    }
}

impl JobTable {
    /// Forget every unfinished job (a replica taking over reads them again from the store:
    /// what it loaded at its start may have been finished by the leader since).
    pub(crate) fn forget_all(&self) {
        let mut t = self.lock();
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *t = TableInner::default();
    }

    /// The current epoch (see `epoch`).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

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

    /// Unfinished deploy and undeploy jobs: id, service and node.
    pub(crate) fn unfinished_deploys(&self) -> Vec<(Uuid, String, String)> {
        self.lock()
            .active
            .values()
            .filter_map(|a| match (&a.rec.target, a.rec.work.deploy_service()) {
                (Target::Node(node), Some(service)) => {
                    Some((a.rec.id, service.to_owned(), node.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Unfinished jobs right now.
    pub fn active_count(&self) -> usize {
        self.lock().active.len()
    }

    fn write(&self, w: Write) {
        // The writer lives as long as the controller; after shutdown, writes are dropped.
        let _ = self.writes.send((self.epoch(), w));
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
        self.create_job_keyed(new, None, cx).await
    }

    /// [`ControlPlane::create_job`] with an id and idempotency key chosen by the caller: when
    /// a job with that key exists (running, or stored), it is returned and nothing is created.
    /// A workflow step's job is made this way, so that a controller that stops between
    /// storing the step and storing its job makes the same job again, never a second one.
    pub async fn create_job_keyed(
        self: &Arc<Self>,
        new: NewJob,
        key: Option<JobKey>,
        cx: &OpCtx,
    ) -> Result<JobRecord, OpError> {
        self.authorize(cx, Op::RunJob)?;
        if let Some(k) = key.as_ref().filter(|k| !k.fresh) {
            if let Some(rec) = self.job_by_key(&k.key).await? {
                return Ok(rec);
            }
        }
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
        let (max_attempts, deadline) = self.job_limits(&new)?;
        let now = UnixMillis::now().as_i64();
        let (id, key) = match key {
            Some(k) => (k.id, Some(k.key)),
            None => (Uuid::now_v7(), None),
        };
        let rec = JobRecord {
            id,
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
            key,
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
            return Err(OpError::Conflict(
                "the job was not stored: this controller stopped leading or is shutting down; try again"
                    .into(),
            ));
        }
        Ok(rec)
    }

    /// The job made with idempotency key `key`: from the table while it runs, else from the
    /// store.
    async fn job_by_key(&self, key: &str) -> Result<Option<JobRecord>, OpError> {
        let running = self
            .jobs
            .lock()
            .active
            .values()
            .find(|a| a.rec.key.as_deref() == Some(key))
            .map(|a| a.rec.clone());
        match running {
            Some(rec) => Ok(Some(rec)),
            None => Ok(self.store.job_by_key(key).await?),
        }
    }

    /// A new job's tries in all and deadline, checked.
    fn job_limits(&self, new: &NewJob) -> Result<(u32, Duration), OpError> {
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
        Ok((max_attempts, deadline))
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

    /// Follow a job's record only (`None` when it has finished: read it from the store).
    pub fn watch_record(&self, id: Uuid) -> Option<watch::Receiver<Arc<JobRecord>>> {
        self.jobs
            .lock()
            .active
            .get(&id)
            .map(|a| a.watch.subscribe())
    }

    /// Wait until the job has finished (and is stored) or `timeout` passes; returns the latest
    /// record either way.
    pub async fn wait_job(&self, id: Uuid, timeout: Duration) -> Result<JobRecord, OpError> {
        let until = tokio::time::Instant::now() + timeout;
        let Some(mut w) = self.watch_job(id) else {
            // Finished, or finishing: its final record may still be on its way to the store.
            let mut pause = Duration::from_millis(10);
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
                // Soon for a final record on its way to the store, then slower (a replica
                // that stopped leading waits for the leader to finish the job).
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        };
        loop {
            let rec = w.record.borrow_and_update().clone();
            if rec.state.is_terminal() {
                return Ok((*rec).clone());
            }
            match tokio::time::timeout_at(until, w.record.changed()).await {
                Ok(Ok(())) => {}
                // Every sender is gone: the final record was sent and seen above, or this
                // replica dropped the job (it stopped leading): the store has the rest.
                Ok(Err(_)) => {
                    let left = until.saturating_duration_since(tokio::time::Instant::now());
                    return Box::pin(self.wait_job(id, left)).await;
                }
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
