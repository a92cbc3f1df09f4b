//! AI agents: a persona with a system prompt, a model, and the Nebula operations it may call as
//! tools. Declared under `agents:` in `workflows.yml` (beside `workflows:`) or through the API;
//! five built-in agents ship as defaults that a definition of the same name replaces.
//!
//! ```yaml
//! agents:
//!   ops:
//!     persona: DevOps Commander
//!     system: You keep the fleet healthy. Check before you act.
//!     model: llama3.2
//!     node: gpu-box          # only this node serves it (optional)
//!     tools: [read_fleet, probe, exec, wake]
//!     approval: destructive  # exec and deploy wait for a person; `never` lets it act alone
//! ```

use nebula_desired::map::{parse_yaml, Loc, MapErrors, Problem};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The most model turns one question may take (each may call tools).
pub const MAX_TURNS: u32 = 16;
/// The longest system prompt (bytes).
pub const MAX_SYSTEM: usize = 16 * 1024;

/// The Nebula operations an agent may be allowed to call.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Tool {
    /// Nodes (online or not, labels) and services (status, revision, healthy replicas).
    ReadFleet,
    /// An HTTP GET or TCP connect from a node.
    Probe,
    /// An operation from a node's allow-list.
    Exec,
    /// Reconcile a service now, or roll it back.
    Deploy,
    /// Wake a node through its relays.
    Wake,
    /// Ask another agent a question.
    AskAgent,
}

impl Tool {
    pub const ALL: [Tool; 6] = [
        Tool::ReadFleet,
        Tool::Probe,
        Tool::Exec,
        Tool::Deploy,
        Tool::Wake,
        Tool::AskAgent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Tool::ReadFleet => "read_fleet",
            Tool::Probe => "probe",
            Tool::Exec => "exec",
            Tool::Deploy => "deploy",
            Tool::Wake => "wake",
            Tool::AskAgent => "ask_agent",
        }
    }

    pub fn parse(name: &str) -> Option<Tool> {
        Tool::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// It changes what runs (an approval is needed unless the agent says `approval: never`).
    pub fn destructive(self) -> bool {
        matches!(self, Tool::Exec | Tool::Deploy)
    }
}

/// When a destructive tool call needs a person.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    /// `exec` and `deploy` need a person's approval.
    #[default]
    Destructive,
    /// The agent acts alone (within its tools and its caller's role).
    Never,
}

/// One agent as written.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentDecl {
    #[serde(default)]
    pub description: String,
    /// The name it goes by in answers (default: its key).
    #[serde(default)]
    pub persona: Option<String>,
    pub system: String,
    /// A model the gateway routes (`GET /v1/models`).
    pub model: String,
    /// Only this node serves its model.
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub tools: Vec<Loc<String>>,
    #[serde(default)]
    pub approval: Approval,
    #[serde(default)]
    pub max_turns: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
}

/// A checked agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Agent {
    pub name: String,
    pub description: String,
    pub persona: String,
    pub system: String,
    pub model: String,
    pub node: Option<String>,
    pub tools: Vec<Tool>,
    pub approval: Approval,
    pub max_turns: u32,
    pub temperature: Option<f64>,
    /// Shipped with Nebula (a definition of the same name replaces it).
    #[serde(default)]
    pub builtin: bool,
}

impl Agent {
    pub fn may(&self, tool: Tool) -> bool {
        self.tools.contains(&tool)
    }
}

fn problem<T>(at: &Loc<T>, message: impl Into<String>) -> Problem {
    Problem {
        line: at.line.max(1),
        column: at.column.max(1),
        message: message.into(),
    }
}

/// Check one declared agent.
pub fn resolve(name: &str, decl: &Loc<AgentDecl>) -> Result<Agent, Vec<Problem>> {
    let mut problems = Vec::new();
    if !nebula_protocol::validate::valid_name(name) {
        problems.push(problem(
            decl,
            format!("agent `{name}`: a name is letters, digits, `-` and `_`"),
        ));
    }
    let d = &decl.value;
    if d.system.trim().is_empty() || d.system.len() > MAX_SYSTEM {
        problems.push(problem(
            decl,
            format!("agent `{name}`: `system` is 1 to {MAX_SYSTEM} bytes"),
        ));
    }
    if d.model.trim().is_empty() || d.model.len() > 255 || d.model.starts_with("agent/") {
        problems.push(problem(
            decl,
            format!("agent `{name}`: `model` names a model the gateway serves (not another agent)"),
        ));
    }
    let mut tools = Vec::new();
    for t in &d.tools {
        match Tool::parse(&t.value) {
            Some(tool) if !tools.contains(&tool) => tools.push(tool),
            Some(_) => problems.push(problem(
                t,
                format!("agent `{name}`: tool `{}` given twice", t.value),
            )),
            None => problems.push(problem(
                t,
                format!(
                    "agent `{name}`: unknown tool `{}` (tools: {})",
                    t.value,
                    Tool::ALL.map(Tool::as_str).join(", ")
                ),
            )),
        }
    }
    let max_turns = d.max_turns.unwrap_or(8);
    if max_turns == 0 || max_turns > MAX_TURNS {
        problems.push(problem(
            decl,
            format!("agent `{name}`: `max_turns` is 1 to {MAX_TURNS}"),
        ));
    }
    if d.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        problems.push(problem(
            decl,
            format!("agent `{name}`: `temperature` is 0 to 2"),
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Agent {
        name: name.to_owned(),
        description: d.description.clone(),
        persona: d.persona.clone().unwrap_or_else(|| name.to_owned()),
        system: d.system.clone(),
        model: d.model.clone(),
        node: d.node.clone(),
        tools,
        approval: d.approval,
        max_turns,
        temperature: d.temperature,
        builtin: false,
    })
}

/// Parse and check one agent given alone (the API's body: YAML or JSON).
pub fn check_one(name: &str, text: &str) -> Result<Agent, MapErrors> {
    let decl: Loc<AgentDecl> = parse_yaml(text, crate::spec::MAX_FILE_BYTES, "the agent")?;
    resolve(name, &decl).map_err(MapErrors)
}

/// The model built-in agents ask for until a definition of the same name says otherwise.
pub const BUILTIN_MODEL: &str = "llama3.2";

/// The five agents that ship with Nebula, as editable defaults.
pub fn builtins() -> Vec<Agent> {
    let agent =
        |name: &str, persona: &str, description: &str, system: &str, tools: &[Tool]| Agent {
            name: name.to_owned(),
            description: description.to_owned(),
            persona: persona.to_owned(),
            system: system.to_owned(),
            model: BUILTIN_MODEL.to_owned(),
            node: None,
            tools: tools.to_vec(),
            approval: Approval::Destructive,
            max_turns: 8,
            temperature: Some(0.3),
            builtin: true,
        };
    vec![
        agent(
            "jarvis-prime",
            "Jarvis Prime",
            "The fleet's general assistant: answers questions, delegates to the specialists.",
            "You are Jarvis Prime, the assistant of a homelab fleet run by Nebula Command. Read the \
             fleet before you answer questions about it. Hand security questions to \
             security-sentinel, code to code-architect and operations to devops-commander with \
             ask_agent. Be brief and exact; say when you do not know.",
            &[Tool::ReadFleet, Tool::Probe, Tool::AskAgent],
        ),
        agent(
            "security-sentinel",
            "Security Sentinel",
            "Reviews the fleet and findings for security problems.",
            "You are Security Sentinel. You review services, exposed ports, findings of scans and \
             configuration for security problems. Rank findings by severity, explain the risk in \
             one sentence each and propose the smallest fix. Never print secrets.",
            &[Tool::ReadFleet, Tool::Probe],
        ),
        agent(
            "creative-director",
            "Creative Director",
            "Writes and brainstorms: posts, names, scripts, image prompts.",
            "You are Creative Director. You brainstorm ideas, write short copy and image prompts. \
             Offer a few distinct options, each in one or two lines, then recommend one.",
            &[],
        ),
        agent(
            "code-architect",
            "Code Architect",
            "Reads code, plans changes and reviews patches.",
            "You are Code Architect. You analyse repositories, plan changes in small steps and \
             review patches for correctness, tests and risk. Answer with concrete file and \
             function names; propose patches as unified diffs.",
            &[Tool::ReadFleet],
        ),
        agent(
            "devops-commander",
            "DevOps Commander",
            "Operates the fleet: checks, wakes nodes, runs allow-listed commands, deploys.",
            "You are DevOps Commander. You keep the fleet healthy. Read the fleet and probe before \
             you act; prefer the smallest action; explain what you did and what changed.",
            &[Tool::ReadFleet, Tool::Probe, Tool::Exec, Tool::Deploy, Tool::Wake],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_is_checked_and_the_builtins_are_valid() {
        let ok = check_one(
            "ops",
            "system: keep it up\nmodel: llama3\ntools: [read_fleet, exec]\napproval: never\n",
        )
        .unwrap();
        assert_eq!(ok.tools, vec![Tool::ReadFleet, Tool::Exec]);
        assert_eq!(
            (ok.approval, ok.max_turns, ok.persona.as_str()),
            (Approval::Never, 8, "ops")
        );
        let e = check_one("ops", "system: x\nmodel: agent/other\ntools: [read_fleet, shell, read_fleet]\nmax_turns: 99\n")
            .unwrap_err()
            .to_string();
        for want in [
            "unknown tool `shell`",
            "given twice",
            "`max_turns`",
            "not another agent",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
        assert!(check_one("ops", "system: x\nmodel: m\nshell: true\n").is_err());
        let names: Vec<String> = builtins().into_iter().map(|a| a.name).collect();
        assert_eq!(names.len(), 5);
        for a in builtins() {
            assert!(a.builtin && !a.system.is_empty(), "{a:?}");
            assert!(nebula_protocol::validate::valid_name(&a.name));
        }
        assert!(
            Tool::Exec.destructive() && Tool::Deploy.destructive() && !Tool::Wake.destructive()
        );
    }
}
