//! `nebula-bench dashboard`: the overview page with N simulated agents connected (the fleet
//! simulator: real enrollment, QUIC sessions, telemetry with containers). Signs in like a
//! browser (login form, CSRF cookie, session cookie), then times `GET /ui/` end to end on
//! loopback and weighs what a browser downloads for it: the HTML, the CSS and the JavaScript,
//! as sent (compressed when the browser accepts gzip) and uncompressed.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use crate::fleet::SimFleet;
use crate::{join_token, percentile, start_controller, stats};

fn set_cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let first = v.split(';').next()?;
            let (k, val) = first.split_once('=')?;
            (k.trim() == name).then(|| val.to_owned())
        })
}

/// (bytes as sent, bytes uncompressed) of one GET.
async fn weigh(
    client: &reqwest::Client,
    url: &str,
    cookie: &str,
) -> anyhow::Result<(usize, usize)> {
    let sent = client
        .get(url)
        .header(reqwest::header::COOKIE, cookie)
        .header(reqwest::header::ACCEPT_ENCODING, "gzip")
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?
        .len();
    let raw = client
        .get(url)
        .header(reqwest::header::COOKIE, cookie)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?
        .len();
    Ok((sent, raw))
}

pub async fn dashboard_bench(agents: usize, requests: usize, out: &Path) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = start_controller(dir.path(), "127.0.0.1:0", "127.0.0.1:0", &[])?;
    // reqwest here has no gzip support: a compressed body arrives as it was sent.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let token = join_token(&client, ctl.http, &ctl.admin, agents).await?;
    let fleet = SimFleet::start(
        ctl.quic,
        &token,
        agents,
        "dash",
        Duration::from_secs(5),
        20,
        None,
    )
    .await?;
    anyhow::ensure!(
        fleet.failed == 0,
        "{} agents failed to connect",
        fleet.failed
    );
    // Let every agent's inventory and first samples arrive.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let base = format!("http://{}", ctl.http);
    client
        .post(format!("{base}/api/v1/users"))
        .bearer_auth(&ctl.admin)
        .json(&json!({"username": "bench", "password": "bench-password", "role": "admin"}))
        .send()
        .await?
        .error_for_status()?;
    let page = client.get(format!("{base}/ui/login")).send().await?;
    let login_cookie = set_cookie(&page, "nebula_login").context("no sign-in cookie")?;
    let resp = client
        .post(format!("{base}/ui/login"))
        .header(
            reqwest::header::COOKIE,
            format!("nebula_login={login_cookie}"),
        )
        .form(&[
            ("csrf", login_cookie.as_str()),
            ("username", "bench"),
            ("password", "bench-password"),
        ])
        .send()
        .await?;
    let session = set_cookie(&resp, "nebula_session").context("sign-in failed")?;
    let cookie = format!("nebula_session={session}");
    let url = format!("{base}/ui/");
    let first = client
        .get(&url)
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await?
        .text()
        .await?;
    let cards = first.matches("class=\"card\"").count();
    if cards != agents {
        bail!("the overview shows {cards} node cards, not {agents}");
    }
    let mut times = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        let body = client
            .get(&url)
            .header(reqwest::header::COOKIE, &cookie)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(!body.is_empty());
    }
    let (html_sent, html_raw) = weigh(&client, &url, &cookie).await?;
    let (css_sent, css_raw) =
        weigh(&client, &format!("{base}/ui/assets/style.css"), &cookie).await?;
    let (js_sent, js_raw) = weigh(&client, &format!("{base}/ui/assets/live.js"), &cookie).await?;
    let total_sent = html_sent + css_sent + js_sent;
    let total_raw = html_raw + css_raw + js_raw;
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    println!(
        "overview with {agents} nodes: median {:.1} ms, p99 {:.1} ms over {requests} requests; HTML+CSS+JS {:.1} KB sent (gzip), {:.1} KB uncompressed",
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99),
        total_sent as f64 / 1000.0,
        total_raw as f64 / 1000.0,
    );
    let result = json!({
        "benchmark": "dashboard",
        "command": format!("nebula-bench dashboard --agents {agents} --requests {requests}"),
        "agents": agents,
        "render_ms": stats(times),
        "measured": "GET /ui/ with a session cookie, end to end on loopback (store read, node views, rendering)",
        "bytes_sent_gzip": {"html": html_sent, "css": css_sent, "js": js_sent, "total": total_sent},
        "bytes_uncompressed": {"html": html_raw, "css": css_raw, "js": js_raw, "total": total_raw},
        "targets": {"render_ms": 50, "total_kb": 150},
    });
    if let Some(p) = out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("wrote {}", out.display());
    drop(fleet);
    Ok(())
}
