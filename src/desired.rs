//! `plan`, `apply`, `services`, `service`, `rollback`: desired state from the command line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use nebula_desired::plan::{Action, Waiting};
use nebula_types::api::desired::{
    Applied, DesiredView, PlanView, RollbackRequest, RolledBack, ServiceDetail, ServiceView,
};
use serde::Serialize;

use crate::client::{opt, print_json, table, Api};
use crate::jobs::{age, ExitStatus};
use crate::Cli;

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// A service map to compare with what runs; without it, the map in force.
    file: Option<PathBuf>,
    /// Exit with status 2 when there is something to change, or that a node's deploy policy
    /// refuses (for scripts and CI).
    #[arg(long)]
    exit_code: bool,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// The service map to apply; without it, the map in force is applied again (which also
    /// retries revisions that failed).
    file: Option<PathBuf>,
    /// Return once the map is accepted, without following the rollout.
    #[arg(long)]
    no_wait: bool,
    /// Give up following the rollout after this long.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    service: String,
    /// The revision to go back to (or a unique prefix); default: the previous one.
    #[arg(long)]
    to: Option<String>,
}

fn read_map(file: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

pub async fn plan(cli: &Cli, a: &PlanArgs) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let plan: PlanView = match &a.file {
        Some(f) => api
            .send_text(reqwest::Method::POST, "/api/v1/plan", read_map(f)?)
            .await
            .with_context(|| format!("{} was refused", f.display()))?,
        None => api.get("/api/v1/plan").await?,
    };
    if cli.json {
        print_json(&plan);
    } else if a.file.is_none() && plan.version.is_none() {
        println!("No service map is in force: `nebula apply FILE` sets one.");
    } else {
        print_warnings(&plan.warnings);
        print_plan(&plan.plan);
    }
    let changes = plan.plan.actions.len() + plan.plan.refused.len();
    if a.exit_code && changes > 0 {
        return Err(ExitStatus(2).into());
    }
    Ok(())
}

fn short(rev: &str) -> String {
    rev.chars().take(12).collect()
}

fn print_warnings(warnings: &[nebula_desired::map::Problem]) {
    for w in warnings {
        println!("warning: {w}");
    }
}

fn print_action(a: &Action) {
    let after = |after: &[String]| {
        if after.is_empty() {
            String::new()
        } else {
            format!(" (after {})", after.join(", "))
        }
    };
    match a {
        Action::Create {
            service,
            node,
            revision,
            replicas,
            after: deps,
            ..
        } => println!(
            "  + {service} on {node}: create {replicas} x revision {}{}",
            short(revision),
            after(deps)
        ),
        Action::Update {
            service,
            node,
            from,
            to,
            replicas,
            changes,
            after: deps,
            ..
        } => {
            let from: Vec<String> = from.iter().map(|r| short(r)).collect();
            println!(
                "  ~ {service} on {node}: update {} -> {} ({replicas} replica(s)){}",
                from.join(","),
                short(to),
                after(deps)
            );
            let v = |x: &Option<serde_json::Value>| match x {
                None | Some(serde_json::Value::Null) => "(none)".to_owned(),
                Some(x) => x.to_string(),
            };
            for c in changes {
                println!("        {}: {} -> {}", c.field, v(&c.from), v(&c.to));
            }
        }
        Action::Repair {
            service,
            node,
            revision,
            replicas,
            reason,
            after: deps,
            ..
        } => println!(
            "  ! {service} on {node}: repair to {replicas} x revision {} ({reason}){}",
            short(revision),
            after(deps)
        ),
        Action::Remove {
            service,
            node,
            containers,
            reason,
            ..
        } => println!("  - {service} on {node}: remove {containers} container(s) ({reason})"),
    }
}

fn print_plan(plan: &nebula_desired::plan::Plan) {
    for a in &plan.actions {
        print_action(a);
    }
    let on = |w: &Waiting| {
        w.node
            .as_ref()
            .map(|n| format!(" on {n}"))
            .unwrap_or_default()
    };
    for w in &plan.refused {
        println!("  ✘ {}{}: refused: {}", w.service, on(w), w.reason);
    }
    for w in &plan.waiting {
        println!("  … {}{}: {}", w.service, on(w), w.reason);
    }
    let (waiting, refused) = (plan.waiting.len(), plan.refused.len());
    if plan.actions.is_empty() && waiting == 0 && refused == 0 {
        println!("No changes: {} service(s) match the map.", plan.unchanged);
    } else {
        let refused = if refused > 0 {
            format!(", {refused} refused by a node's deploy policy")
        } else {
            String::new()
        };
        println!(
            "{} to change, {} unchanged, {waiting} waiting{refused}.",
            plan.actions.len(),
            plan.unchanged,
        );
    }
}

/// How a followed service ended: as the API showed it last, or still unsettled at the end of
/// the wait (`{"status": "timeout"}`).
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Settled {
    Service(Box<ServiceView>),
    Timeout { status: &'static str },
}

impl Settled {
    fn converged(&self) -> bool {
        matches!(self, Settled::Service(s) if s.status == "converged")
    }
}

pub async fn apply(cli: &Cli, a: &ApplyArgs) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let (text, shown) = match &a.file {
        Some(f) => (read_map(f)?, f.display().to_string()),
        None => {
            let current: DesiredView = api.get("/api/v1/desired").await?;
            let doc = current
                .document
                .context("no service map is in force; give a file")?;
            (doc, format!("version {}", opt(current.version)))
        }
    };
    let applied: Applied = api
        .send_text(reqwest::Method::PUT, "/api/v1/desired", text)
        .await
        .with_context(|| format!("{shown} was refused; the map in force is unchanged"))?;
    if cli.json && a.no_wait {
        print_json(&applied);
        return Ok(());
    }
    if !cli.json {
        println!(
            "Applied {shown} as version {}{}.",
            applied.version,
            if applied.changed {
                ""
            } else {
                " (unchanged; failed revisions are retried)"
            }
        );
        print_warnings(&applied.warnings);
        print_plan(&applied.plan);
    }
    // Services refused by a node's policy are followed too: they end `refused` (not converged).
    let services: BTreeSet<String> = applied
        .plan
        .actions
        .iter()
        .map(|a| a.service().to_owned())
        .chain(applied.plan.refused.iter().map(|w| w.service.clone()))
        .collect();
    if a.no_wait || services.is_empty() {
        if cli.json {
            print_json(&applied);
        }
        return Ok(());
    }
    let outcome = follow(&api, &services, a.timeout, !cli.json).await?;
    if cli.json {
        #[derive(Serialize)]
        struct Followed<'a> {
            applied: &'a Applied,
            services: &'a BTreeMap<String, Settled>,
        }
        print_json(&Followed {
            applied: &applied,
            services: &outcome,
        });
    }
    let failed: Vec<&str> = outcome
        .iter()
        .filter(|(_, v)| !v.converged())
        .map(|(k, _)| k.as_str())
        .collect();
    if failed.is_empty() {
        if !cli.json {
            println!("All {} service(s) converged.", services.len());
        }
        Ok(())
    } else {
        if !cli.json {
            eprintln!("Not converged: {}", failed.join(", "));
        }
        Err(ExitStatus(1).into())
    }
}

/// Follow the rollout of `services` with a bar per service and one overall, until each is
/// converged, failed or waiting for something outside the rollout, or the timeout passes.
async fn follow(
    api: &Api,
    services: &BTreeSet<String>,
    timeout: Duration,
    show: bool,
) -> anyhow::Result<BTreeMap<String, Settled>> {
    let multi = MultiProgress::new();
    if !show {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let total = multi.add(ProgressBar::new(services.len() as u64));
    total.set_style(
        ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} services settled")
            .expect("static template")
            .progress_chars("=> "),
    );
    let spinner =
        ProgressStyle::with_template("  {spinner} {prefix:<20} {msg}").expect("static template");
    let bars: BTreeMap<String, ProgressBar> = services
        .iter()
        .map(|name| {
            let b = multi.add(ProgressBar::new_spinner());
            b.set_style(spinner.clone());
            b.set_prefix(name.clone());
            b.set_message("pending");
            b.enable_steady_tick(Duration::from_millis(120));
            (name.clone(), b)
        })
        .collect();
    let started = Instant::now();
    let mut settled: BTreeMap<String, Settled> = BTreeMap::new();
    // A service counts as settled only once the reconciler has had time to pick the map up.
    let mut seen_busy: BTreeSet<String> = BTreeSet::new();
    while settled.len() < services.len() && started.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let list: Vec<ServiceView> = match api.get("/api/v1/services").await {
            Ok(l) => l,
            Err(_) => continue,
        };
        for svc in list {
            let name = svc.name.clone();
            if !services.contains(&name) || settled.contains_key(&name) {
                continue;
            }
            let status = svc.status.as_str();
            let bar = &bars[&name];
            let message = svc.message.as_deref().unwrap_or("");
            let detail = format!(
                "{status} {}/{} running{}",
                svc.running,
                svc.replicas,
                svc.message
                    .as_ref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            );
            bar.set_message(detail.clone());
            if matches!(status, "deploying" | "pending") {
                seen_busy.insert(name.clone());
            }
            let grace = started.elapsed() > Duration::from_secs(3);
            let done = match status {
                "converged" | "orphan" => seen_busy.contains(&name) || grace,
                "failed" | "refused" => true,
                "waiting" => grace && !message.contains("progress"),
                _ => false,
            };
            if done {
                let mark = if matches!(status, "converged" | "orphan") {
                    "✔"
                } else {
                    "✘"
                };
                bar.finish_with_message(format!("{mark} {detail}"));
                if show && !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    // No live bars without a terminal: one line per service as it settles.
                    println!("  {mark} {name}: {detail}");
                }
                total.inc(1);
                settled.insert(name, Settled::Service(Box::new(svc)));
            }
        }
    }
    for (name, bar) in &bars {
        if !settled.contains_key(name) {
            bar.abandon_with_message("✘ still in progress when the wait ended");
            settled.insert(name.clone(), Settled::Timeout { status: "timeout" });
        }
    }
    total.finish();
    Ok(settled)
}

pub async fn services(cli: &Cli) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let list: Vec<ServiceView> = api.get("/api/v1/services").await?;
    if cli.json {
        print_json(&list);
        return Ok(());
    }
    let rows = list
        .iter()
        .map(|v| {
            let nodes: BTreeSet<&str> = v.containers.iter().map(|c| c.node.as_str()).collect();
            let revision = opt(v.revision.as_deref().map(short));
            vec![
                v.name.clone(),
                v.status.clone(),
                match &v.serving_revision {
                    Some(r) => format!("{revision} (runs {})", short(r)),
                    None => revision,
                },
                opt(v.image.as_ref()),
                format!("{}/{}/{}", v.healthy, v.running, v.replicas),
                nodes.into_iter().collect::<Vec<_>>().join(","),
                opt(v.message.as_ref()),
            ]
        })
        .collect();
    table(
        &[
            "SERVICE",
            "STATUS",
            "REVISION",
            "IMAGE",
            "HEALTHY/RUNNING/WANTED",
            "NODES",
            "MESSAGE",
        ],
        rows,
    );
    Ok(())
}

pub async fn service(cli: &Cli, name: &str) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let v: ServiceDetail = api.get(&format!("/api/v1/services/{name}")).await?;
    if cli.json {
        print_json(&v);
        return Ok(());
    }
    if let Some(svc) = &v.service {
        println!("service   {}", svc.name);
        println!("status    {}", svc.status);
        if let Some(m) = &svc.message {
            println!("message   {m}");
        }
        println!("image     {}", opt(svc.image.as_ref()));
        println!("revision  {}", opt(svc.revision.as_ref()));
        if let Some(r) = &svc.serving_revision {
            println!("runs      revision {r} (the counts below are its containers)");
        }
        if let Some(p) = &svc.pinned_over {
            println!("pinned    by a rollback, over the map's revision {p}");
        }
        println!(
            "replicas  {} wanted, {} running, {} healthy",
            svc.replicas, svc.running, svc.healthy
        );
        let rows = svc
            .containers
            .iter()
            .map(|c| {
                vec![
                    c.node.clone(),
                    c.name.clone(),
                    short(&c.revision),
                    c.state.clone(),
                    c.health.clone(),
                ]
            })
            .collect();
        println!();
        table(&["NODE", "CONTAINER", "REVISION", "STATE", "HEALTH"], rows);
    }
    let rows = v
        .history
        .iter()
        .map(|d| {
            vec![
                age(Some(d.started_at)),
                d.action.clone(),
                d.node.clone(),
                short(&d.revision),
                d.outcome.clone(),
                d.trigger.clone(),
                opt(d.message.as_ref()),
            ]
        })
        .collect();
    println!();
    table(
        &[
            "AGO", "ACTION", "NODE", "REVISION", "OUTCOME", "TRIGGER", "MESSAGE",
        ],
        rows,
    );
    Ok(())
}

pub async fn rollback(cli: &Cli, a: &RollbackArgs) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let body = RollbackRequest { to: a.to.clone() };
    let v: RolledBack = api
        .post(&format!("/api/v1/services/{}/rollback", a.service), &body)
        .await?;
    if cli.json {
        print_json(&v);
    } else {
        println!(
            "{} is going back to revision {} (until the map changes it); follow with `nebula services`.",
            v.service, v.revision
        );
    }
    Ok(())
}
