//! Monitors: the list with each node's state and uptime, one with its recent results and
//! hours, and monitors made through the API.

use nebula_types::api::monitors::{CreateMonitor, MonitorDetail, MonitorView};

use super::prelude::*;

pub(super) async fn list(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<Vec<MonitorView>>> {
    Ok(Json(cp.monitors_list(&who)?))
}

pub(super) async fn get_one(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<Json<MonitorDetail>> {
    Ok(Json(cp.monitor_detail(&who, &name)?))
}

pub(super) async fn create(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: Result<Json<CreateMonitor>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<MonitorView>)> {
    let Json(req) = body?;
    Ok((
        StatusCode::CREATED,
        Json(cp.create_monitor(&who, req).await?),
    ))
}

pub(super) async fn remove(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    cp.delete_monitor(&who, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
