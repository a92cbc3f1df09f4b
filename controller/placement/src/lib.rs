//! How Nebula picks a node. Every placement decision is the same two steps, built from the
//! primitives in this crate:
//!
//! 1. **Fit**: requirements a node must meet, each with the words that say why a node does
//!    not ([`Misfit`]): labels ([`label_misfit`]), a GPU ([`gpu_misfit`]), free VRAM
//!    ([`vram_fits`], [`vram_misfit`]) and a model ([`ModelPresence`]).
//! 2. **Preference**: among the nodes that fit, an [`Order`] over the same few terms of a
//!    node's [`Standing`] (model presence, free VRAM, CPU, work in flight, name, always last so
//!    that equal nodes are taken in a stable order).
//!
//! | decision | made by | fits when | preferred, in order |
//! |---|---|---|---|
//! | a job | the controller's job router | labels, GPU, model, free VRAM (judged while online) | [`Order::Job`]: model loaded, on disk, most free VRAM, lowest CPU, fewest jobs |
//! | a service's replicas | the planner (`nebula-desired`) | pinned name, labels, GPU, free VRAM, Docker, the agent's deploy policy | where they run already (a converged service stays put), then the fewest of this service's replicas, online, fewest containers (spreads new work) |
//! | an AI request | the gateway | the model in a healthy backend, the prompt fits its context, breaker closed | [`Order::Request`]: loaded, fewest requests in flight, most free VRAM |
//! | a model pull | the gateway | online, a healthy Ollama, no recent failed pull of the model there | [`Order::Pull`]: most free VRAM, fewest requests in flight |
//!
//! Pure and synchronous: callers snapshot their nodes and ask.

use std::cmp::Ordering;
use std::fmt;

use nebula_protocol::ai::same_model;

pub use nebula_protocol::Labels;

const MIB: u64 = 1024 * 1024;

/// Why a node does not fit, in words for people (prefixed with the node's name by callers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Misfit {
    /// A wanted label is missing (`have: None`) or has another value.
    Label {
        key: String,
        have: Option<String>,
    },
    NoGpu,
    HasGpu,
    NoModel(String),
    /// Less free VRAM than wanted, MiB.
    Vram {
        free_mb: u64,
    },
    VramUnknown,
}

impl fmt::Display for Misfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Misfit::Label { key, have: Some(v) } => write!(f, "label {key}={v}"),
            Misfit::Label { key, have: None } => write!(f, "no label {key}"),
            Misfit::NoGpu => f.write_str("no GPU"),
            Misfit::HasGpu => f.write_str("has a GPU"),
            Misfit::NoModel(m) => write!(f, "no model {m}"),
            Misfit::Vram { free_mb } => write!(f, "{free_mb} MiB VRAM free"),
            Misfit::VramUnknown => f.write_str("free VRAM not reported yet"),
        }
    }
}

/// Every wanted label is on the node with the same value.
pub fn labels_match(want: &Labels, have: &Labels) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// The first wanted label the node lacks or has with another value.
pub fn label_misfit(want: &Labels, have: &Labels) -> Option<Misfit> {
    want.iter().find_map(|(k, v)| match have.get(k) {
        Some(h) if h == v => None,
        h => Some(Misfit::Label {
            key: k.clone(),
            have: h.cloned(),
        }),
    })
}

/// `Some(true)`: the node must have a GPU; `Some(false)`: it must have none.
pub fn gpu_misfit(want: Option<bool>, gpus: usize) -> Option<Misfit> {
    match want {
        Some(true) if gpus == 0 => Some(Misfit::NoGpu),
        Some(false) if gpus > 0 => Some(Misfit::HasGpu),
        _ => None,
    }
}

/// At least `min_mb` MiB free on one GPU.
pub fn vram_fits(min_mb: u64, free_mb: u64) -> bool {
    free_mb >= min_mb
}

/// A GPU with at least `min_mb` MiB free, judged from the most free on one GPU (`None`: not
/// reported yet).
pub fn vram_misfit(min_mb: u64, gpus: usize, max_free_bytes: Option<u64>) -> Option<Misfit> {
    if gpus == 0 {
        return Some(Misfit::NoGpu);
    }
    match max_free_bytes {
        Some(free) if vram_fits(min_mb, free / MIB) => None,
        Some(free) => Some(Misfit::Vram {
            free_mb: free / MIB,
        }),
        None => Some(Misfit::VramUnknown),
    }
}

/// Whether a node has a model: loaded beats on disk beats absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum ModelPresence {
    #[default]
    Absent,
    OnDisk,
    Loaded,
}

impl ModelPresence {
    /// The best presence of `want` among a node's models `(name, loaded)`; names match with and
    /// without Ollama's default `:latest` tag.
    pub fn of<'a>(models: impl IntoIterator<Item = (&'a str, bool)>, want: &str) -> Self {
        models
            .into_iter()
            .filter(|(m, _)| same_model(m, want))
            .map(|(_, loaded)| ModelPresence::from_loaded(loaded))
            .max()
            .unwrap_or_default()
    }

    pub fn from_loaded(loaded: bool) -> Self {
        if loaded {
            ModelPresence::Loaded
        } else {
            ModelPresence::OnDisk
        }
    }
}

/// What preference orders compare about a node that fits.
#[derive(Debug, Clone, Copy, Default)]
pub struct Standing<'a> {
    pub name: &'a str,
    pub model: ModelPresence,
    /// Free VRAM, bytes (the most on one GPU; 0 when unknown).
    pub free_vram: u64,
    /// CPU use, percent (`None`: unknown, counted as busy).
    pub cpu_percent: Option<f32>,
    /// Jobs or requests in flight on the node.
    pub in_flight: usize,
}

/// Which preference, by decision (see the crate's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// A job: model loaded > on disk > most free VRAM > lowest CPU > fewest jobs in flight.
    Job,
    /// An AI request: loaded > fewest requests in flight > most free VRAM.
    Request,
    /// A model pull: most free VRAM > fewest requests in flight.
    Pull,
}

impl Order {
    /// `Less`: `a` is preferred.
    pub fn compare(self, a: &Standing<'_>, b: &Standing<'_>) -> Ordering {
        let model = || b.model.cmp(&a.model);
        let vram = || b.free_vram.cmp(&a.free_vram);
        let busy = || a.in_flight.cmp(&b.in_flight);
        let cpu = || {
            let (ca, cb) = (
                a.cpu_percent.unwrap_or(100.0),
                b.cpu_percent.unwrap_or(100.0),
            );
            ca.partial_cmp(&cb).unwrap_or(Ordering::Equal)
        };
        let first = match self {
            Order::Job => model().then_with(vram).then_with(cpu).then_with(busy),
            Order::Request => model().then_with(busy).then_with(vram),
            Order::Pull => vram().then_with(busy),
        };
        first.then_with(|| a.name.cmp(b.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_fit_when_every_wanted_one_is_there_with_its_value() {
        let have = labels(&[("zone", "home"), ("disk", "ssd")]);
        assert!(labels_match(&labels(&[("zone", "home")]), &have));
        assert!(labels_match(&Labels::new(), &have));
        assert!(!labels_match(&labels(&[("zone", "cloud")]), &have));
        assert_eq!(
            label_misfit(&labels(&[("zone", "cloud")]), &have)
                .unwrap()
                .to_string(),
            "label zone=home"
        );
        assert_eq!(
            label_misfit(&labels(&[("gpu", "yes")]), &have)
                .unwrap()
                .to_string(),
            "no label gpu"
        );
        assert_eq!(label_misfit(&labels(&[("disk", "ssd")]), &have), None);
    }

    #[test]
    fn gpu_and_vram_requirements_say_why_not() {
        assert_eq!(gpu_misfit(Some(true), 0), Some(Misfit::NoGpu));
        assert_eq!(gpu_misfit(Some(false), 1), Some(Misfit::HasGpu));
        assert_eq!(gpu_misfit(None, 0), None);
        assert_eq!(vram_misfit(1000, 0, Some(8 << 30)), Some(Misfit::NoGpu));
        assert_eq!(vram_misfit(1000, 1, None), Some(Misfit::VramUnknown));
        assert_eq!(vram_misfit(1000, 1, Some(2000 * MIB)), None);
        assert_eq!(
            vram_misfit(4000, 1, Some(2000 * MIB)).unwrap().to_string(),
            "2000 MiB VRAM free"
        );
    }

    #[test]
    fn model_presence_takes_the_best_copy_and_the_default_tag() {
        let models = [("llama3:latest", false), ("llama3", true), ("phi3", false)];
        assert_eq!(
            ModelPresence::of(models.iter().copied(), "llama3"),
            ModelPresence::Loaded
        );
        assert_eq!(
            ModelPresence::of(models.iter().copied(), "phi3:latest"),
            ModelPresence::OnDisk
        );
        assert_eq!(
            ModelPresence::of(models.iter().copied(), "llama3:8b"),
            ModelPresence::Absent
        );
    }

    #[test]
    fn each_order_ranks_its_terms_in_its_own_sequence() {
        let loaded_busy = Standing {
            name: "a",
            model: ModelPresence::Loaded,
            free_vram: 1,
            cpu_percent: Some(90.0),
            in_flight: 5,
        };
        let disk_idle = Standing {
            name: "b",
            model: ModelPresence::OnDisk,
            free_vram: 10,
            cpu_percent: Some(1.0),
            in_flight: 0,
        };
        // Jobs and requests go where the model is loaded; a pull goes where VRAM is free.
        assert_eq!(Order::Job.compare(&loaded_busy, &disk_idle), Ordering::Less);
        assert_eq!(
            Order::Request.compare(&loaded_busy, &disk_idle),
            Ordering::Less
        );
        assert_eq!(
            Order::Pull.compare(&loaded_busy, &disk_idle),
            Ordering::Greater
        );
        // With the model alike: a job prefers free VRAM, a request fewer in flight.
        let more_vram_busier = Standing {
            model: ModelPresence::OnDisk,
            free_vram: 20,
            in_flight: 3,
            name: "c",
            ..disk_idle
        };
        assert_eq!(
            Order::Job.compare(&more_vram_busier, &disk_idle),
            Ordering::Less
        );
        assert_eq!(
            Order::Request.compare(&more_vram_busier, &disk_idle),
            Ordering::Greater
        );
        // Unknown CPU counts as busy; the name breaks ties.
        let unknown_cpu = Standing {
            cpu_percent: None,
            name: "a",
            ..disk_idle
        };
        assert_eq!(Order::Job.compare(&disk_idle, &unknown_cpu), Ordering::Less);
        let twin = Standing {
            name: "a",
            ..disk_idle
        };
        assert_eq!(Order::Pull.compare(&twin, &disk_idle), Ordering::Less);
    }
}
