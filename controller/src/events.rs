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
    /// Each read on its own: a kind this version does not know (a newer replica's, during a
    /// rolling upgrade) is skipped, not a reason to drop the batch.
    events: Vec<serde_json::Value>,
}

/// Pack events into payloads under [`PAYLOAD_MAX`], in order. An event too large for any
/// payload is left out, and the payload after it says so (`gap`).
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

/// What a notification says: the events another replica published (kinds this version does
/// not know left out), then whether to resync; `None` for this replica's own. `Err`: not a
/// batch at all (a resync is due).
fn unpack(me: &str, payload: &str) -> Result<Option<(Vec<Event>, bool)>, serde_json::Error> {
    let b: Batch = serde_json::from_str(payload)?;
    if b.from == me {
        return Ok(None);
    }
    let events = (b.events.into_iter())
        .filter_map(|v| match serde_json::from_value(v) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::debug!("an event of a kind this replica does not know: {e}");
                None
            }
        })
        .collect();
    Ok(Some((events, b.gap)))
}

/// How long the `event-fanout` task waits before listening again, or sending a gap it owes.
const RETRY: Duration = Duration::from_secs(1);

/// The `event-fanout` task (replicas on PostgreSQL; it ends at once on SQLite).
pub async fn fanout(cp: Arc<ControlPlane>, cancel: CancellationToken) {
    if !cp.ha.replicated() {
        return;
    }
    let (tx, mut rx) = mpsc::channel(OUTBOX);
    if cp.events.outbox.tx.set(tx).is_err() {
        return;
    }
    let f = Fanout {
        me: cp.ha.replica.clone(),
        cp,
    };
    let mut listener = None;
    let mut listened_before = false;
    let mut pending = Vec::new();
    loop {
        if listener.is_none() {
            listener = f.listen(&mut listened_before).await;
        }
        let owed = f.cp.events.outbox.dropped.load(Ordering::Relaxed);
        tokio::select! {
            _ = cancel.cancelled() => return,
            n = rx.recv_many(&mut pending, 1024) => {
                if n == 0 {
                    return;
                }
                if !f.send(&pending, &cancel).await {
                    return;
                }
                pending.clear();
            }
            heard = recv(&mut listener) => match heard {
                Some(payload) => f.heard(&payload),
                // Dropped: listen again (and resync) on the next round.
                None => listener = None,
            },
            // No listener (the database is away), or a gap to announce with no event to
            // carry it: try again in a moment.
            _ = tokio::time::sleep(RETRY), if listener.is_none() || owed => {
                if owed && !f.send(&[], &cancel).await {
                    return;
                }
            }
        }
    }
}

struct Fanout {
    cp: Arc<ControlPlane>,
    me: String,
}

impl Fanout {
    fn metric(&self, what: &'static str) {
        (self.cp.metrics.events_fanout)
            .get_or_create(&vec![("what", what)])
            .inc();
    }

    fn missed(&self, reason: &str) {
        self.metric("resync");
        self.cp.events.publish_here(Event::EventsMissed {
            reason: reason.into(),
        });
    }

    /// Listen on [`CHANNEL`]; after a first listener, whatever was sent while nobody listened
    /// here is lost, so views refresh.
    async fn listen(&self, listened_before: &mut bool) -> Option<crate::store::lease::Listener> {
        match tokio::time::timeout(Duration::from_secs(5), self.cp.store.listen(&[CHANNEL])).await {
            Ok(Ok(l)) => {
                if std::mem::replace(listened_before, true) {
                    self.missed("this replica's notification listener reconnected");
                }
                Some(l)
            }
            Ok(Err(e)) => {
                warn!("listening for the other replicas' events: {e:#}");
                None
            }
            Err(_) => {
                warn!("listening for the other replicas' events: no answer in 5 s");
                None
            }
        }
    }

    /// Send `events` (and a gap owed) in order; a payload that does not go out leaves the
    /// rest unsent and a gap owed. `false`: cancelled meanwhile.
    async fn send(&self, events: &[Event], cancel: &CancellationToken) -> bool {
        let dropped = &self.cp.events.outbox.dropped;
        let gap = dropped.swap(false, Ordering::Relaxed);
        for payload in pack(&self.me, gap, events) {
            let sent = tokio::select! {
                _ = cancel.cancelled() => return false,
                r = self.cp.store.notify(CHANNEL, &payload) => r,
            };
            if let Err(e) = sent {
                warn!("passing events on to the other replicas: {e:#}");
                dropped.store(true, Ordering::Relaxed);
                break;
            }
            self.metric("sent");
        }
        true
    }

    /// Publish here what another replica sent.
    fn heard(&self, payload: &str) {
        match unpack(&self.me, payload) {
            Ok(None) => {}
            Ok(Some((events, gap))) => {
                self.metric("received");
                for e in events {
                    self.cp.events.publish_here(e);
                }
                if gap {
                    self.missed("another replica could not pass every event on");
                }
            }
            Err(e) => {
                warn!("a notification on {CHANNEL} that is not a batch of events: {e}");
                self.missed("a notification from another replica could not be read");
            }
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

    #[test]
    fn an_event_of_an_unknown_kind_is_skipped_not_the_batch() {
        let payload = r#"{"from":"r9","gap":false,"events":[
            {"type":"node_online","id":"01a2511c-938d-7614-b863-eff1244e28c9","name":"box"},
            {"type":"something_newer","x":1}]}"#;
        let (events, gap) = unpack("r1", payload).unwrap().unwrap();
        assert!(!gap);
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(matches!(&events[0], Event::NodeOnline { name, .. } if name == "box"));
    }
}
