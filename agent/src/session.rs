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

use nebula_protocol::release::AgentRelease;
use nebula_protocol::{
    self as proto, close, AgentMessage, ControllerMessage, FrameError, Hello, NodeFacts,
    ServerHello, SessionSettings, CONTROLLER_SERVER_NAME,
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
}

/// Channels between a session and the agent's other tasks.
#[derive(Debug)]
pub struct Channels {
    /// The controller's agent builds, for the updater.
    pub releases: watch::Sender<Vec<AgentRelease>>,
    /// The inference backends' inventory, sent when it changes (to 1.4+ controllers).
    pub ai: watch::Receiver<nebula_protocol::ai::AiInventory>,
}

/// Run sessions until `shutdown` fires or the controller refuses for good.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: &AgentConfig,
    state: &StateDir,
    addr: SocketAddr,
    facts: NodeFacts,
    mut feed: TelemetryFeed,
    runner: &Arc<JobRunner>,
    status: &watch::Sender<AgentStatus>,
    mut channels: Channels,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let endpoint = tls::client_endpoint(addr).map_err(|e| AgentError::Other(e.into()))?;
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    let result = loop {
        status.send_replace(AgentStatus::Connecting {
            attempt: backoff.attempt(),
        });
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
            Ok(SessionEnd::Lost {
                established,
                reason,
            }) => {
                if established {
                    backoff.reset();
                }
                warn!(%reason, "connection to the controller lost; reconnecting");
            }
            Err(e) if e.is_permanent() => break Err(e),
            Err(e) => debug!("connecting failed: {e:#}"),
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    };
    status.send_replace(AgentStatus::Stopped);
    endpoint.close(close::NORMAL.into(), b"agent stopping");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    result
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

/// One session, from the handshake to its end.
///
/// Longer than the usual limit (about 230 lines) for a reason: it is one `select!` over every
/// input of a session (renewal timer, telemetry, AI inventory, job streams, controller
/// messages, shutdown) sharing the same send half; the next step makes it a session struct with
/// one method per message family.
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
        c = tokio::time::timeout(Duration::from_secs(10), connecting) => c
            .map_err(|_| AgentError::Timeout("connecting"))?
            .map_err(|e| AgentError::Connect(identity.state.controller.clone(), e))?,
    };
    let closed_reason = |conn: &quinn::Connection| -> Option<AgentError> {
        match conn.close_reason()? {
            quinn::ConnectionError::ApplicationClosed(c)
                if c.error_code == close::REVOKED.into()
                    || c.error_code == close::REFUSED.into() =>
            {
                Some(AgentError::Closed(
                    String::from_utf8_lossy(&c.reason).into_owned(),
                ))
            }
            _ => None,
        }
    };
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
    let welcome = match reply {
        Ok(ServerHello::Welcome(w)) => w,
        Ok(ServerHello::Refused(r)) => {
            conn.close(close::NORMAL.into(), b"refused");
            return Err(AgentError::Refused(r));
        }
        Err(e) => {
            // The stream may have been cut by a close whose reason says why.
            let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
            return Err(closed_reason(&conn).unwrap_or(AgentError::Frame(e)));
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
    if let Some(end) = adopt_settings(
        config,
        state,
        &identity.state.settings,
        &welcome.settings,
        keep_alive,
    )? {
        conn.close(close::NORMAL.into(), b"reconnecting with new settings");
        return Ok(end);
    }
    let mut saved_settings = Some(welcome.settings.clone());
    feed.interval.send_replace(
        Duration::from_millis(welcome.settings.telemetry_interval_ms.into())
            .max(Duration::from_millis(100)),
    );
    // Controllers from 1.5 on hear what this host's deploy policy allows, before the
    // inventory (which makes the node known to the reconciler), so that their first plan for
    // this node already shows what it would refuse. Older ones are not sent it (one would
    // answer `Unsupported`, which is logged and ignored below anyway).
    if welcome.controller_version.minor >= 5 {
        proto::write_message(
            &mut send,
            &AgentMessage::DeployPolicy(config.deploy.summary()),
        )
        .await?;
    }
    // The inventory first, so every sample that follows can be read.
    let inventory = feed.inventory.borrow_and_update().clone();
    proto::write_message(
        &mut send,
        &AgentMessage::TelemetryInventory((*inventory).clone()),
    )
    .await?;
    let mut samples_sent = 0u64;
    // Controllers from 1.4 on hear about inference backends.
    let ai_aware = welcome.controller_version.minor >= 4;
    if ai_aware {
        let inv = channels.ai.borrow_and_update().clone();
        proto::write_message(&mut send, &AgentMessage::AiInventory(inv)).await?;
    }

    let renew_at = identity
        .renew_at()
        .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(3600));
    let mut renew_timer = Box::pin(tokio::time::sleep(until(renew_at)));
    let mut pending_key: Option<rcgen::KeyPair> = None;
    // Cancel-safe: the select below may drop a read in the middle of a frame.
    let mut frames = proto::FrameReader::new(proto::DEFAULT_MAX_FRAME);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = proto::write_message(&mut send, &AgentMessage::Bye { reason: "agent stopping".into() }).await;
                let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
                conn.close(close::NORMAL.into(), b"agent stopping");
                return Ok(SessionEnd::Shutdown);
            }
            stream = conn.accept_bi() => {
                // A job: the controller opens one stream per job.
                if let Ok((send, recv)) = stream {
                    runner.spawn_stream(send, recv);
                }
            }
            changed = channels.ai.changed(), if ai_aware => {
                if changed.is_err() {
                    continue;
                }
                let inv = channels.ai.borrow_and_update().clone();
                proto::write_message(&mut send, &AgentMessage::AiInventory(inv)).await?;
            }
            changed = feed.inventory.changed() => {
                if changed.is_err() {
                    continue;
                }
                let inventory = feed.inventory.borrow_and_update().clone();
                proto::write_message(&mut send, &AgentMessage::TelemetryInventory((*inventory).clone())).await?;
            }
            changed = feed.samples.changed() => {
                if changed.is_err() {
                    continue;
                }
                let sample = feed.samples.borrow_and_update().clone();
                if let Some(sample) = sample {
                    // The inventory a sample refers to always goes out before the sample.
                    if feed.inventory.has_changed().unwrap_or(false) {
                        let inventory = feed.inventory.borrow_and_update().clone();
                        proto::write_message(&mut send, &AgentMessage::TelemetryInventory((*inventory).clone())).await?;
                    }
                    send_sample(&conn, &sample).await;
                    samples_sent += 1;
                    if samples_sent == 1 {
                        debug!("first telemetry sample sent");
                    }
                }
            }
            _ = &mut renew_timer, if pending_key.is_none() => {
                let (key, csr_der) = new_key_and_csr()?;
                info!("renewing the node certificate");
                proto::write_message(&mut send, &AgentMessage::RenewCertificate { csr_der }).await?;
                pending_key = Some(key);
            }
            msg = frames.read_message::<ControllerMessage, _>(&mut recv) => match msg {
                Ok(ControllerMessage::CertificateRenewed { cert_der }) => {
                    let Some(key) = pending_key.take() else {
                        warn!("unrequested certificate ignored");
                        continue;
                    };
                    state.save_cert(&key, &cert_der)?;
                    // Saved: the controller may now revoke the certificate this session uses.
                    proto::write_message(&mut send, &AgentMessage::CertificateSaved).await?;
                    let next = crate::identity::validity(&cert_der)
                        .map(|(nb, na)| nb + na.duration_since(nb).unwrap_or_default() * 2 / 3)
                        .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(3600));
                    info!(renew_at = %humantime::format_rfc3339_seconds(next), "certificate renewed and saved");
                    renew_timer.as_mut().reset(tokio::time::Instant::now() + until(next));
                }
                Ok(ControllerMessage::RenewalRefused(r)) => {
                    warn!("certificate renewal refused: {r}; retrying in a minute");
                    pending_key = None;
                    renew_timer.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(60));
                }
                Ok(ControllerMessage::SettingsChanged(s)) => {
                    info!(?s, "settings changed");
                    if let Some(end) = adopt_settings(config, state, &saved_settings, &s, keep_alive)? {
                        conn.close(close::NORMAL.into(), b"reconnecting with new settings");
                        return Ok(end);
                    }
                    saved_settings = Some(s);
                }
                Ok(ControllerMessage::Bye { reason }) => {
                    return Ok(SessionEnd::Lost { established: true, reason: format!("controller said bye: {reason}") });
                }
                Ok(ControllerMessage::Unsupported { variant }) => {
                    debug!(variant, "controller does not support a message we sent");
                }
                Ok(ControllerMessage::AgentReleases(list)) => {
                    debug!(count = list.len(), "the controller's agent builds");
                    channels.releases.send_replace(list);
                }
                Err(FrameError::UnknownVariant { index, .. }) => {
                    proto::write_message(&mut send, &AgentMessage::Unsupported { variant: index }).await?;
                }
                Err(e) => {
                    let _ = tokio::time::timeout(Duration::from_millis(200), conn.closed()).await;
                    if let Some(permanent) = closed_reason(&conn) {
                        return Err(permanent);
                    }
                    let reason = conn.close_reason().map(|r| r.to_string()).unwrap_or_else(|| e.to_string());
                    return Ok(SessionEnd::Lost { established: true, reason });
                }
            }
        }
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
