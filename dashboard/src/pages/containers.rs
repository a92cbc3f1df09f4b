//! Containers: every container in the fleet (filters and search), one container's page
//! (facts, what its node allows, actions, its log live and searchable).

use nebula_controller::containers::{ContainerFilter, ContainerRow};
use nebula_protocol::containers::{ContainerAction, LogsRequest};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;

use crate::prelude::*;

#[derive(Deserialize, Default)]
pub(crate) struct ListQuery {
    q: Option<String>,
    node: Option<String>,
    state: Option<String>,
    /// `yes`, `no` or empty.
    managed: Option<String>,
}

fn container_href(r: &ContainerRow) -> String {
    format!("/ui/nodes/{}/containers/{}", r.node, r.name)
}

/// `3d4h`, `5h12m`, `42m`, `17s`.
pub(crate) fn uptime(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h{m}m"),
        (d, h, _) => format!("{d}d{h}h"),
    }
}

fn mib(b: Option<u64>) -> String {
    b.map_or_else(|| "-".into(), |b| format!("{} MiB", b >> 20))
}

pub(crate) async fn containers_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Query(q): Query<ListQuery>,
) -> Response {
    let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
    let filter = ContainerFilter {
        node: nonempty(&q.node),
        state: nonempty(&q.state),
        managed: match q.managed.as_deref() {
            Some("yes") => Some(true),
            Some("no") => Some(false),
            _ => None,
        },
        search: nonempty(&q.q),
        ..Default::default()
    };
    let rows = match cp.containers(&user.cx(), &filter) {
        Ok(r) => r,
        Err(e) => return op_error(e),
    };
    let mut nodes: Vec<String> = cp
        .telemetry
        .snapshot()
        .into_iter()
        .map(|v| v.name)
        .collect();
    nodes.sort();
    let states = [
        "",
        "running",
        "exited",
        "paused",
        "restarting",
        "created",
        "dead",
    ];
    let running = rows.iter().filter(|r| r.state == "running").count();
    let body = html! {
        h1 { "Containers" }
        p.totals { span { b { (rows.len()) } " shown" } span { b { (running) } " running" }
            span { b { (rows.iter().filter(|r| r.managed).count()) } " managed by Nebula" } }
        form method="get" action="/ui/containers" .actions role="search" {
            label for="q" { "Search" }
            input id="q" name="q" type="search" placeholder="name, image, node, service" value=(q.q.clone().unwrap_or_default());
            label for="node" { "Node" }
            select id="node" name="node" {
                option value="" { "any" }
                @for n in &nodes { option value=(n) selected[q.node.as_deref() == Some(n.as_str())] { (n) } }
            }
            label for="state" { "State" }
            select id="state" name="state" { @for s in states {
                option value=(s) selected[q.state.as_deref() == Some(s)] { (if s.is_empty() { "any" } else { s }) }
            } }
            label for="managed" { "Managed" }
            select id="managed" name="managed" { @for (v, label) in [("", "any"), ("yes", "by Nebula"), ("no", "not by Nebula")] {
                option value=(v) selected[q.managed.as_deref() == Some(v)] { (label) }
            } }
            button type="submit" { "Filter" }
        }
        @if rows.is_empty() { p.dim id="no-containers" { "No containers match." } }
        @else {
            div.scroll { table id="containers" {
                thead { tr { th { "Node" } th { "Name" } th { "Image" } th { "State" } th { "Health" }
                    th { "Uptime" } th { "CPU" } th { "Memory" } th { "Ports" } th { "Managed" } } }
                tbody { @for r in &rows {
                    tr {
                        td { a href={"/ui/nodes/" (r.node)} { (r.node) } }
                        td { a href=(container_href(r)) { (r.name) } }
                        td { code { (r.image) } }
                        td { span class={"badge " (r.state)} { (r.state) } }
                        td { span class={"badge " (r.health)} { (r.health) } }
                        td { (r.uptime_secs.map(uptime).unwrap_or_else(|| "-".into())) }
                        td { (r.cpu_percent.map(|p| format!("{p:.1}%")).unwrap_or_else(|| "-".into())) }
                        td { (mib(r.memory_used_bytes)) }
                        td { @for p in &r.ports { code { (p) } " " } }
                        td { @match &r.service { Some(s) => { "yes (" a href="/ui/services" { (s) } ")" }, None => { "no" } } }
                    }
                } }
            } }
        }
    };
    page(&user, "Containers", "/ui/containers", None, body).into_response()
}

pub(crate) async fn container_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path((node, container)): Path<(String, String)>,
) -> Response {
    let view = match cp.container(&user.cx(), &node, &container).await {
        Ok(v) => v,
        Err(e) => return op_error(e),
    };
    let r = &view.container;
    let operator = user.authorize(&cp, Op::ControlContainer).is_ok();
    let control_refused = view.refusals.get("control");
    let logs_refused = view.refusals.get("logs");
    let exec_refused = view.refusals.get("exec");
    let may_exec = user.authorize(&cp, Op::ExecContainer).is_ok();
    let log_src = format!("/ui/nodes/{node}/containers/{}/logs?tail=500", r.name);
    let body = html! {
        h1 { (r.name) " " span id="container-state" class={"badge " (r.state)} { (r.state) } }
        p.dim { "on " a href={"/ui/nodes/" (r.node)} { (r.node) } " · " a href="/ui/containers" { "all containers" } }
        @if let Some(s) = &r.service {
            p id="managed-note" { "Managed by Nebula (service " a href="/ui/services" { (s) } "): "
                "after a stop or removal, the reconciler puts it back as the service map says unless the map changes." }
        }
        @if operator {
            @if let Some(why) = control_refused { p.dim id="control-refused" { (why) } }
            @else {
                div.actions role="group" aria-label="Actions" {
                    @for a in ContainerAction::ALL {
                        form.inline method="post" action={"/ui/nodes/" (r.node) "/containers/" (r.name) "/action"} {
                            (csrf_field(&user))
                            input type="hidden" name="action" value=(a.as_str());
                            @let label = format!("{}{}", a.as_str()[..1].to_uppercase(), &a.as_str()[1..]);
                            @if matches!(a, ContainerAction::Kill | ContainerAction::Remove) {
                                button.secondary type="submit" id={"action-" (a.as_str())} aria-label={(label) " " (r.name)} { (label) }
                            } @else {
                                button type="submit" id={"action-" (a.as_str())} aria-label={(label) " " (r.name)} { (label) }
                            }
                        }
                    }
                }
            }
        }
        table { tbody {
            tr { th { "Image" } td { code { (r.image) } } }
            tr { th { "Id" } td { code { (r.id.chars().take(12).collect::<String>()) } } }
            tr { th { "Health" } td { span class={"badge " (r.health)} { (r.health) } } }
            tr { th { "Started" } td { (r.started_at.as_deref().unwrap_or("-")) } }
            tr { th { "Uptime" } td { (r.uptime_secs.map(uptime).unwrap_or_else(|| "-".into())) } }
            tr { th { "Restarts" } td { (r.restart_count) } }
            tr { th { "CPU / memory" } td { (r.cpu_percent.map(|p| format!("{p:.1}%")).unwrap_or_else(|| "-".into())) " / " (mib(r.memory_used_bytes)) } }
            tr { th { "Ports" } td { @if r.ports.is_empty() { "-" } @for p in &r.ports { code { (p) } " " } } }
            tr { th { "Labels" } td { @for (k, v) in &r.labels { code { (k) "=" (v) } " " } } }
            tr { th { "Node policy" } td { @match &view.policy {
                Some(p) => { code { "control=" (p.control) } " " code { "exec=" (p.exec) } " " code { "logs=" (p.logs) } },
                None => { span.dim { "not reported (the agent is offline or older than 1.6)" } },
            } } }
        } }
        @if may_exec {
            h2 { "Terminal" }
            @if let Some(why) = exec_refused { p.dim id="exec-refused" { (why) } }
            @else if r.state != "running" { p.dim { "The container is not running." } }
            @else {
                link rel="stylesheet" href="/ui/assets/xterm.css";
                div.actions {
                    label for="terminal-cmd" { "Command" }
                    input id="terminal-cmd" value="sh" spellcheck="false";
                    button type="button" id="terminal-open" { "Open a terminal" }
                    span.dim id="terminal-status" aria-live="polite" {}
                }
                div id="terminal" data-src={"/ui/nodes/" (r.node) "/containers/" (r.name) "/exec"} {}
                script src="/ui/assets/xterm.js" defer {}
                script src="/ui/assets/terminal.js" defer {}
            }
        }
        h2 { "Log" }
        @if let Some(why) = logs_refused { p.dim id="logs-refused" { (why) } }
        @else {
            div.actions {
                label for="log-search" { "Search" }
                input id="log-search" type="search" placeholder="show lines containing…";
                button.secondary type="button" id="log-pause" aria-pressed="false" { "Pause" }
                span.dim id="log-status" aria-live="polite" { "connecting…" }
            }
            pre id="container-log" data-src=(log_src) aria-label="Container log" {}
            script src="/ui/assets/logs.js" defer {}
        }
    };
    page(&user, &r.name, "/ui/containers", None, body).into_response()
}

#[derive(Deserialize, Default)]
pub(crate) struct ActionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    action: String,
}

pub(crate) async fn container_action(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path((node, container)): Path<(String, String)>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    let Some(action) = ContainerAction::parse(&f.action) else {
        return problem(
            StatusCode::BAD_REQUEST,
            &format!("`{}` is not a container action", f.action),
        );
    };
    match cp
        .container_action(&user.cx(), &node, &container, action)
        .await
    {
        Ok((job, _)) => Redirect::to(&format!("/ui/jobs/{}", job.id)).into_response(),
        Err(e) => op_error(e),
    }
}

#[derive(Deserialize, Default)]
pub(crate) struct LogQuery {
    tail: Option<u32>,
}

/// The container's log as server-sent events (`logs`, `end`, `error`), the API's stream.
pub(crate) async fn container_logs(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path((node, container)): Path<(String, String)>,
    Query(q): Query<LogQuery>,
) -> Response {
    let req = LogsRequest {
        container,
        since_unix_ms: None,
        tail: Some(q.tail.unwrap_or(500).min(10_000)),
        follow: true,
    };
    match cp.follow_logs(&user.cx(), &node, req).await {
        Ok(follow) => nebula_controller::http::container_log_events(&cp, follow).into_response(),
        Err(e) => op_error(e),
    }
}

#[derive(Deserialize, Default)]
pub(crate) struct ExecQuery {
    cmd: Option<String>,
    rows: Option<u16>,
    cols: Option<u16>,
}

/// True when the page that opens a WebSocket is this dashboard's: a cookie alone must not let
/// another site's page open a terminal (browsers send cookies with cross-site WebSockets
/// unless `SameSite` stops them; this does not rely on it).
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match (host, origin) {
        (Some(host), Some(origin)) => origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host)),
        _ => false,
    }
}

/// The terminal's WebSocket: the API's exec bridge, for the signed-in operator.
pub(crate) async fn container_exec(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path((node, container)): Path<(String, String)>,
    Query(q): Query<ExecQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if !same_origin(&headers) {
        return problem(
            StatusCode::FORBIDDEN,
            "a terminal opens only from this dashboard's pages",
        );
    }
    let Ok(ws) = ws else {
        return problem(
            StatusCode::BAD_REQUEST,
            "this address speaks WebSocket only",
        );
    };
    let req = match nebula_controller::http::exec_request(
        container,
        q.cmd.as_deref(),
        Some(true),
        q.rows,
        q.cols,
    ) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match cp.open_exec(&user.cx(), &node, req).await {
        Ok(session) => {
            ws.on_upgrade(move |socket| nebula_controller::http::exec_bridge(socket, session))
        }
        Err(e) => op_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_dashboards_pages_open_a_terminal() {
        let h = |origin: Option<&str>| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, HeaderValue::from_static("nebula.home:8080"));
            if let Some(o) = origin {
                m.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
            }
            m
        };
        assert!(same_origin(&h(Some("http://nebula.home:8080"))));
        assert!(same_origin(&h(Some("https://NEBULA.home:8080"))));
        assert!(!same_origin(&h(Some("https://evil.example"))));
        assert!(!same_origin(&h(Some(
            "http://nebula.home:8080.evil.example"
        ))));
        assert!(
            !same_origin(&h(None)),
            "no Origin: not a browser page of ours"
        );
    }
}
