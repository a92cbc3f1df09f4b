//! What each step type does: a job of the job engine (noop, exec, service-check, model-pull,
//! http, and ai-text and ai-image on the node the gateway's routing picks), or something the
//! controller carries out itself (approval, wake, sleep, notify, deploy), and how a job's end
//! reads as the step's outcome and outputs.

use std::time::Duration;

use nebula_workflows::engine::Outcome;
use nebula_workflows::spec::{Step, StepKind};
use serde_json::{json, Value as Json};

use crate::authz::Op;
use crate::jobs::{JobRecord, JobState, NewJob, Target, Work};
use nebula_protocol::jobs::{HttpOutput, JobOutput};
use nebula_types::jobs::ModelActionKind;

/// Outputs kept per step (bytes of JSON); larger ones are cut.
pub const MAX_OUTPUTS: usize = 64 * 1024;
/// Log text an exec step keeps as `outputs.stdout` (its last bytes).
pub const MAX_STDOUT: usize = 16 * 1024;

/// What a person starting a run must be allowed to do for a step of this kind (its steps act
/// with the starter's role).
pub fn ops(kind: StepKind) -> &'static [Op] {
    match kind {
        StepKind::Noop
        | StepKind::Exec
        | StepKind::ServiceCheck
        | StepKind::ModelPull
        | StepKind::Http => &[Op::RunJob],
        StepKind::AiText | StepKind::AiImage => &[Op::Chat],
        StepKind::Wake => &[Op::WakeNode],
        StepKind::Sleep => &[Op::SleepNode],
        StepKind::Notify => &[Op::ManageAlerts],
        StepKind::Deploy => &[Op::Reconcile, Op::RollbackService],
        StepKind::Agent => &[Op::Chat],
        StepKind::Approval => &[],
    }
}

/// What starting an attempt means.
#[derive(Debug)]
pub enum Start {
    Job(Box<NewJob>),
    /// Wait for a person's decision.
    Approval,
    /// Wake this node through its relays; done when it is online.
    Wake(String),
    /// Work the controller carries out itself; its outcome comes back to the driver.
    Task(Task),
}

/// A step the controller carries out (it may make jobs of its own).
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// The node's allow-listed sleep command, as a job, waited for.
    Sleep { node: String },
    /// One message through an alert sink.
    Notify {
        sink: String,
        title: String,
        message: String,
        severity: String,
    },
    /// Deploy a service (`apply`: reconcile now and wait until it runs the map's revision,
    /// healthy) or roll it back (`rollback`: to `revision`, or the newest good one before).
    Deploy {
        service: String,
        rollback: bool,
        revision: Option<String>,
    },
    /// A question to an AI agent, whose tools act with the run's role.
    Agent { agent: String, prompt: String },
}

/// Where the gateway's routing would send a request now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub node: String,
    pub backend: String,
    /// The model's name on that backend (a checkpoint for images).
    pub model: String,
}

/// The gateway's routing, as the steps see it.
pub trait Route {
    /// The best node for a chat request for `model` (only `node` when one is named).
    fn text(&self, model: &str, node: Option<&str>) -> Result<Routed, String>;
    /// The best node for an image (with checkpoint `model` when one is named).
    fn image(&self, model: Option<&str>, node: Option<&str>) -> Result<Routed, String>;
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
    route: &dyn Route,
) -> Result<Start, String> {
    let target = || match (node, &step.selector) {
        (Some(n), _) => Ok(Target::Node(n.to_owned())),
        (None, Some(s)) => Ok(Target::Selector(s.clone())),
        (None, None) => Err("no `node` or `selector`".to_owned()),
    };
    let job_on = |work: Work, target: Target, idempotent: bool| -> Result<Start, String> {
        work.validate()?;
        Ok(Start::Job(Box::new(NewJob {
            work,
            target,
            deadline: Some(step.timeout.unwrap_or(default_deadline)),
            idempotent,
            max_attempts: Some(1),
        })))
    };
    let job = |work: Work, idempotent: bool| job_on(work, target()?, idempotent);
    match step.kind {
        StepKind::Noop => job(Work::Noop, true),
        StepKind::Exec => job(
            Work::Exec {
                op: required(with, "op")?,
                args: args(with)?,
            },
            false,
        ),
        StepKind::ServiceCheck => job(
            Work::Probe {
                http: string(with, "http")?,
                tcp: string(with, "tcp")?,
                timeout: duration(with, "timeout")?,
            },
            true,
        ),
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
        StepKind::Http => {
            let work = http_work(with)?;
            let idempotent =
                matches!(&work, Work::Http { method, .. } if method == "GET" || method == "HEAD");
            job(work, idempotent)
        }
        StepKind::AiText => {
            let model = required(with, "model")?;
            let r = route.text(&model, node)?;
            let body = chat_body(&r.model, with)?;
            job_on(
                infer(&r, "/v1/chat/completions", body, step),
                Target::Node(r.node),
                true,
            )
        }
        StepKind::AiImage => {
            let model = string(with, "model")?;
            let r = route.image(model.as_deref(), node)?;
            let body = image_body(&r.model, with)?;
            job_on(
                infer(&r, "/sdapi/v1/txt2img", body, step),
                Target::Node(r.node),
                true,
            )
        }
        StepKind::Approval => Ok(Start::Approval),
        StepKind::Wake => Ok(Start::Wake(required(with, "node")?)),
        StepKind::Sleep => Ok(Start::Task(Task::Sleep {
            node: required(with, "node")?,
        })),
        StepKind::Notify => Ok(Start::Task(Task::Notify {
            sink: required(with, "sink")?,
            title: string(with, "title")?.unwrap_or_default(),
            message: required(with, "message")?,
            severity: string(with, "severity")?.unwrap_or_else(|| "info".into()),
        })),
        StepKind::Agent => Ok(Start::Task(Task::Agent {
            agent: required(with, "agent")?,
            prompt: required(with, "prompt")?,
        })),
        StepKind::Deploy => {
            let rollback = match string(with, "action")?.as_deref() {
                None | Some("apply") => false,
                Some("rollback") => true,
                Some(other) => {
                    return Err(format!("`action` is `apply` or `rollback`, not `{other}`"))
                }
            };
            Ok(Start::Task(Task::Deploy {
                service: required(with, "service")?,
                rollback,
                revision: string(with, "revision")?,
            }))
        }
    }
}

fn duration(with: &Json, key: &str) -> Result<Option<Duration>, String> {
    string(with, key)?
        .map(|t| humantime::parse_duration(&t).map_err(|e| format!("`{key}` `{t}`: {e}")))
        .transpose()
}

fn infer(r: &Routed, path: &str, body: Json, step: &Step) -> Work {
    Work::Infer {
        backend: r.backend.clone(),
        path: path.to_owned(),
        body: body.to_string(),
        timeout: step.timeout,
    }
}

/// An `http` step's request: the body is sent as given (text), or as JSON when it is a map or
/// a list (with `content-type: application/json` unless a header says otherwise).
fn http_work(with: &Json) -> Result<Work, String> {
    let mut headers = std::collections::BTreeMap::new();
    match with.get("headers") {
        None | Some(Json::Null) => {}
        Some(Json::Object(m)) => {
            for (k, v) in m {
                let v = match v {
                    Json::String(s) => s.clone(),
                    Json::Number(_) | Json::Bool(_) => v.to_string(),
                    other => return Err(format!("header `{k}` must be text, not {other}")),
                };
                headers.insert(k.to_ascii_lowercase(), v);
            }
        }
        Some(other) => return Err(format!("`headers` must be a map, not {other}")),
    }
    let body = match with.get("body") {
        None | Some(Json::Null) => None,
        Some(Json::String(s)) => Some(s.clone()),
        Some(v @ (Json::Object(_) | Json::Array(_))) => {
            headers
                .entry("content-type".into())
                .or_insert_with(|| "application/json".into());
            Some(v.to_string())
        }
        Some(v) => Some(v.to_string()),
    };
    let max_bytes = match with.get("max_bytes") {
        None | Some(Json::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("`max_bytes` must be a whole number, not {v}"))?,
        ),
    };
    Ok(Work::Http {
        method: string(with, "method")?
            .unwrap_or_else(|| "GET".into())
            .to_ascii_uppercase(),
        url: required(with, "url")?,
        headers,
        body,
        timeout: duration(with, "timeout")?,
        max_bytes,
    })
}

fn number(with: &Json, key: &str) -> Result<Option<f64>, String> {
    match with.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Number(n)) => Ok(n.as_f64()),
        Some(Json::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("`{key}` must be a number, not `{s}`")),
        Some(other) => Err(format!("`{key}` must be a number, not {other}")),
    }
}

/// An OpenAI-style chat request: `messages` as given, or `system` and `prompt`.
fn chat_body(model: &str, with: &Json) -> Result<Json, String> {
    let mut messages = Vec::new();
    if let Some(system) = string(with, "system")? {
        messages.push(json!({"role": "system", "content": system}));
    }
    match with.get("messages") {
        None | Some(Json::Null) => {}
        Some(Json::Array(list)) => {
            for m in list {
                let role = m.get("role").and_then(Json::as_str);
                let content = m.get("content").and_then(Json::as_str);
                match (role, content) {
                    (Some(r @ ("system" | "user" | "assistant")), Some(c)) => {
                        messages.push(json!({"role": r, "content": c}))
                    }
                    _ => {
                        return Err(
                            "each of `messages` is {role: system|user|assistant, content: text}"
                                .into(),
                        )
                    }
                }
            }
        }
        Some(other) => return Err(format!("`messages` must be a list, not {other}")),
    }
    if let Some(prompt) = string(with, "prompt")? {
        messages.push(json!({"role": "user", "content": prompt}));
    }
    if !messages.iter().any(|m| m["role"] == "user") {
        return Err("give `prompt` or a user message in `messages`".into());
    }
    let mut body = json!({"model": model, "messages": messages, "stream": false});
    if let Some(n) = number(with, "max_tokens")? {
        if !(1.0..=1_000_000.0).contains(&n) {
            return Err("`max_tokens` must be 1 to 1000000".into());
        }
        body["max_tokens"] = json!(n as u64);
    }
    if let Some(t) = number(with, "temperature")? {
        if !(0.0..=2.0).contains(&t) {
            return Err("`temperature` must be 0 to 2".into());
        }
        body["temperature"] = json!(t);
    }
    Ok(body)
}

/// A Stable Diffusion WebUI txt2img request for one image.
fn image_body(checkpoint: &str, with: &Json) -> Result<Json, String> {
    let size = |key: &str| -> Result<u64, String> {
        match number(with, key)? {
            None => Ok(512),
            Some(n) if (64.0..=2048.0).contains(&n) => Ok(n as u64),
            Some(_) => Err(format!("`{key}` must be 64 to 2048")),
        }
    };
    let mut body = json!({
        "prompt": required(with, "prompt")?,
        "batch_size": 1,
        "width": size("width")?,
        "height": size("height")?,
        "steps": match number(with, "steps")? {
            None => 20,
            Some(n) if (1.0..=150.0).contains(&n) => n as u64,
            Some(_) => return Err("`steps` must be 1 to 150".into()),
        },
    });
    if let Some(n) = string(with, "negative_prompt")? {
        body["negative_prompt"] = json!(n);
    }
    if let Some(seed) = number(with, "seed")? {
        body["seed"] = json!(seed as i64);
    }
    if !checkpoint.is_empty() {
        body["override_settings"] = json!({"sd_model_checkpoint": checkpoint});
    }
    Ok(body)
}

/// How a finished job reads as the step's outcome (with `stdout`: the job's standard output,
/// for exec steps). A model's answer was filtered when its job ended (see
/// `ControlPlane::job_finished`): a blocked one fails the step.
pub fn outcome(step: &Step, rec: &JobRecord, stdout: Option<String>) -> Outcome {
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
            });
            if let Some(JobOutput::Http(h)) = &rec.output {
                return answer(step, rec, h, out);
            }
            out["exit_code"] = json!(rec.exit_code);
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

/// Text kept as an `http` step's `outputs.body` (its first bytes); `outputs.json` is there when
/// the body is JSON of at most this size.
pub const MAX_BODY_TEXT: usize = 16 * 1024;
/// Text kept as an `ai-text` step's `outputs.text`.
pub const MAX_TEXT: usize = 48 * 1024;

/// An HTTP answer (from a URL, or from an inference backend) as the step's outcome.
fn answer(step: &Step, rec: &JobRecord, h: &HttpOutput, mut out: Json) -> Outcome {
    let parsed: Option<Json> = serde_json::from_slice(&h.body).ok();
    let backend_error = || {
        let message = parsed
            .as_ref()
            .and_then(|v| {
                v.pointer("/error/message")
                    .or(v.get("error"))
                    .or(v.get("detail"))
            })
            .map(|m| {
                m.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| m.to_string())
            })
            .unwrap_or_else(|| head(&String::from_utf8_lossy(&h.body), 500));
        format!("the backend answered {}: {message}", h.status)
    };
    match step.kind {
        StepKind::AiText => {
            if h.status >= 400 {
                return Outcome::Failed(backend_error());
            }
            let Some(v) = parsed else {
                return Outcome::Failed("the backend's answer is not JSON".into());
            };
            let filtered = v.get("nebula_filtered").cloned().unwrap_or(Json::Null);
            if v.pointer("/choices/0/finish_reason").and_then(Json::as_str)
                == Some("content_filter")
            {
                return Outcome::Failed(format!(
                    "the answer was blocked by the output filters ({filtered})"
                ));
            }
            let Some(text) = v
                .pointer("/choices/0/message/content")
                .and_then(Json::as_str)
            else {
                return Outcome::Failed(
                    "the backend's answer has no `choices[0].message.content`".into(),
                );
            };
            out["text"] = json!(head(text, MAX_TEXT));
            out["text_truncated"] = json!(text.len() > MAX_TEXT);
            out["model"] = v.get("model").cloned().unwrap_or(Json::Null);
            out["finish_reason"] = v
                .pointer("/choices/0/finish_reason")
                .cloned()
                .unwrap_or(Json::Null);
            out["usage"] = v.get("usage").cloned().unwrap_or(Json::Null);
            if !filtered.is_null() {
                out["filtered"] = filtered;
            }
            Outcome::Succeeded(cap(out))
        }
        StepKind::AiImage => {
            if h.status >= 400 {
                return Outcome::Failed(backend_error());
            }
            let images: Vec<usize> = parsed
                .as_ref()
                .and_then(|v| v.get("images"))
                .and_then(Json::as_array)
                .map(|l| l.iter().filter_map(Json::as_str).map(str::len).collect())
                .unwrap_or_default();
            if images.is_empty() {
                return Outcome::Failed(if h.truncated {
                    "the image was larger than a job's answer may be".into()
                } else {
                    "the backend's answer holds no image".into()
                });
            }
            let info: Option<Json> = parsed
                .as_ref()
                .and_then(|v| v.get("info"))
                .and_then(Json::as_str)
                .and_then(|i| serde_json::from_str(i).ok());
            out["images"] = json!(images.len());
            out["base64_bytes"] = json!(images);
            out["seed"] = info
                .as_ref()
                .and_then(|i| i.get("seed"))
                .cloned()
                .unwrap_or(Json::Null);
            Outcome::Succeeded(cap(out))
        }
        _ => {
            out["status"] = json!(h.status);
            out["content_type"] = json!(h.content_type);
            out["truncated"] = json!(h.truncated);
            out["latency_ms"] = json!(h.latency_us / 1000);
            match h.text() {
                Some(t) => out["body"] = json!(head(t, MAX_BODY_TEXT)),
                None => out["body_bytes"] = json!(h.body.len()),
            }
            if let Some(v) = parsed.filter(|_| h.body.len() <= MAX_BODY_TEXT) {
                out["json"] = v;
            }
            // A literal (checked when the file is read).
            let fail_on_status =
                step.with.get("fail_on_status").and_then(Json::as_bool) != Some(false);
            if fail_on_status && h.status >= 400 {
                let url = match &rec.work {
                    Work::Http { url, .. } => nebula_types::jobs::redact_url(url),
                    _ => "the URL".into(),
                };
                Outcome::Failed(format!(
                    "{url} answered {}: {}",
                    h.status,
                    head(&String::from_utf8_lossy(&h.body), 500)
                ))
            } else {
                Outcome::Succeeded(cap(out))
            }
        }
    }
}

/// The first `max` bytes of `text`, cut at a character boundary.
fn head(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Outputs over [`MAX_OUTPUTS`] keep their small fields (numbers, flags, short text) and say
/// they were cut.
pub fn cap(out: Json) -> Json {
    let len = out.to_string().len();
    if len <= MAX_OUTPUTS {
        return out;
    }
    let mut kept = serde_json::Map::new();
    if let Json::Object(m) = out {
        for (k, v) in m {
            if v.to_string().len() <= 1024 {
                kept.insert(k, v);
            }
        }
    }
    kept.insert("truncated".into(), json!(true));
    kept.insert("bytes".into(), json!(len));
    Json::Object(kept)
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
mod tests;
