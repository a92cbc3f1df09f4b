//! A stand-in for Ollama (no real Ollama can run here: its binary and model registry are out of
//! reach). It speaks Ollama's real wire format for what the agent reads (`/api/version`,
//! `/api/tags`, `/api/ps`) and the OpenAI-compatible routes Ollama serves under `/v1`, where it
//! echoes the last user message back as the answer, streamed in chunks of a few characters so
//! that a planted secret is split across chunks. Modes make it overloaded (503) or die in the
//! middle of a stream, as a killed backend would.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Healthy,
    /// Every inference request gets 503.
    Overloaded,
    /// Streams stop (the connection is cut) after this many chunks.
    DieAfter(usize),
    /// Nothing is sent for this long (a model loading), then the answer.
    Slow(Duration),
}

/// Counts a request whose handler was dropped before it answered: its client went away.
struct Abandoned(Option<Arc<Mutex<FakeState>>>);

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.lock().unwrap_or_else(|p| p.into_inner()).abandoned += 1;
        }
    }
}

#[derive(Debug)]
pub struct FakeState {
    /// (name, loaded)
    pub models: Vec<(String, bool)>,
    pub mode: Mode,
    /// Characters per streamed chunk.
    pub chunk_chars: usize,
    pub inference_requests: usize,
    /// Inference requests dropped before their answer started (the client closed the connection).
    pub abandoned: usize,
    /// A model file served at `/files/model.gguf` (Range requests honoured).
    pub file: Vec<u8>,
    /// The next full (not ranged) download of the file is cut after this many bytes.
    pub cut_next_download: Option<usize>,
    /// `Range` headers the file route saw.
    pub ranges: Vec<String>,
    /// Pause between the lines of a pull's progress stream.
    pub pull_step: Duration,
}

#[derive(Clone)]
pub struct FakeOllama {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<FakeState>>,
    _stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl FakeOllama {
    pub async fn start(models: &[(&str, bool)]) -> Self {
        let state = Arc::new(Mutex::new(FakeState {
            models: models.iter().map(|(n, l)| ((*n).to_owned(), *l)).collect(),
            mode: Mode::Healthy,
            chunk_chars: 4,
            inference_requests: 0,
            abandoned: 0,
            file: Vec::new(),
            cut_next_download: None,
            ranges: Vec::new(),
            pull_step: Duration::from_millis(40),
        }));
        let app = Router::new()
            .route(
                "/api/version",
                get(|| async { Json(json!({"version": "0.5.7"})) }),
            )
            .route("/api/tags", get(tags))
            .route("/api/ps", get(ps))
            // Long prompts and images are larger than axum's default body limit.
            .route(
                "/v1/chat/completions",
                post(chat).layer(axum::extract::DefaultBodyLimit::max(64 << 20)),
            )
            .route(
                "/v1/embeddings",
                post(embeddings).layer(axum::extract::DefaultBodyLimit::max(64 << 20)),
            )
            .route("/api/pull", post(pull))
            .route("/files/model.gguf", get(file))
            .route("/api/delete", axum::routing::delete(delete))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        FakeOllama {
            addr,
            state,
            _stop: Arc::new(tx),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().inference_requests
    }

    pub fn abandoned(&self) -> usize {
        self.state.lock().unwrap().abandoned
    }
}

type St = State<Arc<Mutex<FakeState>>>;

fn digest(name: &str) -> String {
    format!(
        "{:064x}",
        name.bytes().fold(0u128, |a, b| a * 31 + u128::from(b))
    )
}

async fn tags(State(s): St) -> Json<Value> {
    let models: Vec<Value> = s
        .lock()
        .unwrap()
        .models
        .iter()
        .map(|(n, _)| {
            json!({"name": n, "model": n, "modified_at": "2026-11-01T10:00:00Z", "size": 4_661_224_676u64,
                   "digest": digest(n), "details": {"format": "gguf", "family": "llama", "parameter_size": "8.0B", "quantization_level": "Q4_0"}})
        })
        .collect();
    Json(json!({ "models": models }))
}

async fn ps(State(s): St) -> Json<Value> {
    let models: Vec<Value> = s
        .lock()
        .unwrap()
        .models
        .iter()
        .filter(|(_, loaded)| *loaded)
        .map(|(n, _)| {
            json!({"name": n, "model": n, "size": 5_137_025_024u64, "digest": digest(n),
                   "expires_at": "2026-11-28T12:00:00Z", "size_vram": 5_137_025_024u64, "context_length": 8192})
        })
        .collect();
    Json(json!({ "models": models }))
}

fn last_user_message(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

async fn chat(State(s): St, Json(body): Json<Value>) -> Response {
    let (mode, chunk_chars) = {
        let mut st = s.lock().unwrap();
        st.inference_requests += 1;
        (st.mode, st.chunk_chars)
    };
    if let Mode::Slow(wait) = mode {
        let mut guard = Abandoned(Some(s.clone()));
        tokio::time::sleep(wait).await;
        guard.0 = None;
    }
    if mode == Mode::Overloaded {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "server busy, please try again. maximum pending requests exceeded"})),
        )
            .into_response();
    }
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let text = last_user_message(&body);
    let prompt_tokens = text.split_whitespace().count() as u64 + 5;
    let completion_tokens = text.chars().count().div_ceil(chunk_chars) as u64;
    if !body["stream"].as_bool().unwrap_or(false) {
        return Json(json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1_795_000_000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
        }))
        .into_response();
    }
    let chars: Vec<char> = text.chars().collect();
    let mut events: Vec<String> = vec![json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}).to_string()];
    for piece in chars.chunks(chunk_chars.max(1)) {
        let piece: String = piece.iter().collect();
        events.push(
            json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]})
            .to_string(),
        );
    }
    events.push(
        json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        .to_string(),
    );
    if body["stream_options"]["include_usage"].as_bool() == Some(true) {
        events.push(json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model, "choices": [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}}).to_string());
    }
    let die_after = match mode {
        Mode::DieAfter(n) => Some(n),
        _ => None,
    };
    let stream = futures::stream::unfold(
        (events.into_iter(), 0usize),
        move |(mut it, n)| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if die_after.is_some_and(|d| n >= d) {
                return Some((Err(std::io::Error::other("backend killed")), (it, n + 1)))
                    .filter(|_| n == die_after.unwrap_or(0));
            }
            match it.next() {
                Some(e) => Some((
                    Ok::<Bytes, std::io::Error>(Bytes::from(format!("data: {e}\n\n"))),
                    (it, n + 1),
                )),
                None if n != usize::MAX => Some((
                    Ok(Bytes::from_static(b"data: [DONE]\n\n")),
                    (it, usize::MAX),
                )),
                None => None,
            }
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn embeddings(State(s): St, Json(body): Json<Value>) -> Response {
    s.lock().unwrap().inference_requests += 1;
    let input = body["input"].as_str().unwrap_or_default();
    let v: Vec<f64> = (0..8)
        .map(|i| ((input.len() + i) % 7) as f64 / 7.0)
        .collect();
    Json(json!({"object": "list", "model": body["model"], "data": [{"object": "embedding", "index": 0, "embedding": v}],
                "usage": {"prompt_tokens": 3, "total_tokens": 3}}))
    .into_response()
}

/// Ollama's streamed pull: NDJSON status lines, two layers downloading in steps, then success
/// (the model is then on disk, not loaded). `fail-*` names fail as an unknown model does.
async fn pull(State(s): St, Json(body): Json<Value>) -> Response {
    let name = body["model"]
        .as_str()
        .or(body["name"].as_str())
        .unwrap_or_default()
        .to_owned();
    if name.starts_with("fail") {
        let lines = format!(
            "{}\n{}\n",
            json!({"status": "pulling manifest"}),
            json!({"error": "pull model manifest: file does not exist"})
        );
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .body(Body::from(lines))
            .unwrap();
    }
    let mut lines = vec![json!({"status": "pulling manifest"})];
    for (digest, total) in [
        ("sha256:6a0746a1ec1a", 4_661_211_808u64),
        ("sha256:4fa551d4f938", 12_403u64),
    ] {
        for step in 0..=10u64 {
            lines.push(json!({"status": format!("pulling {}", &digest[7..19]), "digest": digest, "total": total, "completed": total * step / 10}));
        }
    }
    lines.push(json!({"status": "verifying sha256 digest"}));
    lines.push(json!({"status": "writing manifest"}));
    lines.push(json!({"status": "success"}));
    let step = s.lock().unwrap().pull_step;
    let stream = futures::stream::unfold(
        (lines.into_iter(), s, name),
        move |(mut it, s, name)| async move {
            tokio::time::sleep(step).await;
            let line = it.next()?;
            if line["status"] == "success" {
                let mut st = s.lock().unwrap();
                if !st.models.iter().any(|(n, _)| *n == name) {
                    st.models.push((name.clone(), false));
                }
            }
            Some((
                Ok::<Bytes, std::io::Error>(Bytes::from(format!("{line}\n"))),
                (it, s, name),
            ))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn delete(State(s): St, Json(body): Json<Value>) -> StatusCode {
    let name = body["model"]
        .as_str()
        .or(body["name"].as_str())
        .unwrap_or_default();
    let mut st = s.lock().unwrap();
    let before = st.models.len();
    st.models.retain(|(n, _)| n != name);
    if st.models.len() < before {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

/// A plain file server for model downloads: `Range: bytes=N-` answers 206 with the rest.
async fn file(State(s): St, headers: axum::http::HeaderMap) -> Response {
    let (bytes, cut, range) = {
        let mut st = s.lock().unwrap();
        let range = headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Some(r) = &range {
            st.ranges.push(r.clone());
        }
        let cut = if range.is_none() {
            st.cut_next_download.take()
        } else {
            None
        };
        (st.file.clone(), cut, range)
    };
    let total = bytes.len();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0)
        .min(total);
    let body = bytes[start..].to_vec();
    let len = body.len();
    let chunks: Vec<Bytes> = body.chunks(64 * 1024).map(Bytes::copy_from_slice).collect();
    let stream = futures::stream::unfold(
        (chunks.into_iter(), 0usize),
        move |(mut it, sent)| async move {
            if cut.is_some_and(|c| sent >= c) {
                return Some((
                    Err(std::io::Error::other("connection cut")),
                    (it, usize::MAX),
                ))
                .filter(|_| sent != usize::MAX);
            }
            let c = it.next()?;
            let n = c.len();
            tokio::time::sleep(Duration::from_millis(20)).await;
            Some((Ok::<Bytes, std::io::Error>(c), (it, sent + n)))
        },
    );
    let mut b = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes");
    if range.is_some() {
        b = b.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", total.saturating_sub(1)),
        );
    }
    b.body(Body::from_stream(stream)).unwrap()
}

/// A stand-in for Stable Diffusion WebUI (no real one can run here: no GPU, no checkpoints),
/// speaking its API's wire format: `/sdapi/v1/sd-models`, `/sdapi/v1/options` (the loaded
/// checkpoint) and `/sdapi/v1/txt2img` / `img2img`, which answer with base64 PNGs (a 1x1 image
/// per requested picture) and the parameters they were given.
pub struct FakeSd {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Value>>>,
}

/// The smallest valid PNG: one transparent pixel.
pub const PIXEL_PNG_B64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

impl FakeSd {
    pub async fn start(checkpoints: &[&str], loaded: &str) -> Self {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let models: Vec<Value> = checkpoints
            .iter()
            .map(|c| {
                json!({"title": format!("{c}.safetensors [6ce0161689]"), "model_name": c,
                       "hash": "6ce0161689", "sha256": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
                       "filename": format!("/models/Stable-diffusion/{c}.safetensors"), "config": null})
            })
            .collect();
        let loaded = format!("{loaded}.safetensors [6ce0161689]");
        let reqs = requests.clone();
        let gen = move |Json(body): Json<Value>| {
            let reqs = reqs.clone();
            async move {
                reqs.lock().unwrap().push(body.clone());
                let n = body["batch_size"].as_u64().unwrap_or(1) as usize;
                Json(
                    json!({"images": vec![PIXEL_PNG_B64; n], "parameters": body, "info": "{\"seed\": 42}"}),
                )
            }
        };
        let app = Router::new()
            .route(
                "/sdapi/v1/sd-models",
                get(move || {
                    let m = models.clone();
                    async move { Json(Value::Array(m)) }
                }),
            )
            .route(
                "/sdapi/v1/options",
                get(move || {
                    let l = loaded.clone();
                    async move { Json(json!({"sd_model_checkpoint": l, "samples_format": "png"})) }
                }),
            )
            .route("/sdapi/v1/txt2img", post(gen.clone()))
            .route("/sdapi/v1/img2img", post(gen));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeSd { addr, requests }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
