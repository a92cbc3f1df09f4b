//! The Nebula agent: joins the fleet over QUIC with mutual TLS and keeps a session with the
//! controller.
//!
//! Tasks: [`Agent::run`] is one task that owns the QUIC client endpoint and runs the session and
//! reconnect loop ([`session::run`]); its progress is published on a `watch` channel of
//! [`AgentStatus`]. Beside it run the telemetry collectors ([`telemetry::run`], publishing on
//! `watch` channels the session reads) and the [`jobs::JobRunner`], whose tasks (one per job
//! stream, one per run) outlive any one connection. It stops when its cancellation token fires,
//! after saying `Bye`; runs still going are cancelled and journaled. With self-update on, an
//! updater task waits for the controller's release list and, for a newer build, swaps the binary
//! and asks `main` to restart into it ([`Agent::restart_into`]); see [`update`].
//!
//! The agent links no database, HTTP-server or chat crate: it must stay small.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nebula_protocol::{JoinToken, Labels, NodeFacts, Refusal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod ai;
pub mod config;
pub mod docker;
pub mod enroll;
pub mod facts;
pub mod identity;
pub mod jobs;
pub mod logs;
pub mod monitors;
pub mod process;
pub mod session;
pub mod shell;
pub mod telemetry;
pub mod term;
pub mod tls;
pub mod update;
#[cfg(windows)]
pub mod winservice;

pub use config::AgentConfig;
pub use identity::{Identity, StateDir};
pub use session::AgentStatus;

/// The version stamp inside the binary: the controller reads a served build's version from it
/// without running it, and a release process may stamp a build without recompiling it.
#[used]
static VERSION_STAMP: [u8; nebula_protocol::release::VERSION_STAMP_LEN] =
    nebula_protocol::release::version_stamp(env!("CARGO_PKG_VERSION"));

/// This agent's version as stamped in its binary, reported in `Hello` and compared with the
/// controller's builds.
pub fn version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        // Read through an opaque reference: the bytes in the file count, not the compiler's copy.
        let stamp = std::hint::black_box(&VERSION_STAMP);
        nebula_protocol::release::parse_version_stamp(stamp)
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
    })
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("refused by the controller: {0}")]
    Refused(Refusal),
    #[error("the controller closed the connection: {0}")]
    Closed(String),
    #[error("cannot connect to the controller at {0}")]
    Connect(String, #[source] quinn::ConnectionError),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("protocol error")]
    Frame(#[from] nebula_protocol::FrameError),
    #[error("no controller address: pass --controller HOST:PORT or set it in the config")]
    NoController,
    #[error("cannot resolve controller address `{0}`")]
    Resolve(String),
    #[error("{0:#}")]
    Other(anyhow::Error),
}

impl AgentError {
    /// Errors that retrying cannot fix: the agent stops instead of backing off.
    pub fn is_permanent(&self) -> bool {
        match self {
            AgentError::Refused(r) => r.code.is_permanent(),
            AgentError::Closed(_) | AgentError::Identity(_) | AgentError::NoController => true,
            AgentError::Connect(_, quinn::ConnectionError::TransportError(t)) => {
                // A TLS failure (foreign CA, bad pin) will not fix itself.
                t.code.to_string().contains("crypto") || t.reason.contains("certificate")
            }
            _ => false,
        }
    }
}

/// Resolve `HOST:PORT` to a socket address.
pub async fn resolve(controller: &str) -> Result<SocketAddr, AgentError> {
    tokio::net::lookup_host(controller)
        .await
        .map_err(|_| AgentError::Resolve(controller.to_owned()))?
        .next()
        .ok_or_else(|| AgentError::Resolve(controller.to_owned()))
}

/// An agent: configuration, state dir and a status channel.
pub struct Agent {
    pub config: AgentConfig,
    state: StateDir,
    status: watch::Sender<AgentStatus>,
    facts: Option<NodeFacts>,
    gpu: GpuSource,
    models: Vec<nebula_protocol::telemetry::ModelInfo>,
    /// Set when the agent should restart into this executable (after an update or a rollback).
    restart: Arc<Mutex<Option<PathBuf>>>,
}

/// Where GPU figures come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSource {
    /// NVML, when the NVIDIA driver is present.
    Nvml,
    /// Report no GPUs.
    None,
    /// Report these GPUs with fixed readings (the fleet simulator and routing tests, on hosts
    /// without NVIDIA hardware).
    Simulated(Vec<telemetry::gpu::SimulatedGpu>),
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("state_dir", &self.state.path())
            .finish()
    }
}

impl Agent {
    pub fn new(config: AgentConfig) -> Self {
        Agent {
            state: StateDir::new(config.state_dir.clone()),
            config,
            status: watch::channel(AgentStatus::Starting).0,
            facts: None,
            gpu: GpuSource::Nvml,
            models: Vec::new(),
            restart: Arc::default(),
        }
    }

    /// Use these facts instead of reading the host (the fleet simulator runs many agents on one
    /// host and gives each its own).
    pub fn with_facts(mut self, facts: NodeFacts) -> Self {
        self.facts = Some(facts);
        self
    }

    /// Choose where GPU figures come from (default: NVML).
    pub fn with_gpu(mut self, gpu: GpuSource) -> Self {
        self.gpu = gpu;
        self
    }

    /// Report these models in telemetry (until inference backends are discovered).
    pub fn with_models(mut self, models: Vec<nebula_protocol::telemetry::ModelInfo>) -> Self {
        self.models = models;
        self
    }

    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// After [`Agent::run`] returned: the executable to restart into (a self-update swapped the
    /// binary, or rolled it back).
    pub fn restart_into(&self) -> Option<PathBuf> {
        self.restart
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn is_enrolled(&self) -> bool {
        self.state.is_enrolled()
    }

    fn facts(&self) -> NodeFacts {
        let labels: Labels = self.config.labels.clone();
        match &self.facts {
            Some(f) => NodeFacts {
                labels,
                ..f.clone()
            },
            None => facts::collect(&labels),
        }
    }

    /// Enroll with `token` unless this state dir already holds an identity (re-running `join`
    /// keeps the node's identity).
    pub async fn join(&self, token: &JoinToken) -> Result<Identity, AgentError> {
        if self.state.is_enrolled() {
            let id = self.state.load()?;
            tracing::info!(node = %id.state.node_id, name = %id.state.name, "already enrolled; keeping this identity");
            return Ok(id);
        }
        let controller = self
            .config
            .controller
            .clone()
            .ok_or(AgentError::NoController)?;
        let addr = resolve(&controller).await?;
        let facts = self.facts();
        let name = self
            .config
            .name
            .clone()
            .unwrap_or_else(|| facts.hostname.clone());
        let endpoint = tls::client_endpoint(addr).map_err(|e| AgentError::Other(e.into()))?;
        let result = enroll::enroll(
            &endpoint,
            enroll::EnrollParams {
                controller,
                addr,
                token: token.clone(),
                name,
                labels: self.config.labels.clone(),
                facts,
            },
            &self.state,
        )
        .await;
        endpoint.wait_idle().await;
        result
    }

    /// Keep a session with the controller until `shutdown` fires (or a permanent refusal).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let identity = self.state.load()?;
        let startup = update::on_start(
            self.state.path(),
            version(),
            self.config.update.confirm_timeout,
        );
        if let update::Startup::RolledBack { exe } = startup {
            *self.restart.lock().unwrap_or_else(|p| p.into_inner()) = Some(exe);
            return Ok(());
        }
        // Stops this run (not the process) for a restart into another binary.
        let shutdown = shutdown.child_token();
        let controller = self
            .config
            .controller
            .clone()
            .unwrap_or_else(|| identity.state.controller.clone());
        let interval = identity
            .state
            .settings
            .as_ref()
            .map(|s| Duration::from_millis(s.telemetry_interval_ms.into()))
            .unwrap_or(Duration::from_secs(5));
        let (sink, mut feed) = telemetry::channels(interval);
        let tracker = TaskTracker::new();
        let mut collectors = telemetry::Collectors::new(
            match &self.gpu {
                GpuSource::Nvml => telemetry::gpu::GpuCollector::new(),
                GpuSource::None => telemetry::gpu::GpuCollector::none(),
                GpuSource::Simulated(gpus) => telemetry::gpu::GpuCollector::simulated(gpus.clone()),
            },
            self.config.docker.socket.clone(),
        );
        collectors.models = self.models.clone();
        let telemetry_stop = shutdown.child_token();
        tracker.spawn(telemetry::run(
            collectors,
            sink,
            telemetry_stop.clone(),
            tracker.clone(),
        ));
        // Wait (briefly) for the first inventory so that Hello carries GPUs and the runtime.
        let _ = tokio::time::timeout(Duration::from_secs(3), feed.inventory.changed()).await;
        feed.inventory.mark_changed();
        let mut facts = self.facts();
        {
            let inv = feed.inventory.borrow();
            facts.gpus = inv.gpus.clone();
            facts.container_runtime = inv.container_runtime.clone();
        }
        let backends = ai::Backends::new(
            self.config
                .ai
                .models_dir
                .clone()
                .unwrap_or_else(|| self.state.path().join("models")),
        );
        let (ai_tx, ai_rx) = watch::channel(nebula_protocol::ai::AiInventory::default());
        tracker.spawn(ai::run(
            self.config.ai.clone(),
            backends.clone(),
            ai_tx,
            telemetry_stop.clone(),
        ));
        let runner = jobs::JobRunner::new(
            jobs::RunnerConfig {
                jobs: self.config.jobs.clone(),
                exec: self.config.exec.clone(),
                deploy: self.config.deploy.clone(),
                docker: self.config.docker.clone(),
                repo_dirs: self.config.inventory.repo_dirs.clone(),
                facts: facts.clone(),
                node_id: Some(identity.state.node_id),
                ai: Some(backends.clone()),
            },
            self.state.path(),
        )
        .map_err(|e| AgentError::Other(anyhow::Error::new(e).context("opening the job journal")))?;
        // The highest leader term this node has seen, kept over restarts (replicas, 1.10).
        runner.terms.keep_in(self.state.path(), identity.state.term);
        let (monitors_tx, monitor_results) = monitors::spawn(
            self.config.docker.socket.clone(),
            &tracker,
            telemetry_stop.clone(),
        );
        let (releases_tx, releases_rx) = watch::channel(Vec::new());
        tracker.spawn(updater(
            self.config.update.clone(),
            self.state.path().to_owned(),
            releases_rx,
            self.restart.clone(),
            shutdown.clone(),
        ));
        if let update::Startup::Confirming { deadline } = startup {
            tracker.spawn(confirm_or_roll_back(
                self.state.path().to_owned(),
                self.status.subscribe(),
                deadline,
                self.restart.clone(),
                shutdown.clone(),
            ));
        }
        let result = session::run(
            &self.config,
            &self.state,
            &controller,
            facts,
            feed,
            &runner,
            &self.status,
            session::Channels {
                releases: releases_tx,
                ai: ai_rx,
                monitors: monitors_tx,
                monitor_results,
                terms: runner.terms.clone(),
            },
            shutdown.clone(),
        )
        .await;
        // A new version that cannot talk to the controller at all gives way at once.
        if let (Err(e), update::Startup::Confirming { .. }) = (&result, &startup) {
            if let Ok(Some(exe)) = update::roll_back_pending(self.state.path(), &format!("{e:#}")) {
                *self.restart.lock().unwrap_or_else(|p| p.into_inner()) = Some(exe);
                shutdown.cancel();
            }
        }
        shutdown.cancel();
        runner.shutdown().await;
        telemetry_stop.cancel();
        tracker.close();
        tracker.wait().await;
        self.status.send_replace(AgentStatus::Stopped);
        if self.restart_into().is_some() {
            return Ok(());
        }
        result
    }
}

/// Wait for the controller's release list; update from a newer build for this platform.
async fn updater(
    config: config::UpdateConfig,
    state_dir: PathBuf,
    mut releases: watch::Receiver<Vec<nebula_protocol::release::AgentRelease>>,
    restart: Arc<Mutex<Option<PathBuf>>>,
    stop: CancellationToken,
) {
    let mut refused: Option<(String, [u8; 32])> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = releases.changed() => if changed.is_err() { return },
        }
        let list = releases.borrow_and_update().clone();
        let Some(r) = update::pick(&list, version(), &state_dir) else {
            continue;
        };
        if !config.enabled {
            tracing::info!(current = %version(), available = %r.version, "a newer agent is available; self-update is off (`[update] enabled = true`)");
            continue;
        }
        if refused.as_ref() == Some(&(r.version.clone(), r.sha256)) {
            continue;
        }
        match update::apply(&config, &state_dir, version(), r).await {
            Ok(exe) => {
                *restart.lock().unwrap_or_else(|p| p.into_inner()) = Some(exe);
                stop.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(version = %r.version, "update refused: {e}");
                refused = Some((r.version.clone(), r.sha256));
            }
        }
    }
}

/// A new version keeps itself once it reaches the controller; by the deadline it rolls back.
async fn confirm_or_roll_back(
    state_dir: PathBuf,
    mut status: watch::Receiver<AgentStatus>,
    deadline: std::time::Instant,
    restart: Arc<Mutex<Option<PathBuf>>>,
    stop: CancellationToken,
) {
    let connected = status.wait_for(|s| matches!(s, AgentStatus::Connected { .. }));
    tokio::select! {
        _ = stop.cancelled() => {}
        r = connected => if r.is_ok() { confirm(&state_dir) },
        _ = tokio::time::sleep_until(deadline.into()) => {
            match update::roll_back_pending(&state_dir, "the new version did not reach the controller in time") {
                Ok(Some(exe)) => {
                    *restart.lock().unwrap_or_else(|p| p.into_inner()) = Some(exe);
                    stop.cancel();
                }
                Ok(None) => {}
                Err(e) => tracing::error!("rolling back the update failed: {e}"),
            }
        }
    }
}

fn confirm(state_dir: &Path) {
    update::confirm(state_dir);
}
