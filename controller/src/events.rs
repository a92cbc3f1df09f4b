//! The in-process event bus: a bounded broadcast channel of typed events ([`Event`], in
//! `nebula-types`). Subscribers that lag
//! lose the oldest events (and are told how many) rather than slowing the publisher.

use tokio::sync::broadcast;

pub use nebula_types::events::Event;

#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
}

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        EventBus {
            tx: broadcast::channel(capacity).0,
        }
    }

    pub fn publish(&self, event: Event) {
        tracing::debug!(?event, "event");
        // No subscriber is fine: nobody is watching.
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
