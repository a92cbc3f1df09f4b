//! `plan`, `apply`, `services`, `service`, `rollback`: desired state from the command line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::client::{print_json, s, table, Api};
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
    let plan: Value = match &a.file {
        Some(f) => api
            .send_text(reqwest::Method::POST, "/api/v1/plan", read_map(f)?)
            .await
            .with_context(|| format!("{} was refused", f.display()))?,
        None => api.get("/api/v1/plan").await?,
    };
    if cli.json {
        print_json(&plan);
    } else if a.file.is_none() && plan["version"].is_null() {
        println!("No service map is in force: `nebula apply FILE` sets one.");
    } else {
        print_plan(&plan);
    }
    let changes = plan["actions"].as_array().map_or(0, Vec::len)
        + plan["refused"].as_array().map_or(0, Vec::len);
    if a.exit_code && changes > 0 {
        return Err(ExitStatus(2).into());
    }
    Ok(())
}

fn short(rev: &Value) -> String {
    let r = s(rev);
    r.chars().take(12).collect()
}

fn print_plan(plan: &Value) {
    for w in plan["warnings"].as_array().into_iter().flatten() {
        println!(
            "warning: {}:{}: {}",
            w["line"],
            w["column"],
            s(&w["message"])
        );
    }
    let actions = plan["actions"].as_array().cloned().unwrap_or_default();
    for a in &actions {
        let who = format!("{} on {}", s(&a["service"]), s(&a["node"]));
        let after = a["after"]
            .as_array()
            .filter(|d| !d.is_empty())
            .map(|d| {
                format!(
                    " (after {})",
                    d.iter().map(s).collect::<Vec<_>>().join(", ")
                )
            })
            .unwrap_or_default();
        match a["action"].as_str().unwrap_or("") {
            "create" => println!(
                "  + {who}: create {} x revision {}{after}",
                a["replicas"],
                short(&a["revision"])
            ),
            "update" => {
                let from: Vec<String> = a["from"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(short)
                    .collect();
                println!(
                    "  ~ {who}: update {} -> {} ({} replica(s)){after}",
                    from.join(","),
                    short(&a["to"]),
                    a["replicas"]
                );
                for c in a["changes"].as_array().into_iter().flatten() {
                    let v = |x: &Value| {
                        if x.is_null() {
                            "(none)".to_owned()
                        } else {
                            x.to_string()
                        }
                    };
                    println!(
                        "        {}: {} -> {}",
                        s(&c["field"]),
                        v(&c["from"]),
                        v(&c["to"])
                    );
                }
            }
            "repair" => println!(
                "  ! {who}: repair to {} x revision {} ({}){after}",
                a["replicas"],
                short(&a["revision"]),
                s(&a["reason"])
            ),
            "remove" => println!(
                "  - {who}: remove {} container(s) ({})",
                a["containers"],
                s(&a["reason"])
            ),
            other => println!("  ? {who}: {other}"),
        }
    }
    let on = |w: &Value| {
        w["node"]
            .as_str()
            .map(|n| format!(" on {n}"))
            .unwrap_or_default()
    };
    for w in plan["refused"].as_array().into_iter().flatten() {
        println!(
            "  ✘ {}{}: refused: {}",
            s(&w["service"]),
            on(w),
            s(&w["reason"])
        );
    }
    for w in plan["waiting"].as_array().into_iter().flatten() {
        println!("  … {}{}: {}", s(&w["service"]), on(w), s(&w["reason"]));
    }
    let waiting = plan["waiting"].as_array().map_or(0, Vec::len);
    let refused = plan["refused"].as_array().map_or(0, Vec::len);
    if actions.is_empty() && waiting == 0 && refused == 0 {
        println!(
            "No changes: {} service(s) match the map.",
            plan["unchanged"].as_u64().unwrap_or(0)
        );
    } else {
        let refused = if refused > 0 {
            format!(", {refused} refused by a node's deploy policy")
        } else {
            String::new()
        };
        println!(
            "{} to change, {} unchanged, {} waiting{refused}.",
            actions.len(),
            plan["unchanged"].as_u64().unwrap_or(0),
            waiting
        );
    }
}

pub async fn apply(cli: &Cli, a: &ApplyArgs) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let (text, shown) = match &a.file {
        Some(f) => (read_map(f)?, f.display().to_string()),
        None => {
            let current: Value = api.get("/api/v1/desired").await?;
            let doc = current["document"]
                .as_str()
                .context("no service map is in force; give a file")?;
            (doc.to_owned(), format!("version {}", current["version"]))
        }
    };
    let applied: Value = api
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
            applied["version"],
            if applied["changed"] == json!(false) {
                " (unchanged; failed revisions are retried)"
            } else {
                ""
            }
        );
        print_plan(&applied["plan"]);
    }
    // Services refused by a node's policy are followed too: they end `refused` (not converged).
    let services: BTreeSet<String> = ["actions", "refused"]
        .iter()
        .flat_map(|k| applied["plan"][k].as_array().cloned().unwrap_or_default())
        .map(|a| s(&a["service"]))
        .collect();
    if a.no_wait || services.is_empty() {
        if cli.json {
            print_json(&applied);
        }
        return Ok(());
    }
    let outcome = follow(&api, &services, a.timeout, !cli.json).await?;
    if cli.json {
        print_json(&json!({ "applied": applied, "services": outcome }));
    }
    let failed: Vec<&String> = outcome
        .iter()
        .filter(|(_, v)| v["status"] != "converged")
        .map(|(k, _)| k)
        .collect();
    if failed.is_empty() {
        if !cli.json {
            println!("All {} service(s) converged.", services.len());
        }
        Ok(())
    } else {
        if !cli.json {
            eprintln!(
                "Not converged: {}",
                failed
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
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
) -> anyhow::Result<BTreeMap<String, Value>> {
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
    let mut settled: BTreeMap<String, Value> = BTreeMap::new();
    // A service counts as settled only once the reconciler has had time to pick the map up.
    let mut seen_busy: BTreeSet<String> = BTreeSet::new();
    while settled.len() < services.len() && started.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let list: Vec<Value> = match api.get("/api/v1/services").await {
            Ok(l) => l,
            Err(_) => continue,
        };
        for svc in list {
            let name = s(&svc["name"]);
            if !services.contains(&name) || settled.contains_key(&name) {
                continue;
            }
            let status = s(&svc["status"]);
            let bar = &bars[&name];
            let detail = format!(
                "{status} {}/{} running{}",
                svc["running"],
                svc["replicas"],
                svc["message"]
                    .as_str()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            );
            bar.set_message(detail.clone());
            if matches!(status.as_str(), "deploying" | "pending") {
                seen_busy.insert(name.clone());
            }
            let grace = started.elapsed() > Duration::from_secs(3);
            let done = match status.as_str() {
                "converged" | "orphan" => seen_busy.contains(&name) || grace,
                "failed" | "refused" => true,
                "waiting" => grace && !svc["message"].as_str().unwrap_or("").contains("progress"),
                _ => false,
            };
            if done {
                let mark = if status == "converged" || status == "orphan" {
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
                settled.insert(name, svc);
            }
        }
    }
    for (name, bar) in &bars {
        if !settled.contains_key(name) {
            bar.abandon_with_message("✘ still in progress when the wait ended");
            settled.insert(name.clone(), json!({ "status": "timeout" }));
        }
    }
    total.finish();
    Ok(settled)
}

pub async fn services(cli: &Cli) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let list: Vec<Value> = api.get("/api/v1/services").await?;
    if cli.json {
        print_json(&Value::Array(list));
        return Ok(());
    }
    let rows = list
        .iter()
        .map(|v| {
            let nodes: BTreeSet<String> = v["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| s(&c["node"]))
                .collect();
            vec![
                s(&v["name"]),
                s(&v["status"]),
                match v["serving_revision"].as_str() {
                    Some(_) => format!(
                        "{} (runs {})",
                        short(&v["revision"]),
                        short(&v["serving_revision"])
                    ),
                    None => short(&v["revision"]),
                },
                s(&v["image"]),
                format!("{}/{}/{}", v["healthy"], v["running"], v["replicas"]),
                nodes.into_iter().collect::<Vec<_>>().join(","),
                s(&v["message"]),
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
    let v: Value = api.get(&format!("/api/v1/services/{name}")).await?;
    if cli.json {
        print_json(&v);
        return Ok(());
    }
    let svc = &v["service"];
    if !svc.is_null() {
        println!("service   {}", s(&svc["name"]));
        println!("status    {}", s(&svc["status"]));
        if let Some(m) = svc["message"].as_str() {
            println!("message   {m}");
        }
        println!("image     {}", s(&svc["image"]));
        println!("revision  {}", s(&svc["revision"]));
        if svc["serving_revision"].is_string() {
            println!(
                "runs      revision {} (the counts below are its containers)",
                s(&svc["serving_revision"])
            );
        }
        if let Some(p) = svc["pinned_over"].as_str() {
            println!("pinned    by a rollback, over the map's revision {p}");
        }
        println!(
            "replicas  {} wanted, {} running, {} healthy",
            svc["replicas"], svc["running"], svc["healthy"]
        );
        let rows = svc["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                vec![
                    s(&c["node"]),
                    s(&c["name"]),
                    short(&c["revision"]),
                    s(&c["state"]),
                    s(&c["health"]),
                ]
            })
            .collect();
        println!();
        table(&["NODE", "CONTAINER", "REVISION", "STATE", "HEALTH"], rows);
    }
    let rows = v["history"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            vec![
                age(d["started_at"].as_i64()),
                s(&d["action"]),
                s(&d["node"]),
                short(&d["revision"]),
                s(&d["outcome"]),
                s(&d["trigger"]),
                s(&d["message"]),
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
    let body = match &a.to {
        Some(t) => json!({ "to": t }),
        None => json!({}),
    };
    let v: Value = api
        .post(&format!("/api/v1/services/{}/rollback", a.service), &body)
        .await?;
    if cli.json {
        print_json(&v);
    } else {
        println!(
            "{} is going back to revision {} (until the map changes it); follow with `nebula services`.",
            s(&v["service"]),
            s(&v["revision"])
        );
    }
    Ok(())
}
