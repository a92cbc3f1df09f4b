//! Alerts end to end: a real controller and agent on the real Docker Engine, notifications to a
//! real HTTP receiver on 127.0.0.1 whose signatures (Standard Webhooks) are checked here with
//! an HMAC of its own, silences, and a controller restart in the middle of a firing alert.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use common::docker::{self, docker, IMAGE};
use common::*;
use serde_json::{json, Value};

/// What the receiver got: (webhook-id, webhook-timestamp, webhook-signature, body).
type Got = Arc<Mutex<Vec<(String, String, String, String)>>>;

/// An HTTP receiver on 127.0.0.1 that answers 500 to the first `fail_first` requests (to show
/// retries) and 200 after, recording every request.
async fn receiver(fail_first: usize) -> (String, Got) {
    let got: Got = Arc::default();
    let seen = got.clone();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let seen = seen.clone();
            let calls = calls.clone();
            async move {
                let h = |k: &str| {
                    headers
                        .get(k)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned()
                };
                if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < fail_first {
                    return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                }
                seen.lock().unwrap().push((
                    h("webhook-id"),
                    h("webhook-timestamp"),
                    h("webhook-signature"),
                    body,
                ));
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), got)
}

/// Every request a stand-in got: (headers, body).
type Raw = Arc<Mutex<Vec<(std::collections::BTreeMap<String, String>, String)>>>;

/// A stand-in for ntfy's publish API or a Discord webhook (no internet here: the real services
/// cannot be reached), recording what the controller sends so the test can check it against
/// their documented formats.
async fn stand_in() -> (String, Raw) {
    let got: Raw = Arc::default();
    let seen = got.clone();
    let app = axum::Router::new().route(
        "/{*path}",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let seen = seen.clone();
            async move {
                let h = headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                    .collect();
                seen.lock().unwrap().push((h, body));
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), got)
}

/// A real SMTP server (PyPI's aiosmtpd, installed by `scripts/test`) on 127.0.0.1 that stores
/// what it receives in a Maildir; (its port, the Maildir, the process).
fn smtp_server(dir: &std::path::Path) -> (u16, std::path::PathBuf, Proc) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let maildir = dir.join("maildir");
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
        .args(["-c", "aiosmtpd.handlers.Mailbox"])
        .arg(&maildir);
    (port, maildir, Proc::spawn(cmd))
}

/// The messages in a Maildir: (subject, whole text).
fn mails(maildir: &std::path::Path) -> Vec<(String, String)> {
    let mut files: Vec<_> = std::fs::read_dir(maildir.join("new"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|t| {
            let subject = t
                .lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap_or("")
                .to_owned();
            (subject, t)
        })
        .collect()
}

/// Check a message's signature as a receiver would, with its own HMAC (not the controller's
/// code).
fn verified(secret: &str, (id, ts, sig, body): &(String, String, String, String)) -> Value {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let expected = base64::engine::general_purpose::STANDARD
        .encode(ring::hmac::sign(&key, format!("{id}.{ts}.{body}").as_bytes()).as_ref());
    assert_eq!(sig, &format!("v1,{expected}"), "signature of {id}");
    let age = nebula_protocol::time::UnixMillis::now().as_i64() / 1000 - ts.parse::<i64>().unwrap();
    assert!((0..300).contains(&age), "a fresh timestamp");
    serde_json::from_str(body).unwrap()
}

/// The messages of this container's group so far: (type, body).
fn messages(got: &Got, secret: &str, container: &str) -> Vec<(String, Value)> {
    got.lock()
        .unwrap()
        .iter()
        .map(|m| verified(secret, m))
        .filter(|v| v["data"]["alerts"].to_string().contains(container))
        .map(|v| (v["type"].as_str().unwrap_or("").to_owned(), v))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_container_is_notified_once_silenced_and_resolved_across_a_restart() {
    let ctrs = docker::Containers::new();
    // The receiver fails the sink test and the first notification's first delivery.
    let (url, got) = receiver(2).await;
    let mut c = Controller::start(ControllerOpts {
        extra: vec![
            "--alert-interval",
            "300ms",
            "--alert-group-wait",
            "0s",
            "--alert-group-interval",
            "1s",
            "--alert-container-down-for",
            "1s",
            "--alert-node-unreachable-for",
            "1s",
            "--alert-keep-firing-for",
            "0s",
            // Acknowledge links name this address; the test sends them to the real one.
            "--public-url",
            "http://nebula.example",
        ],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, _) = join_ready(&c, dir.path(), "watched", &[], None).await;

    // A sink, through the CLI: the secret is printed once.
    let out = c.cli(&["sink", "add", "ops", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");
    let mail_dir = tempfile::tempdir().unwrap();
    let (smtp_port, maildir, _smtp) = smtp_server(mail_dir.path());
    // The e-mail, ntfy and Discord sinks take this container's rule only (the test
    // controller's short-lived node certificates are "expiring" all along).
    let out = c.cli(&[
        "sink",
        "add",
        "mail",
        &format!(
            "smtp://127.0.0.1:{smtp_port}?from=nebula@example.test&to=ops@example.test&tls=none"
        ),
        "--kind",
        "email",
        "--rule",
        "container_unhealthy",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ntfy, ntfy_got) = stand_in().await;
    let (discord, discord_got) = stand_in().await;
    for (name, kind, url) in [
        ("phone", "ntfy", format!("{ntfy}/nebula-alerts")),
        ("chat", "discord", format!("{discord}/api/webhooks/1/abc")),
    ] {
        let out = c.cli(&[
            "sink",
            "add",
            name,
            &url,
            "--kind",
            kind,
            "--rule",
            "container_unhealthy",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = c.cli(&["sink", "test", "ops"]);
    assert!(
        !out.status.success(),
        "the receiver's first answer is a 500"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("500"));

    // A container whose health check fails while its state file says `bad` (shell builtins
    // only: the test image has few applets).
    let name = format!("sick-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    ctrs.run(
        &name,
        &[
            "--health-cmd",
            "read s < /tmp/state && test \"$s\" != bad",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
            IMAGE,
            "sh",
            "-c",
            "echo ok > /tmp/state; sleep 3600",
        ],
    );
    wait_for("healthy", Duration::from_secs(30), || async {
        let page: Page<nebula_types::api::containers::ContainerRow> =
            c.get_as(&format!("/api/v1/containers?q={name}")).await;
        page.items
            .into_iter()
            .any(|r| r.health == "healthy")
            .then_some(())
    })
    .await;
    docker(&["exec", &name, "sh", "-c", "echo bad > /tmp/state"]);

    // One signed firing notification.
    let firing = wait_for("a firing notification", Duration::from_secs(30), || async {
        let m = messages(&got, &secret, &name);
        m.iter()
            .find(|(t, _)| t == "alert.firing")
            .map(|(_, v)| v.clone())
    })
    .await;
    assert_eq!(firing["data"]["alerts"][0]["rule"], "container_unhealthy");
    assert_eq!(firing["data"]["alerts"][0]["labels"]["node"], "watched");
    let alerts: Vec<nebula_types::api::alerts::AlertView> = c.get_as("/api/v1/alerts").await;
    let fp = alerts
        .iter()
        .find(|a| a.labels.get("container") == Some(&name))
        .map(|a| a.fingerprint.clone())
        .expect("listed");
    let out = c.cli(&["alerts"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("container_unhealthy"));

    // E-mail: one message, through a real SMTP server.
    let (subject, text) = wait_for("the e-mail", Duration::from_secs(15), || async {
        mails(&maildir).into_iter().next()
    })
    .await;
    assert_eq!(subject, "Firing: container_unhealthy{node=watched}");
    assert!(
        text.contains(&format!("{name} on watched is unhealthy")),
        "{text}"
    );
    assert!(text.contains("To: ops@example.test"), "{text}");

    // ntfy: its publish API's headers, and a button that acknowledges through a signed link.
    let (h, body) = wait_for("the ntfy message", Duration::from_secs(15), || async {
        ntfy_got.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(h["title"], "Firing: container_unhealthy{node=watched}");
    assert_eq!(
        (h["priority"].as_str(), h["tags"].as_str()),
        ("4", "rotating_light")
    );
    assert!(
        body.contains(&format!("{name} on watched is unhealthy")),
        "{body}"
    );
    let action = h["actions"].clone();
    let link = action
        .split(", ")
        .find(|p| p.starts_with("http://nebula.example/"))
        .expect("an acknowledge link")
        .replacen("http://nebula.example", &c.url(""), 1);
    assert!(action.starts_with("http, Acknowledge, ") && action.contains("method=POST"));
    let forged = link.replacen("sig=", "sig=00", 1);
    let resp = c.client.post(&forged).send().await.unwrap();
    assert_eq!(resp.status(), 403, "a forged link does nothing");
    let resp = c.client.post(&link).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    let alerts: Vec<nebula_types::api::alerts::AlertView> = c.get_as("/api/v1/alerts").await;
    let acked = alerts.iter().find(|a| a.fingerprint == fp).unwrap();
    assert_eq!(acked.acknowledged_by.as_deref(), Some("sink:phone"));
    // Discord: a webhook's JSON with one embed.
    let (_, body) = wait_for("the Discord message", Duration::from_secs(15), || async {
        discord_got.lock().unwrap().first().cloned()
    })
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    let embed = &v["embeds"][0];
    assert_eq!(embed["title"], "Firing: container_unhealthy{node=watched}");
    assert_eq!(embed["color"], 0xd2_99_22, "orange for a warning");
    assert!(embed["description"].as_str().unwrap().contains(&name));
    assert_eq!(embed["fields"][0]["value"], "warning");

    // A restart while it fires: no second firing notification.
    c.restart_hard().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = messages(&got, &secret, &name);
    assert_eq!(
        m.iter().filter(|(t, _)| t == "alert.firing").count(),
        1,
        "one firing notification, restart or not: {m:?}"
    );

    // It recovers: one resolution.
    docker(&["exec", &name, "sh", "-c", "echo ok > /tmp/state"]);
    wait_for("the resolution", Duration::from_secs(30), || async {
        let m = messages(&got, &secret, &name);
        m.iter().any(|(t, _)| t == "alert.resolved").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = messages(&got, &secret, &name);
    let kinds: Vec<&str> = m.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(kinds, vec!["alert.firing", "alert.resolved"]);
    let ntfy_msgs = ntfy_got.lock().unwrap().clone();
    assert_eq!(ntfy_msgs.len(), 2, "one firing, one resolution");
    assert_eq!(ntfy_msgs[1].0["tags"], "white_check_mark");
    assert!(
        !ntfy_msgs[1].0.contains_key("actions"),
        "nothing to acknowledge once resolved"
    );
    let subjects: Vec<String> = mails(&maildir).into_iter().map(|(s, _)| s).collect();
    assert_eq!(
        subjects,
        vec![
            "Firing: container_unhealthy{node=watched}".to_owned(),
            "Resolved: container_unhealthy{node=watched}".to_owned()
        ],
        "one e-mail each way"
    );
    let discord_msgs = discord_got.lock().unwrap().clone();
    assert_eq!(discord_msgs.len(), 2);
    let v: Value = serde_json::from_str(&discord_msgs[1].1).unwrap();
    assert_eq!(v["embeds"][0]["color"], 0x3f_b9_50, "green when resolved");

    // Silenced: it goes bad again and nothing is sent; the list says silenced.
    let out = c.cli(&[
        "silence",
        "add",
        &format!("container={name}"),
        "--for",
        "10m",
        "--comment",
        "maintenance",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    docker(&["exec", &name, "sh", "-c", "echo bad > /tmp/state"]);
    wait_for("the silenced alert", Duration::from_secs(30), || async {
        let alerts: Vec<nebula_types::api::alerts::AlertView> = c.get_as("/api/v1/alerts").await;
        alerts
            .iter()
            .any(|a| a.fingerprint == fp && a.state == "firing" && a.silenced)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        messages(&got, &secret, &name).len(),
        2,
        "nothing sent while silenced"
    );
    assert!(String::from_utf8_lossy(&c.cli(&["alerts"]).stdout).contains("(silenced)"));

    // The delivery history shows the retry after the receiver's 500 and what was sent.
    let history: Vec<nebula_types::api::alerts::NotificationView> =
        c.get_as("/api/v1/alerts/notifications").await;
    assert!(history.iter().all(|n| n.state == "sent"), "{history:?}");
    let first = history
        .iter()
        .rev()
        .find(|n| n.sink == "ops")
        .expect("the first webhook notification");
    assert_eq!(first.payload["type"], "alert.firing");
    assert_eq!(first.attempts, 2, "delivered on the retry: {first:?}");
    assert!(first.last_error.as_deref().unwrap_or("").contains("500"));
    // The node goes away: one critical notification for it; its other alerts are muted, not
    // resolved (their figures are not in view).
    agent.proc.kill();
    let down = wait_for("node_unreachable", Duration::from_secs(30), || async {
        got.lock()
            .unwrap()
            .iter()
            .map(|m| verified(&secret, m))
            .find(|v| v["data"]["group"] == "node_unreachable{node=watched}")
    })
    .await;
    assert_eq!(down["data"]["severity"], "critical");
    let alerts: Vec<nebula_types::api::alerts::AlertView> = c.get_as("/api/v1/alerts").await;
    assert!(
        alerts
            .iter()
            .any(|a| a.fingerprint == fp && a.state == "firing"),
        "the container's alert is kept while its node is out of view: {alerts:?}"
    );

    // Bad input changes nothing.
    let (status, _) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/alerts/sinks",
            Some(json!({"name": "bad name", "url": "http://127.0.0.1:1/"})),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/alerts/silences",
            Some(json!({"matchers": ["node"], "duration": "1h"})),
        )
        .await;
    assert_eq!(status, 400);
    let viewer = {
        let (status, v) = c
            .api(
                reqwest::Method::POST,
                "/api/v1/api-tokens",
                Some(json!({"name": "eyes", "role": "viewer"})),
            )
            .await;
        assert_eq!(status, 201);
        v["token"].as_str().unwrap().to_owned()
    };
    let resp = c
        .client
        .post(c.url("/api/v1/alerts/silences"))
        .bearer_auth(&viewer)
        .json(&json!({"matchers": ["node=watched"], "duration": "1h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "viewers do not silence");
}

/// A managed container killed and kept down (its image untagged, so the reconciler's repair
/// cannot pull it back: no registry is reachable) is notified once on a signed webhook and once
/// by e-mail through a real SMTP server, then resolved once each way when the image is back
/// and the map is applied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_container_killed_and_kept_down_is_notified_once_then_resolved() {
    docker::ensure_image();
    let cleanup = docker::Managed::default();
    let (url, got) = receiver(0).await;
    let c = Controller::start(ControllerOpts {
        extra: vec![
            "--reconcile-interval",
            "1s",
            "--alert-interval",
            "300ms",
            "--alert-group-wait",
            "0s",
            "--alert-group-interval",
            "1s",
            "--alert-container-down-for",
            "2s",
            "--alert-keep-firing-for",
            "0s",
        ],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (_agent, node_id) = join_ready(&c, dir.path(), "keeper", &[], None).await;
    cleanup.add(&node_id);
    let out = c.cli(&["sink", "add", "ops", &url, "--rule", "container_down"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mail_dir = tempfile::tempdir().unwrap();
    let (smtp_port, maildir, _smtp) = smtp_server(mail_dir.path());
    let mail = format!(
        "smtp://127.0.0.1:{smtp_port}?from=nebula@example.test&to=ops@example.test&tls=none"
    );
    let out = c.cli(&[
        "sink", "add", "mail", &mail, "--kind", "email", "--node", "keeper",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let tag = format!(
        "nebula-test/keepdown:{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    docker(&["tag", IMAGE, &tag]);
    let map = format!(
        "services:\n  keep:\n    image: {tag}\n    command: [sleep, \"3600\"]\n    placement: {{node: keeper}}\n"
    );
    let (status, v) = c.put_map(&map).await;
    assert_eq!(status, 200, "{v}");
    wait_for("the service converged", Duration::from_secs(60), || async {
        let list: Vec<nebula_types::api::desired::ServiceView> = c.get_as("/api/v1/services").await;
        list.into_iter()
            .any(|s| s.name == "keep" && s.status == "converged" && s.running == 1)
            .then_some(())
    })
    .await;
    let container = wait_for("the service running", Duration::from_secs(60), || async {
        let ids = docker(&[
            "ps",
            "--filter",
            "label=nebula.service=keep",
            "--format",
            "{{.Names}}",
        ]);
        ids.lines().next().map(str::to_owned)
    })
    .await;

    // Killed, and its image gone: it stays down.
    docker(&["rmi", &tag]);
    docker(&["kill", &container]);
    let down = |got: &Got| -> Vec<(String, Value)> {
        messages(got, &secret, &container)
            .into_iter()
            .filter(|(_, v)| v["data"]["alerts"][0]["rule"] == "container_down")
            .collect()
    };
    let firing = wait_for(
        "the firing notification",
        Duration::from_secs(60),
        || async { down(&got).into_iter().find(|(t, _)| t == "alert.firing") },
    )
    .await;
    let alert = &firing.1["data"]["alerts"][0];
    assert_eq!(alert["labels"]["service"], "keep");
    assert_eq!(alert["labels"]["node"], "keeper");
    let subject = wait_for("the e-mail", Duration::from_secs(30), || async {
        mails(&maildir)
            .into_iter()
            .map(|(s, _)| s)
            .find(|s| s.contains("container_down"))
    })
    .await;
    assert_eq!(subject, "Firing: container_down{node=keeper}");
    // Kept down a while longer: still one notification each way, nothing else to these sinks
    // (the failed repair's deploy_failed alert is filtered out of both).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(down(&got).len(), 1, "{:?}", down(&got));
    assert_eq!(
        got.lock().unwrap().len(),
        1,
        "only container_down reaches this sink"
    );

    // Back: the image returns and the map is applied again, so the repair succeeds.
    docker(&["tag", IMAGE, &tag]);
    let (status, v) = c.put_map(&map).await;
    assert_eq!(status, 200, "{v}");
    wait_for("the resolution", Duration::from_secs(60), || async {
        down(&got)
            .iter()
            .any(|(t, _)| t == "alert.resolved")
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kinds: Vec<String> = down(&got).into_iter().map(|(t, _)| t).collect();
    assert_eq!(kinds, vec!["alert.firing", "alert.resolved"]);
    let subjects: Vec<String> = mails(&maildir)
        .into_iter()
        .map(|(s, _)| s)
        .filter(|s| s.contains("container_down"))
        .collect();
    assert_eq!(
        subjects,
        vec![
            "Firing: container_down{node=keeper}".to_owned(),
            "Resolved: container_down{node=keeper}".to_owned()
        ]
    );
    // The history, from the CLI: both notifications to both sinks, delivered.
    let out = c.cli(&["alerts", "--history"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("container_down{node=keeper}"))
        .collect();
    assert_eq!(rows.len(), 4, "{text}");
    assert!(rows.iter().all(|r| r.contains(" sent ")), "{text}");
    let _ = std::process::Command::new("docker")
        .args(["rmi", &tag])
        .output();
}
