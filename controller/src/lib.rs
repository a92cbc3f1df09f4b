//! The Nebula control plane.
//!
//! [`Controller::start`] opens the store, loads (or creates) the fleet CA, then runs these tasks,
//! all owned by one [`TaskTracker`] and stopped by one [`CancellationToken`]:
//!
//! * the QUIC accept loop ([`transport::accept_loop`]), which spawns one task per agent
//!   connection (an enrollment or a session);
//! * the HTTP API server ([`api`]), with graceful shutdown on the same token;
//! * the job engine's writer and scheduler, and one task per job stream ([`jobs`]);
//! * the reconciler, the service-map file watcher and one watcher per deploy ([`desired`]);
//! * the telemetry rollup writer and retention sweeper.
//!
//! Shared state lives in [`ControlPlane`]: the [`store::Store`] (the only code that touches the
//! database), the [`ca::CertificateAuthority`], the [`registry::Registry`] of live sessions and
//! the [`events::EventBus`] (a bounded broadcast channel). Every change a person makes (tokens,
//! node removal) goes through a `ControlPlane` method, which writes the store and publishes an
//! event; the HTTP API and `nebula dev` are thin callers of those methods.

use nebula_protocol::validate::validate_label;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use nebula_protocol::{close, JoinToken, Labels, SessionSettings};
use rand::distributions::{Alphanumeric, DistString};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

pub mod agents;
pub mod ai;
pub mod alerts;
pub mod authz;
mod background;
pub mod backup;
pub mod ca;
pub mod config;
pub mod containers;
pub mod desired;
pub mod discord;
pub mod events;
pub mod ha;
pub mod http;
pub mod https;
pub mod jobs;
pub mod metrics;
pub mod monitors;
pub mod registry;
pub mod releases;
pub mod secrets;
pub mod signin;
pub use nebula_store as store;
pub mod tasks;
pub mod telemetry;
pub mod transport;
pub mod users;
pub mod wake;
pub mod workflows;

pub use config::ControllerConfig;

use ca::CertificateAuthority;
use events::{Event, EventBus};
use registry::Registry;
use store::{millis, JoinTokenRecord, NewJoinToken, Store};

/// Builds more routes for the controller's HTTP server from the shared state.
pub type ExtraRoutes = Box<dyn FnOnce(Arc<ControlPlane>) -> axum::Router + Send>;
/// More background tasks (the Discord bot), registered with the controller's own driver so
/// they get its scopes (a leader task runs on one replica only) and show in its task list.
pub type ExtraTasks = Box<dyn FnOnce(&mut tasks::Driver, &Arc<ControlPlane>) + Send>;

/// Shared state of a running controller.
pub struct ControlPlane {
    pub config: ControllerConfig,
    pub store: Store,
    pub ca: CertificateAuthority,
    /// TLS on the HTTP listener (`None`: plain HTTP).
    pub https: Option<Arc<https::Https>>,
    pub registry: Registry,
    /// A follower's connection to the leader, over which it relays its agents' sessions.
    pub relay: transport::relay::Relay,
    pub events: EventBus,
    pub telemetry: Arc<telemetry::TelemetryHub>,
    pub metrics: Arc<metrics::Metrics>,
    /// Unfinished jobs (the job engine's shared state).
    pub jobs: jobs::JobTable,
    /// The service map in force and the reconciler's state.
    pub desired: desired::DesiredState,
    /// Nodes being woken (or whose wake failed).
    pub wakes: wake::WakeTable,
    /// Agent binaries served for installs and self-update.
    pub releases: Arc<releases::Releases>,
    /// Inference backends across the fleet, breakers, usage (the AI gateway's state).
    pub ai: ai::AiFleet,
    /// For the AI gateway's fallback provider.
    pub http_client: reqwest::Client,
    /// The QUIC port actually bound (installers and join commands name it).
    pub(crate) quic_port: std::sync::atomic::AtomicU16,
    pub(crate) enroll_slots: Arc<tokio::sync::Semaphore>,
    /// Connection counts behind the QUIC listener's caps.
    pub quic_limits: transport::limits::ConnectionCounts,
    /// Sign-in throttling (per username and address) and the hashing budget.
    pub signin: signin::SignInGuard,
    /// The gateway's budget for request bodies held at once, in bytes (`ai.max_buffered_bytes`).
    pub(crate) gateway_bodies: Arc<tokio::sync::Semaphore>,
    /// Alerting: the engine's state and the sender's activator.
    pub alerts: alerts::AlertBook,
    /// Monitors, their assignments to nodes and their results.
    pub monitors: monitors::MonitorBook,
    /// The Discord bot's servers, status and settings cache.
    pub discord: discord::DiscordBook,
    /// The key secrets are sealed under (the secret store's rows are in `store`).
    pub secrets: secrets::SecretBook,
    /// The workflow driver's mailbox.
    pub workflows: workflows::WorkflowBook,
    /// Container logs being followed (at most [`containers::MAX_LOG_FOLLOWERS`]).
    pub(crate) log_followers: Arc<tokio::sync::Semaphore>,
    /// Interactive sessions open (at most [`containers::exec::MAX_EXEC_SESSIONS`]).
    pub(crate) exec_sessions: Arc<tokio::sync::Semaphore>,
    /// Owns every task the controller spawns (stopped by the shutdown token); the dashboard's
    /// live streams run on it too.
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    /// Every background task's status (`GET /api/v1/tasks`).
    pub tasks: tasks::Tasks,
    /// This replica, and whether it leads.
    pub ha: Arc<ha::Ha>,
    /// API tokens recently checked (by hash), so that a busy client does not cost a database
    /// read per request. Entries live [`TOKEN_CACHE_TTL`].
    pub(crate) token_cache: std::sync::Mutex<
        std::collections::HashMap<String, (store::ApiTokenRecord, std::time::Instant)>,
    >,
}

/// How long a checked API token is trusted without reading the store again.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(5);

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("store", &self.store)
            .field("registry", &self.registry)
            .finish()
    }
}

/// A join token just created: its record and the one-time string to hand to an agent.
#[derive(Debug, Clone)]
pub struct CreatedJoinToken {
    pub record: JoinTokenRecord,
    pub token: String,
}

/// Errors from control-plane operations, mapped to HTTP statuses by the API.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// The request conflicts with the current state (e.g. cancelling a finished job).
    #[error("{0}")]
    Conflict(String),
    /// Throttled: try again later (HTTP 429).
    #[error("{0}")]
    TooManyRequests(String),
    /// The caller's role does not allow it (HTTP 403).
    #[error("{0}")]
    Forbidden(String),
    #[error("internal error")]
    Store(#[from] store::StoreError),
}

impl ControlPlane {
    /// The client's address for throttling: the TCP peer, or the last `X-Forwarded-For` hop
    /// when the peer is a trusted proxy (`http_limits.trusted_proxies`).
    pub fn client_ip(
        &self,
        peer: std::net::SocketAddr,
        headers: &axum::http::HeaderMap,
    ) -> std::net::IpAddr {
        if !self.config.http_limits.trusted_proxies.contains(&peer.ip()) {
            return peer.ip();
        }
        headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|hop| hop.trim().parse().ok())
            .next_back()
            .unwrap_or(peer.ip())
    }

    /// The QUIC port agents dial (the bound one, also when the config asked for port 0).
    pub fn quic_port(&self) -> u16 {
        self.quic_port.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Session settings handed to agents in `Welcome`.
    pub fn session_settings(&self) -> SessionSettings {
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        SessionSettings {
            telemetry_interval_ms: ms(self.config.telemetry_interval),
            keep_alive_ms: ms(self.config.keep_alive),
            idle_timeout_ms: ms(self.config.idle_timeout),
        }
    }

    /// The API token with this hash, from the cache when checked in the last few seconds.
    pub async fn api_token(
        &self,
        hash: &str,
    ) -> Result<Option<store::ApiTokenRecord>, store::StoreError> {
        let now = std::time::Instant::now();
        {
            let cache = self.token_cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((rec, at)) = cache.get(hash) {
                if now.duration_since(*at) < TOKEN_CACHE_TTL {
                    return Ok(Some(rec.clone()));
                }
            }
        }
        let rec = self.store.api_token_by_hash(hash).await?;
        if let Some(r) = &rec {
            let mut cache = self.token_cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= 1024 {
                cache.clear();
            }
            cache.insert(hash.to_owned(), (r.clone(), now));
        }
        Ok(rec)
    }

    /// Frames rejected as malformed or oversized since start.
    pub fn frames_rejected_total(&self) -> u64 {
        self.metrics.frames_rejected.get()
    }

    pub(crate) fn frames_rejected(&self) {
        self.metrics.frames_rejected.inc();
    }

    /// Create a join token. `ttl: None` never expires; `uses: None` is unlimited.
    pub async fn create_join_token(
        &self,
        ttl: Option<Duration>,
        uses: Option<u32>,
        labels: Labels,
        description: &str,
        cx: &authz::OpCtx,
    ) -> Result<CreatedJoinToken, OpError> {
        self.authorize(cx, authz::Op::ManageJoinTokens)?;
        let by = cx.actor.as_str();
        if let Some(t) = ttl {
            if t < Duration::from_secs(1) || t > Duration::from_secs(365 * 86400) {
                return Err(OpError::Invalid(
                    "a join token's lifetime must be between 1s and 365 days".into(),
                ));
            }
        }
        for (k, v) in &labels {
            validate_label(k, v).map_err(OpError::Invalid)?;
        }
        if uses == Some(0) {
            return Err(OpError::Invalid("uses must be at least 1".into()));
        }
        if description.len() > 200 {
            return Err(OpError::Invalid(
                "description is limited to 200 characters".into(),
            ));
        }
        let (id, secret) = {
            let mut rng = rand::thread_rng();
            (
                Alphanumeric.sample_string(&mut rng, 10).to_lowercase(),
                Alphanumeric.sample_string(&mut rng, 32),
            )
        };
        let expires_at = ttl.map(|t| millis(SystemTime::now() + t));
        self.store
            .create_join_token(&NewJoinToken {
                id: &id,
                secret_hash: &hash_secret(&secret),
                description,
                labels: &labels,
                created_by: by,
                expires_at,
                uses_left: uses.map(i64::from),
            })
            .await?;
        let record = self
            .store
            .join_token(&id)
            .await?
            .ok_or_else(|| OpError::NotFound(format!("join token {id} vanished")))?;
        let token = JoinToken {
            id: id.clone(),
            secret,
            ca_sha256: self.ca.pin(),
        }
        .to_string();
        info!(token = %id, by, "join token created");
        self.record(
            cx,
            authz::Change {
                action: "token.create",
                target: id.clone(),
                detail: serde_json::json!({"uses": uses, "expires_at": expires_at, "labels": labels}),
                event: Some(Event::JoinTokenCreated {
                    id,
                    by: by.to_owned(),
                }),
            },
        );
        Ok(CreatedJoinToken { record, token })
    }

    pub async fn revoke_join_token(&self, id: &str, cx: &authz::OpCtx) -> Result<(), OpError> {
        self.authorize(cx, authz::Op::ManageJoinTokens)?;
        if !self.store.revoke_join_token(id).await? {
            return Err(OpError::NotFound(format!("no active join token `{id}`")));
        }
        info!(token = %id, by = %cx.actor, "join token revoked");
        self.record(
            cx,
            authz::Change {
                action: "token.revoke",
                target: id.to_owned(),
                detail: serde_json::json!({}),
                event: Some(Event::JoinTokenRevoked {
                    id: id.to_owned(),
                    by: cx.actor.clone(),
                }),
            },
        );
        Ok(())
    }

    /// Remove a node: revoke its certificates, cut its connection, forget it.
    pub async fn remove_node(&self, name: &str, cx: &authz::OpCtx) -> Result<uuid::Uuid, OpError> {
        self.authorize(cx, authz::Op::RemoveNode)?;
        let id = self
            .store
            .remove_node(name, millis(SystemTime::now()))
            .await?
            .ok_or_else(|| OpError::NotFound(format!("no node named `{name}`")))?;
        self.registry
            .disconnect(id, close::REVOKED, "node removed: certificate revoked");
        self.telemetry.forget(id);
        self.jobs.nodes_changed();
        info!(node = %id, name, by = %cx.actor, "node removed");
        self.record(
            cx,
            authz::Change {
                action: "node.remove",
                target: name.to_owned(),
                detail: serde_json::json!({"id": id}),
                event: Some(Event::NodeRemoved {
                    id,
                    name: name.to_owned(),
                }),
            },
        );
        Ok(id)
    }
}

/// SHA-256 (hex) of a high-entropy secret (join token secrets, API tokens).
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A controller that is running. Drop does not stop it: call [`Controller::shutdown`].
pub struct Controller {
    pub control_plane: Arc<ControlPlane>,
    pub http_addr: std::net::SocketAddr,
    pub quic_addr: std::net::SocketAddr,
    /// The admin API token, when this start created it (printed once, stored hashed).
    pub new_admin_token: Option<String>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("http_addr", &self.http_addr)
            .field("quic_addr", &self.quic_addr)
            .finish()
    }
}

impl Controller {
    /// Open the store, load the CA, bind both listeners and start serving. The returned
    /// controller stops when `shutdown` is cancelled (await [`Controller::wait`]).
    pub async fn start(
        config: ControllerConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        Self::start_with(config, shutdown, None).await
    }

    /// [`Controller::start`], with more HTTP routes (the dashboard) merged into the API's server.
    pub async fn start_with(
        config: ControllerConfig,
        shutdown: CancellationToken,
        extra_routes: Option<ExtraRoutes>,
    ) -> anyhow::Result<Self> {
        Self::start_with_tasks(config, shutdown, extra_routes, None).await
    }

    /// [`Controller::start_with`], with more background tasks.
    pub async fn start_with_tasks(
        config: ControllerConfig,
        shutdown: CancellationToken,
        extra_routes: Option<ExtraRoutes>,
        extra_tasks: Option<ExtraTasks>,
    ) -> anyhow::Result<Self> {
        config.validate().map_err(anyhow::Error::msg)?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        let url = config.database_url();
        let store = Store::connect(&url)
            .await
            .with_context(|| format!("opening database {}", store::redact_url(&url)))?;
        owner_only(&config).context("making the data dir the owner's only")?;
        let ca = load_fleet_ca(&store, &config).await?;
        let reset_key = load_or_create_secret(&config.data_dir.join("pki").join("reset.key"))?;
        let https = https_of(&config, &ca).await?;
        let secret_keys = secrets::keyring::Keyring::load_or_create(&config.secret_key_file())?;
        let new_admin_token = bootstrap_admin_token(&store, &config).await?;
        let hub = Arc::new(telemetry::TelemetryHub::new(config.telemetry_history));
        let mut metrics = metrics::Metrics::new();
        metrics.register_nodes(Arc::downgrade(&hub));
        let tracker = TaskTracker::new();
        let signer = releases::ReleaseSigner::load_or_create(
            &config.data_dir.join("pki").join("release-signing.pk8"),
        )
        .context("loading the release-signing key")?;
        let local_agent = std::env::current_exe().ok().and_then(|exe| {
            Some(
                exe.parent()?
                    .join(format!("nebula-agent{}", std::env::consts::EXE_SUFFIX)),
            )
        });
        let releases = Arc::new(releases::Releases::new(
            config.agent_dir(),
            local_agent,
            config.public_url.clone().unwrap_or_default(),
            signer,
        ));
        let r = releases.clone();
        tokio::task::spawn_blocking(move || r.scan())
            .await
            .context("scanning agent releases")?;
        let cp = Arc::new(ControlPlane {
            releases,
            ai: ai::AiFleet::new(
                ai::filters::Filters::new(config.ai.filters.clone()).map_err(anyhow::Error::msg)?,
            ),
            http_client: reqwest::Client::builder()
                .tcp_nodelay(true)
                .build()
                .context("building the HTTP client")?,
            quic_port: std::sync::atomic::AtomicU16::new(config.quic_listen.port()),
            jobs: jobs::JobTable::default(),
            desired: desired::DesiredState::default(),
            wakes: wake::WakeTable::default(),
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
            token_cache: Default::default(),
            tasks: Default::default(),
            ha: Arc::new(ha::Ha::new(store.backend())),
            quic_limits: Default::default(),
            signin: Default::default(),
            log_followers: Arc::new(tokio::sync::Semaphore::new(containers::MAX_LOG_FOLLOWERS)),
            alerts: Default::default(),
            monitors: Default::default(),
            discord: Default::default(),
            secrets: secrets::SecretBook::new(secret_keys),
            workflows: workflows::WorkflowBook::default(),
            exec_sessions: Arc::new(tokio::sync::Semaphore::new(
                containers::exec::MAX_EXEC_SESSIONS,
            )),
            gateway_bodies: Arc::new(tokio::sync::Semaphore::new(
                config
                    .ai
                    .max_buffered_bytes
                    .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            )),
            enroll_slots: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_enrollments.max(1),
            )),
            config,
            store,
            ca,
            https,
            registry: Registry::default(),
            relay: Default::default(),
            events: EventBus::new(4096),
            telemetry: hub,
            metrics: Arc::new(metrics),
        });
        let endpoint = transport::endpoint(&cp, &reset_key)
            .with_context(|| format!("binding QUIC on {}", cp.config.quic_listen))?;
        let quic_addr = endpoint.local_addr()?;
        cp.quic_port
            .store(quic_addr.port(), std::sync::atomic::Ordering::Relaxed);
        let listener = tokio::net::TcpListener::bind(cp.config.http_listen)
            .await
            .with_context(|| format!("binding HTTP on {}", cp.config.http_listen))?;
        let http_addr = listener.local_addr()?;
        let redirect = https::bind_redirect(&cp, http_addr.port()).await?;
        // On SQLite this controller leads alone; replicas on PostgreSQL follow the election.
        cp.ha
            .listening(&cp.config, cp.https.is_some(), http_addr, quic_addr)?;
        let leadership = cp.ha.leadership();
        // The writer first: recovering and creating jobs go through it.
        let mut first = tasks::Driver::new(cp.tasks.clone());
        first.service(background::JOB_WRITER, {
            let cp = cp.clone();
            move |cx| jobs::writer(cp.clone(), cx.cancel)
        });
        first.start(leadership.clone(), shutdown.clone(), &tracker);
        cp.recover_jobs().await.context("loading unfinished jobs")?;
        cp.load_desired()
            .await
            .context("loading the desired state")?;
        monitors::load(&cp)
            .await
            .context("loading monitors and their uptime")?;
        let mut router = http::router(cp.clone());
        if let Some(extra) = extra_routes {
            router = router.merge(extra(cp.clone()));
        }
        let router = https::with_hsts(router, cp.https.is_some()).layer(
            axum::middleware::from_fn_with_state(cp.clone(), http::replica_proxy::to_leader),
        );
        let mut driver = tasks::Driver::new(cp.tasks.clone());
        background::register(
            &mut driver,
            &cp,
            endpoint,
            listener,
            router,
            redirect,
            &tracker,
        );
        if let Some(extra) = extra_tasks {
            extra(&mut driver, &cp);
        }
        driver.start(leadership, shutdown.clone(), &tracker);
        info!(%quic_addr, %http_addr, ca_pin = %cp.ca.pin_hex(), backend = ?cp.store.backend(), "controller started");
        Ok(Controller {
            control_plane: cp,
            http_addr,
            quic_addr,
            new_admin_token,
            shutdown,
            tracker,
        })
    }

    /// Stop all tasks and wait for them.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.wait().await;
    }

    /// Wait until every task has stopped (after the shutdown token fired).
    pub async fn wait(self) {
        let started = std::time::Instant::now();
        self.tracker.close();
        self.tracker.wait().await;
        tracing::debug!(took = ?started.elapsed(), "every task stopped");
        self.control_plane
            .ha
            .release(&self.control_plane.store)
            .await;
        self.control_plane.store.close().await;
        tracing::debug!(took = ?started.elapsed(), "store closed");
    }
}

/// The fleet CA of the data dir, made on the first start only: a database that has a fleet
/// (or records another CA) is refused, so a second CA is never made silently.
async fn load_fleet_ca(
    store: &Store,
    config: &ControllerConfig,
) -> anyhow::Result<CertificateAuthority> {
    let recorded = store.fleet_ca_pin().await?;
    if !config.data_dir.join("pki").join("ca.key").exists()
        && (recorded.is_some() || store.has_fleet().await?)
    {
        anyhow::bail!(
            "the database holds a fleet but {} has no fleet CA: a new CA would cut every agent off. \
             Restore the data dir from a backup, or add this controller as a replica \
             (`nebula replica add` on a running one, `nebula replica join` here)",
            config.data_dir.display()
        );
    }
    let ca =
        CertificateAuthority::load_or_create(&config.data_dir.join("pki"), &config.server_names)
            .context("loading the fleet CA")?;
    let pin = store
        .claim_fleet_ca_pin(&ca.pin_hex(), store::millis(std::time::SystemTime::now()))
        .await?;
    anyhow::ensure!(
        pin == ca.pin_hex(),
        "the fleet CA in {} (pin {}) is not this database's (pin {pin}): this data dir belongs to another fleet",
        config.data_dir.display(),
        ca.pin_hex()
    );
    Ok(ca)
}

/// TLS for the HTTP listener as the config asks for it (`None`: plain HTTP).
async fn https_of(
    config: &ControllerConfig,
    ca: &CertificateAuthority,
) -> anyhow::Result<Option<Arc<https::Https>>> {
    // The names people and agents reach this controller by are names of its certificate.
    let mut names = config.server_names.clone();
    for addr in [&config.public_url, &config.public_address]
        .into_iter()
        .flatten()
    {
        names.extend(https::host_of(addr));
    }
    https::Https::from_config(
        &config.https,
        config.http_listen,
        &names,
        &config.data_dir,
        ca,
    )
    .await
}

/// Make sure an admin API token exists. Returns the token when it was generated now.
async fn bootstrap_admin_token(
    store: &Store,
    config: &ControllerConfig,
) -> anyhow::Result<Option<String>> {
    if let Some(path) = &config.admin_token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("reading admin token file {}", path.display()))?;
        let token = token.trim();
        anyhow::ensure!(
            token.len() >= 16,
            "admin token in {} is shorter than 16 characters",
            path.display()
        );
        store
            .upsert_api_token("admin", &hash_secret(token), "admin")
            .await?;
        return Ok(None);
    }
    if store.api_token_count().await? > 0 {
        return Ok(None);
    }
    let token = format!(
        "nbl_{}",
        Alphanumeric.sample_string(&mut rand::thread_rng(), 40)
    );
    store
        .upsert_api_token("admin", &hash_secret(&token), "admin")
        .await?;
    Ok(Some(token))
}

/// The data dir (0700) and the embedded database's files (0600) are the owner's only, whatever
/// the umask: they hold the CA key, the secret key and sealed secrets.
fn owner_only(config: &ControllerConfig) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let set = |p: &std::path::Path, mode: u32| match std::fs::set_permissions(
            p,
            std::fs::Permissions::from_mode(mode),
        ) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        };
        set(&config.data_dir, 0o700)?;
        if config.database_url.is_none() {
            let db = config.data_dir.join("nebula.db");
            for suffix in ["", "-wal", "-shm"] {
                let mut p = db.clone().into_os_string();
                p.push(suffix);
                set(std::path::Path::new(&p), 0o600)?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = config;
    Ok(())
}

fn load_or_create_secret(path: &std::path::Path) -> anyhow::Result<[u8; 32]> {
    if let Ok(bytes) = std::fs::read(path) {
        if let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) {
            return Ok(key);
        }
    }
    let key: [u8; 32] = rand::random();
    ca::write_private(path, &key)?;
    Ok(key)
}
