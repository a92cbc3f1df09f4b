//! `nebula models` (the fleet's inference backends and models) and `nebula model pull|download|rm`
//! (model jobs, followed with a progress bar).

use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use nebula_types::api::access::{CreateApiTokenRequest, CreatedApiToken};
use nebula_types::api::jobs::{CreateJob, JobView};
use nebula_types::api::models::ModelsInventory;
use nebula_types::jobs::{JobRecord, JobState, ModelActionKind, Work};

use crate::client::{opt, print_json, table, Api};
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
    let inv: ModelsInventory = api.get("/api/v1/models/inventory").await?;
    if cli.json {
        print_json(&inv);
        return Ok(());
    }
    let mut rows = Vec::new();
    for n in &inv.nodes {
        for b in &n.backends {
            let backend = format!("{} ({})", b.name, b.kind);
            if b.models.is_empty() {
                rows.push(vec![
                    n.node.clone(),
                    backend.clone(),
                    if b.healthy {
                        "-".into()
                    } else {
                        format!("unhealthy: {}", opt(b.error.as_ref()))
                    },
                    String::new(),
                    String::new(),
                    String::new(),
                ]);
            }
            for m in &b.models {
                rows.push(vec![
                    n.node.clone(),
                    backend.clone(),
                    m.name.clone(),
                    if m.loaded { "loaded" } else { "on disk" }.into(),
                    format!("{:.1} GB", m.size_bytes as f64 / 1e9),
                    m.breaker.clone(),
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
    let model = |action, name: Option<&String>, backend: Option<&String>| Work::Model {
        action,
        name: name.cloned(),
        url: None,
        file: None,
        sha256: None,
        backend: backend.cloned(),
    };
    let (node, work, what) = match cmd {
        ModelCommand::Pull {
            node,
            name,
            backend,
        } => (
            node,
            model(ModelActionKind::Pull, Some(name), backend.as_ref()),
            format!("pull {name}"),
        ),
        ModelCommand::Download {
            node,
            url,
            file,
            sha256,
        } => (
            node,
            Work::Model {
                action: ModelActionKind::Download,
                name: None,
                url: Some(url.clone()),
                file: Some(file.clone()),
                sha256: sha256.clone(),
                backend: None,
            },
            format!("download {file}"),
        ),
        ModelCommand::Rm {
            node,
            name,
            backend,
        } => (
            node,
            model(ModelActionKind::Delete, Some(name), backend.as_ref()),
            format!("delete {name}"),
        ),
    };
    let body = CreateJob {
        node: Some(node.clone()),
        selector: None,
        work,
        deadline: None,
        idempotent: false,
        max_attempts: None,
        wait: None,
    };
    let job: JobRecord = api.post("/api/v1/jobs", &body).await?;
    let id = job.id.to_string();
    let end = follow_progress(&api, &id, &format!("{what} on {node}"), !cli.json).await?;
    if cli.json {
        print_json(&end);
    }
    let end = &end.record;
    if end.state == JobState::Succeeded {
        if !cli.json {
            eprintln!("{what} on {node}: done");
        }
        Ok(())
    } else {
        anyhow::bail!(
            "{what} on {node}: {}: {}",
            end.state.as_str(),
            end.error.as_ref().or(end.reason.as_ref()).map_or("", |s| s)
        )
    }
}

/// Follow a job until it ends, drawing its progress (a bar on a terminal, lines otherwise).
pub async fn follow_progress(
    api: &Api,
    id: &str,
    label: &str,
    show: bool,
) -> anyhow::Result<JobView> {
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
        let job: JobView = api
            .get(&format!("/api/v1/jobs/{id}"))
            .await
            .with_context(|| format!("reading job {id}"))?;
        let state = job.record.state;
        if let Some(p) = &job.progress {
            let percent = f64::from(p.percent);
            match &bar {
                Some(b) => {
                    b.set_position((percent * 10.0) as u64);
                    b.set_message(p.message.clone());
                }
                None if show && percent - last_line >= 10.0 => {
                    last_line = percent;
                    eprintln!("{label}: {percent:.0}% {}", p.message);
                }
                None => {}
            }
        } else if let Some(b) = &bar {
            b.set_message(state.as_str());
        }
        if state.is_terminal() {
            if let Some(b) = bar {
                if state == JobState::Succeeded {
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
    let body = CreateApiTokenRequest {
        name: name.to_owned(),
        role: role.to_owned(),
    };
    let v: CreatedApiToken = api.post("/api/v1/api-tokens", &body).await?;
    if cli.json {
        print_json(&v);
    } else {
        println!("{}", v.token);
        eprintln!("API token `{name}` ({role}); shown once");
    }
    Ok(())
}
