//! The long-lived session with the controller over `nebula/1`, and the reconnect loop around it.
//!
//! One task runs [`run`]: connect, `Hello` -> `Welcome`, send the deploy policy (to 1.5+
//! controllers), then serve the session stream (renew the
//! certificate after two thirds of its lifetime, answer messages) and hand every job stream the
//! controller opens to the [`JobRunner`] until the connection ends, then
//! back off (capped exponential, with jitter) and reconnect. Permanent refusals (protocol major
//! mismatch, revoked node) end the loop with an error instead of retrying.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nebula_protocol::monitors::MAX_RESULTS_PER_BATCH;
use nebula_protocol::release::AgentRelease;
use nebula_protocol::{
    self as proto, close, AgentMessage, ControllerMessage, FrameError, Hello, NodeFacts,
    ServerHello, SessionSettings, Welcome, CONTROLLER_SERVER_NAME,
};
use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::identity::{new_key_and_csr, StateDir};
use crate::jobs::JobRunner;
use crate::telemetry::TelemetryFeed;
use crate::{tls, AgentConfig, AgentError};
use nebula_protocol::telemetry::{Datagram, TelemetrySample};

/// What the agent is doing, for callers that watch it (the CLI, tests, the fleet simulator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStatus {
    Starting,
    Connecting { attempt: u32 },
    Connected { node_id: Uuid, name: String },
    Stopped,
}

/// Capped exponential backoff with jitter: the n-th delay is drawn from [d/2, d] where
/// d = min(max, min * 2^n).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let d = self.min.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = d / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }
}

enum SessionEnd {
    Shutdown,
    /// The connection ended; `established` says whether a Welcome was received.
    Lost {
        established: bool,
        reason: String,
    },
    /// The controller moved this agent to another replica (1.11): dial it next, at once.
    /// `lasted`: how long the session was up.
    Moved {
        to: String,
        lasted: Duration,
    },
}

/// Channels between a session and the agent's other tasks.
#[derive(Debug)]
pub struct Channels {
    /// The controller's agent builds, for the updater.
    pub releases: watch::Sender<Vec<AgentRelease>>,
    /// The inference backends' inventory, sent when it changes (to 1.4+ controllers).
    pub ai: watch::Receiver<nebula_protocol::ai::AiInventory>,
    /// The monitors the controller assigned (1.7), for the monitor runner.
    pub monitors: watch::Sender<Vec<nebula_protocol::monitors::MonitorSpec>>,
    /// Their results, sent in batches.
    pub monitor_results: tokio::sync::mpsc::Receiver<nebula_protocol::monitors::MonitorResult>,
    /// The highest leader term seen (1.10), shared with the job runner.
    pub terms: Arc<crate::term::Terms>,
}

/// The addresses to try, in order: the configured controller, every replica the controller
/// named (1.9; the leader first when a replica named it), then the configured replicas, each
/// once.
fn addresses(primary: &str, configured: &[String], state: &StateDir) -> Vec<String> {
    let mut all = vec![primary.to_owned()];
    let saved = state.load().map(|id| id.state.replicas).unwrap_or_default();
    for r in saved.iter().chain(configured) {
        if !all.contains(r) {
            all.push(r.clone());
        }
    }
    all
}

/// Run sessions until `shutdown` fires or the controller refuses for good. When a connection
/// is lost or refused, the next address is tried at once (with a little jitter); the backoff
/// applies only after every address failed in a row.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: &AgentConfig,
    state: &StateDir,
    primary: &str,
    facts: NodeFacts,
    mut feed: TelemetryFeed,
    runner: &Arc<JobRunner>,
    status: &watch::Sender<AgentStatus>,
    mut channels: Channels,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    // The socket's address family from the first address that resolves (any replica will
    // do; none resolving now is not fatal: they are tried again in turn).
    let mut first: SocketAddr = ([0, 0, 0, 0], 0).into();
    for a in addresses(primary, &config.replicas, state) {
        if let Ok(addr) = crate::resolve(&a).await {
            first = addr;
            break;
        }
    }
    let endpoint = tls::client_endpoint(first).map_err(|e| AgentError::Other(e.into()))?;
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    let mut next = 0usize;
    let mut failed_in_a_row = 0usize;
    let mut moved_to: Option<String> = None;
    let result = loop {
        status.send_replace(AgentStatus::Connecting {
            attempt: backoff.attempt(),
        });
        let all = addresses(primary, &config.replicas, state);
        let target = moved_to
            .take()
            .unwrap_or_else(|| all[next % all.len()].clone());
        let addr = match crate::resolve(&target).await {
            Ok(a) => a,
            Err(e) => {
                debug!(%target, "{e:#}");
                next += 1;
                failed_in_a_row += 1;
                if !pause(&mut backoff, failed_in_a_row, all.len(), &shutdown).await {
                    break Ok(());
                }
                continue;
            }
        };
        match session(
            config,
            state,
            &endpoint,
            addr,
            &facts,
            &mut feed,
            runner,
            status,
            &mut channels,
            &shutdown,
        )
        .await
        {
            Ok(SessionEnd::Shutdown) => break Ok(()),
            // A move to where it is, or right after connecting, is an ordinary loss: a faulty
            // controller cannot make the agent reconnect in a tight loop.
            Ok(SessionEnd::Moved { to, lasted }) => {
                let settled = lasted >= config.reconnect_min.max(Duration::from_secs(1));
                if settled {
                    backoff.reset();
                    failed_in_a_row = 0;
                }
                if settled && to != target {
                    info!(from = %target, %to, "the controller moved this agent to another replica");
                    // Later tries go on from there.
                    next = all.iter().position(|a| *a == to).unwrap_or(next);
                    moved_to = Some(to);
                    continue;
                }
                warn!(controller = %target, %to, ?lasted, "a move to the same replica or right after connecting: reconnecting as after a lost connection");
            }
            Ok(SessionEnd::Lost {
                established,
                reason,
            }) => {
                if established {
                    backoff.reset();
                    failed_in_a_row = 0;
                }
                warn!(%reason, controller = %target, "connection to the controller lost; reconnecting");
            }
            Err(e) if e.is_permanent() => break Err(e),
            Err(e) => debug!(controller = %target, "connecting failed: {e:#}"),
        }
        next += 1;
        failed_in_a_row += 1;
        if !pause(&mut backoff, failed_in_a_row, all.len(), &shutdown).await {
            break Ok(());
        }
    };
    status.send_replace(AgentStatus::Stopped);
    endpoint.close(close::NORMAL.into(), b"agent stopping");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    result
}

/// Wait before the next try: the backoff once every address failed in a row, else a short
/// jitter (a replica's agents do not all arrive at the next one at once). False on shutdown.
async fn pause(
    backoff: &mut Backoff,
    failed_in_a_row: usize,
    addresses: usize,
    shutdown: &CancellationToken,
) -> bool {
    let delay = if failed_in_a_row.is_multiple_of(addresses.max(1)) {
        backoff.next_delay()
    } else {
        Duration::from_millis(rand::thread_rng().gen_range(0..=250))
    };
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Keep-alive and idle timeout for the next connection: the controller's latest settings when
/// known, else the local config.
fn liveness(config: &AgentConfig, saved: Option<&SessionSettings>) -> (Duration, Duration) {
    match saved {
        Some(s) => {
            let keep_alive =
                Duration::from_millis(s.keep_alive_ms.into()).max(Duration::from_millis(100));
            let idle = Duration::from_millis(s.idle_timeout_ms.into()).max(keep_alive * 2);
            (keep_alive, idle)
        }
        None => (config.keep_alive, config.idle_timeout),
    }
}

/// One session, from the handshake to its end: connect, `Hello` -> `Welcome`, then a
/// [`Session`] serves the connection.
#[allow(clippy::too_many_arguments)]
async fn session(
    config: &AgentConfig,
    state: &StateDir,
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    facts: &NodeFacts,
    feed: &mut TelemetryFeed,
    runner: &Arc<JobRunner>,
    status: &watch::Sender<AgentStatus>,
    channels: &mut Channels,
    shutdown: &CancellationToken,
) -> Result<SessionEnd, AgentError> {
    let identity = state.load()?;
    let (keep_alive, idle) = liveness(config, identity.state.settings.as_ref());
    let cfg = tls::session_config(&identity, keep_alive, idle).map_err(AgentError::Other)?;
    let connecting = endpoint
        .connect_with(cfg, addr, CONTROLLER_SERVER_NAME)
        .map_err(|e| AgentError::Other(e.into()))?;
    let conn = tokio::select! {
        _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        // Short: with several replicas, a dead one must not hold the next try up for long.
        c = tokio::time::timeout(Duration::from_secs(5), connecting) => c
            .map_err(|_| AgentError::Timeout("connecting"))?
            .map_err(|e| AgentError::Connect(identity.state.controller.clone(), e))?,
    };
    let (send, recv, welcome) = match handshake(&conn, facts, feed).await {
        Ok(h) => h,
        Err(e) => {
            // A replica that does not lead names the leader: try it next.
            if let Some(at) = leader_hint(&conn) {
                debug!(leader = %at, "turned away by a replica that does not lead");
                if let Err(e) = state.remember_leader(&at) {
                    warn!("saving the leader's address: {e}");
                }
            }
            return Err(e);
        }
    };
    if welcome.node_id != identity.state.node_id {
        warn!(ours = %identity.state.node_id, theirs = %welcome.node_id, "controller names another node id than our certificate");
    }
    info!(node = %welcome.node_id, name = %welcome.name, controller_version = %welcome.controller_version, "connected to the controller");
    status.send_replace(AgentStatus::Connected {
        node_id: welcome.node_id,
        name: welcome.name.clone(),
    });
    let saved = &identity.state.settings;
    if let Some(end) = adopt_settings(config, state, saved, &welcome.settings, keep_alive)? {
        conn.close(close::NORMAL.into(), b"reconnecting with new settings");
        return Ok(end);
    }
    let renew_at = identity
        .renew_at()
        .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(3600));
    let mut session = Session {
        config,
        state,
        conn,
        send,
        keep_alive,
        saved_settings: Some(welcome.settings.clone()),
        // Controllers from 1.4 on hear about inference backends.
        ai_aware: welcome.controller_version.minor >= 4,
        controller_minor: welcome.controller_version.minor,
        renew_timer: Box::pin(tokio::time::sleep(until(renew_at))),
        pending_key: None,
        samples_sent: 0,
    };
    session.start(&welcome, feed, channels).await?;
    let conn = session.conn.clone();
    let up = std::time::Instant::now();
    let end = session.serve(recv, feed, runner, channels, shutdown).await;
    let lasted = up.elapsed();
    // However the session noticed a lost connection (a read, or a failed write), a move names
    // the replica to dial next.
    match (&end, move_hint(&conn)) {
        (Ok(SessionEnd::Lost { .. }), Some(to)) => Ok(SessionEnd::Moved { to, lasted }),
        (Err(e), Some(to)) if !e.is_permanent() => Ok(SessionEnd::Moved { to, lasted }),
        _ => end,
    }
}

/// Open the session stream, say `Hello` (with the GPUs and container runtime the telemetry
/// found) and read the controller's answer.
async fn handshake(
    conn: &quinn::Connection,
    facts: &NodeFacts,
    feed: &TelemetryFeed,
) -> Result<(quinn::SendStream, quinn::RecvStream, Welcome), AgentError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| AgentError::Other(e.into()))?;
    let mut facts = facts.clone();
    {
        let inv = feed.inventory.borrow();
        facts.gpus = inv.gpus.clone();
        facts.container_runtime = inv.container_runtime.clone();
    }
    let hello = Hello {
        version: proto::PROTOCOL_VERSION,
        agent_version: crate::version().into(),
        facts,
    };
    proto::write_message(&mut send, &hello).await?;
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        proto::read_message::<ServerHello, _>(&mut recv, proto::DEFAULT_MAX_FRAME),
    )
    .await
    .map_err(|_| AgentError::Timeout("waiting for Welcome"))?;
    match reply {
        Ok(ServerHello::Welcome(w)) => Ok((send, recv, w)),
        Ok(ServerHello::Refused(r)) => {
            conn.close(close::NORMAL.into(), b"refused");
            Err(AgentError::Refused(r))
        }
        Err(e) => {
            // The stream may have been cut by a close whose reason says why.
            let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
            Err(permanent_close(conn).unwrap_or(AgentError::Frame(e)))
        }
    }
}

/// The leader's address from a `NOT_LEADER` close ("... the leader is at HOST:PORT").
fn leader_hint(conn: &quinn::Connection) -> Option<String> {
    named(conn, close::NOT_LEADER)
}

/// The replica a `MOVE` close names (1.11).
fn move_hint(conn: &quinn::Connection) -> Option<String> {
    named(conn, close::MOVE)
}

fn named(conn: &quinn::Connection, code: u32) -> Option<String> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == code.into() => {
            close::named_address(code, &c.reason)
        }
        _ => None,
    }
}

/// A close that must not be retried (the node was revoked, or refused for good), if that is
/// how the connection ended.
fn permanent_close(conn: &quinn::Connection) -> Option<AgentError> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == close::REVOKED.into() || c.error_code == close::REFUSED.into() =>
        {
            Some(AgentError::Closed(
                String::from_utf8_lossy(&c.reason).into_owned(),
            ))
        }
        _ => None,
    }
}

/// A session after `Welcome`: owns the connection and the session stream, with one method per
/// message family (inventories and telemetry, certificates, settings, releases, the end).
struct Session<'a> {
    config: &'a AgentConfig,
    state: &'a StateDir,
    conn: quinn::Connection,
    send: quinn::SendStream,
    /// The keep-alive this connection was opened with.
    keep_alive: Duration,
    saved_settings: Option<SessionSettings>,
    ai_aware: bool,
    /// The controller's protocol minor (what it can read).
    controller_minor: u16,
    renew_timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// The key of a renewal asked for and not answered yet.
    pending_key: Option<rcgen::KeyPair>,
    samples_sent: u64,
}

impl Session<'_> {
    /// What the controller hears first: the telemetry interval is adopted, then the deploy
    /// policy, the inventory and the AI inventory go out.
    async fn start(
        &mut self,
        welcome: &Welcome,
        feed: &mut TelemetryFeed,
        channels: &mut Channels,
    ) -> Result<(), AgentError> {
        feed.interval.send_replace(
            Duration::from_millis(welcome.settings.telemetry_interval_ms.into())
                .max(Duration::from_millis(100)),
        );
        // Controllers from 1.5 on hear what this host's deploy policy allows, before the
        // inventory (which makes the node known to the reconciler), so that their first plan
        // for this node already shows what it would refuse. Older ones are not sent it (one
        // would answer `Unsupported`, which is logged and ignored anyway).
        if welcome.controller_version.minor >= 5 {
            let policy = AgentMessage::DeployPolicy(self.config.deploy.summary());
            proto::write_message(&mut self.send, &policy).await?;
        }
        if welcome.controller_version.minor >= 6 {
            let policy = AgentMessage::DockerPolicy(self.config.docker.summary());
            proto::write_message(&mut self.send, &policy).await?;
        }
        // The inventory first, so every sample that follows can be read.
        self.inventory(feed).await?;
        if self.ai_aware {
            self.ai_inventory(channels).await?;
        }
        Ok(())
    }

    /// Serve the session until it ends: one `select!` over its inputs, each handed to its
    /// method.
    async fn serve(
        &mut self,
        mut recv: quinn::RecvStream,
        feed: &mut TelemetryFeed,
        runner: &Arc<JobRunner>,
        channels: &mut Channels,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, AgentError> {
        // Cancel-safe: the select below may drop a read in the middle of a frame.
        let mut frames = proto::FrameReader::new(proto::DEFAULT_MAX_FRAME);
        let conn = self.conn.clone();
        let mut results = Vec::with_capacity(MAX_RESULTS_PER_BATCH);
        let mut results_open = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(self.stop().await),
                stream = conn.accept_bi() => {
                    // A job: the controller opens one stream per job.
                    if let Ok((send, recv)) = stream {
                        runner.spawn_stream(send, recv);
                    }
                }
                changed = channels.ai.changed(), if self.ai_aware => {
                    if changed.is_ok() {
                        self.ai_inventory(channels).await?;
                    }
                }
                changed = feed.inventory.changed() => {
                    if changed.is_ok() {
                        self.inventory(feed).await?;
                    }
                }
                changed = feed.samples.changed() => {
                    if changed.is_ok() {
                        self.sample(feed).await?;
                    }
                }
                n = channels.monitor_results.recv_many(&mut results, MAX_RESULTS_PER_BATCH), if self.controller_minor >= 7 && results_open => {
                    // Zero: the runner is gone (the agent is stopping).
                    results_open = n > 0;
                    if n > 0 {
                        let batch = AgentMessage::MonitorResults(std::mem::take(&mut results));
                        proto::write_message(&mut self.send, &batch).await?;
                    }
                }
                _ = &mut self.renew_timer, if self.pending_key.is_none() => self.renew().await?,
                msg = frames.read_message::<ControllerMessage, _>(&mut recv) => {
                    if let Some(end) = self.message(msg, channels).await? {
                        return Ok(end);
                    }
                }
            }
        }
    }

    /// The telemetry inventory, then (to a 1.6 controller) its containers' details.
    async fn inventory(&mut self, feed: &mut TelemetryFeed) -> Result<(), AgentError> {
        let inventory = feed.inventory.borrow_and_update().clone();
        let msg = AgentMessage::TelemetryInventory(inventory.telemetry.clone());
        proto::write_message(&mut self.send, &msg).await?;
        if self.controller_minor >= 6 {
            let msg = AgentMessage::ContainerDetails(inventory.details.clone());
            proto::write_message(&mut self.send, &msg).await?;
        }
        Ok(())
    }

    async fn ai_inventory(&mut self, channels: &mut Channels) -> Result<(), AgentError> {
        let inv = channels.ai.borrow_and_update().clone();
        proto::write_message(&mut self.send, &AgentMessage::AiInventory(inv)).await?;
        Ok(())
    }

    /// The latest sample, after the inventory it refers to when that changed too.
    async fn sample(&mut self, feed: &mut TelemetryFeed) -> Result<(), AgentError> {
        let Some(sample) = feed.samples.borrow_and_update().clone() else {
            return Ok(());
        };
        if feed.inventory.has_changed().unwrap_or(false) {
            self.inventory(feed).await?;
        }
        send_sample(&self.conn, &sample).await;
        self.samples_sent += 1;
        if self.samples_sent == 1 {
            debug!("first telemetry sample sent");
        }
        Ok(())
    }

    /// Certificates: ask for a new one, two thirds into the current one's lifetime.
    async fn renew(&mut self) -> Result<(), AgentError> {
        let (key, csr_der) = new_key_and_csr()?;
        info!("renewing the node certificate");
        let msg = AgentMessage::RenewCertificate { csr_der };
        proto::write_message(&mut self.send, &msg).await?;
        self.pending_key = Some(key);
        Ok(())
    }

    /// Certificates: save the renewed one, tell the controller, and set the next renewal.
    async fn renewed(&mut self, cert_der: &[u8]) -> Result<(), AgentError> {
        let Some(key) = self.pending_key.take() else {
            warn!("unrequested certificate ignored");
            return Ok(());
        };
        self.state.save_cert(&key, cert_der)?;
        // Saved: the controller may now revoke the certificate this session uses.
        proto::write_message(&mut self.send, &AgentMessage::CertificateSaved).await?;
        let next = crate::identity::validity(cert_der)
            .map(|(nb, na)| nb + na.duration_since(nb).unwrap_or_default() * 2 / 3)
            .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(3600));
        info!(renew_at = %humantime::format_rfc3339_seconds(next), "certificate renewed and saved");
        let at = tokio::time::Instant::now() + until(next);
        self.renew_timer.as_mut().reset(at);
        Ok(())
    }

    /// One message on the session stream; `Some` ends the session.
    async fn message(
        &mut self,
        msg: Result<ControllerMessage, FrameError>,
        channels: &mut Channels,
    ) -> Result<Option<SessionEnd>, AgentError> {
        match msg {
            Ok(ControllerMessage::CertificateRenewed { cert_der }) => {
                self.renewed(&cert_der).await?
            }
            Ok(ControllerMessage::RenewalRefused(r)) => {
                warn!("certificate renewal refused: {r}; retrying in a minute");
                self.pending_key = None;
                let at = tokio::time::Instant::now() + Duration::from_secs(60);
                self.renew_timer.as_mut().reset(at);
            }
            Ok(ControllerMessage::SettingsChanged(s)) => {
                info!(?s, "settings changed");
                let (config, state) = (self.config, self.state);
                let saved = &self.saved_settings;
                if let Some(end) = adopt_settings(config, state, saved, &s, self.keep_alive)? {
                    self.conn
                        .close(close::NORMAL.into(), b"reconnecting with new settings");
                    return Ok(Some(end));
                }
                self.saved_settings = Some(s);
            }
            Ok(ControllerMessage::Bye { reason }) => {
                return Ok(Some(SessionEnd::Lost {
                    established: true,
                    reason: format!("controller said bye: {reason}"),
                }));
            }
            Ok(ControllerMessage::Unsupported { variant }) => {
                debug!(variant, "controller does not support a message we sent");
            }
            Ok(ControllerMessage::Monitors(list)) => {
                debug!(count = list.len(), "monitors assigned");
                channels.monitors.send_replace(list);
            }
            Ok(ControllerMessage::Replicas(list)) => {
                debug!(?list, "the controller's replicas");
                let list: Vec<String> = list.into_iter().take(64).collect();
                if let Err(e) = self.state.save_replicas(&list) {
                    warn!("saving the replicas' addresses: {e}");
                }
            }
            Ok(ControllerMessage::Term(term)) => match channels.terms.admit(term) {
                Ok(_) => debug!(term, "the leader's term"),
                Err(why) => {
                    warn!("leaving a deposed leader: {why}");
                    self.conn.close(close::NORMAL.into(), why.as_bytes());
                    return Ok(Some(SessionEnd::Lost {
                        established: true,
                        reason: format!("the controller is a deposed leader ({why})"),
                    }));
                }
            },
            Ok(ControllerMessage::AgentReleases(list)) => {
                debug!(count = list.len(), "the controller's agent builds");
                channels.releases.send_replace(list);
            }
            Err(FrameError::UnknownVariant { index, .. }) => {
                let answer = AgentMessage::Unsupported { variant: index };
                proto::write_message(&mut self.send, &answer).await?;
            }
            Err(e) => return self.lost(e).await.map(Some),
        }
        Ok(None)
    }

    /// The session stream ended: a permanent refusal, or a connection lost (reconnect).
    async fn lost(&self, e: FrameError) -> Result<SessionEnd, AgentError> {
        let _ = tokio::time::timeout(Duration::from_millis(200), self.conn.closed()).await;
        if let Some(permanent) = permanent_close(&self.conn) {
            return Err(permanent);
        }
        let reason = self
            .conn
            .close_reason()
            .map(|r| r.to_string())
            .unwrap_or_else(|| e.to_string());
        Ok(SessionEnd::Lost {
            established: true,
            reason,
        })
    }

    /// The agent stops: say bye, give it a moment to go out, close.
    async fn stop(&mut self) -> SessionEnd {
        let bye = AgentMessage::Bye {
            reason: "agent stopping".into(),
        };
        let _ = proto::write_message(&mut self.send, &bye).await;
        let _ = tokio::time::timeout(Duration::from_millis(500), self.send.stopped()).await;
        self.conn.close(close::NORMAL.into(), b"agent stopping");
        SessionEnd::Shutdown
    }
}

/// Save settings that differ from the saved ones. When the controller wants more frequent
/// keep-alives than this connection sends, reconnect at once: this connection could otherwise
/// hit the controller's idle timeout.
fn adopt_settings(
    config: &AgentConfig,
    state: &StateDir,
    saved: &Option<SessionSettings>,
    new: &SessionSettings,
    current_keep_alive: Duration,
) -> Result<Option<SessionEnd>, AgentError> {
    if saved.as_ref() == Some(new) {
        return Ok(None);
    }
    state.save_settings(new)?;
    let (wanted, _) = liveness(config, Some(new));
    if wanted < current_keep_alive {
        return Ok(Some(SessionEnd::Lost {
            established: true,
            reason: format!(
                "controller asks for keep-alives every {}; reconnecting to apply it",
                humantime::format_duration(wanted)
            ),
        }));
    }
    Ok(None)
}

/// A sample goes as one QUIC datagram when it fits, else on a unidirectional stream of its own.
async fn send_sample(conn: &quinn::Connection, sample: &TelemetrySample) {
    let msg = Datagram::Sample(sample.clone());
    let bytes = match proto::encode(&msg) {
        Ok(b) => b,
        Err(e) => {
            warn!("encoding a sample: {e}");
            return;
        }
    };
    match conn.max_datagram_size() {
        Some(max) if bytes.len() <= max => {
            if let Err(e) = conn.send_datagram(bytes.into()) {
                debug!("sending a sample datagram: {e}");
            }
        }
        _ => {
            let sent = async {
                let mut uni = conn.open_uni().await?;
                proto::write_frame(&mut uni, &bytes).await?;
                uni.finish()?;
                anyhow::Ok(())
            };
            if let Err(e) = sent.await {
                debug!("sending a sample on a stream: {e:#}");
            }
        }
    }
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(800));
        for d in &delays[5..] {
            assert!(
                *d >= Duration::from_secs(1) && *d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
        // Jitter: not all capped delays are equal.
        assert!(delays[5..].windows(2).any(|w| w[0] != w[1]));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
