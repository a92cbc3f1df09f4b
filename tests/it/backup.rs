//! Backups and migration end to end: a backup taken through the CLI while jobs are being
//! created, restored into a new data dir that the controller then runs from on the same
//! addresses (the agent reconnects without joining again, the secrets open, the jobs and
//! tokens are there); scheduled backups with retention; refusals that change nothing (a wrong
//! passphrase, a file cut short, a data dir or database that is not empty); and an embedded
//! SQLite controller moved to the real PostgreSQL with `nebula migrate`.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nebula_types::api::nodes::NodeStatus;
use reqwest::Method;
use serde_json::json;

use crate::common::{bin, join_ready, pg::PgDb, wait_for, Controller, ControllerOpts};

const PASSPHRASE: &str = "a long enough passphrase";
const SECRET: &str = "s3cret-value-kept-in-the-backup";

fn nebula(args: &[&str]) -> std::process::Output {
    Command::new(bin("nebula"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run nebula")
}

/// `nebula backup restore FILE --data-dir DATA --passphrase-file PASS`.
fn restore(
    file: &std::path::Path,
    data: &std::path::Path,
    pass: &std::path::Path,
) -> std::process::Output {
    Command::new(bin("nebula"))
        .args(["backup", "restore"])
        .arg(file)
        .arg("--data-dir")
        .arg(data)
        .arg("--passphrase-file")
        .arg(pass)
        .stdin(Stdio::null())
        .output()
        .expect("run nebula")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Store a secret and import the same value again: `unchanged` proves the store's key opens it.
async fn secret_opens(c: &Controller) -> bool {
    let (status, v) = c
        .api(
            Method::POST,
            "/api/v1/secrets/import",
            Some(json!({ "env": format!("DB_PASSWORD={SECRET}\n") })),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v["unchanged"] == json!(["DB_PASSWORD"])
}

async fn inventory(c: &Controller, node: &str) -> String {
    let j = c
        .job(json!({"node": node, "work": {"kind": "inventory"}}))
        .await;
    j.id.to_string()
}

async fn job_ids(c: &Controller) -> Vec<String> {
    let v = c.get("/api/v1/jobs?limit=1000").await;
    let mut ids: Vec<String> = v["items"]
        .as_array()
        .expect("a page of jobs")
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// A backup under load restores into a new data dir and the controller runs from it; the
/// scheduler keeps the newest backups; bad restores change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_into_a_new_data_dir_with_the_same_fleet() {
    let work = tempfile::tempdir().unwrap();
    let pass_file = work.path().join("pass");
    std::fs::write(&pass_file, format!("{PASSPHRASE}\n")).unwrap();
    let scheduled = work.path().join("scheduled");
    let extra: Vec<&'static str> = [
        "--backup-dir",
        &scheduled.display().to_string(),
        "--backup-interval",
        "1s",
        "--backup-keep",
        "2",
        "--backup-passphrase-file",
        &pass_file.display().to_string(),
    ]
    .into_iter()
    .map(|s| &*Box::leak(s.to_owned().into_boxed_str()))
    .collect();
    let mut c = Controller::start(ControllerOpts {
        extra,
        ..Default::default()
    })
    .await;
    let (mut agent, node_id) = join_ready(&c, work.path(), "box", &[], None).await;
    let (status, v) = c
        .api(
            Method::PUT,
            "/api/v1/secrets/DB_PASSWORD",
            Some(json!({ "value": SECRET })),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let (status, v) = c
        .api(
            Method::POST,
            "/api/v1/api-tokens",
            Some(json!({ "name": "ci", "role": "operator" })),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let ci_token = v["token"].as_str().expect("a token").to_owned();
    let first = inventory(&c, "box").await;

    // Jobs keep coming while the backup is read.
    let stop = Arc::new(AtomicBool::new(false));
    let (url, token) = (c.url(""), c.admin_token.clone());
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let r = http
                    .post(format!("{url}/api/v1/jobs"))
                    .bearer_auth(&token)
                    .json(&json!({"node": "box", "work": {"kind": "inventory"}}))
                    .send()
                    .await
                    .expect("create a job");
                assert!(r.status().is_success(), "{}", r.status());
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let file = work.path().join("by-hand.jsonl.gz");
    let out = {
        let (cli_url, token, file, pass) = (
            c.url(""),
            c.admin_token.clone(),
            file.clone(),
            pass_file.clone(),
        );
        tokio::task::spawn_blocking(move || {
            Command::new(bin("nebula"))
                .args(["backup", "create"])
                .arg(&file)
                .arg("--passphrase-file")
                .arg(&pass)
                .env("NEBULA_CONTROLLER", cli_url)
                .env("NEBULA_TOKEN", token)
                .output()
                .expect("run nebula")
        })
        .await
        .unwrap()
    };
    stop.store(true, Ordering::Relaxed);
    let made = load.await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(made > 0, "no job was created during the backup");
    assert!(text(&out).contains("wrote"), "{}", text(&out));
    // The key files are sealed: the CA's key is not in the file as text.
    let raw = {
        use std::io::Read;
        let mut s = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&file).unwrap())
            .read_to_string(&mut s)
            .unwrap();
        s
    };
    assert!(!raw.contains("PRIVATE KEY") && !raw.contains(SECRET));
    assert!(raw.contains("\"table\":\"nodes\""));

    // A short passphrase is refused by the API before anything is read.
    let (status, v) = c
        .api(
            Method::POST,
            "/api/v1/backup",
            Some(json!({"passphrase": "short"})),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    // So is a viewer.
    let (status, _) = {
        let r = c
            .client
            .post(c.url("/api/v1/backup"))
            .bearer_auth(&ci_token)
            .json(&json!({"passphrase": PASSPHRASE}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), ())
    };
    assert_eq!(status, 403, "an operator may not take a backup");

    // The scheduler has written backups and keeps the newest two.
    wait_for(
        "scheduled backups to rotate",
        Duration::from_secs(30),
        || async {
            let tasks = c.get("/api/v1/tasks").await;
            let runs = tasks
                .as_array()?
                .iter()
                .find(|t| t["name"] == "backup-scheduler")?["runs"]
                .as_u64()?;
            (runs >= 4).then_some(())
        },
    )
    .await;
    let kept: Vec<_> = std::fs::read_dir(&scheduled)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".jsonl.gz"))
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");

    // The jobs A finished before the backup are in it; let the rest finish too.
    let before = job_ids(&c).await;
    assert!(before.contains(&first));
    c.proc.kill();
    agent.proc.kill();

    // Refusals first: a wrong passphrase and a file cut short leave the new data dir without
    // keys or rows, and a later good restore into it works.
    let data = c.dir.path().join("data");
    std::fs::rename(&data, c.dir.path().join("data.old")).unwrap();
    let wrong = work.path().join("wrong");
    std::fs::write(&wrong, "not the passphrase at all").unwrap();
    let o = restore(&file, &data, &wrong);
    assert!(
        !o.status.success() && text(&o).contains("wrong passphrase"),
        "{}",
        text(&o)
    );
    assert!(!data.join("pki/ca.key").exists());
    // A whole gzip file whose last lines (rows, the end line) are missing.
    let cut = work.path().join("cut.jsonl.gz");
    {
        use std::io::Write;
        let lines: Vec<&str> = raw.lines().collect();
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&cut).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(lines[..lines.len() - 3].join("\n").as_bytes())
            .unwrap();
        gz.finish().unwrap();
    }
    let o = restore(&cut, &data, &pass_file);
    assert!(
        !o.status.success() && text(&o).contains("cut short"),
        "{}",
        text(&o)
    );
    assert!(
        !data.join("pki/ca.key").exists(),
        "no keys after a failed restore"
    );

    let o = restore(&file, &data, &pass_file);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("restored"), "{}", text(&o));
    // Again into the same dir: refused, nothing changed.
    let o = restore(&file, &data, &pass_file);
    assert!(
        !o.status.success() && text(&o).contains("exists already"),
        "{}",
        text(&o)
    );

    // The controller runs from the restored dir on the same addresses; the agent comes back
    // by itself with its old certificate.
    c.restart_hard().await;
    let agent = crate::common::Agent::run(&agent.state_dir);
    let node = c
        .wait_status("box", NodeStatus::Online, Duration::from_secs(30))
        .await;
    assert_eq!(node.id.to_string(), node_id, "the same node, not a new one");
    assert_eq!(c.nodes().await.len(), 1);
    let after = job_ids(&c).await;
    assert!(
        after.contains(&first),
        "a job from before the backup is kept"
    );
    assert!(
        after.iter().all(|id| before.contains(id)),
        "the restored controller knows only jobs the original had"
    );
    assert!(
        secret_opens(&c).await,
        "the restored key opens the stored secret"
    );
    let r = c
        .client
        .get(c.url("/api/v1/nodes"))
        .bearer_auth(&ci_token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "an API token from before the backup still works"
    );
    let id = inventory(&c, "box").await;
    c.wait_job(
        id.parse().unwrap(),
        "a job after the restore",
        Duration::from_secs(20),
        |j| j.state == nebula_types::jobs::JobState::Succeeded,
    )
    .await;
    drop(agent);
}

/// `nebula migrate` moves a stopped SQLite controller to PostgreSQL; it starts there with its
/// nodes, jobs, tokens and secrets, and the agent reconnects without joining again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_moves_a_sqlite_controller_to_postgres_and_agents_reconnect() {
    let Some(db) = PgDb::create() else { return };
    let work = tempfile::tempdir().unwrap();
    let mut c = Controller::start(ControllerOpts::default()).await;
    let (agent, node_id) = join_ready(&c, work.path(), "box", &[], None).await;
    let (status, v) = c
        .api(
            Method::PUT,
            "/api/v1/secrets/DB_PASSWORD",
            Some(json!({ "value": SECRET })),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let first = inventory(&c, "box").await;
    c.wait_job(
        first.parse().unwrap(),
        "a job",
        Duration::from_secs(20),
        |j| j.state == nebula_types::jobs::JobState::Succeeded,
    )
    .await;
    let (status, v) = c.put_map("# kept across the move\nservices: {}\n").await;
    assert_eq!(status, 200, "{v}");
    let map = c.get("/api/v1/desired").await;
    assert!(map["version"].as_i64().is_some(), "{map}");
    assert!(c.proc.terminate().success());

    let data = c.dir.path().join("data");
    let o = nebula(&[
        "migrate",
        "--to",
        &db.url,
        "--data-dir",
        &data.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("copied"), "{}", text(&o));
    assert_eq!(db.query("SELECT count(*) FROM nodes"), "1");
    assert_eq!(
        db.query(&format!(
            "SELECT count(*) FROM nodes WHERE id = '{node_id}'"
        )),
        "1"
    );
    // Again into the same (now full) database: refused.
    let o = nebula(&[
        "migrate",
        "--to",
        &db.url,
        "--data-dir",
        &data.display().to_string(),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("not empty"),
        "{}",
        text(&o)
    );

    c.opts.extra.push("--database-url");
    c.opts
        .extra
        .push(Box::leak(db.url.clone().into_boxed_str()));
    c.restart_hard().await;
    let node = c
        .wait_status("box", NodeStatus::Online, Duration::from_secs(30))
        .await;
    assert_eq!(node.id.to_string(), node_id);
    assert_eq!(c.nodes().await.len(), 1, "the agent did not join again");
    let ids = job_ids(&c).await;
    assert!(ids.contains(&first), "{first} not in {ids:?}");
    let moved = c.get("/api/v1/desired").await;
    assert_eq!(
        (&moved["version"], &moved["document"]),
        (&map["version"], &map["document"])
    );
    assert!(secret_opens(&c).await);
    let id = inventory(&c, "box").await;
    c.wait_job(
        id.parse().unwrap(),
        "a job on PostgreSQL",
        Duration::from_secs(20),
        |j| j.state == nebula_types::jobs::JobState::Succeeded,
    )
    .await;
    // The rows are in PostgreSQL, not in a SQLite file beside it.
    let n: u64 = db.query("SELECT count(*) FROM jobs").parse().unwrap();
    assert!(n >= 2, "{n}");
    drop(agent);
}
