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
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use nebula_protocol::deploy::{
    ContainerSpec, DeviceMapping, GpuRequest, HealthCheck, HealthProbe, HostAccess, NetworkMode,
    PortMapping, PortProtocol, RestartPolicy, UpdateStrategy, VolumeMount,
};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::plan::{Desired, DesiredService, PlacementRule, RevisionSpec};

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
        Ok(Loc {
            line: s.referenced.line(),
            column: s.referenced.column(),
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
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, EnvValue>,
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

/// One name, or a list of names.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a node name or a list of node names")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(vec![v.to_owned()])
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

/// A duration such as `30s`, `2m` or `1h 30m`.
#[derive(JsonSchema)]
#[schemars(transparent)]
#[allow(dead_code)]
struct DurationText(String);

/// A command: a list of arguments, or one string split like a shell would.
#[derive(Debug, Clone, JsonSchema)]
#[serde(untagged)]
pub enum CommandLine {
    Line(String),
    Args(Vec<String>),
}

impl<'de> Deserialize<'de> for CommandLine {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CommandLine;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a command: a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CommandLine, E> {
                Ok(CommandLine::Line(v.to_owned()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<CommandLine, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(CommandLine::Args(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl CommandLine {
    pub fn args(&self) -> Result<Vec<String>, String> {
        let args = match self {
            CommandLine::Args(a) => a.clone(),
            CommandLine::Line(l) => shlex::split(l)
                .ok_or_else(|| format!("cannot split `{l}` into arguments (unclosed quote?)"))?,
        };
        if args.is_empty() || args[0].is_empty() {
            return Err("a command needs at least a program name".into());
        }
        Ok(args)
    }
}

/// An environment value: a string, number or boolean (kept as written).
#[derive(Debug, Clone, JsonSchema)]
#[schemars(transparent)]
pub struct EnvValue(#[schemars(with = "EnvScalar")] pub String);

#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum EnvScalar {
    S(String),
    N(f64),
    B(bool),
}

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = EnvValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Accept a string or an unsigned integer and parse it with `parse`.
fn str_or_int<'de, D, T>(
    d: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<T> {
        expecting: &'static str,
        parse: fn(&str) -> Result<T, String>,
    }
    impl<T> Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.parse)(v).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            (self.parse)(&v.to_string()).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            (self.parse)(&v.to_string()).map_err(E::custom)
        }
    }
    d.deserialize_any(V { expecting, parse })
}

macro_rules! text_schema {
    ($ty:ty, $name:literal, $schema:tt) => {
        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                schemars::json_schema!($schema)
            }
        }
    };
}

/// A published port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortDecl(pub PortMapping);

text_schema!(PortDecl, "Port", {
    "description": "CONTAINER, HOST:CONTAINER or IP:HOST:CONTAINER, optionally /tcp or /udp",
    "type": ["string", "integer"],
    "pattern": "^([0-9.]+:|\\[[0-9a-fA-F:]+\\]:)?([0-9]+:)?[0-9]+(/(tcp|udp))?$"
});

impl<'de> Deserialize<'de> for PortDecl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        str_or_int(d, "a port such as \"8080:80\"", |s| {
            parse_port(s).map(PortDecl)
        })
    }
}

pub fn parse_port(text: &str) -> Result<PortMapping, String> {
    let bad = |why: &str| {
        format!("invalid port `{text}`: {why} (write CONTAINER, HOST:CONTAINER or IP:HOST:CONTAINER, optionally /tcp or /udp)")
    };
    let (rest, protocol) = match text.rsplit_once('/') {
        Some((r, "tcp")) => (r, PortProtocol::Tcp),
        Some((r, "udp")) => (r, PortProtocol::Udp),
        Some((_, p)) => return Err(bad(&format!("unknown protocol `{p}`"))),
        None => (text, PortProtocol::Tcp),
    };
    let port = |p: &str| -> Result<u16, String> {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(bad(&format!("`{p}` is not a port number (1-65535)"))),
            Ok(n) => Ok(n),
        }
    };
    let (host_ip, host, container) = if let Some(v6) = rest.strip_prefix('[') {
        let (ip, after) = v6.split_once("]:").ok_or_else(|| bad("unclosed `[`"))?;
        let (h, c) = after
            .split_once(':')
            .ok_or_else(|| bad("an address needs a host port"))?;
        (Some(ip.to_owned()), Some(h), c)
    } else {
        let parts: Vec<&str> = rest.split(':').collect();
        match parts.as_slice() {
            [c] => (None, None, *c),
            [h, c] => (None, Some(*h), *c),
            [ip, h, c] => (Some((*ip).to_owned()), Some(*h), *c),
            _ => return Err(bad("too many `:`")),
        }
    };
    if let Some(ip) = &host_ip {
        if ip.parse::<std::net::IpAddr>().is_err() {
            return Err(bad(&format!("`{ip}` is not an IP address")));
        }
    }
    Ok(PortMapping {
        host_ip,
        host_port: host.map(port).transpose()?,
        container_port: port(container)?,
        protocol,
    })
}

/// A volume mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDecl(pub VolumeMount);

text_schema!(VolumeDecl, "Volume", {
    "description": "NAME:/path or /host/path:/path, optionally :ro or :rw",
    "type": "string",
    "pattern": "^[^:]+:/[^:]*(:(ro|rw))?$"
});

impl<'de> Deserialize<'de> for VolumeDecl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        str_or_int(d, "a volume such as \"data:/var/lib/data\"", |s| {
            parse_volume(s).map(VolumeDecl)
        })
    }
}

pub fn parse_volume(text: &str) -> Result<VolumeMount, String> {
    let bad = |why: &str| {
        format!(
            "invalid volume `{text}`: {why} (write NAME:/path or /host/path:/path, optionally :ro)"
        )
    };
    let parts: Vec<&str> = text.split(':').collect();
    let (source, target, read_only) = match parts.as_slice() {
        [s, t] => (*s, *t, false),
        [s, t, "ro"] => (*s, *t, true),
        [s, t, "rw"] => (*s, *t, false),
        [_, _, m] => return Err(bad(&format!("unknown mode `{m}`"))),
        _ => return Err(bad("expected SOURCE:TARGET")),
    };
    if !target.starts_with('/') {
        return Err(bad("the target must be an absolute path in the container"));
    }
    if source.starts_with('.') || source.starts_with('~') {
        return Err(bad("a host path must be absolute"));
    }
    if !source.starts_with('/')
        && !source
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return Err(bad(
            "a volume name may hold letters, digits, '_', '.' and '-'",
        ));
    }
    Ok(VolumeMount {
        source: source.to_owned(),
        target: target.to_owned(),
        read_only,
    })
}

/// A host device given to a service's containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDecl(pub DeviceMapping);

text_schema!(DeviceDecl, "Device", {
    "description": "HOST or HOST:CONTAINER, absolute paths (/dev/dri, /dev/ttyUSB0:/dev/ttyS0)",
    "type": "string",
    "pattern": "^/[^:]*(:/[^:]*)?$"
});

impl<'de> Deserialize<'de> for DeviceDecl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        str_or_int(d, "a device such as \"/dev/dri\"", |s| {
            parse_device(s).map(DeviceDecl)
        })
    }
}

pub fn parse_device(text: &str) -> Result<DeviceMapping, String> {
    let bad = |why: &str| {
        format!("invalid device `{text}`: {why} (write HOST or HOST:CONTAINER, absolute paths)")
    };
    let (host, container) = match text.split(':').collect::<Vec<_>>().as_slice() {
        [h] => (*h, *h),
        [h, c] => (*h, *c),
        _ => {
            return Err(bad(
                "too many `:` (permissions cannot be given: devices get rwm)",
            ))
        }
    };
    for (what, path) in [("host", host), ("container", container)] {
        if !path.starts_with('/') || path.len() < 2 {
            return Err(bad(&format!("the {what} path must be an absolute path")));
        }
        if path.split('/').any(|part| part == "..") || path.contains(char::is_whitespace) {
            return Err(bad(&format!(
                "the {what} path may hold no `..` and no spaces"
            )));
        }
    }
    Ok(DeviceMapping {
        host_path: host.to_owned(),
        container_path: container.to_owned(),
    })
}

/// A capability as Docker names it, without `CAP_` (`NET_ADMIN`; `ALL`), or why not.
pub fn parse_capability(text: &str) -> Result<String, String> {
    let name = text.strip_prefix("CAP_").unwrap_or(text);
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && name.bytes().next().is_some_and(|b| b.is_ascii_uppercase());
    if ok {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "`{text}` is not a capability name (capital letters, digits and `_`, such as NET_ADMIN or CAP_SYS_TIME)"
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartDecl(pub RestartPolicy);

text_schema!(RestartDecl, "Restart", {
    "type": "string",
    "pattern": "^(no|always|unless-stopped|on-failure(:[0-9]+)?)$"
});

impl<'de> Deserialize<'de> for RestartDecl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        str_or_int(d, "a restart policy", |s| {
            let policy = match s {
                "no" => RestartPolicy::No,
                "always" => RestartPolicy::Always,
                "unless-stopped" => RestartPolicy::UnlessStopped,
                "on-failure" => RestartPolicy::OnFailure { max_retries: None },
                other => match other.strip_prefix("on-failure:").map(str::parse::<u32>) {
                    Some(Ok(n)) => RestartPolicy::OnFailure {
                        max_retries: Some(n),
                    },
                    _ => {
                        return Err(format!(
                            "unknown restart policy `{other}`: use no, always, unless-stopped or on-failure[:N]"
                        ))
                    }
                },
            };
            Ok(RestartDecl(policy))
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuDecl(pub GpuRequest);

text_schema!(GpuDecl, "Gpu", {
    "description": "none, all, or a number of GPUs",
    "anyOf": [{"enum": ["none", "all"]}, {"type": "integer", "minimum": 1}]
});

impl<'de> Deserialize<'de> for GpuDecl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        str_or_int(d, "none, all or a number of GPUs", |s| match s {
            "none" | "0" => Ok(GpuDecl(GpuRequest::None)),
            "all" => Ok(GpuDecl(GpuRequest::All)),
            n => match n.parse::<u32>() {
                Ok(n) if n <= 64 => Ok(GpuDecl(GpuRequest::Count(n))),
                _ => Err(format!(
                    "`gpu` takes none, all or a count of 1-64, not `{n}`"
                )),
            },
        })
    }
}

/// One problem found in a map, with where it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    if text.len() > MAX_MAP_BYTES {
        return Err(MapErrors(vec![Problem {
            line: 1,
            column: 1,
            message: format!("the map is larger than {} KiB", MAX_MAP_BYTES / 1024),
        }]));
    }
    if text.trim().is_empty() {
        return Ok(ServiceMap::default());
    }
    let options = serde_saphyr::options! { with_snippet: false };
    serde_saphyr::from_str_with_options::<ServiceMap>(text, options).map_err(|e| {
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

pub use nebula_protocol::valid_name;

/// Validation beyond parsing, and resolution to [`Desired`].
pub fn resolve(map: &ServiceMap, fleet: &FleetNames) -> Result<Checked, MapErrors> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut err = |line: u64, column: u64, message: String| {
        errors.push(Problem {
            line,
            column,
            message,
        })
    };
    if map.services.len() > MAX_SERVICES {
        err(
            1,
            1,
            format!(
                "{} services declared; a map holds at most {MAX_SERVICES}",
                map.services.len()
            ),
        );
    }
    if let Some(v) = &map.version {
        if v.value != 1 {
            err(
                v.line,
                v.column,
                format!(
                    "unknown schema version {}: this controller reads version 1",
                    v.value
                ),
            );
        }
    }
    let declared: Option<BTreeMap<String, BTreeMap<String, String>>> =
        map.nodes.as_ref().map(|n| {
            n.iter()
                .map(|(k, v)| (k.clone(), v.labels.clone()))
                .collect()
        });
    if let Some(nodes) = &map.nodes {
        for (name, decl) in nodes {
            if nebula_protocol::validate::validate_node_name(name).is_err() {
                err(
                    decl.line,
                    decl.column,
                    format!("`{name}` is not a valid node name"),
                );
            } else if fleet.0.as_ref().is_some_and(|f| !f.contains(name)) {
                warnings.push(Problem {
                    line: decl.line,
                    column: decl.column,
                    message: format!("node `{name}` is declared but has not enrolled yet"),
                });
            }
            for (k, v) in &decl.labels {
                if let Err(e) = nebula_protocol::validate::validate_label(k, v) {
                    err(decl.line, decl.column, e);
                }
            }
        }
    }
    let mut wake = BTreeMap::new();
    let mut sleep = BTreeMap::new();
    if let Some(nodes) = &map.nodes {
        for (name, decl) in nodes {
            if let Some(op) = &decl.sleep {
                if op.is_empty() || op.chars().any(char::is_whitespace) {
                    err(
                        decl.line,
                        decl.column,
                        format!(
                            "node `{name}`: `sleep` names one command from the node's allow-list"
                        ),
                    );
                }
                sleep.insert(name.clone(), op.clone());
            }
            let Some(w) = &decl.wake else { continue };
            let at = |m: String| Problem {
                line: w.line,
                column: w.column,
                message: format!("node `{name}`: wake: {m}"),
            };
            let mut problems = Vec::new();
            for relay in &w.via {
                if !nodes.contains_key(relay) {
                    problems.push(at(format!("relay `{relay}` is not a declared node")));
                } else if relay == name {
                    problems.push(at("a node cannot wake itself".into()));
                }
            }
            if w.via.is_empty() {
                problems.push(at("`via` names the relay node(s) on its LAN".into()));
            }
            let rule = match (&w.mac, &w.exec) {
                (Some(mac), None) => {
                    if let Err(e) = nebula_protocol::validate::parse_mac(mac) {
                        problems.push(at(e));
                    }
                    let broadcast = w
                        .broadcast
                        .clone()
                        .unwrap_or_else(|| "255.255.255.255".into());
                    if broadcast.parse::<std::net::Ipv4Addr>().is_err() {
                        problems.push(at(format!(
                            "`{broadcast}` is not an IPv4 broadcast address"
                        )));
                    }
                    Some(crate::plan::WakeRule::Packet {
                        mac: mac.clone(),
                        broadcast,
                        via: w.via.clone(),
                    })
                }
                (None, Some(exec)) => {
                    if w.via.len() != 1 {
                        problems.push(at("`exec` runs on exactly one `via` node".into()));
                    }
                    if w.broadcast.is_some() {
                        problems.push(at("`broadcast` goes with `mac`, not `exec`".into()));
                    }
                    Some(crate::plan::WakeRule::Exec {
                        via: w.via.first().cloned().unwrap_or_default(),
                        exec: exec.clone(),
                    })
                }
                _ => {
                    problems.push(at(
                        "give either `mac` (Wake-on-LAN) or `exec` (a command on the `via` node)"
                            .into(),
                    ));
                    None
                }
            };
            if problems.is_empty() {
                if let Some(rule) = rule {
                    wake.insert(name.clone(), rule);
                }
            }
            for p in problems {
                err(p.line, p.column, p.message);
            }
        }
    }
    let node_known = |name: &str| match &declared {
        Some(d) => d.contains_key(name),
        None => fleet.0.as_ref().is_none_or(|f| f.contains(name)),
    };

    let mut services = BTreeMap::new();
    let mut host_accesses = BTreeMap::new();
    // (node, ip, port, protocol) -> the service that claims it, for services pinned to a node.
    let mut claimed: HashMap<(String, Option<String>, u16, PortProtocol), String> = HashMap::new();
    for (name, svc) in &map.services {
        let (line, column) = (svc.line, svc.column);
        if !valid_name(name) {
            err(line, column, format!("`{name}` is not a valid service name: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"));
        }
        let image = svc.image.value.trim();
        if image.is_empty() || image.chars().any(char::is_whitespace) {
            err(
                svc.image.line,
                svc.image.column,
                format!("service `{name}`: `image` must be an image reference without spaces"),
            );
        }
        let command = match &svc.command {
            Some(c) => match c.args() {
                Ok(a) => Some(a),
                Err(e) => {
                    err(c.line, c.column, format!("service `{name}`: {e}"));
                    None
                }
            },
            None => None,
        };
        let mut env = Vec::new();
        for (k, v) in &svc.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.0.contains('\0') {
                err(
                    line,
                    column,
                    format!("service `{name}`: environment variable `{k}` is not a valid name"),
                );
            }
            env.push((k.clone(), v.0.clone()));
        }
        let replicas = svc.replicas.as_ref().map(|r| r.value).unwrap_or(1);
        if replicas > MAX_REPLICAS {
            let r = svc.replicas.as_ref().expect("set");
            err(
                r.line,
                r.column,
                format!("service `{name}`: at most {MAX_REPLICAS} replicas"),
            );
        }
        let placement = svc
            .placement
            .as_ref()
            .map(|p| p.value.clone())
            .unwrap_or_default();
        if let Some(node) = &placement.node {
            if !node_known(&node.value) {
                let hint = if declared.is_some() {
                    "declare it under `nodes:`"
                } else {
                    "no enrolled node has that name"
                };
                err(
                    node.line,
                    node.column,
                    format!("service `{name}`: unknown node `{}` ({hint})", node.value),
                );
            }
        } else if let (Some(decl), false) = (&declared, placement.labels.is_empty()) {
            let fits = decl.values().any(|labels| {
                placement
                    .labels
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v))
            });
            if !fits {
                let p = svc.placement.as_ref().expect("set");
                warnings.push(Problem {
                    line: p.line,
                    column: p.column,
                    message: format!(
                        "service `{name}`: no declared node has the labels {:?} (nodes' enrolled labels may still match)",
                        placement.labels
                    ),
                });
            }
        }
        let gpus = svc.gpu.as_ref().map(|g| g.0).unwrap_or(GpuRequest::None);
        let mut ports = Vec::new();
        let mut own: BTreeSet<(Option<String>, u16, PortProtocol)> = BTreeSet::new();
        for p in &svc.ports {
            let m = p.0.clone();
            if let Some(host) = m.host_port {
                let key = (m.host_ip.clone(), host, m.protocol);
                if !own.insert(key) {
                    err(
                        p.line,
                        p.column,
                        format!("service `{name}`: host port {host} is published twice"),
                    );
                }
                if let Some(node) = &placement.node {
                    let k = (node.value.clone(), m.host_ip.clone(), host, m.protocol);
                    if let Some(other) = claimed.get(&k) {
                        err(p.line, p.column, format!(
                            "service `{name}`: host port {host}/{} on node `{}` is already claimed by service `{other}`",
                            m.protocol.as_str(), node.value
                        ));
                    } else {
                        claimed.insert(k, name.clone());
                    }
                }
            }
            ports.push(m);
        }
        let fixed_port = ports.iter().any(|p| p.host_port.is_some());
        if fixed_port && replicas > 1 && placement.node.is_some() {
            let r = svc.replicas.as_ref().expect("replicas > 1 was written");
            err(
                r.line,
                r.column,
                format!(
                "service `{name}`: {replicas} replicas on one node cannot share a fixed host port"
            ),
            );
        }
        let volumes: Vec<VolumeMount> = svc.volumes.iter().map(|v| v.0.clone()).collect();
        let restart = svc
            .restart
            .as_ref()
            .map(|r| r.0)
            .unwrap_or(RestartPolicy::UnlessStopped);
        let health = match &svc.health {
            None => None,
            Some(h) => {
                let probe = match (&h.http, &h.tcp, &h.cmd) {
                    (Some(http), None, None) => {
                        let path = http.path.clone().unwrap_or_else(|| "/".into());
                        if !path.starts_with('/') {
                            err(
                                h.line,
                                h.column,
                                format!(
                                    "service `{name}`: the http check's path must start with `/`"
                                ),
                            );
                        }
                        Some(HealthProbe::Http {
                            port: http.port,
                            path,
                        })
                    }
                    (None, Some(tcp), None) => Some(HealthProbe::Tcp { port: tcp.port }),
                    (None, None, Some(cmd)) => match cmd.args() {
                        Ok(command) => Some(HealthProbe::Cmd { command }),
                        Err(e) => {
                            err(
                                h.line,
                                h.column,
                                format!("service `{name}`: health cmd: {e}"),
                            );
                            None
                        }
                    },
                    _ => {
                        err(h.line, h.column, format!("service `{name}`: a health check takes exactly one of `http`, `tcp` or `cmd`"));
                        None
                    }
                };
                let ms = |d: Option<Duration>, default: u64| {
                    d.map(|d| d.as_millis().min(u32::MAX as u128) as u32)
                        .unwrap_or(default as u32)
                };
                let interval_ms = ms(h.interval, 5000);
                let timeout_ms = ms(h.timeout, 3000);
                if interval_ms < 100 || timeout_ms < 100 {
                    err(h.line, h.column, format!("service `{name}`: health `interval` and `timeout` must be at least 100ms"));
                }
                let retries = h.retries.unwrap_or(3);
                if retries == 0 {
                    err(
                        h.line,
                        h.column,
                        format!("service `{name}`: health `retries` must be at least 1"),
                    );
                }
                probe.map(|probe| HealthCheck {
                    probe,
                    interval_ms,
                    timeout_ms,
                    retries,
                    start_period_ms: ms(h.start_period, 0),
                })
            }
        };
        let host_access = resolve_host_access(name, svc, !ports.is_empty(), &health, &mut err);
        let update = svc.update.clone().unwrap_or_default();
        // A new container on the host's network binds the old one's ports: stop-first too.
        let stop_first_default = fixed_port || host_access.network == NetworkMode::Host;
        let strategy = match update
            .strategy
            .as_ref()
            .map(|s| (s.value, s.line, s.column))
        {
            Some((StrategyDecl::StartFirst, l, c)) => {
                if fixed_port {
                    err(l, c, format!("service `{name}`: start-first cannot work with a fixed host port (old and new containers would need it at once); use stop-first or let Docker pick the host port"));
                }
                UpdateStrategy::StartFirst
            }
            Some((StrategyDecl::StopFirst, _, _)) => UpdateStrategy::StopFirst,
            None if stop_first_default => UpdateStrategy::StopFirst,
            None => UpdateStrategy::StartFirst,
        };
        let health_timeout = update.health_timeout.unwrap_or(Duration::from_secs(60));
        if health_timeout < Duration::from_secs(1) || health_timeout > Duration::from_secs(3600) {
            err(
                line,
                column,
                format!("service `{name}`: `update.health_timeout` must be between 1s and 1h"),
            );
        }
        let mut depends_on = Vec::new();
        for dep in &svc.depends_on {
            if !map.services.contains_key(&dep.value) {
                err(
                    dep.line,
                    dep.column,
                    format!(
                        "service `{name}` depends on `{}`, which is not declared",
                        dep.value
                    ),
                );
            } else if dep.value == *name {
                err(
                    dep.line,
                    dep.column,
                    format!("service `{name}` cannot depend on itself"),
                );
            }
            depends_on.push(dep.value.clone());
        }
        let spec = ContainerSpec {
            image: image.to_owned(),
            command,
            env,
            ports,
            volumes,
            restart,
            gpus,
            health,
        };
        let revision = revision_with(&spec, &host_access);
        if !host_access.is_empty() {
            host_accesses.insert(name.clone(), host_access);
        }
        services.insert(
            name.clone(),
            DesiredService {
                revision,
                spec,
                replicas,
                placement: PlacementRule {
                    node: placement.node.map(|n| n.value),
                    labels: placement.labels,
                    gpu: placement.gpu || gpus != GpuRequest::None,
                    min_vram_mb: placement.min_vram_mb,
                },
                strategy,
                health_timeout,
                depends_on,
            },
        );
    }
    let mut models = BTreeMap::new();
    for (name, decl) in &map.models {
        let bad_name = name.is_empty()
            || name.len() > 255
            || name.contains(char::is_whitespace)
            || name.contains("..");
        if bad_name {
            err(
                decl.line,
                decl.column,
                format!("model `{name}`: not a model name"),
            );
        }
        if decl.nodes.is_empty() == decl.labels.is_empty() {
            err(
                decl.line,
                decl.column,
                format!("model `{name}`: give either `nodes` or `labels`"),
            );
        }
        for n in &decl.nodes {
            if !node_known(n) {
                err(
                    decl.line,
                    decl.column,
                    format!("model `{name}`: unknown node `{n}`"),
                );
            }
        }
        models.insert(
            name.clone(),
            crate::plan::DesiredModel {
                nodes: decl.nodes.clone(),
                labels: decl.labels.clone(),
                backend: decl.backend.clone(),
            },
        );
    }
    if let Some((name, line, column)) = find_cycle(map) {
        errors.push(Problem {
            line,
            column,
            message: format!("service `{name}` is part of a `depends_on` cycle"),
        });
    }
    if !errors.is_empty() {
        errors.sort_by_key(|p| (p.line, p.column));
        return Err(MapErrors(errors));
    }
    Ok(Checked {
        desired: Desired {
            nodes: declared,
            services,
            wake,
            sleep,
            models,
            host_access: host_accesses,
        },
        warnings,
    })
}

/// A service's `privileged`, `network_mode`, `pid`, `cap_add` and `devices`, checked.
fn resolve_host_access(
    name: &str,
    svc: &ServiceDecl,
    publishes_ports: bool,
    health: &Option<HealthCheck>,
    err: &mut impl FnMut(u64, u64, String),
) -> HostAccess {
    let network = match svc
        .network_mode
        .as_ref()
        .map(|n| (n.value, n.line, n.column))
    {
        None | Some((NetworkModeDecl::Bridge, _, _)) => NetworkMode::Bridge,
        Some((mode, line, column)) => {
            let network = match mode {
                NetworkModeDecl::Host => NetworkMode::Host,
                _ => NetworkMode::None,
            };
            if publishes_ports {
                let why = match network {
                    NetworkMode::Host => "the container uses the host's ports directly (Docker publishes nothing on the host's network); remove `ports`",
                    _ => "the container has no network to publish them from; remove `ports`",
                };
                err(
                    line,
                    column,
                    format!(
                        "service `{name}`: `network_mode: {}` cannot go with `ports`: {why}",
                        network.as_str()
                    ),
                );
            }
            let reaches_in = health.as_ref().is_some_and(|h| {
                matches!(h.probe, HealthProbe::Http { .. } | HealthProbe::Tcp { .. })
            });
            if network == NetworkMode::None && reaches_in {
                err(
                    line,
                    column,
                    format!("service `{name}`: an http or tcp health check cannot reach a container with `network_mode: none`; use `cmd`"),
                );
            }
            network
        }
    };
    let mut cap_add = BTreeSet::new();
    for cap in &svc.cap_add {
        match parse_capability(&cap.value) {
            Ok(c) => {
                cap_add.insert(c);
            }
            Err(e) => err(
                cap.line,
                cap.column,
                format!("service `{name}`: cap_add: {e}"),
            ),
        }
    }
    let mut targets = BTreeSet::new();
    for d in &svc.devices {
        if !targets.insert(d.0.container_path.as_str()) {
            err(
                d.line,
                d.column,
                format!(
                    "service `{name}`: device `{}` is given twice in the container",
                    d.0.container_path
                ),
            );
        }
    }
    HostAccess {
        privileged: svc.privileged.as_ref().is_some_and(|p| p.value),
        network,
        pid_host: svc.pid.is_some(),
        cap_add: cap_add.into_iter().collect(),
        devices: svc.devices.iter().map(|d| d.0.clone()).collect(),
    }
}

/// A service on a `depends_on` cycle, if any. Iterative (a long chain of dependencies must
/// not exhaust the stack): services whose dependencies can all be ordered are taken away
/// (Kahn's algorithm); from any service left, following dependencies that are left must come
/// back to a service already seen, which is on a cycle.
fn find_cycle(map: &ServiceMap) -> Option<(String, u64, u64)> {
    let deps = |name: &str| -> Vec<&str> {
        map.services[name]
            .depends_on
            .iter()
            .map(|d| d.value.as_str())
            .filter(|d| *d != name && map.services.contains_key(*d))
            .collect()
    };
    let mut waiting_on: BTreeMap<&str, usize> = BTreeMap::new();
    let mut dependents: HashMap<&str, Vec<&str>> = HashMap::new();
    for name in map.services.keys() {
        let d = deps(name);
        waiting_on.insert(name, d.len());
        for dep in d {
            dependents.entry(dep).or_default().push(name);
        }
    }
    let mut ready: Vec<&str> = waiting_on
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(k, _)| *k)
        .collect();
    while let Some(done) = ready.pop() {
        waiting_on.remove(done);
        for d in dependents.get(done).into_iter().flatten() {
            if let Some(n) = waiting_on.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    ready.push(d);
                }
            }
        }
    }
    let mut cur = *waiting_on.keys().next()?;
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    while seen.insert(cur) {
        cur = deps(cur)
            .into_iter()
            .find(|d| waiting_on.contains_key(d))
            .expect("a service left over waits on another one left over");
    }
    let svc = &map.services[cur];
    Some((cur.to_owned(), svc.line, svc.column))
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
    if host.is_empty() {
        return revision(spec);
    }
    let full = RevisionSpec {
        container: spec.clone(),
        host_access: host.clone(),
    };
    let json = serde_json::to_vec(&full).expect("a revision spec always serializes");
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

    fn fleet(names: &[&str]) -> FleetNames {
        FleetNames(Some(names.iter().map(|s| s.to_string()).collect()))
    }

    #[test]
    fn the_example_map_at_the_repo_root_is_valid() {
        let text = include_str!("../../../service-map.yml");
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
            let mut text = include_str!("../../../service-map.yml").as_bytes().to_vec();
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
