//! Services: plan, apply and roll back the service map.

use nebula_controller::desired::plan::{Action, Plan, Waiting};

use crate::prelude::*;

#[derive(Deserialize, Default)]
pub(crate) struct MapForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    document: String,
}

/// A plan as the dashboard shows it, rendered from the planner's own type.
pub(crate) fn plan_markup(plan: &Plan) -> Markup {
    let json = |v: &Option<serde_json::Value>| {
        v.as_ref()
            .map_or_else(|| "null".to_owned(), |v| v.to_string())
    };
    let on = |w: &Waiting| {
        w.node
            .as_ref()
            .map(|n| format!(" on {n}"))
            .unwrap_or_default()
    };
    html! {
        section id="plan" aria-label="Plan" {
            @if plan.actions.is_empty() && plan.waiting.is_empty() && plan.refused.is_empty() {
                p { "No changes: " (plan.unchanged) " service(s) match the map." }
            }
            ul {
                @for a in &plan.actions {
                    li class={"plan-" (a.verb())} {
                        b { (a.verb()) } " " (a.service()) " on " (a.node())
                        @match a {
                            Action::Update { from, to, changes, .. } => {
                                " (" (from.join(",")) " → " (to) ")"
                                @for c in changes {
                                    div.diff { code { (c.field) ": " (json(&c.from)) " → " (json(&c.to)) } }
                                }
                            }
                            Action::Create { replicas, revision, .. }
                            | Action::Repair { replicas, revision, .. } => {
                                ", " (replicas) " replica(s) of " (revision)
                            }
                            Action::Remove { containers, reason, .. } => {
                                ", " (containers) " container(s): " (reason)
                            }
                        }
                    }
                }
                @for w in &plan.refused {
                    li.refused { "refused: " (w.service) (on(w)) ": " (w.reason) }
                }
                @for w in &plan.waiting {
                    li.waiting { "waiting: " (w.service) (on(w)) ": " (w.reason) }
                }
            }
        }
    }
}

pub(crate) async fn services_view(
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
    let alerts = cp.alerts_now(&user.cx()).await.unwrap_or_default();
    let alerts_of = |svc: &str| {
        alerts
            .iter()
            .filter(|a| a.labels.get("service").map(String::as_str) == Some(svc))
            .collect::<Vec<_>>()
    };
    let monitors = cp.monitors_list(&user.cx()).unwrap_or_default();
    let may_read_values = user.cx().may(nebula_controller::authz::Op::ReadMapValues);
    let document = document
        .or_else(|| {
            active.as_ref().and_then(|a| {
                if may_read_values {
                    Some(a.record.document.clone())
                } else {
                    // Variables' names and secret references; `***` for inline values.
                    nebula_controller::desired::map::secrets::redact_document(&a.record.document)
                }
            })
        })
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
                    td { span class={"badge " (s.status)} { (s.status) } @if let Some(m) = &s.message { div.dim { (m) } }
                        @for m in monitors.iter().filter(|m| m.service.as_deref() == Some(s.name.as_str())) {
                            div { "monitor " a href={"/ui/monitors/" (m.name)} { span class={"badge " (m.status)} { (m.status) } } }
                        }
                        @for a in alerts_of(&s.name) {
                            div.service-alert { span class={"badge " (a.state)} { (a.state) } " " code { (a.rule) } " " span.dim { (a.summary) } }
                        } }
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

pub(crate) async fn services_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
) -> Response {
    services_view(&cp, &user, None, None).await
}

pub(crate) fn map_problems(errors: &nebula_controller::desired::map::MapErrors) -> Markup {
    html! {
        div.error role="alert" id="map-errors" {
            p { "The map is not valid; nothing changed:" }
            ul { @for p in &errors.0 { li { code { (p.line) ":" (p.column) } " " (p.message) } } }
        }
    }
}

pub(crate) async fn plan_map(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    form: Result<Form<MapForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    let notice = match cp.preview_plan(&user.cx(), &f.document).await {
        Ok(view) => plan_markup(&view.plan),
        Err(nebula_controller::desired::ApplyError::Map(e)) => map_problems(&e),
        Err(nebula_controller::desired::ApplyError::Op(e)) => return op_error(e),
    };
    services_view(&cp, &user, Some(f.document), Some(notice)).await
}

pub(crate) async fn apply_map(
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
            (plan_markup(&applied.plan))
        },
        Err(nebula_controller::desired::ApplyError::Map(e)) => map_problems(&e),
        Err(nebula_controller::desired::ApplyError::Op(e)) => return op_error(e),
    };
    services_view(&cp, &user, Some(f.document), Some(notice)).await
}

pub(crate) async fn rollback(
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
