//! A node's page: charts, GPU processes, containers (each linking to its page; restart), wake.

use crate::prelude::*;

/// One point of the node charts: (unix s, CPU %, memory GiB, GPU %, rx KiB/s, tx KiB/s).
type ChartRow = (i64, f64, f64, Option<f64>, f64, f64);

#[derive(Deserialize)]
pub(crate) struct RangeQuery {
    range: Option<String>,
}

pub(crate) async fn node_page(
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
    let disk = if view.status == NodeStatus::Online {
        Some(super::storage::disk_usage(&cp, &user, &view.name).await)
    } else {
        None
    };
    let alerts = super::alerts::node_alerts(&cp, &user, &view.name).await;
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
        (alerts)
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
        @if let Some(d) = disk { (d) }
        @if let Some(inv) = &inventory {
            div.scroll { table {
                thead { tr { th { "Name" } th { "Image" } th { "State" } th { "Health" } th { "Service" } @if user.can(Role::Operator) { th { "Action" } } } }
                tbody { @for (i, c) in inv.containers.iter().enumerate() {
                    @let sample = latest.as_ref().filter(|s| s.epoch == inv.epoch).and_then(|s| s.containers.get(i));
                    @let state = sample.map(|s| s.state.as_str()).unwrap_or("unknown");
                    @let health = sample.map(|s| s.health.as_str()).unwrap_or("none");
                    tr id={"container-" (c.name)} {
                        td { a href={"/ui/nodes/" (view.name) "/containers/" (c.name)} { (c.name) } } td { code { (c.image) } }
                        td { span class={"badge " (state)} { (state) } }
                        td { span class={"badge " (health)} { (health) } }
                        td { (c.labels.get("nebula.service").map(String::as_str).unwrap_or("-")) }
                        @if user.can(Role::Operator) { td {
                            form.inline method="post" action={"/ui/nodes/" (view.name) "/containers/" (c.name) "/action"} {
                                (csrf_field(&user))
                                input type="hidden" name="action" value="restart";
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

pub(crate) async fn wake_node(
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
