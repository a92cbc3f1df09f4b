//! Authentication of API requests: a bearer token to an `OpCtx` for the handlers.

use super::prelude::*;

pub(super) async fn authenticate(
    State(cp): State<Arc<ControlPlane>>,
    mut req: Request,
    next: Next,
) -> Response {
    match token_record(&cp, req.headers()).await {
        Ok(Some(rec)) if rec.role == AI_ROLE => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token is scoped to the AI gateway (/v1/chat/completions and the like)",
        )
        .into_response(),
        Ok(Some(rec)) if rec.role == BOT_ROLE => {
            match crate::discord::user_from_headers(req.headers()) {
                Err(why) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", why).into_response(),
                Ok(who) => match cp.discord_principal(&who).await {
                    Ok(cx) => {
                        // The bot's own name stays in the audit row beside the Discord user.
                        let cx = crate::discord::by_bot(cx, Some(&rec.name));
                        req.extensions_mut().insert(cx);
                        next.run(req).await
                    }
                    Err(e) => ApiError::from(e).into_response(),
                },
            }
        }
        Ok(Some(rec)) => {
            req.extensions_mut()
                .insert(OpCtx::new(rec.name, Role::parse(&rec.role), Via::Api));
            next.run(req).await
        }
        Ok(None) => unauthorized("invalid API token"),
        Err(r) => r,
    }
}

/// The stored API token a request's bearer token names (`None`: unknown), or the answer.
async fn token_record(
    cp: &ControlPlane,
    headers: &axum::http::HeaderMap,
) -> Result<Option<crate::store::ApiTokenRecord>, Response> {
    let Some(token) = bearer(headers) else {
        return Err(unauthorized(
            "missing bearer token (Authorization: Bearer <token>)",
        ));
    };
    cp.api_token(&crate::hash_secret(token))
        .await
        .map_err(|e| ApiError::from(e).into_response())
}

/// The name of the `bot` API token a bot in its own process calls with.
#[derive(Debug, Clone)]
pub(super) struct BotToken(pub String);

/// Authentication of the bot's own endpoints (`/api/v1/discord/bot/...`): `bot` tokens only.
pub(super) async fn authenticate_bot(
    State(cp): State<Arc<ControlPlane>>,
    mut req: Request,
    next: Next,
) -> Response {
    match token_record(&cp, req.headers()).await {
        Ok(Some(rec)) if rec.role == BOT_ROLE => {
            req.extensions_mut().insert(BotToken(rec.name));
            next.run(req).await
        }
        Ok(Some(_)) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "these endpoints are for a Discord bot's token (role bot)",
        )
        .into_response(),
        Ok(None) => unauthorized("invalid API token"),
        Err(r) => r,
    }
}

fn unauthorized(message: &str) -> Response {
    let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}
