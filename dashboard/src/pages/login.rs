//! Signing in and out.

use crate::prelude::*;

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
}

pub(crate) fn login_html(token: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Sign in · Nebula Command" }
                link rel="stylesheet" href="/ui/assets/style.css";
            }
            body {
                main {
                    form.login method="post" action="/ui/login" {
                        h1 { "Nebula Command" }
                        @if let Some(e) = error { p.error role="alert" { (e) } }
                        input type="hidden" name="csrf" value=(token);
                        label for="username" { "Username" }
                        input id="username" name="username" autocomplete="username" required autofocus;
                        label for="password" { "Password" }
                        input id="password" name="password" type="password" autocomplete="current-password" required;
                        p { button type="submit" { "Sign in" } }
                    }
                }
            }
        }
    }
}

pub(crate) fn login_cookie(headers: &HeaderMap, token: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{LOGIN_COOKIE}={token}; Path=/ui/login; HttpOnly; SameSite=Strict; Max-Age=3600{}",
        secure(headers)
    ))
    .expect("ASCII cookie")
}

pub(crate) fn new_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The sign-in form's token: the one its cookie already holds (a page loaded twice must not
/// leave the cookie and the form disagreeing), else a new one.
pub(crate) fn login_token(headers: &HeaderMap) -> String {
    cookie(headers, LOGIN_COOKIE)
        .filter(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
        .unwrap_or_else(new_token)
}

pub(crate) async fn login_page(headers: HeaderMap) -> Response {
    let token = login_token(&headers);
    (
        [(header::SET_COOKIE, login_cookie(&headers, &token))],
        login_html(&token, None),
    )
        .into_response()
}

pub(crate) async fn login(
    State(cp): State<Arc<ControlPlane>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return problem(StatusCode::BAD_REQUEST, "the sign-in form is incomplete");
    };
    let bound = cookie(&headers, LOGIN_COOKIE).unwrap_or("");
    if f.csrf.is_empty() || !constant_eq(f.csrf.as_bytes(), bound.as_bytes()) {
        return problem(
            StatusCode::FORBIDDEN,
            "the sign-in form's CSRF token is missing or wrong; reload the page",
        );
    }
    let source = cp.client_ip(peer, &headers);
    match cp.login(&f.username, &f.password, source).await {
        Ok((token, s)) => {
            let max_age =
                (s.expires_at - nebula_controller::store::millis(SystemTime::now())) / 1000;
            let set = HeaderValue::from_str(&format!(
                "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
                secure(&headers)
            ))
            .expect("ASCII cookie");
            ([(header::SET_COOKIE, set)], Redirect::to("/ui/")).into_response()
        }
        Err(e @ (OpError::Invalid(_) | OpError::TooManyRequests(_))) => {
            let (status, m) = match e {
                OpError::TooManyRequests(m) => (StatusCode::TOO_MANY_REQUESTS, m),
                OpError::Invalid(m) => (StatusCode::UNAUTHORIZED, m),
                _ => unreachable!("matched above"),
            };
            let token = login_token(&headers);
            (
                status,
                [(header::SET_COOKIE, login_cookie(&headers, &token))],
                login_html(&token, Some(&m)),
            )
                .into_response()
        }
        Err(e) => op_error(e),
    }
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    #[serde(default)]
    pub(crate) csrf: String,
}

pub(crate) async fn logout(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let csrf = form.map(|Form(f)| f.csrf).unwrap_or_default();
    if let Err(r) = user.check(&csrf) {
        return r.into_response();
    }
    if let Some(token) = cookie(&headers, SESSION_COOKIE) {
        if let Err(e) = cp.logout(token).await {
            return op_error(e);
        }
    }
    let clear =
        HeaderValue::from_static("nebula_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, clear)], Redirect::to("/ui/login")).into_response()
}
