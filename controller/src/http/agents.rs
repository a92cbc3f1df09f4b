//! AI agents: list, define, remove, ask.

use nebula_types::api::agents::{AgentReply, AgentView, AskAgent};
use nebula_types::api::workflows::PutWorkflow;

use super::prelude::*;

pub(super) async fn list(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<Vec<AgentView>>> {
    Ok(Json(cp.agent_views(&who).await?))
}

pub(super) async fn get_one(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<Json<AgentView>> {
    Ok(Json(cp.agent_view(&who, &name).await?))
}

pub(super) async fn put(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
    body: Result<Json<PutWorkflow>, JsonRejection>,
) -> ApiResult<Json<AgentView>> {
    let Json(req) = body?;
    Ok(Json(cp.put_agent(&who, &name, &req.definition).await?))
}

pub(super) async fn remove(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    cp.delete_agent(&who, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn ask(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
    body: Result<Json<AskAgent>, JsonRejection>,
) -> ApiResult<Json<AgentReply>> {
    let Json(req) = body?;
    cp.authorize(&who, crate::authz::Op::Chat)?;
    if req.message.trim().is_empty() || req.message.len() > 64 * 1024 {
        return Err(ApiError::bad_request("`message` is 1 to 65536 bytes"));
    }
    let caller = crate::ai::gateway::Caller::of(&who);
    let messages = vec![serde_json::json!({"role": "user", "content": req.message})];
    Ok(Json(cp.ask_agent(&caller, &name, messages, 0).await?))
}
