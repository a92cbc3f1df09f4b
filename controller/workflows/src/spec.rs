//! `workflows.yml`: the document as written ([`Document`]), its checks, and the resolved
//! [`Workflow`] that runs keep a copy of (so that editing the file never changes a run that has
//! started).
//!
//! ```yaml
//! workflows:
//!   verify-web:
//!     inputs:
//!       url: { default: "http://127.0.0.1:8080/healthz" }
//!     concurrency: { group: "verify-${{ inputs.url }}", policy: queue }
//!     steps:
//!       - id: probe
//!         type: service-check
//!         node: box-1
//!         with: { http: "${{ inputs.url }}" }
//!         retry: { attempts: 3, backoff: 2s }
//!       - id: report
//!         type: exec
//!         if: "${{ failure() }}"
//!         node: box-1
//!         with: { op: notify-admin, args: ["${{ steps.probe.error }}"] }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nebula_desired::map::{parse_yaml, Loc, MapErrors, Problem};
use nebula_types::jobs::Selector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::expr;

mod kinds;
use crate::trigger::{self, Triggers};
pub use kinds::{Placement, StepKind};

/// The largest `workflows.yml` accepted (bytes).
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// The most steps one workflow may have.
pub const MAX_STEPS: usize = 200;
/// The most attempts a step may be given.
pub const MAX_ATTEMPTS: u32 = 20;
/// The longest wait between attempts.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
/// The longest step timeout (a job's deadline is at most 30 days away).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
/// A wake step's timeout when it gives none.
pub const WAKE_TIMEOUT: Duration = Duration::from_secs(600);

/// The file: workflows and AI agents by name.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Document {
    #[serde(default)]
    pub workflows: BTreeMap<String, Loc<WorkflowDecl>>,
    #[serde(default)]
    pub agents: BTreeMap<String, Loc<crate::agent::AgentDecl>>,
}

/// One workflow as written.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowDecl {
    #[serde(default)]
    pub description: String,
    /// Values a run is started with (`${{ inputs.NAME }}`).
    #[serde(default)]
    pub inputs: BTreeMap<String, Input>,
    #[serde(default)]
    pub concurrency: Option<Loc<Concurrency>>,
    /// What starts it besides a person: schedules, a webhook, events.
    #[serde(default)]
    pub on: Option<Loc<Triggers>>,
    pub steps: Vec<Loc<StepDecl>>,
}

/// One step as written.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepDecl {
    pub id: Loc<String>,
    #[serde(rename = "type")]
    pub kind: StepKind,
    /// Steps that must end first (a DAG). Absent: the step before this one.
    #[serde(default)]
    pub needs: Option<Vec<Loc<String>>>,
    /// Run only when this holds (default `success()`: every needed step succeeded).
    #[serde(default, rename = "if")]
    pub cond: Option<Loc<String>>,
    /// The step's parameters, by type; strings may hold `${{ ... }}`.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, Json>")]
    pub with: Option<Loc<serde_json::Map<String, Json>>>,
    /// The node to run on (may be an expression).
    #[serde(default)]
    pub node: Option<String>,
    /// Or any node matching this.
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub retry: Option<Retry>,
    /// For the whole attempt, from dispatch to its end (`30s`, `10m`).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Duration>,
    /// A failure of this step does not fail the run or count as failure for later steps.
    #[serde(default)]
    pub continue_on_error: bool,
}

impl StepDecl {
    fn params(&self) -> serde_json::Map<String, Json> {
        self.with
            .as_ref()
            .map(|w| w.value.clone())
            .unwrap_or_default()
    }
}

fn at_with(s: &Loc<StepDecl>, message: String) -> Problem {
    match &s.with {
        Some(w) => problem(w, message),
        None => problem(s, message),
    }
}

/// A run input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Input {
    #[serde(default)]
    pub description: String,
    /// Used when the run does not give one; an input without a default is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Json>,
}

/// Runs that share a group (rendered from the inputs) obey a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    pub group: String,
    #[serde(default)]
    pub policy: Policy,
}

/// What a new run does while another of its group is open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Both run.
    #[default]
    Allow,
    /// The new run is refused.
    Forbid,
    /// The open runs are cancelled; the new one starts.
    Replace,
    /// The new run waits for the group; a newer waiting run takes its place.
    Queue,
}

/// Retries of a failed attempt (off unless asked): `attempts` in all, the wait growing from
/// `backoff` by `factor` up to `max_backoff`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    pub attempts: u32,
    #[serde(default = "default_backoff", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub backoff: Duration,
    #[serde(default = "default_factor")]
    pub factor: f64,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_backoff: Duration,
}

fn default_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_factor() -> f64 {
    2.0
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(300)
}

impl Retry {
    /// One attempt, no retry.
    pub fn none() -> Retry {
        Retry {
            attempts: 1,
            backoff: default_backoff(),
            factor: default_factor(),
            max_backoff: default_max_backoff(),
        }
    }

    /// The wait after failed attempt `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let grow = self.factor.powi(attempt.saturating_sub(1).min(60) as i32);
        let secs = (self.backoff.as_secs_f64() * grow).min(self.max_backoff.as_secs_f64());
        Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(MAX_WAIT)
    }
}

/// A checked workflow, as runs keep it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Workflow {
    pub name: String,
    pub description: String,
    pub inputs: BTreeMap<String, Input>,
    pub concurrency: Option<Concurrency>,
    #[serde(default)]
    pub on: Triggers,
    pub steps: Vec<Step>,
}

/// A checked step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Step {
    pub id: String,
    pub kind: StepKind,
    /// Resolved: explicit, or the step before.
    pub needs: Vec<String>,
    #[serde(rename = "if")]
    pub cond: Option<String>,
    #[schemars(with = "BTreeMap<String, Json>")]
    pub with: serde_json::Map<String, Json>,
    pub node: Option<String>,
    pub selector: Option<Selector>,
    pub retry: Retry,
    #[serde(with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Duration>,
    pub continue_on_error: bool,
}

impl Workflow {
    pub fn step(&self, id: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.id == id)
    }
}

/// Parse and check a whole file: every workflow, or every problem found.
pub fn check(text: &str) -> Result<BTreeMap<String, Workflow>, MapErrors> {
    check_file(text).map(|(workflows, _)| workflows)
}

/// Workflows and agents by name.
pub type Checked = (
    BTreeMap<String, Workflow>,
    BTreeMap<String, crate::agent::Agent>,
);

/// Parse and check a whole file: every workflow and agent, or every problem found.
pub fn check_file(text: &str) -> Result<Checked, MapErrors> {
    if text.trim().is_empty() {
        return Ok(Default::default());
    }
    let doc: Document = parse_yaml(text, MAX_FILE_BYTES, "workflows.yml")?;
    let mut out = BTreeMap::new();
    let mut agents = BTreeMap::new();
    let mut problems = Vec::new();
    for (name, decl) in &doc.workflows {
        match resolve(name, decl) {
            Ok(w) => {
                out.insert(name.clone(), w);
            }
            Err(mut p) => problems.append(&mut p),
        }
    }
    for (name, decl) in &doc.agents {
        match crate::agent::resolve(name, decl) {
            Ok(a) => {
                agents.insert(name.clone(), a);
            }
            Err(mut p) => problems.append(&mut p),
        }
    }
    if problems.is_empty() {
        Ok((out, agents))
    } else {
        problems.sort_by_key(|p| (p.line, p.column));
        Err(MapErrors(problems))
    }
}

/// Parse and check one workflow given alone (the API's body: YAML or JSON).
pub fn check_one(name: &str, text: &str) -> Result<Workflow, MapErrors> {
    let decl: Loc<WorkflowDecl> = parse_yaml(text, MAX_FILE_BYTES, "the workflow")?;
    resolve(name, &decl).map_err(MapErrors)
}

fn problem<T>(at: &Loc<T>, message: impl Into<String>) -> Problem {
    Problem {
        line: at.line.max(1),
        column: at.column.max(1),
        message: message.into(),
    }
}

fn resolve(name: &str, decl: &Loc<WorkflowDecl>) -> Result<Workflow, Vec<Problem>> {
    let mut problems = Vec::new();
    if !nebula_protocol::validate::valid_name(name) {
        problems.push(problem(
            decl,
            format!("invalid workflow name `{name}`: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"),
        ));
    }
    if decl.steps.is_empty() {
        problems.push(problem(decl, format!("workflow `{name}` has no steps")));
    }
    if decl.steps.len() > MAX_STEPS {
        problems.push(problem(
            decl,
            format!("workflow `{name}` has more than {MAX_STEPS} steps"),
        ));
    }
    let mut seen = BTreeSet::new();
    let mut steps: Vec<Step> = Vec::new();
    for (i, s) in decl.steps.iter().enumerate() {
        let id = s.id.value.clone();
        if !valid_step_id(&id) {
            problems.push(problem(
                &s.id,
                format!("invalid step id `{id}`: use 1-63 letters, digits or '_', starting with a letter or '_'"),
            ));
        }
        if !seen.insert(id.clone()) {
            problems.push(problem(&s.id, format!("step `{id}` is defined twice")));
        }
        let needs: Vec<String> = match &s.needs {
            Some(n) => {
                for need in n {
                    if !decl.steps.iter().any(|o| o.id.value == need.value) {
                        problems.push(problem(
                            need,
                            format!(
                                "step `{id}` needs `{}`, which is not a step here",
                                need.value
                            ),
                        ));
                    }
                }
                n.iter().map(|n| n.value.clone()).collect()
            }
            None if i > 0 => vec![decl.steps[i - 1].id.value.clone()],
            None => Vec::new(),
        };
        check_step(s, &mut problems);
        steps.push(Step {
            id,
            kind: s.kind,
            needs,
            cond: s.cond.as_ref().map(|c| c.value.clone()),
            with: s.params(),
            node: s.node.clone(),
            selector: s.selector.clone(),
            retry: s.retry.clone().unwrap_or_else(Retry::none),
            timeout: s
                .timeout
                .or((s.kind == StepKind::Wake).then_some(WAKE_TIMEOUT)),
            continue_on_error: s.continue_on_error,
        });
    }
    if problems.is_empty() {
        if let Some(cycle) = find_cycle(&steps) {
            let at = decl
                .steps
                .iter()
                .find(|s| s.id.value == cycle[0])
                .map(|s| problem(&s.id, ""))
                .unwrap_or_else(|| problem(decl, ""));
            problems.push(Problem {
                message: format!("the steps' needs form a cycle: {}", cycle.join(" -> ")),
                ..at
            });
        }
    }
    if problems.is_empty() {
        check_references(decl, &steps, &mut problems);
    }
    if let Some(c) = &decl.concurrency {
        if let Err(e) = expr::references(&Json::String(c.group.clone())) {
            problems.push(problem(c, format!("concurrency group: {e}")));
        }
    }
    if let Some(on) = &decl.on {
        for m in trigger::check(on) {
            problems.push(problem(on, format!("workflow `{name}`: {m}")));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Workflow {
        name: name.to_owned(),
        description: decl.description.clone(),
        inputs: decl.inputs.clone(),
        concurrency: decl.concurrency.as_ref().map(|c| c.value.clone()),
        on: decl
            .on
            .as_ref()
            .map(|o| o.value.clone())
            .unwrap_or_default(),
        steps,
    })
}

fn check_step(s: &Loc<StepDecl>, problems: &mut Vec<Problem>) {
    let id = &s.id.value;
    let params = s.kind.params();
    let with = s.params();
    for key in with.keys() {
        if !params.iter().any(|(k, _)| k == key) {
            let known: Vec<&str> = params.iter().map(|(k, _)| *k).collect();
            problems.push(at_with(
                s,
                format!(
                    "step `{id}` ({}): unknown parameter `{key}` (it takes: {})",
                    s.kind.as_str(),
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
    }
    for (key, required) in params {
        if *required && !with.contains_key(*key) {
            problems.push(problem(
                s,
                format!("step `{id}` ({}) needs `with.{key}`", s.kind.as_str()),
            ));
        }
    }
    match (s.kind.placement(), s.node.is_some(), s.selector.is_some()) {
        (Placement::Node, false, false) => problems.push(problem(
            s,
            format!("step `{id}` runs on a node: give `node` or `selector`"),
        )),
        (Placement::Node, true, true) => problems.push(problem(
            s,
            format!("step `{id}`: give `node` or `selector`, not both"),
        )),
        (Placement::Routed, _, true) => problems.push(problem(
            s,
            format!(
                "step `{id}` ({}) goes where the gateway's routing sends it: it takes a `node`, not a `selector`",
                s.kind.as_str()
            ),
        )),
        (Placement::Controller, true, _) | (Placement::Controller, _, true) => {
            problems.push(problem(
                s,
                format!(
                    "step `{id}` ({}) runs on the controller: it takes no `node` or `selector`",
                    s.kind.as_str()
                ),
            ))
        }
        _ => {}
    }
    if let Some(e) = literal_problem(s.kind, &with) {
        problems.push(at_with(
            s,
            format!("step `{id}` ({}): {e}", s.kind.as_str()),
        ));
    }
    if let Some(r) = &s.retry {
        if r.attempts == 0 || r.attempts > MAX_ATTEMPTS {
            problems.push(problem(
                s,
                format!("step `{id}`: retry.attempts must be 1 to {MAX_ATTEMPTS}"),
            ));
        }
        if r.backoff > MAX_WAIT || r.max_backoff > MAX_WAIT {
            problems.push(problem(
                s,
                format!("step `{id}`: retry waits are at most 24 hours"),
            ));
        }
        if !(1.0..=10.0).contains(&r.factor) {
            problems.push(problem(
                s,
                format!("step `{id}`: retry.factor must be 1 to 10"),
            ));
        }
    }
    if s.timeout.is_some_and(|t| t.is_zero() || t > MAX_TIMEOUT) {
        problems.push(problem(
            s,
            format!("step `{id}`: timeout must be above 0 and at most 30 days"),
        ));
    }
}

/// What can be told of literal parameters before any run (values with `${{ }}` are checked when
/// they are rendered).
fn literal_problem(kind: StepKind, with: &serde_json::Map<String, Json>) -> Option<String> {
    let literal = |key: &str| {
        with.get(key)
            .and_then(Json::as_str)
            .filter(|v| !v.contains("${{"))
    };
    match kind {
        StepKind::Http if with.get("fail_on_status").is_some_and(|v| !v.is_boolean()) => {
            Some("`fail_on_status` is `true` or `false` (not an expression)".to_owned())
        }
        StepKind::Http => {
            let method = literal("method")?;
            let known = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];
            (!known.contains(&method.to_ascii_uppercase().as_str())).then(|| {
                format!(
                    "`method` must be one of {}, not `{method}`",
                    known.join(", ")
                )
            })
        }
        StepKind::Deploy => {
            let action = literal("action")?;
            (!matches!(action, "apply" | "rollback"))
                .then(|| format!("`action` is `apply` or `rollback`, not `{action}`"))
        }
        StepKind::AiText if !with.contains_key("prompt") && !with.contains_key("messages") => {
            Some("give `prompt` or `messages`".to_owned())
        }
        _ => None,
    }
}

/// Every expression compiles, and reads only what exists before the step runs.
fn check_references(decl: &Loc<WorkflowDecl>, steps: &[Step], problems: &mut Vec<Problem>) {
    for (s, d) in steps.iter().zip(&decl.steps) {
        let ancestors = ancestors(steps, &s.id);
        let mut texts: Vec<(Json, &dyn Fn(String) -> Problem)> = Vec::new();
        let at_with = |m: String| at_with(d, m);
        let at_step = |m: String| problem(d, m);
        texts.push((Json::Object(s.with.clone()), &at_with));
        if let Some(n) = &s.node {
            texts.push((Json::String(n.clone()), &at_step));
        }
        if let Some(c) = &d.cond {
            let wrapped = if c.value.contains("${{") {
                c.value.clone()
            } else {
                format!("${{{{ {} }}}}", c.value)
            };
            texts.push((Json::String(wrapped), &at_step));
        }
        for (text, at) in texts {
            match expr::references(&text) {
                Err(e) => problems.push(at(format!("step `{}`: {e}", s.id))),
                Ok(names) => {
                    for n in names {
                        if let Some(m) = bad_reference(&n, &ancestors, &decl.inputs) {
                            problems.push(at(format!("step `{}`: {m}", s.id)));
                        }
                    }
                }
            }
        }
    }
}

fn bad_reference(
    name: &str,
    ancestors: &BTreeSet<String>,
    inputs: &BTreeMap<String, Input>,
) -> Option<String> {
    let mut parts = name.split('.');
    match (parts.next(), parts.next()) {
        (Some("inputs"), Some(i)) if !inputs.contains_key(i) => {
            Some(format!("`inputs.{i}` is not an input of this workflow"))
        }
        (Some("steps"), Some(s)) if !ancestors.contains(s) => Some(format!(
            "`steps.{s}` is not a step this one needs (directly or through others)"
        )),
        (Some("steps"), None) => Some("read a step as `steps.ID`".into()),
        (Some("inputs" | "steps" | "trigger" | "run"), _) => None,
        (Some("secrets"), _) => Some(
            "secrets are not read in expressions; fields that take one name it (`secret: NAME`)"
                .into(),
        ),
        (Some(other), _) => Some(format!(
            "`{other}` is unknown (expressions read inputs, steps, trigger and run)"
        )),
        (None, _) => None,
    }
}

/// A step id: read in expressions as `steps.ID`.
fn valid_step_id(id: &str) -> bool {
    id.len() <= 63
        && id
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The steps `id` waits for, directly or through others.
pub fn ancestors(steps: &[Step], id: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![id.to_owned()];
    while let Some(cur) = todo.pop() {
        if let Some(s) = steps.iter().find(|s| s.id == cur) {
            for n in &s.needs {
                if out.insert(n.clone()) {
                    todo.push(n.clone());
                }
            }
        }
    }
    out
}

fn find_cycle(steps: &[Step]) -> Option<Vec<String>> {
    // 0: unvisited, 1: on the stack, 2: done.
    fn visit(
        steps: &[Step],
        i: usize,
        mark: &mut [u8],
        stack: &mut Vec<usize>,
    ) -> Option<Vec<String>> {
        mark[i] = 1;
        stack.push(i);
        for n in &steps[i].needs {
            let Some(j) = steps.iter().position(|s| &s.id == n) else {
                continue;
            };
            if mark[j] == 1 {
                let from = stack.iter().position(|&k| k == j).unwrap_or(0);
                let mut cycle: Vec<String> =
                    stack[from..].iter().map(|&k| steps[k].id.clone()).collect();
                cycle.push(steps[j].id.clone());
                return Some(cycle);
            }
            if mark[j] == 0 {
                if let Some(c) = visit(steps, j, mark, stack) {
                    return Some(c);
                }
            }
        }
        stack.pop();
        mark[i] = 2;
        None
    }
    let mut mark = vec![0u8; steps.len()];
    for i in 0..steps.len() {
        if mark[i] == 0 {
            if let Some(c) = visit(steps, i, &mut mark, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
workflows:
  fan:
    inputs:
      who: { default: "world" }
    concurrency: { group: "fan-${{ inputs.who }}", policy: queue }
    steps:
      - id: start
        type: noop
        node: a
      - id: left
        type: exec
        node: a
        needs: [start]
        with: { op: echo, args: ["${{ inputs.who }}"] }
      - id: right
        type: service-check
        selector: { labels: { zone: home } }
        needs: [start]
        with: { tcp: "127.0.0.1:1" }
        retry: { attempts: 3, backoff: 1s }
        timeout: 30s
      - id: join
        type: noop
        node: a
        needs: [left, right]
        if: "${{ always() }}"
      - id: after
        type: approval
        with: { message: "${{ steps.left.outputs.stdout }}" }
"#;

    #[test]
    fn a_good_file_resolves_needs_and_defaults() {
        let w = check(GOOD).unwrap();
        let fan = &w["fan"];
        assert_eq!(fan.steps.len(), 5);
        assert_eq!(fan.step("after").unwrap().needs, vec!["join".to_owned()]);
        assert_eq!(fan.step("join").unwrap().needs, vec!["left", "right"]);
        assert_eq!(fan.step("right").unwrap().retry.attempts, 3);
        assert_eq!(fan.step("left").unwrap().retry, Retry::none());
        assert_eq!(fan.concurrency.as_ref().unwrap().policy, Policy::Queue);
        // What runs keep survives JSON.
        let back: Workflow = serde_json::from_value(serde_json::to_value(fan).unwrap()).unwrap();
        assert_eq!(&back, fan);
    }

    fn errors(text: &str) -> Vec<String> {
        check(text)
            .unwrap_err()
            .0
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn mistakes_are_refused_with_line_and_column() {
        let e = errors("workflows:\n  w:\n    steps:\n      - id: a\n        type: noop\n        node: x\n        colour: red\n");
        assert!(e[0].starts_with("7:9:") && e[0].contains("colour"), "{e:?}");
        let e = errors("workflows:\n  w:\n    steps:\n      - id: a\n        type: teleport\n");
        assert!(e[0].starts_with("5:15:"), "{e:?}");
        let e = errors("workflows:\n  w:\n    steps:\n      - id: a\n        type: noop\n        node: x\n        needs: [ghost]\n");
        assert!(e[0].starts_with("7:17:") && e[0].contains("ghost"), "{e:?}");
        let e = errors("workflows:\n  w:\n    steps:\n      - { id: a, type: noop, node: x, needs: [b] }\n      - { id: b, type: noop, node: x, needs: [a] }\n");
        assert!(
            e[0].contains("cycle") && e[0].contains("a -> b -> a"),
            "{e:?}"
        );
        let e = errors("workflows:\n  w:\n    steps:\n      - { id: a, type: exec, node: x }\n");
        assert!(e[0].contains("needs `with.op`"), "{e:?}");
        let e = errors(
            "workflows:\n  w:\n    steps:\n      - { id: a, type: exec, with: { op: x } }\n",
        );
        assert!(e[0].contains("give `node` or `selector`"), "{e:?}");
        let e = errors("workflows:\n  w:\n    steps:\n      - { id: a, type: noop, node: x }\n      - { id: b, type: noop, node: x, needs: [], with: {}, if: \"steps.a.outputs\" }\n");
        assert!(e[0].contains("not a step this one needs"), "{e:?}");
        let e = errors("workflows:\n  w:\n    steps:\n      - { id: a, type: exec, node: x, with: { op: \"${{ secrets.T }}\" } }\n");
        assert!(e[0].contains("secrets are not read"), "{e:?}");
        let e = errors("workflows:\n  w:\n    steps:\n      - { id: a, type: exec, node: x, with: { op: \"${{ inputs.nope }}\" } }\n");
        assert!(e[0].contains("not an input"), "{e:?}");
        let e = errors("workflows:\n  w:\n    steps:\n      - { id: a, type: noop, node: x, retry: { attempts: 0 } }\n");
        assert!(e[0].contains("retry.attempts"), "{e:?}");
        let e = errors("workflows:\n  w:\n    steps: []\n");
        assert!(e[0].contains("no steps"), "{e:?}");
        let e = errors("workflows:\n  w:\n    steps:\n      - { id: a, type: noop, node: x }\n      - { id: a, type: noop, node: x }\n");
        assert!(e[0].contains("defined twice"), "{e:?}");
    }

    #[test]
    fn retry_delays_grow_to_their_cap() {
        let r = Retry {
            attempts: 5,
            backoff: Duration::from_secs(1),
            factor: 2.0,
            max_backoff: Duration::from_secs(5),
        };
        let d: Vec<u64> = (1..=5).map(|a| r.delay(a).as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 5, 5]);
    }

    #[test]
    fn the_example_file_checks() {
        let (w, agents) =
            check_file(include_str!("../../../config/workflows.example.yml")).unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(w["nightly-verify"].on.schedule[0].timezone, "Europe/Berlin");
        assert_eq!(w["ask-ops"].steps[0].kind, StepKind::Agent);
        assert_eq!(agents["ops"].persona, "DevOps Commander");
    }

    #[test]
    fn one_workflow_reads_as_yaml_or_json() {
        let w = check_one(
            "solo",
            r#"{"steps": [{"id": "a", "type": "noop", "node": "x"}]}"#,
        )
        .unwrap();
        assert_eq!(w.name, "solo");
        assert!(check_one("solo", "steps: [{id: a, type: noop}]").is_err());
    }
}
