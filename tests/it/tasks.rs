//! The background-task driver seen from outside: `GET /api/v1/tasks` lists every task with its
//! scope and last run, "run now" (the reconcile endpoint) activates a run, and the task
//! tables in ARCHITECTURE.md and docs/tasks.md name exactly the tasks the controller
//! registers. The OpenAPI document is served the same way.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use nebula_types::api::tasks::{Kind, Scope, State, TaskStatus, Trigger};
use serde_json::Value;

/// Task names and scopes from the task table in `file` (rows "| `name` | scope | ..." from the
/// "| Task |" header to the table's end), after the heading `after` when given.
fn documented(file: &str, after: Option<&str>) -> BTreeSet<(String, String)> {
    let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(&path).expect(file);
    let section = match after {
        Some(h) => doc.split(h).nth(1).expect("the task table's section"),
        None => doc.as_str(),
    };
    section
        .lines()
        .skip_while(|l| !l.starts_with("| Task |"))
        .take_while(|l| l.starts_with('|'))
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_owned(), cells.get(2)?.replace(' ', "-")))
        })
        .collect()
}

fn task<'a>(tasks: &'a [TaskStatus], name: &str) -> &'a TaskStatus {
    tasks
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no task {name} in {tasks:?}"))
}

async fn tasks(c: &Controller) -> Vec<TaskStatus> {
    c.get_as("/api/v1/tasks").await
}

#[tokio::test]
async fn every_background_task_is_listed_with_its_scope_and_last_run() {
    // With HTTPS and its plain redirect listener, so that the tasks they add are there too.
    let c = Controller::start(ControllerOpts {
        extra: vec![
            "--https",
            "fleet-ca",
            "--https-redirect-listen",
            "127.0.0.1:0",
        ],
        ..Default::default()
    })
    .await;
    assert_eq!(c.scheme, "https");
    let served: BTreeSet<(String, String)> = tasks(&c)
        .await
        .iter()
        .map(|t| (t.name.to_string(), t.scope.as_str().to_owned()))
        .collect();
    assert_eq!(
        served,
        documented("ARCHITECTURE.md", Some("## Tasks and Shutdown")),
        "ARCHITECTURE.md's task table and the controller's registry differ"
    );
    assert_eq!(
        served,
        documented("docs/tasks.md", None),
        "docs/tasks.md's task table and the controller's registry differ"
    );
    assert!(served.len() >= 11, "{served:?}");

    // Periodic tasks ran at start; the scheduler's first pass is a full one.
    let list = wait_for("first runs", Duration::from_secs(10), || async {
        let t = tasks(&c).await;
        let ran = |n: &str| task(&t, n).runs >= 1;
        (ran("job-scheduler")
            && ran("release-scan")
            && ran("retention-sweeper")
            && ran("reconciler"))
        .then_some(t)
    })
    .await;
    let scheduler = task(&list, "job-scheduler");
    assert_eq!(scheduler.kind, Kind::Periodic);
    assert_eq!(scheduler.scope, Scope::Leader);
    assert_eq!(scheduler.period_ms, Some(250));
    assert!(scheduler.last.as_ref().unwrap().ok);
    assert_eq!(task(&list, "http-server").state, State::Idle);
    assert_eq!(task(&list, "quic-listener").kind, Kind::Service);
    // No service map file configured: its watcher has nothing to watch.
    assert_eq!(task(&list, "service-map-watch").state, State::Stopped);
    let reconciler_runs = task(&list, "reconciler").runs;

    // "Run now": the reconcile endpoint activates the reconciler, and its run is recorded.
    let (status, body) = c
        .api(reqwest::Method::POST, "/api/v1/reconcile", None)
        .await;
    assert!(status == 200 || status == 202, "{status} {body}");
    let list = wait_for(
        "an activated reconciler run",
        Duration::from_secs(10),
        || async {
            let t = tasks(&c).await;
            (task(&t, "reconciler").runs > reconciler_runs).then_some(t)
        },
    )
    .await;
    let last = task(&list, "reconciler").last.clone().unwrap();
    assert_eq!(last.trigger, Trigger::Activated, "{last:?}");
    assert!(last.ok, "{last:?}");
    assert!(last.started_at > 1_700_000_000_000);

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
