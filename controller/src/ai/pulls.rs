//! Pull on demand, the policy: which models a gateway request may have pulled onto a node, for
//! which callers. A pull is a job on a node (disk, bandwidth, a registry chosen by the model's
//! name), so it is not for anyone who can send a prompt:
//!
//! - `ai.pull_on_demand` names the models: `true` any, `false` none, or a list of names and
//!   glob patterns (`["llama3*", "qwen2.5:7b"]`).
//! - Callers who may create jobs (operator and admin tokens, dashboard users) pull what it
//!   allows. `ai` tokens (the gateway only) pull nothing unless `ai.pull_on_demand_ai_tokens`
//!   is on, and then only what it allows. Viewer tokens never pull: they cannot create a job
//!   through the API either.
//! - `ai.max_pulls_per_token` caps the pulls one caller has in flight
//!   ([`super::AiFleet::claim_pull`]).
//!
//! A refused model is answered as one no node has (404), saying that pulling it is not allowed.

use std::fmt;

use nebula_protocol::ai::model_base;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use super::AiConfig;

/// `ai.pull_on_demand`: `true` (any model), `false` (none), or the models allowed, by name or
/// glob pattern (`*`: any run of characters, `?`: one; case does not matter). A name matches
/// with and without Ollama's default `:latest` tag: `llama3` allows `llama3:latest`, not
/// `llama3:70b`. An empty list is `false`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullModels {
    Off,
    Any,
    Only(Vec<String>),
}

/// Longest pattern accepted (model names are short; a long one is a mistake).
const MAX_PATTERN: usize = 256;

impl PullModels {
    /// May `model` be pulled on demand (whoever asks)?
    pub fn allows(&self, model: &str) -> bool {
        match self {
            PullModels::Off => false,
            PullModels::Any => true,
            PullModels::Only(patterns) => {
                // `llama3` is `llama3:latest`; both spellings are tried.
                let tagged = (!model.contains(':')).then(|| format!("{model}:latest"));
                let names = [Some(model), Some(model_base(model)), tagged.as_deref()];
                patterns.iter().any(|p| {
                    names
                        .iter()
                        .flatten()
                        .any(|n| glob(p.as_bytes(), n.as_bytes()))
                })
            }
        }
    }
}

impl Serialize for PullModels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PullModels::Off => s.serialize_bool(false),
            PullModels::Any => s.serialize_bool(true),
            PullModels::Only(p) => p.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for PullModels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PullModels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false, or a list of model names and glob patterns")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<PullModels, E> {
                Ok(if b { PullModels::Any } else { PullModels::Off })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PullModels, A::Error> {
                let mut patterns = Vec::new();
                while let Some(p) = seq.next_element::<String>()? {
                    if p.is_empty() || p.len() > MAX_PATTERN || p.contains(char::is_whitespace) {
                        return Err(de::Error::custom(format!(
                            "`{p}` is not a model name or pattern (1-{MAX_PATTERN} characters, no spaces)"
                        )));
                    }
                    patterns.push(p);
                }
                Ok(if patterns.is_empty() {
                    PullModels::Off
                } else {
                    PullModels::Only(patterns)
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// What a caller of the gateway may have it start, from its API token's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// An `ai` token: the gateway only. Pulls on demand with `pull_on_demand_ai_tokens` only.
    AiToken,
    /// A viewer token: may not create jobs, so never pulls.
    ReadOnly,
    /// An operator or admin token, or a dashboard user allowed to chat: may create jobs.
    Operator,
}

impl Scope {
    /// The scope of an API token with this stored role (unknown roles are read-only).
    pub fn of_role(role: &str) -> Scope {
        if role == crate::authz::AI_ROLE {
            Scope::AiToken
        } else if crate::authz::Role::parse(role) >= crate::authz::Role::Operator {
            Scope::Operator
        } else {
            Scope::ReadOnly
        }
    }
}

/// Why a model is not pulled on demand for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `pull_on_demand = false`: there is no such tier (the usual 404).
    Off,
    /// The model is not among those `pull_on_demand` lists.
    Model,
    /// The model is, but this caller may not start pulls.
    Caller(Scope),
}

impl Refused {
    /// What the 404 adds after "no online node serves model `…`"; `None`: nothing.
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Refused::Off => None,
            Refused::Model => Some(
                "pull on demand is not allowed for this model (ai.pull_on_demand does not list it)",
            ),
            Refused::Caller(Scope::AiToken) => Some(
                "pull on demand is not allowed for this model with an `ai` token (ai.pull_on_demand_ai_tokens is off)",
            ),
            Refused::Caller(_) => Some(
                "pull on demand is not allowed for this model with a viewer token (it takes an operator's)",
            ),
        }
    }
}

/// May a caller of `scope` have `model` pulled on demand?
pub fn may_pull(cfg: &AiConfig, scope: Scope, model: &str) -> Result<(), Refused> {
    if cfg.pull_on_demand == PullModels::Off {
        return Err(Refused::Off);
    }
    if !cfg.pull_on_demand.allows(model) {
        return Err(Refused::Model);
    }
    match scope {
        Scope::Operator => Ok(()),
        Scope::AiToken if cfg.pull_on_demand_ai_tokens => Ok(()),
        Scope::AiToken | Scope::ReadOnly => Err(Refused::Caller(scope)),
    }
}

/// Does `text` match the glob `pattern` (`*` any run, `?` one byte, ASCII case ignored)?
/// It backtracks to the last `*` only: at most pattern × text steps, whatever the pattern.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it is now taken to end at.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c.eq_ignore_ascii_case(&text[t]) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    star = Some((sp, st + 1));
                    p = sp + 1;
                    t = st + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Serialize)]
    struct Doc {
        pull_on_demand: PullModels,
    }

    fn parse(toml_text: &str) -> Result<PullModels, String> {
        toml::from_str::<Doc>(toml_text)
            .map(|d| d.pull_on_demand)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn glob_matches_stars_and_marks_and_ignores_case() {
        assert!(glob(b"llama3*", b"llama3"));
        assert!(glob(b"llama3*", b"llama3.1:8b"));
        assert!(glob(b"*:7b", b"qwen2.5:7b"));
        assert!(glob(b"q?en*7b", b"QWEN2.5:7B"));
        assert!(glob(b"*", b""));
        assert!(glob(b"a*b*c", b"axxbyyc"));
        assert!(!glob(b"a*b*c", b"axxbyy"));
        assert!(!glob(b"llama3", b"llama3.1"));
        assert!(!glob(b"llama3*", b"codellama3"));
        assert!(!glob(b"?", b""));
        // Many stars on a long text that does not match: still quick (no exponential search).
        let text = "a".repeat(4096);
        assert!(!glob(b"*a*a*a*a*a*a*a*a*b", text.as_bytes()));
    }

    #[test]
    fn a_list_allows_its_models_with_and_without_the_default_tag() {
        let m = PullModels::Only(vec!["llama3".into(), "qwen2.5:7b".into(), "phi3*".into()]);
        assert!(m.allows("llama3"));
        assert!(m.allows("llama3:latest"));
        assert!(!m.allows("llama3:70b"));
        assert!(m.allows("qwen2.5:7b"));
        assert!(!m.allows("qwen2.5:72b"));
        assert!(!m.allows("qwen2.5"));
        assert!(m.allows("phi3:mini"));
        assert!(!m.allows("mistral"));
        let tagged = PullModels::Only(vec!["*:latest".into()]);
        assert!(tagged.allows("mistral"));
        assert!(!tagged.allows("mistral:7b"));
        assert!(PullModels::Any.allows("anything/at:all"));
        assert!(!PullModels::Off.allows("llama3"));
    }

    #[test]
    fn the_setting_reads_a_boolean_or_a_list_and_writes_it_back() {
        assert_eq!(parse("pull_on_demand = true"), Ok(PullModels::Any));
        assert_eq!(parse("pull_on_demand = false"), Ok(PullModels::Off));
        assert_eq!(parse("pull_on_demand = []"), Ok(PullModels::Off));
        let list = parse(r#"pull_on_demand = ["llama3*", "qwen2.5:7b"]"#).unwrap();
        assert_eq!(
            list,
            PullModels::Only(vec!["llama3*".into(), "qwen2.5:7b".into()])
        );
        for bad in [
            r#"pull_on_demand = "llama3""#,
            r#"pull_on_demand = [""]"#,
            r#"pull_on_demand = ["two words"]"#,
            "pull_on_demand = 1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let again = toml::to_string(&Doc {
            pull_on_demand: list.clone(),
        })
        .unwrap();
        assert_eq!(parse(&again), Ok(list));
        assert_eq!(
            serde_json::to_value(PullModels::Any).unwrap(),
            serde_json::json!(true)
        );
    }

    #[test]
    fn ai_tokens_pull_only_when_allowed_and_viewers_never() {
        let mut cfg = AiConfig {
            pull_on_demand: PullModels::Only(vec!["llama3*".into()]),
            ..AiConfig::default()
        };
        assert!(!cfg.pull_on_demand_ai_tokens, "off by default");
        assert_eq!(may_pull(&cfg, Scope::Operator, "llama3:8b"), Ok(()));
        assert_eq!(
            may_pull(&cfg, Scope::Operator, "mistral"),
            Err(Refused::Model)
        );
        assert_eq!(
            may_pull(&cfg, Scope::AiToken, "llama3:8b"),
            Err(Refused::Caller(Scope::AiToken))
        );
        assert_eq!(
            may_pull(&cfg, Scope::ReadOnly, "llama3:8b"),
            Err(Refused::Caller(Scope::ReadOnly))
        );
        cfg.pull_on_demand_ai_tokens = true;
        assert_eq!(may_pull(&cfg, Scope::AiToken, "llama3:8b"), Ok(()));
        assert_eq!(
            may_pull(&cfg, Scope::AiToken, "mistral"),
            Err(Refused::Model)
        );
        assert_eq!(
            may_pull(&cfg, Scope::ReadOnly, "llama3:8b"),
            Err(Refused::Caller(Scope::ReadOnly))
        );
        cfg.pull_on_demand = PullModels::Off;
        assert_eq!(may_pull(&cfg, Scope::Operator, "llama3"), Err(Refused::Off));
        assert_eq!(Refused::Off.reason(), None);
        assert!(Refused::Model
            .reason()
            .is_some_and(|r| r.contains("not allowed")));
    }

    #[test]
    fn roles_map_to_scopes() {
        assert_eq!(Scope::of_role("ai"), Scope::AiToken);
        assert_eq!(Scope::of_role("viewer"), Scope::ReadOnly);
        assert_eq!(Scope::of_role("something-new"), Scope::ReadOnly);
        assert_eq!(Scope::of_role("operator"), Scope::Operator);
        assert_eq!(Scope::of_role("admin"), Scope::Operator);
    }
}
