//! The controller's background tasks.

use super::prelude::*;

/// Every background task: scope, kind, state and its last run.
pub(super) async fn list_tasks(
    State(cp): State<Arc<ControlPlane>>,
) -> Json<Vec<crate::tasks::TaskStatus>> {
    Json(cp.tasks.list())
}

/// The replicas of this control plane and the leader lease.
pub(super) async fn replicas(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<nebula_types::api::tasks::ReplicasView>> {
    Ok(Json(cp.replicas(&who).await?))
}
