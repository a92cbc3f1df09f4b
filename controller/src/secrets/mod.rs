//! The secret store: values encrypted at rest in the database ([`keyring`]: AES-256-GCM under
//! a key kept in a 0600 file, each value bound to its name and version), every version kept,
//! values write-only through the API. A value is opened only by [`ControlPlane::reveal_secret`],
//! for the one place that needs it; names, versions, who and when are what anyone else reads.

pub mod dotenv;
pub mod keyring;
pub(crate) mod refs;

use std::path::PathBuf;
use std::sync::RwLock;

use nebula_types::api::secrets::{Imported, Rekeyed, SecretSet, SecretVersionView, SecretView};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::authz::{Change, Op, OpCtx};
use crate::store::secrets::SecretRecord;
use crate::{ControlPlane, OpError};
use keyring::{Keyring, Sealed};

/// The key file when `[secrets] key_file` is not set, in the data dir.
pub const KEY_FILE: &str = "secret.key";
/// The largest value stored.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// `[secrets]` in the controller's config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    /// The key file (`NEBULA_SECRET_KEY_FILE`); default `<data_dir>/secret.key`, created on
    /// first start. Losing it loses the secrets: back it up.
    pub key_file: Option<PathBuf>,
}

/// A secret's value: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(v: impl Into<String>) -> Self {
        Self(v.into())
    }

    /// The value itself, for the one place that hands it on.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretValue(***)")
    }
}

/// The keyring, and one rotation at a time.
pub struct SecretBook {
    keyring: RwLock<Keyring>,
    rekey: tokio::sync::Mutex<()>,
    /// Held (shared) from sealing a value to storing it; a rotation holds it alone while it
    /// works out which keys are unused, so no value sealed under a key lands after its key
    /// was dropped.
    writes: tokio::sync::RwLock<()>,
}

impl SecretBook {
    pub fn new(keyring: Keyring) -> Self {
        Self {
            keyring: RwLock::new(keyring),
            rekey: tokio::sync::Mutex::new(()),
            writes: tokio::sync::RwLock::new(()),
        }
    }

    /// Hold off key rotations (a backup reads the key file and every sealed value meanwhile).
    pub(crate) async fn hold_keys(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.rekey.lock().await
    }

    fn seal(&self, name: &str, version: u32, value: &str) -> Sealed {
        self.keyring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .seal(name, version, value.as_bytes())
    }

    fn open(&self, rec: &SecretRecord) -> Result<SecretValue, OpError> {
        let sealed = Sealed {
            key_id: rec.key_id.clone(),
            data: rec.sealed.clone(),
        };
        let bytes = self
            .keyring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .open(&rec.name, rec.version, &sealed)
            .map_err(|e| {
                tracing::error!("{e}");
                OpError::Conflict(e)
            })?;
        String::from_utf8(bytes)
            .map(SecretValue)
            .map_err(|_| OpError::Conflict(format!("`{}` is not text", rec.name)))
    }
}

/// A secret's name: a letter or `_`, then letters, digits, `_`, `.` or `-`; at most 128.
pub fn check_name(name: &str) -> Result<(), OpError> {
    // `import` and `rekey` are the API's own paths under /api/v1/secrets/.
    if !nebula_desired::map::secrets::valid_secret_name(name) || matches!(name, "import" | "rekey")
    {
        return Err(OpError::Invalid(format!(
            "`{}` is not a secret name (a letter or _, then letters, digits, _ . -; at most 128)",
            name.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

fn check_value(name: &str, value: &SecretValue) -> Result<(), OpError> {
    if value.0.is_empty() || value.0.len() > MAX_VALUE_BYTES {
        return Err(OpError::Invalid(format!(
            "`{name}`: a value has 1 byte to {} KiB",
            MAX_VALUE_BYTES / 1024
        )));
    }
    Ok(())
}

fn rfc3339(ms: i64) -> String {
    crate::store::rfc3339_millis(crate::store::from_millis(ms))
}

fn now() -> i64 {
    nebula_protocol::time::UnixMillis::now().as_i64()
}

fn views(rows: Vec<SecretRecord>) -> Vec<SecretView> {
    let mut out: Vec<SecretView> = Vec::new();
    for r in rows {
        let v = SecretVersionView {
            version: r.version,
            created_by: r.created_by.clone(),
            created_at: rfc3339(r.created_at),
            key_id: r.key_id.clone(),
        };
        match out.last_mut() {
            Some(s) if s.name == r.name => s.versions.push(v),
            _ => out.push(SecretView {
                name: r.name,
                latest: r.version,
                updated_by: r.created_by,
                updated_at: rfc3339(r.created_at),
                versions: vec![v],
            }),
        }
    }
    out
}

impl ControlPlane {
    /// Store `value` as the next version of `name`.
    pub async fn set_secret(
        &self,
        cx: &OpCtx,
        name: &str,
        value: SecretValue,
    ) -> Result<SecretSet, OpError> {
        self.authorize(cx, Op::ManageSecrets)?;
        check_name(name)?;
        check_value(name, &value)?;
        let version = self.store_secret(cx, name, &value).await?;
        self.repin_secrets(&format!("secret {name} changed to version {version}"))
            .await;
        Ok(SecretSet {
            name: name.to_owned(),
            version,
        })
    }

    /// Store a new version for an operation already allowed (an applied map's inline values),
    /// without asking for `manage_secrets`.
    pub(crate) async fn store_secret_checked(
        &self,
        cx: &OpCtx,
        name: &str,
        value: &SecretValue,
    ) -> Result<u32, OpError> {
        check_name(name)?;
        check_value(name, value)?;
        self.store_secret(cx, name, value).await
    }

    async fn store_secret(
        &self,
        cx: &OpCtx,
        name: &str,
        value: &SecretValue,
    ) -> Result<u32, OpError> {
        let _writing = self.secrets.writes.read().await;
        for _ in 0..5 {
            let version = self.store.next_secret_version(name).await?;
            let sealed = self.secrets.seal(name, version, &value.0);
            let rec = SecretRecord {
                name: name.to_owned(),
                version,
                key_id: sealed.key_id,
                sealed: sealed.data,
                created_by: cx.actor.clone(),
                created_at: now(),
            };
            if self.store.insert_secret(&rec).await? {
                self.record(
                    cx,
                    Change {
                        action: "secret.set",
                        target: name.to_owned(),
                        detail: json!({ "version": version }),
                        event: None,
                    },
                );
                return Ok(version);
            }
        }
        Err(OpError::Conflict(format!(
            "`{name}` is being written by someone else; try again"
        )))
    }

    /// Every secret's name and versions (no values).
    pub async fn list_secrets(&self, cx: &OpCtx) -> Result<Vec<SecretView>, OpError> {
        self.authorize(cx, Op::ReadSecrets)?;
        Ok(views(self.store.secrets().await?))
    }

    pub async fn get_secret(&self, cx: &OpCtx, name: &str) -> Result<SecretView, OpError> {
        self.authorize(cx, Op::ReadSecrets)?;
        check_name(name)?;
        let rows: Vec<SecretRecord> = self
            .store
            .secrets()
            .await?
            .into_iter()
            .filter(|r| r.name == name)
            .collect();
        views(rows)
            .pop()
            .ok_or_else(|| OpError::NotFound(format!("no secret named `{name}`")))
    }

    /// Remove a secret and every version of it.
    pub async fn remove_secret(&self, cx: &OpCtx, name: &str) -> Result<(), OpError> {
        self.authorize(cx, Op::ManageSecrets)?;
        check_name(name)?;
        let n = self.store.delete_secret(name).await?;
        if n == 0 {
            return Err(OpError::NotFound(format!("no secret named `{name}`")));
        }
        self.record(
            cx,
            Change {
                action: "secret.remove",
                target: name.to_owned(),
                detail: json!({ "versions": n }),
                event: None,
            },
        );
        self.repin_secrets(&format!("secret {name} was removed"))
            .await;
        Ok(())
    }

    /// A version's value (`None`: the latest), for the one place that hands it on. Not an
    /// operation anyone calls through the API.
    pub async fn reveal_secret(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<(u32, SecretValue), OpError> {
        let rec = self.store.secret(name, version).await?.ok_or_else(|| {
            OpError::NotFound(match version {
                Some(v) => format!("no version {v} of secret `{name}`"),
                None => format!("no secret named `{name}`"),
            })
        })?;
        Ok((rec.version, self.secrets.open(&rec)?))
    }

    /// Import a `.env` file: each `NAME=value` becomes a new version unless the latest one
    /// holds that value already.
    pub async fn import_secrets(&self, cx: &OpCtx, env: &str) -> Result<Imported, OpError> {
        self.authorize(cx, Op::ManageSecrets)?;
        let parsed = dotenv::parse(env);
        let mut out = Imported {
            refused: parsed.refused,
            ..Imported::default()
        };
        for (name, value) in parsed.pairs {
            if let Err(e) = check_name(&name).and_then(|()| check_value(&name, &value)) {
                out.refused.push(e.to_string());
                continue;
            }
            match self.reveal_secret(&name, None).await {
                Ok((_, current)) if current == value => {
                    out.unchanged.push(name);
                    continue;
                }
                Ok(_) | Err(OpError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            let version = self.store_secret(cx, &name, &value).await?;
            out.set.push(SecretSet { name, version });
        }
        if !out.set.is_empty() {
            let names: Vec<&str> = out.set.iter().map(|s| s.name.as_str()).collect();
            self.repin_secrets(&format!("secrets imported: {}", names.join(", ")))
                .await;
        }
        Ok(out)
    }

    /// Seal every version not under `key_id` again under it (the active key); how many.
    async fn reseal_all(&self, key_id: &str) -> Result<u64, OpError> {
        let mut n = 0u64;
        loop {
            let batch = self.store.secrets_not_under(key_id, 100).await?;
            if batch.is_empty() {
                return Ok(n);
            }
            for rec in batch {
                let value = self.secrets.open(&rec)?;
                let sealed = self.secrets.seal(&rec.name, rec.version, &value.0);
                let old_key = rec.key_id.clone();
                let next = SecretRecord {
                    key_id: sealed.key_id,
                    sealed: sealed.data,
                    ..rec
                };
                if self.store.reseal_secret(&next, &old_key).await? {
                    n += 1;
                }
            }
        }
    }

    /// Rotate the key: a new key seals new values at once, every stored version is sealed
    /// again under it (batch by batch; run again to resume after an interruption), then the
    /// keys no version uses are removed from the key file.
    pub async fn rekey_secrets(&self, cx: &OpCtx) -> Result<Rekeyed, OpError> {
        self.authorize(cx, Op::ManageSecrets)?;
        // The key file is each replica's own: a new key written here would be missing on the
        // others.
        if self.ha.replicated() && self.store.replicas(60_000).await?.len() > 1 {
            return Err(OpError::Conflict(
                "the secret key cannot be rotated while several replicas run: stop the others, \
                 rotate, then add them again with a new `nebula replica add` bundle"
                    .into(),
            ));
        }
        let _one = self
            .secrets
            .rekey
            .try_lock()
            .map_err(|_| OpError::Conflict("a key rotation is running already".into()))?;
        let io = |e: std::io::Error| {
            tracing::error!("writing the secret key file: {e}");
            OpError::Conflict("the controller could not write the key file (see its log)".into())
        };
        // Resume a rotation that was cut short: its new key is active already.
        let in_use = self.store.secret_key_ids().await?;
        let active = self
            .secrets
            .keyring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .active_id()
            .to_owned();
        let resuming = in_use.iter().any(|k| *k != active) && in_use.contains(&active);
        let key_id = if resuming {
            active
        } else {
            self.secrets
                .keyring
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .rotate()
                .map_err(io)?
        };
        let mut reencrypted = self.reseal_all(&key_id).await?;
        // Values sealed while that ran are stored now; none can start until the unused keys
        // are dropped.
        let _alone = self.secrets.writes.write().await;
        reencrypted += self.reseal_all(&key_id).await?;
        let in_use = self.store.secret_key_ids().await?;
        let removed_keys = self
            .secrets
            .keyring
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retire(&in_use)
            .map_err(io)?;
        self.record(
            cx,
            Change {
                action: "secret.rekey",
                target: key_id.clone(),
                detail: json!({ "reencrypted": reencrypted, "removed_keys": removed_keys }),
                event: None,
            },
        );
        Ok(Rekeyed {
            key_id,
            reencrypted,
            removed_keys,
        })
    }
}
