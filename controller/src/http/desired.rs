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
use nebula_types::api::desired::{
    Applied, DesiredView, ReconcileStarted, RollbackRequest, RolledBack, ServiceDetail,
};

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
) -> ApiResult<Json<DesiredView>> {
    cp.authorize(&who, Op::ReadFleet)?;
    let file_error = cp.desired.file_error();
    Ok(Json(match cp.desired.active() {
        Some(a) => DesiredView {
            version: Some(a.record.version),
            source: Some(a.record.source.clone()),
            created_by: Some(a.record.created_by.clone()),
            created_at: Some(a.record.created_at),
            digest: Some(a.record.digest.clone()),
            document: if who.may(Op::ReadMapValues) {
                Some(a.record.document.clone())
            } else {
                // Variables' names and secret references; `***` for inline values.
                map::secrets::redact_document(&a.record.document)
            },
            warnings: a.warnings.clone(),
            file_error,
        },
        None => DesiredView {
            version: None,
            source: None,
            created_by: None,
            created_at: None,
            digest: None,
            document: None,
            warnings: Vec::new(),
            file_error,
        },
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
) -> ApiResult<Json<Applied>> {
    let applied = cp.apply_desired(&document(body)?, "api", &who).await?;
    Ok(Json(applied))
}

pub(super) async fn get_plan(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<PlanView>> {
    Ok(Json(cp.current_plan_for(&who).await?))
}

pub(super) async fn preview_plan(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: String,
) -> ApiResult<Json<PlanView>> {
    Ok(Json(cp.preview_plan(&who, &document(body)?).await?))
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
) -> ApiResult<Json<ServiceDetail>> {
    cp.authorize(&who, Op::ReadFleet)?;
    let service = cp.services().await?.into_iter().find(|s| s.name == name);
    let history = cp
        .store
        .deployments(Some(&name), q.limit.unwrap_or(50))
        .await?;
    if service.is_none() && history.is_empty() {
        return Err(ApiError::not_found(format!("no service named `{name}`")));
    }
    Ok(Json(ServiceDetail { service, history }))
}

pub(super) async fn rollback(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
    body: Option<Json<RollbackRequest>>,
) -> ApiResult<Json<RolledBack>> {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let pin = cp.rollback_service(&name, req.to.as_deref(), &who).await?;
    Ok(Json(RolledBack {
        service: pin.service,
        revision: pin.revision,
        until: "the service map changes this service".into(),
    }))
}

pub(super) async fn reconcile(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<(StatusCode, Json<ReconcileStarted>)> {
    cp.request_reconcile(&who)?;
    let started = ReconcileStarted {
        reconcile: "started".into(),
    };
    Ok((StatusCode::ACCEPTED, Json(started)))
}
