//! Local inference backends: the ones named in the config (`[[ai.backends]]`), the ones found
//! on their usual ports on this host (Ollama 11434, llama.cpp 8080, vLLM 8000, LM Studio 1234,
//! Stable Diffusion WebUI 7860; with the listening process's owner when it can be seen, see
//! [`owner`]) and, when turned on, Ollama on Tailscale peers. Every `poll_interval` each is
//! asked what it holds (Ollama:
//! `/api/tags` and `/api/ps`; OpenAI-compatible: `/v1/models`; SD WebUI: `/sdapi/v1/sd-models` and
//! the loaded checkpoint), and the result is published on a `watch` channel the session sends
//! to the controller when it changes.
//!
//! Inference requests arrive on their own streams ([`serve_infer`]): the body goes to the named
//! backend as is and the response body comes back in chunks as the backend writes them, with no
//! buffering, so a token reaches the controller as soon as the backend emits it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use nebula_protocol as proto;
use nebula_protocol::ai::{
    AiInventory, AiModel, BackendKind, BackendStatus, InferEvent, InferRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub mod owner;

/// The response header the controller's gateway sets, so that discovery never mistakes the
/// gateway (OpenAI-compatible too) for a local backend.
pub const GATEWAY_HEADER: &str = "x-nebula-gateway";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AiConfig {
    /// Backends to use, by URL.
    pub backends: Vec<BackendConfig>,
    /// Also look for backends on their usual ports on this host.
    pub discover: bool,
    /// How often backends are asked what they hold.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Where model files downloaded by model jobs go (default: `models/` in the state dir).
    pub models_dir: Option<std::path::PathBuf>,
    /// Look for Ollama on Tailscale peers (through tailscaled's local API) when tailscaled runs.
    /// Off by default: a peer on the tailnet is not necessarily yours (a shared node, another
    /// member's machine), and every prompt routed to a backend found there goes to it. Turn it
    /// on for a tailnet whose peers you all run, or name the peer in `backends` instead.
    pub tailscale: bool,
    /// tailscaled's local API socket.
    pub tailscale_socket: std::path::PathBuf,
    /// Ports tried on each online peer (Ollama's by default).
    pub tailscale_ports: Vec<u16>,
}

impl Default for AiConfig {
    fn default() -> Self {
        AiConfig {
            backends: Vec::new(),
            discover: true,
            poll_interval: Duration::from_secs(10),
            models_dir: None,
            tailscale: false,
            tailscale_socket: "/var/run/tailscale/tailscaled.sock".into(),
            tailscale_ports: vec![11434],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Name in the inventory (default: the kind and port).
    #[serde(default)]
    pub name: Option<String>,
    pub kind: ConfigKind,
    /// Base URL, e.g. `http://127.0.0.1:11434`.
    pub url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConfigKind {
    Ollama,
    #[serde(rename = "openai")]
    OpenAi,
    SdWebui,
}

impl From<ConfigKind> for BackendKind {
    fn from(k: ConfigKind) -> Self {
        match k {
            ConfigKind::Ollama => BackendKind::Ollama,
            ConfigKind::OpenAi => BackendKind::OpenAi,
            ConfigKind::SdWebui => BackendKind::StableDiffusion,
        }
    }
}

/// The usual local ports, in the order they are tried.
const USUAL_PORTS: &[(u16, BackendKind)] = &[
    (11434, BackendKind::Ollama),
    (8080, BackendKind::OpenAi),
    (8000, BackendKind::OpenAi),
    (1234, BackendKind::OpenAi),
    (7860, BackendKind::StableDiffusion),
];

#[derive(Debug, Clone, PartialEq, Eq)]
struct Known {
    name: String,
    kind: BackendKind,
    url: String,
    source: String,
}

/// The backends known now, by name (what inference requests name).
/// A backend by name: its kind and base URL (also parsed once here, not per request; `None`:
/// not a URL).
type Entry = (BackendKind, String, Option<reqwest::Url>);

#[derive(Debug, Default)]
pub struct Backends {
    known: RwLock<BTreeMap<String, Entry>>,
    pub(crate) client: reqwest::Client,
    /// Ask the poller to look again now (after a pull or a delete).
    pub refresh: tokio::sync::Notify,
    /// Where downloaded model files go.
    pub models_dir: std::path::PathBuf,
}

impl Backends {
    pub fn new(models_dir: std::path::PathBuf) -> Arc<Self> {
        Arc::new(Backends {
            known: RwLock::default(),
            client: client(),
            refresh: tokio::sync::Notify::new(),
            models_dir,
        })
    }

    /// The backend named `name`, or the first of `kind` when no name is given.
    pub fn pick(
        &self,
        name: Option<&str>,
        kind: BackendKind,
    ) -> Option<(String, BackendKind, String)> {
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        match name {
            Some(n) => known.get(n).map(|(k, u, _)| (n.to_owned(), *k, u.clone())),
            None => known
                .iter()
                .find(|(_, (k, _, _))| *k == kind)
                .map(|(n, (k, u, _))| (n.clone(), *k, u.clone())),
        }
    }

    fn get(&self, name: &str) -> Option<Entry> {
        self.known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// The URL of an inference `path` on the backend named `backend`, or why there is none
    /// (no such backend, or not an inference path of its kind).
    pub(crate) fn inference_url(&self, backend: &str, path: &str) -> Result<reqwest::Url, String> {
        let (kind, base, parsed) = self
            .get(backend)
            .ok_or_else(|| format!("no backend named `{backend}` on this node"))?;
        if !allowed_path(kind, path) {
            return Err(format!(
                "`{path}` is not an inference path of a {} backend",
                kind.as_str()
            ));
        }
        let mut url = parsed.ok_or_else(|| format!("`{base}` is not a URL"))?;
        let full = format!("{}{}", url.path().trim_end_matches('/'), path);
        url.set_path(&full);
        Ok(url)
    }

    fn set(&self, list: &[Known]) {
        let map = list
            .iter()
            .map(|k| {
                let parsed = reqwest::Url::parse(&k.url).ok();
                (k.name.clone(), (k.kind, k.url.clone(), parsed))
            })
            .collect();
        *self.known.write().unwrap_or_else(|p| p.into_inner()) = map;
    }
}

fn client() -> reqwest::Client {
    crate::tls::install_provider();
    reqwest::Client::builder()
        .user_agent(concat!("nebula-agent/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
        .unwrap_or_default()
}

/// Poll the backends until `stop`, publishing what they hold.
pub async fn run(
    config: AiConfig,
    backends: Arc<Backends>,
    tx: watch::Sender<AiInventory>,
    stop: CancellationToken,
) {
    let client = backends.client.clone();
    // Owners of local listeners, kept by socket between rounds.
    let mut owners = owner::Owners::default();
    loop {
        let mut list: Vec<Known> = config
            .backends
            .iter()
            .map(|b| {
                let url = b.url.trim_end_matches('/').to_owned();
                let kind = BackendKind::from(b.kind);
                Known {
                    name: b.name.clone().unwrap_or_else(|| default_name(kind, &url)),
                    kind,
                    url,
                    source: "config".into(),
                }
            })
            .collect();
        if config.discover {
            for &(port, kind) in USUAL_PORTS {
                let url = format!("http://127.0.0.1:{port}");
                if list.iter().any(|k| k.url == url) {
                    continue;
                }
                if probe(&client, kind, &url).await {
                    // /proc is read off the runtime's threads (bounded, and cached by socket).
                    let (found, kept) = tokio::task::spawn_blocking(move || {
                        let found = owners.of_port(port);
                        (found, owners)
                    })
                    .await
                    .unwrap_or_default();
                    owners = kept;
                    list.push(Known {
                        name: default_name(kind, &url),
                        kind,
                        url,
                        source: local_source(port, found.as_ref()),
                    });
                }
            }
        }
        if config.tailscale && config.tailscale_socket.exists() {
            match tailscale_peers(&config.tailscale_socket).await {
                Ok(peers) => {
                    for (host, ip) in peers {
                        for &port in &config.tailscale_ports {
                            let url = match ip {
                                std::net::IpAddr::V4(a) => format!("http://{a}:{port}"),
                                std::net::IpAddr::V6(a) => format!("http://[{a}]:{port}"),
                            };
                            if list.iter().any(|k| k.url == url) {
                                continue;
                            }
                            if probe(&client, BackendKind::Ollama, &url).await {
                                list.push(Known {
                                    name: format!("ollama-{host}"),
                                    kind: BackendKind::Ollama,
                                    url,
                                    source: format!("tailscale:{host}"),
                                });
                            }
                        }
                    }
                }
                Err(e) => debug!("tailscaled: {e}"),
            }
        }
        let mut statuses = Vec::with_capacity(list.len());
        for k in &list {
            statuses.push(read_backend(&client, k).await);
        }
        backends.set(&list);
        let inv = AiInventory { backends: statuses };
        tx.send_if_modified(|cur| {
            if *cur == inv {
                false
            } else {
                info!(
                    backends = inv.backends.len(),
                    models = inv.backends.iter().map(|b| b.models.len()).sum::<usize>(),
                    "inference backends changed"
                );
                *cur = inv.clone();
                true
            }
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(config.poll_interval) => {}
            _ = backends.refresh.notified() => {}
        }
    }
}

/// Online Tailscale peers (host name, address) from tailscaled's local API.
#[cfg(unix)]
async fn tailscale_peers(
    socket: &std::path::Path,
) -> Result<Vec<(String, std::net::IpAddr)>, String> {
    let api = tailscale_localapi::LocalApi::new_with_socket_path(socket);
    let status = tokio::time::timeout(Duration::from_secs(2), api.status())
        .await
        .map_err(|_| "no answer within 2s".to_owned())?
        .map_err(|e| e.to_string())?;
    let mut peers: Vec<(String, std::net::IpAddr)> = status
        .peer
        .values()
        .filter(|p| p.online)
        .filter_map(|p| {
            let ip = p
                .tailscale_ips
                .iter()
                .find(|ip| ip.is_ipv4())
                .or(p.tailscale_ips.first())?;
            let host: String = p
                .hostname
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            Some((host, *ip))
        })
        .collect();
    peers.sort();
    Ok(peers)
}

/// tailscaled's local API is a named pipe on Windows: not read there yet.
#[cfg(not(unix))]
async fn tailscale_peers(
    _socket: &std::path::Path,
) -> Result<Vec<(String, std::net::IpAddr)>, String> {
    Ok(Vec::new())
}

/// A local backend's `source`: `local:PORT`, with its owner when known
/// (`local:11434 (uid 1000 alice, pid 1234 ollama)`).
fn local_source(port: u16, owner: Option<&owner::Owner>) -> String {
    match owner {
        Some(o) => format!("local:{port} ({o})"),
        None => format!("local:{port}"),
    }
}

fn default_name(kind: BackendKind, url: &str) -> String {
    let port = url.rsplit(':').next().unwrap_or_default();
    format!("{}-{port}", kind.as_str())
}

async fn get_json(client: &reqwest::Client, url: &str, timeout: Duration) -> Result<Value, String> {
    let resp = client
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if resp.headers().contains_key(GATEWAY_HEADER) {
        return Err(format!("{url} is a Nebula gateway, not a backend"));
    }
    if !resp.status().is_success() {
        return Err(format!("GET {url}: HTTP {}", resp.status().as_u16()));
    }
    resp.json::<Value>()
        .await
        .map_err(|e| format!("GET {url}: not JSON: {e}"))
}

/// Does something of this kind answer at `url`?
async fn probe(client: &reqwest::Client, kind: BackendKind, url: &str) -> bool {
    let t = Duration::from_millis(500);
    match kind {
        BackendKind::Ollama => get_json(client, &format!("{url}/api/version"), t)
            .await
            .is_ok_and(|v| v.get("version").is_some()),
        BackendKind::OpenAi => get_json(client, &format!("{url}/v1/models"), t)
            .await
            .is_ok_and(|v| v.get("data").is_some_and(Value::is_array)),
        BackendKind::StableDiffusion => get_json(client, &format!("{url}/sdapi/v1/sd-models"), t)
            .await
            .is_ok_and(|v| v.is_array()),
    }
}

async fn read_backend(client: &reqwest::Client, k: &Known) -> BackendStatus {
    let models = match k.kind {
        BackendKind::Ollama => read_ollama(client, &k.url).await,
        BackendKind::OpenAi => read_openai(client, &k.url).await,
        BackendKind::StableDiffusion => read_sd(client, &k.url).await,
    };
    let (healthy, error, models) = match models {
        Ok(m) => (true, None, m),
        Err(e) => {
            debug!(backend = %k.name, "backend not healthy: {e}");
            (false, Some(e), Vec::new())
        }
    };
    BackendStatus {
        name: k.name.clone(),
        kind: k.kind,
        url: k.url.clone(),
        source: k.source.clone(),
        healthy,
        error,
        models,
    }
}

const READ_TIMEOUT: Duration = Duration::from_secs(3);

fn u64_of(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

async fn read_ollama(client: &reqwest::Client, url: &str) -> Result<Vec<AiModel>, String> {
    let tags = get_json(client, &format!("{url}/api/tags"), READ_TIMEOUT).await?;
    let ps = get_json(client, &format!("{url}/api/ps"), READ_TIMEOUT).await?;
    let loaded: Vec<&Value> = ps["models"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for m in tags["models"].as_array().into_iter().flatten() {
        let Some(name) = m["name"].as_str() else {
            continue;
        };
        let running = loaded
            .iter()
            .find(|l| l["name"].as_str() == Some(name) || l["model"].as_str() == Some(name));
        out.push(AiModel {
            name: name.to_owned(),
            digest: m["digest"].as_str().map(str::to_owned),
            size_bytes: u64_of(&m["size"]).unwrap_or(0),
            vram_bytes: running.and_then(|l| u64_of(&l["size_vram"])),
            context_length: running
                .and_then(|l| u64_of(&l["context_length"]))
                .and_then(|c| u32::try_from(c).ok()),
            loaded: running.is_some(),
        });
    }
    Ok(out)
}

async fn read_openai(client: &reqwest::Client, url: &str) -> Result<Vec<AiModel>, String> {
    let v = get_json(client, &format!("{url}/v1/models"), READ_TIMEOUT).await?;
    let data = v["data"]
        .as_array()
        .ok_or_else(|| format!("{url}/v1/models: no `data` list"))?;
    Ok(data
        .iter()
        .filter_map(|m| {
            let name = m["id"].as_str()?;
            // llama.cpp's server reports its model's size and context in `meta`.
            let meta = &m["meta"];
            Some(AiModel {
                name: name.to_owned(),
                digest: None,
                size_bytes: u64_of(&meta["size"]).unwrap_or(0),
                vram_bytes: None,
                context_length: u64_of(&meta["n_ctx"])
                    .or_else(|| u64_of(&m["max_model_len"]))
                    .and_then(|c| u32::try_from(c).ok()),
                // A server of this kind answers with the model it has loaded.
                loaded: true,
            })
        })
        .collect())
}

async fn read_sd(client: &reqwest::Client, url: &str) -> Result<Vec<AiModel>, String> {
    let models = get_json(client, &format!("{url}/sdapi/v1/sd-models"), READ_TIMEOUT).await?;
    let options = get_json(client, &format!("{url}/sdapi/v1/options"), READ_TIMEOUT).await?;
    let current = options["sd_model_checkpoint"].as_str().unwrap_or_default();
    Ok(models
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let title = m["title"].as_str()?;
            Some(AiModel {
                name: m["model_name"].as_str().unwrap_or(title).to_owned(),
                digest: m["sha256"]
                    .as_str()
                    .or(m["hash"].as_str())
                    .map(str::to_owned),
                size_bytes: 0,
                vram_bytes: None,
                context_length: None,
                loaded: title == current,
            })
        })
        .collect())
}

/// Paths an inference request may name, per kind (nothing else on the backend is reachable).
fn allowed_path(kind: BackendKind, path: &str) -> bool {
    match kind {
        BackendKind::Ollama | BackendKind::OpenAi => matches!(
            path,
            "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings"
        ),
        BackendKind::StableDiffusion => {
            matches!(path, "/sdapi/v1/txt2img" | "/sdapi/v1/img2img")
        }
    }
}

/// Frames waiting for one write: what the backend has sent already goes out together (a
/// small answer's head, body and end in one QUIC write); a stream's token is never held back
/// waiting for the next one.
const FLUSH_AT: usize = 64 << 10;

/// Answer one inference stream: proxy the request to the backend, stream its body back.
pub async fn serve_infer(req: InferRequest, mut send: quinn::SendStream, backends: Arc<Backends>) {
    let mut out = Vec::new();
    // The controller stops the stream when its client goes away or its deadline passes: the
    // backend request is dropped then, even while it is still waiting for a first byte (a model
    // loading), not at the next write.
    let stopped = send.stopped();
    let result = tokio::select! {
        biased;
        r = proxy(req, &mut send, &mut out, &backends) => r,
        _ = stopped => Err(Failure::Gone),
    };
    let last = match result {
        Ok(()) => InferEvent::End,
        Err(Failure::Gone) => return,
        Err(Failure::Backend { message, timeout }) => InferEvent::Error { message, timeout },
    };
    if proto::encode_frame_into(&last, &mut out).is_ok() {
        let _ = send.write_all(&out).await;
    }
    let _ = send.finish();
}

enum Failure {
    /// The controller stopped reading (the client went away): drop the backend request.
    Gone,
    Backend {
        message: String,
        timeout: bool,
    },
}

/// Add `event` to `out`; write `out` when it is large.
async fn queue(
    send: &mut quinn::SendStream,
    out: &mut Vec<u8>,
    event: &InferEvent,
) -> Result<(), Failure> {
    proto::encode_frame_into(event, out).map_err(|e| Failure::Backend {
        message: e.to_string(),
        timeout: false,
    })?;
    if out.len() >= FLUSH_AT {
        flush(send, out).await?;
    }
    Ok(())
}

/// Write the frames waiting in `out` (if any).
async fn flush(send: &mut quinn::SendStream, out: &mut Vec<u8>) -> Result<(), Failure> {
    if !out.is_empty() {
        send.write_all(out).await.map_err(|_| Failure::Gone)?;
        out.clear();
    }
    Ok(())
}

async fn proxy(
    req: InferRequest,
    send: &mut quinn::SendStream,
    out: &mut Vec<u8>,
    backends: &Backends,
) -> Result<(), Failure> {
    use futures::FutureExt;
    let fail = |message: String| Failure::Backend {
        message,
        timeout: false,
    };
    let url = backends
        .inference_url(&req.backend, &req.path)
        .map_err(fail)?;
    let started = tokio::time::Instant::now();
    let total = Duration::from_millis(req.total_timeout_ms.max(1).into());
    let first = Duration::from_millis(req.first_byte_timeout_ms.max(1).into()).min(total);
    let sent = backends
        .client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(req.body)
        .send();
    let mut resp = match tokio::time::timeout(first, sent).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(fail(format!("POST {url}: {e}"))),
        Err(_) => {
            return Err(Failure::Backend {
                message: format!(
                    "{url} sent nothing within {}",
                    humantime::format_duration(first)
                ),
                timeout: true,
            })
        }
    };
    let head = InferEvent::Head {
        status: resp.status().as_u16(),
        content_type: resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_owned(),
    };
    proto::encode_frame_into(&head, out).map_err(|e| fail(e.to_string()))?;
    loop {
        // Body bytes already here join the frames waiting; otherwise those go out now, before
        // waiting for more.
        let next = match resp.chunk().now_or_never() {
            Some(r) => Ok(r),
            None => {
                flush(send, out).await?;
                let left = total.saturating_sub(started.elapsed());
                tokio::time::timeout(left, resp.chunk()).await
            }
        };
        match next {
            Ok(Ok(Some(bytes))) => {
                queue(send, out, &InferEvent::Chunk(bytes.to_vec())).await?;
            }
            // The caller adds `End` to what is waiting.
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(fail(format!("reading {url}: {e}"))),
            Err(_) => {
                return Err(Failure::Backend {
                    message: format!(
                        "{url} did not finish within {}",
                        humantime::format_duration(total)
                    ),
                    timeout: true,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_kinds_and_defaults() {
        let cfg: AiConfig = toml::from_str(
            "[[backends]]\nkind = \"ollama\"\nurl = \"http://gpu:11434\"\n[[backends]]\nname = \"sd\"\nkind = \"sd-webui\"\nurl = \"http://127.0.0.1:7860/\"\n[[backends]]\nkind = \"openai\"\nurl = \"http://127.0.0.1:8081\"",
        )
        .unwrap();
        assert!(cfg.discover);
        // Tailscale peers are strangers until the config says otherwise.
        assert!(!cfg.tailscale);
        assert!(!AiConfig::default().tailscale);
        assert_eq!(cfg.backends.len(), 3);
        assert_eq!(
            BackendKind::from(cfg.backends[1].kind),
            BackendKind::StableDiffusion
        );
        assert_eq!(
            default_name(BackendKind::OpenAi, "http://127.0.0.1:8081"),
            "openai-8081"
        );
        assert!(toml::from_str::<AiConfig>("[[backends]]\nkind = \"tgi\"\nurl = \"x\"").is_err());
    }

    #[test]
    fn a_local_source_names_its_port_and_owner() {
        assert_eq!(local_source(11434, None), "local:11434");
        let o = owner::Owner {
            uid: 1000,
            user: Some("alice".into()),
            process: Some((1234, "ollama".into())),
        };
        assert_eq!(
            local_source(11434, Some(&o)),
            "local:11434 (uid 1000 alice, pid 1234 ollama)"
        );
    }

    #[test]
    fn only_inference_paths_are_reachable() {
        assert!(allowed_path(BackendKind::OpenAi, "/v1/chat/completions"));
        assert!(allowed_path(BackendKind::Ollama, "/v1/embeddings"));
        assert!(!allowed_path(BackendKind::Ollama, "/api/delete"));
        assert!(!allowed_path(BackendKind::OpenAi, "/../admin"));
        assert!(allowed_path(
            BackendKind::StableDiffusion,
            "/sdapi/v1/txt2img"
        ));
        assert!(!allowed_path(
            BackendKind::StableDiffusion,
            "/v1/chat/completions"
        ));
    }
}
