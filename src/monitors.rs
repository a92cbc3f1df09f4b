//! `nebula monitors` and `nebula monitor show|add|rm`: checks run from nodes, their state,
//! uptime and latency.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use nebula_desired::map::monitors::MonitorDecl;
use nebula_types::api::monitors::{CreateMonitor, MonitorDetail, MonitorView};

use crate::client::{print_json, table, Api};
use crate::Cli;

#[derive(Subcommand, Debug)]
pub enum MonitorCommand {
    /// One monitor: each node's state, uptime, and its recent checks.
    Show { name: String },
    /// Add (or replace) a monitor run from chosen nodes.
    Add(Box<AddArgs>),
    /// Remove a monitor made with `add` (the map's own are removed from the map).
    Rm { name: String },
}

#[derive(Args, Debug)]
pub struct AddArgs {
    name: String,
    /// GET this URL (up on 2xx/3xx, or one of --status).
    #[arg(long, group = "check")]
    http: Option<String>,
    /// Connect to HOST:PORT.
    #[arg(long, group = "check")]
    tcp: Option<String>,
    /// Ping this host (ICMP where permitted, else TCP to --ping-port).
    #[arg(long, group = "check")]
    ping: Option<String>,
    /// Resolve this name.
    #[arg(long, group = "check")]
    dns: Option<String>,
    /// HTTP statuses that count as up.
    #[arg(long, value_delimiter = ',')]
    status: Vec<u16>,
    /// Text the HTTP body must contain.
    #[arg(long)]
    body: Option<String>,
    /// Accept a certificate no root vouches for.
    #[arg(long)]
    insecure: bool,
    #[arg(long)]
    ping_port: Option<u16>,
    /// A or AAAA.
    #[arg(long)]
    record: Option<String>,
    /// The DNS server to ask.
    #[arg(long)]
    server: Option<String>,
    /// An address the DNS answer must hold.
    #[arg(long)]
    expect: Option<String>,
    /// Time between checks (default 30s).
    #[arg(long)]
    interval: Option<String>,
    /// Time one check may take (default 10s).
    #[arg(long)]
    timeout: Option<String>,
    /// A node that runs it (repeat for more).
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// Or every node with this label KEY=VALUE (repeat for more).
    #[arg(long = "label")]
    labels: Vec<String>,
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |p| format!("{p:.2}%"))
}

pub async fn list(cli: &Cli) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let items: Vec<MonitorView> = api.get("/api/v1/monitors").await?;
    if cli.json {
        print_json(&items);
        return Ok(());
    }
    if items.is_empty() {
        println!("no monitors (declare them under `monitors:` in the service map, or `nebula monitor add`)");
        return Ok(());
    }
    let mut rows = Vec::new();
    for m in &items {
        if m.nodes.is_empty() {
            rows.push(vec![
                m.name.clone(),
                m.kind.clone(),
                m.target.clone(),
                "-".into(),
                "idle".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for n in &m.nodes {
            rows.push(vec![
                m.name.clone(),
                m.kind.clone(),
                m.target.clone(),
                n.node.clone(),
                match &n.error {
                    Some(e) if n.status == "down" => format!("down: {e}"),
                    _ => n.status.clone(),
                },
                n.latency_ms.map_or("-".into(), |l| format!("{l:.1} ms")),
                pct(n.uptime_24h),
                pct(n.uptime_7d),
                pct(n.uptime_30d),
            ]);
        }
    }
    table(
        &[
            "NAME", "KIND", "TARGET", "NODE", "STATUS", "LATENCY", "24H", "7D", "30D",
        ],
        rows,
    );
    Ok(())
}

/// The last checks as a bar: `█` up, `▁` down.
fn bar(up: impl Iterator<Item = bool>) -> String {
    up.map(|u| if u { '█' } else { '▁' }).collect()
}

pub async fn command(cli: &Cli, cmd: &MonitorCommand) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    match cmd {
        MonitorCommand::Show { name } => {
            let d: MonitorDetail = api.get(&format!("/api/v1/monitors/{name}")).await?;
            if cli.json {
                print_json(&d);
                return Ok(());
            }
            let m = &d.monitor;
            println!(
                "{} ({} {}), every {}s from {}, {}",
                m.name, m.kind, m.target, m.interval_secs, m.source, m.status
            );
            for (n, s) in m.nodes.iter().zip(&d.series) {
                println!();
                println!(
                    "  {}: {} since {}",
                    n.node,
                    n.status,
                    n.since.as_deref().unwrap_or("-")
                );
                println!(
                    "    uptime 24h {}  7d {}  30d {}",
                    pct(n.uptime_24h),
                    pct(n.uptime_7d),
                    pct(n.uptime_30d)
                );
                if let Some(e) = &n.error {
                    println!("    error: {e}");
                }
                if let Some(c) = &n.certificate_expires {
                    println!("    certificate expires {c}");
                }
                if !s.recent.is_empty() {
                    let lat: Vec<f64> = s.recent.iter().map(|p| p.latency_ms).collect();
                    let max = lat.iter().cloned().fold(0.0, f64::max);
                    let avg = lat.iter().sum::<f64>() / lat.len() as f64;
                    println!(
                        "    last {} checks {}",
                        s.recent.len(),
                        bar(s.recent.iter().map(|p| p.up))
                    );
                    println!("    latency avg {avg:.1} ms, max {max:.1} ms");
                }
            }
        }
        MonitorCommand::Add(a) => {
            let labels: BTreeMap<String, String> = a
                .labels
                .iter()
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| anyhow::anyhow!("--label {l}: use KEY=VALUE"))
                })
                .collect::<anyhow::Result<_>>()?;
            let duration = |s: &Option<String>| -> anyhow::Result<_> {
                s.as_deref()
                    .map(humantime::parse_duration)
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("{e}"))
            };
            let body = CreateMonitor {
                name: a.name.clone(),
                monitor: MonitorDecl {
                    http: a.http.clone(),
                    status: a.status.clone(),
                    body: a.body.clone(),
                    insecure: a.insecure,
                    tcp: a.tcp.clone(),
                    ping: a.ping.clone(),
                    ping_port: a.ping_port,
                    dns: a.dns.clone(),
                    record: a.record.clone(),
                    server: a.server.clone(),
                    expect: a.expect.clone(),
                    interval: duration(&a.interval)?,
                    timeout: duration(&a.timeout)?,
                    nodes: a.nodes.clone(),
                    labels,
                },
            };
            let m: MonitorView = api.post("/api/v1/monitors", &body).await?;
            if cli.json {
                print_json(&m);
            } else {
                let nodes: Vec<&str> = m.nodes.iter().map(|n| n.node.as_str()).collect();
                println!(
                    "monitor {} runs on {}",
                    m.name,
                    if nodes.is_empty() {
                        "no node yet".into()
                    } else {
                        nodes.join(", ")
                    }
                );
            }
        }
        MonitorCommand::Rm { name } => {
            api.delete_empty(&format!("/api/v1/monitors/{name}"))
                .await?;
            println!("monitor {name} removed");
        }
    }
    Ok(())
}
