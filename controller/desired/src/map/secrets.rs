//! Secret references in the service map.
//!
//! `${secret:NAME}` (the latest version) or `${secret:NAME@3}` may appear anywhere in an `env`
//! value or a command argument; `secrets:` asks for secrets as files in the container. The map
//! and everything made from it (revisions, plans, stored jobs) hold only references: [`pin`]
//! turns each `${secret:NAME}` into `${secret:NAME@V}` with the version in force, so that a new
//! version is a new revision (a rolling update whose plan names the variable that changed), and
//! the controller puts the values in only on the deploy job's stream to the node.

use std::collections::BTreeMap;

use nebula_protocol::deploy::SecretFile;
use schemars::JsonSchema;
use serde::Deserialize;

use super::{Loc, Problem, ServiceMap};
use crate::plan::{Desired, RevisionSpec};

/// What opens a reference.
pub const OPEN: &str = "${secret:";
/// Longest secret name.
pub const MAX_NAME: usize = 128;
/// Where a file goes when `target` is not given: `/run/secrets/NAME`.
pub const DEFAULT_DIR: &str = "/run/secrets";
/// Mode of a file when `mode` is not given: readable by every user of the container, as
/// Docker's own secrets are (the process in it may not run as root).
pub const DEFAULT_MODE: u32 = 0o444;

/// A secret's name: a letter or `_`, then letters, digits, `_`, `.` or `-`; at most 128.
pub fn valid_secret_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.len() <= MAX_NAME
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `NAME` or `NAME@VERSION`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretRef {
    pub name: String,
    pub version: Option<u32>,
}

impl SecretRef {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, version) = match text.split_once('@') {
            Some((n, v)) => match v.parse::<u32>() {
                Ok(num) if num > 0 && v.bytes().all(|b| b.is_ascii_digit()) => (n, Some(num)),
                _ => return Err(format!("`{text}`: a version is a number from 1")),
            },
            None => (text, None),
        };
        if !valid_secret_name(name) {
            return Err(format!(
                "`{name}` is not a secret name (a letter or _, then letters, digits, _ . -; at most {MAX_NAME})"
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            version,
        })
    }
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.version {
            Some(v) => write!(f, "{}@{v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A piece of a value: text as written, or a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    Text(&'a str),
    Ref(SecretRef),
}

/// Split a value into text and references; a reference that does not close or names no valid
/// secret is an error.
pub fn pieces(value: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = value;
    while let Some(at) = rest.find(OPEN) {
        if at > 0 {
            out.push(Piece::Text(&rest[..at]));
        }
        let inner = &rest[at + OPEN.len()..];
        let Some(end) = inner.find('}') else {
            return Err(format!("`{OPEN}` without its closing `}}`"));
        };
        out.push(Piece::Ref(SecretRef::parse(&inner[..end])?));
        rest = &inner[end + 1..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
}

/// Whether a value holds any reference (cheap; no checking).
pub fn has_reference(value: &str) -> bool {
    value.contains(OPEN)
}

/// The value with each reference replaced by what `f` makes of it.
pub fn rewrite<E>(
    value: &str,
    mut f: impl FnMut(&SecretRef) -> Result<String, E>,
    bad: impl FnOnce(String) -> E,
) -> Result<String, E> {
    if !has_reference(value) {
        return Ok(value.to_owned());
    }
    let mut out = String::with_capacity(value.len());
    for p in pieces(value).map_err(bad)? {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Ref(r) => out.push_str(&f(&r)?),
        }
    }
    Ok(out)
}

/// A reference as written in a value.
pub fn reference(r: &SecretRef) -> String {
    format!("{OPEN}{r}}}")
}

/// What someone who may not see inline values sees of one: its references, and `***` for
/// any text around them.
pub fn redact_inline(value: &str) -> String {
    match pieces(value) {
        Ok(ps) => ps
            .iter()
            .map(|p| match p {
                Piece::Text(_) => "***".to_owned(),
                Piece::Ref(r) => reference(r),
            })
            .collect(),
        Err(_) => "***".to_owned(),
    }
}

/// A secret written into the container as a file.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretFileDecl {
    /// The secret, `NAME` (the latest version) or `NAME@3`.
    pub name: String,
    /// An absolute path in the container (default `/run/secrets/NAME`).
    #[serde(default)]
    pub target: Option<String>,
    /// Permission bits as a string of octal digits (default `"0444"`).
    #[serde(default)]
    pub mode: Option<String>,
}

impl SecretFileDecl {
    /// The file it asks for (the secret unpinned when written so).
    pub fn resolve(&self) -> Result<SecretFile, String> {
        let r = SecretRef::parse(&self.name)?;
        let target = self
            .target
            .clone()
            .unwrap_or_else(|| format!("{DEFAULT_DIR}/{}", r.name));
        let ok = target.len() > 1
            && target.len() <= 1024
            && target.starts_with('/')
            && !target.contains('\0')
            && target[1..]
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != "..");
        if !ok {
            return Err(format!(
                "`{target}` is not an absolute file path (no `.`, `..` or empty parts)"
            ));
        }
        let mode = match &self.mode {
            None => DEFAULT_MODE,
            Some(m) => match u32::from_str_radix(m, 8) {
                Ok(v) if v <= 0o777 && !m.is_empty() => v,
                _ => return Err(format!("`{m}` is not a mode: octal digits like \"0440\"")),
            },
        };
        Ok(SecretFile {
            target,
            secret: r.to_string(),
            mode,
        })
    }
}

/// `secrets:` of one service: each a secret and a distinct absolute target, sorted by target;
/// the problems with where they were written.
pub(super) fn files_of(
    service: &str,
    decls: &[Loc<SecretFileDecl>],
) -> (Vec<SecretFile>, Vec<Problem>) {
    let mut out: Vec<SecretFile> = Vec::new();
    let mut problems = Vec::new();
    for decl in decls {
        let problem = |message: String| Problem {
            line: decl.line,
            column: decl.column,
            message: format!("service `{service}`: secrets: {message}"),
        };
        match decl.resolve() {
            Ok(f) if out.iter().any(|o| o.target == f.target) => {
                problems.push(problem(format!("two secrets go to `{}`", f.target)))
            }
            Ok(f) => out.push(f),
            Err(e) => problems.push(problem(e)),
        }
    }
    out.sort();
    (out, problems)
}

/// `desired` with every reference pinned to a version of `latest` (the newest version of each
/// secret in the store), each service's revision made again. A service that names a secret or
/// version the store does not have keeps its references as written, and a problem says so.
pub fn pin(desired: &Desired, latest: &BTreeMap<String, u32>) -> (Desired, Vec<String>) {
    let mut out = desired.clone();
    let mut problems = Vec::new();
    for (name, svc) in out.services.iter_mut() {
        let uses = svc.spec.env.iter().any(|(_, v)| has_reference(v))
            || svc.spec.command.iter().flatten().any(|a| has_reference(a))
            || desired.files.contains_key(name);
        if !uses {
            // Nothing to pin: spec and revision stay as they are.
            continue;
        }
        let mut missing: Vec<String> = Vec::new();
        let mut pin_ref = |r: &SecretRef| -> Result<SecretRef, ()> {
            match (latest.get(&r.name), r.version) {
                (None, _) => {
                    missing.push(format!(
                        "secret `{}` is not in the store (set it with `nebula secret set {}`)",
                        r.name, r.name
                    ));
                    Err(())
                }
                (Some(&l), Some(v)) if v > l => {
                    missing.push(format!(
                        "secret `{}` has no version {v} (the latest is {l})",
                        r.name
                    ));
                    Err(())
                }
                (Some(&l), v) => Ok(SecretRef {
                    name: r.name.clone(),
                    version: Some(v.unwrap_or(l)),
                }),
            }
        };
        let mut spec = svc.spec.clone();
        for (_, v) in spec.env.iter_mut() {
            if let Ok(p) = rewrite(v, |r| pin_ref(r).map(|p| reference(&p)), |_| ()) {
                *v = p;
            }
        }
        for a in spec.command.iter_mut().flatten() {
            if let Ok(p) = rewrite(a, |r| pin_ref(r).map(|p| reference(&p)), |_| ()) {
                *a = p;
            }
        }
        let mut files = out.files.get(name).cloned().unwrap_or_default();
        for f in files.iter_mut() {
            if let Ok(p) = SecretRef::parse(&f.secret)
                .map_err(|_| ())
                .and_then(|r| pin_ref(&r))
            {
                f.secret = p.to_string();
            }
        }
        if !missing.is_empty() {
            missing.dedup();
            problems.push(format!("service `{name}`: {}", missing.join("; ")));
            continue;
        }
        let host_access = desired.host_access(name).clone();
        svc.revision = super::revision_of(&RevisionSpec {
            container: spec.clone(),
            host_access,
            files: files.clone(),
        });
        svc.spec = spec;
        if !files.is_empty() {
            out.files.insert(name.clone(), files);
        }
    }
    (out, problems)
}

/// Byte ranges of inline `env` values in the document (values that are not references only),
/// with what a viewer sees in their place.
pub fn inline_env_spans(map: &ServiceMap) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    for svc in map.services.values() {
        for v in svc.env.values() {
            let redacted = redact_inline(&v.value.0);
            if redacted == v.value.0 {
                continue;
            }
            if let Some((at, len)) = v.span {
                out.push((at, len, redacted));
            }
        }
    }
    out
}

/// `text` with each byte range replaced by a double-quoted YAML string of its new value.
/// Ranges that overlap, run past the end or cut a character are left alone.
pub fn replace_spans(text: &str, mut spans: Vec<(usize, usize, String)>) -> String {
    spans.sort_by_key(|(at, _, _)| *at);
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    for (at, len, value) in spans {
        let end = at.saturating_add(len);
        if at < done
            || end > text.len()
            || !text.is_char_boundary(at)
            || !text.is_char_boundary(end)
        {
            continue;
        }
        out.push_str(&text[done..at]);
        out.push_str(&serde_json::to_string(&value).expect("a string serializes"));
        done = end;
    }
    out.push_str(&text[done..]);
    out
}

/// The document as a viewer sees it: inline `env` values replaced by `***` (references stay).
/// Checked by parsing the result: when any value is not what a viewer may see (written
/// through a YAML alias or merge, say, so its place is not its own), nothing is shown.
pub fn redact_document(text: &str) -> Option<String> {
    let map = super::parse(text).ok()?;
    let out = replace_spans(text, inline_env_spans(&map));
    let seen = super::parse(&out).ok()?;
    let every_value = |m: &ServiceMap| -> Vec<(String, String, String)> {
        m.services
            .iter()
            .flat_map(|(s, svc)| {
                svc.env
                    .iter()
                    .map(move |(k, v)| (s.clone(), k.clone(), v.value.0.clone()))
            })
            .collect()
    };
    let wanted: Vec<(String, String, String)> = every_value(&map)
        .into_iter()
        .map(|(s, k, v)| (s, k, redact_inline(&v)))
        .collect();
    (every_value(&seen) == wanted).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_found_checked_and_rewritten() {
        let ps = pieces("postgres://app:${secret:db_pw@3}@db/${secret:db_name}").unwrap();
        assert_eq!(
            ps,
            vec![
                Piece::Text("postgres://app:"),
                Piece::Ref(SecretRef {
                    name: "db_pw".into(),
                    version: Some(3)
                }),
                Piece::Text("@db/"),
                Piece::Ref(SecretRef {
                    name: "db_name".into(),
                    version: None
                }),
            ]
        );
        assert!(pieces("${secret:db_pw").is_err());
        assert!(pieces("${secret:9lives}").is_err());
        assert!(pieces("${secret:x@0}").is_err());
        assert!(pieces("${secret:x@-1}").is_err());
        assert!(pieces("${secret:}").is_err());
        let out = rewrite(
            "a${secret:x}b",
            |r| Ok::<_, String>(format!("[{r}]")),
            |e| e,
        )
        .unwrap();
        assert_eq!(out, "a[x]b");
        assert_eq!(redact_inline("plain"), "***");
        assert_eq!(redact_inline("u:${secret:pw@2}"), "***${secret:pw@2}");
        assert_eq!(redact_inline("${secret:pw}"), "${secret:pw}");
    }

    #[test]
    fn files_default_to_run_secrets_and_refuse_odd_paths_and_modes() {
        let decl = |target: Option<&str>, mode: Option<&str>| SecretFileDecl {
            name: "db_pw@2".into(),
            target: target.map(Into::into),
            mode: mode.map(Into::into),
        };
        let f = decl(None, None).resolve().unwrap();
        assert_eq!(f.target, "/run/secrets/db_pw");
        assert_eq!(f.secret, "db_pw@2");
        assert_eq!(f.mode, 0o444);
        assert_eq!(
            decl(Some("/etc/app/key"), Some("0400"))
                .resolve()
                .unwrap()
                .mode,
            0o400
        );
        for bad in ["relative", "/a/../b", "/", "/a//b"] {
            assert!(decl(Some(bad), None).resolve().is_err(), "{bad}");
        }
        assert!(decl(None, Some("0999")).resolve().is_err());
        assert!(decl(None, Some("17777")).resolve().is_err());
    }

    #[test]
    fn a_new_secret_version_is_a_new_revision_and_the_plan_says_which_variable() {
        use crate::plan::{plan, Action, Observed, ObservedContainer, ObservedNode};
        let doc = "services:\n  app:\n    image: app:1\n    env:\n      PW: ${secret:pw}\n      MODE: prod\n    secrets:\n      - name: tls@1\n";
        let raw = super::super::check(doc, &Default::default())
            .unwrap()
            .desired;
        let v1 = BTreeMap::from([("pw".to_owned(), 1), ("tls".to_owned(), 3)]);
        let (one, problems) = pin(&raw, &v1);
        assert!(problems.is_empty(), "{problems:?}");
        let svc = &one.services["app"];
        assert!(svc
            .spec
            .env
            .contains(&("PW".into(), "${secret:pw@1}".into())));
        assert_eq!(one.files["app"][0].secret, "tls@1", "a pinned file stays");
        assert_eq!(pin(&raw, &v1).0.services["app"].revision, svc.revision);
        let v2 = BTreeMap::from([("pw".to_owned(), 2), ("tls".to_owned(), 3)]);
        let (two, _) = pin(&raw, &v2);
        assert_ne!(two.services["app"].revision, svc.revision);
        // Running revision 1, planned with version 2: an update naming the variable.
        let node = ObservedNode {
            id: uuid::Uuid::from_u128(1),
            name: "box".into(),
            labels: Default::default(),
            online: true,
            gpus: 0,
            max_free_vram_mb: 0,
            containers: vec![ObservedContainer {
                name: "app-1-x".into(),
                service: "app".into(),
                revision: svc.revision.clone(),
                running: true,
            }],
            docker: true,
            known: true,
        };
        let observed = Observed {
            nodes: vec![node],
            revisions: BTreeMap::from([(svc.revision.clone(), one.revision_spec("app").unwrap())]),
            ..Default::default()
        };
        assert!(
            plan(&one, &observed).actions.is_empty(),
            "converged at version 1"
        );
        match plan(&two, &observed).actions.as_slice() {
            [Action::Update { changes, .. }] => {
                assert_eq!(changes.len(), 1, "{changes:?}");
                assert_eq!(changes[0].field, "env.PW");
                assert_eq!(changes[0].from, Some("${secret:pw@1}".into()));
                assert_eq!(changes[0].to, Some("${secret:pw@2}".into()));
            }
            other => panic!("{other:?}"),
        }
        let (_, problems) = pin(
            &raw,
            &BTreeMap::from([("pw".to_owned(), 1), ("tls".to_owned(), 0)]),
        );
        assert!(
            problems[0].contains("secret `tls` has no version 1 (the latest is 0)"),
            "{problems:?}"
        );
        // A secret the store lacks: said, references kept.
        let (kept, problems) = pin(&raw, &BTreeMap::from([("pw".to_owned(), 1)]));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("service `app`: secret `tls` is not in the store"),
            "{problems:?}"
        );
        assert!(kept.services["app"]
            .spec
            .env
            .contains(&("PW".into(), "${secret:pw}".into())));
    }

    #[test]
    fn a_viewer_sees_references_but_not_inline_values_and_the_yaml_still_parses() {
        let doc = "services:\n  web:\n    image: web:1\n    env:\n      MODE: \"prod\"\n      TOKEN: tok-123 # inline\n      DB: postgres://app:${secret:db_pw}@db\n      PW: ${secret:db_pw@2}\n      N: 4\n    command: [serve]\n  api:\n    image: api:1\n    env: { KEY: abc, REF: \"${secret:k}\" }\n";
        let shown = redact_document(doc).unwrap();
        for hidden in ["prod", "tok-123", "postgres://app:", "abc"] {
            assert!(!shown.contains(hidden), "{hidden} in {shown}");
        }
        assert!(shown.contains("${secret:db_pw@2}"), "{shown}");
        assert!(shown.contains("\"***${secret:db_pw}***\""), "{shown}");
        assert!(shown.contains("# inline"), "comments stay: {shown}");
        let map = super::super::parse(&shown).expect("the redacted map parses");
        assert_eq!(map.services["web"].env["MODE"].value.0, "***");
        assert_eq!(map.services["web"].env["N"].value.0, "***");
        assert_eq!(map.services["api"].env["REF"].value.0, "${secret:k}");
        assert_eq!(map.services["api"].env["KEY"].value.0, "***");
        // A value written through an alias has no place of its own: nothing is shown rather
        // than something unredacted.
        let aliased = "services:\n  web:\n    image: web:1\n    env: &shared\n      TOKEN: tok-123\n  api:\n    image: api:1\n    env: *shared\n";
        super::super::parse(aliased).expect("aliases are valid YAML");
        let shown = redact_document(aliased);
        assert!(
            shown.as_deref().is_none_or(|s| !s.contains("tok-123")),
            "{shown:?}"
        );
    }
}
