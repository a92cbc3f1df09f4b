//! `monitors:` (checks run from chosen nodes), a service's `monitor: true` (its health check,
//! run from the nodes it runs on) and `alert_rules:` (thresholds on node figures), with their
//! validation.

use std::collections::BTreeMap;
use std::time::Duration;

use nebula_protocol::monitors::{DnsRecord, MonitorCheck, MAX_TIMEOUT_MS, MIN_INTERVAL_MS};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::values::DurationText;
use super::{Loc, Problem, ServiceDecl};
use crate::plan::Labels;

/// The most monitors one map may declare.
pub const MAX_MONITORS: usize = 20_000;
/// The most alert rules one map may declare.
pub const MAX_RULES: usize = 500;

/// One check, run on a schedule from chosen nodes. Exactly one of `http`, `tcp`, `ping`
/// and `dns`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MonitorDecl {
    /// A URL to GET: up on 2xx/3xx (or one of `status`), and when the body holds `body`.
    #[serde(default)]
    pub http: Option<String>,
    /// HTTP statuses that count as up (default: 200-399).
    #[serde(default)]
    pub status: Vec<u16>,
    /// Text the HTTP body must contain.
    #[serde(default)]
    pub body: Option<String>,
    /// Accept a certificate no root vouches for (its expiry is still reported).
    #[serde(default)]
    pub insecure: bool,
    /// `host:port` to connect to.
    #[serde(default)]
    pub tcp: Option<String>,
    /// A host to ping (ICMP where the node permits it, else TCP to `ping_port`).
    #[serde(default)]
    pub ping: Option<String>,
    /// The port a ping falls back to (default 80).
    #[serde(default)]
    pub ping_port: Option<u16>,
    /// A name to resolve.
    #[serde(default)]
    pub dns: Option<String>,
    /// `A` (default) or `AAAA`.
    #[serde(default)]
    pub record: Option<String>,
    /// The DNS server to ask (default: each node's own resolver).
    #[serde(default)]
    pub server: Option<String>,
    /// An address the answer must hold.
    #[serde(default)]
    pub expect: Option<String>,
    /// Time between runs (default 30s, at least 5s).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<DurationText>")]
    pub interval: Option<Duration>,
    /// Time one run may take (default 10s).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<DurationText>")]
    pub timeout: Option<Duration>,
    /// The nodes that run it, by name.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Or: every node with these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A monitor as the controller runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DesiredMonitor {
    pub check: MonitorCheck,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Nodes by name; with `labels`, every node that has them; with neither, the nodes the
    /// `service` runs on.
    pub nodes: Vec<String>,
    pub labels: Labels,
    /// Declared by a service's `monitor: true`.
    pub service: Option<String>,
}

/// A threshold on a node figure, averaged over a window.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleDecl {
    /// `cpu`, `memory`, `disk`, `load`, `gpu_temperature`, `gpu_utilization` or `vram`
    /// (percent, except load and °C).
    pub metric: Loc<String>,
    /// Fires when the average is above this.
    #[serde(default)]
    pub above: Option<f64>,
    /// Or: fires when the average is below this.
    #[serde(default)]
    pub below: Option<f64>,
    /// The window averaged over (default 5m).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<DurationText>")]
    pub window: Option<Duration>,
    /// Samples needed in the window before the rule judges (default 3).
    #[serde(default)]
    pub min_samples: Option<usize>,
    /// How long the breach must hold before it fires (default 0s).
    #[serde(default, rename = "for", with = "humantime_serde")]
    #[schemars(with = "Option<DurationText>")]
    pub for_: Option<Duration>,
    /// How long it keeps firing after the breach ends (default: the controller's).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<DurationText>")]
    pub keep_firing_for: Option<Duration>,
    /// `info`, `warning` (default) or `critical`.
    #[serde(default)]
    pub severity: Option<String>,
    /// Labels added to its alerts (sinks can filter on them).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Only these nodes, by name.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Only nodes with these labels.
    #[serde(default)]
    pub node_labels: BTreeMap<String, String>,
}

/// The node figures rules may watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Cpu,
    Memory,
    Disk,
    Load,
    GpuTemperature,
    GpuUtilization,
    Vram,
}

impl Metric {
    pub const ALL: [Metric; 7] = [
        Metric::Cpu,
        Metric::Memory,
        Metric::Disk,
        Metric::Load,
        Metric::GpuTemperature,
        Metric::GpuUtilization,
        Metric::Vram,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu",
            Metric::Memory => "memory",
            Metric::Disk => "disk",
            Metric::Load => "load",
            Metric::GpuTemperature => "gpu_temperature",
            Metric::GpuUtilization => "gpu_utilization",
            Metric::Vram => "vram",
        }
    }

    /// The unit its figures are in.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Load => "",
            Metric::GpuTemperature => "°C",
            _ => "%",
        }
    }

    pub fn parse(s: &str) -> Option<Metric> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

/// A user's rule as the evaluator runs it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DesiredRule {
    pub metric: Metric,
    /// True: fires above `threshold`; false: below.
    pub above: bool,
    pub threshold: f64,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    pub min_samples: usize,
    #[serde(with = "humantime_serde")]
    pub for_: Duration,
    #[serde(with = "humantime_serde")]
    pub keep_firing_for: Option<Duration>,
    pub severity: String,
    pub labels: Labels,
    pub nodes: Vec<String>,
    pub node_labels: Labels,
}

const SEVERITIES: [&str; 3] = ["info", "warning", "critical"];

/// The names of the controller's built-in rules, which a rule of the map cannot take.
pub const BUILT_IN_RULES: &[&str] = &[
    "node_unreachable",
    "cpu_high",
    "memory_high",
    "disk_high",
    "load_high",
    "gpu_temperature_high",
    "vram_high",
    "container_down",
    "container_restarting",
    "container_unhealthy",
    "service_not_converged",
    "deploy_failed",
    "monitor_down",
    "monitor_certificate_expiring",
    "wake_failed",
    "agent_outdated",
    "node_certificate_expiring",
    "ai_backend_unavailable",
];

fn problem(line: u64, column: u64, message: String) -> Problem {
    Problem {
        line,
        column,
        message,
    }
}

/// `monitors:` and the services' `monitor: true`.
pub(super) fn monitors(
    decls: &BTreeMap<String, Loc<MonitorDecl>>,
    services: &BTreeMap<String, Loc<ServiceDecl>>,
    node_known: &dyn Fn(&str) -> bool,
    errors: &mut Vec<Problem>,
) -> BTreeMap<String, DesiredMonitor> {
    let mut out = BTreeMap::new();
    if decls.len() > MAX_MONITORS {
        errors.push(problem(
            1,
            1,
            format!("{} monitors: at most {MAX_MONITORS}", decls.len()),
        ));
        return out;
    }
    for (name, d) in decls {
        if !super::valid_name(name) {
            let m = format!(
                "monitor `{name}`: not a valid name: use 1-63 letters, digits, '-', '_' or '.'"
            );
            errors.push(problem(d.line, d.column, m));
            continue;
        }
        match monitor(d, node_known) {
            Ok(m) => {
                out.insert(name.clone(), m);
            }
            Err(m) => errors.push(problem(d.line, d.column, format!("monitor `{name}`: {m}"))),
        }
    }
    for (name, svc) in services {
        let Some(on) = svc.monitor.as_ref().filter(|m| m.value) else {
            continue;
        };
        let mut err = |m: String| {
            errors.push(problem(
                on.line,
                on.column,
                format!("service `{name}`: monitor: {m}"),
            ))
        };
        if out.contains_key(name) {
            err(format!("a monitor named `{name}` is declared too"));
            continue;
        }
        match service_check(svc) {
            Ok(check) => {
                out.insert(
                    name.clone(),
                    DesiredMonitor {
                        check,
                        interval: Duration::from_secs(30),
                        timeout: Duration::from_secs(10),
                        nodes: Vec::new(),
                        labels: Labels::new(),
                        service: Some(name.clone()),
                    },
                );
            }
            Err(m) => err(m),
        }
    }
    out
}

/// One monitor (from the map or the API), checked.
pub fn monitor(
    d: &MonitorDecl,
    node_known: &dyn Fn(&str) -> bool,
) -> Result<DesiredMonitor, String> {
    let check = check(d)?;
    if d.nodes.is_empty() && d.labels.is_empty() {
        return Err("say where it runs: `nodes: [NAME]` or `labels: {KEY: VALUE}`".into());
    }
    if let Some(n) = d.nodes.iter().find(|n| !node_known(n)) {
        return Err(format!("node `{n}` is not known"));
    }
    let (interval, timeout) = timing(d.interval, d.timeout)?;
    Ok(DesiredMonitor {
        check,
        interval,
        timeout,
        nodes: d.nodes.clone(),
        labels: d.labels.clone(),
        service: None,
    })
}

fn timing(
    interval: Option<Duration>,
    timeout: Option<Duration>,
) -> Result<(Duration, Duration), String> {
    let interval = interval.unwrap_or(Duration::from_secs(30));
    let timeout = timeout.unwrap_or(Duration::from_secs(10).min(interval));
    let min = Duration::from_millis(MIN_INTERVAL_MS.into());
    let max_timeout = Duration::from_millis(MAX_TIMEOUT_MS.into());
    if interval < min || interval > Duration::from_secs(86_400) {
        return Err(format!(
            "interval {}: between 5s and 1d",
            humantime::format_duration(interval)
        ));
    }
    if timeout.is_zero() || timeout > interval || timeout > max_timeout {
        return Err(format!(
            "timeout {}: more than 0s, at most 60s and at most the interval",
            humantime::format_duration(timeout)
        ));
    }
    Ok((interval, timeout))
}

fn check(d: &MonitorDecl) -> Result<MonitorCheck, String> {
    let kinds = [
        d.http.is_some(),
        d.tcp.is_some(),
        d.ping.is_some(),
        d.dns.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        return Err("give exactly one of `http`, `tcp`, `ping` and `dns`".into());
    }
    let http_only = !d.status.is_empty() || d.body.is_some() || d.insecure;
    if http_only && d.http.is_none() {
        return Err("`status`, `body` and `insecure` go with `http`".into());
    }
    let dns_only = d.record.is_some() || d.server.is_some() || d.expect.is_some();
    if dns_only && d.dns.is_none() {
        return Err("`record`, `server` and `expect` go with `dns`".into());
    }
    if d.ping_port.is_some() && d.ping.is_none() {
        return Err("`ping_port` goes with `ping`".into());
    }
    if let Some(url) = &d.http {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .ok_or_else(|| format!("`{url}` is not an http:// or https:// URL"))?;
        if rest.is_empty() || rest.starts_with('/') || url.chars().any(char::is_whitespace) {
            return Err(format!("`{url}` has no host"));
        }
        if let Some(s) = d.status.iter().find(|s| !(100..=599).contains(*s)) {
            return Err(format!("{s} is not an HTTP status"));
        }
        return Ok(MonitorCheck::Http {
            url: url.clone(),
            statuses: d.status.clone(),
            body_contains: d.body.clone(),
            insecure: d.insecure,
        });
    }
    if let Some(address) = &d.tcp {
        let port = address.rsplit_once(':').and_then(|(h, p)| {
            (!h.is_empty()).then_some(())?;
            p.parse::<u16>().ok().filter(|p| *p > 0)
        });
        if port.is_none() {
            return Err(format!("`{address}` is not HOST:PORT"));
        }
        return Ok(MonitorCheck::Tcp {
            address: address.clone(),
        });
    }
    if let Some(host) = &d.ping {
        if !host_like(host) {
            return Err(format!("`{host}` is not a host name or address"));
        }
        return Ok(MonitorCheck::Ping {
            host: host.clone(),
            tcp_port: d.ping_port.unwrap_or(80),
        });
    }
    let name = d.dns.clone().unwrap_or_default();
    if !host_like(&name) {
        return Err(format!("`{name}` is not a DNS name"));
    }
    let record = match d.record.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None | Some("A") => DnsRecord::A,
        Some("AAAA") => DnsRecord::Aaaa,
        Some(r) => return Err(format!("record `{r}`: use A or AAAA")),
    };
    if let Some(e) = &d.expect {
        if e.parse::<std::net::IpAddr>().is_err() {
            return Err(format!("expect `{e}` is not an IP address"));
        }
    }
    if let Some(s) = &d.server {
        let ok = s.parse::<std::net::IpAddr>().is_ok() || s.parse::<std::net::SocketAddr>().is_ok();
        if !ok {
            return Err(format!("server `{s}` is not an IP address (or IP:port)"));
        }
    }
    Ok(MonitorCheck::Dns {
        name,
        record,
        server: d.server.clone(),
        expect: d.expect.clone(),
    })
}

fn host_like(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '_'))
}

/// A service's health check as a monitor: the published host port of its HTTP or TCP check,
/// on the node itself.
fn service_check(svc: &ServiceDecl) -> Result<MonitorCheck, String> {
    let health = svc
        .health
        .as_ref()
        .ok_or("the service has no `health` check to reuse")?;
    let (port, path) = match (&health.http, &health.tcp) {
        (Some(h), _) => (h.port, Some(h.path.clone().unwrap_or_else(|| "/".into()))),
        (None, Some(t)) => (t.port, None),
        _ => return Err("only an `http` or `tcp` health check can be reused".into()),
    };
    let host_network = matches!(
        svc.network_mode.as_ref().map(|n| &n.value),
        Some(super::NetworkModeDecl::Host)
    );
    let host_port = if host_network {
        Some(port)
    } else {
        svc.ports
            .iter()
            .find(|p| p.0.container_port == port)
            .and_then(|p| p.0.host_port)
    };
    let host_port = host_port.ok_or(format!(
        "port {port} of its health check is not published with a fixed host port (`ports: [\"{port}:{port}\"]`)"
    ))?;
    Ok(match path {
        Some(path) => MonitorCheck::Http {
            url: format!("http://127.0.0.1:{host_port}{path}"),
            statuses: Vec::new(),
            body_contains: None,
            insecure: false,
        },
        None => MonitorCheck::Tcp {
            address: format!("127.0.0.1:{host_port}"),
        },
    })
}

/// `alert_rules:`.
pub(super) fn rules(
    decls: &BTreeMap<String, Loc<RuleDecl>>,
    node_known: &dyn Fn(&str) -> bool,
    errors: &mut Vec<Problem>,
) -> BTreeMap<String, DesiredRule> {
    let mut out = BTreeMap::new();
    if decls.len() > MAX_RULES {
        errors.push(problem(
            1,
            1,
            format!("{} alert rules: at most {MAX_RULES}", decls.len()),
        ));
        return out;
    }
    for (name, d) in decls {
        let mut err = |m: String| {
            errors.push(problem(
                d.line,
                d.column,
                format!("alert rule `{name}`: {m}"),
            ))
        };
        if !super::valid_name(name) {
            err("not a valid name: use 1-63 letters, digits, '-', '_' or '.'".into());
            continue;
        }
        if BUILT_IN_RULES.contains(&name.as_str()) {
            err("a built-in rule has this name; choose another".into());
            continue;
        }
        let Some(metric) = Metric::parse(&d.metric) else {
            let all: Vec<_> = Metric::ALL.iter().map(|m| m.as_str()).collect();
            errors.push(problem(
                d.metric.line,
                d.metric.column,
                format!(
                    "alert rule `{name}`: metric `{}`: use one of {}",
                    *d.metric,
                    all.join(", ")
                ),
            ));
            continue;
        };
        let (above, threshold) = match (d.above, d.below) {
            (Some(t), None) => (true, t),
            (None, Some(t)) => (false, t),
            _ => {
                err("give exactly one of `above` and `below`".into());
                continue;
            }
        };
        if !threshold.is_finite() {
            err("the threshold is not a number".into());
            continue;
        }
        let window = d.window.unwrap_or(Duration::from_secs(300));
        if window < Duration::from_secs(1) || window > Duration::from_secs(3600) {
            err("window: between 1s and 1h (the controller keeps an hour of figures)".into());
            continue;
        }
        if let Some(k) = d
            .labels
            .keys()
            .find(|k| matches!(k.as_str(), "node" | "monitor" | "service" | "alertname"))
        {
            err(format!(
                "label `{k}` is set by the rule itself; choose another key"
            ));
            continue;
        }
        let severity = d.severity.clone().unwrap_or_else(|| "warning".into());
        if !SEVERITIES.contains(&severity.as_str()) {
            err(format!(
                "severity `{severity}`: use info, warning or critical"
            ));
            continue;
        }
        for n in &d.nodes {
            if !node_known(n) {
                err(format!("node `{n}` is not known"));
            }
        }
        out.insert(
            name.clone(),
            DesiredRule {
                metric,
                above,
                threshold,
                window,
                min_samples: d.min_samples.unwrap_or(3).max(1),
                for_: d.for_.unwrap_or_default(),
                keep_firing_for: d.keep_firing_for,
                severity,
                labels: d.labels.clone(),
                nodes: d.nodes.clone(),
                node_labels: d.node_labels.clone(),
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::map::{check, FleetNames};

    fn errors(yaml: &str) -> String {
        match check(yaml, &FleetNames(None)) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn monitors_resolve_with_defaults() {
        let yaml = "monitors:\n  nas:\n    http: https://nas.home/health\n    status: [200]\n    body: ok\n    nodes: [home]\n  dns:\n    dns: example.org\n    record: aaaa\n    server: 192.168.1.1\n    labels: {site: home}\n    interval: 1m\n";
        let c = check(yaml, &FleetNames(None)).unwrap();
        let nas = &c.desired.monitors["nas"];
        assert_eq!(nas.interval, std::time::Duration::from_secs(30));
        assert_eq!(nas.timeout, std::time::Duration::from_secs(10));
        assert_eq!(nas.check.kind(), "http");
        let dns = &c.desired.monitors["dns"];
        assert_eq!(dns.check.target(), "AAAA example.org @192.168.1.1");
        assert_eq!(dns.labels["site"], "home");
    }

    #[test]
    fn bad_monitors_are_refused_with_their_place() {
        for (yaml, want) in [
            (
                "monitors:\n  x:\n    http: ftp://a\n    nodes: [a]\n",
                "3:5: monitor `x`: `ftp://a` is not an http",
            ),
            (
                "monitors:\n  x:\n    tcp: db\n    nodes: [a]\n",
                "is not HOST:PORT",
            ),
            (
                "monitors:\n  x:\n    tcp: db:5432\n    http: http://a\n    nodes: [a]\n",
                "exactly one of",
            ),
            ("monitors:\n  x:\n    ping: 10.0.0.1\n", "say where it runs"),
            (
                "monitors:\n  x:\n    ping: 10.0.0.1\n    nodes: [a]\n    interval: 1s\n",
                "between 5s and 1d",
            ),
            (
                "monitors:\n  x:\n    dns: example.org\n    expect: home\n    nodes: [a]\n",
                "not an IP address",
            ),
            (
                "monitors:\n  x:\n    tcp: db:5432\n    body: ok\n    nodes: [a]\n",
                "go with `http`",
            ),
            (
                "nodes:\n  a: {}\nmonitors:\n  x:\n    tcp: db:5432\n    nodes: [b]\n",
                "node `b` is not known",
            ),
        ] {
            let e = errors(yaml);
            assert!(e.contains(want), "{yaml}: {e}");
        }
    }

    #[test]
    fn a_service_monitor_reuses_its_published_health_check() {
        let ok = "services:\n  web:\n    image: nginx\n    ports: [\"8080:80\"]\n    health: {http: {port: 80, path: /healthz}}\n    monitor: true\n";
        let c = check(ok, &FleetNames(None)).unwrap();
        let m = &c.desired.monitors["web"];
        assert_eq!(m.check.target(), "http://127.0.0.1:8080/healthz");
        assert_eq!(m.service.as_deref(), Some("web"));
        let unpublished = "services:\n  web:\n    image: nginx\n    health: {tcp: {port: 80}}\n    monitor: true\n";
        assert!(
            errors(unpublished).contains("not published"),
            "{}",
            errors(unpublished)
        );
        let none = "services:\n  web:\n    image: nginx\n    monitor: true\n";
        assert!(errors(none).contains("no `health` check"));
    }

    #[test]
    fn rules_resolve_and_bad_ones_are_refused() {
        let yaml = "alert_rules:\n  gpu-hot:\n    metric: gpu_temperature\n    above: 85\n    for: 5m\n    severity: critical\n    labels: {team: ml}\n";
        let c = check(yaml, &FleetNames(None)).unwrap();
        let r = &c.desired.alert_rules["gpu-hot"];
        assert!(r.above && r.threshold == 85.0 && r.min_samples == 3);
        assert_eq!(r.severity, "critical");
        for (yaml, want) in [
            (
                "alert_rules:\n  x:\n    metric: heat\n    above: 1\n",
                "metric `heat`: use one of",
            ),
            (
                "alert_rules:\n  x:\n    metric: cpu\n",
                "exactly one of `above` and `below`",
            ),
            (
                "alert_rules:\n  cpu_high:\n    metric: cpu\n    above: 5\n",
                "a built-in rule",
            ),
            (
                "alert_rules:\n  x:\n    metric: cpu\n    above: 5\n    severity: loud\n",
                "severity `loud`",
            ),
            (
                "alert_rules:\n  x:\n    metric: cpu\n    above: 5\n    window: 2h\n",
                "window",
            ),
            (
                "alert_rules:\n  x:\n    metric: cpu\n    above: 5\n    labels: {node: a}\n",
                "label `node`",
            ),
        ] {
            let e = errors(yaml);
            assert!(e.contains(want), "{yaml}: {e}");
        }
    }
}
