//! Secrets in deploys: values are put in at one place, [`ControlPlane::expand_secrets`], on the deploy job's
//! stream to the node that runs the container. What comes back on that stream (log lines, the
//! result) has the values replaced by their references before it is kept anywhere.

use std::collections::BTreeMap;

use nebula_desired::map::secrets::{self as refs, SecretRef};
use nebula_protocol::deploy::{ContainerSpec, SecretBytes};
use nebula_protocol::jobs::JobSpec;
use serde_json::Value;

use crate::ControlPlane;

/// Values shorter than this are not searched for in what comes back (they would match
/// ordinary text).
const MIN_REDACTED: usize = 4;

/// The values a job's request carried, each with the reference it replaced.
#[derive(Default)]
pub(crate) struct Redactions(Vec<(String, String)>);

impl std::fmt::Debug for Redactions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactions(<{} values>)", self.0.len())
    }
}

impl Redactions {
    fn add(&mut self, value: &str, reference: String) {
        if value.len() >= MIN_REDACTED && !self.0.iter().any(|(v, _)| v == value) {
            self.0.push((value.to_owned(), reference));
            // Longest first, so that a value holding another is replaced whole.
            self.0.sort_by_key(|(v, _)| std::cmp::Reverse(v.len()));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `text` with every value replaced by its reference.
    pub fn apply(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (value, reference) in &self.0 {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), reference);
            }
        }
        out
    }

    /// Every string in a JSON value, redacted.
    pub fn apply_json(&self, v: &mut Value) {
        match v {
            Value::String(s) => {
                let r = self.apply(s);
                if r != *s {
                    *s = r;
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| self.apply_json(x)),
            Value::Object(m) => m.values_mut().for_each(|x| self.apply_json(x)),
            _ => {}
        }
    }
}

impl ControlPlane {
    /// Put the values in: each `${secret:NAME@V}` of a deploy's env and command becomes the
    /// value of that version, and each secret file gets its bytes. Any other job is left as
    /// it is. An error names the secret the store cannot give.
    pub(crate) async fn expand_secrets(&self, spec: &mut JobSpec) -> Result<Redactions, String> {
        let mut out = Redactions::default();
        let mut cache: BTreeMap<SecretRef, String> = BTreeMap::new();
        let (container, files) = match spec {
            JobSpec::Deploy(d) => (&mut d.container, None),
            JobSpec::DeployWithHostAccess(d) => (&mut d.deploy.container, None),
            JobSpec::DeployWithFiles(d) => {
                (&mut d.deploy.container, Some((&d.files, &mut d.contents)))
            }
            _ => return Ok(out),
        };
        expand_container(self, container, &mut cache, &mut out).await?;
        if let Some((files, contents)) = files {
            contents.clear();
            for f in files.iter() {
                let r = SecretRef::parse(&f.secret).map_err(|e| format!("{}: {e}", f.target))?;
                let value = self.value_of(&r, &mut cache).await?;
                contents.push(SecretBytes(value.clone().into_bytes()));
                out.add(&value, refs::reference(&r));
            }
        }
        Ok(out)
    }

    async fn value_of(
        &self,
        r: &SecretRef,
        cache: &mut BTreeMap<SecretRef, String>,
    ) -> Result<String, String> {
        if let Some(v) = cache.get(r) {
            return Ok(v.clone());
        }
        let (_, value) = self
            .reveal_secret(&r.name, r.version)
            .await
            .map_err(|e| format!("secret `{r}`: {e}"))?;
        let value = value.expose().to_owned();
        cache.insert(r.clone(), value.clone());
        Ok(value)
    }
}

async fn expand_container(
    cp: &ControlPlane,
    c: &mut ContainerSpec,
    cache: &mut BTreeMap<SecretRef, String>,
    out: &mut Redactions,
) -> Result<(), String> {
    let strings = c
        .env
        .iter_mut()
        .map(|(_, v)| v)
        .chain(c.command.iter_mut().flatten());
    for s in strings {
        if !refs::has_reference(s) {
            continue;
        }
        // Fetch first (async), then rewrite (sync) from the cache.
        for p in refs::pieces(s)? {
            if let refs::Piece::Ref(r) = p {
                let value = cp.value_of(&r, cache).await?;
                out.add(&value, refs::reference(&r));
            }
        }
        *s = refs::rewrite(
            s,
            |r| cache.get(r).cloned().ok_or_else(|| format!("secret `{r}`")),
            |e| e,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_coming_back_are_replaced_by_their_references_longest_first() {
        let mut r = Redactions::default();
        r.add("hunter2-long", "${secret:pw@2}".into());
        r.add("hunter2", "${secret:short@1}".into());
        r.add("abc", "${secret:tiny@1}".into());
        assert_eq!(
            r.apply("login hunter2-long then hunter2, abc"),
            "login ${secret:pw@2} then ${secret:short@1}, abc"
        );
        let mut v = serde_json::json!({"error": "bad hunter2", "n": [ "hunter2-long" ]});
        r.apply_json(&mut v);
        assert_eq!(v["error"], "bad ${secret:short@1}");
        assert_eq!(v["n"][0], "${secret:pw@2}");
        assert!(!format!("{r:?}").contains("hunter2"));
    }
}
