//! A node's images and volumes: sizes, users, disk usage, and a prune that shows what goes
//! before it removes exactly that.

use nebula_controller::containers::storage::PruneRequest;

use crate::prelude::*;

/// `1.2 GiB`, `340.0 MiB`, `512 B`.
pub(crate) fn size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn short_id(id: &str) -> String {
    id.trim_start_matches("sha256:").chars().take(12).collect()
}

/// The disk usage line of a node page (the node is asked, briefly).
pub(crate) async fn disk_usage(cp: &Arc<ControlPlane>, user: &User, node: &str) -> Markup {
    let asked =
        tokio::time::timeout(Duration::from_secs(3), cp.node_storage(&user.cx(), node)).await;
    match asked {
        Ok(Ok(v)) => html! {
            p id="disk-usage" {
                "Images " b { (size(v.disk.images_bytes)) } " · containers " b { (size(v.disk.containers_bytes)) }
                " · volumes " b { (size(v.disk.volumes_bytes)) } " · reclaimable " b { (size(v.disk.reclaimable_bytes)) }
                " · " a href={"/ui/nodes/" (node) "/storage"} { "images and volumes" }
            }
        },
        Ok(Err(e)) => html! { p.dim id="disk-usage" { "Disk usage: " (e.to_string()) } },
        Err(_) => {
            html! { p.dim id="disk-usage" { "Disk usage: the node did not answer in time." } }
        }
    }
}

pub(crate) async fn storage_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path(node): Path<String>,
) -> Response {
    let v = match cp.node_storage(&user.cx(), &node).await {
        Ok(v) => v,
        Err(e) => return op_error(e),
    };
    let may_prune = user.authorize(&cp, Op::PruneStorage).is_ok();
    let body = html! {
        h1 { "Images and volumes on " a href={"/ui/nodes/" (node)} { (node) } }
        p.totals {
            span { "images " b { (size(v.disk.images_bytes)) } }
            span { "containers " b { (size(v.disk.containers_bytes)) } }
            span { "volumes " b { (size(v.disk.volumes_bytes)) } }
            span { "reclaimable " b { (size(v.disk.reclaimable_bytes)) } }
        }
        @if may_prune {
            form.actions method="get" action={"/ui/nodes/" (node) "/storage/prune"} {
                label { input type="checkbox" name="volumes" value="true"; " unused volumes too (they hold data)" }
                label for="prune-match" { "only names containing" }
                input id="prune-match" name="match" type="search";
                button type="submit" id="prune-preview" { "Preview a prune" }
            }
        }
        h2 { "Images" }
        div.scroll { table id="images" {
            thead { tr { th { "Id" } th { "Tags" } th { "Size" } th { "Created" } th { "Used by" } } }
            tbody { @for i in &v.images { tr {
                td { code { (short_id(&i.id)) } }
                td { @if i.tags.is_empty() { span.dim { "<none>" } } @for t in &i.tags { code { (t) } " " } }
                td { (size(i.size_bytes)) }
                td { (i.created.chars().take(10).collect::<String>()) }
                td { @if i.containers.is_empty() { span.dim { "unused" } } @else { (i.containers.join(", ")) } }
            } } }
        } }
        h2 { "Volumes" }
        div.scroll { table id="volumes" {
            thead { tr { th { "Name" } th { "Driver" } th { "Size" } th { "Used by" } } }
            tbody { @for vol in &v.volumes { tr {
                td { code { (vol.name) } } td { (vol.driver) }
                td { (vol.size_bytes.map(size).unwrap_or_else(|| "?".into())) }
                td { @if vol.containers.is_empty() { span.dim { "unused" } } @else { (vol.containers.join(", ")) } }
            } } }
        } }
    };
    page(&user, &format!("Storage · {node}"), "", None, body).into_response()
}

#[derive(Deserialize, Default)]
pub(crate) struct PreviewQuery {
    volumes: Option<String>,
    #[serde(rename = "match")]
    matching: Option<String>,
}

pub(crate) async fn prune_preview_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path(node): Path<String>,
    Query(q): Query<PreviewQuery>,
) -> Response {
    let volumes = q.volumes.as_deref() == Some("true");
    let matching = q
        .matching
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty());
    let p = match cp.prune_preview(&user.cx(), &node, volumes, matching).await {
        Ok(p) => p,
        Err(e) => return op_error(e),
    };
    let body = html! {
        h1 { "Prune " a href={"/ui/nodes/" (node) "/storage"} { (node) } }
        @if p.images.is_empty() && p.volumes.is_empty() {
            p id="prune-nothing" { "Nothing unused to remove." }
        } @else {
            p { "These go (" b { (size(p.bytes)) } "); anything a container uses by then stays:" }
            ul id="prune-list" {
                @for i in &p.images { li { "image " code { (short_id(&i.id)) } " " (i.tags.join(", ")) " · " (size(i.size_bytes)) } }
                @for v in &p.volumes { li { "volume " code { (v.name) } " · " (v.size_bytes.map(size).unwrap_or_else(|| "?".into())) } }
            }
            form method="post" action={"/ui/nodes/" (node) "/storage/prune"} {
                (csrf_field(&user))
                @for i in &p.images { input type="hidden" name="image" value=(i.id); }
                @for v in &p.volumes { input type="hidden" name="volume" value=(v.name); }
                button type="submit" id="prune-confirm" { "Remove these" }
            }
        }
    };
    page(&user, "Prune", "", None, body).into_response()
}

pub(crate) async fn prune(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path(node): Path<String>,
    body: String,
) -> Response {
    // Repeated fields (`image=..&image=..`): read by hand, as the form encodes them.
    let mut csrf = String::new();
    let mut req = PruneRequest::default();
    for (k, v) in form_urlencoded::parse(body.as_bytes()) {
        match k.as_ref() {
            "csrf" => csrf = v.into_owned(),
            "image" => req.images.push(v.into_owned()),
            "volume" => req.volumes.push(v.into_owned()),
            _ => {}
        }
    }
    if let Err(r) = user.check(&csrf) {
        return r.into_response();
    }
    let done = match cp.prune(&user.cx(), &node, req).await {
        Ok(d) => d,
        Err(e) => return op_error(e),
    };
    let body = html! {
        h1 { "Pruned " a href={"/ui/nodes/" (node) "/storage"} { (node) } }
        p id="prune-result" { "Removed " (done.removed.len()) ", freed " (size(done.reclaimed_bytes)) "." }
        @if !done.skipped.is_empty() {
            h2 { "Left" }
            ul { @for (name, why) in &done.skipped { li { code { (name) } ": " (why) } } }
        }
        p { a href={"/ui/jobs/" (done.job)} { "The job" } }
    };
    page(&user, "Pruned", "", None, body).into_response()
}
