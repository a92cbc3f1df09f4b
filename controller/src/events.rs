//! The in-process event bus: a bounded broadcast channel of typed events. Subscribers that lag
//! lose the oldest events (and are told how many) rather than slowing the publisher.

use serde::Serialize;
use tokio::sync::broadcast;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    NodeEnrolled {
        id: Uuid,
        name: String,
    },
    NodeOnline {
        id: Uuid,
        name: String,
    },
    NodeOffline {
        id: Uuid,
        name: String,
    },
    NodeRemoved {
        id: Uuid,
        name: String,
    },
    CertificateRenewed {
        id: Uuid,
        name: String,
        serial: String,
    },
    JoinTokenCreated {
        id: String,
        by: String,
    },
    JoinTokenRevoked {
        id: String,
        by: String,
    },
    /// A node is being woken through a relay.
    NodeWaking {
        id: Uuid,
        name: String,
        relay: String,
    },
    /// A woken node did not register within `wake_timeout`.
    NodeWakeFailed {
        id: Uuid,
        name: String,
    },
    /// A job moved to another state (published once the change is stored).
    JobChanged {
        id: Uuid,
        kind: String,
        state: String,
        node: Option<String>,
    },
    /// A running job reported how far it is (model pulls and downloads).
    JobProgress {
        id: Uuid,
        node: Option<String>,
        /// Tenths of a percent (0-1000), so that events stay `Eq`.
        permille: u16,
        message: String,
    },
    /// A service map was accepted and is in force.
    DesiredApplied {
        version: i64,
        source: String,
        by: String,
    },
    /// A service map was refused; the last good one stays in force.
    /// A service pinned to an earlier revision (a rollback).
    ServiceRolledBack {
        service: String,
        from: String,
        to: String,
        by: String,
    },
    ApiTokenCreated {
        name: String,
        role: String,
        by: String,
    },
    UserCreated {
        username: String,
        role: String,
        by: String,
    },
    DesiredRejected {
        source: String,
        error: String,
    },
    /// The reconciler started a deploy (a job) of a service on a node.
    DeployStarted {
        service: String,
        node: String,
        action: String,
        revision: String,
        job: Uuid,
    },
    /// A deploy ended: deployed, unchanged, rolled-back, failed, ...
    DeployFinished {
        service: String,
        node: String,
        revision: String,
        outcome: String,
        message: Option<String>,
    },
    /// A container's state or health changed (from telemetry).
    ContainerChanged {
        node_id: Uuid,
        node: String,
        container: String,
        name: String,
        state: String,
        health: String,
    },
}

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
