//! `nebula workflow list|run|runs|show|logs|cancel|approve|put|rm`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use nebula_types::api::workflows::{Decide, PutWorkflow, RunView, StartRun, WorkflowView};

use crate::client::{print_json, table, Api};
use crate::Cli;

#[derive(Subcommand, Debug)]
pub enum WorkflowCommand {
    /// Every workflow (from workflows.yml and the API).
    List,
    /// Start a run; with --wait, follow it step by step until it ends.
    Run(RunArgs),
    /// Runs, newest first.
    Runs {
        #[arg(long)]
        workflow: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One run: each step's state, attempt, job and error.
    Show { run: String },
    /// The output of a run's steps (their jobs' logs), or of one step.
    Logs { run: String, step: Option<String> },
    /// Cancel a run (its jobs are cancelled; steps with `if: always()` still run).
    Cancel { run: String },
    /// Approve a step that waits for a person (or reject it with --reject).
    Approve {
        run: String,
        step: String,
        #[arg(long)]
        reject: bool,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Define (or replace) a workflow from a YAML or JSON file (one workflow, as under
    /// `workflows:` in workflows.yml).
    Put { name: String, file: PathBuf },
    /// Remove a workflow defined with `put`.
    Rm { name: String },
    /// Check a workflows.yml here, without a controller: every problem with its line and column.
    Check { file: PathBuf },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    name: String,
    /// An input, NAME=VALUE (the value read as JSON when it is, else as text); repeat.
    #[arg(long = "input", short = 'i')]
    inputs: Vec<String>,
    /// Follow the run until it ends (exit status 1 when it does not succeed).
    #[arg(long)]
    wait: bool,
}

fn inputs(list: &[String]) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let mut out = serde_json::Map::new();
    for i in list {
        let (k, v) = i
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--input {i}: use NAME=VALUE"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()));
        out.insert(k.to_owned(), value);
    }
    Ok(out)
}

fn steps_table(run: &RunView) {
    let rows = run
        .steps
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.kind.clone(),
                s.state.clone(),
                if s.attempt == 0 {
                    "-".into()
                } else {
                    s.attempt.to_string()
                },
                s.job.map_or("-".into(), |j| j.to_string()),
                s.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(&["STEP", "TYPE", "STATE", "TRY", "JOB", "ERROR"], rows);
}

/// Poll the run, printing each step's changes, until it ends.
async fn wait(api: &Api, id: &str) -> anyhow::Result<RunView> {
    let mut seen: BTreeMap<String, (String, u32)> = BTreeMap::new();
    loop {
        let run: RunView = api.get(&format!("/api/v1/workflow-runs/{id}")).await?;
        for s in &run.steps {
            let now = (s.state.clone(), s.attempt);
            if s.state != "pending" && seen.get(&s.id) != Some(&now) {
                let extra = match (&s.error, s.state.as_str()) {
                    (Some(e), _) => format!(": {e}"),
                    (None, "approval") => format!(" (nebula workflow approve {} {})", run.id, s.id),
                    _ => String::new(),
                };
                println!("  {:<20} {}{}", s.id, s.state, extra);
                seen.insert(s.id.clone(), now);
            }
        }
        if !matches!(run.state.as_str(), "running" | "queued") {
            return Ok(run);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn list(cli: &Cli, api: &Api) -> anyhow::Result<()> {
    let items: Vec<WorkflowView> = api.get("/api/v1/workflows").await?;
    if cli.json {
        print_json(&items);
    } else if items.is_empty() {
        println!("no workflows (write them in workflows.yml, or `nebula workflow put`)");
    } else {
        let rows = items
            .iter()
            .map(|w| {
                vec![
                    w.name.clone(),
                    w.steps.to_string(),
                    w.source.clone(),
                    w.description.clone(),
                ]
            })
            .collect();
        table(&["NAME", "STEPS", "SOURCE", "DESCRIPTION"], rows);
    }
    Ok(())
}

/// `nebula workflow check FILE`.
fn check(file: &std::path::Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    match nebula_workflows::spec::check(&text) {
        Ok(w) => {
            for (name, wf) in &w {
                println!("{name}: {} steps", wf.steps.len());
            }
            println!("{}: {} workflows, no problems", file.display(), w.len());
            Ok(())
        }
        Err(errors) => {
            for p in &errors.0 {
                eprintln!("{}:{p}", file.display());
            }
            anyhow::bail!("{} problems in {}", errors.0.len(), file.display())
        }
    }
}

pub async fn workflow(cli: &Cli, cmd: &WorkflowCommand) -> anyhow::Result<()> {
    if let WorkflowCommand::Check { file } = cmd {
        return check(file);
    }
    let api = Api::new(cli)?;
    match cmd {
        WorkflowCommand::List => list(cli, &api).await?,
        WorkflowCommand::Run(a) => {
            let body = StartRun {
                inputs: inputs(&a.inputs)?,
            };
            let run: RunView = api
                .post(&format!("/api/v1/workflows/{}/runs", a.name), &body)
                .await?;
            if !a.wait {
                if cli.json {
                    print_json(&run);
                } else {
                    println!("run {} of {}: {}", run.id, run.workflow, run.state);
                }
                return Ok(());
            }
            println!("run {} of {}: {}", run.id, run.workflow, run.state);
            let end = wait(&api, &run.id.to_string()).await?;
            println!("run {}: {}", end.id, end.state);
            if let Some(e) = &end.error {
                println!("  {e}");
            }
            if end.state != "succeeded" {
                std::process::exit(1);
            }
        }
        WorkflowCommand::Runs { workflow, limit } => {
            let mut q = vec![("limit", limit.to_string())];
            if let Some(w) = workflow {
                q.push(("workflow", w.clone()));
            }
            let runs: Vec<RunView> = api.get_query("/api/v1/workflow-runs", &q).await?;
            if cli.json {
                print_json(&runs);
                return Ok(());
            }
            let rows = runs
                .iter()
                .map(|r| {
                    vec![
                        r.id.to_string(),
                        r.workflow.clone(),
                        r.state.clone(),
                        r.created_by.clone(),
                        r.created_at.clone(),
                        r.error.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            table(
                &["RUN", "WORKFLOW", "STATE", "BY", "CREATED", "ERROR"],
                rows,
            );
        }
        WorkflowCommand::Show { run } => {
            let r: RunView = api.get(&format!("/api/v1/workflow-runs/{run}")).await?;
            if cli.json {
                print_json(&r);
                return Ok(());
            }
            println!(
                "run {} of {}: {} (by {})",
                r.id, r.workflow, r.state, r.created_by
            );
            if let Some(e) = &r.error {
                println!("  {e}");
            }
            steps_table(&r);
        }
        WorkflowCommand::Logs { run, step } => {
            let r: RunView = api.get(&format!("/api/v1/workflow-runs/{run}")).await?;
            for s in r
                .steps
                .iter()
                .filter(|s| step.as_ref().is_none_or(|w| *w == s.id))
            {
                let Some(job) = s.job else {
                    continue;
                };
                println!("== {} ({}, attempt {}) ==", s.id, s.state, s.attempt);
                crate::jobs::follow(&api, &job.to_string(), false, true).await?;
            }
        }
        WorkflowCommand::Cancel { run } => {
            let r: RunView = api
                .post(
                    &format!("/api/v1/workflow-runs/{run}/cancel"),
                    &serde_json::Map::new(),
                )
                .await?;
            println!("run {}: cancelling ({})", r.id, r.state);
        }
        WorkflowCommand::Approve {
            run,
            step,
            reject,
            comment,
        } => {
            let body = Decide {
                step: step.clone(),
                approve: !reject,
                comment: comment.clone(),
            };
            let r: RunView = api
                .post(&format!("/api/v1/workflow-runs/{run}/approve"), &body)
                .await?;
            println!(
                "{} `{step}` of run {}",
                if *reject { "rejected" } else { "approved" },
                r.id
            );
        }
        WorkflowCommand::Put { name, file } => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let w: WorkflowView = api
                .send_json(
                    reqwest::Method::PUT,
                    &format!("/api/v1/workflows/{name}"),
                    &PutWorkflow { definition: text },
                )
                .await?;
            println!("workflow {} stored ({} steps)", w.name, w.steps);
        }
        WorkflowCommand::Check { .. } => {}
        WorkflowCommand::Rm { name } => {
            api.delete_empty(&format!("/api/v1/workflows/{name}"))
                .await?;
            println!("workflow {name} removed");
        }
    }
    Ok(())
}
