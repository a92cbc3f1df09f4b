//! Placement: which nodes a service's replicas go to, and how many on each.
//!
//! A node fits a service when it is eligible (declared, when the map declares nodes), runs a
//! container runtime, is the pinned node if there is one, and meets the rule's labels, GPU and
//! free VRAM ([`nebula_placement`]'s checks). Replicas stay on the fitting nodes that run them;
//! surplus ones leave the fullest node; missing ones go to the node with the fewest replicas
//! of the service, then online before offline, then the fewest containers, then by name. A
//! node whose agent's policy refuses the service gets no new replica.
//!
//! The [`Fleet`] keeps what placement learns across services: containers per node (new
//! replicas count, which spreads new work), host ports claimed, and the fitting nodes per
//! distinct rule, computed once and kept in placement order so that a new service is placed
//! without a scan of the fleet.

use std::collections::{BTreeSet, HashMap};

use nebula_placement::{gpu_misfit, labels_match, vram_fits};
use nebula_protocol::deploy::PortProtocol;

use super::{Desired, DesiredService, Labels, Observed, ObservedContainer, ObservedNode, Waiting};

/// A host port: address (`None`: all), number, protocol.
type PortKey = (Option<String>, u16, PortProtocol);

/// A rule without a pinned node: labels, GPU, minimum free VRAM.
type RuleKey<'a> = (&'a Labels, bool, Option<u64>);

/// Placement order of a fitting node: (offline, containers, name rank, index).
type OrderKey = (bool, usize, usize, usize);

/// What does not change while a plan is computed.
struct Index<'a> {
    nodes: &'a [ObservedNode],
    /// Effective labels of the nodes eligible for placement (`None`: not eligible).
    labels: Vec<Option<Labels>>,
    by_name: HashMap<&'a str, usize>,
    /// Position of each node in name order (the last tie-breaker).
    rank: Vec<usize>,
    /// Managed containers by service, with their node.
    by_service: HashMap<&'a str, Vec<(usize, &'a ObservedContainer)>>,
    all_known: bool,
}

impl Index<'_> {
    /// A node among `base` that has not reported its containers yet: the service waits for it
    /// before placing, so that nothing is started twice.
    fn unknown_among(&self, service: &str, base: &[usize]) -> Option<Waiting> {
        if self.all_known {
            return None;
        }
        let i = *base.iter().find(|i| !self.nodes[**i].known)?;
        Some(Waiting {
            service: service.to_owned(),
            node: None,
            reason: format!(
                "waiting for node {} to report its containers before placing",
                self.nodes[i].name
            ),
        })
    }

    /// Node `i` fits `rule`, host ports and agent policy aside.
    fn fits(&self, rule: &super::PlacementRule, i: usize) -> bool {
        let node = &self.nodes[i];
        self.labels[i].as_ref().is_some_and(|l| {
            node.docker
                && rule.node.as_ref().is_none_or(|want| *want == node.name)
                && labels_match(&rule.labels, l)
                && gpu_misfit(rule.gpu.then_some(true), node.gpus as usize).is_none()
                && rule
                    .min_vram_mb
                    .is_none_or(|m| vram_fits(m, node.max_free_vram_mb))
        })
    }
}

/// Why one service's replicas are short (the nodes they go to are [`Fleet::placed`]).
pub(super) struct Placement {
    /// Why fewer replicas than asked could be placed.
    pub waiting: Vec<Waiting>,
    /// Nodes that could take a replica but whose policy refuses the service.
    pub refused: Vec<Waiting>,
}

/// The fleet as placement sees it while a plan is computed.
pub(super) struct Fleet<'a> {
    ix: Index<'a>,
    /// Containers per node: observed, plus the replicas this plan adds.
    load: Vec<usize>,
    /// Host ports claimed per node by the services placed so far.
    claims: Vec<Vec<PortKey>>,
    rule_ids: HashMap<RuleKey<'a>, usize>,
    /// The fitting nodes of each distinct rule.
    rule_bases: Vec<Vec<usize>>,
    /// The same nodes in placement order.
    rule_orders: Vec<BTreeSet<OrderKey>>,
    /// The rules each node fits.
    node_rules: Vec<Vec<usize>>,
    /// Scratch per service, indexed by node, reset after each service.
    assigned: Vec<u32>,
    existing: Vec<u32>,
    /// The last placement's nodes (kept to spare an allocation per service).
    placed: Vec<(usize, u32)>,
}

impl<'a> Fleet<'a> {
    pub fn new(desired: &Desired, observed: &'a Observed) -> Self {
        let nodes = &observed.nodes[..];
        let n = nodes.len();
        let labels = nodes
            .iter()
            .map(|node| match &desired.nodes {
                None => Some(node.labels.clone()),
                Some(decl) => decl.get(&node.name).map(|extra| {
                    let mut l = node.labels.clone();
                    l.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
                    l
                }),
            })
            .collect();
        let by_name = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| (node.name.as_str(), i))
            .collect();
        let mut rank = vec![0usize; n];
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|a, b| nodes[*a].name.cmp(&nodes[*b].name));
        for (r, i) in order.into_iter().enumerate() {
            rank[i] = r;
        }
        let mut by_service: HashMap<&str, Vec<(usize, &ObservedContainer)>> = HashMap::new();
        for (i, node) in nodes.iter().enumerate() {
            for c in &node.containers {
                by_service
                    .entry(c.service.as_str())
                    .or_default()
                    .push((i, c));
            }
        }
        Fleet {
            ix: Index {
                nodes,
                labels,
                by_name,
                rank,
                by_service,
                all_known: nodes.iter().all(|node| node.known),
            },
            load: nodes.iter().map(|node| node.containers.len()).collect(),
            claims: vec![Vec::new(); n],
            rule_ids: HashMap::new(),
            rule_bases: Vec::new(),
            rule_orders: Vec::new(),
            node_rules: vec![Vec::new(); n],
            assigned: vec![0; n],
            existing: vec![0; n],
            placed: Vec::new(),
        }
    }

    pub fn node(&self, i: usize) -> &'a ObservedNode {
        &self.ix.nodes[i]
    }

    /// The service's managed containers, with their node.
    pub fn containers_of(&self, service: &str) -> &[(usize, &'a ObservedContainer)] {
        self.ix
            .by_service
            .get(service)
            .map_or(&[][..], Vec::as_slice)
    }

    /// Where the last [`Fleet::place`] put the service: (node index, replicas wanted there), by
    /// node index, for every node it runs on or is placed on (0: its containers there go).
    pub fn placed(&self) -> &[(usize, u32)] {
        &self.placed
    }

    /// The nodes that fit a rule without a pinned node, by rule id (computed on first use).
    fn rule_id(&mut self, svc: &'a DesiredService) -> usize {
        let rule = &svc.placement;
        let key = (&rule.labels, rule.gpu, rule.min_vram_mb);
        if let Some(id) = self.rule_ids.get(&key) {
            return *id;
        }
        let ix = &self.ix;
        let base: Vec<usize> = (0..ix.nodes.len()).filter(|i| ix.fits(rule, *i)).collect();
        let ordered = base
            .iter()
            .map(|&i| (!ix.nodes[i].online, self.load[i], ix.rank[i], i))
            .collect();
        let id = self.rule_bases.len();
        for &i in &base {
            self.node_rules[i].push(id);
        }
        self.rule_bases.push(base);
        self.rule_orders.push(ordered);
        self.rule_ids.insert(key, id);
        id
    }

    /// Place `svc`'s replicas. `refusal_at(i)`: what node `i`'s agent would answer to the
    /// service, when it reported its policy. `Err`: the service waits before placing at all
    /// (a node it could go to has not reported its containers yet).
    pub fn place(
        &mut self,
        name: &str,
        svc: &'a DesiredService,
        refusal_at: impl Fn(usize) -> Option<String>,
    ) -> Result<Placement, Waiting> {
        let rule = &svc.placement;
        let rule_id = match rule.node {
            Some(_) => None,
            None => Some(self.rule_id(svc)),
        };
        self.placed.clear();
        let ix = &self.ix;
        let nodes = ix.nodes;
        let allowed = |i: usize| refusal_at(i).is_none();
        let fixed_ports: Vec<PortKey> = svc
            .spec
            .ports
            .iter()
            .filter_map(|p| p.host_port.map(|h| (p.host_ip.clone(), h, p.protocol)))
            .collect();
        let max_per_node = if fixed_ports.is_empty() { u32::MAX } else { 1 };
        let mine: &[(usize, &ObservedContainer)] =
            ix.by_service.get(name).map_or(&[][..], Vec::as_slice);
        // Nodes this service touches: where it runs, and where it is placed.
        let mut touched: Vec<usize> = Vec::new();
        for (i, _) in mine {
            if self.existing[*i] == 0 {
                touched.push(*i);
            }
            self.existing[*i] += 1;
        }
        let pinned: Vec<usize>;
        let base: &[usize] = match (&rule.node, rule_id) {
            (Some(want), _) => {
                pinned = ix
                    .by_name
                    .get(want.as_str())
                    .copied()
                    .filter(|i| ix.fits(rule, *i))
                    .into_iter()
                    .collect();
                &pinned
            }
            (None, Some(id)) => &self.rule_bases[id],
            (None, None) => &[],
        };
        if rule.node.is_none() {
            if let Some(wait) = ix.unknown_among(name, base) {
                for &i in &touched {
                    self.existing[i] = 0;
                }
                return Err(wait);
            }
        }
        let ports_ok = |claims: &[Vec<PortKey>], i: usize| {
            fixed_ports.iter().all(|p| !conflicts(&claims[i], p))
        };
        let candidate = |claims: &[Vec<PortKey>], i: usize| ix.fits(rule, i) && ports_ok(claims, i);
        let any_candidate = base.iter().any(|i| ports_ok(&self.claims, *i));
        let (assigned, existing, load) = (&mut self.assigned, &mut self.existing, &mut self.load);

        // Replicas stay where they run (a converged service is a fixed point); surplus ones
        // go from the fullest node; missing ones go to the emptiest.
        let mut total = 0u32;
        for &i in &touched {
            if candidate(&self.claims, i) {
                assigned[i] = existing[i].min(max_per_node);
                total += assigned[i];
            }
        }
        while total > svc.replicas {
            let i = touched
                .iter()
                .copied()
                .filter(|i| assigned[*i] > 0)
                .max_by_key(|i| (assigned[*i], !nodes[*i].online, load[*i], ix.rank[*i]))
                .expect("the total is above zero");
            assigned[i] -= 1;
            total -= 1;
        }
        while total < svc.replicas {
            // A service that runs nowhere yet takes the first node in placement order that it
            // does not use yet: the same node a scan would pick, without one.
            let quick = match rule_id {
                Some(id) if mine.is_empty() => self.rule_orders[id]
                    .iter()
                    .map(|k| k.3)
                    .find(|i| assigned[*i] == 0 && ports_ok(&self.claims, *i) && allowed(*i)),
                _ => None,
            };
            let best = quick.or_else(|| {
                base.iter()
                    .copied()
                    .filter(|i| {
                        assigned[*i] < max_per_node && ports_ok(&self.claims, *i) && allowed(*i)
                    })
                    .min_by_key(|i| {
                        (
                            assigned[*i],
                            !nodes[*i].online,
                            load[*i] - existing[*i] as usize,
                            ix.rank[*i],
                        )
                    })
            });
            let Some(i) = best else { break };
            if assigned[i] == 0 && existing[i] == 0 {
                touched.push(i);
            }
            assigned[i] += 1;
            total += 1;
            if assigned[i] > existing[i] {
                let key = (!nodes[i].online, load[i], ix.rank[i], i);
                load[i] += 1;
                for &r in &self.node_rules[i] {
                    self.rule_orders[r].remove(&key);
                    self.rule_orders[r].insert((key.0, load[i], key.2, i));
                }
            }
        }
        let mut placement = Placement {
            waiting: Vec::new(),
            refused: Vec::new(),
        };
        if total < svc.replicas {
            let open = |i: usize| assigned[i] < max_per_node && ports_ok(&self.claims, i);
            (placement.waiting, placement.refused) = shortfall(
                name,
                svc,
                total,
                nodes,
                base,
                any_candidate,
                open,
                &refusal_at,
            );
        }
        touched.sort_unstable();
        for &i in &touched {
            if assigned[i] > 0 {
                self.claims[i].extend(fixed_ports.iter().cloned());
            }
            self.placed.push((i, assigned[i]));
            assigned[i] = 0;
            existing[i] = 0;
        }
        Ok(placement)
    }
}

/// Why fewer replicas than asked were placed: nodes that could take one but whose agent's
/// policy refuses the service (in its words), or else a waiting reason.
#[allow(clippy::too_many_arguments)]
fn shortfall(
    name: &str,
    svc: &DesiredService,
    total: u32,
    nodes: &[ObservedNode],
    base: &[usize],
    any_candidate: bool,
    open: impl Fn(usize) -> bool,
    refusal_at: impl Fn(usize) -> Option<String>,
) -> (Vec<Waiting>, Vec<Waiting>) {
    let refused: Vec<Waiting> = base
        .iter()
        .copied()
        .filter(|i| open(*i))
        .filter_map(|i| {
            refusal_at(i).map(|reason| Waiting {
                service: name.to_owned(),
                node: Some(nodes[i].name.clone()),
                reason,
            })
        })
        .collect();
    if !refused.is_empty() {
        return (Vec::new(), refused);
    }
    let reason = if !any_candidate {
        no_fit_reason(svc)
    } else {
        format!(
            "only {total} of {} replicas can be placed (a fixed host port allows one per node)",
            svc.replicas
        )
    };
    let waiting = Waiting {
        service: name.to_owned(),
        node: None,
        reason,
    };
    (vec![waiting], Vec::new())
}

fn conflicts(claimed: &[PortKey], p: &PortKey) -> bool {
    claimed
        .iter()
        .any(|c| c.1 == p.1 && c.2 == p.2 && (c.0.is_none() || p.0.is_none() || c.0 == p.0))
}

fn no_fit_reason(svc: &DesiredService) -> String {
    let rule = &svc.placement;
    let mut wants = Vec::new();
    if let Some(n) = &rule.node {
        wants.push(format!("node `{n}`"));
    }
    if !rule.labels.is_empty() {
        wants.push(format!(
            "labels {}",
            rule.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    if rule.gpu {
        wants.push("a GPU".into());
    }
    if let Some(m) = rule.min_vram_mb {
        wants.push(format!("{m} MiB of free VRAM"));
    }
    if wants.is_empty() {
        "no node is connected".into()
    } else {
        format!("no connected node fits ({})", wants.join(", "))
    }
}
