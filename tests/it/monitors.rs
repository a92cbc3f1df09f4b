//! Monitors run from agents, across network namespaces this test creates: a web server on a
//! home LAN that only the home node can reach (the controller's side has no route into it),
//! checked from the home node and from a node on the controller's side. It is up from home,
//! down from the other, and only the other's alert fires.

use crate::common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::netlab::Lab;
use common::*;
use nebula_types::api::alerts::AlertView;
use nebula_types::api::monitors::{MonitorDetail, MonitorView};
use serde_json::json;

/// A monitor, once the controller assigned it.
async fn monitor(c: &Controller, name: &str) -> Option<MonitorDetail> {
    let (status, v) = c
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/monitors/{name}"),
            None,
        )
        .await;
    (status == 200).then(|| serde_json::from_value(v).expect("a monitor"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_inside_the_home_lan_is_up_from_home_and_down_from_outside() {
    let lab = Lab::new();
    let n = lab.n;
    let quic: SocketAddr = format!("10.77.{n}.1:0").parse().unwrap();
    let c = Controller::start(ControllerOpts {
        quic_listen: Some(quic),
        extra: vec![
            "--alert-interval",
            "300ms",
            "--alert-group-wait",
            "0s",
            "--alert-monitor-down-for",
            "1s",
            "--monitor-assign-interval",
            "1s",
        ],
        ..Default::default()
    })
    .await;
    // The home node lives in the home namespace; the other one here, beside the controller.
    let dir = tempfile::tempdir().unwrap();
    let token = c.token(1, "10m", json!({})).await;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.home])
        .arg(bin("nebula-agent"))
        .args([
            "join",
            "--controller",
            &c.quic.to_string(),
            "--token",
            &token,
        ])
        .arg("--state-dir")
        .arg(dir.path().join("home"))
        .args(["--name", "home"]);
    let _home = Proc::spawn(cmd);
    let (_outside, _) = join_ready(&c, dir.path(), "outside", &[], None).await;
    c.wait_status("home", NodeStatus::Online, Duration::from_secs(30))
        .await;

    // The server on the home LAN only.
    let mut serve = Command::new("ip");
    serve
        .args(["netns", "exec", &lab.target, "python3", "-u", "-c"])
        .arg(format!(
            "import http.server\n\
             class H(http.server.BaseHTTPRequestHandler):\n\
             \x20   def do_GET(self):\n\
             \x20       body = b'nas says nebula-ok'\n\
             \x20       self.send_response(200)\n\
             \x20       self.send_header('content-length', str(len(body)))\n\
             \x20       self.end_headers()\n\
             \x20       self.wfile.write(body)\n\
             \x20   def log_message(self, *a):\n\
             \x20       pass\n\
             s = http.server.HTTPServer(('192.168.{n}.3', 8080), H)\n\
             print('serving', flush=True)\n\
             s.serve_forever()\n"
        ));
    let server = Proc::spawn(serve);
    wait_for("the home server", Duration::from_secs(10), || async {
        server.stdout.find("serving").map(|_| ())
    })
    .await;

    let map = format!(
        "monitors:\n  nas:\n    http: http://192.168.{n}.3:8080/health\n    body: nebula-ok\n    interval: 5s\n    timeout: 2s\n    nodes: [home, outside]\n  nas-ping:\n    ping: 192.168.{n}.3\n    ping_port: 8080\n    interval: 5s\n    timeout: 2s\n    nodes: [home]\n"
    );
    let (status, v) = c.put_map(&map).await;
    assert_eq!(status, 200, "{v}");

    let detail = wait_for(
        "results from both nodes",
        Duration::from_secs(60),
        || async {
            let d = monitor(&c, "nas").await?;
            let settled =
                d.monitor.nodes.len() == 2 && d.monitor.nodes.iter().all(|n| n.status != "pending");
            settled.then_some(d)
        },
    )
    .await;
    let m = &detail.monitor;
    assert_eq!((m.kind.as_str(), m.source.as_str()), ("http", "map"));
    assert_eq!(m.status, "down", "down somewhere: {m:?}");
    let home = m.nodes.iter().find(|n| n.node == "home").unwrap();
    let outside = m.nodes.iter().find(|n| n.node == "outside").unwrap();
    assert_eq!(home.status, "up", "{home:?}");
    assert_eq!(home.http_status, Some(200));
    assert!(home.latency_ms.unwrap() > 0.0);
    assert_eq!(home.uptime_24h, Some(100.0));
    assert_eq!(outside.status, "down", "{outside:?}");
    // Down with a reason: no route, or (on a machine whose outbound traffic is intercepted)
    // whatever answers in the LAN server's place.
    assert!(outside.error.is_some(), "{outside:?}");
    assert_eq!(outside.uptime_24h, Some(0.0));
    let series = detail.series.iter().find(|s| s.node == "home").unwrap();
    assert!(series.recent.iter().all(|p| p.up) && !series.hours.is_empty());

    // Ping from home: ICMP where permitted (the agent runs as root here), else TCP.
    let ping = wait_for("the ping", Duration::from_secs(30), || async {
        let d = monitor(&c, "nas-ping").await?;
        d.monitor.nodes.into_iter().find(|n| n.status != "pending")
    })
    .await;
    assert_eq!(ping.status, "up", "{ping:?}");
    assert!(
        matches!(ping.method.as_deref(), Some("icmp" | "tcp")),
        "{ping:?}"
    );

    // The alert fires for the node that cannot reach it, and only for that one.
    let firing = wait_for(
        "monitor_down for outside",
        Duration::from_secs(30),
        || async {
            let alerts: Vec<AlertView> = c.get_as("/api/v1/alerts").await;
            alerts.into_iter().find(|a| {
                a.rule == "monitor_down"
                    && a.state == "firing"
                    && a.labels.get("node").map(String::as_str) == Some("outside")
            })
        },
    )
    .await;
    assert_eq!(firing.labels["monitor"], "nas");
    assert!(
        firing.summary.contains("down from outside"),
        "{}",
        firing.summary
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alerts: Vec<AlertView> = c.get_as("/api/v1/alerts").await;
    assert!(
        !alerts.iter().any(|a| a.rule == "monitor_down"
            && a.labels.get("node").map(String::as_str) == Some("home")),
        "nothing for home: {alerts:?}"
    );

    // The CLI's board.
    let out = c.cli(&["monitors"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let home_row = text
        .lines()
        .find(|l| l.starts_with("nas ") && l.contains(" home "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        home_row.contains(" up ") && home_row.contains("100.00%"),
        "{home_row}"
    );
    let out = c.cli(&["monitor", "show", "nas"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("last "),
        "{out:?}"
    );

    // Through the API: added, listed, refused when wrong, removed.
    let body = json!({"name": "controller-http", "monitor": {"tcp": c.http.to_string(), "nodes": ["outside"], "interval": "5s"}});
    let (status, v) = c
        .api(reqwest::Method::POST, "/api/v1/monitors", Some(body))
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["nodes"][0]["node"], "outside");
    wait_for("the API's monitor up", Duration::from_secs(30), || async {
        let all: Vec<MonitorView> = c.get_as("/api/v1/monitors").await;
        all.into_iter()
            .find(|m| m.name == "controller-http" && m.status == "up")
            .map(|_| ())
    })
    .await;
    for (body, want) in [
        (
            json!({"name": "x", "monitor": {"http": "ftp://a", "nodes": ["outside"]}}),
            "not an http",
        ),
        (
            json!({"name": "x", "monitor": {"tcp": "a:1", "nodes": ["nowhere"]}}),
            "not known",
        ),
        (
            json!({"name": "x", "monitor": {"tcp": "a:1"}}),
            "say where it runs",
        ),
        (
            json!({"name": "x", "monitor": {"tcp": "a:1", "nodes": ["outside"], "bogus": 1}}),
            "bogus",
        ),
        (
            json!({"name": "bad name!", "monitor": {"tcp": "a:1", "nodes": ["outside"]}}),
            "not a valid",
        ),
    ] {
        let (status, v) = c
            .api(reqwest::Method::POST, "/api/v1/monitors", Some(body))
            .await;
        // A body that is not the type is a 422; one that is, but wrong, a 400.
        let expected = if want == "bogus" { 422 } else { 400 };
        assert_eq!(status, expected, "{v}");
        assert!(v.to_string().contains(want), "{want}: {v}");
    }
    let (status, v) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/monitors",
            Some(json!({"name": "nas", "monitor": {"tcp": "a:1", "nodes": ["outside"]}})),
        )
        .await;
    assert_eq!(status, 409, "the map's own: {v}");
    let (status, v) = c
        .api(reqwest::Method::DELETE, "/api/v1/monitors/nas", None)
        .await;
    assert_eq!(status, 404, "{v}");
    assert!(v.to_string().contains("service map"), "{v}");
    let (status, _) = c
        .api(
            reqwest::Method::DELETE,
            "/api/v1/monitors/controller-http",
            None,
        )
        .await;
    assert_eq!(status, 204);
    let all: Vec<MonitorView> = c.get_as("/api/v1/monitors").await;
    assert!(!all.iter().any(|m| m.name == "controller-http"));
    // Built in: each node's container runtime, where it has one.
    docker::require();
    let builtin = wait_for("docker.outside up", Duration::from_secs(60), || async {
        // Listed once the node's inventory named its runtime.
        let d = monitor(&c, "docker.outside").await;
        d.filter(|d| d.monitor.status == "up").map(|d| d.monitor)
    })
    .await;
    assert_eq!(
        (builtin.kind.as_str(), builtin.source.as_str()),
        ("docker", "built-in")
    );
}
