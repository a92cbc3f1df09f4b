//! The secret store: names, versions, who and when; values go in and never come out.

use nebula_types::api::secrets::{ImportEnv, Imported, Rekeyed, SecretSet, SecretView, SetSecret};

use super::prelude::*;
use crate::secrets::SecretValue;

pub(super) async fn list(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<Vec<SecretView>>> {
    Ok(Json(cp.list_secrets(&who).await?))
}

pub(super) async fn get_one(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<Json<SecretView>> {
    Ok(Json(cp.get_secret(&who, &name).await?))
}

pub(super) async fn set(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
    body: Result<Json<SetSecret>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<SecretSet>)> {
    let Json(SetSecret { value }) = body?;
    let set = cp.set_secret(&who, &name, SecretValue::new(value)).await?;
    Ok((StatusCode::CREATED, Json(set)))
}

pub(super) async fn remove(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    cp.remove_secret(&who, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn import(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: Result<Json<ImportEnv>, JsonRejection>,
) -> ApiResult<Json<Imported>> {
    let Json(ImportEnv { env }) = body?;
    if env.len() > 1 << 20 {
        return Err(ApiError::bad_request("a .env file of at most 1 MiB"));
    }
    Ok(Json(cp.import_secrets(&who, &env).await?))
}

pub(super) async fn rekey(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<Rekeyed>> {
    Ok(Json(cp.rekey_secrets(&who).await?))
}
