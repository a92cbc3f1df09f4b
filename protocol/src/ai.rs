//! Local AI on the fleet (1.4): what each agent's inference backends hold
//! ([`crate::AgentMessage::AiInventory`]) and inference requests carried to an agent on a stream
//! of their own ([`crate::jobs::JobControl::Infer`]), answered with [`InferEvent`]s as the backend
//! produces bytes.
//!
//! Inference does not go through the job table: a request is short, is not retried by the agent
//! and must add well under a millisecond. The agent proxies the body to the named backend's
//! OpenAI-compatible endpoint and streams the response body back unchanged; the controller's
//! gateway routes, retries, filters and accounts.

use serde::{Deserialize, Serialize};

/// The kinds of inference servers an agent knows how to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BackendKind {
    /// Ollama (`/api/tags`, `/api/ps`, `/api/pull`; OpenAI-compatible routes under `/v1`).
    Ollama,
    /// An OpenAI-compatible server: llama.cpp's server, vLLM, LM Studio.
    OpenAi,
    /// Stable Diffusion WebUI (`/sdapi/v1/...`): images.
    StableDiffusion,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Ollama => "ollama",
            BackendKind::OpenAi => "openai",
            BackendKind::StableDiffusion => "sd-webui",
        }
    }
}

/// Everything an agent's backends hold; sent at session start and whenever it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AiInventory {
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// The backend's name on this node (from the config, or the kind and port when discovered).
    pub name: String,
    pub kind: BackendKind,
    pub url: String,
    /// How it was found: `config`; `local:PORT` (a usual port on this host), with the
    /// listener's owner when the agent can see it, `local:11434 (uid 1000 alice, pid 1234
    /// ollama)` (older agents send `local`); or `tailscale:PEER`. Free text for people:
    /// nothing routes on it.
    pub source: String,
    pub healthy: bool,
    /// Why it is not healthy.
    pub error: Option<String>,
    pub models: Vec<AiModel>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AiModel {
    pub name: String,
    pub digest: Option<String>,
    pub size_bytes: u64,
    /// Memory the loaded model takes on the GPU.
    pub vram_bytes: Option<u64>,
    pub context_length: Option<u32>,
    /// Loaded (ready to answer without a load).
    pub loaded: bool,
}

/// One inference request for one backend on the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferRequest {
    /// The backend's name in the agent's inventory.
    pub backend: String,
    /// The backend's path, e.g. `/v1/chat/completions`.
    pub path: String,
    /// The JSON body, as the backend should receive it. (Bytes encode as one run, the same
    /// bytes on the wire as a sequence of `u8`.)
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Time for the backend to answer with its first bytes (a model load included).
    pub first_byte_timeout_ms: u32,
    /// Time for the whole answer.
    pub total_timeout_ms: u32,
}

/// What the agent sends back on an inference stream: one `Head`, any number of `Chunk`s, then
/// `End` or `Error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InferEvent {
    Head {
        status: u16,
        content_type: String,
    },
    /// Response body bytes as the backend sent them.
    Chunk(#[serde(with = "serde_bytes")] Vec<u8>),
    End,
    Error {
        message: String,
        timeout: bool,
    },
}

/// A model job: what to do, on which backend (default: the first that can).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub backend: Option<String>,
    pub action: ModelAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelAction {
    /// Ollama: `/api/pull`, streamed; progress over all layers.
    Pull {
        name: String,
    },
    /// A model file for a file-based backend (llama.cpp): downloaded from `url` into the agent's
    /// models directory as `file`, resumed when a part is there, checked against `sha256`.
    Download {
        url: String,
        file: String,
        sha256: Option<String>,
    },
    Delete {
        name: String,
    },
    List,
}

impl crate::Message for InferEvent {
    const NAME: &'static str = "InferEvent";
    const VARIANTS: Option<u32> = Some(4);
}

/// Model names match with and without Ollama's default `:latest` tag.
pub fn same_model(a: &str, b: &str) -> bool {
    model_base(a) == model_base(b)
}

/// A model's name without the default tag (`llama3:latest` is `llama3`): one spelling per
/// model, for keys.
pub fn model_base(name: &str) -> &str {
    name.strip_suffix(":latest").unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_is_the_default_tag() {
        assert!(same_model("llama3", "llama3:latest"));
        assert!(same_model("llama3:latest", "llama3:latest"));
        assert!(!same_model("llama3:8b", "llama3"));
        assert_eq!(model_base("llama3:latest"), model_base("llama3"));
    }
}
