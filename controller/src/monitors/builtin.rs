//! Built-in monitors, from what nodes report: each node's container runtime (`docker.NODE`),
//! each Ollama backend (`ollama.NODE`), and each running PostgreSQL container with a published
//! port (`postgres.NODE.CONTAINER`); and where services run, for `monitor: true`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nebula_desired::map::monitors::DesiredMonitor;
use nebula_protocol::ai::BackendKind;
use nebula_protocol::deploy::labels as managed_labels;
use nebula_protocol::monitors::MonitorCheck;
use nebula_protocol::telemetry::ContainerState;
use uuid::Uuid;

use crate::store::NodeRecord;
use crate::ControlPlane;

/// A monitor name from parts: characters a name may not hold become `-`, cut to 63.
fn name(parts: &[&str]) -> String {
    let mut s: String = parts
        .join(".")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(63);
    s
}

fn on(node: &str, check: MonitorCheck) -> DesiredMonitor {
    DesiredMonitor {
        check,
        interval: Duration::from_secs(30),
        timeout: Duration::from_secs(10),
        nodes: vec![node.to_owned()],
        labels: Default::default(),
        service: None,
    }
}

/// Is `image` PostgreSQL (`postgres`, `postgres:16`, `docker.io/library/postgres`,
/// `postgis/postgis`, `bitnami/postgresql`)?
fn is_postgres(image: &str) -> bool {
    let repo = image.split('@').next().unwrap_or(image);
    let last = repo.rsplit('/').next().unwrap_or(repo);
    let last = last.split(':').next().unwrap_or(last);
    matches!(last, "postgres" | "postgresql" | "postgis")
}

pub(super) fn monitors(cp: &ControlPlane, nodes: &[NodeRecord]) -> Vec<(String, DesiredMonitor)> {
    let mut out = Vec::new();
    let ai = cp.ai.inventory();
    for n in nodes {
        let view = cp.telemetry.view(n.id);
        let inventory = view.as_ref().and_then(|v| v.inventory.clone());
        // The runtime the node reported at its session start counts too: when the daemon
        // dies, the inventory loses it, and that is when its monitor must stay (and fail).
        let has_runtime = n.facts.container_runtime.is_some()
            || inventory
                .as_ref()
                .is_some_and(|i| i.container_runtime.is_some());
        if has_runtime {
            out.push((
                name(&["docker", &n.name]),
                on(&n.name, MonitorCheck::Docker),
            ));
        }
        if let Some((_, inv)) = ai.get(&n.name) {
            for b in inv
                .backends
                .iter()
                .filter(|b| b.kind == BackendKind::Ollama)
            {
                let url = format!("{}/api/version", b.url.trim_end_matches('/'));
                let check = MonitorCheck::Http {
                    url,
                    statuses: Vec::new(),
                    body_contains: Some("version".into()),
                    insecure: false,
                };
                let parts: Vec<&str> = if b.name == "ollama" {
                    vec!["ollama", &n.name]
                } else {
                    vec!["ollama", &n.name, &b.name]
                };
                out.push((name(&parts), on(&n.name, check)));
            }
        }
        let (Some(v), Some(inv)) = (view.as_ref(), inventory.as_ref()) else {
            continue;
        };
        let (Some(details), Some(sample)) = (v.details.as_ref(), v.latest.as_ref()) else {
            continue;
        };
        if sample.epoch != inv.epoch {
            continue;
        }
        for ((c, d), s) in inv
            .containers
            .iter()
            .zip(&details.containers)
            .zip(&sample.containers)
        {
            if !is_postgres(&c.image) {
                continue;
            }
            // A stopped container lists no published ports: its monitor keeps the port it
            // had while running (and fails), as long as the container exists.
            let key = name(&["postgres", &n.name, &c.name]);
            let published = d
                .ports
                .iter()
                .find(|p| p.container_port == 5432)
                .and_then(|p| p.host_port)
                .filter(|_| s.state == ContainerState::Running);
            let port = cp.monitors.builtin_port(&key, published);
            if let Some(port) = port {
                let check = MonitorCheck::Tcp {
                    address: format!("127.0.0.1:{port}"),
                };
                out.push((key, on(&n.name, check)));
            }
        }
    }
    out
}

/// The nodes each service's containers run on (managed containers in the telemetry).
pub(super) fn service_nodes(
    cp: &ControlPlane,
    nodes: &[NodeRecord],
) -> HashMap<String, HashSet<Uuid>> {
    let mut out: HashMap<String, HashSet<Uuid>> = HashMap::new();
    for n in nodes {
        let Some(inv) = cp.telemetry.view(n.id).and_then(|v| v.inventory) else {
            continue;
        };
        let id = n.id.to_string();
        for c in &inv.containers {
            let managed = c.labels.get(managed_labels::MANAGED).map(String::as_str) == Some("true")
                && c.labels.get(managed_labels::NODE) == Some(&id);
            if let (true, Some(svc)) = (managed, c.labels.get(managed_labels::SERVICE)) {
                out.entry(svc.clone()).or_default().insert(n.id);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_images_are_recognised() {
        for i in [
            "postgres",
            "postgres:16",
            "docker.io/library/postgres:16-alpine",
            "postgis/postgis",
            "bitnami/postgresql@sha256:ab",
        ] {
            assert!(is_postgres(i), "{i}");
        }
        for i in ["redis", "postgres-exporter", "my/postgrest"] {
            assert!(!is_postgres(i), "{i}");
        }
        assert_eq!(name(&["docker", "my node!"]), "docker.my-node-");
        assert_eq!(name(&["x", &"y".repeat(80)]).len(), 63);
    }
}
