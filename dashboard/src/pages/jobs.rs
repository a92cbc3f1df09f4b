//! Jobs: the list and a job's live log.

use crate::prelude::*;

#[derive(Deserialize)]
pub(crate) struct JobsQuery {
    state: Option<String>,
    node: Option<String>,
}

pub(crate) fn job_what(j: &JobRecord) -> String {
    j.work.summary()
}

pub(crate) async fn jobs_page(
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

pub(crate) async fn job_page(
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

pub(crate) async fn job_events(
    State(cp): State<Arc<ControlPlane>>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return problem(StatusCode::NOT_FOUND, "no such job");
    };
    match nebula_controller::http::job_log_stream(cp, id, true).await {
        Ok(sse) => sse.into_response(),
        Err(e) => e.into_response(),
    }
}
