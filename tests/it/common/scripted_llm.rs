//! A scripted stand-in for an OpenAI-compatible model server, for the agents' tool loop: a
//! small real model cannot be relied on to call a given tool with given arguments, so the test
//! says what the "model" does in its question. It speaks OpenAI's wire format (`/v1/models`,
//! `/v1/chat/completions` with `tools` and `tool_calls`).
//!
//! - A last user message `CALL TOOL {JSON}` is answered with one tool call of `TOOL` with those
//!   arguments.
//! - A last message from a tool is answered with `RESULT: ` and the tool's content.
//! - Anything else is echoed back (`ECHO: ` and the message).
//!
//! Every request body is kept, so a test can see which tools were offered.

use std::sync::{Arc, Mutex};

use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

#[derive(Clone)]
pub struct ScriptedLlm {
    pub url: String,
    pub requests: Arc<Mutex<Vec<Value>>>,
}

impl ScriptedLlm {
    /// Serving one model named `model` on 127.0.0.1.
    pub async fn start(model: &'static str) -> Self {
        let requests: Arc<Mutex<Vec<Value>>> = Arc::default();
        let seen = requests.clone();
        let app = Router::new()
            .route(
                "/v1/models",
                get(move || async move {
                    Json(json!({"object": "list", "data": [{"id": model, "object": "model"}]}))
                }),
            )
            .route(
                "/v1/chat/completions",
                post(move |Json(body): Json<Value>| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().push(body.clone());
                        Json(answer(model, &body))
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        ScriptedLlm {
            url: format!("http://{addr}"),
            requests,
        }
    }

    /// The names of the tools offered in each request so far.
    pub fn offered(&self) -> Vec<Vec<String>> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| {
                r["tools"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t["function"]["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .collect()
    }
}

fn answer(model: &str, body: &Value) -> Value {
    let last = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .cloned()
        .unwrap_or(Value::Null);
    let content = last["content"].as_str().unwrap_or_default();
    let message = match last["role"].as_str() {
        Some("tool") => json!({"role": "assistant", "content": format!("RESULT: {content}")}),
        Some("user") if content.starts_with("CALL ") => {
            let rest = &content["CALL ".len()..];
            let (name, args) = rest.split_once(' ').unwrap_or((rest, "{}"));
            json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": name, "arguments": args}}]})
        }
        _ => json!({"role": "assistant", "content": format!("ECHO: {content}")}),
    };
    let finish = if message.get("tool_calls").is_some() {
        "tool_calls"
    } else {
        "stop"
    };
    json!({
        "id": "chatcmpl-scripted", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    })
}
