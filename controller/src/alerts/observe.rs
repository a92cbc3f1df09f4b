//! What the rules see: one pass over the nodes (connection, wake, agent version, certificate,
//! figures against every threshold rule, containers), then the services, the monitors' last
//! results and the inference backends.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nebula_alerts::Observation;
use nebula_protocol::deploy::labels as managed_labels;
use nebula_protocol::telemetry::{ContainerHealth, ContainerState};

use super::rules::Threshold;
use super::{figures, labels as labels_of, ms, AlertsConfig, CONTROLLER_VERSION};
use crate::store::NodeRecord;
use crate::ControlPlane;

/// What the rules see now, and which nodes each rule had in view (rules about a node's
/// figures, containers and monitors leave the alerts of a node out of view as they are).
#[derive(Default)]
pub(crate) struct Seen {
    pub by_rule: BTreeMap<String, Vec<Observation>>,
    /// Per rule, the nodes in view; a rule not listed sees every node.
    pub views: BTreeMap<String, BTreeSet<String>>,
}

fn obs(
    labels: nebula_alerts::Labels,
    active: bool,
    value: Option<f64>,
    summary: String,
) -> Observation {
    Observation {
        labels,
        active,
        value,
        summary,
    }
}

impl Seen {
    fn push(&mut self, rule: &str, o: Observation) {
        self.by_rule.entry(rule.to_owned()).or_default().push(o);
    }

    fn in_view(&mut self, rule: &str, node: &str) {
        self.views
            .entry(rule.to_owned())
            .or_default()
            .insert(node.to_owned());
    }

    /// Everything the rules look at, now.
    pub async fn gather(
        cp: &ControlPlane,
        cfg: &AlertsConfig,
        thresholds: &[Threshold],
    ) -> anyhow::Result<Seen> {
        let mut seen = Seen::default();
        for t in thresholds {
            seen.views.entry(t.rule.clone()).or_default();
        }
        for rule in [
            "container_down",
            "container_restarting",
            "container_unhealthy",
            "monitor_down",
            "monitor_certificate_expiring",
            "ai_backend_unavailable",
        ] {
            seen.views.entry(rule.to_owned()).or_default();
        }
        let now_ms = nebula_protocol::time::UnixMillis::now().as_i64();
        let active = cp.desired.active();
        let mut online = BTreeSet::new();
        for n in &cp.store.list_nodes().await? {
            let is_online = cp.registry.get(n.id).is_some();
            seen.node(cp, cfg, n, is_online, now_ms);
            if is_online {
                online.insert(n.name.clone());
                let mut labels = n.labels.clone();
                if let Some(extra) = active
                    .as_ref()
                    .and_then(|a| a.desired.nodes.as_ref()?.get(&n.name))
                {
                    labels.extend(extra.clone());
                }
                seen.figures(cp, n, &labels, thresholds, now_ms);
                seen.containers(cp, n);
            }
        }
        if active.is_some() {
            seen.services(cp).await?;
        }
        seen.monitors(cp, cfg, &online, now_ms);
        seen.ai(cp, &online);
        Ok(seen)
    }

    /// Connection, wake, agent version, certificate.
    fn node(
        &mut self,
        cp: &ControlPlane,
        cfg: &AlertsConfig,
        n: &NodeRecord,
        online: bool,
        now_ms: i64,
    ) {
        let node = labels_of(&[("node", &n.name)]);
        self.push(
            "node_unreachable",
            obs(
                node.clone(),
                !online,
                None,
                format!("{} is not connected to the controller", n.name),
            ),
        );
        let failed = cp.wakes.get(n.id).is_some_and(|w| w.failed);
        self.push(
            "wake_failed",
            obs(
                node.clone(),
                failed,
                None,
                format!("waking {} failed: it did not register in time", n.name),
            ),
        );
        if online {
            self.push(
                "agent_outdated",
                obs(
                    node.clone(),
                    n.agent_version != CONTROLLER_VERSION,
                    None,
                    format!(
                        "{} runs nebula-agent {} (the controller is {CONTROLLER_VERSION})",
                        n.name, n.agent_version
                    ),
                ),
            );
        }
        if let Some(after) = n.cert_not_after {
            let left = after - now_ms;
            let in_words =
                humantime::format_duration(Duration::from_secs((left.max(0) / 1000) as u64));
            self.push(
                "node_certificate_expiring",
                obs(
                    node,
                    online && left < ms(cfg.certificate_warning),
                    Some((left / 86_400_000) as f64),
                    format!("the certificate of {} expires in {in_words}", n.name),
                ),
            );
        }
    }

    /// Every threshold rule that applies to this node, on its figures.
    fn figures(
        &mut self,
        cp: &ControlPlane,
        n: &NodeRecord,
        labels: &nebula_alerts::Labels,
        thresholds: &[Threshold],
        now_ms: i64,
    ) {
        let Some(widest) = thresholds.iter().map(|t| t.window).max() else {
            return;
        };
        let since = ((now_ms / 1000) as u32).saturating_sub(widest.as_secs() as u32);
        let hist = cp.telemetry.history(n.id, since);
        let view = cp.telemetry.view(n.id);
        let figures = figures::Figures::new(n, view.as_ref(), &hist);
        for t in thresholds {
            let applies = (t.nodes.is_empty() || t.nodes.contains(&n.name))
                && nebula_placement::labels_match(labels, &t.node_labels);
            if !applies {
                // Out of its scope (now): what it fired for here resolves.
                self.in_view(&t.rule, &n.name);
                continue;
            }
            let from = ((now_ms / 1000) as u32).saturating_sub(t.window.as_secs() as u32);
            let Some(value) = figures.average(t.metric, from, t.min_samples) else {
                continue;
            };
            self.in_view(&t.rule, &n.name);
            let mut l = labels_of(&[("node", &n.name)]);
            l.extend(t.labels.clone());
            let window = humantime::format_duration(t.window);
            let unit = t.metric.unit();
            let (word, sign) = if t.above {
                ("above", ">")
            } else {
                ("below", "<")
            };
            self.push(
                &t.rule,
                obs(
                    l,
                    t.breached(value),
                    Some(value),
                    format!(
                        "{} on {} at {value:.1}{unit} over {window} ({word} the threshold: {sign} {}{unit})",
                        t.metric.as_str(),
                        n.name,
                        t.threshold
                    ),
                ),
            );
        }
    }

    /// Containers: managed ones down, any restarting in a loop or unhealthy.
    fn containers(&mut self, cp: &ControlPlane, n: &NodeRecord) {
        let Some(view) = cp.telemetry.view(n.id) else {
            return;
        };
        let (Some(inv), Some(s)) = (view.inventory.as_ref(), view.latest.as_ref()) else {
            return;
        };
        if inv.epoch != s.epoch {
            return;
        }
        for rule in [
            "container_down",
            "container_restarting",
            "container_unhealthy",
        ] {
            self.in_view(rule, &n.name);
        }
        let node_id = n.id.to_string();
        for (c, v) in inv.containers.iter().zip(&s.containers) {
            let managed = c.labels.get(managed_labels::MANAGED).map(String::as_str) == Some("true")
                && c.labels.get(managed_labels::NODE) == Some(&node_id);
            let mut l = labels_of(&[("node", &n.name), ("container", &c.name)]);
            if let Some(svc) = c.labels.get(managed_labels::SERVICE) {
                l.insert("service".into(), svc.clone());
            }
            if managed {
                let down = v.state != ContainerState::Running;
                let words = format!("{} on {} is {}", c.name, n.name, v.state.as_str());
                self.push("container_down", obs(l.clone(), down, None, words));
            }
            let restarts = f64::from(v.restart_count);
            let words = format!(
                "{} on {} keeps restarting ({} restarts)",
                c.name, n.name, v.restart_count
            );
            let looping = v.state == ContainerState::Restarting;
            self.push(
                "container_restarting",
                obs(l.clone(), looping, Some(restarts), words),
            );
            let sick = v.health == ContainerHealth::Unhealthy;
            let words = format!("{} on {} is {}", c.name, n.name, v.health.as_str());
            self.push("container_unhealthy", obs(l, sick, None, words));
        }
    }

    /// Services, desired against actual.
    async fn services(&mut self, cp: &ControlPlane) -> anyhow::Result<()> {
        for svc in cp.services().await.map_err(|e| anyhow::anyhow!("{e}"))? {
            if !svc.declared {
                continue;
            }
            let l = labels_of(&[("service", &svc.name)]);
            let why = svc.message.clone().unwrap_or_default();
            let failed = svc.status == "failed";
            self.push(
                "deploy_failed",
                obs(
                    l.clone(),
                    failed,
                    None,
                    format!("the deploy of service {} failed: {why}", svc.name),
                ),
            );
            let unsettled = matches!(
                svc.status.as_str(),
                "deploying" | "pending" | "waiting" | "refused"
            );
            let words = format!(
                "service {} is {} ({} of {} running) {why}",
                svc.name, svc.status, svc.running, svc.replicas
            );
            self.push(
                "service_not_converged",
                obs(l, unsettled, Some(f64::from(svc.running)), words),
            );
        }
        Ok(())
    }

    /// Monitors: the last result of each (monitor, node) that is still assigned, for online
    /// nodes.
    fn monitors(
        &mut self,
        cp: &ControlPlane,
        cfg: &AlertsConfig,
        online: &BTreeSet<String>,
        now_ms: i64,
    ) {
        for node in online {
            self.in_view("monitor_down", node);
            self.in_view("monitor_certificate_expiring", node);
        }
        let defs = cp.monitors.defs();
        for (monitor, node, r) in cp.monitors.latest() {
            let Some(def) = defs.get(&monitor) else {
                continue;
            };
            if !online.contains(&node) || !def.nodes.contains(&node) {
                continue;
            }
            let mut l = labels_of(&[("monitor", &monitor), ("node", &node)]);
            if let Some(svc) = &def.monitor.service {
                l.insert("service".into(), svc.clone());
            }
            let target = def.monitor.check.target();
            let words = match &r.error {
                Some(e) => format!("{monitor} ({target}) is down from {node}: {e}"),
                None => format!("{monitor} ({target}) is up from {node}"),
            };
            let latency = r.latency_us as f64 / 1000.0;
            self.push("monitor_down", obs(l.clone(), !r.up, Some(latency), words));
            if let Some(expires) = r.cert_expires_ms {
                let left = expires.saturating_sub(now_ms);
                let days = left as f64 / 86_400_000.0;
                let words =
                    format!("the certificate of {target} ({monitor}) expires in {days:.1} days");
                let soon = left < ms(cfg.monitor_certificate_warning);
                self.push(
                    "monitor_certificate_expiring",
                    obs(l, soon, Some(days), words),
                );
            }
        }
    }

    /// Inference backends: unhealthy ones, and models whose breaker is open.
    fn ai(&mut self, cp: &ControlPlane, online: &BTreeSet<String>) {
        for node in online {
            self.in_view("ai_backend_unavailable", node);
        }
        let inventory = cp.ai.inventory();
        for (node, (_, inv)) in &inventory {
            if !online.contains(node) {
                continue;
            }
            for b in &inv.backends {
                let l = labels_of(&[("node", node), ("backend", &b.name)]);
                let why = b.error.clone().unwrap_or_else(|| "unhealthy".into());
                let words = format!("the {} backend on {node} is unavailable: {why}", b.name);
                self.push("ai_backend_unavailable", obs(l, !b.healthy, None, words));
            }
        }
        for (node_id, model) in cp.ai.open_breakers() {
            let Some(node) = inventory
                .iter()
                .find(|(_, (id, _))| *id == node_id)
                .map(|(n, _)| n.clone())
            else {
                continue;
            };
            let l = labels_of(&[("node", &node), ("model", &model)]);
            let words = format!("requests for {model} on {node} keep failing: its breaker is open");
            self.push("ai_backend_unavailable", obs(l, true, None, words));
        }
    }
}
