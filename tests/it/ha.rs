//! Replicas on the real PostgreSQL: the keys travel in a replica bundle (a replica without
//! them refuses to start), one leader at a time runs the leader tasks, a killed leader is
//! replaced within seconds, a released lease is taken over at once, and a leader paused past
//! its lease (SIGSTOP) steps down when it wakes while the new one keeps leading.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nebula_types::api::tasks::{ReplicasView, State, TaskStatus};

use crate::common::{bin, pg::PgDb, wait_for, Controller, ControllerOpts};

const PASS: &str = "replica bundle passphrase";

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Three replicas on one database: the first makes the keys, the others join with a bundle.
async fn three(db: &PgDb, work: &std::path::Path) -> Vec<Controller> {
    let token = format!("nbl_test_{}", uuid::Uuid::new_v4().simple());
    let opts = ControllerOpts {
        extra: vec!["--database-url", leak(db.url.clone())],
        admin_token: Some(token),
        ..Default::default()
    };
    let first = Controller::start(opts.clone()).await;
    let pass = work.join("pass");
    std::fs::write(&pass, PASS).unwrap();
    let bundle = work.join("replica.bundle");
    let out = Command::new(bin("nebula"))
        .args(["replica", "add"])
        .arg(&bundle)
        .arg("--data-dir")
        .arg(first.dir.path().join("data"))
        .arg("--passphrase-file")
        .arg(&pass)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without the keys a second controller refuses the database instead of making a new CA.
    let bare = Command::new(bin("nebula"))
        .args([
            "serve",
            "--database-url",
            &db.url,
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--quic-listen", "127.0.0.1:0", "--data-dir"])
        .arg(work.join("bare"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&bare.stderr).to_string();
    assert!(
        !bare.status.success() && said.contains("nebula replica add"),
        "{said}"
    );

    let mut all = vec![first];
    for _ in 0..2 {
        let (bundle, pass) = (bundle.clone(), pass.clone());
        let join = Arc::new(move |dir: &std::path::Path| {
            let out = Command::new(bin("nebula"))
                .args(["replica", "join"])
                .arg(&bundle)
                .arg("--data-dir")
                .arg(dir.join("data"))
                .arg("--passphrase-file")
                .arg(&pass)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        });
        all.push(
            Controller::start(ControllerOpts {
                prepare: Some(join),
                ..opts.clone()
            })
            .await,
        );
    }
    all
}

async fn view(c: &Controller) -> Option<ReplicasView> {
    let (status, v) = c.api(reqwest::Method::GET, "/api/v1/replicas", None).await;
    (status == 200).then(|| serde_json::from_value(v).expect("a replicas view"))
}

async fn reconciler(c: &Controller) -> Option<State> {
    let (status, v) = c.api(reqwest::Method::GET, "/api/v1/tasks", None).await;
    let tasks: Vec<TaskStatus> = (status == 200).then(|| serde_json::from_value(v).ok())??;
    tasks
        .into_iter()
        .find(|t| t.name == "reconciler")
        .map(|t| t.state)
}

/// The index of the replica that leads with its reconciler running, and the term.
async fn leader(all: &[Controller], alive: &[bool], timeout: Duration) -> (usize, i64) {
    wait_for("one replica to lead", timeout, || async {
        let mut found = None;
        for (i, c) in all.iter().enumerate() {
            if !alive[i] {
                continue;
            }
            let v = view(c).await?;
            let leads = v.leader.as_deref() == Some(v.this.as_str());
            let running = reconciler(c).await? != State::WaitingForLeadership;
            if leads != running {
                return None; // between the lease and the tasks: look again
            }
            if leads {
                if found.is_some() {
                    panic!("two replicas lead at once");
                }
                found = Some((i, v.term?));
            }
        }
        found
    })
    .await
}

/// One leader among three; kill -9 of the leader (three times) brings a new one within 10 s,
/// under a higher term; a clean stop hands over at once; every replica serves the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_elect_one_leader_and_replace_a_killed_one_within_seconds() {
    let Some(db) = PgDb::create() else { return };
    let work = tempfile::tempdir().unwrap();
    let mut all = three(&db, work.path()).await;
    let mut alive = vec![true; 3];
    let (mut lead, mut term) = leader(&all, &alive, Duration::from_secs(20)).await;
    let v = view(&all[(lead + 1) % 3]).await.unwrap();
    assert_eq!(v.mode, "replicas");
    assert_eq!(v.replicas.len(), 3, "{v:?}");
    assert_eq!(v.replicas.iter().filter(|r| r.leader).count(), 1);

    let mut took = Vec::new();
    for round in 0..3 {
        let killed_at = Instant::now();
        all[lead].proc.kill();
        alive[lead] = false;
        let (next, next_term) = leader(&all, &alive, Duration::from_secs(15)).await;
        let t = killed_at.elapsed();
        assert!(
            next_term > term,
            "round {round}: term {next_term} after {term}"
        );
        assert!(
            t < Duration::from_secs(10),
            "round {round}: a new leader after {t:?}"
        );
        took.push(t);
        // The killed replica comes back as a follower.
        all[lead].restart_hard().await;
        alive[lead] = true;
        (lead, term) = (next, next_term);
        let (again, same) = leader(&all, &alive, Duration::from_secs(10)).await;
        assert_eq!(
            (again, same),
            (lead, term),
            "a returning replica does not take over"
        );
    }
    eprintln!("failover after kill -9: {took:?}");

    // A clean stop releases the lease: the next leader does not wait for it to expire.
    let stopped_at = Instant::now();
    assert!(all[lead].proc.terminate().success());
    alive[lead] = false;
    let (_, next_term) = leader(&all, &alive, Duration::from_secs(10)).await;
    let t = stopped_at.elapsed();
    assert!(next_term > term);
    assert!(
        t < Duration::from_secs(4),
        "a released lease was taken over after {t:?}"
    );
    eprintln!("handover after a clean stop: {t:?}");
}

/// A leader stopped (SIGSTOP) past its lease is replaced; woken (SIGCONT), it finds its term
/// over and steps down, and the new leader keeps leading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_steps_down_when_it_wakes() {
    let Some(db) = PgDb::create() else { return };
    let work = tempfile::tempdir().unwrap();
    let all = three(&db, work.path()).await;
    let mut alive = vec![true; 3];
    let (old, term) = leader(&all, &alive, Duration::from_secs(20)).await;
    let pid = all[old].proc.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    alive[old] = false;
    let (new, new_term) = leader(&all, &alive, Duration::from_secs(15)).await;
    assert!(new_term > term && new != old);
    // Paused well past the lease, then woken.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    alive[old] = true;
    wait_for(
        "the woken leader to step down",
        Duration::from_secs(10),
        || async {
            let v = view(&all[old]).await?;
            let waiting = reconciler(&all[old]).await? == State::WaitingForLeadership;
            (v.leader.as_deref() != Some(v.this.as_str()) && waiting).then_some(())
        },
    )
    .await;
    let log = all[old].proc.stderr.text();
    assert!(
        log.contains("stepping down") && log.contains("leadership lost: stopping the task"),
        "{log}"
    );
    assert_eq!(
        leader(&all, &alive, Duration::from_secs(10)).await,
        (new, new_term),
        "the new leader keeps leading"
    );
}

/// The agent dials the leader and learns every replica's address; jobs are created through a
/// follower's address (passed on to the leader) while the leader is killed: the agent moves
/// to the new leader by itself, no job is lost or run twice, and the follower's API keeps
/// answering once the new leader is elected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_jobs_follow_the_leader_through_a_kill() {
    let Some(db) = PgDb::create() else { return };
    let work = tempfile::tempdir().unwrap();
    let mut all = three(&db, work.path()).await;
    let alive = vec![true; 3];
    let (lead, _) = leader(&all, &alive, Duration::from_secs(20)).await;
    let marks = work.path().join("marks");
    let config = format!(
        "[exec.commands.mark]\nargv = [\"sh\", \"-c\", \"echo run >> {}; sleep 0.2\"]\n",
        marks.display()
    );
    let token = all[lead].token(1, "10m", serde_json::json!({})).await;
    let agent_dir = work.path().join("agent");
    let agent =
        crate::common::Agent::join_with_config(&all[lead], &token, &agent_dir, "box", &[], &config);
    all[lead]
        .wait_status(
            "box",
            crate::common::NodeStatus::Online,
            Duration::from_secs(20),
        )
        .await;
    // The agent heard about every replica.
    wait_for(
        "the agent to save the replicas",
        Duration::from_secs(10),
        || async {
            let state = std::fs::read_to_string(agent_dir.join("agent.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&state).ok()?;
            (v["replicas"].as_array()?.len() == 3).then_some(())
        },
    )
    .await;

    // Jobs go in through a follower, before, during and after the kill.
    let entry = (lead + 1) % 3;
    let (url, admin) = (
        all[entry].url("/api/v1/jobs"),
        all[entry].admin_token.clone(),
    );
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    let mut refused = 0;
    let started = Instant::now();
    let mut killed_at = None;
    while started.elapsed() < Duration::from_secs(16) {
        if killed_at.is_none() && started.elapsed() > Duration::from_secs(2) {
            all[lead].proc.kill();
            killed_at = Some(Instant::now());
        }
        let r = http
            .post(&url)
            .bearer_auth(&admin)
            .json(&serde_json::json!({"node": "box", "work": {"kind": "exec", "op": "mark"}}))
            .send()
            .await
            .expect("the follower answers");
        match r.status().as_u16() {
            200..=202 => {
                let v: serde_json::Value = r.json().await.unwrap();
                ids.push(v["id"].as_str().unwrap().to_owned());
            }
            503 => refused += 1,
            s => panic!("{s}: {}", r.text().await.unwrap_or_default()),
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(refused > 0, "the follower said 503 while no replica led");
    let mut alive = alive;
    alive[lead] = false;
    let (now_leads, _) = leader(&all, &alive, Duration::from_secs(10)).await;
    all[now_leads]
        .wait_status(
            "box",
            crate::common::NodeStatus::Online,
            Duration::from_secs(20),
        )
        .await;
    let back = killed_at.unwrap().elapsed();
    // Every accepted job ends, succeeded, and ran once.
    for id in &ids {
        let path = format!("/api/v1/jobs/{id}");
        let j = wait_for(
            &format!("job {id} to end"),
            Duration::from_secs(90),
            || async {
                let (status, v) = all[entry].api(reqwest::Method::GET, &path, None).await;
                let state = v["state"].as_str()?.to_owned();
                (status == 200
                    && ["succeeded", "failed", "lost", "cancelled", "expired"]
                        .contains(&state.as_str()))
                .then_some(v)
            },
        )
        .await;
        assert_eq!(j["state"], "succeeded", "{j}");
    }
    let runs = std::fs::read_to_string(&marks)
        .unwrap_or_default()
        .lines()
        .count();
    assert_eq!(runs, ids.len(), "every job ran exactly once");
    eprintln!(
        "{} jobs through the kill, {} refusals while electing, the agent online on the new leader {:?} after the kill (or sooner)",
        ids.len(),
        refused,
        back
    );
    drop(agent);
}
