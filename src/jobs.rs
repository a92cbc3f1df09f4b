//! `nebula run`, `jobs`, `job`, `logs`, `cancel` and `audit`: jobs from the command line, with
//! their output streamed live (server-sent events from `/api/v1/jobs/{id}/logs`).

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};

use crate::client::{print_json, s, table, Api};
use crate::Cli;

/// A non-zero exit status to leave with (the remote command's, where it had one).
#[derive(Debug)]
pub struct ExitStatus(pub u8);

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitStatus {}

#[derive(Args, Debug)]
#[command(after_help = "OP is one of:
  ping                         a round trip, does nothing
  inventory                    containers, facts, git repositories, agent version
  probe URL | HOST:PORT        an HTTP GET or a TCP connect from the node
  git-pull REPO | docker-restart CONTAINER | systemctl-restart UNIT
  NAME                         a command named in the node's exec.commands
  sh 'COMMAND'                 only where the node's config sets exec.allow_any

Examples:
  nebula run gpu-box git-pull /srv/app
  nebula run --selector gpu=true,min_free_vram_mb=8000 inventory
  nebula run --label zone=home --idempotent probe http://127.0.0.1:11434/")]
pub struct RunArgs {
    /// Pick the node: key=value labels, plus gpu=true|false, min_free_vram_mb=N, model=NAME
    /// (comma-separated). Without it, the first argument names the node.
    #[arg(long, short = 's')]
    selector: Option<String>,
    /// A label the node must carry, key=value (repeatable; implies a selector).
    #[arg(long = "label", short = 'l')]
    labels: Vec<String>,
    /// Must be over within this time (e.g. 30s, 10m); a queued job waits at most this long.
    #[arg(long)]
    deadline: Option<String>,
    /// Safe to run twice: retried when lost (possibly on another node).
    #[arg(long)]
    idempotent: bool,
    /// Tries in all for an idempotent job.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Probe timeout (e.g. 2s).
    #[arg(long)]
    timeout: Option<String>,
    /// Print the job id and return without waiting.
    #[arg(long, short = 'd')]
    detach: bool,
    /// [NODE] OP [ARGS...]
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    args: Vec<String>,
}

fn parse_selector(text: Option<&str>, labels: &[String]) -> anyhow::Result<Option<Value>> {
    if text.is_none() && labels.is_empty() {
        return Ok(None);
    }
    let mut sel = json!({"labels": {}});
    let parts = text
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .chain(labels.iter().map(String::as_str));
    for part in parts {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("selector part `{part}` must read key=value"))?;
        match k {
            "gpu" => {
                sel["gpu"] = json!(v
                    .parse::<bool>()
                    .with_context(|| format!("gpu={v}: use true or false"))?)
            }
            "min_free_vram_mb" => {
                sel["min_free_vram_mb"] = json!(v
                    .parse::<u64>()
                    .with_context(|| format!("min_free_vram_mb={v}: a number of MiB"))?)
            }
            "model" => sel["model"] = json!(v),
            _ => sel["labels"][k] = json!(v),
        }
    }
    Ok(Some(sel))
}

/// The work an OP and its arguments name.
fn work(op: &str, args: &[String], timeout: Option<&str>) -> anyhow::Result<Value> {
    if matches!(op, "ping" | "noop" | "inventory") && !args.is_empty() {
        anyhow::bail!(
            "`{op}` takes no arguments (options such as --deadline go before the node or selector)"
        );
    }
    Ok(match op {
        "ping" | "noop" => json!({"kind": "noop"}),
        "inventory" => json!({"kind": "inventory"}),
        "probe" => {
            let [target] = args else {
                anyhow::bail!("probe takes one argument: a URL or HOST:PORT");
            };
            let mut w = if target.starts_with("http://") || target.starts_with("https://") {
                json!({"kind": "probe", "http": target})
            } else {
                json!({"kind": "probe", "tcp": target.trim_start_matches("tcp://")})
            };
            if let Some(t) = timeout {
                w["timeout"] = json!(t);
            }
            w
        }
        _ => json!({"kind": "exec", "op": op, "args": args}),
    })
}

pub async fn run(cli: &Cli, a: &RunArgs) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let selector = parse_selector(a.selector.as_deref(), &a.labels)?;
    let mut rest = a.args.as_slice();
    let mut body = json!({"idempotent": a.idempotent});
    match selector {
        Some(sel) => body["selector"] = sel,
        None => {
            let (node, more) = rest
                .split_first()
                .context("name a node (or pass --selector), then the operation")?;
            body["node"] = json!(node);
            rest = more;
        }
    }
    let (op, args) = rest
        .split_first()
        .context("name an operation (see `nebula run --help`)")?;
    body["work"] = work(op, args, a.timeout.as_deref())?;
    if let Some(d) = &a.deadline {
        body["deadline"] = json!(d);
    }
    if let Some(m) = a.max_attempts {
        body["max_attempts"] = json!(m);
    }
    let job: Value = api.post("/api/v1/jobs", &body).await?;
    let id = s(&job["id"]);
    if a.detach {
        if cli.json {
            print_json(&job);
        } else {
            println!("{id}");
        }
        return Ok(());
    }
    if !cli.json {
        eprintln!("job {id} ({})", s(&job["work"]["kind"]));
    }
    let end = follow(&api, &id, true, !cli.json).await?;
    finish(cli, &end)
}

/// Print a finished job's outcome; a failed job is an error (with the remote exit status).
fn finish(cli: &Cli, end: &Value) -> anyhow::Result<()> {
    let state = s(&end["state"]);
    if cli.json {
        print_json(end);
    } else {
        if !end["output"].is_null() {
            print_json(&end["output"]);
        }
        let took = match (end["started_at"].as_i64(), end["finished_at"].as_i64()) {
            (Some(a), Some(b)) => format!(" in {}", humantime::format_duration(ms(b - a))),
            _ => String::new(),
        };
        let mut line = format!("{state} on {}{took}", s(&end["node"]));
        if let Some(code) = end["exit_code"].as_i64() {
            line.push_str(&format!(", exit status {code}"));
        }
        if let Some(e) = end["error"].as_str().or(end["reason"].as_str()) {
            if state != "succeeded" {
                line.push_str(&format!(": {e}"));
            }
        }
        eprintln!("{line}");
    }
    if state == "succeeded" {
        return Ok(());
    }
    let code = end["exit_code"]
        .as_i64()
        .filter(|c| (1..=255).contains(c))
        .unwrap_or(1) as u8;
    Err(ExitStatus(code).into())
}

fn ms(v: i64) -> Duration {
    Duration::from_millis(v.max(0) as u64)
}

/// Follow a job's log stream until its `end` event; lines go to stdout (stderr lines to stderr).
/// Returns the finished job (or, without `follow`, the job as it is).
async fn follow(api: &Api, id: &str, follow: bool, print: bool) -> anyhow::Result<Value> {
    let url = format!("{}/api/v1/jobs/{id}/logs?follow={follow}", api.base);
    let mut resp = api
        .http_long()
        .get(url)
        .bearer_auth(&api.token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .with_context(|| format!("cannot reach the controller at {}", api.base))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        anyhow::bail!(
            "{status}: {}",
            body["error"]["message"].as_str().unwrap_or("no details")
        );
    }
    let mut buf = String::new();
    let mut last = Value::Null;
    let stdout = std::io::stdout();
    while let Some(chunk) = resp.chunk().await.context("reading the log stream")? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find("\n\n") {
            let block: String = buf.drain(..pos + 2).collect();
            let mut event = "message";
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = if e.trim() == "log" {
                        "log"
                    } else if e.trim() == "end" {
                        "end"
                    } else if e.trim() == "state" {
                        "state"
                    } else {
                        "other"
                    };
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            let Ok(v) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            match event {
                "log" if print => {
                    let text = s(&v["line"]);
                    if v["stream"] == "stderr" || v["stream"] == "agent" {
                        eprintln!("{text}");
                    } else {
                        let mut out = stdout.lock();
                        let _ = writeln!(out, "{text}");
                        let _ = out.flush();
                    }
                }
                "state" => {
                    if print && v["state"] == "queued" {
                        if let Some(r) = v["reason"].as_str() {
                            eprintln!("waiting: {r}");
                        }
                    }
                    last = v;
                }
                "end" => return Ok(v),
                _ => {}
            }
        }
    }
    if follow {
        anyhow::bail!("the log stream ended before the job did");
    }
    Ok(last)
}

#[derive(Args, Debug)]
pub struct JobsArgs {
    /// queued, dispatched, running, succeeded, failed, cancelled, timed_out or lost.
    #[arg(long)]
    state: Option<String>,
    #[arg(long)]
    node: Option<String>,
    #[arg(long)]
    kind: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: u32,
}

pub fn age(created_ms: Option<i64>) -> String {
    let now = nebula_protocol::time::UnixMillis::now().as_i64();
    match created_ms {
        Some(c) => {
            let secs = ((now - c) / 1000).max(0) as u64;
            humantime::format_duration(Duration::from_secs(secs)).to_string()
        }
        None => "-".into(),
    }
}

fn what(job: &Value) -> String {
    let w = &job["work"];
    match w["kind"].as_str() {
        Some("exec") => {
            let args: Vec<String> = w["args"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            format!("{} {}", s(&w["op"]), args.join(" "))
                .trim()
                .to_owned()
        }
        Some("probe") => format!("probe {}", s(w.get("http").unwrap_or(&w["tcp"]))),
        Some(k) => k.to_owned(),
        None => "-".into(),
    }
}

/// Fetch one page of a list endpoint with optional filters; `None` when `--json` printed it.
async fn page(
    cli: &Cli,
    path: &str,
    limit: u32,
    filters: &[(&str, &Option<String>)],
) -> anyhow::Result<Option<Vec<Value>>> {
    let api = Api::new(cli)?;
    let mut q = vec![format!("limit={limit}")];
    for (k, v) in filters {
        if let Some(v) = v {
            q.push(format!("{k}={v}"));
        }
    }
    let page: Value = api.get(&format!("{path}?{}", q.join("&"))).await?;
    if cli.json {
        print_json(&page["items"]);
        return Ok(None);
    }
    Ok(Some(page["items"].as_array().cloned().unwrap_or_default()))
}

pub async fn jobs(cli: &Cli, a: &JobsArgs) -> anyhow::Result<()> {
    let filters = [("state", &a.state), ("node", &a.node), ("kind", &a.kind)];
    let Some(items) = page(cli, "/api/v1/jobs", a.limit, &filters).await? else {
        return Ok(());
    };
    let rows = items
        .iter()
        .map(|j| {
            vec![
                s(&j["id"]),
                what(j),
                s(&j["state"]),
                s(&j["node"]),
                age(j["created_at"].as_i64()),
                s(&j["created_by"]),
            ]
        })
        .collect();
    table(&["ID", "WHAT", "STATE", "NODE", "AGE", "BY"], rows);
    Ok(())
}

pub async fn job(cli: &Cli, id: &str) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let j: Value = api.get(&format!("/api/v1/jobs/{id}")).await?;
    if cli.json {
        print_json(&j);
        return Ok(());
    }
    let target = if let Some(n) = j["target"]["node"].as_str() {
        format!("node {n}")
    } else {
        format!("selector {}", j["target"]["selector"])
    };
    for (k, v) in [
        ("id", s(&j["id"])),
        ("what", what(&j)),
        ("target", target),
        ("state", s(&j["state"])),
        ("node", s(&j["node"])),
        (
            "attempt",
            format!("{} of {}", s(&j["attempt"]), s(&j["max_attempts"])),
        ),
        (
            "created",
            format!(
                "{} ago by {}",
                age(j["created_at"].as_i64()),
                s(&j["created_by"])
            ),
        ),
        ("routing", s(&j["routing"])),
        ("reason", s(&j["reason"])),
        ("exit code", s(&j["exit_code"])),
        ("error", s(&j["error"])),
    ] {
        println!("{k:<10} {v}");
    }
    if !j["output"].is_null() {
        print_json(&j["output"]);
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Keep following until the job ends.
    #[arg(long, short = 'f')]
    follow: bool,
    id: String,
}

pub async fn logs(cli: &Cli, a: &LogsArgs) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let end = follow(&api, &a.id, a.follow, true).await?;
    if a.follow {
        finish(cli, &end)?;
    }
    Ok(())
}

pub async fn cancel(cli: &Cli, id: &str) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let j: Value = api
        .post(&format!("/api/v1/jobs/{id}/cancel"), &json!({}))
        .await?;
    if cli.json {
        print_json(&j);
    } else if j["state"] == "cancelled" {
        println!("job {id} cancelled");
    } else {
        println!("job {id}: cancel sent to {}", s(&j["node"]));
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    #[arg(long)]
    actor: Option<String>,
    /// e.g. job.create, job.cancel, token.create, node.remove
    #[arg(long)]
    action: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: u32,
}

pub async fn audit(cli: &Cli, a: &AuditArgs) -> anyhow::Result<()> {
    let filters = [("actor", &a.actor), ("action", &a.action)];
    let Some(items) = page(cli, "/api/v1/audit", a.limit, &filters).await? else {
        return Ok(());
    };
    let rows = items
        .iter()
        .map(|e| {
            vec![
                age(e["at"].as_i64()),
                s(&e["actor"]),
                s(&e["action"]),
                s(&e["target"]),
            ]
        })
        .collect();
    table(&["AGO", "WHO", "ACTION", "TARGET"], rows);
    Ok(())
}
