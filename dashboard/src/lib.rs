//! The web dashboard: pages rendered on the server (maud), served by the controller's HTTP
//! server under `/ui/`, with every asset embedded in the binary and live updates by server-sent
//! events from the controller's event bus.
//!
//! Tasks: none of its own. Each open overview holds one SSE stream whose task (on the
//! controller's tracker) follows the event bus and re-renders the cards of nodes that changed
//! (and every card each [`REFRESH`], for the telemetry figures); a job page's stream is the API's
//! job log stream.
//!
//! Security: a session is a random token in a cookie (`HttpOnly`, `SameSite=Strict`, `Secure`
//! when the request came through TLS, as a proxy's `X-Forwarded-Proto: https` says); the store
//! keeps only its hash. Every form carries the session's CSRF token (the login form a cookie
//! bound one), and every POST checks it. What a user may do is decided by the control plane
//! (each operation authorizes the user's `OpCtx`), whatever the page showed.
//!
//! Layout: this file holds the router, the session middleware and the page layout; each page
//! is a file under `pages/`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup, DOCTYPE};
use nebula_controller::authz::{Op, OpCtx, Via};
use nebula_controller::http::Role;
use nebula_controller::{ControlPlane, OpError};

pub mod charts;

const CSS: &str = include_str!("../assets/style.css");
const JS: &str = include_str!("../assets/live.js");
const CHAT_JS: &str = include_str!("../assets/chat.js");
const LOGS_JS: &str = include_str!("../assets/logs.js");
const TERMINAL_JS: &str = include_str!("../assets/terminal.js");
/// xterm.js from Debian's packages (see `scripts/bundle-xterm`).
const XTERM_JS: &str = include_str!("../assets/vendor/xterm.js");
const XTERM_CSS: &str = include_str!("../assets/vendor/xterm.css");

mod ai;
mod pages;
const SESSION_COOKIE: &str = "nebula_session";
const LOGIN_COOKIE: &str = "nebula_login";
/// How often an open overview gets fresh figures for every card.
pub const REFRESH: Duration = Duration::from_secs(5);
/// Changes this close together go to an open overview as one update.
const COALESCE: Duration = Duration::from_millis(200);

/// The dashboard's routes, to merge into the controller's HTTP server.
pub fn router(cp: Arc<ControlPlane>) -> Router {
    let private = Router::new()
        .route("/ui/", get(overview))
        .route("/ui/events", get(overview_events))
        .route(
            "/ui/events/fragments",
            get(pages::overview::overview_fragments),
        )
        .route("/ui/logout", post(logout))
        .route("/ui/nodes/{name}", get(node_page))
        .route("/ui/monitors", get(pages::monitors::monitors_page))
        .route("/ui/monitors/{name}", get(pages::monitors::monitor_page))
        .route("/ui/alerts", get(pages::alerts::alerts_page))
        .route("/ui/alerts/ack", post(pages::alerts::acknowledge))
        .route("/ui/alerts/silences", post(pages::alerts::add_silence))
        .route(
            "/ui/alerts/silences/expire",
            post(pages::alerts::expire_silence),
        )
        .route("/ui/alerts/sinks/test", post(pages::alerts::test_sink))
        .route(
            "/ui/secrets",
            get(pages::secrets::secrets_page).post(pages::secrets::set_secret),
        )
        .route(
            "/ui/secrets/{name}/remove",
            post(pages::secrets::remove_secret),
        )
        .route("/ui/discord", get(pages::discord::discord_page))
        .route("/ui/discord/token", post(pages::discord::set_token))
        .route("/ui/discord/link", post(pages::discord::link_code))
        .route("/ui/discord/guilds/{id}", post(pages::discord::save_guild))
        .route("/ui/containers", get(containers_page))
        .route(
            "/ui/nodes/{name}/containers/{container}",
            get(container_page),
        )
        .route(
            "/ui/nodes/{name}/containers/{container}/action",
            post(container_action),
        )
        .route(
            "/ui/nodes/{name}/containers/{container}/logs",
            get(container_logs),
        )
        .route(
            "/ui/nodes/{name}/containers/{container}/exec",
            get(container_exec),
        )
        .route("/ui/nodes/{name}/storage", get(storage_page))
        .route(
            "/ui/nodes/{name}/storage/prune",
            get(prune_preview_page).post(prune),
        )
        .route("/ui/nodes/{name}/wake", post(wake_node))
        .route("/ui/services", get(services_page))
        .route("/ui/services/plan", post(plan_map))
        .route("/ui/services/apply", post(apply_map))
        .route("/ui/services/{name}/rollback", post(rollback))
        .route("/ui/workflows", get(pages::workflows::workflows_page))
        .route(
            "/ui/workflows/{name}/run",
            post(pages::workflows::start_run),
        )
        .route("/ui/workflows/runs/{id}", get(pages::workflows::run_page))
        .route(
            "/ui/workflows/runs/{id}/events",
            get(pages::workflows::run_events),
        )
        .route(
            "/ui/workflows/runs/{id}/decide",
            post(pages::workflows::decide),
        )
        .route(
            "/ui/workflows/runs/{id}/cancel",
            post(pages::workflows::cancel),
        )
        .route("/ui/jobs", get(jobs_page))
        .route("/ui/jobs/{id}", get(job_page))
        .route("/ui/jobs/{id}/events", get(job_events))
        .route("/ui/enroll", get(enroll_page).post(enroll))
        .route("/ui/audit", get(audit_page))
        .route("/ui/tasks", get(tasks_page))
        .route("/ui/models", get(ai::models_page))
        .route("/ui/models/events", get(ai::models_events))
        .route("/ui/models/pull", post(ai::pull))
        .route("/ui/models/delete", post(ai::delete))
        .route("/ui/chat", get(ai::chat_page))
        .route("/ui/chat/send", post(ai::chat_send))
        .layer(middleware::from_fn_with_state(cp.clone(), session));
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/login", get(login_page).post(login))
        .route(
            "/ui/assets/style.css",
            get(|| async { asset(CSS, "text/css") }),
        )
        .route(
            "/ui/assets/live.js",
            get(|| async { asset(JS, "text/javascript") }),
        )
        .route(
            "/ui/assets/chat.js",
            get(|| async { asset(CHAT_JS, "text/javascript") }),
        )
        .route(
            "/ui/assets/logs.js",
            get(|| async { asset(LOGS_JS, "text/javascript") }),
        )
        .route(
            "/ui/assets/terminal.js",
            get(|| async { asset(TERMINAL_JS, "text/javascript") }),
        )
        .route(
            "/ui/assets/xterm.js",
            get(|| async { asset(XTERM_JS, "text/javascript") }),
        )
        .route(
            "/ui/assets/xterm.css",
            get(|| async { asset(XTERM_CSS, "text/css") }),
        )
        .merge(private)
        .layer(middleware::map_response(security_headers))
        // Pages compress well (every card has the same shape); event streams are left alone.
        .layer(tower_http::compression::CompressionLayer::new())
        .with_state(cp)
}

/// Scripts only from here, no framing, no sniffing; pages (which may show a one-time join
/// token) are not cached. Inline `style` attributes carry bar widths.
async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

// ----- sessions, roles, CSRF -----

/// The signed-in user of a request.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub csrf: String,
}

impl User {
    fn can(&self, role: Role) -> bool {
        self.role >= role
    }

    /// The operation context for the control plane: it decides what this user may do.
    fn cx(&self) -> OpCtx {
        OpCtx::new(self.name.clone(), self.role, Via::Dashboard)
    }

    /// May this user do `op`? Asked of the control plane (one check for every front end).
    fn authorize(&self, cp: &ControlPlane, op: Op) -> Result<(), OpError> {
        cp.authorize(&self.cx(), op)
    }

    /// Every POST carries the session's CSRF token.
    fn check(&self, token: &str) -> Result<(), Refused> {
        if !token.is_empty() && constant_eq(token.as_bytes(), self.csrf.as_bytes()) {
            Ok(())
        } else {
            Err(Refused(
                "the form's CSRF token is missing or wrong; reload the page and try again".into(),
            ))
        }
    }
}

/// A request refused for its role or its CSRF token: 403 with the reason.
#[derive(Debug)]
struct Refused(String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        problem(StatusCode::FORBIDDEN, &self.0)
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `Secure` when the browser reached us through TLS (a reverse proxy says so).
fn secure(headers: &HeaderMap) -> &'static str {
    match headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
    {
        Some(p) if p.eq_ignore_ascii_case("https") => "; Secure",
        _ => "",
    }
}

async fn session(State(cp): State<Arc<ControlPlane>>, mut req: Request, next: Next) -> Response {
    let token = cookie(req.headers(), SESSION_COOKIE)
        .unwrap_or("")
        .to_owned();
    match cp.ui_session(&token).await {
        Ok(Some(s)) => {
            req.extensions_mut().insert(User {
                name: s.user.username,
                role: Role::parse(&s.user.role),
                csrf: s.csrf,
            });
            next.run(req).await
        }
        Ok(None) if req.method() == axum::http::Method::GET => {
            Redirect::to("/ui/login").into_response()
        }
        Ok(None) => problem(StatusCode::UNAUTHORIZED, "sign in first"),
        Err(e) => op_error(e),
    }
}

fn problem(status: StatusCode, message: &str) -> Response {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Nebula Command" } link rel="stylesheet" href="/ui/assets/style.css"; }
            body { main { h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                p.error role="alert" { (message) } p { a href="/ui/" { "Back to the overview" } } } }
        }
    };
    (status, page).into_response()
}

fn op_error(e: OpError) -> Response {
    match e {
        OpError::NotFound(m) => problem(StatusCode::NOT_FOUND, &m),
        OpError::Invalid(m) => problem(StatusCode::BAD_REQUEST, &m),
        OpError::Conflict(m) => problem(StatusCode::CONFLICT, &m),
        OpError::TooManyRequests(m) => problem(StatusCode::TOO_MANY_REQUESTS, &m),
        OpError::Forbidden(m) => problem(StatusCode::FORBIDDEN, &m),
        OpError::Store(e) => {
            tracing::error!("store error: {e:#}");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error (see the controller log)",
            )
        }
    }
}

// ----- layout -----

fn page(user: &User, title: &str, current: &str, live: Option<&str>, body: Markup) -> Markup {
    let nav: Vec<(&str, &str)> = [
        ("/ui/", "Overview", Role::Viewer),
        ("/ui/containers", "Containers", Role::Viewer),
        ("/ui/alerts", "Alerts", Role::Viewer),
        ("/ui/monitors", "Monitors", Role::Viewer),
        ("/ui/services", "Services", Role::Viewer),
        ("/ui/jobs", "Jobs", Role::Viewer),
        ("/ui/workflows", "Workflows", Role::Viewer),
        ("/ui/models", "Models", Role::Viewer),
        ("/ui/chat", "Chat", Role::Operator),
        ("/ui/discord", "Discord", Role::Viewer),
        ("/ui/secrets", "Secrets", Role::Operator),
        ("/ui/enroll", "Enroll", Role::Admin),
        ("/ui/audit", "Audit", Role::Operator),
        ("/ui/tasks", "Tasks", Role::Viewer),
    ]
    .into_iter()
    .filter(|(_, _, role)| user.can(*role))
    .map(|(href, label, _)| (href, label))
    .collect();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Nebula Command" }
                link rel="stylesheet" href="/ui/assets/style.css";
            }
            body data-live=[live] {
                header {
                    span.brand { "Nebula Command" }
                    nav aria-label="Main" {
                        @for (href, label) in nav {
                            @if href == current { a href=(href) aria-current="page" { (label) } }
                            @else { a href=(href) { (label) } }
                        }
                    }
                    span.dim { (user.name) " (" (format!("{:?}", user.role).to_lowercase()) ")" }
                    form.inline method="post" action="/ui/logout" {
                        input type="hidden" name="csrf" value=(user.csrf);
                        button.secondary type="submit" { "Sign out" }
                    }
                }
                main { (body) }
                script src="/ui/assets/live.js" defer {}
            }
        }
    }
}

/// A live view's server-sent events, from the channel its task sends them on.
fn sse_of(
    rx: tokio::sync::mpsc::Receiver<axum::response::sse::Event>,
) -> axum::response::sse::Sse<
    impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|ev| (Ok(ev), rx))
    });
    axum::response::sse::Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default())
}

fn csrf_field(user: &User) -> Markup {
    html! { input type="hidden" name="csrf" value=(user.csrf); }
}

fn node_dom_id(name: &str) -> String {
    format!("node-{name}")
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 30) as f64)
}

fn pct_bar(p: f32) -> Markup {
    html! { div.bar role="presentation" { i style={"width:" (format!("{:.0}", p.clamp(0.0, 100.0))) "%"} {} } }
}

use pages::admin::{audit_page, tasks_page};
use pages::containers::{
    container_action, container_exec, container_logs, container_page, containers_page,
};
use pages::enroll::{enroll, enroll_page};
use pages::jobs::{job_events, job_page, jobs_page};
use pages::login::{login, login_page, logout};
use pages::node::{node_page, wake_node};
pub use pages::overview::{node_card, overview_html};
use pages::overview::{overview, overview_events};
use pages::services::{apply_map, plan_map, rollback, services_page};
use pages::storage::{prune, prune_preview_page, storage_page};

/// What every page file uses.
mod prelude {
    pub(crate) use std::collections::BTreeMap;
    pub(crate) use std::convert::Infallible;
    pub(crate) use std::sync::Arc;
    pub(crate) use std::time::{Duration, SystemTime};

    pub(crate) use axum::extract::rejection::FormRejection;
    pub(crate) use axum::extract::{ConnectInfo, Form, Path, Query, State};
    pub(crate) use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
    pub(crate) use axum::response::sse::{Event as SseEvent, Sse};
    pub(crate) use axum::response::{IntoResponse, Redirect, Response};
    pub(crate) use axum::Extension;
    pub(crate) use futures::Stream;
    pub(crate) use maud::{html, Markup, DOCTYPE};
    pub(crate) use nebula_controller::authz::Op;
    pub(crate) use nebula_controller::events::Event;
    pub(crate) use nebula_controller::http::{node_view, NodeStatus, NodeView, Role};
    pub(crate) use nebula_controller::jobs::model::JobRecord;
    pub(crate) use nebula_controller::store::jobs::{AuditFilter, JobFilter};
    pub(crate) use nebula_controller::{ControlPlane, OpError};
    pub(crate) use serde::Deserialize;

    pub(crate) use super::pages::login::CsrfForm;
    pub(crate) use super::{
        charts, constant_eq, cookie, csrf_field, gib, node_dom_id, op_error, page, pct_bar,
        problem, secure, sse_of, User, COALESCE, LOGIN_COOKIE, REFRESH, SESSION_COOKIE,
    };
}
