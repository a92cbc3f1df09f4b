//! The gateway's settings (`[ai]` in the controller's config).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{filters, pulls};

/// The gateway's settings (`[ai]` in the controller's config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AiConfig {
    /// Time for a streamed answer's first token from a node that has the model loaded. A whole
    /// (not streamed) answer comes in one piece when it is done: it has `total_timeout`.
    #[serde(with = "humantime_serde")]
    pub first_token_timeout: Duration,
    /// Time for a streamed answer's first token when the node must load the model first.
    #[serde(with = "humantime_serde")]
    pub load_timeout: Duration,
    /// Time for a whole answer.
    #[serde(with = "humantime_serde")]
    pub total_timeout: Duration,
    /// Nodes tried for one request (the fallback provider not counted).
    pub max_attempts: u32,
    /// Failures in a row that open a node's breaker for a model (429 and 503 open it at once).
    pub breaker_failures: u32,
    /// First cooldown of an open breaker; it doubles on each failed probe, up to the maximum.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    #[serde(with = "humantime_serde")]
    pub breaker_max_cooldown: Duration,
    /// Requests per minute per API token (0: no limit).
    pub requests_per_minute: u32,
    /// Requests in flight per API token (0: no limit).
    pub max_concurrent: u32,
    /// When no node has a requested model, pull it onto the node with a healthy Ollama and the
    /// most free VRAM, and answer from there (the request waits up to `load_timeout`). `true`:
    /// any model, `false`: none, or a list of model names and glob patterns
    /// (`["llama3*", "qwen2.5:7b"]`; see [`pulls::PullModels`]). Operator and admin tokens and
    /// dashboard users pull what it allows; viewer tokens never pull.
    pub pull_on_demand: pulls::PullModels,
    /// May requests with an `ai` token (the gateway only, meant for applications) start pulls
    /// on demand, of the models `pull_on_demand` allows? Off by default: such a token could
    /// otherwise fill a node's disk with any model from any registry. Turn it on with a list in
    /// `pull_on_demand`, not `true`.
    pub pull_on_demand_ai_tokens: bool,
    /// Pulls on demand one API token (or dashboard user) has in flight at most; a request that
    /// would start one more gets 429. 0: no limit.
    pub max_pulls_per_token: u32,
    /// A node where pulling a model on demand failed (its registry does not have it, its Ollama
    /// is down) is not asked to pull that model again for this long: the next node with Ollama
    /// is, and when every one has failed, the model's requests go to the fallback, or are told
    /// why, at once. `0s`: no memory.
    #[serde(with = "humantime_serde")]
    pub failed_pull_cooldown: Duration,
    /// How often the usage counted in memory is added to the store.
    #[serde(with = "humantime_serde")]
    pub usage_flush_interval: Duration,
    /// An OpenAI-compatible provider used when no node can serve (before any byte was sent).
    pub fallback: Option<FallbackConfig>,
    /// Output filters (redact, block, warn, log per rule).
    pub filters: filters::FilterConfig,
    /// Request bodies the gateway holds at once, in bytes, all requests together (each is also
    /// capped at `MAX_BODY`); a request whose body would pass it is answered 503 at once.
    pub max_buffered_bytes: usize,
}

impl Default for AiConfig {
    fn default() -> Self {
        AiConfig {
            first_token_timeout: Duration::from_secs(30),
            load_timeout: Duration::from_secs(180),
            total_timeout: Duration::from_secs(600),
            max_attempts: 3,
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(5),
            breaker_max_cooldown: Duration::from_secs(300),
            requests_per_minute: 0,
            max_concurrent: 0,
            pull_on_demand: pulls::PullModels::Any,
            pull_on_demand_ai_tokens: false,
            max_pulls_per_token: 2,
            failed_pull_cooldown: Duration::from_secs(600),
            usage_flush_interval: Duration::from_secs(10),
            fallback: None,
            filters: filters::FilterConfig::default(),
            max_buffered_bytes: 256 << 20,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// Shown in the `x-nebula-node` header, e.g. `openai`.
    pub name: String,
    /// Base URL; requests go to `{url}/v1/chat/completions` and so on.
    pub url: String,
    /// File holding the API key (never the key itself in the config).
    pub api_key_file: Option<std::path::PathBuf>,
    /// Models it may serve (empty: any).
    #[serde(default)]
    pub models: Vec<String>,
}
