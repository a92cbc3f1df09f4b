//! The HTTP layer: the API under `/api/v1/` (JSON in and out, bearer-token auth, one error
//! shape, `{"error":{"code","message"}}`), the public endpoints (health, install scripts and
//! downloads, the service map's schema), the AI gateway's routes and the HTTP/1 server that
//! serves them with the dashboard. One file per noun; handlers authenticate and render, the
//! `ControlPlane` operations they call authorize.

mod agents;
mod alerts;
mod auth;
mod backup;
mod containers;
mod desired;
mod discord;
mod error;
pub mod install;
mod jobs;
mod models;
mod monitors;
mod nodes;
pub mod openapi;
pub mod replica_proxy;
mod secrets;
pub mod server;
mod tasks;
mod telemetry;
mod tokens;
mod users;
mod workflows;

pub use crate::authz::{Role, AI_ROLE};
pub use containers::{exec_bridge, exec_request, log_events as container_log_events};
pub use error::ApiError;
pub(crate) use error::ApiResult;
pub use jobs::log_stream as job_log_stream;
pub use nebula_types::api::monitors::{MonitorNodeView, MonitorPoint};
pub use nodes::{node_view, NodeStatus, NodeView, Page};
pub use telemetry::TelemetrySummary;
pub use tokens::{CreateTokenRequest, CreatedTokenView, TokenView};
pub use users::{CreateApiTokenRequest, CreateUserRequest};

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{delete, get};
use axum::{middleware, Json, Router};

use crate::ControlPlane;
use auth::authenticate;
use models::{agent_releases, ai_usage, models_desired, models_inventory};
use nodes::{get_node, list_nodes, remove_node, sleep_node, wake_node};
use tasks::list_tasks;
use telemetry::{metrics, node_telemetry};
use tokens::{create_token, list_tokens, revoke_token};
use users::{create_api_token, create_user, list_users};

/// What every handler file uses.
mod prelude {
    pub(super) use std::sync::Arc;
    pub(super) use std::time::{Duration, SystemTime};

    pub(super) use axum::extract::rejection::JsonRejection;
    pub(super) use axum::extract::{Path, Query, Request, State};
    pub(super) use axum::http::{header, StatusCode};
    pub(super) use axum::middleware::Next;
    pub(super) use axum::response::{IntoResponse, Response};
    pub(super) use axum::{Extension, Json};

    pub(super) use serde::Deserialize;
    pub(super) use serde_json::json;

    pub(super) use super::error::{ApiError, ApiResult};
    pub(super) use crate::authz::{bearer, Op, OpCtx, Role, Via, AI_ROLE, BOT_ROLE};
    pub(super) use crate::store::{JoinTokenRecord, NodeRecord};
    pub(super) use crate::{ControlPlane, OpError};
}

/// Every route of the API, the metrics and the downloads. Longer than the usual limit: it is
/// the one list of routes, which the OpenAPI test reads as it is written here.
pub fn router(cp: Arc<ControlPlane>) -> Router {
    let v1 = Router::new()
        .route("/nodes", get(list_nodes))
        .route("/nodes/{name}", get(get_node).delete(remove_node))
        .route("/nodes/{name}/wake", axum::routing::post(wake_node))
        .route("/nodes/{name}/sleep", axum::routing::post(sleep_node))
        .route("/tokens", get(list_tokens).post(create_token))
        .route("/tokens/{id}", delete(revoke_token))
        .route("/nodes/{name}/telemetry", get(node_telemetry))
        .route("/alerts", get(alerts::list_alerts))
        .route(
            "/alerts/{fingerprint}/ack",
            axum::routing::post(alerts::acknowledge),
        )
        .route(
            "/alerts/sinks",
            get(alerts::list_sinks).post(alerts::add_sink),
        )
        .route("/alerts/sinks/{name}", delete(alerts::remove_sink))
        .route(
            "/alerts/sinks/{name}/test",
            axum::routing::post(alerts::test_sink),
        )
        .route(
            "/alerts/silences",
            get(alerts::list_silences).post(alerts::add_silence),
        )
        .route("/alerts/silences/{id}", delete(alerts::expire_silence))
        .route("/alerts/notifications", get(alerts::notifications))
        .route("/discord", get(discord::overview))
        .route("/discord/links", get(discord::links))
        .route(
            "/discord/guilds/{id}",
            axum::routing::put(discord::put_guild),
        )
        .route(
            "/users/{name}/discord-link-code",
            axum::routing::post(discord::link_code),
        )
        .route("/secrets", get(secrets::list))
        .route(
            "/secrets/{name}",
            get(secrets::get_one)
                .put(secrets::set)
                .delete(secrets::remove),
        )
        .route("/secrets/import", axum::routing::post(secrets::import))
        .route("/secrets/rekey", axum::routing::post(secrets::rekey))
        .route("/backup", axum::routing::post(backup::take))
        .route("/agents", get(agents::list))
        .route(
            "/agents/{name}",
            get(agents::get_one).put(agents::put).delete(agents::remove),
        )
        .route("/agents/{name}/ask", axum::routing::post(agents::ask))
        .route("/workflows", get(workflows::list))
        .route(
            "/workflows/{name}",
            get(workflows::get_one)
                .put(workflows::put)
                .delete(workflows::remove),
        )
        .route(
            "/workflows/{name}/runs",
            axum::routing::post(workflows::start),
        )
        .route("/workflow-runs", get(workflows::runs))
        .route("/workflow-runs/{id}", get(workflows::run))
        .route(
            "/workflow-runs/{id}/cancel",
            axum::routing::post(workflows::cancel),
        )
        .route(
            "/workflow-runs/{id}/approve",
            axum::routing::post(workflows::approve),
        )
        .route("/monitors", get(monitors::list).post(monitors::create))
        .route(
            "/monitors/{name}",
            get(monitors::get_one).delete(monitors::remove),
        )
        .route("/containers", get(containers::list_containers))
        .route(
            "/nodes/{name}/containers/{container}",
            get(containers::get_container),
        )
        .route(
            "/nodes/{name}/containers/{container}/actions",
            axum::routing::post(containers::container_action),
        )
        .route(
            "/nodes/{name}/containers/{container}/logs",
            get(containers::container_logs),
        )
        .route(
            "/nodes/{name}/containers/{container}/exec",
            get(containers::container_exec),
        )
        .route("/nodes/{name}/storage", get(containers::node_storage))
        .route(
            "/nodes/{name}/storage/prune",
            get(containers::prune_preview).post(containers::prune),
        )
        .route("/jobs", get(jobs::list_jobs).post(jobs::create_job))
        .route("/jobs/{id}", get(jobs::get_job))
        .route("/jobs/{id}/logs", get(jobs::job_logs))
        .route("/jobs/{id}/cancel", axum::routing::post(jobs::cancel_job))
        .route("/inventory", get(jobs::inventory))
        .route("/inventory/execute", axum::routing::post(jobs::execute))
        .route("/audit", get(jobs::audit))
        .route(
            "/desired",
            get(desired::get_desired).put(desired::put_desired),
        )
        .route("/plan", get(desired::get_plan).post(desired::preview_plan))
        .route("/services", get(desired::list_services))
        .route("/services/{name}", get(desired::get_service))
        .route(
            "/services/{name}/rollback",
            axum::routing::post(desired::rollback),
        )
        .route("/reconcile", axum::routing::post(desired::reconcile))
        .route("/users", get(list_users).post(create_user))
        .route("/api-tokens", axum::routing::post(create_api_token))
        .route("/agent/releases", get(agent_releases))
        .route("/tasks", get(list_tasks))
        .route("/replicas", get(tasks::replicas))
        .route("/models/inventory", get(models_inventory))
        .route("/models/desired", get(models_desired))
        .route("/ai/usage", get(ai_usage))
        .fallback(|| async { ApiError::not_found("no such API endpoint") })
        .layer(middleware::from_fn_with_state(cp.clone(), authenticate));
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(cp.clone(), authenticate));
    Router::new()
        .route("/healthz", get(healthz))
        // Public: editors fetch it to validate service maps.
        .route("/api/v1/schema/service-map", get(desired::schema))
        // Public, signed: acknowledge links in notifications (ntfy's button).
        .route("/alerts/ack", axum::routing::post(alerts::ack_link))
        // Public, signed: a workflow's webhook deliveries.
        .route(
            "/hooks/workflows/{name}",
            axum::routing::post(workflows::hook),
        )
        // Public: the API's own description.
        .route("/api/v1/openapi.json", get(openapi_json))
        // Public: `curl | sh` fetches these without a token; they hold no secret.
        .route("/install.sh", get(install::install_sh))
        .route("/install.ps1", get(install::install_ps1))
        .route("/downloads/{file}", get(install::download))
        // The OpenAI-compatible gateway (API tokens, checked by the gateway itself).
        .route(
            "/v1/chat/completions",
            axum::routing::post(crate::agents::chat_completions),
        )
        .route(
            "/v1/completions",
            axum::routing::post(crate::ai::gateway::completions),
        )
        .route(
            "/v1/embeddings",
            axum::routing::post(crate::ai::gateway::embeddings),
        )
        .route("/v1/models", get(crate::ai::gateway::models))
        .route(
            "/v1/images/generations",
            axum::routing::post(crate::ai::gateway::images),
        )
        .route(
            "/sdapi/v1/{op}",
            axum::routing::post(crate::ai::gateway::sd_passthrough),
        )
        .merge(metrics)
        .merge(bot_routes(&cp))
        .nest("/api/v1", v1)
        .with_state(cp)
}

/// The bot's own routes (`nebula bot`, a Discord bot in its own process): `bot` tokens only.
/// (Full paths: the OpenAPI test reads these after the main router.)
fn bot_routes(cp: &Arc<ControlPlane>) -> Router<Arc<ControlPlane>> {
    Router::new()
        .route(
            "/api/v1/discord/bot/attach",
            axum::routing::put(discord::attach).delete(discord::detach),
        )
        .route(
            "/api/v1/discord/bot/principal",
            axum::routing::post(discord::principal),
        )
        .route(
            "/api/v1/discord/bot/guilds/{id}",
            axum::routing::post(discord::guild_seen),
        )
        .route(
            "/api/v1/discord/bot/guilds/{id}/settings",
            get(discord::guild_settings).put(discord::settings_by_admin),
        )
        .route(
            "/api/v1/discord/bot/link",
            axum::routing::post(discord::redeem_link),
        )
        .route(
            "/api/v1/discord/bot/moderation",
            axum::routing::post(discord::moderated),
        )
        .route("/api/v1/discord/bot/changes", get(discord::changes))
        .route(
            "/api/v1/discord/bot/alert-messages/{fingerprint}/{channel}",
            get(discord::get_alert_message).put(discord::put_alert_message),
        )
        .route("/api/v1/discord/bot/deliveries", get(discord::deliveries))
        .route(
            "/api/v1/discord/bot/deliveries/{id}",
            axum::routing::post(discord::delivered),
        )
        .layer(middleware::from_fn_with_state(
            cp.clone(),
            auth::authenticate_bot,
        ))
}

/// `GET /api/v1/openapi.json`: the OpenAPI 3.1 document of this API.
async fn openapi_json() -> Json<serde_json::Value> {
    Json(openapi::document())
}

async fn healthz(State(cp): State<Arc<ControlPlane>>) -> Json<nebula_types::api::Health> {
    Json(nebula_types::api::Health {
        status: "ok".into(),
        online_nodes: cp.registry.online_count(),
    })
}
