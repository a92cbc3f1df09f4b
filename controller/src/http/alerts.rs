//! Alerts: what fires now, acknowledgement, sinks (with a test message), silences, the
//! delivery history.

use nebula_types::api::alerts::{
    AlertView, CreateSilence, CreateSink, CreatedSink, NotificationView, SilenceView, SinkView,
};

use super::prelude::*;

pub(super) async fn list_alerts(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<Vec<AlertView>>> {
    Ok(Json(cp.alerts_now(&who).await?))
}

pub(super) async fn acknowledge(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(fingerprint): Path<String>,
) -> ApiResult<StatusCode> {
    cp.acknowledge_alert(&who, &fingerprint).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn list_sinks(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<Vec<SinkView>>> {
    Ok(Json(cp.sinks(&who).await?))
}

pub(super) async fn add_sink(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: Result<Json<CreateSink>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CreatedSink>)> {
    let Json(req) = body?;
    Ok((StatusCode::CREATED, Json(cp.add_sink(&who, req).await?)))
}

pub(super) async fn remove_sink(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    cp.remove_sink(&who, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn test_sink(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    cp.test_sink(&who, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn list_silences(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<Vec<SilenceView>>> {
    Ok(Json(cp.silences(&who).await?))
}

pub(super) async fn add_silence(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: Result<Json<CreateSilence>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<SilenceView>)> {
    let Json(req) = body?;
    Ok((StatusCode::CREATED, Json(cp.add_silence(&who, req).await?)))
}

pub(super) async fn expire_silence(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    cp.expire_silence(&who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryQuery {
    limit: Option<i64>,
}

pub(super) async fn notifications(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<NotificationView>>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(Json(cp.notifications(&who, q.limit.unwrap_or(100)).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AckLink {
    sink: String,
    alert: String,
    exp: i64,
    sig: String,
}

/// `POST /alerts/ack?sink=&alert=&exp=&sig=`: a signed acknowledge link from a notification
/// (ntfy's action button); no token, the signature is the credential.
pub(super) async fn ack_link(
    State(cp): State<Arc<ControlPlane>>,
    query: Result<Query<AckLink>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<StatusCode> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    cp.acknowledge_by_link(&q.sink, &q.alert, q.exp, &q.sig)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
