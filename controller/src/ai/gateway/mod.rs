//! The OpenAI-compatible gateway: `POST /v1/chat/completions` (SSE streaming too; its route is
//! `agents::chat_completions`, which answers `model: agent/NAME` itself), `POST
//! /v1/completions`, `POST /v1/embeddings`, `GET /v1/models`, behind API tokens.
//!
//! One retry loop, here: each try picks the best candidate not tried yet, opens an inference
//! stream to its agent and waits for the first bytes (longer when the model must be loaded).
//! Overloads, timeouts and failures feed the node's breaker for that model and move on to the
//! next candidate; a "model not found" drops the model from that node's inventory instead. Only
//! before the first byte has gone to the client: after it, a failure ends the stream with an
//! in-band error event. When no node can serve, a configured cloud provider can. Every response
//! names the node that served it (`x-nebula-node`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use nebula_protocol::ai::same_model;
use nebula_protocol::{self as proto};
use serde_json::{json, Value};

use super::pulls::Scope;
use super::{estimate_tokens, AiConfig};
use crate::ControlPlane;

mod attempt;
mod fallback;
mod images;
pub use images::generate as generate_images;
mod pull;
mod relay;
mod request;

pub use images::{images, sd_passthrough};

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

pub(crate) fn error(
    status: StatusCode,
    kind: &str,
    code: &str,
    message: impl Into<String>,
) -> Response {
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
#[derive(Debug, Clone)]
pub struct Caller {
    /// Accounted, limited and audited under this name: an API token's name, or `user:NAME`
    /// for a dashboard user (token names hold no `:`).
    pub name: String,
    /// What the gateway may start for it (pulls on demand).
    pub scope: Scope,
    /// Who an agent's tool calls act as (`None`: an `ai` token's requests call no tools).
    pub principal: Option<crate::authz::OpCtx>,
    /// Only this node may answer (an agent's node affinity): no pull, no cloud fallback.
    pub only_node: Option<String>,
}

impl Caller {
    /// A caller of the control plane's own API (a token or a dashboard user): accounted under
    /// its name, its role what an agent's tools may do.
    pub fn of(cx: &crate::authz::OpCtx) -> Caller {
        Caller {
            name: cx.actor.clone(),
            scope: if cx.role >= crate::authz::Role::Operator {
                Scope::Operator
            } else {
                Scope::ReadOnly
            },
            principal: Some(cx.clone()),
            only_node: None,
        }
    }

    /// A Discord user's caller (the bot's `/ask` and `/imagine`): accounted as
    /// `discord:ACTOR`; only operators may start model pulls.
    pub fn for_discord(cx: &crate::authz::OpCtx) -> Caller {
        Caller {
            name: format!("discord:{}", cx.actor),
            ..Caller::of(cx)
        }
    }
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
        // A bot in its own process asks for the Discord user each request names.
        Ok(Some(rec)) if rec.role == crate::authz::BOT_ROLE => {
            let forbidden =
                |why: String| error(StatusCode::FORBIDDEN, "permission_error", "forbidden", why);
            let who =
                crate::discord::user_from_headers(headers).map_err(|w| forbidden(w.to_owned()))?;
            let cx = cp
                .discord_principal(&who)
                .await
                .map_err(|e| forbidden(e.to_string()))?;
            cp.authorize(&cx, crate::authz::Op::Chat)
                .map_err(|e| forbidden(e.to_string()))?;
            Ok(Caller::for_discord(&cx))
        }
        Ok(Some(rec)) => Ok(Caller {
            scope: Scope::of_role(&rec.role),
            principal: (rec.role != crate::authz::AI_ROLE).then(|| {
                crate::authz::OpCtx::new(
                    rec.name.clone(),
                    crate::authz::Role::parse(&rec.role),
                    crate::authz::Via::Api,
                )
            }),
            name: rec.name,
            only_node: None,
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

/// A request's caller and then its body, with the body's share of the budget (hold it while the
/// body is in use), or the answer to give.
pub(crate) async fn caller_and_body(
    cp: &ControlPlane,
    req: Request,
) -> Result<(Caller, Bytes, tokio::sync::OwnedSemaphorePermit), Response> {
    let caller = authenticate(cp, req.headers()).await?;
    let (body, budget) = read_body(cp, req).await?;
    Ok((caller, body, budget))
}

async fn serve(cp: Arc<ControlPlane>, req: Request, path: &'static str) -> Response {
    let (caller, body, _budget) = match caller_and_body(&cp, req).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    serve_for(cp, caller, body, path).await
}

/// Take a slot of the token's rate and concurrency limits (given back when the answer is
/// over), or the 429 to answer, with `Retry-After` (boxed: it is large).
fn admit(cp: &Arc<ControlPlane>, token: &str, cfg: &AiConfig) -> Result<Admitted, Box<Response>> {
    if let Err(wait) = cp.ai.admit(token, cfg) {
        let secs = wait.as_secs().max(1);
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limited",
            format!("this token is over its limit; retry in {secs} s"),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return Err(Box::new(r));
    }
    Ok(Admitted {
        cp: cp.clone(),
        token: token.to_owned(),
    })
}

/// The gateway for a caller already authenticated (accounted and audited by its name).
///
/// Tiers, in order: the nodes that have the model ([`attempt::first_answer`], the one retry
/// loop); when no node has it at all, a pull onto a node that can serve it, waited for
/// ([`pull::pull_tier`]); then the cloud fallback when configured ([`fallback::fallback`]);
/// else an error that says which tier failed and why.
pub async fn serve_for(
    cp: Arc<ControlPlane>,
    caller: Caller,
    body: Bytes,
    path: &'static str,
) -> Response {
    let cfg = cp.config.ai.clone();
    let admitted = match admit(&cp, &caller.name, &cfg) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    if body.len() > MAX_BODY {
        return too_large_body();
    }
    let req = match request::Routing::read(body, path) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let model = req.model.as_str();
    let prompt_tokens = estimate_tokens(&req.body);
    let online = |id| cp.registry.is_online(id);
    let routable = || {
        let mut c = cp.ai.candidates(
            model,
            prompt_tokens,
            online,
            |id| cp.telemetry.free_vram(id),
            req.embeddings,
        );
        if let Some(n) = &caller.only_node {
            c.retain(|c| &c.node == n);
        }
        c
    };
    let mut first = routable();
    // Why pulling the model failed, or was not allowed, when no node had it.
    let mut pull_error: Option<String> = None;
    if !req.embeddings
        && caller.only_node.is_none()
        && first.is_empty()
        && !fallback::lists(&cfg, model)
        && !cp.ai.has_model(model, online)
    {
        match pull::pull_tier(&cp, &cfg, &caller, model).await {
            Ok(why) => pull_error = why,
            Err(r) => return r,
        }
        first = routable();
    }
    let shape = (req.stream, req.strip_usage);
    let tries = attempt::first_answer(&cp, &cfg, first, routable, path, &req.body, req.stream);
    let last_error = match tries.await {
        Ok((c, started)) => return relay::respond(cp, c, started, shape, admitted, cfg).await,
        Err(last_error) => last_error,
    };
    if let Some(fb) = cfg.fallback.clone().filter(|_| caller.only_node.is_none()) {
        if fb.models.is_empty() || fb.models.iter().any(|m| same_model(m, model)) {
            let model = req.model.clone();
            return fallback::fallback(cp, fb, path, req.body, model, shape, admitted, cfg).await;
        }
    }
    no_answer(&cp, &cfg, model, last_error, pull_error)
}

/// Why no tier answered: the nodes that have the model cannot take it now (503), no node has
/// it (404, with why a pull did not help), or every node that has it failed (503).
fn no_answer(
    cp: &ControlPlane,
    cfg: &AiConfig,
    model: &str,
    last_error: Option<String>,
    pull_error: Option<String>,
) -> Response {
    match last_error {
        // Nodes have it, but none may take it now: not a missing model, and worth a retry.
        None if cp.ai.has_model(model, |id| cp.registry.is_online(id)) => error(
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
                .or_else(|| cp.ai.recent_pull_failure(model, cfg.failed_pull_cooldown))
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
