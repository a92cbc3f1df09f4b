//! The answer to the client: relayed chunk by chunk as it arrives (a stream) or collected
//! (a whole answer), through the output filters, with usage accounted and the breaker told
//! how the try ended ([`Finish`]).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use nebula_protocol::ai::InferEvent;
use serde_json::{json, Value};
use tracing::warn;
use uuid::Uuid;

use super::super::{filters, AiConfig, Candidate, Outcome};
use super::attempt::Started;
use super::{error, Admitted, GATEWAY_HEADER, NODE_HEADER};
use crate::ControlPlane;

/// What a response still owes when it ends: the breaker's outcome, usage, the token's slot.
pub(super) struct Finish {
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

impl Finish {
    pub fn new(cp: &Arc<ControlPlane>, cfg: &AiConfig, c: &Candidate, admitted: Admitted) -> Self {
        Finish {
            cp: cp.clone(),
            cfg: cfg.clone(),
            node_id: c.node_id,
            node: c.node.clone(),
            model: c.model.clone(),
            token: admitted.token.clone(),
            outcome: None,
            usage: None,
            _admitted: admitted,
        }
    }
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
pub(super) async fn respond(
    cp: Arc<ControlPlane>,
    c: Candidate,
    started: Started,
    (stream, strip_usage): (bool, bool),
    admitted: Admitted,
    cfg: AiConfig,
) -> Response {
    let mut finish = Finish::new(&cp, &cfg, &c, admitted);
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
pub(super) fn audit_hits(
    cp: &ControlPlane,
    token: &str,
    model: &str,
    node: &str,
    hits: &[filters::Hit],
) {
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
pub(super) fn unescaped(json: &str) -> std::borrow::Cow<'_, str> {
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
pub(super) fn usage_in_body(body: &[u8]) -> Option<(u64, u64)> {
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
pub(super) fn filter_whole(
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
pub(super) async fn collect(
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
pub(super) fn sse_error(message: &str) -> Bytes {
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
    fn usage_is_read_from_whole_bodies() {
        assert_eq!(
            usage_in_body(br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5}}"#),
            Some((12, 5))
        );
        assert_eq!(usage_in_body(br#"{"choices":[]}"#), None);
    }
}
