//! `nebula-bench containers`: a container's log read through Nebula (agent, QUIC stream,
//! controller, server-sent events) against `docker logs` on the same host, with the controller's
//! CPU per 10,000 lines; and the round trip of one keystroke through `container exec` (WebSocket,
//! controller, QUIC, agent, runtime) against the runtime's own exec API called directly.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::ExecConfig;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::{cpu_ns, docker, join_token, start_controller, stats, KillOnDrop};

const IMAGE: &str = "nebula-test/busybox:1";

pub struct ContainersArgs {
    pub lines: usize,
    pub round_trips: usize,
    pub runs: usize,
    pub out: std::path::PathBuf,
}

struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

/// Read the whole log through the API; (lines, seconds).
async fn read_log(
    client: &reqwest::Client,
    url: &str,
    admin: &str,
) -> anyhow::Result<(usize, f64)> {
    let t = Instant::now();
    let mut resp = client
        .get(url)
        .bearer_auth(admin)
        .send()
        .await?
        .error_for_status()?;
    let mut lines = 0usize;
    let mut buf = String::new();
    while let Some(chunk) = resp.chunk().await? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find("\n\n") {
            let block: String = buf.drain(..pos + 2).collect();
            if block.starts_with("event: logs") || block.contains("\nevent: logs") {
                // Counted, not parsed: the client's own CPU would be measured too (this
                // host has two cores for everything).
                if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                    lines += data.matches("{\"t\":").count();
                }
            } else if block.contains("event: end") {
                return Ok((lines, t.elapsed().as_secs_f64()));
            } else if block.contains("event: error") {
                bail!("the log stream broke: {block}");
            }
        }
    }
    bail!("the log stream ended without its end event")
}

/// `docker logs` of the same container, to /dev/null; seconds.
fn docker_logs(name: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    let st = Command::new("docker")
        .args(["logs", "--timestamps", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("docker logs failed");
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Keystroke round trips through Nebula's exec WebSocket (`cat` echoes each byte); ms each.
async fn exec_round_trips(ws_url: &str, admin: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut req = ws_url.into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {admin}").parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let byte = b'a' + (i % 26) as u8;
        let t = Instant::now();
        ws.send(Message::binary(vec![byte])).await?;
        loop {
            match ws.next().await.context("the socket closed")?? {
                Message::Binary(b) if b.len() > 1 && b[1..].contains(&byte) => break,
                Message::Text(t) => bail!("exec ended: {t}"),
                _ => {}
            }
        }
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ws.send(Message::text(r#"{"eof":true}"#)).await?;
    Ok(out)
}

/// The same through the runtime's exec API directly (bollard); ms each.
async fn direct_round_trips(name: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let docker = bollard::Docker::connect_with_local_defaults()?;
    let exec = docker
        .create_exec(
            name,
            ExecConfig {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                cmd: Some(vec!["cat".into()]),
                ..Default::default()
            },
        )
        .await?;
    let StartExecResults::Attached {
        mut output,
        mut input,
    } = docker
        .start_exec(&exec.id, Some(StartExecOptions::default()))
        .await?
    else {
        bail!("not attached");
    };
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let byte = b'a' + (i % 26) as u8;
        let t = Instant::now();
        input.write_all(&[byte]).await?;
        input.flush().await?;
        loop {
            let chunk = output.next().await.context("exec output ended")??;
            if chunk.into_bytes().contains(&byte) {
                break;
            }
        }
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

pub async fn containers_bench(a: ContainersArgs) -> anyhow::Result<()> {
    let build = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/build-test-image");
    if !Command::new(build).arg(IMAGE).status()?.success() {
        bail!("building the test image failed");
    }
    let dir = tempfile::tempdir()?;
    let ctl = start_controller(dir.path(), "127.0.0.1:0", "127.0.0.1:0", &[])?;
    let client = reqwest::Client::new();
    let token = join_token(&client, ctl.http, &ctl.admin, 1).await?;
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[docker]\nexec = \"all\"\n")?;
    let agent = KillOnDrop(
        Command::new(crate::deploy::agent_bin()?)
            .args(["join", "--controller", &ctl.quic.to_string()])
            .args([
                "--token",
                &token.to_string(),
                "--name",
                "bench-box",
                "--state-dir",
            ])
            .arg(dir.path().join("agent"))
            .env("NEBULA_AGENT_CONFIG", &config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    let name = format!("bench-logs-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    let pad = "x".repeat(100);
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--log-opt",
        "max-size=1g",
        "--log-opt",
        "max-file=1",
        IMAGE,
        "sh",
        "-c",
        &format!(
            "seq 1 {} | sed 's/$/ {pad}/'; echo done; sleep 3600",
            a.lines
        ),
    ])?;
    eprintln!(
        "waiting for {} lines to be written and the node to list the container",
        a.lines
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let last = docker(&["logs", "--tail", "1", &name])?;
        let listed: serde_json::Value = client
            .get(format!("http://{}/api/v1/containers?q={name}", ctl.http))
            .bearer_auth(&ctl.admin)
            .send()
            .await?
            .json()
            .await?;
        if last.contains("done") && listed["items"].as_array().is_some_and(|i| !i.is_empty()) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the log was not written in time");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let url = format!(
        "http://{}/api/v1/nodes/bench-box/containers/{name}/logs?follow=false",
        ctl.http
    );
    let pid = ctl.child.id();
    let (mut nebula_rate, mut docker_rate, mut ratio, mut cpu_per_10k) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..a.runs {
        let cpu0 = cpu_ns(pid);
        let (lines, secs) = read_log(&client, &url, &ctl.admin).await?;
        let cpu = (cpu_ns(pid) - cpu0) as f64 / 1e9;
        let direct = docker_logs(&name)?;
        let expected = a.lines + 1;
        if lines != expected {
            bail!("read {lines} lines, expected {expected}");
        }
        nebula_rate.push(lines as f64 / secs);
        docker_rate.push(lines as f64 / direct);
        ratio.push(secs / direct);
        cpu_per_10k.push(cpu / lines as f64 * 10_000.0 * 1000.0);
        eprintln!(
            "run {run}: {lines} lines in {secs:.2} s through Nebula ({:.0}/s), {direct:.2} s by docker logs; controller CPU {:.1} ms per 10k lines",
            lines as f64 / secs,
            cpu / lines as f64 * 10_000.0 * 1000.0
        );
    }
    let ws = format!(
        "ws://{}/api/v1/nodes/bench-box/containers/{name}/exec?cmd=cat&tty=false",
        ctl.http
    );
    let mut via = Vec::new();
    let mut direct = Vec::new();
    for _ in 0..a.runs {
        via.extend(exec_round_trips(&ws, &ctl.admin, a.round_trips).await?);
        direct.extend(direct_round_trips(&name, a.round_trips).await?);
    }
    drop(agent);
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|x, y| x.total_cmp(y));
        crate::percentile(&v, 0.5)
    };
    let result = json!({
        "bench": "containers",
        "command": format!("cargo run --release -p nebula-bench -- containers --lines {} --round-trips {} --runs {}", a.lines, a.round_trips, a.runs),
        "host": "2-core build machine; controller, agent, Docker Engine and the bench on one host",
        "log_lines": a.lines + 1,
        "log_line_bytes": 100 + a.lines.to_string().len() + 2,
        "logs_lines_per_sec_nebula": stats(nebula_rate.clone()),
        "logs_lines_per_sec_docker_logs": stats(docker_rate.clone()),
        "logs_time_ratio_nebula_over_docker_logs": stats(ratio.clone()),
        "controller_cpu_ms_per_10k_lines": stats(cpu_per_10k.clone()),
        "exec_keystroke_round_trip_ms_nebula": stats(via.clone()),
        "exec_keystroke_round_trip_ms_direct": stats(direct.clone()),
        "exec_round_trip_added_ms_median": median(&via) - median(&direct),
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if let Some(p) = a.out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&result)? + "\n")?;
    eprintln!(
        "logs: median {:.0} lines/s through Nebula, {:.0} by docker logs; controller {:.1} ms CPU per 10k lines. exec: median round trip {:.2} ms through Nebula, {:.2} ms direct",
        median(&nebula_rate),
        median(&docker_rate),
        median(&cpu_per_10k),
        median(&via),
        median(&direct)
    );
    Ok(())
}
