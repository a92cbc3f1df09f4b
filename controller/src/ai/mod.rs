//! Local AI across the fleet: what each node's inference backends hold (from the agents'
//! `AiInventory` messages), where a request for a model should go, circuit breakers per
//! (node, model), in-flight counts and token usage. The HTTP gateway is in [`gateway`].
//!
//! Routing filters, then scores: a node must be online, its backend healthy, its breaker for the
//! model not open, the model there and its context long enough for the prompt; then a loaded
//! model beats one on disk, fewer requests in flight beat more, more free VRAM beats less.

pub use nebula_ai_filters as filters;
mod breaker;
mod config;
pub mod gateway;
pub mod pulls;

use breaker::Breaker;
pub use breaker::Outcome;
pub use config::{AiConfig, FallbackConfig};

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nebula_placement::{ModelPresence, Order, Standing};
use nebula_protocol::ai::{model_base, same_model, AiInventory, BackendKind};
use serde::Serialize;
use uuid::Uuid;

/// One node's AI inventory.
#[derive(Debug, Clone)]
struct NodeAi {
    name: String,
    inventory: AiInventory,
}

/// Where a request can go, best first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node_id: Uuid,
    pub node: String,
    pub backend: String,
    pub kind: BackendKind,
    pub model: String,
    pub loaded: bool,
    pub in_flight: u32,
    pub free_vram: u64,
}

/// The fleet's AI state, shared by the sessions (which report) and the gateway (which routes).
/// Locks are taken in the order nodes, in_flight, breakers, failed_pulls, and never across an
/// await.
#[derive(Debug)]
pub struct AiFleet {
    /// The output filters, compiled.
    pub filters: filters::Filters,
    nodes: Mutex<HashMap<Uuid, NodeAi>>,
    in_flight: Mutex<HashMap<Uuid, u32>>,
    breakers: Mutex<HashMap<(Uuid, String), Breaker>>,
    usage: Mutex<BTreeMap<(String, String, String), Usage>>,
    limits: Mutex<HashMap<String, TokenLimit>>,
    /// Pulls started for requests, by (node, model).
    pulls: Mutex<HashMap<(Uuid, String), PullClaim>>,
    /// Pulls on demand that failed, by model (without its default tag), then node: when, and
    /// why.
    failed_pulls: Mutex<HashMap<String, FailedPulls>>,
}

/// A pull on demand claimed by a request.
#[derive(Debug, Clone)]
struct PullClaim {
    /// Its job; `None` while the job is being created.
    job: Option<Uuid>,
    /// Who asked for it (an API token's name, `user:NAME`): counted against their
    /// `max_pulls_per_token`.
    by: String,
}

/// What [`AiFleet::claim_pull`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The caller must start the pull (and set its job, or give the claim back).
    Start,
    /// The pull is claimed already: wait for its job (`None` while it is being created).
    Joined(Option<Uuid>),
    /// The caller has this many pulls in flight, its limit: none is started.
    OverLimit(u32),
}

/// One model's failed pulls, by node: when, and why.
type FailedPulls = HashMap<Uuid, (Instant, String)>;

/// Failed pulls remembered (a client may name any number of models).
const FAILED_PULLS_KEPT: usize = 1024;

/// Tokens counted per (API token name, model, node).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, Default)]
struct TokenLimit {
    window: VecDeque<Instant>,
    in_flight: u32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for AiFleet {
    fn default() -> Self {
        AiFleet::new(
            filters::Filters::new(filters::FilterConfig::default()).expect("default filters"),
        )
    }
}

impl AiFleet {
    pub fn new(filters: filters::Filters) -> Self {
        AiFleet {
            filters,
            nodes: Mutex::default(),
            in_flight: Mutex::default(),
            breakers: Mutex::default(),
            usage: Mutex::default(),
            limits: Mutex::default(),
            pulls: Mutex::default(),
            failed_pulls: Mutex::default(),
        }
    }

    /// Remember that pulling `model` onto `node_id` failed, and why.
    pub fn pull_failed(&self, node_id: Uuid, model: &str, why: &str, cooldown: Duration) {
        let now = Instant::now();
        let mut failed = lock(&self.failed_pulls);
        let count = |f: &HashMap<String, FailedPulls>| f.values().map(HashMap::len).sum::<usize>();
        if count(&failed) >= FAILED_PULLS_KEPT {
            for per_node in failed.values_mut() {
                per_node.retain(|_, (at, _)| now.duration_since(*at) < cooldown);
            }
            failed.retain(|_, per_node| !per_node.is_empty());
        }
        if count(&failed) >= FAILED_PULLS_KEPT {
            let oldest = failed
                .iter()
                .flat_map(|(m, per_node)| per_node.iter().map(move |(id, (at, _))| (*at, m, *id)))
                .min()
                .map(|(_, m, id)| (m.clone(), id));
            if let Some((m, id)) = oldest {
                if let Some(per_node) = failed.get_mut(&m) {
                    per_node.remove(&id);
                    if per_node.is_empty() {
                        failed.remove(&m);
                    }
                }
            }
        }
        failed
            .entry(model_base(model).to_owned())
            .or_default()
            .insert(node_id, (now, why.to_owned()));
    }

    /// Why pulling `model` failed last, on any node, within `cooldown`.
    pub fn recent_pull_failure(&self, model: &str, cooldown: Duration) -> Option<String> {
        lock(&self.failed_pulls)
            .get(model_base(model))?
            .values()
            .filter(|(at, _)| at.elapsed() < cooldown)
            .max_by_key(|(at, _)| *at)
            .map(|(_, why)| why.clone())
    }

    /// Where a model no node has could be pulled: an online node with a healthy Ollama where
    /// pulling it has not failed within `cooldown`, by [`Order::Pull`] (the most free VRAM
    /// first, then the fewest requests in flight).
    pub fn pull_target(
        &self,
        model: &str,
        cooldown: Duration,
        online: impl Fn(Uuid) -> bool,
        free_vram: impl Fn(Uuid) -> u64,
    ) -> Option<(Uuid, String)> {
        let nodes = lock(&self.nodes);
        let in_flight = lock(&self.in_flight);
        let failed = lock(&self.failed_pulls);
        let failed_here = failed.get(model_base(model));
        nodes
            .iter()
            .filter(|(id, n)| {
                online(**id)
                    && failed_here
                        .and_then(|f| f.get(*id))
                        .is_none_or(|(at, _)| at.elapsed() >= cooldown)
                    && n.inventory
                        .backends
                        .iter()
                        .any(|b| b.healthy && b.kind == BackendKind::Ollama)
            })
            .map(|(id, n)| {
                let standing = Standing {
                    name: &n.name,
                    free_vram: free_vram(*id),
                    in_flight: in_flight.get(id).copied().unwrap_or(0) as usize,
                    ..Standing::default()
                };
                (*id, standing)
            })
            .min_by(|a, b| Order::Pull.compare(&a.1, &b.1))
            .map(|(id, s)| (id, s.name.to_owned()))
    }

    /// Claim the pull of a model onto a node for `by`. A pull claimed already is joined,
    /// whoever claimed it. Otherwise `by` may start one when it has fewer than `limit` (0: no
    /// limit) in flight: claims still without a job, and those whose job `live` says is not
    /// over (a claim whose request went away before its job ended is not counted forever).
    pub fn claim_pull(
        &self,
        key: &(Uuid, String),
        by: &str,
        limit: u32,
        live: impl Fn(Uuid) -> bool,
    ) -> Claim {
        let mut pulls = lock(&self.pulls);
        if let Some(existing) = pulls.get(key) {
            return Claim::Joined(existing.job);
        }
        if limit > 0 {
            let mine = pulls
                .values()
                .filter(|c| c.by == by && c.job.is_none_or(&live))
                .count();
            let mine = u32::try_from(mine).unwrap_or(u32::MAX);
            if mine >= limit {
                return Claim::OverLimit(mine);
            }
        }
        pulls.insert(
            key.clone(),
            PullClaim {
                job: None,
                by: by.to_owned(),
            },
        );
        Claim::Start
    }

    /// The claimed pull's job (`Some`), or the pull is over (`None`).
    pub fn set_pull_in_flight(&self, key: (Uuid, String), job: Option<Uuid>) {
        let mut pulls = lock(&self.pulls);
        match job {
            Some(j) => {
                if let Some(c) = pulls.get_mut(&key) {
                    c.job = Some(j);
                }
            }
            None => {
                pulls.remove(&key);
            }
        }
    }

    /// A claimed pull: `Some(Some(job))` once its job exists, `Some(None)` while it is being
    /// created, `None` when the claim is gone.
    pub fn pull_job(&self, key: &(Uuid, String)) -> Option<Option<Uuid>> {
        lock(&self.pulls).get(key).map(|c| c.job)
    }

    pub fn set_inventory(&self, node_id: Uuid, name: &str, inventory: AiInventory) {
        {
            // A model the node now has (pulled by hand, say) is no failed pull there any more.
            let mut failed = lock(&self.failed_pulls);
            if !failed.is_empty() {
                for m in inventory.backends.iter().flat_map(|b| &b.models) {
                    let base = model_base(&m.name);
                    if let Some(per_node) = failed.get_mut(base) {
                        per_node.remove(&node_id);
                        if per_node.is_empty() {
                            failed.remove(base);
                        }
                    }
                }
            }
        }
        lock(&self.nodes).insert(
            node_id,
            NodeAi {
                name: name.to_owned(),
                inventory,
            },
        );
    }

    pub fn forget(&self, node_id: Uuid) {
        lock(&self.nodes).remove(&node_id);
    }

    /// A backend said it does not have `model` after all: drop it from that node's inventory
    /// until the agent reports again.
    pub fn model_missing(&self, node_id: Uuid, backend: &str, model: &str) {
        if let Some(n) = lock(&self.nodes).get_mut(&node_id) {
            for b in n
                .inventory
                .backends
                .iter_mut()
                .filter(|b| b.name == backend)
            {
                b.models.retain(|m| !same_model(&m.name, model));
            }
        }
    }

    /// (node, model) pairs whose breaker is open or half-open.
    pub fn open_breakers(&self) -> Vec<(Uuid, String)> {
        lock(&self.breakers)
            .iter()
            .filter(|(_, b)| b.is_open())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Every node's inventory (for the API), by node name.
    pub fn inventory(&self) -> BTreeMap<String, (Uuid, AiInventory)> {
        lock(&self.nodes)
            .iter()
            .map(|(id, n)| (n.name.clone(), (*id, n.inventory.clone())))
            .collect()
    }

    /// Does an online node hold `model` in a healthy backend, whatever its breaker or context?
    pub fn has_model(&self, model: &str, online: impl Fn(Uuid) -> bool) -> bool {
        lock(&self.nodes).iter().any(|(id, n)| {
            online(*id)
                && n.inventory
                    .backends
                    .iter()
                    .filter(|b| b.healthy && b.kind != BackendKind::StableDiffusion)
                    .any(|b| b.models.iter().any(|m| same_model(&m.name, model)))
        })
    }

    /// Where `model` can be served now, best first. `online` says whether a node is connected;
    /// `free_vram` what its GPUs have free; `prompt_tokens` an estimate of the prompt's length.
    pub fn candidates(
        &self,
        model: &str,
        prompt_tokens: u32,
        online: impl Fn(Uuid) -> bool,
        free_vram: impl Fn(Uuid) -> u64,
        embeddings: bool,
    ) -> Vec<Candidate> {
        let nodes = lock(&self.nodes);
        let in_flight = lock(&self.in_flight);
        let breakers = lock(&self.breakers);
        let now = Instant::now();
        let mut out = Vec::new();
        for (id, n) in nodes.iter() {
            if !online(*id) {
                continue;
            }
            let best = n
                .inventory
                .backends
                .iter()
                .filter(|b| b.healthy && b.kind != BackendKind::StableDiffusion)
                .flat_map(|b| b.models.iter().map(move |m| (b, m)))
                .filter(|(_, m)| same_model(&m.name, model))
                .filter(|(_, m)| embeddings || m.context_length.is_none_or(|c| c >= prompt_tokens))
                .max_by_key(|(_, m)| m.loaded);
            let Some((b, m)) = best else { continue };
            if breakers
                .get(&(*id, m.name.clone()))
                .is_some_and(|br| !br.may_try(now))
            {
                continue;
            }
            out.push(Candidate {
                node_id: *id,
                node: n.name.clone(),
                backend: b.name.clone(),
                kind: b.kind,
                model: m.name.clone(),
                loaded: m.loaded,
                in_flight: in_flight.get(id).copied().unwrap_or(0),
                free_vram: free_vram(*id),
            });
        }
        rank(&mut out);
        out
    }

    /// Nodes with a healthy Stable Diffusion WebUI whose breaker for the checkpoint allows a try,
    /// best first: the checkpoint `model` loaded (when one is named), then fewer requests in
    /// flight, then more free VRAM.
    pub fn image_candidates(
        &self,
        model: Option<&str>,
        online: impl Fn(Uuid) -> bool,
        free_vram: impl Fn(Uuid) -> u64,
    ) -> Vec<Candidate> {
        let nodes = lock(&self.nodes);
        let in_flight = lock(&self.in_flight);
        let breakers = lock(&self.breakers);
        let now = Instant::now();
        let mut out = Vec::new();
        for (id, n) in nodes.iter() {
            if !online(*id) {
                continue;
            }
            for b in n
                .inventory
                .backends
                .iter()
                .filter(|b| b.healthy && b.kind == BackendKind::StableDiffusion)
            {
                let chosen = match model {
                    Some(m) => b
                        .models
                        .iter()
                        .find(|x| x.name == m || x.name.starts_with(&format!("{m}."))),
                    None => b.models.iter().find(|x| x.loaded).or(b.models.first()),
                };
                let (name, loaded) = match (model, chosen) {
                    (Some(_), None) => continue,
                    (_, Some(x)) => (x.name.clone(), x.loaded),
                    (None, None) => (String::new(), true),
                };
                if breakers
                    .get(&(*id, name.clone()))
                    .is_some_and(|br| !br.may_try(now))
                {
                    continue;
                }
                out.push(Candidate {
                    node_id: *id,
                    node: n.name.clone(),
                    backend: b.name.clone(),
                    kind: b.kind,
                    model: name,
                    loaded,
                    in_flight: in_flight.get(id).copied().unwrap_or(0),
                    free_vram: free_vram(*id),
                });
            }
        }
        rank(&mut out);
        out
    }

    /// The models the fleet can serve: name -> (nodes that have it, nodes that have it loaded).
    pub fn models(
        &self,
        online: impl Fn(Uuid) -> bool,
    ) -> BTreeMap<String, (Vec<String>, Vec<String>)> {
        let mut out: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
        for (id, n) in lock(&self.nodes).iter() {
            if !online(*id) {
                continue;
            }
            for b in n.inventory.backends.iter().filter(|b| b.healthy) {
                for m in &b.models {
                    let e = out.entry(m.name.clone()).or_default();
                    if !e.0.contains(&n.name) {
                        e.0.push(n.name.clone());
                    }
                    if m.loaded && !e.1.contains(&n.name) {
                        e.1.push(n.name.clone());
                    }
                }
            }
        }
        out
    }

    /// Take a breaker's half-open probe slot (or check it is closed) just before sending.
    pub fn begin(&self, node_id: Uuid, model: &str) -> bool {
        // One lock at a time: `candidates` takes them in another order.
        let ok = lock(&self.breakers)
            .entry((node_id, model.to_owned()))
            .or_default()
            .begin(Instant::now());
        if ok {
            *lock(&self.in_flight).entry(node_id).or_default() += 1;
        }
        ok
    }

    /// The request sent by `begin` is over.
    pub fn end(&self, node_id: Uuid, model: &str, outcome: Outcome, cfg: &AiConfig) {
        if let Some(n) = lock(&self.in_flight).get_mut(&node_id) {
            *n = n.saturating_sub(1);
        }
        let mut breakers = lock(&self.breakers);
        let b = breakers.entry((node_id, model.to_owned())).or_default();
        b.record(outcome, Instant::now(), cfg);
    }

    /// The breaker's state for a node and model (for the API and tests).
    pub fn breaker_state(&self, node_id: Uuid, model: &str) -> &'static str {
        lock(&self.breakers)
            .get(&(node_id, model.to_owned()))
            .map_or("closed", |b| b.state_name(Instant::now()))
    }

    pub fn add_usage(&self, token: &str, model: &str, node: &str, prompt: u64, completion: u64) {
        let mut usage = lock(&self.usage);
        let u = usage
            .entry((token.to_owned(), model.to_owned(), node.to_owned()))
            .or_default();
        u.requests += 1;
        u.prompt_tokens += prompt;
        u.completion_tokens += completion;
    }

    /// Usage counted since the last [`take_usage`](Self::take_usage) (not in the store yet).
    pub fn usage(&self) -> Vec<((String, String, String), Usage)> {
        lock(&self.usage)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Take the usage counted so far, to add to the store.
    pub fn take_usage(&self) -> Vec<((String, String, String), Usage)> {
        std::mem::take(&mut *lock(&self.usage))
            .into_iter()
            .collect()
    }

    /// Put back usage the store did not take (counted again with what came since).
    pub fn requeue_usage(&self, rows: Vec<((String, String, String), Usage)>) {
        let mut usage = lock(&self.usage);
        for (k, u) in rows {
            let e = usage.entry(k).or_default();
            e.requests += u.requests;
            e.prompt_tokens += u.prompt_tokens;
            e.completion_tokens += u.completion_tokens;
        }
    }

    /// Admit one request for `token` under the per-token limits; `Err(retry_after)` when over.
    pub fn admit(&self, token: &str, cfg: &AiConfig) -> Result<(), Duration> {
        let mut limits = lock(&self.limits);
        let l = limits.entry(token.to_owned()).or_default();
        let now = Instant::now();
        while l
            .window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            l.window.pop_front();
        }
        if cfg.requests_per_minute > 0 && l.window.len() >= cfg.requests_per_minute as usize {
            let oldest = l.window.front().copied().unwrap_or(now);
            return Err(Duration::from_secs(60).saturating_sub(now.duration_since(oldest)));
        }
        if cfg.max_concurrent > 0 && l.in_flight >= cfg.max_concurrent {
            return Err(Duration::from_secs(1));
        }
        l.window.push_back(now);
        l.in_flight += 1;
        Ok(())
    }

    pub fn release(&self, token: &str) {
        if let Some(l) = lock(&self.limits).get_mut(token) {
            l.in_flight = l.in_flight.saturating_sub(1);
        }
    }
}

/// Best first: [`Order::Request`] (loaded, then fewer requests in flight, then more free VRAM,
/// then by name, so that equal nodes are taken in a stable order).
fn rank(candidates: &mut [Candidate]) {
    candidates.sort_by(|a, b| Order::Request.compare(&a.standing(), &b.standing()));
}

impl Candidate {
    fn standing(&self) -> Standing<'_> {
        Standing {
            name: &self.node,
            model: ModelPresence::from_loaded(self.loaded),
            free_vram: self.free_vram,
            cpu_percent: None,
            in_flight: self.in_flight as usize,
        }
    }
}

/// What an image in a prompt counts for: vision models spend a few hundred tokens on one
/// (LLaVA 576, more at higher resolutions), whatever its size in bytes.
const IMAGE_TOKENS: usize = 768;

/// A rough token count for a request body (about four bytes a token), for the context-length
/// filter. An image sent inline (a `data:…;base64,` URL) counts as [`IMAGE_TOKENS`], not as
/// its bytes: a large photo would otherwise keep the request from every node.
pub fn estimate_tokens(body: &[u8]) -> u32 {
    const MARK: &[u8] = b";base64,";
    let mut bytes = body.len();
    let mut images = 0;
    let mut rest = body;
    while let Some(at) = rest.windows(MARK.len()).position(|w| w == MARK) {
        let data = &rest[at + MARK.len()..];
        // Base64, its `/` perhaps escaped as `\/` (as PHP's encoder writes it).
        let mut run = 0;
        while let Some(b) = data.get(run) {
            run += match (b, data.get(run + 1)) {
                (b'\\', Some(b'/')) => 2,
                (b, _) if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=') => 1,
                _ => break,
            };
        }
        bytes -= MARK.len() + run;
        images += 1;
        rest = &data[run..];
    }
    u32::try_from(bytes / 4 + images * IMAGE_TOKENS).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nebula_protocol::ai::{AiModel, BackendStatus};

    fn inv(models: &[(&str, bool, Option<u32>)]) -> AiInventory {
        AiInventory {
            backends: vec![BackendStatus {
                name: "llama".into(),
                kind: BackendKind::OpenAi,
                url: "http://127.0.0.1:8080".into(),
                source: "config".into(),
                healthy: true,
                error: None,
                models: models
                    .iter()
                    .map(|(n, loaded, ctx)| AiModel {
                        name: (*n).into(),
                        loaded: *loaded,
                        context_length: *ctx,
                        ..AiModel::default()
                    })
                    .collect(),
            }],
        }
    }

    fn ollama(models: &[&str]) -> AiInventory {
        let mut i = inv(&[]);
        i.backends[0].kind = BackendKind::Ollama;
        i.backends[0].models = models
            .iter()
            .map(|n| AiModel {
                name: (*n).into(),
                ..AiModel::default()
            })
            .collect();
        i
    }

    #[test]
    fn a_failed_pull_passes_its_node_over_for_its_cooldown_and_the_memory_is_bounded() {
        let f = AiFleet::default();
        let long = Duration::from_secs(600);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        f.set_inventory(a, "a", ollama(&[]));
        f.set_inventory(b, "b", ollama(&[]));
        let vram = |id: Uuid| if id == a { 10 } else { 5 };
        let target = |model: &str, cooldown| {
            f.pull_target(model, cooldown, |_| true, vram)
                .map(|(_, n)| n)
        };
        assert_eq!(target("gpt-4o", long).as_deref(), Some("a"));
        assert_eq!(f.recent_pull_failure("gpt-4o", long), None);
        // A failure on one node: the next node is tried; under any spelling of the name.
        f.pull_failed(a, "gpt-4o:latest", "a is down", long);
        assert_eq!(target("gpt-4o", long).as_deref(), Some("b"));
        assert_eq!(target("gpt-4o-mini", long).as_deref(), Some("a"));
        assert_eq!(
            f.recent_pull_failure("gpt-4o", long).as_deref(),
            Some("a is down")
        );
        // On every node: none is left, and the last reason is the answer.
        std::thread::sleep(Duration::from_millis(2));
        f.pull_failed(b, "gpt-4o", "no such model", long);
        assert_eq!(target("gpt-4o", long), None);
        assert_eq!(
            f.recent_pull_failure("gpt-4o", long).as_deref(),
            Some("no such model")
        );
        // Past the cooldown, forgotten.
        std::thread::sleep(Duration::from_millis(5));
        let short = Duration::from_millis(1);
        assert_eq!(target("gpt-4o", short).as_deref(), Some("a"));
        assert_eq!(f.recent_pull_failure("gpt-4o", short), None);
        // A node that reports the model (pulled by hand) is no failed pull there any more.
        f.set_inventory(b, "b", ollama(&["gpt-4o:latest"]));
        assert_eq!(
            f.recent_pull_failure("gpt-4o", long).as_deref(),
            Some("a is down")
        );
        // A client naming endless models does not grow the memory without bound, and the
        // oldest go first.
        f.pull_failed(a, "kept", "recent", long);
        std::thread::sleep(Duration::from_millis(1));
        for i in 0..FAILED_PULLS_KEPT * 3 {
            f.pull_failed(b, &format!("m{i}"), "no", long);
        }
        assert_eq!(
            lock(&f.failed_pulls)
                .values()
                .map(HashMap::len)
                .sum::<usize>(),
            FAILED_PULLS_KEPT
        );
        let last = format!("m{}", FAILED_PULLS_KEPT * 3 - 1);
        assert!(f.recent_pull_failure(&last, long).is_some());
        assert_eq!(f.recent_pull_failure("kept", long), None);
    }

    #[test]
    fn pulls_in_flight_are_capped_per_caller_and_a_claim_is_joined_by_anyone() {
        let f = AiFleet::default();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let key = |n: Uuid, m: &str| (n, m.to_owned());
        let live = |_: Uuid| true;
        assert_eq!(f.claim_pull(&key(a, "m1"), "app", 2, live), Claim::Start);
        assert_eq!(f.claim_pull(&key(b, "m1"), "app", 2, live), Claim::Start);
        // A third of its own is refused; another caller's, or joining a claimed pull, is not.
        assert_eq!(
            f.claim_pull(&key(a, "m2"), "app", 2, live),
            Claim::OverLimit(2)
        );
        assert_eq!(f.claim_pull(&key(a, "m2"), "bob", 2, live), Claim::Start);
        let job = Uuid::from_u128(99);
        f.set_pull_in_flight(key(a, "m1"), Some(job));
        assert_eq!(
            f.claim_pull(&key(a, "m1"), "carol", 1, live),
            Claim::Joined(Some(job))
        );
        assert_eq!(f.pull_job(&key(a, "m1")), Some(Some(job)));
        // A claim whose job is over (its request went away before clearing it) does not count.
        assert_eq!(
            f.claim_pull(&key(b, "m3"), "app", 2, |j| j != job),
            Claim::Start
        );
        // A pull that is over frees its slot; 0 is no limit.
        f.set_pull_in_flight(key(b, "m1"), None);
        f.set_pull_in_flight(key(b, "m3"), None);
        assert_eq!(f.claim_pull(&key(b, "m4"), "app", 2, live), Claim::Start);
        assert_eq!(
            f.claim_pull(&key(b, "m5"), "app", 2, live),
            Claim::OverLimit(2)
        );
        assert_eq!(f.claim_pull(&key(b, "m5"), "app", 0, live), Claim::Start);
    }

    #[test]
    fn loaded_beats_on_disk_then_fewer_in_flight_then_more_vram() {
        let f = AiFleet::default();
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        f.set_inventory(a, "a", inv(&[("m", false, None)]));
        f.set_inventory(b, "b", inv(&[("m:latest", true, None)]));
        f.set_inventory(c, "c", inv(&[("other", true, None)]));
        let vram = |id: Uuid| if id == a { 10 } else { 5 };
        let got = f.candidates("m", 10, |_| true, vram, false);
        assert_eq!(
            got.iter().map(|c| c.node.as_str()).collect::<Vec<_>>(),
            ["b", "a"]
        );
        // Offline nodes are out.
        let got = f.candidates("m", 10, |id| id != b, vram, false);
        assert_eq!(
            got.iter().map(|c| c.node.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        // Both loaded: the one with fewer requests in flight, then more free VRAM.
        f.set_inventory(a, "a", inv(&[("m", true, None)]));
        assert_eq!(f.candidates("m", 10, |_| true, vram, false)[0].node, "a");
        assert!(f.begin(a, "m"));
        assert_eq!(f.candidates("m", 10, |_| true, vram, false)[0].node, "b");
        f.end(a, "m", Outcome::Success, &AiConfig::default());
        assert_eq!(f.candidates("m", 10, |_| true, vram, false)[0].node, "a");
    }

    #[test]
    fn a_prompt_longer_than_the_context_is_not_sent() {
        let f = AiFleet::default();
        f.set_inventory(Uuid::from_u128(1), "small", inv(&[("m", true, Some(512))]));
        f.set_inventory(Uuid::from_u128(2), "big", inv(&[("m", true, Some(8192))]));
        let got = f.candidates("m", 2000, |_| true, |_| 0, false);
        assert_eq!(
            got.iter().map(|c| c.node.as_str()).collect::<Vec<_>>(),
            ["big"]
        );
    }

    #[test]
    fn breaker_trips_cools_down_probes_once_and_closes() {
        let cfg = AiConfig {
            breaker_failures: 2,
            breaker_cooldown: Duration::from_millis(40),
            ..AiConfig::default()
        };
        let f = AiFleet::default();
        let n = Uuid::from_u128(1);
        f.set_inventory(n, "n", inv(&[("m", true, None)]));
        for _ in 0..2 {
            assert!(f.begin(n, "m"));
            f.end(n, "m", Outcome::Failure, &cfg);
        }
        assert_eq!(f.breaker_state(n, "m"), "open");
        assert!(f.candidates("m", 1, |_| true, |_| 0, false).is_empty());
        assert!(!f.begin(n, "m"));
        std::thread::sleep(Duration::from_millis(50));
        // Half-open: one probe at a time.
        assert_eq!(f.candidates("m", 1, |_| true, |_| 0, false).len(), 1);
        assert!(f.begin(n, "m"));
        assert!(!f.begin(n, "m"));
        // The probe fails: open again, for twice as long.
        f.end(n, "m", Outcome::Timeout, &cfg);
        assert_eq!(f.breaker_state(n, "m"), "open");
        std::thread::sleep(Duration::from_millis(50));
        assert!(!f.begin(n, "m"), "the second cooldown is 80 ms");
        std::thread::sleep(Duration::from_millis(40));
        assert!(f.begin(n, "m"));
        f.end(n, "m", Outcome::Success, &cfg);
        assert_eq!(f.breaker_state(n, "m"), "closed");
        // 429 opens at once.
        assert!(f.begin(n, "m"));
        f.end(n, "m", Outcome::Overloaded, &cfg);
        assert_eq!(f.breaker_state(n, "m"), "open");
    }

    #[test]
    fn an_image_node_cooling_down_is_passed_over() {
        let f = AiFleet::default();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        for (id, name) in [(a, "a"), (b, "b")] {
            let mut i = inv(&[("sdxl.safetensors", true, None)]);
            i.backends[0].kind = BackendKind::StableDiffusion;
            f.set_inventory(id, name, i);
        }
        let nodes = |f: &AiFleet| {
            f.image_candidates(Some("sdxl"), |_| true, |_| 0)
                .iter()
                .map(|c| c.node.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(nodes(&f), ["a", "b"]);
        assert!(f.begin(a, "sdxl.safetensors"));
        f.end(
            a,
            "sdxl.safetensors",
            Outcome::Overloaded,
            &AiConfig::default(),
        );
        assert_eq!(nodes(&f), ["b"]);
    }

    #[test]
    fn limits_per_token() {
        let cfg = AiConfig {
            requests_per_minute: 2,
            max_concurrent: 1,
            ..AiConfig::default()
        };
        let f = AiFleet::default();
        assert!(f.admit("t", &cfg).is_ok());
        assert!(f.admit("t", &cfg).is_err(), "one at a time");
        f.release("t");
        assert!(f.admit("t", &cfg).is_ok());
        f.release("t");
        let wait = f.admit("t", &cfg).unwrap_err();
        assert!(wait > Duration::from_secs(50), "{wait:?}");
        assert!(f.admit("other", &cfg).is_ok());
    }

    #[test]
    fn an_inline_image_counts_as_an_image_not_as_its_bytes() {
        let text = br#"{"messages":[{"role":"user","content":"describe this"}]}"#;
        assert_eq!(estimate_tokens(text), (text.len() / 4) as u32);
        let photo = "QUJD".repeat(250_000); // 1 MB of base64
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"text","text":"what is this"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{photo}"}}}}]}}]}}"#
        );
        let n = estimate_tokens(body.as_bytes());
        let without = body.len() - photo.len() - ";base64,".len();
        assert_eq!(n as usize, without / 4 + IMAGE_TOKENS);
        assert!(n < 1_000, "{n}");
        // The same with its slashes escaped.
        let escaped = body.replace("QUJD", "QU\\/D");
        assert_eq!(estimate_tokens(escaped.as_bytes()), n);
    }
}
