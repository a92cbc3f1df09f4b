//! What routing reads from a request: the model, whether it streams, and whether usage must
//! be asked for. Only those fields are read (borrowed); the body goes on as it came, or with
//! `stream_options` added.

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use super::error;

/// A request ready for routing.
pub(super) struct Routing {
    pub model: String,
    pub stream: bool,
    /// The client asked for a stream without its usage: the gateway asks (for accounting) and
    /// leaves the usage chunk out.
    pub strip_usage: bool,
    pub embeddings: bool,
    /// The body to send on.
    pub body: Bytes,
}

impl Routing {
    /// Read a request's routing fields, or the 400 to answer (boxed: it is large).
    pub fn read(body: Bytes, path: &str) -> Result<Self, Box<Response>> {
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
        let bad = |code: &str, message: String| {
            Box::new(error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                code,
                message,
            ))
        };
        let head: Head<'_> = match serde_json::from_slice(&body) {
            Ok(h) => h,
            Err(e) if e.is_data() && !body.trim_ascii_start().starts_with(b"{") => {
                return Err(bad("invalid_body", "the body must be a JSON object".into()))
            }
            Err(e) => return Err(bad("invalid_json", format!("the body is not valid: {e}"))),
        };
        let Some(model) = head.model.map(|m| m.into_owned()) else {
            return Err(bad("missing_model", "`model` is required".into()));
        };
        let embeddings = path == "/v1/embeddings";
        let stream = !embeddings && head.stream.unwrap_or(false);
        // A stream reports usage in its last chunk only when asked: the gateway always asks
        // (for accounting), and leaves that chunk out for a client that did not.
        let asked_usage = head
            .stream_options
            .as_ref()
            .is_some_and(|o| o.get("include_usage") == Some(&Value::Bool(true)));
        let strip_usage = stream && !asked_usage;
        let has_options = head.stream_options.is_some();
        // The body goes on as it came (no copy) unless usage must be asked for.
        let body = if strip_usage {
            Bytes::from(ask_for_usage(&body, has_options))
        } else {
            body
        };
        Ok(Routing {
            model,
            stream,
            strip_usage,
            embeddings,
            body,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
