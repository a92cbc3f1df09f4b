//! Telemetry end to end: real agent and controller processes, the real Docker Engine (a test
//! image built locally from Debian's busybox-static), Prometheus' own `promtool` on /metrics.

use crate::common;

use std::time::{Duration, Instant};

use common::docker::{self, Containers};
use common::{wait_for, Agent, Controller, ControllerOpts};
use nebula_types::api::telemetry::{ContainerRow, MinutePoint, NodeTelemetry, PointView, Points};
use serde_json::{json, Value};

async fn joined(c: &Controller, name: &str, env: &[(&str, &str)]) -> (Agent, tempfile::TempDir) {
    let token = c.token(1, "1h", json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let a = Agent::join_with_env(c, &token, &dir.path().join(name), name, &[], env);
    c.wait_status(name, common::NodeStatus::Online, Duration::from_secs(20))
        .await;
    (a, dir)
}

/// A controller that asks for a sample every 300 ms, so tests see several quickly.
fn fast_samples() -> ControllerOpts {
    ControllerOpts {
        extra: vec!["--telemetry-interval", "300ms"],
        ..ControllerOpts::default()
    }
}

async fn telemetry(c: &Controller, name: &str, query: &str) -> NodeTelemetry {
    c.get_as(&format!("/api/v1/nodes/{name}/telemetry{query}"))
        .await
}

/// Raw history points (panics on minute rollups).
fn raw(t: &NodeTelemetry) -> &[PointView] {
    match &t.points {
        Points::Raw(p) => p,
        Points::Minute(_) => panic!("minute points where raw ones were asked for"),
    }
}

/// Containers across the fleet, filtered by `query`.
async fn containers(c: &Controller, query: &str) -> Vec<ContainerRow> {
    c.get_as::<common::Page<ContainerRow>>(query).await.items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_telemetry_arrives_and_is_served() {
    let c = Controller::start(fast_samples()).await;
    let (_a, _d) = joined(&c, "host1", &[]).await;
    // Several samples arrive at the interval the controller set.
    let t = wait_for("three raw points", Duration::from_secs(15), || async {
        let t = telemetry(&c, "host1", "?resolution=raw&since=5m").await;
        (raw(&t).len() >= 3).then_some(t)
    })
    .await;
    let latest = t.latest.as_ref().expect("a latest sample");
    let host = &latest.host;
    assert!(host.memory_total_bytes > 0, "{latest:?}");
    assert!(host.memory_used_bytes <= host.memory_total_bytes);
    assert_eq!(
        host.per_core_percent.len(),
        std::thread::available_parallelism().unwrap().get()
    );
    assert!(host.uptime_secs > 0);
    assert_eq!(host.load.len(), 3);
    assert!(!latest.kernel.is_empty());
    assert!(latest.disks.iter().all(|d| d.total_bytes > 0));
    // No NVIDIA driver on this machine: no GPUs, said as "none", not as an error.
    assert!(latest.gpus.is_empty());
    assert!(latest.gpu_driver.is_none());
    // A Docker Engine runs here: its version is part of the node's facts now.
    let node = c.node("host1").await.unwrap();
    let runtime = node.facts.container_runtime.as_deref().unwrap_or("");
    assert!(runtime.starts_with("docker "), "{node:?}");
    assert!(node.facts.gpus.is_empty());
    assert!(node.telemetry.as_ref().unwrap().memory_total_bytes > 0);
    // Points are ordered and the seq keeps rising.
    let pts = raw(&t);
    assert!(pts.windows(2).all(|w| w[0].t <= w[1].t));
    let seq1 = latest.seq;
    let later = wait_for("a newer sample", Duration::from_secs(5), || async {
        let t = telemetry(&c, "host1", "").await;
        (t.latest.as_ref()?.seq > seq1).then_some(t)
    })
    .await;
    assert!(later.latest.unwrap().seq > seq1);
    // Bad queries get clear errors.
    let (s, v) = c
        .api(
            reqwest::Method::GET,
            "/api/v1/nodes/host1/telemetry?resolution=5s",
            None,
        )
        .await;
    assert_eq!(
        (s, Some(common::error_of(&v).code.as_str())),
        (400, Some("bad_request"))
    );
    let (s, _) = c
        .api(
            reqwest::Method::GET,
            "/api/v1/nodes/host1/telemetry?since=yesterday-ish",
            None,
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = c
        .api(reqwest::Method::GET, "/api/v1/nodes/nobody/telemetry", None)
        .await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_appear_and_a_stopped_one_shows_exited_within_two_seconds() {
    let ctrs = Containers::new();
    // The default 5 s interval: seeing the stop within 2 s proves the Docker event stream.
    let c = Controller::start(ControllerOpts::default()).await;
    let (_a, _d) = joined(&c, "dock1", &[]).await;
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let web = format!("web-{suffix}");
    let idle = format!("idle-{suffix}");
    ctrs.run(
        &web,
        &[
            "--label",
            "role=web",
            docker::IMAGE,
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/www",
        ],
    );
    ctrs.run(&idle, &[docker::IMAGE, "sleep", "600"]);
    let q = format!("/api/v1/containers?label={}", ctrs.label);
    let items = wait_for(
        "both test containers running",
        Duration::from_secs(15),
        || async {
            let items = containers(&c, &q).await;
            (items.len() == 2 && items.iter().all(|i| i.state == "running")).then_some(items)
        },
    )
    .await;
    let w = items.iter().find(|i| i.name == web).unwrap();
    assert_eq!(w.node, "dock1");
    assert_eq!(w.image, docker::IMAGE);
    assert_eq!(w.labels["role"], "web");
    assert_eq!(w.health, "none");
    assert_eq!(w.restart_count, 0);
    assert!(w.id.len() >= 12);
    // Stats arrive from the second sample on (CPU needs two readings).
    wait_for(
        "container memory and CPU figures",
        Duration::from_secs(15),
        || async {
            let items = containers(&c, &format!("{q}&state=running")).await;
            let i = items.into_iter().find(|i| i.name == web)?;
            (i.memory_used_bytes? > 0 && i.cpu_percent.is_some()).then_some(())
        },
    )
    .await;

    // Stop one: exited within 2 s.
    docker::docker(&["kill", &idle]);
    let stopped = Instant::now();
    wait_for(
        "the killed container to show exited",
        Duration::from_secs(2),
        || async {
            let items = containers(&c, &format!("{q}&state=exited")).await;
            items.iter().any(|i| i.name == idle).then_some(())
        },
    )
    .await;
    let took = stopped.elapsed();
    assert!(took <= Duration::from_secs(2), "{took:?}");
    // Filters: node, state, health; an unknown node or a bad state is a clear error.
    let running = containers(&c, &format!("{q}&node=dock1&state=running")).await;
    assert_eq!(running.len(), 1);
    let healthy = containers(&c, &format!("{q}&health=healthy")).await;
    assert!(healthy.is_empty());
    let (s, _) = c
        .api(reqwest::Method::GET, "/api/v1/containers?node=nobody", None)
        .await;
    assert_eq!(s, 404);
    let (s, _) = c
        .api(
            reqwest::Method::GET,
            "/api/v1/containers?state=sleepy",
            None,
        )
        .await;
    assert_eq!(s, 400);
    // The node summary counts them.
    let node = c.node("dock1").await.unwrap();
    assert!(node.telemetry.as_ref().unwrap().containers_total >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_docker_says_so_then_picks_it_up_when_it_appears() {
    docker::require();
    let ctrs = Containers::new();
    let c = Controller::start(ControllerOpts {
        extra: vec!["--telemetry-interval", "500ms"],
        ..ControllerOpts::default()
    })
    .await;
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("docker.sock");
    let host = format!("unix://{}", sock.display());
    let (a, _d) = joined(&c, "late", &[("DOCKER_HOST", &host)]).await;
    let node = c.node("late").await.unwrap();
    assert!(node.facts.container_runtime.is_none(), "{node:?}");
    // Said once, not every sample.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let said = a.proc.stderr.text().matches("no container runtime").count();
    assert_eq!(said, 1, "{}", a.proc.stderr.text());

    // The daemon "appears" at that address.
    let real = std::env::var("NEBULA_TEST_DOCKER_SOCKET")
        .unwrap_or_else(|_| "/var/run/docker.sock".into());
    std::os::unix::fs::symlink(&real, &sock).unwrap();
    let name = format!("late-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    ctrs.run(&name, &[docker::IMAGE, "sleep", "600"]);
    let q = format!("/api/v1/containers?node=late&label={}", ctrs.label);
    wait_for(
        "the agent to find the daemon and report the container",
        Duration::from_secs(20),
        || async {
            let items = containers(&c, &q).await;
            items.iter().any(|i| i.name == name).then_some(())
        },
    )
    .await;
    let node = wait_for(
        "facts to carry the runtime",
        Duration::from_secs(5),
        || async {
            let n = c.node("late").await?;
            n.facts.container_runtime.is_some().then_some(n)
        },
    )
    .await;
    assert!(node
        .facts
        .container_runtime
        .as_deref()
        .unwrap()
        .starts_with("docker "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_what_they_should() {
    let c = Controller::start(fast_samples()).await;
    let (_a, _d) = joined(&c, "prom1", &[]).await;
    wait_for("a sample", Duration::from_secs(10), || async {
        telemetry(&c, "prom1", "").await.latest.map(|_| ())
    })
    .await;
    // /metrics needs a token like the rest of the API.
    let anon = reqwest::get(c.url("/metrics")).await.unwrap();
    assert_eq!(anon.status(), 401);
    let resp = c
        .client
        .get(c.url("/metrics"))
        .bearer_auth(&c.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let body = resp.text().await.unwrap();
    // Prometheus' own parser and linter.
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/test (Debian package prometheus)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let value = |name: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in\n{body}"))
    };
    assert_eq!(value("nebula_agents_connected"), 1.0);
    assert!(value("nebula_telemetry_samples_accepted_total") >= 1.0);
    assert!(value("nebula_node_cpu_percent{node=\"prom1\"}") >= 0.0);
    assert!(value("nebula_node_memory_total_bytes{node=\"prom1\"}") > 0.0);
    assert!(body.contains("nebula_store_write_seconds_bucket"));
    assert!(body.contains("# TYPE nebula_frames_rejected_total counter"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_samples_are_dropped_and_counted() {
    use nebula_protocol as proto;
    let c = Controller::start(ControllerOpts {
        max_frame_bytes: Some(16 * 1024),
        ..ControllerOpts::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let id = common::session::enrolled_identity(&c, "noisy", dir.path()).await;
    let (conn, mut send, _recv, _) = common::session::welcomed(&id, &c).await;
    let counts = || async {
        let resp = c
            .client
            .get(c.url("/metrics"))
            .bearer_auth(&c.admin_token)
            .send()
            .await
            .ok()?;
        let body = resp.text().await.ok()?;
        let count = |reason: &str| -> f64 {
            body.lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "nebula_telemetry_samples_dropped_total{{reason=\"{reason}\"}}"
                    ))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or(0.0)
        };
        Some((
            (count("malformed"), count("unknown_epoch"), count("shape")),
            body,
        ))
    };
    // Garbage datagrams, then a sample before any inventory.
    conn.send_datagram(vec![0xff; 40].into()).unwrap();
    conn.send_datagram(vec![0x07, 0x00].into()).unwrap();
    let sample = proto::telemetry::TelemetrySample {
        epoch: 1,
        seq: 1,
        ..Default::default()
    };
    let bytes = proto::encode(&proto::telemetry::Datagram::Sample(sample.clone())).unwrap();
    conn.send_datagram(bytes.clone().into()).unwrap();
    wait_for(
        "garbage and early samples counted",
        Duration::from_secs(10),
        || async {
            let ((m, e, _), _) = counts().await?;
            (m >= 2.0 && e >= 1.0).then_some(())
        },
    )
    .await;
    // Now an inventory, and a sample whose shape does not match it.
    let inv = proto::telemetry::TelemetryInventory {
        epoch: 1,
        interfaces: vec!["eth0".into()],
        ..Default::default()
    };
    proto::write_message(&mut send, &proto::AgentMessage::TelemetryInventory(inv))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.send_datagram(bytes.into()).unwrap(); // no interface figures: wrong shape
                                               // An oversized sample on a stream: the length is refused before allocating.
    let mut uni = conn.open_uni().await.unwrap();
    uni.write_all(&(64u32 * 1024 * 1024).to_le_bytes())
        .await
        .unwrap();
    uni.finish().unwrap();
    let body = wait_for(
        "all drops to be counted",
        Duration::from_secs(10),
        || async {
            let ((m, e, sh), body) = counts().await?;
            (m >= 3.0 && e >= 1.0 && sh >= 1.0).then_some(body)
        },
    )
    .await;
    assert!(
        body.contains("nebula_telemetry_samples_accepted_total 0"),
        "{body}"
    );
    // The session survived all of it, and so did the controller.
    assert!(conn.close_reason().is_none());
    assert_eq!(
        c.node("noisy").await.unwrap().status,
        common::NodeStatus::Online
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_past_the_retention_window_are_deleted() {
    use nebula_controller::store::{millis, Store};
    use nebula_controller::telemetry::Rollup;
    let c = Controller::start(ControllerOpts {
        extra: vec![
            "--rollup-retention",
            "10m",
            "--retention-sweep-interval",
            "300ms",
            "--rollup-flush-interval",
            "300ms",
        ],
        ..ControllerOpts::default()
    })
    .await;
    let (_a, _d) = joined(&c, "old1", &[]).await;
    let node_id: uuid::Uuid = c.node("old1").await.unwrap().id;
    // Rollups written straight into the controller's database: two past the window, one inside.
    let url = format!(
        "sqlite://{}?mode=rw",
        c.dir.path().join("data/nebula.db").display()
    );
    let store = Store::connect(&url).await.unwrap();
    let now = millis(std::time::SystemTime::now()) / 60_000 * 60_000;
    let mk = |minute: i64| Rollup {
        node_id,
        minute,
        samples: 12,
        cpu: (10.0, 20.0),
        mem_used: (1e9, 2e9),
        load1: (0.5, 1.0),
        net_rx: (100.0, 200.0),
        net_tx: (100.0, 200.0),
        gpu_util: None,
        gpu_mem_used: None,
        gpu_temp: None,
        containers_running: 3.0,
    };
    store
        .insert_rollups(&[
            mk(now - 3 * 3_600_000),
            mk(now - 20 * 60_000),
            mk(now - 5 * 60_000),
        ])
        .await
        .unwrap();
    let kept = wait_for(
        "the sweeper to delete old rollups",
        Duration::from_secs(10),
        || async {
            let t = telemetry(&c, "old1", "?resolution=1m&since=24h").await;
            let Points::Minute(pts) = t.points else {
                panic!("raw points where minute ones were asked for");
            };
            (pts.iter().filter(|p| p.samples == 12).count() == 1).then_some(pts)
        },
    )
    .await;
    let ours: Vec<&MinutePoint> = kept.iter().filter(|p| p.samples == 12).collect();
    assert_eq!(ours.len(), 1);
    assert_eq!(ours[0].cpu_percent.max, 20.0);
    assert_eq!(
        store
            .rollups(node_id, 0)
            .await
            .unwrap()
            .iter()
            .filter(|r| r.samples == 12)
            .count(),
        1
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_nodes_and_top_show_live_figures() {
    let c = Controller::start(fast_samples()).await;
    let (_a, _d) = joined(&c, "cli1", &[]).await;
    wait_for("a sample", Duration::from_secs(10), || async {
        c.node("cli1").await?.telemetry.is_some().then_some(())
    })
    .await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::bin("nebula"))
            .args(args)
            .env("NEBULA_CONTROLLER", c.url(""))
            .env("NEBULA_TOKEN", &c.admin_token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = run(&["nodes"]);
    let header = table.lines().next().unwrap();
    for col in [
        "NAME",
        "STATUS",
        "CPU",
        "MEMORY",
        "GPU",
        "CONTAINERS",
        "LAST SEEN",
    ] {
        assert!(header.contains(col), "{table}");
    }
    let row = table.lines().find(|l| l.starts_with("cli1")).unwrap();
    assert!(
        row.contains("online") && row.contains('%') && row.contains("GiB"),
        "{row}"
    );
    let json: Vec<common::NodeView> = serde_json::from_str(&run(&["nodes", "--json"])).unwrap();
    assert_eq!(json[0].name, "cli1");
    assert!(json[0].telemetry.is_some());
    let top = run(&["top", "--iterations", "2", "--interval", "200ms"]);
    assert_eq!(top.matches("\x1b[2J").count(), 2, "refreshed twice");
    assert!(top.contains("1/1 nodes online"), "{top}");
    assert!(
        top.contains("cli1") && top.contains('█') || top.contains('·'),
        "{top}"
    );
}

/// Regression: `?since=60y` (before 1970) panicked a handler, and a node reporting a container
/// created after year 9999 made `GET /api/v1/containers` panic for the whole fleet. Out-of-range
/// times are refused at the edge; numbers an agent sends are clamped and summed saturating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_times_and_numbers_never_panic_a_view() {
    use nebula_protocol as proto;
    use proto::telemetry::{
        ContainerInfo, ContainerSample, ContainerState, Datagram, GpuInfo, GpuSample, HostSample,
        NetRate, TelemetryInventory, TelemetrySample,
    };
    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let id = common::session::enrolled_identity(&c, "odd", dir.path()).await;
    let (conn, mut send, _recv, _) = common::session::welcomed(&id, &c).await;
    let gpu = |uuid: &str| GpuInfo {
        uuid: uuid.into(),
        name: "sim".into(),
        memory_total_bytes: u64::MAX,
        power_limit_mw: Some(u32::MAX),
    };
    let inv = TelemetryInventory {
        epoch: 1,
        interfaces: vec!["eth0".into(), "eth1".into()],
        gpus: vec![gpu("g0"), gpu("g1")],
        containers: vec![ContainerInfo {
            id: "c0".into(),
            name: "from-the-future".into(),
            image: "x".into(),
            created_unix: i64::MAX,
            ..Default::default()
        }],
        ..Default::default()
    };
    proto::write_message(&mut send, &proto::AgentMessage::TelemetryInventory(inv))
        .await
        .unwrap();
    let gpu_sample = GpuSample {
        utilization_percent: Some(u8::MAX),
        memory_used_bytes: Some(u64::MAX),
        ..Default::default()
    };
    let rate = NetRate {
        rx_bytes_per_sec: u64::MAX,
        tx_bytes_per_sec: u64::MAX,
    };
    let sample = TelemetrySample {
        epoch: 1,
        seq: 1,
        taken_at_ms: u64::MAX,
        host: HostSample {
            cpu_percent: f32::NAN,
            load: [f32::INFINITY, f32::MAX, -1.0],
            memory_used_bytes: u64::MAX,
            memory_total_bytes: u64::MAX,
            uptime_secs: u64::MAX,
            ..Default::default()
        },
        interfaces: vec![rate, rate],
        gpus: vec![gpu_sample.clone(), gpu_sample],
        containers: vec![ContainerSample {
            state: ContainerState::Running,
            restart_count: u32::MAX,
            memory_used_bytes: Some(u64::MAX),
            ..Default::default()
        }],
        ..Default::default()
    };
    let bytes = proto::encode(&Datagram::Sample(sample)).unwrap();
    // Datagrams may be lost: resend until the sample is in.
    let containers = wait_for(
        "the odd sample to be taken",
        Duration::from_secs(10),
        || {
            let _ = conn.send_datagram(bytes.clone().into());
            let c = &c;
            async move {
                let resp = c
                    .client
                    .get(c.url("/api/v1/containers"))
                    .bearer_auth(&c.admin_token)
                    .send()
                    .await
                    .ok()?;
                assert!(resp.status().is_success(), "{}", resp.status());
                let body: common::Page<ContainerRow> = resp.json().await.ok()?;
                (!body.items.is_empty()).then_some(body)
            }
        },
    )
    .await;
    let item = &containers.items[0];
    assert_eq!(item.name, "from-the-future", "{containers:?}");
    assert!(item.created.starts_with("9999-12-31"), "{item:?}");
    // The node's views stay up too.
    for path in [
        "/api/v1/nodes",
        "/api/v1/nodes/odd",
        "/api/v1/nodes/odd/telemetry",
        "/api/v1/nodes/odd/telemetry?since=9999-12-31T23:59:59Z",
    ] {
        let resp = c
            .client
            .get(c.url(path))
            .bearer_auth(&c.admin_token)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
    }
    // ...and read as their types: figures that were no numbers are numbers now.
    let node = c.node("odd").await.unwrap();
    let summary = node.telemetry.expect("a summary");
    assert_eq!(summary.cpu_percent, 0.0, "NaN CPU: {summary:?}");
    assert_eq!(summary.load1, 0.0, "infinite load: {summary:?}");
    let t: NodeTelemetry = c.get_as("/api/v1/nodes/odd/telemetry").await;
    let host = &t.latest.expect("the odd sample").host;
    assert!(host.load.iter().all(|l| l.is_finite()), "{host:?}");
    // Times before 1970 are refused with a clear error, not a panic.
    for since in [
        "60y",
        "100000y",
        "18446744073709551615s",
        "1960-01-01T00:00:00Z",
    ] {
        let resp = c
            .client
            .get(c.url(&format!("/api/v1/nodes/odd/telemetry?since={since}")))
            .bearer_auth(&c.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "since={since}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(common::error_of(&body).code, "bad_request", "{body}");
    }
    assert!(conn.close_reason().is_none());
    assert_eq!(
        c.node("odd").await.unwrap().status,
        common::NodeStatus::Online
    );
}
