use super::*;
use nebula_workflows::spec::check;

fn step(kind: &str, with: &str) -> Step {
    let text = format!(
        "workflows:\n  w:\n    steps:\n      - {{ id: s, type: {kind}, node: n, with: {with} }}\n"
    );
    check(&text).unwrap()["w"].steps[0].clone()
}

#[test]
fn exec_arguments_stay_argv_items_and_bad_types_are_refused() {
    let s = step("exec", "{ op: echo }");
    let with = json!({"op": "echo", "args": ["a; rm -rf / #", "$(reboot)", 3]});
    let Start::Job(job) = start(&s, &with, Some("n"), Duration::from_secs(60), &NoRoute).unwrap()
    else {
        panic!("a job")
    };
    assert_eq!(
        job.work,
        Work::Exec {
            op: "echo".into(),
            args: vec!["a; rm -rf / #".into(), "$(reboot)".into(), "3".into()]
        }
    );
    assert_eq!(job.target, Target::Node("n".into()));
    let bad = json!({"op": "echo", "args": [{"x": 1}]});
    assert!(start(&s, &bad, Some("n"), Duration::from_secs(1), &NoRoute)
        .unwrap_err()
        .contains("must be strings"));
    let bad = json!({"op": ["echo"]});
    assert!(start(&s, &bad, Some("n"), Duration::from_secs(1), &NoRoute).is_err());
}

#[test]
fn a_probe_takes_its_timeout_as_text_and_outputs_are_capped() {
    let s = step("service-check", "{ tcp: \"127.0.0.1:1\" }");
    let with = json!({"tcp": "127.0.0.1:1", "timeout": "2s"});
    let Start::Job(job) = start(&s, &with, Some("n"), Duration::from_secs(60), &NoRoute).unwrap()
    else {
        panic!("a job")
    };
    assert!(
        matches!(job.work, Work::Probe { timeout: Some(t), .. } if t == Duration::from_secs(2))
    );
    let big = json!({"x": "y".repeat(MAX_OUTPUTS)});
    assert_eq!(cap(big)["truncated"], json!(true));
    assert!(tail(&"é".repeat(MAX_STDOUT)).len() <= MAX_STDOUT);
}

/// Routing that knows no node.
struct NoRoute;

impl Route for NoRoute {
    fn text(&self, model: &str, _: Option<&str>) -> Result<Routed, String> {
        Err(format!("no online node serves model `{model}`"))
    }
    fn image(&self, _: Option<&str>, _: Option<&str>) -> Result<Routed, String> {
        Err("no image backend".into())
    }
}

/// Routing to one node, which serves one model and one checkpoint.
struct OneNode;

impl Route for OneNode {
    fn text(&self, model: &str, node: Option<&str>) -> Result<Routed, String> {
        match (model, node) {
            ("smollm2", None | Some("gpu")) => Ok(Routed {
                node: "gpu".into(),
                backend: "llama".into(),
                model: "smollm2:135m".into(),
            }),
            _ => Err(format!("nothing serves `{model}` there")),
        }
    }
    fn image(&self, model: Option<&str>, _: Option<&str>) -> Result<Routed, String> {
        Ok(Routed {
            node: "gpu".into(),
            backend: "sd".into(),
            model: model.unwrap_or("v1-5.safetensors").into(),
        })
    }
}

fn routed_step(kind: &str, with: &str) -> Step {
    let text =
        format!("workflows:\n  w:\n    steps:\n      - {{ id: s, type: {kind}, with: {with} }}\n");
    check(&text).unwrap()["w"].steps[0].clone()
}

fn job_of(s: Start) -> NewJob {
    match s {
        Start::Job(j) => *j,
        other => panic!("a job, not {other:?}"),
    }
}

#[test]
fn an_ai_text_step_is_an_infer_job_on_the_routed_node() {
    let s = routed_step("ai-text", "{ model: smollm2, prompt: hi }");
    let with = json!({"model": "smollm2", "system": "Be brief.", "prompt": "Say hi; $(reboot)", "max_tokens": "32", "temperature": 0.2});
    let job = job_of(start(&s, &with, None, Duration::from_secs(60), &OneNode).unwrap());
    assert_eq!(job.target, Target::Node("gpu".into()));
    let Work::Infer {
        backend,
        path,
        body,
        ..
    } = &job.work
    else {
        panic!("an infer job: {:?}", job.work)
    };
    assert_eq!(
        (backend.as_str(), path.as_str()),
        ("llama", "/v1/chat/completions")
    );
    let body: Json = serde_json::from_str(body).unwrap();
    assert_eq!(body["model"], "smollm2:135m");
    assert_eq!(
        body["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(body["messages"][1]["content"], "Say hi; $(reboot)");
    assert_eq!(
        (body["max_tokens"].clone(), body["stream"].clone()),
        (json!(32), json!(false))
    );
    // A model nothing serves, a node that lacks it, bad numbers: refused with the reason.
    let e = start(&s, &with, None, Duration::from_secs(1), &NoRoute).unwrap_err();
    assert!(e.contains("no online node serves model `smollm2`"), "{e}");
    assert!(start(&s, &with, Some("cpu"), Duration::from_secs(1), &OneNode).is_err());
    let hot = json!({"model": "smollm2", "prompt": "x", "temperature": 9});
    assert!(start(&s, &hot, None, Duration::from_secs(1), &OneNode)
        .unwrap_err()
        .contains("temperature"));
    let no_user = json!({"model": "smollm2", "messages": [{"role": "system", "content": "x"}]});
    assert!(start(&s, &no_user, None, Duration::from_secs(1), &OneNode).is_err());
}

#[test]
fn an_ai_image_step_asks_txt2img_for_one_image_of_a_checked_size() {
    let s = routed_step("ai-image", "{ prompt: a lighthouse }");
    let with = json!({"prompt": "a lighthouse", "width": 768, "seed": 7});
    let job = job_of(start(&s, &with, None, Duration::from_secs(60), &OneNode).unwrap());
    let Work::Infer { path, body, .. } = &job.work else {
        panic!("infer")
    };
    assert_eq!(path, "/sdapi/v1/txt2img");
    let body: Json = serde_json::from_str(body).unwrap();
    assert_eq!(
        (
            body["width"].clone(),
            body["height"].clone(),
            body["batch_size"].clone()
        ),
        (json!(768), json!(512), json!(1))
    );
    assert_eq!(
        body["override_settings"]["sd_model_checkpoint"],
        "v1-5.safetensors"
    );
    let huge = json!({"prompt": "x", "width": 100000});
    assert!(start(&s, &huge, None, Duration::from_secs(1), &OneNode).is_err());
}

#[test]
fn an_http_step_sends_maps_as_json_and_checks_the_request() {
    let s = step("http", "{ url: \"http://127.0.0.1:1/\" }");
    let with = json!({"url": "http://127.0.0.1:1/hook", "method": "post", "headers": {"X-Token": "a"}, "body": {"text": "a; b"}});
    let job = job_of(start(&s, &with, Some("n"), Duration::from_secs(60), &NoRoute).unwrap());
    let Work::Http {
        method,
        headers,
        body,
        ..
    } = &job.work
    else {
        panic!("http")
    };
    assert_eq!(method, "POST");
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(headers.get("x-token").map(String::as_str), Some("a"));
    assert_eq!(body.as_deref(), Some(r#"{"text":"a; b"}"#));
    assert!(!job.idempotent, "a POST is not sent twice");
    for bad in [
        json!({"url": "file:///etc/passwd"}),
        json!({"url": "http://x/", "method": "TRACE"}),
        json!({"url": "http://x/", "headers": {"X-A": "a\r\nHost: evil"}}),
        json!({"url": "http://x/", "timeout": "1h"}),
    ] {
        assert!(
            start(&s, &bad, Some("n"), Duration::from_secs(1), &NoRoute).is_err(),
            "{bad}"
        );
    }
}

fn finished(work: Work, output: HttpOutput) -> JobRecord {
    JobRecord {
        id: uuid::Uuid::nil(),
        work,
        target: Target::Node("gpu".into()),
        state: JobState::Succeeded,
        node_id: None,
        node: Some("gpu".into()),
        attempt: 1,
        max_attempts: 1,
        idempotent: true,
        created_by: "t".into(),
        created_at: 0,
        dispatched_at: None,
        started_at: None,
        finished_at: None,
        deadline: None,
        routing: None,
        reason: None,
        exit_code: None,
        error: None,
        output: Some(JobOutput::Http(output)),
        excluded: Vec::new(),
        logs_next: 0,
        key: None,
    }
}

fn http_answer(status: u16, body: &str) -> HttpOutput {
    HttpOutput {
        status,
        content_type: "application/json".into(),
        body: body.as_bytes().to_vec(),
        truncated: false,
        latency_us: 1000,
    }
}

#[test]
fn answers_read_as_outputs_and_what_the_filters_did_is_said() {
    let ai = routed_step("ai-text", "{ model: smollm2, prompt: hi }");
    let work = Work::Noop;
    // As stored once the filters redacted it (the job's end does that).
    let ok = r#"{"model":"smollm2","choices":[{"message":{"role":"assistant","content":"mail [REDACTED:email]"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4},"nebula_filtered":["email"]}"#;
    let Outcome::Succeeded(out) = outcome(&ai, &finished(work.clone(), http_answer(200, ok)), None)
    else {
        panic!("succeeded")
    };
    assert_eq!(out["text"], "mail [REDACTED:email]", "{out}");
    assert_eq!(out["usage"]["completion_tokens"], 4);
    assert_eq!(out["filtered"], json!(["email"]));
    let blocked = r#"{"choices":[{"message":{"role":"assistant","content":""},"finish_reason":"content_filter"}],"nebula_filtered":["private_key"]}"#;
    let Outcome::Failed(why) = outcome(
        &ai,
        &finished(work.clone(), http_answer(200, blocked)),
        None,
    ) else {
        panic!("a blocked answer fails")
    };
    assert!(
        why.contains("blocked") && why.contains("private_key"),
        "{why}"
    );
    let err = r#"{"error":{"message":"model not loaded"}}"#;
    let Outcome::Failed(why) = outcome(&ai, &finished(work.clone(), http_answer(503, err)), None)
    else {
        panic!("failed")
    };
    assert!(
        why.contains("503") && why.contains("model not loaded"),
        "{why}"
    );

    let get = step("http", "{ url: \"http://x/\" }");
    let Outcome::Succeeded(out) = outcome(
        &get,
        &finished(work.clone(), http_answer(200, r#"{"a":[1]}"#)),
        None,
    ) else {
        panic!("succeeded")
    };
    assert_eq!(
        (out["status"].clone(), out["json"]["a"][0].clone()),
        (json!(200), json!(1))
    );
    assert!(matches!(
        outcome(&get, &finished(work.clone(), http_answer(404, "no")), None,),
        Outcome::Failed(_)
    ));
    let lenient = step("http", "{ url: \"http://x/\", fail_on_status: false }");
    assert!(matches!(
        outcome(&lenient, &finished(work, http_answer(404, "no")), None,),
        Outcome::Succeeded(_)
    ));
}

#[test]
fn controller_steps_are_tasks_and_their_parameters_are_checked() {
    let text = "workflows:\n  w:\n    steps:\n      - { id: n, type: notify, with: { sink: ops, message: done } }\n      - { id: d, type: deploy, with: { service: web, action: rollback } }\n      - { id: z, type: sleep, with: { node: pc } }\n";
    let w = &check(text).unwrap()["w"];
    let task = |i: usize, with: Json| match start(
        &w.steps[i],
        &with,
        None,
        Duration::from_secs(1),
        &NoRoute,
    ) {
        Ok(Start::Task(t)) => t,
        other => panic!("a task, not {other:?}"),
    };
    assert_eq!(
        task(0, json!({"sink": "ops", "message": "done"})),
        Task::Notify {
            sink: "ops".into(),
            title: String::new(),
            message: "done".into(),
            severity: "info".into()
        }
    );
    assert_eq!(
        task(1, json!({"service": "web", "action": "rollback"})),
        Task::Deploy {
            service: "web".into(),
            rollback: true,
            revision: None
        }
    );
    assert_eq!(
        task(2, json!({"node": "pc"})),
        Task::Sleep { node: "pc".into() }
    );
    assert!(start(
        &w.steps[1],
        &json!({"service": "web", "action": "nuke"}),
        None,
        Duration::from_secs(1),
        &NoRoute
    )
    .is_err());
    // Literal mistakes are refused when the file is read, with where they are.
    for bad in [
        "      - { id: d, type: deploy, with: { service: web, action: nuke } }\n",
        "      - { id: h, type: http, node: n, with: { url: \"http://x/\", method: TRACE } }\n",
        "      - { id: a, type: ai-text, with: { model: m } }\n",
        "      - { id: a, type: ai-text, selector: { labels: { gpu: \"true\" } }, node: n, with: { model: m, prompt: p } }\n",
        "      - { id: n, type: notify, node: n, with: { sink: ops, message: m } }\n",
    ] {
        let e = check(&format!("workflows:\n  w:\n    steps:\n{bad}")).unwrap_err().to_string();
        assert!(e.contains("4:"), "{bad}: {e}");
    }
}
