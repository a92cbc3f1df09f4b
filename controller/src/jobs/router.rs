//! Routing: which node runs a job. A pure function of the target and a snapshot of the nodes;
//! the engine builds the snapshot from the store, the live sessions and telemetry.
//!
//! Filter, then score, with the shared checks and orders of [`nebula_placement`]. A node name
//! picks that node. A selector keeps the nodes whose labels, GPU, free VRAM and models match,
//! then prefers, in order: the model already loaded, the model on disk, the most free VRAM, the
//! lowest CPU load, the fewest jobs in flight. When only offline
//! nodes match, the job waits; [`Decision::Wait::asleep`] lists them for the wake hook.

use std::cmp::Ordering;

use nebula_placement::{
    gpu_misfit, label_misfit, vram_misfit, Misfit, ModelPresence, Order, Standing,
};
use nebula_protocol::Labels;
use uuid::Uuid;

use super::model::{Selector, Target};

const MIB: u64 = 1024 * 1024;

/// What routing knows about one node.
#[derive(Debug, Clone, Default)]
pub struct Candidate {
    pub id: Uuid,
    pub name: String,
    pub labels: Labels,
    pub online: bool,
    /// GPUs the node has (from its facts; known while offline too).
    pub gpu_count: usize,
    /// Free memory per GPU, bytes (from the latest telemetry; empty when unknown).
    pub gpu_free_bytes: Vec<u64>,
    /// Models on the node: (name, loaded).
    pub models: Vec<(String, bool)>,
    pub cpu_percent: Option<f32>,
    pub in_flight: usize,
}

impl Candidate {
    fn max_free_vram(&self) -> Option<u64> {
        self.gpu_free_bytes.iter().copied().max()
    }

    fn model(&self, name: &str) -> ModelPresence {
        ModelPresence::of(self.models.iter().map(|(m, l)| (m.as_str(), *l)), name)
    }

    fn standing(&self, sel: &Selector) -> Standing<'_> {
        Standing {
            name: &self.name,
            model: sel
                .model
                .as_deref()
                .map_or(ModelPresence::Absent, |m| self.model(m)),
            free_vram: self.max_free_vram().unwrap_or(0),
            cpu_percent: self.cpu_percent,
            in_flight: self.in_flight,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Run {
        node: Uuid,
        name: String,
        /// Why this node, for people.
        why: String,
    },
    Wait {
        reason: String,
        /// Offline nodes that would do: a node that can be woken is woken (the wake hook).
        asleep: Vec<Uuid>,
    },
}

/// Why a node does not fit a selector, or `None` when it does (online state aside).
fn mismatch(sel: &Selector, c: &Candidate) -> Option<String> {
    let misfit = label_misfit(&sel.labels, &c.labels)
        .or_else(|| gpu_misfit(sel.gpu, c.gpu_count))
        .or_else(|| {
            let m = sel.model.as_ref()?;
            (c.model(m) == ModelPresence::Absent).then(|| Misfit::NoModel(m.clone()))
        })
        .or_else(|| {
            // Free VRAM is only known from live telemetry; an offline node is judged when it
            // is back (the GPU itself is known from its facts).
            let min = sel.min_free_vram_mb?;
            match c.online {
                true => vram_misfit(min, c.gpu_count, c.max_free_vram()),
                false => gpu_misfit(Some(true), c.gpu_count),
            }
        })?;
    Some(format!("{}: {misfit}", c.name))
}

/// Best first: [`Order::Job`] (model loaded > on disk > most free VRAM > lowest CPU > fewest
/// jobs).
fn compare(sel: &Selector, a: &Candidate, b: &Candidate) -> Ordering {
    Order::Job.compare(&a.standing(sel), &b.standing(sel))
}

fn describe(sel: &Selector, c: &Candidate) -> String {
    let mut parts = Vec::new();
    if let Some(m) = &sel.model {
        match c.model(m) {
            ModelPresence::Loaded => parts.push(format!("model {m} loaded")),
            ModelPresence::OnDisk => parts.push(format!("model {m} on disk")),
            ModelPresence::Absent => {}
        }
    }
    if let Some(free) = c.max_free_vram() {
        parts.push(format!(
            "{:.1} GiB VRAM free",
            free as f64 / (1024.0 * MIB as f64)
        ));
    }
    if let Some(cpu) = c.cpu_percent {
        parts.push(format!("CPU {cpu:.0}%"));
    }
    parts.push(format!("{} job(s) in flight", c.in_flight));
    parts.join(", ")
}

/// Choose a node. `exclude`: nodes an earlier attempt was lost on (used only when nothing else
/// fits). `capacity`: jobs in flight per node at most.
pub fn route(target: &Target, nodes: &[Candidate], exclude: &[Uuid], capacity: usize) -> Decision {
    match target {
        Target::Node(name) => {
            let Some(c) = nodes.iter().find(|c| &c.name == name) else {
                return Decision::Wait {
                    reason: format!("node {name} is not enrolled"),
                    asleep: Vec::new(),
                };
            };
            if !c.online {
                return Decision::Wait {
                    reason: format!("node {name} is offline; waiting for it to come online"),
                    asleep: vec![c.id],
                };
            }
            if c.in_flight >= capacity {
                return Decision::Wait {
                    reason: format!(
                        "node {name} has {capacity} jobs in flight; waiting for a slot"
                    ),
                    asleep: Vec::new(),
                };
            }
            Decision::Run {
                node: c.id,
                name: c.name.clone(),
                why: format!("targeted by name ({})", describe(&Selector::default(), c)),
            }
        }
        Target::Selector(sel) => {
            let mut misses = Vec::new();
            let mut matching: Vec<&Candidate> = Vec::new();
            for c in nodes {
                match mismatch(sel, c) {
                    None => matching.push(c),
                    Some(why) => misses.push(why),
                }
            }
            if matching.is_empty() {
                misses.truncate(5);
                let detail = if nodes.is_empty() {
                    "no nodes are enrolled".to_owned()
                } else {
                    misses.join("; ")
                };
                return Decision::Wait {
                    reason: format!("no node matches selector {sel} ({detail})"),
                    asleep: Vec::new(),
                };
            }
            let online: Vec<&Candidate> = matching.iter().copied().filter(|c| c.online).collect();
            if online.is_empty() {
                let names: Vec<&str> = matching.iter().map(|c| c.name.as_str()).collect();
                return Decision::Wait {
                    reason: format!(
                        "selector {sel} matches only offline nodes ({}); waiting for one to come online",
                        names.join(", ")
                    ),
                    asleep: matching.iter().map(|c| c.id).collect(),
                };
            }
            let with_room: Vec<&Candidate> = online
                .iter()
                .copied()
                .filter(|c| c.in_flight < capacity)
                .collect();
            if with_room.is_empty() {
                return Decision::Wait {
                    reason: format!(
                        "all {} nodes matching selector {sel} have {capacity} jobs in flight; waiting for a slot",
                        online.len()
                    ),
                    asleep: Vec::new(),
                };
            }
            let fresh: Vec<&Candidate> = with_room
                .iter()
                .copied()
                .filter(|c| !exclude.contains(&c.id))
                .collect();
            let pool = if fresh.is_empty() { with_room } else { fresh };
            let best = pool
                .iter()
                .copied()
                .min_by(|a, b| compare(sel, a, b))
                .expect("pool is not empty");
            let others: Vec<&str> = pool
                .iter()
                .filter(|c| c.id != best.id)
                .map(|c| c.name.as_str())
                .take(5)
                .collect();
            let mut why = format!(
                "selector {sel} matched {} online node(s); chose {}: {}",
                online.len(),
                best.name,
                describe(sel, best)
            );
            if !others.is_empty() {
                why.push_str(&format!(" (over {})", others.join(", ")));
            }
            if exclude.contains(&best.id) {
                why.push_str("; an earlier attempt was lost here but no other node fits");
            }
            Decision::Run {
                node: best.id,
                name: best.name.clone(),
                why,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u128, name: &str) -> Candidate {
        Candidate {
            id: Uuid::from_u128(n),
            name: name.into(),
            online: true,
            cpu_percent: Some(10.0),
            ..Candidate::default()
        }
    }

    fn gpu(mut c: Candidate, free_gib: u64) -> Candidate {
        c.gpu_count = 1;
        c.gpu_free_bytes = vec![free_gib << 30];
        c
    }

    fn sel(f: impl FnOnce(&mut Selector)) -> Target {
        let mut s = Selector::default();
        f(&mut s);
        Target::Selector(s)
    }

    fn chosen(d: Decision) -> String {
        match d {
            Decision::Run { name, .. } => name,
            Decision::Wait { reason, .. } => panic!("expected a node, got wait: {reason}"),
        }
    }

    #[test]
    fn selectors_filter_and_local_first_scoring_orders() {
        let mut a = gpu(node(1, "a"), 8);
        a.labels.insert("zone".into(), "home".into());
        a.models = vec![("llama3:latest".into(), false)];
        let mut b = gpu(node(2, "b"), 20);
        b.labels.insert("zone".into(), "home".into());
        b.models = vec![("llama3".into(), true)];
        let mut c = node(3, "c");
        c.labels.insert("zone".into(), "cloud".into());
        c.cpu_percent = Some(1.0);
        let d = gpu(node(4, "d"), 40);
        let nodes = vec![a.clone(), b.clone(), c.clone(), d.clone()];

        assert_eq!(
            chosen(route(
                &sel(|s| {
                    s.labels.insert("zone".into(), "cloud".into());
                }),
                &nodes,
                &[],
                8
            )),
            "c"
        );
        // Most free VRAM among GPU nodes.
        assert_eq!(
            chosen(route(&sel(|s| s.gpu = Some(true)), &nodes, &[], 8)),
            "d"
        );
        assert_eq!(
            chosen(route(&sel(|s| s.gpu = Some(false)), &nodes, &[], 8)),
            "c"
        );
        assert_eq!(
            chosen(route(
                &sel(|s| s.min_free_vram_mb = Some(30_000)),
                &nodes,
                &[],
                8
            )),
            "d"
        );
        // Loaded beats on-disk beats VRAM.
        let m = route(&sel(|s| s.model = Some("llama3".into())), &nodes, &[], 8);
        match &m {
            Decision::Run { name, why, .. } => {
                assert_eq!(name, "b");
                assert!(why.contains("model llama3 loaded"), "{why}");
                assert!(why.contains("over a"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        let mut b_unloaded = b.clone();
        b_unloaded.models = vec![];
        let m = route(
            &sel(|s| s.model = Some("llama3".into())),
            &[a.clone(), b_unloaded, c.clone()],
            &[],
            8,
        );
        assert_eq!(chosen(m), "a");
        // Lowest load when nothing else differs.
        let mut e = node(5, "e");
        e.cpu_percent = Some(90.0);
        let mut f = node(6, "f");
        f.cpu_percent = Some(5.0);
        assert_eq!(
            chosen(route(&sel(|_| {}), &[e.clone(), f.clone()], &[], 8)),
            "f"
        );
        // Exclusion (a retry) prefers the other node, but falls back when it is the only one.
        assert_eq!(
            chosen(route(&sel(|_| {}), &[e.clone(), f.clone()], &[f.id], 8)),
            "e"
        );
        assert_eq!(chosen(route(&sel(|_| {}), &[f.clone()], &[f.id], 8)), "f");
        // Capacity.
        let mut busy = f.clone();
        busy.in_flight = 8;
        assert_eq!(
            chosen(route(&sel(|_| {}), &[busy.clone(), e.clone()], &[], 8)),
            "e"
        );
        assert!(matches!(
            route(&sel(|_| {}), &[busy], &[], 8),
            Decision::Wait { .. }
        ));
    }

    #[test]
    fn offline_and_unsatisfiable_wait_with_a_reason() {
        let mut a = gpu(node(1, "a"), 8);
        a.online = false;
        let b = node(2, "b");
        match route(
            &sel(|s| s.gpu = Some(true)),
            &[a.clone(), b.clone()],
            &[],
            8,
        ) {
            Decision::Wait { reason, asleep } => {
                assert!(reason.contains("only offline nodes (a)"), "{reason}");
                assert_eq!(asleep, vec![a.id]);
            }
            other => panic!("{other:?}"),
        }
        match route(
            &sel(|s| s.model = Some("mixtral".into())),
            &[a.clone(), b.clone()],
            &[],
            8,
        ) {
            Decision::Wait { reason, asleep } => {
                assert!(
                    reason.contains("no node matches selector {model=mixtral}"),
                    "{reason}"
                );
                assert!(reason.contains("b: no model mixtral"), "{reason}");
                assert!(asleep.is_empty());
            }
            other => panic!("{other:?}"),
        }
        match route(&Target::Node("a".into()), &[a.clone(), b.clone()], &[], 8) {
            Decision::Wait { reason, asleep } => {
                assert!(reason.contains("node a is offline"), "{reason}");
                assert_eq!(asleep, vec![a.id]);
            }
            other => panic!("{other:?}"),
        }
        let online_vram = gpu(node(3, "c"), 4);
        match route(
            &sel(|s| s.min_free_vram_mb = Some(8192)),
            &[online_vram],
            &[],
            8,
        ) {
            Decision::Wait { reason, .. } => {
                assert!(reason.contains("c: 4096 MiB VRAM free"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            chosen(route(&Target::Node("b".into()), &[a, b], &[], 8)),
            "b"
        );
    }
}
