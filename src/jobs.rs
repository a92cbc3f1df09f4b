//! `nebula run`, `jobs`, `job`, `logs`, `cancel` and `audit`: jobs from the command line, with
//! their output streamed live (server-sent events from `/api/v1/jobs/{id}/logs`).

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use nebula_types::api::jobs::{CreateJob, JobView};
use nebula_types::api::Page;
use nebula_types::jobs::{AuditRecord, JobLogLine, JobRecord, JobState, Selector, Target, Work};

use crate::client::{opt, print_json, table, Api};
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

fn parse_selector(text: Option<&str>, labels: &[String]) -> anyhow::Result<Option<Selector>> {
    if text.is_none() && labels.is_empty() {
        return Ok(None);
    }
    let mut sel = Selector::default();
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
                let gpu = v.parse::<bool>();
                sel.gpu = Some(gpu.with_context(|| format!("gpu={v}: use true or false"))?)
            }
            "min_free_vram_mb" => {
                let mb = v.parse::<u64>();
                sel.min_free_vram_mb =
                    Some(mb.with_context(|| format!("min_free_vram_mb={v}: a number of MiB"))?)
            }
            "model" => sel.model = Some(v.to_owned()),
            _ => {
                sel.labels.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    Ok(Some(sel))
}

/// The work an OP and its arguments name.
fn work(op: &str, args: &[String], timeout: Option<&str>) -> anyhow::Result<Work> {
    if matches!(op, "ping" | "noop" | "inventory") && !args.is_empty() {
        anyhow::bail!(
            "`{op}` takes no arguments (options such as --deadline go before the node or selector)"
        );
    }
    Ok(match op {
        "ping" | "noop" => Work::Noop,
        "inventory" => Work::Inventory,
        "probe" => {
            let [target] = args else {
                anyhow::bail!("probe takes one argument: a URL or HOST:PORT");
            };
            let timeout = timeout
                .map(|t| humantime::parse_duration(t).with_context(|| format!("--timeout {t}")))
                .transpose()?;
            let http = target.starts_with("http://") || target.starts_with("https://");
            Work::Probe {
                http: http.then(|| target.clone()),
                tcp: (!http).then(|| target.trim_start_matches("tcp://").to_owned()),
                timeout,
            }
        }
        _ => Work::Exec {
            op: op.to_owned(),
            args: args.to_vec(),
        },
    })
}

pub async fn run(cli: &Cli, a: &RunArgs) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let selector = parse_selector(a.selector.as_deref(), &a.labels)?;
    let mut rest = a.args.as_slice();
    let mut node = None;
    if selector.is_none() {
        let (name, more) = rest
            .split_first()
            .context("name a node (or pass --selector), then the operation")?;
        node = Some(name.clone());
        rest = more;
    }
    let (op, args) = rest
        .split_first()
        .context("name an operation (see `nebula run --help`)")?;
    let body = CreateJob {
        node,
        selector,
        work: work(op, args, a.timeout.as_deref())?,
        deadline: a.deadline.clone(),
        idempotent: a.idempotent,
        max_attempts: a.max_attempts,
        wait: None,
    };
    let job: JobRecord = api.post("/api/v1/jobs", &body).await?;
    let id = job.id.to_string();
    if a.detach {
        if cli.json {
            print_json(&job);
        } else {
            println!("{id}");
        }
        return Ok(());
    }
    if !cli.json {
        eprintln!("job {id} ({})", job.work.kind());
    }
    let end = follow(&api, &id, true, !cli.json).await?;
    finish(cli, end.as_ref())
}

/// Print a finished job's outcome; a failed job is an error (with the remote exit status).
pub(crate) fn finish(cli: &Cli, end: Option<&JobRecord>) -> anyhow::Result<()> {
    let Some(end) = end else {
        anyhow::bail!("the log stream ended before the job did");
    };
    if cli.json {
        print_json(end);
    } else {
        if let Some(output) = &end.output {
            print_json(output);
        }
        let took = match (end.started_at, end.finished_at) {
            (Some(a), Some(b)) => format!(" in {}", humantime::format_duration(ms(b - a))),
            _ => String::new(),
        };
        let mut line = format!("{} on {}{took}", end.state.as_str(), opt(end.node.as_ref()));
        if let Some(code) = end.exit_code {
            line.push_str(&format!(", exit status {code}"));
        }
        if let Some(e) = end.error.as_ref().or(end.reason.as_ref()) {
            if end.state != JobState::Succeeded {
                line.push_str(&format!(": {e}"));
            }
        }
        eprintln!("{line}");
    }
    if end.state == JobState::Succeeded {
        return Ok(());
    }
    let code = end.exit_code.filter(|c| (1..=255).contains(c)).unwrap_or(1) as u8;
    Err(ExitStatus(code).into())
}

fn ms(v: i64) -> Duration {
    Duration::from_millis(v.max(0) as u64)
}

/// Follow a job's log stream until its `end` event; lines go to stdout (stderr lines to stderr).
/// Returns the finished job (or, without `follow`, the job as it is; `None` when the stream
/// said nothing of it).
pub(crate) async fn follow(
    api: &Api,
    id: &str,
    follow: bool,
    print: bool,
) -> anyhow::Result<Option<JobRecord>> {
    let url = format!("{}/api/v1/jobs/{id}/logs?follow={follow}", api.base);
    let req = api.http_long().get(url).bearer_auth(&api.token);
    let mut events = crate::sse::Events::open(req, &api.base).await?;
    let mut last = None;
    let stdout = std::io::stdout();
    while let Some((event, data)) = events.next().await? {
        match event.as_str() {
            "log" if print => {
                let Ok(l) = serde_json::from_str::<JobLogLine>(&data) else {
                    continue;
                };
                if l.stream == "stderr" || l.stream == "agent" {
                    eprintln!("{}", l.line);
                } else {
                    let mut out = stdout.lock();
                    let _ = writeln!(out, "{}", l.line);
                    let _ = out.flush();
                }
            }
            "state" | "end" => {
                let Ok(rec) = serde_json::from_str::<JobRecord>(&data) else {
                    continue;
                };
                if event == "end" {
                    return Ok(Some(rec));
                }
                if print && rec.state == JobState::Queued {
                    if let Some(r) = &rec.reason {
                        eprintln!("waiting: {r}");
                    }
                }
                last = Some(rec);
            }
            _ => {}
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

fn what(job: &JobRecord) -> String {
    job.work.summary()
}

/// Fetch one page of a list endpoint with optional filters; `None` when `--json` printed it.
async fn page<T: serde::de::DeserializeOwned + serde::Serialize>(
    cli: &Cli,
    path: &str,
    limit: u32,
    filters: &[(&str, &Option<String>)],
) -> anyhow::Result<Option<Vec<T>>> {
    let api = Api::new(cli)?;
    let mut q = vec![format!("limit={limit}")];
    for (k, v) in filters {
        if let Some(v) = v {
            q.push(format!("{k}={v}"));
        }
    }
    let page: Page<T> = api.get(&format!("{path}?{}", q.join("&"))).await?;
    if cli.json {
        print_json(&page.items);
        return Ok(None);
    }
    Ok(Some(page.items))
}

pub async fn jobs(cli: &Cli, a: &JobsArgs) -> anyhow::Result<()> {
    let filters = [("state", &a.state), ("node", &a.node), ("kind", &a.kind)];
    let Some(items) = page::<JobRecord>(cli, "/api/v1/jobs", a.limit, &filters).await? else {
        return Ok(());
    };
    let rows = items
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                what(j),
                j.state.as_str().to_owned(),
                opt(j.node.as_ref()),
                age(Some(j.created_at)),
                j.created_by.clone(),
            ]
        })
        .collect();
    table(&["ID", "WHAT", "STATE", "NODE", "AGE", "BY"], rows);
    Ok(())
}

pub async fn job(cli: &Cli, id: &str) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let view: JobView = api.get(&format!("/api/v1/jobs/{id}")).await?;
    if cli.json {
        print_json(&view);
        return Ok(());
    }
    let j = &view.record;
    let target = match &j.target {
        Target::Node(n) => format!("node {n}"),
        Target::Selector(s) => format!("selector {s}"),
    };
    for (k, v) in [
        ("id", j.id.to_string()),
        ("what", what(j)),
        ("target", target),
        ("state", j.state.as_str().to_owned()),
        ("node", opt(j.node.as_ref())),
        ("attempt", format!("{} of {}", j.attempt, j.max_attempts)),
        (
            "created",
            format!("{} ago by {}", age(Some(j.created_at)), j.created_by),
        ),
        ("routing", opt(j.routing.as_ref())),
        ("reason", opt(j.reason.as_ref())),
        ("exit code", opt(j.exit_code)),
        ("error", opt(j.error.as_ref())),
    ] {
        println!("{k:<10} {v}");
    }
    if let Some(output) = &j.output {
        print_json(output);
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
        finish(cli, end.as_ref())?;
    }
    Ok(())
}

pub async fn cancel(cli: &Cli, id: &str) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let j: JobRecord = api
        .post(
            &format!("/api/v1/jobs/{id}/cancel"),
            &serde_json::Map::new(),
        )
        .await?;
    if cli.json {
        print_json(&j);
    } else if j.state == JobState::Cancelled {
        println!("job {id} cancelled");
    } else {
        println!("job {id}: cancel sent to {}", opt(j.node.as_ref()));
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
    /// The front end: api, dashboard, discord, internal.
    #[arg(long)]
    via: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: u32,
}

pub async fn audit(cli: &Cli, a: &AuditArgs) -> anyhow::Result<()> {
    let filters = [("actor", &a.actor), ("action", &a.action), ("via", &a.via)];
    let Some(items) = page::<AuditRecord>(cli, "/api/v1/audit", a.limit, &filters).await? else {
        return Ok(());
    };
    let rows = items
        .iter()
        .map(|e| {
            vec![
                age(Some(e.at)),
                e.actor.clone(),
                e.detail["via"].as_str().unwrap_or("").to_owned(),
                e.action.clone(),
                e.target.clone(),
            ]
        })
        .collect();
    table(&["AGO", "WHO", "VIA", "ACTION", "TARGET"], rows);
    Ok(())
}
