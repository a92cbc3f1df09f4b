//! AI agents against a real controller and agent. The model is `common::scripted_llm`, a
//! stand-in that speaks OpenAI's wire format and answers the tool calls the test's questions
//! script: a small real model cannot be relied on to call a given tool with given arguments.
//! Shown: a tool call refused by the agent's tools and one refused by the caller's role, both
//! audited; allowed calls carried out (an allow-listed command on the node, the fleet read); a
//! destructive call that waits for a person; node affinity; the chat API with
//! `model: agent/NAME`; a workflow `agent` step; an ai-text answer redacted by the output
//! filters before it is stored; an http step refused by an agent that did not turn them on.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::scripted_llm::ScriptedLlm;
use crate::common::{join_ready, Controller};
use crate::workflows::{agent_config, controller_with, start, step, wait_run};

const FILE: &str = r#"
agents:
  helper:
    persona: Helper
    system: You help.
    model: scripted
    tools: [read_fleet, exec]
    approval: never
  careful:
    system: You ask first.
    model: scripted
    tools: [exec]
  pinned:
    system: Only on one node.
    model: scripted
    node: elsewhere
workflows:
  consult:
    inputs: { q: {} }
    steps:
      - { id: ask, type: agent, with: { agent: helper, prompt: "${{ inputs.q }}" } }
      - id: say
        type: ai-text
        with: { model: scripted, prompt: "mail bob@example.com: ${{ steps.ask.outputs.text }}" }
  fetch:
    steps:
      - { id: get, type: http, node: box, with: { url: "http://127.0.0.1:9/" } }
"#;

async fn ask(c: &Controller, agent: &str, message: &str) -> (u16, Value) {
    c.api(
        Method::POST,
        &format!("/api/v1/agents/{agent}/ask"),
        Some(json!({ "message": message })),
    )
    .await
}

async fn token(c: &Controller, name: &str, role: &str) -> String {
    let (status, v) = c
        .api(
            Method::POST,
            "/api/v1/api-tokens",
            Some(json!({"name": name, "role": role})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    v["token"].as_str().unwrap().to_owned()
}

async fn agent_calls(c: &Controller) -> Vec<Value> {
    let page = c.get("/api/v1/audit?action=agent.tool&limit=100").await;
    page["items"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_call_tools_within_their_permissions_and_the_callers_role() {
    let llm = ScriptedLlm::start("scripted").await;
    let dir = tempfile::tempdir().unwrap();
    let c = controller_with(dir.path(), FILE).await;
    let config = format!(
        "{}\n[ai]\ndiscover = false\npoll_interval = \"300ms\"\n[[ai.backends]]\nname = \"scripted\"\nkind = \"openai\"\nurl = \"{}\"\n",
        agent_config(dir.path()),
        llm.url
    );
    let (_agent, _) = join_ready(&c, dir.path(), "box", &[], Some(&config)).await;
    crate::ai::wait_model(&c, "scripted", &["box"]).await;
    let marks = dir.path().join("marks.log");
    let marked = || std::fs::read_to_string(&marks).unwrap_or_default();

    // The file's agents and the five built-ins.
    let list = c.get("/api/v1/agents").await;
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    for n in [
        "helper",
        "careful",
        "pinned",
        "jarvis-prime",
        "security-sentinel",
        "creative-director",
        "code-architect",
        "devops-commander",
    ] {
        assert!(names.contains(&n), "{n}: {list}");
    }
    let helper = list
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "helper")
        .unwrap();
    assert_eq!(
        (helper["source"].as_str(), helper["tools"].clone()),
        (Some("file"), json!(["read_fleet", "exec"]))
    );

    // A tool the agent was not given: refused, and the model is told why.
    let (status, r) = ask(&c, "helper", r#"CALL wake {"node":"box"}"#).await;
    assert_eq!(status, 200, "{r}");
    let call = &r["tool_calls"][0];
    assert_eq!(
        (call["tool"].as_str(), call["outcome"].as_str()),
        (Some("wake"), Some("refused")),
        "{r}"
    );
    assert!(
        call["result"]
            .as_str()
            .unwrap()
            .contains("may not use `wake`"),
        "{r}"
    );
    assert!(
        r["text"]
            .as_str()
            .unwrap()
            .starts_with("RESULT: agent `helper` may not use `wake`"),
        "{r}"
    );
    // Only its own tools were offered to the model.
    assert_eq!(
        llm.offered().last().unwrap(),
        &vec!["read_fleet".to_owned(), "exec".to_owned()]
    );

    // An allowed call: the allow-listed command runs on the node, as one argv item.
    let (status, r) = ask(
        &c,
        "helper",
        r#"CALL exec {"node":"box","op":"mark","args":["from agent; rm -rf /"]}"#,
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["tool_calls"][0]["outcome"], "executed", "{r}");
    let result: Value =
        serde_json::from_str(r["tool_calls"][0]["result"].as_str().unwrap()).unwrap();
    assert_eq!(result["succeeded"], true, "{result}");
    assert_eq!(marked(), "from agent; rm -rf /\n");
    assert_eq!(r["node"], "box");

    // The same call by a viewer (through the chat API): refused by the caller's role.
    let viewer = token(&c, "watcher", "viewer").await;
    let resp = c
        .client
        .post(c.url("/v1/chat/completions"))
        .bearer_auth(&viewer)
        .json(&json!({"model": "agent/helper", "messages": [{"role": "user", "content": r#"CALL exec {"node":"box","op":"mark","args":["viewer"]}"#}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert_eq!(v["model"], "agent/helper");
    let call = &v["nebula"]["tool_calls"][0];
    assert_eq!(call["outcome"], "refused", "{v}");
    assert!(
        call["result"].as_str().unwrap().contains("watcher, viewer"),
        "{v}"
    );
    assert!(!marked().contains("viewer"), "nothing ran");

    // A destructive tool of an agent whose approval is `destructive`: not run, the model told.
    let (_, r) = ask(
        &c,
        "careful",
        r#"CALL exec {"node":"box","op":"mark","args":["careful"]}"#,
    )
    .await;
    assert_eq!(r["tool_calls"][0]["outcome"], "needs_approval", "{r}");
    assert!(!marked().contains("careful"));

    // The fleet read, through the chat API as an operator token.
    let op = token(&c, "ops-bot", "operator").await;
    let resp = c
        .client
        .post(c.url("/v1/chat/completions"))
        .bearer_auth(&op)
        .json(&json!({"model": "agent/helper", "messages": [{"role": "user", "content": "CALL read_fleet {}"}]}))
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"));
    assert!(
        text.contains("\"name\":\"box\"") && text.contains("online"),
        "{text}"
    );

    // Node affinity: an agent whose node does not serve its model is not answered elsewhere.
    let (status, r) = ask(&c, "pinned", "hello").await;
    assert_eq!(status, 409, "{r}");
    // An unknown agent is a 404, on both surfaces.
    let (status, _) = ask(&c, "nobody", "hello").await;
    assert_eq!(status, 404);

    // Every call, refused or not, is in the audit log with its outcome and who asked.
    let rows = agent_calls(&c).await;
    let outcomes: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["actor"].as_str().unwrap_or("").to_owned(),
                r["detail"]["tool"].as_str().unwrap_or("").to_owned(),
                r["detail"]["outcome"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    for want in [
        ("admin", "wake", "refused"),
        ("admin", "exec", "executed"),
        ("watcher", "exec", "refused"),
        ("admin", "exec", "needs_approval"),
        ("ops-bot", "read_fleet", "executed"),
    ] {
        assert!(
            outcomes
                .iter()
                .any(|(a, t, o)| (a.as_str(), t.as_str(), o.as_str()) == want),
            "{want:?} in {outcomes:?}"
        );
    }

    // A workflow's agent step, then an ai-text step whose answer the filters redact before it
    // is stored.
    let (status, run) = start(&c, "consult", json!({"q": "CALL read_fleet {}"})).await;
    assert_eq!(status, 201, "{run}");
    let done = wait_run(
        &c,
        run["id"].as_str().unwrap(),
        &["succeeded", "failed"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let asked = &step(&done, "ask")["outputs"];
    assert!(
        asked["text"].as_str().unwrap().starts_with("RESULT: "),
        "{asked}"
    );
    assert_eq!(asked["tool_calls"][0]["outcome"], "executed");
    let said = &step(&done, "say")["outputs"];
    let text = said["text"].as_str().unwrap();
    assert!(
        text.starts_with("ECHO: mail ") && !text.contains("bob@example.com"),
        "{said}"
    );
    assert!(said["filtered"].to_string().contains("email"), "{said}");
    let job = c
        .get(&format!("/api/v1/jobs/{}", said["job"].as_str().unwrap()))
        .await;
    // The model's answer as stored (the request is the run's own words, kept as given).
    let answer = job["output"].to_string();
    assert!(
        !answer.contains("bob@example.com") && answer.contains("[REDACTED:email]"),
        "the stored answer is redacted: {job}"
    );

    // This agent did not turn on http jobs: the step fails and says how.
    let (_, run) = start(&c, "fetch", json!({})).await;
    let failed = wait_run(
        &c,
        run["id"].as_str().unwrap(),
        &["succeeded", "failed"],
        Duration::from_secs(30),
    )
    .await;
    let err = step(&failed, "get")["error"].as_str().unwrap().to_owned();
    assert!(err.contains("[jobs] http = true"), "{err}");
}
