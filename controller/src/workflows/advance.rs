//! The driver's pass: outcomes applied, the engine asked what comes next, changes stored in
//! one transaction, then carried out; and the commands (start, cancel, decide) that feed it.

use nebula_types::auth::Role;
use nebula_workflows::engine::{self, Action, Admission, Outcome, RunState, StepRun, StepState};
use nebula_workflows::spec::StepKind;
use serde_json::{json, Value as Json};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::driver::{now, step_record, view, Driver, Effect, Open};
use super::steps::{self, Start};
use super::{Decision, NewRun};
use crate::authz::{OpCtx, Via};
use crate::jobs::JobKey;
use crate::store::workflows::RunRecord;
use crate::OpError;

impl Driver {
    /// Apply ended attempts and advance every run that changed (noting when each wants to
    /// be looked at again: a retry, a timeout).
    pub(super) fn pass(&mut self) {
        let now = now();
        self.clock = now;
        // Finishing a run can start a queued one: go on until nothing changes.
        for _ in 0..16 {
            for (run, step, out) in std::mem::take(&mut self.ended) {
                self.apply_outcome(run, &step, out, now);
            }
            let dirty = std::mem::take(&mut self.dirty);
            if dirty.is_empty() {
                break;
            }
            for id in dirty {
                self.wakes.remove(&id);
                for _ in 0..=engine_rounds(self.open.get(&id)) {
                    let Some(open) = self.open.get(&id) else {
                        break;
                    };
                    if RunState::parse(&open.rec.state) != Some(RunState::Running) {
                        break;
                    }
                    let plan = engine::advance(&view(open), now);
                    if plan.actions.is_empty() {
                        if let Some(w) = plan.wake_at {
                            self.wakes.insert(id, w);
                        }
                        break;
                    }
                    for a in plan.actions {
                        self.apply(id, a, now);
                    }
                }
            }
        }
    }

    fn apply_outcome(&mut self, run: Uuid, step: &str, out: Outcome, now: i64) {
        let Some(open) = self.open.get_mut(&run) else {
            return;
        };
        let (Some(cur), Some(def)) = (open.steps.get(step).cloned(), open.wf.step(step)) else {
            return;
        };
        if cur.state.is_terminal() || cur.state == StepState::Waiting {
            return;
        }
        // A task still under way for this step (it was cancelled or timed out) stops.
        if let Some((_, h)) = self.tasks.remove(&(run, step.to_owned())) {
            h.abort();
        }
        let next = engine::after_attempt(def, &cur, out, open.rec.cancelled, now);
        let job = open.jobs.get(step).copied();
        if let Some(j) = job {
            self.by_job.remove(&j);
        }
        self.pending
            .steps
            .push(step_record(run, step, &next, job, now));
        open.steps.insert(step.to_owned(), next);
        self.dirty.insert(run);
    }

    fn set_step(&mut self, run: Uuid, step: &str, s: StepRun, job: Option<Uuid>) {
        if let Some(open) = self.open.get_mut(&run) {
            let at = self.clock;
            self.pending.steps.push(step_record(run, step, &s, job, at));
            open.steps.insert(step.to_owned(), s);
            match job {
                Some(j) => {
                    open.jobs.insert(step.to_owned(), j);
                }
                None => {
                    open.jobs.remove(step);
                }
            }
        }
    }

    fn apply(&mut self, run: Uuid, action: Action, now: i64) {
        let ended = |state: StepState, attempt: u32, error: String| StepRun {
            state,
            attempt,
            outputs: Json::Null,
            error: Some(error),
            not_before: None,
            started_at: None,
        };
        let attempt_of = |d: &Driver, step: &str| {
            d.open
                .get(&run)
                .and_then(|o| o.steps.get(step))
                .map_or(0, |s| s.attempt)
        };
        match action {
            Action::Start {
                step,
                attempt,
                with,
                node,
            } => self.start(run, &step, attempt, &with, node.as_deref(), now),
            Action::Skip { step, reason } => {
                let a = attempt_of(self, &step);
                self.set_step(run, &step, ended(StepState::Skipped, a, reason), None);
            }
            Action::Fail { step, error } => {
                let a = attempt_of(self, &step);
                self.set_step(run, &step, ended(StepState::Failed, a, error), None);
            }
            Action::Expire { step } => {
                for list in self.waking.values_mut() {
                    list.retain(|(r, s)| !(*r == run && *s == step));
                }
                self.ended.push((
                    run,
                    step,
                    Outcome::TimedOut("no result within the step's timeout".into()),
                ));
                self.dirty.insert(run);
            }
            Action::Finish { state, error } => self.finish(run, state, error, now),
        }
    }

    fn start(
        &mut self,
        run: Uuid,
        step: &str,
        attempt: u32,
        with: &Json,
        node: Option<&str>,
        now: i64,
    ) {
        let Some(def) = self.open.get(&run).and_then(|o| o.wf.step(step)).cloned() else {
            return;
        };
        let mut s = StepRun {
            state: StepState::Running,
            attempt,
            outputs: Json::Null,
            error: None,
            not_before: None,
            started_at: Some(now),
        };
        let route = super::local::FleetRoute(&self.cp);
        let started = steps::start(
            &def,
            with,
            node,
            self.cp.config.job_default_deadline,
            &route,
        );
        match started {
            Ok(Start::Job(job)) => {
                let id = Uuid::now_v7();
                self.by_job.insert(id, (run, step.to_owned()));
                self.set_step(run, step, s, Some(id));
                self.pending.effects.push(Effect::CreateJob {
                    run,
                    step: step.to_owned(),
                    key: JobKey {
                        id,
                        key: format!("{run}/{step}/{attempt}"),
                        fresh: true,
                    },
                    job,
                });
            }
            Ok(Start::Approval) => {
                s.state = StepState::Approval;
                s.outputs = json!({"message": with.get("message")});
                self.set_step(run, step, s, None);
            }
            Ok(Start::Wake(node)) => {
                s.outputs = json!({"node": node});
                self.set_step(run, step, s, None);
                self.waking
                    .entry(node.clone())
                    .or_default()
                    .push((run, step.to_owned()));
                self.pending.effects.push(Effect::Wake {
                    run,
                    step: step.to_owned(),
                    node,
                });
            }
            Ok(Start::Task(task)) => {
                self.set_step(run, step, s, None);
                let workflow = self
                    .open
                    .get(&run)
                    .map(|o| o.rec.workflow.clone())
                    .unwrap_or_default();
                self.pending.effects.push(Effect::Task {
                    at: super::local::Place {
                        run,
                        step: step.to_owned(),
                        attempt,
                        workflow,
                    },
                    task,
                });
            }
            Err(e) => {
                s.state = StepState::Failed;
                s.error = Some(format!("its parameters: {e}"));
                self.set_step(run, step, s, None);
            }
        }
    }

    fn finish(&mut self, run: Uuid, state: RunState, error: Option<String>, now: i64) {
        let Some(open) = self.open.get_mut(&run) else {
            return;
        };
        open.rec.state = state.as_str().to_owned();
        open.rec.finished_at = Some(now);
        open.rec.error = error;
        self.pending.runs.insert(run, open.rec.clone());
        self.pending.effects.push(Effect::Finished(run));
        // The oldest queued run of its group goes next.
        let Some(group) = open.rec.group.clone() else {
            return;
        };
        let next = self
            .open
            .values()
            .filter(|o| o.rec.group.as_deref() == Some(&group) && o.rec.state == "queued")
            .map(|o| o.rec.id)
            .min();
        let still_running = self.open.values().any(|o| {
            o.rec.id != run && o.rec.group.as_deref() == Some(&group) && o.rec.state == "running"
        });
        if let (Some(next), false) = (next, still_running) {
            if let Some(o) = self.open.get_mut(&next) {
                o.rec.state = RunState::Running.as_str().to_owned();
                o.rec.started_at = Some(now);
                self.pending.runs.insert(next, o.rec.clone());
                self.dirty.insert(next);
            }
        }
    }

    /// Store what this pass changed (fenced), then carry it out.
    pub(super) async fn commit(&mut self) -> Result<(), OpError> {
        let pass = std::mem::take(&mut self.pending);
        if pass.runs.is_empty() && pass.steps.is_empty() && pass.effects.is_empty() {
            return Ok(());
        }
        let fence = self.cp.ha.fence()?;
        let runs: Vec<RunRecord> = pass.runs.values().cloned().collect();
        self.cp
            .store
            .save_workflow_changes(fence.as_ref(), &runs, &pass.steps)
            .await?;
        let mut changed: std::collections::BTreeSet<Uuid> = pass.runs.keys().copied().collect();
        changed.extend(pass.steps.iter().map(|s| s.run_id));
        for id in changed {
            let rec = pass
                .runs
                .get(&id)
                .or_else(|| self.open.get(&id).map(|o| &o.rec));
            if let Some(rec) = rec {
                self.cp
                    .events
                    .publish(nebula_types::events::Event::WorkflowRunChanged {
                        id,
                        workflow: rec.workflow.clone(),
                        state: rec.state.clone(),
                    });
            }
        }
        self.act(pass.effects).await;
        Ok(())
    }

    fn ctx(&self, run: Uuid) -> OpCtx {
        match self.open.get(&run) {
            Some(o) => OpCtx::new(
                format!(
                    "{} (workflow {}, run {run})",
                    o.rec.created_by, o.rec.workflow
                ),
                Role::parse(&o.rec.created_role),
                Via::Internal,
            ),
            None => OpCtx::new("workflow", Role::Viewer, Via::Internal),
        }
    }

    async fn act(&mut self, effects: Vec<Effect>) {
        let mut creations = Vec::new();
        for e in effects {
            match e {
                Effect::CreateJob {
                    run,
                    step,
                    key,
                    job,
                } => {
                    let cx = self.ctx(run);
                    let cp = self.cp.clone();
                    creations.push(async move {
                        let r = cp.create_job_keyed(*job, Some(key), &cx).await;
                        (run, step, r)
                    });
                }
                Effect::CancelJob(job) => {
                    let _ = self.cp.cancel_job(job, &OpCtx::internal("workflow")).await;
                }
                Effect::Wake { run, step, node } => {
                    let cx = self.ctx(run);
                    let online = match self.cp.store.node_by_name(&node).await {
                        Ok(Some(n)) => self.cp.registry.is_online(n.id),
                        _ => false,
                    };
                    if online {
                        self.woke(&node, json!({"node": node, "online": true}));
                        continue;
                    }
                    match self.cp.wake_node(&node, &cx).await {
                        Ok(_) => {}
                        Err(e) => {
                            self.ended.push((run, step, Outcome::Failed(e.to_string())));
                            self.dirty.insert(run);
                        }
                    }
                }
                Effect::Task { at, task } => {
                    let key = (at.run, at.step.clone());
                    if self.tasks.get(&key).is_some_and(|(a, _)| *a == at.attempt) {
                        continue;
                    }
                    let cx = self.ctx(at.run);
                    let (cp, tx) = (self.cp.clone(), self.task_tx.clone());
                    let attempt = at.attempt;
                    let h = tokio::spawn(async move {
                        let (run, step, attempt) = (at.run, at.step.clone(), at.attempt);
                        let out = super::local::run(cp, cx, at, task).await;
                        let _ = tx.send((run, step, attempt, out));
                    });
                    if let Some((_, old)) = self.tasks.insert(key, (attempt, h.abort_handle())) {
                        old.abort();
                    }
                }
                Effect::Reply(f) => f(),
                Effect::Finished(id) => {
                    self.open.remove(&id);
                    self.wakes.remove(&id);
                }
            }
        }
        for (run, step, r) in futures::future::join_all(creations).await {
            match r {
                Ok(rec) if rec.state.is_terminal() => {
                    // A job made before a restart, found by its key, that has ended.
                    let def = self.open.get(&run).and_then(|o| o.wf.step(&step)).cloned();
                    let out = match def {
                        Some(def) => steps::outcome(&def, &rec, None),
                        None => Outcome::Failed("the step is no longer known".into()),
                    };
                    self.by_job.remove(&rec.id);
                    self.ended.push((run, step, out));
                    self.dirty.insert(run);
                }
                Ok(rec) => {
                    if !self.follow(rec.id) {
                        // Ended between its creation and now: read it.
                        if let Err(e) = self.check_job(rec.id, run, &step).await {
                            tracing::warn!(job = %rec.id, "reading a workflow step's job: {e}");
                        }
                    }
                }
                Err(e) => {
                    self.by_job.retain(|_, (r, s)| !(*r == run && *s == step));
                    self.ended.push((
                        run,
                        step,
                        Outcome::Failed(format!("its job was not made: {e}")),
                    ));
                    self.dirty.insert(run);
                }
            }
        }
    }

    /// Wake steps waiting for `node` succeed.
    pub(super) fn woke(&mut self, node: &str, out: Json) {
        for (run, step) in self.waking.remove(node).unwrap_or_default() {
            self.ended
                .push((run, step, Outcome::Succeeded(out.clone())));
            self.dirty.insert(run);
        }
    }

    /// Answer a command once this pass is stored (at once when it was refused).
    pub(super) fn reply<T: Send + Sync + 'static>(
        &mut self,
        tx: oneshot::Sender<Result<T, OpError>>,
        r: Result<T, OpError>,
    ) {
        match r {
            Err(e) => {
                let _ = tx.send(Err(e));
            }
            Ok(v) => self.pending.effects.push(Effect::Reply(Box::new(move || {
                let _ = tx.send(Ok(v));
            }))),
        }
    }

    /// A new run, admitted by its concurrency group's policy.
    pub(super) fn admit(&mut self, new: NewRun) -> Result<RunRecord, OpError> {
        let now = now();
        let id = Uuid::now_v7();
        let mut state = RunState::Running;
        if let (Some(group), Some(c)) = (&new.group, &new.workflow.concurrency) {
            let mut open: Vec<(Uuid, RunState)> = self
                .open
                .values()
                .filter(|o| o.rec.group.as_deref() == Some(group.as_str()))
                .filter_map(|o| Some((o.rec.id, RunState::parse(&o.rec.state)?)))
                .collect();
            open.sort_by_key(|(id, _)| *id);
            match engine::admit(c.policy, group, &open) {
                Admission::Start => {}
                Admission::Refuse(m) => return Err(OpError::Conflict(m)),
                Admission::Replace(ids) => {
                    for old in ids {
                        self.cancel(old, &format!("replaced by run {id}"))?;
                    }
                }
                Admission::Queue(ids) => {
                    for old in ids {
                        self.cancel(old, &format!("a newer run ({id}) took its place"))?;
                    }
                    state = RunState::Queued;
                }
            }
        }
        let rec = RunRecord {
            id,
            workflow: new.workflow.name.clone(),
            definition: serde_json::to_string(&*new.workflow)
                .map_err(|e| OpError::Invalid(e.to_string()))?,
            state: state.as_str().to_owned(),
            inputs: new.inputs.to_string(),
            trigger: new.trigger.to_string(),
            group: new.group,
            cancelled: false,
            created_by: new.created_by,
            created_role: new.created_role.as_str().to_owned(),
            created_at: now,
            started_at: (state == RunState::Running).then_some(now),
            finished_at: None,
            error: None,
        };
        self.pending.runs.insert(id, rec.clone());
        self.open.insert(id, Open::new(rec.clone(), new.workflow));
        self.dirty.insert(id);
        Ok(rec)
    }

    /// Cancel an open run: a queued one ends at once; a running one's jobs are cancelled and
    /// its steps that have not started are skipped (except `always()` ones).
    pub(super) fn cancel(&mut self, id: Uuid, why: &str) -> Result<RunRecord, OpError> {
        let now = now();
        let open = self.open.get_mut(&id).ok_or_else(|| {
            OpError::Conflict(format!("run {id} has ended (or is not known here)"))
        })?;
        if open.rec.cancelled {
            return Ok(open.rec.clone());
        }
        open.rec.cancelled = true;
        let rec = open.rec.clone();
        self.pending.runs.insert(id, rec.clone());
        if rec.state == RunState::Queued.as_str() {
            self.finish(id, RunState::Cancelled, Some(why.to_owned()), now);
            return Ok(self.open.get(&id).map_or(rec, |o| o.rec.clone()));
        }
        let mut jobs = Vec::new();
        let mut own = Vec::new();
        for (step, s) in &open.steps {
            match (s.state, open.jobs.get(step)) {
                (StepState::Running, Some(j)) => jobs.push(*j),
                (StepState::Running | StepState::Approval, None) => own.push(step.clone()),
                _ => {}
            }
        }
        for j in jobs {
            self.pending.effects.push(Effect::CancelJob(j));
        }
        for step in own {
            for list in self.waking.values_mut() {
                list.retain(|(r, s)| !(*r == id && *s == step));
            }
            self.ended
                .push((id, step, Outcome::Cancelled(why.to_owned())));
        }
        self.dirty.insert(id);
        Ok(rec)
    }

    /// A person's decision on a step that waits for one.
    pub(super) fn decide(&mut self, id: Uuid, d: &Decision, by: &str) -> Result<(), OpError> {
        let open = self.open.get(&id).ok_or_else(|| {
            OpError::Conflict(format!("run {id} has ended (or is not known here)"))
        })?;
        let kind = open.wf.step(&d.step).map(|s| s.kind);
        let state = open.steps.get(&d.step).map(|s| s.state);
        if kind != Some(StepKind::Approval) {
            return Err(OpError::NotFound(format!(
                "run {id} has no approval step `{}`",
                d.step
            )));
        }
        if state != Some(StepState::Approval) {
            return Err(OpError::Conflict(format!(
                "step `{}` is not waiting for a decision (it is {})",
                d.step,
                state.map_or("pending", |s| s.as_str())
            )));
        }
        let out = if d.approve {
            Outcome::Succeeded(json!({"approved": true, "by": by, "comment": d.comment}))
        } else {
            Outcome::Failed(format!(
                "rejected by {by}{}",
                if d.comment.is_empty() {
                    String::new()
                } else {
                    format!(": {}", d.comment)
                }
            ))
        };
        // Applied at once: a second decision in the same batch finds the step decided.
        self.apply_outcome(id, &d.step, out, now());
        Ok(())
    }
}

/// How many times one pass may ask the engine about a run (each round settles at least one
/// step, so the steps' count bounds it).
fn engine_rounds(open: Option<&Open>) -> usize {
    open.map_or(0, |o| o.wf.steps.len() + 1)
}
