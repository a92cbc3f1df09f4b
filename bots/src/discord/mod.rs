//! The Discord bot, on serenity: one gateway connection per token, slash commands registered
//! per server (only the groups that server has on), fleet operations behind the control
//! plane's own authorization, confirmation buttons for destructive actions, alerts with
//! Acknowledge and Silence buttons, and the community features (welcome and goodbye messages,
//! self-assigned roles, moderation with the output-filter rules).
//!
//! Identity: the control plane turns the Discord user of an interaction into a principal (a
//! linked account's role, a mapped Discord role, or what the server gives everyone); every
//! operation is then the same call the HTTP API makes. The bot reaches the control plane
//! through [`backend::Backend`]: in this process (a controller task) or over the HTTP API
//! (`nebula bot`, [`remote`]).

mod ai;
mod alerts;
mod backend;
mod commands;
mod community;
mod confirm;
mod fleet;
mod local;
pub mod remote;
mod settings;

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backend::{Backend, Connection, Principal};
use nebula_controller::discord::DiscordUser;
use nebula_controller::tasks::{Driver, Scope, TaskDef};
use nebula_controller::{ControlPlane, OpError};
use serenity::all::{
    ChannelId, CommandInteraction, ComponentInteraction, Context, CreateInteractionResponse,
    CreateInteractionResponseMessage, EditInteractionResponse, EventHandler, GatewayIntents, Guild,
    GuildId, Http, HttpBuilder, Interaction, Member, Message, Permissions, Ready, ResumedEvent,
    User,
};
use tokio_util::sync::CancellationToken;

/// How the bot connects.
#[derive(Debug, Clone)]
pub struct Config {
    /// The bot token (from `discord.token_file` or `NEBULA_DISCORD_TOKEN_FILE`).
    pub token: String,
    /// Discord's address (`https://discord.com`); a stand-in's in tests.
    pub api_url: Option<String>,
    /// How long a destructive action waits for its confirmation.
    pub confirm_ttl: Duration,
}

/// The bot's shared state.
pub(crate) struct Bot {
    backend: Arc<dyn Backend>,
    http: Arc<Http>,
    confirm: confirm::Pending,
    /// Interactions already handled: a gateway that delivers one twice (after a resume) does
    /// not run it twice.
    seen: Mutex<(HashSet<u64>, VecDeque<u64>)>,
    limits: ai::AiLimiter,
    /// The servers from the last READY (their commands are registered again when their
    /// settings change).
    guilds: Mutex<Vec<GuildId>>,
    /// Servers' names, as the gateway gave them (for `{server}` in greetings).
    names: Mutex<std::collections::HashMap<GuildId, String>>,
}

/// Start the bot; it runs until `shutdown`. Errors only when it cannot start (a bad token is
/// reported by the gateway and logged). Gives its task and its REST client.
async fn start(
    backend: Arc<dyn Backend>,
    cfg: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, Arc<Http>)> {
    let mut http = HttpBuilder::new(&cfg.token);
    if let Some(url) = &cfg.api_url {
        // serenity sends every REST call (and the gateway lookup) to this base instead; a
        // stand-in on this host is reached directly, never through a proxy from the environment.
        let url = url.trim_end_matches('/');
        http = http.proxy(url).ratelimiter_disabled(true);
        if url.starts_with("http://127.0.0.1") || url.starts_with("http://localhost") {
            http = http.client(reqwest::Client::builder().no_proxy().build()?);
        }
    }
    let intents = GatewayIntents::GUILDS
        | GatewayIntents::GUILD_MEMBERS
        | GatewayIntents::GUILD_MESSAGES
        | GatewayIntents::MESSAGE_CONTENT;
    let handler = Arc::new(Handler(std::sync::OnceLock::new()));
    let mut client = serenity::all::ClientBuilder::new_with_http(http.build(), intents)
        .event_handler_arc(handler.clone())
        .await?;
    let http = client.http.clone();
    let bot = Arc::new(Bot {
        backend: backend.clone(),
        http: http.clone(),
        confirm: confirm::Pending::new(cfg.confirm_ttl),
        seen: Mutex::default(),
        limits: ai::AiLimiter::default(),
        guilds: Mutex::default(),
        names: Mutex::default(),
    });
    let _ = handler.0.set(bot.clone());
    let shards = client.shard_manager.clone();
    let settings_task = tokio::spawn(settings_changes(bot.clone(), shutdown.clone()));
    let task = tokio::spawn(async move {
        tokio::select! {
            r = client.start() => {
                if let Err(e) = r {
                    tracing::error!("the Discord bot stopped: {e}");
                }
            }
            () = shutdown.cancelled() => shards.shutdown_all().await,
        }
        settings_task.abort();
        backend.connection(Connection::default()).await;
    });
    Ok((task, http))
}

/// The bot as a leader task of the controller's driver (one gateway connection per token,
/// on the replica that leads).
pub const TASK: TaskDef = TaskDef {
    name: "discord-bot",
    description:
        "The Discord bot's gateway connection: commands, alerts with buttons, community features",
    scope: Scope::Leader,
};

/// Register the bot with the controller's task driver. It runs while a token is known
/// (`[discord] token_file`, or one stored from the dashboard) and starts again with a new one.
pub fn register(driver: &mut Driver, cp: &Arc<ControlPlane>) {
    let alerts = Arc::new(alerts::AlertChannel::new(cp.clone()));
    cp.alerts
        .register_channel(nebula_controller::discord::SINK_KIND, alerts.clone());
    let cp = cp.clone();
    driver.service(TASK, move |tcx| run(cp.clone(), alerts.clone(), tcx.cancel))
}

async fn run(cp: Arc<ControlPlane>, alerts: Arc<alerts::AlertChannel>, cancel: CancellationToken) {
    let cfg = cp.config.discord.clone();
    loop {
        let changed = cp.discord.token_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if let Some(token) = cp.discord_token().await {
            let config = Config {
                token,
                api_url: cfg.api_url.clone(),
                confirm_ttl: cfg.confirm_timeout,
            };
            let stop = cancel.child_token();
            let backend: Arc<dyn Backend> = Arc::new(local::Local(cp.clone()));
            match start(backend, config, stop.clone()).await {
                Ok((mut h, http)) => {
                    alerts.connect(Some(http));
                    cp.discord.set_status(|s| s.configured = true);
                    let next = tokio::select! {
                        _ = &mut h => None,
                        () = &mut changed => {
                            tracing::info!("a new Discord token: the bot connects again");
                            stop.cancel();
                            let _ = h.await;
                            Some(true)
                        }
                        () = cancel.cancelled() => {
                            let _ = h.await;
                            Some(false)
                        }
                    };
                    alerts.connect(None);
                    match next {
                        Some(true) => continue,
                        Some(false) => return,
                        None => {}
                    }
                }
                Err(e) => tracing::error!("the Discord bot could not start: {e:#}"),
            }
        } else {
            cp.discord.set_status(|s| s.configured = false);
        }
        // No token, or the bot stopped (a token Discord refused): wait for a new one.
        tokio::select! {
            () = &mut changed => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// Register a server's commands again when its settings change (a toggle hides or shows a
/// group there at once).
async fn settings_changes(bot: Arc<Bot>, shutdown: CancellationToken) {
    let mut since = None;
    loop {
        let changes = tokio::select! {
            c = bot.backend.changes(since.clone(), Duration::from_secs(25)) => c,
            () = shutdown.cancelled() => return,
        };
        let changes = match changes {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("could not follow settings changes: {e}");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    () = shutdown.cancelled() => return,
                }
            }
        };
        let guilds: Vec<GuildId> = if changes.all {
            bot.guilds.lock().unwrap_or_else(|e| e.into_inner()).clone()
        } else {
            let mut ids: Vec<GuildId> = changes
                .guilds
                .iter()
                .filter_map(|g| g.parse::<u64>().ok().filter(|i| *i != 0))
                .map(GuildId::new)
                .collect();
            ids.dedup();
            ids
        };
        // The first answer only says where changes start.
        if since.is_some() {
            for g in guilds {
                commands::register(&bot, g).await;
            }
        }
        since = Some((changes.epoch, changes.seq));
    }
}

/// Set once the client exists (events arrive only after it starts).
struct Handler(std::sync::OnceLock<Arc<Bot>>);

impl Handler {
    fn bot(&self) -> Option<&Arc<Bot>> {
        self.0.get()
    }
}

#[serenity::async_trait]
impl EventHandler for Handler {
    async fn ready(&self, _ctx: Context, ready: Ready) {
        let Some(bot) = self.bot() else { return };
        bot.backend
            .connection(Connection {
                connected: true,
                account: Some(format!("{}#{}", ready.user.name, ready.user.id)),
                application_id: Some(ready.application.id.to_string()),
            })
            .await;
        tracing::info!(
            account = %ready.user.name,
            servers = ready.guilds.len(),
            "the Discord bot is connected"
        );
        let ids: Vec<GuildId> = ready.guilds.iter().map(|g| g.id).collect();
        *bot.guilds.lock().unwrap_or_else(|e| e.into_inner()) = ids.clone();
        for g in ids {
            if let Err(e) = bot.backend.guild_seen(&g.to_string(), "").await {
                tracing::warn!(guild = %g, "could not record the server: {e}");
            }
            commands::register(bot, g).await;
        }
    }

    /// A server as the gateway describes it: after READY for each server the bot is in, and
    /// when it is added to a new one (whose commands are registered then).
    async fn guild_create(&self, _ctx: Context, guild: Guild, _is_new: Option<bool>) {
        let Some(bot) = self.bot() else { return };
        if let Err(e) = bot
            .backend
            .guild_seen(&guild.id.to_string(), &guild.name)
            .await
        {
            tracing::warn!(guild = %guild.id, "could not record the server: {e}");
        }
        bot.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(guild.id, guild.name.clone());
        let new = {
            let mut known = bot.guilds.lock().unwrap_or_else(|e| e.into_inner());
            let new = !known.contains(&guild.id);
            if new {
                known.push(guild.id);
            }
            new
        };
        if new {
            tracing::info!(guild = %guild.id, name = %guild.name, "the bot joined a server");
            commands::register(bot, guild.id).await;
        }
    }

    async fn resume(&self, _ctx: Context, _event: ResumedEvent) {
        tracing::info!("the Discord gateway session resumed");
        if let Some(bot) = self.bot() {
            bot.backend
                .connection(Connection {
                    connected: true,
                    ..Connection::default()
                })
                .await;
        }
    }

    async fn interaction_create(&self, _ctx: Context, interaction: Interaction) {
        let Some(bot) = self.bot() else { return };
        if !bot.first_time(interaction.id().get()) {
            tracing::debug!(id = %interaction.id(), "an interaction delivered again; ignored");
            return;
        }
        match interaction {
            Interaction::Command(cmd) => commands::dispatch(bot, cmd).await,
            Interaction::Autocomplete(cmd) => commands::autocomplete(bot, cmd).await,
            Interaction::Component(c) => component(bot, c).await,
            _ => {}
        }
    }

    async fn guild_member_addition(&self, _ctx: Context, member: Member) {
        if let Some(bot) = self.bot() {
            community::greet(bot, member.guild_id, &member.user, true).await;
        }
    }

    async fn guild_member_removal(
        &self,
        _ctx: Context,
        guild: GuildId,
        user: User,
        _member: Option<Member>,
    ) {
        if let Some(bot) = self.bot() {
            community::greet(bot, guild, &user, false).await;
        }
    }

    async fn message(&self, _ctx: Context, msg: Message) {
        if let (false, Some(bot)) = (msg.author.bot, self.bot()) {
            community::moderate(bot, &msg).await;
        }
    }
}

/// A button or select menu: confirmations, alert buttons, self-assigned roles.
async fn component(bot: &Arc<Bot>, c: ComponentInteraction) {
    let id = c.data.custom_id.clone();
    let mut parts = id.splitn(3, ':');
    let (Some("nebula"), Some(kind), rest) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let rest = rest.unwrap_or("");
    match kind {
        "confirm" | "cancel" => confirm::clicked(bot, &c, rest, kind == "confirm").await,
        "ack" | "silence" => alerts::clicked(bot, &c, kind, rest).await,
        "role" => community::role_clicked(bot, &c, rest).await,
        _ => {}
    }
}

impl Bot {
    fn first_time(&self, id: u64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.0.insert(id) {
            return false;
        }
        seen.1.push_back(id);
        if seen.1.len() > 4096 {
            if let Some(old) = seen.1.pop_front() {
                seen.0.remove(&old);
            }
        }
        true
    }
}

/// The Discord user behind an interaction, as the control plane reads identities.
pub(crate) fn who(user: &User, member: Option<&Member>, guild: Option<GuildId>) -> DiscordUser {
    let perms = member.and_then(|m| m.permissions).unwrap_or_default();
    DiscordUser {
        id: user.id.to_string(),
        name: user.name.clone(),
        guild: guild.map(|g| g.to_string()),
        roles: member
            .map(|m| m.roles.iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
        guild_admin: perms.contains(Permissions::ADMINISTRATOR)
            || perms.contains(Permissions::MANAGE_GUILD),
    }
}

pub(crate) fn who_of_command(cmd: &CommandInteraction) -> DiscordUser {
    who(&cmd.user, cmd.member.as_deref(), cmd.guild_id)
}

pub(crate) fn who_of_component(c: &ComponentInteraction) -> DiscordUser {
    who(&c.user, c.member.as_ref(), c.guild_id)
}

/// The principal for a command, or its refusal as the answer.
pub(crate) async fn principal(bot: &Bot, who: &DiscordUser) -> Result<Principal, String> {
    bot.backend.principal(who).await.map_err(|e| refusal(&e))
}

/// An operation's error as a person reads it in Discord.
pub(crate) fn refusal(e: &OpError) -> String {
    match e {
        OpError::Forbidden(m) => format!("⛔ Refused: {m}."),
        OpError::NotFound(m) | OpError::Invalid(m) | OpError::Conflict(m) => format!("⚠️ {m}"),
        OpError::TooManyRequests(m) => format!("⏳ {m}"),
        OpError::Store(_) => "⚠️ The controller could not do it (see its log).".into(),
    }
}

/// Answer an interaction at once with text, visible to its user only or to the channel.
pub(crate) async fn reply(bot: &Bot, cmd: &CommandInteraction, text: &str, ephemeral: bool) {
    let msg = CreateInteractionResponseMessage::new()
        .content(clip(text))
        .ephemeral(ephemeral);
    if let Err(e) = cmd
        .create_response(&bot.http, CreateInteractionResponse::Message(msg))
        .await
    {
        tracing::warn!(command = %cmd.data.name, "could not answer: {e}");
    }
}

/// Replace a deferred answer's text.
pub(crate) async fn edit(bot: &Bot, cmd: &CommandInteraction, text: &str) {
    if let Err(e) = cmd
        .edit_response(
            &bot.http,
            EditInteractionResponse::new().content(clip(text)),
        )
        .await
    {
        tracing::warn!(command = %cmd.data.name, "could not edit the answer: {e}");
    }
}

/// Discord's message limit is 2,000 characters.
pub(crate) fn clip(text: &str) -> String {
    const MAX: usize = 1990;
    if text.chars().count() <= MAX {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(MAX - 2).collect();
    out.push_str(" …");
    out
}

/// Post to a channel given by id (settings hold ids as text).
pub(crate) async fn post(bot: &Bot, channel: &str, text: &str) -> Option<Message> {
    let id = channel.parse::<u64>().ok().filter(|i| *i != 0)?;
    match ChannelId::new(id)
        .send_message(
            &bot.http,
            serenity::all::CreateMessage::new().content(clip(text)),
        )
        .await
    {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(channel, "could not post: {e}");
            None
        }
    }
}
