//! Background tasks as `GET /api/v1/tasks` shows them: scope, kind, state and last run.

use std::borrow::Cow;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// On every controller replica.
    EveryReplica,
    /// Only on the replica that holds leadership.
    Leader,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::EveryReplica => "every-replica",
            Scope::Leader => "leader",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Periodic,
    Service,
}

/// Why an activation ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// The first run after the task started.
    Start,
    Period,
    /// Its activator fired.
    Activated,
    /// The last run, on the way out (tasks that flush what they buffer).
    Stopping,
}

/// The last finished run of a task.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct LastRun {
    /// Unix milliseconds.
    pub started_at: i64,
    pub took_ms: u64,
    pub trigger: Trigger,
    pub ok: bool,
    /// What the run did (periodic tasks' summary), or the error.
    pub result: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Registered, not started yet.
    Starting,
    /// A service running, or a periodic task between runs.
    Idle,
    /// A periodic task's activation in progress.
    Running,
    /// A leader task on a replica that does not lead.
    WaitingForLeadership,
    Stopped,
}

/// One task's status, as `GET /api/v1/tasks` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TaskStatus {
    pub name: Cow<'static, str>,
    pub description: Cow<'static, str>,
    pub scope: Scope,
    pub kind: Kind,
    /// Periodic tasks: the period in milliseconds.
    pub period_ms: Option<u64>,
    pub state: State,
    /// Runs finished since the controller started.
    pub runs: u64,
    pub errors: u64,
    pub last: Option<LastRun>,
}

/// `GET /api/v1/replicas`: the controllers of this control plane and which one leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReplicasView {
    /// `single` (SQLite: one controller, always the leader) or `replicas` (PostgreSQL).
    pub mode: String,
    /// The replica that answered.
    pub this: String,
    /// The replica holding the lease, while one does.
    pub leader: Option<String>,
    /// The lease's term (raised on every takeover).
    pub term: Option<i64>,
    /// When the lease runs out unless renewed (Unix ms, the database's clock).
    pub lease_expires_at: Option<i64>,
    pub replicas: Vec<ReplicaView>,
}

/// One replica, as it registered itself (seen within the last minute).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReplicaView {
    pub id: String,
    pub hostname: String,
    pub http_url: String,
    pub quic_addr: String,
    pub version: String,
    pub started_at: i64,
    pub seen_at: i64,
    pub leader: bool,
    /// Agent sessions whose connection this replica holds (those of a follower are relayed to
    /// the leader), as recorded in the store when they started.
    #[serde(default)]
    pub sessions: i64,
}
