//! The agent's configuration: a TOML file (`--config`), overridden by `NEBULA_*` environment
//! variables and flags.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nebula_protocol::containers::{DockerPolicySummary, Reach};
use nebula_protocol::Labels;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// `HOST:PORT` of the controller's QUIC endpoint.
    pub controller: Option<String>,
    /// More controller replicas (`HOST:PORT`), tried in turn when the connection is lost
    /// (`install.sh` writes every replica it knows; sessions keep the list current).
    pub replicas: Vec<String>,
    /// Key, certificate, CA and session state. Holds secrets: 0700.
    pub state_dir: PathBuf,
    /// Name to ask for at enrollment (default: the hostname).
    pub name: Option<String>,
    /// Labels to ask for at enrollment (labels on the join token win).
    pub labels: Labels,
    /// Join token, read from a file (so it stays out of process listings).
    pub token_file: Option<PathBuf>,
    /// Reconnect backoff: first delay and cap (exponential, with jitter).
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// QUIC keep-alive and idle timeout until the controller's settings arrive.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How jobs run here.
    pub jobs: JobsConfig,
    /// What `exec` jobs may do on this host. The controller cannot widen it.
    pub exec: ExecConfig,
    /// What `deploy` jobs may ask of this host's container runtime. The controller cannot
    /// widen it.
    pub deploy: DeployConfig,
    /// What the controller may do to this host's containers beyond deploys (actions, logs,
    /// shells), and where the container runtime is. The controller cannot widen it.
    pub docker: DockerConfig,
    /// What `inventory` jobs look at.
    pub inventory: InventoryConfig,
    /// Self-update from the controller's agent builds.
    pub update: UpdateConfig,
    /// Local inference backends.
    pub ai: crate::ai::AiConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpdateConfig {
    /// Update when the controller serves a newer build for this platform. Off unless the host's
    /// owner opts in (`install.sh --auto-update`).
    pub enabled: bool,
    /// The controller's HTTP address to download from (default: the one the controller
    /// advertises, when it has one configured).
    pub url: Option<String>,
    /// Hex Ed25519 public key releases must be signed with (the installers write the
    /// controller's). Without it, the key the controller names first is pinned.
    pub release_key: Option<String>,
    /// A new version that has not reached the controller within this time is rolled back.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            enabled: false,
            url: None,
            release_key: None,
            confirm_timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Jobs running at once; more wait (accepted, not started) for a free slot.
    pub max_concurrent: usize,
    /// Finished jobs remembered in the journal (answers to redelivered jobs).
    pub journal_entries: usize,
    /// Send HTTP requests for `http` jobs (workflow steps that call a URL from this host, which
    /// can reach what this host reaches). Off unless this host's owner turns it on.
    pub http: bool,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            max_concurrent: 16,
            journal_entries: 4096,
            http: false,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecConfig {
    /// Allow `sh` (any shell command). Off unless this host's owner turns it on.
    pub allow_any: bool,
    /// `git-pull` works only on repositories inside these directories.
    pub git_dirs: Vec<PathBuf>,
    /// `systemctl-restart` works only on these units.
    pub systemd_units: Vec<String>,
    /// `docker-restart` works only on these container names (`*`: any container).
    pub docker_containers: Vec<String>,
    /// Named commands with a fixed argv: `nebula run NODE NAME`.
    pub commands: BTreeMap<String, CommandConfig>,
    /// Time limit of an exec job without a deadline of its own.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub default_timeout: Option<Duration>,
}

/// The deploy policy: what a service map may make this host's container runtime do. Whoever
/// can apply a map (or a controller that is not what it should be) gets no more than this
/// allows; everything root-equivalent is off until this host's owner lists it. Checked by
/// [`crate::jobs::deploy::policy::check`] before a deploy touches any container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeployConfig {
    /// Bind mounts only of these host directories and what lies below them, compared with
    /// `..` and symlinks resolved (`/srv` allows `/srv/x`, not `/srvx`). Named volumes are
    /// always allowed. Entries that are not absolute paths allow nothing. None by default.
    /// Docker follows symlinks in a bind source whenever it starts the container, so list only
    /// directories that nobody you would not give root to can write.
    pub allow_bind_paths: Vec<PathBuf>,
    /// Bind mounts of the container runtime's socket (`/var/run/docker.sock`, podman's,
    /// containerd's, whatever `DOCKER_HOST` names; or a directory holding one): whoever talks
    /// to it is root here. Never allowed through `allow_bind_paths` alone, even when it lists
    /// `/` or `/var/run`.
    pub allow_docker_socket: bool,
    /// Privileged containers (a service's `privileged: true`). Checked against what is sent
    /// to Docker, like every key here.
    pub allow_privileged: bool,
    /// The host's network namespace (`network_mode: host`).
    pub allow_host_network: bool,
    /// The host's PID namespace (`pid: host`).
    pub allow_host_pid: bool,
    /// Capabilities a container may add (`cap_add`; `NET_ADMIN`, with or without `CAP_`;
    /// `ALL` for any).
    pub allow_capabilities: Vec<String>,
    /// Host devices a container may be given (`devices`), with what lies below them
    /// (`/dev/dri`).
    pub allow_devices: Vec<PathBuf>,
    /// NVIDIA GPUs asked for by a service's `gpu:` (Docker device requests). On by default:
    /// that is what GPU nodes are for. Other device requests are never allowed.
    pub allow_gpus: bool,
}

impl Default for DeployConfig {
    fn default() -> Self {
        DeployConfig {
            allow_bind_paths: Vec::new(),
            allow_docker_socket: false,
            allow_privileged: false,
            allow_host_network: false,
            allow_host_pid: false,
            allow_capabilities: Vec::new(),
            allow_devices: Vec::new(),
            allow_gpus: true,
        }
    }
}

impl DeployConfig {
    /// What this host allows, for the controller (sent after `Welcome`, so that a plan can say
    /// what this node would refuse).
    pub fn summary(&self) -> nebula_protocol::deploy::DeployPolicySummary {
        let paths = |v: &[PathBuf]| v.iter().map(|p| p.display().to_string()).collect();
        nebula_protocol::deploy::DeployPolicySummary {
            allow_bind_paths: paths(&self.allow_bind_paths),
            allow_docker_socket: self.allow_docker_socket,
            allow_privileged: self.allow_privileged,
            allow_host_network: self.allow_host_network,
            allow_host_pid: self.allow_host_pid,
            allow_capabilities: self.allow_capabilities.clone(),
            allow_devices: paths(&self.allow_devices),
            allow_gpus: self.allow_gpus,
        }
    }
}

/// `[docker]`: how far the controller reaches into containers on this host. Each key is
/// `none` (also `off`), `managed` (only containers Nebula deployed here) or `all`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// Start, stop, restart, kill, remove, pull again. Default `managed`.
    pub control: Reach,
    /// Interactive shells (`nebula container exec`). Default `managed`.
    pub exec: Reach,
    /// Reading logs (`nebula container logs`). Default `all`: reading changes nothing.
    pub logs: Reach,
    /// The runtime's local socket (`unix:///run/podman/podman.sock`); default: `DOCKER_HOST`,
    /// then Docker's socket, then Podman's.
    pub socket: Option<String>,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            control: Reach::Managed,
            exec: Reach::Managed,
            logs: Reach::All,
            socket: None,
        }
    }
}

impl DockerConfig {
    /// What this host allows, for the controller (sent after `Welcome`).
    pub fn summary(&self) -> DockerPolicySummary {
        DockerPolicySummary {
            control: self.control,
            exec: self.exec,
            logs: self.logs,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// Program and arguments, run directly (no shell).
    pub argv: Vec<String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// The caller's arguments are added after `argv`, each one argv item (never through a
    /// shell). Off: the command takes no arguments.
    #[serde(default)]
    pub accept_args: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InventoryConfig {
    /// Directories searched for git repositories (default: `exec.git_dirs`).
    pub repo_dirs: Vec<PathBuf>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            controller: None,
            replicas: Vec::new(),
            state_dir: PathBuf::from("/var/lib/nebula-agent"),
            name: None,
            labels: Labels::new(),
            token_file: None,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
            jobs: JobsConfig::default(),
            exec: ExecConfig::default(),
            deploy: DeployConfig::default(),
            docker: DockerConfig::default(),
            inventory: InventoryConfig::default(),
            update: UpdateConfig::default(),
            ai: crate::ai::AiConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_unknown_keys_are_rejected() {
        let example = include_str!("../../config/agent.example.toml");
        let cfg: AgentConfig = toml::from_str(example).expect("example parses");
        assert_eq!(cfg.reconnect_max, Duration::from_secs(30));
        assert!(toml::from_str::<AgentConfig>("bogus = true").is_err());
        assert!(toml::from_str::<AgentConfig>("[exec]\nallow_anything = true").is_err());
        let cfg: AgentConfig = toml::from_str(
            "[exec]\ngit_dirs = [\"/srv\"]\n[exec.commands.backup]\nargv = [\"/bin/true\"]",
        )
        .unwrap();
        assert!(!cfg.exec.allow_any);
        assert_eq!(cfg.exec.commands["backup"].argv, vec!["/bin/true"]);
    }

    #[test]
    fn the_deploy_policy_is_closed_by_default_except_for_gpus() {
        let example = include_str!("../../config/agent.example.toml");
        let cfg: AgentConfig = toml::from_str(example).expect("example parses");
        assert_eq!(cfg.deploy, DeployConfig::default());
        let d = DeployConfig::default();
        assert!(d.allow_bind_paths.is_empty() && d.allow_devices.is_empty());
        assert!(!d.allow_docker_socket && !d.allow_privileged);
        assert!(!d.allow_host_network && !d.allow_host_pid);
        assert!(d.allow_capabilities.is_empty());
        assert!(
            d.allow_gpus,
            "GPU nodes run GPU services without extra config"
        );
        let cfg: AgentConfig = toml::from_str(
            "[deploy]\nallow_bind_paths = [\"/srv\"]\nallow_privileged = true\nallow_gpus = false",
        )
        .unwrap();
        assert_eq!(cfg.deploy.allow_bind_paths, vec![PathBuf::from("/srv")]);
        assert!(cfg.deploy.allow_privileged && !cfg.deploy.allow_gpus);
        assert!(toml::from_str::<AgentConfig>("[deploy]\nallow_everything = true").is_err());
        let summary = cfg.deploy.summary();
        assert_eq!(summary.allow_bind_paths, vec!["/srv".to_string()]);
        assert!(summary.allow_privileged && !summary.allow_gpus);
    }

    #[test]
    fn docker_reach_defaults_to_managed_and_reads_off() {
        let example = include_str!("../../config/agent.example.toml");
        let cfg: AgentConfig = toml::from_str(example).expect("example parses");
        assert_eq!(cfg.docker, DockerConfig::default());
        assert_eq!(cfg.docker.control, Reach::Managed);
        assert_eq!(cfg.docker.exec, Reach::Managed);
        let cfg: AgentConfig =
            toml::from_str("[docker]\ncontrol = \"all\"\nexec = \"off\"\nlogs = \"none\"").unwrap();
        assert_eq!(cfg.docker.summary().control, Reach::All);
        assert_eq!(cfg.docker.summary().exec, Reach::None);
        assert_eq!(cfg.docker.summary().logs, Reach::None);
        assert!(toml::from_str::<AgentConfig>("[docker]\ncontrol = \"some\"").is_err());
    }
}
