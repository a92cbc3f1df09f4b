//! The QUIC endpoint agents dial: TLS setup, the accept loop, enrollment and sessions.
//!
//! Tasks: one accept loop; one task per connection (enrollment or session), all tracked by the
//! controller's `TaskTracker` and stopped by its cancellation token. An authenticated session
//! is a [`session::Session`] that owns its connection and session stream.

use nebula_protocol::validate::{validate_label, validate_node_name};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nebula_protocol::{
    self as proto, close, EnrollRequest, EnrollResponse, FrameError, Refusal, RefusalCode,
    ServerHello, ALPN_ENROLL, ALPN_SESSION, PROTOCOL_VERSION,
};
use quinn::crypto::rustls::{HandshakeData, QuicServerConfig};
use rustls::server::WebPkiClientVerifier;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::events::Event;
use crate::store::millis;
use crate::ControlPlane;

pub(crate) mod balance;
mod link;
pub mod relay;
mod session;
pub use link::Link;
use session::session_connection;

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
    tls.alpn_protocols = vec![
        ALPN_SESSION.to_vec(),
        ALPN_ENROLL.to_vec(),
        relay::ALPN_RELAY.to_vec(),
    ];
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
        Some(relay::ALPN_RELAY) => relay::serve_replica(&cp, conn, shutdown).await,
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

fn protocol_error(
    cp: &ControlPlane,
    conn: &Link,
    node: uuid::Uuid,
    e: &FrameError,
) -> anyhow::Result<()> {
    if matches!(e, FrameError::Io(_) | FrameError::Closed) {
        return Ok(());
    }
    cp.frames_rejected();
    warn!(%node, remote = %conn.remote_address(), "closing connection: {e}");
    conn.close(close::PROTOCOL_ERROR, &reason(e));
    Ok(())
}

/// Send a refusal on the session stream, give the agent a moment to read it, then close with
/// the same text as the close reason (so the agent sees it either way).
async fn refuse(
    conn: &Link,
    send: &mut quinn::SendStream,
    refusal: Refusal,
    code: u32,
) -> anyhow::Result<()> {
    let text = refusal.message.clone();
    let _ = proto::write_message(send, &ServerHello::Refused(refusal)).await;
    let _ = send.finish();
    if conn.relayed_by().is_some() {
        // The relaying replica delivers the refusal, then closes with this code.
        conn.close(code, &text);
        return Ok(());
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(code, &text);
    Ok(())
}

/// The session stream an agent opens first, within [`FIRST_STREAM_TIMEOUT`]; `None` when it
/// did not come in time (the connection is then closed with the reason).
async fn session_stream(
    conn: &quinn::Connection,
) -> anyhow::Result<Option<(quinn::SendStream, quinn::RecvStream)>> {
    match tokio::time::timeout(FIRST_STREAM_TIMEOUT, conn.accept_bi()).await {
        Ok(r) => Ok(Some(r?)),
        Err(_) => {
            conn.close(
                close::PROTOCOL_ERROR.into(),
                b"no Hello within the deadline",
            );
            Ok(None)
        }
    }
}

/// The client certificate a connection's TLS layer verified against the fleet CA, if any.
fn client_leaf(conn: &quinn::Connection) -> Option<rustls::pki_types::CertificateDer<'static>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().cloned()
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
