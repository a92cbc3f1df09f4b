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
