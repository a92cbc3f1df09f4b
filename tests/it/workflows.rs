//! Workflows against a real controller and agent: a DAG that fans out and in with a retry and
//! an input full of shell metacharacters, a controller killed mid-run, approvals, timeouts,
//! every concurrency policy, and definitions refused without harm.

use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{join_ready, wait_for, Controller, ControllerOpts};

/// An agent whose allow-list has: `say` (prints each argument on its own line, after a second),
/// `flaky` (fails the first time, then succeeds), `mark NAME` (appends NAME to a log, for
/// counting runs), `slow-mark NAME` (the same after 3 seconds).
pub(crate) fn agent_config(dir: &Path) -> String {
    let marks = dir.join("marks.log");
    let flag = dir.join("flaky.flag");
    format!(
        r#"
[exec.commands.say]
argv = ["sh", "-c", "sleep 1; for a in \"$@\"; do printf '%s\n' \"$a\"; done", "say"]
accept_args = true

[exec.commands.flaky]
argv = ["sh", "-c", "if [ -e {flag} ]; then echo recovered; else touch {flag}; echo first try fails; exit 3; fi"]

[exec.commands.mark]
argv = ["sh", "-c", "echo \"$1\" >> {marks}; echo marked \"$1\"", "mark"]
accept_args = true

[exec.commands.slow-mark]
argv = ["sh", "-c", "sleep 3; echo \"$1\" >> {marks}; echo marked \"$1\"", "slow-mark"]
accept_args = true
"#,
        flag = flag.display(),
        marks = marks.display(),
    )
}

pub(crate) async fn controller_with(dir: &Path, workflows: &str) -> Controller {
    let file = dir.join("workflows.yml");
    std::fs::write(&file, workflows).unwrap();
    let c = Controller::start(ControllerOpts {
        extra: vec![
            "--workflows",
            Box::leak(file.display().to_string().into_boxed_str()),
        ],
        ..Default::default()
    })
    .await;
    // The file is read by a task of its own once the controller runs.
    let names: Vec<String> = nebula_workflows::spec::check(workflows)
        .unwrap()
        .into_keys()
        .collect();
    for _ in 0..100 {
        let listed = c.get("/api/v1/workflows").await.to_string();
        if names
            .iter()
            .all(|n| listed.contains(&format!("\"name\":\"{n}\"")))
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("workflows.yml was not loaded: {}", c.proc.output());
}

pub(crate) async fn start(c: &Controller, name: &str, inputs: Value) -> (u16, Value) {
    c.api(
        Method::POST,
        &format!("/api/v1/workflows/{name}/runs"),
        Some(json!({ "inputs": inputs })),
    )
    .await
}

async fn run_of(c: &Controller, id: &str) -> Value {
    c.get(&format!("/api/v1/workflow-runs/{id}")).await
}

pub(crate) fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {run}"))
}

/// Wait until the run is in one of `states`.
pub(crate) async fn wait_run(
    c: &Controller,
    id: &str,
    states: &[&str],
    timeout: Duration,
) -> Value {
    let states: Vec<String> = states.iter().map(|s| s.to_string()).collect();
    wait_for(&format!("run {id} in {states:?}"), timeout, || async {
        let r = run_of(c, id).await;
        states
            .contains(&r["state"].as_str()?.to_owned())
            .then_some(r)
    })
    .await
}

async fn wait_step(c: &Controller, id: &str, step_id: &str, state: &str) -> Value {
    wait_for(
        &format!("step {step_id} of {id} {state}"),
        Duration::from_secs(30),
        || async {
            let r = run_of(c, id).await;
            (step(&r, step_id)["state"] == state).then_some(r)
        },
    )
    .await
}

fn ms(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("a time, not {v}"));
    humantime::parse_rfc3339_weak(s)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

const FAN: &str = r#"
workflows:
  fan:
    description: fan out, retry, fan in
    inputs:
      payload: {}
    steps:
      - id: start
        type: exec
        node: box
        with: { op: mark, args: [start] }
      - id: left
        type: exec
        node: box
        needs: [start]
        with: { op: say, args: ["${{ inputs.payload }}"] }
      - id: right
        type: exec
        node: box
        needs: [start]
        with: { op: flaky }
        retry: { attempts: 3, backoff: 200ms }
      - id: join
        type: exec
        node: box
        needs: [left, right]
        with: { op: mark, args: ["join after ${{ steps.right.attempt }} tries"] }
      - id: rescue
        type: noop
        node: box
        needs: [join]
        if: "${{ failure() }}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dag_fans_out_retries_and_fans_in_and_inputs_stay_one_argument() {
    let dir = tempfile::tempdir().unwrap();
    let c = controller_with(dir.path(), FAN).await;
    let (_agent, _) = join_ready(&c, dir.path(), "box", &[], Some(&agent_config(dir.path()))).await;
    let pwned = dir.path().join("pwned");
    let payload = format!(
        "x'; touch {p}; echo \"$(touch {p})\" `touch {p}` && rm -rf / #",
        p = pwned.display()
    );
    let (status, run) = start(&c, "fan", json!({ "payload": payload })).await;
    assert_eq!(status, 201, "{run}");
    let id = run["id"].as_str().unwrap().to_owned();
    let done = wait_run(&c, &id, &["succeeded", "failed"], Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done:#}");

    // The input reached the command as one argument, printed, never run.
    let left = step(&done, "left");
    assert_eq!(left["outputs"]["stdout"], format!("{payload}\n"), "{left}");
    assert!(!pwned.exists(), "the payload was executed");

    // Fan-out: both branches started once `start` ended, and `right` (retried once) ran while
    // `left` (a second long) was still running; `join` waited for both.
    let right = step(&done, "right");
    assert_eq!(right["attempt"], 2, "{right}");
    let start_end = ms(&step(&done, "start")["finished_at"]);
    assert!(ms(&left["started_at"]) >= start_end);
    assert!(
        ms(&right["finished_at"]) < ms(&left["finished_at"]),
        "{done:#}"
    );
    let join = step(&done, "join");
    assert!(ms(&join["started_at"]) >= ms(&left["finished_at"]).max(ms(&right["finished_at"])));
    assert_eq!(join["outputs"]["stdout"], "marked join after 2 tries\n");
    assert_eq!(step(&done, "rescue")["state"], "skipped");

    // Each step's job carries the key of its run, step and attempt.
    let job = c
        .get(&format!("/api/v1/jobs/{}", right["job"].as_str().unwrap()))
        .await;
    assert_eq!(job["key"], format!("{id}/right/2"));
    let marks = std::fs::read_to_string(dir.path().join("marks.log")).unwrap();
    assert_eq!(marks, "start\njoin after 2 tries\n");

    // The CLI shows the same run.
    let out = c.cli(&["workflow", "show", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("succeeded") && text.contains("rescue"),
        "{text}"
    );
    let audit = c.get("/api/v1/audit?action=workflow.run").await;
    assert!(audit.to_string().contains(&id), "{audit}");
}

const DURABLE: &str = r#"
workflows:
  durable:
    steps:
      - { id: first, type: exec, node: box, with: { op: mark, args: [first] } }
      - { id: long, type: exec, node: box, with: { op: slow-mark, args: [long] } }
      - { id: gate, type: approval, with: { message: "ship it?" } }
      - { id: last, type: exec, node: box, with: { op: mark, args: [last] } }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_continues_after_a_controller_kill_without_running_a_step_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller_with(dir.path(), DURABLE).await;
    let (_agent, _) = join_ready(&c, dir.path(), "box", &[], Some(&agent_config(dir.path()))).await;
    let (status, run) = start(&c, "durable", json!({})).await;
    assert_eq!(status, 201, "{run}");
    let id = run["id"].as_str().unwrap().to_owned();
    wait_step(&c, &id, "long", "running").await;
    // kill -9 while `long` runs on the agent.
    c.restart_hard().await;
    let r = wait_step(&c, &id, "gate", "approval").await;
    assert_eq!(step(&r, "gate")["outputs"]["message"], "ship it?");
    // Approving a step that does not wait is refused; this one is approved from the API.
    let (status, body) = c
        .api(
            Method::POST,
            &format!("/api/v1/workflow-runs/{id}/approve"),
            Some(json!({"step": "last"})),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = c
        .api(
            Method::POST,
            &format!("/api/v1/workflow-runs/{id}/approve"),
            Some(json!({"step": "gate", "comment": "go"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let done = wait_run(&c, &id, &["succeeded", "failed"], Duration::from_secs(30)).await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    assert_eq!(step(&done, "gate")["outputs"]["by"], "admin");
    for s in ["first", "long", "last"] {
        assert_eq!(step(&done, s)["attempt"], 1, "{s}: {done:#}");
    }
    let marks = std::fs::read_to_string(dir.path().join("marks.log")).unwrap();
    assert_eq!(marks, "first\nlong\nlast\n", "each step ran exactly once");
}

const POLICIES: &str = r#"
workflows:
  forbid:
    inputs: { k: {} }
    concurrency: { group: "f-${{ inputs.k }}", policy: forbid }
    steps: [{ id: hold, type: approval }]
  replace:
    concurrency: { group: r, policy: replace }
    steps: [{ id: hold, type: approval }]
  queue:
    concurrency: { group: q, policy: queue }
    steps: [{ id: hold, type: approval }]
  allow:
    concurrency: { group: a }
    steps: [{ id: hold, type: approval }]
  expire:
    steps:
      - { id: hold, type: approval, timeout: 1s }
      - { id: after, type: approval, if: "${{ failure() }}" }
"#;

async fn approve(c: &Controller, id: &str, approve: bool) -> (u16, Value) {
    c.api(
        Method::POST,
        &format!("/api/v1/workflow-runs/{id}/approve"),
        Some(json!({"step": "hold", "approve": approve})),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_concurrency_policy_approvals_and_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let c = controller_with(dir.path(), POLICIES).await;
    let id = |v: &Value| v["id"].as_str().unwrap().to_owned();

    // forbid: a second run of the same group is refused; another group is not.
    let (s, f1) = start(&c, "forbid", json!({"k": 1})).await;
    assert_eq!((s, f1["state"].as_str()), (201, Some("running")), "{f1}");
    let (s, refused) = start(&c, "forbid", json!({"k": 1})).await;
    assert_eq!(s, 409, "{refused}");
    assert!(refused.to_string().contains("f-1"), "{refused}");
    let (s, _) = start(&c, "forbid", json!({"k": 2})).await;
    assert_eq!(s, 201);

    // replace: the open run is cancelled, the new one runs.
    let (_, r1) = start(&c, "replace", json!({})).await;
    let (_, r2) = start(&c, "replace", json!({})).await;
    assert_eq!(r2["state"], "running");
    let r1 = wait_run(&c, &id(&r1), &["cancelled"], Duration::from_secs(10)).await;
    assert_eq!(step(&r1, "hold")["state"], "cancelled", "{r1:#}");

    // queue: one waits; a newer one takes its place; it starts when the group frees.
    let (_, q1) = start(&c, "queue", json!({})).await;
    let (_, q2) = start(&c, "queue", json!({})).await;
    let (_, q3) = start(&c, "queue", json!({})).await;
    assert_eq!(
        (
            q1["state"].as_str(),
            q2["state"].as_str(),
            q3["state"].as_str()
        ),
        (Some("running"), Some("queued"), Some("queued"))
    );
    wait_run(&c, &id(&q2), &["cancelled"], Duration::from_secs(10)).await;
    assert_eq!(approve(&c, &id(&q1), true).await.0, 200);
    wait_run(&c, &id(&q1), &["succeeded"], Duration::from_secs(10)).await;
    wait_step(&c, &id(&q3), "hold", "approval").await;
    // A rejection fails the step and the run.
    assert_eq!(approve(&c, &id(&q3), false).await.0, 200);
    let q3 = wait_run(&c, &id(&q3), &["failed"], Duration::from_secs(10)).await;
    assert!(step(&q3, "hold")["error"]
        .as_str()
        .unwrap()
        .contains("rejected by admin"));

    // allow: both run.
    let (_, a1) = start(&c, "allow", json!({})).await;
    let (_, a2) = start(&c, "allow", json!({})).await;
    assert_eq!(
        (a1["state"].as_str(), a2["state"].as_str()),
        (Some("running"), Some("running"))
    );

    // A step's timeout: nobody decides within a second.
    let (_, e) = start(&c, "expire", json!({})).await;
    let e = wait_step(&c, &id(&e), "after", "approval").await;
    assert_eq!(step(&e, "hold")["state"], "timed_out", "{e:#}");
    let started = ms(&step(&e, "hold")["started_at"]);
    let ended = ms(&step(&e, "hold")["finished_at"]);
    assert!((1000..3000).contains(&(ended - started)), "{e:#}");

    // Cancel from the CLI.
    let out = c.cli(&["workflow", "cancel", &id(&a1)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_run(&c, &id(&a1), &["cancelled"], Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_definitions_and_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = controller_with(dir.path(), POLICIES).await;
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|w| w["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let before = names(&c.get("/api/v1/workflows").await);
    assert_eq!(
        before,
        vec!["allow", "expire", "forbid", "queue", "replace"]
    );

    // A broken file: refused, the last good set stays.
    std::fs::write(
        dir.path().join("workflows.yml"),
        "workflows:\n  w:\n    steps:\n      - { id: a, type: noop, node: x, needs: [ghost] }\n",
    )
    .unwrap();
    wait_for("the refusal logged", Duration::from_secs(10), || async {
        c.proc
            .output()
            .contains("workflows.yml refused")
            .then_some(())
    })
    .await;
    assert!(
        c.proc.output().contains("workflows.yml: 4:"),
        "{}",
        c.proc.output()
    );
    assert_eq!(names(&c.get("/api/v1/workflows").await), before);

    // Through the API: located errors, no overwriting the file's, a good one stored.
    let c = &c;
    let put = |name: &str, text: &str| {
        let body = json!({"definition": text});
        let path = format!("/api/v1/workflows/{name}");
        async move { c.api(Method::PUT, &path, Some(body)).await }
    };
    let (s, e) = put(
        "new",
        "steps:\n  - { id: a, type: exec, node: x, with: { op: \"${{ inputs.nope }}\" } }\n",
    )
    .await;
    assert_eq!(s, 400, "{e}");
    assert!(
        e.to_string().contains("2:") && e.to_string().contains("not an input"),
        "{e}"
    );
    let (s, e) = put("queue", "steps: [{ id: a, type: noop, node: x }]").await;
    assert_eq!(s, 409, "{e}");
    let (s, w) = put("new", "steps: [{ id: a, type: approval }]").await;
    assert_eq!((s, w["source"].as_str()), (200, Some("api")), "{w}");

    // Runs: unknown workflow, unknown or missing inputs, malformed bodies.
    assert_eq!(start(c, "ghost", json!({})).await.0, 404);
    let (s, e) = start(c, "forbid", json!({})).await;
    assert_eq!(s, 400, "{e}");
    assert!(e.to_string().contains("`k` is required"), "{e}");
    assert_eq!(start(c, "allow", json!({"colour": 1})).await.0, 400);
    let (s, _) = c
        .api(
            Method::POST,
            "/api/v1/workflows/allow/runs",
            Some(json!({"inputs": [1]})),
        )
        .await;
    assert_eq!(s, 422);
    let (s, _) = c
        .api(Method::GET, "/api/v1/workflow-runs/not-a-uuid", None)
        .await;
    assert_eq!(s, 400);
    let (s, _) = c
        .api(
            Method::POST,
            &format!("/api/v1/workflow-runs/{}/cancel", uuid::Uuid::now_v7()),
            None,
        )
        .await;
    assert_eq!(s, 404);
    let runs = c.get("/api/v1/workflow-runs").await;
    assert_eq!(
        runs.as_array().unwrap().len(),
        0,
        "nothing was started: {runs}"
    );
}

fn hook_workflow() -> &'static str {
    r#"
workflows:
  hook:
    inputs:
      ref: {}
    on:
      webhook:
        scheme: github
        secret: hook_secret
        inputs: { ref: "${{ trigger.body.ref }}" }
    steps:
      - { id: echo, type: exec, node: box, with: { op: say, args: ["${{ inputs.ref }}"] } }
"#
}

/// A GitHub delivery of `body`, signed with `secret`.
async fn deliver(c: &Controller, secret: &str, id: &str, body: &str) -> (u16, Value) {
    use ring::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let sig = format!(
        "sha256={}",
        hex::encode(hmac::sign(&key, body.as_bytes()).as_ref())
    );
    let resp = c
        .client
        .post(c.url("/hooks/workflows/hook"))
        .header("X-Hub-Signature-256", sig)
        .header("X-GitHub-Delivery", id)
        .header("X-GitHub-Event", "push")
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_webhook_starts_one_run_and_its_body_stays_data() {
    let dir = tempfile::tempdir().unwrap();
    let c = controller_with(dir.path(), hook_workflow()).await;
    let (_agent, _) = join_ready(&c, dir.path(), "box", &[], Some(&agent_config(dir.path()))).await;
    let (s, _) = c
        .api(
            Method::PUT,
            "/api/v1/secrets/hook_secret",
            Some(json!({"value": "s3cret"})),
        )
        .await;
    assert!((200..300).contains(&s));
    let pwned = dir.path().join("pwned");
    let evil = format!(
        "main; touch {p} $(touch {p}) `touch {p}` | sh",
        p = pwned.display()
    );
    let body = json!({"ref": evil, "after": "abc"}).to_string();

    // A bad signature starts nothing and is audited.
    let (s, e) = deliver(&c, "not-the-secret", "d-1", &body).await;
    assert_eq!(s, 403, "{e}");
    wait_for("the refusal audited", Duration::from_secs(10), || async {
        let audit = c.get("/api/v1/audit?action=workflow.webhook_refused").await;
        audit.to_string().contains("does not match").then_some(())
    })
    .await;

    let (s, first) = deliver(&c, "s3cret", "d-1", &body).await;
    assert_eq!(s, 202, "{first}");
    let run = first["run"].as_str().unwrap().to_owned();
    // GitHub redelivers the same delivery id: nothing new starts.
    let (s, again) = deliver(&c, "s3cret", "d-1", &body).await;
    assert_eq!(
        (s, again["duplicate"].as_bool()),
        (200, Some(true)),
        "{again}"
    );
    assert_eq!(again["run"], first["run"]);

    let done = wait_run(&c, &run, &["succeeded", "failed"], Duration::from_secs(30)).await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    assert_eq!(done["trigger"]["kind"], "webhook");
    assert_eq!(done["trigger"]["headers"]["x-github-event"], "push");
    assert_eq!(
        step(&done, "echo")["outputs"]["stdout"],
        format!("{evil}\n")
    );
    assert!(!pwned.exists(), "the body was executed");
    let runs = c.get("/api/v1/workflow-runs?workflow=hook").await;
    assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_container_on_the_engine_starts_an_event_workflow() {
    use crate::common::docker;
    let containers = docker::Containers::new();
    let dir = tempfile::tempdir().unwrap();
    let victim = format!(
        "wf-victim-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let workflows = format!(
        r#"
workflows:
  on-exit:
    inputs:
      name: {{}}
    on:
      events:
        - on: container-changed
          if: "trigger.event.name == '{victim}' and trigger.event.state == 'exited'"
          inputs: {{ name: "${{{{ trigger.event.name }}}}" }}
    steps:
      - {{ id: note, type: exec, node: box, with: {{ op: mark, args: ["${{{{ inputs.name }}}} exited"] }} }}
"#
    );
    let c = controller_with(dir.path(), &workflows).await;
    let (_agent, _) = join_ready(&c, dir.path(), "box", &[], Some(&agent_config(dir.path()))).await;
    containers.run(&victim, &[docker::IMAGE, "sleep", "600"]);
    // Seen running first (no run for that), then killed.
    wait_for(
        "the container in the fleet's view",
        Duration::from_secs(30),
        || async {
            let v = c.get("/api/v1/containers").await;
            v.to_string().contains(&victim).then_some(())
        },
    )
    .await;
    docker::docker(&["kill", &victim]);
    let mut run = Value::Null;
    for _ in 0..80 {
        let runs = c.get("/api/v1/workflow-runs?workflow=on-exit").await;
        if let Some(r) = runs.as_array().and_then(|a| a.first()) {
            run = r.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!run.is_null(), "no run: {}", c.proc.output());
    let id = run["id"].as_str().unwrap().to_owned();
    let done = wait_run(&c, &id, &["succeeded", "failed"], Duration::from_secs(30)).await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    assert_eq!(done["trigger"]["event_kind"], "container-changed");
    assert_eq!(done["created_by"], "event:container-changed");
    let marks = std::fs::read_to_string(dir.path().join("marks.log")).unwrap();
    assert_eq!(marks, format!("{victim} exited\n"));
    let runs = c.get("/api/v1/workflow-runs?workflow=on-exit").await;
    assert_eq!(
        runs.as_array().unwrap().len(),
        1,
        "one event, one run: {runs}"
    );
}

const GATED: &str = r#"
workflows:
  gated:
    description: ask, then go
    inputs:
      what: { default: "the thing" }
    steps:
      - { id: ask, type: approval, with: { message: "ship ${{ inputs.what }}?" } }
      - { id: ship, type: approval, needs: [ask] }
      - { id: tidy, type: approval, needs: [ask] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_starts_a_run_draws_its_graph_live_and_takes_a_decision() {
    use crate::dashboard_http::{csrf_of, first_admin_password, session_pair, sign_in};
    let dir = tempfile::tempdir().unwrap();
    let c = controller_with(dir.path(), GATED).await;
    let admin = session_pair(
        &sign_in(&c, "admin", &first_admin_password(&c).await, false)
            .await
            .unwrap(),
    );
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |path: String| {
        let (http, url, cookie) = (http.clone(), c.url(&path), admin.clone());
        async move {
            let resp = http.get(url).header("cookie", cookie).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{path}");
            resp.text().await.unwrap()
        }
    };
    let list = get("/ui/workflows".into()).await;
    assert!(
        list.contains("id=\"wf-gated\"") && list.contains("ask, then go"),
        "{list}"
    );
    let resp = http
        .post(c.url("/ui/workflows/gated/run"))
        .header("cookie", &admin)
        .form(&[("csrf", csrf_of(&list).as_str()), ("input.what", "v2")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let at = resp.headers()["location"].to_str().unwrap().to_owned();
    let id = at.rsplit('/').next().unwrap().to_owned();
    wait_step(&c, &id, "ask", "approval").await;

    // The live stream sends the run's section; the graph has a box per step by state.
    let mut sse = crate::common::Sse::new(
        http.get(c.url(&format!("/ui/workflows/runs/{id}/events")))
            .header("cookie", &admin)
            .send()
            .await
            .unwrap(),
    );
    let (kind, first) = sse.next(Duration::from_secs(10)).await.expect("a fragment");
    assert_eq!(kind, "fragment");
    assert!(
        first.contains("<svg") && first.contains("id=\"step-ask\" data-state=\"approval\""),
        "{first}"
    );
    assert!(
        first.contains("id=\"step-ship\" data-state=\"pending\""),
        "{first}"
    );
    assert!(
        first.contains("ship v2?"),
        "the message rendered from the input: {first}"
    );

    let page = get(at.clone()).await;
    let resp = http
        .post(c.url(&format!("/ui/workflows/runs/{id}/decide")))
        .header("cookie", &admin)
        .form(&[
            ("csrf", csrf_of(&page).as_str()),
            ("step", "ask"),
            ("approve", "true"),
            ("comment", "looks fine"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    // The stream follows: `ask` succeeded, both branches now wait.
    let mut seen = String::new();
    for _ in 0..10 {
        let Some((_, frag)) = sse.next(Duration::from_secs(10)).await else {
            break;
        };
        seen = frag;
        if seen.contains("id=\"step-ship\" data-state=\"approval\"")
            && seen.contains("id=\"step-tidy\" data-state=\"approval\"")
        {
            break;
        }
    }
    assert!(
        seen.contains("id=\"step-ask\" data-state=\"succeeded\""),
        "{seen}"
    );
    assert!(
        seen.contains("id=\"step-tidy\" data-state=\"approval\""),
        "{seen}"
    );
    let run = run_of(&c, &id).await;
    assert_eq!(step(&run, "ask")["outputs"]["comment"], "looks fine");
    wait_for("the decision audited", Duration::from_secs(10), || async {
        let audit = c.get("/api/v1/audit?action=workflow.approve").await;
        audit.to_string().contains("dashboard").then_some(())
    })
    .await;
}

const REACH: &str = r#"
workflows:
  reach:
    inputs: { url: {}, note: {} }
    steps:
      - id: ask
        type: http
        node: box
        with:
          url: "${{ inputs.url }}/echo"
          method: post
          headers: { x-run: "${{ run.id }}" }
          body: { note: "${{ inputs.note }}" }
      - id: think
        type: ai-text
        with:
          model: smol
          system: Answer in one short sentence.
          prompt: "Say hello to ${{ steps.ask.outputs.json.name }}."
          max_tokens: 12
      - id: tell
        type: notify
        with:
          sink: ops
          title: "Run ${{ run.id }}"
          message: "${{ steps.think.outputs.text }}"
  lost:
    steps:
      - { id: think, type: ai-text, with: { model: nothing-serves-this, prompt: hi } }
  slow:
    steps:
      - { id: tell, type: notify, with: { sink: slow, message: "once, by its id" } }
  missing:
    inputs: { url: {} }
    steps:
      - { id: ask, type: http, node: box, with: { url: "${{ inputs.url }}/nowhere" } }
      - { id: tell, type: notify, with: { sink: no-such-sink, message: x } }
"#;

/// What the test's HTTP server got: (path, headers as `name: value` lines, body).
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>;

/// An HTTP server on 127.0.0.1: `POST /echo` answers `{"name": "nebula", "got": BODY}`,
/// `POST /hook` (a webhook sink) answers 200; both record what they got; anything else is 404.
async fn http_server() -> (String, Seen) {
    use axum::response::IntoResponse as _;
    let seen: Seen = Default::default();
    let record = seen.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
            let record = record.clone();
            async move {
                let head: String = headers
                    .iter()
                    .map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap_or("")))
                    .collect();
                record
                    .lock()
                    .unwrap()
                    .push((uri.path().to_owned(), head, body.clone()));
                match uri.path() {
                    "/echo" => {
                        let got: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                        axum::Json(json!({"name": "nebula", "got": got})).into_response()
                    }
                    "/hook" => axum::http::StatusCode::OK.into_response(),
                    "/slow-hook" => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        axum::http::StatusCode::OK.into_response()
                    }
                    _ => (axum::http::StatusCode::NOT_FOUND, "no such page").into_response(),
                }
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

/// An http step from a node, an ai-text step on the real llama.cpp backend (routed by the
/// gateway, as an ordinary job), and a notify step through a webhook sink; a model nothing
/// serves, a 404 and an unknown sink fail their runs with the reason; a notification under
/// way when the controller is killed is sent again under the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_call_a_url_a_real_model_and_a_sink() {
    let (_llama, llama_url) = crate::ai::llama_server("smol").await;
    let (url, seen) = http_server().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller_with(dir.path(), REACH).await;
    let config = format!(
        "[jobs]\nhttp = true\n[ai]\ndiscover = false\npoll_interval = \"300ms\"\n[[ai.backends]]\nname = \"llama\"\nkind = \"openai\"\nurl = \"{llama_url}\"\n"
    );
    let (_agent, _) = join_ready(&c, dir.path(), "box", &[], Some(&config)).await;
    crate::ai::wait_model(&c, "smol", &["box"]).await;
    let (status, body) = c
        .api(
            Method::POST,
            "/api/v1/alerts/sinks",
            Some(json!({"name": "ops", "kind": "webhook", "url": format!("{url}/hook")})),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    let note = "it's $(touch /tmp/pwned); rm -rf / `id` \"quoted\"";
    let (status, run) = start(&c, "reach", json!({"url": url, "note": note})).await;
    assert_eq!(status, 201, "{run}");
    let id = run["id"].as_str().unwrap().to_owned();
    let done = wait_run(&c, &id, &["succeeded", "failed"], Duration::from_secs(120)).await;
    assert_eq!(done["state"], "succeeded", "{done:#}");

    // The request went from the node with the rendered header, the body as JSON data.
    let ask = &step(&done, "ask")["outputs"];
    assert_eq!(ask["status"], 200, "{ask}");
    assert_eq!(ask["json"]["got"]["note"], note, "{ask}");
    assert_eq!(ask["node"], "box");
    let echo = seen
        .lock()
        .unwrap()
        .iter()
        .find(|(p, _, _)| p == "/echo")
        .cloned()
        .unwrap();
    assert!(echo.1.contains(&format!("x-run: {id}\n")), "{}", echo.1);
    assert!(
        echo.1.contains("content-type: application/json\n"),
        "{}",
        echo.1
    );
    assert!(!Path::new("/tmp/pwned").exists());

    // The model answered through an infer job on the node that serves it.
    let think = &step(&done, "think")["outputs"];
    let text = think["text"].as_str().unwrap_or_else(|| panic!("{think}"));
    assert!(!text.is_empty(), "{think}");
    assert_eq!(think["node"], "box");
    assert!(
        think["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{think}"
    );
    let job = c
        .get(&format!("/api/v1/jobs/{}", think["job"].as_str().unwrap()))
        .await;
    assert_eq!(job["work"]["kind"], "infer", "{job}");
    assert_eq!(job["work"]["backend"], "llama", "{job}");

    // The sink got the model's words, under an id made from the run, step and attempt.
    let hook = seen
        .lock()
        .unwrap()
        .iter()
        .find(|(p, _, _)| p == "/hook")
        .cloned()
        .unwrap();
    let msg: Value = serde_json::from_str(&hook.2).unwrap();
    assert_eq!(msg["type"], "workflow.notify", "{msg}");
    assert_eq!(msg["data"]["text"], text, "{msg}");
    assert_eq!(msg["data"]["title"], format!("Run {id}"), "{msg}");
    let simple = id.replace('-', "");
    assert!(
        hook.1
            .contains(&format!("webhook-id: msg_{simple}_tell_1\n")),
        "{}",
        hook.1
    );
    let tell = &step(&done, "tell")["outputs"];
    assert_eq!(tell["message_id"], format!("msg_{simple}_tell_1"));

    // A model nothing serves: the step fails with the reason, no job is made.
    let (_, run) = start(&c, "lost", json!({})).await;
    let lost = wait_run(
        &c,
        run["id"].as_str().unwrap(),
        &["succeeded", "failed"],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(lost["state"], "failed");
    let err = step(&lost, "think")["error"].as_str().unwrap().to_owned();
    assert!(
        err.contains("no online node serves model `nothing-serves-this`"),
        "{err}"
    );
    assert!(step(&lost, "think")["job"].is_null(), "{lost:#}");

    // A 404 fails the http step with the answer; what needs it is skipped.
    let (_, run) = start(&c, "missing", json!({"url": url})).await;
    let missing = wait_run(
        &c,
        run["id"].as_str().unwrap(),
        &["succeeded", "failed"],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(missing["state"], "failed");
    let err = step(&missing, "ask")["error"].as_str().unwrap().to_owned();
    assert!(err.contains("404") && err.contains("no such page"), "{err}");
    assert_eq!(step(&missing, "tell")["state"], "skipped");

    // The audit names the notification with its run.
    let audit = c
        .get("/api/v1/audit?action=workflow.notify")
        .await
        .to_string();
    assert!(audit.contains(&id), "{audit}");

    // kill -9 while a notification is being delivered: the step goes on after the restart
    // and sends it again under the same id (a receiver that dedupes sees it once).
    let (status, body) = c
        .api(
            Method::POST,
            "/api/v1/alerts/sinks",
            Some(json!({"name": "slow", "kind": "webhook", "url": format!("{url}/slow-hook")})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (_, run) = start(&c, "slow", json!({})).await;
    let slow_id = run["id"].as_str().unwrap().to_owned();
    let slow = || {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p == "/slow-hook")
            .map(|(_, h, _)| {
                h.lines()
                    .find(|l| l.starts_with("webhook-id:"))
                    .unwrap_or("")
                    .to_owned()
            })
            .collect::<Vec<_>>()
    };
    wait_for(
        "the slow sink to be called",
        Duration::from_secs(20),
        || async { (!slow().is_empty()).then_some(()) },
    )
    .await;
    c.restart_hard().await;
    let done = wait_run(
        &c,
        &slow_id,
        &["succeeded", "failed"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let ids = slow();
    assert!(ids.len() >= 2, "sent again after the restart: {ids:?}");
    assert!(ids.iter().all(|i| i == &ids[0]), "under one id: {ids:?}");
}

const SHIP: &str = r#"
workflows:
  ship:
    inputs: { service: {} }
    steps:
      - { id: up, type: deploy, with: { service: "${{ inputs.service }}" } }
      - { id: back, type: deploy, with: { service: "${{ inputs.service }}", action: rollback } }
      - { id: nap, type: sleep, with: { node: box } }
  nowhere:
    steps:
      - { id: up, type: deploy, with: { service: not-declared } }
"#;

fn ship_map(v: u32) -> String {
    format!(
        "version: 1\nnodes:\n  box:\n    sleep: nap\nservices:\n  tick:\n    image: {}\n    command: sleep 3600\n    env: {{ V: \"{v}\" }}\n    placement: {{ node: box }}\n",
        crate::common::docker::IMAGE
    )
}

async fn serving(c: &Controller, service: &str, revision: Option<&str>) -> Value {
    wait_for(
        &format!("{service} converged"),
        Duration::from_secs(60),
        || async {
            let list = c.get("/api/v1/services").await;
            let s = list
                .as_array()?
                .iter()
                .find(|s| s["name"] == service)?
                .clone();
            let at = revision.is_none_or(|r| s["revision"] == r);
            (s["status"] == "converged" && s["running"] == s["replicas"] && at).then_some(s)
        },
    )
    .await
}

/// A deploy step on the real Docker Engine waits for its service; a rollback step pins the
/// revision before and waits until it runs; a sleep step runs the node's sleep command once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_rollback_and_sleep_steps_act_on_the_fleet() {
    crate::common::docker::ensure_image();
    // Declared first: removes the service's containers after the agent has stopped.
    let cleanup = crate::common::docker::Managed::default();
    let dir = tempfile::tempdir().unwrap();
    let c = controller_with(dir.path(), SHIP).await;
    let config = format!(
        "{}\n[exec.commands.nap]\nargv = [\"sh\", \"-c\", \"echo nap >> {}\"]\n",
        agent_config(dir.path()),
        dir.path().join("marks.log").display()
    );
    let (_agent, node_id) = join_ready(&c, dir.path(), "box", &[], Some(&config)).await;
    cleanup.add(&node_id);
    let (status, body) = c.put_map(&ship_map(1)).await;
    assert_eq!(status, 200, "{body}");
    let v1 = serving(&c, "tick", None).await["revision"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = c.put_map(&ship_map(2)).await;
    assert_eq!(status, 200, "{body}");
    let v2 = wait_for("v2 wanted", Duration::from_secs(10), || async {
        let s = serving(&c, "tick", None).await;
        (s["revision"] != v1.as_str()).then(|| s["revision"].as_str().unwrap().to_owned())
    })
    .await;

    let (status, run) = start(&c, "ship", json!({"service": "tick"})).await;
    assert_eq!(status, 201, "{run}");
    let id = run["id"].as_str().unwrap().to_owned();
    let done = wait_run(&c, &id, &["succeeded", "failed"], Duration::from_secs(120)).await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    assert_eq!(
        step(&done, "up")["outputs"]["revision"],
        v2.as_str(),
        "{done:#}"
    );
    let back = &step(&done, "back")["outputs"];
    assert_eq!(
        (back["revision"].as_str(), back["rolled_back"].as_bool()),
        (Some(v1.as_str()), Some(true)),
        "{back}"
    );
    // The service runs the revision before, pinned over the map's.
    let s = serving(&c, "tick", Some(&v1)).await;
    assert_eq!(s["pinned_over"], v2.as_str(), "{s}");
    let marks = std::fs::read_to_string(dir.path().join("marks.log")).unwrap();
    assert_eq!(marks, "nap\n", "the sleep command ran once");
    let audit = c.get("/api/v1/audit?limit=200").await.to_string();
    assert!(
        audit.contains("service.rollback") || audit.contains("rollback"),
        "{audit}"
    );
    assert!(
        audit.contains("node.sleep") && audit.contains(&id),
        "{audit}"
    );

    // A service the map does not declare fails the step with the reason.
    let (_, run) = start(&c, "nowhere", json!({})).await;
    let failed = wait_run(
        &c,
        run["id"].as_str().unwrap(),
        &["succeeded", "failed"],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(failed["state"], "failed");
    let err = step(&failed, "up")["error"].as_str().unwrap().to_owned();
    assert!(err.contains("no service named `not-declared`"), "{err}");
}
