//! The rule catalogue: the built-in rules with the config's timing and thresholds, and the
//! service map's own threshold rules (`alert_rules:`), all as engine rules; threshold rules
//! also as [`Threshold`]s, which the observer measures.

use std::collections::BTreeMap;
use std::time::Duration;

use nebula_alerts::{Rule, RuleTiming, Severity};
use nebula_desired::map::monitors::{DesiredRule, Metric};

use super::{ms, AlertsConfig};

/// A threshold on a node figure averaged over a window (built in, or from the map).
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    pub rule: String,
    pub metric: Metric,
    /// Fires above `threshold` (else below).
    pub above: bool,
    pub threshold: f64,
    pub window: Duration,
    pub min_samples: usize,
    /// Only these nodes (empty: any) and only nodes with these labels.
    pub nodes: Vec<String>,
    pub node_labels: BTreeMap<String, String>,
    /// Added to the alert's labels.
    pub labels: BTreeMap<String, String>,
}

impl Threshold {
    pub fn breached(&self, value: f64) -> bool {
        if self.above {
            value > self.threshold
        } else {
            value < self.threshold
        }
    }
}

/// Every rule: the engine's view, and the thresholds to measure.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    pub rules: BTreeMap<String, Rule>,
    pub thresholds: Vec<Threshold>,
}

fn severity(s: &str) -> Severity {
    super::sinks::parse_severity(s).unwrap_or(Severity::Warning)
}

/// The built-in rules (with `cfg`'s timing and thresholds) and the map's own.
pub fn catalogue(cfg: &AlertsConfig, own: &BTreeMap<String, DesiredRule>) -> Catalogue {
    let timing = |for_: Duration, keep: Duration| RuleTiming {
        for_ms: ms(for_),
        keep_firing_for_ms: ms(keep),
        group_wait_ms: ms(cfg.group_wait),
        group_interval_ms: ms(cfg.group_interval),
        repeat_interval_ms: ms(cfg.repeat_interval),
    };
    let mut c = Catalogue::default();
    let mut rule = |name: &str, sev: Severity, for_: Duration, group: &[&str], inhibits: bool| {
        c.rules.insert(
            name.to_owned(),
            Rule {
                name: name.to_owned(),
                severity: sev,
                timing: timing(for_, cfg.keep_firing_for),
                group_by: group.iter().map(|g| (*g).to_owned()).collect(),
                inhibits_by: if inhibits {
                    vec!["node".into()]
                } else {
                    Vec::new()
                },
            },
        );
    };
    use Severity::{Critical, Info, Warning};
    let node = &["node"][..];
    let service = &["service"][..];
    rule(
        "node_unreachable",
        Critical,
        cfg.node_unreachable_for,
        node,
        true,
    );
    for name in [
        "cpu_high",
        "memory_high",
        "disk_high",
        "load_high",
        "vram_high",
    ] {
        rule(name, Warning, cfg.resource_for, node, false);
    }
    rule(
        "gpu_temperature_high",
        Critical,
        cfg.resource_for,
        node,
        false,
    );
    rule(
        "container_down",
        Warning,
        cfg.container_down_for,
        node,
        false,
    );
    rule(
        "container_restarting",
        Warning,
        cfg.container_down_for,
        node,
        false,
    );
    rule(
        "container_unhealthy",
        Warning,
        cfg.container_down_for,
        node,
        false,
    );
    rule("deploy_failed", Warning, Duration::ZERO, service, false);
    rule(
        "service_not_converged",
        Warning,
        cfg.service_for,
        service,
        false,
    );
    rule(
        "monitor_down",
        Warning,
        cfg.monitor_down_for,
        &["monitor"],
        false,
    );
    rule(
        "monitor_certificate_expiring",
        Warning,
        Duration::ZERO,
        &["monitor"],
        false,
    );
    rule("wake_failed", Warning, Duration::ZERO, node, false);
    rule("agent_outdated", Info, cfg.agent_outdated_for, node, false);
    rule(
        "node_certificate_expiring",
        Warning,
        Duration::ZERO,
        node,
        false,
    );
    rule(
        "ai_backend_unavailable",
        Warning,
        cfg.ai_unavailable_for,
        node,
        false,
    );
    let builtin = |name: &str, metric, threshold| Threshold {
        rule: name.to_owned(),
        metric,
        above: true,
        threshold,
        window: cfg.resource_window,
        min_samples: cfg.resource_min_samples.max(1),
        nodes: Vec::new(),
        node_labels: BTreeMap::new(),
        labels: BTreeMap::new(),
    };
    c.thresholds = vec![
        builtin("cpu_high", Metric::Cpu, cfg.cpu_percent),
        builtin("memory_high", Metric::Memory, cfg.memory_percent),
        builtin("disk_high", Metric::Disk, cfg.disk_percent),
        builtin("load_high", Metric::Load, cfg.load_per_core),
        builtin(
            "gpu_temperature_high",
            Metric::GpuTemperature,
            cfg.gpu_temperature_c,
        ),
        builtin("vram_high", Metric::Vram, cfg.vram_percent),
    ];
    add_own(&mut c, cfg, own);
    c
}

/// The map's own rules: thresholds on node figures, grouped by node.
fn add_own(c: &mut Catalogue, cfg: &AlertsConfig, own: &BTreeMap<String, DesiredRule>) {
    let timing = |for_: Duration, keep: Duration| RuleTiming {
        for_ms: ms(for_),
        keep_firing_for_ms: ms(keep),
        group_wait_ms: ms(cfg.group_wait),
        group_interval_ms: ms(cfg.group_interval),
        repeat_interval_ms: ms(cfg.repeat_interval),
    };
    for (name, r) in own {
        let keep = r.keep_firing_for.unwrap_or(cfg.keep_firing_for);
        c.rules.insert(
            name.clone(),
            Rule {
                name: name.clone(),
                severity: severity(&r.severity),
                timing: timing(r.for_, keep),
                group_by: vec!["node".into()],
                inhibits_by: Vec::new(),
            },
        );
        c.thresholds.push(Threshold {
            rule: name.clone(),
            metric: r.metric,
            above: r.above,
            threshold: r.threshold,
            window: r.window,
            min_samples: r.min_samples,
            nodes: r.nodes.clone(),
            node_labels: r.node_labels.clone(),
            labels: r.labels.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_rule_is_in_the_catalogue_and_the_map_cannot_take_its_name() {
        let c = catalogue(&AlertsConfig::default(), &BTreeMap::new());
        let names: Vec<&str> = c.rules.keys().map(String::as_str).collect();
        let mut reserved = nebula_desired::map::monitors::BUILT_IN_RULES.to_vec();
        reserved.sort_unstable();
        assert_eq!(names, reserved);
        for t in &c.thresholds {
            assert!(c.rules.contains_key(&t.rule), "{}", t.rule);
        }
    }

    #[test]
    fn own_rules_take_their_timing_and_severity() {
        let own = BTreeMap::from([(
            "gpu-hot".to_string(),
            DesiredRule {
                metric: Metric::GpuTemperature,
                above: false,
                threshold: 30.0,
                window: Duration::from_secs(60),
                min_samples: 2,
                for_: Duration::from_secs(120),
                keep_firing_for: Some(Duration::from_secs(5)),
                severity: "critical".into(),
                labels: BTreeMap::from([("team".into(), "ml".into())]),
                nodes: Vec::new(),
                node_labels: BTreeMap::new(),
            },
        )]);
        let c = catalogue(&AlertsConfig::default(), &own);
        let r = &c.rules["gpu-hot"];
        assert_eq!(
            (r.severity, r.timing.for_ms, r.timing.keep_firing_for_ms),
            (Severity::Critical, 120_000, 5_000)
        );
        let t = c.thresholds.iter().find(|t| t.rule == "gpu-hot").unwrap();
        assert!(t.breached(29.0) && !t.breached(30.0));
    }
}
