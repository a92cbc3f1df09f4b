//! Enrollment: a join token and the install commands.

use crate::prelude::*;

#[derive(Deserialize)]
pub(crate) struct EnrollForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    ttl: String,
    #[serde(default)]
    uses: String,
}

pub(crate) fn enroll_form(user: &User) -> Markup {
    html! {
        form method="post" action="/ui/enroll" .actions {
            (csrf_field(user))
            label for="ttl" { "Valid for" }
            select id="ttl" name="ttl" { option value="1h" { "1 hour" } option value="24h" { "24 hours" } option value="7d" { "7 days" } }
            label for="uses" { "Nodes" }
            input id="uses" name="uses" type="number" min="1" max="1000" value="1";
            button type="submit" id="create-token" { "Create a join token" }
        }
    }
}

pub(crate) async fn enroll_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
) -> Response {
    if let Err(e) = user.authorize(&cp, Op::ManageJoinTokens) {
        return op_error(e);
    }
    let body = html! {
        h1 { "Enroll a node" }
        p { "A join token lets new hosts join the fleet; it is shown once." }
        (enroll_form(&user))
    };
    page(&user, "Enroll", "/ui/enroll", None, body).into_response()
}

pub(crate) async fn enroll(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    headers: HeaderMap,
    form: Result<Form<EnrollForm>, FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return problem(StatusCode::BAD_REQUEST, "the form is incomplete");
    };
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    let ttl = match f.ttl.as_str() {
        "1h" => Duration::from_secs(3600),
        "24h" => Duration::from_secs(86_400),
        "7d" => Duration::from_secs(7 * 86_400),
        other => {
            return problem(
                StatusCode::BAD_REQUEST,
                &format!("`{other}` is not one of the offered lifetimes"),
            )
        }
    };
    let uses = f.uses.parse::<u32>().unwrap_or(1).clamp(1, 1000);
    let created = match cp
        .create_join_token(
            Some(ttl),
            Some(uses),
            Default::default(),
            "dashboard",
            &user.cx(),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return op_error(e),
    };
    // The installers come from this controller's public URL; agents dial its QUIC address.
    let (url, quic) = match nebula_controller::http::install::public_addresses(&cp, &headers) {
        Ok(a) => (a.url, a.quic),
        Err(_) => (
            "https://CONTROLLER".to_owned(),
            format!("CONTROLLER:{}", cp.quic_port()),
        ),
    };
    let token = &created.token;
    let body = html! {
        h1 { "Enroll a node" }
        p role="status" { "Join token for " (uses) " node(s), valid for " (humantime::format_duration(ttl)) ". It is shown once:" }
        pre id="join-token" { (token) }
        h2 { "Linux (x86_64, aarch64)" }
        // With the fleet CA's certificate, curl is told the served key instead (the script then
        // trusts the CA it carries, checked against the token's pin).
        @let pin = cp.https.as_ref().and_then(|h| h.install_pin());
        @match pin {
            Some(pin) => pre id="install-linux" { "curl -fsSL --pinnedpubkey '" (pin) "' -k " (url) "/install.sh | sudo sh -s -- --token " (token) },
            None => pre id="install-linux" { "curl -fsSL " (url) "/install.sh | sudo sh -s -- --token " (token) },
        }
        h2 { "Windows (PowerShell as administrator)" }
        pre id="install-windows" { "& ([scriptblock]::Create((irm " (url) "/install.ps1))) -Token " (token) }
        h2 { "By hand" }
        pre id="install-manual" { "nebula-agent join --controller " (quic) " --token " (token) " --state-dir /var/lib/nebula-agent" }
        (enroll_form(&user))
    };
    page(&user, "Enroll", "/ui/enroll", None, body).into_response()
}
