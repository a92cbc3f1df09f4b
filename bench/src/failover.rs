//! `nebula-bench failover`: three `nebula serve` replicas on one PostgreSQL database (the keys
//! shared with `nebula replica add`/`join`); the leader is killed (SIGKILL) again and again,
//! and each time the bench measures how long until another replica leads with its reconciler
//! running, then starts the killed one again as a follower. A few clean stops (SIGTERM)
//! measure the handover of a released lease.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::{nebula_bin, start_controller, stats, ControllerProc};

async fn get(c: &reqwest::Client, p: &ControllerProc, path: &str) -> Option<Value> {
    let r = c
        .get(format!("http://{}{path}", p.http))
        .bearer_auth(p.admin.trim())
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    r.status().is_success().then_some(())?;
    r.json().await.ok()
}

/// The replica that leads with its reconciler running, if exactly one does now.
pub(crate) async fn leader(
    c: &reqwest::Client,
    all: &[Option<ControllerProc>],
) -> Option<(usize, i64)> {
    let mut found = None;
    for (i, p) in all.iter().enumerate() {
        let Some(p) = p else { continue };
        let Some(v) = get(c, p, "/api/v1/replicas").await else {
            continue;
        };
        if v["leader"] != v["this"] {
            continue;
        }
        let tasks = get(c, p, "/api/v1/tasks").await?;
        let running = tasks
            .as_array()?
            .iter()
            .any(|t| t["name"] == "reconciler" && t["state"] != "waiting-for-leadership");
        if running {
            found = Some((i, v["term"].as_i64()?));
        }
    }
    found
}

pub(crate) async fn wait_leader(
    c: &reqwest::Client,
    all: &[Option<ControllerProc>],
    above: i64,
) -> anyhow::Result<(usize, i64, Duration)> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        if let Some((i, term)) = leader(c, all).await {
            if term > above {
                return Ok((i, term, t0.elapsed()));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("no leader above term {above} within 60 s")
}

pub(crate) fn start(dir: &Path, url: &str, flags: &[&str]) -> anyhow::Result<ControllerProc> {
    let mut all = vec!["--database-url", url];
    all.extend_from_slice(flags);
    start_controller(dir, "127.0.0.1:0", "127.0.0.1:0", &all)
}

/// Three replicas on the database at `url`, in `work/r0..r2`: the first makes the keys, the
/// others get them with `nebula replica add`/`join`.
pub(crate) fn three_replicas(
    work: &Path,
    url: &str,
    flags: &[&str],
) -> anyhow::Result<Vec<Option<ControllerProc>>> {
    let dirs: Vec<_> = (0..3).map(|i| work.join(format!("r{i}"))).collect();
    for d in &dirs {
        std::fs::create_dir_all(d)?;
    }
    let first = start(&dirs[0], url, flags)?;
    let pass = work.join("pass");
    std::fs::write(&pass, "bench replica passphrase")?;
    let bundle = work.join("bundle");
    let run = |args: &[&std::ffi::OsStr]| -> anyhow::Result<()> {
        let o = Command::new(nebula_bin()?).args(args).output()?;
        if !o.status.success() {
            bail!("nebula {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(())
    };
    let data0 = dirs[0].join("data");
    run(&[
        "replica".as_ref(),
        "add".as_ref(),
        bundle.as_os_str(),
        "--data-dir".as_ref(),
        data0.as_os_str(),
        "--passphrase-file".as_ref(),
        pass.as_os_str(),
    ])?;
    let mut all: Vec<Option<ControllerProc>> = vec![Some(first)];
    for d in &dirs[1..] {
        let data = d.join("data");
        run(&[
            "replica".as_ref(),
            "join".as_ref(),
            bundle.as_os_str(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--passphrase-file".as_ref(),
            pass.as_os_str(),
        ])?;
        all.push(Some(start(d, url, flags)?));
    }
    Ok(all)
}

pub async fn failover_bench(
    url: &str,
    kills: usize,
    stops: usize,
    out: &Path,
) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let dirs: Vec<_> = (0..3).map(|i| work.path().join(format!("r{i}"))).collect();
    let mut all = three_replicas(work.path(), url, &[])?;
    let c = reqwest::Client::new();
    let (mut lead, mut term, _) = wait_leader(&c, &all, 0).await?;
    let mut after_kill = Vec::new();
    for n in 0..kills {
        let mut p = all[lead].take().context("the leader runs")?;
        let killed = Instant::now();
        p.child.kill()?;
        p.child.wait()?;
        let (next, next_term, _) = wait_leader(&c, &all, term).await?;
        let t = killed.elapsed().as_secs_f64();
        println!(
            "kill {}: replica {next} leads (term {next_term}) after {t:.2} s",
            n + 1
        );
        after_kill.push(t);
        drop(p);
        all[lead] = Some(start(&dirs[lead], url, &[])?);
        (lead, term) = (next, next_term);
    }
    let mut after_stop = Vec::new();
    for n in 0..stops {
        let mut p = all[lead].take().context("the leader runs")?;
        let stopped = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &p.child.id().to_string()])
            .status();
        let (next, next_term, _) = wait_leader(&c, &all, term).await?;
        let t = stopped.elapsed().as_secs_f64();
        println!(
            "stop {}: replica {next} leads (term {next_term}) after {t:.2} s",
            n + 1
        );
        after_stop.push(t);
        p.child.wait()?;
        drop(p);
        all[lead] = Some(start(&dirs[lead], url, &[])?);
        (lead, term) = (next, next_term);
    }
    let result = json!({
        "bench": "failover",
        "replicas": 3,
        "lease": {"ttl_s": 6, "renew_s": 2, "poll_s": 1},
        "measured": "from the signal to another replica answering GET /api/v1/replicas as the leader with its reconciler task running",
        "after_kill_s": stats(after_kill),
        "after_clean_stop_s": stats(after_stop),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "command": format!("nebula-bench failover --database-url postgres://… --kills {kills} --stops {stops}"),
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&result)? + "\n")?;
    Ok(())
}
