//! The Discord bot: per-server settings, links between Discord users and Nebula users, and what
//! the dashboard shows about it.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::alerts::SinkFilters;
use crate::auth::Role;

/// A server's settings (`PUT /api/v1/discord/guilds/{id}`, `/settings` in Discord). Every field
/// has a default, so a partial document is a valid one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GuildSettings {
    /// The bot's nickname in this server (empty: its account name).
    pub nickname: String,
    /// Command groups: which ones this server offers (the others are not registered there).
    pub groups: Groups,
    /// Channels the bot answers commands in (ids; empty: every channel).
    pub channels: Vec<String>,
    /// Discord role id -> Nebula role, for members who have not linked an account. Only a
    /// Nebula admin may change this (a server admin could otherwise grant themselves the fleet).
    pub roles: BTreeMap<String, Role>,
    /// The role of every member who has neither a link nor a mapped role (none: they may only
    /// use what needs no role, such as `/link` and community features).
    pub everyone: Option<Role>,
    pub persona: Persona,
    pub alerts: AlertSettings,
    pub welcome: Greeting,
    pub goodbye: Greeting,
    /// Self-assigned roles offered by `/roles` (as buttons).
    pub self_roles: Vec<SelfRole>,
    pub moderation: Moderation,
    pub ai_limits: AiLimits,
}

/// Which command groups a server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Groups {
    /// `/fleet`, `/node`, `/services`, `/deploy`, `/wake`, `/sleep`, `/run`, `/jobs`,
    /// `/alerts`, `/silence`.
    pub fleet: bool,
    /// `/ask`, `/imagine`.
    pub ai: bool,
    /// `/roles`, welcome and goodbye messages, moderation.
    pub community: bool,
}

impl Default for Groups {
    fn default() -> Self {
        Self {
            fleet: true,
            ai: true,
            community: true,
        }
    }
}

/// How `/ask` answers in this server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Persona {
    /// The system prompt (empty: a short default).
    pub system: String,
    /// The model (empty: the gateway's routing picks one).
    pub model: String,
    /// The Stable Diffusion model for `/imagine` (empty: the node's default).
    pub image_model: String,
}

/// Where alerts go in this server and which ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AlertSettings {
    /// The channel id (empty: no alerts here).
    pub channel: String,
    /// `info` (default), `warning` or `critical`.
    pub min_severity: String,
    pub filters: SinkFilters,
}

/// A welcome or goodbye message. `{user}` (a mention), `{name}` and `{server}` are replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Greeting {
    /// The channel id (empty: off).
    pub channel: String,
    pub template: String,
}

/// A role members may give themselves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SelfRole {
    pub role: String,
    pub label: String,
}

/// Moderation of members' messages with the AI gateway's output-filter rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Moderation {
    /// Rule kind (`pii`, `api_key`, `profanity`, `injection`) -> what to do.
    pub rules: BTreeMap<String, ModAction>,
    /// Where `log` (and every deletion) is reported (empty: nowhere).
    pub log_channel: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModAction {
    /// Reply to the author with a warning.
    Warn,
    /// Delete the message (and log it).
    Delete,
    /// Only report it to the moderators' channel.
    Log,
}

/// Rate limits on `/ask` and `/imagine` in this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AiLimits {
    /// Seconds a member waits between two AI commands.
    pub cooldown_s: u32,
    /// AI commands the whole server may run per hour.
    pub per_hour: u32,
}

impl Default for AiLimits {
    fn default() -> Self {
        Self {
            cooldown_s: 10,
            per_hour: 60,
        }
    }
}

/// A server the bot is in (`GET /api/v1/discord/guilds`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GuildView {
    pub id: String,
    pub name: String,
    pub settings: GuildSettings,
    pub updated_by: String,
    pub updated_at: String,
}

/// A one-time code a Nebula user gives the bot (`/link CODE`) to link their Discord account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LinkCode {
    pub user: String,
    pub code: String,
    pub expires_at: String,
}

/// A linked Discord account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiscordLink {
    pub discord_user: String,
    pub discord_name: String,
    pub user: String,
    pub linked_at: String,
}

/// What the dashboard's Discord page shows about the bot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BotStatus {
    /// A token is configured and the bot runs in this controller.
    pub configured: bool,
    /// The gateway session is up.
    pub connected: bool,
    /// The bot's account (`name#id`), once connected.
    pub account: Option<String>,
    /// Its Discord application, once connected (for the invite link).
    pub application_id: Option<String>,
    /// The bot runs in its own process (`nebula bot`) on this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

impl BotStatus {
    /// The link that adds the bot to a server, with the permissions its features use (view
    /// channels, read history, send messages, attach files, manage messages and roles, change
    /// its nickname) and slash commands.
    pub fn invite_url(&self) -> Option<String> {
        self.application_id.as_ref().map(|id| {
            format!(
                "https://discord.com/oauth2/authorize?client_id={id}&scope=bot%20applications.commands&permissions=335653888"
            )
        })
    }
}

/// A Discord user as the bot saw them in one interaction or message. A bot in its own process
/// (`nebula bot`) sends it with its `bot` API token, which the controller trusts to say what
/// Discord said.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscordUser {
    pub id: String,
    pub name: String,
    /// The server (none in a direct message).
    #[serde(default)]
    pub guild: Option<String>,
    /// Their Discord role ids in that server.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Discord says they may manage the server (`MANAGE_GUILD` or `ADMINISTRATOR`).
    #[serde(default)]
    pub guild_admin: bool,
}

/// `PUT /api/v1/discord/bot/attach`: a bot in its own process says it holds the gateway
/// connection (again every few seconds while it runs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BotAttach {
    /// Random per process: a second process with the same token is refused.
    pub instance: String,
    /// Where it runs (host name), for the dashboard.
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub connected: bool,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub application_id: Option<String>,
}

/// Who a Discord user is to the control plane (`POST /api/v1/discord/bot/principal`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BotPrincipal {
    pub actor: String,
    pub role: Role,
}

/// A request a bot makes for one Discord user: link redemption, settings by a server admin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForUser<T> {
    pub user: DiscordUser,
    pub body: T,
}

/// A message the bot moderated, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Moderated {
    pub message: String,
    pub channel: String,
    /// What was done: `deleted`, `warned`, `logged`, `could not delete`.
    pub action: String,
    /// The output-filter rules it matched (`kind: excerpt`).
    pub hits: Vec<String>,
}

/// Servers whose settings changed since a sequence number (`GET /api/v1/discord/bot/changes`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GuildChanges {
    /// This controller process's run (a restart starts a new one): ask again with it.
    pub epoch: String,
    /// Ask again with `since` this.
    pub seq: u64,
    pub guilds: Vec<String>,
    /// Changes were missed (the controller restarted, or too many): look at every server.
    pub all: bool,
}

/// An alert notification for a bot in its own process to post (`GET
/// /api/v1/discord/bot/deliveries`); it reports the outcome by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AlertDelivery {
    pub id: String,
    pub sink: String,
    /// `discord:GUILD/CHANNEL`.
    pub url: String,
    /// The notification document (JSON), as webhooks receive it.
    pub body: String,
}

/// How a delivery went (`POST /api/v1/discord/bot/deliveries/{id}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeliveryOutcome {
    /// `None`: posted.
    #[serde(default)]
    pub error: Option<String>,
}

/// The message an alert was posted as in a channel (its resolution edits it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertMessage {
    pub message: String,
}

/// `GET /api/v1/discord`: the bot and the servers it is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiscordOverview {
    pub bot: BotStatus,
    pub guilds: Vec<GuildView>,
}
