//! Desired state over HTTP: the service map (get, put), plans (current, proposed), services
//! (desired against actual, history), rollback, a reconcile trigger, and the map's JSON Schema.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, ApiResult};
use crate::authz::{Op, OpCtx};
use crate::desired::map::{self, MapErrors};
use crate::desired::{ApplyError, PlanView, ServiceView};
use crate::ControlPlane;

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Map(errors) => map_error(&errors),
            ApplyError::Op(e) => e.into(),
        }
    }
}

fn map_error(errors: &MapErrors) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_service_map",
        format!("the service map is not valid: {errors}"),
    );
    e.problems = Some(json!(errors.0));
    e
}

pub(super) async fn schema() -> Json<Value> {
    Json(map::json_schema())
}

pub(super) async fn get_desired(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<Value>> {
    cp.authorize(&who, Op::ReadFleet)?;
    let active = cp.desired.active();
    let file_error = cp.desired.file_error();
    Ok(Json(match active {
        Some(a) => json!({
            "version": a.record.version,
            "source": a.record.source,
            "created_by": a.record.created_by,
            "created_at": a.record.created_at,
            "digest": a.record.digest,
            "document": a.record.document,
            "warnings": a.warnings,
            "file_error": file_error,
        }),
        None => json!({ "version": null, "file_error": file_error }),
    }))
}

fn document(body: String) -> ApiResult<String> {
    if body.trim().is_empty() {
        return Err(ApiError::bad_request(
            "send the service map (YAML) as the request body",
        ));
    }
    Ok(body)
}

pub(super) async fn put_desired(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: String,
) -> ApiResult<Json<Value>> {
    let applied = cp.apply_desired(&document(body)?, "api", &who).await?;
    Ok(Json(json!(applied)))
}

pub(super) async fn get_plan(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<PlanView>> {
    cp.authorize(&who, Op::ReadFleet)?;
    Ok(Json(cp.current_plan().await?))
}

pub(super) async fn preview_plan(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: String,
) -> ApiResult<Json<PlanView>> {
    cp.authorize(&who, Op::PreviewPlan)?;
    Ok(Json(cp.preview_plan(&document(body)?).await?))
}

pub(super) async fn list_services(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<Vec<ServiceView>>> {
    cp.authorize(&who, Op::ReadFleet)?;
    Ok(Json(cp.services().await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryQuery {
    limit: Option<u32>,
}

pub(super) async fn get_service(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> ApiResult<Json<Value>> {
    cp.authorize(&who, Op::ReadFleet)?;
    let service = cp.services().await?.into_iter().find(|s| s.name == name);
    let history = cp
        .store
        .deployments(Some(&name), q.limit.unwrap_or(50))
        .await?;
    if service.is_none() && history.is_empty() {
        return Err(ApiError::not_found(format!("no service named `{name}`")));
    }
    Ok(Json(json!({ "service": service, "history": history })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RollbackRequest {
    /// A revision (or a unique prefix of at least 4 characters); absent: the previous one.
    to: Option<String>,
}

pub(super) async fn rollback(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
    body: Option<Json<RollbackRequest>>,
) -> ApiResult<Json<Value>> {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let pin = cp.rollback_service(&name, req.to.as_deref(), &who).await?;
    Ok(Json(json!({
        "service": pin.service,
        "revision": pin.revision,
        "until": "the service map changes this service",
    })))
}

pub(super) async fn reconcile(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    cp.request_reconcile(&who)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "reconcile": "started" })),
    ))
}
