//! `service-map.yml`, schema v1: the typed document, its parser (YAML via `serde-saphyr`, every
//! error with line and column), validation beyond parsing, and the effective specs it resolves to.
//!
//! Unknown fields are rejected everywhere. Short forms follow Docker Compose where people
//! already know them (`"8080:80/tcp"`, `"data:/var/lib/data:ro"`, `on-failure:5`), and so do
//! the host access fields (`privileged`, `network_mode`, `pid`, `cap_add`, `devices`). Those
//! resolve to a `HostAccess` beside the container spec ([`Desired::host_access`]) and count in
//! the revision only when set ([`revision_with`]), so that a service without them keeps the
//! revision it had before they existed.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use nebula_protocol::deploy::{ContainerSpec, HostAccess};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::Deserializer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::plan::{Desired, RevisionSpec};
pub use nebula_protocol::valid_name;

pub mod monitors;
mod resolve;
pub mod secrets;
mod values;

pub use resolve::resolve;
use values::{one_or_many, DurationText, OneOrMany};
pub use values::{
    parse_capability, parse_device, parse_port, parse_volume, CommandLine, DeviceDecl, EnvValue,
    GpuDecl, PortDecl, RestartDecl, VolumeDecl,
};

/// The largest service map accepted (bytes).
pub const MAX_MAP_BYTES: usize = 1 << 20;
const MAX_REPLICAS: u32 = 100;
/// The most services one map may declare.
pub const MAX_SERVICES: usize = 20_000;

/// A value and where it was written (1-based line and column).
#[derive(Debug, Clone)]
pub struct Loc<T> {
    pub value: T,
    pub line: u64,
    pub column: u64,
    /// Byte offset and length of the value in the document, where the parser knows them.
    pub span: Option<(usize, usize)>,
}

impl<T> std::ops::Deref for Loc<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Loc<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = serde_saphyr::Spanned::<T>::deserialize(d)?;
        let span = s.referenced.span();
        Ok(Loc {
            line: s.referenced.line(),
            column: s.referenced.column(),
            span: span
                .byte_offset()
                .zip(span.byte_len())
                .and_then(|(o, l)| Some((usize::try_from(o).ok()?, usize::try_from(l).ok()?))),
            value: s.value,
        })
    }
}

impl<T: JsonSchema> JsonSchema for Loc<T> {
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(g: &mut SchemaGenerator) -> Schema {
        T::json_schema(g)
    }
    fn inline_schema() -> bool {
        T::inline_schema()
    }
}

/// The whole document.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Nebula Command service map (schema v1)")]
pub struct ServiceMap {
    /// Schema version of this document; only `1` exists.
    #[serde(default)]
    pub version: Option<Loc<u32>>,
    /// The nodes services may be placed on, by the name they enrolled with. When this section is
    /// present, only these nodes are used; when it is absent, every enrolled node is.
    #[serde(default)]
    pub nodes: Option<BTreeMap<String, Loc<NodeDecl>>>,
    /// The services to run, by name.
    #[serde(default)]
    pub services: BTreeMap<String, Loc<ServiceDecl>>,
    /// Models to keep on nodes' inference backends, by the name the backend uses
    /// (`llama3:8b`). Missing ones are pulled; extra ones are reported, never removed.
    #[serde(default)]
    pub models: BTreeMap<String, Loc<ModelDecl>>,
    /// Health monitors (HTTP, TCP, ping, DNS), each run on a schedule from chosen nodes.
    #[serde(default)]
    pub monitors: BTreeMap<String, Loc<monitors::MonitorDecl>>,
    /// Alert rules of your own: thresholds on node figures averaged over a window.
    #[serde(default)]
    pub alert_rules: BTreeMap<String, Loc<monitors::RuleDecl>>,
}

/// Where a model must be.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelDecl {
    /// Nodes that must have it, by name.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Or: every node with these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The backend on each node (default: its first Ollama).
    #[serde(default)]
    pub backend: Option<String>,
}

/// A node as this map sees it.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeDecl {
    /// Labels used for placement, on top of the labels the node enrolled with.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How to wake this node when it sleeps (`nebula wake`, and when a job needs it).
    #[serde(default)]
    pub wake: Option<Loc<WakeDecl>>,
    /// The command from the node's own allow-list (`[exec.commands.NAME]`) that
    /// `nebula sleep` runs: a suspend or power-off.
    #[serde(default)]
    pub sleep: Option<String>,
}

/// Wake-on-LAN through a relay on the node's LAN (`mac`, `broadcast`, `via`), or an
/// allow-listed command on another node (`via` one node, `exec`), e.g. starting a VM on its host.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WakeDecl {
    /// The sleeping machine's MAC address, `52:54:00:12:34:56`.
    #[serde(default)]
    pub mac: Option<String>,
    /// The IPv4 broadcast address of its LAN (default `255.255.255.255`).
    #[serde(default)]
    pub broadcast: Option<String>,
    /// Relay nodes on the same LAN, tried in order (the first online one is used): one name
    /// or a list.
    #[serde(default, deserialize_with = "one_or_many")]
    #[schemars(with = "OneOrMany")]
    pub via: Vec<String>,
    /// An allow-listed command on the `via` node that wakes this one.
    #[serde(default)]
    pub exec: Option<String>,
}

/// One service: a container image run as one or more replicas.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceDecl {
    /// The image to run (`repository[:tag]`). It is pulled when the node does not have it.
    pub image: Loc<String>,
    /// Replaces the image's command: a list of arguments, or a string split like a shell would.
    #[serde(default)]
    pub command: Option<Loc<CommandLine>>,
    /// Environment variables. A value may hold references to the controller's secret store,
    /// `${secret:NAME}` (the latest version) or `${secret:NAME@3}`: resolved only on the deploy
    /// job's stream to the node that runs the container.
    #[serde(default)]
    pub env: BTreeMap<String, Loc<EnvValue>>,
    /// Secrets from the controller's store written into each container as files before it
    /// starts: `{name: NAME[@VERSION], target: /run/secrets/NAME, mode: "0444"}`.
    #[serde(default)]
    pub secrets: Vec<Loc<secrets::SecretFileDecl>>,
    /// Published ports: `"CONTAINER"`, `"HOST:CONTAINER"` or `"IP:HOST:CONTAINER"`, with an
    /// optional `/tcp` or `/udp`.
    #[serde(default)]
    pub ports: Vec<Loc<PortDecl>>,
    /// Volumes: `"NAME:/path"` (a named volume) or `"/host/path:/path"`, with an optional `:ro`.
    #[serde(default)]
    pub volumes: Vec<Loc<VolumeDecl>>,
    /// `no`, `always`, `unless-stopped` (the default) or `on-failure[:N]`.
    #[serde(default)]
    pub restart: Option<Loc<RestartDecl>>,
    /// Where the replicas may run.
    #[serde(default)]
    pub placement: Option<Loc<PlacementDecl>>,
    /// How many containers to run (spread over the matching nodes). Default 1.
    #[serde(default)]
    pub replicas: Option<Loc<u32>>,
    /// NVIDIA GPUs given to each container: `none` (the default), `all`, or a count.
    #[serde(default)]
    pub gpu: Option<Loc<GpuDecl>>,
    /// The check a new container must pass before it takes over.
    #[serde(default)]
    pub health: Option<Loc<HealthDecl>>,
    /// How a new revision replaces the running one.
    #[serde(default)]
    pub update: Option<UpdateDecl>,
    /// Services that must be deployed and healthy before this one is.
    #[serde(default)]
    pub depends_on: Vec<Loc<String>>,
    /// Also run the `health` check (HTTP or TCP, through its published port) as a monitor
    /// from the nodes the service runs on, with uptime kept and an alert when it is down.
    #[serde(default)]
    pub monitor: Option<Loc<bool>>,
    /// Run the container privileged (default false). The node's agent refuses it unless its
    /// config sets `deploy.allow_privileged`.
    #[serde(default)]
    pub privileged: Option<Loc<bool>>,
    /// `bridge` (the default: its own network, ports published), `host` (the host's network:
    /// it binds the host's ports itself, so `ports` cannot be given; needs
    /// `deploy.allow_host_network` on the node) or `none` (loopback only).
    #[serde(default)]
    pub network_mode: Option<Loc<NetworkModeDecl>>,
    /// `host`: the host's PID namespace (needs `deploy.allow_host_pid` on the node).
    #[serde(default)]
    pub pid: Option<Loc<PidDecl>>,
    /// Capabilities to add (`NET_ADMIN`, with or without `CAP_`; `ALL` for every one). The
    /// node's `deploy.allow_capabilities` must list each.
    #[serde(default)]
    pub cap_add: Vec<Loc<String>>,
    /// Host devices: `"/dev/dri"` or `"/dev/ttyUSB0:/dev/ttyS0"` (`HOST[:CONTAINER]`). The
    /// node's `deploy.allow_devices` must hold each.
    #[serde(default)]
    pub devices: Vec<Loc<DeviceDecl>>,
}

/// The network a service's containers get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkModeDecl {
    Bridge,
    Host,
    None,
}

/// The PID namespace a service's containers get: only `host` can be written (the default is
/// their own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PidDecl {
    Host,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementDecl {
    /// Run only on this node.
    #[serde(default)]
    pub node: Option<Loc<String>>,
    /// Run only on nodes with all of these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Run only on nodes with an NVIDIA GPU.
    #[serde(default)]
    pub gpu: bool,
    /// Run only on nodes with at least this much free GPU memory (MiB) on one GPU.
    #[serde(default)]
    pub min_vram_mb: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthDecl {
    /// An HTTP GET from the node to the container; 2xx or 3xx is healthy.
    #[serde(default)]
    pub http: Option<HttpCheck>,
    /// A TCP connect from the node to the container.
    #[serde(default)]
    pub tcp: Option<TcpCheck>,
    /// A command run inside the container; exit status 0 is healthy.
    #[serde(default)]
    pub cmd: Option<CommandLine>,
    /// Time between checks (default 5s).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<DurationText>")]
    pub interval: Option<Duration>,
    /// Time one check may take (default 3s).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<DurationText>")]
    pub timeout: Option<Duration>,
    /// Failures in a row that make the container unhealthy (default 3).
    #[serde(default)]
    pub retries: Option<u32>,
    /// Failures in this first stretch do not count (default 0s).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<DurationText>")]
    pub start_period: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    /// The container's port.
    pub port: u16,
    /// Default `/`.
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {
    /// The container's port.
    pub port: u16,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateDecl {
    /// `start-first` (the default without a fixed host port) or `stop-first` (the default, and
    /// the only choice, with one).
    #[serde(default)]
    pub strategy: Option<Loc<StrategyDecl>>,
    /// How long new containers have to turn healthy before the update is rolled back
    /// (default 60s).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<DurationText>")]
    pub health_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyDecl {
    StartFirst,
    StopFirst,
}

/// One problem found in a map, with where it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Problem {
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// Why a map was refused: every error found (at least one), with line and column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapErrors(pub Vec<Problem>);

impl fmt::Display for MapErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for MapErrors {}

/// What the fleet looks like to validation: enrolled node names (`None`: not checked, as when a
/// stored map is loaded again).
#[derive(Debug, Clone, Default)]
pub struct FleetNames(pub Option<BTreeSet<String>>);

/// A map that parsed and validated, resolved to effective specs.
#[derive(Debug, Clone)]
pub struct Checked {
    pub desired: Desired,
    pub warnings: Vec<Problem>,
}

/// Parse YAML text into the typed document (syntax, types, unknown fields, duplicate keys).
pub fn parse(text: &str) -> Result<ServiceMap, MapErrors> {
    if text.trim().is_empty() && text.len() <= MAX_MAP_BYTES {
        return Ok(ServiceMap::default());
    }
    parse_yaml(text, MAX_MAP_BYTES, "the map")
}

/// Parse a YAML (or JSON) document of at most `max_bytes` into `T`, with the first error's
/// line and column: shared by every file Nebula reads this way (`what` names it in errors).
pub fn parse_yaml<T: serde::de::DeserializeOwned>(
    text: &str,
    max_bytes: usize,
    what: &str,
) -> Result<T, MapErrors> {
    if text.len() > max_bytes {
        return Err(MapErrors(vec![Problem {
            line: 1,
            column: 1,
            message: format!("{what} is larger than {} KiB", max_bytes / 1024),
        }]));
    }
    let options = serde_saphyr::options! { with_snippet: false };
    serde_saphyr::from_str_with_options::<T>(text, options).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((1, 1));
        let text = e.to_string();
        let message = strip_position(text.trim_start_matches("error: "));
        MapErrors(vec![Problem {
            line: line.max(1),
            column: column.max(1),
            message,
        }])
    })
}

/// `"line 4 column 5: unknown field"` -> `"unknown field"`: the position is reported apart.
fn strip_position(msg: &str) -> String {
    let mut first = msg.lines().next().unwrap_or(msg);
    if let Some(rest) = first.strip_prefix("line ") {
        if let Some((_, after)) = rest.split_once(": ") {
            first = after;
        }
    }
    // Some messages repeat the position at the end: "... at line 2, column 2".
    if let Some((head, tail)) = first.rsplit_once(" at line ") {
        if tail
            .split(", column ")
            .all(|n| n.trim().parse::<u64>().is_ok())
        {
            first = head;
        }
    }
    first.to_owned()
}

/// Parse and validate, then resolve every service to its effective spec and revision.
pub fn check(text: &str, fleet: &FleetNames) -> Result<Checked, MapErrors> {
    let map = parse(text)?;
    resolve(&map, fleet)
}

/// The revision of a spec: the first 12 hex digits of the SHA-256 of its JSON encoding.
pub fn revision(spec: &ContainerSpec) -> String {
    let json = serde_json::to_vec(spec).expect("a container spec always serializes");
    hex::encode(&Sha256::digest(&json)[..6])
}

/// The revision of a spec with its host access: the same as [`revision`] for a service that
/// asks for none (so its revision did not change when host access came), else the hash of the
/// [`RevisionSpec`] JSON, which adds a `host_access` object to the spec's.
pub fn revision_with(spec: &ContainerSpec, host: &HostAccess) -> String {
    revision_of(&RevisionSpec {
        container: spec.clone(),
        host_access: host.clone(),
        files: Vec::new(),
    })
}

/// The revision of everything a revision pins: [`revision`] of the container spec alone when
/// there is no host access and no secret file, else the hash of the [`RevisionSpec`] JSON.
pub fn revision_of(full: &RevisionSpec) -> String {
    if full.host_access.is_empty() && full.files.is_empty() {
        return revision(&full.container);
    }
    let json = serde_json::to_vec(full).expect("a revision spec always serializes");
    hex::encode(&Sha256::digest(&json)[..6])
}

/// The JSON Schema of the document, for editors.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(ServiceMap)).expect("a schema serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::RevisionSpec;
    use nebula_protocol::deploy::{
        DeviceMapping, GpuRequest, HealthProbe, NetworkMode, PortProtocol, UpdateStrategy,
    };

    fn fleet(names: &[&str]) -> FleetNames {
        FleetNames(Some(names.iter().map(|s| s.to_string()).collect()))
    }

    #[test]
    fn the_example_map_at_the_repo_root_is_valid() {
        let text = include_str!("../../../../service-map.yml");
        let checked = check(text, &fleet(&["homelab", "gpu-box", "vps"])).unwrap();
        let d = &checked.desired;
        assert_eq!(d.services.len(), 3);
        let web = &d.services["web"];
        assert_eq!(web.strategy, UpdateStrategy::StopFirst);
        assert_eq!(
            web.spec.env,
            vec![
                ("LOG_LEVEL".into(), "info".into()),
                ("WORKERS".into(), "4".into())
            ]
        );
        assert_eq!(web.spec.ports[0].host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(web.depends_on, vec!["cache".to_string()]);
        let cache = &d.services["cache"];
        assert_eq!(cache.strategy, UpdateStrategy::StartFirst);
        assert_eq!(cache.spec.ports[0].host_port, None);
        assert!(matches!(
            cache.spec.health.as_ref().unwrap().probe,
            HealthProbe::Cmd { .. }
        ));
        let ollama = &d.services["ollama"];
        assert_eq!(ollama.spec.gpus, GpuRequest::All);
        assert!(ollama.placement.gpu);
        assert!(checked.warnings.is_empty(), "{:?}", checked.warnings);
        // The commented host access example is valid once uncommented.
        let uncommented = text.replace("  # vpn:", "  vpn:").replace("  #   ", "    ");
        let d = check(&uncommented, &fleet(&["homelab", "gpu-box", "vps"]))
            .unwrap()
            .desired;
        let vpn = &d.host_access["vpn"];
        assert!(vpn.privileged && vpn.pid_host && vpn.network == NetworkMode::Host);
        assert_eq!(vpn.cap_add, vec!["NET_ADMIN"]);
    }

    #[test]
    fn revisions_follow_the_container_spec_only() {
        let a = "services:\n  web:\n    image: x:1\n";
        let b = "services:\n  web:\n    image: x:1\n    replicas: 3\n";
        let c = "services:\n  web:\n    image: x:2\n";
        let rev = |t: &str| {
            check(t, &fleet(&[])).unwrap().desired.services["web"]
                .revision
                .clone()
        };
        assert_eq!(rev(a), rev(b), "replicas are not part of the revision");
        assert_ne!(rev(a), rev(c));
        assert_eq!(rev(a).len(), 12);
    }

    /// Revisions computed before host access existed: a service that asks for none keeps its
    /// revision exactly (an upgrade must not redeploy every service).
    #[test]
    fn revisions_of_services_without_host_access_are_pinned() {
        let text = "services:
  web:
    image: nebula-test/web:v1
    command: [httpd, -f]
    env: { MODE: prod, WORKERS: 4 }
    ports: [\"127.0.0.1:8080:80\", 53/udp]
    volumes: [\"data:/data\", \"/srv/web:/srv:ro\"]
    restart: on-failure:3
    gpu: 1
    health: { http: { port: 80, path: /healthz }, interval: 2s }
  plain:
    image: busybox
";
        let d = check(text, &FleetNames(None)).unwrap().desired;
        assert_eq!(d.services["web"].revision, "c24fca32ee6b");
        assert_eq!(d.services["plain"].revision, "c00219c8bd9b");
        assert!(d.host_access.is_empty());
        // Host access fields written with their defaults ask for nothing: same revision.
        let defaults = text.replace(
            "    image: busybox\n",
            "    image: busybox\n    privileged: false\n    network_mode: bridge\n    \
             cap_add: []\n    devices: []\n",
        );
        let d = check(&defaults, &FleetNames(None)).unwrap().desired;
        assert_eq!(d.services["plain"].revision, "c00219c8bd9b");
        assert!(d.host_access.is_empty());
        // Any host access is a new revision; the stored form reads back.
        let privileged = text.replace(
            "    image: busybox\n",
            "    image: busybox\n    privileged: true\n",
        );
        let d = check(&privileged, &FleetNames(None)).unwrap().desired;
        assert_ne!(d.services["plain"].revision, "c00219c8bd9b");
        assert_eq!(d.services["web"].revision, "c24fca32ee6b");
        let stored = serde_json::to_string(&d.revision_spec("plain").unwrap()).unwrap();
        assert!(
            stored.contains("\"host_access\":{\"privileged\":true"),
            "{stored}"
        );
        let back: RevisionSpec = serde_json::from_str(&stored).unwrap();
        assert_eq!(Some(back), d.revision_spec("plain"));
        // A spec stored before host access existed reads back with none, and writes the same.
        let old = serde_json::to_string(&d.services["web"].spec).unwrap();
        let back: RevisionSpec = serde_json::from_str(&old).unwrap();
        assert!(back.host_access.is_empty());
        assert_eq!(serde_json::to_string(&back).unwrap(), old);
    }

    #[test]
    fn host_access_fields_parse_and_normalise() {
        let text = "services:
  vpn:
    image: wireguard
    privileged: true
    network_mode: host
    pid: host
    cap_add: [NET_ADMIN, CAP_SYS_MODULE, NET_ADMIN]
    devices: [/dev/net/tun, \"/dev/ttyUSB0:/dev/ttyS0\"]
  plain:
    image: busybox
    network_mode: none
";
        let d = check(text, &FleetNames(None)).unwrap().desired;
        let vpn = &d.host_access["vpn"];
        assert!(vpn.privileged && vpn.pid_host);
        assert_eq!(vpn.network, NetworkMode::Host);
        assert_eq!(vpn.cap_add, vec!["NET_ADMIN", "SYS_MODULE"]);
        assert_eq!(
            vpn.devices,
            vec![
                DeviceMapping {
                    host_path: "/dev/net/tun".into(),
                    container_path: "/dev/net/tun".into(),
                },
                DeviceMapping {
                    host_path: "/dev/ttyUSB0".into(),
                    container_path: "/dev/ttyS0".into(),
                },
            ]
        );
        // On the host's network a new container needs the old one's ports: stop-first.
        assert_eq!(d.services["vpn"].strategy, UpdateStrategy::StopFirst);
        assert_eq!(d.host_access["plain"].network, NetworkMode::None);
        assert_eq!(d.host_access("not-declared"), &HostAccess::default());
    }

    #[test]
    fn bad_host_access_is_refused_with_line_and_column() {
        for (field, words, column) in [
            ("network_mode: nat", "unknown variant `nat`", 19),
            ("pid: container", "unknown variant `container`", 10),
            ("privileged: maybe", "", 17),
            (
                "cap_add: [net_admin]",
                "`net_admin` is not a capability name",
                15,
            ),
            ("cap_add: [\"NET ADMIN\"]", "not a capability name", 15),
            ("devices: [dev/sda]", "invalid device `dev/sda`", 15),
            ("devices: [\"/dev/sda:/dev/sda:r\"]", "too many `:`", 15),
            ("devices: [/dev/../etc]", "no `..`", 15),
            (
                "devices: [/dev/a, \"/dev/b:/dev/a\"]",
                "device `/dev/a` is given twice",
                23,
            ),
            (
                "network_mode: host\n    ports: [\"8080:80\"]",
                "`network_mode: host` cannot go with `ports`",
                19,
            ),
            (
                "network_mode: none\n    ports: [\"80\"]",
                "`network_mode: none` cannot go with `ports`",
                19,
            ),
            (
                "network_mode: none\n    health: { tcp: { port: 80 } }",
                "use `cmd`",
                19,
            ),
        ] {
            let text = format!("services:\n  web:\n    image: x\n    {field}\n");
            let e = check(&text, &FleetNames(None)).unwrap_err();
            assert!(e.to_string().contains(words), "{field}: {e}");
            assert_eq!(
                (e.0[0].line, e.0[0].column),
                (4, column),
                "{field}: located where it was written: {e}"
            );
        }
    }

    #[test]
    fn ports_and_volumes_parse_like_compose() {
        let p = parse_port("8080:80").unwrap();
        assert_eq!(
            (p.host_port, p.container_port, p.protocol),
            (Some(8080), 80, PortProtocol::Tcp)
        );
        let p = parse_port("127.0.0.1:53:53/udp").unwrap();
        assert_eq!(p.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(p.protocol, PortProtocol::Udp);
        let p = parse_port("[::1]:8443:443").unwrap();
        assert_eq!(p.host_ip.as_deref(), Some("::1"));
        assert_eq!(parse_port("80").unwrap().host_port, None);
        for bad in [
            "",
            "0",
            "70000",
            "a:80",
            "1:2:3:4",
            "80/sctp",
            "999.1.1.1:80:80",
        ] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
        let v = parse_volume("/srv/a:/data:ro").unwrap();
        assert!(v.read_only);
        assert_eq!(parse_volume("data:/var/lib").unwrap().source, "data");
        for bad in ["./rel:/x", "data", "data:rel", "a b:/x", "/a:/b:zz"] {
            assert!(parse_volume(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Whatever the bytes, the parser answers with a map or located errors; it never panics.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            if let Err(e) = check(&text, &FleetNames(None)) {
                proptest::prop_assert!(e.0.iter().all(|p| p.line >= 1 && p.column >= 1));
            }
        }

        /// One byte of the example map changed anywhere: still no panic, and errors are located.
        #[test]
        fn a_damaged_example_never_panics(at in 0usize..4000, byte in 0u8..128) {
            let mut text = include_str!("../../../../service-map.yml").as_bytes().to_vec();
            let at = at % text.len();
            text[at] = byte;
            let text = String::from_utf8_lossy(&text);
            if let Err(e) = check(&text, &FleetNames(None)) {
                proptest::prop_assert!(e.0.iter().all(|p| p.line >= 1 && p.column >= 1));
            }
        }
    }

    #[test]
    fn wake_settings_are_checked() {
        let ok = "nodes:\n  relay: {}\n  box:\n    wake: { mac: '52:54:00:12:34:56', broadcast: 192.168.1.255, via: [relay] }\n    sleep: suspend\n  vm:\n    wake: { via: relay, exec: start-vm }\n";
        // `via` as one name (vm) or a list (box).
        let d = check(ok, &FleetNames(None)).unwrap().desired;
        assert_eq!(
            d.wake["vm"],
            crate::plan::WakeRule::Exec {
                via: "relay".into(),
                exec: "start-vm".into()
            }
        );
        assert_eq!(
            d.wake["box"],
            crate::plan::WakeRule::Packet {
                mac: "52:54:00:12:34:56".into(),
                broadcast: "192.168.1.255".into(),
                via: vec!["relay".into()]
            }
        );
        assert_eq!(d.sleep["box"], "suspend");
        for (bad, words) in [
            (
                "wake: { mac: '52:54:00', via: [relay] }",
                "not a MAC address",
            ),
            (
                "wake: { mac: '52:54:00:12:34:56', via: [ghost] }",
                "not a declared node",
            ),
            ("wake: { mac: '52:54:00:12:34:56' }", "relay node"),
            (
                "wake: { mac: '52:54:00:12:34:56', exec: x, via: [relay] }",
                "either `mac`",
            ),
            (
                "wake: { mac: '52:54:00:12:34:56', broadcast: home, via: [relay] }",
                "IPv4",
            ),
            (
                "wake: { mac: '52:54:00:12:34:56', via: [box] }",
                "cannot wake itself",
            ),
            (
                "wake: { mac: '52:54:00:12:34:56', via: [relay], port: 7 }",
                "unknown field",
            ),
        ] {
            let text = format!("nodes:\n  relay: {{}}\n  box:\n    {bad}\n");
            let e = check(&text, &FleetNames(None)).unwrap_err();
            assert!(e.to_string().contains(words), "{bad}: {e}");
            assert_eq!(e.0[0].line, 4, "located on the wake line: {e}");
        }
    }

    #[test]
    fn a_long_dependency_chain_is_fine_and_a_cycle_is_found() {
        let mut text = String::from("services:\n");
        for i in 0..5000 {
            text.push_str(&format!(
                "  s{i}: {{ image: x, depends_on: [s{}] }}\n",
                i + 1
            ));
        }
        text.push_str("  s5000: { image: x }\n");
        let checked = check(&text, &FleetNames(None)).expect("a chain is not a cycle");
        let order = crate::plan::dependency_order(&checked.desired);
        assert_eq!(order.first().map(String::as_str), Some("s5000"));
        assert_eq!(order.last().map(String::as_str), Some("s0"));
        // Close the chain into a loop: found, without recursion.
        let looped = text.replace(
            "s5000: { image: x }",
            "s5000: { image: x, depends_on: [s0] }",
        );
        let err = check(&looped, &FleetNames(None)).unwrap_err();
        assert!(err.to_string().contains("cycle"), "{err}");
    }

    #[test]
    fn the_schema_describes_the_document() {
        let schema = json_schema();
        let props = &schema["properties"];
        assert!(props["services"].is_object());
        assert!(props["nodes"].is_object());
        let text = schema.to_string();
        for field in [
            "image",
            "placement",
            "health",
            "depends_on",
            "start_period",
            "min_vram_mb",
            "privileged",
            "network_mode",
            "cap_add",
            "devices",
        ] {
            assert!(text.contains(field), "{field} missing from the schema");
        }
        assert_eq!(
            schema["additionalProperties"],
            serde_json::Value::Bool(false)
        );
    }
}
