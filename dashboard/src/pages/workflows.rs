//! Workflows: the list (with a form to start a run) and recent runs; a run's page with its
//! graph (an SVG of the steps by dependency, coloured by state, live), each step's attempt,
//! outputs and job (whose page has the step's log), and buttons to approve, reject or cancel.

use nebula_controller::workflows::RunView as Run;
use nebula_controller::workflows::StepView as StepRow;

use crate::prelude::*;

fn color(state: &str) -> &'static str {
    match state {
        "succeeded" => "#3fb950",
        "failed" | "timed_out" => "#f85149",
        "running" => "#4cc2ff",
        "waiting" => "#d29922",
        "approval" => "#a371f7",
        _ => "#6e7681",
    }
}

/// Each step's column (its depth in the DAG) and row.
fn layout(steps: &[StepRow]) -> Vec<(usize, usize)> {
    let mut depth: Vec<usize> = vec![0; steps.len()];
    for _ in 0..steps.len() {
        for (i, s) in steps.iter().enumerate() {
            let d = s
                .needs
                .iter()
                .filter_map(|n| steps.iter().position(|o| &o.id == n))
                .map(|j| depth[j] + 1)
                .max()
                .unwrap_or(0);
            depth[i] = d;
        }
    }
    let mut rows: BTreeMap<usize, usize> = BTreeMap::new();
    depth
        .iter()
        .map(|d| {
            let r = rows.entry(*d).or_default();
            *r += 1;
            (*d, *r - 1)
        })
        .collect()
}

const BOX_W: usize = 150;
const BOX_H: usize = 38;
const GAP_X: usize = 50;
const GAP_Y: usize = 18;

/// The run's steps as a graph: one box per step, an arrow per dependency.
fn graph(steps: &[StepRow]) -> Markup {
    let at = layout(steps);
    let xy = |i: usize| {
        let (c, r) = at[i];
        (10 + c * (BOX_W + GAP_X), 10 + r * (BOX_H + GAP_Y))
    };
    let width = at.iter().map(|(c, _)| c + 1).max().unwrap_or(1) * (BOX_W + GAP_X) + 10;
    let height = at.iter().map(|(_, r)| r + 1).max().unwrap_or(1) * (BOX_H + GAP_Y) + 10;
    html! {
        svg.run-graph role="img" aria-label="the run's steps and their dependencies"
            width=(width) height=(height) viewBox={"0 0 " (width) " " (height)} {
            @for (i, s) in steps.iter().enumerate() {
                @for n in &s.needs {
                    @if let Some(j) = steps.iter().position(|o| &o.id == n) {
                        @let (x1, y1) = xy(j);
                        @let (x2, y2) = xy(i);
                        path fill="none" stroke="#8b949e" stroke-width="1.5"
                            d={"M" (x1 + BOX_W) " " (y1 + BOX_H / 2) " C" (x1 + BOX_W + GAP_X / 2) " " (y1 + BOX_H / 2) " " (x2 - GAP_X / 2) " " (y2 + BOX_H / 2) " " (x2) " " (y2 + BOX_H / 2)} {}
                    }
                }
            }
            @for (i, s) in steps.iter().enumerate() {
                @let (x, y) = xy(i);
                g id={"step-" (s.id)} data-state=(s.state) {
                    title { (s.id) ": " (s.state) @if let Some(e) = &s.error { " (" (e) ")" } }
                    rect x=(x) y=(y) width=(BOX_W) height=(BOX_H) rx="6" fill=(color(&s.state)) fill-opacity="0.25" stroke=(color(&s.state)) stroke-width="2" {}
                    text x=(x + 8) y=(y + 16) fill="currentColor" font-size="13" { (s.id) }
                    text x=(x + 8) y=(y + 31) fill=(color(&s.state)) font-size="11" {
                        (s.kind) " · " (s.state) @if s.attempt > 1 { " #" (s.attempt) } }
                }
            }
        }
    }
}

/// The part of a run's page that changes (sent again over the live stream).
fn run_section(user: &User, run: &Run) -> Markup {
    let may_decide = user.can(Role::Operator);
    html! {
        section id="run" {
            p { span id="run-state" class={"badge " (run.state)} { (run.state) }
                " " (run.workflow) ", started by " (run.created_by) " at " (run.created_at)
                @if let Some(f) = &run.finished_at { ", ended " (f) }
                @if let Some(e) = &run.error { " " span.error { (e) } } }
            div.scroll { (graph(&run.steps)) }
            div.scroll { table id="steps" {
                thead { tr { th { "Step" } th { "Type" } th { "State" } th { "Try" } th { "Job (log)" } th { "Outputs / error" } } }
                tbody { @for s in &run.steps {
                    tr id={"row-" (s.id)} {
                        td { (s.id) @if !s.needs.is_empty() { div.dim { "after " (s.needs.join(", ")) } } }
                        td { (s.kind) }
                        td { span class={"badge " (s.state)} { (s.state) } }
                        td { @if s.attempt > 0 { (s.attempt) } }
                        td { @if let Some(j) = s.job { a href={"/ui/jobs/" (j)} { code { (j.to_string()[..8]) } } } }
                        td {
                            @if let Some(e) = &s.error { div.error { (e) } }
                            @if !s.outputs.is_null() { details { summary { "outputs" } pre { (serde_json::to_string_pretty(&s.outputs).unwrap_or_default()) } } }
                            @if s.state == "approval" && may_decide {
                                form.inline method="post" action={"/ui/workflows/runs/" (run.id) "/decide"} {
                                    (csrf_field(user))
                                    input type="hidden" name="step" value=(s.id);
                                    input type="text" name="comment" placeholder="comment" aria-label="comment";
                                    button type="submit" name="approve" value="true" { "Approve" }
                                    button.secondary type="submit" name="approve" value="false" { "Reject" }
                                }
                            }
                        }
                    }
                } }
            } }
            @if matches!(run.state.as_str(), "running" | "queued") && may_decide && !run.cancel_requested {
                form method="post" action={"/ui/workflows/runs/" (run.id) "/cancel"} {
                    (csrf_field(user)) button.secondary type="submit" { "Cancel run" }
                }
            }
        }
    }
}

pub(crate) async fn workflows_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
) -> Response {
    let cx = user.cx();
    let (defs, runs) = match (
        cp.workflows_list(&cx).await,
        cp.workflow_runs(&cx, None, 50).await,
    ) {
        (Ok(d), Ok(r)) => (d, r),
        (Err(e), _) | (_, Err(e)) => return op_error(e),
    };
    let may_run = user.can(Role::Operator);
    let body = html! {
        h1 { "Workflows" }
        @if defs.is_empty() {
            p.dim id="no-workflows" { "No workflows. Write them in " code { "workflows.yml" } " (" code { "nebula serve --workflows" } ") or use " code { "nebula workflow put" } "." }
        } @else {
            div.scroll { table id="workflows" {
                thead { tr { th { "Workflow" } th { "Steps" } th { "Triggers" } th { "Source" } th {} } }
                tbody { @for w in &defs {
                    @let on = &w.definition["on"];
                    tr id={"wf-" (w.name)} {
                        td { b { (w.name) } div.dim { (w.description) } }
                        td { (w.steps) }
                        td { @if on["schedule"].is_array() { "schedule " } @if on["webhook"].is_object() { "webhook " } @if on["events"].is_array() { "events" } }
                        td { (w.source) }
                        td { @if may_run {
                            form.inline method="post" action={"/ui/workflows/" (w.name) "/run"} {
                                (csrf_field(&user))
                                @if let Some(inputs) = w.definition["inputs"].as_object() {
                                    @for (name, i) in inputs {
                                        input type="text" name={"input." (name)} placeholder=(name) aria-label=(name)
                                            value=(i["default"].as_str().map(str::to_owned).unwrap_or_else(|| if i["default"].is_null() { String::new() } else { i["default"].to_string() }));
                                    }
                                }
                                button type="submit" { "Run" }
                            }
                        } }
                    }
                } }
            } }
        }
        h2 { "Recent runs" }
        @if runs.is_empty() { p.dim { "No runs yet." } } @else {
            div.scroll { table id="runs" {
                thead { tr { th { "Run" } th { "Workflow" } th { "State" } th { "By" } th { "Started" } } }
                tbody { @for r in &runs {
                    tr { td { a href={"/ui/workflows/runs/" (r.id)} { code { (r.id.to_string()[..8]) } } }
                        td { (r.workflow) } td { span class={"badge " (r.state)} { (r.state) } }
                        td { (r.created_by) } td { (r.created_at) } }
                } }
            } }
        }
    };
    page(&user, "Workflows", "/ui/workflows", None, body).into_response()
}

fn run_id(id: &str) -> Result<uuid::Uuid, Box<Response>> {
    uuid::Uuid::parse_str(id).map_err(|_| Box::new(problem(StatusCode::NOT_FOUND, "no such run")))
}

pub(crate) async fn run_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path(id): Path<String>,
) -> Response {
    let id = match run_id(&id) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    let run = match cp.workflow_run_get(&user.cx(), id).await {
        Ok(r) => r,
        Err(e) => return op_error(e),
    };
    let events = format!("/ui/workflows/runs/{id}/events");
    let body = html! {
        h1 { "Run " code { (id.to_string()[..8]) } }
        (run_section(&user, &run))
    };
    page(&user, "Workflow run", "/ui/workflows", Some(&events), body).into_response()
}

/// The run's section again whenever the run changes (and every few seconds as a fallback).
pub(crate) async fn run_events(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return problem(StatusCode::NOT_FOUND, "no such run");
    };
    let token = cookie(&headers, SESSION_COOKIE).unwrap_or("").to_owned();
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(8);
    let (shutdown, cp2) = (cp.shutdown.clone(), cp.clone());
    let mut events = cp.events.subscribe();
    cp.tracker.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut last = String::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                _ = tick.tick() => {}
                ev = events.recv() => match ev {
                    Ok(Event::WorkflowRunChanged { id: changed, .. }) if changed == id => {}
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                },
            }
            if !matches!(cp2.ui_session(&token).await, Ok(Some(_))) {
                return;
            }
            let Ok(run) = cp2.workflow_run_get(&user.cx(), id).await else {
                return;
            };
            let html = run_section(&user, &run).into_string();
            if html != last {
                let ev = SseEvent::default().event("fragment").data(html.clone());
                if tx.send(ev).await.is_err() {
                    return;
                }
                last = html;
            }
        }
    });
    sse_of(rx).into_response()
}

pub(crate) async fn start_run(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path(name): Path<String>,
    form: Result<Form<BTreeMap<String, String>>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(f.get("csrf").map_or("", String::as_str)) {
        return r.into_response();
    }
    let inputs: serde_json::Map<String, serde_json::Value> = f
        .iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("input.")?;
            let value =
                serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.clone()));
            Some((name.to_owned(), value))
        })
        .collect();
    match cp
        .workflow_run(&user.cx(), &name, serde_json::Value::Object(inputs))
        .await
    {
        Ok(run) => Redirect::to(&format!("/ui/workflows/runs/{}", run.id)).into_response(),
        Err(e) => op_error(e),
    }
}

#[derive(Deserialize, Default)]
pub(crate) struct DecideForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    step: String,
    #[serde(default)]
    approve: String,
    #[serde(default)]
    comment: String,
}

pub(crate) async fn decide(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path(id): Path<String>,
    form: Result<Form<DecideForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    let id = match run_id(&id) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    let d = nebula_controller::workflows::Decide {
        step: f.step,
        approve: f.approve == "true",
        comment: f.comment,
    };
    match cp.workflow_decide(&user.cx(), id, d).await {
        Ok(_) => Redirect::to(&format!("/ui/workflows/runs/{id}")).into_response(),
        Err(e) => op_error(e),
    }
}

pub(crate) async fn cancel(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path(id): Path<String>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let csrf = form.map(|Form(f)| f.csrf).unwrap_or_default();
    if let Err(r) = user.check(&csrf) {
        return r.into_response();
    }
    let id = match run_id(&id) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    match cp.workflow_cancel(&user.cx(), id).await {
        Ok(_) => Redirect::to(&format!("/ui/workflows/runs/{id}")).into_response(),
        Err(e) => op_error(e),
    }
}
