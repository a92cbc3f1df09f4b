//! The controller's configuration: one struct, read from a TOML file, then overridden by
//! `NEBULA_*` environment variables and flags (the `nebula serve` command does the overriding).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerConfig {
    /// CA, server certificate, SQLite file and other state.
    pub data_dir: PathBuf,
    /// UDP address agents dial (QUIC).
    pub quic_listen: SocketAddr,
    /// HTTP API (and, later, dashboard) address.
    pub http_listen: SocketAddr,
    /// `sqlite://...` or `postgres://...`; default: `sqlite://<data_dir>/nebula.db`.
    pub database_url: Option<String>,
    /// Extra DNS names or IPs for the controller's server certificate.
    pub server_names: Vec<String>,
    /// Address agents should dial, shown in join commands and installers (default: the host the
    /// request came to, at the QUIC port).
    pub public_address: Option<String>,
    /// Base URL of this controller's HTTP server as agents and browsers reach it, e.g.
    /// `https://nebula.example.net` (default: taken from each request's `Host`).
    pub public_url: Option<String>,
    /// Agent binaries to serve at `/downloads/`, named `nebula-agent-{os}-{arch}[.exe]`
    /// (default: `<data_dir>/agents`). For its own platform the controller also serves the
    /// `nebula-agent` beside its executable when this holds none.
    pub agent_dir: Option<PathBuf>,
    /// How often `agent_dir` is looked at for new builds (agents are told at once).
    #[serde(with = "humantime_serde")]
    pub release_scan_interval: Duration,
    /// QUIC keep-alive interval (both directions).
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// A connection silent for this long is dead and its node offline.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Lifetime of node certificates; agents renew after two thirds of it.
    #[serde(with = "humantime_serde")]
    pub cert_lifetime: Duration,
    /// How often agents send telemetry.
    #[serde(with = "humantime_serde")]
    pub telemetry_interval: Duration,
    /// Largest frame accepted from an agent.
    pub max_frame_bytes: usize,
    /// File holding the admin API token (created at first start when no API token exists and
    /// this is unset; the token is then printed once).
    pub admin_token_file: Option<PathBuf>,
    /// Enrollment handshakes served at once (the enrollment ALPN needs no certificate, so it is
    /// bounded).
    pub max_concurrent_enrollments: usize,
    /// Full-resolution telemetry kept in memory per node.
    #[serde(with = "humantime_serde")]
    pub telemetry_history: Duration,
    /// How long one-minute rollups are kept in the database.
    #[serde(with = "humantime_serde")]
    pub rollup_retention: Duration,
    /// How often finished rollups are written (in one batch).
    #[serde(with = "humantime_serde")]
    pub rollup_flush_interval: Duration,
    /// How often rollups past the retention window are deleted.
    #[serde(with = "humantime_serde")]
    pub retention_sweep_interval: Duration,
    /// A job whose node went away is `lost` when the node has not come back (and reported on
    /// it) within this time.
    #[serde(with = "humantime_serde")]
    pub job_lost_grace: Duration,
    /// Jobs sent to one node and not yet finished, at most (more wait in the queue).
    pub max_jobs_per_node: usize,
    /// Deadline of a job created without one (a queued job waits at most this long).
    #[serde(with = "humantime_serde")]
    pub job_default_deadline: Duration,
    /// Tries of an idempotent job, the first included (a job may ask for fewer or more, up to 10).
    pub job_max_attempts: u32,
    /// The service map to watch (`service-map.yml`); changes are applied when saved. Without
    /// one, the desired state comes from the API only.
    pub service_map: Option<PathBuf>,
    /// The workflows file to watch (workflows.yml).
    pub workflows_file: Option<PathBuf>,
    /// The reconciler runs at least this often (and whenever something changes).
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// The AI gateway: timeouts, retries, breakers, limits, the fallback provider.
    pub ai: crate::ai::AiConfig,
    /// Alert rules' timing and thresholds.
    pub alerts: crate::alerts::AlertsConfig,
    /// Built-in monitors and how often sets and uptime are worked out and written.
    pub monitors: crate::monitors::MonitorsConfig,
    /// The Discord bot (runs when a token file is given).
    pub discord: crate::discord::DiscordConfig,
    /// The secret store's key file.
    pub secrets: crate::secrets::SecretsConfig,
    /// TLS on the HTTP listener: certificate files, the fleet CA, tailscaled or ACME.
    pub https: crate::https::HttpsConfig,
    /// Scheduled backups: where, how often, how many kept.
    pub backup: crate::backup::BackupConfig,
    /// Replicas on PostgreSQL: the leader lease's timing.
    pub ha: crate::ha::HaConfig,
    /// A woken node that has not registered within this time is `wake_failed`.
    #[serde(with = "humantime_serde")]
    pub wake_timeout: Duration,
    /// Bounds on the QUIC listener's work before a peer is authenticated.
    pub quic_limits: QuicLimits,
    /// Bounds on the HTTP listener.
    pub http_limits: HttpLimits,
}

/// What the QUIC listener lets an unauthenticated peer cost. Enrollment connections and
/// sessions until their certificate is checked get one stream and a 64 KiB receive window;
/// handshakes have a 10 s deadline.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuicLimits {
    /// Connections at once, sessions included; more are refused.
    pub max_connections: usize,
    /// Handshakes under way at once; more are refused.
    pub max_handshakes: usize,
    /// With more handshakes than this under way, a new peer must first prove its address
    /// (a QUIC retry: one extra round trip, no state kept for it).
    pub retry_above_handshakes: usize,
    /// Enrollment connections at once, in all and from one address.
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_source: usize,
    /// One deadline on a whole enrollment exchange (request in, certificate out).
    #[serde(with = "humantime_serde")]
    pub enroll_deadline: Duration,
}

impl Default for QuicLimits {
    fn default() -> Self {
        QuicLimits {
            max_connections: 20_000,
            max_handshakes: 4096,
            retry_above_handshakes: 256,
            max_unauthenticated: 512,
            max_unauthenticated_per_source: 64,
            enroll_deadline: Duration::from_secs(10),
        }
    }
}

/// What the HTTP listener lets a client cost before and while it sends a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// Connections at once; a new one waits in the kernel's queue while the cap is reached.
    pub max_connections: usize,
    /// Time allowed for a request's headers (also the longest idle keep-alive gap).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time allowed for a request's whole body.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Reverse proxies whose `X-Forwarded-For` names the client (for sign-in throttling).
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            trusted_proxies: Vec::new(),
        }
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            data_dir: PathBuf::from("nebula-data"),
            quic_listen: "0.0.0.0:4433".parse().expect("static address"),
            http_listen: "127.0.0.1:8080".parse().expect("static address"),
            database_url: None,
            server_names: Vec::new(),
            public_address: None,
            public_url: None,
            agent_dir: None,
            release_scan_interval: Duration::from_secs(30),
            ai: crate::ai::AiConfig::default(),
            alerts: crate::alerts::AlertsConfig::default(),
            monitors: crate::monitors::MonitorsConfig::default(),
            discord: crate::discord::DiscordConfig::default(),
            secrets: crate::secrets::SecretsConfig::default(),
            https: crate::https::HttpsConfig::default(),
            backup: crate::backup::BackupConfig::default(),
            ha: crate::ha::HaConfig::default(),
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
            cert_lifetime: Duration::from_secs(30 * 24 * 3600),
            telemetry_interval: Duration::from_secs(5),
            max_frame_bytes: nebula_protocol::DEFAULT_MAX_FRAME,
            admin_token_file: None,
            max_concurrent_enrollments: 64,
            telemetry_history: Duration::from_secs(3600),
            rollup_retention: Duration::from_secs(7 * 24 * 3600),
            rollup_flush_interval: Duration::from_secs(60),
            retention_sweep_interval: Duration::from_secs(600),
            job_lost_grace: Duration::from_secs(60),
            max_jobs_per_node: 64,
            job_default_deadline: Duration::from_secs(3600),
            job_max_attempts: 3,
            service_map: None,
            workflows_file: None,
            reconcile_interval: Duration::from_secs(30),
            wake_timeout: Duration::from_secs(180),
            quic_limits: QuicLimits::default(),
            http_limits: HttpLimits::default(),
        }
    }
}

impl ControllerConfig {
    /// The secret store's key file (`[secrets] key_file`, else `<data_dir>/secret.key`).
    pub fn secret_key_file(&self) -> PathBuf {
        self.secrets
            .key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join(crate::secrets::KEY_FILE))
    }

    pub fn agent_dir(&self) -> PathBuf {
        self.agent_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("agents"))
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("nebula.db").display()
            )
        })
    }

    /// Check values that would otherwise fail later in a confusing way.
    pub fn validate(&self) -> Result<(), String> {
        if self.keep_alive.is_zero() || self.idle_timeout.is_zero() {
            return Err("keep_alive and idle_timeout must be above zero".into());
        }
        if self.keep_alive >= self.idle_timeout {
            return Err(format!(
                "keep_alive ({}) must be shorter than idle_timeout ({})",
                humantime::format_duration(self.keep_alive),
                humantime::format_duration(self.idle_timeout)
            ));
        }
        if self.cert_lifetime < Duration::from_secs(3) {
            return Err("cert_lifetime must be at least 3s".into());
        }
        if self.rollup_flush_interval.is_zero() || self.retention_sweep_interval.is_zero() {
            return Err(
                "rollup_flush_interval and retention_sweep_interval must be above zero".into(),
            );
        }
        if self.telemetry_interval < Duration::from_millis(100) {
            return Err("telemetry_interval must be at least 100ms".into());
        }
        if self.max_jobs_per_node == 0 || self.job_max_attempts == 0 {
            return Err("max_jobs_per_node and job_max_attempts must be at least 1".into());
        }
        if self.reconcile_interval < Duration::from_millis(100) {
            return Err("reconcile_interval must be at least 100ms".into());
        }
        if self.alerts.evaluate_interval < Duration::from_millis(100) {
            return Err("alerts.evaluate_interval must be at least 100ms".into());
        }
        if self.job_default_deadline.is_zero() {
            return Err("job_default_deadline must be above zero".into());
        }
        if let Some(u) = &self.public_url {
            if !(u.starts_with("http://") || u.starts_with("https://"))
                || u.contains(['\'', '"', ' ', '\n'])
            {
                return Err(format!(
                    "public_url `{u}` must be an http:// or https:// URL"
                ));
            }
        }
        if self.max_frame_bytes < 1024 {
            return Err("max_frame_bytes must be at least 1024".into());
        }
        self.backup.validate()?;
        self.ha.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_unknown_keys_are_rejected() {
        let example = include_str!("../../config/controller.example.toml");
        let cfg: ControllerConfig = toml::from_str(example).expect("example config parses");
        cfg.validate().unwrap();
        assert!(toml::from_str::<ControllerConfig>("no_such_key = 1").is_err());
        let bad: ControllerConfig = toml::from_str("keep_alive = \"20s\"").unwrap();
        assert!(bad.validate().is_err());
    }
}
