//! Replicas that do not lead pass HTTP requests (API, dashboard, the AI gateway, event
//! streams) on to the leader, so every replica's address serves the whole product; the leader
//! holds the agents' sessions and the job engine. A few answers stay local: `/healthz`,
//! `/metrics`, `GET /api/v1/replicas` and `GET /api/v1/tasks` (each replica's own view). While no leader is known
//! (an election under way, a few seconds) the answer is `503` with `Retry-After`; when the
//! leader stops answering after a request was sent, `502`: it may have been carried out.

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderName, HeaderValue};
use futures::TryStreamExt;

use super::prelude::*;

/// Requests already passed on once carry this; a replica never passes one on twice (no loops
/// while replicas disagree about the leader for a moment).
pub const FORWARDED: &str = "x-nebula-forwarded-by";

/// `/ui/events` (the overview's live stream) is served by every replica from its own event bus
/// (the other replicas' events arrive as notifications); it asks the leader, with the viewer's
/// own session, for the fragments that changed ([`get_from_leader`]).
const LOCAL: &[&str] = &[
    "/healthz",
    "/metrics",
    "/api/v1/replicas",
    "/api/v1/tasks",
    "/ui/events",
];

/// Headers that belong to one connection, not to the request.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
    )
}

fn unavailable(message: String) -> Response {
    let mut r = ApiError::unavailable(message).into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    r
}

/// A `GET` of `path_and_query` on the leading replica, with `headers` (a viewer's session
/// cookie): the body of a success, or why there is none (no leader known, not answered, not
/// a success). The request is marked as passed on, so a replica that no longer leads answers
/// `503` instead of passing it further.
pub async fn get_from_leader(
    cp: &ControlPlane,
    path_and_query: &str,
    headers: &[(&str, &str)],
    timeout: std::time::Duration,
) -> Result<String, String> {
    let base = cp.ha.leader_http().ok_or("no replica leads")?;
    let url = format!("{}{path_and_query}", base.trim_end_matches('/'));
    let mut req = cp
        .replica_client()
        .get(&url)
        .timeout(timeout)
        .header(FORWARDED, cp.ha.replica.as_str());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: {}", resp.status()));
    }
    resp.text().await.map_err(|e| format!("{url}: {e}"))
}

pub async fn to_leader(State(cp): State<Arc<ControlPlane>>, req: Request, next: Next) -> Response {
    if !cp.ha.replicated() || cp.ha.is_leader() || LOCAL.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    if req.headers().contains_key(FORWARDED) {
        return unavailable("the replicas are electing a leader; try again in a moment".into());
    }
    let Some(base) = cp.ha.leader_http() else {
        return unavailable(
            "no replica leads yet (an election is under way); try again in a moment".into(),
        );
    };
    if req.headers().contains_key(header::UPGRADE) {
        return unavailable(format!(
            "terminals open on the leading replica: {base}{}",
            req.uri().path()
        ));
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let url = format!(
        "{}{}",
        base.trim_end_matches('/'),
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    let (parts, body) = req.into_parts();
    let mut out = cp.replica_client().request(parts.method, &url);
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) && name.as_str() != "x-forwarded-for" {
            out = out.header(name, value);
        }
    }
    let mut forwarded_for: Vec<String> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    forwarded_for.extend(peer.map(|p| p.to_string()));
    if !forwarded_for.is_empty() {
        out = out.header("x-forwarded-for", forwarded_for.join(", "));
    }
    out = out.header(FORWARDED, cp.ha.replica.as_str());
    let has_body = parts.headers.contains_key(header::CONTENT_LENGTH)
        || parts.headers.contains_key(header::TRANSFER_ENCODING);
    if has_body {
        out = out.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    }
    match out.send().await {
        Ok(resp) => {
            let mut b = Response::builder().status(resp.status().as_u16());
            for (name, value) in resp.headers() {
                if !hop_by_hop(name) {
                    b = b.header(name, value);
                }
            }
            let stream = resp.bytes_stream().map_err(std::io::Error::other);
            b.body(Body::from_stream(stream))
                .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response())
        }
        // Not connected: the request never reached the leader, so trying again is safe.
        Err(e) if e.is_connect() => {
            tracing::warn!(%url, "passing a request on to the leader: {e}");
            unavailable(format!(
                "the leading replica did not answer ({e}); try again in a moment"
            ))
        }
        // Sent, but no answer: it may have been carried out.
        Err(e) => {
            tracing::warn!(%url, "the leader did not answer a request passed on: {e}");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "no_answer",
                format!(
                    "the leading replica stopped answering after the request was sent ({e}): \
                     it may have been carried out; look before trying again"
                ),
            )
            .into_response()
        }
    }
}
