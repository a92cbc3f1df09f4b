//! `nebula agent list|show|ask|put|rm`.

use std::path::PathBuf;

use clap::Subcommand;
use nebula_types::api::agents::{AgentReply, AgentView, AskAgent};
use nebula_types::api::workflows::PutWorkflow;

use crate::client::{print_json, table, Api};
use crate::Cli;

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Every AI agent: the built-ins and those from workflows.yml and the API.
    List,
    /// One agent: its persona, model, tools and system prompt.
    Show { name: String },
    /// Ask an agent; its tool calls act with your role and are listed with what became of
    /// each.
    Ask {
        name: String,
        /// The question (the words are joined with spaces).
        #[arg(required = true, num_args = 1..)]
        message: Vec<String>,
    },
    /// Define (or replace) an agent from a YAML or JSON file (one agent, as under `agents:` in
    /// workflows.yml).
    Put { name: String, file: PathBuf },
    /// Remove an agent defined with `put` (a built-in of that name is in force again).
    Rm { name: String },
}

pub async fn agent(cli: &Cli, cmd: &AgentCommand) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    match cmd {
        AgentCommand::List => {
            let items: Vec<AgentView> = api.get("/api/v1/agents").await?;
            if cli.json {
                print_json(&items);
                return Ok(());
            }
            let rows = items
                .iter()
                .map(|a| {
                    vec![
                        a.name.clone(),
                        a.persona.clone(),
                        a.model.clone(),
                        if a.tools.is_empty() {
                            "-".into()
                        } else {
                            a.tools.join(",")
                        },
                        a.approval.clone(),
                        a.source.clone(),
                    ]
                })
                .collect();
            table(
                &["NAME", "PERSONA", "MODEL", "TOOLS", "APPROVAL", "SOURCE"],
                rows,
            );
        }
        AgentCommand::Show { name } => {
            let a: AgentView = api.get(&format!("/api/v1/agents/{name}")).await?;
            if cli.json {
                print_json(&a);
                return Ok(());
            }
            println!("{} ({}), {}", a.name, a.persona, a.source);
            println!(
                "model     {}{}",
                a.model,
                a.node.map(|n| format!(" on {n}")).unwrap_or_default()
            );
            println!(
                "tools     {}",
                if a.tools.is_empty() {
                    "none".into()
                } else {
                    a.tools.join(", ")
                }
            );
            println!("approval  {}", a.approval);
            println!("turns     at most {}", a.max_turns);
            if !a.description.is_empty() {
                println!("\n{}", a.description);
            }
            println!("\n{}", a.system);
        }
        AgentCommand::Ask { name, message } => {
            let body = AskAgent {
                message: message.join(" "),
            };
            let r: AgentReply = api
                .post(&format!("/api/v1/agents/{name}/ask"), &body)
                .await?;
            if cli.json {
                print_json(&r);
                return Ok(());
            }
            for c in &r.tool_calls {
                eprintln!(
                    "[{}] {} {} -> {}",
                    c.outcome,
                    c.tool,
                    c.arguments,
                    first_line(&c.result)
                );
            }
            println!("{}", r.text);
            let node = r.node.as_deref().unwrap_or("-");
            eprintln!("{} on {node}, {} turn(s)", r.persona, r.turns);
            if !r.finished {
                std::process::exit(1);
            }
        }
        AgentCommand::Put { name, file } => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let a: AgentView = api
                .send_json(
                    reqwest::Method::PUT,
                    &format!("/api/v1/agents/{name}"),
                    &PutWorkflow { definition: text },
                )
                .await?;
            println!(
                "agent {} stored (model {}, tools: {})",
                a.name,
                a.model,
                a.tools.join(", ")
            );
        }
        AgentCommand::Rm { name } => {
            api.delete_empty(&format!("/api/v1/agents/{name}")).await?;
            println!("agent {name} removed");
        }
    }
    Ok(())
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    line.chars().take(160).collect()
}
