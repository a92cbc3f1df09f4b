//! Alerts: what fires now (acknowledge), silences (add, end), sinks (send a test) and the
//! delivery history.

use crate::prelude::*;

pub(crate) async fn alerts_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
) -> Response {
    let cx = user.cx();
    let (alerts, silences, sinks, history) = match (
        cp.alerts_now(&cx).await,
        cp.silences(&cx).await,
        cp.sinks(&cx).await,
        cp.notifications(&cx, 20).await,
    ) {
        (Ok(a), Ok(s), Ok(k), Ok(h)) => (a, s, k, h),
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => return op_error(e),
    };
    let operator = user.authorize(&cp, Op::ManageAlerts).is_ok();
    let firing = alerts.iter().filter(|a| a.state == "firing").count();
    let body = html! {
        h1 { "Alerts" }
        p.totals { span { b { (firing) } " firing" } span { b { (alerts.len() - firing) } " other" }
            span { b { (silences.len()) } " silences" } span { b { (sinks.len()) } " sinks" } }
        @if alerts.is_empty() { p.dim id="no-alerts" { "Nothing fires." } }
        @else {
            div.scroll { table id="alerts" {
                thead { tr { th { "State" } th { "Severity" } th { "Rule" } th { "Labels" } th { "Since" } th { "Summary" } @if operator { th {} } } }
                tbody { @for a in &alerts { tr {
                    td { span class={"badge " (a.state)} { (a.state) }
                        @if a.silenced { " " span.dim { "silenced" } }
                        @if let Some(by) = &a.acknowledged_by { " " span.dim { "ack " (by) } } }
                    td { (a.severity) } td { code { (a.rule) } }
                    td { @for (k, v) in &a.labels { code { (k) "=" (v) } " " } }
                    td { (a.active_since) } td { (a.summary) }
                    @if operator { td { @if a.state == "firing" && a.acknowledged_by.is_none() {
                        form.inline method="post" action="/ui/alerts/ack" {
                            (csrf_field(&user))
                            input type="hidden" name="fingerprint" value=(a.fingerprint);
                            button.secondary type="submit" aria-label={"Acknowledge " (a.fingerprint)} { "Acknowledge" }
                        }
                    } } }
                } } }
            } }
        }
        h2 { "Silences" }
        @if silences.is_empty() { p.dim { "None in force." } }
        @else {
            div.scroll { table id="silences" {
                thead { tr { th { "Matchers" } th { "Ends" } th { "By" } th { "Comment" } @if operator { th {} } } }
                tbody { @for s in &silences { tr {
                    td { @for m in &s.matchers { code { (m) } " " } } td { (s.ends_at) } td { (s.created_by) } td { (s.comment) }
                    @if operator { td {
                        form.inline method="post" action="/ui/alerts/silences/expire" {
                            (csrf_field(&user))
                            input type="hidden" name="id" value=(s.id);
                            button.secondary type="submit" { "End" }
                        }
                    } }
                } } }
            } }
        }
        @if operator {
            form.actions method="post" action="/ui/alerts/silences" id="silence-form" {
                (csrf_field(&user))
                label for="matchers" { "Silence" }
                input id="matchers" name="matchers" placeholder="node=gpu-box alertname=cpu_high" size="40";
                label for="duration" { "for" }
                input id="duration" name="duration" value="2h" size="6";
                label for="comment" { "comment" }
                input id="comment" name="comment";
                button type="submit" { "Silence" }
            }
        }
        h2 { "Sinks" }
        @if sinks.is_empty() { p.dim { "No sinks: " code { "nebula sink add NAME URL" } " adds one." } }
        @else {
            div.scroll { table id="sinks" {
                thead { tr { th { "Name" } th { "Kind" } th { "URL" } th { "From severity" } @if operator { th {} } } }
                tbody { @for s in &sinks { tr {
                    td { (s.name) } td { (s.kind) } td { code { (s.url) } } td { (s.min_severity) }
                    @if operator { td {
                        form.inline method="post" action="/ui/alerts/sinks/test" {
                            (csrf_field(&user))
                            input type="hidden" name="name" value=(s.name);
                            button.secondary type="submit" { "Send a test" }
                        }
                    } }
                } } }
            } }
        }
        h2 { "Delivery" }
        div.scroll { table id="deliveries" {
            thead { tr { th { "Created" } th { "Sink" } th { "What" } th { "State" } th { "Tries" } th { "Last error" } } }
            tbody { @for n in &history { tr {
                td { (n.created_at) } td { (n.sink) }
                td { (n.payload["type"].as_str().unwrap_or("")) " " code { (n.payload["data"]["group"].as_str().unwrap_or("")) } }
                td { span class={"badge " (n.state)} { (n.state) } } td { (n.attempts) } td { (n.last_error.as_deref().unwrap_or("")) }
            } } }
        } }
    };
    page(&user, "Alerts", "/ui/alerts", None, body).into_response()
}

#[derive(Deserialize, Default)]
pub(crate) struct FieldForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    fingerprint: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    matchers: String,
    #[serde(default)]
    duration: String,
    #[serde(default)]
    comment: String,
}

fn back(r: Result<(), OpError>) -> Response {
    match r {
        Ok(()) => Redirect::to("/ui/alerts").into_response(),
        Err(e) => op_error(e),
    }
}

pub(crate) async fn acknowledge(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    form: Result<Form<FieldForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    back(cp.acknowledge_alert(&user.cx(), &f.fingerprint).await)
}

pub(crate) async fn add_silence(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    form: Result<Form<FieldForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    let req = nebula_controller::alerts::CreateSilence {
        matchers: f.matchers.split_whitespace().map(str::to_owned).collect(),
        duration: f.duration,
        comment: f.comment,
    };
    back(cp.add_silence(&user.cx(), req).await.map(|_| ()))
}

pub(crate) async fn expire_silence(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    form: Result<Form<FieldForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    back(cp.expire_silence(&user.cx(), &f.id).await)
}

pub(crate) async fn test_sink(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    form: Result<Form<FieldForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    back(cp.test_sink(&user.cx(), &f.name).await)
}

/// The alerts of one node, for its page.
pub(crate) async fn node_alerts(cp: &ControlPlane, user: &User, node: &str) -> Markup {
    labelled_alerts(cp, user, "node", node, "node-alerts").await
}

/// Alerts (pending, firing, resolving) whose `label` is `value`, as a list under a heading.
pub(crate) async fn labelled_alerts(
    cp: &ControlPlane,
    user: &User,
    label: &str,
    value: &str,
    id: &str,
) -> Markup {
    let Ok(alerts) = cp.alerts_now(&user.cx()).await else {
        return html! {};
    };
    let mine: Vec<_> = alerts
        .iter()
        .filter(|a| a.labels.get(label).map(String::as_str) == Some(value))
        .collect();
    html! {
        @if !mine.is_empty() {
            h2 { "Alerts" }
            ul id=(id) { @for a in mine {
                li { span class={"badge " (a.state)} { (a.state) } " " code { (a.rule) } " " (a.summary) }
            } }
        }
    }
}
