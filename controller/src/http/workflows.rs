//! Workflows: definitions, runs, cancelling and approving.

use nebula_types::api::workflows::{
    Decide, Delivered, PutWorkflow, RunView, StartRun, WorkflowView,
};
use uuid::Uuid;

use super::prelude::*;

pub(super) async fn list(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<Vec<WorkflowView>>> {
    Ok(Json(cp.workflows_list(&who).await?))
}

pub(super) async fn get_one(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<Json<WorkflowView>> {
    Ok(Json(cp.workflow_get(&who, &name).await?))
}

pub(super) async fn put(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
    body: Result<Json<PutWorkflow>, JsonRejection>,
) -> ApiResult<Json<WorkflowView>> {
    let Json(req) = body?;
    Ok(Json(cp.workflow_put(&who, &name, &req.definition).await?))
}

pub(super) async fn remove(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    cp.workflow_delete(&who, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn start(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
    body: Result<Json<StartRun>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<RunView>)> {
    let Json(req) = body?;
    let run = cp
        .workflow_run(&who, &name, serde_json::Value::Object(req.inputs))
        .await?;
    Ok((StatusCode::CREATED, Json(run)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RunsQuery {
    workflow: Option<String>,
    limit: Option<u32>,
}

pub(super) async fn runs(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    query: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<RunView>>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(Json(
        cp.workflow_runs(&who, q.workflow.as_deref(), q.limit.unwrap_or(50))
            .await?,
    ))
}

fn run_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::bad_request(format!("`{id}` is not a run id")))
}

pub(super) async fn run(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(id): Path<String>,
) -> ApiResult<Json<RunView>> {
    Ok(Json(cp.workflow_run_get(&who, run_id(&id)?).await?))
}

pub(super) async fn cancel(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(id): Path<String>,
) -> ApiResult<Json<RunView>> {
    Ok(Json(cp.workflow_cancel(&who, run_id(&id)?).await?))
}

pub(super) async fn approve(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(id): Path<String>,
    body: Result<Json<Decide>, JsonRejection>,
) -> ApiResult<Json<RunView>> {
    let Json(req) = body?;
    Ok(Json(cp.workflow_decide(&who, run_id(&id)?, req).await?))
}

/// A signed delivery from GitHub, GitLab or a Standard Webhooks sender (no API token: the
/// signature is the proof).
pub(super) async fn hook(
    State(cp): State<Arc<ControlPlane>>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Delivered>)> {
    if body.len() > crate::workflows::triggers::MAX_WEBHOOK_BODY {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "a webhook body is at most 1 MiB",
        ));
    }
    let headers: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let d = cp.workflow_webhook(&name, &headers, &body).await?;
    let status = if d.duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(d)))
}
