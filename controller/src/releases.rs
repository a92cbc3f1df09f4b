//! Agent releases: the binaries the controller serves at `/downloads/`, each with its SHA-256, its
//! version (read from the stamp inside the binary) and an Ed25519 signature made with the
//! controller's release-signing key; and the installers, served pre-filled with this controller's
//! address, CA pin and signing key.
//!
//! Binaries come from `agent_dir` (files named `nebula-agent-{os}-{arch}[.exe]`) and, when that
//! holds none for the controller's own platform, from the `nebula-agent` beside the controller's
//! executable. The set is scanned at start, every `release_scan_interval` and before each
//! download; a file is hashed again only when its size or modification time changed. Agents are
//! told about the set after `Welcome` and whenever it changes.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::Context;
use base64::Engine;
use nebula_protocol::release::{self, AgentRelease, VERSION_STAMP_LEN, VERSION_STAMP_PREFIX};
use ring::signature::{Ed25519KeyPair, KeyPair};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::ControlPlane;

/// The controller's release-signing key (Ed25519), kept in `data_dir/pki/release-signing.pk8`.
pub struct ReleaseSigner {
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for ReleaseSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseSigner")
            .field("public_key", &self.public_key_hex())
            .finish()
    }
}

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

impl ReleaseSigner {
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        if let Ok(bytes) = std::fs::read(path) {
            let key = Ed25519KeyPair::from_pkcs8(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: not an Ed25519 key: {e}", path.display()))?;
            return Ok(ReleaseSigner { key });
        }
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|e| anyhow::anyhow!("generating the release-signing key: {e}"))?;
        crate::ca::write_private(path, doc.as_ref())?;
        let key = Ed25519KeyPair::from_pkcs8(doc.as_ref())
            .map_err(|e| anyhow::anyhow!("reading the new release-signing key: {e}"))?;
        info!(path = %path.display(), "created the release-signing key");
        Ok(ReleaseSigner { key })
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).as_ref().to_vec()
    }

    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.public_key())
    }

    /// The public key as a PEM SubjectPublicKeyInfo, what `openssl pkeyutl -verify` reads.
    pub fn public_key_pem(&self) -> String {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.public_key());
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(der)
        )
    }
}

#[derive(Debug, Clone)]
struct Scanned {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    release: AgentRelease,
}

/// The served agent binaries.
#[derive(Debug)]
pub struct Releases {
    dir: PathBuf,
    /// The agent beside the controller's executable, served for this platform when `dir` has
    /// none for it.
    local: Option<PathBuf>,
    base_url: String,
    signer: ReleaseSigner,
    scanned: Mutex<BTreeMap<String, Scanned>>,
    tx: watch::Sender<Arc<Vec<AgentRelease>>>,
}

/// A file to serve and what it is.
#[derive(Debug, Clone)]
pub struct ServedRelease {
    pub path: PathBuf,
    pub len: u64,
    pub release: AgentRelease,
}

impl Releases {
    pub fn new(
        dir: PathBuf,
        local: Option<PathBuf>,
        base_url: String,
        signer: ReleaseSigner,
    ) -> Self {
        Releases {
            dir,
            local,
            base_url,
            signer,
            scanned: Mutex::new(BTreeMap::new()),
            tx: watch::channel(Arc::new(Vec::new())).0,
        }
    }

    pub fn signer(&self) -> &ReleaseSigner {
        &self.signer
    }

    /// The releases as last scanned; changes whenever the set changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<AgentRelease>>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<Vec<AgentRelease>> {
        self.tx.borrow().clone()
    }

    /// Look at the files again (blocking: hashes changed files). Returns the releases.
    pub fn scan(&self) -> Arc<Vec<AgentRelease>> {
        let mut candidates: BTreeMap<String, PathBuf> = BTreeMap::new();
        match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if release::parse_file_name(&name).is_some() {
                        candidates.insert(name, entry.path());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(dir = %self.dir.display(), "reading the agent directory: {e}"),
        }
        if let Some(local) = &self.local {
            let name = release::file_name(std::env::consts::OS, std::env::consts::ARCH);
            if !candidates.contains_key(&name) && local.is_file() {
                candidates.insert(name, local.clone());
            }
        }
        let mut scanned = self.scanned.lock().unwrap_or_else(|p| p.into_inner());
        scanned.retain(|name, _| candidates.contains_key(name));
        for (name, path) in candidates {
            let Ok(meta) = std::fs::metadata(&path) else {
                scanned.remove(&name);
                continue;
            };
            let modified = meta.modified().ok();
            if let Some(s) = scanned.get(&name) {
                if s.path == path && s.len == meta.len() && s.modified == modified {
                    continue;
                }
            }
            match self.describe(&name, &path) {
                Ok(release) => {
                    info!(file = %name, version = %release.version, "serving agent release");
                    scanned.insert(
                        name,
                        Scanned {
                            path,
                            len: meta.len(),
                            modified,
                            release,
                        },
                    );
                }
                Err(e) => {
                    warn!(file = %path.display(), "not serving: {e:#}");
                    scanned.remove(&name);
                }
            }
        }
        let list: Vec<AgentRelease> = scanned.values().map(|s| s.release.clone()).collect();
        drop(scanned);
        let list = Arc::new(list);
        self.tx.send_if_modified(|cur| {
            if **cur == *list {
                false
            } else {
                *cur = list.clone();
                true
            }
        });
        list
    }

    /// Hash, read the version stamp and sign one binary.
    fn describe(&self, name: &str, path: &Path) -> anyhow::Result<AgentRelease> {
        let (os, arch) = release::parse_file_name(name).context("not an agent file name")?;
        let (sha256, version) = hash_and_stamp(path)?;
        let version = version.context("no version stamp inside (not a nebula-agent binary?)")?;
        let manifest = release::manifest(&version, &os, &arch, &sha256);
        Ok(AgentRelease {
            version,
            path: format!("/downloads/{name}"),
            base_url: self.base_url.clone(),
            sha256,
            signature: self.signer.sign(manifest.as_bytes()),
            public_key: self.signer.public_key().to_vec(),
            os,
            arch,
        })
    }

    /// The binary served under `name`, scanned afresh.
    pub fn find(&self, name: &str) -> Option<ServedRelease> {
        self.scan();
        let scanned = self.scanned.lock().unwrap_or_else(|p| p.into_inner());
        scanned.get(name).map(|s| ServedRelease {
            path: s.path.clone(),
            len: s.len,
            release: s.release.clone(),
        })
    }
}

/// SHA-256 of a file and the version stamp inside it, read in one pass.
fn hash_and_stamp(path: &Path) -> anyhow::Result<([u8; 32], Option<String>)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut version = None;
    // The tail of the previous chunk, so that a stamp across a chunk boundary is found.
    let mut window: Vec<u8> = Vec::with_capacity(VERSION_STAMP_LEN * 2 + (1 << 20));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if version.is_none() {
            window.extend_from_slice(&buf[..n]);
            version = release::find_version_stamp(&window);
            let keep = (VERSION_STAMP_LEN + VERSION_STAMP_PREFIX.len()).min(window.len());
            window.drain(..window.len() - keep);
        }
    }
    Ok((hasher.finalize().into(), version))
}

/// One rescan of `agent_dir` (the rescan task's activation), so that a binary dropped there
/// reaches the agents.
pub async fn rescan_once(cp: &Arc<ControlPlane>) -> anyhow::Result<serde_json::Value> {
    let releases = cp.releases.clone();
    let found = tokio::task::spawn_blocking(move || releases.scan()).await?;
    Ok(serde_json::json!({ "releases": found.len() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(dir: &Path) -> ReleaseSigner {
        ReleaseSigner::load_or_create(&dir.join("k.pk8")).unwrap()
    }

    #[test]
    fn the_signing_key_survives_a_restart_and_signatures_verify() {
        let dir = tempfile::tempdir().unwrap();
        let a = signer(dir.path());
        let b = signer(dir.path());
        assert_eq!(a.public_key(), b.public_key());
        let sig = a.sign(b"hello");
        let pk = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, b.public_key());
        pk.verify(b"hello", &sig).unwrap();
        assert!(pk.verify(b"hellO", &sig).is_err());
        let pem = a.public_key_pem();
        assert!(
            pem.starts_with("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA"),
            "{pem}"
        );
    }

    #[test]
    fn binaries_are_hashed_stamped_signed_and_rescanned_when_changed() {
        let dir = tempfile::tempdir().unwrap();
        let agents = dir.path().join("agents");
        std::fs::create_dir(&agents).unwrap();
        let mut bin = vec![0x90u8; 3 << 20];
        // A stamp across the first chunk boundary.
        let stamp = release::version_stamp("0.3.1");
        bin[(1 << 20) - 10..(1 << 20) - 10 + stamp.len()].copy_from_slice(&stamp);
        std::fs::write(agents.join("nebula-agent-linux-x86_64"), &bin).unwrap();
        std::fs::write(agents.join("nebula-agent-linux-riscv64"), b"no stamp here").unwrap();
        std::fs::write(agents.join("README"), b"ignored").unwrap();
        let releases = Releases::new(agents.clone(), None, String::new(), signer(dir.path()));
        let mut rx = releases.subscribe();
        let list = releases.scan();
        assert_eq!(list.len(), 1, "the unstamped file is not served: {list:?}");
        let r = &list[0];
        assert_eq!(
            (r.version.as_str(), r.os.as_str(), r.arch.as_str()),
            ("0.3.1", "linux", "x86_64")
        );
        assert_eq!(r.sha256, <[u8; 32]>::from(Sha256::digest(&bin)));
        let manifest = release::manifest("0.3.1", "linux", "x86_64", &r.sha256);
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &r.public_key)
            .verify(manifest.as_bytes(), &r.signature)
            .unwrap();
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        // Nothing changed: no new value.
        releases.scan();
        assert!(!rx.has_changed().unwrap());
        // A new build (another size) is picked up.
        bin.extend_from_slice(&release::version_stamp("0.3.2"));
        bin[(1 << 20) - 10..(1 << 20) - 10 + stamp.len()].fill(0);
        std::fs::write(agents.join("nebula-agent-linux-x86_64"), &bin).unwrap();
        let list = releases.scan();
        assert_eq!(list[0].version, "0.3.2");
        assert!(rx.has_changed().unwrap());
        assert!(releases.find("nebula-agent-linux-x86_64").is_some());
        assert!(releases.find("nebula-agent-linux-riscv64").is_none());
    }
}
