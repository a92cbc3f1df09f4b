//! Authentication of API requests: a bearer token to an `OpCtx` for the handlers.

use super::prelude::*;

pub(super) async fn authenticate(
    State(cp): State<Arc<ControlPlane>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(token) = bearer(req.headers()) else {
        return unauthorized("missing bearer token (Authorization: Bearer <token>)");
    };
    match cp.api_token(&crate::hash_secret(token)).await {
        Ok(Some(rec)) if rec.role == AI_ROLE => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token is scoped to the AI gateway (/v1/chat/completions and the like)",
        )
        .into_response(),
        Ok(Some(rec)) if rec.role == BOT_ROLE => match discord_user(req.headers()) {
            Err(why) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", why).into_response(),
            Ok(who) => match cp.discord_principal(&who).await {
                Ok(mut cx) => {
                    // The bot's own name stays in the audit row beside the Discord user.
                    if let Some(o) = cx.origin.as_mut() {
                        o.insert("bot".into(), rec.name.into());
                    }
                    req.extensions_mut().insert(cx);
                    next.run(req).await
                }
                Err(e) => ApiError::from(e).into_response(),
            },
        },
        Ok(Some(rec)) => {
            req.extensions_mut()
                .insert(OpCtx::new(rec.name, Role::parse(&rec.role), Via::Api));
            next.run(req).await
        }
        Ok(None) => unauthorized("invalid API token"),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The Discord user a bot token acts for, from `x-nebula-discord-user` (id), `-name`, `-guild`
/// (id) and `-roles` (comma-separated ids).
fn discord_user(h: &axum::http::HeaderMap) -> Result<crate::discord::DiscordUser, &'static str> {
    let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::trim);
    let snowflake = crate::discord::valid_snowflake;
    let id = get("x-nebula-discord-user")
        .filter(|s| snowflake(s))
        .ok_or("a bot token acts for a Discord user: x-nebula-discord-user is their id")?;
    let guild = get("x-nebula-discord-guild").filter(|s| !s.is_empty());
    if guild.is_some_and(|g| !snowflake(g)) {
        return Err("x-nebula-discord-guild is a server id");
    }
    let roles: Vec<String> = get("x-nebula-discord-roles")
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect();
    if roles.len() > 250 || !roles.iter().all(|r| snowflake(r)) {
        return Err("x-nebula-discord-roles lists role ids");
    }
    Ok(crate::discord::DiscordUser {
        id: id.to_owned(),
        name: get("x-nebula-discord-name")
            .unwrap_or(id)
            .chars()
            .take(64)
            .collect(),
        guild: guild.map(str::to_owned),
        roles,
        // Only Discord's own payloads say who manages a server; a header does not.
        guild_admin: false,
    })
}

fn unauthorized(message: &str) -> Response {
    let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}
