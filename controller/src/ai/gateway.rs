//! The OpenAI-compatible gateway: `POST /v1/chat/completions` (SSE streaming too),
//! `POST /v1/completions`, `POST /v1/embeddings`, `GET /v1/models`, behind API tokens.
//!
//! One retry loop, here: each try picks the best candidate not tried yet, opens an inference
//! stream to its agent and waits for the first bytes (longer when the model must be loaded).
//! Overloads, timeouts and failures feed the node's breaker for that model and move on to the
//! next candidate; a "model not found" drops the model from that node's inventory instead. Only
//! before the first byte has gone to the client: after it, a failure ends the stream with an
//! in-band error event. When no node can serve, a configured cloud provider can. Every response
//! names the node that served it (`x-nebula-node`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use nebula_protocol::ai::{model_base, same_model, InferEvent, InferRequest};
use nebula_protocol::jobs::JobControl;
use nebula_protocol::{self as proto, FrameReader};
use serde_json::{json, Value};
use tracing::{debug, warn};
use uuid::Uuid;

use super::pulls::{self, Scope};
use super::{estimate_tokens, filters, AiConfig, Candidate, Claim, Outcome};
use crate::ControlPlane;

/// Set on every gateway response, so that an agent's discovery never takes the gateway for a
/// local backend.
pub const GATEWAY_HEADER: &str = "x-nebula-gateway";
pub const NODE_HEADER: &str = "x-nebula-node";

/// Largest request body (long prompts, images for img2img or vision models); it travels to the
/// agent in one frame, with room left for the rest of the request.
pub const MAX_BODY: usize = proto::DEFAULT_MAX_FRAME - (64 << 10);

/// Read a request's body once its caller is known (an unknown caller never gets a large body
/// buffered): the bytes and their share of the gateway's budget (hold it while the body is
/// in use), or an OpenAI-shaped error (over [`MAX_BODY`], over the budget, or cut off).
async fn read_body(
    cp: &ControlPlane,
    req: Request,
) -> Result<(Bytes, tokio::sync::OwnedSemaphorePermit), Response> {
    let announced = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(linger(req.into_body(), too_large_body()).await);
    }
    // A body of unknown length may take up to the per-request cap.
    let want = announced.map_or(MAX_BODY, |n| n as usize).max(1);
    let permits = u32::try_from(want).unwrap_or(u32::MAX);
    let Ok(budget) = cp.gateway_bodies.clone().try_acquire_many_owned(permits) else {
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "busy",
            "the gateway is holding too many request bodies; try again in a moment",
        );
        r.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            HeaderValue::from_static("1"),
        );
        return Err(linger(req.into_body(), r).await);
    };
    let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY)
        .await
        .map_err(|e| {
            let too_large = std::iter::successors(std::error::Error::source(&e), |s| s.source())
                .any(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                too_large_body()
            } else {
                error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "invalid_body",
                    format!("reading the body: {e}"),
                )
            }
        })?;
    Ok((bytes, budget))
}

/// Most bytes of a refused body read and thrown away, and for how long, before the answer goes.
const LINGER_BYTES: usize = 4 * MAX_BODY;
const LINGER_TIME: Duration = Duration::from_secs(5);

/// Read and discard a refused body (bounded in bytes and time, nothing kept) before answering,
/// as web servers do with a lingering close: a client still sending gets the error instead of
/// a broken pipe when the server closes a socket it has not read.
async fn linger(body: Body, answer: Response) -> Response {
    use http_body_util::BodyExt;
    let drain = async {
        let mut body = body;
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, Bytes::len);
            if seen > LINGER_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    let mut answer = answer;
    answer
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    answer
}

fn too_large_body() -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        "too_large",
        format!("the body is over {MAX_BODY} bytes"),
    )
}

fn error(status: StatusCode, kind: &str, code: &str, message: impl Into<String>) -> Response {
    let mut r = (
        status,
        axum::Json(json!({"error": {"message": message.into(), "type": kind, "code": code}})),
    )
        .into_response();
    r.headers_mut()
        .insert(GATEWAY_HEADER, HeaderValue::from_static("1"));
    r
}

/// Who asks the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Accounted, limited and audited under this name: an API token's name, or `user:NAME`
    /// for a dashboard user (token names hold no `:`).
    pub name: String,
    /// What the gateway may start for it (pulls on demand).
    pub scope: Scope,
}

/// The API token's caller, or the 401 to answer.
async fn authenticate(cp: &ControlPlane, headers: &HeaderMap) -> Result<Caller, Response> {
    let Some(token) = crate::authz::bearer(headers) else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing_api_key",
            "missing bearer token (Authorization: Bearer <token>)",
        ));
    };
    match cp.api_token(&crate::hash_secret(token)).await {
        Ok(Some(rec)) => Ok(Caller {
            scope: Scope::of_role(&rec.role),
            name: rec.name,
        }),
        Ok(None) => Err(error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            "unknown or revoked API token",
        )),
        Err(e) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "store_unavailable",
            format!("checking the token: {e}"),
        )),
    }
}

pub async fn chat_completions(State(cp): State<Arc<ControlPlane>>, req: Request) -> Response {
    serve(cp, req, "/v1/chat/completions").await
}

pub async fn completions(State(cp): State<Arc<ControlPlane>>, req: Request) -> Response {
    serve(cp, req, "/v1/completions").await
}

pub async fn embeddings(State(cp): State<Arc<ControlPlane>>, req: Request) -> Response {
    serve(cp, req, "/v1/embeddings").await
}

/// `GET /v1/models`: the models the fleet serves now (plus the fallback's, when configured).
pub async fn models(State(cp): State<Arc<ControlPlane>>, headers: HeaderMap) -> Response {
    if let Err(r) = authenticate(&cp, &headers).await {
        return r;
    }
    let models = cp.ai.models(|id| cp.registry.is_online(id));
    let mut data: Vec<Value> = models
        .into_iter()
        .map(|(name, (nodes, loaded))| {
            json!({"id": name, "object": "model", "owned_by": "nebula", "nodes": nodes, "loaded_on": loaded})
        })
        .collect();
    if let Some(fb) = &cp.config.ai.fallback {
        for m in &fb.models {
            if !data.iter().any(|d| d["id"] == m.as_str()) {
                data.push(json!({"id": m, "object": "model", "owned_by": fb.name, "nodes": [], "loaded_on": []}));
            }
        }
    }
    let mut r = axum::Json(json!({"object": "list", "data": data})).into_response();
    r.headers_mut()
        .insert(GATEWAY_HEADER, HeaderValue::from_static("1"));
    r
}

/// Releases the token's concurrency slot when the response is over.
struct Admitted {
    cp: Arc<ControlPlane>,
    token: String,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.cp.ai.release(&self.token);
    }
}

async fn serve(cp: Arc<ControlPlane>, req: Request, path: &'static str) -> Response {
    let caller = match authenticate(&cp, req.headers()).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let (body, _budget) = match read_body(&cp, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    serve_for(cp, caller, body, path).await
}

/// The gateway for a caller already authenticated (accounted and audited by its name).
pub async fn serve_for(
    cp: Arc<ControlPlane>,
    caller: Caller,
    body: Bytes,
    path: &'static str,
) -> Response {
    let token = caller.name;
    let cfg = cp.config.ai.clone();
    if let Err(wait) = cp.ai.admit(&token, &cfg) {
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limited",
            format!(
                "this token is over its limit; retry in {} s",
                wait.as_secs().max(1)
            ),
        );
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(wait.as_secs().max(1)),
        );
        return r;
    }
    let admitted = Admitted {
        cp: cp.clone(),
        token: token.clone(),
    };
    if body.len() > MAX_BODY {
        return too_large_body();
    }
    // Only the fields routing needs are read (borrowed); the body goes on as it came.
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow, default)]
        model: Option<std::borrow::Cow<'a, str>>,
        #[serde(default)]
        stream: Option<bool>,
        /// Present (even `null`) or not.
        #[serde(default, deserialize_with = "present")]
        stream_options: Option<Value>,
    }
    let head: Head<'_> = match serde_json::from_slice(&body) {
        Ok(h) => h,
        Err(e) if e.is_data() && !body.trim_ascii_start().starts_with(b"{") => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_body",
                "the body must be a JSON object",
            )
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
                format!("the body is not valid: {e}"),
            )
        }
    };
    let Some(model) = head.model.map(|m| m.into_owned()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "missing_model",
            "`model` is required",
        );
    };
    let embeddings = path == "/v1/embeddings";
    let stream = !embeddings && head.stream.unwrap_or(false);
    // A stream reports usage in its last chunk only when asked: the gateway always asks (for
    // accounting), and leaves that chunk out for a client that did not.
    let asked_usage = head
        .stream_options
        .as_ref()
        .is_some_and(|o| o.get("include_usage") == Some(&Value::Bool(true)));
    let strip_usage = stream && !asked_usage;
    // The body goes on as it came (no copy) unless usage must be asked for.
    let body: Bytes = if strip_usage {
        Bytes::from(ask_for_usage(&body, head.stream_options.is_some()))
    } else {
        body
    };
    let prompt_tokens = estimate_tokens(&body);
    let mut tried: Vec<Uuid> = Vec::new();
    let mut last_error: Option<String> = None;
    // Why pulling the model failed, or was not allowed, when no node had it.
    let mut pull_error: Option<String> = None;
    let routable = || {
        cp.ai.candidates(
            &model,
            prompt_tokens,
            |id| cp.registry.is_online(id),
            |id| cp.telemetry.free_vram(id),
            embeddings,
        )
    };
    for attempt in 0..cfg.max_attempts.max(1) {
        let mut candidates = routable();
        // The last tier: no node has the model at all (whatever its context or breaker), one
        // with Ollama can pull it (waited for, once per node and model however many ask).
        if attempt == 0
            && candidates.is_empty()
            && !embeddings
            && !fallback_lists(&cfg, &model)
            && !cp.ai.has_model(&model, |id| cp.registry.is_online(id))
        {
            match pulls::may_pull(&cfg, caller.scope, &model) {
                Ok(()) => match pull_on_demand(&cp, &model, &cfg, &token).await {
                    Ok(()) | Err(PullError::NoNode) => {}
                    Err(PullError::Failed(e)) => pull_error = Some(e),
                    Err(PullError::OverLimit(n)) => {
                        return error(
                            StatusCode::TOO_MANY_REQUESTS,
                            "rate_limit_error",
                            "too_many_pulls",
                            format!(
                                "no online node serves model `{model}`, and this token has {n} model pulls in flight, its limit (ai.max_pulls_per_token): retry when one is done"
                            ),
                        );
                    }
                },
                Err(refused) => pull_error = refused.reason().map(str::to_owned),
            }
            candidates = routable();
        }
        let Some(c) = candidates.into_iter().find(|c| !tried.contains(&c.node_id)) else {
            break;
        };
        tried.push(c.node_id);
        let Some(started) = try_node(&cp, &c, path, &body, stream, &cfg).await else {
            continue;
        };
        match started {
            Ok(started) => {
                return respond(cp, c, started, (stream, strip_usage), admitted, cfg).await
            }
            Err(f) => {
                debug!(node = %c.node, model = %c.model, "try failed: {}", f.message);
                if f.missing {
                    cp.ai.model_missing(c.node_id, &c.backend, &c.model);
                }
                cp.ai.end(c.node_id, &c.model, f.outcome, &cfg);
                last_error = Some(format!("{}: {}", c.node, f.message));
            }
        }
    }
    if let Some(fb) = cfg.fallback.clone() {
        if fb.models.is_empty() || fb.models.iter().any(|m| same_model(m, &model)) {
            return fallback(
                cp,
                fb,
                path,
                body,
                model,
                (stream, strip_usage),
                admitted,
                cfg,
            )
            .await;
        }
    }
    match last_error {
        // Nodes have it, but none may take it now: not a missing model, and worth a retry.
        None if cp.ai.has_model(&model, |id| cp.registry.is_online(id)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "no_node_available",
            format!(
                "the nodes that have `{model}` cannot take this request now: they are cooling down after failures, or the prompt is longer than their context"
            ),
        ),
        // No node has it. A pull that failed, now or a moment ago (every node that could pull
        // it passed over for `failed_pull_cooldown`), says why.
        None => error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            match pull_error
                .or_else(|| cp.ai.recent_pull_failure(&model, cfg.failed_pull_cooldown))
            {
                Some(why) => format!("no online node serves model `{model}`, and {why}"),
                None => {
                    format!("no online node serves model `{model}` (GET /v1/models lists them)")
                }
            },
        ),
        Some(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "no_node_available",
            format!("every node that has `{model}` failed: {e}"),
        ),
    }
}

/// `serde(deserialize_with)`: a field that is there, even as `null`, is `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    <Value as serde::Deserialize>::deserialize(d).map(Some)
}

/// A streamed request's body, asking for usage in the stream's last chunk. Without
/// `stream_options` (the common case) the field is added to the text as it is; with one that
/// does not ask (`null`, `include_usage: false`), the document is rewritten.
fn ask_for_usage(body: &[u8], has_options: bool) -> Vec<u8> {
    if !has_options {
        let at = body.iter().position(|b| *b == b'{').map_or(0, |i| i + 1);
        let mut b = Vec::with_capacity(body.len() + 48);
        b.extend_from_slice(&body[..at]);
        b.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
        b.extend_from_slice(&body[at..]);
        return b;
    }
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return body.to_vec();
    };
    match v.get_mut("stream_options") {
        Some(Value::Object(o)) => {
            o.insert("include_usage".into(), Value::Bool(true));
        }
        Some(other) => *other = json!({"include_usage": true}),
        None => return body.to_vec(),
    }
    serde_json::to_vec(&v).unwrap_or_else(|_| body.to_vec())
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

/// Does the fallback provider name `model` among its own? Such a model (a cloud one) is never
/// pulled onto a node.
fn fallback_lists(cfg: &AiConfig, model: &str) -> bool {
    cfg.fallback
        .as_ref()
        .is_some_and(|fb| fb.models.iter().any(|m| same_model(m, model)))
}

/// Gives back a pull claim that has no job yet.
struct Unclaim<'a> {
    cp: &'a ControlPlane,
    key: &'a (Uuid, String),
}

impl Drop for Unclaim<'_> {
    fn drop(&mut self) {
        self.cp.ai.set_pull_in_flight(self.key.clone(), None);
    }
}

/// Why a pull on demand gave no model.
enum PullError {
    /// No node can pull it: the request goes on as if there were no such tier.
    NoNode,
    /// The caller has this many pulls in flight, its `max_pulls_per_token`: none was started.
    OverLimit(u32),
    /// The pull failed, or its model did not show up: why.
    Failed(String),
}

/// Pull `model` onto the best node with a healthy Ollama (most free VRAM, fewest requests in
/// flight) for `who` and wait until that node reports it. One pull per node and model at a
/// time: other requests for it wait on the same job. A node whose pull failed is passed over
/// for that model for `failed_pull_cooldown` ([`super::AiFleet::pull_failed`]). The job and
/// its audit rows name `who`, and count against its `max_pulls_per_token`.
async fn pull_on_demand(
    cp: &Arc<ControlPlane>,
    model: &str,
    cfg: &AiConfig,
    who: &str,
) -> Result<(), PullError> {
    let Some((node_id, node)) = cp.ai.pull_target(
        model,
        cfg.failed_pull_cooldown,
        |id| cp.registry.is_online(id),
        |id| cp.telemetry.free_vram(id),
    ) else {
        return Err(PullError::NoNode);
    };
    let key = (node_id, model_base(model).to_owned());
    // Model jobs not over yet: a claim whose job is not among them is not in flight.
    let live: std::collections::HashSet<Uuid> = cp
        .model_jobs_in_flight()
        .into_iter()
        .map(|(id, ..)| id)
        .collect();
    let job = match cp
        .ai
        .claim_pull(&key, who, cfg.max_pulls_per_token, |j| live.contains(&j))
    {
        Claim::OverLimit(n) => return Err(PullError::OverLimit(n)),
        Claim::Joined(Some(job)) => job,
        Claim::Joined(None) => {
            // Another request is starting this pull: wait for its job.
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                match cp.ai.pull_job(&key) {
                    Some(Some(job)) => break job,
                    Some(None) if tokio::time::Instant::now() < until => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    // Over already (or stuck): route with what the fleet has now.
                    _ => return Ok(()),
                }
            }
        }
        Claim::Start => {
            // Dropped before the job exists (the client went away), the claim would stay taken
            // with no job, and no pull of this model onto this node would ever start again.
            let claim = Unclaim { cp, key: &key };
            let rec = cp
                .create_job(
                    crate::jobs::NewJob {
                        work: crate::jobs::model::Work::Model {
                            action: crate::jobs::model::ModelActionKind::Pull,
                            name: Some(model.to_owned()),
                            url: None,
                            file: None,
                            sha256: None,
                            backend: None,
                        },
                        target: crate::jobs::model::Target::Node(node.clone()),
                        deadline: Some(cfg.load_timeout),
                        idempotent: false,
                        max_attempts: Some(1),
                    },
                    // Allowed by the gateway's own rule (`ai.pull_on_demand`), checked above;
                    // audited under the token that asked.
                    &crate::authz::OpCtx::internal(who),
                )
                .await
                .map_err(|e| {
                    PullError::Failed(format!("starting a pull of `{model}` on {node}: {e}"))
                })?;
            cp.audit(
                who,
                "ai.pull_on_demand",
                model,
                json!({"node": node, "job": rec.id}),
            );
            tracing::info!(%model, %node, %who, job = %rec.id, "pulling a model for a request");
            std::mem::forget(claim);
            cp.ai.set_pull_in_flight(key.clone(), Some(rec.id));
            rec.id
        }
    };
    let deadline = tokio::time::Instant::now() + cfg.load_timeout;
    let outcome = loop {
        let rec = cp
            .job(job)
            .await
            .map_err(|e| PullError::Failed(e.to_string()))?;
        match rec {
            Some(r) if r.state.is_terminal() => {
                if r.state == crate::jobs::model::JobState::Succeeded {
                    break Ok(());
                }
                let why = format!(
                    "pulling `{model}` on {node} failed: {}",
                    r.error.or(r.reason).unwrap_or_default()
                );
                // The node could not pull it (a name its registry does not have, its Ollama
                // down): asking it again at every request would start a job each time, and
                // delay each request that another node or the fallback could answer. A pull cut
                // short (a deadline, a lost node) may be tried again.
                if r.state == crate::jobs::model::JobState::Failed {
                    cp.ai
                        .pull_failed(node_id, model, &why, cfg.failed_pull_cooldown);
                }
                break Err(why);
            }
            None => break Err(format!("the pull of `{model}` on {node} vanished")),
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            break Err(format!(
                "pulling `{model}` on {node} took longer than the load timeout"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    cp.ai.set_pull_in_flight(key, None);
    outcome.map_err(PullError::Failed)?;
    // The agent reads its backends again right after the job: wait for the model to show up.
    while tokio::time::Instant::now() < deadline {
        if !cp
            .ai
            .candidates(model, 0, |id| id == node_id, |_| 0, true)
            .is_empty()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(PullError::Failed(format!(
        "{node} pulled `{model}` but does not report it"
    )))
}

/// A try that failed before any byte reached the client.
struct Failed {
    outcome: Outcome,
    missing: bool,
    message: String,
}

impl Failed {
    fn new(outcome: Outcome, message: impl Into<String>) -> Self {
        Failed {
            outcome,
            missing: false,
            message: message.into(),
        }
    }
}

/// A stream whose backend has answered.
struct Started {
    status: u16,
    content_type: String,
    /// Body bytes already read (the first chunk of a stream, or the whole error body).
    first: Vec<u8>,
    /// The stream is over already (`End` read).
    done: bool,
    recv: quinn::RecvStream,
    frames: FrameReader,
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
        InferEvent::Error { message, timeout } => {
            return Err(Failed::new(
                if timeout {
                    Outcome::Timeout
                } else {
                    Outcome::Failure
                },
                message,
            ))
        }
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
        InferEvent::Error { message, timeout } => {
            return Err(Failed::new(
                if timeout {
                    Outcome::Timeout
                } else {
                    Outcome::Failure
                },
                message,
            ))
        }
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
        }),
    }
}

/// What a response still owes when it ends: the breaker's outcome, usage, the token's slot.
struct Finish {
    cp: Arc<ControlPlane>,
    cfg: AiConfig,
    node_id: Uuid,
    node: String,
    model: String,
    token: String,
    outcome: Option<Outcome>,
    usage: Option<(u64, u64)>,
    _admitted: Admitted,
}

impl Drop for Finish {
    fn drop(&mut self) {
        // A response dropped before its end: the client went away, not the node's fault.
        let outcome = self.outcome.unwrap_or(Outcome::Neutral);
        self.cp
            .ai
            .end(self.node_id, &self.model, outcome, &self.cfg);
        if outcome == Outcome::Success {
            let (p, c) = self.usage.unwrap_or((0, 0));
            self.cp
                .ai
                .add_usage(&self.token, &self.model, &self.node, p, c);
        }
    }
}

/// The answer to the client from a node's start of one. `(stream, strip_usage)`: the client
/// asked for a stream, and did not ask for its usage.
async fn respond(
    cp: Arc<ControlPlane>,
    c: Candidate,
    started: Started,
    (stream, strip_usage): (bool, bool),
    admitted: Admitted,
    cfg: AiConfig,
) -> Response {
    let mut finish = Finish {
        cp: cp.clone(),
        cfg: cfg.clone(),
        node_id: c.node_id,
        node: c.node.clone(),
        model: c.model.clone(),
        token: admitted.token.clone(),
        outcome: None,
        usage: None,
        _admitted: admitted,
    };
    let status = StatusCode::from_u16(started.status).unwrap_or(StatusCode::BAD_GATEWAY);
    if (400..500).contains(&started.status) {
        // The request's fault: nothing to hold against the node.
        finish.outcome = Some(Outcome::Neutral);
    }
    let content_type = started.content_type.clone();
    let mut filtered = Vec::new();
    let body = if stream && status.is_success() {
        Body::from_stream(relay(
            started,
            finish,
            cfg.total_timeout,
            filters::SseFilter::new(strip_usage),
        ))
    } else {
        match collect(started, &mut finish, cfg.total_timeout).await {
            Ok(bytes) if status.is_success() => {
                let (bytes, hits) = filter_whole(&cp, &finish.token, &c.model, &c.node, bytes);
                filtered = hits;
                Body::from(bytes)
            }
            Ok(bytes) => Body::from(bytes),
            Err(e) => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    "upstream_failed",
                    format!("{} failed while answering: {e}", c.node),
                )
            }
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&content_type)
            .unwrap_or(HeaderValue::from_static("application/json")),
    );
    h.insert(GATEWAY_HEADER, HeaderValue::from_static("1"));
    if let Ok(v) = HeaderValue::from_str(&c.node) {
        h.insert(NODE_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&c.backend) {
        h.insert("x-nebula-backend", v);
    }
    if !filtered.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&filtered.join(",")) {
            h.insert("x-nebula-filtered", v);
        }
    }
    if stream {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    resp
}

/// Record filter hits in the audit log.
fn audit_hits(cp: &ControlPlane, token: &str, model: &str, node: &str, hits: &[filters::Hit]) {
    for h in hits {
        cp.audit(
            token,
            "ai.filter",
            model,
            json!({"rule": h.rule, "action": h.action, "sample": h.sample, "node": node}),
        );
    }
}

/// JSON text with its escape sequences decoded (`\n`, `\"`, `\u003c` and surrogate pairs),
/// so that a scan of the raw document sees what a scan of its strings sees, and more: a
/// `\u003cscript` is the `<script` it stands for.
fn unescaped(json: &str) -> std::borrow::Cow<'_, str> {
    if !json.contains('\\') {
        return std::borrow::Cow::Borrowed(json);
    }
    let hex = |chars: &mut std::str::Chars<'_>| -> Option<u32> {
        let digits: String = chars.take(4).collect();
        u32::from_str_radix(&digits, 16).ok()
    };
    let mut out = String::with_capacity(json.len());
    let mut chars = json.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let decoded = match chars.next() {
            Some('n') => '\n',
            Some('t') => '\t',
            Some('r') => '\r',
            Some('b' | 'f') => ' ',
            Some('u') => match hex(&mut chars) {
                Some(hi @ 0xD800..=0xDBFF) => {
                    let mut ahead = chars.clone();
                    match (ahead.next(), ahead.next(), hex(&mut ahead)) {
                        (Some('\\'), Some('u'), Some(lo @ 0xDC00..=0xDFFF)) => {
                            chars = ahead;
                            char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
                                .unwrap_or(' ')
                        }
                        _ => ' ',
                    }
                }
                Some(u) => char::from_u32(u).unwrap_or(' '),
                None => ' ',
            },
            Some(other) => other,
            None => ' ',
        };
        out.push(decoded);
    }
    std::borrow::Cow::Owned(out)
}

/// `usage` of a whole answer, read without building the document.
fn usage_in_body(body: &[u8]) -> Option<(u64, u64)> {
    #[derive(serde::Deserialize)]
    struct U {
        usage: Option<Counts>,
    }
    #[derive(serde::Deserialize)]
    struct Counts {
        prompt_tokens: u64,
        #[serde(default)]
        completion_tokens: u64,
    }
    let u: U = serde_json::from_slice(body).ok()?;
    u.usage.map(|c| (c.prompt_tokens, c.completion_tokens))
}

/// Filter a whole JSON answer; the bytes to send and the rules that matched.
fn filter_whole(
    cp: &ControlPlane,
    token: &str,
    model: &str,
    node: &str,
    bytes: Bytes,
) -> (Bytes, Vec<String>) {
    // Most answers hold nothing a rule matches: a scan of the raw text settles it without
    // parsing the document.
    if !cp.ai.filters.active() {
        return (bytes, Vec::new());
    }
    if std::str::from_utf8(&bytes).is_ok_and(|t| cp.ai.filters.apply_hits(&unescaped(t)).is_empty())
    {
        return (bytes, Vec::new());
    }
    let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
        return (bytes, Vec::new());
    };
    let hits = filters::filter_body(&cp.ai.filters, &mut v);
    if hits.is_empty() {
        return (bytes, Vec::new());
    }
    audit_hits(cp, token, model, node, &hits);
    if filters::blocked(&hits) {
        if let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) {
            for ch in choices {
                for ptr in ["/message/content", "/text"] {
                    if let Some(t) = ch.pointer_mut(ptr) {
                        *t = Value::String(String::new());
                    }
                }
                ch["finish_reason"] = Value::String("content_filter".into());
            }
        }
    }
    let mut rules: Vec<String> = hits.iter().map(|h| h.rule.to_owned()).collect();
    rules.dedup();
    (
        Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
        rules,
    )
}

/// A whole (non-streamed) answer.
async fn collect(
    s: Started,
    finish: &mut Finish,
    total: Duration,
) -> Result<Bytes, std::io::Error> {
    let mut s = s;
    let deadline = tokio::time::Instant::now() + total;
    let mut body = std::mem::take(&mut s.first);
    let mut done = s.done;
    while !done {
        match tokio::time::timeout_at(
            deadline,
            s.frames.read_message::<InferEvent, _>(&mut s.recv),
        )
        .await
        {
            Ok(Ok(InferEvent::Chunk(b))) => body.extend_from_slice(&b),
            Ok(Ok(InferEvent::End)) => done = true,
            Ok(Ok(InferEvent::Error { message, timeout })) => {
                finish.outcome.get_or_insert(if timeout {
                    Outcome::Timeout
                } else {
                    Outcome::Failure
                });
                return Err(std::io::Error::other(message));
            }
            Ok(Ok(InferEvent::Head { .. })) | Ok(Err(_)) => {
                finish.outcome.get_or_insert(Outcome::Failure);
                return Err(std::io::Error::other("the inference stream broke"));
            }
            Err(_) => {
                finish.outcome.get_or_insert(Outcome::Timeout);
                let _ = s.recv.stop(0u32.into());
                return Err(std::io::Error::other("the answer took too long"));
            }
        }
    }
    finish.usage = usage_in_body(&body);
    finish.outcome.get_or_insert(Outcome::Success);
    Ok(Bytes::from(body))
}

/// An SSE error event, as OpenAI-compatible clients read one mid-stream.
fn sse_error(message: &str) -> Bytes {
    let v = json!({"error": {"message": message, "type": "upstream_error", "code": "stream_interrupted"}});
    Bytes::from(format!("data: {v}\n\n"))
}

/// Relay a streamed answer chunk by chunk, as it arrives, through the output filters.
fn relay(
    s: Started,
    finish: Finish,
    total: Duration,
    filter: filters::SseFilter,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    struct St {
        s: Started,
        finish: Finish,
        deadline: tokio::time::Instant,
        first: Option<Vec<u8>>,
        over: bool,
        filter: filters::SseFilter,
    }
    impl St {
        /// Pass bytes through the filter; note usage.
        fn pass(&mut self, bytes: &[u8]) -> Bytes {
            let cp = self.finish.cp.clone();
            let out = Bytes::from(self.filter.push(&cp.ai.filters, bytes));
            self.finish.usage = self.filter.usage;
            out
        }

        /// The end: what the filter still holds, and its hits audited.
        fn close(&mut self) -> Vec<u8> {
            let cp = self.finish.cp.clone();
            let out = self.filter.finish(&cp.ai.filters);
            self.finish.usage = self.filter.usage;
            audit_hits(
                &cp,
                &self.finish.token,
                &self.finish.model,
                &self.finish.node,
                &self.filter.hits(),
            );
            out
        }
    }
    let mut s = s;
    let st = St {
        first: Some(std::mem::take(&mut s.first)),
        deadline: tokio::time::Instant::now() + total,
        over: false,
        filter,
        s,
        finish,
    };
    futures::stream::unfold(st, |mut st| async move {
        if st.over {
            return None;
        }
        if let Some(first) = st.first.take() {
            let mut out = st.pass(&first).to_vec();
            if st.s.done {
                st.over = true;
                st.finish.outcome.get_or_insert(Outcome::Success);
                out.extend(st.close());
            }
            return Some((Ok(Bytes::from(out)), st));
        }
        let read = tokio::time::timeout_at(
            st.deadline,
            st.s.frames.read_message::<InferEvent, _>(&mut st.s.recv),
        )
        .await;
        let item = match read {
            Ok(Ok(InferEvent::Chunk(b))) => st.pass(&b),
            Ok(Ok(InferEvent::End)) => {
                st.over = true;
                st.finish.outcome.get_or_insert(Outcome::Success);
                Bytes::from(st.close())
            }
            Ok(Ok(InferEvent::Error { message, timeout })) => {
                st.over = true;
                st.finish.outcome.get_or_insert(if timeout {
                    Outcome::Timeout
                } else {
                    Outcome::Failure
                });
                warn!(node = %st.finish.node, "stream interrupted: {message}");
                let mut out = st.close();
                out.extend_from_slice(&sse_error(&format!(
                    "{} failed mid-stream: {message}",
                    st.finish.node
                )));
                Bytes::from(out)
            }
            Ok(Ok(InferEvent::Head { .. })) | Ok(Err(_)) => {
                st.over = true;
                st.finish.outcome.get_or_insert(Outcome::Failure);
                let mut out = st.close();
                out.extend_from_slice(&sse_error(&format!(
                    "the connection to {} broke mid-stream",
                    st.finish.node
                )));
                Bytes::from(out)
            }
            Err(_) => {
                st.over = true;
                st.finish.outcome.get_or_insert(Outcome::Timeout);
                let _ = st.s.recv.stop(0u32.into());
                let mut out = st.close();
                out.extend_from_slice(&sse_error(
                    "the answer took longer than the gateway's total timeout",
                ));
                Bytes::from(out)
            }
        };
        Some((Ok(item), st))
    })
}

/// A call to the fallback provider: its value, or the answer to give (502 when it failed, 504
/// when it was `late`).
fn fallback_answer<T, E: std::fmt::Display>(
    name: &str,
    r: Result<Result<T, E>, tokio::time::error::Elapsed>,
    late: &str,
) -> Result<T, Box<Response>> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Box::new(error(
            StatusCode::BAD_GATEWAY,
            "api_error",
            "fallback_failed",
            format!("{name}: {e}"),
        ))),
        Err(_) => Err(Box::new(error(
            StatusCode::GATEWAY_TIMEOUT,
            "api_error",
            "fallback_timeout",
            format!("{name} {late}"),
        ))),
    }
}

/// Send the request to the configured cloud provider (nothing has reached the client yet).
#[allow(clippy::too_many_arguments)]
async fn fallback(
    cp: Arc<ControlPlane>,
    fb: super::FallbackConfig,
    path: &str,
    body: Bytes,
    model: String,
    (stream, strip_usage): (bool, bool),
    admitted: Admitted,
    cfg: AiConfig,
) -> Response {
    let key = match &fb.api_key_file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(k) => Some(k.trim().to_owned()),
            Err(e) => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    "fallback_unavailable",
                    format!("reading {}: {e}", f.display()),
                )
            }
        },
        None => None,
    };
    let url = format!("{}{path}", fb.url.trim_end_matches('/'));
    let mut req = cp
        .http_client
        .post(&url)
        .header(header::CONTENT_TYPE, "application/json")
        .timeout(cfg.total_timeout)
        .body(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let started = Instant::now();
    let resp = match fallback_answer(
        &fb.name,
        tokio::time::timeout(cfg.first_token_timeout, req.send()).await,
        "did not answer in time",
    ) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    debug!(provider = %fb.name, %model, ms = started.elapsed().as_millis() as u64, "fallback answered");
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/json"));
    let node = format!("fallback:{}", fb.name);
    if !stream || !status.is_success() {
        // A whole answer: read it, filter it, send it.
        let bytes = match fallback_answer(
            &fb.name,
            tokio::time::timeout(cfg.total_timeout, resp.bytes()).await,
            "took too long",
        ) {
            Ok(b) => b,
            Err(r) => return *r,
        };
        let (bytes, filtered) = if status.is_success() {
            if let Some((p, c)) = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .as_ref()
                .and_then(filters::usage_of)
            {
                cp.ai.add_usage(&admitted.token, &model, &node, p, c);
            }
            filter_whole(&cp, &admitted.token, &model, &node, bytes)
        } else {
            (bytes, Vec::new())
        };
        let mut r = fallback_response(Body::from(bytes), status, content_type, &node);
        if let Ok(v) = HeaderValue::from_str(&filtered.join(",")) {
            if !filtered.is_empty() {
                r.headers_mut().insert("x-nebula-filtered", v);
            }
        }
        return r;
    }
    struct Fb {
        resp: Option<reqwest::Response>,
        admitted: Admitted,
        model: String,
        node: String,
        filter: filters::SseFilter,
    }
    impl Fb {
        fn close(&mut self) -> Vec<u8> {
            let cp = self.admitted.cp.clone();
            let out = self.filter.finish(&cp.ai.filters);
            audit_hits(
                &cp,
                &self.admitted.token,
                &self.model,
                &self.node,
                &self.filter.hits(),
            );
            out
        }
    }
    let st = Fb {
        resp: Some(resp),
        admitted,
        model,
        node: node.clone(),
        filter: filters::SseFilter::new(strip_usage),
    };
    let chunks = futures::stream::unfold(st, |mut st| async move {
        let resp = st.resp.as_mut()?;
        match resp.chunk().await {
            Ok(Some(b)) => {
                let cp = st.admitted.cp.clone();
                let out = st.filter.push(&cp.ai.filters, &b);
                Some((Ok::<Bytes, std::io::Error>(Bytes::from(out)), st))
            }
            Ok(None) => {
                st.resp = None;
                let out = st.close();
                let (p, c) = st.filter.usage.unwrap_or((0, 0));
                let cp = st.admitted.cp.clone();
                cp.ai
                    .add_usage(&st.admitted.token, &st.model, &st.node, p, c);
                Some((Ok(Bytes::from(out)), st))
            }
            Err(e) => {
                st.resp = None;
                let mut out = st.close();
                out.extend_from_slice(&sse_error(&format!(
                    "the fallback provider failed mid-stream: {e}"
                )));
                Some((Ok(Bytes::from(out)), st))
            }
        }
    });
    fallback_response(Body::from_stream(chunks), status, content_type, &node)
}

/// An answer from the fallback provider, with the gateway's headers.
fn fallback_response(
    body: Body,
    status: StatusCode,
    content_type: HeaderValue,
    node: &str,
) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type);
    h.insert(GATEWAY_HEADER, HeaderValue::from_static("1"));
    if let Ok(v) = HeaderValue::from_str(node) {
        h.insert(NODE_HEADER, v);
    }
    r
}

/// `POST /v1/images/generations` (OpenAI's shape: `prompt`, `n`, `size`, optional `model` naming
/// a checkpoint), served by Stable Diffusion WebUI's txt2img on a node that has it; the images
/// come back as `b64_json`.
pub async fn images(State(cp): State<Arc<ControlPlane>>, req: Request) -> Response {
    let who = match authenticate(&cp, req.headers()).await {
        Ok(c) => c.name,
        Err(r) => return r,
    };
    let (body, _budget) = match read_body(&cp, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            "the body is not JSON",
        );
    };
    let Some(prompt) = v.get("prompt").and_then(Value::as_str) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "missing_prompt",
            "`prompt` is required",
        );
    };
    let n = v.get("n").and_then(Value::as_u64).unwrap_or(1).clamp(1, 8);
    let (w, h) = match v
        .get("size")
        .and_then(Value::as_str)
        .unwrap_or("512x512")
        .split_once('x')
    {
        Some((w, h)) => match (w.parse::<u32>(), h.parse::<u32>()) {
            (Ok(w), Ok(h)) if (64..=2048).contains(&w) && (64..=2048).contains(&h) => (w, h),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "invalid_size",
                    "`size` is WIDTHxHEIGHT, 64 to 2048",
                )
            }
        },
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_size",
                "`size` is WIDTHxHEIGHT",
            )
        }
    };
    let model = v.get("model").and_then(Value::as_str).map(str::to_owned);
    let mut sd = json!({"prompt": prompt, "batch_size": n, "width": w, "height": h,
        "steps": v.get("steps").and_then(Value::as_u64).unwrap_or(20)});
    if let Some(m) = &model {
        sd["override_settings"] = json!({"sd_model_checkpoint": m});
    }
    let body = serde_json::to_vec(&sd).unwrap_or_default();
    sd_serve(cp, who, model, body, "/sdapi/v1/txt2img", true).await
}

/// `POST /sdapi/v1/txt2img` and `/sdapi/v1/img2img`: Stable Diffusion WebUI's own API, passed
/// through to a node that has it (routed by `override_settings.sd_model_checkpoint` if set).
pub async fn sd_passthrough(
    State(cp): State<Arc<ControlPlane>>,
    axum::extract::Path(op): axum::extract::Path<String>,
    req: Request,
) -> Response {
    let who = match authenticate(&cp, req.headers()).await {
        Ok(c) => c.name,
        Err(r) => return r,
    };
    let (body, _budget) = match read_body(&cp, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let path = match op.as_str() {
        "txt2img" => "/sdapi/v1/txt2img",
        "img2img" => "/sdapi/v1/img2img",
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "only txt2img and img2img pass through",
            )
        }
    };
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            "the body is not JSON",
        );
    };
    let model = v
        .pointer("/override_settings/sd_model_checkpoint")
        .and_then(Value::as_str)
        .map(str::to_owned);
    sd_serve(cp, who, model, body.to_vec(), path, false).await
}

async fn sd_serve(
    cp: Arc<ControlPlane>,
    who: String,
    model: Option<String>,
    body: Vec<u8>,
    path: &'static str,
    openai_shape: bool,
) -> Response {
    let cfg = cp.config.ai.clone();
    if let Err(wait) = cp.ai.admit(&who, &cfg) {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limited",
            format!(
                "this token is over its limit; retry in {} s",
                wait.as_secs().max(1)
            ),
        );
    }
    let admitted = Admitted {
        cp: cp.clone(),
        token: who,
    };
    let mut tried = Vec::new();
    let mut last_error = None;
    for _ in 0..cfg.max_attempts.max(1) {
        let candidates = cp.ai.image_candidates(
            model.as_deref(),
            |id| cp.registry.is_online(id),
            |id| cp.telemetry.free_vram(id),
        );
        let Some(c) = candidates.into_iter().find(|c| !tried.contains(&c.node_id)) else {
            break;
        };
        tried.push(c.node_id);
        let Some(started) = try_node(&cp, &c, path, &body, false, &cfg).await else {
            continue;
        };
        let started = match started {
            Ok(s) => s,
            Err(f) => {
                cp.ai.end(c.node_id, &c.model, f.outcome, &cfg);
                last_error = Some(format!("{}: {}", c.node, f.message));
                continue;
            }
        };
        let status = started.status;
        let mut finish = Finish {
            cp: cp.clone(),
            cfg: cfg.clone(),
            node_id: c.node_id,
            node: c.node.clone(),
            model: c.model.clone(),
            token: admitted.token.clone(),
            outcome: None,
            usage: None,
            _admitted: admitted,
        };
        let bytes = match collect(started, &mut finish, cfg.total_timeout).await {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    "upstream_failed",
                    format!("{} failed: {e}", c.node),
                )
            }
        };
        let out = if openai_shape && (200..300).contains(&status) {
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let data: Vec<Value> = v["images"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|b| json!({"b64_json": b}))
                .collect();
            let created = nebula_protocol::time::UnixMillis::now().as_secs();
            Bytes::from(
                serde_json::to_vec(&json!({"created": created, "data": data})).unwrap_or_default(),
            )
        } else {
            bytes
        };
        let mut r = Response::new(Body::from(out));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(GATEWAY_HEADER, HeaderValue::from_static("1"));
        if let Ok(v) = HeaderValue::from_str(&c.node) {
            h.insert(NODE_HEADER, v);
        }
        return r;
    }
    match last_error {
        None => error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            match &model {
                Some(m) => format!("no online node has Stable Diffusion checkpoint `{m}`"),
                None => "no online node runs Stable Diffusion WebUI".into(),
            },
        ),
        Some(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "no_node_available",
            e,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_scan_sees_escapes_decoded() {
        assert_eq!(
            unescaped(r#"{"c":"a\n4111 1111\u0040x \"q\" \u003cscript \ud83d\ude00 \ud800!"}"#),
            "{\"c\":\"a\n4111 1111@x \"q\" <script \u{1F600}  !\"}"
        );
        assert!(matches!(unescaped("plain"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn a_stream_always_asks_for_usage() {
        let asked = |body: &str, has: bool| -> Value {
            let b = ask_for_usage(body.as_bytes(), has);
            let v: Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(v["stream_options"]["include_usage"], true, "{v}");
            v
        };
        let v = asked(r#"{"model":"m","stream":true}"#, false);
        assert_eq!(v["model"], "m");
        asked(r#"{"model":"m","stream_options":null}"#, true);
        asked(r#"{"model":"m","stream_options":"yes"}"#, true);
        let v = asked(
            r#"{"model":"m","stream_options":{"include_usage":false,"other":1}}"#,
            true,
        );
        assert_eq!(v["stream_options"]["other"], 1);
        // Only one `stream_options`: a parser that keeps the last one sees the same.
        let b = ask_for_usage(br#"{"model":"m","stream_options":null}"#, true);
        assert_eq!(
            String::from_utf8_lossy(&b)
                .matches("stream_options")
                .count(),
            1
        );
    }

    #[test]
    fn usage_is_read_from_whole_bodies() {
        assert_eq!(
            usage_in_body(br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5}}"#),
            Some((12, 5))
        );
        assert_eq!(usage_in_body(br#"{"choices":[]}"#), None);
    }
}
