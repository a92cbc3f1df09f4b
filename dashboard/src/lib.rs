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
//! bound one), and every POST checks it. Roles are enforced here on every action, whatever the
//! page showed: viewer < operator < admin (the API's `Role`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::rejection::FormRejection;
use axum::extract::{ConnectInfo, Form, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use futures::Stream;
use maud::{html, Markup, DOCTYPE};
use nebula_controller::authz::{Op, OpCtx, Via};
use nebula_controller::events::Event;
use nebula_controller::http::{node_view, NodeStatus, NodeView, Role};
use nebula_controller::jobs::model::{JobRecord, Target, Work};
use nebula_controller::jobs::NewJob;
use nebula_controller::store::jobs::{AuditFilter, JobFilter};
use nebula_controller::{ControlPlane, OpError};
use serde::Deserialize;

pub mod charts;

const CSS: &str = include_str!("../assets/style.css");
const JS: &str = include_str!("../assets/live.js");
const CHAT_JS: &str = include_str!("../assets/chat.js");

mod ai;
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
        .route("/ui/logout", post(logout))
        .route("/ui/nodes/{name}", get(node_page))
        .route("/ui/nodes/{name}/restart", post(restart_container))
        .route("/ui/nodes/{name}/wake", post(wake_node))
        .route("/ui/services", get(services_page))
        .route("/ui/services/plan", post(plan_map))
        .route("/ui/services/apply", post(apply_map))
        .route("/ui/services/{name}/rollback", post(rollback))
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
        ("/ui/services", "Services", Role::Viewer),
        ("/ui/jobs", "Jobs", Role::Viewer),
        ("/ui/models", "Models", Role::Viewer),
        ("/ui/chat", "Chat", Role::Operator),
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

/// One node's card on the overview.
pub fn node_card(n: &NodeView) -> Markup {
    let status = n.status.as_str();
    html! {
        a.card id=(node_dom_id(&n.name)) href={"/ui/nodes/" (n.name)} data-status=(status) {
            h3 { span { (n.name) } span class={"badge " (status)} { (status) } }
            @if let Some(t) = &n.telemetry {
                dl {
                    dt { "CPU" } dd { (format!("{:.0}%", t.cpu_percent)) (pct_bar(t.cpu_percent)) }
                    dt { "Memory" } dd {
                        (gib(t.memory_used_bytes)) " / " (gib(t.memory_total_bytes)) " GiB"
                        (pct_bar(if t.memory_total_bytes > 0 { t.memory_used_bytes as f32 * 100.0 / t.memory_total_bytes as f32 } else { 0.0 }))
                    }
                    @if t.gpus > 0 {
                        dt { "GPU" } dd {
                            (t.gpu_utilization_percent.map(|u| format!("{u:.0}%")).unwrap_or_else(|| "-".into()))
                            " · VRAM "
                            (t.gpu_memory_used_bytes.map(gib).unwrap_or_else(|| "-".into())) " / "
                            (t.gpu_memory_total_bytes.map(gib).unwrap_or_else(|| "-".into())) " GiB"
                        }
                    }
                    dt { "Containers" } dd.containers {
                        span.running { (t.containers_running) " running" }
                        @if t.containers_unhealthy > 0 { ", " span.unhealthy { (t.containers_unhealthy) " unhealthy" } }
                        span.dim { " of " (t.containers_total) }
                    }
                    dt { "Last seen" } dd { (ago(n.last_seen_at.as_deref())) }
                }
            } @else {
                p.dim { "No telemetry yet. Last seen " (ago(n.last_seen_at.as_deref())) "." }
            }
        }
    }
}

fn totals(nodes: &[NodeView]) -> Markup {
    let online = nodes
        .iter()
        .filter(|n| n.status == NodeStatus::Online)
        .count();
    let running: usize = nodes
        .iter()
        .filter_map(|n| n.telemetry.as_ref())
        .map(|t| t.containers_running)
        .sum();
    let unhealthy: usize = nodes
        .iter()
        .filter_map(|n| n.telemetry.as_ref())
        .map(|t| t.containers_unhealthy)
        .sum();
    let gpus: usize = nodes
        .iter()
        .filter_map(|n| n.telemetry.as_ref())
        .map(|t| t.gpus)
        .sum();
    html! {
        div.totals id="totals" {
            span { b { (online) } " of " (nodes.len()) " nodes online" }
            span { b { (running) } " containers running" }
            span { b { (unhealthy) } " unhealthy" }
            span { b { (gpus) } " GPUs" }
        }
    }
}

async fn all_nodes(cp: &ControlPlane) -> Result<Vec<NodeView>, OpError> {
    Ok(cp
        .store
        .list_nodes()
        .await?
        .into_iter()
        .map(|n| node_view(cp, n))
        .collect())
}

/// Zones with more nodes than this show counts only in the topology.
const TOPOLOGY_LIST: usize = 24;

/// Controller -> nodes, grouped by their `zone` label.
fn topology(nodes: &[NodeView]) -> Markup {
    let mut zones: BTreeMap<&str, Vec<&NodeView>> = BTreeMap::new();
    for n in nodes {
        zones
            .entry(
                n.labels
                    .get("zone")
                    .map(String::as_str)
                    .unwrap_or("(no zone)"),
            )
            .or_default()
            .push(n);
    }
    html! {
        div.topo id="topology" {
            @for (zone, members) in &zones {
                @let online = members.iter().filter(|n| n.status == NodeStatus::Online).count();
                section aria-label={"zone " (zone)} {
                    b { (zone) } " " span.dim { (online) "/" (members.len()) " online" }
                    // A large zone is a count (its nodes are the cards above).
                    @if members.len() <= TOPOLOGY_LIST {
                        ul { @for n in members {
                            @let status = n.status.as_str();
                            li { a href={"/ui/nodes/" (n.name)} { (n.name) } " " span class={"badge " (status)} { (status) } }
                        } }
                    }
                }
            }
        }
    }
}

/// "12s ago" from an RFC 3339 time.
fn ago(rfc3339: Option<&str>) -> String {
    let Some(t) = rfc3339.and_then(|t| humantime::parse_rfc3339(t).ok()) else {
        return "never".into();
    };
    match SystemTime::now().duration_since(t) {
        Ok(d) if d.as_secs() < 5 => "just now".into(),
        Ok(d) => format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(d.as_secs()))
        ),
        Err(_) => "just now".into(),
    }
}

/// The overview's HTML (also what the render benchmark times).
pub fn overview_html(user: &User, nodes: &[NodeView]) -> Markup {
    let body = html! {
        h1 { "Command center" }
        (totals(nodes))
        div.actions {
            @if user.can(Role::Admin) { a.button href="/ui/enroll" { "Enroll a node" } }
            a.button href="/ui/services" { "Services and plan" }
            a.button href="/ui/jobs" { "Jobs" }
        }
        h2 { "Nodes" }
        div.cards id="cards" {
            @for n in nodes { (node_card(n)) }
        }
        @if nodes.is_empty() { p.dim id="no-cards" { "No node has joined yet."
            @if user.can(Role::Admin) { " " a href="/ui/enroll" { "Enroll one." } } } }
        h2 { "Topology" }
        p.dim { "Controller → nodes, grouped by the " code { "zone" } " label." }
        (topology(nodes))
    };
    page(user, "Overview", "/ui/", Some("/ui/events"), body)
}

async fn overview(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
) -> Response {
    match all_nodes(&cp).await {
        Ok(nodes) => overview_html(&user, &nodes).into_response(),
        Err(e) => op_error(e),
    }
}

/// Live cards: a node's card when something about it changes (changes within [`COALESCE`] go
/// out together), every card each [`REFRESH`]. The stream ends with the session.
async fn overview_events(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let token = cookie(&headers, SESSION_COOKIE).unwrap_or("").to_owned();
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(64);
    let mut events = cp.events.subscribe();
    let cp2 = cp.clone();
    let shutdown = cp.shutdown.clone();
    cp.tracker.spawn(async move {
        let mut tick = tokio::time::interval(REFRESH);
        tick.tick().await;
        loop {
            let names: Option<Vec<String>> = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                _ = tick.tick() => {
                    // Signed out or expired: the stream ends.
                    if !matches!(cp2.ui_session(&token).await, Ok(Some(_))) {
                        return;
                    }
                    None
                }
                ev = events.recv() => match ev {
                    Ok(Event::NodeOnline { name, .. })
                    | Ok(Event::NodeOffline { name, .. })
                    | Ok(Event::NodeEnrolled { name, .. })
                    | Ok(Event::ContainerChanged { node: name, .. }) => {
                        // Take what else changes meanwhile into the same update.
                        let mut names = vec![name];
                        let until = tokio::time::Instant::now() + COALESCE;
                        while let Ok(Ok(ev)) = tokio::time::timeout_at(until, events.recv()).await {
                            match ev {
                                Event::NodeOnline { name, .. }
                                | Event::NodeOffline { name, .. }
                                | Event::NodeEnrolled { name, .. }
                                | Event::ContainerChanged { node: name, .. }
                                    if !names.contains(&name) =>
                                {
                                    names.push(name);
                                }
                                _ => {}
                            }
                        }
                        Some(names)
                    }
                    Ok(Event::NodeRemoved { name, .. }) => {
                        let gone = SseEvent::default().event("gone").data(node_dom_id(&name));
                        if tx.send(gone).await.is_err() { return; }
                        None
                    }
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            };
            let Ok(nodes) = all_nodes(&cp2).await else {
                continue;
            };
            for n in nodes
                .iter()
                .filter(|n| names.as_ref().is_none_or(|w| w.contains(&n.name)))
            {
                let ev = SseEvent::default()
                    .event("node")
                    .data(node_card(n).into_string());
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            for fragment in [totals(&nodes), topology(&nodes)] {
                let ev = SseEvent::default()
                    .event("fragment")
                    .data(fragment.into_string());
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|ev| (Ok(ev), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

// ----- login -----

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
}

fn login_html(token: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Sign in · Nebula Command" }
                link rel="stylesheet" href="/ui/assets/style.css";
            }
            body {
                main {
                    form.login method="post" action="/ui/login" {
                        h1 { "Nebula Command" }
                        @if let Some(e) = error { p.error role="alert" { (e) } }
                        input type="hidden" name="csrf" value=(token);
                        label for="username" { "Username" }
                        input id="username" name="username" autocomplete="username" required autofocus;
                        label for="password" { "Password" }
                        input id="password" name="password" type="password" autocomplete="current-password" required;
                        p { button type="submit" { "Sign in" } }
                    }
                }
            }
        }
    }
}

fn login_cookie(headers: &HeaderMap, token: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{LOGIN_COOKIE}={token}; Path=/ui/login; HttpOnly; SameSite=Strict; Max-Age=3600{}",
        secure(headers)
    ))
    .expect("ASCII cookie")
}

fn new_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The sign-in form's token: the one its cookie already holds (a page loaded twice must not
/// leave the cookie and the form disagreeing), else a new one.
fn login_token(headers: &HeaderMap) -> String {
    cookie(headers, LOGIN_COOKIE)
        .filter(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
        .unwrap_or_else(new_token)
}

async fn login_page(headers: HeaderMap) -> Response {
    let token = login_token(&headers);
    (
        [(header::SET_COOKIE, login_cookie(&headers, &token))],
        login_html(&token, None),
    )
        .into_response()
}

async fn login(
    State(cp): State<Arc<ControlPlane>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return problem(StatusCode::BAD_REQUEST, "the sign-in form is incomplete");
    };
    let bound = cookie(&headers, LOGIN_COOKIE).unwrap_or("");
    if f.csrf.is_empty() || !constant_eq(f.csrf.as_bytes(), bound.as_bytes()) {
        return problem(
            StatusCode::FORBIDDEN,
            "the sign-in form's CSRF token is missing or wrong; reload the page",
        );
    }
    let source = cp.client_ip(peer, &headers);
    match cp.login(&f.username, &f.password, source).await {
        Ok((token, s)) => {
            let max_age =
                (s.expires_at - nebula_controller::store::millis(SystemTime::now())) / 1000;
            let set = HeaderValue::from_str(&format!(
                "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
                secure(&headers)
            ))
            .expect("ASCII cookie");
            ([(header::SET_COOKIE, set)], Redirect::to("/ui/")).into_response()
        }
        Err(e @ (OpError::Invalid(_) | OpError::TooManyRequests(_))) => {
            let (status, m) = match e {
                OpError::TooManyRequests(m) => (StatusCode::TOO_MANY_REQUESTS, m),
                OpError::Invalid(m) => (StatusCode::UNAUTHORIZED, m),
                _ => unreachable!("matched above"),
            };
            let token = login_token(&headers);
            (
                status,
                [(header::SET_COOKIE, login_cookie(&headers, &token))],
                login_html(&token, Some(&m)),
            )
                .into_response()
        }
        Err(e) => op_error(e),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let csrf = form.map(|Form(f)| f.csrf).unwrap_or_default();
    if let Err(r) = user.check(&csrf) {
        return r.into_response();
    }
    if let Some(token) = cookie(&headers, SESSION_COOKIE) {
        if let Err(e) = cp.logout(token).await {
            return op_error(e);
        }
    }
    let clear =
        HeaderValue::from_static("nebula_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, clear)], Redirect::to("/ui/login")).into_response()
}

// ----- node page -----

/// One point of the node charts: (unix s, CPU %, memory GiB, GPU %, rx KiB/s, tx KiB/s).
type ChartRow = (i64, f64, f64, Option<f64>, f64, f64);

#[derive(Deserialize)]
struct RangeQuery {
    range: Option<String>,
}

async fn node_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path(name): Path<String>,
    Query(q): Query<RangeQuery>,
) -> Response {
    let rec = match cp.store.node_by_name(&name).await {
        Ok(Some(n)) => n,
        Ok(None) => return problem(StatusCode::NOT_FOUND, &format!("no node named `{name}`")),
        Err(e) => return op_error(e.into()),
    };
    let id = rec.id;
    let view = node_view(&cp, rec);
    let range = match q.range.as_deref() {
        Some("24h") => ("24h", 86_400),
        Some("7d") => ("7d", 7 * 86_400),
        _ => ("1h", 3600),
    };
    let now = nebula_controller::store::millis(SystemTime::now()) / 1000;
    let from = now - range.1;
    let mut rows: Vec<ChartRow> = Vec::new();
    if range.1 <= 3600 {
        for p in cp.telemetry.history(id, from as u32) {
            rows.push((
                i64::from(p.t),
                f64::from(p.cpu) / 100.0,
                f64::from(p.mem_used_mib) / 1024.0,
                (p.gpu_util != 255).then_some(f64::from(p.gpu_util)),
                f64::from(p.net_rx_kib_s),
                f64::from(p.net_tx_kib_s),
            ));
        }
    } else {
        match cp.store.rollups(id, from * 1000).await {
            Ok(rs) => {
                for r in rs {
                    rows.push((
                        r.minute / 1000,
                        r.cpu.0,
                        r.mem_used.0 / (1u64 << 30) as f64,
                        r.gpu_util.map(|g| g.0),
                        r.net_rx.0 / 1024.0,
                        r.net_tx.0 / 1024.0,
                    ));
                }
            }
            Err(e) => return op_error(e.into()),
        }
    }
    let series = |name: &'static str, color: &'static str, f: &dyn Fn(&ChartRow) -> Option<f64>| {
        charts::Series {
            name,
            color,
            points: rows.iter().filter_map(|r| f(r).map(|v| (r.0, v))).collect(),
        }
    };
    let mem_total = view
        .telemetry
        .as_ref()
        .filter(|t| t.memory_total_bytes > 0)
        .map(|t| t.memory_total_bytes as f64 / (1u64 << 30) as f64);
    let can_wake = cp
        .desired
        .active()
        .is_some_and(|a| a.desired.wake.contains_key(&view.name));
    let telemetry = cp.telemetry.view(id);
    let inventory = telemetry.as_ref().and_then(|v| v.inventory.clone());
    let latest = telemetry.as_ref().and_then(|v| v.latest.clone());
    let body = html! {
        h1 { (view.name) " " span class={"badge " (view.status.as_str())} { (view.status.as_str()) } }
        @if view.status != NodeStatus::Online && user.can(Role::Operator) && can_wake {
            form.inline method="post" action={"/ui/nodes/" (view.name) "/wake"} {
                (csrf_field(&user))
                button type="submit" id="wake-button" { "Wake" }
            }
        }
        div.actions role="group" aria-label="Range" {
            @for r in ["1h", "24h", "7d"] {
                @if r == range.0 { a.button href={"?range=" (r)} aria-current="true" { (r) } }
                @else { a.button.secondary href={"?range=" (r)} { (r) } }
            }
        }
        div.charts {
            (charts::line_chart("CPU", "%", &[series("cpu", "#58a6ff", &|r| Some(r.1))], from, now, Some(100.0)))
            (charts::line_chart("Memory", "GiB", &[series("used", "#3fb950", &|r| Some(r.2))], from, now, mem_total))
            (charts::line_chart("GPU", "%", &[series("utilisation", "#d29922", &|r| r.3)], from, now, Some(100.0)))
            (charts::line_chart("Network", "KiB/s", &[series("rx", "#58a6ff", &|r| Some(r.4)), series("tx", "#f778ba", &|r| Some(r.5))], from, now, None))
        }
        h2 { "Facts" }
        table { tbody {
            tr { th { "Agent" } td { (view.agent_version) } }
            tr { th { "OS" } td { (view.facts.os) " " (view.facts.kernel) " (" (view.facts.arch) ")" } }
            tr { th { "CPUs / memory" } td { (view.facts.cpu_count) " / " (gib(view.facts.memory_bytes)) " GiB" } }
            tr { th { "Labels" } td { @for (k, v) in &view.labels { code { (k) "=" (v) } " " } } }
            tr { th { "Certificate expires" } td { (view.cert_not_after.as_deref().unwrap_or("-")) } }
            tr { th { "Last seen" } td { (view.last_seen_at.as_deref().unwrap_or("-")) } }
        } }
        @if let (Some(inv), Some(s)) = (&inventory, &latest) {
            @if !inv.gpus.is_empty() {
                h2 { "GPU processes" }
                div.scroll { table {
                    thead { tr { th { "GPU" } th { "PID" } th { "Process" } th { "Memory" } } }
                    tbody { @for (g, gs) in inv.gpus.iter().zip(&s.gpus) { @for p in &gs.processes {
                        tr { td { (g.name) } td { (p.pid) } td { (p.name) } td { (format!("{} MiB", p.memory_used_bytes >> 20)) } }
                    } } }
                } }
            }
        }
        h2 { "Containers" }
        @if let Some(inv) = &inventory {
            div.scroll { table {
                thead { tr { th { "Name" } th { "Image" } th { "State" } th { "Health" } th { "Service" } @if user.can(Role::Operator) { th { "Action" } } } }
                tbody { @for (i, c) in inv.containers.iter().enumerate() {
                    @let sample = latest.as_ref().filter(|s| s.epoch == inv.epoch).and_then(|s| s.containers.get(i));
                    @let state = sample.map(|s| s.state.as_str()).unwrap_or("unknown");
                    @let health = sample.map(|s| s.health.as_str()).unwrap_or("none");
                    tr id={"container-" (c.name)} {
                        td { (c.name) } td { code { (c.image) } }
                        td { span class={"badge " (state)} { (state) } }
                        td { span class={"badge " (health)} { (health) } }
                        td { (c.labels.get("nebula.service").map(String::as_str).unwrap_or("-")) }
                        @if user.can(Role::Operator) { td {
                            form.inline method="post" action={"/ui/nodes/" (view.name) "/restart"} {
                                (csrf_field(&user))
                                input type="hidden" name="container" value=(c.name);
                                button.secondary type="submit" aria-label={"Restart " (c.name)} { "Restart" }
                            }
                        } }
                    }
                } }
            } }
        } @else { p.dim { "No container inventory yet." } }
    };
    page(&user, &view.name, "", None, body).into_response()
}

#[derive(Deserialize, Default)]
struct RestartForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    container: String,
}

async fn restart_container(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path(name): Path<String>,
    form: Result<Form<RestartForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    let job = cp
        .create_job(
            NewJob {
                work: Work::Exec {
                    op: "docker-restart".into(),
                    args: vec![f.container],
                },
                target: Target::Node(name),
                deadline: Some(Duration::from_secs(120)),
                idempotent: false,
                max_attempts: None,
            },
            &user.cx(),
        )
        .await;
    match job {
        Ok(j) => Redirect::to(&format!("/ui/jobs/{}", j.id)).into_response(),
        Err(e) => op_error(e),
    }
}

async fn wake_node(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path(name): Path<String>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let csrf = form.map(|Form(f)| f.csrf).unwrap_or_default();
    if let Err(r) = user.check(&csrf) {
        return r.into_response();
    }
    match cp.wake_node(&name, &user.cx()).await {
        Ok(w) => Redirect::to(&format!("/ui/jobs/{}", w.job)).into_response(),
        Err(e) => op_error(e),
    }
}

// ----- services -----

#[derive(Deserialize, Default)]
struct MapForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    document: String,
}

fn plan_markup(plan: &serde_json::Value) -> Markup {
    let actions = plan["actions"].as_array().cloned().unwrap_or_default();
    let waiting = plan["waiting"].as_array().cloned().unwrap_or_default();
    let refused = plan["refused"].as_array().cloned().unwrap_or_default();
    let s = |v: &serde_json::Value| {
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    };
    html! {
        section id="plan" aria-label="Plan" {
            @if actions.is_empty() && waiting.is_empty() && refused.is_empty() {
                p { "No changes: " (plan["unchanged"]) " service(s) match the map." }
            }
            ul {
                @for a in &actions {
                    li class={"plan-" (s(&a["action"]))} {
                        b { (s(&a["action"])) } " " (s(&a["service"])) " on " (s(&a["node"]))
                        @match s(&a["action"]).as_str() {
                            "update" => {
                                " (" (a["from"].as_array().map(|f| f.iter().map(&s).collect::<Vec<_>>().join(",")).unwrap_or_default()) " → " (s(&a["to"])) ")"
                                @for c in a["changes"].as_array().into_iter().flatten() {
                                    div.diff { code { (s(&c["field"])) ": " (c["from"].to_string()) " → " (c["to"].to_string()) } }
                                }
                            }
                            "create" | "repair" => { ", " (a["replicas"]) " replica(s) of " (s(&a["revision"])) }
                            _ => { ", " (a["containers"]) " container(s): " (s(&a["reason"])) }
                        }
                    }
                }
                @for w in &refused {
                    li.refused { "refused: " (s(&w["service"])) @if let Some(n) = w["node"].as_str() { " on " (n) } ": " (s(&w["reason"])) }
                }
                @for w in &waiting {
                    li.waiting { "waiting: " (s(&w["service"])) @if let Some(n) = w["node"].as_str() { " on " (n) } ": " (s(&w["reason"])) }
                }
            }
        }
    }
}

async fn services_view(
    cp: &ControlPlane,
    user: &User,
    document: Option<String>,
    notice: Option<Markup>,
) -> Response {
    let services = match cp.services().await {
        Ok(s) => s,
        Err(e) => return op_error(e),
    };
    let history = match cp.store.deployments(None, 30).await {
        Ok(h) => h,
        Err(e) => return op_error(e.into()),
    };
    let active = cp.desired.active();
    let document = document
        .or_else(|| active.as_ref().map(|a| a.record.document.clone()))
        .unwrap_or_default();
    let body = html! {
        h1 { "Services" }
        @if let Some(n) = notice { (n) }
        @if let Some(a) = &active {
            p.dim { "Map version " (a.record.version) " from " (a.record.source) " by " (a.record.created_by) "." }
        } @else { p.dim { "No service map is in force yet." } }
        div.scroll { table id="services" {
            thead { tr { th { "Service" } th { "Status" } th { "Revision" } th { "Image" } th { "Healthy / running / wanted" } th { "Nodes" } th { "Last deploy" } @if user.can(Role::Operator) { th { "Action" } } } }
            tbody { @for s in &services {
                tr id={"service-" (s.name)} {
                    td { (s.name) }
                    td { span class={"badge " (s.status)} { (s.status) } @if let Some(m) = &s.message { div.dim { (m) } } }
                    td { code { (s.revision.as_deref().unwrap_or("-")) } @if let Some(r) = &s.serving_revision { div.dim { "runs " code { (r) } } } }
                    td { code { (s.image.as_deref().unwrap_or("-")) } }
                    td { (s.healthy) " / " (s.running) " / " (s.replicas) }
                    td { (s.containers.iter().map(|c| c.node.as_str()).collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>().join(", ")) }
                    td { @if let Some(d) = &s.last_deployment { span class={"badge " (d.outcome)} { (d.outcome) } " " (d.action) " " code { (d.revision) } } }
                    @if user.can(Role::Operator) { td { @if s.declared {
                        form.inline method="post" action={"/ui/services/" (s.name) "/rollback"} {
                            (csrf_field(user))
                            button.secondary type="submit" aria-label={"Roll back " (s.name)} { "Roll back" }
                        }
                    } } }
                }
            } }
        } }
        h2 { "Recent deployments" }
        div.scroll { table id="history" {
            thead { tr { th { "When" } th { "Service" } th { "Action" } th { "Node" } th { "Revision" } th { "Outcome" } th { "Trigger" } th { "Message" } } }
            tbody { @for d in &history {
                tr { td { (nebula_controller::store::rfc3339_seconds(nebula_controller::store::from_millis(d.started_at))) }
                     td { (d.service) } td { (d.action) } td { (d.node) } td { code { (d.revision) } }
                     td { span class={"badge " (d.outcome)} { (d.outcome) } } td { (d.trigger) }
                     td { (d.message.as_deref().unwrap_or("")) } }
            } }
        } }
        h2 { "Service map" }
        form method="post" action="/ui/services/plan" id="map-form" {
            (csrf_field(user))
            label for="document" { "service-map.yml" }
            textarea id="document" name="document" spellcheck="false" { (document) }
            div.actions {
                button type="submit" formaction="/ui/services/plan" id="plan-button" { "Plan" }
                @if user.can(Role::Admin) {
                    button type="submit" formaction="/ui/services/apply" id="apply-button" { "Apply" }
                }
            }
        }
    };
    page(user, "Services", "/ui/services", None, body).into_response()
}

async fn services_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
) -> Response {
    services_view(&cp, &user, None, None).await
}

fn map_problems(errors: &nebula_controller::desired::map::MapErrors) -> Markup {
    html! {
        div.error role="alert" id="map-errors" {
            p { "The map is not valid; nothing changed:" }
            ul { @for p in &errors.0 { li { code { (p.line) ":" (p.column) } " " (p.message) } } }
        }
    }
}

async fn plan_map(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    form: Result<Form<MapForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    let notice = match cp.preview_plan(&f.document).await {
        Ok(plan) => plan_markup(&serde_json::to_value(&plan).unwrap_or_default()),
        Err(nebula_controller::desired::ApplyError::Map(e)) => map_problems(&e),
        Err(nebula_controller::desired::ApplyError::Op(e)) => return op_error(e),
    };
    services_view(&cp, &user, Some(f.document), Some(notice)).await
}

async fn apply_map(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    form: Result<Form<MapForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    let notice = match cp.apply_desired(&f.document, "ui", &user.cx()).await {
        Ok(applied) => html! {
            p id="applied" role="status" { "Applied as version " (applied.version) ". The reconciler is on it." }
            (plan_markup(&serde_json::to_value(&applied.plan).unwrap_or_default()))
        },
        Err(nebula_controller::desired::ApplyError::Map(e)) => map_problems(&e),
        Err(nebula_controller::desired::ApplyError::Op(e)) => return op_error(e),
    };
    services_view(&cp, &user, Some(f.document), Some(notice)).await
}

async fn rollback(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path(name): Path<String>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let csrf = form.map(|Form(f)| f.csrf).unwrap_or_default();
    if let Err(r) = user.check(&csrf) {
        return r.into_response();
    }
    let notice = match cp.rollback_service(&name, None, &user.cx()).await {
        Ok(pin) => {
            html! { p role="status" { (pin.service) " is going back to revision " code { (pin.revision) } "." } }
        }
        Err(e @ (OpError::Store(_) | OpError::Forbidden(_))) => return op_error(e),
        Err(e) => html! { p.error role="alert" { (e.to_string()) } },
    };
    services_view(&cp, &user, None, Some(notice)).await
}

// ----- jobs -----

#[derive(Deserialize)]
struct JobsQuery {
    state: Option<String>,
    node: Option<String>,
}

fn job_what(j: &JobRecord) -> String {
    match &j.work {
        Work::Exec { op, args } => format!("{op} {}", args.join(" ")),
        Work::Probe { http, tcp, .. } => {
            format!("probe {}", http.clone().or(tcp.clone()).unwrap_or_default())
        }
        Work::Deploy(d) => format!("deploy {} {}", d.service, d.revision),
        Work::DeployWithHostAccess(d) => format!(
            "deploy {} {} (host access)",
            d.deploy.service, d.deploy.revision
        ),
        Work::Undeploy(u) => format!("undeploy {}", u.service),
        w => w.kind().to_owned(),
    }
}

async fn jobs_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Query(q): Query<JobsQuery>,
) -> Response {
    let filter = JobFilter {
        state: q
            .state
            .as_deref()
            .and_then(nebula_controller::jobs::JobState::parse),
        node: q.node.clone().filter(|n| !n.is_empty()),
        limit: 200,
        ..Default::default()
    };
    let jobs = match cp.store.list_jobs(&filter).await {
        Ok(j) => j,
        Err(e) => return op_error(e.into()),
    };
    let states = [
        "",
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "timed_out",
        "lost",
    ];
    let body = html! {
        h1 { "Jobs" }
        form method="get" action="/ui/jobs" .actions {
            label for="state" { "State" }
            select id="state" name="state" { @for s in states {
                option value=(s) selected[q.state.as_deref() == Some(s)] { (if s.is_empty() { "any" } else { s }) }
            } }
            label for="node" { "Node" }
            input id="node" name="node" value=(q.node.clone().unwrap_or_default());
            button type="submit" { "Filter" }
        }
        div.scroll { table {
            thead { tr { th { "Job" } th { "What" } th { "Node" } th { "State" } th { "By" } } }
            tbody { @for j in &jobs {
                tr { td { a href={"/ui/jobs/" (j.id)} { code { (j.id.to_string()[..8]) } } }
                     td { (job_what(j)) } td { (j.node.as_deref().unwrap_or("-")) }
                     td { span class={"badge " (j.state.as_str())} { (j.state.as_str()) } } td { (j.created_by) } }
            } }
        } }
    };
    page(&user, "Jobs", "/ui/jobs", None, body).into_response()
}

async fn job_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return problem(StatusCode::NOT_FOUND, "no such job");
    };
    let job = match cp.job(id).await {
        Ok(Some(j)) => j,
        Ok(None) => return problem(StatusCode::NOT_FOUND, "no such job"),
        Err(e) => return op_error(e),
    };
    let events = format!("/ui/jobs/{id}/events");
    let body = html! {
        h1 { "Job " code { (id.to_string()[..8]) } " " span id="job-state" class={"badge " (job.state.as_str())} { (job.state.as_str()) } }
        table { tbody {
            tr { th { "What" } td { (job_what(&job)) } }
            tr { th { "Node" } td { (job.node.as_deref().unwrap_or("-")) } }
            tr { th { "Routing" } td { (job.routing.as_deref().unwrap_or("-")) } }
            tr { th { "By" } td { (job.created_by) } }
            @if let Some(e) = &job.error { tr { th { "Error" } td.error { (e) } } }
        } }
        h2 { "Log" }
        pre id="log" aria-live="polite" {}
    };
    page(&user, "Job", "/ui/jobs", Some(&events), body).into_response()
}

async fn job_events(State(cp): State<Arc<ControlPlane>>, Path(id): Path<String>) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return problem(StatusCode::NOT_FOUND, "no such job");
    };
    match nebula_controller::http::job_log_stream(cp, id, true).await {
        Ok(sse) => sse.into_response(),
        Err(e) => e.into_response(),
    }
}

// ----- enrollment -----

#[derive(Deserialize)]
struct EnrollForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    ttl: String,
    #[serde(default)]
    uses: String,
}

fn enroll_form(user: &User) -> Markup {
    html! {
        form method="post" action="/ui/enroll" .actions {
            (csrf_field(user))
            label for="ttl" { "Valid for" }
            select id="ttl" name="ttl" { option value="1h" { "1 hour" } option value="24h" { "24 hours" } option value="7d" { "7 days" } }
            label for="uses" { "Nodes" }
            input id="uses" name="uses" type="number" min="1" max="1000" value="1";
            button type="submit" id="create-token" { "Create a join token" }
        }
    }
}

async fn enroll_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
) -> Response {
    if let Err(e) = user.authorize(&cp, Op::ManageJoinTokens) {
        return op_error(e);
    }
    let body = html! {
        h1 { "Enroll a node" }
        p { "A join token lets new hosts join the fleet; it is shown once." }
        (enroll_form(&user))
    };
    page(&user, "Enroll", "/ui/enroll", None, body).into_response()
}

async fn enroll(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    headers: HeaderMap,
    form: Result<Form<EnrollForm>, FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return problem(StatusCode::BAD_REQUEST, "the form is incomplete");
    };
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    let ttl = match f.ttl.as_str() {
        "1h" => Duration::from_secs(3600),
        "24h" => Duration::from_secs(86_400),
        "7d" => Duration::from_secs(7 * 86_400),
        other => {
            return problem(
                StatusCode::BAD_REQUEST,
                &format!("`{other}` is not one of the offered lifetimes"),
            )
        }
    };
    let uses = f.uses.parse::<u32>().unwrap_or(1).clamp(1, 1000);
    let created = match cp
        .create_join_token(
            Some(ttl),
            Some(uses),
            Default::default(),
            "dashboard",
            &user.cx(),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return op_error(e),
    };
    // The installers come from this controller's public URL; agents dial its QUIC address.
    let (url, quic) = match nebula_controller::http::install::public_addresses(&cp, &headers) {
        Ok(a) => (a.url, a.quic),
        Err(_) => (
            "https://CONTROLLER".to_owned(),
            format!("CONTROLLER:{}", cp.quic_port()),
        ),
    };
    let token = &created.token;
    let body = html! {
        h1 { "Enroll a node" }
        p role="status" { "Join token for " (uses) " node(s), valid for " (humantime::format_duration(ttl)) ". It is shown once:" }
        pre id="join-token" { (token) }
        h2 { "Linux (x86_64, aarch64)" }
        pre id="install-linux" { "curl -fsSL " (url) "/install.sh | sudo sh -s -- --token " (token) }
        h2 { "Windows (PowerShell as administrator)" }
        pre id="install-windows" { "& ([scriptblock]::Create((irm " (url) "/install.ps1))) -Token " (token) }
        h2 { "By hand" }
        pre id="install-manual" { "nebula-agent join --controller " (quic) " --token " (token) " --state-dir /var/lib/nebula-agent" }
        (enroll_form(&user))
    };
    page(&user, "Enroll", "/ui/enroll", None, body).into_response()
}

// ----- audit -----

/// The controller's background tasks: where each runs, what it is doing, its last run.
async fn tasks_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
) -> Response {
    use nebula_controller::tasks::Scope;
    let tasks = cp.tasks.list();
    let body = html! {
        h1 { "Background tasks" }
        p.dim { "Leader tasks run only on the controller that leads; a single controller always does." }
        div.scroll { table id="tasks" {
            thead { tr { th { "Task" } th { "Scope" } th { "Kind" } th { "State" } th { "Runs" }
                         th { "Errors" } th { "Last run" } th { "Took" } th { "Result" } } }
            tbody { @for t in &tasks {
                tr data-task=(t.name) {
                    td { strong { (t.name) } br; span.dim { (t.description) } }
                    td { @match t.scope { Scope::Leader => "leader", Scope::EveryReplica => "every replica" } }
                    td { (format!("{:?}", t.kind).to_lowercase())
                         @if let Some(p) = t.period_ms { span.dim { " every " (humantime::format_duration(std::time::Duration::from_millis(p))) } } }
                    td { (serde_json::to_value(t.state).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()) }
                    td { (t.runs) }
                    td { (t.errors) }
                    @if let Some(l) = &t.last {
                        td { (nebula_controller::store::rfc3339_seconds(nebula_controller::store::from_millis(l.started_at))) }
                        td { (l.took_ms) " ms" }
                        td { @if l.ok { code { (l.result.to_string()) } } @else { span.error { (l.result.as_str().unwrap_or_default()) } } }
                    } @else {
                        td.dim { "not yet" } td {} td {}
                    }
                }
            } }
        } }
    };
    page(&user, "Tasks", "/ui/tasks", None, body).into_response()
}

async fn audit_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
) -> Response {
    if let Err(e) = user.authorize(&cp, Op::ReadAudit) {
        return op_error(e);
    }
    let entries = match cp
        .store
        .list_audit(&AuditFilter {
            limit: 200,
            ..Default::default()
        })
        .await
    {
        Ok(e) => e,
        Err(e) => return op_error(e.into()),
    };
    let body = html! {
        h1 { "Audit log" }
        div.scroll { table {
            thead { tr { th { "When" } th { "Who" } th { "What" } th { "Target" } th { "Detail" } } }
            tbody { @for a in &entries {
                tr { td { (nebula_controller::store::rfc3339_seconds(nebula_controller::store::from_millis(a.at))) }
                     td { (a.actor) } td { code { (a.action) } } td { (a.target) }
                     td { code { (a.detail.to_string()) } } }
            } }
        } }
    };
    page(&user, "Audit", "/ui/audit", None, body).into_response()
}
