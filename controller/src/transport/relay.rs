//! Agent sessions on every replica. An agent may dial any replica; a replica that does not lead
//! keeps the agent's QUIC connection and relays the session to the leader over one QUIC
//! connection of its own (ALPN `nebula-relay/1`, a client certificate the replica makes from
//! the fleet CA at start). The leader serves the relayed session with the same code as a direct
//! one ([`super::session::serve_session`] over a [`Link::Relayed`]); the session's owner, the
//! replica holding its connection, is recorded on the node in the store.
//!
//! On the connection between the two:
//! * the relaying replica opens one stream per session: a frame with [`Open`] (the agent's
//!   identity, checked again by the leader against the store), then the session stream's
//!   bytes both ways, unchanged;
//! * every stream the leader opens to the agent (jobs, inference, container logs and exec)
//!   starts with the session's id (8 bytes); the relaying replica opens one on the agent's
//!   connection and splices the two;
//! * telemetry datagrams go with the session's id in front, and an agent's stream for a large
//!   sample goes on a stream of its own that starts with the id;
//! * the leader ends a session with a [`Close`] on a unidirectional stream (the close code and
//!   reason the agent gets).
//!
//! When the leader goes away or this replica starts to lead, the relayed agents are closed with
//! `NOT_LEADER` and reconnect (to this replica again, or another): their session state lives on
//! the leader.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nebula_protocol::{self as proto, close, CONTROLLER_SERVER_NAME};
use quinn::crypto::rustls::QuicClientConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::link::{Link, Relayed};
use super::session::serve_session;
use super::{
    FIRST_STREAM_TIMEOUT, SESSION_BIDI_STREAMS, SESSION_RECEIVE_WINDOW, SESSION_UNI_STREAMS,
};
use crate::ca::{replica_identity, PeerIdentity};
use crate::ControlPlane;

/// ALPN of the connection a replica relays its agents' sessions over.
pub const ALPN_RELAY: &[u8] = b"nebula-relay/1";

/// Streams on a relay connection: every relayed session's stream and every stream the
/// leader has open to one of its agents.
const RELAY_BIDI_STREAMS: u32 = 1 << 17;
const RELAY_UNI_STREAMS: u32 = 1 << 12;
/// Credit for the whole connection, far above every stream's own window (1 MiB) times the
/// streams that may stall at once (slow log or inference readers), so that those cannot hold
/// up the other sessions; only replicas open this connection.
const RELAY_RECEIVE_WINDOW: u32 = 1 << 30;
/// Telemetry datagrams and sample streams waiting per relayed session (more are dropped and
/// counted, like a full datagram buffer on a direct connection).
const INBOX_DATAGRAMS: usize = 64;
const INBOX_UNIS: usize = 4;
const MAX_HEADER: usize = 4096;
const STREAM_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a session's last bytes may take to reach the agent once the leader ended it.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// The relay certificate's lifetime (a new one is made for every connection to a leader).
const REPLICA_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// A relayed session's start: who the agent is (from its certificate, verified by the relaying
/// replica's TLS) and where it is.
#[derive(Debug, Serialize, Deserialize)]
struct Open {
    id: u64,
    node: Uuid,
    serial: String,
    not_after_secs: u64,
    remote: SocketAddr,
}

/// The leader ends a relayed session.
#[derive(Debug, Serialize, Deserialize)]
struct Close {
    id: u64,
    code: u32,
    reason: String,
}

// ----- the leader: sessions relayed to it -----

/// What the relay connection delivers to one relayed session.
struct Inbox {
    datagrams: mpsc::Sender<Bytes>,
    unis: mpsc::Sender<quinn::RecvStream>,
    gone: CancellationToken,
}

type Inboxes = Arc<Mutex<HashMap<u64, Inbox>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serve a replica's relay connection until it ends: every session it opens, and the
/// datagrams and sample streams of those sessions.
pub(super) async fn serve_replica(
    cp: &Arc<ControlPlane>,
    conn: quinn::Connection,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(replica) = super::client_leaf(&conn).and_then(|leaf| replica_identity(&leaf)) else {
        warn!(remote = %conn.remote_address(), "relay refused: no replica certificate");
        conn.close(
            close::REFUSED.into(),
            b"a replica certificate is required on nebula-relay/1",
        );
        return Ok(());
    };
    conn.set_receive_window(RELAY_RECEIVE_WINDOW.into());
    conn.set_max_concurrent_bi_streams(RELAY_BIDI_STREAMS.into());
    conn.set_max_concurrent_uni_streams(RELAY_UNI_STREAMS.into());
    info!(%replica, remote = %conn.remote_address(), "a replica relays its agents' sessions");
    let inboxes: Inboxes = Arc::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    let (cp, conn, replica, inboxes, shutdown) =
                        (cp.clone(), conn.clone(), replica.clone(), inboxes.clone(), shutdown.clone());
                    cp.tracker.clone().spawn(async move {
                        relayed_session(&cp, conn, replica, inboxes, (send, recv), shutdown).await;
                    });
                }
                Err(_) => break,
            },
            uni = conn.accept_uni() => match uni {
                Ok(uni) => {
                    let inboxes = inboxes.clone();
                    tokio::spawn(async move { sample_stream(uni, &inboxes).await });
                }
                Err(_) => break,
            },
            dg = conn.read_datagram() => match dg {
                Ok(d) => datagram(cp, d, &inboxes),
                Err(_) => break,
            },
        }
    }
    for (_, inbox) in lock(&inboxes).drain() {
        inbox.gone.cancel();
    }
    info!(%replica, "a replica's relay connection ended: its sessions are offline until they reconnect");
    Ok(())
}

fn datagram(cp: &ControlPlane, d: Bytes, inboxes: &Inboxes) {
    if d.len() < 8 {
        cp.metrics.dropped("malformed");
        return;
    }
    let id = u64::from_be_bytes(d[..8].try_into().unwrap_or_default());
    let tx = lock(inboxes).get(&id).map(|i| i.datagrams.clone());
    match tx {
        Some(tx) => {
            if tx.try_send(d.slice(8..)).is_err() {
                cp.metrics.dropped("relay_full");
            }
        }
        None => cp.metrics.dropped("relay_unknown_session"),
    }
}

async fn sample_stream(mut uni: quinn::RecvStream, inboxes: &Inboxes) {
    let mut id = [0u8; 8];
    match tokio::time::timeout(STREAM_HEADER_TIMEOUT, uni.read_exact(&mut id)).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    let tx = lock(inboxes)
        .get(&u64::from_be_bytes(id))
        .map(|i| i.unis.clone());
    if let Some(tx) = tx {
        let _ = tx.try_send(uni);
    }
}

async fn relayed_session(
    cp: &Arc<ControlPlane>,
    peer: quinn::Connection,
    replica: String,
    inboxes: Inboxes,
    (send, mut recv): (quinn::SendStream, quinn::RecvStream),
    shutdown: CancellationToken,
) {
    let header = tokio::time::timeout(
        FIRST_STREAM_TIMEOUT,
        proto::read_frame(&mut recv, MAX_HEADER),
    )
    .await;
    let open: Open = match header
        .ok()
        .and_then(Result::ok)
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(o) => o,
        None => {
            warn!(%replica, "a relayed session did not start with a valid header");
            return;
        }
    };
    let (dtx, drx) = mpsc::channel(INBOX_DATAGRAMS);
    let (utx, urx) = mpsc::channel(INBOX_UNIS);
    let gone = CancellationToken::new();
    if let Some(old) = lock(&inboxes).insert(
        open.id,
        Inbox {
            datagrams: dtx,
            unis: utx,
            gone: gone.clone(),
        },
    ) {
        old.gone.cancel();
    }
    let link = Link::Relayed(Arc::new(Relayed {
        peer,
        replica,
        id: open.id,
        remote: open.remote,
        datagrams: tokio::sync::Mutex::new(drx),
        unis: tokio::sync::Mutex::new(urx),
        gone: gone.clone(),
        reason: Mutex::new(None),
    }));
    let identity = PeerIdentity {
        node_id: open.node,
        serial: open.serial,
        not_after: SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(open.not_after_secs))
            .unwrap_or(SystemTime::UNIX_EPOCH),
    };
    if let Err(e) = serve_session(
        cp,
        link.clone(),
        &identity,
        (send, recv),
        cp.ha.leading(),
        shutdown,
    )
    .await
    {
        debug!("relayed session ended: {e:#}");
    }
    // However it ended, the relaying replica closes the agent's connection.
    link.close(close::NORMAL, "session ended");
    let mut map = lock(&inboxes);
    if map.get(&open.id).is_some_and(|i| i.gone.is_cancelled()) {
        map.remove(&open.id);
    }
}

/// End a relayed session: tell the relaying replica the code and reason for the agent.
pub(super) async fn send_close(
    peer: &quinn::Connection,
    id: u64,
    code: u32,
    reason: &str,
) -> anyhow::Result<()> {
    let mut uni = peer.open_uni().await?;
    let msg = serde_json::to_vec(&Close {
        id,
        code,
        reason: reason.to_owned(),
    })?;
    proto::write_frame(&mut uni, &msg).await?;
    uni.finish()?;
    Ok(())
}

// ----- a follower: relaying its agents' sessions -----

/// This replica's relay connection to the leader, made when the first agent needs it.
#[derive(Default)]
pub struct Relay {
    peer: tokio::sync::Mutex<Option<Peer>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Peer {
    leader: String,
    conn: quinn::Connection,
    agents: Agents,
    /// Kept with the connection it made.
    _endpoint: quinn::Endpoint,
}

/// The relayed agents' connections by session id, and what the leader asked when it ended
/// their session.
type Agents = Arc<Mutex<HashMap<u64, AgentEnd>>>;

#[derive(Clone)]
struct AgentEnd {
    conn: quinn::Connection,
    asked: Arc<Mutex<Option<(u32, String)>>>,
    ended: CancellationToken,
}

impl Relay {
    /// The connection to the current leader: the one already open, or a new one.
    async fn peer(&self, cp: &Arc<ControlPlane>) -> Result<Peer, String> {
        let leader = cp
            .ha
            .leader_quic()
            .ok_or_else(|| "no replica leads right now".to_owned())?;
        if leader == cp.ha.quic_addr() {
            return Err("this replica is about to lead".into());
        }
        let mut slot = self.peer.lock().await;
        if let Some(p) = slot.as_ref() {
            if p.leader == leader && p.conn.close_reason().is_none() {
                return Ok(p.clone());
            }
        }
        let peer = connect(cp, &leader).await?;
        info!(%leader, "relaying agent sessions to the leader");
        let (conn, agents) = (peer.conn.clone(), peer.agents.clone());
        cp.tracker
            .spawn(from_leader(conn, agents, cp.shutdown.clone()));
        cp.tracker.spawn(watch_leader(cp.clone(), peer.clone()));
        *slot = Some(peer.clone());
        Ok(peer)
    }
}

/// Close the relay connection once another replica leads (a killed leader's connection would
/// otherwise only end at its idle timeout): its agents reconnect, to the new leader's sessions.
async fn watch_leader(cp: Arc<ControlPlane>, peer: Peer) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = cp.shutdown.cancelled() => {
                peer.conn.close(close::SHUTDOWN.into(), b"replica shutting down");
                return;
            }
            _ = peer.conn.closed() => return,
            _ = tick.tick() => {}
        }
        if cp.ha.leader_quic().as_deref() != Some(peer.leader.as_str()) {
            info!(leader = %peer.leader, "another replica leads now: relayed sessions move to it");
            peer.conn
                .close(close::NOT_LEADER.into(), b"another replica leads now");
            return;
        }
    }
}

async fn connect(cp: &ControlPlane, leader: &str) -> Result<Peer, String> {
    let addr = tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(leader))
        .await
        .map_err(|_| format!("resolving the leader's address {leader} took too long"))?
        .map_err(|e| format!("resolving the leader's address {leader}: {e}"))?
        .next()
        .ok_or_else(|| format!("the leader's address {leader} resolves to nothing"))?;
    let (chain, key) = cp
        .ca
        .issue_replica_identity(&cp.ha.replica, REPLICA_CERT_LIFETIME)
        .map_err(|e| format!("making this replica's certificate: {e:#}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(cp.ca.ca_der().clone())
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![ALPN_RELAY.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    let idle = cp.config.idle_timeout;
    transport
        .keep_alive_interval(Some(idle / 3))
        .max_idle_timeout(idle.try_into().ok())
        .max_concurrent_bidi_streams(RELAY_BIDI_STREAMS.into())
        .max_concurrent_uni_streams(RELAY_UNI_STREAMS.into())
        .receive_window(RELAY_RECEIVE_WINDOW.into())
        .datagram_receive_buffer_size(Some(1 << 20));
    client.transport_config(Arc::new(transport));
    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| e.to_string())?;
    let connecting = endpoint
        .connect_with(client, addr, CONTROLLER_SERVER_NAME)
        .map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .map_err(|_| format!("the leader at {leader} did not answer"))?
        .map_err(|e| format!("connecting to the leader at {leader}: {e}"))?;
    Ok(Peer {
        leader: leader.to_owned(),
        conn,
        agents: Arc::default(),
        _endpoint: endpoint,
    })
}

/// Streams the leader opens on the relay connection: one to an agent (spliced to a new stream
/// on the agent's connection), or a [`Close`].
async fn from_leader(conn: quinn::Connection, agents: Agents, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    let agents = agents.clone();
                    tokio::spawn(async move { to_agent(send, recv, &agents).await });
                }
                Err(_) => break,
            },
            uni = conn.accept_uni() => match uni {
                Ok(mut uni) => {
                    let agents = agents.clone();
                    tokio::spawn(async move {
                        let frame = tokio::time::timeout(
                            STREAM_HEADER_TIMEOUT,
                            proto::read_frame(&mut uni, MAX_HEADER),
                        )
                        .await;
                        let Some(c) = frame
                            .ok()
                            .and_then(Result::ok)
                            .and_then(|b| serde_json::from_slice::<Close>(&b).ok())
                        else {
                            return;
                        };
                        if let Some(a) = lock(&agents).get(&c.id) {
                            *lock(&a.asked) = Some((c.code, c.reason));
                            a.ended.cancel();
                        }
                    });
                }
                Err(_) => break,
            },
        }
    }
}

/// One stream the leader opened to an agent: splice it to a new stream on the agent's
/// connection.
async fn to_agent(mut send: quinn::SendStream, mut recv: quinn::RecvStream, agents: &Agents) {
    let mut id = [0u8; 8];
    if !matches!(
        tokio::time::timeout(STREAM_HEADER_TIMEOUT, recv.read_exact(&mut id)).await,
        Ok(Ok(_))
    ) {
        return;
    }
    let agent = lock(agents)
        .get(&u64::from_be_bytes(id))
        .map(|a| a.conn.clone());
    let Some(agent) = agent else {
        let _ = send.reset(0u32.into());
        return;
    };
    let Ok((a_send, a_recv)) = agent.open_bi().await else {
        let _ = send.reset(0u32.into());
        return;
    };
    let mut leader = tokio::io::join(recv, send);
    let mut agent = tokio::io::join(a_recv, a_send);
    let _ = tokio::io::copy_bidirectional(&mut leader, &mut agent).await;
}

/// Relay one agent's session to the leader until either side ends it.
pub(super) async fn relay_agent(
    cp: &Arc<ControlPlane>,
    agent: quinn::Connection,
    identity: PeerIdentity,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let peer = match cp.relay.peer(cp).await {
        Ok(p) => p,
        Err(why) => {
            debug!(node = %identity.node_id, "cannot relay a session: {why}");
            let reason =
                format!("this replica does not lead and cannot relay ({why}); try another");
            agent.close(close::NOT_LEADER.into(), reason.as_bytes());
            return Ok(());
        }
    };
    let Some((mut a_send, mut a_recv)) = super::session_stream(&agent).await? else {
        return Ok(());
    };
    // The agent's certificate is the fleet CA's (TLS checked it); the leader checks that it is
    // live before it answers the `Hello`.
    agent.set_receive_window(SESSION_RECEIVE_WINDOW.into());
    agent.set_max_concurrent_bi_streams(SESSION_BIDI_STREAMS.into());
    agent.set_max_concurrent_uni_streams(SESSION_UNI_STREAMS.into());
    let id = cp.relay.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let end = AgentEnd {
        conn: agent.clone(),
        asked: Arc::default(),
        ended: CancellationToken::new(),
    };
    lock(&peer.agents).insert(id, end.clone());
    let result = relay_streams(
        cp,
        &peer,
        &agent,
        id,
        &identity,
        (&mut a_send, &mut a_recv),
        &end,
        shutdown,
    )
    .await;
    lock(&peer.agents).remove(&id);
    if let Err(e) = result {
        debug!(node = %identity.node_id, "relaying a session: {e:#}");
        agent.close(
            close::NOT_LEADER.into(),
            b"this replica lost its connection to the leader; try again",
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn relay_streams(
    cp: &ControlPlane,
    peer: &Peer,
    agent: &quinn::Connection,
    id: u64,
    identity: &PeerIdentity,
    (a_send, a_recv): (&mut quinn::SendStream, &mut quinn::RecvStream),
    end: &AgentEnd,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (mut t_send, mut t_recv) = peer.conn.open_bi().await?;
    let open = Open {
        id,
        node: identity.node_id,
        serial: identity.serial.clone(),
        not_after_secs: identity
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        remote: agent.remote_address(),
    };
    proto::write_frame(&mut t_send, &serde_json::to_vec(&open)?).await?;
    let mut leading = cp.ha.leading();
    // The leader's side of the session stream, to the agent; once it ends, until the agent
    // has every byte (a refusal, a bye) or `CLOSE_GRACE` passed.
    let down = async {
        let _ = tokio::io::copy(&mut t_recv, &mut *a_send).await;
        let _ = a_send.finish();
        let _ = tokio::time::timeout(CLOSE_GRACE, a_send.stopped()).await;
    };
    tokio::pin!(down);
    let ended = tokio::select! {
        _ = &mut down => Ended::LeaderFinished,
        _ = end.ended.cancelled() => Ended::Asked,
        copied = tokio::io::copy(&mut *a_recv, &mut t_send) => match copied {
            Ok(_) => Ended::AgentFinished,
            Err(_) => Ended::ByAgent,
        },
        _ = datagrams(agent, &peer.conn, id) => Ended::ByAgent,
        _ = sample_streams(agent, &peer.conn, id) => Ended::ByAgent,
        _ = agent.closed() => Ended::ByAgent,
        _ = peer.conn.closed() => Ended::LeaderGone,
        _ = shutdown.cancelled() => Ended::Shutdown,
        _ = leading.wait_for(|l| *l) => Ended::Leads,
    };
    match ended {
        Ended::ByAgent => {
            let _ = t_send.reset(0u32.into());
        }
        // The agent ended its session stream (after its `Bye`): so does the leader's copy.
        Ended::AgentFinished => {
            let _ = t_send.finish();
        }
        Ended::LeaderFinished | Ended::Asked => {
            // The session's last bytes (a refusal, a bye) reach the agent before the close,
            // which says what the leader asked for.
            let _ = tokio::time::timeout(CLOSE_GRACE * 2, async {
                if matches!(ended, Ended::Asked) {
                    (&mut down).await;
                }
                end.ended.cancelled().await;
            })
            .await;
            let (code, reason) = lock(&end.asked)
                .clone()
                .unwrap_or((close::NOT_LEADER, "the leader ended the session".into()));
            agent.close(code.into(), reason.as_bytes());
        }
        Ended::LeaderGone => agent.close(
            close::NOT_LEADER.into(),
            b"the connection to the leader was lost; reconnect",
        ),
        Ended::Shutdown => agent.close(close::SHUTDOWN.into(), b"controller shutting down"),
        Ended::Leads => agent.close(
            close::NOT_LEADER.into(),
            b"this replica leads now; connect again",
        ),
    }
    Ok(())
}

enum Ended {
    /// The agent's connection or one of its streams failed.
    ByAgent,
    /// The agent finished its session stream.
    AgentFinished,
    /// The leader's side of the session stream ended.
    LeaderFinished,
    /// The leader sent a [`Close`].
    Asked,
    LeaderGone,
    Shutdown,
    Leads,
}

/// The agent's telemetry datagrams, with the session id in front; one too large for the
/// relay connection goes on a stream of its own, framed like an agent's large sample.
async fn datagrams(agent: &quinn::Connection, peer: &quinn::Connection, id: u64) {
    // Samples too large for a datagram of the relay connection in flight at once; more are
    // dropped (the next sample follows within an interval).
    let large = Arc::new(tokio::sync::Semaphore::new(4));
    while let Ok(d) = agent.read_datagram().await {
        let mut buf = Vec::with_capacity(8 + d.len());
        buf.extend_from_slice(&id.to_be_bytes());
        buf.extend_from_slice(&d);
        match peer.send_datagram(buf.into()) {
            Ok(()) => {}
            Err(quinn::SendDatagramError::TooLarge) => {
                let Ok(permit) = large.clone().try_acquire_owned() else {
                    continue;
                };
                let peer = peer.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let Ok(mut uni) = peer.open_uni().await else {
                        return;
                    };
                    if uni.write_all(&id.to_be_bytes()).await.is_ok()
                        && proto::write_frame(&mut uni, &d).await.is_ok()
                    {
                        let _ = uni.finish();
                    }
                });
            }
            Err(_) => return,
        }
    }
}

/// The agent's streams for large samples, each copied to a stream to the leader.
async fn sample_streams(agent: &quinn::Connection, peer: &quinn::Connection, id: u64) {
    while let Ok(mut uni) = agent.accept_uni().await {
        let peer = peer.clone();
        tokio::spawn(async move {
            let Ok(mut out) = peer.open_uni().await else {
                return;
            };
            if out.write_all(&id.to_be_bytes()).await.is_err() {
                return;
            }
            let copied =
                tokio::time::timeout(Duration::from_secs(10), tokio::io::copy(&mut uni, &mut out))
                    .await;
            if matches!(copied, Ok(Ok(_))) {
                let _ = out.finish();
            } else {
                let _ = out.reset(0u32.into());
            }
        });
    }
}
