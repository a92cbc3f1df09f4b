//! `nebula-agent`: join a Nebula fleet and keep serving it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use nebula_agent::process::{init_logging, wait_for_signal};
use nebula_agent::{Agent, AgentConfig};
use nebula_protocol::JoinToken;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "nebula-agent",
    version,
    about = "Nebula Command agent: joins the fleet over QUIC/mTLS"
)]
struct Cli {
    /// TOML config file (flags and NEBULA_* variables override it).
    #[arg(long, env = "NEBULA_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "NEBULA_LOG_FORMAT", default_value = "text", global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enroll with a join token, save the identity, then keep running.
    Join(JoinArgs),
    /// Run from the identity saved in the state dir.
    Run(CommonArgs),
    /// Run under the Windows service manager (what install.ps1 registers).
    Service(CommonArgs),
}

#[derive(Args, Debug)]
struct CommonArgs {
    /// Where the key, certificates and state live.
    #[arg(long, env = "NEBULA_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Controller QUIC address, HOST:PORT.
    #[arg(long, env = "NEBULA_CONTROLLER_ADDR")]
    controller: Option<String>,
}

#[derive(Args, Debug)]
struct JoinArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Join token from `nebula token create` (or use --token-file / NEBULA_JOIN_TOKEN_FILE).
    #[arg(long, env = "NEBULA_JOIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[arg(long, env = "NEBULA_JOIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Node name (default: hostname).
    #[arg(long, env = "NEBULA_NODE_NAME")]
    name: Option<String>,
    /// Labels to ask for, key=value (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Enroll and exit instead of running.
    #[arg(long)]
    no_run: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("label `{s}` must read key=value"))
}

/// Exit status asking the service manager to start the agent again (Windows, after an update).
const EXIT_RESTART: u8 = 75;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    if let Command::Service(common) = &cli.command {
        return service(cli.config.as_ref(), common);
    }
    // One thread: the agent's work is small and mostly waiting; a single thread keeps its memory
    // (stacks, allocator arenas) and wake-ups down.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(real_main(cli)) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(exe)) => {
            drop(runtime);
            restart(&exe)
        }
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<&PathBuf>, common: &CommonArgs) -> anyhow::Result<AgentConfig> {
    let mut cfg = match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => AgentConfig::default(),
    };
    if let Some(d) = &common.state_dir {
        cfg.state_dir = d.clone();
    }
    if let Some(c) = &common.controller {
        cfg.controller = Some(c.clone());
    }
    Ok(cfg)
}

/// Start the (new, or restored) binary in this process's place, with the same arguments.
#[cfg(unix)]
fn restart(exe: &std::path::Path) -> ExitCode {
    use std::os::unix::process::CommandExt;
    tracing::info!(exe = %exe.display(), "restarting");
    // `exec` keeps the process id, so systemd (or a pid file) still tracks the agent.
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .exec();
    eprintln!("error: restarting into {}: {err}", exe.display());
    ExitCode::FAILURE
}

/// Windows: the service manager starts the new binary (install.ps1 sets restart on failure).
#[cfg(not(unix))]
fn restart(exe: &std::path::Path) -> ExitCode {
    tracing::info!(exe = %exe.display(), "exiting for the service manager to restart the agent");
    ExitCode::from(EXIT_RESTART)
}

#[cfg(windows)]
fn service(config: Option<&PathBuf>, common: &CommonArgs) -> ExitCode {
    let cfg = match load_config(config, common) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = nebula_agent::winservice::run(Box::new(move |stop| {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("starting the runtime: {e}");
                return 1;
            }
        };
        let agent = Agent::new(cfg);
        match runtime.block_on(agent.run(stop)) {
            Ok(()) if agent.restart_into().is_some() => u32::from(EXIT_RESTART),
            Ok(()) => 0,
            Err(e) => {
                tracing::error!("{e:#}");
                1
            }
        }
    }));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("running as a Windows service: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(windows))]
fn service(_config: Option<&PathBuf>, _common: &CommonArgs) -> ExitCode {
    let _ = EXIT_RESTART;
    eprintln!("error: `service` runs the agent under the Windows service manager; elsewhere use `nebula-agent run` (install.sh writes a systemd unit)");
    ExitCode::from(2)
}

async fn real_main(cli: Cli) -> anyhow::Result<Option<PathBuf>> {
    let shutdown = CancellationToken::new();
    // The signal watcher is awaited beside the work (no detached task): whichever ends first
    // decides, and a signal cancels the work, which then finishes its goodbyes.
    let work = run_command(cli, shutdown.clone());
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => r,
        _ = wait_for_signal() => {
            tracing::info!("stopping");
            shutdown.cancel();
            work.await
        }
    }
}

/// Run the command; `Some(exe)` asks for a restart into that executable.
async fn run_command(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<Option<PathBuf>> {
    match cli.command {
        Command::Join(args) => {
            let mut cfg = load_config(cli.config.as_ref(), &args.common)?;
            if let Some(n) = args.name {
                cfg.name = Some(n);
            }
            cfg.labels.extend(args.labels);
            let token_text = match (args.token, args.token_file.or(cfg.token_file.clone())) {
                (Some(t), _) => t,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("reading token file {}", f.display()))?,
                (None, None) => anyhow::bail!("a join token is needed: --token or --token-file"),
            };
            let token: JoinToken = token_text
                .trim()
                .parse()
                .context("reading the join token")?;
            let agent = Agent::new(cfg);
            let identity = tokio::select! {
                r = agent.join(&token) => r?,
                _ = shutdown.cancelled() => return Ok(None),
            };
            println!(
                "joined as {} ({})",
                identity.state.name, identity.state.node_id
            );
            if args.no_run {
                return Ok(None);
            }
            agent.run(shutdown).await?;
            Ok(agent.restart_into())
        }
        Command::Run(common) | Command::Service(common) => {
            let cfg = load_config(cli.config.as_ref(), &common)?;
            let agent = Agent::new(cfg);
            agent.run(shutdown).await?;
            Ok(agent.restart_into())
        }
    }
}
