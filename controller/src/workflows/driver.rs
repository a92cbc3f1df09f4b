//! The `workflow-driver` task (leader scope): the only writer of runs and steps.
//!
//! It keeps the open runs in memory, loaded from the store when it starts. Each pass takes the
//! runs something happened to (a command, a job that ended, a wake-up that came, a retry that
//! is due), asks the engine what comes next, stores every change in one fenced transaction,
//! and only then acts: creates the steps' jobs (each with the idempotency key
//! `RUN/STEP/ATTEMPT`, so that a job stored before a crash is found again, not made twice),
//! cancels jobs, answers commands. A driver that starts again (a restart, a new leader) reads
//! the same rows: finished steps stay finished, running ones are matched to their jobs.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use nebula_protocol::time::UnixMillis;
use nebula_types::events::Event;
use nebula_workflows::engine::{self, Outcome, RunView, StepRun, StepState};
use nebula_workflows::spec::{StepKind, Workflow};
use serde_json::{json, Value as Json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use super::local;
use super::steps::{self, Start};
use super::Cmd;
use crate::jobs::JobKey;
use crate::store::workflows::{RunRecord, StepRecord};
use crate::{ControlPlane, OpError};

/// How often the driver looks at open runs without being woken (due retries, timeouts, and a
/// safety net for a missed event).
const TICK: Duration = Duration::from_secs(1);

pub(super) struct Open {
    pub rec: RunRecord,
    pub wf: Arc<Workflow>,
    pub id: String,
    pub inputs: Json,
    pub trigger: Json,
    pub steps: BTreeMap<String, StepRun>,
    /// The job of each step's latest attempt.
    pub jobs: BTreeMap<String, Uuid>,
}

impl Open {
    pub fn new(rec: RunRecord, wf: Arc<Workflow>) -> Open {
        Open {
            id: rec.id.to_string(),
            inputs: serde_json::from_str(&rec.inputs).unwrap_or(Json::Null),
            trigger: serde_json::from_str(&rec.trigger).unwrap_or(Json::Null),
            rec,
            wf,
            steps: BTreeMap::new(),
            jobs: BTreeMap::new(),
        }
    }
}

/// Changes waiting to be stored, and what to do once they are.
#[derive(Default)]
pub(super) struct Pass {
    pub runs: BTreeMap<Uuid, RunRecord>,
    pub steps: Vec<StepRecord>,
    /// After the commit: jobs to create, jobs to cancel, wake-ups, replies.
    pub effects: Vec<Effect>,
}

pub(super) enum Effect {
    CreateJob {
        run: Uuid,
        step: String,
        key: JobKey,
        job: Box<crate::jobs::NewJob>,
    },
    CancelJob(Uuid),
    Wake {
        run: Uuid,
        step: String,
        node: String,
    },
    /// A step the controller carries out; its outcome comes back on the task channel.
    Task {
        at: local::Place,
        task: steps::Task,
    },
    Reply(Box<dyn FnOnce() + Send + Sync>),
    Finished(Uuid),
}

/// A controller task's outcome: (run, step, attempt, outcome).
pub(super) type TaskDone = (Uuid, String, u32, Outcome);

pub(super) struct Driver {
    pub cp: Arc<ControlPlane>,
    pub open: HashMap<Uuid, Open>,
    pub by_job: HashMap<Uuid, (Uuid, String)>,
    /// Wake steps waiting for their node: node name -> (run, step).
    pub waking: HashMap<String, Vec<(Uuid, String)>>,
    pub dirty: BTreeSet<Uuid>,
    /// Outcomes of attempts that ended, applied in the next pass.
    pub ended: Vec<(Uuid, String, Outcome)>,
    /// Changes made by commands, stored with the next pass.
    pub pending: Pass,
    /// When runs want to be looked at again (a retry, a timeout), unix ms.
    pub wakes: HashMap<Uuid, i64>,
    /// The time of the pass under way: every change it makes is stamped with it.
    pub clock: i64,
    /// Jobs followed through their own watch channel (their end comes on `done`).
    pub watched: HashSet<Uuid>,
    pub done_tx: mpsc::UnboundedSender<Arc<crate::jobs::JobRecord>>,
    done_rx: Option<mpsc::UnboundedReceiver<Arc<crate::jobs::JobRecord>>>,
    pub task_tx: mpsc::UnboundedSender<TaskDone>,
    task_rx: Option<mpsc::UnboundedReceiver<TaskDone>>,
    /// Controller tasks under way: (run, step) -> (attempt, its handle). One per step; stopped
    /// when the step ends otherwise (cancelled, timed out) and when the driver stops.
    pub tasks: HashMap<(Uuid, String), (u32, tokio::task::AbortHandle)>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // A driver that stops leading leaves nothing acting on its behalf.
        for (_, (_, h)) in self.tasks.drain() {
            h.abort();
        }
    }
}

pub(super) fn now() -> i64 {
    UnixMillis::now().as_i64()
}

/// A step's row; `now` (the pass's time) is its end when it has ended.
pub(super) fn step_record(
    run: Uuid,
    step: &str,
    s: &StepRun,
    job: Option<Uuid>,
    now: i64,
) -> StepRecord {
    StepRecord {
        run_id: run,
        step: step.to_owned(),
        attempt: s.attempt,
        state: s.state.as_str().to_owned(),
        job_id: job,
        outputs: (!s.outputs.is_null()).then(|| s.outputs.to_string()),
        error: s.error.clone(),
        not_before: s.not_before,
        started_at: s.started_at,
        finished_at: s.state.is_terminal().then_some(now),
    }
}

/// The latest attempt of each step, from stored rows (ordered by step, attempt).
pub(super) fn latest(rows: &[StepRecord]) -> BTreeMap<String, (StepRun, Option<Uuid>)> {
    let mut out = BTreeMap::new();
    for r in rows {
        let run = StepRun {
            state: StepState::parse(&r.state).unwrap_or(StepState::Failed),
            attempt: r.attempt,
            outputs: r
                .outputs
                .as_deref()
                .and_then(|o| serde_json::from_str(o).ok())
                .unwrap_or(Json::Null),
            error: r.error.clone(),
            not_before: r.not_before,
            started_at: r.started_at,
        };
        out.insert(r.step.clone(), (run, r.job_id));
    }
    out
}

impl Driver {
    pub(super) fn new(cp: Arc<ControlPlane>) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let (task_tx, task_rx) = mpsc::unbounded_channel();
        Driver {
            cp,
            open: HashMap::new(),
            by_job: HashMap::new(),
            waking: HashMap::new(),
            dirty: BTreeSet::new(),
            ended: Vec::new(),
            pending: Pass::default(),
            wakes: HashMap::new(),
            clock: 0,
            watched: HashSet::new(),
            done_tx,
            done_rx: Some(done_rx),
            task_tx,
            task_rx: Some(task_rx),
            tasks: HashMap::new(),
        }
    }

    /// Read the open runs from the store; steps that were running are matched to their jobs
    /// (made again, with the same id and key, when the job was never stored).
    async fn load(&mut self) -> Result<(), OpError> {
        // Read first: a failed read leaves what is in memory as it was.
        let (runs, rows) = self.cp.store.open_workflow_runs().await?;
        self.open.clear();
        self.wakes.clear();
        self.by_job.clear();
        self.waking.clear();
        self.pending = Pass::default();
        self.ended.clear();
        let mut by_run: HashMap<Uuid, Vec<StepRecord>> = HashMap::new();
        for r in rows {
            by_run.entry(r.run_id).or_default().push(r);
        }
        for rec in runs {
            let wf: Workflow = match serde_json::from_str(&rec.definition) {
                Ok(w) => w,
                Err(e) => {
                    warn!(run = %rec.id, "a stored run's workflow does not read: {e}");
                    continue;
                }
            };
            let mut open = Open::new(rec, Arc::new(wf));
            let rows = by_run.remove(&open.rec.id).unwrap_or_default();
            for (id, (s, job)) in latest(&rows) {
                if let Some(j) = job {
                    open.jobs.insert(id.clone(), j);
                    if s.state == StepState::Running {
                        self.by_job.insert(j, (open.rec.id, id.clone()));
                    }
                }
                open.steps.insert(id, s);
            }
            self.dirty.insert(open.rec.id);
            self.open.insert(open.rec.id, open);
        }
        // Running steps: their jobs may have ended while no driver ran, or never been stored.
        self.recheck().await;
        for open in self.open.values() {
            for (id, s) in &open.steps {
                let kind = open.wf.step(id).map(|s| s.kind);
                if s.state == StepState::Running && kind == Some(StepKind::Wake) {
                    if let Some(node) = s.outputs.get("node").and_then(Json::as_str) {
                        self.waking
                            .entry(node.to_owned())
                            .or_default()
                            .push((open.rec.id, id.clone()));
                    }
                }
            }
        }
        self.woken().await;
        self.resume_tasks();
        info!(runs = self.open.len(), "workflow runs loaded");
        Ok(())
    }

    /// Steps the controller was carrying out when the driver stopped go on (an action that
    /// may not be repeated is only waited for).
    fn resume_tasks(&mut self) {
        let route = local::FleetRoute(&self.cp);
        let deadline = self.cp.config.job_default_deadline;
        let mut effects = Vec::new();
        let mut failed = Vec::new();
        for open in self.open.values() {
            for (id, s) in &open.steps {
                let Some(ps) = open.wf.step(id) else { continue };
                if s.state != StepState::Running
                    || !matches!(
                        ps.kind,
                        StepKind::Sleep | StepKind::Notify | StepKind::Deploy | StepKind::Agent
                    )
                {
                    continue;
                }
                let key = (open.rec.id, id.clone());
                if self.tasks.get(&key).is_some_and(|(a, _)| *a == s.attempt) {
                    // Still under way in this process (the runs were read again).
                    continue;
                }
                let started = engine::parameters(&engine::scope(&view(open), ps), ps).and_then(
                    |(with, node)| steps::start(ps, &with, node.as_deref(), deadline, &route),
                );
                let task = match started {
                    Ok(Start::Task(task)) => task,
                    Ok(_) => continue,
                    Err(e) => {
                        failed.push((open.rec.id, id.clone(), Outcome::Failed(e)));
                        continue;
                    }
                };
                {
                    effects.push(Effect::Task {
                        at: local::Place {
                            run: open.rec.id,
                            step: id.clone(),
                            attempt: s.attempt,
                            workflow: open.rec.workflow.clone(),
                        },
                        task,
                    });
                }
            }
        }
        self.pending.effects.extend(effects);
        for (run, step, out) in failed {
            self.ended.push((run, step, out));
            self.dirty.insert(run);
        }
    }

    /// A running step's job: ended (its outcome is taken), running (followed), or missing
    /// (made again from the step's stored attempt).
    pub(super) async fn check_job(
        &mut self,
        job: Uuid,
        run: Uuid,
        step: &str,
    ) -> Result<(), OpError> {
        match self.cp.job(job).await? {
            Some(rec) if rec.state.is_terminal() => {
                let out = self.outcome_of(&rec, run, step).await;
                self.by_job.remove(&job);
                self.ended.push((run, step.to_owned(), out));
                self.dirty.insert(run);
            }
            Some(_) => {
                if !self.watched.contains(&job) {
                    self.follow(job);
                }
            }
            None => {
                let Some(open) = self.open.get(&run) else {
                    return Ok(());
                };
                let Some(s) = open.steps.get(step) else {
                    return Ok(());
                };
                // Rendered again from the same rows: the same parameters.
                let attempt = s.attempt;
                let Some(ps) = open.wf.step(step).cloned() else {
                    return Ok(());
                };
                let rendered = engine::parameters(&engine::scope(&view(open), &ps), &ps);
                let deadline = self.cp.config.job_default_deadline;
                let route = local::FleetRoute(&self.cp);
                let started = rendered.and_then(|(with, node)| {
                    steps::start(&ps, &with, node.as_deref(), deadline, &route)
                });
                match started {
                    Ok(Start::Job(new)) => self.pending.effects.push(Effect::CreateJob {
                        run,
                        step: step.to_owned(),
                        key: JobKey {
                            id: job,
                            key: format!("{run}/{step}/{attempt}"),
                            fresh: false,
                        },
                        job: new,
                    }),
                    Ok(_) => {}
                    Err(e) => {
                        self.ended.push((run, step.to_owned(), Outcome::Failed(e)));
                        self.dirty.insert(run);
                    }
                }
            }
        }
        Ok(())
    }

    async fn outcome_of(&self, rec: &crate::jobs::JobRecord, run: Uuid, step: &str) -> Outcome {
        let Some(def) = self.open.get(&run).and_then(|o| o.wf.step(step)).cloned() else {
            return Outcome::Failed("the step is no longer known".into());
        };
        let stdout = if matches!(rec.work, crate::jobs::Work::Exec { .. }) {
            // The attempt's last lines (at most 2,000), not its first.
            let next = self
                .cp
                .store
                .next_log_seq(rec.id, rec.attempt)
                .await
                .unwrap_or(0);
            let after = match next.checked_sub(2001) {
                Some(s) => (rec.attempt, s),
                None => (rec.attempt.saturating_sub(1), u64::MAX),
            };
            match self.cp.store.job_logs(rec.id, Some(after), 2000).await {
                Ok(lines) => Some(steps::tail(
                    &lines
                        .iter()
                        .filter(|l| l.stream == "stdout" && l.attempt == rec.attempt)
                        .map(|l| format!("{}\n", l.line))
                        .collect::<String>(),
                )),
                Err(e) => {
                    warn!(job = %rec.id, "reading an exec step's output: {e}");
                    None
                }
            }
        } else {
            None
        };
        steps::outcome(&def, rec, stdout)
    }

    pub(super) async fn run(
        mut self,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<Cmd>,
        cancel: CancellationToken,
    ) {
        let mut events = self.cp.events.subscribe();
        let (Some(mut done), Some(mut tasks)) = (self.done_rx.take(), self.task_rx.take()) else {
            return;
        };
        loop {
            match self.load().await {
                Ok(()) => break,
                Err(e) => {
                    warn!("loading workflow runs: {e}; trying again");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(TICK) => {}
                    }
                }
            }
        }
        loop {
            self.pass();
            if let Err(e) = self.commit().await {
                warn!("storing workflow changes: {e}; reading the runs again");
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(TICK) => {}
                    }
                    match self.load().await {
                        Ok(()) => break,
                        Err(e) => warn!("reading workflow runs: {e}; trying again"),
                    }
                }
            }
            let sleep = self
                .wakes
                .values()
                .min()
                .map(|at| Duration::from_millis((at - now()).clamp(0, 1000) as u64))
                .unwrap_or(TICK);
            tokio::select! {
                _ = cancel.cancelled() => return,
                cmd = rx.recv() => match cmd {
                    Some(c) => self.command(c),
                    None => return,
                },
                Some(rec) = done.recv() => self.job_ended(rec).await,
                Some(t) = tasks.recv() => self.task_ended(t),
                ev = events.recv() => match ev {
                    Ok(e) => self.event(e).await,
                    Err(RecvError::Lagged(_)) => {
                        self.recheck().await;
                        self.woken().await;
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = tokio::time::sleep(sleep) => {
                    let now = now();
                    let due: Vec<Uuid> = self
                        .wakes
                        .iter()
                        .filter(|(_, at)| **at <= now)
                        .map(|(id, _)| *id)
                        .collect();
                    self.dirty.extend(due);
                }
            }
            // Take everything else that is waiting, for one transaction.
            while let Ok(c) = rx.try_recv() {
                self.command(c);
            }
            while let Ok(rec) = done.try_recv() {
                self.job_ended(rec).await;
            }
            while let Ok(t) = tasks.try_recv() {
                self.task_ended(t);
            }
            loop {
                match events.try_recv() {
                    Ok(e) => self.event(e).await,
                    Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {
                        self.recheck().await
                    }
                    Err(_) => break,
                }
            }
        }
    }

    /// Wake steps whose node is online already (it came up while no driver ran, or its event
    /// was missed) succeed.
    async fn woken(&mut self) {
        let nodes: Vec<String> = self.waking.keys().cloned().collect();
        for node in nodes {
            if let Ok(Some(n)) = self.cp.store.node_by_name(&node).await {
                if self.cp.registry.is_online(n.id) {
                    self.woke(&node, json!({"node": node, "online": true}));
                }
            }
        }
    }

    /// A controller task ended: its outcome counts while its attempt is still the step's.
    fn task_ended(&mut self, (run, step, attempt, out): TaskDone) {
        let key = (run, step.clone());
        if self.tasks.get(&key).is_some_and(|(a, _)| *a == attempt) {
            self.tasks.remove(&key);
        }
        let current = self
            .open
            .get(&run)
            .and_then(|o| o.steps.get(&step))
            .is_some_and(|s| s.attempt == attempt && s.state == StepState::Running);
        if current {
            self.ended.push((run, step, out));
            self.dirty.insert(run);
        }
    }

    /// A followed job's last record (it has ended, or its channel closed).
    async fn job_ended(&mut self, rec: Arc<crate::jobs::JobRecord>) {
        self.watched.remove(&rec.id);
        let Some((run, step)) = self.by_job.get(&rec.id).cloned() else {
            return;
        };
        if rec.state.is_terminal() {
            let out = self.outcome_of(&rec, run, &step).await;
            self.by_job.remove(&rec.id);
            self.ended.push((run, step, out));
            self.dirty.insert(run);
        } else if let Err(e) = self.check_job(rec.id, run, &step).await {
            warn!(job = %rec.id, "reading a workflow step's job: {e}");
        }
    }

    /// Follow a step's job on its own watch channel: its end reaches the driver without a
    /// read of the store (`false`: it has ended already).
    pub(super) fn follow(&mut self, id: Uuid) -> bool {
        let Some(mut w) = self.cp.watch_record(id) else {
            return false;
        };
        self.watched.insert(id);
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            loop {
                let rec = w.borrow_and_update().clone();
                if rec.state.is_terminal() {
                    let _ = tx.send(rec);
                    return;
                }
                if w.changed().await.is_err() {
                    let _ = tx.send(w.borrow().clone());
                    return;
                }
            }
        });
        true
    }

    /// Every running step's job not followed on its own channel, looked at again (events
    /// were missed).
    async fn recheck(&mut self) {
        let running: Vec<(Uuid, Uuid, String)> = self
            .by_job
            .iter()
            .filter(|(j, _)| !self.watched.contains(j))
            .map(|(j, (r, s))| (*j, *r, s.clone()))
            .collect();
        for (job, run, step) in running {
            if let Err(e) = self.check_job(job, run, &step).await {
                warn!(%job, "checking a workflow step's job: {e}");
            }
        }
    }

    async fn event(&mut self, e: Event) {
        match e {
            Event::JobChanged { id, state, .. } => {
                let terminal =
                    crate::jobs::JobState::parse(&state).is_some_and(|s| s.is_terminal());
                if !terminal || self.watched.contains(&id) {
                    return;
                }
                if let Some((run, step)) = self.by_job.get(&id).cloned() {
                    if let Err(e) = self.check_job(id, run, &step).await {
                        warn!(job = %id, "reading a workflow step's job: {e}");
                    }
                }
            }
            Event::NodeOnline { name, .. } => {
                let out = json!({"node": name, "online": true});
                self.woke(&name, out);
            }
            Event::NodeWakeFailed { name, .. } => {
                for (run, step) in self.waking.remove(&name).unwrap_or_default() {
                    self.ended.push((
                        run,
                        step,
                        Outcome::Failed(format!("`{name}` did not come online")),
                    ));
                    self.dirty.insert(run);
                }
            }
            _ => {}
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Start { run, reply } => {
                if reply.is_closed() {
                    return;
                }
                let r = self.admit(*run);
                self.reply(reply, r);
            }
            Cmd::Cancel { id, by, reply } => {
                let r = self.cancel(id, &by);
                self.reply(reply, r);
            }
            Cmd::Decide {
                id,
                decision,
                by,
                reply,
            } => {
                let r = self.decide(id, &decision, &by);
                self.reply(reply, r);
            }
        }
    }
}

pub(super) fn view(open: &Open) -> RunView<'_> {
    RunView {
        workflow: &open.wf,
        run_id: &open.id,
        inputs: &open.inputs,
        trigger: &open.trigger,
        cancelled: open.rec.cancelled,
        steps: &open.steps,
    }
}
