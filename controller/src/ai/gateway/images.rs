//! Images: OpenAI's `POST /v1/images/generations` and Stable Diffusion WebUI's own API passed
//! through, served by a node with a healthy WebUI through the same retry loop as chat.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::attempt::first_answer;
use super::relay::{collect, Finish};
use super::{admit, caller_and_body, error, GATEWAY_HEADER, NODE_HEADER};
use crate::ControlPlane;

/// `POST /v1/images/generations` (OpenAI's shape: `prompt`, `n`, `size`, optional `model` naming
/// a checkpoint), served by Stable Diffusion WebUI's txt2img on a node that has it; the images
/// come back as `b64_json`.
pub async fn images(State(cp): State<Arc<ControlPlane>>, req: Request) -> Response {
    let (who, body, _budget) = match caller_and_body(&cp, req).await {
        Ok((caller, body, budget)) => (caller.name, body, budget),
        Err(r) => return r,
    };
    generate(cp, who, body).await
}

/// [`images`] for a caller already authenticated (accounted under `who`): the Discord bot's
/// `/imagine`.
pub async fn generate(cp: Arc<ControlPlane>, who: String, body: Bytes) -> Response {
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
    let (who, body, _budget) = match caller_and_body(&cp, req).await {
        Ok((caller, body, budget)) => (caller.name, body, budget),
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
    let admitted = match admit(&cp, &who, &cfg) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let candidates = || {
        cp.ai.image_candidates(
            model.as_deref(),
            |id| cp.registry.is_online(id),
            |id| cp.telemetry.free_vram(id),
        )
    };
    let tries = first_answer(&cp, &cfg, candidates(), candidates, path, &body, false);
    let (c, started) = match tries.await {
        Ok(answer) => answer,
        Err(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                match &model {
                    Some(m) => format!("no online node has Stable Diffusion checkpoint `{m}`"),
                    None => "no online node runs Stable Diffusion WebUI".into(),
                },
            )
        }
        Err(Some(e)) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "no_node_available",
                e,
            )
        }
    };
    let status = started.status;
    let mut finish = Finish::new(&cp, &cfg, &c, admitted);
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
        openai_images(&bytes)
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
    r
}

/// Stable Diffusion WebUI's `{"images": [base64…]}` in OpenAI's shape.
fn openai_images(bytes: &[u8]) -> Bytes {
    let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    let data: Vec<Value> = v["images"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|b| json!({"b64_json": b}))
        .collect();
    let created = nebula_protocol::time::UnixMillis::now().as_secs();
    Bytes::from(serde_json::to_vec(&json!({"created": created, "data": data})).unwrap_or_default())
}
