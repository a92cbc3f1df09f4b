//! The Discord bot: its status and servers, each server's settings, linked accounts, and the
//! one-time codes that link them.

use nebula_types::api::discord::{
    DiscordLink, DiscordOverview, GuildSettings, GuildView, LinkCode,
};

use super::prelude::*;

pub(super) async fn overview(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<DiscordOverview>> {
    Ok(Json(DiscordOverview {
        guilds: cp.discord_guilds(&who).await?,
        bot: cp.discord.status(),
    }))
}

pub(super) async fn put_guild(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(id): Path<String>,
    body: Result<Json<GuildSettings>, JsonRejection>,
) -> ApiResult<Json<GuildView>> {
    let Json(settings) = body?;
    Ok(Json(
        cp.set_guild_settings(&who, &id, settings, false).await?,
    ))
}

pub(super) async fn links(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<Vec<DiscordLink>>> {
    Ok(Json(cp.discord_links(&who).await?))
}

pub(super) async fn link_code(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<LinkCode>)> {
    Ok((
        StatusCode::CREATED,
        Json(cp.discord_link_code(&who, &name).await?),
    ))
}

// A bot in its own process (`nebula bot`): these endpoints take its `bot` token (no Discord
// user headers); the ones acting for a user carry the user in the body, as Discord gave it.

use nebula_types::api::discord::{
    AlertDelivery, AlertMessage, BotAttach, BotPrincipal, BotStatus, DeliveryOutcome, DiscordUser,
    ForUser, GuildChanges, Moderated,
};

use super::auth::BotToken;

/// The longest a long poll waits.
const MAX_WAIT: Duration = Duration::from_secs(30);

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    Ok(body?.0)
}

fn guild_id(id: &str) -> ApiResult<()> {
    if crate::discord::valid_snowflake(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "`{id}` is not a Discord server id"
        )))
    }
}

fn user(who: &DiscordUser) -> ApiResult<()> {
    crate::discord::check_user(who).map_err(ApiError::bad_request)
}

pub(super) async fn attach(
    State(cp): State<Arc<ControlPlane>>,
    body: Result<Json<BotAttach>, JsonRejection>,
) -> ApiResult<Json<BotStatus>> {
    let who = json_body(body)?;
    if who.instance.is_empty() || who.instance.len() > 64 || who.host.len() > 255 {
        return Err(ApiError::bad_request(
            "`instance` has 1 to 64 characters, `host` at most 255",
        ));
    }
    if who
        .account
        .as_ref()
        .is_some_and(|a| a.chars().count() > 100)
        || who
            .application_id
            .as_deref()
            .is_some_and(|a| !crate::discord::valid_snowflake(a))
    {
        return Err(ApiError::bad_request(
            "`account` has at most 100 characters; `application_id` is a Discord id",
        ));
    }
    Ok(Json(cp.attach_remote_bot(&who).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Instance {
    instance: String,
    /// Seconds to wait for something (at most 30).
    wait: Option<u64>,
}

pub(super) async fn detach(
    State(cp): State<Arc<ControlPlane>>,
    query: Result<Query<Instance>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<StatusCode> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    cp.detach_remote_bot(&q.instance);
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn principal(
    State(cp): State<Arc<ControlPlane>>,
    body: Result<Json<DiscordUser>, JsonRejection>,
) -> ApiResult<Json<BotPrincipal>> {
    let who = json_body(body)?;
    user(&who)?;
    let cx = cp.discord_principal(&who).await?;
    Ok(Json(BotPrincipal {
        actor: cx.actor,
        role: cx.role,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Seen {
    name: String,
}

pub(super) async fn guild_seen(
    State(cp): State<Arc<ControlPlane>>,
    Path(id): Path<String>,
    body: Result<Json<Seen>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let seen = json_body(body)?;
    guild_id(&id)?;
    let name: String = seen.name.chars().take(100).collect();
    cp.discord_guild_seen(&id, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn guild_settings(
    State(cp): State<Arc<ControlPlane>>,
    Path(id): Path<String>,
) -> ApiResult<Json<GuildSettings>> {
    guild_id(&id)?;
    Ok(Json(cp.guild_settings(&id).await?.as_ref().clone()))
}

/// `/settings` in Discord: a server admin changes their server's settings.
pub(super) async fn settings_by_admin(
    State(cp): State<Arc<ControlPlane>>,
    Extension(bot): Extension<BotToken>,
    Path(id): Path<String>,
    body: Result<Json<ForUser<GuildSettings>>, JsonRejection>,
) -> ApiResult<Json<GuildView>> {
    let ForUser { user: who, body } = json_body(body)?;
    guild_id(&id)?;
    user(&who)?;
    if who.guild.as_deref() != Some(id.as_str()) {
        return Err(ApiError::bad_request("`user.guild` is this server"));
    }
    let cx = crate::discord::by_bot(cp.discord_guild_admin(&who).await?, Some(&bot.0));
    Ok(Json(cp.set_guild_settings(&cx, &id, body, true).await?))
}

/// `/link CODE`.
pub(super) async fn redeem_link(
    State(cp): State<Arc<ControlPlane>>,
    Extension(bot): Extension<BotToken>,
    body: Result<Json<ForUser<String>>, JsonRejection>,
) -> ApiResult<Json<BotPrincipal>> {
    let ForUser {
        user: who,
        body: code,
    } = json_body(body)?;
    user(&who)?;
    if code.len() > 64 {
        return Err(ApiError::bad_request("a link code is short"));
    }
    cp.redeem_discord_link(&who, &code, Some(&bot.0)).await?;
    let cx = cp.discord_principal(&who).await?;
    Ok(Json(BotPrincipal {
        actor: cx.actor,
        role: cx.role,
    }))
}

pub(super) async fn moderated(
    State(cp): State<Arc<ControlPlane>>,
    Extension(bot): Extension<BotToken>,
    body: Result<Json<ForUser<Moderated>>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let ForUser { user: who, body: m } = json_body(body)?;
    user(&who)?;
    if m.hits.len() > 50 || m.action.len() > 32 || m.message.len() > 32 || m.channel.len() > 32 {
        return Err(ApiError::bad_request("a moderation record is small"));
    }
    cp.discord_moderated(&who, &m, Some(&bot.0));
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Since {
    epoch: Option<String>,
    since: Option<u64>,
    wait: Option<u64>,
}

pub(super) async fn changes(
    State(cp): State<Arc<ControlPlane>>,
    query: Result<Query<Since>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<GuildChanges>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let wait = Duration::from_secs(q.wait.unwrap_or(0)).min(MAX_WAIT);
    let since = match (&q.epoch, q.since) {
        (Some(e), Some(n)) => Some((e.as_str(), n)),
        (None, None) => None,
        _ => {
            return Err(ApiError::bad_request(
                "give both `epoch` and `since`, or neither",
            ))
        }
    };
    Ok(Json(cp.discord.changes_since(since, wait).await))
}

pub(super) async fn get_alert_message(
    State(cp): State<Arc<ControlPlane>>,
    Path((fingerprint, channel)): Path<(String, String)>,
) -> ApiResult<Json<AlertMessage>> {
    match cp.discord_alert_message(&fingerprint, &channel).await? {
        Some(message) => Ok(Json(AlertMessage { message })),
        None => Err(ApiError::not_found("that alert was not posted there")),
    }
}

pub(super) async fn put_alert_message(
    State(cp): State<Arc<ControlPlane>>,
    Path((fingerprint, channel)): Path<(String, String)>,
    body: Result<Json<AlertMessage>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let m = json_body(body)?;
    if !crate::discord::valid_snowflake(&channel) || !crate::discord::valid_snowflake(&m.message) {
        return Err(ApiError::bad_request("channel and message are Discord ids"));
    }
    if fingerprint.is_empty() || fingerprint.len() > 128 {
        return Err(ApiError::bad_request(
            "an alert fingerprint is 1 to 128 characters",
        ));
    }
    cp.remember_discord_alert_message(&fingerprint, &channel, &m.message)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn deliveries(
    State(cp): State<Arc<ControlPlane>>,
    query: Result<Query<Instance>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<AlertDelivery>>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let wait = Duration::from_secs(q.wait.unwrap_or(0)).min(MAX_WAIT);
    Ok(Json(cp.discord.remote.take(&q.instance, wait).await?))
}

pub(super) async fn delivered(
    State(cp): State<Arc<ControlPlane>>,
    Path(id): Path<String>,
    body: Result<Json<DeliveryOutcome>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let outcome = json_body(body)?;
    let result = match outcome.error {
        None => Ok(()),
        Some(e) => Err(e.chars().take(500).collect()),
    };
    if cp.discord.remote.report(&id, result) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(
            "nothing waits for that delivery (it timed out and is retried)",
        ))
    }
}
