//! The slash commands: their definitions (registered per server, only the groups it has on),
//! dispatch, and autocomplete for node, service and model names.

use std::sync::Arc;

use nebula_types::api::discord::GuildSettings;
use serenity::all::{
    CommandInteraction, CommandOptionType, CreateAutocompleteResponse, CreateCommand,
    CreateCommandOption, CreateInteractionResponse, GuildId, Permissions,
};

use super::{ai, community, fleet, reply, settings, Bot};

/// A command group, switched per server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Group {
    Fleet,
    Ai,
    Community,
    /// `/link` and `/settings`: always there.
    Always,
}

pub(crate) fn group_of(name: &str) -> Group {
    match name {
        "fleet" | "node" | "services" | "deploy" | "wake" | "sleep" | "run" | "jobs" | "alerts"
        | "silence" => Group::Fleet,
        "ask" | "imagine" => Group::Ai,
        "roles" => Group::Community,
        _ => Group::Always,
    }
}

pub(crate) fn group_on(s: &GuildSettings, g: Group) -> bool {
    match g {
        Group::Fleet => s.groups.fleet,
        Group::Ai => s.groups.ai,
        Group::Community => s.groups.community,
        Group::Always => true,
    }
}

fn text(name: &str, description: &str, required: bool) -> CreateCommandOption {
    CreateCommandOption::new(CommandOptionType::String, name, description).required(required)
}

fn node_option() -> CreateCommandOption {
    text("node", "A node of the fleet", true).set_autocomplete(true)
}

/// Every command, by group.
pub(crate) fn definitions() -> Vec<(Group, CreateCommand)> {
    vec![
        (
            Group::Fleet,
            CreateCommand::new("fleet").description("The fleet at a glance"),
        ),
        (
            Group::Fleet,
            CreateCommand::new("node")
                .description("A node: figures, containers, GPUs")
                .add_option(node_option()),
        ),
        (
            Group::Fleet,
            CreateCommand::new("services").description("Services: desired against actual"),
        ),
        (
            Group::Fleet,
            CreateCommand::new("deploy")
                .description("Plan and apply the service map in force, or roll a service back")
                .add_option(
                    text("rollback", "Roll this service back instead", false)
                        .set_autocomplete(true),
                ),
        ),
        (
            Group::Fleet,
            CreateCommand::new("wake")
                .description("Wake a node (Wake-on-LAN)")
                .add_option(node_option()),
        ),
        (
            Group::Fleet,
            CreateCommand::new("sleep")
                .description("Put a node to sleep (its allow-listed sleep command)")
                .add_option(node_option()),
        ),
        (
            Group::Fleet,
            CreateCommand::new("run")
                .description("Run an allow-listed operation on a node")
                .add_option(node_option())
                .add_option(text("operation", "The operation's name", true))
                .add_option(text("args", "Its arguments", false)),
        ),
        (
            Group::Fleet,
            CreateCommand::new("jobs").description("Recent jobs"),
        ),
        (
            Group::Fleet,
            CreateCommand::new("alerts").description("What fires now"),
        ),
        (
            Group::Fleet,
            CreateCommand::new("silence")
                .description("Silence alerts that match")
                .add_option(text(
                    "match",
                    "label=value ... (alertname is the rule)",
                    true,
                ))
                .add_option(text("for", "How long (2h)", true))
                .add_option(text("comment", "Why", false)),
        ),
        (
            Group::Ai,
            CreateCommand::new("ask")
                .description("Ask the fleet's models")
                .add_option(text("prompt", "Your question", true))
                .add_option(
                    text(
                        "model",
                        "A model or an agent (agent/NAME; default: this server's model)",
                        false,
                    )
                    .set_autocomplete(true),
                ),
        ),
        (
            Group::Ai,
            CreateCommand::new("imagine")
                .description("An image from the fleet's Stable Diffusion")
                .add_option(text("prompt", "What to draw", true)),
        ),
        (
            Group::Community,
            CreateCommand::new("roles").description("Give yourself roles"),
        ),
        (
            Group::Always,
            CreateCommand::new("link")
                .description("Link your Discord account to your Nebula user")
                .add_option(text("code", "The code from the dashboard or the CLI", true)),
        ),
        (
            Group::Always,
            CreateCommand::new("settings")
                .description("This server's bot settings")
                .default_member_permissions(Permissions::MANAGE_GUILD)
                .add_option(
                    text("key", "What to change (none: show them)", false)
                        .add_string_choice("command group on/off (fleet, ai, community)", "group")
                        .add_string_choice("nickname", "nickname")
                        .add_string_choice("persona prompt", "persona")
                        .add_string_choice("persona model", "model")
                        .add_string_choice("alert channel", "alerts")
                        .add_string_choice("welcome channel and template", "welcome")
                        .add_string_choice("goodbye channel and template", "goodbye")
                        .add_string_choice("moderation rule", "moderation")
                        .add_string_choice("moderators' log channel", "log")
                        .add_string_choice("channels the bot answers in", "channels")
                        .add_string_choice("AI cooldown and hourly limit", "ai_limits"),
                )
                .add_option(text("value", "The new value", false)),
        ),
    ]
}

/// Register `guild`'s commands: the groups it has on (a switched-off group disappears there).
pub(crate) async fn register(bot: &Bot, guild: GuildId) {
    let settings = match bot.backend.guild_settings(&guild.to_string()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%guild, "no settings for the server: {e}");
            return;
        }
    };
    let cmds: Vec<CreateCommand> = definitions()
        .into_iter()
        .filter(|(g, _)| group_on(&settings, *g))
        .map(|(_, c)| c)
        .collect();
    let n = cmds.len();
    match guild.set_commands(&bot.http, cmds).await {
        Ok(_) => tracing::info!(%guild, commands = n, "the server's commands are registered"),
        Err(e) => tracing::warn!(%guild, "could not register the server's commands: {e}"),
    }
    if !settings.nickname.is_empty() {
        if let Err(e) = guild
            .edit_nickname(&bot.http, Some(&settings.nickname))
            .await
        {
            tracing::warn!(%guild, "could not set the nickname: {e}");
        }
    }
}

/// A string option's value.
pub(crate) fn opt<'a>(cmd: &'a CommandInteraction, name: &str) -> Option<&'a str> {
    cmd.data
        .options
        .iter()
        .find(|o| o.name == name)
        .and_then(|o| o.value.as_str())
}

pub(crate) async fn dispatch(bot: &Arc<Bot>, cmd: CommandInteraction) {
    let name = cmd.data.name.clone();
    let group = group_of(&name);
    if let Some(guild) = cmd.guild_id {
        let s = match bot.backend.guild_settings(&guild.to_string()).await {
            Ok(s) => s,
            Err(e) => return reply(bot, &cmd, &super::refusal(&e), true).await,
        };
        if !group_on(&s, group) {
            return reply(
                bot,
                &cmd,
                "This command is switched off in this server.",
                true,
            )
            .await;
        }
        let channel = cmd.channel_id.to_string();
        if group != Group::Always && !s.channels.is_empty() && !s.channels.contains(&channel) {
            let list: Vec<String> = s.channels.iter().map(|c| format!("<#{c}>")).collect();
            let text = format!("I answer in {} here.", list.join(", "));
            return reply(bot, &cmd, &text, true).await;
        }
    }
    match name.as_str() {
        "link" => settings::link(bot, &cmd).await,
        "settings" => settings::settings(bot, &cmd).await,
        "roles" => community::roles(bot, &cmd).await,
        "ask" => ai::ask(bot, &cmd).await,
        "imagine" => ai::imagine(bot, &cmd).await,
        _ => fleet::command(bot, &cmd).await,
    }
}

/// Suggestions for the option being typed: node, service or model names.
pub(crate) async fn autocomplete(bot: &Arc<Bot>, cmd: CommandInteraction) {
    let Some(focused) = cmd.data.autocomplete() else {
        return;
    };
    let typed = focused.value.to_lowercase();
    // Names are fleet data: only for someone who may read the fleet.
    let p = super::principal(bot, &super::who_of_command(&cmd))
        .await
        .ok()
        .filter(|p| p.allows(nebula_controller::authz::Op::ReadFleet).is_ok());
    let names: Vec<String> = match (focused.name, p) {
        (_, None) => Vec::new(),
        ("node", Some(p)) => fleet::node_names(bot, &p).await,
        ("rollback", Some(p)) => fleet::service_names(bot, &p).await,
        ("model", Some(p)) => bot.backend.model_names(&p).await,
        _ => Vec::new(),
    };
    let mut resp = CreateAutocompleteResponse::new();
    for n in names
        .into_iter()
        .filter(|n| n.to_lowercase().contains(&typed))
        .take(25)
    {
        resp = resp.add_string_choice(n.clone(), n);
    }
    if let Err(e) = cmd
        .create_response(&bot.http, CreateInteractionResponse::Autocomplete(resp))
        .await
    {
        tracing::debug!("could not answer an autocomplete: {e}");
    }
}
