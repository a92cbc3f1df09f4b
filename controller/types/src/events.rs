//! The fleet's public events: what changed, as the controller's event bus publishes it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Something that changed in the fleet, as the event bus carries it (the dashboard's live
/// views, the reconciler; later notifications and bots).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
    /// A workflow run started, moved on (a step changed) or ended.
    WorkflowRunChanged {
        id: Uuid,
        workflow: String,
        state: String,
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
    /// A monitor went up or down on a node (or reported for the first time).
    MonitorChanged {
        monitor: String,
        node: String,
        up: bool,
    },
    /// Events may have been missed (replicas: a notification listener reconnected, or
    /// another replica could not pass every event on): views refresh in full.
    EventsMissed {
        reason: String,
    },
}
