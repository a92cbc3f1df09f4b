//! How the controller reaches a node's agent: its own QUIC connection, or a session another
//! replica holds and relays ([`super::relay`]). Both give the same streams: a relayed stream is
//! a stream of the connection to that replica, spliced there to one on the agent's connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::bytes::Bytes;
use tokio_util::sync::CancellationToken;

/// A live link to one agent.
#[derive(Clone, Debug)]
pub enum Link {
    Direct(quinn::Connection),
    Relayed(Arc<Relayed>),
}

/// A session relayed by another replica: streams to the agent are opened on the connection to
/// that replica, with the session's relay id in front.
#[derive(Debug)]
pub struct Relayed {
    pub(super) peer: quinn::Connection,
    /// The relaying replica's id.
    pub(super) replica: String,
    /// The session's id on that connection.
    pub(super) id: u64,
    /// The agent's own address, as the relaying replica saw it.
    pub(super) remote: SocketAddr,
    pub(super) datagrams: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
    pub(super) unis: tokio::sync::Mutex<mpsc::Receiver<quinn::RecvStream>>,
    /// Cancelled when the session is closed from either side.
    pub(super) gone: CancellationToken,
    pub(super) reason: Mutex<Option<String>>,
}

/// A link that has ended.
#[derive(Debug, Clone, Copy)]
pub struct Gone;

impl Link {
    /// Open a stream to the agent.
    pub async fn open_bi(&self) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
        match self {
            Link::Direct(c) => c.open_bi().await.map_err(|e| e.to_string()),
            Link::Relayed(r) => {
                if r.gone.is_cancelled() {
                    return Err("the relayed session has ended".into());
                }
                let (mut send, recv) = r.peer.open_bi().await.map_err(|e| e.to_string())?;
                send.write_all(&r.id.to_be_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok((send, recv))
            }
        }
    }

    /// Close the session with a code and reason the agent sees.
    pub fn close(&self, code: u32, reason: &str) {
        match self {
            Link::Direct(c) => c.close(code.into(), reason.as_bytes()),
            Link::Relayed(r) => {
                if r.gone.is_cancelled() {
                    return;
                }
                *r.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_owned());
                r.gone.cancel();
                let (peer, id, reason) = (r.peer.clone(), r.id, reason.to_owned());
                tokio::spawn(async move {
                    let _ = super::relay::send_close(&peer, id, code, &reason).await;
                });
            }
        }
    }

    /// The agent's address.
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Link::Direct(c) => c.remote_address(),
            Link::Relayed(r) => r.remote,
        }
    }

    /// The replica holding the agent's connection, when it is another one.
    pub fn relayed_by(&self) -> Option<&str> {
        match self {
            Link::Direct(_) => None,
            Link::Relayed(r) => Some(&r.replica),
        }
    }

    /// Resolves when the session has ended.
    pub async fn closed(&self) {
        match self {
            Link::Direct(c) => {
                c.closed().await;
            }
            Link::Relayed(r) => {
                tokio::select! {
                    _ = r.gone.cancelled() => {}
                    _ = r.peer.closed() => {}
                }
            }
        }
    }

    /// Why the session ended, when it has.
    pub fn close_reason(&self) -> Option<String> {
        match self {
            Link::Direct(c) => c.close_reason().map(|r| r.to_string()),
            Link::Relayed(r) => r
                .reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .or_else(|| r.peer.close_reason().map(|e| format!("relay: {e}"))),
        }
    }

    /// The next telemetry datagram.
    pub async fn read_datagram(&self) -> Result<Bytes, Gone> {
        match self {
            Link::Direct(c) => c.read_datagram().await.map_err(|_| Gone),
            Link::Relayed(r) => {
                let mut rx = r.datagrams.lock().await;
                tokio::select! {
                    d = rx.recv() => d.ok_or(Gone),
                    _ = r.gone.cancelled() => Err(Gone),
                }
            }
        }
    }

    /// The next stream the agent opened for a large sample.
    pub async fn accept_uni(&self) -> Result<quinn::RecvStream, Gone> {
        match self {
            Link::Direct(c) => c.accept_uni().await.map_err(|_| Gone),
            Link::Relayed(r) => {
                let mut rx = r.unis.lock().await;
                tokio::select! {
                    s = rx.recv() => s.ok_or(Gone),
                    _ = r.gone.cancelled() => Err(Gone),
                }
            }
        }
    }
}
