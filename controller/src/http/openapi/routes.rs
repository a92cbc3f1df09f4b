//! The list of every operation the HTTP API serves.

use super::{of, route, Access, Route};
use crate::authz::Op;
use nebula_types::api::{
    access, alerts, containers, desired, discord, jobs, models, monitors, nodes, telemetry, Health,
    Page,
};
use nebula_types::jobs::{AuditRecord, JobRecord};

use Access::{Gateway, Public, Token};

/// Every operation the router serves.
pub const ROUTES: &[Route] = &[
    route(
        "get",
        "/healthz",
        "system",
        Public,
        (200, "the controller runs"),
        "Liveness and the number of online nodes",
    )
    .returns(of::<Health>),
    route(
        "get",
        "/metrics",
        "system",
        Token(Op::ReadFleet),
        (200, "Prometheus text format"),
        "Prometheus metrics",
    ),
    route(
        "get",
        "/api/v1/openapi.json",
        "system",
        Public,
        (200, "this document"),
        "The OpenAPI document of this API",
    ),
    route(
        "get",
        "/api/v1/schema/service-map",
        "desired state",
        Public,
        (200, "a JSON Schema"),
        "The service map's JSON Schema",
    ),
    route(
        "get",
        "/install.sh",
        "install",
        Public,
        (200, "a shell script"),
        "The Linux agent installer, pre-filled for this controller",
    ),
    route(
        "get",
        "/install.ps1",
        "install",
        Public,
        (200, "a PowerShell script"),
        "The Windows agent installer, pre-filled for this controller",
    ),
    route(
        "get",
        "/downloads/{file}",
        "install",
        Public,
        (200, "an agent build or its manifest"),
        "A signed agent build",
    ),
    route(
        "get",
        "/api/v1/nodes",
        "nodes",
        Token(Op::ReadFleet),
        (200, "a page of nodes"),
        "List nodes (?status=, ?label=k=v, ?limit=, ?cursor=)",
    )
    .returns(of::<Page<nodes::NodeView>>),
    route(
        "get",
        "/api/v1/nodes/{name}",
        "nodes",
        Token(Op::ReadFleet),
        (200, "the node"),
        "One node with its latest figures",
    )
    .returns(of::<nodes::NodeView>),
    route(
        "delete",
        "/api/v1/nodes/{name}",
        "nodes",
        Token(Op::RemoveNode),
        (200, "the removed node's id"),
        "Remove a node: revoke its certificates and cut it off",
    )
    .returns(of::<nodes::NodeRemoved>),
    route(
        "post",
        "/api/v1/nodes/{name}/wake",
        "nodes",
        Token(Op::WakeNode),
        (202, "the wake-up under way"),
        "Wake a node through a relay on its LAN",
    )
    .returns(of::<nodes::Wake>),
    route(
        "post",
        "/api/v1/nodes/{name}/sleep",
        "nodes",
        Token(Op::SleepNode),
        (202, "the sleep job"),
        "Run the node's allow-listed sleep command",
    )
    .returns(of::<JobRecord>),
    route(
        "get",
        "/api/v1/nodes/{name}/telemetry",
        "telemetry",
        Token(Op::ReadFleet),
        (200, "latest figures and history"),
        "A node's telemetry (?since=, ?step=)",
    )
    .returns(of::<telemetry::NodeTelemetry>),
    route(
        "get",
        "/api/v1/alerts",
        "alerts",
        Token(Op::ReadFleet),
        (200, "alerts pending and firing, most severe first"),
        "What fires now",
    )
    .returns(of::<Vec<alerts::AlertView>>),
    route(
        "post",
        "/api/v1/alerts/{fingerprint}/ack",
        "alerts",
        Token(Op::ManageAlerts),
        (204, "acknowledged: not repeated; its resolution is still sent"),
        "Acknowledge a firing alert",
    ),
    route(
        "get",
        "/api/v1/alerts/sinks",
        "alerts",
        Token(Op::ReadFleet),
        (200, "where notifications go"),
        "List notification sinks",
    )
    .returns(of::<Vec<alerts::SinkView>>),
    route(
        "post",
        "/api/v1/alerts/sinks",
        "alerts",
        Token(Op::ManageSinks),
        (201, "the sink and its signing secret, shown once"),
        "Add (or replace) a notification sink",
    )
    .accepts(of::<alerts::CreateSink>)
    .returns(of::<alerts::CreatedSink>),
    route(
        "delete",
        "/api/v1/alerts/sinks/{name}",
        "alerts",
        Token(Op::ManageSinks),
        (204, "removed"),
        "Remove a notification sink",
    ),
    route(
        "post",
        "/api/v1/alerts/sinks/{name}/test",
        "alerts",
        Token(Op::ManageAlerts),
        (204, "the receiver took the test message"),
        "Send a test message to a sink",
    ),
    route(
        "get",
        "/api/v1/alerts/silences",
        "alerts",
        Token(Op::ReadFleet),
        (200, "silences in force or to come"),
        "List silences",
    )
    .returns(of::<Vec<alerts::SilenceView>>),
    route(
        "post",
        "/api/v1/alerts/silences",
        "alerts",
        Token(Op::ManageAlerts),
        (201, "the silence"),
        "Silence alerts that match, for a while",
    )
    .accepts(of::<alerts::CreateSilence>)
    .returns(of::<alerts::SilenceView>),
    route(
        "delete",
        "/api/v1/alerts/silences/{id}",
        "alerts",
        Token(Op::ManageAlerts),
        (204, "ended now"),
        "End a silence",
    ),
    route(
        "post",
        "/alerts/ack",
        "alerts",
        Public,
        (204, "acknowledged"),
        "Acknowledge through a signed link from a notification (?sink=&alert=&exp=&sig=)",
    ),
    route(
        "get",
        "/api/v1/alerts/notifications",
        "alerts",
        Token(Op::ReadFleet),
        (200, "the newest notifications and their delivery (?limit=)"),
        "Notification delivery history",
    )
    .returns(of::<Vec<alerts::NotificationView>>),
    route(
        "get",
        "/api/v1/discord",
        "discord",
        Token(Op::ReadFleet),
        (200, "the bot's connection and the servers it is in, with their settings"),
        "The Discord bot",
    )
    .returns(of::<discord::DiscordOverview>),
    route(
        "get",
        "/api/v1/discord/links",
        "discord",
        Token(Op::ReadAudit),
        (200, "Discord accounts linked to users"),
        "Linked Discord accounts",
    )
    .returns(of::<Vec<discord::DiscordLink>>),
    route(
        "put",
        "/api/v1/discord/guilds/{id}",
        "discord",
        Token(Op::ManageBot),
        (200, "the server's settings as stored (its commands are registered again)"),
        "Replace a Discord server's settings",
    )
    .accepts(of::<discord::GuildSettings>)
    .returns(of::<discord::GuildView>),
    route(
        "post",
        "/api/v1/users/{name}/discord-link-code",
        "discord",
        Token(Op::ReadFleet),
        (201, "a one-time code for `/link` in Discord (a user's own; an admin's for anyone), valid 15 minutes"),
        "Make a Discord link code",
    )
    .returns(of::<discord::LinkCode>),
    route(
        "get",
        "/api/v1/monitors",
        "monitors",
        Token(Op::ReadFleet),
        (200, "every monitor with each node's state and uptime, down ones first"),
        "List monitors",
    )
    .returns(of::<Vec<monitors::MonitorView>>),
    route(
        "post",
        "/api/v1/monitors",
        "monitors",
        Token(Op::ManageAlerts),
        (201, "the monitor, as assigned to its nodes"),
        "Add (or replace) a monitor",
    )
    .accepts(of::<monitors::CreateMonitor>)
    .returns(of::<monitors::MonitorView>),
    route(
        "get",
        "/api/v1/monitors/{name}",
        "monitors",
        Token(Op::ReadFleet),
        (200, "the monitor, its recent results and hours per node"),
        "One monitor",
    )
    .returns(of::<monitors::MonitorDetail>),
    route(
        "delete",
        "/api/v1/monitors/{name}",
        "monitors",
        Token(Op::ManageAlerts),
        (204, "removed (only monitors made through the API)"),
        "Remove a monitor",
    ),
    route(
        "get",
        "/api/v1/containers",
        "containers",
        Token(Op::ReadFleet),
        (200, "a page of containers"),
        "Every container in the fleet (?node=, ?label=, ?state=, ?health=, ?managed=, ?q=)",
    )
    .returns(of::<Page<containers::ContainerRow>>),
    route(
        "get",
        "/api/v1/nodes/{name}/containers/{container}",
        "containers",
        Token(Op::ReadFleet),
        (200, "the container and what its node's policy allows"),
        "One container (by name or id)",
    )
    .returns(of::<containers::ContainerView>),
    route(
        "post",
        "/api/v1/nodes/{name}/containers/{container}/actions",
        "containers",
        Token(Op::ControlContainer),
        (
            202,
            "the job that carries it out, and a warning for managed containers",
        ),
        "Start, stop, restart, kill, remove a container or pull its image again",
    )
    .accepts(of::<containers::ContainerActionRequest>)
    .returns(of::<containers::ContainerActionView>),
    route(
        "get",
        "/api/v1/nodes/{name}/containers/{container}/logs",
        "containers",
        Token(Op::ReadLogs),
        (
            200,
            "server-sent events: `logs` (a JSON array of ContainerLogLine), `end`, `error`",
        ),
        "A container's log (?follow=, ?tail=, ?since=)",
    ),
    route(
        "get",
        "/api/v1/nodes/{name}/containers/{container}/exec",
        "containers",
        Token(Op::ExecContainer),
        (101, "a WebSocket: binary input; output tagged 1 stdout, 2 stderr; text {\"resize\"}, {\"eof\"}, {\"exit\"}, {\"error\"}"),
        "An interactive command in a container (?cmd=, ?tty=, ?rows=, ?cols=)",
    ),
    route(
        "get",
        "/api/v1/nodes/{name}/storage",
        "containers",
        Token(Op::ReadFleet),
        (200, "images and volumes with sizes and users, and the runtime's disk usage"),
        "A node's images and volumes",
    )
    .returns(of::<containers::StorageView>),
    route(
        "get",
        "/api/v1/nodes/{name}/storage/prune",
        "containers",
        Token(Op::PruneStorage),
        (200, "the unused images (and volumes, with ?volumes=true) a prune would remove"),
        "Preview a prune (?volumes=, ?match=)",
    )
    .returns(of::<containers::PrunePreview>),
    route(
        "post",
        "/api/v1/nodes/{name}/storage/prune",
        "containers",
        Token(Op::PruneStorage),
        (200, "what was removed, what was left and why, and the bytes freed"),
        "Remove exactly the unused images and volumes named (a preview's)",
    )
    .accepts(of::<containers::PruneRequest>)
    .returns(of::<containers::PruneResult>),
    route(
        "get",
        "/api/v1/tokens",
        "tokens",
        Token(Op::ReadFleet),
        (200, "a page of join tokens"),
        "List join tokens",
    )
    .returns(of::<Page<access::TokenView>>),
    route(
        "post",
        "/api/v1/tokens",
        "tokens",
        Token(Op::ManageJoinTokens),
        (201, "the token, shown once"),
        "Create a join token",
    )
    .returns(of::<access::CreatedTokenView>)
    .accepts(of::<access::CreateTokenRequest>),
    route(
        "delete",
        "/api/v1/tokens/{id}",
        "tokens",
        Token(Op::ManageJoinTokens),
        (200, "revoked"),
        "Revoke a join token",
    )
    .returns(of::<access::TokenRevoked>),
    route(
        "get",
        "/api/v1/jobs",
        "jobs",
        Token(Op::ReadFleet),
        (200, "a page of jobs"),
        "List jobs (?state=, ?node=, ?kind=, ?limit=, ?cursor=)",
    )
    .returns(of::<Page<JobRecord>>),
    route(
        "post",
        "/api/v1/jobs",
        "jobs",
        Token(Op::RunJob),
        (201, "the job (200 or 202 with ?wait=)"),
        "Create a job on a node or the best node for a selector",
    )
    .returns(of::<JobRecord>)
    .accepts(of::<jobs::CreateJob>),
    route(
        "get",
        "/api/v1/jobs/{id}",
        "jobs",
        Token(Op::ReadFleet),
        (200, "the job"),
        "One job",
    )
    .returns(of::<jobs::JobView>),
    route(
        "get",
        "/api/v1/jobs/{id}/logs",
        "jobs",
        Token(Op::ReadFleet),
        (200, "server-sent events with ?follow=true, else JSON"),
        "A job's log lines",
    ),
    route(
        "post",
        "/api/v1/jobs/{id}/cancel",
        "jobs",
        Token(Op::CancelJob),
        (202, "the job"),
        "Cancel a job",
    )
    .returns(of::<JobRecord>),
    route(
        "get",
        "/api/v1/inventory",
        "jobs",
        Token(Op::ReadInventory),
        (200, "operations per node"),
        "The allow-listed operations each node offers",
    )
    .returns(of::<jobs::FanOut>),
    route(
        "post",
        "/api/v1/inventory/execute",
        "jobs",
        Token(Op::RunJob),
        (200, "one result per node"),
        "Run an operation on many nodes at once",
    )
    .returns(of::<jobs::FanOut>),
    route(
        "get",
        "/api/v1/audit",
        "jobs",
        Token(Op::ReadAudit),
        (200, "a page of audit rows"),
        "The audit log (?actor=, ?action=)",
    )
    .returns(of::<Page<AuditRecord>>),
    route(
        "get",
        "/api/v1/desired",
        "desired state",
        Token(Op::ReadFleet),
        (200, "the map in force"),
        "The service map in force",
    )
    .returns(of::<desired::DesiredView>),
    route(
        "put",
        "/api/v1/desired",
        "desired state",
        Token(Op::ApplyMap),
        (200, "the version applied and its plan"),
        "Apply a service map (YAML body)",
    )
    .returns(of::<desired::Applied>),
    route(
        "get",
        "/api/v1/plan",
        "desired state",
        Token(Op::ReadFleet),
        (200, "the plan"),
        "The plan for the map in force",
    )
    .returns(of::<desired::PlanView>),
    route(
        "post",
        "/api/v1/plan",
        "desired state",
        Token(Op::PreviewPlan),
        (200, "the plan"),
        "Plan a service map without applying it",
    )
    .returns(of::<desired::PlanView>),
    route(
        "get",
        "/api/v1/services",
        "desired state",
        Token(Op::ReadFleet),
        (200, "every service"),
        "Services: revision in force, counts, last deploy",
    )
    .returns(of::<Vec<desired::ServiceView>>),
    route(
        "get",
        "/api/v1/services/{name}",
        "desired state",
        Token(Op::ReadFleet),
        (200, "the service and its history"),
        "One service",
    )
    .returns(of::<desired::ServiceDetail>),
    route(
        "post",
        "/api/v1/services/{name}/rollback",
        "desired state",
        Token(Op::RollbackService),
        (200, "the pinned revision"),
        "Roll a service back to an earlier revision",
    )
    .returns(of::<desired::RolledBack>)
    .accepts(of::<desired::RollbackRequest>),
    route(
        "post",
        "/api/v1/reconcile",
        "desired state",
        Token(Op::Reconcile),
        (202, "a run was asked for"),
        "Ask the reconciler for a run now",
    )
    .returns(of::<desired::ReconcileStarted>),
    route(
        "get",
        "/api/v1/users",
        "users",
        Token(Op::ManageUsers),
        (200, "dashboard users"),
        "List dashboard users",
    )
    .returns(of::<access::UserList>),
    route(
        "post",
        "/api/v1/users",
        "users",
        Token(Op::ManageUsers),
        (201, "the user"),
        "Create a dashboard user",
    )
    .returns(of::<access::UserView>)
    .accepts(of::<access::CreateUserRequest>),
    route(
        "post",
        "/api/v1/api-tokens",
        "users",
        Token(Op::ManageApiTokens),
        (201, "the token, shown once"),
        "Create (or replace) an API token",
    )
    .returns(of::<access::CreatedApiToken>)
    .accepts(of::<access::CreateApiTokenRequest>),
    route(
        "get",
        "/api/v1/agent/releases",
        "install",
        Token(Op::ReadFleet),
        (200, "agent builds and the signing key"),
        "The agent builds this controller serves",
    )
    .returns(of::<models::AgentReleases>),
    route(
        "get",
        "/api/v1/tasks",
        "system",
        Token(Op::ReadFleet),
        (200, "every background task"),
        "Background tasks: scope, state, last run",
    )
    .returns(of::<Vec<crate::tasks::TaskStatus>>),
    route(
        "get",
        "/api/v1/models/inventory",
        "models",
        Token(Op::ReadFleet),
        (200, "backends and models per node"),
        "Inference backends and models across the fleet",
    )
    .returns(of::<models::ModelsInventory>),
    route(
        "get",
        "/api/v1/models/desired",
        "models",
        Token(Op::ReadFleet),
        (200, "desired models and their pulls"),
        "Models the service map wants, and their pulls",
    )
    .returns(of::<models::ModelsView>),
    route(
        "get",
        "/api/v1/ai/usage",
        "models",
        Token(Op::ReadFleet),
        (200, "usage per token, model and node"),
        "The AI gateway's usage",
    )
    .returns(of::<models::AiUsage>),
    route(
        "post",
        "/v1/chat/completions",
        "gateway",
        Gateway,
        (200, "an OpenAI chat completion, or server-sent events"),
        "OpenAI-compatible chat, routed to the node that has the model",
    ),
    route(
        "post",
        "/v1/completions",
        "gateway",
        Gateway,
        (200, "an OpenAI completion"),
        "OpenAI-compatible completions",
    ),
    route(
        "post",
        "/v1/embeddings",
        "gateway",
        Gateway,
        (200, "embeddings"),
        "OpenAI-compatible embeddings",
    ),
    route(
        "get",
        "/v1/models",
        "gateway",
        Gateway,
        (200, "the models the fleet serves"),
        "Models across the fleet, OpenAI style",
    ),
    route(
        "post",
        "/v1/images/generations",
        "gateway",
        Gateway,
        (200, "generated images"),
        "Image generation on a Stable Diffusion node",
    ),
    route(
        "post",
        "/sdapi/v1/{op}",
        "gateway",
        Gateway,
        (200, "the backend's answer"),
        "Stable Diffusion WebUI pass-through (txt2img, img2img)",
    ),
];
