//! The short forms of the map's values, each parsed to its protocol type with the words that
//! say what is wrong: ports, volumes, devices, capabilities, restart policies, GPU counts,
//! commands and environment values.

use std::borrow::Cow;
use std::fmt;

use nebula_protocol::deploy::{
    DeviceMapping, GpuRequest, PortMapping, PortProtocol, RestartPolicy, VolumeMount,
};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// One name, or a list of names.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

pub(super) fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
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
pub(super) struct DurationText(String);

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
