//! `nebula models` (the fleet's inference backends and models) and `nebula model pull|download|rm`
//! (model jobs, followed with a progress bar).

use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::client::{print_json, s, table, Api};
use crate::Cli;

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Pull a model into a node's Ollama (progress over every layer).
    Pull {
        node: String,
        name: String,
        /// The backend on the node (default: its first Ollama).
        #[arg(long)]
        backend: Option<String>,
    },
    /// Download a model file into a node's models directory (resumable, checked).
    Download {
        node: String,
        url: String,
        /// File name on the node.
        #[arg(long)]
        file: String,
        /// Expected SHA-256 (64 hex digits).
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Delete a model from a node's backend.
    Rm {
        node: String,
        name: String,
        #[arg(long)]
        backend: Option<String>,
    },
}

/// `nebula models`: per node and backend, the models on disk and loaded.
pub async fn models(cli: &Cli) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let inv: Value = api.get("/api/v1/models/inventory").await?;
    if cli.json {
        print_json(&inv);
        return Ok(());
    }
    let mut rows = Vec::new();
    for n in inv["nodes"].as_array().into_iter().flatten() {
        for b in n["backends"].as_array().into_iter().flatten() {
            if b["models"].as_array().is_none_or(Vec::is_empty) {
                rows.push(vec![
                    s(&n["node"]),
                    format!("{} ({})", s(&b["name"]), s(&b["kind"])),
                    if b["healthy"] == true {
                        "-".into()
                    } else {
                        format!("unhealthy: {}", s(&b["error"]))
                    },
                    String::new(),
                    String::new(),
                    String::new(),
                ]);
            }
            for m in b["models"].as_array().into_iter().flatten() {
                rows.push(vec![
                    s(&n["node"]),
                    format!("{} ({})", s(&b["name"]), s(&b["kind"])),
                    s(&m["name"]),
                    if m["loaded"] == true {
                        "loaded".into()
                    } else {
                        "on disk".into()
                    },
                    m["size_bytes"]
                        .as_u64()
                        .map_or(String::new(), |b| format!("{:.1} GB", b as f64 / 1e9)),
                    s(&m["breaker"]),
                ]);
            }
        }
    }
    table(
        &["NODE", "BACKEND", "MODEL", "STATE", "SIZE", "BREAKER"],
        rows,
    );
    Ok(())
}

pub async fn model(cli: &Cli, cmd: &ModelCommand) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let (node, work, what) = match cmd {
        ModelCommand::Pull {
            node,
            name,
            backend,
        } => (
            node,
            json!({"kind": "model", "action": "pull", "name": name, "backend": backend}),
            format!("pull {name}"),
        ),
        ModelCommand::Download {
            node,
            url,
            file,
            sha256,
        } => (
            node,
            json!({"kind": "model", "action": "download", "url": url, "file": file, "sha256": sha256}),
            format!("download {file}"),
        ),
        ModelCommand::Rm {
            node,
            name,
            backend,
        } => (
            node,
            json!({"kind": "model", "action": "delete", "name": name, "backend": backend}),
            format!("delete {name}"),
        ),
    };
    let job: Value = api
        .post("/api/v1/jobs", &json!({"node": node, "work": work}))
        .await?;
    let id = s(&job["id"]);
    let end = follow_progress(&api, &id, &format!("{what} on {node}"), !cli.json).await?;
    if cli.json {
        print_json(&end);
    }
    let state = s(&end["state"]);
    if state == "succeeded" {
        if !cli.json {
            eprintln!("{what} on {node}: done");
        }
        Ok(())
    } else {
        anyhow::bail!(
            "{what} on {node}: {state}: {}",
            end["error"]
                .as_str()
                .or(end["reason"].as_str())
                .unwrap_or("")
        )
    }
}

/// Follow a job until it ends, drawing its progress (a bar on a terminal, lines otherwise).
pub async fn follow_progress(
    api: &Api,
    id: &str,
    label: &str,
    show: bool,
) -> anyhow::Result<Value> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = (show && tty).then(|| {
        let b = ProgressBar::new(1000);
        b.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {percent:>3}% {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        b.set_prefix(label.to_owned());
        b
    });
    let mut last_line = -10.0f64;
    loop {
        let job: Value = api
            .get(&format!("/api/v1/jobs/{id}"))
            .await
            .with_context(|| format!("reading job {id}"))?;
        let state = s(&job["state"]);
        if let Some(p) = job["progress"]["percent"].as_f64() {
            let msg = s(&job["progress"]["message"]);
            match &bar {
                Some(b) => {
                    b.set_position((p * 10.0) as u64);
                    b.set_message(msg);
                }
                None if show && p - last_line >= 10.0 => {
                    last_line = p;
                    eprintln!("{label}: {p:.0}% {msg}");
                }
                None => {}
            }
        } else if let Some(b) = &bar {
            b.set_message(state.clone());
        }
        if matches!(
            state.as_str(),
            "succeeded" | "failed" | "cancelled" | "timed_out" | "lost"
        ) {
            if let Some(b) = bar {
                if state == "succeeded" {
                    b.set_position(1000);
                }
                b.finish();
            }
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `nebula api-token create NAME --role ai`: an API token, printed once.
pub async fn api_token(cli: &Cli, name: &str, role: &str) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let v: Value = api
        .post("/api/v1/api-tokens", &json!({"name": name, "role": role}))
        .await?;
    if cli.json {
        print_json(&v);
    } else {
        println!("{}", s(&v["token"]));
        eprintln!("API token `{name}` ({role}); shown once");
    }
    Ok(())
}
