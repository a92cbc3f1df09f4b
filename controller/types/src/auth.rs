//! Roles and the operations the control plane authorizes: one table ([`Op::needs`]) that every
//! front end (the HTTP API, the dashboard, later the bots) is judged by.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a user or API token may do, least to most.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    /// A stored role name; anything unknown is the least privileged.
    pub fn parse(s: &str) -> Role {
        match s {
            "admin" => Role::Admin,
            "operator" => Role::Operator,
            _ => Role::Viewer,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// Everything the control plane lets someone do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Nodes, containers, telemetry, services, plans, jobs, models, tasks.
    ReadFleet,
    /// Plan a service map without applying it.
    PreviewPlan,
    /// Read a container's log (within what its node's `docker.logs` allows).
    ReadLogs,
    ReadAudit,
    /// The allow-listed operations each node offers.
    ReadInventory,
    /// Create a job: commands, probes, model pulls and deletes, container restarts.
    RunJob,
    /// Start, stop, restart, kill, remove a container or pull its image again (within what
    /// its node's `docker.control` allows).
    ControlContainer,
    /// Run an interactive command in a container (within what its node's `docker.exec`
    /// allows).
    ExecContainer,
    /// Remove a node's unused images and volumes (within what its `docker.control` allows).
    PruneStorage,
    /// Silence and acknowledge alerts.
    ManageAlerts,
    /// Add and remove notification sinks (they hold URLs and secrets).
    ManageSinks,
    CancelJob,
    WakeNode,
    SleepNode,
    RollbackService,
    /// Ask the reconciler for a run now.
    Reconcile,
    /// Chat through the AI gateway from the dashboard.
    Chat,
    ApplyMap,
    ManageJoinTokens,
    RemoveNode,
    ManageUsers,
    ManageApiTokens,
    /// Connect the Discord bot, edit any server's settings (role mappings included), make
    /// link codes for other users.
    ManageBot,
    /// Secrets' names, versions, who and when (never values).
    ReadSecrets,
    /// Store, import and remove secrets; rotate the key they are encrypted under.
    ManageSecrets,
    /// Inline `env` values of the service map, its plans and deploy jobs (viewers see the
    /// variables' names and secret references, `***` for inline values).
    ReadMapValues,
    /// Take a backup (every table and the key files, sealed with a passphrase).
    Backup,
    /// Start and cancel workflow runs (their steps may do what the starter's role may).
    RunWorkflow,
    /// Approve or reject a workflow step that waits for a person.
    ApproveStep,
    /// Define and remove workflows through the API.
    ManageWorkflows,
}

impl Op {
    pub const ALL: [Op; 30] = [
        Op::ReadFleet,
        Op::PreviewPlan,
        Op::ReadLogs,
        Op::ReadAudit,
        Op::ReadInventory,
        Op::RunJob,
        Op::ControlContainer,
        Op::ExecContainer,
        Op::PruneStorage,
        Op::ManageAlerts,
        Op::ManageSinks,
        Op::CancelJob,
        Op::WakeNode,
        Op::SleepNode,
        Op::RollbackService,
        Op::Reconcile,
        Op::Chat,
        Op::ApplyMap,
        Op::ManageJoinTokens,
        Op::RemoveNode,
        Op::ManageUsers,
        Op::ManageApiTokens,
        Op::ManageBot,
        Op::ReadSecrets,
        Op::ManageSecrets,
        Op::ReadMapValues,
        Op::Backup,
        Op::RunWorkflow,
        Op::ApproveStep,
        Op::ManageWorkflows,
    ];

    /// The least role that may do it: the policy, in one place.
    pub const fn needs(self) -> Role {
        match self {
            Op::ReadFleet | Op::PreviewPlan | Op::ReadLogs => Role::Viewer,
            Op::ReadAudit
            | Op::ReadInventory
            | Op::RunJob
            | Op::ControlContainer
            | Op::ExecContainer
            | Op::PruneStorage
            | Op::ManageAlerts
            | Op::CancelJob
            | Op::WakeNode
            | Op::SleepNode
            | Op::RollbackService
            | Op::Reconcile
            | Op::ReadSecrets
            | Op::ReadMapValues
            | Op::RunWorkflow
            | Op::ApproveStep
            | Op::Chat => Role::Operator,
            Op::ApplyMap
            | Op::ManageSinks
            | Op::ManageJoinTokens
            | Op::RemoveNode
            | Op::ManageUsers
            | Op::ManageApiTokens
            | Op::ManageBot
            | Op::ManageSecrets
            | Op::Backup
            | Op::ManageWorkflows => Role::Admin,
        }
    }

    /// The name used in metrics and refusals (`apply_map`).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::ReadFleet => "read_fleet",
            Op::PreviewPlan => "preview_plan",
            Op::ReadLogs => "read_logs",
            Op::ControlContainer => "control_container",
            Op::ExecContainer => "exec_container",
            Op::PruneStorage => "prune_storage",
            Op::ManageAlerts => "manage_alerts",
            Op::ManageSinks => "manage_sinks",
            Op::ReadAudit => "read_audit",
            Op::ReadInventory => "read_inventory",
            Op::RunJob => "run_job",
            Op::CancelJob => "cancel_job",
            Op::WakeNode => "wake_node",
            Op::SleepNode => "sleep_node",
            Op::RollbackService => "rollback_service",
            Op::Reconcile => "reconcile",
            Op::Chat => "chat",
            Op::ApplyMap => "apply_map",
            Op::ManageJoinTokens => "manage_join_tokens",
            Op::RemoveNode => "remove_node",
            Op::ManageUsers => "manage_users",
            Op::ManageApiTokens => "manage_api_tokens",
            Op::ManageBot => "manage_bot",
            Op::ReadSecrets => "read_secrets",
            Op::ManageSecrets => "manage_secrets",
            Op::ReadMapValues => "read_map_values",
            Op::Backup => "backup",
            Op::RunWorkflow => "run_workflow",
            Op::ApproveStep => "approve_step",
            Op::ManageWorkflows => "manage_workflows",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_order_and_parse() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        for r in [Role::Viewer, Role::Operator, Role::Admin] {
            assert_eq!(Role::parse(r.as_str()), r);
        }
        assert_eq!(Role::parse("root"), Role::Viewer);
    }

    #[test]
    fn viewers_only_read_and_admins_hold_the_keys() {
        for op in Op::ALL {
            let read_only = matches!(op, Op::ReadFleet | Op::PreviewPlan | Op::ReadLogs);
            assert_eq!(op.needs() == Role::Viewer, read_only, "{op:?}");
        }
        for op in [
            Op::ApplyMap,
            Op::ManageUsers,
            Op::ManageApiTokens,
            Op::RemoveNode,
        ] {
            assert_eq!(op.needs(), Role::Admin, "{op:?}");
        }
        let names: std::collections::BTreeSet<&str> = Op::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(names.len(), Op::ALL.len());
    }
}
