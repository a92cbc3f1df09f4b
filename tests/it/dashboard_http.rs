//! The dashboard's sign-in and its refusals over plain HTTP (a real controller process): the
//! first admin printed at first start, `nebula user create`, cookie attributes (Secure behind
//! TLS), and requests without a session, with a wrong CSRF token or a viewer's role.

use crate::common;

use std::time::Duration;

use common::*;
use nebula_types::api::access::CreatedApiToken;
use nebula_types::jobs::AuditRecord;
use serde_json::json;

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn set_cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

/// The CSRF token a dashboard page's forms carry.
pub(crate) fn csrf_of(page: &str) -> String {
    page.split("name=\"csrf\" value=\"")
        .nth(1)
        .expect("a form with a CSRF token")
        .split('"')
        .next()
        .unwrap()
        .to_owned()
}

/// Sign in; the whole `Set-Cookie` of the session (or the status when refused).
pub(crate) async fn sign_in(
    c: &Controller,
    user: &str,
    password: &str,
    tls: bool,
) -> Result<String, u16> {
    sign_in_with(client(), c, user, password, tls).await
}

/// Sign in from a given loopback address (the controller throttles by source address).
async fn sign_in_from(
    c: &Controller,
    from: [u8; 4],
    user: &str,
    password: &str,
) -> Result<String, u16> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(std::net::IpAddr::from(from))
        .build()
        .unwrap();
    sign_in_with(http, c, user, password, false).await
}

pub(crate) async fn sign_in_with(
    http: reqwest::Client,
    c: &Controller,
    user: &str,
    password: &str,
    tls: bool,
) -> Result<String, u16> {
    let mut get = http.get(c.url("/ui/login"));
    if tls {
        get = get.header("x-forwarded-proto", "https");
    }
    let page = get.send().await.unwrap();
    let login = set_cookie(&page, "nebula_login").expect("a sign-in cookie");
    let token = login
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_owned();
    let mut post = http
        .post(c.url("/ui/login"))
        .header("cookie", format!("nebula_login={token}"))
        .form(&[
            ("csrf", token.as_str()),
            ("username", user),
            ("password", password),
        ]);
    if tls {
        post = post.header("x-forwarded-proto", "https");
    }
    let resp = post.send().await.unwrap();
    if resp.status().as_u16() != 303 {
        return Err(resp.status().as_u16());
    }
    Ok(set_cookie(&resp, "nebula_session").expect("a session cookie"))
}

/// The first admin's password, printed once at first start.
pub(crate) async fn first_admin_password(c: &Controller) -> String {
    wait_for(
        "the first admin's password",
        Duration::from_secs(10),
        || async {
            c.proc
                .stdout
                .find("Dashboard user `admin`, password (shown once, stored hashed): ")
        },
    )
    .await
}

pub(crate) fn session_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_cookies_users_and_refusals() {
    let c = Controller::start(ControllerOpts::default()).await;
    // The first admin, printed once at first start.
    let password = first_admin_password(&c).await;
    let cookie = sign_in(&c, "admin", &password, false)
        .await
        .expect("signed in");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    let behind_tls = sign_in(&c, "admin", &password, true)
        .await
        .expect("signed in");
    assert!(behind_tls.contains("; Secure"), "{behind_tls}");
    assert_eq!(
        sign_in(&c, "admin", "wrong-password", false).await,
        Err(401)
    );
    assert_eq!(
        sign_in(&c, "nobody", "wrong-password", false).await,
        Err(401)
    );
    // Guessing is held off: after 5 failures in a row from one address a username waits;
    // failures are audited, one row per username and address a minute (with the count).
    for _ in 0..4 {
        assert_eq!(sign_in(&c, "nobody", "guess", false).await, Err(401));
    }
    assert_eq!(sign_in(&c, "nobody", "guess", false).await, Err(429));
    let audit = wait_for(
        "failed sign-ins in the audit log",
        Duration::from_secs(10),
        || async {
            let audit = audit_rows(&c, "user.login_failed").await;
            (audit.len() >= 2).then_some(audit)
        },
    )
    .await;
    assert_eq!(audit.len(), 2, "rate-limited: one row per pair: {audit:?}");
    let nobody = audit.iter().find(|r| r.target == "nobody").unwrap();
    assert_eq!(nobody.detail["source"], "127.0.0.1", "{nobody:?}");
    // Pages are not cached, scripts come only from the controller, no framing.
    let page = client().get(c.url("/ui/login")).send().await.unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(page.headers()["cache-control"], "no-store");

    // `nebula user create --admin` (a generated password, printed once) and a viewer.
    let out = c.cli(&["user", "create", "bob", "--admin"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bob_pw = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Password (shown once): "))
        .expect("a generated password")
        .to_owned();
    sign_in(&c, "bob", &bob_pw, false)
        .await
        .expect("bob signs in");
    let (status, v) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/users",
            Some(json!({"username": "bob", "password": "another-one", "role": "viewer"})),
        )
        .await;
    assert_eq!(status, 409, "{v}");
    for (body, why) in [
        (
            json!({"username": "a b", "password": "long-enough"}),
            "username",
        ),
        (json!({"username": "short", "password": "x"}), "password"),
        (
            json!({"username": "role", "password": "long-enough", "role": "root"}),
            "role",
        ),
    ] {
        let (status, v) = c
            .api(reqwest::Method::POST, "/api/v1/users", Some(body))
            .await;
        assert_eq!(status, 400, "{why}: {v}");
    }
    let (status, _) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/users",
            Some(json!({"username": "vera", "password": "viewer-password", "role": "viewer"})),
        )
        .await;
    assert_eq!(status, 201);
    let viewer = session_pair(&sign_in(&c, "vera", "viewer-password", false).await.unwrap());
    let admin = session_pair(&cookie);

    // The Tasks page lists every background task with its scope, for any signed-in role.
    let page = client()
        .get(c.url("/ui/tasks"))
        .header("cookie", &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let html = page.text().await.unwrap();
    for name in [
        "job-scheduler",
        "reconciler",
        "quic-listener",
        "http-server",
    ] {
        assert!(
            html.contains(&format!("data-task=\"{name}\"")),
            "{name}: {html}"
        );
    }
    assert!(
        html.contains(">leader<") && html.contains(">every replica<"),
        "{html}"
    );

    let http = client();
    // No session: pages redirect to sign-in, actions are refused.
    let r = http.get(c.url("/ui/services")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(r.headers()["location"], "/ui/login");
    let r = http
        .post(c.url("/ui/services/apply"))
        .form(&[("document", "services: {}")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // A forged session cookie is no session.
    let r = http
        .get(c.url("/ui/"))
        .header("cookie", "nebula_session=forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    // Garbage bodies: clear refusals, nothing breaks.
    for body in ["%%%", "csrf=&document", ""] {
        let r = http
            .post(c.url("/ui/services/apply"))
            .header("cookie", &admin)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{body}");
    }
    // The admin's page carries its CSRF token; with it, apply works; a viewer's is refused.
    let page = http
        .get(c.url("/ui/services"))
        .header("cookie", &admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = csrf_of(&page);
    let r = http
        .post(c.url("/ui/services/apply"))
        .header("cookie", &admin)
        .form(&[("csrf", csrf.as_str()), ("document", "services: {}\n")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains("Applied as version 1"));
    let viewer_page = http
        .get(c.url("/ui/services"))
        .header("cookie", &viewer)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!viewer_page.contains("apply-button"));
    let viewer_csrf = csrf_of(&viewer_page);
    for (path, fields) in [
        ("/ui/services/apply", vec![("document", "services: {}\n")]),
        ("/ui/enroll", vec![("ttl", "1h"), ("uses", "1")]),
        ("/ui/services/x/rollback", vec![]),
    ] {
        let mut form = vec![("csrf", viewer_csrf.as_str())];
        form.extend(fields);
        let r = http
            .post(c.url(path))
            .header("cookie", &viewer)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{path}");
    }
    let desired: nebula_types::api::desired::DesiredView = c.get_as("/api/v1/desired").await;
    assert_eq!(desired.version, Some(1));

    // The same role through the API, with a viewer token: refused by the same check in the
    // control plane, in the same words, and both refusals counted under one operation.
    let (status, v) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/api-tokens",
            Some(json!({"name": "viewer-bot", "role": "viewer"})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let created: CreatedApiToken = serde_json::from_value(v).unwrap();
    let viewer_token = created.token;
    let r = http
        .put(c.url("/api/v1/desired"))
        .bearer_auth(&viewer_token)
        .body("services: {}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let refusal: serde_json::Value = r.json().await.unwrap();
    let words = common::error_of(&refusal).message.to_owned();
    assert_eq!(words, "this action needs the Admin role", "{refusal}");
    let r = http
        .post(c.url("/ui/services/apply"))
        .header("cookie", &viewer)
        .form(&[
            ("csrf", viewer_csrf.as_str()),
            ("document", "services: {}\n"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let page = r.text().await.unwrap();
    assert!(page.contains(&words), "{page}");
    let m = c.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"nebula_operations_refused_total{op="apply_map",via="api"}"#
        ),
        1.0,
        "{m}"
    );
    // Twice through the dashboard: the loop above, and just now.
    assert_eq!(
        metric(
            &m,
            r#"nebula_operations_refused_total{op="apply_map",via="dashboard"}"#
        ),
        2.0
    );
    // Creating the token was one change: audited with the front end it came through.
    let row = wait_for("the token's audit row", Duration::from_secs(5), || async {
        let rows = audit_rows(&c, "api_token.create").await;
        rows.into_iter().find(|a| a.target == "viewer-bot")
    })
    .await;
    assert_eq!(row.detail["via"], "api", "{row:?}");
    assert_eq!(row.detail["role"], "viewer");
    // Sign-out ends the session.
    let r = http
        .post(c.url("/ui/logout"))
        .header("cookie", &viewer)
        .form(&[("csrf", viewer_csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let r = http
        .get(c.url("/ui/"))
        .header("cookie", &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303, "the old cookie no longer works");
}

/// A stranger guessing `admin`'s password from one address holds off only that address; the
/// real admin signs in from another. A flood of sign-ins is answered 429 at once and does not
/// delay a correct sign-in by more than a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_lock_the_admin_out_and_floods_get_429_at_once() {
    let c = Controller::start(ControllerOpts::default()).await;
    let password = first_admin_password(&c).await;
    let stranger = [127, 0, 0, 2];
    let mut answers = Vec::new();
    for _ in 0..8 {
        answers.push(
            sign_in_from(&c, stranger, "admin", "guess-guess")
                .await
                .unwrap_err(),
        );
    }
    assert_eq!(answers[..5], [401; 5], "{answers:?}");
    assert_eq!(answers[5..], [429; 3], "held off after five: {answers:?}");
    // The real admin, from another address: not held off.
    sign_in_from(&c, [127, 0, 0, 1], "admin", &password)
        .await
        .expect("the admin signs in while the stranger is held off");

    // A flood from a third address, and the admin signing in during it.
    let c = &c;
    let flood = futures::future::join_all((0..100).map(|i| async move {
        sign_in_from(c, [127, 0, 0, 3], &format!("user{i}"), "guess-guess")
            .await
            .unwrap_err()
    }));
    let admin = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        let signed_in = sign_in_from(c, [127, 0, 0, 1], "admin", &password).await;
        (signed_in, started.elapsed())
    };
    let (answers, (signed_in, took)) = tokio::join!(flood, admin);
    signed_in.expect("the admin signs in during the flood");
    let refused = answers.iter().filter(|s| **s == 429).count();
    assert!(
        refused >= 90,
        "most of the flood is answered 429: {answers:?}"
    );
    assert!(
        answers.iter().all(|s| *s == 429 || *s == 401),
        "{answers:?}"
    );
    assert!(
        took < Duration::from_secs(1),
        "a correct sign-in took {took:?} during the flood"
    );
}

/// The audit rows of one action.
async fn audit_rows(c: &Controller, action: &str) -> Vec<AuditRecord> {
    let page: common::Page<AuditRecord> = c.get_as(&format!("/api/v1/audit?action={action}")).await;
    page.items
}

/// The Alerts page: a silence added and ended through its forms; a viewer sees the page and no
/// forms, and its POST is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerts_page_silences_and_lists() {
    let c = Controller::start(ControllerOpts::default()).await;
    let admin = session_pair(
        &sign_in(&c, "admin", &first_admin_password(&c).await, false)
            .await
            .unwrap(),
    );
    let http = client();
    let page = |cookie: String| {
        let http = http.clone();
        let url = c.url("/ui/alerts");
        async move {
            let resp = http.get(url).header("cookie", cookie).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.text().await.unwrap()
        }
    };
    let html = page(admin.clone()).await;
    assert!(html.contains("Nothing fires.") && html.contains("id=\"silence-form\""));
    let csrf = csrf_of(&html);
    let resp = http
        .post(c.url("/ui/alerts/silences"))
        .header("cookie", &admin)
        .form(&[
            ("csrf", csrf.as_str()),
            ("matchers", "node=box alertname=cpu_high"),
            ("duration", "2h"),
            ("comment", "new fans"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let html = page(admin.clone()).await;
    assert!(
        html.contains("node=box") && html.contains("new fans"),
        "listed"
    );
    let silences: Vec<nebula_types::api::alerts::SilenceView> =
        c.get_as("/api/v1/alerts/silences").await;
    assert_eq!(silences.len(), 1);
    assert_eq!(silences[0].created_by, "admin");
    // A bad matcher is refused with its reason, and adds nothing.
    let resp = http
        .post(c.url("/ui/alerts/silences"))
        .header("cookie", &admin)
        .form(&[
            ("csrf", csrf.as_str()),
            ("matchers", "node"),
            ("duration", "2h"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("label=value"));
    // Ended through the page.
    let resp = http
        .post(c.url("/ui/alerts/silences/expire"))
        .header("cookie", &admin)
        .form(&[("csrf", csrf.as_str()), ("id", silences[0].id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let silences: Vec<nebula_types::api::alerts::SilenceView> =
        c.get_as("/api/v1/alerts/silences").await;
    assert!(silences.is_empty());

    // A viewer: the page, no forms; a POST refused by the control plane.
    let out = c.cli(&["user", "create", "vera", "--role", "viewer"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let password = text
        .lines()
        .find_map(|l| l.strip_prefix("Password (shown once): "))
        .expect("a generated password")
        .to_owned();
    let viewer = session_pair(&sign_in(&c, "vera", &password, false).await.unwrap());
    let html = page(viewer.clone()).await;
    assert!(
        !html.contains("id=\"silence-form\""),
        "no form for a viewer"
    );
    let viewer_csrf = csrf_of(&html);
    let resp = http
        .post(c.url("/ui/alerts/silences"))
        .header("cookie", &viewer)
        .form(&[
            ("csrf", viewer_csrf.as_str()),
            ("matchers", "node=box"),
            ("duration", "1h"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
}

/// The monitors board and a monitor's page, with a real agent checking a TCP port: the row
/// shows it up with its last checks as a bar, the page draws its latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitors_board_shows_each_node_and_the_latency() {
    let c = Controller::start(ControllerOpts {
        extra: vec!["--monitor-assign-interval", "1s"],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (_agent, _) = join_ready(&c, dir.path(), "watcher", &[], None).await;
    let admin = session_pair(
        &sign_in(&c, "admin", &first_admin_password(&c).await, false)
            .await
            .unwrap(),
    );
    let http = client();
    let get = |path: &str| {
        let (http, url, cookie) = (http.clone(), c.url(path), admin.clone());
        async move {
            let resp = http.get(url).header("cookie", cookie).send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    let (status, html) = get("/ui/monitors").await;
    assert_eq!(status, 200);
    assert!(!html.contains("api-port"), "not there before the map");
    let map = format!(
        "monitors:\n  api-port:\n    tcp: {}\n    interval: 5s\n    nodes: [watcher]\n",
        c.http
    );
    let (status, v) = c.put_map(&map).await;
    assert_eq!(status, 200, "{v}");
    let row = wait_for(
        "the monitor up on the board",
        Duration::from_secs(30),
        || async {
            let (_, html) = get("/ui/monitors").await;
            let row = html
                .split("id=\"monitor-api-port-watcher\"")
                .nth(1)
                .and_then(|r| r.split("</tr>").next())
                .map(str::to_owned)?;
            row.contains("class=\"badge up\"").then_some(row)
        },
    )
    .await;
    assert!(row.contains("<i class=\"up\""), "a cell per check: {row}");
    assert!(row.contains("100.00%"), "uptime: {row}");
    let (status, page) = get("/ui/monitors/api-port").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("Latency from watcher") && page.contains("<svg"),
        "{page}"
    );
    let (status, _) = get("/ui/monitors/nope").await;
    assert_eq!(status, 404);
}
