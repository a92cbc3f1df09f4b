//! `nebula containers` and `nebula container ...`: every container in the fleet, one
//! container, actions on it (jobs on its node, followed to the end) and its log.

use std::io::Write;

use clap::{Args, Subcommand};
use nebula_types::api::containers::{
    ContainerActionRequest, ContainerActionView, ContainerLogLine, ContainerRow, ContainerView,
};
use nebula_types::api::Page;

use crate::client::{labels, opt, print_json, table, Api};
use crate::Cli;

#[derive(Args, Debug)]
pub struct ContainersArgs {
    /// Only containers whose node, name, image, id or service contains this (any case).
    search: Option<String>,
    #[arg(long)]
    node: Option<String>,
    /// running, exited, paused, restarting, created, dead.
    #[arg(long)]
    state: Option<String>,
    /// healthy, unhealthy, starting, none.
    #[arg(long)]
    health: Option<String>,
    /// key=value.
    #[arg(long)]
    label: Option<String>,
    /// Only containers Nebula manages.
    #[arg(long, conflicts_with = "unmanaged")]
    managed: bool,
    /// Only containers Nebula does not manage.
    #[arg(long)]
    unmanaged: bool,
}

#[derive(Subcommand, Debug)]
pub enum ContainerCommand {
    /// One container: state, ports, uptime, and what its node's policy allows.
    Show {
        node: String,
        container: String,
    },
    /// Print a container's log (stdout to stdout, stderr to stderr); -f follows it.
    Logs(LogsArgs),
    /// Start a stopped container.
    Start(ActionArgs),
    /// Stop a container (SIGTERM, then SIGKILL after its stop timeout).
    Stop(ActionArgs),
    Restart(ActionArgs),
    /// SIGKILL a container.
    Kill(ActionArgs),
    /// Remove a container (a running one is killed first; its volumes stay).
    #[command(alias = "remove")]
    Rm(ActionArgs),
    /// Pull a container's image again (restart it afterwards to use it).
    Pull(ActionArgs),
    /// Run a command in a container with a terminal: `exec NODE NAME -- sh`.
    Exec(crate::exec::ExecArgs),
}

#[derive(Args, Debug)]
pub struct ActionArgs {
    node: String,
    container: String,
    /// Print the job's id and return at once.
    #[arg(long)]
    detach: bool,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    node: String,
    container: String,
    /// Keep following new lines until interrupted.
    #[arg(short, long)]
    follow: bool,
    /// Only the last N lines (then new ones, with -f).
    #[arg(long)]
    tail: Option<u32>,
    /// Only lines from this time on: a duration back from now (10m) or an RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Start each line with the time the container wrote it.
    #[arg(short, long)]
    timestamps: bool,
}

pub async fn containers(cli: &Cli, a: &ContainersArgs) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let mut q: Vec<(&str, String)> = vec![("limit", "5000".into())];
    for (k, v) in [
        ("q", &a.search),
        ("node", &a.node),
        ("state", &a.state),
        ("health", &a.health),
        ("label", &a.label),
    ] {
        if let Some(v) = v {
            q.push((k, v.clone()));
        }
    }
    if a.managed || a.unmanaged {
        q.push(("managed", a.managed.to_string()));
    }
    let mut items: Vec<ContainerRow> = Vec::new();
    loop {
        let page: Page<ContainerRow> = api.get_query("/api/v1/containers", &q).await?;
        items.extend(page.items);
        match page.next_cursor {
            Some(c) => {
                q.retain(|(k, _)| *k != "cursor");
                q.push(("cursor", c));
            }
            None => break,
        }
    }
    if cli.json {
        print_json(&items);
        return Ok(());
    }
    let rows = items
        .iter()
        .map(|c| {
            vec![
                c.node.clone(),
                c.name.clone(),
                c.image.clone(),
                c.state.clone(),
                c.health.clone(),
                opt(c.uptime_secs.map(uptime)),
                opt(c.cpu_percent.map(|p| format!("{p:.1}%"))),
                opt(c.memory_used_bytes.map(mib)),
                if c.ports.is_empty() {
                    "-".into()
                } else {
                    c.ports.join(",")
                },
                match &c.service {
                    Some(s) => format!("yes ({s})"),
                    None if c.managed => "yes".into(),
                    None => "no".into(),
                },
            ]
        })
        .collect();
    table(
        &[
            "NODE", "NAME", "IMAGE", "STATE", "HEALTH", "UPTIME", "CPU", "MEM", "PORTS", "MANAGED",
        ],
        rows,
    );
    Ok(())
}

fn uptime(secs: u64) -> String {
    // Whole units people read at a glance: 3d4h, 5h12m, 42m, 17s.
    let (d, h, m) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h{m}m"),
        (d, h, _) => format!("{d}d{h}h"),
    }
}

fn mib(b: u64) -> String {
    format!("{:.0}MiB", b as f64 / (1u64 << 20) as f64)
}

fn path(node: &str, container: &str) -> String {
    format!("/api/v1/nodes/{node}/containers/{container}")
}

pub async fn container(cli: &Cli, cmd: &ContainerCommand) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let (a, action) = match cmd {
        ContainerCommand::Show { node, container } => {
            return show(cli, &api, node, container).await
        }
        ContainerCommand::Logs(a) => return logs(&api, a).await,
        ContainerCommand::Exec(a) => return crate::exec::exec(cli, a).await,
        ContainerCommand::Start(a) => (a, "start"),
        ContainerCommand::Stop(a) => (a, "stop"),
        ContainerCommand::Restart(a) => (a, "restart"),
        ContainerCommand::Kill(a) => (a, "kill"),
        ContainerCommand::Rm(a) => (a, "remove"),
        ContainerCommand::Pull(a) => (a, "pull"),
    };
    let body = ContainerActionRequest {
        action: action.into(),
    };
    let done: ContainerActionView = api
        .post(&format!("{}/actions", path(&a.node, &a.container)), &body)
        .await?;
    if let Some(w) = &done.warning {
        eprintln!("warning: {w}");
    }
    let id = done.job.record.id.to_string();
    if a.detach {
        if cli.json {
            print_json(&done);
        } else {
            println!("{id}");
        }
        return Ok(());
    }
    if !cli.json {
        eprintln!("{action} {} on {}: job {id}", a.container, a.node);
    }
    let end = crate::jobs::follow(&api, &id, true, !cli.json).await?;
    crate::jobs::finish(cli, end.as_ref())
}

async fn show(cli: &Cli, api: &Api, node: &str, container: &str) -> anyhow::Result<()> {
    let v: ContainerView = api.get(&path(node, container)).await?;
    if cli.json {
        print_json(&v);
        return Ok(());
    }
    let c = &v.container;
    let rows = vec![
        ("node", c.node.clone()),
        ("name", c.name.clone()),
        ("id", c.id.chars().take(12).collect()),
        ("image", c.image.clone()),
        ("state", format!("{} (health: {})", c.state, c.health)),
        ("started", opt(c.started_at.as_ref())),
        ("uptime", opt(c.uptime_secs.map(uptime))),
        ("restarts", c.restart_count.to_string()),
        ("cpu", opt(c.cpu_percent.map(|p| format!("{p:.1}%")))),
        ("memory", opt(c.memory_used_bytes.map(mib))),
        (
            "ports",
            if c.ports.is_empty() {
                "-".into()
            } else {
                c.ports.join(", ")
            },
        ),
        (
            "managed",
            match &c.service {
                Some(s) => format!("yes, service {s}"),
                None => "no".into(),
            },
        ),
        ("labels", labels(&c.labels)),
        (
            "policy",
            match &v.policy {
                Some(p) => format!("control={} exec={} logs={}", p.control, p.exec, p.logs),
                None => "not reported (agent offline or older than 1.6)".into(),
            },
        ),
    ];
    for (k, val) in rows {
        println!("{k:<9} {val}");
    }
    for (rule, why) in &v.refusals {
        println!("{:<9} {why}", format!("no {rule}"));
    }
    Ok(())
}

async fn logs(api: &Api, a: &LogsArgs) -> anyhow::Result<()> {
    let mut q: Vec<(&str, String)> = vec![("follow", a.follow.to_string())];
    if let Some(t) = a.tail {
        q.push(("tail", t.to_string()));
    }
    if let Some(s) = &a.since {
        q.push(("since", s.clone()));
    }
    let url = format!("{}{}/logs", api.base, path(&a.node, &a.container));
    let req = api.http_long().get(url).query(&q).bearer_auth(&api.token);
    let mut events = crate::sse::Events::open(req, &api.base).await?;
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    while let Some((event, data)) = events.next().await? {
        match event.as_str() {
            "logs" => {
                let lines: Vec<ContainerLogLine> = serde_json::from_str(&data)?;
                let (mut out, mut err) = (stdout.lock(), stderr.lock());
                for l in &lines {
                    let w: &mut dyn Write = if l.stream == "stderr" {
                        &mut err
                    } else {
                        &mut out
                    };
                    let _ = if a.timestamps {
                        writeln!(w, "{} {}", l.t, l.line)
                    } else {
                        writeln!(w, "{}", l.line)
                    };
                }
                let _ = out.flush();
            }
            "end" => return Ok(()),
            "error" => {
                let v: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
                anyhow::bail!(
                    "{}",
                    v["message"].as_str().unwrap_or("the log stream broke")
                );
            }
            _ => {}
        }
    }
    if a.follow {
        anyhow::bail!("the controller closed the log stream");
    }
    Ok(())
}
