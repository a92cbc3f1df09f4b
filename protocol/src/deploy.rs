//! Deploys: what the controller asks an agent's Docker executor to make true for one service on
//! that node, and what it reports back.
//!
//! A [`DeploySpec`] is declarative: "service S runs `replicas` containers of revision R here".
//! The agent converges to it (create, repair, update with rollback), so sending the same spec
//! twice is harmless: the second run finds nothing to do and says so (`changed: false`).
//! Managed containers carry the labels in [`labels`]; the agent never touches a container
//! without `nebula.managed=true` and its own node's id.

use serde::{Deserialize, Serialize};

/// Labels on every container the reconciler manages.
pub mod labels {
    pub const MANAGED: &str = "nebula.managed";
    pub const SERVICE: &str = "nebula.service";
    pub const REVISION: &str = "nebula.revision";
    pub const NODE: &str = "nebula.node";
    pub const REPLICA: &str = "nebula.replica";
}

/// Everything about one container that a revision pins: a change to any field is a new
/// revision. Lists are kept in a fixed order by whoever builds the spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub image: String,
    /// Replaces the image's command; `None` keeps it.
    pub command: Option<Vec<String>>,
    /// `NAME`, value; sorted by name.
    pub env: Vec<(String, String)>,
    pub ports: Vec<PortMapping>,
    pub volumes: Vec<VolumeMount>,
    pub restart: RestartPolicy,
    pub gpus: GpuRequest,
    pub health: Option<HealthCheck>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    Tcp,
    Udp,
}

impl PortProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortMapping {
    /// Host address to bind; `None`: all addresses.
    pub host_ip: Option<String>,
    /// `None`: published on a port Docker picks.
    pub host_port: Option<u16>,
    pub container_port: u16,
    pub protocol: PortProtocol,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// A named volume, or an absolute host path (a bind mount).
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    No,
    Always,
    UnlessStopped,
    OnFailure { max_retries: Option<u32> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuRequest {
    None,
    All,
    Count(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub probe: HealthProbe,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    /// Consecutive failures (after the start period) that make the container unhealthy.
    pub retries: u32,
    /// Failures in this first stretch do not count.
    pub start_period_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthProbe {
    /// GET `http://<container address>:<port><path>` from the agent's host; 2xx or 3xx is healthy.
    Http { port: u16, path: String },
    /// A TCP connect to the container's port from the agent's host.
    Tcp { port: u16 },
    /// A command run inside the container (`docker exec`); exit status 0 is healthy. Also set
    /// as the container's Docker health check, so its health is reported continuously.
    Cmd { command: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateStrategy {
    /// New containers start and turn healthy before the old ones stop (no downtime; needs no
    /// fixed host port).
    StartFirst,
    /// Old containers stop first (a fixed host port can be taken over).
    StopFirst,
}

/// Make `replicas` containers of `revision` run for `service` on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploySpec {
    pub service: String,
    pub revision: String,
    /// The node's id, written to the `nebula.node` label.
    pub node: String,
    pub replicas: u32,
    pub container: ContainerSpec,
    pub strategy: UpdateStrategy,
    /// How long new containers have to turn healthy before the rollout is rolled back.
    pub health_timeout_ms: u32,
}

/// Remove every managed container of `service` on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndeploySpec {
    pub service: String,
    pub node: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeployOutcome {
    /// Already as asked; nothing was touched.
    Unchanged,
    /// Containers were created, started, replaced or removed, and are healthy.
    Deployed,
    /// The new revision failed its health gate; the previous one runs again.
    RolledBack,
    /// It failed and there was nothing to roll back to.
    Failed,
}

impl DeployOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DeployOutcome::Unchanged => "unchanged",
            DeployOutcome::Deployed => "deployed",
            DeployOutcome::RolledBack => "rolled-back",
            DeployOutcome::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployReport {
    pub outcome: DeployOutcome,
    /// Revisions replaced (or, after a rollback, running again).
    pub previous: Vec<String>,
    /// Names of the service's containers on the node afterwards.
    pub containers: Vec<String>,
    /// The last health check's output when the gate failed.
    pub health_output: Option<String>,
}

/// What a node's agent lets deploys do there (its `[deploy]` config): bind mounts only below
/// `allow_bind_paths`, the runtime's socket, privileged mode, host namespaces, capabilities and
/// devices only when allowed; GPUs unless `allow_gpus` is off. The agent refuses a deploy
/// outside it before touching a container; the controller can use this summary to show such
/// refusals in a plan. Not carried by any message yet: adding it to one is a protocol change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployPolicySummary {
    pub allow_bind_paths: Vec<String>,
    pub allow_docker_socket: bool,
    pub allow_privileged: bool,
    pub allow_host_network: bool,
    pub allow_host_pid: bool,
    pub allow_capabilities: Vec<String>,
    pub allow_devices: Vec<String>,
    pub allow_gpus: bool,
}
