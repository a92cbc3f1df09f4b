use super::*;
use crate::spec::check;
use serde_json::json;

fn wf(text: &str) -> Workflow {
    check(text).unwrap().into_values().next().unwrap()
}

/// A run driven by scripted outcomes: `apply` carries out what `advance` asks, as the
/// controller does (start = the step runs until `end` is called for it).
struct Sim {
    w: Workflow,
    steps: BTreeMap<String, StepRun>,
    cancelled: bool,
    finished: Option<(RunState, Option<String>)>,
    started: Vec<(String, u32, Json)>,
}

impl Sim {
    fn new(w: Workflow) -> Sim {
        Sim {
            w,
            steps: BTreeMap::new(),
            cancelled: false,
            finished: None,
            started: Vec::new(),
        }
    }

    fn step(&mut self, now: i64) -> Plan {
        let inputs = json!({});
        let trigger = json!({"body": {"x": 1}});
        let plan = advance(
            &RunView {
                workflow: &self.w,
                run_id: "r1",
                inputs: &inputs,
                trigger: &trigger,
                cancelled: self.cancelled,
                steps: &self.steps,
            },
            now,
        );
        for a in &plan.actions {
            match a {
                Action::Start {
                    step,
                    attempt,
                    with,
                    ..
                } => {
                    let approval =
                        self.w.step(step).unwrap().kind == crate::spec::StepKind::Approval;
                    self.steps.insert(
                        step.clone(),
                        StepRun {
                            state: if approval {
                                StepState::Approval
                            } else {
                                StepState::Running
                            },
                            attempt: *attempt,
                            outputs: Json::Null,
                            error: None,
                            not_before: None,
                            started_at: Some(now),
                        },
                    );
                    self.started.push((step.clone(), *attempt, with.clone()));
                }
                Action::Skip { step, reason } => {
                    let mut r = StepRun::pending();
                    r.state = StepState::Skipped;
                    r.error = Some(reason.clone());
                    self.steps.insert(step.clone(), r);
                }
                Action::Fail { step, error } => {
                    let mut r = StepRun::pending();
                    r.state = StepState::Failed;
                    r.error = Some(error.clone());
                    self.steps.insert(step.clone(), r);
                }
                Action::Expire { step } => {
                    let cur = self.steps[step].clone();
                    let s = self.w.step(step).unwrap().clone();
                    let next = after_attempt(
                        &s,
                        &cur,
                        Outcome::TimedOut("no decision".into()),
                        self.cancelled,
                        now,
                    );
                    self.steps.insert(step.clone(), next);
                }
                Action::Finish { state, error } => self.finished = Some((*state, error.clone())),
            }
        }
        plan
    }

    fn end(&mut self, id: &str, outcome: Outcome, now: i64) {
        let cur = self.steps[id].clone();
        let s = self.w.step(id).unwrap().clone();
        let next = after_attempt(&s, &cur, outcome, self.cancelled, now);
        self.steps.insert(id.to_owned(), next);
    }

    fn running(&self) -> Vec<&str> {
        self.steps
            .iter()
            .filter(|(_, r)| r.state == StepState::Running)
            .map(|(k, _)| k.as_str())
            .collect()
    }

    fn state(&self, id: &str) -> StepState {
        self.steps.get(id).map_or(StepState::Pending, |r| r.state)
    }
}

fn ok(v: Json) -> Outcome {
    Outcome::Succeeded(v)
}

#[test]
fn fan_out_runs_both_branches_together_and_fan_in_waits_for_both() {
    let mut s = Sim::new(wf(r#"
workflows:
  w:
    steps:
      - { id: a, type: noop, node: n }
      - { id: b, type: exec, node: n, needs: [a], with: { op: echo, args: ["${{ steps.a.outputs.v }}"] } }
      - { id: c, type: noop, node: n, needs: [a] }
      - { id: d, type: exec, node: n, needs: [b, c], with: { op: echo, args: ["${{ steps.b.outputs.v }}", "${{ steps.c.outputs.v }}"] } }
"#));
    s.step(0);
    assert_eq!(s.running(), vec!["a"]);
    s.end("a", ok(json!({"v": "from-a"})), 1);
    s.step(1);
    assert_eq!(s.running(), vec!["b", "c"]);
    assert_eq!(s.started[1].2, json!({"op": "echo", "args": ["from-a"]}));
    s.end("b", ok(json!({"v": "B"})), 2);
    assert!(s.step(2).actions.is_empty(), "d waits for c");
    assert_eq!(s.state("d"), StepState::Pending);
    s.end("c", ok(json!({"v": "C"})), 3);
    s.step(3);
    assert_eq!(s.running(), vec!["d"]);
    assert_eq!(s.started[3].2, json!({"op": "echo", "args": ["B", "C"]}));
    s.end("d", ok(json!({})), 4);
    s.step(4);
    assert_eq!(s.finished, Some((RunState::Succeeded, None)));
    assert_eq!(s.started.len(), 4, "every step ran once");
}

#[test]
fn status_functions_choose_what_runs_after_a_failure() {
    let mut s = Sim::new(wf(r#"
workflows:
  w:
    steps:
      - { id: build, type: noop, node: n }
      - { id: deploy, type: noop, node: n }
      - { id: rollback, type: noop, node: n, needs: [deploy], if: "${{ failure() }}" }
      - { id: celebrate, type: noop, node: n, needs: [deploy], if: "success()" }
      - { id: cleanup, type: noop, node: n, needs: [rollback, celebrate], if: "${{ always() }}" }
"#));
    s.step(0);
    s.end("build", Outcome::Failed("exit 1".into()), 1);
    s.step(1);
    // deploy is skipped (its need failed); rollback sees the failure through it.
    assert_eq!(s.state("deploy"), StepState::Skipped);
    s.step(1);
    assert_eq!(s.state("celebrate"), StepState::Skipped);
    assert_eq!(s.state("rollback"), StepState::Running);
    s.end("rollback", ok(json!({})), 2);
    s.step(2);
    assert_eq!(s.state("cleanup"), StepState::Running);
    s.end("cleanup", ok(json!({})), 3);
    s.step(3);
    let (state, error) = s.finished.clone().unwrap();
    assert_eq!(state, RunState::Failed);
    assert_eq!(error.as_deref(), Some("failed: build"));
}

#[test]
fn retries_wait_their_backoff_and_stop_at_the_attempts_given() {
    let mut s = Sim::new(wf(r#"
workflows:
  w:
    steps:
      - { id: flaky, type: noop, node: n, retry: { attempts: 3, backoff: 2s, factor: 3 } }
"#));
    s.step(0);
    s.end("flaky", Outcome::Failed("no".into()), 100);
    assert_eq!(s.state("flaky"), StepState::Waiting);
    let p = s.step(1_000);
    assert!(p.actions.is_empty());
    assert_eq!(p.wake_at, Some(2_100));
    s.step(2_100);
    assert_eq!(
        (s.state("flaky"), s.steps["flaky"].attempt),
        (StepState::Running, 2)
    );
    s.end("flaky", Outcome::TimedOut("deadline".into()), 3_000);
    assert_eq!(s.step(8_999).wake_at, Some(9_000), "2 s x 3");
    s.step(9_000);
    s.end("flaky", Outcome::Failed("still no".into()), 9_500);
    assert_eq!(s.state("flaky"), StepState::Failed, "3 attempts in all");
    s.step(9_500);
    assert_eq!(s.finished.as_ref().unwrap().0, RunState::Failed);
    assert_eq!(s.started.len(), 3);
}

#[test]
fn a_step_that_may_fail_does_not_fail_the_run() {
    let mut s = Sim::new(wf(r#"
workflows:
  w:
    steps:
      - { id: lint, type: noop, node: n, continue_on_error: true }
      - { id: test, type: noop, node: n }
"#));
    s.step(0);
    s.end("lint", Outcome::Failed("warnings".into()), 1);
    s.step(1);
    assert_eq!(s.state("test"), StepState::Running);
    s.end("test", ok(json!({})), 2);
    s.step(2);
    assert_eq!(s.finished.as_ref().unwrap().0, RunState::Succeeded);
}

#[test]
fn an_approval_times_out_and_a_bad_parameter_fails_its_step() {
    let mut s = Sim::new(wf(r#"
workflows:
  w:
    steps:
      - { id: ok, type: approval, timeout: 10s }
      - { id: go, type: exec, node: n, with: { op: "${{ trigger.body.missing }}" } }
"#));
    s.step(0);
    assert_eq!(s.state("ok"), StepState::Approval);
    assert_eq!(s.step(5_000).wake_at, Some(10_000));
    s.step(10_000);
    assert_eq!(s.state("ok"), StepState::TimedOut);
    s.steps.get_mut("ok").unwrap().state = StepState::Succeeded;
    s.step(10_001);
    assert_eq!(s.state("go"), StepState::Failed);
    assert!(s.steps["go"]
        .error
        .as_deref()
        .unwrap()
        .contains("undefined"));
}

#[test]
fn a_cancelled_run_skips_what_has_not_started_except_always() {
    let mut s = Sim::new(wf(r#"
workflows:
  w:
    steps:
      - { id: a, type: noop, node: n }
      - { id: b, type: noop, node: n }
      - { id: report, type: noop, node: n, if: "always()" }
"#));
    s.step(0);
    s.cancelled = true;
    s.end("a", Outcome::Cancelled("cancelled".into()), 1);
    s.step(1);
    assert_eq!(s.state("b"), StepState::Skipped);
    s.step(1);
    assert_eq!(s.state("report"), StepState::Running);
    s.end("report", ok(json!({})), 2);
    s.step(2);
    assert_eq!(s.finished.as_ref().unwrap().0, RunState::Cancelled);
}

#[test]
fn each_concurrency_policy_admits_as_documented() {
    let open = [(1, RunState::Running), (2, RunState::Queued)];
    assert_eq!(admit(Policy::Allow, "g", &open), Admission::Start);
    assert!(matches!(admit(Policy::Forbid, "g", &open), Admission::Refuse(m) if m.contains("`g`")));
    assert_eq!(
        admit(Policy::Replace, "g", &open),
        Admission::Replace(vec![1, 2])
    );
    assert_eq!(admit(Policy::Queue, "g", &open), Admission::Queue(vec![2]));
    for p in [
        Policy::Allow,
        Policy::Forbid,
        Policy::Replace,
        Policy::Queue,
    ] {
        assert_eq!(admit::<u32>(p, "g", &[]), Admission::Start);
    }
}

#[test]
fn inputs_are_checked_and_defaults_filled() {
    let w = wf(r#"
workflows:
  w:
    inputs:
      service: {}
      port: { default: 80 }
    steps:
      - { id: a, type: noop, node: n }
"#);
    assert_eq!(
        check_inputs(&w, &json!({"service": "web"})).unwrap(),
        json!({"service": "web", "port": 80})
    );
    assert!(check_inputs(&w, &json!({}))
        .unwrap_err()
        .contains("`service` is required"));
    assert!(check_inputs(&w, &json!({"service": "x", "colour": 1}))
        .unwrap_err()
        .contains("no input `colour`"));
    assert!(check_inputs(&w, &json!([1])).is_err());
}

#[test]
fn a_step_job_cancelled_from_outside_fails_the_run() {
    let mut s = Sim::new(wf(r#"
workflows:
  w:
    steps:
      - { id: a, type: noop, node: n, retry: { attempts: 3 } }
      - { id: b, type: noop, node: n }
"#));
    s.step(0);
    s.end("a", Outcome::Cancelled("cancelled by bob".into()), 1);
    assert_eq!(s.state("a"), StepState::Failed, "no retry either");
    s.step(1);
    s.step(1);
    assert_eq!(s.finished.as_ref().unwrap().0, RunState::Failed);
}
