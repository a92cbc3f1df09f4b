//! Agent releases, models across the fleet and the AI gateway's usage.

use super::prelude::*;
use nebula_types::api::models::{
    AgentReleaseView, AgentReleases, AiUsage, BackendView, ModelView, ModelsInventory, NodeModels,
    UsageRow,
};

/// `GET /api/v1/agent/releases`: the agent builds this controller serves, with the key that
/// signs them.
pub(super) async fn agent_releases(
    State(cp): State<Arc<ControlPlane>>,
) -> ApiResult<Json<AgentReleases>> {
    let releases = super::install::scanned(&cp).await?;
    let releases = releases
        .iter()
        .map(|r| AgentReleaseView {
            version: r.version.clone(),
            os: r.os.clone(),
            arch: r.arch.clone(),
            path: r.path.clone(),
            sha256: hex::encode(r.sha256),
        })
        .collect();
    Ok(Json(AgentReleases {
        releases,
        public_key: cp.releases.signer().public_key_hex(),
    }))
}

/// `GET /api/v1/models/inventory`: per node and backend, the models on disk and loaded.
pub(super) async fn models_inventory(State(cp): State<Arc<ControlPlane>>) -> Json<ModelsInventory> {
    Json(cp.models_inventory())
}

impl ControlPlane {
    /// Per node and backend, the models on disk and loaded (also the Discord bot's model names).
    pub fn models_inventory(&self) -> ModelsInventory {
        let cp = self;
        let backend = |id: uuid::Uuid, b: &nebula_protocol::ai::BackendStatus| BackendView {
            name: b.name.clone(),
            kind: b.kind.as_str().to_owned(),
            url: b.url.clone(),
            source: b.source.clone(),
            healthy: b.healthy,
            error: b.error.clone(),
            models: b
                .models
                .iter()
                .map(|m| ModelView {
                    name: m.name.clone(),
                    digest: m.digest.clone(),
                    size_bytes: m.size_bytes,
                    vram_bytes: m.vram_bytes,
                    context_length: m.context_length,
                    loaded: m.loaded,
                    breaker: cp.ai.breaker_state(id, &m.name).to_owned(),
                })
                .collect(),
        };
        let nodes = cp
            .ai
            .inventory()
            .into_iter()
            .map(|(name, (id, inv))| NodeModels {
                node: name,
                node_id: id,
                online: cp.registry.is_online(id),
                backends: inv.backends.iter().map(|b| backend(id, b)).collect(),
            })
            .collect();
        ModelsInventory { nodes }
    }
}

/// `GET /api/v1/ai/usage`: requests and tokens per API token, model and node: the stored
/// totals plus what was counted since they were last written.
pub(super) async fn ai_usage(State(cp): State<Arc<ControlPlane>>) -> ApiResult<Json<AiUsage>> {
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
    let usage = totals
        .into_iter()
        .map(
            |((token, model, node), [requests, prompt, completion])| UsageRow {
                token,
                model,
                node,
                requests,
                prompt_tokens: prompt,
                completion_tokens: completion,
            },
        )
        .collect();
    Ok(Json(AiUsage { usage }))
}

/// `GET /api/v1/models/desired`: the map's `models:` per node (present, pulling with progress,
/// failed, waiting) and the models nodes hold beyond it.
pub(super) async fn models_desired(
    State(cp): State<Arc<ControlPlane>>,
) -> ApiResult<Json<crate::desired::models::ModelsView>> {
    Ok(Json(cp.models_view().await?))
}
