//! The store suite, run against both backends: an embedded SQLite file and a real PostgreSQL
//! server (started by `scripts/test`, URL in `NEBULA_TEST_POSTGRES_URL`). In CI a missing
//! PostgreSQL fails the suite; it never passes by skipping.

use std::time::SystemTime;

use nebula_protocol::{Labels, NodeFacts};
use nebula_store::{millis, CertRecord, EnrollError, Enrollment, NewJoinToken, Store};
use sqlx::Connection;
use uuid::Uuid;

async fn sqlite() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    (Store::connect(&url).await.unwrap(), dir)
}

/// A fresh database on the test PostgreSQL server, dropped when the guard goes.
struct PgDb {
    admin_url: String,
    name: String,
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Best effort; a fresh runtime because Drop is sync.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut c) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut c)
                        .await;
                }
            });
        })
        .join();
    }
}

async fn postgres() -> Option<(Store, PgDb)> {
    let Ok(admin_url) = std::env::var("NEBULA_TEST_POSTGRES_URL") else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("NEBULA_TEST_POSTGRES_URL is not set: CI must run the store suite on PostgreSQL (use scripts/test)");
        }
        eprintln!(
            "NEBULA_TEST_POSTGRES_URL not set: skipping the PostgreSQL half (scripts/test sets it)"
        );
        return None;
    };
    let name = format!("nebula_t_{}", Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("connect to the test PostgreSQL server");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let (base, _) = admin_url.rsplit_once('/').expect("URL has a database part");
    let store = Store::connect(&format!("{base}/{name}")).await.unwrap();
    Some((store, PgDb { admin_url, name }))
}

/// Run one suite function on both backends.
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                let (s, _d) = super::sqlite().await;
                super::$name(&s).await;
            }
            #[tokio::test]
            async fn postgres() {
                if let Some((s, _db)) = super::postgres().await {
                    super::$name(&s).await;
                    s.close().await;
                }
            }
        }
    };
}

fn now() -> i64 {
    millis(SystemTime::now())
}

async fn token(s: &Store, id: &str, uses: Option<i64>, expires_at: Option<i64>, labels: &Labels) {
    s.create_join_token(&NewJoinToken {
        id,
        secret_hash: "hash",
        description: "test",
        labels,
        created_by: "tester",
        expires_at,
        uses_left: uses,
    })
    .await
    .unwrap();
}

fn enrollment<'a>(
    token_id: &'a str,
    secret_hash: &'a str,
    name: &'a str,
    labels: &'a Labels,
    facts: &'a NodeFacts,
) -> Enrollment<'a> {
    let node_id = Uuid::now_v7();
    Enrollment {
        token_id,
        secret_hash,
        node_id,
        name,
        requested_labels: labels,
        facts,
        cert: CertRecord {
            serial: format!("{:032x}", Uuid::new_v4().as_u128()),
            node_id,
            not_before: now(),
            not_after: now() + 60_000,
            issued_at: now(),
            revoked_at: None,
        },
        now: now(),
    }
}

async fn enroll_consumes_token_and_merges_labels(s: &Store) {
    let token_labels = Labels::from([("zone".into(), "home".into())]);
    token(s, "t1", Some(1), None, &token_labels).await;
    let asked = Labels::from([
        ("zone".into(), "cloud".into()),
        ("gpu".into(), "yes".into()),
    ]);
    let facts = NodeFacts {
        hostname: "h1".into(),
        cpu_count: 8,
        ..Default::default()
    };
    let e = enrollment("t1", "hash", "node-1", &asked, &facts);
    let labels = s.enroll(&e).await.unwrap();
    assert_eq!(
        labels.get("zone").map(String::as_str),
        Some("home"),
        "token labels win"
    );
    assert_eq!(labels.get("gpu").map(String::as_str), Some("yes"));

    let node = s.node_by_name("node-1").await.unwrap().unwrap();
    assert_eq!(node.id, e.node_id);
    assert_eq!(node.labels, labels);
    assert_eq!(node.facts.cpu_count, 8);
    assert_eq!(node.cert_not_after, Some(e.cert.not_after));
    assert_eq!(
        s.node_by_id(e.node_id).await.unwrap().unwrap().name,
        "node-1"
    );

    let t = s.join_token("t1").await.unwrap().unwrap();
    assert_eq!(t.uses_left, Some(0));
    assert_eq!(t.uses, 1);
    // Used up: the second enrollment is refused and changes nothing.
    let e2 = enrollment("t1", "hash", "node-2", &asked, &facts);
    assert!(matches!(s.enroll(&e2).await, Err(EnrollError::Exhausted)));
    assert!(s.node_by_name("node-2").await.unwrap().is_none());
    assert!(s.certificate(&e2.cert.serial).await.unwrap().is_none());
}
both!(enroll_consumes_token_and_merges_labels);

async fn enroll_refusals_are_specific_and_change_nothing(s: &Store) {
    let facts = NodeFacts::default();
    let l = Labels::new();
    token(s, "exp", None, Some(now() - 1000), &l).await;
    token(s, "rev", None, None, &l).await;
    token(s, "ok", None, None, &l).await;
    assert!(s.revoke_join_token("rev").await.unwrap());
    assert!(
        !s.revoke_join_token("rev").await.unwrap(),
        "second revoke finds nothing"
    );
    assert!(matches!(
        s.enroll(&enrollment("nope", "hash", "a", &l, &facts)).await,
        Err(EnrollError::UnknownToken)
    ));
    assert!(matches!(
        s.enroll(&enrollment("ok", "wrong", "a", &l, &facts)).await,
        Err(EnrollError::UnknownToken)
    ));
    assert!(matches!(
        s.enroll(&enrollment("exp", "hash", "a", &l, &facts)).await,
        Err(EnrollError::Expired)
    ));
    assert!(matches!(
        s.enroll(&enrollment("rev", "hash", "a", &l, &facts)).await,
        Err(EnrollError::Revoked)
    ));
    s.enroll(&enrollment("ok", "hash", "a", &l, &facts))
        .await
        .unwrap();
    // Same name again: refused, and the token use is not consumed.
    assert!(matches!(
        s.enroll(&enrollment("ok", "hash", "a", &l, &facts)).await,
        Err(EnrollError::NameTaken(_))
    ));
    assert_eq!(s.join_token("ok").await.unwrap().unwrap().uses, 1);
    assert_eq!(s.list_nodes().await.unwrap().len(), 1);
    let tokens = s.list_join_tokens().await.unwrap();
    assert_eq!(tokens.len(), 3);
    assert!(tokens
        .iter()
        .any(|t| t.id == "rev" && t.revoked_at.is_some()));
}
both!(enroll_refusals_are_specific_and_change_nothing);

async fn concurrent_enrollments_never_overspend_a_token(s: &Store) {
    let l = Labels::new();
    token(s, "race", Some(3), None, &l).await;
    let facts = NodeFacts::default();
    let names: Vec<String> = (0..10).map(|i| format!("racer-{i}")).collect();
    let mut tasks = Vec::new();
    for name in &names {
        let s = s.clone();
        let name = name.clone();
        let facts = facts.clone();
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            let e = enrollment("race", "hash", &name, &l, &facts);
            s.enroll(&e).await.is_ok()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap() {
            ok += 1;
        }
    }
    assert_eq!(ok, 3, "exactly the token's uses succeed");
    assert_eq!(s.list_nodes().await.unwrap().len(), 3);
    assert_eq!(
        s.join_token("race").await.unwrap().unwrap().uses_left,
        Some(0)
    );
}
both!(concurrent_enrollments_never_overspend_a_token);

async fn remove_node_revokes_certificates_and_forgets_labels(s: &Store) {
    let l = Labels::from([("a".into(), "b".into())]);
    token(s, "t", None, None, &Labels::new()).await;
    let facts = NodeFacts::default();
    let e = enrollment("t", "hash", "gone", &l, &facts);
    s.enroll(&e).await.unwrap();
    let renewed = CertRecord {
        serial: "01ff".into(),
        node_id: e.node_id,
        not_before: now(),
        not_after: now() + 120_000,
        issued_at: now(),
        revoked_at: None,
    };
    s.add_certificate(&renewed).await.unwrap();
    assert_eq!(
        s.node_by_name("gone")
            .await
            .unwrap()
            .unwrap()
            .cert_not_after,
        Some(renewed.not_after),
        "newest certificate's expiry is shown"
    );
    s.record_session(
        e.node_id,
        &NodeFacts {
            hostname: "new".into(),
            ..Default::default()
        },
        "9.9.9",
        Some("r1"),
        now(),
    )
    .await
    .unwrap();
    assert_eq!(
        s.sessions_by_replica().await.unwrap(),
        vec![("r1".to_owned(), 1)]
    );
    s.touch_last_seen(e.node_id, Some("r0"), now())
        .await
        .unwrap();
    assert_eq!(
        s.sessions_by_replica().await.unwrap().len(),
        1,
        "another replica's session ended: the owner stays"
    );
    s.touch_last_seen(e.node_id, Some("r1"), now())
        .await
        .unwrap();
    assert!(s.sessions_by_replica().await.unwrap().is_empty());
    let n = s.node_by_id(e.node_id).await.unwrap().unwrap();
    assert_eq!(n.agent_version, "9.9.9");
    assert_eq!(n.facts.hostname, "new");
    assert!(n.last_seen_at.is_some());

    assert_eq!(s.remove_node("gone", now()).await.unwrap(), Some(e.node_id));
    assert_eq!(s.remove_node("gone", now()).await.unwrap(), None);
    assert!(s.node_by_name("gone").await.unwrap().is_none());
    for serial in [&e.cert.serial, &renewed.serial] {
        let c = s.certificate(serial).await.unwrap().unwrap();
        assert!(c.revoked_at.is_some(), "{serial} revoked");
    }
    // The name is free again.
    s.enroll(&enrollment("t", "hash", "gone", &l, &facts))
        .await
        .unwrap();
}
both!(remove_node_revokes_certificates_and_forgets_labels);

async fn api_tokens_are_stored_hashed_and_replaceable(s: &Store) {
    assert_eq!(s.api_token_count().await.unwrap(), 0);
    s.upsert_api_token("admin", "h1", "admin").await.unwrap();
    s.upsert_api_token("ci", "h2", "viewer").await.unwrap();
    assert_eq!(s.api_token_count().await.unwrap(), 2);
    assert_eq!(
        s.api_token_by_hash("h1").await.unwrap().unwrap().role,
        "admin"
    );
    // Replacing admin's secret drops the old hash.
    s.upsert_api_token("admin", "h3", "admin").await.unwrap();
    assert!(s.api_token_by_hash("h1").await.unwrap().is_none());
    assert_eq!(
        s.api_token_by_hash("h3").await.unwrap().unwrap().name,
        "admin"
    );
    assert_eq!(s.api_token_count().await.unwrap(), 2);
}
both!(api_tokens_are_stored_hashed_and_replaceable);

#[tokio::test]
async fn sqlite_reopen_keeps_data_and_rejects_bad_urls() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    let s = Store::connect(&url).await.unwrap();
    s.upsert_api_token("admin", "h", "admin").await.unwrap();
    s.close().await;
    let s = Store::connect(&url).await.unwrap();
    assert_eq!(s.api_token_count().await.unwrap(), 1);
    assert!(Store::connect("mysql://x").await.is_err());
}

async fn rollups_round_trip_and_expire(s: &Store) {
    use nebula_store::Rollup;
    let node_id = Uuid::now_v7();
    let base = now() / 60_000 * 60_000;
    let mk = |minute: i64, gpu: bool| Rollup {
        node_id,
        minute,
        samples: 12,
        cpu: (12.5, 40.0),
        mem_used: (1.5e9, 2e9),
        load1: (0.5, 1.25),
        net_rx: (1000.0, 5000.0),
        net_tx: (10.0, 50.0),
        gpu_util: gpu.then_some((55.0, 99.0)),
        gpu_mem_used: gpu.then_some((8e9, 9e9)),
        gpu_temp: gpu.then_some((60.0, 71.0)),
        containers_running: 19.5,
    };
    // More than one batch (50 rows per statement), with and without GPU figures.
    let rows: Vec<Rollup> = (0..120)
        .map(|i| mk(base - i * 60_000, i % 2 == 0))
        .collect();
    s.insert_rollups(&rows).await.unwrap();
    // Writing a minute again keeps the first (a retried batch cannot duplicate rows).
    s.insert_rollups(&rows[..3]).await.unwrap();
    let back = s.rollups(node_id, 0).await.unwrap();
    assert_eq!(back.len(), 120);
    assert!(
        back.windows(2).all(|w| w[0].minute < w[1].minute),
        "oldest first"
    );
    let newest = back.last().unwrap();
    assert_eq!(newest, &rows[0]);
    assert_eq!(back[back.len() - 2].gpu_util, None);
    // Since filters.
    assert_eq!(
        s.rollups(node_id, base - 9 * 60_000).await.unwrap().len(),
        10
    );
    // Retention: delete everything older than an hour.
    let gone = s
        .delete_rollups_before(None, base - 60 * 60_000 + 1)
        .await
        .unwrap();
    assert_eq!(gone, 60);
    assert_eq!(s.rollups(node_id, 0).await.unwrap().len(), 60);
}
both!(rollups_round_trip_and_expire);

fn job(n: u32, node: &str) -> nebula_types::jobs::JobRecord {
    use nebula_types::jobs::{JobRecord, JobState, Target, Work};
    JobRecord {
        id: Uuid::now_v7(),
        work: Work::Exec {
            op: "git-pull".into(),
            args: vec![format!("/srv/app{n}")],
        },
        target: Target::Node(node.into()),
        state: JobState::Queued,
        node_id: None,
        node: None,
        attempt: 1,
        max_attempts: 3,
        idempotent: n.is_multiple_of(2),
        created_by: "admin".into(),
        created_at: now(),
        dispatched_at: None,
        started_at: None,
        finished_at: None,
        deadline: Some(now() + 60_000),
        routing: None,
        reason: Some("waiting".into()),
        exit_code: None,
        error: None,
        output: None,
        excluded: Vec::new(),
        logs_next: 0,
        key: None,
    }
}

async fn jobs_logs_and_audit_round_trip(s: &Store) {
    use nebula_protocol::jobs::{JobOutput, ProbeOutput};
    use nebula_store::jobs::{AuditFilter, JobBatch, JobFilter};
    use nebula_types::jobs::{AuditRecord, JobLogLine, JobState};
    // 70 jobs in one batch (more than one multi-row statement on either backend).
    let mut jobs: Vec<_> = (0..70)
        .map(|n| job(n, if n < 40 { "a" } else { "b" }))
        .collect();
    let audit: Vec<AuditRecord> = jobs
        .iter()
        .map(|j| AuditRecord {
            id: Uuid::now_v7(),
            at: now(),
            actor: "admin".into(),
            action: "job.create".into(),
            target: j.id.to_string(),
            detail: serde_json::json!({"work": j.work}),
        })
        .collect();
    s.write_job_batch(&JobBatch {
        jobs: jobs.clone(),
        logs: Vec::new(),
        audit,
    })
    .await
    .unwrap();
    assert_eq!(s.active_jobs().await.unwrap().len(), 70);
    // Updates: one finishes with output and logs, one is lost.
    let done = &mut jobs[3];
    done.state = JobState::Succeeded;
    done.node = Some("a".into());
    done.node_id = Some(Uuid::now_v7());
    done.exit_code = Some(0);
    done.finished_at = Some(now());
    done.logs_next = 3;
    done.output = Some(JobOutput::Probe(ProbeOutput {
        ok: true,
        status: Some(200),
        latency_us: 1234,
        error: None,
    }));
    let lost = &mut jobs[50];
    lost.state = JobState::Lost;
    lost.node = Some("b".into());
    lost.excluded = vec![Uuid::now_v7()];
    let logs: Vec<(Uuid, JobLogLine)> = (0..3)
        .map(|seq| {
            (
                jobs[3].id,
                JobLogLine {
                    attempt: 1,
                    seq,
                    at: now(),
                    stream: "stdout".into(),
                    line: format!("line {seq} with 'quotes' and ünïcode"),
                },
            )
        })
        .collect();
    s.write_job_batch(&JobBatch {
        jobs: vec![jobs[3].clone(), jobs[50].clone()],
        logs: logs.clone(),
        audit: Vec::new(),
    })
    .await
    .unwrap();
    assert_eq!(s.job(jobs[3].id).await.unwrap().as_ref(), Some(&jobs[3]));
    assert_eq!(s.job(jobs[50].id).await.unwrap().as_ref(), Some(&jobs[50]));
    assert_eq!(s.active_jobs().await.unwrap().len(), 68);
    // A line written twice (a redelivery) is kept once.
    s.write_job_batch(&JobBatch {
        jobs: Vec::new(),
        logs: logs[..1].to_vec(),
        audit: Vec::new(),
    })
    .await
    .unwrap();
    let stored = s.job_logs(jobs[3].id, None, 100).await.unwrap();
    assert_eq!(
        stored,
        logs.iter().map(|(_, l)| l.clone()).collect::<Vec<_>>()
    );
    assert_eq!(
        s.job_logs(jobs[3].id, Some((1, 0)), 100)
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(s.next_log_seq(jobs[3].id, 1).await.unwrap(), 3);
    assert_eq!(s.next_log_seq(jobs[4].id, 1).await.unwrap(), 0);
    // A NUL byte (PostgreSQL's TEXT refuses it) is stored as U+FFFD instead of failing the batch.
    let mut nul = jobs[5].clone();
    nul.error = Some("bad\0byte".into());
    s.write_job_batch(&JobBatch {
        jobs: vec![nul],
        logs: vec![(
            jobs[5].id,
            JobLogLine {
                attempt: 1,
                seq: 0,
                at: now(),
                stream: "stdout".into(),
                line: "a\0b".into(),
            },
        )],
        audit: Vec::new(),
    })
    .await
    .unwrap();
    assert_eq!(
        s.job_logs(jobs[5].id, None, 10).await.unwrap()[0].line,
        "a\u{FFFD}b"
    );
    assert_eq!(
        s.job(jobs[5].id).await.unwrap().unwrap().error.as_deref(),
        Some("bad\u{FFFD}byte")
    );
    // Filters and pages, newest first.
    let f = |state, node: Option<&str>, before, limit| JobFilter {
        state,
        node: node.map(str::to_owned),
        kind: None,
        created_by: None,
        before,
        limit,
    };
    assert_eq!(
        s.list_jobs(&f(Some(JobState::Succeeded), None, None, 10))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        s.list_jobs(&f(None, Some("b"), None, 100))
            .await
            .unwrap()
            .len(),
        1
    );
    let page1 = s.list_jobs(&f(None, None, None, 30)).await.unwrap();
    assert_eq!(page1[0].id, jobs[69].id);
    let page2 = s
        .list_jobs(&f(None, None, Some(page1[29].id), 100))
        .await
        .unwrap();
    assert_eq!(page1.len() + page2.len(), 70);
    assert!(page2.iter().all(|j| j.id < page1[29].id));
    let audit = s
        .list_audit(&AuditFilter {
            actor: Some("admin".into()),
            action: Some("job.create".into()),
            before: None,
            via: None,
            limit: 100,
        })
        .await
        .unwrap();
    assert_eq!(audit.len(), 70);
    assert_eq!(audit[0].target, jobs[69].id.to_string());
    assert_eq!(audit[0].detail["work"]["kind"], "exec");
}
both!(jobs_logs_and_audit_round_trip);

async fn desired_state_history_and_pins_round_trip(s: &Store) {
    use nebula_store::desired::{DeploymentRecord, PinRecord};
    assert!(s.latest_desired().await.unwrap().is_none());
    let v1 = s
        .insert_desired("services: {}\n", "d1", "api", "admin", now())
        .await
        .unwrap();
    let v2 = s
        .insert_desired(
            "services:\n  web:\n    image: x\n",
            "d2",
            "file:/etc/map.yml",
            "file",
            now() + 1,
        )
        .await
        .unwrap();
    assert_eq!((v1.version, v2.version), (1, 2), "versions count up");
    let latest = s.latest_desired().await.unwrap().unwrap();
    assert_eq!(latest, v2);

    let node = uuid::Uuid::now_v7();
    let d = DeploymentRecord {
        id: uuid::Uuid::now_v7(),
        service: "web".into(),
        node_id: node,
        node: "alpha".into(),
        action: "update".into(),
        revision: "aaaa11112222".into(),
        previous: vec!["bbbb11112222".into()],
        spec: r#"{"image":"x"}"#.into(),
        trigger: "desired state applied".into(),
        outcome: "running".into(),
        message: None,
        job_id: Some(uuid::Uuid::now_v7()),
        desired_version: Some(2),
        started_at: now(),
        finished_at: None,
    };
    s.insert_deployment(&d).await.unwrap();
    assert_eq!(s.unfinished_deployments().await.unwrap(), vec![d.clone()]);
    s.finish_deployment(
        d.id,
        "rolled-back",
        Some("GET /healthz: HTTP 404"),
        &d.previous,
        now() + 5,
    )
    .await
    .unwrap();
    assert!(s.unfinished_deployments().await.unwrap().is_empty());
    let other = DeploymentRecord {
        id: uuid::Uuid::now_v7(),
        service: "db".into(),
        revision: "cccc11112222".into(),
        previous: vec![],
        started_at: now() + 10,
        ..d.clone()
    };
    s.insert_deployment(&other).await.unwrap();
    let web = s.deployments(Some("web"), 10).await.unwrap();
    assert_eq!(web.len(), 1);
    assert_eq!(web[0].outcome, "rolled-back");
    assert_eq!(web[0].message.as_deref(), Some("GET /healthz: HTTP 404"));
    assert_eq!(web[0].previous, vec!["bbbb11112222".to_string()]);
    let all = s.deployments(None, 10).await.unwrap();
    assert_eq!(all[0].service, "db", "newest first");
    assert_eq!(s.revision_specs().await.unwrap().len(), 2);
    s.delete_deployment(other.id).await.unwrap();
    assert_eq!(s.deployments(None, 10).await.unwrap().len(), 1);

    let pin = PinRecord {
        service: "web".into(),
        revision: "bbbb11112222".into(),
        spec: r#"{"image":"old"}"#.into(),
        base_revision: "aaaa11112222".into(),
        created_by: "admin".into(),
        created_at: now(),
    };
    s.set_pin(&pin).await.unwrap();
    let again = PinRecord {
        revision: "dddd11112222".into(),
        ..pin.clone()
    };
    s.set_pin(&again).await.unwrap();
    assert_eq!(s.pins().await.unwrap(), vec![again], "one pin per service");
    s.delete_pin("web").await.unwrap();
    assert!(s.pins().await.unwrap().is_empty());
}
both!(desired_state_history_and_pins_round_trip);

async fn ai_usage_adds_up_per_token_model_and_node(s: &Store) {
    use nebula_store::UsageRow;
    let row = |token: &str, model: &str, node: &str, n: i64| UsageRow {
        token: token.into(),
        model: model.into(),
        node: node.into(),
        requests: n,
        prompt_tokens: 10 * n,
        completion_tokens: 100 * n,
    };
    assert!(s.ai_usage().await.unwrap().is_empty());
    s.add_ai_usage(&[
        row("app", "llama3", "gpu-1", 2),
        row("app", "llama3", "gpu-2", 1),
    ])
    .await
    .unwrap();
    // A second batch adds to the same key and creates another.
    s.add_ai_usage(&[
        row("app", "llama3", "gpu-1", 3),
        row("bob", "qwen", "gpu-1", 1),
    ])
    .await
    .unwrap();
    assert_eq!(
        s.ai_usage().await.unwrap(),
        vec![
            row("app", "llama3", "gpu-1", 5),
            row("app", "llama3", "gpu-2", 1),
            row("bob", "qwen", "gpu-1", 1),
        ]
    );
    s.add_ai_usage(&[]).await.unwrap();
    assert_eq!(s.ai_usage().await.unwrap().len(), 3);
}
both!(ai_usage_adds_up_per_token_model_and_node);

async fn alert_steps_outbox_sinks_and_silences(s: &Store) {
    use nebula_store::alerts::{OutboxRecord, SilenceRecord, SinkRecord};
    assert_eq!(s.alert_engine().await.unwrap(), None);
    let t = now();
    let note = |id: &str, at: i64| OutboxRecord {
        id: id.into(),
        sink: "ops".into(),
        payload: format!("{{\"n\":\"{id}\"}}"),
        state: "pending".into(),
        attempts: 0,
        next_at: at,
        last_error: None,
        created_at: at,
        sent_at: None,
    };
    // The state and its notifications land together.
    s.save_alert_step(None, "{\"v\":1}", &[note("a", t), note("b", t + 1)], t)
        .await
        .unwrap();
    s.save_alert_step(None, "{\"v\":2}", &[], t + 2)
        .await
        .unwrap();
    assert_eq!(
        s.alert_engine().await.unwrap().as_deref(),
        Some("{\"v\":2}")
    );
    // A duplicate notification id fails the whole step: the state stays as it was.
    assert!(s
        .save_alert_step(None, "{\"v\":3}", &[note("a", t)], t + 3)
        .await
        .is_err());
    assert_eq!(
        s.alert_engine().await.unwrap().as_deref(),
        Some("{\"v\":2}")
    );
    let due = s.due_outbox(t + 1, 10).await.unwrap();
    assert_eq!(
        due.iter().map(|o| o.id.as_str()).collect::<Vec<_>>(),
        vec!["a", "b"]
    );
    assert_eq!(s.due_outbox(t, 10).await.unwrap().len(), 1);
    s.outbox_attempt("a", "sent", t, None, t + 5).await.unwrap();
    s.outbox_attempt("b", "pending", t + 60_000, Some("HTTP 500"), t + 5)
        .await
        .unwrap();
    assert!(s.due_outbox(t + 10, 10).await.unwrap().is_empty());
    let history = s.outbox(10).await.unwrap();
    let a = history.iter().find(|o| o.id == "a").unwrap();
    assert_eq!(
        (a.state.as_str(), a.attempts, a.sent_at),
        ("sent", 1, Some(t + 5))
    );
    let b = history.iter().find(|o| o.id == "b").unwrap();
    assert_eq!(
        (b.attempts, b.last_error.as_deref(), b.sent_at),
        (1, Some("HTTP 500"), None)
    );

    let sink = SinkRecord {
        name: "ops".into(),
        kind: "webhook".into(),
        url: "http://127.0.0.1:9/hook".into(),
        secret: "whsec_c2VjcmV0".into(),
        min_severity: "warning".into(),
        filters: "{}".into(),
        created_by: "ana".into(),
        created_at: t,
    };
    s.put_sink(&sink).await.unwrap();
    s.put_sink(&SinkRecord {
        min_severity: "critical".into(),
        filters: "{\"nodes\":[\"a\"]}".into(),
        ..sink.clone()
    })
    .await
    .unwrap();
    let sinks = s.sinks().await.unwrap();
    assert_eq!(sinks.len(), 1);
    assert_eq!(sinks[0].min_severity, "critical");
    assert_eq!(sinks[0].filters, "{\"nodes\":[\"a\"]}");
    assert!(s.delete_sink("ops").await.unwrap());
    assert!(!s.delete_sink("ops").await.unwrap());

    let silence = SilenceRecord {
        id: "s1".into(),
        matchers: "[{\"label\":\"node\",\"value\":\"a\"}]".into(),
        starts_at: t,
        ends_at: t + 3_600_000,
        created_by: "ana".into(),
        comment: "maintenance".into(),
        created_at: t,
    };
    s.add_silence(&silence).await.unwrap();
    assert_eq!(s.silences(t).await.unwrap(), vec![silence.clone()]);
    assert!(s.expire_silence("s1", t + 10).await.unwrap());
    assert!(!s.expire_silence("s1", t + 20).await.unwrap());
    assert!(s.silences(t + 10).await.unwrap().is_empty());
}
both!(alert_steps_outbox_sinks_and_silences);

both!(workflows_runs_and_step_attempts_round_trip);
async fn workflows_runs_and_step_attempts_round_trip(s: &Store) {
    use nebula_store::workflows::{RunRecord, StepRecord, WorkflowDefRecord};
    let def = |name: &str, source: &str| WorkflowDefRecord {
        name: name.into(),
        source: source.into(),
        definition: format!("{{\"name\":\"{name}\"}}"),
        updated_by: "admin".into(),
        updated_at: now(),
    };
    use nebula_store::workflows::Defs;
    s.put_workflow_def(&def("by-api", "api")).await.unwrap();
    s.put_def(Defs::Agents, &def("helper", "api"))
        .await
        .unwrap();
    s.replace_file_workflows(&[def("a", "file"), def("b", "file")], &[def("ops", "file")])
        .await
        .unwrap();
    s.replace_file_workflows(&[def("b", "file"), def("c", "file")], &[])
        .await
        .unwrap();
    let agents: Vec<String> = s
        .defs(Defs::Agents)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(agents, vec!["helper"], "the file's agents go with the file");
    assert!(s.def(Defs::Agents, "helper").await.unwrap().is_some());
    assert!(s.delete_def(Defs::Agents, "helper").await.unwrap());
    assert!(s.def(Defs::Agents, "helper").await.unwrap().is_none());
    let names: Vec<String> = s
        .workflow_defs()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(
        names,
        vec!["b", "by-api", "c"],
        "the file's set replaces the file's set only"
    );
    assert!(s.delete_workflow_def("by-api").await.unwrap());
    assert!(!s.delete_workflow_def("by-api").await.unwrap());

    let run = |state: &str| RunRecord {
        id: Uuid::now_v7(),
        workflow: "b".into(),
        definition: "{}".into(),
        state: state.into(),
        inputs: "{}".into(),
        trigger: "{\"kind\":\"manual\"}".into(),
        group: Some("g".into()),
        cancelled: false,
        created_by: "admin".into(),
        created_role: "admin".into(),
        created_at: now(),
        started_at: None,
        finished_at: None,
        error: None,
    };
    let (open, mut done) = (run("running"), run("succeeded"));
    let job = Uuid::now_v7();
    let step = |run_id: Uuid, attempt: u32, state: &str| StepRecord {
        run_id,
        step: "probe".into(),
        attempt,
        state: state.into(),
        job_id: Some(job),
        outputs: None,
        error: None,
        not_before: None,
        started_at: Some(now()),
        finished_at: None,
    };
    s.save_workflow_changes(
        None,
        &[open.clone(), done.clone()],
        &[step(open.id, 1, "running"), step(done.id, 1, "succeeded")],
    )
    .await
    .unwrap();
    // The first attempt failed and waits; the second runs.
    let mut failed = step(open.id, 1, "waiting");
    failed.error = Some("exit 1".into());
    failed.not_before = Some(now() + 1000);
    done.finished_at = Some(now());
    let second = step(open.id, 2, "running");
    s.save_workflow_changes(None, &[done.clone()], &[failed.clone(), second.clone()])
        .await
        .unwrap();
    let (runs, steps) = s.open_workflow_runs().await.unwrap();
    assert_eq!(runs, vec![open.clone()]);
    assert_eq!(steps, vec![failed, second]);
    assert_eq!(s.workflow_run(done.id).await.unwrap(), Some(done.clone()));
    let listed = s.workflow_runs(Some("b"), 10).await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![done.id, open.id]
    );
    assert!(s.workflow_runs(Some("zzz"), 10).await.unwrap().is_empty());
    assert_eq!(s.workflow_steps(done.id).await.unwrap().len(), 1);
}

async fn monitors_and_their_hours_add_up(s: &Store) {
    use nebula_store::monitors::{HourRollup, MonitorRecord};
    let m = MonitorRecord {
        name: "nas".into(),
        spec: "{\"http\":\"http://nas.home/\",\"nodes\":[\"a\"]}".into(),
        created_by: "ana".into(),
        created_at: now(),
    };
    s.put_monitor(&m).await.unwrap();
    s.put_monitor(&MonitorRecord {
        created_by: "bo".into(),
        ..m.clone()
    })
    .await
    .unwrap();
    let all = s.monitors().await.unwrap();
    assert_eq!((all.len(), all[0].created_by.as_str()), (1, "bo"));
    let h = |hour, checks, up, max| HourRollup {
        hour,
        checks,
        up,
        latency_sum_us: checks * 1000,
        latency_max_us: max,
    };
    // 450 rows: more than one statement's worth.
    let mut rows: Vec<_> = (0..450)
        .map(|i| (format!("m{i}"), "a".to_string(), h(100, 2, 1, 1500)))
        .collect();
    rows.push(("nas".into(), "a".into(), h(100, 2, 2, 900)));
    s.add_monitor_hours(&rows).await.unwrap();
    s.add_monitor_hours(&[
        ("nas".into(), "a".into(), h(100, 3, 1, 700)),
        ("nas".into(), "b".into(), h(101, 1, 0, 5000)),
        ("nas".into(), "a".into(), h(90, 1, 1, 5000)),
    ])
    .await
    .unwrap();
    let got = s.monitor_hours(95).await.unwrap();
    assert_eq!(got.len(), 452);
    let nas: Vec<_> = got.iter().filter(|(m, _, _)| m == "nas").collect();
    assert_eq!(nas[0].1, "a");
    assert_eq!(
        nas[0].2,
        HourRollup {
            hour: 100,
            checks: 5,
            up: 3,
            latency_sum_us: 5000,
            latency_max_us: 900
        },
        "counts add up, the maximum stays the maximum"
    );
    assert_eq!((nas[1].1.as_str(), nas[1].2.hour), ("b", 101));
    assert_eq!(s.prune_monitor_hours(100).await.unwrap(), 1);
    assert!(s.delete_monitor("nas").await.unwrap());
    assert!(s.monitors().await.unwrap().is_empty());
}
both!(monitors_and_their_hours_add_up);

/// Writers at the same time (map applies reading the next version, rollups, alert steps): all
/// of them succeed, each version once. On SQLite a read-then-write transaction that started
/// deferred would fail with SQLITE_BUSY when another writer committed first.
async fn concurrent_writers_all_succeed(s: &Store) {
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let doc = format!("services: {{}}\n# {i}\n");
            let a = s
                .insert_desired(&doc, &format!("d{i}"), "api", "ana", now())
                .await;
            let b = s
                .save_alert_step(None, &format!("{{\"v\":{i}}}"), &[], now())
                .await;
            (a.map(|r| r.version), b)
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        let (a, b) = t.await.unwrap();
        versions.push(a.expect("the apply"));
        b.expect("the alert step");
    }
    versions.sort_unstable();
    let first = versions[0];
    assert_eq!(versions, (first..first + 8).collect::<Vec<_>>());
}
both!(concurrent_writers_all_succeed);

/// Every row of every table, in dump order.
async fn rows_of(s: &Store) -> Vec<(String, Vec<String>, Vec<Vec<nebula_store::dump::Cell>>)> {
    use nebula_store::dump::{DumpItem, DumpSink};
    type Tables = Vec<(String, Vec<String>, Vec<Vec<nebula_store::dump::Cell>>)>;
    struct Collect(Tables);
    impl DumpSink for Collect {
        async fn item(&mut self, item: DumpItem<'_>) -> std::io::Result<()> {
            match item {
                DumpItem::Table { name, columns } => {
                    self.0.push((name.into(), columns.to_vec(), Vec::new()))
                }
                DumpItem::Row(cells) => self.0.last_mut().unwrap().2.push(cells.to_vec()),
            }
            Ok(())
        }
    }
    let mut c = Collect(Vec::new());
    let counts = s.dump(&mut c).await.unwrap();
    assert_eq!(counts.tables as usize, c.0.len());
    assert_eq!(
        counts.rows as usize,
        c.0.iter().map(|t| t.2.len()).sum::<usize>()
    );
    c.0
}

/// A database filled by the other suites is copied into an empty one of each engine (SQLite
/// to SQLite, SQLite to PostgreSQL and back) and reads back row for row; a copy into a
/// database that holds rows, or of a row that does not fit, changes nothing.
#[tokio::test]
async fn a_dump_loads_into_an_empty_database_of_either_engine_row_for_row() {
    let (src, _d) = sqlite().await;
    enroll_consumes_token_and_merges_labels(&src).await;
    api_tokens_are_stored_hashed_and_replaceable(&src).await;
    rollups_round_trip_and_expire(&src).await;
    jobs_logs_and_audit_round_trip(&src).await;
    desired_state_history_and_pins_round_trip(&src).await;
    ai_usage_adds_up_per_token_model_and_node(&src).await;
    alert_steps_outbox_sinks_and_silences(&src).await;
    monitors_and_their_hours_add_up(&src).await;
    let before = rows_of(&src).await;
    let filled: Vec<&str> = before
        .iter()
        .filter(|t| !t.2.is_empty())
        .map(|t| t.0.as_str())
        .collect();
    for t in [
        "nodes",
        "job_logs",
        "audit_log",
        "desired_state",
        "api_tokens",
        "telemetry_rollups",
    ] {
        assert!(
            filled.contains(&t),
            "the suites left no rows in {t}: {filled:?}"
        );
    }
    assert_eq!(src.tables().len(), before.len());
    // The dump's table list (read from the migrations) is every table the database has.
    let mut catalog: Vec<String> = {
        use sqlx::Row;
        let url = format!("sqlite://{}", _d.path().join("t.db").display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_%' ESCAPE '\\' AND name NOT LIKE 'sqlite%'")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect()
    };
    catalog.sort();
    let mut listed = src.tables();
    listed.sort();
    catalog.retain(|t| t != "replicas");
    assert_eq!(listed, catalog);

    let copy = |to: Store| {
        let src = src.clone();
        async move {
            let mut loader = to.loader().await.unwrap();
            let counts = src.dump(&mut loader).await.unwrap();
            assert_eq!(loader.counts(), counts);
            loader.finish().await.unwrap();
            to
        }
    };
    let (lite, _d2) = sqlite().await;
    let lite = copy(lite).await;
    assert_eq!(rows_of(&lite).await, before, "SQLite to SQLite");
    // Loading again into a database that holds rows is refused before anything is written.
    assert!(matches!(
        lite.loader().await.err(),
        Some(nebula_store::StoreError::NotEmpty)
    ));

    if let Some((pg, _db)) = postgres().await {
        let pg = copy(pg).await;
        assert_eq!(rows_of(&pg).await, before, "SQLite to PostgreSQL");
        let (back, _d3) = sqlite().await;
        let mut loader = back.loader().await.unwrap();
        pg.dump(&mut loader).await.unwrap();
        loader.finish().await.unwrap();
        assert_eq!(rows_of(&back).await, before, "PostgreSQL to SQLite");
        pg.close().await;
    }

    // A row of the wrong shape or type is refused, and the half-loaded transaction is dropped.
    let (bad, _d4) = sqlite().await;
    let mut loader = bad.loader().await.unwrap();
    loader
        .table("join_tokens", &["id".to_string(), "uses".to_string()])
        .await
        .unwrap();
    use nebula_store::dump::Cell;
    assert!(loader.row(vec![Cell::Text("t".into())]).await.is_err());
    loader
        .row(vec![Cell::Text("t".into()), Cell::Text("many".into())])
        .await
        .unwrap();
    let err = loader.finish().await.unwrap_err();
    assert!(err.to_string().contains("join_tokens.uses"), "{err}");
    let mut loader = bad.loader().await.unwrap();
    let err = loader
        .table("no_such_table", &["id".to_string()])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no_such_table"), "{err}");
    drop(loader);
    assert!(bad.is_empty().await.unwrap());
}

/// The lease: one holder at a time, a higher term on every takeover, renewals only by the
/// holder under its term, a deposed leader's write (a job batch included) refused in its own
/// transaction, a takeover
/// waiting for a leader write in progress, and a release announced to listeners.
#[tokio::test]
async fn the_leader_lease_fences_writes_by_term() {
    use nebula_store::lease::{Fence, LEADER_CHANNEL};
    use nebula_store::StoreError;
    let Some((s, _db)) = postgres().await else {
        return;
    };
    // A term is the database clock's millisecond at the takeover (a restored or new database
    // never goes back to a term agents have seen), and at least one more than the last.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let t1 = s.lease_acquire("a", 300).await.unwrap().unwrap();
    assert!(
        t1 >= before - 60_000,
        "{t1} is not the clock's millisecond ({before})"
    );
    let a = Fence {
        holder: "a".into(),
        term: t1,
    };
    assert_eq!(s.lease_acquire("b", 60_000).await.unwrap(), None, "held");
    assert!(s.lease_renew(&a, 300).await.unwrap());
    assert!(!s
        .lease_renew(
            &Fence {
                holder: "b".into(),
                term: t1
            },
            300
        )
        .await
        .unwrap());
    s.begin_fenced(Some(&a))
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();

    // a pauses past its lease; b takes over under a higher term.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let t2 = s.lease_acquire("b", 300).await.unwrap().unwrap();
    assert!(t2 > t1);
    let b = Fence {
        holder: "b".into(),
        term: t2,
    };
    assert!(!s.lease_renew(&a, 300).await.unwrap(), "a's term is over");
    match s.begin_fenced(Some(&a)).await {
        Err(StoreError::Fenced { term, current }) if term == t1 && current == t2 => {}
        other => panic!(
            "a deposed leader's write went ahead: {:?}",
            other.map(|_| ())
        ),
    }
    assert_eq!(s.lease().await.unwrap().unwrap().holder, "b");
    // The job engine's writes too: a's batch is refused whole, b's lands.
    let stale = job(1, "n1");
    let batch = nebula_store::jobs::JobBatch {
        jobs: vec![stale.clone()],
        logs: Vec::new(),
        audit: Vec::new(),
    };
    assert!(matches!(
        s.write_job_batch_fenced(&batch, Some(&a)).await,
        Err(StoreError::Fenced { term, current }) if term == t1 && current == t2
    ));
    assert!(s.job(stale.id).await.unwrap().is_none(), "nothing written");
    s.write_job_batch_fenced(&batch, Some(&b)).await.unwrap();
    assert!(s.job(stale.id).await.unwrap().is_some());

    // A takeover waits for the write b has under way, so that write lands under b's term.
    let tx = s.begin_fenced(Some(&b)).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let c = tokio::spawn({
        let s = s.clone();
        async move { s.lease_acquire("c", 60_000).await.unwrap() }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!c.is_finished(), "the takeover waited for the fenced write");
    tx.commit().await.unwrap();
    let t3 = c.await.unwrap().unwrap();
    assert!(t3 > t2);

    // A release is heard at once, and the lease is free.
    let mut heard = s.listen(&[LEADER_CHANNEL]).await.unwrap();
    let c3 = Fence {
        holder: "c".into(),
        term: t3,
    };
    assert!(s.lease_release(&c3).await.unwrap());
    let (channel, payload) = tokio::time::timeout(std::time::Duration::from_secs(5), heard.recv())
        .await
        .expect("the release is announced")
        .unwrap()
        .unwrap();
    assert_eq!(
        (channel.as_str(), payload),
        (LEADER_CHANNEL, t3.to_string())
    );
    assert!(s.lease_acquire("a", 60_000).await.unwrap().unwrap() > t3);
    s.close().await;
}
