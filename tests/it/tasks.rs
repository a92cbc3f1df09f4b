//! The background-task driver seen from outside: `GET /api/v1/tasks` lists every task with its
//! scope and last run, "run now" (the reconcile endpoint) activates a run, and the task table
//! in ARCHITECTURE.md names exactly the tasks the controller registers. The OpenAPI document is
//! served the same way.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Task names and scopes from ARCHITECTURE.md's table (rows "| `name` | scope | ...").
fn documented() -> BTreeSet<(String, String)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/ARCHITECTURE.md"))
        .expect("ARCHITECTURE.md");
    let section = doc
        .split("## Tasks and Shutdown")
        .nth(1)
        .expect("a Tasks and Shutdown section");
    section
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_owned(), cells.get(2)?.replace(' ', "-")))
        })
        .collect()
}

fn task<'a>(tasks: &'a Value, name: &str) -> &'a Value {
    tasks
        .as_array()
        .expect("a list")
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no task {name} in {tasks}"))
}

#[tokio::test]
async fn every_background_task_is_listed_with_its_scope_and_last_run() {
    let c = Controller::start(ControllerOpts::default()).await;
    let tasks = c.get("/api/v1/tasks").await;
    let served: BTreeSet<(String, String)> = tasks
        .as_array()
        .expect("a list")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_owned(),
                t["scope"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        served,
        documented(),
        "ARCHITECTURE.md's task table and the controller's registry differ"
    );
    assert!(served.len() >= 11, "{served:?}");

    // Periodic tasks ran at start; the scheduler's first pass is a full one.
    let tasks = wait_for("first runs", Duration::from_secs(10), || async {
        let t = c.get("/api/v1/tasks").await;
        let ran = |n: &str| task(&t, n)["runs"].as_u64().unwrap_or(0) >= 1;
        (ran("job-scheduler")
            && ran("release-scan")
            && ran("retention-sweeper")
            && ran("reconciler"))
        .then_some(t)
    })
    .await;
    let scheduler = task(&tasks, "job-scheduler");
    assert_eq!(scheduler["kind"], "periodic");
    assert_eq!(scheduler["scope"], "leader");
    assert_eq!(scheduler["period_ms"], 250);
    assert_eq!(scheduler["last"]["ok"], true);
    assert_eq!(task(&tasks, "http-server")["state"], "idle");
    assert_eq!(task(&tasks, "quic-listener")["kind"], "service");
    // No service map file configured: its watcher has nothing to watch.
    assert_eq!(task(&tasks, "service-map-watch")["state"], "stopped");
    let reconciler_runs = task(&tasks, "reconciler")["runs"].as_u64().unwrap();

    // "Run now": the reconcile endpoint activates the reconciler, and its run is recorded.
    let (status, body) = c
        .api(reqwest::Method::POST, "/api/v1/reconcile", None)
        .await;
    assert!(status == 200 || status == 202, "{status} {body}");
    let tasks = wait_for(
        "an activated reconciler run",
        Duration::from_secs(10),
        || async {
            let t = c.get("/api/v1/tasks").await;
            (task(&t, "reconciler")["runs"].as_u64().unwrap() > reconciler_runs).then_some(t)
        },
    )
    .await;
    let last = &task(&tasks, "reconciler")["last"];
    assert_eq!(last["trigger"], "activated", "{last}");
    assert_eq!(last["ok"], true, "{last}");
    assert!(last["started_at"].as_i64().unwrap() > 1_700_000_000_000);

    // Any signed-in role may read it; no token, no list.
    let anonymous = c
        .client
        .get(c.url("/api/v1/tasks"))
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.status(), 401);

    // The API describes itself, without a token: every path it serves, the role each needs.
    let doc: Value = c
        .client
        .get(c.url("/api/v1/openapi.json"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["paths"]["/api/v1/tasks"]["get"]["x-nebula-role"],
        "viewer"
    );
    assert_eq!(
        doc["paths"]["/api/v1/api-tokens"]["post"]["x-nebula-role"],
        "admin"
    );
    assert!(doc["components"]["schemas"]["TaskStatus"].is_object());
}
