//! The agent's configuration: a TOML file (`--config`), overridden by `NEBULA_*` environment
//! variables and flags.

use std::path::PathBuf;
use std::time::Duration;

use nebula_protocol::Labels;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// `HOST:PORT` of the controller's QUIC endpoint.
    pub controller: Option<String>,
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
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            controller: None,
            state_dir: PathBuf::from("/var/lib/nebula-agent"),
            name: None,
            labels: Labels::new(),
            token_file: None,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
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
    }
}
