//! The QUIC endpoint agents dial: TLS setup, the accept loop, enrollment and sessions.
//!
//! Tasks: one accept loop; one task per connection (enrollment or session), all tracked by the
//! controller's `TaskTracker` and stopped by its cancellation token.

use nebula_protocol::validate::{validate_label, validate_node_name};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nebula_protocol::telemetry::Datagram;
use nebula_protocol::{
    self as proto, close, AgentMessage, ControllerMessage, EnrollRequest, EnrollResponse,
    FrameError, Hello, Refusal, RefusalCode, ServerHello, Welcome, ALPN_ENROLL, ALPN_SESSION,
    PROTOCOL_VERSION,
};
use quinn::crypto::rustls::{HandshakeData, QuicServerConfig};
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::ca::peer_identity;
use crate::events::Event;
use crate::store::millis;
use crate::ControlPlane;

/// Enrollment requests are small; an unauthenticated peer gets a much smaller frame limit.
const MAX_ENROLL_FRAME: usize = 64 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a complete enrollment request waits for a signing slot before "busy".
const ENROLL_SLOT_WAIT: Duration = Duration::from_secs(3);
/// Bytes an unauthenticated peer may have in flight to us, all streams together.
const UNAUTH_RECEIVE_WINDOW: u32 = 64 * 1024;
/// Per stream, and in all once a session is authenticated.
const STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;
const SESSION_RECEIVE_WINDOW: u32 = 4 * 1024 * 1024;
/// Unread datagrams kept per connection (telemetry samples are read as they come).
const DATAGRAM_BUFFER: usize = 64 * 1024;
/// Streams an authenticated agent may open: the session, job replies and large samples.
const SESSION_BIDI_STREAMS: u32 = 64;
const SESSION_UNI_STREAMS: u32 = 16;

/// Build the QUIC endpoint: TLS 1.3, ALPNs for enrollment and sessions, client certificates
/// verified against the fleet CA but optional at the TLS layer (enrollment has none; sessions
/// without one are refused right after the handshake with a clear reason).
pub fn endpoint(cp: &ControlPlane, reset_key: &[u8; 32]) -> anyhow::Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cp.ca.ca_der().clone())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let (chain, key) = cp.ca.server_identity();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN_SESSION.to_vec(), ALPN_ENROLL.to_vec()];
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    let mut transport = quinn::TransportConfig::default();
    // Keep-alives come from the agents (their interval is in `Welcome` and the enrollment
    // answer). The controller sends none: a keep-alive sent after the last packet received
    // restarts the idle timer (RFC 9000, 10.1), which would delay noticing a dead agent by up to
    // one interval past the idle timeout.
    // Every connection starts with the small windows and stream limits of an unauthenticated
    // peer: one bidirectional stream, no unidirectional ones, 64 KiB buffered in all. A session
    // raises them once its certificate is known to be live (`Limits::authenticated`).
    transport
        .keep_alive_interval(None)
        .max_idle_timeout(Some(cp.config.idle_timeout.try_into()?))
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .receive_window(UNAUTH_RECEIVE_WINDOW.into())
        .stream_receive_window(STREAM_RECEIVE_WINDOW.into())
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER))
        .crypto_buffer_size(16 * 1024);
    server.transport_config(Arc::new(transport));
    // A stateless-reset key that survives restarts: after a controller crash, the first packet
    // an agent sends to the new process is answered with a reset it can verify, so it reconnects
    // at once instead of waiting out its idle timeout.
    // Connection ids must also stay valid across restarts, or the new process drops the packets
    // as foreign instead of resetting: derive the id generator's key from the same secret.
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset_key,
    )));
    // quinn limits resets to one per 20 ms by default; after a restart every agent needs one,
    // and a reset is always smaller than the packet that caused it (no amplification), so
    // allow them as fast as agents ask.
    endpoint_config.min_reset_interval(Duration::from_micros(50));
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&reset_key[24..]);
    let cid_key = u64::from_le_bytes(cid_key);
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let socket = std::net::UdpSocket::bind(cp.config.quic_listen)?;
    size_buffers(&socket);
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok(endpoint)
}

/// Kernel buffer asked for on the controller's UDP socket, each way.
const UDP_BUFFER_BYTES: usize = 4 << 20;

/// A burst of handshakes (a fleet enrolling or reconnecting after a restart) overflows the
/// kernel's default UDP receive buffer (about 208 KiB on Linux) while the controller is busy
/// signing, and every Initial dropped there costs its agent a retransmission timeout of a
/// second or more. Ask for [`UDP_BUFFER_BYTES`] each way; the kernel caps the request at
/// `net.core.rmem_max` / `wmem_max`, which the log names when it is lower.
fn size_buffers(socket: &std::net::UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    if let Err(e) = sock.set_recv_buffer_size(UDP_BUFFER_BYTES) {
        warn!("could not size the QUIC socket's receive buffer: {e}");
    }
    if let Err(e) = sock.set_send_buffer_size(UDP_BUFFER_BYTES) {
        warn!("could not size the QUIC socket's send buffer: {e}");
    }
    // Linux reports twice the usable size it granted.
    let granted = sock.recv_buffer_size().unwrap_or(0);
    if granted < UDP_BUFFER_BYTES {
        info!(
            granted,
            wanted = UDP_BUFFER_BYTES,
            "the QUIC socket's receive buffer is smaller than wanted: bursts of handshakes may \
             be dropped and retried; raise net.core.rmem_max to allow more"
        );
    } else {
        debug!(granted, "QUIC socket receive buffer");
    }
}

/// Accept connections until `shutdown` fires.
pub async fn accept_loop(
    cp: Arc<ControlPlane>,
    endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
        };
        let Some(admitted) = admit(&cp, incoming) else {
            continue;
        };
        let cp = cp.clone();
        let shutdown = shutdown.clone();
        let remote = admitted.incoming.remote_address();
        tracker.spawn(
            async move {
                if let Err(e) = handle_connection(cp, admitted, shutdown).await {
                    debug!("connection ended: {e:#}");
                }
            }
            .instrument(tracing::debug_span!("conn", %remote)),
        );
    }
    cp.registry
        .close_all(close::SHUTDOWN, "controller shutting down");
    endpoint.close(close::SHUTDOWN.into(), b"controller shutting down");
    let draining = std::time::Instant::now();
    let idle = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    debug!(
        took = ?draining.elapsed(),
        idle = idle.is_ok(),
        open = endpoint.open_connections(),
        "QUIC endpoint closed"
    );
}

/// A connection let in by the accept loop, counted until it ends.
struct Admitted {
    incoming: quinn::Incoming,
    _connection: limits::Counted,
    handshake: limits::Counted,
}

/// The accept loop's gate: refuse past the connection caps, ask for address validation (a
/// QUIC retry) when many handshakes are under way, else let the connection in, counted.
fn admit(cp: &ControlPlane, incoming: quinn::Incoming) -> Option<Admitted> {
    let cfg = &cp.config.quic_limits;
    let limits = &cp.quic_limits;
    if limits.connections() >= cfg.max_connections {
        cp.metrics.connection_refused("max_connections");
        incoming.refuse();
        return None;
    }
    if !incoming.remote_address_validated() && limits.handshakes() >= cfg.retry_above_handshakes {
        // Stateless: costs one packet, and a spoofed source never comes back.
        cp.metrics.connection_refused("retry");
        if let Err(e) = incoming.retry() {
            e.into_incoming().refuse();
        }
        return None;
    }
    if limits.handshakes() >= cfg.max_handshakes {
        cp.metrics.connection_refused("max_handshakes");
        incoming.refuse();
        return None;
    }
    Some(Admitted {
        _connection: limits.count_connection(),
        handshake: limits.count_handshake(),
        incoming,
    })
}

async fn handle_connection(
    cp: Arc<ControlPlane>,
    admitted: Admitted,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Admitted {
        incoming,
        _connection,
        handshake,
    } = admitted;
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await??;
    drop(handshake);
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<HandshakeData>().ok())
        .and_then(|d| d.protocol);
    match alpn.as_deref() {
        Some(ALPN_ENROLL) => {
            let source = conn.remote_address().ip();
            let Some(_unauthenticated) = cp.quic_limits.admit_unauthenticated(
                source,
                cp.config.quic_limits.max_unauthenticated,
                cp.config.quic_limits.max_unauthenticated_per_source,
            ) else {
                cp.metrics.connection_refused("max_unauthenticated");
                debug!(%source, "enrollment refused: too many unauthenticated connections");
                conn.close(
                    close::BUSY.into(),
                    b"controller busy: too many enrollments in progress (from this address or in all); try again shortly",
                );
                return Ok(());
            };
            let deadline = cp.config.quic_limits.enroll_deadline;
            match tokio::time::timeout(deadline, enroll_connection(&cp, &conn)).await {
                Ok(r) => r,
                Err(_) => {
                    cp.metrics.connection_refused("enroll_deadline");
                    debug!(%source, "enrollment took longer than {deadline:?}: closed");
                    conn.close(
                        close::PROTOCOL_ERROR.into(),
                        b"enrollment took too long (the whole exchange has a deadline)",
                    );
                    Ok(())
                }
            }
        }
        Some(ALPN_SESSION) => session_connection(&cp, conn, shutdown).await,
        _ => {
            conn.close(close::PROTOCOL_ERROR.into(), b"unknown ALPN");
            Ok(())
        }
    }
}

// ----- enrollment -----

/// One enrollment exchange: the request frame, a slot for the signing and the store (taken
/// only once the whole request is in, so stalled peers hold no slot), the answer. The caller
/// puts one deadline on all of it.
async fn enroll_connection(cp: &ControlPlane, conn: &quinn::Connection) -> anyhow::Result<()> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let req: EnrollRequest = match proto::read_message(&mut recv, MAX_ENROLL_FRAME).await {
        Ok(r) => r,
        Err(e) => {
            cp.frames_rejected();
            warn!(remote = %conn.remote_address(), "bad enrollment frame: {e}");
            conn.close(close::PROTOCOL_ERROR.into(), reason(&e).as_bytes());
            return Ok(());
        }
    };
    let slot =
        tokio::time::timeout(ENROLL_SLOT_WAIT, cp.enroll_slots.clone().acquire_owned()).await;
    let response = match slot {
        Ok(Ok(_permit)) => cp.enroll(req).await,
        _ => {
            cp.metrics.connection_refused("enroll_busy");
            EnrollResponse::Refused(Refusal::new(
                RefusalCode::Internal,
                "controller busy: too many enrollments at once; try again shortly",
            ))
        }
    };
    proto::write_message(&mut send, &response).await?;
    send.finish()?;
    // Let the agent read the answer and close (the caller's deadline bounds this too).
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    Ok(())
}

impl ControlPlane {
    /// Check an enrollment request and, if it holds, create the node and its certificate.
    pub async fn enroll(&self, req: EnrollRequest) -> EnrollResponse {
        match self.try_enroll(req).await {
            Ok(e) => EnrollResponse::Enrolled(e),
            Err(r) => EnrollResponse::Refused(r),
        }
    }

    async fn try_enroll(&self, req: EnrollRequest) -> Result<proto::Enrolled, Refusal> {
        use crate::store::{EnrollError, Enrollment};
        if !req.version.is_compatible_with(PROTOCOL_VERSION) {
            return Err(version_refusal(req.version));
        }
        validate_node_name(&req.name).map_err(|m| Refusal::new(RefusalCode::InvalidRequest, m))?;
        for (k, v) in &req.labels {
            validate_label(k, v).map_err(|m| Refusal::new(RefusalCode::InvalidRequest, m))?;
        }
        let node_id = uuid::Uuid::now_v7();
        let issued = self
            .ca
            .issue_node_cert(node_id, &req.name, &req.csr_der, self.config.cert_lifetime)
            .map_err(|e| Refusal::new(RefusalCode::InvalidRequest, format!("{e:#}")))?;
        let now = millis(SystemTime::now());
        let enrollment = Enrollment {
            token_id: &req.token_id,
            secret_hash: &crate::hash_secret(&req.token_secret),
            node_id,
            name: &req.name,
            requested_labels: &req.labels,
            facts: &req.facts,
            cert: issued.record(node_id, now),
            now,
        };
        let labels = self.store.enroll(&enrollment).await.map_err(|e| {
            let code = match &e {
                EnrollError::UnknownToken => RefusalCode::TokenUnknown,
                EnrollError::Expired => RefusalCode::TokenExpired,
                EnrollError::Exhausted => RefusalCode::TokenExhausted,
                EnrollError::Revoked => RefusalCode::TokenRevoked,
                EnrollError::NameTaken(_) => RefusalCode::NameTaken,
                EnrollError::Store(_) => RefusalCode::Internal,
            };
            if code == RefusalCode::Internal {
                tracing::error!(name = %req.name, "enrollment failed: {e:#}");
            } else {
                warn!(name = %req.name, token = %req.token_id, "enrollment refused: {e}");
            }
            Refusal::new(code, e.to_string())
        })?;
        info!(node = %node_id, name = %req.name, "node enrolled");
        self.jobs.nodes_changed();
        self.events.publish(Event::NodeEnrolled {
            id: node_id,
            name: req.name.clone(),
        });
        Ok(proto::Enrolled {
            node_id,
            name: req.name,
            labels,
            cert_der: issued.der,
            ca_der: self.ca.ca_der().to_vec(),
            settings: self.session_settings(),
        })
    }
}

fn version_refusal(agent: proto::ProtocolVersion) -> Refusal {
    Refusal::new(
        RefusalCode::VersionMismatch,
        format!(
            "protocol version mismatch: agent speaks {agent}, controller speaks {PROTOCOL_VERSION}; \
             run the same major version on both sides"
        ),
    )
}

// ----- sessions -----

async fn session_connection(
    cp: &ControlPlane,
    conn: quinn::Connection,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let remote = conn.remote_address();
    let certs = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok());
    let Some(identity) = certs
        .as_ref()
        .and_then(|c| c.first())
        .and_then(|leaf| peer_identity(leaf))
    else {
        warn!(%remote, "session refused: no client certificate");
        conn.close(
            close::REFUSED.into(),
            b"client certificate required on nebula/1 (enroll first with a join token)",
        );
        return Ok(());
    };
    let node_id = identity.node_id;
    let Some((mut send, mut recv, hello, version)) = read_hello(cp, &conn, node_id).await? else {
        return Ok(());
    };

    // Identity comes from the verified certificate; the certificate must be known and live.
    let cert = cp.store.certificate(&identity.serial).await?;
    let node = cp.store.node_by_id(node_id).await?;
    let node = match (cert, node) {
        (Some(c), Some(n)) if c.revoked_at.is_none() && c.node_id == node_id => n,
        _ => {
            warn!(node = %node_id, %remote, serial = %identity.serial, "session refused: certificate revoked or node removed");
            let refusal = Refusal::new(
                RefusalCode::NodeRevoked,
                "this node's certificate was revoked (the node was removed); join again with a new token",
            );
            return refuse(&conn, &mut send, refusal, close::REVOKED).await;
        }
    };
    // A node that connects with a newer certificate has saved it: its older ones go. (Looked
    // for with a read first: nearly always there are none.)
    if cp
        .store
        .has_superseded_certificates(node_id, &identity.serial)
        .await
        .unwrap_or(true)
    {
        revoke_superseded(cp, node_id, &identity.serial).await;
    }
    // Authenticated: the windows and stream limits of a session.
    conn.set_receive_window(SESSION_RECEIVE_WINDOW.into());
    conn.set_max_concurrent_bi_streams(SESSION_BIDI_STREAMS.into());
    conn.set_max_concurrent_uni_streams(SESSION_UNI_STREAMS.into());
    let now = millis(SystemTime::now());
    cp.store
        .record_session(node_id, &hello.facts, &hello.agent_version, now)
        .await?;
    cp.telemetry.register(node_id, &node.name);
    let (generation, replaced) = cp.registry.insert(
        node_id,
        node.name.clone(),
        hello.agent_version.clone(),
        conn.clone(),
    );
    cp.metrics
        .agents_connected
        .set(cp.registry.online_count() as i64);
    if let Some(old) = replaced {
        info!(node = %node_id, name = %node.name, "new connection replaces the old one");
        old.close(
            close::REPLACED.into(),
            b"replaced by a newer connection from the same node",
        );
    }
    let span = tracing::info_span!("session", node = %node_id, name = %node.name);
    let result = async {
        info!(%remote, agent_version = %hello.agent_version, "node online");
        cp.events.publish(Event::NodeOnline {
            id: node_id,
            name: node.name.clone(),
        });
        // Jobs waiting for this node (or out on it before a restart) go now.
        cp.jobs.nodes_changed();
        let welcome = ServerHello::Welcome(Welcome {
            node_id,
            name: node.name.clone(),
            labels: node.labels.clone(),
            controller_version: PROTOCOL_VERSION,
            settings: cp.session_settings(),
        });
        proto::write_message(&mut send, &welcome).await?;
        // Agents from 1.3 on hear which agent builds this controller serves (self-update).
        let releases = (version.minor >= 3).then(|| {
            let mut rx = cp.releases.subscribe();
            rx.mark_changed();
            rx
        });
        let mut facts = hello.facts.clone();
        session_loop(
            cp, &conn, &node.name, node_id, generation, &mut facts, &mut send, &mut recv, releases,
            shutdown,
        )
        .await
    }
    .instrument(span.clone())
    .await;
    if cp.registry.remove_if_current(node_id, generation) {
        cp.metrics
            .agents_connected
            .set(cp.registry.online_count() as i64);
        let _g = span.enter();
        info!(reason = %conn.close_reason().map(|r| r.to_string()).unwrap_or_default(), "node offline");
        if let Err(e) = cp
            .store
            .touch_last_seen(node_id, millis(SystemTime::now()))
            .await
        {
            warn!("recording last seen: {e:#}");
        }
        cp.events.publish(Event::NodeOffline {
            id: node_id,
            name: node.name.clone(),
        });
    }
    result
}

/// The session stream and its `Hello`, under one deadline. `None` when the connection was
/// refused for what it sent (and closed with the reason).
async fn read_hello(
    cp: &ControlPlane,
    conn: &quinn::Connection,
    node_id: uuid::Uuid,
) -> anyhow::Result<
    Option<(
        quinn::SendStream,
        quinn::RecvStream,
        Hello,
        proto::ProtocolVersion,
    )>,
> {
    let first = tokio::time::timeout(FIRST_STREAM_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await?;
        let payload = proto::read_frame(&mut recv, cp.config.max_frame_bytes).await;
        Ok::<_, quinn::ConnectionError>((send, recv, payload))
    })
    .await;
    let (mut send, recv, payload) = match first {
        Ok(r) => r?,
        Err(_) => {
            conn.close(
                close::PROTOCOL_ERROR.into(),
                b"no Hello within the deadline",
            );
            return Ok(None);
        }
    };
    let payload = match payload {
        Ok(p) => p,
        Err(e) => return protocol_error(cp, conn, node_id, &e).map(|()| None),
    };
    let version = match proto::peek_version(&payload) {
        Ok(v) => v,
        Err(e) => return protocol_error(cp, conn, node_id, &e).map(|()| None),
    };
    if !version.is_compatible_with(PROTOCOL_VERSION) {
        let refusal = version_refusal(version);
        warn!(node = %node_id, remote = %conn.remote_address(), "session refused: {}", refusal.message);
        return refuse(conn, &mut send, refusal, close::REFUSED)
            .await
            .map(|()| None);
    }
    let hello: Hello = match proto::decode(&payload) {
        Ok(h) => h,
        Err(e) => return protocol_error(cp, conn, node_id, &e).map(|()| None),
    };
    Ok(Some((send, recv, hello, version)))
}

/// Serve an authenticated session until it ends.
///
/// Longer than the usual limit (about 155 lines) for a reason: one `select!` over every input
/// of the session (agent messages, datagrams, large samples, release updates, shutdown) sharing
/// the send half; the next step makes it a session struct with one method per message family.
#[allow(clippy::too_many_arguments)]
async fn session_loop(
    cp: &ControlPlane,
    conn: &quinn::Connection,
    name: &str,
    node_id: uuid::Uuid,
    generation: u64,
    facts: &mut proto::NodeFacts,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    mut releases: Option<tokio::sync::watch::Receiver<Arc<Vec<proto::release::AgentRelease>>>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Cancel-safe: the select below may drop a read in the middle of a frame.
    let mut frames = proto::FrameReader::new(cp.config.max_frame_bytes);
    // The certificate issued on this session and not yet confirmed saved.
    let mut renewed: Option<String> = None;
    loop {
        let msg = tokio::select! {
            changed = async { releases.as_mut()?.changed().await.ok() }, if releases.is_some() => {
                match (changed, releases.as_mut()) {
                    (Some(()), Some(rx)) => {
                        let list = rx.borrow_and_update().clone();
                        if !list.is_empty() {
                            proto::write_message(send, &ControllerMessage::AgentReleases((*list).clone())).await?;
                        }
                    }
                    _ => releases = None,
                }
                continue;
            }
            dg = conn.read_datagram() => {
                match dg {
                    Ok(bytes) => take_sample(cp, node_id, name, &bytes),
                    Err(_) => return Ok(()),
                }
                continue;
            }
            uni = conn.accept_uni() => {
                let Ok(mut uni) = uni else { return Ok(()) };
                // A sample too big for a datagram: one frame on its own stream, read with a
                // deadline so a slow sender cannot stall the session.
                let read = tokio::time::timeout(
                    Duration::from_secs(5),
                    proto::read_frame(&mut uni, cp.config.max_frame_bytes),
                ).await;
                match read {
                    Ok(Ok(bytes)) => take_sample(cp, node_id, name, &bytes),
                    Ok(Err(e)) => {
                        cp.frames_rejected();
                        cp.metrics.dropped("malformed");
                        debug!("bad telemetry stream: {e}");
                    }
                    Err(_) => cp.metrics.dropped("timeout"),
                }
                continue;
            }
            _ = shutdown.cancelled() => {
                let _ = proto::write_message(send, &ControllerMessage::Bye { reason: "controller shutting down".into() }).await;
                conn.close(close::SHUTDOWN.into(), b"controller shutting down");
                return Ok(());
            }
            _ = conn.closed() => return Ok(()),
            msg = frames.read_message::<AgentMessage, _>(recv) => msg,
        };
        match msg {
            Ok(AgentMessage::RenewCertificate { csr_der }) => {
                let reply =
                    match cp
                        .ca
                        .issue_node_cert(node_id, name, &csr_der, cp.config.cert_lifetime)
                    {
                        Ok(issued) => {
                            let now = millis(SystemTime::now());
                            cp.store
                                .add_certificate(&issued.record(node_id, now))
                                .await?;
                            info!(serial = %issued.serial, "certificate renewed");
                            renewed = Some(issued.serial.clone());
                            cp.events.publish(Event::CertificateRenewed {
                                id: node_id,
                                name: name.to_owned(),
                                serial: issued.serial,
                            });
                            ControllerMessage::CertificateRenewed {
                                cert_der: issued.der,
                            }
                        }
                        Err(e) => ControllerMessage::RenewalRefused(Refusal::new(
                            RefusalCode::InvalidRequest,
                            format!("{e:#}"),
                        )),
                    };
                proto::write_message(send, &reply).await?;
            }
            Ok(AgentMessage::CertificateSaved) => {
                if let Some(serial) = renewed.take() {
                    revoke_superseded(cp, node_id, &serial).await;
                }
            }
            Ok(AgentMessage::DeployPolicy(policy)) => {
                // Kept with the session; a change may turn refusals into actions or back.
                debug!(?policy, "deploy policy");
                if cp.registry.set_deploy_policy(node_id, generation, policy) {
                    cp.desired
                        .kick(&format!("the deploy policy of {name} changed"));
                }
            }
            Ok(AgentMessage::Bye { reason }) => {
                info!(%reason, "agent said bye");
                conn.close(close::NORMAL.into(), b"bye");
                return Ok(());
            }
            Ok(AgentMessage::Unsupported { variant }) => {
                debug!(variant, "agent does not support a message we sent");
            }
            Ok(AgentMessage::AiInventory(inv)) => {
                cp.ai.set_inventory(node_id, name, inv);
                // Desired models may be missing (or present now).
                if cp
                    .desired
                    .active()
                    .is_some_and(|a| !a.desired.models.is_empty())
                {
                    cp.desired.kick(&format!("models on {name} changed"));
                }
            }
            Ok(AgentMessage::TelemetryInventory(inv)) => {
                if facts.gpus != inv.gpus || facts.container_runtime != inv.container_runtime {
                    facts.gpus = inv.gpus.clone();
                    facts.container_runtime = inv.container_runtime.clone();
                    cp.store.update_facts(node_id, facts).await?;
                    cp.jobs.nodes_changed();
                }
                // A container gone from the inventory was removed (`docker rm -f`): say so like
                // a stop, so that the reconciler repairs it at once.
                for c in cp.telemetry.set_inventory(node_id, inv).unwrap_or_default() {
                    cp.events.publish(Event::ContainerChanged {
                        node_id,
                        node: name.to_owned(),
                        container: c.id,
                        name: c.name,
                        state: "removed".to_owned(),
                        health: "none".to_owned(),
                    });
                }
            }
            Err(FrameError::UnknownVariant { index, .. }) => {
                // A newer agent minor: answer, never fail.
                proto::write_message(send, &ControllerMessage::Unsupported { variant: index })
                    .await?;
            }
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => return protocol_error(cp, conn, node_id, &e),
        }
    }
}

/// Revoke the node's certificates older than `serial`; a failure is logged, never fatal (the
/// old certificate still expires on its own).
async fn revoke_superseded(cp: &ControlPlane, node_id: uuid::Uuid, serial: &str) {
    match cp
        .store
        .revoke_superseded_certificates(node_id, serial, millis(SystemTime::now()))
        .await
    {
        Ok(0) => {}
        Ok(n) => info!(node = %node_id, %serial, revoked = n, "older certificates revoked"),
        Err(e) => warn!(node = %node_id, "revoking older certificates: {e:#}"),
    }
}

/// Decode and take one telemetry sample; anything wrong with it is counted, never fatal.
fn take_sample(cp: &ControlPlane, node_id: uuid::Uuid, name: &str, bytes: &[u8]) {
    let sample = match proto::decode::<Datagram>(bytes) {
        Ok(Datagram::Sample(s)) => s,
        Err(e) => {
            cp.frames_rejected();
            cp.metrics.dropped("malformed");
            debug!(node = %node_id, "malformed telemetry: {e}");
            return;
        }
    };
    match cp.telemetry.ingest(node_id, sample) {
        Ok(changes) => {
            cp.metrics.samples_accepted.inc();
            for c in changes {
                cp.events.publish(Event::ContainerChanged {
                    node_id,
                    node: name.to_owned(),
                    container: c.container,
                    name: c.name,
                    state: c.state.as_str().to_owned(),
                    health: c.health.as_str().to_owned(),
                });
            }
        }
        Err(reason) => cp.metrics.dropped(reason.as_str()),
    }
}

fn protocol_error(
    cp: &ControlPlane,
    conn: &quinn::Connection,
    node: uuid::Uuid,
    e: &FrameError,
) -> anyhow::Result<()> {
    if matches!(e, FrameError::Io(_) | FrameError::Closed) {
        return Ok(());
    }
    cp.frames_rejected();
    warn!(%node, remote = %conn.remote_address(), "closing connection: {e}");
    conn.close(close::PROTOCOL_ERROR.into(), reason(e).as_bytes());
    Ok(())
}

/// Send a refusal on the session stream, give the agent a moment to read it, then close with
/// the same text as the close reason (so the agent sees it either way).
async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    refusal: Refusal,
    code: u32,
) -> anyhow::Result<()> {
    let text = refusal.message.clone();
    let _ = proto::write_message(send, &ServerHello::Refused(refusal)).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(code.into(), text.as_bytes());
    Ok(())
}

fn reason(e: &FrameError) -> String {
    let mut s = format!("protocol error: {e}");
    s.truncate(200);
    s
}

/// Connection counts for the caps on work before authentication.
pub mod limits {
    use std::collections::HashMap;
    use std::net::IpAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Default)]
    pub struct ConnectionCounts {
        connections: Arc<AtomicUsize>,
        handshakes: Arc<AtomicUsize>,
        unauthenticated: Arc<Mutex<Unauthenticated>>,
    }

    #[derive(Debug, Default)]
    struct Unauthenticated {
        total: usize,
        by_source: HashMap<IpAddr, usize>,
    }

    /// One counted connection (or stage of one); the count drops with it.
    #[derive(Debug)]
    pub struct Counted(Release);

    #[derive(Debug)]
    enum Release {
        Atomic(Arc<AtomicUsize>),
        Source(Arc<Mutex<Unauthenticated>>, IpAddr),
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            match &self.0 {
                Release::Atomic(n) => {
                    n.fetch_sub(1, Ordering::AcqRel);
                }
                Release::Source(u, ip) => {
                    let mut u = u.lock().unwrap_or_else(|p| p.into_inner());
                    u.total = u.total.saturating_sub(1);
                    if let Some(n) = u.by_source.get_mut(ip) {
                        *n -= 1;
                        if *n == 0 {
                            u.by_source.remove(ip);
                        }
                    }
                }
            }
        }
    }

    impl ConnectionCounts {
        pub fn connections(&self) -> usize {
            self.connections.load(Ordering::Acquire)
        }

        pub fn handshakes(&self) -> usize {
            self.handshakes.load(Ordering::Acquire)
        }

        pub fn unauthenticated(&self) -> usize {
            self.unauthenticated
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .total
        }

        pub fn count_connection(&self) -> Counted {
            self.connections.fetch_add(1, Ordering::AcqRel);
            Counted(Release::Atomic(self.connections.clone()))
        }

        pub fn count_handshake(&self) -> Counted {
            self.handshakes.fetch_add(1, Ordering::AcqRel);
            Counted(Release::Atomic(self.handshakes.clone()))
        }

        /// Count an unauthenticated connection from `source`, unless that would pass `total`
        /// in all or `per_source` from that address.
        pub fn admit_unauthenticated(
            &self,
            source: IpAddr,
            total: usize,
            per_source: usize,
        ) -> Option<Counted> {
            let mut u = self
                .unauthenticated
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let from_source = u.by_source.get(&source).copied().unwrap_or(0);
            if u.total >= total || from_source >= per_source {
                return None;
            }
            u.total += 1;
            *u.by_source.entry(source).or_insert(0) += 1;
            Some(Counted(Release::Source(
                self.unauthenticated.clone(),
                source,
            )))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn caps_hold_per_source_and_in_all_and_free_on_drop() {
            let c = ConnectionCounts::default();
            let a = IpAddr::from([192, 0, 2, 1]);
            let b = IpAddr::from([192, 0, 2, 2]);
            let first: Vec<_> = (0..2)
                .map(|_| c.admit_unauthenticated(a, 3, 2).expect("under the caps"))
                .collect();
            assert!(c.admit_unauthenticated(a, 3, 2).is_none(), "per source");
            let other = c.admit_unauthenticated(b, 3, 2).expect("another source");
            assert!(c.admit_unauthenticated(b, 3, 2).is_none(), "in all");
            assert_eq!(c.unauthenticated(), 3);
            drop(first);
            drop(other);
            assert_eq!(c.unauthenticated(), 0);
            let h = c.count_handshake();
            assert_eq!(c.handshakes(), 1);
            drop(h);
            assert_eq!(c.handshakes(), 0);
        }
    }
}
