//! Dashboard users and API tokens.

use super::prelude::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    pub username: String,
    pub password: String,
    /// admin, operator or viewer (default viewer).
    #[serde(default)]
    pub role: Option<String>,
}

pub(super) async fn create_user(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: Result<Json<CreateUserRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let Json(b) = body?;
    let role = b.role.unwrap_or_else(|| "viewer".into());
    let user = cp
        .create_user(&b.username, &b.password, &role, &who)
        .await?;
    Ok((StatusCode::CREATED, Json(json!(user))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApiTokenRequest {
    pub name: String,
    /// `ai` (the gateway only), `viewer`, `operator` or `admin`.
    pub role: String,
}

/// `POST /api/v1/api-tokens`: a new API token, shown once (the same name replaces the old one).
pub(super) async fn create_api_token(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: Result<Json<CreateApiTokenRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let Json(b) = body?;
    let token = cp.create_api_token(&b.name, &b.role, &who).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"name": b.name, "role": b.role, "token": token})),
    ))
}

pub(super) async fn list_users(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<serde_json::Value>> {
    cp.authorize(&who, Op::ManageUsers)?;
    Ok(Json(json!({ "items": cp.store.list_users().await? })))
}
