//! Nodes: the fleet table, one node, removal, wake and sleep.

use super::prelude::*;
use super::telemetry::summary;

pub use nebula_types::api::nodes::{NodeRemoved, NodeStatus, NodeView};
pub use nebula_types::api::Page;

pub(super) fn rfc3339(ms: i64) -> String {
    crate::store::rfc3339_millis(crate::store::from_millis(ms))
}

pub fn node_view(cp: &ControlPlane, n: NodeRecord) -> NodeView {
    let session = cp.registry.get(n.id);
    NodeView {
        id: n.id,
        status: match (session.is_some(), cp.wakes.get(n.id)) {
            (true, _) => NodeStatus::Online,
            (false, Some(w)) if w.failed => NodeStatus::WakeFailed,
            (false, Some(_)) => NodeStatus::Waking,
            (false, None) => NodeStatus::Offline,
        },
        labels: n.labels,
        facts: n.facts,
        // A live session knows its agent's version even before a concurrent read of the store
        // would.
        agent_version: session
            .as_ref()
            .map(|s| s.agent_version.clone())
            .unwrap_or(n.agent_version),
        enrolled_at: rfc3339(n.enrolled_at),
        last_seen_at: if session.is_some() {
            Some(rfc3339(crate::store::millis(SystemTime::now())))
        } else {
            n.last_seen_at.map(rfc3339)
        },
        connected_since: session
            .as_ref()
            .map(|s| crate::store::rfc3339_millis(s.connected_at)),
        remote_addr: session.as_ref().map(|s| s.remote.to_string()),
        session_replica: session.as_ref().and_then(|s| {
            s.relayed_by
                .clone()
                .or_else(|| cp.ha.replicated().then(|| cp.ha.replica.clone()))
        }),
        cert_not_after: n.cert_not_after.map(rfc3339),
        telemetry: cp.telemetry.view(n.id).as_ref().and_then(summary),
        name: n.name,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NodeQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    status: Option<NodeStatus>,
    /// `key=value`
    label: Option<String>,
}

pub(super) async fn list_nodes(
    State(cp): State<Arc<ControlPlane>>,
    query: Result<Query<NodeQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Page<NodeView>>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
    }
    let label = match q.label.as_deref() {
        Some(l) => Some(
            l.split_once('=')
                .ok_or_else(|| ApiError::bad_request("label filter reads key=value"))?,
        ),
        None => None,
    };
    // Sorted by name; the cursor is the last name of the previous page.
    let nodes = cp.store.list_nodes().await?;
    let mut items: Vec<NodeView> = nodes
        .into_iter()
        .filter(|n| q.cursor.as_deref().is_none_or(|c| n.name.as_str() > c))
        .filter(|n| label.is_none_or(|(k, v)| n.labels.get(k).map(String::as_str) == Some(v)))
        .map(|n| node_view(&cp, n))
        .filter(|n| q.status.is_none_or(|s| n.status == s))
        .take(limit + 1)
        .collect();
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|n| n.name.clone())
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor }))
}

pub(super) async fn get_node(
    State(cp): State<Arc<ControlPlane>>,
    Path(name): Path<String>,
) -> ApiResult<Json<NodeView>> {
    let node = cp
        .store
        .node_by_name(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no node named `{name}`")))?;
    Ok(Json(node_view(&cp, node)))
}

pub(super) async fn remove_node(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<Json<NodeRemoved>> {
    let id = cp.remove_node(&name, &who).await?;
    Ok(Json(NodeRemoved { removed: name, id }))
}

// ----- wake and sleep -----

pub(super) async fn wake_node(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<crate::wake::Wake>)> {
    let wake = cp.wake_node(&name, &who).await?;
    Ok((StatusCode::ACCEPTED, Json(wake)))
}

pub(super) async fn sleep_node(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<crate::jobs::model::JobRecord>)> {
    let job = cp.sleep_node(&name, &who).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

impl ControlPlane {
    /// Every node as the API lists it (the Discord bot's `/fleet` and `/node`).
    pub async fn nodes_view(&self, cx: &OpCtx) -> Result<Vec<NodeView>, OpError> {
        self.authorize(cx, crate::authz::Op::ReadFleet)?;
        Ok(self
            .store
            .list_nodes()
            .await?
            .into_iter()
            .map(|n| node_view(self, n))
            .collect())
    }
}
