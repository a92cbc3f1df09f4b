//! The gateway's one retry loop, for chat, completions, embeddings and images alike: each try
//! picks the best candidate not tried yet, opens an inference stream to its agent and waits
//! for the first bytes (longer when the model must be loaded). Overloads, timeouts and
//! failures feed the node's breaker for that model and move on to the next candidate; a
//! "model not found" drops the model from that node's inventory instead.

use std::time::Duration;

use nebula_protocol::ai::{InferEvent, InferRequest};
use nebula_protocol::jobs::JobControl;
use nebula_protocol::{self as proto, FrameReader};
use tracing::debug;
use uuid::Uuid;

use super::super::{AiConfig, Candidate, Outcome};
use crate::ControlPlane;

/// Up to `max_attempts` tries, each on the best candidate not tried yet: the first from `first`
/// (the caller's list, already asked for), later ones from `candidates`, asked again before each
/// try so that a node that failed or went away meanwhile drops out. A breaker that allows no try
/// passes its node over. `Ok`: the candidate whose backend answered, and its answer's start;
/// `Err`: no try started an answer, with the last failure.
pub(super) async fn first_answer(
    cp: &ControlPlane,
    cfg: &AiConfig,
    first: Vec<Candidate>,
    candidates: impl Fn() -> Vec<Candidate>,
    path: &str,
    body: &[u8],
    stream: bool,
) -> Result<(Candidate, Started), Option<String>> {
    let mut tried: Vec<Uuid> = Vec::new();
    let mut last_error: Option<String> = None;
    let mut listed = Some(first);
    for _ in 0..cfg.max_attempts.max(1) {
        let list = listed.take().unwrap_or_else(&candidates);
        let Some(c) = list.into_iter().find(|c| !tried.contains(&c.node_id)) else {
            break;
        };
        tried.push(c.node_id);
        let Some(started) = try_node(cp, &c, path, body, stream, cfg).await else {
            continue;
        };
        match started {
            Ok(started) => return Ok((c, started)),
            Err(f) => {
                debug!(node = %c.node, model = %c.model, "try failed: {}", f.message);
                if f.missing {
                    cp.ai.model_missing(c.node_id, &c.backend, &c.model);
                }
                cp.ai.end(c.node_id, &c.model, f.outcome, cfg);
                last_error = Some(format!("{}: {}", c.node, f.message));
            }
        }
    }
    Err(last_error)
}

/// A try begun on a node: if the request is dropped before the try settles (its client went
/// away while the node was still loading the model or thinking), the try ends as nobody's
/// fault. Otherwise the node's count of requests in flight would never come down, and a
/// breaker's half-open probe would stay in flight for good, the node never tried again.
struct Attempt<'a> {
    cp: &'a ControlPlane,
    node_id: Uuid,
    model: &'a str,
    cfg: &'a AiConfig,
}

impl Attempt<'_> {
    /// The try has an outcome; whoever has it ends the try.
    fn settled(self) {
        std::mem::forget(self);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.cp
            .ai
            .end(self.node_id, self.model, Outcome::Neutral, self.cfg);
    }
}

/// A try that failed before any byte reached the client.
struct Failed {
    outcome: Outcome,
    missing: bool,
    message: String,
}

impl Failed {
    /// The backend's own error; `timeout`: it timed out.
    fn backend(message: String, timeout: bool) -> Self {
        let outcome = if timeout {
            Outcome::Timeout
        } else {
            Outcome::Failure
        };
        Failed::new(outcome, message)
    }

    fn new(outcome: Outcome, message: impl Into<String>) -> Self {
        Failed {
            outcome,
            missing: false,
            message: message.into(),
        }
    }
}

/// A stream whose backend has answered.
pub(super) struct Started {
    pub status: u16,
    pub content_type: String,
    /// Body bytes already read (the first chunk of a stream, or the whole error body).
    pub first: Vec<u8>,
    /// The stream is over already (`End` read).
    pub done: bool,
    pub recv: quinn::RecvStream,
    pub frames: FrameReader,
    /// Keeps the node's session where it is while the answer streams.
    pub _busy: Option<crate::registry::Busy>,
}

/// One try on a candidate, counted by its breaker: `None` when the breaker allows no try now.
/// The caller ends the try (`end`) with the outcome of a failure, or hands it to a [`Finish`].
async fn try_node(
    cp: &ControlPlane,
    c: &Candidate,
    path: &str,
    body: &[u8],
    stream: bool,
    cfg: &AiConfig,
) -> Option<Result<Started, Failed>> {
    if !cp.ai.begin(c.node_id, &c.model) {
        return None;
    }
    let attempt = Attempt {
        cp,
        node_id: c.node_id,
        model: &c.model,
        cfg,
    };
    let started = start(cp, c, path, body, stream, cfg).await;
    attempt.settled();
    Some(started)
}

/// Open an inference stream to the candidate's agent and wait for the answer's head and first
/// bytes: a stream's first token, or a whole answer (which a backend sends only once it is
/// done, so it has the total timeout, not the first token's).
async fn start(
    cp: &ControlPlane,
    c: &Candidate,
    path: &str,
    body: &[u8],
    stream: bool,
    cfg: &AiConfig,
) -> Result<Started, Failed> {
    let conn = cp
        .registry
        .connection(c.node_id)
        .ok_or_else(|| Failed::new(Outcome::Neutral, "went offline"))?;
    let busy = cp.registry.busy(c.node_id);
    let first_timeout = if !stream {
        cfg.total_timeout
    } else if c.loaded {
        cfg.first_token_timeout
    } else {
        cfg.load_timeout.max(cfg.first_token_timeout)
    };
    let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    let req = JobControl::Infer(InferRequest {
        backend: c.backend.clone(),
        path: path.to_owned(),
        body: body.to_vec(),
        first_byte_timeout_ms: ms(first_timeout),
        total_timeout_ms: ms(cfg.total_timeout),
    });
    let deadline = tokio::time::Instant::now() + first_timeout + Duration::from_secs(1);
    let opened = async {
        let (mut send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| Failed::new(Outcome::Failure, e.to_string()))?;
        proto::write_message(&mut send, &req)
            .await
            .map_err(|e| Failed::new(Outcome::Failure, e.to_string()))?;
        // The request is whole: its end goes in the same packet. Left open, the stream would
        // be finished when dropped, after the answer, and cost a packet each way per request.
        send.finish()
            .map_err(|e| Failed::new(Outcome::Failure, e.to_string()))?;
        Ok::<_, Failed>((send, recv))
    };
    let (_send, mut recv) = tokio::time::timeout_at(deadline, opened)
        .await
        .map_err(|_| Failed::new(Outcome::Timeout, "no answer in time"))??;
    let mut frames = FrameReader::new(proto::DEFAULT_MAX_FRAME);
    let next = async |frames: &mut FrameReader, recv: &mut quinn::RecvStream| {
        match tokio::time::timeout_at(deadline, frames.read_message::<InferEvent, _>(recv)).await {
            Ok(Ok(ev)) => Ok(ev),
            Ok(Err(e)) => Err(Failed::new(
                Outcome::Failure,
                format!("inference stream: {e}"),
            )),
            Err(_) => Err(Failed::new(
                Outcome::Timeout,
                format!(
                    "no first token within {}",
                    humantime::format_duration(first_timeout)
                ),
            )),
        }
    };
    let (status, content_type) = match next(&mut frames, &mut recv).await? {
        InferEvent::Head {
            status,
            content_type,
        } => (status, content_type),
        InferEvent::Error { message, timeout } => return Err(Failed::backend(message, timeout)),
        other => {
            return Err(Failed::new(
                Outcome::Failure,
                format!("unexpected {other:?} before the head"),
            ))
        }
    };
    // Wait for the first body bytes too: a stream's first byte to the client is its first token.
    let (first, done) = match next(&mut frames, &mut recv).await? {
        InferEvent::Chunk(b) => (b, false),
        InferEvent::End => (Vec::new(), true),
        InferEvent::Error { message, timeout } => return Err(Failed::backend(message, timeout)),
        InferEvent::Head { .. } => return Err(Failed::new(Outcome::Failure, "a second head")),
    };
    match status {
        429 | 503 => Err(Failed::new(Outcome::Overloaded, format!("HTTP {status}"))),
        404 => Err(Failed {
            outcome: Outcome::Neutral,
            missing: true,
            message: format!("HTTP 404: {}", String::from_utf8_lossy(&first)),
        }),
        s if s >= 500 => Err(Failed::new(
            Outcome::Failure,
            format!("HTTP {s}: {}", String::from_utf8_lossy(&first)),
        )),
        _ => Ok(Started {
            status,
            content_type,
            first,
            done,
            recv,
            frames,
            _busy: busy,
        }),
    }
}
