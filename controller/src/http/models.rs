//! Agent releases, models across the fleet and the AI gateway's usage.

use super::prelude::*;

/// `GET /api/v1/agent/releases`: the agent builds this controller serves, with the key that
/// signs them.
pub(super) async fn agent_releases(
    State(cp): State<Arc<ControlPlane>>,
) -> ApiResult<Json<serde_json::Value>> {
    let releases = super::install::scanned(&cp).await?;
    let list: Vec<serde_json::Value> = releases
        .iter()
        .map(|r| {
            json!({
                "version": r.version,
                "os": r.os,
                "arch": r.arch,
                "path": r.path,
                "sha256": hex::encode(r.sha256),
            })
        })
        .collect();
    Ok(Json(json!({
        "releases": list,
        "public_key": cp.releases.signer().public_key_hex(),
    })))
}

/// `GET /api/v1/models/inventory`: per node and backend, the models on disk and loaded.
pub(super) async fn models_inventory(
    State(cp): State<Arc<ControlPlane>>,
) -> Json<serde_json::Value> {
    let nodes: Vec<serde_json::Value> = cp
        .ai
        .inventory()
        .into_iter()
        .map(|(name, (id, inv))| {
            json!({
                "node": name,
                "node_id": id,
                "online": cp.registry.is_online(id),
                "backends": inv.backends.iter().map(|b| json!({
                    "name": b.name,
                    "kind": b.kind.as_str(),
                    "url": b.url,
                    "source": b.source,
                    "healthy": b.healthy,
                    "error": b.error,
                    "models": b.models.iter().map(|m| json!({
                        "name": m.name,
                        "digest": m.digest,
                        "size_bytes": m.size_bytes,
                        "vram_bytes": m.vram_bytes,
                        "context_length": m.context_length,
                        "loaded": m.loaded,
                        "breaker": cp.ai.breaker_state(id, &m.name),
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({ "nodes": nodes }))
}

/// `GET /api/v1/ai/usage`: requests and tokens per API token, model and node: the stored
/// totals plus what was counted since they were last written.
pub(super) async fn ai_usage(
    State(cp): State<Arc<ControlPlane>>,
) -> ApiResult<Json<serde_json::Value>> {
    let mut totals: std::collections::BTreeMap<(String, String, String), [u64; 3]> =
        Default::default();
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    for r in cp.store.ai_usage().await? {
        totals.insert(
            (r.token, r.model, r.node),
            [n(r.requests), n(r.prompt_tokens), n(r.completion_tokens)],
        );
    }
    for (key, u) in cp.ai.usage() {
        let t = totals.entry(key).or_default();
        t[0] += u.requests;
        t[1] += u.prompt_tokens;
        t[2] += u.completion_tokens;
    }
    let rows: Vec<serde_json::Value> = totals
        .into_iter()
        .map(|((token, model, node), [requests, prompt, completion])| {
            json!({"token": token, "model": model, "node": node, "requests": requests,
                   "prompt_tokens": prompt, "completion_tokens": completion})
        })
        .collect();
    Ok(Json(json!({ "usage": rows })))
}

/// `GET /api/v1/models/desired`: the map's `models:` per node (present, pulling with progress,
/// failed, waiting) and the models nodes hold beyond it.
pub(super) async fn models_desired(
    State(cp): State<Arc<ControlPlane>>,
) -> ApiResult<Json<crate::desired::models::ModelsView>> {
    Ok(Json(cp.models_view().await?))
}
