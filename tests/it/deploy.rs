//! Desired state end to end: a real controller and agents, the real Docker Engine, images built
//! locally (`scripts/build-test-image`: busybox `httpd` serving "v1", "v2", and a broken "v3"
//! without the health page), service maps applied over the API, the CLI and a watched file.

use crate::common;

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use common::docker::{self, docker, require};
use common::*;
use nebula_desired::map::Problem;
use nebula_desired::plan::Action;
use nebula_types::api::desired::{Applied, DesiredView, ServiceDetail, ServiceView};
use serde_json::{json, Value};

/// Build the web images (idempotent).
fn web_images() {
    require();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-test-image");
    let out = Command::new(script).output().expect("run build-test-image");
    assert!(
        out.status.success(),
        "building the test images failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn put_map(c: &Controller, yaml: &str) -> (u16, Value) {
    c.put_map(yaml).await
}

async fn service(c: &Controller, name: &str) -> Option<ServiceView> {
    let list: Vec<ServiceView> = c.get_as("/api/v1/services").await;
    list.into_iter().find(|s| s.name == name)
}

/// The map in force, as the API shows it.
async fn desired(c: &Controller) -> DesiredView {
    c.get_as("/api/v1/desired").await
}

/// A map's problems in a refusal.
fn problems(v: &Value) -> Vec<Problem> {
    serde_json::from_value(common::error_of(v).problems.expect("problems")).expect("problems")
}

/// Wait until `name` runs its wanted revision with every replica running.
async fn converged(c: &Controller, name: &str, timeout: Duration) -> ServiceView {
    wait_for(&format!("{name} to converge"), timeout, || async {
        let s = service(c, name).await?;
        (s.status == "converged" && s.running == s.replicas).then_some(s)
    })
    .await
}

/// Names of `service`'s managed containers on `node` (running or not).
fn containers(node: &str, service: &str) -> Vec<String> {
    let out = docker(&[
        "ps",
        "-a",
        "--filter",
        "label=nebula.managed=true",
        "--filter",
        &format!("label=nebula.node={node}"),
        "--filter",
        &format!("label=nebula.service={service}"),
        "--format",
        "{{.Names}}",
    ]);
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

fn ip_of(container: &str) -> String {
    docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        container,
    ])
}

async fn body(url: &str) -> Option<String> {
    let resp = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    Some(resp.text().await.ok()?.trim().to_owned())
}

async fn join(
    c: &Controller,
    dir: &std::path::Path,
    name: &str,
    labels: &[&str],
) -> (Agent, String) {
    join_ready(c, dir, name, labels, None).await
}

/// [`join`] with an agent config file (TOML).
async fn join_with_config(
    c: &Controller,
    dir: &std::path::Path,
    name: &str,
    config: &str,
) -> (Agent, String) {
    join_ready(c, dir, name, &[], Some(config)).await
}

fn map(web_image: &str, edge_image: &str, edge_port: u16) -> String {
    format!(
        r#"
version: 1
nodes:
  alpha:
    labels: {{ role: apps }}
  beta: {{}}
services:
  web:
    image: {web_image}
    placement: {{ node: alpha }}
    health:
      http: {{ port: 80, path: /healthz }}
      interval: 300ms
      timeout: 1s
      retries: 2
    update: {{ health_timeout: 10s }}
  edge:
    image: {edge_image}
    ports: ["127.0.0.1:{edge_port}:80"]
    placement: {{ node: beta }}
    health:
      http: {{ port: 80, path: /healthz }}
      interval: 300ms
      timeout: 1s
      retries: 2
    update: {{ strategy: stop-first, health_timeout: 10s }}
  worker:
    image: nebula-test/busybox:1
    command: sleep 3600
    replicas: 2
    placement:
      labels: {{ role: apps }}
    depends_on: [web]
"#
    )
}

/// The CLI's (success, stdout, stderr).
fn cli(c: &Controller, args: &[&str]) -> (bool, String, String) {
    let out = c.cli(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_deploys_updates_rolls_back_and_is_rolled_back_by_hand() {
    web_images();
    let cleanup = docker::Managed::default();
    let c = Controller::start(ControllerOpts {
        extra: vec!["--reconcile-interval", "1s"],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, alpha) = join(&c, dir.path(), "alpha", &[]).await;
    let (_b, beta) = join(&c, dir.path(), "beta", &[]).await;
    cleanup.add(&alpha);
    cleanup.add(&beta);
    let port = free_port();

    // Three services over two agents: each on the right node, healthy.
    let v1 = map("nebula-test/web:v1", "nebula-test/web:v1", port);
    let file = dir.path().join("service-map.yml");
    std::fs::write(&file, &v1).unwrap();
    let (ok, out, err) = cli(&c, &["plan", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("+ web on alpha: create 1 x revision"), "{out}");
    assert!(
        out.contains("+ worker on alpha: create 2 x revision"),
        "{out}"
    );
    assert!(out.contains("(after web)"), "worker waits for web: {out}");
    let (ok, out, err) = cli(&c, &["apply", file.to_str().unwrap(), "--timeout", "90s"]);
    assert!(
        ok,
        "apply failed:\n{out}\n{err}\nagent alpha:\n{}",
        _a.proc.output()
    );
    assert!(out.contains("All 3 service(s) converged."), "{out}");
    for name in ["web", "edge", "worker"] {
        converged(&c, name, Duration::from_secs(30)).await;
    }
    assert_eq!(containers(&alpha, "web").len(), 1);
    assert_eq!(containers(&beta, "web").len(), 0);
    assert_eq!(containers(&beta, "edge").len(), 1);
    assert_eq!(
        containers(&alpha, "worker").len(),
        2,
        "labels place both on alpha"
    );
    let web_v1 = containers(&alpha, "web")[0].clone();
    assert_eq!(
        body(&format!("http://{}/", ip_of(&web_v1)))
            .await
            .as_deref(),
        Some("v1")
    );
    assert_eq!(
        body(&format!("http://127.0.0.1:{port}/")).await.as_deref(),
        Some("v1")
    );
    let (ok, out, _) = cli(&c, &["plan", "--exit-code"]);
    assert!(ok, "nothing left to do after apply: {out}");

    // v1 -> v2: start-first for web (no fixed host port), stop-first for edge (fixed port).
    let v2 = map("nebula-test/web:v2", "nebula-test/web:v2", port);
    std::fs::write(&file, &v2).unwrap();
    let (ok, out, _) = cli(&c, &["plan", file.to_str().unwrap(), "--exit-code"]);
    assert!(!ok, "changes pending must exit non-zero");
    assert!(out.contains("~ web on alpha: update"), "{out}");
    assert!(
        out.contains(r#"image: "nebula-test/web:v1" -> "nebula-test/web:v2""#),
        "field-level diff: {out}"
    );
    let (status, applied) = put_map(&c, &v2).await;
    assert_eq!(status, 200, "{applied}");
    let want = service(&c, "web").await.unwrap().revision;
    wait_for("web at v2", Duration::from_secs(60), || async {
        let s = service(&c, "web").await?;
        (s.status == "converged" && s.revision == want && s.running == 1).then_some(())
    })
    .await;
    let edge_v2_revision = converged(&c, "edge", Duration::from_secs(60))
        .await
        .revision;
    let web_now = containers(&alpha, "web");
    assert_eq!(web_now.len(), 1, "the old container is gone: {web_now:?}");
    assert_ne!(web_now[0], web_v1);
    assert_eq!(
        body(&format!("http://{}/", ip_of(&web_now[0])))
            .await
            .as_deref(),
        Some("v2")
    );
    assert_eq!(
        body(&format!("http://127.0.0.1:{port}/")).await.as_deref(),
        Some("v2"),
        "the fixed port serves v2 after stop-first"
    );
    assert_eq!(containers(&beta, "edge").len(), 1);

    // v2 -> v3 (broken): rolled back by itself, v2 still serves, the health output reported.
    let v3 = map("nebula-test/web:v2", "nebula-test/web:v3", port);
    let (status, _) = put_map(&c, &v3).await;
    assert_eq!(status, 200);
    // Once the old container's restart shows in telemetry, the view says what runs.
    let failed = wait_for("edge v3 to fail", Duration::from_secs(60), || async {
        let s = service(&c, "edge").await?;
        (s.status == "failed" && s.running == 1).then_some(s)
    })
    .await;
    let message = failed.message.as_deref().unwrap_or_default();
    assert!(
        message.contains("404"),
        "health output in the report: {failed:?}"
    );
    // What runs is shown: the last good revision, its counts, and that the newer one failed.
    assert_eq!(failed.serving_revision, edge_v2_revision, "{failed:?}");
    assert_eq!((failed.healthy, failed.running), (1, 1), "{failed:?}");
    assert!(message.contains("runs and serves"), "{failed:?}");
    let (ok, out, _) = cli(&c, &["services"]);
    assert!(ok, "{out}");
    let edge_row = out
        .lines()
        .find(|l| l.starts_with("edge"))
        .unwrap_or_default();
    assert!(
        edge_row.contains("failed") && edge_row.contains("1/1/1") && edge_row.contains("(runs "),
        "{out}"
    );
    assert_eq!(
        body(&format!("http://127.0.0.1:{port}/")).await.as_deref(),
        Some("v2"),
        "v2 serves again after the rollback"
    );
    let history: ServiceDetail = c.get_as("/api/v1/services/edge").await;
    let last = &history.history[0];
    assert_eq!(last.outcome, "rolled-back", "{history:?}");
    assert!(
        last.message.as_deref().unwrap().contains("/healthz"),
        "{last:?}"
    );
    assert!(last.trigger.contains("applied"), "{last:?}");
    // A failed revision is not retried by later runs: the old container stays.
    let edge_v2 = containers(&beta, "edge");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(containers(&beta, "edge"), edge_v2);

    // `nebula rollback web` returns web to v1 (a pin until the map changes web).
    let (ok, out, err) = cli(&c, &["rollback", "web"]);
    assert!(ok, "{out}{err}");
    wait_for("web back on v1", Duration::from_secs(60), || async {
        let names = containers(&alpha, "web");
        if names.len() != 1 {
            return None;
        }
        (body(&format!("http://{}/", ip_of(&names[0])))
            .await
            .as_deref()
            == Some("v1"))
        .then_some(())
    })
    .await;
    let web = converged(&c, "web", Duration::from_secs(30)).await;
    assert!(web.pinned_over.is_some(), "{web:?}");
    let (ok, out, _) = cli(&c, &["service", "web"]);
    assert!(ok);
    assert!(
        out.contains("rollback") && out.contains("deployed"),
        "{out}"
    );
    let (ok, out, _) = cli(&c, &["services", "--json"]);
    assert!(ok);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_repaired_orphans_removed_and_unmanaged_containers_left_alone() {
    web_images();
    let cleanup = docker::Managed::default();
    // A long reconcile period: every repair below comes from a container event, not the timer.
    let c = Controller::start(ControllerOpts {
        extra: vec!["--reconcile-interval", "5m"],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, node) = join(&c, dir.path(), "gamma", &[]).await;
    cleanup.add(&node);
    let unmanaged = docker::Containers::new();
    let bystander = unmanaged.run(
        &format!("bystander-{}", &node[..8]),
        &[docker::IMAGE, "sleep", "3600"],
    );
    let two = r#"
services:
  app:
    image: nebula-test/busybox:1
    command: ["sleep", "3600"]
  extra:
    image: nebula-test/busybox:1
    command: ["sleep", "3600"]
"#;
    let (status, v) = put_map(&c, two).await;
    assert_eq!(status, 200, "{v}");
    converged(&c, "app", Duration::from_secs(30)).await;
    converged(&c, "extra", Duration::from_secs(30)).await;

    // Removed by hand (`docker rm -f`): Docker's destroy event triggers the reconciler like a
    // stop does, so the service is back within 3 s (the timer would take 5 minutes).
    let before = containers(&node, "app");
    assert_eq!(before.len(), 1);
    docker(&["rm", "-f", &before[0]]);
    let started = std::time::Instant::now();
    wait_for("app to come back", Duration::from_secs(15), || async {
        let now = containers(&node, "app");
        (now.len() == 1 && now != before).then_some(())
    })
    .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "repaired in {took:?}");
    // Stopped by hand: started again.
    let app = containers(&node, "app")[0].clone();
    docker(&["stop", "-t", "1", &app]);
    wait_for("app to run again", Duration::from_secs(15), || async {
        (docker(&["inspect", "-f", "{{.State.Running}}", &app]) == "true").then_some(())
    })
    .await;
    let history: ServiceDetail = c.get_as("/api/v1/services/app").await;
    assert!(
        history.history.iter().any(|d| d.action == "repair"),
        "{history:?}"
    );

    // A service dropped from the map is an orphan: removed. The bystander is never touched.
    let one = r#"
services:
  app:
    image: nebula-test/busybox:1
    command: ["sleep", "3600"]
"#;
    let (status, v) = put_map(&c, one).await;
    assert_eq!(status, 200, "{v}");
    let applied: Applied = serde_json::from_value(v).unwrap();
    assert!(applied
        .plan
        .actions
        .iter()
        .any(|a| matches!(a, Action::Remove { service, .. } if service == "extra")));
    wait_for("extra to be removed", Duration::from_secs(30), || async {
        containers(&node, "extra").is_empty().then_some(())
    })
    .await;
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Running}}", &bystander]),
        "true",
        "an unmanaged container beside them is never touched"
    );
    assert_eq!(containers(&node, "app").len(), 1);

    // Runs and outcomes are counted for Prometheus.
    let metrics = c.metrics().await;
    assert!(
        metric(
            &metrics,
            r#"nebula_deploys_finished_total{outcome="deployed"}"#
        ) >= 4.0,
        "two creates and two repairs: {metrics}"
    );
    assert!(
        metric(
            &metrics,
            r#"nebula_deploys_finished_total{outcome="removed"}"#
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "nebula_reconcile_runs_total") >= 3.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_maps_are_refused_with_line_and_column_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("service-map.yml");
    let good = "nodes:\n  n1: {}\nservices:\n  web:\n    image: nebula-test/web:v1\n    placement: { node: n1 }\n";
    std::fs::write(&file, good).unwrap();
    let path = file.to_str().unwrap().to_owned();
    let c = Controller::start(ControllerOpts {
        extra: vec!["--service-map", Box::leak(path.into_boxed_str())],
        ..Default::default()
    })
    .await;
    let first = desired(&c).await;
    assert_eq!(
        first.version,
        Some(1),
        "the watched file is applied at start: {first:?}"
    );
    assert!(first.source.as_deref().unwrap().starts_with("file:"));

    let ports = "nodes:\n  n1: {}\nservices:\n  a:\n    image: x\n    ports: [\"8080:80\"]\n    placement: { node: n1 }\n  b:\n    image: y\n    ports: [\"8080:81\"]\n    placement: { node: n1 }\n";
    // (map, line, column, words the message must hold)
    let cases: Vec<(&str, u64, u64, &str)> = vec![
        ("services:\n\tweb:\n    image: x\n", 2, 2, "tab"),
        ("services:\n  web:\n    image: x\n    imgae: y\n", 4, 5, "unknown field `imgae`"),
        ("services:\n  web:\n    image: x\n    replicas: many\n", 4, 15, "u32"),
        ("services:\n  web:\n    image: x\n  web:\n    image: y\n", 4, 3, "duplicate"),
        ("services:\n  web:\n    replicas: 2\n", 3, 5, "missing field `image`"),
        (ports, 10, 13, "already claimed by service `a`"),
        ("services:\n  web:\n    image: x\n    health:\n      tcp: { port: 80 }\n      interval: 30x\n", 6, 7, "duration"),
        ("nodes:\n  n1: {}\nservices:\n  web:\n    image: x\n    placement: { node: ghost }\n", 6, 24, "unknown node `ghost`"),
        ("services:\n  web:\n    image: x\n    ports: [\"99999:80\"]\n", 4, 13, "not a port number"),
        ("services:\n  web:\n    image: x\n    depends_on: [db]\n", 4, 18, "not declared"),
        ("services:\n  a:\n    image: x\n    depends_on: [b]\n  b:\n    image: y\n    depends_on: [a]\n", 3, 5, "cycle"),
        ("services:\n  web:\n    image: x\n    restart: sometimes\n", 4, 14, "restart policy"),
        ("services:\n  web:\n    image: x\n    gpu: lots\n", 4, 10, "gpu"),
        ("services:\n  web:\n    image: x\n    ports: [\"8080:80\"]\n    update: { strategy: start-first }\n", 5, 25, "start-first"),
        ("services: [\n", 1, 11, ""),
        ("version: 2\n", 1, 10, "schema version"),
    ];
    let mut wrong = Vec::new();
    for (text, line, column, words) in &cases {
        let (status, v) = put_map(&c, text).await;
        assert_eq!(status, 400, "{text}: {v}");
        assert_eq!(common::error_of(&v).code, "invalid_service_map", "{v}");
        let p = &problems(&v)[0];
        let msg = &p.message;
        if (p.line, p.column) != (*line, *column)
            || !msg.to_lowercase().contains(&words.to_lowercase())
        {
            wrong.push(format!("{text:?}: got {p}"));
        }
        // Nothing changed.
        let now = desired(&c).await;
        assert_eq!(now.version, Some(1), "{now:?}");
        // The plan endpoint refuses it the same way.
        let resp = c
            .client
            .post(c.url("/api/v1/plan"))
            .bearer_auth(&c.admin_token)
            .body(text.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);
    }
    assert!(wrong.is_empty(), "unexpected errors:\n{}", wrong.join("\n"));
    assert!(cases.len() >= 10);

    // The CLI prints each problem as line:column: message.
    let bad = dir.path().join("bad.yml");
    std::fs::write(&bad, cases[1].0).unwrap();
    let (ok, _, err) = cli(&c, &["apply", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("4:5: unknown field `imgae`"), "{err}");
    assert!(err.contains("the map in force is unchanged"), "{err}");

    // A broken save of the watched file is refused; the last good map stays; a fix applies.
    std::fs::write(&file, "services:\n  web:\n    image: x\n    imgae: y\n").unwrap();
    let d = wait_for(
        "the file to be refused",
        Duration::from_secs(10),
        || async {
            let d = desired(&c).await;
            d.file_error.is_some().then_some(d)
        },
    )
    .await;
    assert_eq!(d.version, Some(1));
    assert_eq!(d.file_error.as_ref().unwrap().problems[0].line, 4, "{d:?}");
    std::fs::write(&file, good.replace("web:v1", "web:v2")).unwrap();
    let d = wait_for(
        "the fixed file to apply",
        Duration::from_secs(10),
        || async {
            let d = desired(&c).await;
            (d.version == Some(2)).then_some(d)
        },
    )
    .await;
    assert!(d.file_error.is_none(), "{d:?}");
    assert!(d.document.as_deref().unwrap().contains("web:v2"));

    // The schema is public (editors fetch it) and describes the document.
    let schema: Value = reqwest::get(c.url("/api/v1/schema/service-map"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(schema["properties"]["services"].is_object(), "{schema}");
    // Deploy jobs are the reconciler's: the jobs API refuses them.
    let (status, v) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/jobs",
            Some(
                json!({"node": "n1", "work": {"kind": "undeploy", "service": "web", "node": "x"}}),
            ),
        )
        .await;
    assert_eq!(status, 400, "{v}");
}

/// Whether this Docker Engine can run privileged containers (an engine that itself runs in an
/// unprivileged container cannot).
fn privileged_containers_run() -> bool {
    Command::new("docker")
        .args([
            "run",
            "--rm",
            "--privileged",
            "nebula-test/busybox:1",
            "true",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The host's deploy policy (`[deploy]` in the agent's config), for binds of `/` and the Docker
/// socket and for host access (`privileged`, `network_mode: host`): an agent with the default
/// config reports a policy that refuses each, so the controller's plan shows every refusal in
/// the agent's words (the rule and the key that would allow it) before the map is applied
/// (`nebula plan FILE`) and after, and no deploy is sent there; an agent whose config lists
/// them runs the same services, privileged and on the host's network for real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binds_and_host_access_need_the_agent_configs_consent() {
    docker::ensure_image();
    let cleanup = docker::Managed::default();
    let c = Controller::start(ControllerOpts {
        extra: vec!["--reconcile-interval", "1s"],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (_strict, strict) = join(&c, dir.path(), "strict", &[]).await;
    let open_config = "[deploy]\nallow_bind_paths = [\"/\"]\nallow_docker_socket = true\n\
                       allow_privileged = true\nallow_host_network = true\n";
    let (_open, open) = join_with_config(&c, dir.path(), "open", open_config).await;
    cleanup.add(&strict);
    cleanup.add(&open);
    let root = "/:/host:ro";
    let socket = "/var/run/docker.sock:/var/run/docker.sock";
    // (service, what it asks for, the refusal's words on a default agent)
    let cases: [(&str, String, &[&str]); 4] = [
        (
            "root",
            format!("volumes: [\"{root}\"]"),
            &["bind mount of `/` is outside deploy.allow_bind_paths (agent config)"],
        ),
        (
            "socket",
            format!("volumes: [\"{socket}\"]"),
            &[
                "bind mount of `/var/run/docker.sock`",
                "is a container runtime's socket, which only deploy.allow_docker_socket allows",
            ],
        ),
        (
            "privileged",
            "privileged: true".into(),
            &["a privileged container needs deploy.allow_privileged (agent config)"],
        ),
        (
            "hostnet",
            "network_mode: host".into(),
            &["the host's network needs deploy.allow_host_network (agent config)"],
        ),
    ];
    let mut text = String::from("nodes:\n  strict: {}\n  open: {}\nservices:\n");
    for (kind, asks, _) in &cases {
        for node in ["strict", "open"] {
            text.push_str(&format!(
                "  {kind}-{node}:\n    image: nebula-test/busybox:1\n    command: sleep 3600\n    \
                 {asks}\n    placement: {{ node: {node} }}\n"
            ));
        }
    }
    let says = |message: &str, words: &[&str]| {
        message.contains("deploy refused by this host's policy: ")
            && words.iter().all(|w| message.contains(w))
    };

    // Before the map is applied: each agent reported its policy with its first inventory, and
    // the plan of the proposed map shows the default node's refusals instead of creates.
    let file = dir.path().join("service-map.yml");
    std::fs::write(&file, &text).unwrap();
    let (ok, out, err) = cli(&c, &["plan", file.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    for (kind, _, words) in &cases {
        let refused = out
            .lines()
            .find(|l| l.contains(&format!("{kind}-strict on strict: refused: ")))
            .unwrap_or_else(|| panic!("{kind}-strict is not refused in the plan:\n{out}"));
        assert!(says(refused, words), "{kind}: {refused}");
        assert!(
            out.contains(&format!("+ {kind}-open on open: create 1 x revision")),
            "{kind}-open is created:\n{out}"
        );
    }
    assert!(!out.contains("-strict on strict: create"), "{out}");
    assert!(out.contains("4 refused by a node's deploy policy"), "{out}");

    let (status, v) = put_map(&c, &text).await;
    assert_eq!(status, 200, "{v}");
    // The plan that apply answers with says the same, in JSON.
    let applied: Applied = serde_json::from_value(v).unwrap();
    let refused = &applied.plan.refused;
    assert_eq!(refused.len(), 4, "{applied:?}");
    assert!(
        refused.iter().all(|r| r.node.as_deref() == Some("strict")),
        "{applied:?}"
    );

    // Open: the containers run with the binds, privileged, on the host's network.
    let privileged_runs = privileged_containers_run();
    for (kind, _, _) in &cases {
        let name = format!("{kind}-open");
        if *kind == "privileged" && !privileged_runs {
            // This Docker Engine cannot start privileged containers (it runs in an
            // unprivileged container itself): the agent's policy let the deploy through and
            // Docker was asked for one, which is what can be checked here.
            eprintln!("this Docker Engine cannot run privileged containers; checking the attempt");
            let svc = wait_for(
                &format!("{name} to reach Docker"),
                Duration::from_secs(30),
                || async {
                    let s = service(&c, &name).await?;
                    (s.status == "failed").then_some(s)
                },
            )
            .await;
            let message = svc.message.as_deref().unwrap_or_default();
            assert!(
                message.starts_with("starting privileged-open-")
                    && message.contains("Docker responded")
                    && !message.contains("refused"),
                "{name}: {svc:?}"
            );
            continue;
        }
        converged(&c, &name, Duration::from_secs(30)).await;
        let running = containers(&open, &name);
        assert_eq!(running.len(), 1, "{name}: {running:?}");
        let inspect = |format: &str| docker(&["inspect", "-f", format, &running[0]]);
        match *kind {
            "root" | "socket" => {
                let binds = inspect("{{json .HostConfig.Binds}}");
                let bind = if *kind == "root" { root } else { socket };
                assert!(binds.contains(bind), "{name}: {binds}");
            }
            "privileged" => {
                assert_eq!(inspect("{{.HostConfig.Privileged}}").trim(), "true");
                assert_ne!(inspect("{{.HostConfig.NetworkMode}}").trim(), "host");
            }
            _ => {
                assert_eq!(inspect("{{.HostConfig.NetworkMode}}").trim(), "host");
                assert_eq!(inspect("{{.HostConfig.Privileged}}").trim(), "false");
            }
        }
    }

    // Strict: refused with the rule and the key, nothing created, no deploy job sent.
    for (kind, _, words) in &cases {
        let name = format!("{kind}-strict");
        let svc = wait_for(
            &format!("{name} to be refused"),
            Duration::from_secs(10),
            || async {
                let s = service(&c, &name).await?;
                (s.status == "refused").then_some(s)
            },
        )
        .await;
        let message = svc.message.as_deref().unwrap_or_default();
        assert!(says(message, words), "{name}: {svc:?}");
        assert!(containers(&strict, &name).is_empty(), "nothing for {name}");
    }
    let jobs: common::Page<common::JobRecord> =
        c.get_as("/api/v1/jobs?node=strict&kind=deploy").await;
    assert!(jobs.items.is_empty(), "{jobs:?}");
}
