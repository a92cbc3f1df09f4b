//! The cloud fallback: a configured OpenAI-compatible provider that answers when no node can
//! (nothing has reached the client yet), through the same output filters and accounting.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use nebula_protocol::ai::same_model;
use serde_json::Value;
use tracing::debug;

use super::super::{filters, AiConfig, FallbackConfig};
use super::relay::{audit_hits, filter_whole, sse_error};
use super::{error, Admitted, GATEWAY_HEADER, NODE_HEADER};
use crate::ControlPlane;

/// Does the fallback provider name `model` among its own? Such a model (a cloud one) is never
/// pulled onto a node.
pub(super) fn lists(cfg: &AiConfig, model: &str) -> bool {
    cfg.fallback
        .as_ref()
        .is_some_and(|fb| fb.models.iter().any(|m| same_model(m, model)))
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
pub(super) async fn fallback(
    cp: Arc<ControlPlane>,
    fb: FallbackConfig,
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
