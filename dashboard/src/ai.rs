//! The Models page (each node's backends and models, the map's desired models, pulls with live
//! progress, delete) and the Chat page (talks to the gateway as the signed-in user, streaming,
//! with a model picker and the node that answered).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use futures::Stream;
use maud::{html, Markup};
use nebula_controller::http::Role;
use nebula_controller::jobs::model::{ModelActionKind, Target, Work};
use nebula_controller::jobs::NewJob;
use nebula_controller::ControlPlane;
use serde::Deserialize;

use super::{cookie, op_error, page, problem, User, SESSION_COOKIE};

fn bytes(n: u64) -> String {
    if n == 0 {
        return "-".into();
    }
    let gb = n as f64 / 1e9;
    if gb >= 1.0 {
        format!("{gb:.1} GB")
    } else {
        format!("{:.0} MB", n as f64 / 1e6)
    }
}

/// Where a backend came from, for people: `configured`, `local port 11434, uid 1000 alice, pid
/// 1234 ollama` (the listener's owner, when its agent could see it) or `Tailscale peer gpu-box`.
fn source_label(source: &str) -> String {
    if source == "config" {
        return "configured".into();
    }
    if let Some(peer) = source.strip_prefix("tailscale:") {
        return format!("Tailscale peer {peer}");
    }
    if let Some(rest) = source
        .strip_prefix("local")
        .filter(|r| r.is_empty() || r.starts_with(':'))
    {
        let rest = rest.trim_start_matches(':');
        return match rest.split_once(" (") {
            Some((port, owner)) => {
                format!("local port {port}, {}", owner.trim_end_matches(')'))
            }
            None if rest.is_empty() => "local port".into(),
            None => format!("local port {rest}"),
        };
    }
    source.to_owned()
}

/// The live part of the Models page (replaced by id as it changes).
async fn models_section(cp: &ControlPlane, user: &User) -> Markup {
    let inventory = cp.ai.inventory();
    let desired = cp.models_view().await.unwrap_or_default();
    let pulls = cp.model_jobs_in_flight();
    html! {
        section id="models" {
            @if !pulls.is_empty() {
                h2 { "In progress" }
                table {
                    thead { tr { th { "Node" } th { "Job" } th { "Progress" } } }
                    tbody {
                        @for (id, node, what, progress) in &pulls {
                            tr {
                                td { (node.clone().unwrap_or_default()) }
                                td { a href=(format!("/ui/jobs/{id}")) { (what) } }
                                td {
                                    @match progress {
                                        Some((pct, msg)) => {
                                            progress value=(format!("{pct:.1}")) max="100" aria-label=(what) {}
                                            " " (format!("{pct:.0}%")) " " span.dim { (msg) }
                                        }
                                        None => { span.dim { "starting" } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if !desired.desired.is_empty() {
                h2 { "Desired (service map)" }
                table {
                    thead { tr { th { "Model" } th { "Node" } th { "State" } } }
                    tbody {
                        @for d in &desired.desired {
                            tr {
                                td { code { (d.model) } }
                                td { (d.node) }
                                td {
                                    span class=(format!("badge {}", d.state)) { (d.state) }
                                    @if let Some(p) = d.percent {
                                        " " progress value=(format!("{p:.1}")) max="100" {} " " (format!("{p:.0}%"))
                                    }
                                    @if let Some(m) = &d.message { " " span.dim { (m) } }
                                }
                            }
                        }
                    }
                }
                @if !desired.extra.is_empty() {
                    p.dim { "Not in the map (left alone): "
                        @for (i, e) in desired.extra.iter().enumerate() {
                            @if i > 0 { ", " }
                            code { (e.model) } " on " (e.node)
                        }
                    }
                }
            }
            h2 { "Inventory" }
            @if inventory.is_empty() {
                p.dim id="no-models" { "No node reports inference backends yet (Ollama, llama.cpp, vLLM, LM Studio or Stable Diffusion WebUI on their usual ports, or [ai] backends in the agent's config)." }
            } @else {
                table id="model-table" {
                    thead { tr { th { "Node" } th { "Backend" } th { "Model" } th { "State" } th { "Size" } th { "VRAM" } th { "Context" } th { "Breaker" } th {} } }
                    tbody {
                        @for (node, (id, inv)) in &inventory {
                            @for b in &inv.backends {
                                @if b.models.is_empty() {
                                    tr {
                                        td { (node) }
                                        td { (b.name) " " span.dim { "(" (b.kind.as_str()) ")" } br; small.dim.source title="Where the agent found this backend" { (source_label(&b.source)) } }
                                        td colspan="7" {
                                            @if b.healthy { span.dim { "no models" } }
                                            @else { span.badge.failed { "unhealthy" } " " span.dim { (b.error.clone().unwrap_or_default()) } }
                                        }
                                    }
                                }
                                @for m in &b.models {
                                    tr {
                                        td { (node) }
                                        td { (b.name) " " span.dim { "(" (b.kind.as_str()) ")" } br; small.dim.source title="Where the agent found this backend" { (source_label(&b.source)) } }
                                        td { code { (m.name) } }
                                        td {
                                            @if m.loaded { span.badge.online { "loaded" } }
                                            @else { span.badge { "on disk" } }
                                        }
                                        td { (bytes(m.size_bytes)) }
                                        td { (m.vram_bytes.map(bytes).unwrap_or_else(|| "-".into())) }
                                        td { (m.context_length.map(|c| c.to_string()).unwrap_or_else(|| "-".into())) }
                                        td { (cp.ai.breaker_state(*id, &m.name)) }
                                        td {
                                            @if user.can(Role::Operator) && b.kind != nebula_protocol::ai::BackendKind::OpenAi {
                                                form.inline method="post" action="/ui/models/delete" {
                                                    input type="hidden" name="csrf" value=(user.csrf);
                                                    input type="hidden" name="node" value=(node);
                                                    input type="hidden" name="name" value=(m.name);
                                                    input type="hidden" name="backend" value=(b.name);
                                                    button.secondary type="submit" aria-label=(format!("Delete {} from {node}", m.name)) { "Delete" }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub(crate) async fn models_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
) -> Response {
    let section = models_section(&cp, &user).await;
    let nodes: Vec<String> = cp.ai.inventory().into_keys().collect();
    let body = html! {
        h1 { "Models" }
        @if user.can(Role::Operator) {
            form method="post" action="/ui/models/pull" id="pull-form" {
                input type="hidden" name="csrf" value=(user.csrf);
                label { "Node " select name="node" required {
                    @for n in &nodes { option value=(n) { (n) } }
                } }
                " "
                label { "Model " input type="text" name="name" placeholder="llama3:8b" required pattern="[^\\s]+"; }
                " "
                button type="submit" { "Pull" }
            }
        }
        (section)
    };
    page(
        &user,
        "Models",
        "/ui/models",
        Some("/ui/models/events"),
        body,
    )
    .into_response()
}

#[derive(Deserialize, Default)]
pub(crate) struct ModelForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    node: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    backend: String,
}

async fn model_job(
    cp: &Arc<ControlPlane>,
    user: &User,
    f: ModelForm,
    action: ModelActionKind,
) -> Response {
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    if f.node.is_empty() || f.name.trim().is_empty() {
        return problem(StatusCode::BAD_REQUEST, "name a node and a model");
    }
    let job = cp
        .create_job(
            NewJob {
                work: Work::Model {
                    action,
                    name: Some(f.name.trim().to_owned()),
                    url: None,
                    file: None,
                    sha256: None,
                    backend: (!f.backend.is_empty()).then_some(f.backend),
                },
                target: Target::Node(f.node),
                deadline: Some(Duration::from_secs(6 * 3600)),
                idempotent: false,
                max_attempts: Some(1),
            },
            &user.cx(),
        )
        .await;
    match job {
        Ok(_) => Redirect::to("/ui/models").into_response(),
        Err(e) => op_error(e),
    }
}

pub(crate) async fn pull(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    form: Result<Form<ModelForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    model_job(&cp, &user, f, ModelActionKind::Pull).await
}

pub(crate) async fn delete(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    form: Result<Form<ModelForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    model_job(&cp, &user, f, ModelActionKind::Delete).await
}

/// The Models page's live section, sent again every second while the page is open.
pub(crate) async fn models_events(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let token = cookie(&headers, SESSION_COOKIE).unwrap_or("").to_owned();
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(8);
    let shutdown = cp.shutdown.clone();
    let cp2 = cp.clone();
    cp.tracker.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last = String::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                _ = tick.tick() => {}
            }
            if !matches!(cp2.ui_session(&token).await, Ok(Some(_))) {
                return;
            }
            let html = models_section(&cp2, &user).await.into_string();
            if html != last {
                if tx
                    .send(SseEvent::default().event("fragment").data(html.clone()))
                    .await
                    .is_err()
                {
                    return;
                }
                last = html;
            }
        }
    });
    crate::sse_of(rx)
}

pub(crate) async fn chat_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
) -> Response {
    let models = cp.ai.models(|id| cp.registry.is_online(id));
    let body = html! {
        h1 { "Chat" }
        form id="chat-form" data-csrf=(user.csrf) {
            label { "Model "
                select id="chat-model" name="model" required {
                    @for (name, (nodes, loaded)) in &models {
                        option value=(name) { (name) " (" (if loaded.is_empty() { format!("on {}", nodes.join(", ")) } else { format!("loaded on {}", loaded.join(", ")) }) ")" }
                    }
                    @if let Some(fb) = &cp.config.ai.fallback {
                        @for m in &fb.models {
                            @if !models.contains_key(m) { option value=(m) { (m) " (" (fb.name) ")" } }
                        }
                    }
                }
            }
            @if models.is_empty() {
                p.dim id="no-chat-models" { "No node serves a model yet: see Models." }
            }
            div id="chat-log" role="log" aria-live="polite" {}
            label for="chat-input" { "Message" }
            textarea id="chat-input" name="message" rows="3" required {}
            button type="submit" id="chat-send" { "Send" }
            " "
            span.dim id="chat-node" {}
        }
        script src="/ui/assets/chat.js" defer {}
    };
    page(&user, "Chat", "/ui/chat", None, body).into_response()
}

/// `POST /ui/chat/send`: the chat page's request, through the gateway as this user. The CSRF
/// token comes in a header (the body is the OpenAI-style JSON the gateway takes).
pub(crate) async fn chat_send(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let csrf = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if let Err(r) = user.check(csrf) {
        return r.into_response();
    }
    if let Err(e) = user.authorize(&cp, nebula_controller::authz::Op::Chat) {
        return op_error(e);
    }
    // The user may create jobs (an operator): pulls on demand are theirs to start.
    let caller = nebula_controller::ai::gateway::Caller {
        name: format!("user:{}", user.name),
        scope: nebula_controller::ai::pulls::Scope::Operator,
        principal: Some(user.cx()),
        only_node: None,
    };
    nebula_controller::agents::serve_for(cp, caller, body, "/v1/chat/completions").await
}

#[cfg(test)]
mod tests {
    use super::source_label;

    #[test]
    fn a_backends_source_reads_as_where_it_came_from() {
        assert_eq!(source_label("config"), "configured");
        assert_eq!(source_label("local"), "local port");
        assert_eq!(source_label("local:11434"), "local port 11434");
        assert_eq!(
            source_label("local:11434 (uid 1000 alice, pid 1234 ollama)"),
            "local port 11434, uid 1000 alice, pid 1234 ollama"
        );
        assert_eq!(source_label("tailscale:gpu-box"), "Tailscale peer gpu-box");
        assert_eq!(source_label("localhost-ish"), "localhost-ish");
    }
}
