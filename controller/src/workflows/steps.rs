//! What each step type does: a job of the job engine (noop, exec, service-check, model-pull),
//! or something the controller carries out itself (approval, wake), and how a job's end reads
//! as the step's outcome and outputs.

use std::time::Duration;

use nebula_workflows::engine::Outcome;
use nebula_workflows::spec::{Step, StepKind};
use serde_json::{json, Value as Json};

use crate::jobs::{JobRecord, JobState, NewJob, Target, Work};
use nebula_types::jobs::ModelActionKind;

/// Outputs kept per step (bytes of JSON); larger ones are cut.
pub const MAX_OUTPUTS: usize = 64 * 1024;
/// Log text an exec step keeps as `outputs.stdout` (its last bytes).
pub const MAX_STDOUT: usize = 16 * 1024;

/// What starting an attempt means.
#[derive(Debug)]
pub enum Start {
    Job(Box<NewJob>),
    /// Wait for a person's decision.
    Approval,
    /// Wake this node through its relays; done when it is online.
    Wake(String),
}

fn string(with: &Json, key: &str) -> Result<Option<String>, String> {
    match with.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Number(n)) => Ok(Some(n.to_string())),
        Some(Json::Bool(b)) => Ok(Some(b.to_string())),
        Some(other) => Err(format!("`{key}` must be a string, not {other}")),
    }
}

fn required(with: &Json, key: &str) -> Result<String, String> {
    string(with, key)?.ok_or_else(|| format!("`{key}` is required"))
}

/// Each list item is one argv item, whatever it holds: nothing here reaches a shell.
fn args(with: &Json) -> Result<Vec<String>, String> {
    match with.get("args") {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(items)) => items
            .iter()
            .map(|i| match i {
                Json::String(s) => Ok(s.clone()),
                Json::Number(_) | Json::Bool(_) => Ok(i.to_string()),
                other => Err(format!("`args` items must be strings, not {other}")),
            })
            .collect(),
        Some(Json::String(s)) => Ok(vec![s.clone()]),
        Some(other) => Err(format!("`args` must be a list of strings, not {other}")),
    }
}

/// The start of an attempt of `step`, with its rendered parameters and node.
pub fn start(
    step: &Step,
    with: &Json,
    node: Option<&str>,
    default_deadline: Duration,
) -> Result<Start, String> {
    let target = || match (node, &step.selector) {
        (Some(n), _) => Ok(Target::Node(n.to_owned())),
        (None, Some(s)) => Ok(Target::Selector(s.clone())),
        (None, None) => Err("no `node` or `selector`".to_owned()),
    };
    let job = |work: Work, idempotent: bool| -> Result<Start, String> {
        Ok(Start::Job(Box::new(NewJob {
            work,
            target: target()?,
            deadline: Some(step.timeout.unwrap_or(default_deadline)),
            idempotent,
            max_attempts: Some(1),
        })))
    };
    match step.kind {
        StepKind::Noop => job(Work::Noop, true),
        StepKind::Exec => job(
            Work::Exec {
                op: required(with, "op")?,
                args: args(with)?,
            },
            false,
        ),
        StepKind::ServiceCheck => {
            let timeout = string(with, "timeout")?
                .map(|t| humantime::parse_duration(&t).map_err(|e| format!("`timeout` `{t}`: {e}")))
                .transpose()?;
            job(
                Work::Probe {
                    http: string(with, "http")?,
                    tcp: string(with, "tcp")?,
                    timeout,
                },
                true,
            )
        }
        StepKind::ModelPull => job(
            Work::Model {
                action: ModelActionKind::Pull,
                name: Some(required(with, "name")?),
                url: None,
                file: None,
                sha256: None,
                backend: string(with, "backend")?,
            },
            false,
        ),
        StepKind::Approval => Ok(Start::Approval),
        StepKind::Wake => Ok(Start::Wake(required(with, "node")?)),
    }
}

/// How a finished job reads as the step's outcome (with `stdout`: the job's standard output,
/// for exec steps).
pub fn outcome(rec: &JobRecord, stdout: Option<String>) -> Outcome {
    let why = || {
        rec.error
            .clone()
            .or_else(|| rec.reason.clone())
            .unwrap_or_else(|| format!("the job ended {}", rec.state))
    };
    match rec.state {
        JobState::Succeeded => {
            let mut out = json!({
                "job": rec.id,
                "node": rec.node,
                "exit_code": rec.exit_code,
            });
            if let Some(o) = &rec.output {
                out["result"] = serde_json::to_value(o).unwrap_or(Json::Null);
            }
            if let Some(s) = stdout {
                out["stdout"] = Json::String(s);
            }
            Outcome::Succeeded(cap(out))
        }
        JobState::TimedOut => Outcome::TimedOut(why()),
        JobState::Cancelled => Outcome::Cancelled(why()),
        JobState::Failed | JobState::Lost => Outcome::Failed(why()),
        JobState::Queued | JobState::Dispatched | JobState::Running => {
            Outcome::Failed("the job has not ended".into())
        }
    }
}

/// Outputs over [`MAX_OUTPUTS`] are replaced by a note saying so.
pub fn cap(out: Json) -> Json {
    let len = out.to_string().len();
    if len <= MAX_OUTPUTS {
        out
    } else {
        json!({"truncated": true, "bytes": len})
    }
}

/// The last [`MAX_STDOUT`] bytes of text, cut at a character boundary.
pub fn tail(text: &str) -> String {
    if text.len() <= MAX_STDOUT {
        return text.to_owned();
    }
    let mut start = text.len() - MAX_STDOUT;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nebula_workflows::spec::check;

    fn step(kind: &str, with: &str) -> Step {
        let text = format!(
            "workflows:\n  w:\n    steps:\n      - {{ id: s, type: {kind}, node: n, with: {with} }}\n"
        );
        check(&text).unwrap()["w"].steps[0].clone()
    }

    #[test]
    fn exec_arguments_stay_argv_items_and_bad_types_are_refused() {
        let s = step("exec", "{ op: echo }");
        let with = json!({"op": "echo", "args": ["a; rm -rf / #", "$(reboot)", 3]});
        let Start::Job(job) = start(&s, &with, Some("n"), Duration::from_secs(60)).unwrap() else {
            panic!("a job")
        };
        assert_eq!(
            job.work,
            Work::Exec {
                op: "echo".into(),
                args: vec!["a; rm -rf / #".into(), "$(reboot)".into(), "3".into()]
            }
        );
        assert_eq!(job.target, Target::Node("n".into()));
        let bad = json!({"op": "echo", "args": [{"x": 1}]});
        assert!(start(&s, &bad, Some("n"), Duration::from_secs(1))
            .unwrap_err()
            .contains("must be strings"));
        let bad = json!({"op": ["echo"]});
        assert!(start(&s, &bad, Some("n"), Duration::from_secs(1)).is_err());
    }

    #[test]
    fn a_probe_takes_its_timeout_as_text_and_outputs_are_capped() {
        let s = step("service-check", "{ tcp: \"127.0.0.1:1\" }");
        let with = json!({"tcp": "127.0.0.1:1", "timeout": "2s"});
        let Start::Job(job) = start(&s, &with, Some("n"), Duration::from_secs(60)).unwrap() else {
            panic!("a job")
        };
        assert!(
            matches!(job.work, Work::Probe { timeout: Some(t), .. } if t == Duration::from_secs(2))
        );
        let big = json!({"x": "y".repeat(MAX_OUTPUTS)});
        assert_eq!(cap(big)["truncated"], json!(true));
        assert!(tail(&"é".repeat(MAX_STDOUT)).len() <= MAX_STDOUT);
    }
}
