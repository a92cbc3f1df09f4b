//! Dashboard users and API tokens.

use super::prelude::*;
pub use nebula_types::api::access::{
    CreateApiTokenRequest, CreateUserRequest, CreatedApiToken, UserList, UserView,
};

fn user_view(u: crate::store::users::UserRecord) -> UserView {
    UserView {
        id: u.id,
        username: u.username,
        role: u.role,
        created_at: u.created_at,
    }
}

pub(super) async fn create_user(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: Result<Json<CreateUserRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<UserView>)> {
    let Json(b) = body?;
    let role = b.role.unwrap_or_else(|| "viewer".into());
    let user = cp
        .create_user(&b.username, &b.password, &role, &who)
        .await?;
    Ok((StatusCode::CREATED, Json(user_view(user))))
}

/// `POST /api/v1/api-tokens`: a new API token, shown once (the same name replaces the old one).
pub(super) async fn create_api_token(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: Result<Json<CreateApiTokenRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CreatedApiToken>)> {
    let Json(b) = body?;
    let token = cp.create_api_token(&b.name, &b.role, &who).await?;
    let created = CreatedApiToken {
        name: b.name,
        role: b.role,
        token,
    };
    Ok((StatusCode::CREATED, Json(created)))
}

pub(super) async fn list_users(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<UserList>> {
    cp.authorize(&who, Op::ManageUsers)?;
    let items = cp.store.list_users().await?;
    Ok(Json(UserList {
        items: items.into_iter().map(user_view).collect(),
    }))
}
