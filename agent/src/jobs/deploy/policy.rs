//! The deploy policy: what this host lets a deploy make its container runtime do
//! ([`DeployConfig`], the `[deploy]` section of the agent's config).
//!
//! [`check`] looks at the create body the executor would send to Docker, not at the spec it
//! came from: bind mounts, GPUs and host access (privileged, host namespaces, capabilities,
//! devices) are judged by their effect. It runs before a deploy
//! lists, creates or touches any container. Bind sources and device paths are compared with
//! `..` and symlinks resolved: the part of a path that exists is canonicalized, and the part
//! Docker would create may hold no `..`. Named volumes are always allowed.
//!
//! The rules' keys and wording are shared with the controller's preview,
//! `DeployPolicySummary::refusal` (a test here checks that both say the same), which the
//! controller runs on the summary this agent reports, so a plan shows a refusal before the
//! deploy is sent.
//!
//! Some fields are never allowed, with no key to allow them, because the agent never sets them
//! and each one undoes the container's isolation: host IPC/UTS/user/cgroup namespaces, another
//! container's namespaces or volumes, security options, unmasked `/proc` paths, device cgroup
//! rules, volume drivers and non-GPU device requests.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, HostConfigCgroupnsModeEnum, Mount, MountType,
};
use nebula_protocol::deploy::policy_keys::{
    BIND_PATHS, CAPABILITIES, DEVICES, GPUS, HOST_NETWORK, HOST_PID, PRIVILEGED, SOCKET,
};
use nebula_protocol::deploy::{
    capability, POLICY_REFUSAL_PREFIX, RUNTIME_SOCKETS as WELL_KNOWN_SOCKETS,
    RUNTIME_SOCKET_NAMES as SOCKET_NAMES,
};

use crate::config::DeployConfig;

/// A deploy this host's policy refuses: the rule, by the config key that would allow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyViolation {
    /// The `deploy.*` key that would allow it; `None` where no key does.
    pub key: Option<&'static str>,
    /// What was asked, and the rule it breaks.
    pub reason: String,
}

impl fmt::Display for PolicyViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{POLICY_REFUSAL_PREFIX}{}", self.reason)?;
        if self.key.is_some() {
            f.write_str(" (agent config)")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyViolation {}

fn refuse(key: &'static str, reason: String) -> PolicyViolation {
    PolicyViolation {
        key: Some(key),
        reason,
    }
}

fn never(what: &str) -> PolicyViolation {
    PolicyViolation {
        key: None,
        reason: format!("{what} is never allowed (no agent config key allows it)"),
    }
}

/// The container runtimes' sockets on a host: whoever can talk to one is root there.
#[derive(Debug, Clone, Default)]
pub struct RuntimeSockets {
    /// The paths as named: a bind of one of these is a bind of the socket, whether or not it
    /// exists now.
    named: Vec<PathBuf>,
    /// Those that exist, as named and canonical: a bind of a directory above one exposes it.
    existing: Vec<PathBuf>,
    /// (device, inode) of those that exist: a hard link elsewhere is the same socket.
    inodes: Vec<(u64, u64)>,
}

impl RuntimeSockets {
    /// The well-known sockets and those `DOCKER_HOST` and `CONTAINER_HOST` name.
    pub fn of_this_host() -> Self {
        let configured = ["DOCKER_HOST", "CONTAINER_HOST"]
            .into_iter()
            .filter_map(|v| {
                let value = std::env::var(v).ok()?;
                Some(PathBuf::from(value.strip_prefix("unix://")?))
            });
        Self::new(
            WELL_KNOWN_SOCKETS
                .iter()
                .map(PathBuf::from)
                .chain(configured),
        )
    }

    pub fn new(paths: impl IntoIterator<Item = PathBuf>) -> Self {
        let mut s = RuntimeSockets::default();
        for path in paths {
            if let Ok(real) = std::fs::canonicalize(&path) {
                if let Some(id) = inode(&real) {
                    s.inodes.push(id);
                }
                s.existing.push(path.clone());
                s.existing.push(real);
            }
            s.named.push(path);
        }
        s
    }

    /// What a bind of `real` (a resolved path) does to the runtime's socket.
    fn exposure(&self, real: &Path) -> Exposure {
        if self.named.iter().chain(&self.existing).any(|s| s == real)
            || inode(real).is_some_and(|id| self.inodes.contains(&id))
        {
            return Exposure::Socket;
        }
        if let Some(s) = self.existing.iter().find(|s| s.starts_with(real)) {
            return Exposure::Holds(s.clone());
        }
        if real
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| SOCKET_NAMES.contains(&n))
        {
            return Exposure::Named;
        }
        Exposure::None
    }
}

enum Exposure {
    None,
    /// It is a runtime's socket.
    Socket,
    /// A directory holding this socket.
    Holds(PathBuf),
    /// Named like a runtime's socket.
    Named,
}

#[cfg(unix)]
fn inode(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn inode(_path: &Path) -> Option<(u64, u64)> {
    None
}

/// Check a container's create body against this host's policy.
pub fn check(policy: &DeployConfig, body: &ContainerCreateBody) -> Result<(), PolicyViolation> {
    check_with(policy, body, &RuntimeSockets::of_this_host())
}

/// [`check`], with the runtime sockets given.
pub fn check_with(
    policy: &DeployConfig,
    body: &ContainerCreateBody,
    sockets: &RuntimeSockets,
) -> Result<(), PolicyViolation> {
    let Some(host) = &body.host_config else {
        return Ok(());
    };
    if host.privileged == Some(true) && !policy.allow_privileged {
        return Err(refuse(
            PRIVILEGED,
            format!("a privileged container needs {PRIVILEGED}"),
        ));
    }
    namespaces(policy, host)?;
    if !host.security_opt.as_deref().unwrap_or_default().is_empty() {
        return Err(never("a security option (seccomp, AppArmor, SELinux)"));
    }
    if host.masked_paths.is_some() || host.readonly_paths.is_some() {
        return Err(never("changing the masked or read-only /proc paths"));
    }
    if !host.volumes_from.as_deref().unwrap_or_default().is_empty() {
        return Err(never("mounting another container's volumes (volumes_from)"));
    }
    if host.volume_driver.as_deref().is_some_and(|d| !d.is_empty()) {
        return Err(never("a volume driver"));
    }
    for cap in host.cap_add.as_deref().unwrap_or_default() {
        let wanted = capability(cap);
        let allowed = policy
            .allow_capabilities
            .iter()
            .any(|a| capability(a) == "ALL" || capability(a) == wanted);
        if !allowed {
            return Err(refuse(
                CAPABILITIES,
                format!("capability `{cap}` is not in {CAPABILITIES}"),
            ));
        }
    }
    if !host
        .device_cgroup_rules
        .as_deref()
        .unwrap_or_default()
        .is_empty()
    {
        return Err(never("a device cgroup rule"));
    }
    for device in host.devices.as_deref().unwrap_or_default() {
        let path = device.path_on_host.as_deref().unwrap_or_default();
        match resolve(Path::new(path)) {
            Ok(real) if within(&real, &policy.allow_devices) => {}
            _ => {
                return Err(refuse(
                    DEVICES,
                    format!("device `{path}` is not in {DEVICES}"),
                ))
            }
        }
    }
    for request in host.device_requests.as_deref().unwrap_or_default() {
        if !is_gpu(request) {
            return Err(never("a device request other than for GPUs"));
        }
        if !policy.allow_gpus {
            return Err(refuse(GPUS, format!("GPUs are off here ({GPUS} = false)")));
        }
    }
    for bind in host.binds.as_deref().unwrap_or_default() {
        check_bind_spec(policy, sockets, bind)?;
    }
    for mount in host.mounts.as_deref().unwrap_or_default() {
        check_mount(policy, sockets, mount)?;
    }
    Ok(())
}

fn namespaces(policy: &DeployConfig, host: &HostConfig) -> Result<(), PolicyViolation> {
    let mode = |m: &Option<String>| m.as_deref().unwrap_or_default().to_owned();
    let network = mode(&host.network_mode);
    if network == "host" && !policy.allow_host_network {
        return Err(refuse(
            HOST_NETWORK,
            format!("the host's network needs {HOST_NETWORK}"),
        ));
    }
    let pid = mode(&host.pid_mode);
    if pid == "host" && !policy.allow_host_pid {
        return Err(refuse(
            HOST_PID,
            format!("the host's PID namespace needs {HOST_PID}"),
        ));
    }
    if network.starts_with("container:") || pid.starts_with("container:") {
        return Err(never("joining another container's namespaces"));
    }
    for (what, m) in [
        ("IPC", &host.ipc_mode),
        ("UTS", &host.uts_mode),
        ("user", &host.userns_mode),
    ] {
        if mode(m) == "host" {
            return Err(never(&format!("the host's {what} namespace")));
        }
    }
    if host.cgroupns_mode == Some(HostConfigCgroupnsModeEnum::HOST) {
        return Err(never("the host's cgroup namespace"));
    }
    Ok(())
}

/// A request for NVIDIA GPUs, as `gpu:` in a service map makes (`--gpus`).
fn is_gpu(r: &DeviceRequest) -> bool {
    let gpu_caps = r
        .capabilities
        .as_ref()
        .is_some_and(|c| c.iter().any(|set| set.iter().any(|cap| cap == "gpu")));
    matches!(r.driver.as_deref(), Some("nvidia") | None | Some("")) && gpu_caps
}

/// A `Binds` entry as Docker reads it on Linux: `SOURCE:TARGET[:OPTIONS]`, or `TARGET` alone
/// (an anonymous volume).
fn check_bind_spec(
    policy: &DeployConfig,
    sockets: &RuntimeSockets,
    bind: &str,
) -> Result<(), PolicyViolation> {
    let parts: Vec<&str> = bind.split(':').collect();
    let (source, options) = match parts.as_slice() {
        [_target] => return Ok(()),
        [source, _target] => (*source, ""),
        [source, _target, options] => (*source, *options),
        _ => return Err(never(&format!("a bind mount written as `{bind}`"))),
    };
    if let Some(o) = options
        .split(',')
        .filter(|o| !o.is_empty())
        .find(|o| !matches!(*o, "ro" | "rw" | "nocopy"))
    {
        return Err(never(&format!("mount option `{o}` (in `{bind}`)")));
    }
    if is_volume_name(source) {
        return Ok(());
    }
    check_bind(policy, sockets, source)
}

fn check_mount(
    policy: &DeployConfig,
    sockets: &RuntimeSockets,
    mount: &Mount,
) -> Result<(), PolicyViolation> {
    let source = mount.source.as_deref().unwrap_or_default();
    match mount.typ {
        Some(MountType::BIND) => check_bind(policy, sockets, source),
        Some(MountType::VOLUME) | None => {
            let driver = mount
                .volume_options
                .as_ref()
                .and_then(|o| o.driver_config.as_ref());
            if driver.is_some_and(|d| d.name.is_some() || d.options.is_some()) {
                // The local driver's options bind any host path (`o=bind,device=/`).
                return Err(never("a volume with driver options"));
            }
            Ok(())
        }
        Some(MountType::TMPFS) => Ok(()),
        Some(other) => Err(never(&format!("a mount of type {other}"))),
    }
}

/// A host path bound into a container.
fn check_bind(
    policy: &DeployConfig,
    sockets: &RuntimeSockets,
    source: &str,
) -> Result<(), PolicyViolation> {
    let real = resolve(Path::new(source))
        .map_err(|why| refuse(BIND_PATHS, format!("bind mount of `{source}`: {why}")))?;
    let shown = if Path::new(source) == real {
        format!("`{source}`")
    } else {
        format!("`{source}` (which is `{}`)", real.display())
    };
    let exposure = sockets.exposure(&real);
    if let Exposure::Socket = exposure {
        // The key alone allows the socket itself: no bind path needs to hold it.
        return if policy.allow_docker_socket {
            Ok(())
        } else {
            Err(refuse(
                SOCKET,
                format!(
                    "bind mount of {shown} is a container runtime's socket, which only \
                     {SOCKET} allows"
                ),
            ))
        };
    }
    if !within(&real, &policy.allow_bind_paths) {
        return Err(refuse(
            BIND_PATHS,
            format!("bind mount of {shown} is outside {BIND_PATHS}"),
        ));
    }
    match exposure {
        _ if policy.allow_docker_socket => Ok(()),
        Exposure::Holds(socket) => Err(refuse(
            SOCKET,
            format!(
                "bind mount of {shown} holds the container runtime's socket `{}`, which only \
                 {SOCKET} allows (listing a directory above it in {BIND_PATHS} does not)",
                socket.display()
            ),
        )),
        Exposure::Named => Err(refuse(
            SOCKET,
            format!(
                "bind mount of {shown} is named like a container runtime's socket, which only \
                 {SOCKET} allows"
            ),
        )),
        Exposure::Socket | Exposure::None => Ok(()),
    }
}

/// Docker's rule: a source that is not a path is a volume name.
fn is_volume_name(source: &str) -> bool {
    source
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && source
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Inside one of `roots` (compared by whole components, each root resolved as well). Roots that
/// are not absolute allow nothing.
fn within(real: &Path, roots: &[PathBuf]) -> bool {
    roots
        .iter()
        .filter(|r| r.is_absolute())
        .filter_map(|r| resolve(r).ok())
        .any(|root| real.starts_with(root))
}

/// An absolute path with `..` and symlinks resolved as the kernel would: the longest leading
/// part that exists is canonicalized, and the rest (which Docker would create) is appended,
/// refused when it holds `..`. Something that exists but does not resolve (a dangling or
/// looping symlink) is refused too.
pub(crate) fn resolve(path: &Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err("not an absolute path".into());
    }
    let parts: Vec<Component<'_>> = path.components().collect();
    for split in (1..=parts.len()).rev() {
        let head: PathBuf = parts[..split].iter().collect();
        let Ok(mut real) = std::fs::canonicalize(&head) else {
            continue;
        };
        for (i, part) in parts[split..].iter().enumerate() {
            match part {
                Component::Normal(name) => {
                    real.push(name);
                    if i == 0 && std::fs::symlink_metadata(&real).is_ok() {
                        return Err(format!(
                            "`{}` exists but does not resolve (a dangling symlink?)",
                            real.display()
                        ));
                    }
                }
                Component::CurDir => {}
                _ => return Err("`..` below a directory that does not exist".into()),
            }
        }
        return Ok(real);
    }
    Err("the path does not resolve".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{DeviceMapping, MountVolumeOptions, MountVolumeOptionsDriverConfig};

    fn body(host: HostConfig) -> ContainerCreateBody {
        ContainerCreateBody {
            host_config: Some(host),
            ..Default::default()
        }
    }

    fn binds(list: &[&str]) -> ContainerCreateBody {
        body(HostConfig {
            binds: Some(list.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        })
    }

    fn paths(list: &[&Path]) -> Vec<PathBuf> {
        list.iter().map(|p| p.to_path_buf()).collect()
    }

    /// The key a refusal names (`None` for a rule without one); panics when it is allowed.
    fn refused(policy: &DeployConfig, b: &ContainerCreateBody, sockets: &RuntimeSockets) -> String {
        let v = check_with(policy, b, sockets).expect_err("refused");
        let text = v.to_string();
        assert!(
            text.starts_with("deploy refused by this host's policy: "),
            "{text}"
        );
        if let Some(key) = v.key {
            assert!(text.contains(key), "the message names the key: {text}");
        }
        text
    }

    #[test]
    fn by_default_only_named_volumes_gpus_and_plain_containers_pass() {
        let p = DeployConfig::default();
        let s = RuntimeSockets::of_this_host();
        assert!(check_with(&p, &ContainerCreateBody::default(), &s).is_ok());
        assert!(check_with(&p, &body(HostConfig::default()), &s).is_ok());
        assert!(check_with(&p, &binds(&["data:/data", "cache.1:/c:ro", "/anon"]), &s).is_ok());
        let gpu = DeviceRequest {
            driver: Some("nvidia".into()),
            count: Some(-1),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        };
        let gpus = body(HostConfig {
            device_requests: Some(vec![gpu.clone()]),
            ..Default::default()
        });
        assert!(
            check_with(&p, &gpus, &s).is_ok(),
            "GPUs are allowed by default"
        );
        let off = DeployConfig {
            allow_gpus: false,
            ..DeployConfig::default()
        };
        assert!(refused(&off, &gpus, &s).contains("deploy.allow_gpus"));
        let other = body(HostConfig {
            device_requests: Some(vec![DeviceRequest {
                driver: Some("cdi".into()),
                ..gpu
            }]),
            ..Default::default()
        });
        assert!(refused(&p, &other, &s).contains("never allowed"));

        let root = refused(&p, &binds(&["/:/host"]), &s);
        assert_eq!(
            root,
            "deploy refused by this host's policy: bind mount of `/` is outside \
             deploy.allow_bind_paths (agent config)"
        );
        let etc = refused(&p, &binds(&["/etc:/host-etc:ro"]), &s);
        assert_eq!(
            etc,
            "deploy refused by this host's policy: bind mount of `/etc` is outside \
             deploy.allow_bind_paths (agent config)"
        );
        for (host, key) in [
            (
                HostConfig {
                    privileged: Some(true),
                    ..Default::default()
                },
                PRIVILEGED,
            ),
            (
                HostConfig {
                    network_mode: Some("host".into()),
                    ..Default::default()
                },
                HOST_NETWORK,
            ),
            (
                HostConfig {
                    pid_mode: Some("host".into()),
                    ..Default::default()
                },
                HOST_PID,
            ),
            (
                HostConfig {
                    cap_add: Some(vec!["NET_ADMIN".into()]),
                    ..Default::default()
                },
                CAPABILITIES,
            ),
            (
                HostConfig {
                    devices: Some(vec![DeviceMapping {
                        path_on_host: Some("/dev/sda".into()),
                        path_in_container: Some("/dev/sda".into()),
                        cgroup_permissions: Some("rwm".into()),
                    }]),
                    ..Default::default()
                },
                DEVICES,
            ),
        ] {
            let text = refused(&p, &body(host), &s);
            assert!(text.contains(key), "{text}");
        }
    }

    #[test]
    fn each_flag_allows_only_its_own_rule() {
        let s = RuntimeSockets::default();
        let privileged = body(HostConfig {
            privileged: Some(true),
            ..Default::default()
        });
        let host_net = body(HostConfig {
            network_mode: Some("host".into()),
            ..Default::default()
        });
        let host_pid = body(HostConfig {
            pid_mode: Some("host".into()),
            ..Default::default()
        });
        let p = DeployConfig {
            allow_privileged: true,
            ..DeployConfig::default()
        };
        assert!(check_with(&p, &privileged, &s).is_ok());
        assert!(refused(&p, &host_net, &s).contains(HOST_NETWORK));
        let p = DeployConfig {
            allow_host_network: true,
            ..DeployConfig::default()
        };
        assert!(check_with(&p, &host_net, &s).is_ok());
        assert!(refused(&p, &privileged, &s).contains(PRIVILEGED));
        assert!(refused(&p, &host_pid, &s).contains(HOST_PID));
        let p = DeployConfig {
            allow_host_pid: true,
            ..DeployConfig::default()
        };
        assert!(check_with(&p, &host_pid, &s).is_ok());
        // Other containers' namespaces and the rest of the host's are never allowed.
        let everything = DeployConfig {
            allow_privileged: true,
            allow_host_network: true,
            allow_host_pid: true,
            allow_docker_socket: true,
            allow_bind_paths: vec!["/".into()],
            allow_capabilities: vec!["ALL".into()],
            allow_devices: vec!["/dev".into()],
            ..DeployConfig::default()
        };
        for host in [
            HostConfig {
                network_mode: Some("container:db".into()),
                ..Default::default()
            },
            HostConfig {
                ipc_mode: Some("host".into()),
                ..Default::default()
            },
            HostConfig {
                userns_mode: Some("host".into()),
                ..Default::default()
            },
            HostConfig {
                cgroupns_mode: Some(HostConfigCgroupnsModeEnum::HOST),
                ..Default::default()
            },
            HostConfig {
                security_opt: Some(vec!["seccomp=unconfined".into()]),
                ..Default::default()
            },
            HostConfig {
                masked_paths: Some(Vec::new()),
                ..Default::default()
            },
            HostConfig {
                volumes_from: Some(vec!["other".into()]),
                ..Default::default()
            },
            HostConfig {
                device_cgroup_rules: Some(vec!["c *:* rwm".into()]),
                ..Default::default()
            },
            HostConfig {
                binds: Some(vec!["/srv:/srv:rshared".into()]),
                ..Default::default()
            },
            HostConfig {
                mounts: Some(vec![Mount {
                    typ: Some(MountType::VOLUME),
                    source: Some("data".into()),
                    volume_options: Some(MountVolumeOptions {
                        driver_config: Some(MountVolumeOptionsDriverConfig {
                            name: Some("local".into()),
                            options: Some(
                                [("o".to_string(), "bind".to_string())]
                                    .into_iter()
                                    .collect(),
                            ),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            },
        ] {
            let text = refused(&everything, &body(host), &s);
            assert!(text.contains("never allowed"), "{text}");
        }
    }

    #[test]
    fn capabilities_and_devices_are_matched_by_name_and_path() {
        let s = RuntimeSockets::default();
        let p = DeployConfig {
            allow_capabilities: vec!["net_admin".into()],
            allow_devices: vec!["/dev/dri".into()],
            ..DeployConfig::default()
        };
        let caps = |c: &[&str]| {
            body(HostConfig {
                cap_add: Some(c.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            })
        };
        assert!(check_with(&p, &caps(&["NET_ADMIN", "CAP_NET_ADMIN"]), &s).is_ok());
        assert!(refused(&p, &caps(&["NET_ADMIN", "SYS_ADMIN"]), &s).contains("SYS_ADMIN"));
        assert!(refused(&p, &caps(&["ALL"]), &s).contains(CAPABILITIES));
        let dev = |path: &str| {
            body(HostConfig {
                devices: Some(vec![DeviceMapping {
                    path_on_host: Some(path.into()),
                    path_in_container: Some(path.into()),
                    cgroup_permissions: None,
                }]),
                ..Default::default()
            })
        };
        assert!(check_with(&p, &dev("/dev/dri/renderD128"), &s).is_ok());
        assert!(refused(&p, &dev("/dev/dri/../sda"), &s).contains(DEVICES));
        assert!(refused(&p, &dev("/dev/drix"), &s).contains(DEVICES));
    }

    #[test]
    fn bind_paths_are_compared_with_dots_and_symlinks_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let srv = base.join("srv");
        std::fs::create_dir_all(srv.join("data")).unwrap();
        std::fs::create_dir_all(base.join("srvx")).unwrap();
        std::fs::create_dir_all(base.join("secret")).unwrap();
        let p = DeployConfig {
            allow_bind_paths: paths(&[&srv, Path::new("relative/dir")]),
            ..DeployConfig::default()
        };
        let s = RuntimeSockets::default();
        let ok = |src: &Path| check_with(&p, &binds(&[&format!("{}:/x", src.display())]), &s);
        assert!(ok(&srv).is_ok());
        assert!(ok(&srv.join("data")).is_ok());
        assert!(ok(&srv.join("new/dir")).is_ok(), "Docker creates it");
        assert!(ok(&srv.join("data/../data/./x")).is_ok());
        // Whole components: `/srv` does not allow `/srvx`.
        assert!(ok(&base.join("srvx")).is_err());
        // `..` out of the allowed directory, through existing and missing directories.
        let up = ok(&srv.join("data/../../secret")).unwrap_err();
        assert!(
            up.to_string().contains("outside deploy.allow_bind_paths"),
            "{up}"
        );
        assert!(up.to_string().contains("/secret`)"), "the real path: {up}");
        assert!(ok(&srv.join("missing/../../secret")).is_err());
        // Relative sources, and relative entries in the list, allow nothing.
        assert!(ok(Path::new("./srv")).is_err());
        assert!(ok(Path::new("relative/dir")).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::symlink;
            // A symlink inside that leads out is judged by where it leads.
            symlink(base.join("secret"), srv.join("escape")).unwrap();
            assert!(ok(&srv.join("escape")).is_err());
            assert!(ok(&srv.join("escape/sub")).is_err());
            symlink("/", srv.join("root")).unwrap();
            assert!(ok(&srv.join("root")).is_err());
            // A dangling symlink would be created wherever it points: refused.
            symlink(base.join("secret/later"), srv.join("dangling")).unwrap();
            assert!(ok(&srv.join("dangling")).is_err());
            // A symlink outside that leads in is fine.
            symlink(srv.join("data"), base.join("into")).unwrap();
            assert!(ok(&base.join("into")).is_ok());
            // An allowed entry that is itself a symlink allows where it leads.
            let p2 = DeployConfig {
                allow_bind_paths: vec![base.join("into")],
                ..DeployConfig::default()
            };
            let src = format!("{}:/x", srv.join("data/f").display());
            assert!(check_with(&p2, &binds(&[&src]), &s).is_ok());
        }
    }

    #[test]
    fn the_runtime_socket_needs_its_own_key_whatever_the_bind_paths() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let run = base.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let socket = run.join("engine.sock");
        std::fs::write(&socket, "").unwrap();
        let s = RuntimeSockets::new([socket.clone()]);
        let everything = DeployConfig {
            allow_bind_paths: vec!["/".into()],
            ..DeployConfig::default()
        };
        let bind = |p: &Path| binds(&[&format!("{}:/var/run/docker.sock", p.display())]);
        for path in [
            socket.clone(),
            run.clone(),
            base.clone(),
            PathBuf::from("/"),
        ] {
            let text = refused(&everything, &bind(&path), &s);
            assert!(text.contains(SOCKET), "{}: {text}", path.display());
        }
        // Well-known names are refused whether or not they exist here.
        let text = refused(&everything, &bind(Path::new("/run/docker.sock")), &s);
        assert!(text.contains(SOCKET), "{text}");
        let text = refused(&everything, &bind(&base.join("x/podman.sock")), &s);
        assert!(text.contains(SOCKET), "{text}");
        let real = RuntimeSockets::of_this_host();
        for path in [
            "/var/run/docker.sock",
            "/run/docker.sock",
            "/run/podman/podman.sock",
        ] {
            let text = refused(&everything, &bind(Path::new(path)), &real);
            assert!(text.contains(SOCKET), "{text}");
        }
        #[cfg(unix)]
        {
            // A symlink or a hard link to it is the socket.
            let link = base.join("innocent");
            std::os::unix::fs::symlink(&socket, &link).unwrap();
            assert!(refused(&everything, &bind(&link), &s).contains(SOCKET));
            let hard = base.join("hard");
            std::fs::hard_link(&socket, &hard).unwrap();
            assert!(refused(&everything, &bind(&hard), &s).contains(SOCKET));
            // And through `..`.
            let dotted = run.join("../run/./engine.sock");
            assert!(refused(&everything, &bind(&dotted), &s).contains(SOCKET));
        }
        // With the key, the socket itself needs no bind path; a directory holding it needs both.
        let socket_only = DeployConfig {
            allow_docker_socket: true,
            ..DeployConfig::default()
        };
        assert!(check_with(&socket_only, &bind(&socket), &s).is_ok());
        assert!(refused(&socket_only, &bind(&run), &s).contains(BIND_PATHS));
        let both = DeployConfig {
            allow_docker_socket: true,
            ..everything
        };
        assert!(check_with(&both, &bind(&run), &s).is_ok());
        assert!(check_with(&both, &bind(Path::new("/")), &s).is_ok());
    }

    #[test]
    fn resolve_refuses_dots_below_missing_directories() {
        assert_eq!(resolve(Path::new("/")).unwrap(), PathBuf::from("/"));
        assert!(resolve(Path::new("rel")).is_err());
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(
            resolve(&base.join("a/./b")).unwrap(),
            base.join("a").join("b")
        );
        assert!(resolve(&base.join("a/../b")).is_err());
        assert_eq!(resolve(&base.join("../")).unwrap(), base.parent().unwrap());
    }
}
