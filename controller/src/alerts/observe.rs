//! What the built-in rules see: one pass over the nodes (connection, wake, agent version,
//! certificate, CPU and memory figures, containers) and the services.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nebula_alerts::Observation;
use nebula_protocol::deploy::labels as managed_labels;
use nebula_protocol::telemetry::{ContainerHealth, ContainerState};

use super::{labels, ms, AlertsConfig, CONTROLLER_VERSION};
use crate::store::NodeRecord;
use crate::ControlPlane;

/// What the built-in rules see now, and which nodes' figures were in view (rules about a
/// node's containers and figures leave the alerts of a node out of view as they are).
#[derive(Default)]
pub(super) struct Seen {
    pub by_rule: BTreeMap<String, Vec<Observation>>,
    /// Nodes with current telemetry (containers, memory).
    pub in_view: BTreeSet<String>,
    /// Nodes with enough samples for the CPU average.
    pub cpu_in_view: BTreeSet<String>,
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

    /// Everything the built-in rules look at, now.
    pub async fn gather(cp: &ControlPlane, cfg: &AlertsConfig) -> anyhow::Result<Seen> {
        let mut seen = Seen::default();
        let now_ms = nebula_protocol::time::UnixMillis::now().as_i64();
        for n in &cp.store.list_nodes().await? {
            let online = cp.registry.get(n.id).is_some();
            seen.node(cp, cfg, n, online, now_ms);
            if online {
                seen.figures(cp, cfg, n, now_ms);
                seen.containers(cp, n);
            }
        }
        if cp.desired.active().is_some() {
            seen.services(cp).await?;
        }
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
        let node = labels(&[("node", &n.name)]);
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

    /// CPU averaged over the window (with enough samples) and memory now.
    fn figures(&mut self, cp: &ControlPlane, cfg: &AlertsConfig, n: &NodeRecord, now_ms: i64) {
        let node = labels(&[("node", &n.name)]);
        let since = ((now_ms / 1000) as u32).saturating_sub(cfg.resource_window.as_secs() as u32);
        let hist = cp.telemetry.history(n.id, since);
        if hist.len() >= cfg.resource_min_samples.max(1) {
            self.cpu_in_view.insert(n.name.clone());
            let cpu =
                hist.iter().map(|p| f64::from(p.cpu) / 100.0).sum::<f64>() / hist.len() as f64;
            let window = humantime::format_duration(cfg.resource_window);
            self.push(
                "cpu_high",
                obs(
                    node.clone(),
                    cpu >= cfg.cpu_percent,
                    Some(cpu),
                    format!(
                        "CPU on {} at {cpu:.0}% over {window} (threshold {:.0}%)",
                        n.name, cfg.cpu_percent
                    ),
                ),
            );
        }
        let latest = cp.telemetry.view(n.id).and_then(|v| v.latest);
        if let Some(s) = latest.filter(|s| s.host.memory_total_bytes > 0) {
            let used = s.host.memory_used_bytes as f64 / s.host.memory_total_bytes as f64 * 100.0;
            self.push(
                "memory_high",
                obs(
                    node,
                    used >= cfg.memory_percent,
                    Some(used),
                    format!(
                        "memory on {} at {used:.0}% (threshold {:.0}%)",
                        n.name, cfg.memory_percent
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
        self.in_view.insert(n.name.clone());
        let node_id = n.id.to_string();
        for (c, v) in inv.containers.iter().zip(&s.containers) {
            let managed = c.labels.get(managed_labels::MANAGED).map(String::as_str) == Some("true")
                && c.labels.get(managed_labels::NODE) == Some(&node_id);
            let mut l = labels(&[("node", &n.name), ("container", &c.name)]);
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
            let l = labels(&[("service", &svc.name)]);
            let why = svc.message.clone().unwrap_or_default();
            let failed = svc.status == "failed";
            self.push(
                "service_failed",
                obs(
                    l.clone(),
                    failed,
                    None,
                    format!("service {} failed: {why}", svc.name),
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
}
