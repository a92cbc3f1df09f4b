//! The HTTP API under `/api/v1/`: JSON in and out, bearer-token auth, one error shape
//! (`{"error":{"code","message"}}`) for every failure.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use nebula_protocol::{Labels, NodeFacts};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::store::{JoinTokenRecord, NodeRecord};

mod desired;
pub mod install;
mod jobs;
use crate::{ControlPlane, OpError};
pub use jobs::log_stream as job_log_stream;

/// The one API error type.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Each problem found, for errors that have several (a service map's).
    pub problems: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            problems: None,
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if let Some(p) = self.problems {
            body["error"]["problems"] = p;
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::NotFound(m) => ApiError::not_found(m),
            OpError::Invalid(m) => ApiError::bad_request(m),
            OpError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            OpError::Forbidden(m) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", m),
            OpError::TooManyRequests(m) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", m)
            }
            OpError::Store(e) => ApiError::from(e),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!("store error: {:#}", anyhow::Error::from(e));
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error (see the controller log)",
        )
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        let code = if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            "unsupported_media_type"
        } else {
            "bad_request"
        };
        ApiError::new(status, code, r.body_text())
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub use crate::authz::Role;
use crate::authz::{Op, OpCtx, Via};

pub fn router(cp: Arc<ControlPlane>) -> Router {
    let v1 = Router::new()
        .route("/nodes", get(list_nodes))
        .route("/nodes/{name}", get(get_node).delete(remove_node))
        .route("/nodes/{name}/wake", axum::routing::post(wake_node))
        .route("/nodes/{name}/sleep", axum::routing::post(sleep_node))
        .route("/tokens", get(list_tokens).post(create_token))
        .route("/tokens/{id}", delete(revoke_token))
        .route("/nodes/{name}/telemetry", get(node_telemetry))
        .route("/containers", get(list_containers))
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
        // Public: `curl | sh` fetches these without a token; they hold no secret.
        .route("/install.sh", get(install::install_sh))
        .route("/install.ps1", get(install::install_ps1))
        .route("/downloads/{file}", get(install::download))
        // The OpenAI-compatible gateway (API tokens, checked by the gateway itself).
        .route(
            "/v1/chat/completions",
            axum::routing::post(crate::ai::gateway::chat_completions),
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
        .nest("/api/v1", v1)
        .with_state(cp)
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

async fn authenticate(
    State(cp): State<Arc<ControlPlane>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(token) = bearer(req.headers()) else {
        return unauthorized("missing bearer token (Authorization: Bearer <token>)");
    };
    match cp.api_token(&crate::hash_secret(token)).await {
        Ok(Some(rec)) if rec.role == AI_ROLE => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token is scoped to the AI gateway (/v1/chat/completions and the like)",
        )
        .into_response(),
        Ok(Some(rec)) => {
            req.extensions_mut()
                .insert(OpCtx::new(rec.name, Role::parse(&rec.role), Via::Api));
            next.run(req).await
        }
        Ok(None) => unauthorized("invalid API token"),
        Err(e) => ApiError::from(e).into_response(),
    }
}

fn unauthorized(message: &str) -> Response {
    let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

async fn healthz(State(cp): State<Arc<ControlPlane>>) -> Json<serde_json::Value> {
    Json(json!({"status": "ok", "online_nodes": cp.registry.online_count()}))
}

// ----- nodes -----

/// A node as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeView {
    pub id: uuid::Uuid,
    pub name: String,
    pub status: NodeStatus,
    pub labels: Labels,
    pub facts: NodeFacts,
    pub agent_version: String,
    pub enrolled_at: String,
    pub last_seen_at: Option<String>,
    pub connected_since: Option<String>,
    pub remote_addr: Option<String>,
    pub cert_not_after: Option<String>,
    /// The latest telemetry, summarised (absent before the first sample).
    pub telemetry: Option<TelemetrySummary>,
}

/// The figures a fleet table shows per node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TelemetrySummary {
    pub sampled_at: String,
    pub cpu_percent: f32,
    pub load1: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub gpus: usize,
    pub gpu_utilization_percent: Option<f32>,
    pub gpu_memory_used_bytes: Option<u64>,
    pub gpu_memory_total_bytes: Option<u64>,
    pub containers_total: usize,
    pub containers_running: usize,
    pub containers_unhealthy: usize,
}

fn summary(view: &crate::telemetry::NodeView) -> Option<TelemetrySummary> {
    use nebula_protocol::telemetry::{ContainerHealth, ContainerState};
    let s = view.latest.as_ref()?;
    let inv = view.inventory.as_ref();
    let utils: Vec<f32> = s
        .gpus
        .iter()
        .filter_map(|g| g.utilization_percent)
        .map(f32::from)
        .collect();
    let gpu_mem: Vec<u64> = s.gpus.iter().filter_map(|g| g.memory_used_bytes).collect();
    Some(TelemetrySummary {
        sampled_at: rfc3339(view.received_at_ms),
        cpu_percent: s.host.cpu_percent,
        load1: s.host.load[0],
        memory_used_bytes: s.host.memory_used_bytes,
        memory_total_bytes: s.host.memory_total_bytes,
        gpus: s.gpus.len(),
        gpu_utilization_percent: (!utils.is_empty())
            .then(|| utils.iter().sum::<f32>() / utils.len() as f32),
        gpu_memory_used_bytes: (!gpu_mem.is_empty())
            .then(|| crate::telemetry::saturating_sum(gpu_mem.iter().copied())),
        gpu_memory_total_bytes: inv
            .filter(|i| !i.gpus.is_empty())
            .map(|i| crate::telemetry::saturating_sum(i.gpus.iter().map(|g| g.memory_total_bytes))),
        containers_total: s.containers.len(),
        containers_running: s
            .containers
            .iter()
            .filter(|c| c.state == ContainerState::Running)
            .count(),
        containers_unhealthy: s
            .containers
            .iter()
            .filter(|c| c.health == ContainerHealth::Unhealthy)
            .count(),
    })
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Online,
    Offline,
    /// Woken through a relay; not registered yet.
    Waking,
    /// Woken, but it did not register within `wake_timeout`.
    WakeFailed,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Online => "online",
            NodeStatus::Offline => "offline",
            NodeStatus::Waking => "waking",
            NodeStatus::WakeFailed => "wake_failed",
        }
    }
}

fn rfc3339(ms: i64) -> String {
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
        cert_not_after: n.cert_not_after.map(rfc3339),
        telemetry: cp.telemetry.view(n.id).as_ref().and_then(summary),
        name: n.name,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    status: Option<NodeStatus>,
    /// `key=value`
    label: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

async fn list_nodes(
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

async fn get_node(
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

async fn remove_node(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let id = cp.remove_node(&name, &who).await?;
    Ok(Json(json!({"removed": name, "id": id})))
}

// ----- wake and sleep -----

async fn wake_node(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let wake = cp.wake_node(&name, &who).await?;
    Ok((StatusCode::ACCEPTED, Json(json!(wake))))
}

async fn sleep_node(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let job = cp.sleep_node(&name, &who).await?;
    Ok((StatusCode::ACCEPTED, Json(json!(job))))
}

// ----- dashboard users -----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    pub username: String,
    pub password: String,
    /// admin, operator or viewer (default viewer).
    #[serde(default)]
    pub role: Option<String>,
}

async fn create_user(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: Result<Json<CreateUserRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let Json(b) = body?;
    let role = b.role.unwrap_or_else(|| "viewer".into());
    let user = cp
        .create_user(&b.username, &b.password, &role, &who)
        .await?;
    Ok((StatusCode::CREATED, Json(json!(user))))
}

/// The role of API tokens that may use the AI gateway and nothing else.
pub const AI_ROLE: &str = "ai";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApiTokenRequest {
    pub name: String,
    /// `ai` (the gateway only), `viewer`, `operator` or `admin`.
    pub role: String,
}

/// `POST /api/v1/api-tokens`: a new API token, shown once (the same name replaces the old one).
async fn create_api_token(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: Result<Json<CreateApiTokenRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let Json(b) = body?;
    let token = cp.create_api_token(&b.name, &b.role, &who).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"name": b.name, "role": b.role, "token": token})),
    ))
}

async fn list_users(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
) -> ApiResult<Json<serde_json::Value>> {
    cp.authorize(&who, Op::ManageUsers)?;
    Ok(Json(json!({ "items": cp.store.list_users().await? })))
}

// ----- join tokens -----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// A duration such as `1h` or `30m`; absent: never expires.
    pub ttl: Option<String>,
    /// How many agents may join with it; absent: unlimited.
    pub uses: Option<u32>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreatedTokenView {
    /// The join token to hand to `nebula-agent join --token`. Shown only once.
    pub token: String,
    #[serde(flatten)]
    pub record: TokenView,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub description: String,
    pub labels: Labels,
    pub created_by: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub uses_left: Option<i64>,
    pub uses: i64,
    pub state: String,
}

fn token_view(t: JoinTokenRecord) -> TokenView {
    let now = crate::store::millis(SystemTime::now());
    let state = if t.revoked_at.is_some() {
        "revoked"
    } else if t.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else if t.uses_left.is_some_and(|u| u <= 0) {
        "used"
    } else {
        "active"
    };
    TokenView {
        id: t.id,
        description: t.description,
        labels: t.labels,
        created_by: t.created_by,
        created_at: rfc3339(t.created_at),
        expires_at: t.expires_at.map(rfc3339),
        uses_left: t.uses_left,
        uses: t.uses,
        state: state.into(),
    }
}

async fn create_token(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: Result<Json<CreateTokenRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CreatedTokenView>)> {
    let Json(req) = body?;
    let ttl: Option<Duration> = match req.ttl.as_deref() {
        Some(s) => Some(
            humantime::parse_duration(s)
                .map_err(|e| ApiError::bad_request(format!("ttl `{s}`: {e}")))?,
        ),
        None => None,
    };
    if ttl.is_some_and(|t| t.is_zero() || t > Duration::from_secs(365 * 24 * 3600)) {
        return Err(ApiError::bad_request("ttl must be between 1s and 365d"));
    }
    let created = cp
        .create_join_token(ttl, req.uses, req.labels, &req.description, &who)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedTokenView {
            token: created.token,
            record: token_view(created.record),
        }),
    ))
}

async fn list_tokens(State(cp): State<Arc<ControlPlane>>) -> ApiResult<Json<Page<TokenView>>> {
    let items = cp
        .store
        .list_join_tokens()
        .await?
        .into_iter()
        .map(token_view)
        .collect();
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

async fn revoke_token(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    cp.revoke_join_token(&id, &who).await?;
    Ok(Json(json!({"revoked": id})))
}

// ----- telemetry -----

async fn metrics(State(cp): State<Arc<ControlPlane>>) -> Response {
    match cp.metrics.render() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "encoding metrics failed",
        )
        .into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TelemetryQuery {
    /// RFC 3339 time, or a duration back from now (`15m`, `24h`). Default: 1 h back.
    since: Option<String>,
    /// `raw` (in-memory full resolution) or `1m` (stored rollups).
    resolution: Option<String>,
}

fn parse_since(s: Option<&str>) -> ApiResult<SystemTime> {
    let Some(s) = s else {
        return Ok(SystemTime::now() - Duration::from_secs(3600));
    };
    // Out-of-range times are refused here, at the edge, never formatted or subtracted later.
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    if let Ok(d) = humantime::parse_duration(s) {
        return SystemTime::now()
            .checked_sub(d)
            .filter(|t| *t >= SystemTime::UNIX_EPOCH)
            .ok_or_else(|| ApiError::bad_request(format!("since `{s}` is before 1970")));
    }
    Err(ApiError::bad_request(format!(
        "since `{s}`: use an RFC 3339 time or a duration such as 15m"
    )))
}

/// The latest sample with names filled in from the inventory.
fn sample_view(view: &crate::telemetry::NodeView) -> Option<serde_json::Value> {
    let s = view.latest.as_ref()?;
    let inv = view.inventory.as_ref()?;
    let disks: Vec<_> = inv
        .disks
        .iter()
        .zip(&s.disks_used_bytes)
        .map(|(d, used)| json!({"mount": d.mount, "filesystem": d.filesystem, "used_bytes": used, "total_bytes": d.total_bytes}))
        .collect();
    let nets: Vec<_> = inv
        .interfaces
        .iter()
        .zip(&s.interfaces)
        .map(|(name, r)| json!({"name": name, "rx_bytes_per_sec": r.rx_bytes_per_sec, "tx_bytes_per_sec": r.tx_bytes_per_sec}))
        .collect();
    let gpus: Vec<_> = inv
        .gpus
        .iter()
        .zip(&s.gpus)
        .map(|(g, v)| {
            json!({
                "uuid": g.uuid, "name": g.name, "memory_total_bytes": g.memory_total_bytes,
                "power_limit_mw": g.power_limit_mw, "utilization_percent": v.utilization_percent,
                "memory_used_bytes": v.memory_used_bytes, "temperature_c": v.temperature_c,
                "power_mw": v.power_mw, "fan_percent": v.fan_percent, "sm_clock_mhz": v.sm_clock_mhz,
                "memory_clock_mhz": v.memory_clock_mhz,
                "processes": v.processes.iter().map(|p| json!({"pid": p.pid, "name": p.name, "memory_used_bytes": p.memory_used_bytes})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let containers: Vec<_> = inv
        .containers
        .iter()
        .zip(&s.containers)
        .map(|(c, v)| container_json(&view.name, c, v))
        .collect();
    Some(json!({
        "seq": s.seq,
        "taken_at": rfc3339(i64::try_from(s.taken_at_ms).unwrap_or(0)),
        "received_at": rfc3339(view.received_at_ms),
        "host": s.host,
        "os": inv.os,
        "kernel": inv.kernel,
        "container_runtime": inv.container_runtime,
        "gpu_driver": inv.gpu_driver,
        "disks": disks,
        "interfaces": nets,
        "gpus": gpus,
        "containers": containers,
    }))
}

fn container_json(
    node: &str,
    c: &nebula_protocol::telemetry::ContainerInfo,
    v: &nebula_protocol::telemetry::ContainerSample,
) -> serde_json::Value {
    json!({
        "node": node,
        "id": c.id,
        "name": c.name,
        "image": c.image,
        "labels": c.labels,
        "created": rfc3339(c.created_unix.saturating_mul(1000)),
        "state": v.state.as_str(),
        "health": v.health.as_str(),
        "restart_count": v.restart_count,
        "cpu_percent": v.cpu_percent,
        "memory_used_bytes": v.memory_used_bytes,
        "memory_limit_bytes": v.memory_limit_bytes,
        "net_rx_bytes": v.net_rx_bytes,
        "net_tx_bytes": v.net_tx_bytes,
    })
}

async fn node_telemetry(
    State(cp): State<Arc<ControlPlane>>,
    Path(name): Path<String>,
    query: Result<Query<TelemetryQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let node = cp
        .store
        .node_by_name(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no node named `{name}`")))?;
    let since = parse_since(q.since.as_deref())?;
    let view = cp.telemetry.view(node.id);
    let latest = view.as_ref().and_then(sample_view);
    let resolution = q.resolution.as_deref().unwrap_or("raw");
    let points: serde_json::Value = match resolution {
        "raw" => {
            let since_s = since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as u32)
                .unwrap_or(0);
            let pts: Vec<crate::telemetry::PointView> = cp
                .telemetry
                .history(node.id, since_s)
                .iter()
                .map(Into::into)
                .collect();
            serde_json::to_value(pts).unwrap_or_default()
        }
        "1m" => {
            let rows = cp
                .store
                .rollups(node.id, crate::store::millis(since))
                .await?;
            serde_json::Value::Array(
                rows.iter()
                    .map(|r| {
                        json!({
                            "t": rfc3339(r.minute),
                            "samples": r.samples,
                            "cpu_percent": {"avg": r.cpu.0, "max": r.cpu.1},
                            "memory_used_bytes": {"avg": r.mem_used.0, "max": r.mem_used.1},
                            "load1": {"avg": r.load1.0, "max": r.load1.1},
                            "net_rx_bytes_per_sec": {"avg": r.net_rx.0, "max": r.net_rx.1},
                            "net_tx_bytes_per_sec": {"avg": r.net_tx.0, "max": r.net_tx.1},
                            "gpu_utilization_percent": r.gpu_util.map(|v| json!({"avg": v.0, "max": v.1})),
                            "gpu_memory_used_bytes": r.gpu_mem_used.map(|v| json!({"avg": v.0, "max": v.1})),
                            "gpu_temperature_c": r.gpu_temp.map(|v| json!({"avg": v.0, "max": v.1})),
                            "containers_running": r.containers_running,
                        })
                    })
                    .collect(),
            )
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "resolution `{other}`: use raw or 1m"
            )))
        }
    };
    Ok(Json(json!({
        "node": node.name,
        "resolution": resolution,
        "since": crate::store::rfc3339_seconds(since),
        "latest": latest,
        "points": points,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerQuery {
    node: Option<String>,
    /// `key=value`
    label: Option<String>,
    state: Option<String>,
    health: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list_containers(
    State(cp): State<Arc<ControlPlane>>,
    query: Result<Query<ContainerQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Page<serde_json::Value>>> {
    use nebula_protocol::telemetry::{ContainerHealth, ContainerState};
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(500);
    if limit == 0 || limit > 5000 {
        return Err(ApiError::bad_request("limit must be between 1 and 5000"));
    }
    if let Some(s) = q.state.as_deref() {
        if ContainerState::parse(s) == ContainerState::Unknown && s != "unknown" {
            return Err(ApiError::bad_request(format!(
                "state `{s}` is not a container state"
            )));
        }
    }
    if let Some(h) = q.health.as_deref() {
        if !["none", "starting", "healthy", "unhealthy"].contains(&h) {
            return Err(ApiError::bad_request(format!(
                "health `{h}`: use none, starting, healthy or unhealthy"
            )));
        }
        let _ = ContainerHealth::parse(h);
    }
    let label = match q.label.as_deref() {
        Some(l) => Some(
            l.split_once('=')
                .ok_or_else(|| ApiError::bad_request("label filter reads key=value"))?,
        ),
        None => None,
    };
    if let Some(n) = q.node.as_deref() {
        if cp.store.node_by_name(n).await?.is_none() {
            return Err(ApiError::not_found(format!("no node named `{n}`")));
        }
    }
    let mut items = Vec::new();
    let mut views = cp.telemetry.snapshot();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    for view in &views {
        if q.node.as_deref().is_some_and(|n| n != view.name) {
            continue;
        }
        let (Some(inv), Some(s)) = (view.inventory.as_ref(), view.latest.as_ref()) else {
            continue;
        };
        if inv.epoch != s.epoch {
            continue;
        }
        for (c, v) in inv.containers.iter().zip(&s.containers) {
            if q.state.as_deref().is_some_and(|st| st != v.state.as_str()) {
                continue;
            }
            if q.health.as_deref().is_some_and(|h| h != v.health.as_str()) {
                continue;
            }
            if label.is_some_and(|(k, val)| c.labels.get(k).map(String::as_str) != Some(val)) {
                continue;
            }
            let key = format!("{}/{}", view.name, c.name);
            if q.cursor.as_deref().is_some_and(|cur| key.as_str() <= cur) {
                continue;
            }
            items.push((key, container_json(&view.name, c, v)));
        }
    }
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|(k, _)| k.clone())
    } else {
        None
    };
    Ok(Json(Page {
        items: items.into_iter().map(|(_, v)| v).collect(),
        next_cursor,
    }))
}

/// `GET /api/v1/agent/releases`: the agent builds this controller serves, with the key that
/// signs them.
/// Every background task: scope, kind, state and its last run.
async fn list_tasks(State(cp): State<Arc<ControlPlane>>) -> Json<Vec<crate::tasks::TaskStatus>> {
    Json(cp.tasks.list())
}

async fn agent_releases(State(cp): State<Arc<ControlPlane>>) -> ApiResult<Json<serde_json::Value>> {
    let releases = install::scanned(&cp).await?;
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
async fn models_inventory(State(cp): State<Arc<ControlPlane>>) -> Json<serde_json::Value> {
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
async fn ai_usage(State(cp): State<Arc<ControlPlane>>) -> ApiResult<Json<serde_json::Value>> {
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
async fn models_desired(
    State(cp): State<Arc<ControlPlane>>,
) -> ApiResult<Json<crate::desired::models::ModelsView>> {
    Ok(Json(cp.models_view().await?))
}

#[cfg(test)]
mod input_tests {
    //! Whatever a client asks or an agent reports, the API's views never panic.

    use std::time::Duration;

    use nebula_protocol::telemetry::{
        ContainerInfo, ContainerSample, DiskInfo, GpuInfo, GpuSample, HostSample, NetRate,
        TelemetryInventory, TelemetrySample,
    };
    use proptest::prelude::*;

    use super::{container_json, parse_since, sample_view, summary};
    use crate::telemetry::TelemetryHub;

    fn extreme_u64() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0),
            Just(u64::MAX),
            Just(u64::MAX / 2 + 1),
            any::<u64>()
        ]
    }

    fn extreme_i64() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(i64::MIN),
            Just(i64::MAX),
            Just(-1),
            Just(253_402_300_800),
            any::<i64>()
        ]
    }

    fn extreme_f32() -> impl Strategy<Value = f32> {
        prop_oneof![
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(f32::NEG_INFINITY),
            Just(f32::MAX),
            any::<f32>()
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_since_strings_never_panic(s in ".{0,40}", n in any::<u64>(), unit in "(ns|us|ms|s|m|h|d|w|y|M)") {
            let _ = parse_since(Some(&s));
            if let Ok(t) = parse_since(Some(&format!("{n}{unit}"))) {
                let _ = crate::store::rfc3339_seconds(t);
            }
            if let Ok(t) = parse_since(Some(&s)) {
                let _ = crate::store::rfc3339_seconds(t);
                let _ = crate::store::rfc3339_millis(t);
            }
        }

        #[test]
        fn random_agent_numbers_never_panic_the_views(
            created in extreme_i64(),
            taken in extreme_u64(),
            big in proptest::collection::vec(extreme_u64(), 8),
            f in proptest::collection::vec(extreme_f32(), 5),
            restarts in any::<u32>(),
        ) {
            let hub = TelemetryHub::new(Duration::from_secs(60));
            let id = uuid::Uuid::now_v7();
            hub.register(id, "n1");
            let inv = TelemetryInventory {
                epoch: 1,
                disks: vec![DiskInfo { mount: "/".into(), filesystem: "ext4".into(), total_bytes: big[0] }],
                interfaces: vec!["a".into(), "b".into()],
                gpus: vec![
                    GpuInfo { uuid: "g0".into(), name: "x".into(), memory_total_bytes: big[1], power_limit_mw: Some(u32::MAX) },
                    GpuInfo { uuid: "g1".into(), name: "y".into(), memory_total_bytes: big[2], power_limit_mw: None },
                ],
                containers: vec![ContainerInfo { id: "c".into(), name: "c".into(), image: "i".into(), created_unix: created, ..Default::default() }],
                ..Default::default()
            };
            prop_assert!(hub.set_inventory(id, inv).is_ok());
            let gpu = |used: u64| GpuSample { utilization_percent: Some(u8::MAX), memory_used_bytes: Some(used), power_mw: Some(u32::MAX), ..Default::default() };
            let sample = TelemetrySample {
                epoch: 1,
                seq: 1,
                taken_at_ms: taken,
                host: HostSample {
                    cpu_percent: f[0],
                    per_core_percent: vec![f[1]],
                    load: [f[2], f[3], f[4]],
                    memory_used_bytes: big[3],
                    memory_total_bytes: big[4],
                    swap_used_bytes: big[5],
                    swap_total_bytes: big[6],
                    uptime_secs: big[7],
                },
                disks_used_bytes: vec![big[5]],
                interfaces: vec![
                    NetRate { rx_bytes_per_sec: big[3], tx_bytes_per_sec: big[4] },
                    NetRate { rx_bytes_per_sec: big[4], tx_bytes_per_sec: big[3] },
                ],
                gpus: vec![gpu(big[6]), gpu(big[7])],
                containers: vec![ContainerSample { restart_count: restarts, cpu_percent: Some(f[0]), memory_used_bytes: Some(big[0]), memory_limit_bytes: Some(big[1]), ..Default::default() }],
            };
            prop_assert!(hub.ingest(id, sample).is_ok());
            let view = hub.view(id).expect("registered");
            prop_assert!(summary(&view).is_some());
            let json = sample_view(&view).expect("a sample");
            prop_assert!(json["containers"][0]["created"].is_string());
            let inv = view.inventory.as_ref().expect("inventory");
            let s = view.latest.as_ref().expect("sample");
            let _ = container_json("n1", &inv.containers[0], &s.containers[0]);
            let _ = hub.free_vram(id);
            let _ = hub.history(id, 0);
        }
    }
}
