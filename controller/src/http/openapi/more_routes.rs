//! The operations added since the main list: a Discord bot in its own process (`nebula bot`,
//! with a `bot` API token: fleet commands go through the ordinary routes with the
//! `x-nebula-discord-*` headers; these are the bot's own bookkeeping) and the secret store.

use super::{of, route, Access, Route};
use crate::authz::Op;
use nebula_types::api::{discord, secrets};

use Access::{Bot, Token};

pub const MORE_ROUTES: &[Route] = &[
    route(
        "put",
        "/api/v1/discord/bot/attach",
        "discord bot",
        Bot,
        (200, "the bot's status as the dashboard shows it"),
        "Attach a bot process (again every few seconds; 409 while another one holds the connection)",
    )
    .accepts(of::<discord::BotAttach>)
    .returns(of::<discord::BotStatus>),
    route(
        "delete",
        "/api/v1/discord/bot/attach",
        "discord bot",
        Bot,
        (204, "detached (?instance=)"),
        "Detach a bot process",
    ),
    route(
        "post",
        "/api/v1/discord/bot/principal",
        "discord bot",
        Bot,
        (200, "the user's name and role here; 403 with how to link when none"),
        "Who a Discord user is to the control plane",
    )
    .accepts(of::<discord::DiscordUser>)
    .returns(of::<discord::BotPrincipal>),
    route(
        "post",
        "/api/v1/discord/bot/guilds/{id}",
        "discord bot",
        Bot,
        (204, "recorded"),
        "Record a server the bot is in (body: {\"name\"})",
    ),
    route(
        "get",
        "/api/v1/discord/bot/guilds/{id}/settings",
        "discord bot",
        Bot,
        (200, "the server's settings (the defaults for a new one)"),
        "A server's settings",
    )
    .returns(of::<discord::GuildSettings>),
    route(
        "put",
        "/api/v1/discord/bot/guilds/{id}/settings",
        "discord bot",
        Bot,
        (200, "the settings as stored"),
        "`/settings` by a server admin (role mappings stay a Nebula admin's)",
    )
    .accepts(of::<discord::ForUser<discord::GuildSettings>>)
    .returns(of::<discord::GuildView>),
    route(
        "post",
        "/api/v1/discord/bot/link",
        "discord bot",
        Bot,
        (200, "the linked account's name and role"),
        "`/link CODE`: link a Discord user with a one-time code",
    )
    .accepts(of::<discord::ForUser<String>>)
    .returns(of::<discord::BotPrincipal>),
    route(
        "post",
        "/api/v1/discord/bot/moderation",
        "discord bot",
        Bot,
        (204, "audited"),
        "Record a moderated message",
    )
    .accepts(of::<discord::ForUser<discord::Moderated>>),
    route(
        "get",
        "/api/v1/discord/bot/changes",
        "discord bot",
        Bot,
        (200, "servers whose settings changed after ?since= (long poll: ?wait= seconds, at most 30)"),
        "Changed server settings",
    )
    .returns(of::<discord::GuildChanges>),
    route(
        "get",
        "/api/v1/discord/bot/alert-messages/{fingerprint}/{channel}",
        "discord bot",
        Bot,
        (200, "the message the alert was posted as"),
        "An alert's message in a channel",
    )
    .returns(of::<discord::AlertMessage>),
    route(
        "put",
        "/api/v1/discord/bot/alert-messages/{fingerprint}/{channel}",
        "discord bot",
        Bot,
        (204, "remembered (a month)"),
        "Remember an alert's message",
    )
    .accepts(of::<discord::AlertMessage>),
    route(
        "get",
        "/api/v1/discord/bot/deliveries",
        "discord bot",
        Bot,
        (200, "alert notifications to post (long poll: ?instance=&wait=)"),
        "Alert notifications for the bot",
    )
    .returns(of::<Vec<discord::AlertDelivery>>),
    route(
        "post",
        "/api/v1/discord/bot/deliveries/{id}",
        "discord bot",
        Bot,
        (204, "the outbox has the outcome; 404 when it timed out (it is retried)"),
        "Report a delivery's outcome",
    )
    .accepts(of::<discord::DeliveryOutcome>),
    route(
        "get",
        "/api/v1/secrets",
        "secrets",
        Token(Op::ReadSecrets),
        (200, "every secret's name and versions, who and when (never a value)"),
        "Secrets",
    )
    .returns(of::<Vec<secrets::SecretView>>),
    route(
        "get",
        "/api/v1/secrets/{name}",
        "secrets",
        Token(Op::ReadSecrets),
        (200, "the secret's versions (never a value)"),
        "One secret",
    )
    .returns(of::<secrets::SecretView>),
    route(
        "put",
        "/api/v1/secrets/{name}",
        "secrets",
        Token(Op::ManageSecrets),
        (201, "stored, encrypted, as the next version"),
        "Store a secret's new version",
    )
    .accepts(of::<secrets::SetSecret>)
    .returns(of::<secrets::SecretSet>),
    route(
        "delete",
        "/api/v1/secrets/{name}",
        "secrets",
        Token(Op::ManageSecrets),
        (204, "removed with every version"),
        "Remove a secret",
    ),
    route(
        "post",
        "/api/v1/secrets/import",
        "secrets",
        Token(Op::ManageSecrets),
        (200, "what was stored, unchanged, or refused (by line)"),
        "Import a .env file",
    )
    .accepts(of::<secrets::ImportEnv>)
    .returns(of::<secrets::Imported>),
    route(
        "post",
        "/api/v1/secrets/rekey",
        "secrets",
        Token(Op::ManageSecrets),
        (200, "every version encrypted under a new key; keys no version uses removed"),
        "Rotate the secret key (run again to resume)",
    )
    .returns(of::<secrets::Rekeyed>),
    route(
        "get",
        "/api/v1/replicas",
        "tasks",
        Token(Op::ReadFleet),
        (200, "the controllers of this control plane, which one leads, and the lease's term"),
        "Replicas and the leader",
    )
    .returns(of::<nebula_types::api::tasks::ReplicasView>),
    route(
        "post",
        "/api/v1/backup",
        "backup",
        Token(Op::Backup),
        (200, "a gzip file of JSON lines: every table, and the key files sealed with the passphrase; streamed as it is read (a failed backup breaks the response)"),
        "Take a backup of the running controller",
    )
    .accepts(of::<secrets::TakeBackup>),
];
