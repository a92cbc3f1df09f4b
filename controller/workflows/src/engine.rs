//! The step state machine, pure: given a run's steps as stored and the time, what happens next
//! ([`advance`]); given how an attempt ended, the step's new state ([`after_attempt`]); and
//! what a new run does beside the open runs of its concurrency group ([`admit`]).
//!
//! The controller stores every change these return before it acts on it, so a controller that
//! restarts reads the same rows and carries on: a step that succeeded is never run again.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

use crate::expr::{self, Scope};
use crate::spec::{ancestors, Policy, Step, Workflow};

/// A step of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Waits for the steps it needs.
    Pending,
    /// Waits to try again (`not_before`).
    Waiting,
    /// Its attempt runs (a job, or a wake-up).
    Running,
    /// Waits for a person's decision.
    Approval,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    /// Its condition was false.
    Skipped,
}

impl StepState {
    pub const ALL: [StepState; 9] = [
        StepState::Pending,
        StepState::Waiting,
        StepState::Running,
        StepState::Approval,
        StepState::Succeeded,
        StepState::Failed,
        StepState::TimedOut,
        StepState::Cancelled,
        StepState::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Waiting => "waiting",
            StepState::Running => "running",
            StepState::Approval => "approval",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::TimedOut => "timed_out",
            StepState::Cancelled => "cancelled",
            StepState::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<StepState> {
        StepState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StepState::Succeeded
                | StepState::Failed
                | StepState::TimedOut
                | StepState::Cancelled
                | StepState::Skipped
        )
    }
}

/// A run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Waits for its concurrency group.
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunState {
    pub const ALL: [RunState; 5] = [
        RunState::Queued,
        RunState::Running,
        RunState::Succeeded,
        RunState::Failed,
        RunState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<RunState> {
        RunState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, RunState::Queued | RunState::Running)
    }
}

/// A step's latest attempt, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepRun {
    pub state: StepState,
    /// 0 before the first attempt.
    pub attempt: u32,
    pub outputs: Json,
    pub error: Option<String>,
    /// When a waiting step tries again (unix ms).
    pub not_before: Option<i64>,
    /// When its attempt started (unix ms).
    pub started_at: Option<i64>,
}

impl StepRun {
    pub fn pending() -> StepRun {
        StepRun {
            state: StepState::Pending,
            attempt: 0,
            outputs: Json::Null,
            error: None,
            not_before: None,
            started_at: None,
        }
    }
}

/// What `advance` reads.
#[derive(Debug, Clone, Copy)]
pub struct RunView<'a> {
    pub workflow: &'a Workflow,
    pub run_id: &'a str,
    pub inputs: &'a Json,
    pub trigger: &'a Json,
    pub cancelled: bool,
    /// Every step's latest attempt (a step not in it is pending).
    pub steps: &'a BTreeMap<String, StepRun>,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start attempt `attempt` of `step` with these (rendered) parameters.
    Start {
        step: String,
        attempt: u32,
        with: Json,
        node: Option<String>,
    },
    /// Its condition was false.
    Skip { step: String, reason: String },
    /// It cannot start (its parameters did not render): failed without an attempt.
    Fail { step: String, error: String },
    /// A step that the controller carries out (an approval, a wake-up) went past its timeout.
    Expire { step: String },
    /// Every step has ended.
    Finish {
        state: RunState,
        error: Option<String>,
    },
}

/// What `advance` returns: the actions, and when to look again if nothing happens before.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub wake_at: Option<i64>,
}

fn fails_run(step: &Step, s: &StepRun) -> bool {
    matches!(s.state, StepState::Failed | StepState::TimedOut) && !step.continue_on_error
}

/// The expressions' context for a step: inputs, every step's state and outputs so far, the
/// trigger, the run.
pub fn scope(run: &RunView<'_>, step: &Step) -> Scope {
    let steps: serde_json::Map<String, Json> = run
        .workflow
        .steps
        .iter()
        .filter_map(|s| {
            let r = run.steps.get(&s.id)?;
            Some((
                s.id.clone(),
                json!({
                    "state": r.state.as_str(),
                    "outputs": r.outputs,
                    "error": r.error,
                    "attempt": r.attempt,
                }),
            ))
        })
        .collect();
    let pending = StepRun::pending();
    let get = |id: &str| run.steps.get(id).unwrap_or(&pending);
    let needs_ok = step.needs.iter().all(|n| {
        let r = get(n);
        r.state == StepState::Succeeded
            || (r.state.is_terminal()
                && r.state != StepState::Skipped
                && run.workflow.step(n).is_some_and(|s| s.continue_on_error))
    });
    let needs_failed = ancestors(&run.workflow.steps, &step.id)
        .iter()
        .any(|a| run.workflow.step(a).is_some_and(|s| fails_run(s, get(a))));
    let inputs = effective_inputs(run.workflow, run.inputs);
    Scope {
        context: json!({
            "inputs": inputs,
            "steps": steps,
            "trigger": run.trigger,
            "run": {"id": run.run_id, "workflow": run.workflow.name},
        }),
        needs_ok,
        needs_failed,
        cancelled: run.cancelled,
    }
}

/// The inputs a run gave, with the workflow's defaults for the rest.
pub fn effective_inputs(w: &Workflow, given: &Json) -> Json {
    let mut out = serde_json::Map::new();
    for (name, input) in &w.inputs {
        if let Some(v) = given.get(name).or(input.default.as_ref()) {
            out.insert(name.clone(), v.clone());
        }
    }
    Json::Object(out)
}

/// Check a run's inputs against the workflow: every input without a default given, no unknown
/// ones. Returns the effective inputs.
pub fn check_inputs(w: &Workflow, given: &Json) -> Result<Json, String> {
    let map = match given {
        Json::Null => serde_json::Map::new(),
        Json::Object(m) => m.clone(),
        _ => return Err("inputs must be an object".into()),
    };
    for k in map.keys() {
        if !w.inputs.contains_key(k) {
            let known: Vec<&str> = w.inputs.keys().map(String::as_str).collect();
            return Err(format!(
                "workflow `{}` has no input `{k}` (it has: {})",
                w.name,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ));
        }
    }
    for (name, input) in &w.inputs {
        if input.default.is_none() && !map.contains_key(name) {
            return Err(format!("input `{name}` is required"));
        }
    }
    Ok(effective_inputs(w, &Json::Object(map)))
}

/// What happens next in a run, at `now` (unix ms).
pub fn advance(run: &RunView<'_>, now: i64) -> Plan {
    let mut plan = Plan::default();
    let pending = StepRun::pending();
    let wake = |at: i64, plan: &mut Plan| {
        plan.wake_at = Some(plan.wake_at.map_or(at, |w: i64| w.min(at)));
    };
    for step in &run.workflow.steps {
        let cur = run.steps.get(&step.id).unwrap_or(&pending);
        match cur.state {
            StepState::Pending => {
                let ready = step
                    .needs
                    .iter()
                    .all(|n| run.steps.get(n).is_some_and(|r| r.state.is_terminal()));
                if ready {
                    plan.actions.push(start(run, step, 1));
                }
            }
            StepState::Waiting => match cur.not_before {
                _ if run.cancelled => plan.actions.push(Action::Skip {
                    step: step.id.clone(),
                    reason: "the run was cancelled before it tried again".into(),
                }),
                Some(at) if at > now => wake(at, &mut plan),
                _ => plan.actions.push(start(run, step, cur.attempt + 1)),
            },
            // Steps the controller carries out itself keep their own time; a job has its
            // deadline.
            StepState::Approval | StepState::Running
                if step.kind.placement() == crate::spec::Placement::Controller =>
            {
                if let (Some(t), Some(since)) = (step.timeout, cur.started_at) {
                    let at = since + t.as_millis() as i64;
                    if at <= now {
                        plan.actions.push(Action::Expire {
                            step: step.id.clone(),
                        });
                    } else {
                        wake(at, &mut plan);
                    }
                }
            }
            _ => {}
        }
    }
    if plan.actions.is_empty() {
        let all_done = run
            .workflow
            .steps
            .iter()
            .all(|s| run.steps.get(&s.id).is_some_and(|r| r.state.is_terminal()));
        if all_done {
            plan.actions.push(finish(run));
            plan.wake_at = None;
        }
    }
    plan
}

fn start(run: &RunView<'_>, step: &Step, attempt: u32) -> Action {
    let scope = scope(run, step);
    match expr::condition(step.cond.as_deref(), &scope) {
        Err(e) => {
            return Action::Fail {
                step: step.id.clone(),
                error: format!("its condition: {e}"),
            }
        }
        Ok(false) => {
            return Action::Skip {
                step: step.id.clone(),
                reason: match &step.cond {
                    Some(c) => format!("`{c}` was false"),
                    None if run.cancelled => "the run was cancelled".into(),
                    None => "a step it needs did not succeed".into(),
                },
            }
        }
        Ok(true) => {}
    }
    let (with, node) = match parameters(&scope, step) {
        Ok(p) => p,
        Err(error) => {
            return Action::Fail {
                step: step.id.clone(),
                error,
            }
        }
    };
    Action::Start {
        step: step.id.clone(),
        attempt,
        with,
        node,
    }
}

/// A step's `with` and `node`, rendered against `scope` (the same rows give the same values:
/// a controller that makes a lost step job again renders it with this too).
pub fn parameters(scope: &Scope, step: &Step) -> Result<(Json, Option<String>), String> {
    let with = expr::render(&Json::Object(step.with.clone()), scope)
        .map_err(|e| format!("its parameters: {e}"))?;
    let node = match &step.node {
        None => None,
        Some(n) => match expr::render(&Json::String(n.clone()), scope) {
            Ok(Json::String(s)) => Some(s),
            Ok(other) => return Err(format!("its node rendered to {other}, not a name")),
            Err(e) => return Err(format!("its node: {e}")),
        },
    };
    Ok((with, node))
}

fn finish(run: &RunView<'_>) -> Action {
    if run.cancelled {
        return Action::Finish {
            state: RunState::Cancelled,
            error: Some("cancelled".into()),
        };
    }
    let failed: Vec<&str> = run
        .workflow
        .steps
        .iter()
        .filter(|s| run.steps.get(&s.id).is_some_and(|r| fails_run(s, r)))
        .map(|s| s.id.as_str())
        .collect();
    if failed.is_empty() {
        Action::Finish {
            state: RunState::Succeeded,
            error: None,
        }
    } else {
        Action::Finish {
            state: RunState::Failed,
            error: Some(format!("failed: {}", failed.join(", "))),
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded(Json),
    Failed(String),
    TimedOut(String),
    Cancelled(String),
}

/// A step's state after an attempt ended at `now`: done, or waiting to try again.
pub fn after_attempt(
    step: &Step,
    cur: &StepRun,
    outcome: Outcome,
    cancelled: bool,
    now: i64,
) -> StepRun {
    let mut next = cur.clone();
    next.not_before = None;
    match outcome {
        Outcome::Succeeded(out) => {
            next.state = StepState::Succeeded;
            next.outputs = out;
            next.error = None;
        }
        Outcome::Cancelled(e) if cancelled => {
            next.state = StepState::Cancelled;
            next.error = Some(e);
        }
        // Its job was cancelled by someone, not with its run: the step failed (no retry).
        Outcome::Cancelled(e) => {
            next.state = StepState::Failed;
            next.error = Some(format!("its job was cancelled: {e}"));
        }
        Outcome::Failed(e) | Outcome::TimedOut(e)
            if cur.attempt < step.retry.attempts && !cancelled =>
        {
            next.state = StepState::Waiting;
            next.not_before = Some(now + step.retry.delay(cur.attempt).as_millis() as i64);
            next.error = Some(e);
        }
        Outcome::Failed(e) => {
            next.state = StepState::Failed;
            next.error = Some(e);
        }
        Outcome::TimedOut(e) => {
            next.state = StepState::TimedOut;
            next.error = Some(e);
        }
    }
    next
}

/// What a new run does beside the open runs of its group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission<Id> {
    Start,
    /// Start after cancelling these.
    Replace(Vec<Id>),
    /// Wait for the group, after cancelling these (older waiting runs).
    Queue(Vec<Id>),
    Refuse(String),
}

/// `open`: the group's runs that have not ended, oldest first.
pub fn admit<Id: Clone>(policy: Policy, group: &str, open: &[(Id, RunState)]) -> Admission<Id> {
    if open.is_empty() {
        return Admission::Start;
    }
    match policy {
        Policy::Allow => Admission::Start,
        Policy::Forbid => Admission::Refuse(format!(
            "a run of concurrency group `{group}` is still open (policy forbid)"
        )),
        Policy::Replace => Admission::Replace(open.iter().map(|(id, _)| id.clone()).collect()),
        Policy::Queue => Admission::Queue(
            open.iter()
                .filter(|(_, s)| *s == RunState::Queued)
                .map(|(id, _)| id.clone())
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests;
