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
pub(crate) async fn three(db: &PgDb, work: &std::path::Path) -> Vec<Controller> {
    three_with(db, work, &[]).await
}

/// [`three`] with more `nebula serve` flags.
pub(crate) async fn three_with(
    db: &PgDb,
    work: &std::path::Path,
    flags: &[&'static str],
) -> Vec<Controller> {
    let token = format!("nbl_test_{}", uuid::Uuid::new_v4().simple());
    let mut extra = vec!["--database-url", leak(db.url.clone())];
    extra.extend_from_slice(flags);
    let opts = ControllerOpts {
        extra,
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

pub(crate) async fn view(c: &Controller) -> Option<ReplicasView> {
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
pub(crate) async fn leader(all: &[Controller], alive: &[bool], timeout: Duration) -> (usize, i64) {
    wait_for("one replica to lead", timeout, || async {
        let mut found = None;
        let mut running_here = Vec::new();
        for (i, c) in all.iter().enumerate() {
            if !alive[i] {
                continue;
            }
            let v = view(c).await?;
            // The lease (the database's view) and the tasks (this replica's own belief).
            let leads = v.leader.as_deref() == Some(v.this.as_str());
            let running = reconciler(c).await? != State::WaitingForLeadership;
            if running {
                running_here.push(i);
            }
            if leads && running {
                found = Some((i, v.term?));
            }
        }
        assert!(
            running_here.len() <= 1,
            "replicas {running_here:?} run the leader tasks at once"
        );
        found.filter(|(i, _)| running_here == [*i])
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
    // Every replica registers within its first round.
    let v = wait_for(
        "three replicas in the list",
        Duration::from_secs(10),
        || async {
            view(&all[(lead + 1) % 3])
                .await
                .filter(|v| v.replicas.len() == 3)
        },
    )
    .await;
    assert_eq!(v.mode, "replicas");
    assert_eq!(v.replicas.iter().filter(|r| r.leader).count(), 1);
    // The install script, from any replica, names every replica for the agent's config.
    let quics: Vec<String> = all.iter().map(|c| c.quic.to_string()).collect();
    wait_for(
        "install.sh to list every replica",
        Duration::from_secs(10),
        || async {
            let script = reqwest::get(all[(lead + 2) % 3].url("/install.sh"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let line = script
                .lines()
                .find(|l| l.starts_with("DEFAULT_REPLICAS="))?
                .to_owned();
            quics
                .iter()
                .all(|q| line.contains(q.as_str()))
                .then_some(())
        },
    )
    .await;

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

/// The agent keeps the highest leader term it has seen (protocol 1.10): it saves its leader's
/// term, and a leader of a lower term (a deposed one that woke up, as far as the agent can
/// tell) is refused: the agent leaves its session and runs none of its jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_a_leader_of_a_lower_term() {
    use crate::common::{Agent, NodeStatus};
    let Some(db) = PgDb::create() else { return };
    let work = tempfile::tempdir().unwrap();
    let all = three(&db, work.path()).await;
    let (lead, term) = leader(&all, &[true; 3], Duration::from_secs(20)).await;
    let marks = work.path().join("marks");
    let config = format!(
        "[exec.commands.mark]\nargv = [\"sh\", \"-c\", \"echo run >> {}\"]\n",
        marks.display()
    );
    let token = all[lead].token(1, "10m", serde_json::json!({})).await;
    let dir = work.path().join("agent");
    let state = dir.join("agent.json");
    let read_state = || -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(&state).ok()?).ok()
    };
    let agent = Agent::join_with_config(&all[lead], &token, &dir, "box", &[], &config);
    all[lead]
        .wait_status("box", NodeStatus::Online, Duration::from_secs(20))
        .await;
    wait_for(
        "the agent to save its leader's term",
        Duration::from_secs(10),
        || async { (read_state()?["term"].as_i64()? == term).then_some(()) },
    )
    .await;
    drop(agent);
    // As if a leader of a later term had been seen since.
    let mut v = read_state().unwrap();
    v["term"] = serde_json::json!(term + 100);
    std::fs::write(&state, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let agent = Agent::run_with_config(&dir);
    let (status, job) = all[lead]
        .api(
            reqwest::Method::POST,
            "/api/v1/jobs",
            Some(serde_json::json!({"node": "box", "work": {"kind": "exec", "op": "mark"}})),
        )
        .await;
    assert!((200..300).contains(&status), "{status} {job}");
    let refusal = format!("term {term} is over");
    wait_for(
        "the agent to refuse the leader",
        Duration::from_secs(20),
        || async { agent.proc.output().contains(&refusal).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!marks.exists(), "a job of a lower term ran");
    let (_, j) = all[lead]
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/jobs/{}", job["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_ne!(j["state"], "succeeded", "{j}");
    assert_eq!(read_state().unwrap()["term"], term + 100, "never lowered");
    let log = agent.proc.output();
    assert!(log.contains("leaving a deposed leader"), "{log}");
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
        match crate::chaos::post_mark(&http, &url, &admin, "box").await {
            crate::chaos::Posted::Accepted(id) => ids.push(id),
            crate::chaos::Posted::Refused => refused += 1,
            crate::chaos::Posted::Unknown => {}
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(refused > 0, "the follower said 503 while no replica led");
    let mut alive = alive;
    alive[lead] = false;
    let (now_leads, new_term) = leader(&all, &alive, Duration::from_secs(10)).await;
    all[now_leads]
        .wait_status(
            "box",
            crate::common::NodeStatus::Online,
            Duration::from_secs(20),
        )
        .await;
    let back = killed_at.unwrap().elapsed();
    // The agent keeps the new leader's term (a higher one): the old leader's is refused now.
    wait_for(
        "the agent to save the new leader's term",
        Duration::from_secs(10),
        || async {
            let state = std::fs::read_to_string(agent_dir.join("agent.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&state).ok()?;
            (v["term"].as_i64()? == new_term).then_some(())
        },
    )
    .await;
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
    let created = marks_ended(&all[entry]).await;
    for (id, state, _) in &created {
        assert_eq!(state, "succeeded", "job {id}");
    }
    assert!(
        ids.iter().all(|id| created.iter().any(|(c, _, _)| c == id)),
        "an accepted job is missing"
    );
    assert_eq!(runs, created.len(), "every job ran exactly once");
    eprintln!(
        "{} jobs through the kill, {} refusals while electing, the agent online on the new leader {:?} after the kill (or sooner)",
        ids.len(),
        refused,
        back
    );
    drop(agent);
}

/// An agent that dials a follower keeps its connection there: the follower relays the session
/// to the leader, which records the follower as the session's owner, sends jobs through it and
/// gets the agent's telemetry. When the replica holding its connection is killed, the agent
/// comes back through another; when the leader is killed, through the replica that is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_relays_its_agents_sessions_to_the_leader() {
    use crate::common::{Agent, NodeStatus};
    let Some(db) = PgDb::create() else { return };
    let work = tempfile::tempdir().unwrap();
    let mut all = three(&db, work.path()).await;
    let mut alive = vec![true; 3];
    let (lead, _) = leader(&all, &alive, Duration::from_secs(20)).await;
    let follower = (lead + 1) % 3;
    let follower_id = view(&all[follower]).await.unwrap().this;
    let marks = work.path().join("marks");
    let config = format!(
        "[exec.commands.mark]\nargv = [\"sh\", \"-c\", \"echo run >> {}\"]\n",
        marks.display()
    );
    let token = all[lead].token(1, "10m", serde_json::json!({})).await;
    let dir = work.path().join("agent");
    let agent = Agent::join_with_config(&all[follower], &token, &dir, "box", &[], &config);
    let node = all[lead]
        .wait_status("box", NodeStatus::Online, Duration::from_secs(20))
        .await;
    assert_eq!(
        node.session_replica.as_deref(),
        Some(follower_id.as_str()),
        "the session's owner is the follower holding the connection: {node:?}\n{}",
        agent.proc.output()
    );
    let v = view(&all[follower]).await.unwrap();
    let held: Vec<(String, i64)> = v
        .replicas
        .iter()
        .map(|r| (r.id.clone(), r.sessions))
        .collect();
    assert!(held.contains(&(follower_id.clone(), 1)), "{held:?}");
    // Telemetry datagrams reach the leader through the follower.
    wait_for(
        "the agent's telemetry through the follower",
        Duration::from_secs(20),
        || async { all[lead].node("box").await?.telemetry },
    )
    .await;
    // A job goes to the agent through the follower, and its output comes back.
    let done = mark_job(&all[lead]).await;
    assert_eq!(done.state.as_str(), "succeeded", "{done:?}");
    let runs = || {
        std::fs::read_to_string(&marks)
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(runs(), 1, "the job ran on the agent");

    // The follower holding the connection dies: the agent reconnects to another replica.
    all[follower].proc.kill();
    alive[follower] = false;
    // (The agent notices at its idle timeout; a newer session replaces the relayed one.)
    wait_for(
        "the agent online through another replica",
        Duration::from_secs(40),
        || async {
            let n = all[lead].node("box").await?;
            (n.status == NodeStatus::Online
                && n.session_replica.is_some()
                && n.session_replica.as_deref() != Some(follower_id.as_str()))
            .then_some(())
        },
    )
    .await;
    let done = mark_job(&all[lead]).await;
    assert_eq!(done.state.as_str(), "succeeded", "{done:?}");

    // Then the leader dies: the agent comes back through the replica that is left.
    all[lead].proc.kill();
    alive[lead] = false;
    let (now_leads, _) = leader(&all, &alive, Duration::from_secs(15)).await;
    all[now_leads]
        .wait_status("box", NodeStatus::Online, Duration::from_secs(40))
        .await;
    let done = mark_job(&all[now_leads]).await;
    assert_eq!(done.state.as_str(), "succeeded", "{done:?}");
    assert_eq!(runs(), 3, "every job ran once");
    drop(agent);
}

/// Run the `mark` command on `box` and wait for the job to end.
async fn mark_job(c: &Controller) -> crate::common::JobRecord {
    let job = c
        .job(serde_json::json!({"node": "box", "work": {"kind": "exec", "op": "mark"}}))
        .await;
    c.wait_job(job.id, "the job to end", Duration::from_secs(30), |j| {
        j.state.is_terminal()
    })
    .await
}

/// Every `exec` job the store has (accepted ones, and any whose answer was lost with the
/// leader), once none is unfinished: id, state and node.
pub(crate) async fn marks_ended(c: &Controller) -> Vec<(String, serde_json::Value, String)> {
    wait_for("every job to end", Duration::from_secs(90), || async {
        let (status, list) = c
            .api(reqwest::Method::GET, "/api/v1/jobs?limit=1000", None)
            .await;
        if status != 200 {
            return None;
        }
        let marks: Vec<&serde_json::Value> = list["items"]
            .as_array()?
            .iter()
            .filter(|j| j["work"]["kind"] == "exec")
            .collect();
        let open = ["queued", "dispatched", "running"];
        marks
            .iter()
            .all(|j| !open.contains(&j["state"].as_str().unwrap_or("")))
            .then(|| {
                marks
                    .iter()
                    .map(|j| {
                        (
                            j["id"].as_str().unwrap_or("").to_owned(),
                            j["state"].clone(),
                            j["node"].as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect()
            })
    })
    .await
}

/// An overview's live stream on `c` (signed in with `cookie`): its events as they come,
/// (SSE event name, data), then `None` once it ended.
type Frames = Arc<std::sync::Mutex<Vec<Option<(String, String)>>>>;

async fn overview_stream(c: &Controller, cookie: &str) -> Frames {
    let resp = reqwest::Client::new()
        .get(c.url("/ui/events"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let frames: Frames = Arc::default();
    let sink = frames.clone();
    let mut sse = crate::common::Sse::new(resp);
    tokio::spawn(async move {
        while let Some(frame) = sse.next(Duration::from_secs(3600)).await {
            sink.lock().unwrap().push(Some(frame));
        }
        sink.lock().unwrap().push(None);
    });
    frames
}

/// Events fan out between replicas as PostgreSQL notifications. The overview's live stream,
/// opened on a follower, is that follower's own: it carries the leader's node events (heard
/// through `nebula_events`), refreshes in full after its listener's connection is cut (a
/// resync, since notifications meanwhile are lost), and goes on through the leader's kill,
/// showing the node back online under the new leader on the same stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_live_overview_hears_the_leaders_events_through_notifications() {
    use crate::common::{metric, Agent, NodeStatus};
    let Some(db) = PgDb::create() else { return };
    let work = tempfile::tempdir().unwrap();
    let mut all = three(&db, work.path()).await;
    let mut alive = vec![true; 3];
    let (lead, _) = leader(&all, &alive, Duration::from_secs(20)).await;
    let f = (lead + 1) % 3;
    let pw = crate::dashboard::create_user(&all[f], "ana", "viewer").await;
    let set = crate::dashboard_http::sign_in(&all[f], "ana", &pw, false)
        .await
        .expect("signed in on the follower");
    let session = set.split(';').next().unwrap().to_owned();
    let frames = overview_stream(&all[f], &session).await;
    let online_card_after = |from: usize| {
        let frames = frames.clone();
        async move {
            let got = frames.lock().unwrap();
            assert!(
                !got.contains(&None),
                "the follower's stream ended: it is not its own"
            );
            got.iter().skip(from).flatten().any(|(e, d)| {
                e == "node" && d.contains("id=\"node-box\"") && d.contains("data-status=\"online\"")
            })
        }
    };

    // A node joins through the leader: its card arrives on the follower's stream (from the
    // event, or the periodic refresh), and the follower has heard notifications.
    let token = all[lead].token(1, "10m", serde_json::json!({})).await;
    let agent = Agent::join(&all[lead], &token, &work.path().join("agent"), "box", &[]);
    wait_for(
        "the new node's card on the follower's stream",
        Duration::from_secs(20),
        || async { online_card_after(0).await.then_some(()) },
    )
    .await;
    let m = all[f].metrics().await;
    assert!(
        metric(&m, "nebula_events_fanout_total{what=\"received\"}") >= 1.0,
        "{m}"
    );

    // Cut every listening connection: the follower listens again and resyncs, and the
    // resync's full refresh says which cards there are (no periodic refresh does).
    let cut_at = frames.lock().unwrap().len();
    let cut = db.query(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
         AND query ILIKE 'LISTEN%'",
    );
    assert!(cut.parse::<i64>().unwrap() >= 3, "listeners cut: {cut}");
    wait_for(
        "the follower to resync after its listener was cut",
        Duration::from_secs(20),
        || async {
            let m = all[f].metrics().await;
            (metric(&m, "nebula_events_fanout_total{what=\"resync\"}") >= 1.0).then_some(())
        },
    )
    .await;
    wait_for(
        "the resync's full refresh on the follower's stream",
        Duration::from_secs(10),
        || async {
            let got = frames.lock().unwrap();
            got.iter()
                .skip(cut_at)
                .flatten()
                .any(|(e, d)| e == "present" && d.split(' ').any(|id| id == "node-box"))
                .then_some(())
        },
    )
    .await;

    // The leader dies (once the agent knows every replica); the same stream shows the node
    // online under the new leader.
    wait_for(
        "the agent to know every replica",
        Duration::from_secs(10),
        || async {
            let state = std::fs::read_to_string(work.path().join("agent/agent.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&state).ok()?;
            (v["replicas"].as_array()?.len() == 3).then_some(())
        },
    )
    .await;
    all[lead].proc.kill();
    alive[lead] = false;
    // Whatever comes after this was made by another replica.
    let before = frames.lock().unwrap().len();
    let (now_leads, _) = leader(&all, &alive, Duration::from_secs(15)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let node = all[now_leads].node("box").await;
        let on = node
            .as_ref()
            .is_some_and(|n| n.status == NodeStatus::Online);
        if on && online_card_after(before).await {
            break;
        }
        if Instant::now() > deadline {
            let since: Vec<String> = (frames.lock().unwrap().iter().skip(before))
                .flatten()
                .filter(|(e, _)| e == "node")
                .map(|(_, d)| d.chars().take(160).collect())
                .collect();
            panic!(
                "the node is not online again on the follower's stream: {node:?}\n\
                 cards since the kill: {since:#?}\nagent: {}\nleader: {}\nfollower: {}",
                agent.proc.output(),
                all[lead].proc.output(),
                all[f].proc.output(),
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        !frames.lock().unwrap().contains(&None),
        "the follower's stream went on through the leader's kill"
    );
    // A removal reaches a stream only as an event (no refresh says `gone`): one opened on the
    // replica that does not lead now hears it from the one that does.
    let other = (0..3).find(|&i| alive[i] && i != now_leads).unwrap();
    let frames = overview_stream(&all[other], &session).await;
    drop(agent);
    let (status, v) = all[now_leads]
        .api(reqwest::Method::DELETE, "/api/v1/nodes/box", None)
        .await;
    assert_eq!(status, 200, "{v}");
    wait_for(
        "the removal on the follower's stream",
        Duration::from_secs(10),
        || async {
            let got = frames.lock().unwrap();
            got.iter()
                .flatten()
                .any(|(e, d)| e == "gone" && d == "node-box")
                .then_some(())
        },
    )
    .await;
}
