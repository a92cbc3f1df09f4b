//! Job records as the controller keeps them and the API shows them.

use nebula_protocol::validate::parse_mac;
use std::collections::BTreeMap;
use std::time::Duration;

mod http;
use http::{get, validate_http};
pub use http::{redact_url, HTTP_MAX_BYTES, HTTP_TIMEOUT, INFER_TIMEOUT};

use nebula_protocol::containers::{
    valid_container_ref, ContainerAction, ContainerJob, StorageAction,
};
use nebula_protocol::deploy::{DeploySpec, DeployWithFiles, DeployWithHostAccess, UndeploySpec};
use nebula_protocol::jobs::{ExecSpec, JobOutput, JobSpec, ProbeSpec};
use nebula_protocol::Labels;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What a job does, as people write it (`{"kind": "exec", "op": "git-pull", "args": [...]}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Work {
    /// Nothing: a round-trip check.
    Noop,
    /// A named operation from the node's own allow-list.
    Exec {
        op: String,
        #[serde(default)]
        args: Vec<String>,
    },
    /// `http` (a URL to GET) or `tcp` (HOST:PORT to connect to), from the node.
    Probe {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        http: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tcp: Option<String>,
        #[serde(
            default,
            with = "humantime_serde",
            skip_serializing_if = "Option::is_none"
        )]
        timeout: Option<Duration>,
    },
    /// Containers, facts, git repositories, agent version.
    Inventory,
    /// Converge one service on one node (created by the reconciler only).
    Deploy(Box<DeploySpec>),
    /// `deploy` for a service with host access (privileged, host namespaces, capabilities,
    /// devices), which needs an agent from protocol 1.5 on (created by the reconciler only).
    DeployWithHostAccess(Box<DeployWithHostAccess>),
    /// `deploy` for a service with secret files, which needs an agent from protocol 1.8 on
    /// (created by the reconciler only). Stored and shown with the files' references only.
    DeployWithFiles(Box<DeployWithFiles>),
    /// Remove one service's containers from one node (created by the reconciler only).
    Undeploy(UndeploySpec),
    /// Send a Wake-on-LAN magic packet from the node (a relay on the sleeping host's LAN).
    Wake {
        /// `52:54:00:12:34:56` (or with `-`).
        mac: String,
        /// IPv4 broadcast address of that LAN (default `255.255.255.255`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        broadcast: Option<String>,
    },
    /// A model on one of the node's inference backends: `action` is `pull` (Ollama, by `name`),
    /// `download` (a file from `url` into the agent's models directory as `file`, checked
    /// against `sha256`), `delete` (by `name`) or `list`.
    Model {
        action: ModelActionKind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        /// The backend on the node (default: the first that can).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<String>,
    },
    /// Start, stop, restart, kill, remove a container (by name or id) or pull its image again,
    /// within what the node's `docker.control` allows.
    Container {
        container: String,
        action: ContainerActionKind,
    },
    /// An HTTP request from the node: `method` (default GET), `url`, `headers`, `body` (text),
    /// `timeout` (default 30 s, at most 10 min). The answer's first `max_bytes` (default
    /// 256 KiB) come back.
    Http {
        #[serde(default = "get")]
        method: String,
        url: String,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<String>,
        #[serde(
            default,
            with = "humantime_serde",
            skip_serializing_if = "Option::is_none"
        )]
        timeout: Option<Duration>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bytes: Option<u32>,
    },
    /// A request to one of the node's inference backends (`backend` by name, `path` such as
    /// `/v1/chat/completions`, `body` the JSON text), made by workflows through the gateway's
    /// routing (created by the controller only).
    Infer {
        backend: String,
        path: String,
        body: String,
        #[serde(
            default,
            with = "humantime_serde",
            skip_serializing_if = "Option::is_none"
        )]
        timeout: Option<Duration>,
    },
    /// `list` the node's images and volumes, or `prune` exactly the unused `images` (ids)
    /// and `volumes` (names) named.
    Storage {
        action: StorageActionKind,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        images: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        volumes: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageActionKind {
    List,
    Prune,
}

/// What a `container` job does (`rm` reads as `remove`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerActionKind {
    Start,
    Stop,
    Restart,
    Kill,
    #[serde(alias = "rm")]
    Remove,
    Pull,
}

impl ContainerActionKind {
    pub fn to_action(self) -> ContainerAction {
        match self {
            ContainerActionKind::Start => ContainerAction::Start,
            ContainerActionKind::Stop => ContainerAction::Stop,
            ContainerActionKind::Restart => ContainerAction::Restart,
            ContainerActionKind::Kill => ContainerAction::Kill,
            ContainerActionKind::Remove => ContainerAction::Remove,
            ContainerActionKind::Pull => ContainerAction::Pull,
        }
    }

    pub fn from_action(a: ContainerAction) -> Self {
        match a {
            ContainerAction::Start => ContainerActionKind::Start,
            ContainerAction::Stop => ContainerActionKind::Stop,
            ContainerAction::Restart => ContainerActionKind::Restart,
            ContainerAction::Kill => ContainerActionKind::Kill,
            ContainerAction::Remove => ContainerActionKind::Remove,
            ContainerAction::Pull => ContainerActionKind::Pull,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelActionKind {
    Pull,
    Download,
    Delete,
    List,
}

impl Work {
    /// The service a deploy or an undeploy job changes.
    pub fn deploy_service(&self) -> Option<&str> {
        match self {
            Work::Deploy(d) => Some(&d.service),
            Work::DeployWithHostAccess(d) => Some(&d.deploy.service),
            Work::DeployWithFiles(d) => Some(&d.deploy.service),
            Work::Undeploy(u) => Some(&u.service),
            _ => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Work::Noop => "noop",
            Work::Exec { .. } => "exec",
            Work::Probe { .. } => "probe",
            Work::Inventory => "inventory",
            Work::Deploy(_) | Work::DeployWithHostAccess(_) | Work::DeployWithFiles(_) => "deploy",
            Work::Undeploy(_) => "undeploy",
            Work::Wake { .. } => "wake",
            Work::Model { .. } => "model",
            Work::Container { .. } => "container",
            Work::Storage { .. } => "storage",
            Work::Http { .. } => "http",
            Work::Infer { .. } => "infer",
        }
    }

    /// What the job does, in a few words for lists: `git-pull /srv/app`, `restart web-1`,
    /// `deploy web 3f9c2a7d`.
    pub fn summary(&self) -> String {
        match self {
            Work::Exec { op, args } => format!("{op} {}", args.join(" ")).trim().to_owned(),
            Work::Probe { http, tcp, .. } => {
                format!("probe {}", http.clone().or(tcp.clone()).unwrap_or_default())
            }
            Work::Deploy(d) => format!("deploy {} {}", d.service, d.revision),
            Work::DeployWithHostAccess(d) => format!(
                "deploy {} {} (host access)",
                d.deploy.service, d.deploy.revision
            ),
            Work::DeployWithFiles(d) => format!(
                "deploy {} {} ({} secret file(s))",
                d.deploy.service,
                d.deploy.revision,
                d.files.len()
            ),
            Work::Undeploy(u) => format!("undeploy {}", u.service),
            Work::Http { method, url, .. } => format!("{method} {}", redact_url(url)),
            Work::Infer { backend, path, .. } => format!("infer {backend} {path}"),
            Work::Container { container, action } => {
                format!("{} {container}", action.to_action().as_str())
            }
            Work::Storage {
                action: StorageActionKind::List,
                ..
            } => "list images and volumes".into(),
            Work::Storage {
                images, volumes, ..
            } => format!(
                "prune {} image(s), {} volume(s)",
                images.len(),
                volumes.len()
            ),
            Work::Model { action, name, .. } => {
                let verb = match action {
                    ModelActionKind::Pull => "pull",
                    ModelActionKind::Download => "download",
                    ModelActionKind::Delete => "delete",
                    ModelActionKind::List => "list",
                };
                format!("model {verb} {}", name.as_deref().unwrap_or(""))
                    .trim()
                    .to_owned()
            }
            w => w.kind().to_owned(),
        }
    }

    /// The work as someone who may not read inline values sees it: a deploy's `env` values
    /// keep their secret references, `***` in place of any other text; an HTTP request's header
    /// values, body and query are `***`.
    pub fn redact_inline_values(&mut self) {
        if let Work::Http {
            url, headers, body, ..
        } = self
        {
            for v in headers.values_mut() {
                *v = "***".into();
            }
            if body.is_some() {
                *body = Some("***".into());
            }
            *url = redact_url(url);
            return;
        }
        let deploy = match self {
            Work::Deploy(d) => d.as_mut(),
            Work::DeployWithHostAccess(d) => &mut d.deploy,
            Work::DeployWithFiles(d) => &mut d.deploy,
            _ => return,
        };
        for (_, v) in deploy.container.env.iter_mut() {
            *v = nebula_desired::map::secrets::redact_inline(v);
        }
    }

    /// Kinds only the controller itself creates (the reconciler); the jobs API refuses them.
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            Work::Deploy(_)
                | Work::DeployWithHostAccess(_)
                | Work::DeployWithFiles(_)
                | Work::Undeploy(_)
                | Work::Infer { .. }
        )
    }

    /// Check what can be checked before any agent sees it.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Work::Exec { op, args } => {
                if op.is_empty() || op.len() > 128 || op.chars().any(char::is_whitespace) {
                    return Err(
                        "exec `op` must be a name of 1-128 characters without spaces".into(),
                    );
                }
                if args.len() > 64 || args.iter().any(|a| a.len() > 4096) {
                    return Err("exec takes at most 64 arguments of up to 4096 bytes".into());
                }
                Ok(())
            }
            Work::Probe { http, tcp, timeout } => {
                match (http, tcp) {
                    (Some(url), None) => {
                        if !(url.starts_with("http://") || url.starts_with("https://")) {
                            return Err(format!(
                                "probe `http` must be an http:// or https:// URL, not `{url}`"
                            ));
                        }
                    }
                    (None, Some(addr)) => {
                        if addr
                            .rsplit_once(':')
                            .and_then(|(_, p)| p.parse::<u16>().ok())
                            .is_none()
                        {
                            return Err(format!("probe `tcp` must read HOST:PORT, not `{addr}`"));
                        }
                    }
                    _ => {
                        return Err(
                            "a probe takes exactly one of `http` (URL) or `tcp` (HOST:PORT)".into(),
                        )
                    }
                }
                if timeout.is_some_and(|t| t > Duration::from_secs(120) || t.is_zero()) {
                    return Err("probe timeout must be between 1ms and 120s".into());
                }
                Ok(())
            }
            Work::Wake { mac, broadcast } => {
                parse_mac(mac)?;
                if let Some(b) = broadcast {
                    b.parse::<std::net::Ipv4Addr>().map_err(|_| {
                        format!("wake `broadcast` must be an IPv4 address, not `{b}`")
                    })?;
                }
                Ok(())
            }
            Work::Model {
                action,
                name,
                url,
                file,
                sha256,
                ..
            } => {
                let named = |n: &Option<String>| {
                    n.as_deref().is_some_and(|n| {
                        !n.is_empty()
                            && n.len() <= 255
                            && !n.contains(char::is_whitespace)
                            && !n.contains("..")
                    })
                };
                match action {
                    ModelActionKind::Pull | ModelActionKind::Delete if !named(name) => Err(
                        "model pull and delete need a `name` (no spaces, at most 255 characters)"
                            .into(),
                    ),
                    ModelActionKind::Download => {
                        let url_ok = url
                            .as_deref()
                            .is_some_and(|u| u.starts_with("http://") || u.starts_with("https://"));
                        if !url_ok {
                            return Err("a model download needs an http(s) `url`".into());
                        }
                        if !named(file) || file.as_deref().is_some_and(|f| f.contains('/')) {
                            return Err("a model download needs a `file` name (no path)".into());
                        }
                        if let Some(s) = sha256 {
                            if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                                return Err("`sha256` must be 64 hex digits".into());
                            }
                        }
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
            Work::Storage {
                action,
                images,
                volumes,
            } => {
                if *action == StorageActionKind::List && !(images.is_empty() && volumes.is_empty())
                {
                    return Err("a storage `list` names no images or volumes".into());
                }
                if images.len() + volumes.len() > 10_000 {
                    return Err("a prune names at most 10000 images and volumes".into());
                }
                let bad = images.iter().chain(volumes).find(|n| {
                    n.is_empty()
                        || n.len() > 255
                        || !n
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_.-:".contains(&b))
                });
                match bad {
                    Some(n) => Err(format!("`{n}` is not an image id or volume name")),
                    None => Ok(()),
                }
            }
            Work::Container { container, .. } => {
                if valid_container_ref(container) {
                    Ok(())
                } else {
                    Err(format!(
                        "`{container}` is not a container name or id (letters, digits, `_.-`, at most 128)"
                    ))
                }
            }
            Work::Http {
                method,
                url,
                headers,
                body,
                timeout,
                max_bytes,
            } => validate_http(method, url, headers, body.as_deref(), *timeout, *max_bytes),
            Work::Noop
            | Work::Infer { .. }
            | Work::Inventory
            | Work::Deploy(_)
            | Work::DeployWithHostAccess(_)
            | Work::DeployWithFiles(_)
            | Work::Undeploy(_) => Ok(()),
        }
    }

    pub fn to_spec(&self) -> JobSpec {
        match self {
            Work::Noop => JobSpec::Noop,
            Work::Exec { op, args } => JobSpec::Exec(ExecSpec {
                op: op.clone(),
                args: args.clone(),
            }),
            Work::Probe { http, tcp, timeout } => {
                let timeout_ms = timeout
                    .unwrap_or(Duration::from_secs(5))
                    .as_millis()
                    .min(u32::MAX as u128) as u32;
                match (http, tcp) {
                    (Some(url), _) => JobSpec::Probe(ProbeSpec::Http {
                        url: url.clone(),
                        timeout_ms,
                    }),
                    (None, tcp) => JobSpec::Probe(ProbeSpec::Tcp {
                        address: tcp.clone().unwrap_or_default(),
                        timeout_ms,
                    }),
                }
            }
            Work::Inventory => JobSpec::Inventory,
            Work::Deploy(spec) => JobSpec::Deploy(spec.clone()),
            Work::DeployWithHostAccess(d) => JobSpec::DeployWithHostAccess(d.clone()),
            Work::DeployWithFiles(d) => JobSpec::DeployWithFiles(d.clone()),
            Work::Undeploy(spec) => JobSpec::Undeploy(spec.clone()),
            Work::Model {
                action,
                name,
                url,
                file,
                sha256,
                backend,
            } => {
                use nebula_protocol::ai::{ModelAction, ModelSpec};
                let name = name.clone().unwrap_or_default();
                JobSpec::Model(ModelSpec {
                    backend: backend.clone(),
                    action: match action {
                        ModelActionKind::Pull => ModelAction::Pull { name },
                        ModelActionKind::Delete => ModelAction::Delete { name },
                        ModelActionKind::List => ModelAction::List,
                        ModelActionKind::Download => ModelAction::Download {
                            url: url.clone().unwrap_or_default(),
                            file: file.clone().unwrap_or_default(),
                            sha256: sha256.clone(),
                        },
                    },
                })
            }
            Work::Container { container, action } => JobSpec::Container(ContainerJob {
                container: container.clone(),
                action: action.to_action(),
            }),
            Work::Storage {
                action: StorageActionKind::List,
                ..
            } => JobSpec::Storage(StorageAction::List),
            Work::Storage {
                images, volumes, ..
            } => JobSpec::Storage(StorageAction::Prune {
                images: images.clone(),
                volumes: volumes.clone(),
            }),
            Work::Http {
                method,
                url,
                headers,
                body,
                timeout,
                max_bytes,
            } => JobSpec::Http(nebula_protocol::jobs::HttpSpec {
                method: method.clone(),
                url: url.clone(),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                body: body.clone().unwrap_or_default().into_bytes(),
                timeout_ms: millis(timeout.unwrap_or(HTTP_TIMEOUT)),
                max_bytes: max_bytes.unwrap_or(HTTP_MAX_BYTES),
            }),
            Work::Infer {
                backend,
                path,
                body,
                timeout,
            } => {
                let total = millis(timeout.unwrap_or(INFER_TIMEOUT));
                JobSpec::Infer(nebula_protocol::ai::InferRequest {
                    backend: backend.clone(),
                    path: path.clone(),
                    body: body.clone().into_bytes(),
                    first_byte_timeout_ms: total,
                    total_timeout_ms: total,
                })
            }
            Work::Wake { mac, broadcast } => JobSpec::Wake(nebula_protocol::jobs::WakeSpec {
                mac: parse_mac(mac).unwrap_or_default(),
                broadcast: broadcast
                    .clone()
                    .unwrap_or_else(|| "255.255.255.255".into()),
                port: 9,
            }),
        }
    }
}

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

/// Where a job may run: one node by name, or any node matching a selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    Node(String),
    Selector(Selector),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Node(n) => write!(f, "node {n}"),
            Target::Selector(s) => write!(f, "selector {s}"),
        }
    }
}

/// All given conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Selector {
    /// Every label must be on the node with this value.
    pub labels: Labels,
    /// `true`: the node has an NVIDIA GPU; `false`: it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<bool>,
    /// Free memory on the node's emptiest GPU, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_free_vram_mb: Option<u64>,
    /// The model is on the node (loaded or on disk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if let Some(g) = self.gpu {
            parts.push(format!("gpu={g}"));
        }
        if let Some(v) = self.min_free_vram_mb {
            parts.push(format!("min_free_vram_mb={v}"));
        }
        if let Some(m) = &self.model {
            parts.push(format!("model={m}"));
        }
        if parts.is_empty() {
            f.write_str("{any node}")
        } else {
            write!(f, "{{{}}}", parts.join(", "))
        }
    }
}

/// queued -> dispatched -> running -> succeeded | failed | cancelled | timed_out | lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Dispatched,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    Lost,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Dispatched,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
        JobState::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Dispatched => "dispatched",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
            JobState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            JobState::Queued | JobState::Dispatched | JobState::Running
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobRecord {
    pub id: Uuid,
    /// What to run: `{"kind": ..., ...}` (exec, probe, deploy, model, wake, ...).
    #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
    pub work: Work,
    pub target: Target,
    pub state: JobState,
    pub node_id: Option<Uuid>,
    /// The node it was (last) given to.
    pub node: Option<String>,
    pub attempt: u32,
    pub max_attempts: u32,
    pub idempotent: bool,
    pub created_by: String,
    pub created_at: i64,
    pub dispatched_at: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub deadline: Option<i64>,
    /// Why the node was chosen.
    pub routing: Option<String>,
    /// Why it waits, or why it ended as it did.
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// The work's result (an exec's, a probe's, a deploy's), by kind.
    #[schemars(with = "Option<serde_json::Value>")]
    pub output: Option<JobOutput>,
    /// Nodes an earlier attempt was lost on (a retry prefers others).
    pub excluded: Vec<Uuid>,
    /// Next log line (of this attempt) the controller expects.
    pub logs_next: u64,
    /// Its idempotency key (a workflow step's `RUN/STEP/ATTEMPT`), if it was given one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A stored log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct JobLogLine {
    pub attempt: u32,
    pub seq: u64,
    pub at: i64,
    pub stream: String,
    pub line: String,
}

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AuditRecord {
    pub id: Uuid,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_and_target_read_as_documented_and_reject_unknown_fields() {
        let w: Work =
            serde_json::from_str(r#"{"kind":"exec","op":"git-pull","args":["/srv/app"]}"#).unwrap();
        assert_eq!(
            w,
            Work::Exec {
                op: "git-pull".into(),
                args: vec!["/srv/app".into()]
            }
        );
        let p: Work =
            serde_json::from_str(r#"{"kind":"probe","http":"http://x/","timeout":"2s"}"#).unwrap();
        assert!(p.validate().is_ok());
        assert!(serde_json::from_str::<Work>(r#"{"kind":"exec","op":"x","shell":true}"#).is_err());
        assert!(serde_json::from_str::<Work>(r#"{"kind":"format-disk"}"#).is_err());
        let bad: Work = serde_json::from_str(r#"{"kind":"probe","http":"ftp://x"}"#).unwrap();
        assert!(bad.validate().is_err());
        let both: Work =
            serde_json::from_str(r#"{"kind":"probe","http":"http://x","tcp":"a:1"}"#).unwrap();
        assert!(both.validate().is_err());
        let t: Target = serde_json::from_str(
            r#"{"selector":{"labels":{"zone":"home"},"gpu":true,"min_free_vram_mb":8000}}"#,
        )
        .unwrap();
        assert_eq!(
            t.to_string(),
            "selector {zone=home, gpu=true, min_free_vram_mb=8000}"
        );
        assert!(serde_json::from_str::<Target>(r#"{"selector":{"cpu":4}}"#).is_err());
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
    }
}
