//! Background tasks and the audit log.

use crate::prelude::*;

/// The controller's background tasks: where each runs, what it is doing, its last run.
pub(crate) async fn tasks_page(
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

pub(crate) async fn audit_page(
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
