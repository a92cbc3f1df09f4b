//! The planner: a pure function from desired and observed state to the actions that make them
//! match. It reads nothing and changes nothing; the reconciler gathers its inputs and carries
//! out its actions, and the next run (with fresh observations) is the retry.
//!
//! Placement keeps replicas on the fitting nodes that already run them; surplus replicas are
//! taken from the fullest node, missing ones go to the node with the fewest replicas of the
//! service (then online before offline, then the less loaded, then by name). A converged
//! service is therefore a fixed point: applying a plan and planning again yields no actions (a
//! property test checks it).
//!
//! A node that reported its deploy policy (agents from 1.5 on) gets no action its agent would
//! refuse: new replicas go to nodes whose policy allows the service, and work that only a
//! refusing node could do is listed in [`Plan::refused`] with the agent's words instead of
//! being sent. Without a report (an older agent) the node is planned for as before, and its
//! agent refuses at deploy time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use nebula_protocol::deploy::{
    ContainerSpec, DeployPolicySummary, HostAccess, SecretFile, UpdateStrategy,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

mod place;
mod steps;

pub type Labels = BTreeMap<String, String>;

/// What the service map asks for, resolved.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Desired {
    /// Declared nodes and their extra labels; `None`: every enrolled node is eligible.
    pub nodes: Option<BTreeMap<String, Labels>>,
    pub services: BTreeMap<String, DesiredService>,
    /// How to wake each node that can be woken.
    pub wake: BTreeMap<String, WakeRule>,
    /// The allow-listed command that puts each node to sleep.
    pub sleep: BTreeMap<String, String>,
    /// Models to keep on nodes, by name.
    pub models: BTreeMap<String, DesiredModel>,
    /// Host access (privileged, host namespaces, capabilities, devices) by service, only for
    /// services that ask for some; part of their revision.
    pub host_access: BTreeMap<String, HostAccess>,
    /// Secret files by service, only for services that ask for some; part of their revision.
    pub files: BTreeMap<String, Vec<SecretFile>>,
    /// Monitors declared in the map (and by services' `monitor: true`), by name.
    pub monitors: BTreeMap<String, crate::map::monitors::DesiredMonitor>,
    /// The map's own alert rules, by name.
    pub alert_rules: BTreeMap<String, crate::map::monitors::DesiredRule>,
}

/// No host access: what services without an entry in [`Desired::host_access`] get.
static NO_HOST_ACCESS: HostAccess = HostAccess {
    privileged: false,
    network: nebula_protocol::deploy::NetworkMode::Bridge,
    pid_host: false,
    cap_add: Vec::new(),
    devices: Vec::new(),
};

impl Desired {
    /// The host access `service` asks for (none for most).
    pub fn host_access(&self, service: &str) -> &HostAccess {
        self.host_access.get(service).unwrap_or(&NO_HOST_ACCESS)
    }

    /// Everything `service`'s revision pins.
    pub fn revision_spec(&self, service: &str) -> Option<RevisionSpec> {
        self.services.get(service).map(|s| RevisionSpec {
            container: s.spec.clone(),
            host_access: self.host_access(service).clone(),
            files: self.files(service).to_vec(),
        })
    }

    /// The secret files `service` asks for (none for most).
    pub fn files(&self, service: &str) -> &[SecretFile] {
        self.files.get(service).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Everything a revision pins: the container spec and its host access. Kept as JSON in the
/// deployment history (rollbacks and diffs read it back); `host_access` is written only when
/// there is some, so a revision without it reads and hashes exactly as before host access
/// existed, and rows written before read back with none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevisionSpec {
    #[serde(flatten)]
    pub container: ContainerSpec,
    #[serde(default, skip_serializing_if = "HostAccess::is_empty")]
    pub host_access: HostAccess,
    /// Secret files (references with their versions, never the bytes); written only when
    /// there are some, like `host_access`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<SecretFile>,
}

/// Where a model must be: named nodes, or every node with these labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DesiredModel {
    pub nodes: Vec<String>,
    pub labels: Labels,
    pub backend: Option<String>,
}

/// How a sleeping node is woken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "method")]
pub enum WakeRule {
    /// A magic packet sent by the first online relay.
    Packet {
        mac: String,
        broadcast: String,
        via: Vec<String>,
    },
    /// An allow-listed command on another node.
    Exec { via: String, exec: String },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DesiredService {
    pub revision: String,
    pub spec: ContainerSpec,
    pub replicas: u32,
    pub placement: PlacementRule,
    pub strategy: UpdateStrategy,
    #[serde(with = "humantime_serde")]
    pub health_timeout: Duration,
    pub depends_on: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PlacementRule {
    pub node: Option<String>,
    pub labels: Labels,
    /// Needs an NVIDIA GPU (asked for, or implied by `gpu:`).
    pub gpu: bool,
    pub min_vram_mb: Option<u64>,
}

/// What runs, as agents report it.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub nodes: Vec<ObservedNode>,
    /// (service, node name) with a deploy job in flight.
    pub in_flight: BTreeSet<(String, String)>,
    /// (service, revision) that failed and is not retried until the map is applied again;
    /// (service, [`removal_key`]) for a removal that failed on a node.
    pub blocked: BTreeMap<(String, String), String>,
    /// Specs of revisions deployed before, for field-level diffs.
    pub revisions: BTreeMap<String, RevisionSpec>,
    /// The deploy policy each connected node reported (agents from 1.5 on), by node id.
    pub policies: BTreeMap<Uuid, DeployPolicySummary>,
}

#[derive(Debug, Clone)]
pub struct ObservedNode {
    pub id: Uuid,
    pub name: String,
    pub labels: Labels,
    /// Connected now. An offline node is observed only for a grace period after it left (its
    /// containers are assumed to still run); actions for it wait.
    pub online: bool,
    pub gpus: u32,
    /// Most free memory on one GPU, MiB.
    pub max_free_vram_mb: u64,
    /// Managed containers that carry this node's id.
    pub containers: Vec<ObservedContainer>,
    /// A container runtime answers on the node.
    pub docker: bool,
    /// Its containers are known (a telemetry inventory arrived since the controller started).
    /// Services that could be placed on a node not known yet wait, so that nothing is started
    /// twice while a node is still to report what it runs.
    pub known: bool,
}

/// The key under which a removal that failed on `node` is blocked in [`Observed::blocked`].
pub fn removal_key(node: &str) -> String {
    format!("remove@{node}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedContainer {
    pub name: String,
    pub service: String,
    pub revision: String,
    pub running: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Services that need nothing.
    pub unchanged: usize,
    /// Work that cannot start now, with the reason.
    pub waiting: Vec<Waiting>,
    /// Work the node's deploy policy would refuse (as its agent reported it): not sent, since
    /// the agent would refuse it; the reason is the agent's, naming the rule and the config key
    /// that would allow it. A person changes the map or the node's agent config.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Waiting>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// The service has no container on this node yet.
    Create {
        service: String,
        node: String,
        node_id: Uuid,
        revision: String,
        replicas: u32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        after: Vec<String>,
    },
    /// The node runs another revision.
    Update {
        service: String,
        node: String,
        node_id: Uuid,
        from: Vec<String>,
        to: String,
        replicas: u32,
        changes: Vec<FieldChange>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        after: Vec<String>,
    },
    /// The right revision, but replicas are missing, stopped or too many (drift).
    Repair {
        service: String,
        node: String,
        node_id: Uuid,
        revision: String,
        replicas: u32,
        reason: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        after: Vec<String>,
    },
    /// Managed containers that should not be on this node.
    Remove {
        service: String,
        node: String,
        node_id: Uuid,
        containers: usize,
        reason: String,
    },
}

impl Action {
    pub fn service(&self) -> &str {
        match self {
            Action::Create { service, .. }
            | Action::Update { service, .. }
            | Action::Repair { service, .. }
            | Action::Remove { service, .. } => service,
        }
    }

    pub fn node(&self) -> &str {
        match self {
            Action::Create { node, .. }
            | Action::Update { node, .. }
            | Action::Repair { node, .. }
            | Action::Remove { node, .. } => node,
        }
    }

    pub fn node_id(&self) -> Uuid {
        match self {
            Action::Create { node_id, .. }
            | Action::Update { node_id, .. }
            | Action::Repair { node_id, .. }
            | Action::Remove { node_id, .. } => *node_id,
        }
    }

    /// Dependencies that still have work of their own: this action waits for them.
    pub fn after(&self) -> &[String] {
        match self {
            Action::Create { after, .. }
            | Action::Update { after, .. }
            | Action::Repair { after, .. } => after,
            Action::Remove { .. } => &[],
        }
    }

    pub fn verb(&self) -> &'static str {
        match self {
            Action::Create { .. } => "create",
            Action::Update { .. } => "update",
            Action::Repair { .. } => "repair",
            Action::Remove { .. } => "remove",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FieldChange {
    pub field: String,
    pub from: Option<Value>,
    pub to: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Waiting {
    pub service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub reason: String,
}

/// Compute what to do. Pure: same inputs, same plan.
///
/// Phases, per service in dependency order: place its replicas ([`place`]), then decide per
/// node what to do ([`steps`]), holding dependents behind the dependency gate (a service waits
/// for every dependency that still has work or waits); then remove orphans.
pub fn plan(desired: &Desired, observed: &Observed) -> Plan {
    let mut fleet = place::Fleet::new(desired, observed);
    // Services with anything left to do or wait for: their dependents wait for them.
    let mut pending: BTreeSet<String> = BTreeSet::new();
    let mut out = Plan::default();
    for name in dependency_order(desired) {
        let svc = &desired.services[&name];
        let host = desired.host_access(&name);
        // What node `i`'s agent would answer to this service, when it reported its policy.
        let refusal_at = |i: usize| -> Option<String> {
            observed
                .policies
                .get(&observed.nodes[i].id)
                .and_then(|p| p.refusal(&svc.spec, host))
        };
        let work = match fleet.place(&name, svc, refusal_at) {
            Err(wait) => ServiceWork {
                waiting: vec![wait],
                ..ServiceWork::default()
            },
            Ok(placement) => {
                let after: Vec<String> = svc
                    .depends_on
                    .iter()
                    .filter(|d| pending.contains(*d))
                    .cloned()
                    .collect();
                let mut work = ServiceWork {
                    actions: Vec::new(),
                    waiting: placement.waiting,
                    refused: placement.refused,
                };
                let mine = fleet.containers_of(&name);
                for &(i, want) in fleet.placed() {
                    let node = fleet.node(i);
                    let one = steps::NodeWork {
                        name: &name,
                        svc,
                        host,
                        files: desired.files(&name),
                        node,
                        want,
                        after: &after,
                    };
                    let here = mine.iter().filter(|(j, _)| *j == i).map(|(_, c)| *c);
                    match one.step(here, observed, || refusal_at(i)) {
                        steps::Step::Done => {}
                        steps::Step::Act(a) => work.actions.push(a),
                        steps::Step::Wait(w) => work.waiting.push(w),
                        steps::Step::Refused(w) => work.refused.push(w),
                    }
                }
                work
            }
        };
        if work.is_empty() {
            out.unchanged += 1;
        } else {
            pending.insert(name.clone());
        }
        out.actions.extend(work.actions);
        out.waiting.extend(work.waiting);
        out.refused.extend(work.refused);
    }
    steps::orphans(desired, observed, &mut out.actions, &mut out.waiting);
    out
}

/// One service's part of a plan.
#[derive(Default)]
struct ServiceWork {
    actions: Vec<Action>,
    waiting: Vec<Waiting>,
    refused: Vec<Waiting>,
}

impl ServiceWork {
    fn is_empty(&self) -> bool {
        self.actions.is_empty() && self.waiting.is_empty() && self.refused.is_empty()
    }
}

/// Services ordered so that each comes after what it depends on; among those ready, by name.
/// Linear in services and dependencies (Kahn's algorithm); services on a cycle (validation
/// refuses those) come last, by name.
pub fn dependency_order(desired: &Desired) -> Vec<String> {
    let mut waiting_on: HashMap<&str, usize> = HashMap::new();
    let mut dependents: HashMap<&str, Vec<&str>> = HashMap::new();
    for (name, svc) in &desired.services {
        let deps: BTreeSet<&str> = svc
            .depends_on
            .iter()
            .map(String::as_str)
            .filter(|d| *d != name && desired.services.contains_key(*d))
            .collect();
        waiting_on.insert(name, deps.len());
        for d in deps {
            dependents.entry(d).or_default().push(name);
        }
    }
    let mut ready: BTreeSet<&str> = waiting_on
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(k, _)| *k)
        .collect();
    let mut order = Vec::with_capacity(desired.services.len());
    while let Some(name) = ready.pop_first() {
        order.push(name.to_owned());
        for d in dependents.get(name).into_iter().flatten() {
            let n = waiting_on.get_mut(d).expect("every service is counted");
            *n -= 1;
            if *n == 0 {
                ready.insert(d);
            }
        }
    }
    if order.len() < desired.services.len() {
        let placed: BTreeSet<String> = order.iter().cloned().collect();
        order.extend(
            desired
                .services
                .keys()
                .filter(|k| !placed.contains(*k))
                .cloned(),
        );
    }
    order
}

/// Field-level differences between two specs (`env.NAME` per variable, `files.TARGET` per
/// secret file, `health.*` and `host_access.*` per field).
pub fn diff(from: &RevisionSpec, to: &RevisionSpec) -> Vec<FieldChange> {
    let flat = |spec: &RevisionSpec| -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        // Every host access field, set or not: a revision without any compares as the defaults.
        if let Ok(Value::Object(h)) = serde_json::to_value(&spec.host_access) {
            for (hk, hv) in h {
                out.insert(format!("host_access.{hk}"), hv);
            }
        }
        for f in &spec.files {
            out.insert(
                format!("files.{}", f.target),
                Value::String(format!("{} (mode {:04o})", f.secret, f.mode)),
            );
        }
        let Ok(Value::Object(map)) = serde_json::to_value(&spec.container) else {
            return out;
        };
        for (k, v) in map {
            match (k.as_str(), v) {
                ("env", Value::Array(pairs)) => {
                    for pair in pairs {
                        if let Value::Array(kv) = pair {
                            if let (Some(Value::String(name)), Some(val)) = (kv.first(), kv.get(1))
                            {
                                out.insert(format!("env.{name}"), val.clone());
                            }
                        }
                    }
                }
                ("health", Value::Object(h)) => {
                    for (hk, hv) in h {
                        out.insert(format!("health.{hk}"), hv);
                    }
                }
                (_, v) => {
                    out.insert(k, v);
                }
            }
        }
        out
    };
    let a = flat(from);
    let b = flat(to);
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| FieldChange {
            field: k.clone(),
            from: a.get(k).cloned(),
            to: b.get(k).cloned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nebula_protocol::deploy::{GpuRequest, PortMapping, PortProtocol, RestartPolicy};
    use proptest::prelude::*;

    fn spec(image: &str, host_port: Option<u16>) -> ContainerSpec {
        ContainerSpec {
            image: image.into(),
            command: None,
            env: vec![("MODE".into(), "a".into())],
            ports: vec![PortMapping {
                host_ip: None,
                host_port,
                container_port: 80,
                protocol: PortProtocol::Tcp,
            }],
            volumes: vec![],
            restart: RestartPolicy::UnlessStopped,
            gpus: GpuRequest::None,
            health: None,
        }
    }

    fn service(
        image: &str,
        replicas: u32,
        placement: PlacementRule,
        port: Option<u16>,
    ) -> DesiredService {
        let spec = spec(image, port);
        DesiredService {
            revision: crate::map::revision(&spec),
            spec,
            replicas,
            placement,
            strategy: UpdateStrategy::StartFirst,
            health_timeout: Duration::from_secs(60),
            depends_on: vec![],
        }
    }

    fn node(i: u8, labels: &[(&str, &str)], online: bool) -> ObservedNode {
        ObservedNode {
            id: Uuid::from_u128(i as u128 + 1),
            name: format!("n{i}"),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            online,
            gpus: u32::from(i % 2),
            max_free_vram_mb: 8192 * u64::from(i % 2),
            containers: vec![],
            docker: true,
            known: true,
        }
    }

    /// What agents would report after every action ran successfully.
    fn apply(desired: &Desired, observed: &Observed, plan: &Plan) -> Observed {
        let mut next = observed.clone();
        for action in &plan.actions {
            let n = next
                .nodes
                .iter_mut()
                .find(|n| n.id == action.node_id())
                .unwrap();
            n.containers.retain(|c| c.service != action.service());
            let (rev, replicas) = match action {
                Action::Create {
                    revision, replicas, ..
                }
                | Action::Repair {
                    revision, replicas, ..
                } => (revision.clone(), *replicas),
                Action::Update { to, replicas, .. } => (to.clone(), *replicas),
                Action::Remove { .. } => continue,
            };
            assert_eq!(rev, desired.services[action.service()].revision);
            for r in 0..replicas {
                n.containers.push(ObservedContainer {
                    name: format!("{}-{r}", action.service()),
                    service: action.service().into(),
                    revision: rev.clone(),
                    running: true,
                });
            }
        }
        next
    }

    #[test]
    fn create_then_nothing() {
        let mut desired = Desired::default();
        desired.services.insert(
            "web".into(),
            service("web:v1", 2, PlacementRule::default(), None),
        );
        let mut observed = Observed {
            nodes: vec![node(0, &[], true), node(1, &[], true)],
            ..Default::default()
        };
        let p = plan(&desired, &observed);
        assert_eq!(p.actions.len(), 2, "{p:?}");
        assert!(p.actions.iter().all(|a| a.verb() == "create"));
        observed = apply(&desired, &observed, &p);
        let p2 = plan(&desired, &observed);
        assert!(p2.is_empty(), "{p2:?}");
        assert_eq!(p2.unchanged, 1);
    }

    #[test]
    fn a_new_image_is_an_update_with_a_field_diff() {
        let mut desired = Desired::default();
        let v1 = service("web:v1", 1, PlacementRule::default(), None);
        let v2 = service("web:v2", 1, PlacementRule::default(), None);
        let mut n = node(0, &[], true);
        n.containers.push(ObservedContainer {
            name: "web-1".into(),
            service: "web".into(),
            revision: v1.revision.clone(),
            running: true,
        });
        let observed = Observed {
            nodes: vec![n],
            revisions: BTreeMap::from([(
                v1.revision.clone(),
                RevisionSpec {
                    container: v1.spec.clone(),
                    host_access: HostAccess::default(),
                    files: Vec::new(),
                },
            )]),
            ..Default::default()
        };
        desired.services.insert("web".into(), v2.clone());
        let p = plan(&desired, &observed);
        match &p.actions[..] {
            [Action::Update {
                from, to, changes, ..
            }] => {
                assert_eq!(from, &vec![v1.revision.clone()]);
                assert_eq!(to, &v2.revision);
                assert_eq!(changes.len(), 1, "{changes:?}");
                assert_eq!(changes[0].field, "image");
                assert_eq!(changes[0].to, Some(Value::String("web:v2".into())));
            }
            other => panic!("{other:?}"),
        }
        // A failed revision waits instead of being retried.
        let mut blocked = observed.clone();
        blocked
            .blocked
            .insert(("web".into(), v2.revision.clone()), "HTTP 404".into());
        let p = plan(&desired, &blocked);
        assert!(p.actions.is_empty());
        assert!(p.waiting[0].reason.contains("HTTP 404"), "{p:?}");
    }

    #[test]
    fn a_stopped_container_is_repaired_and_an_orphan_removed() {
        let mut desired = Desired::default();
        let web = service("web:v1", 1, PlacementRule::default(), None);
        let mut n = node(0, &[], true);
        n.containers.push(ObservedContainer {
            name: "web-1".into(),
            service: "web".into(),
            revision: web.revision.clone(),
            running: false,
        });
        n.containers.push(ObservedContainer {
            name: "old-1".into(),
            service: "old".into(),
            revision: "r".into(),
            running: true,
        });
        desired.services.insert("web".into(), web);
        let p = plan(
            &desired,
            &Observed {
                nodes: vec![n],
                ..Default::default()
            },
        );
        let verbs: Vec<_> = p.actions.iter().map(|a| (a.verb(), a.service())).collect();
        assert_eq!(verbs, vec![("repair", "web"), ("remove", "old")]);
    }

    #[test]
    fn offline_nodes_and_in_flight_deploys_wait() {
        let mut desired = Desired::default();
        desired.services.insert(
            "web".into(),
            service(
                "web:v1",
                1,
                PlacementRule {
                    node: Some("n0".into()),
                    ..Default::default()
                },
                None,
            ),
        );
        let observed = Observed {
            nodes: vec![node(0, &[], false)],
            ..Default::default()
        };
        let p = plan(&desired, &observed);
        assert!(p.actions.is_empty());
        assert_eq!(p.waiting[0].reason, "the node is offline");
        let mut on = observed.clone();
        on.nodes[0].online = true;
        on.in_flight.insert(("web".into(), "n0".into()));
        let p = plan(&desired, &on);
        assert!(p.actions.is_empty());
        assert_eq!(p.waiting[0].reason, "a deploy is in progress");
    }

    #[test]
    fn fixed_host_ports_never_share_a_node() {
        let mut desired = Desired::default();
        desired.services.insert(
            "a".into(),
            service("a:1", 1, PlacementRule::default(), Some(8080)),
        );
        desired.services.insert(
            "b".into(),
            service("b:1", 1, PlacementRule::default(), Some(8080)),
        );
        desired.services.insert(
            "c".into(),
            service("c:1", 1, PlacementRule::default(), Some(8080)),
        );
        let observed = Observed {
            nodes: vec![node(0, &[], true), node(1, &[], true)],
            ..Default::default()
        };
        let p = plan(&desired, &observed);
        let nodes: BTreeSet<_> = p.actions.iter().map(|a| a.node().to_owned()).collect();
        assert_eq!(p.actions.len(), 2, "{p:?}");
        assert_eq!(nodes.len(), 2);
        assert_eq!(p.waiting.len(), 1, "the third cannot be placed: {p:?}");
    }

    #[test]
    fn dependencies_come_first() {
        let mut desired = Desired::default();
        let mut app = service("app:1", 1, PlacementRule::default(), None);
        app.depends_on = vec!["db".into()];
        desired.services.insert("app".into(), app);
        desired.services.insert(
            "db".into(),
            service("db:1", 1, PlacementRule::default(), None),
        );
        let observed = Observed {
            nodes: vec![node(0, &[], true)],
            ..Default::default()
        };
        let p = plan(&desired, &observed);
        assert_eq!(p.actions[0].service(), "db");
        assert!(p.actions[0].after().is_empty());
        assert_eq!(p.actions[1].service(), "app");
        assert_eq!(p.actions[1].after(), ["db".to_string()]);
    }

    #[test]
    fn a_node_not_yet_reporting_holds_placement_and_failed_removals_wait() {
        let mut desired = Desired::default();
        desired.services.insert(
            "web".into(),
            service("web:v1", 1, PlacementRule::default(), None),
        );
        let mut quiet = node(1, &[], false);
        quiet.known = false;
        let mut observed = Observed {
            nodes: vec![node(0, &[], true), quiet],
            ..Default::default()
        };
        let p = plan(&desired, &observed);
        assert!(p.actions.is_empty(), "{p:?}");
        assert!(p.waiting[0].reason.contains("n1 to report"), "{p:?}");
        observed.nodes[1].known = true;
        assert_eq!(plan(&desired, &observed).actions.len(), 1);

        // An orphan whose removal failed waits; one with a label that is no service name too.
        let mut n = node(0, &[], true);
        for service in ["gone", "bad name!"] {
            n.containers.push(ObservedContainer {
                name: "x".into(),
                service: service.into(),
                revision: "r".into(),
                running: true,
            });
        }
        let mut observed = Observed {
            nodes: vec![n],
            ..Default::default()
        };
        let p = plan(&Desired::default(), &observed);
        assert_eq!(p.actions.len(), 1, "{p:?}");
        assert_eq!(p.actions[0].service(), "gone");
        assert!(
            p.waiting[0].reason.contains("not a valid service name"),
            "{p:?}"
        );
        observed
            .blocked
            .insert(("gone".into(), removal_key("n0")), "docker said no".into());
        let p = plan(&Desired::default(), &observed);
        assert!(p.actions.is_empty(), "{p:?}");
        assert!(p
            .waiting
            .iter()
            .any(|w| w.reason.contains("docker said no")));
    }

    #[test]
    fn a_dependency_that_waits_holds_its_dependents() {
        let mut desired = Desired::default();
        let db = service(
            "db:1",
            1,
            PlacementRule {
                node: Some("n1".into()),
                ..Default::default()
            },
            None,
        );
        let mut app = service("app:1", 1, PlacementRule::default(), None);
        app.depends_on = vec!["db".into()];
        desired.services.insert("db".into(), db);
        desired.services.insert("app".into(), app);
        // db's node is offline: db waits, and app waits for db.
        let observed = Observed {
            nodes: vec![node(0, &[], true), node(1, &[], false)],
            ..Default::default()
        };
        let p = plan(&desired, &observed);
        let app_action = p.actions.iter().find(|a| a.service() == "app").unwrap();
        assert_eq!(app_action.after(), ["db".to_string()]);
    }

    /// A privileged service with its revision, in `desired`.
    fn privileged(desired: &mut Desired, name: &str, placement: PlacementRule) {
        let mut svc = service(&format!("{name}:1"), 1, placement, None);
        let host = HostAccess {
            privileged: true,
            ..Default::default()
        };
        svc.revision = crate::map::revision_with(&svc.spec, &host);
        desired.services.insert(name.into(), svc);
        desired.host_access.insert(name.into(), host);
    }

    fn on(node: &str) -> PlacementRule {
        PlacementRule {
            node: Some(node.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_nodes_deploy_policy_turns_what_it_would_refuse_into_refusals() {
        let mut desired = Desired::default();
        privileged(&mut desired, "strict-tool", on("n0"));
        privileged(&mut desired, "open-tool", on("n1"));
        privileged(&mut desired, "anywhere", PlacementRule::default());
        desired
            .services
            .insert("plain".into(), service("plain:1", 1, on("n0"), None));
        let mut app = service("app:1", 1, on("n1"), None);
        app.depends_on = vec!["strict-tool".into()];
        desired.services.insert("app".into(), app);
        let mut observed = Observed {
            nodes: vec![node(0, &[], true), node(1, &[], true)],
            ..Default::default()
        };
        // Without reports (older agents), planned as before: the agents refuse at deploy time.
        let before = plan(&desired, &observed);
        assert!(before.refused.is_empty(), "{before:?}");
        assert!(before
            .actions
            .iter()
            .any(|a| a.service() == "strict-tool" && a.verb() == "create"));

        let closed = DeployPolicySummary {
            allow_gpus: true,
            ..Default::default()
        };
        let open = DeployPolicySummary {
            allow_privileged: true,
            ..closed.clone()
        };
        observed.policies.insert(observed.nodes[0].id, closed);
        observed.policies.insert(observed.nodes[1].id, open);
        let p = plan(&desired, &observed);
        // Refused where the node's policy forbids it, in the agent's words, and not sent.
        assert_eq!(
            p.refused,
            vec![Waiting {
                service: "strict-tool".into(),
                node: Some("n0".into()),
                reason: "deploy refused by this host's policy: a privileged container needs \
                         deploy.allow_privileged (agent config)"
                    .into(),
            }],
            "{p:?}"
        );
        assert!(!p.actions.iter().any(|a| a.service() == "strict-tool"));
        // An action where it allows it; an unpinned one goes where it is allowed (n0 would
        // come first by name); services without host access are not affected.
        let created: BTreeSet<(&str, &str)> = p
            .actions
            .iter()
            .filter(|a| a.verb() == "create")
            .map(|a| (a.service(), a.node()))
            .collect();
        for want in [("open-tool", "n1"), ("anywhere", "n1"), ("plain", "n0")] {
            assert!(created.contains(&want), "{want:?}: {p:?}");
        }
        // A dependent of a refused service waits for it.
        let app = p.actions.iter().find(|a| a.service() == "app").unwrap();
        assert_eq!(app.after(), ["strict-tool".to_string()]);
        assert_eq!(p.unchanged, 0);

        // With nowhere to go, an unpinned service shows each node's refusal.
        observed.policies.insert(
            observed.nodes[1].id,
            DeployPolicySummary {
                allow_gpus: true,
                ..Default::default()
            },
        );
        let p = plan(&desired, &observed);
        let anywhere: Vec<&str> = p
            .refused
            .iter()
            .filter(|w| w.service == "anywhere")
            .filter_map(|w| w.node.as_deref())
            .collect();
        assert_eq!(anywhere, ["n0", "n1"], "{p:?}");
        assert!(!p.waiting.iter().any(|w| w.service == "anywhere"), "{p:?}");
    }

    #[test]
    fn an_update_that_adds_host_access_is_refused_or_shown_field_by_field() {
        let plain = service("tool:1", 1, on("n0"), None);
        let mut desired = Desired::default();
        privileged(&mut desired, "tool", on("n0"));
        assert_ne!(desired.services["tool"].revision, plain.revision);
        let mut n = node(0, &[], true);
        n.containers.push(ObservedContainer {
            name: "tool-1".into(),
            service: "tool".into(),
            revision: plain.revision.clone(),
            running: true,
        });
        let mut observed = Observed {
            nodes: vec![n],
            revisions: BTreeMap::from([(
                plain.revision.clone(),
                RevisionSpec {
                    container: plain.spec.clone(),
                    host_access: HostAccess::default(),
                    files: Vec::new(),
                },
            )]),
            ..Default::default()
        };
        let id = observed.nodes[0].id;
        observed.policies.insert(
            id,
            DeployPolicySummary {
                allow_privileged: true,
                ..Default::default()
            },
        );
        let p = plan(&desired, &observed);
        match &p.actions[..] {
            [Action::Update { changes, .. }] => {
                assert_eq!(changes.len(), 1, "{changes:?}");
                assert_eq!(changes[0].field, "host_access.privileged");
                assert_eq!(changes[0].from, Some(Value::Bool(false)));
                assert_eq!(changes[0].to, Some(Value::Bool(true)));
            }
            other => panic!("{other:?}"),
        }
        // The same update on a node that forbids it: the old revision keeps running, and the
        // plan says why nothing is sent, even after the update failed once.
        observed.policies.insert(id, DeployPolicySummary::default());
        observed.blocked.insert(
            ("tool".into(), desired.services["tool"].revision.clone()),
            "refused by the agent".into(),
        );
        let p = plan(&desired, &observed);
        assert!(p.actions.is_empty(), "{p:?}");
        assert!(p.waiting.is_empty(), "{p:?}");
        assert!(
            p.refused[0].reason.contains("deploy.allow_privileged"),
            "{p:?}"
        );
    }

    fn arb_case() -> impl Strategy<Value = (Desired, Observed)> {
        let nodes = proptest::collection::vec((any::<bool>(), 0u8..3, any::<bool>()), 1..6);
        let services = proptest::collection::vec(
            (
                0u8..3,
                0u32..5,
                0u8..4,
                proptest::option::of(prop_oneof![Just(8080u16), Just(9090u16)]),
                any::<bool>(),
            ),
            0..8,
        );
        let junk = proptest::collection::vec((0usize..6, 0u8..10, 0u8..3, any::<bool>()), 0..12);
        (nodes, services, junk).prop_map(|(nodes, services, junk)| {
            let zones = ["a", "b", "c"];
            let observed_nodes: Vec<ObservedNode> = nodes
                .iter()
                .enumerate()
                .map(|(i, (online, zone, _))| {
                    let mut n = node(i as u8, &[("zone", zones[*zone as usize])], true);
                    // Offline nodes are what the property cannot act on; keep most online.
                    n.online = *online || i == 0;
                    n
                })
                .collect();
            let mut desired = Desired::default();
            for (i, (image, replicas, placement, port, gpu)) in services.iter().enumerate() {
                let rule = match placement {
                    0 => PlacementRule::default(),
                    1 => PlacementRule {
                        labels: BTreeMap::from([("zone".into(), zones[i % 3].into())]),
                        ..Default::default()
                    },
                    2 => PlacementRule {
                        node: Some(format!("n{}", i % observed_nodes.len())),
                        ..Default::default()
                    },
                    _ => PlacementRule {
                        gpu: *gpu,
                        ..Default::default()
                    },
                };
                desired.services.insert(
                    format!("s{i}"),
                    service(&format!("img{image}"), *replicas, rule, *port),
                );
            }
            let mut observed = Observed {
                nodes: observed_nodes,
                ..Default::default()
            };
            // Whatever ran before: some of these services at old or current revisions, orphans.
            for (node_i, svc_i, rev, running) in junk {
                let Some(n) = observed.nodes.get_mut(node_i % nodes.len().max(1)) else {
                    continue;
                };
                let service = format!("s{svc_i}");
                let revision = match (rev, desired.services.get(&service)) {
                    (0, Some(s)) => s.revision.clone(),
                    _ => format!("old{rev}"),
                };
                n.containers.push(ObservedContainer {
                    name: format!("{service}-x"),
                    service,
                    revision,
                    running,
                });
            }
            (desired, observed)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn applying_a_plan_leaves_nothing_to_do((desired, observed) in arb_case()) {
            let first = plan(&desired, &observed);
            let after = apply(&desired, &observed, &first);
            let second = plan(&desired, &after);
            prop_assert!(second.actions.is_empty(), "first: {:?}\nsecond: {:?}", first.actions, second.actions);
            // And planning is deterministic.
            prop_assert_eq!(plan(&desired, &observed), first);
        }
    }
}
