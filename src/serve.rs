//! `nebula serve` and `nebula dev`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use nebula_agent::process::wait_for_signal;
use nebula_agent::{Agent, AgentConfig, AgentStatus};
use nebula_controller::{Controller, ControllerConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML config file; flags and NEBULA_* variables override it.
    #[arg(long, env = "NEBULA_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "NEBULA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// UDP address for agents (QUIC).
    #[arg(long, env = "NEBULA_QUIC_LISTEN")]
    quic_listen: Option<SocketAddr>,
    /// HTTP API address.
    #[arg(long, env = "NEBULA_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// sqlite://... or postgres://...
    #[arg(long, env = "NEBULA_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// File holding the database URL (keeps the password out of the environment).
    #[arg(long, env = "NEBULA_DATABASE_URL_FILE")]
    database_url_file: Option<PathBuf>,
    #[arg(long, env = "NEBULA_KEEP_ALIVE", value_parser = humantime::parse_duration)]
    keep_alive: Option<Duration>,
    #[arg(long, env = "NEBULA_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    #[arg(long, env = "NEBULA_CERT_LIFETIME", value_parser = humantime::parse_duration)]
    cert_lifetime: Option<Duration>,
    #[arg(long, env = "NEBULA_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Extra DNS name or IP for the server certificate (repeatable).
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Largest frame accepted from an agent, in bytes.
    #[arg(long, env = "NEBULA_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<usize>,
    /// How often agents send telemetry.
    #[arg(long, env = "NEBULA_TELEMETRY_INTERVAL", value_parser = humantime::parse_duration)]
    telemetry_interval: Option<Duration>,
    /// Full-resolution telemetry kept in memory per node.
    #[arg(long, env = "NEBULA_TELEMETRY_HISTORY", value_parser = humantime::parse_duration)]
    telemetry_history: Option<Duration>,
    /// How long one-minute rollups are kept.
    #[arg(long, env = "NEBULA_ROLLUP_RETENTION", value_parser = humantime::parse_duration)]
    rollup_retention: Option<Duration>,
    #[arg(long, env = "NEBULA_ROLLUP_FLUSH_INTERVAL", value_parser = humantime::parse_duration)]
    rollup_flush_interval: Option<Duration>,
    #[arg(long, env = "NEBULA_RETENTION_SWEEP_INTERVAL", value_parser = humantime::parse_duration)]
    retention_sweep_interval: Option<Duration>,
    /// A job whose node went away is lost after this long without the node.
    #[arg(long, env = "NEBULA_JOB_LOST_GRACE", value_parser = humantime::parse_duration)]
    job_lost_grace: Option<Duration>,
    /// Jobs in flight per node at most.
    #[arg(long, env = "NEBULA_MAX_JOBS_PER_NODE")]
    max_jobs_per_node: Option<usize>,
    /// Deadline of a job created without one.
    #[arg(long, env = "NEBULA_JOB_DEFAULT_DEADLINE", value_parser = humantime::parse_duration)]
    job_default_deadline: Option<Duration>,
    /// Tries of an idempotent job, the first included.
    #[arg(long, env = "NEBULA_JOB_MAX_ATTEMPTS")]
    job_max_attempts: Option<u32>,
    /// The service map to watch and apply (service-map.yml).
    #[arg(long, env = "NEBULA_SERVICE_MAP")]
    service_map: Option<PathBuf>,
    /// The workflows file to watch and load (workflows.yml).
    #[arg(long, env = "NEBULA_WORKFLOWS")]
    workflows: Option<PathBuf>,
    /// The reconciler runs at least this often.
    #[arg(long, env = "NEBULA_RECONCILE_INTERVAL", value_parser = humantime::parse_duration)]
    reconcile_interval: Option<Duration>,
    /// A woken node that has not registered within this time is wake_failed.
    #[arg(long, env = "NEBULA_WAKE_TIMEOUT", value_parser = humantime::parse_duration)]
    wake_timeout: Option<Duration>,
    /// Agent binaries to serve at /downloads/ (nebula-agent-{os}-{arch}).
    #[arg(long, env = "NEBULA_AGENT_DIR")]
    agent_dir: Option<PathBuf>,
    /// This controller's HTTP address as agents and browsers reach it (installers name it).
    #[arg(long, env = "NEBULA_PUBLIC_URL")]
    public_url: Option<String>,
    /// The QUIC address agents dial, HOST:PORT (installers and join commands name it).
    #[arg(long, env = "NEBULA_PUBLIC_ADDRESS")]
    public_address: Option<String>,
    /// How often the agent directory is looked at for new builds.
    #[arg(long, env = "NEBULA_RELEASE_SCAN_INTERVAL", value_parser = humantime::parse_duration)]
    release_scan_interval: Option<Duration>,
    /// How often alert rules are evaluated (`alerts.evaluate_interval`).
    #[arg(long, env = "NEBULA_ALERT_INTERVAL", value_parser = humantime::parse_duration)]
    alert_interval: Option<Duration>,
    /// A new alert group waits this long before its first notification.
    #[arg(long, env = "NEBULA_ALERT_GROUP_WAIT", value_parser = humantime::parse_duration)]
    alert_group_wait: Option<Duration>,
    /// An alert group's changes go out at most this often.
    #[arg(long, env = "NEBULA_ALERT_GROUP_INTERVAL", value_parser = humantime::parse_duration)]
    alert_group_interval: Option<Duration>,
    /// A node offline this long is unreachable (alert).
    #[arg(long, env = "NEBULA_ALERT_NODE_UNREACHABLE_FOR", value_parser = humantime::parse_duration)]
    alert_node_unreachable_for: Option<Duration>,
    /// A managed container not running this long is down (alert).
    #[arg(long, env = "NEBULA_ALERT_CONTAINER_DOWN_FOR", value_parser = humantime::parse_duration)]
    alert_container_down_for: Option<Duration>,
    /// A firing alert stays firing this long after its condition stops.
    #[arg(long, env = "NEBULA_ALERT_KEEP_FIRING_FOR", value_parser = humantime::parse_duration)]
    alert_keep_firing_for: Option<Duration>,
    /// A monitor down this long on a node fires (alert).
    #[arg(long, env = "NEBULA_ALERT_MONITOR_DOWN_FOR", value_parser = humantime::parse_duration)]
    alert_monitor_down_for: Option<Duration>,
    /// How often each node's monitors are worked out again (also at once on a change).
    #[arg(long, env = "NEBULA_MONITOR_ASSIGN_INTERVAL", value_parser = humantime::parse_duration)]
    monitor_assign_interval: Option<Duration>,
    /// Replicas: how often the leader spreads agent sessions over them (`[ha]
    /// balance_interval`).
    #[arg(long, env = "NEBULA_BALANCE_INTERVAL", value_parser = humantime::parse_duration)]
    balance_interval: Option<Duration>,
    /// File holding the Discord bot's token (`[discord] token_file`): the bot runs in this
    /// controller.
    #[arg(long, env = "NEBULA_DISCORD_TOKEN_FILE")]
    discord_token_file: Option<PathBuf>,
    /// The key file secrets are encrypted under (`[secrets] key_file`; default
    /// `<data_dir>/secret.key`, created on first start). Back it up.
    #[arg(long, env = "NEBULA_SECRET_KEY_FILE")]
    secret_key_file: Option<PathBuf>,
    /// TLS on the HTTP listener (`[https] mode`): `auto` (certificate files when given, else the
    /// fleet CA off loopback and plain HTTP on it), `off`, `files`, `fleet-ca` (a certificate from the fleet CA), `tailscale`
    /// (this node's tailnet name, from tailscaled), `acme` (from an ACME CA for the
    /// `--https-name`s).
    #[arg(long, env = "NEBULA_HTTPS", value_parser = parse_https_mode)]
    https: Option<nebula_controller::https::HttpsMode>,
    /// PEM certificate chain for HTTPS (`[https] cert_file`), read again when it changes.
    #[arg(long, env = "NEBULA_TLS_CERT_FILE")]
    tls_cert_file: Option<PathBuf>,
    /// Its PEM private key (`[https] key_file`).
    #[arg(long, env = "NEBULA_TLS_KEY_FILE")]
    tls_key_file: Option<PathBuf>,
    /// A name (DNS name or IP) of the fleet-CA certificate (`[https] names`); repeatable.
    #[arg(long = "https-name")]
    https_names: Vec<String>,
    /// The ACME directory for `--https acme` (`[https.acme] directory`; default Let's
    /// Encrypt).
    #[arg(long, env = "NEBULA_ACME_DIRECTORY")]
    acme_directory: Option<String>,
    /// A CA certificate (PEM) to trust for the ACME directory's own HTTPS.
    #[arg(long, env = "NEBULA_ACME_DIRECTORY_CA_FILE")]
    acme_directory_ca_file: Option<PathBuf>,
    /// `http-01` or `tls-alpn-01` (`[https.acme] challenge`).
    #[arg(long, value_parser = parse_challenge)]
    acme_challenge: Option<nebula_controller::https::acme::ChallengeKind>,
    /// A contact for the ACME account (`mailto:ops@example.net`); repeatable.
    #[arg(long = "acme-contact")]
    acme_contacts: Vec<String>,
    /// How often certificate files are checked for changes, and the least pause between
    /// ACME tries (`[https] reload_interval`).
    #[arg(long, value_parser = humantime::parse_duration)]
    https_reload_interval: Option<Duration>,
    /// Renewals judge certificates' age by a clock this far ahead (for tests).
    #[arg(long, hide = true, value_parser = humantime::parse_duration)]
    https_clock_skew: Option<Duration>,
    /// tailscaled's socket for `--https tailscale` (`[https] tailscale_socket`).
    #[arg(long, env = "NEBULA_TAILSCALE_SOCKET")]
    tailscale_socket: Option<PathBuf>,
    /// A plain-HTTP listener that redirects to HTTPS (`[https] redirect_listen`).
    #[arg(long, env = "NEBULA_HTTPS_REDIRECT_LISTEN")]
    https_redirect_listen: Option<std::net::SocketAddr>,
    /// Enrollment connections at once from one address (`quic_limits`); more hear "busy".
    #[arg(long, env = "NEBULA_MAX_UNAUTHENTICATED_PER_SOURCE")]
    max_unauthenticated_per_source: Option<usize>,
    /// Take a backup into this directory every `--backup-interval` (`[backup] dir`).
    #[arg(long, env = "NEBULA_BACKUP_DIR")]
    backup_dir: Option<PathBuf>,
    /// How often a scheduled backup is taken (default 24h).
    #[arg(long, env = "NEBULA_BACKUP_INTERVAL", value_parser = humantime::parse_duration)]
    backup_interval: Option<Duration>,
    /// How many scheduled backups are kept (default 7).
    #[arg(long, env = "NEBULA_BACKUP_KEEP")]
    backup_keep: Option<usize>,
    /// The file holding the passphrase scheduled backups seal the keys with.
    #[arg(long, env = "NEBULA_BACKUP_PASSPHRASE_FILE")]
    backup_passphrase_file: Option<PathBuf>,
}

/// Reads a controller's config file (defaults without one).
pub fn config_file(path: Option<&std::path::Path>) -> anyhow::Result<ControllerConfig> {
    Ok(match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => ControllerConfig::default(),
    })
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<ControllerConfig> {
        let mut c = config_file(self.config.as_deref())?;
        macro_rules! set {
            ($field:ident) => {
                if let Some(v) = &self.$field {
                    c.$field = v.clone();
                }
            };
            ($field:ident, opt) => {
                if let Some(v) = &self.$field {
                    c.$field = Some(v.clone());
                }
            };
        }
        set!(data_dir);
        set!(quic_listen);
        set!(http_listen);
        set!(keep_alive);
        set!(idle_timeout);
        set!(cert_lifetime);
        set!(max_frame_bytes);
        set!(telemetry_interval);
        set!(telemetry_history);
        set!(rollup_retention);
        set!(rollup_flush_interval);
        set!(retention_sweep_interval);
        set!(job_lost_grace);
        set!(max_jobs_per_node);
        set!(job_default_deadline);
        set!(job_max_attempts);
        set!(reconcile_interval);
        set!(wake_timeout);
        set!(service_map, opt);
        if let Some(v) = self.workflows.clone() {
            c.workflows_file = Some(v);
        }
        set!(agent_dir, opt);
        set!(public_url, opt);
        set!(public_address, opt);
        set!(release_scan_interval);
        for (flag, field) in [
            (self.alert_interval, &mut c.alerts.evaluate_interval),
            (self.alert_group_wait, &mut c.alerts.group_wait),
            (self.alert_group_interval, &mut c.alerts.group_interval),
            (
                self.alert_node_unreachable_for,
                &mut c.alerts.node_unreachable_for,
            ),
            (
                self.alert_container_down_for,
                &mut c.alerts.container_down_for,
            ),
            (self.alert_keep_firing_for, &mut c.alerts.keep_firing_for),
            (self.alert_monitor_down_for, &mut c.alerts.monitor_down_for),
            (
                self.monitor_assign_interval,
                &mut c.monitors.assign_interval,
            ),
            (self.balance_interval, &mut c.ha.balance_interval),
        ] {
            if let Some(v) = flag {
                *field = v;
            }
        }
        if let Some(n) = self.max_unauthenticated_per_source {
            c.quic_limits.max_unauthenticated_per_source = n;
        }
        set!(database_url, opt);
        set!(admin_token_file, opt);
        if let Some(f) = &self.discord_token_file {
            c.discord.token_file = Some(f.clone());
        }
        if let Some(f) = &self.secret_key_file {
            c.secrets.key_file = Some(f.clone());
        }
        if let Some(d) = &self.backup_dir {
            c.backup.dir = Some(d.clone());
        }
        if let Some(i) = self.backup_interval {
            c.backup.interval = i;
        }
        if let Some(k) = self.backup_keep {
            c.backup.keep = k;
        }
        if let Some(f) = &self.backup_passphrase_file {
            c.backup.passphrase_file = Some(f.clone());
        }
        if let Some(m) = self.https {
            c.https.mode = m;
        }
        if let Some(f) = &self.tls_cert_file {
            c.https.cert_file = Some(f.clone());
        }
        if let Some(f) = &self.tls_key_file {
            c.https.key_file = Some(f.clone());
        }
        if let Some(d) = &self.acme_directory {
            c.https.acme.directory = d.clone();
        }
        if let Some(f) = &self.acme_directory_ca_file {
            c.https.acme.directory_ca_file = Some(f.clone());
        }
        if let Some(k) = self.acme_challenge {
            c.https.acme.challenge = Some(k);
        }
        c.https
            .acme
            .contact
            .extend(self.acme_contacts.iter().cloned());
        if let Some(i) = self.https_reload_interval {
            c.https.reload_interval = i;
        }
        if let Some(s) = self.https_clock_skew {
            c.https.clock_skew = s;
        }
        if let Some(s) = &self.tailscale_socket {
            c.https.tailscale_socket = s.clone();
        }
        if let Some(a) = self.https_redirect_listen {
            c.https.redirect_listen = Some(a);
        }
        c.https.names.extend(self.https_names.iter().cloned());
        if let Some(f) = &self.database_url_file {
            let url =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            c.database_url = Some(url.trim().to_owned());
        }
        c.server_names.extend(self.server_names.iter().cloned());
        c.validate().map_err(anyhow::Error::msg)?;
        Ok(c)
    }
}

fn log_config(c: &ControllerConfig) {
    tracing::info!(
        data_dir = %c.data_dir.display(),
        quic = %c.quic_listen,
        http = %c.http_listen,
        database = %nebula_controller::store::redact_url(&c.database_url()),
        keep_alive = %humantime::format_duration(c.keep_alive),
        idle_timeout = %humantime::format_duration(c.idle_timeout),
        cert_lifetime = %humantime::format_duration(c.cert_lifetime),
        "configuration"
    );
}

pub async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    log_config(&config);
    let shutdown = CancellationToken::new();
    let controller = Controller::start_with_tasks(
        config,
        shutdown.clone(),
        Some(Box::new(nebula_dashboard::router)),
        Some(Box::new(nebula_bots::discord::register)),
    )
    .await?;
    if let Some(token) = &controller.new_admin_token {
        println!("Admin API token (shown once, stored hashed): {token}");
    }
    if let Some(password) = controller.control_plane.bootstrap_admin_user().await? {
        println!("Dashboard user `admin`, password (shown once, stored hashed): {password}");
    }
    let scheme = match &controller.control_plane.https {
        Some(_) => "https",
        None => "http",
    };
    println!("API: {scheme}://{}", controller.http_addr);
    println!("QUIC: {}", controller.quic_addr);
    println!("CA pin: {}", controller.control_plane.ca.pin_hex());
    wait_for_signal().await;
    tracing::info!("shutting down");
    controller.shutdown().await;
    Ok(())
}

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where the demo keeps its state (controller and agent).
    #[arg(long, default_value = ".nebula-dev")]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:4433")]
    quic_listen: SocketAddr,
    /// A service map to watch and apply (e.g. service-map.yml); the local agent enrolls under
    /// this host's name with the label env=dev.
    #[arg(long)]
    service_map: Option<PathBuf>,
    /// A workflows file to watch and load (e.g. workflows.yml).
    #[arg(long)]
    workflows: Option<PathBuf>,
    /// File holding a Discord bot token: the bot runs in the dev controller too.
    #[arg(long, env = "NEBULA_DISCORD_TOKEN_FILE")]
    discord_token_file: Option<PathBuf>,
}

/// Controller + join token + local agent, in one process, until Ctrl-C.
pub async fn dev(args: &DevArgs) -> anyhow::Result<()> {
    let config = ControllerConfig {
        data_dir: args.data_dir.join("controller"),
        http_listen: args.http_listen,
        quic_listen: args.quic_listen,
        service_map: args.service_map.clone(),
        workflows_file: args.workflows.clone(),
        discord: nebula_controller::discord::DiscordConfig {
            token_file: args.discord_token_file.clone(),
            ..Default::default()
        },
        ..ControllerConfig::default()
    };
    log_config(&config);
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let controller = Controller::start_with_tasks(
        config,
        shutdown.clone(),
        Some(Box::new(nebula_dashboard::router)),
        Some(Box::new(nebula_bots::discord::register)),
    )
    .await?;
    let token_path = args.data_dir.join("admin.token");
    let password_path = args.data_dir.join("admin.password");
    if let Some(password) = controller.control_plane.bootstrap_admin_user().await? {
        write_private(&password_path, &password)?;
    }
    if let Some(token) = &controller.new_admin_token {
        write_private(&token_path, token)?;
    }
    let admin_token = std::fs::read_to_string(&token_path)
        .map(|t| t.trim().to_owned())
        .unwrap_or_else(|_| "(see the first run's output)".into());

    let cp = controller.control_plane.clone();
    let agent_config = AgentConfig {
        controller: Some(controller.quic_addr.to_string()),
        state_dir: args.data_dir.join("agent"),
        labels: [("env".to_owned(), "dev".to_owned())].into(),
        ..AgentConfig::default()
    };
    let agent = Agent::new(agent_config);
    if !agent.is_enrolled() {
        let created = cp
            .create_join_token(
                Some(Duration::from_secs(600)),
                Some(1),
                Default::default(),
                "nebula dev local agent",
                &nebula_controller::authz::OpCtx::internal("dev"),
            )
            .await?;
        let token = created
            .token
            .parse()
            .context("reading the dev join token")?;
        agent
            .join(&token)
            .await
            .context("enrolling the local agent")?;
    }
    let mut status = agent.status();
    let agent_shutdown = shutdown.clone();
    tracker.spawn(async move {
        if let Err(e) = agent.run(agent_shutdown).await {
            tracing::error!("local agent stopped: {e:#}");
        }
    });
    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| matches!(s, AgentStatus::Connected { .. })),
    )
    .await;
    let url = format!("http://{}", controller.http_addr);
    println!();
    println!("Nebula Command dev environment");
    println!("  API:          {url}");
    println!(
        "  Admin token:  {admin_token}   (also in {})",
        token_path.display()
    );
    println!(
        "  Dashboard:    {url}/ui/  (user admin, password in {})",
        password_path.display()
    );
    println!("  QUIC:         {}", controller.quic_addr);
    println!("  CA pin:       {}", cp.ca.pin_hex());
    match connected {
        Ok(Ok(s)) => {
            if let AgentStatus::Connected { name, node_id } = &*s {
                println!("  Local agent:  {name} ({node_id}) online");
            }
        }
        _ => println!("  Local agent:  not connected yet (see the log)"),
    }
    println!();
    let controller_flag = if controller.http_addr.to_string() == "127.0.0.1:8080" {
        String::new()
    } else {
        format!("--controller {url} ")
    };
    println!(
        "Try:  NEBULA_TOKEN_FILE={} {} {controller_flag}nodes",
        token_path.display(),
        cli_invocation()
    );
    println!("Press Ctrl-C to stop.");
    wait_for_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    controller.wait().await;
    Ok(())
}

fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{text}")?;
    Ok(())
}

/// How to run this CLI again from the same shell: `cargo run [--release] --` when started by
/// `cargo run` (cargo sets `CARGO_MANIFEST_DIR` for the program it runs), `nebula` when that is
/// this binary on PATH, else the binary's full path.
fn cli_invocation() -> String {
    let exe = std::env::current_exe().ok();
    if std::env::var_os("CARGO_MANIFEST_DIR").is_some() && std::env::var_os("CARGO").is_some() {
        let release = exe
            .as_deref()
            .and_then(|e| e.parent())
            .and_then(|d| d.file_name())
            .is_some_and(|d| d == "release");
        return if release {
            "cargo run --release --".into()
        } else {
            "cargo run --".into()
        };
    }
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let candidate = dir.join("nebula");
            match (
                candidate.canonicalize(),
                exe.as_ref().map(|e| e.canonicalize()),
            ) {
                (Ok(c), Some(Ok(e))) => c == e,
                _ => false,
            }
        })
    });
    match exe {
        Some(_) if on_path => "nebula".into(),
        Some(e) => shell_quote(&e.display().to_string()),
        None => "nebula".into(),
    }
}

/// Quote a path for a POSIX shell when it needs it.
fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn parse_https_mode(s: &str) -> Result<nebula_controller::https::HttpsMode, String> {
    use nebula_controller::https::HttpsMode;
    match s {
        "auto" => Ok(HttpsMode::Auto),
        "off" => Ok(HttpsMode::Off),
        "files" => Ok(HttpsMode::Files),
        "fleet-ca" => Ok(HttpsMode::FleetCa),
        "tailscale" => Ok(HttpsMode::Tailscale),
        "acme" => Ok(HttpsMode::Acme),
        _ => Err(format!(
            "`{s}`: one of auto, off, files, fleet-ca, tailscale, acme"
        )),
    }
}

fn parse_challenge(s: &str) -> Result<nebula_controller::https::acme::ChallengeKind, String> {
    use nebula_controller::https::acme::ChallengeKind;
    match s {
        "http-01" => Ok(ChallengeKind::Http01),
        "tls-alpn-01" => Ok(ChallengeKind::TlsAlpn01),
        _ => Err(format!("`{s}`: http-01 or tls-alpn-01")),
    }
}
