//! The agent's identity on disk: its private key (generated here, never sent anywhere), its
//! client certificate, the fleet CA and a small state file.
//!
//! Files in the state dir: `node.key` (0600), `node.crt`, `ca.crt`, `agent.json`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not valid")]
    Invalid(PathBuf),
    #[error("key generation failed")]
    Key(#[from] rcgen::Error),
    #[error("no saved identity in {0}: join first (`nebula-agent join --controller HOST:PORT --token TOKEN`)")]
    NotEnrolled(PathBuf),
}

/// What `agent.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentState {
    pub controller: String,
    pub node_id: Uuid,
    pub name: String,
    /// The controller's latest session settings (from enrollment, then every `Welcome`).
    #[serde(default)]
    pub settings: Option<nebula_protocol::SessionSettings>,
    /// Every controller replica's QUIC address, as the controller last said (1.9); tried in
    /// turn when the connection is lost.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
    /// The highest leader term seen (1.10): a controller replica of a lower term is a deposed
    /// leader, whose session and jobs are refused.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub term: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A loaded identity.
#[derive(Debug, Clone)]
pub struct Identity {
    pub state: AgentState,
    pub key_der: Vec<u8>,
    pub cert_der: Vec<u8>,
    pub ca_der: Vec<u8>,
}

impl Identity {
    pub fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![CertificateDer::from(self.cert_der.clone())]
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// When to renew: after two thirds of the certificate's lifetime.
    pub fn renew_at(&self) -> Option<SystemTime> {
        let (nb, na) = validity(&self.cert_der)?;
        let life = na.duration_since(nb).ok()?;
        Some(nb + life * 2 / 3)
    }
}

/// Validity window (not before, not after) of a DER certificate.
pub fn validity(der: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let t = |ts: i64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(ts).ok()?));
    Some((
        t(cert.validity().not_before.timestamp())?,
        t(cert.validity().not_after.timestamp())?,
    ))
}

/// A fresh key pair and a CSR for it. The CSR only carries the public key: the controller sets
/// the subject and the node-id SAN itself.
pub fn new_key_and_csr() -> Result<(KeyPair, Vec<u8>), IdentityError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn is_enrolled(&self) -> bool {
        self.dir.join("agent.json").exists() && self.dir.join("node.crt").exists()
    }

    pub fn load(&self) -> Result<Identity, IdentityError> {
        if !self.is_enrolled() {
            return Err(IdentityError::NotEnrolled(self.dir.clone()));
        }
        self.finish_pending_swap()?;
        let state_path = self.dir.join("agent.json");
        let state: AgentState = serde_json::from_slice(&self.read(&state_path)?)
            .map_err(|_| IdentityError::Invalid(state_path))?;
        let key_pem = String::from_utf8(self.read(&self.dir.join("node.key"))?)
            .map_err(|_| IdentityError::Invalid(self.dir.join("node.key")))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|_| IdentityError::Invalid(self.dir.join("node.key")))?;
        let cert_der = self.read_pem_cert("node.crt")?;
        let ca_der = self.read_pem_cert("ca.crt")?;
        Ok(Identity {
            state,
            key_der: key.serialize_der(),
            cert_der,
            ca_der,
        })
    }

    /// Save a whole identity (after enrollment).
    pub fn save(
        &self,
        state: &AgentState,
        key: &KeyPair,
        cert_der: &[u8],
        ca_der: &[u8],
    ) -> Result<(), IdentityError> {
        self.ensure_dir()?;
        self.write("ca.crt", pem("CERTIFICATE", ca_der).as_bytes())?;
        self.write("node.key", key.serialize_pem().as_bytes())?;
        self.write("node.crt", pem("CERTIFICATE", cert_der).as_bytes())?;
        let json = serde_json::to_vec_pretty(state).expect("state serialises");
        self.write("agent.json", &json)
    }

    /// Read `agent.json`, change it, and write it back when `change` says it changed. One at a
    /// time in this process (the session and the job runner both save to it).
    fn update_state(
        &self,
        change: impl FnOnce(&mut AgentState) -> bool,
    ) -> Result<(), IdentityError> {
        static AGENT_JSON: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = AGENT_JSON.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.dir.join("agent.json");
        let mut state: AgentState = serde_json::from_slice(&self.read(&path)?)
            .map_err(|_| IdentityError::Invalid(path.clone()))?;
        if !change(&mut state) {
            return Ok(());
        }
        let json = serde_json::to_vec_pretty(&state).expect("state serialises");
        self.write("agent.json", &json)
    }

    /// Save new session settings from the controller.
    pub fn save_settings(
        &self,
        settings: &nebula_protocol::SessionSettings,
    ) -> Result<(), IdentityError> {
        self.update_state(|state| {
            state.settings = Some(settings.clone());
            true
        })
    }

    /// Put the leader a replica named (turning this agent away) first among the replicas, so
    /// that it is tried next.
    pub fn remember_leader(&self, addr: &str) -> Result<(), IdentityError> {
        self.update_state(|state| {
            let mut list = vec![addr.to_owned()];
            list.extend(state.replicas.drain(..).filter(|r| r != addr).take(63));
            state.replicas = list;
            true
        })
    }

    /// Save the replicas' addresses the controller sent.
    pub fn save_replicas(&self, replicas: &[String]) -> Result<(), IdentityError> {
        self.update_state(|state| {
            let changed = state.replicas != replicas;
            state.replicas = replicas.to_vec();
            changed
        })
    }

    /// Save the highest leader term seen (only ever raised).
    pub fn save_term(&self, term: u64) -> Result<(), IdentityError> {
        self.update_state(|state| {
            let raised = term > state.term;
            state.term = state.term.max(term);
            raised
        })
    }

    /// Replace key and certificate (after renewal). Both are written in full as `*.next` files
    /// before either is renamed into place, and [`StateDir::load`] completes an interrupted swap,
    /// so a crash never leaves a key that does not match its certificate.
    pub fn save_cert(&self, key: &KeyPair, cert_der: &[u8]) -> Result<(), IdentityError> {
        self.write("node.key.next", key.serialize_pem().as_bytes())?;
        self.write("node.crt.next", pem("CERTIFICATE", cert_der).as_bytes())?;
        self.finish_pending_swap()
    }

    fn finish_pending_swap(&self) -> Result<(), IdentityError> {
        let crt_next = self.dir.join("node.crt.next");
        if !crt_next.exists() {
            // No swap in progress (a lone key.next is an unfinished write: ignore it).
            let _ = std::fs::remove_file(self.dir.join("node.key.next"));
            return Ok(());
        }
        for name in ["node.key", "node.crt"] {
            let next = self.dir.join(format!("{name}.next"));
            if next.exists() {
                std::fs::rename(&next, self.dir.join(name)).map_err(|source| {
                    IdentityError::Io {
                        path: next.clone(),
                        source,
                    }
                })?;
            }
        }
        Ok(())
    }

    fn ensure_dir(&self) -> Result<(), IdentityError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| IdentityError::Io {
            path: self.dir.clone(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700));
        }
        Ok(())
    }

    fn read(&self, path: &Path) -> Result<Vec<u8>, IdentityError> {
        std::fs::read(path).map_err(|source| IdentityError::Io {
            path: path.to_owned(),
            source,
        })
    }

    fn read_pem_cert(&self, name: &str) -> Result<Vec<u8>, IdentityError> {
        use rustls::pki_types::pem::PemObject;
        let path = self.dir.join(name);
        let bytes = self.read(&path)?;
        CertificateDer::from_pem_slice(&bytes)
            .map(|c| c.to_vec())
            .map_err(|_| IdentityError::Invalid(path))
    }

    /// Every file is written 0600 through a temporary file and a rename.
    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), IdentityError> {
        use std::io::Write;
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let io = |source| IdentityError::Io {
            path: path.clone(),
            source,
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }
}

fn pem(tag: &str, der: &[u8]) -> String {
    use std::fmt::Write;
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                b64.push(B64[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {tag}-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(
            out,
            "{}",
            std::str::from_utf8(line).expect("base64 is ascii")
        );
    }
    let _ = writeln!(out, "-----END {tag}-----");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_round_trip_with_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path().join("state"));
        assert!(matches!(sd.load(), Err(IdentityError::NotEnrolled(_))));
        let (key, _) = new_key_and_csr().unwrap();
        let cert = CertificateParams::new(vec!["x.node.nebula.internal".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let state = AgentState {
            controller: "127.0.0.1:4433".into(),
            node_id: Uuid::now_v7(),
            name: "n1".into(),
            settings: None,
            replicas: Vec::new(),
            term: 0,
        };
        sd.save(&state, &key, cert.der(), cert.der()).unwrap();
        let id = sd.load().unwrap();
        assert_eq!(id.state, state);
        // The leader's term is only ever raised.
        sd.save_term(7).unwrap();
        sd.save_term(3).unwrap();
        assert_eq!(sd.load().unwrap().state.term, 7);
        assert_eq!(id.cert_der, cert.der().to_vec());
        assert_eq!(id.key_der, key.serialize_der());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in ["node.key", "node.crt", "ca.crt", "agent.json"] {
                let mode = std::fs::metadata(sd.path().join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
    }
}
