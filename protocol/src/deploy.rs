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

/// Access to the host that a service asks for beyond an ordinary container (1.5): privileged
/// mode, the host's network or PID namespace, added capabilities, host devices. It travels
/// beside a [`DeploySpec`] in `JobSpec::DeployWithHostAccess`, which is sent only for services
/// that ask for some; every other service still goes as `JobSpec::Deploy`, which agents older
/// than 1.5 understand. The default asks for nothing ([`HostAccess::is_empty`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostAccess {
    /// A privileged container (`--privileged`).
    pub privileged: bool,
    pub network: NetworkMode,
    /// The host's PID namespace (`--pid host`).
    pub pid_host: bool,
    /// Capabilities to add, by name without `CAP_` (`NET_ADMIN`), sorted, each once.
    pub cap_add: Vec<String>,
    /// Host devices given to the container.
    pub devices: Vec<DeviceMapping>,
}

impl HostAccess {
    /// Asks for nothing beyond an ordinary container.
    pub fn is_empty(&self) -> bool {
        *self == HostAccess::default()
    }
}

/// The network namespace a container gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Its own namespace on Docker's default bridge (ports are published).
    #[default]
    Bridge,
    /// The host's network namespace: it binds the host's ports directly.
    Host,
    /// Its own namespace with only a loopback interface.
    None,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Bridge => "bridge",
            NetworkMode::Host => "host",
            NetworkMode::None => "none",
        }
    }
}

/// A host device given to a container (`--device HOST:CONTAINER`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMapping {
    /// An absolute path on the host (`/dev/dri`, a directory of devices, or one device).
    pub host_path: String,
    /// Where it appears in the container (absolute).
    pub container_path: String,
}

/// A deploy whose containers get host access (1.5): `JobSpec::DeployWithHostAccess`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployWithHostAccess {
    pub deploy: DeploySpec,
    pub host_access: HostAccess,
}

/// A file a deploy writes into each new container before it starts (1.8): a secret from the
/// controller's store, for a service that asks for one as a file (`secrets:` in the map).
/// Stored jobs and revisions carry only the reference; the bytes travel in
/// [`DeployWithFiles::contents`] on the job's stream to the node that runs the container.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SecretFile {
    /// An absolute path in the container (`/run/secrets/db_password`).
    pub target: String,
    /// The secret and its version, `NAME@3`.
    pub secret: String,
    /// Unix permission bits (`0o400`: read by the owner only).
    pub mode: u32,
}

/// A secret file's bytes. `Debug` shows the length only, so no log line can carry them.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretBytes(pub Vec<u8>);

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes(<{} bytes>)", self.0.len())
    }
}

/// A deploy whose containers get secret files (1.8): `JobSpec::DeployWithFiles`, sent only for
/// services that ask for some (an agent older than 1.8 refuses it as an unknown kind).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployWithFiles {
    pub deploy: DeploySpec,
    pub host_access: HostAccess,
    pub files: Vec<SecretFile>,
    /// The bytes of each of `files`, in the same order: empty wherever the job is stored or
    /// shown, filled in by the controller only on the stream to the node.
    pub contents: Vec<SecretBytes>,
}

/// The agent config keys of the deploy policy, named in every refusal.
pub mod policy_keys {
    pub const BIND_PATHS: &str = "deploy.allow_bind_paths";
    pub const SOCKET: &str = "deploy.allow_docker_socket";
    pub const PRIVILEGED: &str = "deploy.allow_privileged";
    pub const HOST_NETWORK: &str = "deploy.allow_host_network";
    pub const HOST_PID: &str = "deploy.allow_host_pid";
    pub const CAPABILITIES: &str = "deploy.allow_capabilities";
    pub const DEVICES: &str = "deploy.allow_devices";
    pub const GPUS: &str = "deploy.allow_gpus";
}

/// Where container runtimes listen on Linux hosts: a bind of one of these (or of a directory
/// holding one) needs `deploy.allow_docker_socket`.
pub const RUNTIME_SOCKETS: &[&str] = &[
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/var/run/podman/podman.sock",
    "/run/podman/podman.sock",
    "/var/run/containerd/containerd.sock",
    "/run/containerd/containerd.sock",
];
/// File names taken for a runtime's socket wherever they are (a rootless daemon's, a copy).
pub const RUNTIME_SOCKET_NAMES: &[&str] = &["docker.sock", "podman.sock", "containerd.sock"];

/// The first words of every refusal by a node's deploy policy.
pub const POLICY_REFUSAL_PREFIX: &str = "deploy refused by this host's policy: ";

/// What a node's agent lets deploys do there (its `[deploy]` config): bind mounts only below
/// `allow_bind_paths`, the runtime's socket, privileged mode, host namespaces, capabilities and
/// devices only when allowed; GPUs unless `allow_gpus` is off. The agent refuses a deploy
/// outside it before touching a container. Agents from 1.5 on send it after `Welcome`
/// (`AgentMessage::DeployPolicy`), so that a plan can show such refusals before anything is
/// sent ([`DeployPolicySummary::refusal`]).
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

impl DeployPolicySummary {
    /// What the agent that reported this policy would answer to a deploy of `spec` with `host`,
    /// in its words (the rule, and the config key that would allow it); `None` when it would
    /// run it. A preview: the rules are the agent's, checked in its order, but paths are
    /// compared as written (with `.` and `..` taken away), since only the node can resolve its
    /// symlinks, and the well-known runtime sockets are taken to exist there. The agent checks
    /// again before it touches anything, and its answer decides.
    pub fn refusal(&self, spec: &ContainerSpec, host: &HostAccess) -> Option<String> {
        self.rule_broken(spec, host)
            .map(|reason| format!("{POLICY_REFUSAL_PREFIX}{reason} (agent config)"))
    }

    fn rule_broken(&self, spec: &ContainerSpec, host: &HostAccess) -> Option<String> {
        use policy_keys::*;
        if host.privileged && !self.allow_privileged {
            return Some(format!("a privileged container needs {PRIVILEGED}"));
        }
        if host.network == NetworkMode::Host && !self.allow_host_network {
            return Some(format!("the host's network needs {HOST_NETWORK}"));
        }
        if host.pid_host && !self.allow_host_pid {
            return Some(format!("the host's PID namespace needs {HOST_PID}"));
        }
        for cap in &host.cap_add {
            let wanted = capability(cap);
            let allowed = self
                .allow_capabilities
                .iter()
                .any(|a| capability(a) == "ALL" || capability(a) == wanted);
            if !allowed {
                return Some(format!("capability `{cap}` is not in {CAPABILITIES}"));
            }
        }
        for device in &host.devices {
            let path = &device.host_path;
            if !lexical(path).is_some_and(|p| within(&p, &self.allow_devices)) {
                return Some(format!("device `{path}` is not in {DEVICES}"));
            }
        }
        if spec.gpus != GpuRequest::None && !self.allow_gpus {
            return Some(format!("GPUs are off here ({GPUS} = false)"));
        }
        spec.volumes
            .iter()
            .filter(|v| v.source.starts_with('/'))
            .find_map(|v| self.bind_broken(&v.source))
    }

    /// The agent's rules for a host path bound into a container.
    fn bind_broken(&self, source: &str) -> Option<String> {
        use policy_keys::*;
        // Only absolute sources come here: anything else is a named volume.
        let path = lexical(source)?;
        let joined = join(&path);
        if RUNTIME_SOCKETS.contains(&joined.as_str()) {
            // The key alone allows the socket itself.
            return (!self.allow_docker_socket).then(|| {
                format!(
                    "bind mount of `{source}` is a container runtime's socket, which only \
                     {SOCKET} allows"
                )
            });
        }
        if !within(&path, &self.allow_bind_paths) {
            return Some(format!("bind mount of `{source}` is outside {BIND_PATHS}"));
        }
        if self.allow_docker_socket {
            return None;
        }
        if let Some(socket) = RUNTIME_SOCKETS
            .iter()
            .find(|s| lexical(s).is_some_and(|s| s.starts_with(&path)))
        {
            return Some(format!(
                "bind mount of `{source}` holds the container runtime's socket `{socket}`, \
                 which only {SOCKET} allows (listing a directory above it in {BIND_PATHS} does \
                 not)"
            ));
        }
        path.last()
            .filter(|name| RUNTIME_SOCKET_NAMES.contains(*name))
            .map(|_| {
                format!(
                    "bind mount of `{source}` is named like a container runtime's socket, \
                     which only {SOCKET} allows"
                )
            })
    }
}

/// `NET_ADMIN`, `net_admin` and `CAP_NET_ADMIN` are one capability.
pub fn capability(name: &str) -> String {
    let upper = name.trim().to_ascii_uppercase();
    upper
        .strip_prefix("CAP_")
        .map(str::to_owned)
        .unwrap_or(upper)
}

/// The components of an absolute path with `.` and `..` taken away as written (`None`: not
/// absolute).
fn lexical(path: &str) -> Option<Vec<&str>> {
    let rest = path.strip_prefix('/')?;
    let mut out: Vec<&str> = Vec::new();
    for part in rest.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            name => out.push(name),
        }
    }
    Some(out)
}

fn join(parts: &[&str]) -> String {
    format!("/{}", parts.join("/"))
}

/// Inside one of `roots`, by whole components; roots that are not absolute allow nothing.
fn within(path: &[&str], roots: &[String]) -> bool {
    roots
        .iter()
        .filter_map(|r| lexical(r))
        .any(|root| path.starts_with(&root))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            image: "busybox".into(),
            command: None,
            env: Vec::new(),
            ports: Vec::new(),
            volumes: Vec::new(),
            restart: RestartPolicy::UnlessStopped,
            gpus: GpuRequest::None,
            health: None,
        }
    }

    fn bind(source: &str) -> ContainerSpec {
        ContainerSpec {
            volumes: vec![VolumeMount {
                source: source.into(),
                target: "/x".into(),
                read_only: false,
            }],
            ..spec()
        }
    }

    fn closed() -> DeployPolicySummary {
        DeployPolicySummary {
            allow_gpus: true,
            ..Default::default()
        }
    }

    #[test]
    fn a_closed_policy_refuses_each_kind_of_host_access_in_the_agents_words() {
        let p = closed();
        assert_eq!(p.refusal(&spec(), &HostAccess::default()), None);
        assert_eq!(p.refusal(&bind("data"), &HostAccess::default()), None);
        let cases = [
            (
                HostAccess {
                    privileged: true,
                    ..Default::default()
                },
                "a privileged container needs deploy.allow_privileged",
            ),
            (
                HostAccess {
                    network: NetworkMode::Host,
                    ..Default::default()
                },
                "the host's network needs deploy.allow_host_network",
            ),
            (
                HostAccess {
                    pid_host: true,
                    ..Default::default()
                },
                "the host's PID namespace needs deploy.allow_host_pid",
            ),
            (
                HostAccess {
                    cap_add: vec!["NET_ADMIN".into()],
                    ..Default::default()
                },
                "capability `NET_ADMIN` is not in deploy.allow_capabilities",
            ),
            (
                HostAccess {
                    devices: vec![DeviceMapping {
                        host_path: "/dev/dri".into(),
                        container_path: "/dev/dri".into(),
                    }],
                    ..Default::default()
                },
                "device `/dev/dri` is not in deploy.allow_devices",
            ),
        ];
        for (host, reason) in cases {
            assert_eq!(
                p.refusal(&spec(), &host),
                Some(format!(
                    "deploy refused by this host's policy: {reason} (agent config)"
                ))
            );
        }
        // `network: none` is no host access.
        let none = HostAccess {
            network: NetworkMode::None,
            ..Default::default()
        };
        assert_eq!(p.refusal(&spec(), &none), None);
        let gpu = ContainerSpec {
            gpus: GpuRequest::All,
            ..spec()
        };
        assert_eq!(p.refusal(&gpu, &HostAccess::default()), None);
        let off = DeployPolicySummary::default();
        assert!(off
            .refusal(&gpu, &HostAccess::default())
            .is_some_and(|r| r.contains("GPUs are off here (deploy.allow_gpus = false)")));
    }

    #[test]
    fn each_key_allows_its_own_rule_only() {
        let everything = HostAccess {
            privileged: true,
            network: NetworkMode::Host,
            pid_host: true,
            cap_add: vec!["NET_ADMIN".into(), "SYS_TIME".into()],
            devices: vec![DeviceMapping {
                host_path: "/dev/dri/renderD128".into(),
                container_path: "/dev/dri/renderD128".into(),
            }],
        };
        let mut p = closed();
        let next = |p: &DeployPolicySummary, key: &str| {
            let r = p.refusal(&spec(), &everything).expect("still refused");
            assert!(r.contains(key), "{r}");
        };
        next(&p, policy_keys::PRIVILEGED);
        p.allow_privileged = true;
        next(&p, policy_keys::HOST_NETWORK);
        p.allow_host_network = true;
        next(&p, policy_keys::HOST_PID);
        p.allow_host_pid = true;
        p.allow_capabilities = vec!["cap_net_admin".into()];
        next(&p, "capability `SYS_TIME`");
        p.allow_capabilities = vec!["ALL".into()];
        next(&p, policy_keys::DEVICES);
        p.allow_devices = vec!["/dev/drix".into(), "dev/dri".into()];
        next(&p, policy_keys::DEVICES);
        p.allow_devices = vec!["/dev/dri".into()];
        assert_eq!(p.refusal(&spec(), &everything), None);
        // `..` cannot climb out of an allowed directory.
        let out = HostAccess {
            devices: vec![DeviceMapping {
                host_path: "/dev/dri/../sda".into(),
                container_path: "/dev/sda".into(),
            }],
            ..Default::default()
        };
        assert!(p.refusal(&spec(), &out).is_some());
    }

    #[test]
    fn binds_are_judged_by_path_prefix_and_socket_name() {
        let p = closed();
        let refused = |p: &DeployPolicySummary, source: &str| {
            p.refusal(&bind(source), &HostAccess::default())
                .unwrap_or_default()
        };
        assert_eq!(
            refused(&p, "/"),
            "deploy refused by this host's policy: bind mount of `/` is outside \
             deploy.allow_bind_paths (agent config)"
        );
        assert_eq!(
            refused(&p, "/var/run/docker.sock"),
            "deploy refused by this host's policy: bind mount of `/var/run/docker.sock` is a \
             container runtime's socket, which only deploy.allow_docker_socket allows (agent \
             config)"
        );
        let srv = DeployPolicySummary {
            allow_bind_paths: vec!["/srv".into(), "/".into()],
            ..closed()
        };
        assert_eq!(refused(&srv, "/srv/data"), "");
        assert!(refused(&srv, "/srvx/../etc").is_empty(), "under `/` too");
        let only_srv = DeployPolicySummary {
            allow_bind_paths: vec!["/srv".into()],
            ..closed()
        };
        assert!(refused(&only_srv, "/srvx").contains("outside deploy.allow_bind_paths"));
        assert!(refused(&only_srv, "/srv/../etc").contains("outside"));
        // A directory above a socket, or a file named like one, needs the socket's key.
        assert!(refused(&srv, "/var/run").contains("holds the container runtime's socket"));
        assert!(refused(&srv, "/srv/x/podman.sock").contains("named like"));
        let both = DeployPolicySummary {
            allow_docker_socket: true,
            ..srv
        };
        assert_eq!(refused(&both, "/var/run"), "");
        let socket_only = DeployPolicySummary {
            allow_docker_socket: true,
            ..closed()
        };
        assert_eq!(refused(&socket_only, "/run/docker.sock"), "");
        assert!(refused(&socket_only, "/run").contains("outside"));
    }
}
