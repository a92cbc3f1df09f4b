//! The event bus: a bounded broadcast channel of typed events ([`Event`], in `nebula-types`).
//! Subscribers that lag lose the oldest events (and are told how many) rather than slowing
//! the publisher.
//!
//! Replicas on PostgreSQL hear each other's events: the `event-fanout` task ([`fanout`])
//! sends what is published here to the other replicas as notifications (`NOTIFY` on
//! [`CHANNEL`], batched under PostgreSQL's payload limit) and publishes theirs here. A
//! notification is lost while a listener's connection is down, so after it reconnects (and
//! whenever a sender had to drop events) subscribers get [`Event::EventsMissed`]: views
//! refresh in full, as they do after lagging.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub use nebula_types::events::Event;

use crate::ControlPlane;

/// The notification channel events travel on between replicas.
pub const CHANNEL: &str = "nebula_events";
/// PostgreSQL refuses payloads of 8000 bytes and more.
const PAYLOAD_MAX: usize = 7_800;
/// Events waiting to be sent to the other replicas; more are dropped (and a gap announced).
const OUTBOX: usize = 8_192;

#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
    outbox: Arc<Outbox>,
}

#[derive(Debug, Default)]
struct Outbox {
    /// Set by the `event-fanout` task (PostgreSQL only).
    tx: OnceLock<mpsc::Sender<Event>>,
    /// An event could not be queued for the other replicas.
    dropped: AtomicBool,
}

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        EventBus {
            tx: broadcast::channel(capacity).0,
            outbox: Arc::default(),
        }
    }

    /// Publish an event that happened on this replica (the other replicas hear it too).
    pub fn publish(&self, event: Event) {
        tracing::debug!(?event, "event");
        if let Some(out) = self.outbox.tx.get() {
            if out.try_send(event.clone()).is_err() {
                self.outbox.dropped.store(true, Ordering::Relaxed);
            }
        }
        // No subscriber is fine: nobody is watching.
        let _ = self.tx.send(event);
    }

    /// Publish here only (an event another replica published).
    fn publish_here(&self, event: Event) {
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

/// One notification's payload: events one replica published, in order.
#[derive(Debug, Serialize, Deserialize)]
struct Batch {
    /// The replica that published them.
    from: String,
    /// The sender dropped events before these: listeners resync.
    #[serde(default)]
    gap: bool,
    events: Vec<Event>,
}

/// Pack events into payloads under [`PAYLOAD_MAX`], in order. An event too large for any
/// payload is left out, and the next payload says so (`gap`).
fn pack(from: &str, gap: bool, events: &[Event]) -> Vec<String> {
    let head = |gap: bool| {
        format!(
            "{{\"from\":{},\"gap\":{gap},\"events\":[",
            serde_json::Value::from(from)
        )
    };
    let mut out = Vec::new();
    let mut gap = gap;
    let mut cur: Option<String> = None;
    for e in events {
        let json = match serde_json::to_string(e) {
            Ok(j) if head(true).len() + j.len() + 2 <= PAYLOAD_MAX => j,
            Ok(j) => {
                warn!(
                    bytes = j.len(),
                    "an event too large to pass on to the other replicas"
                );
                gap = true;
                continue;
            }
            Err(_) => {
                gap = true;
                continue;
            }
        };
        if let Some(mut c) = cur.take_if(|c| c.len() + json.len() + 3 > PAYLOAD_MAX) {
            c.push_str("]}");
            out.push(c);
        }
        match &mut cur {
            None => cur = Some(head(std::mem::take(&mut gap)) + &json),
            Some(c) => {
                c.push(',');
                c.push_str(&json);
            }
        }
    }
    out.extend(cur.map(|c| c + "]}"));
    if gap {
        out.push(head(true) + "]}");
    }
    out
}

/// What a notification from another replica says: its events, then whether to resync.
/// `None`: this replica's own, or not a batch (a resync is due).
fn unpack(me: &str, payload: &str) -> Result<Option<(Vec<Event>, bool)>, serde_json::Error> {
    let b: Batch = serde_json::from_str(payload)?;
    Ok((b.from != me).then_some((b.events, b.gap)))
}

/// The `event-fanout` task (replicas on PostgreSQL; it ends at once on SQLite).
pub async fn fanout(cp: Arc<ControlPlane>, cancel: CancellationToken) {
    if !cp.ha.replicated() {
        return;
    }
    let (tx, mut rx) = mpsc::channel(OUTBOX);
    if cp.events.outbox.tx.set(tx).is_err() {
        return;
    }
    let me = cp.ha.replica.clone();
    let metric = |what: &'static str| {
        cp.metrics
            .events_fanout
            .get_or_create(&vec![("what", what)])
            .inc()
    };
    let mut listener = None;
    let mut listened_before = false;
    let mut pending = Vec::new();
    loop {
        if listener.is_none() {
            match tokio::time::timeout(Duration::from_secs(5), cp.store.listen(&[CHANNEL])).await {
                Ok(Ok(l)) => {
                    listener = Some(l);
                    // Whatever was sent while nobody listened here is lost: views refresh.
                    if std::mem::replace(&mut listened_before, true) {
                        metric("resync");
                        cp.events.publish_here(Event::EventsMissed {
                            reason: "this replica's notification listener reconnected".into(),
                        });
                    }
                }
                Ok(Err(e)) => warn!("listening for the other replicas' events: {e:#}"),
                Err(_) => warn!("listening for the other replicas' events: no answer in 5 s"),
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            n = rx.recv_many(&mut pending, 1024) => {
                if n == 0 {
                    return;
                }
                let gap = cp.events.outbox.dropped.swap(false, Ordering::Relaxed);
                for payload in pack(&me, gap, &pending) {
                    if let Err(e) = cp.store.notify(CHANNEL, &payload).await {
                        warn!("passing events on to the other replicas: {e:#}");
                        cp.events.outbox.dropped.store(true, Ordering::Relaxed);
                    } else {
                        metric("sent");
                    }
                }
                pending.clear();
            }
            heard = recv(&mut listener) => match heard {
                Some(payload) => match unpack(&me, &payload) {
                    Ok(None) => {}
                    Ok(Some((events, gap))) => {
                        metric("received");
                        for e in events {
                            cp.events.publish_here(e);
                        }
                        if gap {
                            metric("resync");
                            cp.events.publish_here(Event::EventsMissed {
                                reason: "another replica could not pass every event on".into(),
                            });
                        }
                    }
                    Err(e) => {
                        warn!("a notification on {CHANNEL} that is not a batch of events: {e}");
                        metric("resync");
                        cp.events.publish_here(Event::EventsMissed {
                            reason: "a notification from another replica could not be read".into(),
                        });
                    }
                },
                // Dropped: listen again (and resync) on the next round.
                None => {
                    listener = None;
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            },
        }
    }
}

/// The next payload on the listener; `None` when it dropped. Without a listener, never.
async fn recv(listener: &mut Option<crate::store::lease::Listener>) -> Option<String> {
    match listener {
        None => std::future::pending().await,
        Some(l) => match l.recv().await {
            Ok(Some((_, payload))) => Some(payload),
            Ok(None) => None,
            Err(e) => {
                warn!("the other replicas' events: {e:#}");
                None
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: usize, pad: usize) -> Event {
        Event::DesiredRejected {
            source: format!("s{i}"),
            error: "x".repeat(pad),
        }
    }

    #[test]
    fn batches_stay_under_the_payload_limit_in_order() {
        let events: Vec<Event> = (0..200).map(|i| ev(i, 100)).collect();
        let payloads = pack("r1", false, &events);
        assert!(payloads.len() > 2, "{}", payloads.len());
        let mut back = Vec::new();
        for p in &payloads {
            assert!(p.len() <= PAYLOAD_MAX, "{}", p.len());
            let (evs, gap) = unpack("other", p).unwrap().unwrap();
            assert!(!gap);
            back.extend(evs);
        }
        assert_eq!(back, events);
        // A replica ignores its own.
        assert!(unpack("r1", &payloads[0]).unwrap().is_none());
    }

    #[test]
    fn an_event_too_large_is_left_out_and_the_gap_announced() {
        let events = vec![ev(0, 10), ev(1, 9_000), ev(2, 10)];
        let payloads = pack("r1", false, &events);
        let got: Vec<(Vec<Event>, bool)> = payloads
            .iter()
            .map(|p| unpack("r2", p).unwrap().unwrap())
            .collect();
        let all: Vec<Event> = got.iter().flat_map(|(e, _)| e.clone()).collect();
        assert_eq!(all, vec![events[0].clone(), events[2].clone()]);
        // The gap is said in the payload that follows it.
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(!got[0].1 && got[1].1, "{got:?}");
        // A gap with nothing after it still goes out.
        let only_gap = pack("r1", true, &[]);
        assert_eq!(only_gap.len(), 1);
        let (evs, gap) = unpack("r2", &only_gap[0]).unwrap().unwrap();
        assert!(evs.is_empty() && gap);
        assert!(unpack("r2", "{not json").is_err());
    }
}
