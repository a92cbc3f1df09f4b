//! Inline `env` values that look like secrets (the output-filter rules for API keys and card
//! numbers): every plan warns about them, pointing to `nebula secret set`, and a map that is
//! applied is stored with each such value replaced by a reference, the value itself kept in
//! the secret store as `map.SERVICE.VAR` (a new version only when it changed). So the stored
//! map, its history and whatever reads them hold no such value, and the deploy gets it like
//! any other secret.

use std::sync::OnceLock;

use nebula_ai_filters::{Action, FilterConfig, Filters};
use nebula_desired::map::secrets::{self as refs, Piece, SecretRef};
use nebula_desired::map::{Problem, ServiceMap};

use crate::authz::OpCtx;
use crate::secrets::SecretValue;
use crate::{ControlPlane, OpError};

/// An inline value a rule flagged.
struct Flagged {
    service: String,
    var: String,
    rule: &'static str,
    line: u64,
    column: u64,
    /// Where the value is written (a value without references only: one that mixes text and
    /// references is only warned about).
    span: Option<(usize, usize)>,
    value: String,
}

fn filters() -> &'static Filters {
    static FILTERS: OnceLock<Filters> = OnceLock::new();
    FILTERS.get_or_init(|| {
        Filters::new(FilterConfig {
            api_keys: Action::Log,
            card: Action::Log,
            ..FilterConfig::off()
        })
        .expect("the built-in rules compile")
    })
}

fn flagged(map: &ServiceMap) -> Vec<Flagged> {
    let mut out = Vec::new();
    for (service, svc) in &map.services {
        for (var, v) in &svc.env {
            let Ok(pieces) = refs::pieces(&v.value.0) else {
                continue;
            };
            let texts: Vec<&str> = pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Text(t) => Some(*t),
                    Piece::Ref(_) => None,
                })
                .collect();
            let only_text = texts.len() == pieces.len();
            let (_, hits) = filters().apply(&texts.join(" "));
            if let Some(hit) = hits.first() {
                out.push(Flagged {
                    service: service.clone(),
                    var: var.clone(),
                    rule: hit.rule,
                    line: v.line,
                    column: v.column,
                    span: v.span.filter(|_| only_text),
                    value: v.value.0.clone(),
                });
            }
        }
    }
    out
}

/// The secret a flagged value is kept as, when its names make a valid secret name.
fn stored_name(service: &str, var: &str) -> Option<String> {
    let name = format!("map.{service}.{var}");
    refs::valid_secret_name(&name).then_some(name)
}

fn warning(f: &Flagged, kept: Option<&str>) -> Problem {
    let told = format!(
        "service `{}`: env `{}` looks like a secret ({}); keep it out of the map: \
         `nebula secret set NAME` and write `${{secret:NAME}}`",
        f.service, f.var, f.rule
    );
    Problem {
        line: f.line,
        column: f.column,
        message: match kept {
            Some(name) => format!(
                "{told} (the stored map holds `${{secret:{name}}}`, its value is in the secret store)"
            ),
            None => told,
        },
    }
}

/// The warnings a proposed map gets (nothing is stored).
pub(crate) fn preview_warnings(document: &str) -> Vec<Problem> {
    let Ok(map) = nebula_desired::map::parse(document) else {
        return Vec::new();
    };
    flagged(&map).iter().map(|f| warning(f, None)).collect()
}

impl ControlPlane {
    /// Keep flagged inline values of a valid map in the secret store: the document to store
    /// (each such value replaced by its reference) and a warning per flagged value.
    pub(crate) async fn keep_inline_secrets(
        &self,
        cx: &OpCtx,
        document: &str,
    ) -> Result<(String, Vec<Problem>), OpError> {
        let Ok(map) = nebula_desired::map::parse(document) else {
            return Ok((document.to_owned(), Vec::new()));
        };
        let mut spans = Vec::new();
        let mut warnings = Vec::new();
        for f in flagged(&map) {
            let name = stored_name(&f.service, &f.var);
            let (Some(name), Some((at, len))) = (name, f.span) else {
                warnings.push(warning(&f, None));
                continue;
            };
            let value = SecretValue::new(f.value.clone());
            let same = match self.reveal_secret(&name, None).await {
                Ok((_, current)) => current == value,
                Err(OpError::NotFound(_)) => false,
                Err(e) => return Err(e),
            };
            if !same {
                self.store_secret_checked(cx, &name, &value).await?;
            }
            spans.push((
                at,
                len,
                refs::reference(&SecretRef {
                    name: name.clone(),
                    version: None,
                }),
            ));
            warnings.push(warning(&f, Some(&name)));
        }
        Ok((refs::replace_spans(document, spans), warnings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_shaped_values_are_flagged_and_ordinary_ones_are_not() {
        let doc = "services:\n  web:\n    image: web:1\n    env:\n      MODE: production\n      WORKERS: 4\n      OPENAI_API_KEY: sk-proj-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c\n      MIXED: \"Bearer ghp_1234567890abcdefghijABCDEFGHIJ123456 ${secret:x}\"\n      REF: ${secret:db_pw}\n";
        let map = nebula_desired::map::parse(doc).unwrap();
        let found = flagged(&map);
        let vars: Vec<&str> = found.iter().map(|f| f.var.as_str()).collect();
        assert_eq!(vars, ["MIXED", "OPENAI_API_KEY"]);
        assert!(
            found[0].span.is_none(),
            "a mixed value is only warned about"
        );
        let key = &found[1];
        assert_eq!(key.rule, "api_key");
        let (at, len) = key.span.expect("a plain value has its place");
        assert_eq!(
            &doc[at..at + len],
            "sk-proj-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"
        );
        assert_eq!(
            stored_name("web", "OPENAI_API_KEY").as_deref(),
            Some("map.web.OPENAI_API_KEY")
        );
        assert_eq!(stored_name("web", "A B"), None);
        let w = warning(key, Some("map.web.OPENAI_API_KEY"));
        assert!(w.message.contains("nebula secret set"), "{}", w.message);
        assert!(!w.message.contains("sk-proj"), "{}", w.message);
    }
}
