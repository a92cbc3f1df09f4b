//! The overview: node cards, totals, the topology, and its live stream.

use std::collections::HashSet;

use crate::prelude::*;

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

pub(crate) fn totals(nodes: &[NodeView]) -> Markup {
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

pub(crate) async fn all_nodes(cp: &ControlPlane) -> Result<Vec<NodeView>, OpError> {
    Ok(cp
        .store
        .list_nodes()
        .await?
        .into_iter()
        .map(|n| node_view(cp, n))
        .collect())
}

/// Zones with more nodes than this show counts only in the topology.
pub(crate) const TOPOLOGY_LIST: usize = 24;

/// Controller -> nodes, grouped by their `zone` label.
pub(crate) fn topology(nodes: &[NodeView]) -> Markup {
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
pub(crate) fn ago(rfc3339: Option<&str>) -> String {
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

pub(crate) async fn overview(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
) -> Response {
    match all_nodes(&cp).await {
        Ok(nodes) => overview_html(&user, &nodes).into_response(),
        Err(e) => op_error(e),
    }
}

/// The most node names one `/ui/events/fragments` request may ask for.
const MAX_NAMES: usize = 1_000;

/// What an open overview gets when the nodes in `names` changed (`None`: all of them): their
/// cards, the totals and the topology, as (SSE event name, data). For all of them it also
/// says which cards there are (`present`), for a page that may have missed a removal.
pub(crate) async fn fragments(
    cp: &ControlPlane,
    names: Option<&HashSet<String>>,
) -> Result<Vec<(String, String)>, OpError> {
    let nodes = all_nodes(cp).await?;
    let mut out: Vec<(String, String)> = nodes
        .iter()
        .filter(|n| names.is_none_or(|w| w.contains(&n.name)))
        .map(|n| ("node".to_owned(), node_card(n).into_string()))
        .collect();
    for fragment in [totals(&nodes), topology(&nodes)] {
        out.push(("fragment".to_owned(), fragment.into_string()));
    }
    if names.is_none() {
        let ids: Vec<String> = nodes.iter().map(|n| node_dom_id(&n.name)).collect();
        out.push(("present".to_owned(), ids.join(" ")));
    }
    Ok(out)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FragmentsQuery {
    /// Node names, comma-separated; all nodes without it.
    nodes: Option<String>,
}

/// `GET /ui/events/fragments`: [`fragments`] as JSON. A replica that serves an overview's
/// stream without leading asks the leader (which holds the sessions and the telemetry) this.
pub(crate) async fn overview_fragments(
    State(cp): State<Arc<ControlPlane>>,
    query: Result<Query<FragmentsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return problem(
            StatusCode::BAD_REQUEST,
            "nodes=NAME,NAME,... is the only parameter",
        );
    };
    let names: Option<HashSet<String>> = q.nodes.map(|n| {
        n.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    });
    if names.as_ref().is_some_and(|n| n.len() > MAX_NAMES) {
        return problem(
            StatusCode::BAD_REQUEST,
            &format!("at most {MAX_NAMES} node names at once"),
        );
    }
    match fragments(&cp, names.as_ref()).await {
        Ok(f) => axum::Json(f).into_response(),
        Err(e) => op_error(e),
    }
}

/// [`fragments`], made here on the leader (or the only controller); a follower asks the
/// leader with the viewer's own session. `None` when there are none to send now (no leader
/// known during an election, or it did not answer): the next change or refresh tries again.
async fn frames(
    cp: &ControlPlane,
    token: &str,
    names: Option<&HashSet<String>>,
) -> Option<Vec<(String, String)>> {
    if !cp.ha.replicated() || cp.ha.is_leader() {
        return fragments(cp, names).await.ok();
    }
    let query = names
        .map(|n| {
            let n: Vec<&str> = n.iter().map(String::as_str).collect();
            format!("?nodes={}", n.join(","))
        })
        .unwrap_or_default();
    let cookie = format!("{SESSION_COOKIE}={token}");
    let got = nebula_controller::http::replica_proxy::get_from_leader(
        cp,
        &format!("/ui/events/fragments{query}"),
        &[("cookie", &cookie)],
        REFRESH * 2,
    )
    .await;
    match got.map(|body| serde_json::from_str(&body).map_err(|e| e.to_string())) {
        Ok(Ok(f)) => Some(f),
        Ok(Err(e)) | Err(e) => {
            tracing::debug!("an overview's fragments from the leader: {e}");
            None
        }
    }
}

/// What an event means to an open overview.
enum Change {
    /// This node's card changed.
    Node(String),
    /// This node is gone.
    Gone(String),
    /// Events may have been missed: everything again, with the cards there are.
    Resync,
    Nothing,
    Closed,
}

fn change(ev: Result<Event, tokio::sync::broadcast::error::RecvError>) -> Change {
    use tokio::sync::broadcast::error::RecvError;
    match ev {
        Ok(Event::NodeOnline { name, .. })
        | Ok(Event::NodeOffline { name, .. })
        | Ok(Event::NodeEnrolled { name, .. })
        | Ok(Event::ContainerChanged { node: name, .. }) => Change::Node(name),
        Ok(Event::NodeRemoved { name, .. }) => Change::Gone(name),
        Ok(Event::EventsMissed { .. }) | Err(RecvError::Lagged(_)) => Change::Resync,
        Ok(_) => Change::Nothing,
        Err(RecvError::Closed) => Change::Closed,
    }
}

/// Live cards: a node's card when something about it changes (changes within [`COALESCE`] go
/// out together), every card each [`REFRESH`], and after events were missed every card with
/// the list of cards there are. The stream ends with the session. Every replica serves it
/// from its own event bus (replicas hear each other's events), so a leader's kill does not
/// end it: the new leader's events arrive on the same stream.
pub(crate) async fn overview_events(
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
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                _ = tick.tick() => {
                    // Signed out or expired: the stream ends.
                    if !matches!(cp2.ui_session(&token).await, Ok(Some(_))) {
                        return;
                    }
                    None
                }
                ev = events.recv() => Some(change(ev)),
            };
            // Take what else changes meanwhile into the same update.
            let mut names = HashSet::new();
            let mut gone = Vec::new();
            let mut all = first.is_none();
            let mut changes: Vec<Change> = first.into_iter().collect();
            if !all {
                let until = tokio::time::Instant::now() + COALESCE;
                while let Ok(ev) = tokio::time::timeout_at(until, events.recv()).await {
                    let c = change(ev);
                    let closed = matches!(c, Change::Closed);
                    changes.push(c);
                    if closed {
                        break;
                    }
                }
            }
            let mut resync = false;
            for c in changes {
                match c {
                    Change::Node(n) => {
                        names.insert(n);
                    }
                    Change::Gone(n) => gone.push(n),
                    Change::Resync => (all, resync) = (true, true),
                    Change::Nothing => {}
                    Change::Closed => return,
                }
            }
            for name in gone {
                let ev = SseEvent::default().event("gone").data(node_dom_id(&name));
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            if !all && names.is_empty() {
                continue;
            }
            let Some(frames) = frames(&cp2, &token, (!all).then_some(&names)).await else {
                continue;
            };
            // The list of cards goes out only after a gap: otherwise removals came as events.
            for (event, data) in frames.into_iter().filter(|(e, _)| resync || e != "present") {
                if tx
                    .send(SseEvent::default().event(event).data(data))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    sse_of(rx)
}
