//! Join tokens.

use super::nodes::{rfc3339, Page};
use super::prelude::*;

pub use nebula_types::api::access::{
    CreateTokenRequest, CreatedTokenView, TokenRevoked, TokenView,
};

fn token_view(t: JoinTokenRecord) -> TokenView {
    let now = crate::store::millis(SystemTime::now());
    let state = if t.revoked_at.is_some() {
        "revoked"
    } else if t.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else if t.uses_left.is_some_and(|u| u <= 0) {
        "used"
    } else {
        "active"
    };
    TokenView {
        id: t.id,
        description: t.description,
        labels: t.labels,
        created_by: t.created_by,
        created_at: rfc3339(t.created_at),
        expires_at: t.expires_at.map(rfc3339),
        uses_left: t.uses_left,
        uses: t.uses,
        state: state.into(),
    }
}

pub(super) async fn create_token(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: Result<Json<CreateTokenRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CreatedTokenView>)> {
    let Json(req) = body?;
    let ttl: Option<Duration> = match req.ttl.as_deref() {
        Some(s) => Some(
            humantime::parse_duration(s)
                .map_err(|e| ApiError::bad_request(format!("ttl `{s}`: {e}")))?,
        ),
        None => None,
    };
    if ttl.is_some_and(|t| t.is_zero() || t > Duration::from_secs(365 * 24 * 3600)) {
        return Err(ApiError::bad_request("ttl must be between 1s and 365d"));
    }
    let created = cp
        .create_join_token(ttl, req.uses, req.labels, &req.description, &who)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedTokenView {
            token: created.token,
            record: token_view(created.record),
        }),
    ))
}

pub(super) async fn list_tokens(
    State(cp): State<Arc<ControlPlane>>,
) -> ApiResult<Json<Page<TokenView>>> {
    let items = cp
        .store
        .list_join_tokens()
        .await?
        .into_iter()
        .map(token_view)
        .collect();
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

pub(super) async fn revoke_token(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(id): Path<String>,
) -> ApiResult<Json<TokenRevoked>> {
    cp.revoke_join_token(&id, &who).await?;
    Ok(Json(TokenRevoked { revoked: id }))
}
