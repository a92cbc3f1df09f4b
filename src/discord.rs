//! `nebula discord`: the bot's connection and servers, a server's settings, linked accounts.
//! (`nebula user link-discord` makes a link code.)

use clap::Subcommand;
use nebula_types::api::discord::{DiscordLink, DiscordOverview, GuildSettings, GuildView};

use crate::client::{print_json, table, Api};
use crate::Cli;

#[derive(Subcommand, Debug)]
pub enum DiscordCommand {
    /// The bot's connection and the servers it is in.
    Status,
    /// One server's settings, as JSON (what `set` takes).
    Show { guild: String },
    /// Replace a server's settings from a JSON file (`-`: standard input). Role mappings and
    /// the everyone role are set here, by an admin.
    Set { guild: String, file: String },
    /// Discord accounts linked to users.
    Links,
}

/// `nebula bot`: the Discord bot in its own process against a controller (`--controller`,
/// with a `bot` API token from `--token-file`).
#[derive(clap::Args, Debug)]
pub struct BotArgs {
    /// File holding the Discord bot's token.
    #[arg(long, env = "NEBULA_DISCORD_TOKEN_FILE")]
    discord_token_file: std::path::PathBuf,
    /// Discord's address (default https://discord.com).
    #[arg(long, env = "NEBULA_DISCORD_API_URL", hide = true)]
    discord_api_url: Option<String>,
    /// How long a destructive command waits for its user's confirmation.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    confirm_timeout: std::time::Duration,
}

pub async fn bot(cli: &Cli, args: &BotArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let api = Api::new(cli)?;
    let token = std::fs::read_to_string(&args.discord_token_file)
        .with_context(|| format!("reading {}", args.discord_token_file.display()))?
        .trim()
        .to_owned();
    anyhow::ensure!(
        !token.is_empty(),
        "{} holds no token",
        args.discord_token_file.display()
    );
    let cfg = nebula_bots::discord::remote::RemoteConfig {
        controller: api.base.clone(),
        api_token: api.token.clone(),
        discord: nebula_bots::discord::Config {
            token,
            api_url: args.discord_api_url.clone(),
            confirm_ttl: args.confirm_timeout,
        },
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        nebula_agent::process::wait_for_signal().await;
        stop.cancel();
    });
    nebula_bots::discord::remote::run(cfg, shutdown).await
}

pub async fn discord(cli: &Cli, cmd: &DiscordCommand) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    match cmd {
        DiscordCommand::Status => {
            let v: DiscordOverview = api.get("/api/v1/discord").await?;
            if cli.json {
                print_json(&v);
                return Ok(());
            }
            let state = match (v.bot.configured, v.bot.connected, &v.bot.remote) {
                (_, true, Some(host)) => format!(
                    "connected as {}, as `nebula bot` on {host}",
                    v.bot.account.clone().unwrap_or_default()
                ),
                (_, false, Some(host)) => {
                    format!("`nebula bot` on {host}, not connected to Discord")
                }
                (false, _, _) => {
                    "not configured (set [discord] token_file, or run `nebula bot`)".to_owned()
                }
                (true, false, _) => "configured, not connected".to_owned(),
                (true, true, _) => {
                    format!("connected as {}", v.bot.account.clone().unwrap_or_default())
                }
            };
            println!("Bot: {state}");
            let rows = v
                .guilds
                .iter()
                .map(|g| {
                    let s = &g.settings;
                    let groups: Vec<&str> = [
                        (s.groups.fleet, "fleet"),
                        (s.groups.ai, "ai"),
                        (s.groups.community, "community"),
                    ]
                    .into_iter()
                    .filter_map(|(on, n)| on.then_some(n))
                    .collect();
                    vec![
                        g.id.clone(),
                        if g.name.is_empty() {
                            "-".into()
                        } else {
                            g.name.clone()
                        },
                        groups.join(","),
                        s.roles.len().to_string(),
                        if s.alerts.channel.is_empty() {
                            "-".into()
                        } else {
                            s.alerts.channel.clone()
                        },
                        g.updated_by.clone(),
                    ]
                })
                .collect();
            table(
                &[
                    "SERVER",
                    "NAME",
                    "GROUPS",
                    "ROLE MAPS",
                    "ALERTS",
                    "CHANGED BY",
                ],
                rows,
            );
        }
        DiscordCommand::Show { guild } => {
            let v: DiscordOverview = api.get("/api/v1/discord").await?;
            let g = v
                .guilds
                .into_iter()
                .find(|g| &g.id == guild)
                .ok_or_else(|| anyhow::anyhow!("the bot is not in server {guild}"))?;
            print_json(&g.settings);
        }
        DiscordCommand::Set { guild, file } => {
            let text = if file == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(file)?
            };
            let settings: GuildSettings = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{file}: not server settings: {e}"))?;
            let v: GuildView = api
                .send_json(
                    reqwest::Method::PUT,
                    &format!("/api/v1/discord/guilds/{guild}"),
                    &settings,
                )
                .await?;
            if cli.json {
                print_json(&v);
            } else {
                println!(
                    "Server {} settings stored; its commands are registered again.",
                    v.id
                );
            }
        }
        DiscordCommand::Links => {
            let v: Vec<DiscordLink> = api.get("/api/v1/discord/links").await?;
            if cli.json {
                print_json(&v);
                return Ok(());
            }
            let rows = v
                .into_iter()
                .map(|l| vec![l.user, l.discord_name, l.discord_user, l.linked_at])
                .collect();
            table(&["USER", "DISCORD", "DISCORD ID", "LINKED"], rows);
        }
    }
    Ok(())
}
