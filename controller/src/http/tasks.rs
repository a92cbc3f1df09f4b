//! The controller's background tasks.

use super::prelude::*;

/// Every background task: scope, kind, state and its last run.
pub(super) async fn list_tasks(
    State(cp): State<Arc<ControlPlane>>,
) -> Json<Vec<crate::tasks::TaskStatus>> {
    Json(cp.tasks.list())
}
