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
            "--alert-keep-firing-for",
            "0s",
        ],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (_agent, _) = join_ready(&c, dir.path(), "watched", &[], None).await;

    // A sink, through the CLI: the secret is printed once.
    let out = c.cli(&["sink", "add", "ops", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");
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
    let first = history.last().expect("the first notification");
    assert_eq!(first.payload["type"], "alert.firing");
    assert_eq!(first.attempts, 2, "delivered on the retry: {first:?}");
    assert!(first.last_error.as_deref().unwrap_or("").contains("500"));
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
