//! Secrets in deploys end to end: a service map names secrets (`${secret:NAME}` in `env`, a
//! `secrets:` file), a real agent deploys it on the real Docker Engine, and the planted values
//! are found inside the container and nowhere else: not in the controller's data dir
//! (database included), its log (at debug level, where every event is logged), the agent's
//! log, the job rows and logs, the audit log or any API answer. A viewer sees references and
//! `***`, never inline values. A new version of a secret rolls the service.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::docker::{self, docker};
use crate::common::*;

const PLANTED_DB: &str = "planted-db-Pw-31c9a07e";
const PLANTED_DB_2: &str = "planted-db-Pw-v2-5be8d4";
const PLANTED_FILE: &str = "planted-file-Token-9f20c1";
/// An inline value the output-filter rules flag as an API key: kept in the secret store, the
/// stored map holds a reference.
const PLANTED_INLINE_KEY: &str = "sk-proj-Q7w8E9r0T1y2U3i4O5p6A7s8D9f0";
const INLINE_PLAIN: &str = "inline-mode-value-42";

fn map() -> String {
    format!(
        r#"
services:
  app:
    image: nebula-test/busybox:1
    command: sleep 3600
    placement: {{ node: vault }}
    env:
      DB_PASSWORD: ${{secret:db_password}}
      DSN: "postgres://app:${{secret:db_password}}@db/app"
      MODE: {INLINE_PLAIN}
      OPENAI_API_KEY: {PLANTED_INLINE_KEY}
    secrets:
      - name: api_token
        mode: "0400"
"#
    )
}

fn set_secret(c: &Controller, name: &str, value: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), value).unwrap();
    let out = c.cli(&[
        "secret",
        "set",
        name,
        "--from-file",
        file.path().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every byte under `dir`, as text.
fn all_bytes(dir: &std::path::Path) -> String {
    let mut all = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                all.extend(std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

async fn get_with(c: &Controller, token: &str, path: &str) -> Value {
    let resp = c
        .client
        .get(c.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "GET {path}");
    resp.json().await.unwrap()
}

fn the_app_container(node: &str) -> Option<String> {
    docker(&[
        "ps",
        "--filter",
        &format!("label=nebula.node={node}"),
        "--filter",
        "label=nebula.service=app",
        "--format",
        "{{.Names}}",
    ])
    .lines()
    .find(|l| !l.is_empty())
    .map(str::to_owned)
}

fn env_of(container: &str) -> String {
    docker(&["exec", container, "busybox", "env"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_values_reach_only_the_container_and_a_new_version_rolls_the_service() {
    docker::require();
    docker::ensure_image();
    let cleanup = docker::Managed::default();
    let c = Controller::start(ControllerOpts {
        extra: vec!["--reconcile-interval", "1s"],
        env: vec![(
            "RUST_LOG",
            "debug,sqlx=warn,hyper=info,quinn=info,rustls=info",
        )],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token = c.token(1, "10m", json!({})).await;
    let agent = Agent::join_with_env(
        &c,
        &token,
        &dir.path().join("vault"),
        "vault",
        &[],
        &[("RUST_LOG", "debug")],
    );
    let node = c
        .wait_status(
            "vault",
            nebula_types::api::nodes::NodeStatus::Online,
            Duration::from_secs(20),
        )
        .await
        .id
        .to_string();
    cleanup.add(&node);
    wait_for("the node's telemetry", Duration::from_secs(20), || async {
        c.node("vault").await?.telemetry.map(|_| ())
    })
    .await;

    // A map naming a secret the store does not have is refused, and nothing changes.
    let (status, v) = c.put_map(&map()).await;
    assert_eq!(status, 400, "{v}");
    let said = v.to_string();
    assert!(
        said.contains("secret `db_password` is not in the store"),
        "{said}"
    );
    assert!(said.contains("nebula secret set db_password"), "{said}");
    assert!(c.get("/api/v1/desired").await["version"].is_null());

    set_secret(&c, "db_password", PLANTED_DB);
    set_secret(&c, "api_token", PLANTED_FILE);
    // `nebula plan` warns about the inline value that looks like a key.
    let file = dir.path().join("service-map.yml");
    std::fs::write(&file, map()).unwrap();
    let out = c.cli(&["plan", file.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("warning:") && said.contains("env `OPENAI_API_KEY` looks like a secret"),
        "{said}"
    );
    assert!(said.contains("nebula secret set"), "{said}");
    let (status, applied) = c.put_map(&map()).await;
    assert_eq!(status, 200, "{applied}");
    let warnings = applied["warnings"].to_string();
    assert!(
        warnings.contains("env `OPENAI_API_KEY` looks like a secret (api_key)")
            && warnings.contains("nebula secret set"),
        "a plain value that looks like a key is warned about: {warnings}"
    );

    // Inside the container: the values, in the environment and as a file with its mode.
    let container = wait_for("the app container", Duration::from_secs(60), || async {
        the_app_container(&node)
    })
    .await;
    let env = env_of(&container);
    assert!(
        env.contains(&format!("DB_PASSWORD={PLANTED_DB}\n")),
        "{env}"
    );
    assert!(
        env.contains(&format!("DSN=postgres://app:{PLANTED_DB}@db/app")),
        "{env}"
    );
    assert!(env.contains(&format!("OPENAI_API_KEY={PLANTED_INLINE_KEY}")));
    assert!(env.contains(&format!("MODE={INLINE_PLAIN}")));
    assert_eq!(
        docker(&["exec", &container, "cat", "/run/secrets/api_token"]),
        PLANTED_FILE
    );
    assert_eq!(
        docker(&[
            "exec",
            &container,
            "busybox",
            "stat",
            "-c",
            "%a %u",
            "/run/secrets/api_token"
        ]),
        "400 0"
    );
    let app = wait_for("app converged", Duration::from_secs(60), || async {
        let list = c.get("/api/v1/services").await;
        list.as_array()?
            .iter()
            .find(|s| s["name"] == "app" && s["status"] == "converged")
            .cloned()
    })
    .await;
    let first_revision = app["revision"].as_str().unwrap().to_owned();

    // A viewer sees names and references; inline values are `***`.
    let (status, v) = c
        .api(
            Method::POST,
            "/api/v1/api-tokens",
            Some(json!({"name": "eyes", "role": "viewer"})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let viewer = v["token"].as_str().unwrap().to_owned();
    let seen = get_with(&c, &viewer, "/api/v1/desired").await;
    let doc = seen["document"].as_str().unwrap();
    assert!(doc.contains("DB_PASSWORD: ${secret:db_password}"), "{doc}");
    assert!(doc.contains("${secret:map.app.OPENAI_API_KEY}"), "{doc}");
    assert!(doc.contains("MODE: \"***\""), "{doc}");
    assert!(!doc.contains(INLINE_PLAIN), "{doc}");
    let jobs = get_with(&c, &viewer, "/api/v1/jobs?kind=deploy").await;
    let deploy = &jobs["items"][0]["work"];
    assert_eq!(deploy["kind"], "deploy_with_files", "{deploy}");
    let env_seen = deploy["deploy"]["container"]["env"].to_string();
    assert!(
        env_seen.contains(r#"["DB_PASSWORD","${secret:db_password@1}"]"#),
        "{env_seen}"
    );
    assert!(env_seen.contains(r#"["MODE","***"]"#), "{env_seen}");
    assert!(!env_seen.contains(INLINE_PLAIN), "{env_seen}");
    assert_eq!(deploy["files"][0]["secret"], "api_token@1", "{deploy}");
    assert_eq!(deploy["contents"], json!([]), "no bytes in a stored job");
    // A viewer's plan preview names the changed variable without its values.
    let changed = map().replace(INLINE_PLAIN, "another-mode");
    let preview = |token: String| {
        let body = changed.clone();
        let c = &c;
        async move {
            c.client
                .post(c.url("/api/v1/plan"))
                .bearer_auth(token)
                .body(body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let seen = preview(viewer.clone()).await;
    assert!(seen.contains("env.MODE"), "{seen}");
    assert!(
        !seen.contains(INLINE_PLAIN) && !seen.contains("another-mode"),
        "{seen}"
    );
    let admin_seen = preview(c.admin_token.clone()).await;
    assert!(admin_seen.contains(INLINE_PLAIN), "{admin_seen}");
    // An operator sees inline values (those the map keeps), still only references for secrets.
    let admin_jobs = c.get("/api/v1/jobs?kind=deploy").await.to_string();
    assert!(admin_jobs.contains(INLINE_PLAIN));

    // A new version: the service rolls to a new revision with the new value.
    set_secret(&c, "db_password", PLANTED_DB_2);
    let rolled = wait_for(
        "app rolled to version 2",
        Duration::from_secs(60),
        || async {
            let list = c.get("/api/v1/services").await;
            let app = list
                .as_array()?
                .iter()
                .find(|s| s["name"] == "app" && s["status"] == "converged")?
                .clone();
            (app["revision"] != first_revision.as_str()).then_some(app)
        },
    )
    .await;
    let container = the_app_container(&node).expect("the new container");
    assert!(env_of(&container).contains(&format!("DB_PASSWORD={PLANTED_DB_2}\n")));
    let detail = c.get("/api/v1/services/app").await;
    let update = detail["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["revision"] == rolled["revision"])
        .expect("the update is in the history")
        .clone();
    assert_eq!(update["action"], "update", "{update}");
    assert!(
        update["trigger"]
            .as_str()
            .unwrap()
            .contains("secret db_password changed to version 2"),
        "the history says why: {update}"
    );

    // Nowhere else: every API answer, the job logs, the audit log, the data dir (the
    // database included), the controller's and the agent's logs.
    let mut answers = String::new();
    for path in [
        "/api/v1/desired",
        "/api/v1/plan",
        "/api/v1/services",
        "/api/v1/services/app",
        "/api/v1/jobs?limit=1000",
        "/api/v1/audit?limit=1000",
        "/api/v1/secrets",
    ] {
        answers.push_str(&c.get(path).await.to_string());
    }
    let jobs = c.get("/api/v1/jobs?kind=deploy").await;
    for j in jobs["items"].as_array().unwrap() {
        let id = j["id"].as_str().unwrap();
        answers.push_str(&c.get(&format!("/api/v1/jobs/{id}")).await.to_string());
        answers.push_str(&c.get(&format!("/api/v1/jobs/{id}/logs")).await.to_string());
    }
    assert!(
        answers.contains("${secret:db_password@2}"),
        "the answers carry references"
    );
    let places = [
        ("API answers", answers),
        ("the data dir", all_bytes(&c.dir.path().join("data"))),
        ("the controller's log", c.proc.output()),
        ("the agent's log", agent.proc.output()),
        (
            "the agent's state dir",
            all_bytes(&dir.path().join("vault")),
        ),
    ];
    for (place, text) in &places {
        for planted in [PLANTED_DB, PLANTED_DB_2, PLANTED_FILE, PLANTED_INLINE_KEY] {
            let line = text.lines().find(|l| l.contains(planted));
            assert!(line.is_none(), "{planted} found in {place}: {line:?}");
        }
    }
    for (place, log) in [("controller", &places[2].1), ("agent", &places[3].1)] {
        assert!(log.contains("DEBUG"), "the {place} logged at debug level");
    }
}
