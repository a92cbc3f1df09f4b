//! The fleet commands. Each one resolves the Discord user to a principal and calls the
//! control-plane operation the API calls; reads answer at once, destructive actions go
//! through [`confirm`].

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use nebula_controller::authz::Op;
use nebula_controller::OpError;
use nebula_types::api::alerts::CreateSilence;
use nebula_types::api::nodes::NodeStatus;
use nebula_types::jobs::JobState;
use serenity::all::{CommandInteraction, ComponentInteraction, EditInteractionResponse};

use super::backend::Principal;

use super::commands::opt;
use super::confirm::{self, Action};
use super::{clip, principal, refusal, reply, who_of_command, Bot};

/// A fleet command.
pub(crate) async fn command(bot: &Arc<Bot>, cmd: &CommandInteraction) {
    let p = match principal(bot, &who_of_command(cmd)).await {
        Ok(p) => p,
        Err(why) => return reply(bot, cmd, &why, true).await,
    };
    let name = cmd.data.name.as_str();
    // The destructive ones: checked now (the operation checks again when it runs), deferred
    // within Discord's 3 s, then confirmed by the same user.
    let destructive = match name {
        "deploy" => Some(match opt(cmd, "rollback") {
            Some(s) => (
                Op::RollbackService,
                Action::Rollback {
                    service: s.to_owned(),
                },
            ),
            None => (Op::Reconcile, Action::Deploy),
        }),
        "wake" => Some((
            Op::WakeNode,
            Action::Wake {
                node: node_arg(cmd),
            },
        )),
        "sleep" => Some((
            Op::SleepNode,
            Action::Sleep {
                node: node_arg(cmd),
            },
        )),
        "run" => Some((
            Op::RunJob,
            Action::Run {
                node: node_arg(cmd),
                op: opt(cmd, "operation").unwrap_or("").to_owned(),
                args: opt(cmd, "args").map(shell_words).unwrap_or_default(),
            },
        )),
        _ => None,
    };
    if let Some((op, action)) = destructive {
        if let Err(e) = p.allows(op) {
            return reply(bot, cmd, &refusal(&e), true).await;
        }
        if let Err(e) = cmd.defer_ephemeral(&bot.http).await {
            tracing::warn!("could not defer /{name}: {e}");
            return;
        }
        let detail = preview(bot, &p, &action).await;
        return confirm::ask(bot, cmd, p, action, &detail).await;
    }
    let answer = match name {
        "fleet" => fleet(bot, &p).await,
        "node" => node(bot, &p, &node_arg(cmd)).await,
        "services" => services(bot, &p).await,
        "jobs" => jobs(bot, &p).await,
        "alerts" => alerts(bot, &p).await,
        "silence" => silence(bot, &p, cmd).await,
        other => Err(format!("`/{other}` is not a command here")),
    };
    match answer {
        Ok(text) => reply(bot, cmd, &text, false).await,
        Err(why) => reply(bot, cmd, &why, true).await,
    }
}

fn node_arg(cmd: &CommandInteraction) -> String {
    opt(cmd, "node").unwrap_or("").trim().to_owned()
}

/// Arguments as a shell would split them (quotes kept together); unbalanced quotes split on
/// spaces.
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for ch in s.chars() {
        match (quote, ch) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(ch);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if quote.is_some() {
        return s.split_whitespace().map(str::to_owned).collect();
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// What a destructive action will do, for its confirmation.
async fn preview(bot: &Bot, p: &Principal, action: &Action) -> String {
    match action {
        Action::Deploy => match bot.backend.plan(p).await {
            Ok(p) if p.version.is_none() => "No service map is in force.".into(),
            Ok(p) => {
                let mut s = format!("Map version {}:", p.version.unwrap_or_default());
                if p.plan.actions.is_empty() {
                    let _ = write!(s, " nothing to change ({} unchanged).", p.plan.unchanged);
                }
                for a in p.plan.actions.iter().take(15) {
                    let _ = write!(s, "\n• {} `{}` on `{}`", a.verb(), a.service(), a.node());
                }
                if p.plan.actions.len() > 15 {
                    let _ = write!(s, "\n• … {} more", p.plan.actions.len() - 15);
                }
                for w in p.plan.waiting.iter().chain(&p.plan.refused).take(5) {
                    let on = w
                        .node
                        .as_deref()
                        .map(|n| format!(" on `{n}`"))
                        .unwrap_or_default();
                    let _ = write!(s, "\n⏸ `{}`{on}: {}", w.service, w.reason);
                }
                s
            }
            Err(e) => refusal(&e),
        },
        Action::Rollback { service } => {
            format!("`{service}` goes back to its previous deployed revision.")
        }
        Action::Wake { node } | Action::Sleep { node } => format!("Node `{node}`."),
        Action::Run { node, .. } => format!("On `{node}`; its output follows here."),
    }
}

/// Run a confirmed action as `p` and report on the confirmation message.
pub(crate) async fn run_confirmed(
    bot: &Arc<Bot>,
    c: &ComponentInteraction,
    p: &Principal,
    action: Action,
) {
    let b = &bot.backend;
    let text = match action {
        Action::Deploy => match b.reconcile(p).await {
            Ok(()) => {
                "✅ The reconciler is making the fleet match the map in force now.".to_owned()
            }
            Err(e) => refusal(&e),
        },
        Action::Rollback { service } => match b.rollback(p, &service).await {
            Ok(revision) => format!("✅ `{service}` rolls back to revision `{revision}`."),
            Err(e) => refusal(&e),
        },
        Action::Wake { node } => match b.wake(p, &node).await {
            Ok(w) => format!(
                "✅ Waking `{node}` through `{}` (job `{}`).",
                w.relay, w.job
            ),
            Err(e) => refusal(&e),
        },
        Action::Sleep { node } => match b.sleep(p, &node).await {
            Ok(job) => format!("✅ `{node}` is going to sleep (job `{job}`)."),
            Err(e) => refusal(&e),
        },
        Action::Run { node, op, args } => return run_streaming(bot, c, p, node, op, args).await,
    };
    edit_component(bot, c, &text).await;
}

async fn edit_component(bot: &Bot, c: &ComponentInteraction, text: &str) {
    if let Err(e) = c
        .edit_response(
            &bot.http,
            EditInteractionResponse::new().content(clip(text)),
        )
        .await
    {
        tracing::warn!("could not edit the message: {e}");
    }
}

/// `/run`: create the job, then edit the message with its output as it comes (at most once a
/// second) until it ends.
async fn run_streaming(
    bot: &Arc<Bot>,
    c: &ComponentInteraction,
    p: &Principal,
    node: String,
    op: String,
    args: Vec<String>,
) {
    let job = match bot.backend.run(p, &node, &op, args).await {
        Ok(j) => j,
        Err(e) => return edit_component(bot, c, &refusal(&e)).await,
    };
    let head = format!("`{op}` on `{node}` (job `{job}`)");
    let mut shown = String::new();
    let mut failures = 0;
    loop {
        let (rec, lines) = match bot.backend.job_output(p, job).await {
            Ok(out) => out,
            // The controller unreachable a moment: try again (for a minute).
            Err(OpError::Conflict(why)) if failures < 30 => {
                failures += 1;
                tracing::warn!(%job, "could not read the job's output: {why}");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            Err(e) => return edit_component(bot, c, &refusal(&e)).await,
        };
        let done = rec.as_ref().is_none_or(|r| r.state.is_terminal());
        let out = tail(lines.iter().map(String::as_str), 1500);
        let state = rec.as_ref().map_or(JobState::Lost, |r| r.state);
        let status = match (state, rec.as_ref().and_then(|r| r.exit_code)) {
            (JobState::Succeeded, _) => "✅ done".to_owned(),
            (s, Some(code)) if s.is_terminal() => format!("❌ {} (exit {code})", s.as_str()),
            (s, _) if s.is_terminal() => format!(
                "❌ {}{}",
                s.as_str(),
                rec.as_ref()
                    .and_then(|r| r.error.clone())
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
            (s, _) => format!("⏳ {}", s.as_str()),
        };
        let text = format!("{head}: {status}\n```\n{out}\n```");
        if text != shown {
            edit_component(bot, c, &text).await;
            shown = text;
        }
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}

/// The last `max` characters of the lines, on line boundaries.
fn tail<'a>(lines: impl DoubleEndedIterator<Item = &'a str>, max: usize) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut len = 0;
    for l in lines.rev() {
        if len + l.len() + 1 > max {
            break;
        }
        len += l.len() + 1;
        kept.push(l);
    }
    kept.reverse();
    kept.join("\n").replace("```", "'''")
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

async fn fleet(bot: &Bot, p: &Principal) -> Result<String, String> {
    let b = &bot.backend;
    let nodes = b.nodes(p).await.map_err(|e| refusal(&e))?;
    let online = nodes
        .iter()
        .filter(|n| n.status == NodeStatus::Online)
        .count();
    let services = b.services(p).await.map_err(|e| refusal(&e))?;
    let converged = services.iter().filter(|s| s.status == "converged").count();
    let alerts = b.alerts(p).await.map_err(|e| refusal(&e))?;
    let active = b.active_jobs(p).await.map_err(|e| refusal(&e))?;
    let firing = alerts.iter().filter(|a| a.state == "firing").count();
    let mut s = format!(
        "**Fleet**: {online}/{} nodes online · {converged}/{} services converged · {firing} alert(s) firing · {} job(s) active",
        nodes.len(),
        services.len(),
        active
    );
    for n in nodes.iter().take(20) {
        let mark = if n.status == NodeStatus::Online {
            "🟢"
        } else {
            "⚫"
        };
        let _ = write!(s, "\n{mark} `{}`", n.name);
        if let Some(t) = &n.telemetry {
            let _ = write!(
                s,
                " CPU {:.0}% · mem {}/{}",
                t.cpu_percent,
                gib(t.memory_used_bytes),
                gib(t.memory_total_bytes)
            );
            if let Some(u) = t.gpu_utilization_percent {
                let _ = write!(s, " · GPU {u:.0}%");
            }
        }
    }
    Ok(s)
}

async fn node(bot: &Bot, p: &Principal, name: &str) -> Result<String, String> {
    let nodes = bot.backend.nodes(p).await.map_err(|e| refusal(&e))?;
    let n = nodes
        .iter()
        .find(|n| n.name == name)
        .ok_or_else(|| format!("⚠️ No node named `{name}`."))?;
    let mut s = format!(
        "**{}** · {:?} · agent {}",
        n.name, n.status, n.agent_version
    );
    if let Some(t) = &n.telemetry {
        let _ = write!(
            s,
            "\nCPU {:.0}% (load {:.2}) · memory {} of {} · containers {} running of {}, {} unhealthy",
            t.cpu_percent,
            t.load1,
            gib(t.memory_used_bytes),
            gib(t.memory_total_bytes),
            t.containers_running,
            t.containers_total,
            t.containers_unhealthy
        );
    }
    if let Some(latest) = bot
        .backend
        .node_latest(p, name)
        .await
        .map_err(|e| refusal(&e))?
    {
        for g in &latest.gpus {
            let _ = write!(s, "\nGPU {} · {}", g.name, gib(g.memory_total_bytes));
            if let (Some(u), Some(m)) = (g.utilization_percent, g.memory_used_bytes) {
                let _ = write!(s, " · {u}% busy · {} used", gib(m));
            }
        }
        let names: Vec<&str> = latest.containers.iter().map(|c| c.name.as_str()).collect();
        if !names.is_empty() {
            let _ = write!(s, "\nContainers: {}", names.join(", "));
        }
    }
    Ok(s)
}

async fn services(bot: &Bot, p: &Principal) -> Result<String, String> {
    let list = bot.backend.services(p).await.map_err(|e| refusal(&e))?;
    if list.is_empty() {
        return Ok("No services are declared.".into());
    }
    let mut s = String::from("**Services**");
    for v in list.iter().take(30) {
        let mark = match v.status.as_str() {
            "converged" => "🟢",
            "deploying" | "pending" | "waiting" => "🟡",
            _ => "🔴",
        };
        let _ = write!(
            s,
            "\n{mark} `{}` {} · {}/{} healthy",
            v.name, v.status, v.healthy, v.replicas
        );
    }
    Ok(s)
}

async fn jobs(bot: &Bot, p: &Principal) -> Result<String, String> {
    let list = bot.backend.jobs(p, 10).await.map_err(|e| refusal(&e))?;
    if list.is_empty() {
        return Ok("No jobs yet.".into());
    }
    let mut s = String::from("**Recent jobs**");
    for j in &list {
        let _ = write!(
            s,
            "\n`{}` {} · {} · {} · by {}",
            &j.id.to_string()[..8],
            j.work.summary(),
            j.node.as_deref().unwrap_or("-"),
            j.state.as_str(),
            j.created_by
        );
    }
    Ok(s)
}

async fn alerts(bot: &Bot, p: &Principal) -> Result<String, String> {
    let list = bot.backend.alerts(p).await.map_err(|e| refusal(&e))?;
    if list.is_empty() {
        return Ok("✅ Nothing fires.".into());
    }
    let mut s = String::from("**Alerts**");
    for a in list.iter().take(20) {
        let _ = write!(
            s,
            "\n{} **{}** {} · {}{}",
            if a.state == "firing" { "🔥" } else { "⏳" },
            a.rule,
            a.severity,
            a.summary,
            if a.silenced { " (silenced)" } else { "" }
        );
    }
    Ok(s)
}

async fn silence(bot: &Bot, p: &Principal, cmd: &CommandInteraction) -> Result<String, String> {
    let matchers: Vec<String> = opt(cmd, "match")
        .unwrap_or("")
        .split([' ', ','])
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .collect();
    let req = CreateSilence {
        matchers,
        duration: opt(cmd, "for").unwrap_or("").to_owned(),
        comment: opt(cmd, "comment").unwrap_or("from Discord").to_owned(),
    };
    let v = bot.backend.silence(p, req).await.map_err(|e| refusal(&e))?;
    Ok(format!(
        "🔕 Silenced {} until {} (id `{}`).",
        v.matchers.join(" "),
        v.ends_at,
        v.id
    ))
}

/// Node names, for autocomplete.
pub(crate) async fn node_names(bot: &Bot, p: &Principal) -> Vec<String> {
    bot.backend
        .nodes(p)
        .await
        .map(|n| n.into_iter().map(|n| n.name).collect())
        .unwrap_or_default()
}

/// Declared service names, for autocomplete.
pub(crate) async fn service_names(bot: &Bot, p: &Principal) -> Vec<String> {
    bot.backend
        .services(p)
        .await
        .map(|s| s.into_iter().map(|s| s.name).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_split_like_a_shell_would() {
        assert_eq!(shell_words("a b  c"), ["a", "b", "c"]);
        assert_eq!(
            shell_words("-m 'two words' \"x y\""),
            ["-m", "two words", "x y"]
        );
        assert_eq!(shell_words("''"), [""]);
        assert_eq!(shell_words("it's"), ["it's"]);
    }

    #[test]
    fn the_tail_keeps_whole_lines_and_no_code_fence() {
        let lines = ["one", "two", "```three"];
        assert_eq!(tail(lines.iter().copied(), 100), "one\ntwo\n'''three");
        assert_eq!(tail(lines.iter().copied(), 14), "two\n'''three");
    }
}
