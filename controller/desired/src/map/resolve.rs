//! Validation beyond parsing, as named checks, and resolution to [`Desired`].
//!
//! [`resolve`] runs the checks in a fixed order: limits, nodes, wake and sleep rules, each
//! service (name, image, command, env, replicas, placement, ports, health, host access, update
//! strategy, dependencies), models, then dependency cycles. Every check records its problems
//! and carries on, so one pass reports every error in the map, sorted by line and column.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use nebula_protocol::deploy::{
    ContainerSpec, GpuRequest, HealthCheck, HealthProbe, HostAccess, NetworkMode, PortMapping,
    PortProtocol, RestartPolicy, SecretFile, UpdateStrategy, VolumeMount,
};
use nebula_protocol::validate::{parse_mac, validate_label, validate_node_name};

use super::{
    parse_capability, secrets, valid_name, Checked, FleetNames, HealthDecl, Loc, MapErrors,
    NetworkModeDecl, NodeDecl, PlacementDecl, Problem, ServiceDecl, ServiceMap, StrategyDecl,
    MAX_REPLICAS, MAX_SERVICES,
};
use crate::plan::{
    Desired, DesiredModel, DesiredService, Labels, PlacementRule, RevisionSpec, WakeRule,
};

/// Validation beyond parsing, and resolution to [`Desired`].
pub fn resolve(map: &ServiceMap, fleet: &FleetNames) -> Result<Checked, MapErrors> {
    let mut r = Resolver::new(map, fleet);
    r.check_limits();
    r.check_nodes();
    let (wake, sleep) = r.wake_and_sleep();
    let mut services = BTreeMap::new();
    let mut host_access = BTreeMap::new();
    let mut files = BTreeMap::new();
    for (name, svc) in &map.services {
        let (service, host, secret_files) = r.service(name, svc);
        if !host.is_empty() {
            host_access.insert(name.clone(), host);
        }
        if !secret_files.is_empty() {
            files.insert(name.clone(), secret_files);
        }
        services.insert(name.clone(), service);
    }
    let models = r.models();
    let known = |n: &str| r.node_known(n);
    let mut problems = Vec::new();
    let monitors = super::monitors::monitors(&map.monitors, &map.services, &known, &mut problems);
    let alert_rules = super::monitors::rules(&map.alert_rules, &known, &mut problems);
    r.errors.extend(problems);
    r.check_cycles();
    if !r.errors.is_empty() {
        let mut errors = r.errors;
        errors.sort_by_key(|p| (p.line, p.column));
        return Err(MapErrors(errors));
    }
    Ok(Checked {
        desired: Desired {
            nodes: r.declared,
            services,
            wake,
            sleep,
            models,
            host_access,
            files,
            monitors,
            alert_rules,
        },
        warnings: r.warnings,
    })
}

/// A host port on a node: (node, address, number, protocol).
type NodePort = (String, Option<String>, u16, PortProtocol);

/// The state of one pass over a map: what was found so far.
struct Resolver<'a> {
    map: &'a ServiceMap,
    fleet: &'a FleetNames,
    /// Labels of the nodes declared under `nodes:` (`None`: the map declares no nodes).
    declared: Option<BTreeMap<String, Labels>>,
    errors: Vec<Problem>,
    warnings: Vec<Problem>,
    /// Host ports claimed by services pinned to a node, and the service that claims each.
    claimed: HashMap<NodePort, String>,
}

impl<'a> Resolver<'a> {
    fn new(map: &'a ServiceMap, fleet: &'a FleetNames) -> Self {
        let declared = map.nodes.as_ref().map(|n| {
            n.iter()
                .map(|(k, v)| (k.clone(), v.labels.clone()))
                .collect()
        });
        Resolver {
            map,
            fleet,
            declared,
            errors: Vec::new(),
            warnings: Vec::new(),
            claimed: HashMap::new(),
        }
    }

    fn err(&mut self, line: u64, column: u64, message: String) {
        self.errors.push(Problem {
            line,
            column,
            message,
        });
    }

    fn warn(&mut self, line: u64, column: u64, message: String) {
        self.warnings.push(Problem {
            line,
            column,
            message,
        });
    }

    /// A node a service or model may name: declared in the map when it declares nodes, else
    /// enrolled (when the fleet is known).
    fn node_known(&self, name: &str) -> bool {
        match &self.declared {
            Some(d) => d.contains_key(name),
            None => self.fleet.0.as_ref().is_none_or(|f| f.contains(name)),
        }
    }

    /// How many services, and which schema version.
    fn check_limits(&mut self) {
        let count = self.map.services.len();
        if count > MAX_SERVICES {
            self.err(
                1,
                1,
                format!("{count} services declared; a map holds at most {MAX_SERVICES}"),
            );
        }
        if let Some(v) = &self.map.version {
            if v.value != 1 {
                self.err(
                    v.line,
                    v.column,
                    format!(
                        "unknown schema version {}: this controller reads version 1",
                        v.value
                    ),
                );
            }
        }
    }

    /// Node names and labels; a declared node that has not enrolled is a warning.
    fn check_nodes(&mut self) {
        let Some(nodes) = &self.map.nodes else { return };
        for (name, decl) in nodes {
            if validate_node_name(name).is_err() {
                self.err(
                    decl.line,
                    decl.column,
                    format!("`{name}` is not a valid node name"),
                );
            } else if self.fleet.0.as_ref().is_some_and(|f| !f.contains(name)) {
                self.warn(
                    decl.line,
                    decl.column,
                    format!("node `{name}` is declared but has not enrolled yet"),
                );
            }
            for (k, v) in &decl.labels {
                if let Err(e) = validate_label(k, v) {
                    self.err(decl.line, decl.column, e);
                }
            }
        }
    }

    /// Each node's wake rule and sleep command.
    fn wake_and_sleep(&mut self) -> (BTreeMap<String, WakeRule>, BTreeMap<String, String>) {
        let mut wake = BTreeMap::new();
        let mut sleep = BTreeMap::new();
        let Some(nodes) = &self.map.nodes else {
            return (wake, sleep);
        };
        for (name, decl) in nodes {
            if let Some(op) = &decl.sleep {
                if op.is_empty() || op.chars().any(char::is_whitespace) {
                    self.err(
                        decl.line,
                        decl.column,
                        format!(
                            "node `{name}`: `sleep` names one command from the node's allow-list"
                        ),
                    );
                }
                sleep.insert(name.clone(), op.clone());
            }
            if let Some(rule) = self.wake_rule(name, decl, nodes) {
                wake.insert(name.clone(), rule);
            }
        }
        (wake, sleep)
    }

    /// A node's `wake:`, or `None` (with its problems recorded) when it has none or it is wrong.
    fn wake_rule(
        &mut self,
        name: &str,
        decl: &NodeDecl,
        nodes: &BTreeMap<String, Loc<NodeDecl>>,
    ) -> Option<WakeRule> {
        let w = decl.wake.as_ref()?;
        let mut problems: Vec<String> = Vec::new();
        for relay in &w.via {
            if !nodes.contains_key(relay) {
                problems.push(format!("relay `{relay}` is not a declared node"));
            } else if relay == name {
                problems.push("a node cannot wake itself".into());
            }
        }
        if w.via.is_empty() {
            problems.push("`via` names the relay node(s) on its LAN".into());
        }
        let rule = match (&w.mac, &w.exec) {
            (Some(mac), None) => {
                if let Err(e) = parse_mac(mac) {
                    problems.push(e);
                }
                let broadcast = w
                    .broadcast
                    .clone()
                    .unwrap_or_else(|| "255.255.255.255".into());
                if broadcast.parse::<std::net::Ipv4Addr>().is_err() {
                    problems.push(format!("`{broadcast}` is not an IPv4 broadcast address"));
                }
                Some(WakeRule::Packet {
                    mac: mac.clone(),
                    broadcast,
                    via: w.via.clone(),
                })
            }
            (None, Some(exec)) => {
                if w.via.len() != 1 {
                    problems.push("`exec` runs on exactly one `via` node".into());
                }
                if w.broadcast.is_some() {
                    problems.push("`broadcast` goes with `mac`, not `exec`".into());
                }
                Some(WakeRule::Exec {
                    via: w.via.first().cloned().unwrap_or_default(),
                    exec: exec.clone(),
                })
            }
            _ => {
                problems.push(
                    "give either `mac` (Wake-on-LAN) or `exec` (a command on the `via` node)"
                        .into(),
                );
                None
            }
        };
        if problems.is_empty() {
            return rule;
        }
        for p in problems {
            self.err(w.line, w.column, format!("node `{name}`: wake: {p}"));
        }
        None
    }

    /// One service, checked and resolved, with its host access and secret files.
    fn service(
        &mut self,
        name: &str,
        svc: &Loc<ServiceDecl>,
    ) -> (DesiredService, HostAccess, Vec<SecretFile>) {
        let (line, column) = (svc.line, svc.column);
        if !valid_name(name) {
            self.err(line, column, format!("`{name}` is not a valid service name: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"));
        }
        let image = self.image(name, svc);
        let command = svc.command.as_ref().and_then(|c| match c.args() {
            Ok(a) => {
                for arg in &a {
                    if let Err(e) = secrets::pieces(arg) {
                        self.err(c.line, c.column, format!("service `{name}`: command: {e}"));
                    }
                }
                Some(a)
            }
            Err(e) => {
                self.err(c.line, c.column, format!("service `{name}`: {e}"));
                None
            }
        });
        let (files, problems) = secrets::files_of(name, &svc.secrets);
        self.errors.extend(problems);
        let env = self.env(name, svc);
        let replicas = self.replicas(name, svc);
        let placement = self.placement(name, svc);
        let gpus = svc.gpu.as_ref().map(|g| g.0).unwrap_or(GpuRequest::None);
        let ports = self.ports(name, svc, &placement);
        let fixed_port = ports.iter().any(|p| p.host_port.is_some());
        if fixed_port && replicas > 1 && placement.node.is_some() {
            let r = svc.replicas.as_ref().expect("replicas > 1 was written");
            self.err(
                r.line,
                r.column,
                format!(
                    "service `{name}`: {replicas} replicas on one node cannot share a fixed host port"
                ),
            );
        }
        let volumes: Vec<VolumeMount> = svc.volumes.iter().map(|v| v.0.clone()).collect();
        let restart = svc
            .restart
            .as_ref()
            .map(|r| r.0)
            .unwrap_or(RestartPolicy::UnlessStopped);
        let health = svc.health.as_ref().and_then(|h| self.health(name, h));
        let host_access = self.host_access(name, svc, !ports.is_empty(), &health);
        // A new container on the host's network binds the old one's ports: stop-first too.
        let stop_first_default = fixed_port || host_access.network == NetworkMode::Host;
        let strategy = self.strategy(name, svc, fixed_port, stop_first_default);
        let health_timeout = self.health_timeout(name, svc);
        let depends_on = self.depends_on(name, svc);
        let spec = ContainerSpec {
            image,
            command,
            env,
            ports,
            volumes,
            restart,
            gpus,
            health,
        };
        let service = DesiredService {
            revision: super::revision_of(&RevisionSpec {
                container: spec.clone(),
                host_access: host_access.clone(),
                files: files.clone(),
            }),
            spec,
            replicas,
            placement: PlacementRule {
                node: placement.node.map(|n| n.value),
                labels: placement.labels,
                gpu: placement.gpu || gpus != GpuRequest::None,
                min_vram_mb: placement.min_vram_mb,
            },
            strategy,
            health_timeout,
            depends_on,
        };
        (service, host_access, files)
    }

    fn image(&mut self, name: &str, svc: &ServiceDecl) -> String {
        let image = svc.image.value.trim();
        if image.is_empty() || image.chars().any(char::is_whitespace) {
            self.err(
                svc.image.line,
                svc.image.column,
                format!("service `{name}`: `image` must be an image reference without spaces"),
            );
        }
        image.to_owned()
    }

    fn env(&mut self, name: &str, svc: &Loc<ServiceDecl>) -> Vec<(String, String)> {
        let mut env = Vec::new();
        for (k, v) in &svc.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.0.contains('\0') {
                self.err(
                    svc.line,
                    svc.column,
                    format!("service `{name}`: environment variable `{k}` is not a valid name"),
                );
            }
            if let Err(e) = secrets::pieces(&v.0) {
                self.err(
                    v.line,
                    v.column,
                    format!("service `{name}`: env `{k}`: {e}"),
                );
            }
            env.push((k.clone(), v.0.clone()));
        }
        env
    }

    fn replicas(&mut self, name: &str, svc: &ServiceDecl) -> u32 {
        let Some(r) = &svc.replicas else { return 1 };
        if r.value > MAX_REPLICAS {
            self.err(
                r.line,
                r.column,
                format!("service `{name}`: at most {MAX_REPLICAS} replicas"),
            );
        }
        r.value
    }

    /// The placement rule: a pinned node must be known; labels no declared node has are a
    /// warning (enrolled labels may still match).
    fn placement(&mut self, name: &str, svc: &ServiceDecl) -> PlacementDecl {
        let placement = svc
            .placement
            .as_ref()
            .map(|p| p.value.clone())
            .unwrap_or_default();
        if let Some(node) = &placement.node {
            if !self.node_known(&node.value) {
                let hint = if self.declared.is_some() {
                    "declare it under `nodes:`"
                } else {
                    "no enrolled node has that name"
                };
                self.err(
                    node.line,
                    node.column,
                    format!("service `{name}`: unknown node `{}` ({hint})", node.value),
                );
            }
        } else if let (Some(decl), false) = (&self.declared, placement.labels.is_empty()) {
            let fits = decl
                .values()
                .any(|labels| nebula_placement::labels_match(&placement.labels, labels));
            if !fits {
                let p = svc.placement.as_ref().expect("set");
                self.warn(p.line, p.column, format!(
                    "service `{name}`: no declared node has the labels {:?} (nodes' enrolled labels may still match)",
                    placement.labels
                ));
            }
        }
        placement
    }

    /// Published ports: none twice in one service, none claimed by two services pinned to the
    /// same node.
    fn ports(
        &mut self,
        name: &str,
        svc: &ServiceDecl,
        placement: &PlacementDecl,
    ) -> Vec<PortMapping> {
        let mut ports = Vec::new();
        let mut own: BTreeSet<(Option<String>, u16, PortProtocol)> = BTreeSet::new();
        for p in &svc.ports {
            let m = p.0.clone();
            if let Some(host) = m.host_port {
                if !own.insert((m.host_ip.clone(), host, m.protocol)) {
                    self.err(
                        p.line,
                        p.column,
                        format!("service `{name}`: host port {host} is published twice"),
                    );
                }
                if let Some(node) = &placement.node {
                    let k = (node.value.clone(), m.host_ip.clone(), host, m.protocol);
                    if let Some(other) = self.claimed.get(&k) {
                        let message = format!(
                            "service `{name}`: host port {host}/{} on node `{}` is already claimed by service `{other}`",
                            m.protocol.as_str(), node.value
                        );
                        self.err(p.line, p.column, message);
                    } else {
                        self.claimed.insert(k, name.to_owned());
                    }
                }
            }
            ports.push(m);
        }
        ports
    }

    /// The health check: exactly one probe, sane timings.
    fn health(&mut self, name: &str, h: &Loc<HealthDecl>) -> Option<HealthCheck> {
        let probe = match (&h.http, &h.tcp, &h.cmd) {
            (Some(http), None, None) => {
                let path = http.path.clone().unwrap_or_else(|| "/".into());
                if !path.starts_with('/') {
                    self.err(
                        h.line,
                        h.column,
                        format!("service `{name}`: the http check's path must start with `/`"),
                    );
                }
                Some(HealthProbe::Http {
                    port: http.port,
                    path,
                })
            }
            (None, Some(tcp), None) => Some(HealthProbe::Tcp { port: tcp.port }),
            (None, None, Some(cmd)) => match cmd.args() {
                Ok(command) => Some(HealthProbe::Cmd { command }),
                Err(e) => {
                    self.err(
                        h.line,
                        h.column,
                        format!("service `{name}`: health cmd: {e}"),
                    );
                    None
                }
            },
            _ => {
                self.err(h.line, h.column, format!("service `{name}`: a health check takes exactly one of `http`, `tcp` or `cmd`"));
                None
            }
        };
        let ms = |d: Option<Duration>, default: u64| {
            d.map(|d| d.as_millis().min(u32::MAX as u128) as u32)
                .unwrap_or(default as u32)
        };
        let interval_ms = ms(h.interval, 5000);
        let timeout_ms = ms(h.timeout, 3000);
        if interval_ms < 100 || timeout_ms < 100 {
            self.err(
                h.line,
                h.column,
                format!("service `{name}`: health `interval` and `timeout` must be at least 100ms"),
            );
        }
        let retries = h.retries.unwrap_or(3);
        if retries == 0 {
            self.err(
                h.line,
                h.column,
                format!("service `{name}`: health `retries` must be at least 1"),
            );
        }
        probe.map(|probe| HealthCheck {
            probe,
            interval_ms,
            timeout_ms,
            retries,
            start_period_ms: ms(h.start_period, 0),
        })
    }

    /// `privileged`, `network_mode`, `pid`, `cap_add` and `devices`.
    fn host_access(
        &mut self,
        name: &str,
        svc: &ServiceDecl,
        publishes_ports: bool,
        health: &Option<HealthCheck>,
    ) -> HostAccess {
        let network = match svc
            .network_mode
            .as_ref()
            .map(|n| (n.value, n.line, n.column))
        {
            None | Some((NetworkModeDecl::Bridge, _, _)) => NetworkMode::Bridge,
            Some((mode, line, column)) => {
                let network = match mode {
                    NetworkModeDecl::Host => NetworkMode::Host,
                    _ => NetworkMode::None,
                };
                if publishes_ports {
                    let why = match network {
                        NetworkMode::Host => "the container uses the host's ports directly (Docker publishes nothing on the host's network); remove `ports`",
                        _ => "the container has no network to publish them from; remove `ports`",
                    };
                    self.err(
                        line,
                        column,
                        format!(
                            "service `{name}`: `network_mode: {}` cannot go with `ports`: {why}",
                            network.as_str()
                        ),
                    );
                }
                let reaches_in = health.as_ref().is_some_and(|h| {
                    matches!(h.probe, HealthProbe::Http { .. } | HealthProbe::Tcp { .. })
                });
                if network == NetworkMode::None && reaches_in {
                    self.err(
                        line,
                        column,
                        format!("service `{name}`: an http or tcp health check cannot reach a container with `network_mode: none`; use `cmd`"),
                    );
                }
                network
            }
        };
        let mut cap_add = BTreeSet::new();
        for cap in &svc.cap_add {
            match parse_capability(&cap.value) {
                Ok(c) => {
                    cap_add.insert(c);
                }
                Err(e) => self.err(
                    cap.line,
                    cap.column,
                    format!("service `{name}`: cap_add: {e}"),
                ),
            }
        }
        let mut targets = BTreeSet::new();
        for d in &svc.devices {
            if !targets.insert(d.0.container_path.as_str()) {
                self.err(
                    d.line,
                    d.column,
                    format!(
                        "service `{name}`: device `{}` is given twice in the container",
                        d.0.container_path
                    ),
                );
            }
        }
        HostAccess {
            privileged: svc.privileged.as_ref().is_some_and(|p| p.value),
            network,
            pid_host: svc.pid.is_some(),
            cap_add: cap_add.into_iter().collect(),
            devices: svc.devices.iter().map(|d| d.0.clone()).collect(),
        }
    }

    /// How a new revision replaces the old: start-first cannot share a fixed host port.
    fn strategy(
        &mut self,
        name: &str,
        svc: &ServiceDecl,
        fixed_port: bool,
        stop_first_default: bool,
    ) -> UpdateStrategy {
        let strategy = svc.update.as_ref().and_then(|u| u.strategy.as_ref());
        match strategy.map(|s| (s.value, s.line, s.column)) {
            Some((StrategyDecl::StartFirst, l, c)) => {
                if fixed_port {
                    self.err(l, c, format!("service `{name}`: start-first cannot work with a fixed host port (old and new containers would need it at once); use stop-first or let Docker pick the host port"));
                }
                UpdateStrategy::StartFirst
            }
            Some((StrategyDecl::StopFirst, _, _)) => UpdateStrategy::StopFirst,
            None if stop_first_default => UpdateStrategy::StopFirst,
            None => UpdateStrategy::StartFirst,
        }
    }

    fn health_timeout(&mut self, name: &str, svc: &Loc<ServiceDecl>) -> Duration {
        let timeout = svc
            .update
            .as_ref()
            .and_then(|u| u.health_timeout)
            .unwrap_or(Duration::from_secs(60));
        if timeout < Duration::from_secs(1) || timeout > Duration::from_secs(3600) {
            self.err(
                svc.line,
                svc.column,
                format!("service `{name}`: `update.health_timeout` must be between 1s and 1h"),
            );
        }
        timeout
    }

    /// Dependencies must be declared services other than this one (cycles are checked last).
    fn depends_on(&mut self, name: &str, svc: &ServiceDecl) -> Vec<String> {
        let mut depends_on = Vec::new();
        for dep in &svc.depends_on {
            if !self.map.services.contains_key(&dep.value) {
                self.err(
                    dep.line,
                    dep.column,
                    format!(
                        "service `{name}` depends on `{}`, which is not declared",
                        dep.value
                    ),
                );
            } else if dep.value == name {
                self.err(
                    dep.line,
                    dep.column,
                    format!("service `{name}` cannot depend on itself"),
                );
            }
            depends_on.push(dep.value.clone());
        }
        depends_on
    }

    /// Models to keep on nodes: a sane name, and either known nodes or labels.
    fn models(&mut self) -> BTreeMap<String, DesiredModel> {
        let mut models = BTreeMap::new();
        for (name, decl) in &self.map.models {
            let bad_name = name.is_empty()
                || name.len() > 255
                || name.contains(char::is_whitespace)
                || name.contains("..");
            if bad_name {
                self.err(
                    decl.line,
                    decl.column,
                    format!("model `{name}`: not a model name"),
                );
            }
            if decl.nodes.is_empty() == decl.labels.is_empty() {
                self.err(
                    decl.line,
                    decl.column,
                    format!("model `{name}`: give either `nodes` or `labels`"),
                );
            }
            for n in &decl.nodes {
                if !self.node_known(n) {
                    self.err(
                        decl.line,
                        decl.column,
                        format!("model `{name}`: unknown node `{n}`"),
                    );
                }
            }
            models.insert(
                name.clone(),
                DesiredModel {
                    nodes: decl.nodes.clone(),
                    labels: decl.labels.clone(),
                    backend: decl.backend.clone(),
                },
            );
        }
        models
    }

    fn check_cycles(&mut self) {
        if let Some((name, line, column)) = find_cycle(self.map) {
            self.err(
                line,
                column,
                format!("service `{name}` is part of a `depends_on` cycle"),
            );
        }
    }
}

/// A service on a `depends_on` cycle, if any. Iterative (a long chain of dependencies must
/// not exhaust the stack): services whose dependencies can all be ordered are taken away
/// (Kahn's algorithm); from any service left, following dependencies that are left must come
/// back to a service already seen, which is on a cycle.
fn find_cycle(map: &ServiceMap) -> Option<(String, u64, u64)> {
    let deps = |name: &str| -> Vec<&str> {
        map.services[name]
            .depends_on
            .iter()
            .map(|d| d.value.as_str())
            .filter(|d| *d != name && map.services.contains_key(*d))
            .collect()
    };
    let mut waiting_on: BTreeMap<&str, usize> = BTreeMap::new();
    let mut dependents: HashMap<&str, Vec<&str>> = HashMap::new();
    for name in map.services.keys() {
        let d = deps(name);
        waiting_on.insert(name, d.len());
        for dep in d {
            dependents.entry(dep).or_default().push(name);
        }
    }
    let mut ready: Vec<&str> = waiting_on
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(k, _)| *k)
        .collect();
    while let Some(done) = ready.pop() {
        waiting_on.remove(done);
        for d in dependents.get(done).into_iter().flatten() {
            if let Some(n) = waiting_on.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    ready.push(d);
                }
            }
        }
    }
    let mut cur = *waiting_on.keys().next()?;
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    while seen.insert(cur) {
        cur = deps(cur)
            .into_iter()
            .find(|d| waiting_on.contains_key(d))
            .expect("a service left over waits on another one left over");
    }
    let svc = &map.services[cur];
    Some((cur.to_owned(), svc.line, svc.column))
}
