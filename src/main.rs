//! `nebula`: the Nebula Command CLI and server.
//!
//! `nebula serve` runs the controller; `nebula dev` runs a controller, a join token and a local
//! agent in one process tree; the other subcommands talk to a controller's HTTP API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod agents;
mod alerts;
mod backup;
mod client;
mod containers;
mod desired;
mod discord;
mod exec;
mod jobs;
mod models;
mod monitors;
mod replicas;
mod secrets;
mod serve;
mod sse;
mod storage;
mod workflows;

#[derive(Parser, Debug)]
#[command(
    name = "nebula",
    version,
    about = "Nebula Command: one control plane for a homelab plus cloud fleet"
)]
pub struct Cli {
    /// Controller HTTP API URL.
    #[arg(
        long,
        env = "NEBULA_CONTROLLER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    controller: String,
    /// API token (prefer NEBULA_TOKEN or --token-file).
    #[arg(long, env = "NEBULA_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// File holding the API token.
    #[arg(long, env = "NEBULA_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// A CA certificate (PEM) to trust besides the public roots: the fleet CA's `ca.crt` for
    /// a controller serving HTTPS with `fleet-ca`.
    #[arg(long, env = "NEBULA_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    /// Log format for serve/dev: text or json.
    #[arg(long, env = "NEBULA_LOG_FORMAT", default_value = "text", global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller.
    Serve(Box<serve::ServeArgs>),
    /// One-command demo: controller on SQLite, a join token and a local agent.
    Dev(serve::DevArgs),
    /// Join tokens: create, list, revoke.
    #[command(subcommand)]
    Token(client::TokenCommand),
    /// List nodes with their latest CPU, memory, GPU and container figures.
    Nodes(client::NodesArgs),
    /// A live, refreshing view of the fleet.
    Top(client::TopArgs),
    /// One node: show, remove.
    #[command(subcommand)]
    Node(client::NodeCommand),
    /// Alerts pending and firing now; with --history, the notifications sent and their
    /// delivery.
    Alerts {
        #[arg(long)]
        history: bool,
    },
    /// Silences: add, list, expire.
    #[command(subcommand)]
    Silence(alerts::SilenceCommand),
    /// Where notifications go: add, list, test, rm, history.
    #[command(subcommand)]
    Sink(alerts::SinkCommand),
    /// Monitors: each node's state, latency and uptime over 24 hours, 7 and 30 days.
    Monitors,
    /// One monitor: show, add, rm.
    #[command(subcommand)]
    Monitor(monitors::MonitorCommand),
    /// Workflows: list, run (and follow), runs, show, logs, cancel, approve, put, rm.
    #[command(subcommand)]
    Workflow(workflows::WorkflowCommand),
    /// AI agents: list, show, ask, put, rm.
    #[command(subcommand)]
    Agent(agents::AgentCommand),
    /// The Discord bot: its connection and servers, a server's settings, linked accounts.
    #[command(subcommand)]
    Discord(discord::DiscordCommand),
    /// Secrets, encrypted at rest: set (from stdin or a file), list, show, rm, import, rekey.
    #[command(subcommand)]
    Secret(secrets::SecretCommand),
    /// Backups: create (of the running controller), restore (into a new data dir), inspect.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// The controllers of this control plane (replicas on PostgreSQL) and which one leads.
    Replicas,
    /// Add a replica: a bundle of the fleet's keys (add), installed on the new host (join).
    #[command(subcommand)]
    Replica(replicas::ReplicaCommand),
    /// Move a stopped controller's database to another one (SQLite to PostgreSQL), rows and
    /// all; agents reconnect without joining again.
    Migrate(backup::MigrateArgs),
    /// Run the Discord bot in its own process against a controller (a `bot` API token:
    /// `nebula api-token create NAME --role bot`), instead of inside the controller.
    Bot(discord::BotArgs),
    /// Every container in the fleet, filtered and searched.
    Containers(containers::ContainersArgs),
    /// One container: show, logs, start, stop, restart, kill, rm, pull.
    #[command(subcommand)]
    Container(containers::ContainerCommand),
    /// A node's images: size, tags and the containers made from each.
    Images { node: String },
    /// A node's volumes: size and the containers that mount each.
    Volumes { node: String },
    /// Remove a node's unused images (and volumes, with --volumes), after showing what goes.
    Prune(storage::PruneArgs),
    /// Run an operation on a node (or the best node for a selector), streaming its output.
    Run(jobs::RunArgs),
    /// List jobs.
    Jobs(jobs::JobsArgs),
    /// Show one job: state, routing, result.
    Job { id: String },
    /// Print a job's log; -f follows it until the job ends.
    Logs(jobs::LogsArgs),
    /// Cancel a job (a running one is stopped on its node).
    Cancel { id: String },
    /// Who did what: jobs created and cancelled, tokens, node removals.
    Audit(jobs::AuditArgs),
    /// Show what applying a service map would change (field by field).
    Plan(desired::PlanArgs),
    /// Apply a service map and follow the rollout.
    Apply(desired::ApplyArgs),
    /// Services: desired against actual, health.
    Services,
    /// One service: containers and deployment history.
    Service { name: String },
    /// Go back to an earlier revision of a service (until the map changes it).
    Rollback(desired::RollbackArgs),
    /// Wake a sleeping node through a relay on its LAN.
    Wake {
        node: String,
        /// Wait this long for it to register (e.g. 2m).
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<std::time::Duration>,
    },
    /// Run a node's allow-listed suspend or power-off command.
    Sleep { node: String },
    /// Dashboard users: create, list.
    #[command(subcommand)]
    User(client::UserCommand),
    /// Inference backends and models across the fleet (loaded, on disk, breaker).
    Models,
    /// Pull, download or delete a model on a node, with progress.
    #[command(subcommand)]
    Model(models::ModelCommand),
    /// API tokens: `create NAME --role ai` makes one for the AI gateway only.
    #[command(subcommand)]
    ApiToken(ApiTokenCommand),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Subcommand, Debug)]
enum ApiTokenCommand {
    /// Create (or replace) an API token and print it once.
    Create {
        name: String,
        /// ai (the gateway only), bot (acts for the Discord user each request names), viewer,
        /// operator or admin.
        #[arg(long, default_value = "ai")]
        role: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS crypto provider for the whole process (quinn and the HTTP client both use ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    if matches!(
        cli.command,
        Command::Serve(_) | Command::Dev(_) | Command::Bot(_)
    ) {
        nebula_agent::process::init_logging(&cli.log_format);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(ref args) => serve::serve(args).await,
            Command::Dev(ref args) => serve::dev(args).await,
            Command::Token(ref cmd) => client::token(&cli, cmd).await,
            Command::Nodes(ref args) => client::nodes(&cli, args).await,
            Command::Top(ref args) => client::top(&cli, args).await,
            Command::Node(ref cmd) => client::node(&cli, cmd).await,
            Command::Alerts { history } => alerts::alerts(&cli, history).await,
            Command::Monitors => monitors::list(&cli).await,
            Command::Monitor(ref cmd) => monitors::command(&cli, cmd).await,
            Command::Workflow(ref cmd) => workflows::workflow(&cli, cmd).await,
            Command::Agent(ref cmd) => agents::agent(&cli, cmd).await,
            Command::Discord(ref cmd) => discord::discord(&cli, cmd).await,
            Command::Bot(ref args) => discord::bot(&cli, args).await,
            Command::Secret(ref cmd) => secrets::secret(&cli, cmd).await,
            Command::Backup(ref cmd) => backup::backup(&cli, cmd).await,
            Command::Migrate(ref args) => backup::migrate(args).await,
            Command::Replicas => replicas::replicas(&cli).await,
            Command::Replica(ref cmd) => replicas::replica(cmd),
            Command::Silence(ref cmd) => alerts::silence(&cli, cmd).await,
            Command::Sink(ref cmd) => alerts::sink(&cli, cmd).await,
            Command::Containers(ref args) => containers::containers(&cli, args).await,
            Command::Container(ref cmd) => containers::container(&cli, cmd).await,
            Command::Images { ref node } => storage::images(&cli, node).await,
            Command::Volumes { ref node } => storage::volumes(&cli, node).await,
            Command::Prune(ref args) => storage::prune(&cli, args).await,
            Command::Run(ref args) => jobs::run(&cli, args).await,
            Command::Jobs(ref args) => jobs::jobs(&cli, args).await,
            Command::Job { ref id } => jobs::job(&cli, id).await,
            Command::Logs(ref args) => jobs::logs(&cli, args).await,
            Command::Cancel { ref id } => jobs::cancel(&cli, id).await,
            Command::Audit(ref args) => jobs::audit(&cli, args).await,
            Command::Plan(ref args) => desired::plan(&cli, args).await,
            Command::User(ref cmd) => client::user(&cli, cmd).await,
            Command::Models => models::models(&cli).await,
            Command::Model(ref cmd) => models::model(&cli, cmd).await,
            Command::ApiToken(ApiTokenCommand::Create { ref name, ref role }) => {
                models::api_token(&cli, name, role).await
            }
            Command::Wake { ref node, wait } => client::wake(&cli, node, wait).await,
            Command::Sleep { ref node } => client::sleep(&cli, node).await,
            Command::Apply(ref args) => desired::apply(&cli, args).await,
            Command::Services => desired::services(&cli).await,
            Command::Service { ref name } => desired::service(&cli, name).await,
            Command::Rollback(ref args) => desired::rollback(&cli, args).await,
            Command::Completions { shell } => {
                clap_complete::generate(
                    shell,
                    &mut Cli::command(),
                    "nebula",
                    &mut std::io::stdout(),
                );
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A job that failed: its outcome is printed already; leave with its status.
        Err(e) if e.downcast_ref::<jobs::ExitStatus>().is_some() => {
            ExitCode::from(e.downcast_ref::<jobs::ExitStatus>().map_or(1, |s| s.0))
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
