//! Monitors: a status board (each monitor on each node: state, the last checks as an uptime
//! bar, latency, uptime over 24 hours, 7 and 30 days) and a monitor's page with its latency
//! charts per node.

use nebula_controller::http::{MonitorNodeView, MonitorPoint};

use crate::charts::{line_chart, Series};
use crate::prelude::*;

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |p| format!("{p:.2}%"))
}

/// The last checks, oldest first: one cell each, green up, red down.
fn ticks(points: &[MonitorPoint]) -> Markup {
    html! {
        span.ticks role="img" aria-label={(points.iter().filter(|p| p.up).count()) " of " (points.len()) " recent checks up"} {
            @for p in points { i class=(if p.up { "up" } else { "down" }) title={(format!("{:.1} ms", p.latency_ms))} {} }
        }
    }
}

fn node_cells(n: &MonitorNodeView) -> Markup {
    html! {
        td { span class={"badge " (n.status)} { (n.status) }
            @if let Some(e) = &n.error { div.dim { (e) } } }
        td { (n.latency_ms.map_or("-".into(), |l| format!("{l:.1} ms"))) }
        td { (pct(n.uptime_24h)) } td { (pct(n.uptime_7d)) } td { (pct(n.uptime_30d)) }
    }
}

pub(crate) async fn monitors_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
) -> Response {
    let cx = user.cx();
    let monitors = match cp.monitors_list(&cx) {
        Ok(m) => m,
        Err(e) => return op_error(e),
    };
    let count = |s: &str| monitors.iter().filter(|m| m.status == s).count();
    let body = html! {
        h1 { "Monitors" }
        p.totals { span { b { (count("up")) } " up" } span { b { (count("down")) } " down" }
            span { b { (count("pending")) } " pending" } span { b { (monitors.len()) } " monitors" } }
        @if monitors.is_empty() {
            p.dim id="no-monitors" { "No monitors. Declare them under " code { "monitors:" } " in the service map, set "
                code { "monitor: true" } " on a service, or run " code { "nebula monitor add" } "." }
        } @else {
            div.scroll { table id="monitors" {
                thead { tr { th { "Monitor" } th { "Checks" } th { "Node" } th { "Last checks" } th { "Status" } th { "Latency" } th { "24 h" } th { "7 d" } th { "30 d" } } }
                tbody { @for m in &monitors {
                    @let recent = cp.monitor_detail(&cx, &m.name).map(|d| d.series).unwrap_or_default();
                    @if m.nodes.is_empty() {
                        tr { td { a href={"/ui/monitors/" (m.name)} { (m.name) } } td { (m.kind) " " code { (m.target) } } td.dim { "no node" } td {} td { span.badge { "idle" } } td {} td {} td {} td {} }
                    }
                    @for (n, s) in m.nodes.iter().zip(recent.iter()) {
                        tr id={"monitor-" (m.name) "-" (n.node)} {
                            td { a href={"/ui/monitors/" (m.name)} { (m.name) } div.dim { (m.source) } }
                            td { (m.kind) " " code { (m.target) } }
                            td { a href={"/ui/nodes/" (n.node)} { (n.node) } }
                            td { (ticks(&s.recent)) }
                            (node_cells(n))
                        }
                    }
                } }
            } }
        }
    };
    page(&user, "Monitors", "/ui/monitors", None, body).into_response()
}

pub(crate) async fn monitor_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path(name): Path<String>,
) -> Response {
    let d = match cp.monitor_detail(&user.cx(), &name) {
        Ok(d) => d,
        Err(e) => return op_error(e),
    };
    let m = &d.monitor;
    let now = nebula_protocol::time::UnixMillis::now().as_i64() / 1000;
    let body = html! {
        h1 { (m.name) " " span class={"badge " (m.status)} { (m.status) } }
        p.dim { (m.kind) " " code { (m.target) } ", every " (m.interval_secs) " s (timeout " (m.timeout_secs) " s), from the " (m.source)
            @if let Some(s) = &m.service { ", service " a href="/ui/services" { (s) } }
            @if let Some(by) = &m.created_by { ", added by " (by) } "." }
        @for (n, s) in m.nodes.iter().zip(&d.series) {
            section.monitor-node id={"node-" (n.node)} {
                h2 { (n.node) " " span class={"badge " (n.status)} { (n.status) } }
                div.scroll { table {
                    thead { tr { th { "Status" } th { "Latency" } th { "24 h" } th { "7 d" } th { "30 d" } th { "Since" } th { "Last check" } th { "Details" } } }
                    tbody { tr { (node_cells(n)) td { (n.since.as_deref().unwrap_or("-")) } td { (n.last_check.as_deref().unwrap_or("-")) }
                        td { @if let Some(c) = n.http_status { "HTTP " (c) " " } @if let Some(mth) = &n.method { "via " (mth) " " }
                            @if let Some(c) = &n.certificate_expires { "certificate until " (c) } } } }
                } }
                p { "Last " (s.recent.len()) " checks: " (ticks(&s.recent)) }
                @let from = s.recent.first().map_or(now - 3600, |p| p.at_ms / 1000);
                (line_chart(
                    &format!("Latency from {}", n.node),
                    "ms",
                    &[Series { name: "latency", color: "#4cc2ff", points: s.recent.iter().map(|p| (p.at_ms / 1000, p.latency_ms)).collect() }],
                    from,
                    now,
                    None,
                ))
                (line_chart(
                    "Hourly latency and uptime",
                    "ms / %",
                    &[
                        Series { name: "average latency", color: "#4cc2ff", points: s.hours.iter().map(|h| (h.hour_ms / 1000, h.latency_avg_ms)).collect() },
                        Series { name: "uptime %", color: "#3fb950", points: s.hours.iter().map(|h| (h.hour_ms / 1000, h.up as f64 * 100.0 / h.checks.max(1) as f64)).collect() },
                    ],
                    now - 25 * 3600,
                    now,
                    None,
                ))
            }
        }
    };
    page(&user, &m.name, "/ui/monitors", None, body).into_response()
}
