//! The controller's key material as one bundle sealed with a passphrase: the fleet CA, the
//! release-signing key, the password-reset key, the secret store's key file and the Discord
//! token file. A backup carries it; so does the bundle that adds a replica.
//!
//! Sealing: Argon2id over the passphrase with a random salt (parameters kept beside it), then
//! AES-256-GCM with a random nonce; the format name is the associated data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::ControllerConfig;

/// The files, by name, and whether a controller always has them; each name's place is
/// [`place`] (the Discord token only as the dashboard saves it, in the data dir).
const FILES: &[(&str, bool)] = &[
    ("pki/ca.crt", true),
    ("pki/ca.key", true),
    ("pki/reset.key", true),
    ("pki/release-signing.pk8", true),
    ("secret.key", true),
    ("discord.token", false),
];

const AAD: &[u8] = b"nebula-keys/1";

/// Shortest passphrase accepted for sealing.
pub const MIN_PASSPHRASE: usize = 10;

/// Where a bundled file belongs for this configuration.
fn place(config: &ControllerConfig, name: &str) -> PathBuf {
    match name {
        "secret.key" => config.secret_key_file(),
        _ => config.data_dir.join(name),
    }
}

/// The key files, read.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyFiles(BTreeMap<String, Vec<u8>>);

impl std::fmt::Debug for KeyFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// A [`KeyFiles`] sealed with a passphrase, as stored in a backup's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedKeys {
    pub kdf: String,
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
    pub salt: String,
    pub nonce: String,
    pub sealed: String,
}

impl KeyFiles {
    /// Read every key file of a controller's configuration (the optional ones when present).
    pub fn collect(config: &ControllerConfig) -> anyhow::Result<Self> {
        let mut files = BTreeMap::new();
        for &(name, required) in FILES {
            let path = place(config, name);
            match std::fs::read(&path) {
                Ok(bytes) => {
                    files.insert(name.to_string(), bytes);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            }
        }
        Ok(Self(files))
    }

    pub fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }

    /// Write the files where this configuration keeps them (owner-only), refusing to replace
    /// any that exist: keys are never generated or overwritten silently.
    pub fn install(&self, config: &ControllerConfig) -> anyhow::Result<Vec<PathBuf>> {
        self.check_free(config)?;
        let targets = self
            .0
            .iter()
            .map(|(name, bytes)| (place(config, name), bytes));
        let mut written = Vec::new();
        for (path, bytes) in targets {
            if let Some(dir) = path.parent() {
                private_dir(dir)?;
            }
            crate::ca::write_private(&path, bytes)?;
            written.push(path);
        }
        Ok(written)
    }

    /// Refuse when any of the files exists where this configuration keeps it.
    pub fn check_free(&self, config: &ControllerConfig) -> anyhow::Result<()> {
        for name in self.0.keys() {
            let p = place(config, name);
            if p.exists() {
                bail!(
                    "{} exists already: keys go only into a new data dir",
                    p.display()
                );
            }
        }
        Ok(())
    }

    /// Seal with a passphrase.
    pub fn seal(&self, passphrase: &str) -> anyhow::Result<SealedKeys> {
        if passphrase.chars().count() < MIN_PASSPHRASE {
            bail!("the passphrase needs at least {MIN_PASSPHRASE} characters");
        }
        let rng = SystemRandom::new();
        let mut salt = [0u8; 16];
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut salt)
            .and_then(|()| rng.fill(&mut nonce))
            .map_err(|_| anyhow::anyhow!("no randomness"))?;
        let params = argon2::Params::default();
        let (m_kib, t, p) = (params.m_cost(), params.t_cost(), params.p_cost());
        let key = derive(passphrase, &salt, m_kib, t, p)?;
        let plain: BTreeMap<&String, String> =
            self.0.iter().map(|(k, v)| (k, B64.encode(v))).collect();
        let mut buf = serde_json::to_vec(&plain)?;
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(AAD),
            &mut buf,
        )
        .map_err(|_| anyhow::anyhow!("sealing the keys failed"))?;
        Ok(SealedKeys {
            kdf: "argon2id".into(),
            m_kib,
            t,
            p,
            salt: B64.encode(salt),
            nonce: B64.encode(nonce),
            sealed: B64.encode(buf),
        })
    }

    /// Open a sealed bundle; a wrong passphrase and a damaged bundle look the same.
    pub fn open(sealed: &SealedKeys, passphrase: &str) -> anyhow::Result<Self> {
        if sealed.kdf != "argon2id" {
            bail!("unknown key derivation `{}`", sealed.kdf);
        }
        // Bounds that keep a hostile file from asking for gigabytes or minutes.
        if sealed.m_kib > 256 * 1024 || sealed.t > 10 || sealed.p > 16 {
            bail!("the key derivation asks for more than this controller allows");
        }
        let salt = B64.decode(&sealed.salt).context("salt")?;
        let nonce: [u8; NONCE_LEN] = B64
            .decode(&sealed.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .context("the nonce is not valid")?;
        let mut buf = B64.decode(&sealed.sealed).context("sealed keys")?;
        let key = derive(passphrase, &salt, sealed.m_kib, sealed.t, sealed.p)?;
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(AAD),
                &mut buf,
            )
            .map_err(|_| anyhow::anyhow!("wrong passphrase (or the keys are damaged)"))?;
        let map: BTreeMap<String, String> =
            serde_json::from_slice(plain).context("the sealed keys are not valid")?;
        let mut files = BTreeMap::new();
        for (name, b64) in map {
            if !FILES.iter().any(|(n, _)| *n == name) {
                bail!("the bundle holds an unknown file `{name}`");
            }
            files.insert(name, B64.decode(b64).context("a key file")?);
        }
        Ok(Self(files))
    }
}

fn derive(
    passphrase: &str,
    salt: &[u8],
    m_kib: u32,
    t: u32,
    p: u32,
) -> anyhow::Result<LessSafeKey> {
    let params = argon2::Params::new(m_kib, t, p, Some(32))
        .map_err(|e| anyhow::anyhow!("key derivation parameters: {e}"))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = [0u8; 32];
    argon
        .hash_password_into(passphrase.as_bytes(), salt, &mut key)
        .map_err(|e| anyhow::anyhow!("key derivation: {e}"))?;
    let unbound =
        UnboundKey::new(&AES_256_GCM, &key).map_err(|_| anyhow::anyhow!("key derivation"))?;
    Ok(LessSafeKey::new(unbound))
}

/// A directory made readable by its owner only when this creates it (an existing one, such
/// as a shared `/var/backups`, keeps its permissions).
pub(crate) fn private_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> ControllerConfig {
        ControllerConfig {
            data_dir: dir.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn keys_travel_sealed_and_land_only_in_a_new_data_dir() {
        let from = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(from.path().join("pki")).unwrap();
        for (name, required) in FILES {
            if *required {
                std::fs::write(from.path().join(name), format!("bytes of {name}")).unwrap();
            }
        }
        let keys = KeyFiles::collect(&config(from.path())).unwrap();
        assert_eq!(keys.names().len(), FILES.len() - 1, "{keys:?}");
        assert!(keys.seal("short").is_err(), "a short passphrase is refused");
        let sealed = keys.seal("correct horse battery").unwrap();
        assert!(!sealed.sealed.contains("bytes of"));
        let err = KeyFiles::open(&sealed, "wrong horse battery").unwrap_err();
        assert!(format!("{err}").contains("wrong passphrase"), "{err}");
        let mut tampered = sealed.clone();
        tampered.m_kib = 1 << 30;
        assert!(KeyFiles::open(&tampered, "correct horse battery").is_err());
        let opened = KeyFiles::open(&sealed, "correct horse battery").unwrap();
        assert_eq!(opened, keys);

        let to = tempfile::tempdir().unwrap();
        let written = opened.install(&config(to.path())).unwrap();
        assert_eq!(written.len(), keys.names().len());
        assert_eq!(
            std::fs::read(to.path().join("pki/ca.key")).unwrap(),
            b"bytes of pki/ca.key"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(to.path().join("secret.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = opened.install(&config(to.path())).unwrap_err();
        assert!(format!("{again}").contains("exists already"), "{again}");
    }
}
