//! Self-update: when the controller serves a newer agent for this platform and the host's owner
//! opted in (`[update] enabled = true`), download it, check its SHA-256 and the Ed25519 signature
//! of its release manifest, swap the binary atomically (the old one kept beside it as `.prev`) and
//! restart in place. The new version must reach the controller within `confirm_timeout`; if it
//! does not (or crashes at start three times), the previous binary comes back and that release
//! is not tried again.
//!
//! The signing key is the one in the config (`release_key`, written by the installers), else the
//! one the controller named the first time, over the authenticated session, pinned in
//! `release.key` in the state dir: a key that changes later is refused.

use nebula_protocol::time::UnixMillis;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nebula_protocol::release::{self, AgentRelease};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::config::UpdateConfig;

/// Largest binary accepted.
const MAX_BINARY: u64 = 512 << 20;
/// Starts of a new version that did not reach the controller before it is given up.
const MAX_STARTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("checksum mismatch: downloaded {actual}, the controller advertised {expected}")]
    Checksum { expected: String, actual: String },
    #[error("bad signature: the release manifest is not signed by the release key")]
    Signature,
    #[error("the controller's release key {advertised} is not the pinned key {pinned}")]
    KeyChanged { advertised: String, pinned: String },
    #[error("the release key must be 64 hex digits (an Ed25519 public key)")]
    BadKey,
    #[error("no URL to download from: set `update.url` to the controller's HTTP address")]
    NoUrl,
    #[error("download of {url} failed: {message}")]
    Download { url: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UpdateError + '_ {
    move |source| UpdateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What `update.json` in the state dir records about the last update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRecord {
    pub from: String,
    pub to: String,
    /// Hex SHA-256 of the new binary.
    pub sha256: String,
    pub exe: PathBuf,
    pub prev: PathBuf,
    /// Starts of the new version so far.
    pub starts: u32,
    pub outcome: Outcome,
    pub at_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum Outcome {
    /// Swapped; the new version has not reached the controller yet.
    Pending,
    Confirmed,
    RolledBack(String),
}

fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("update.json")
}

pub fn load_record(state_dir: &Path) -> Option<UpdateRecord> {
    let text = std::fs::read_to_string(record_path(state_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

fn save_record(state_dir: &Path, rec: &UpdateRecord) -> Result<(), UpdateError> {
    let path = record_path(state_dir);
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec_pretty(rec).unwrap_or_default();
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// What a start finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// Nothing pending.
    Normal,
    /// This is a new version: it must reach the controller by the deadline.
    Confirming { deadline: std::time::Instant },
    /// This new version has failed to start too often: the previous binary is back in place;
    /// restart into it.
    RolledBack { exe: PathBuf },
}

/// Called once at start: count this start of a pending new version, or roll it back when it has
/// used up its starts.
pub fn on_start(state_dir: &Path, version: &str, confirm_timeout: Duration) -> Startup {
    let Some(mut rec) = load_record(state_dir) else {
        return Startup::Normal;
    };
    if rec.outcome != Outcome::Pending {
        return Startup::Normal;
    }
    if rec.to != version {
        // The swap did not take (or someone put another binary in place): not ours to judge.
        rec.outcome = Outcome::RolledBack(format!("version {version} is running instead"));
        let _ = save_record(state_dir, &rec);
        return Startup::Normal;
    }
    rec.starts += 1;
    if rec.starts > MAX_STARTS {
        return match roll_back(
            state_dir,
            &mut rec,
            "it kept stopping before reaching the controller",
        ) {
            Ok(()) => Startup::RolledBack {
                exe: rec.exe.clone(),
            },
            Err(e) => {
                warn!("rolling back the update failed: {e}");
                Startup::Normal
            }
        };
    }
    if let Err(e) = save_record(state_dir, &rec) {
        warn!("recording the update's start: {e}");
    }
    info!(from = %rec.from, to = %rec.to, start = rec.starts, "running a new version; it must reach the controller within {}", humantime::format_duration(confirm_timeout));
    Startup::Confirming {
        deadline: std::time::Instant::now() + confirm_timeout,
    }
}

/// The new version reached the controller: keep it.
pub fn confirm(state_dir: &Path) {
    let Some(mut rec) = load_record(state_dir) else {
        return;
    };
    if rec.outcome != Outcome::Pending {
        return;
    }
    rec.outcome = Outcome::Confirmed;
    let _ = std::fs::remove_file(&rec.prev);
    match save_record(state_dir, &rec) {
        Ok(()) => info!(from = %rec.from, to = %rec.to, "update confirmed"),
        Err(e) => warn!("recording the confirmed update: {e}"),
    }
}

/// Put the previous binary back (an atomic rename over the new one).
pub fn roll_back_pending(state_dir: &Path, reason: &str) -> Result<Option<PathBuf>, UpdateError> {
    let Some(mut rec) = load_record(state_dir) else {
        return Ok(None);
    };
    if rec.outcome != Outcome::Pending {
        return Ok(None);
    }
    roll_back(state_dir, &mut rec, reason)?;
    Ok(Some(rec.exe))
}

fn roll_back(state_dir: &Path, rec: &mut UpdateRecord, reason: &str) -> Result<(), UpdateError> {
    std::fs::rename(&rec.prev, &rec.exe).map_err(io(&rec.prev))?;
    rec.outcome = Outcome::RolledBack(reason.to_owned());
    save_record(state_dir, rec)?;
    warn!(from = %rec.to, to = %rec.from, %reason, "update rolled back: the previous binary is back");
    Ok(())
}

/// The release for this platform, if it is newer than `current` and not one that failed here.
pub fn pick<'a>(
    releases: &'a [AgentRelease],
    current: &str,
    state_dir: &Path,
) -> Option<&'a AgentRelease> {
    let r = releases
        .iter()
        .find(|r| r.os == std::env::consts::OS && r.arch == std::env::consts::ARCH)?;
    if release::compare_versions(&r.version, current) != Some(std::cmp::Ordering::Greater) {
        return None;
    }
    if let Some(rec) = load_record(state_dir) {
        if matches!(rec.outcome, Outcome::RolledBack(_))
            && rec.to == r.version
            && rec.sha256 == hex::encode(r.sha256)
        {
            return None;
        }
    }
    Some(r)
}

/// The key releases must be signed with: configured, else pinned, else the advertised one
/// (pinned now).
pub fn release_key(
    config: &UpdateConfig,
    state_dir: &Path,
    advertised: &[u8],
) -> Result<[u8; 32], UpdateError> {
    let parse = |s: &str| -> Result<[u8; 32], UpdateError> {
        let bytes = hex::decode(s.trim()).map_err(|_| UpdateError::BadKey)?;
        <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| UpdateError::BadKey)
    };
    let pinned_path = state_dir.join("release.key");
    let key = match &config.release_key {
        Some(k) => parse(k)?,
        None => match std::fs::read_to_string(&pinned_path) {
            Ok(k) => parse(&k)?,
            Err(_) => {
                let k = <[u8; 32]>::try_from(advertised).map_err(|_| UpdateError::BadKey)?;
                std::fs::write(&pinned_path, hex::encode(k)).map_err(io(&pinned_path))?;
                info!(key = %hex::encode(k), "pinned the controller's release-signing key");
                k
            }
        },
    };
    if advertised != key {
        return Err(UpdateError::KeyChanged {
            advertised: hex::encode(advertised),
            pinned: hex::encode(key),
        });
    }
    Ok(key)
}

/// Check the signature of a release's manifest.
pub fn verify_signature(r: &AgentRelease, key: &[u8; 32]) -> Result<(), UpdateError> {
    let manifest = release::manifest(&r.version, &r.os, &r.arch, &r.sha256);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(manifest.as_bytes(), &r.signature)
        .map_err(|_| UpdateError::Signature)
}

/// Download `url` to `dest` (created 0755), hashing as it streams; refuse (and delete) a file
/// whose SHA-256 is not `expected`.
pub async fn download_verified(
    client: &reqwest::Client,
    url: &str,
    expected: &[u8; 32],
    dest: &Path,
) -> Result<(), UpdateError> {
    let fail = |message: String| UpdateError::Download {
        url: url.to_owned(),
        message,
    };
    let resp = client
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| fail(e.to_string()))?;
    if resp.content_length().is_some_and(|n| n > MAX_BINARY) {
        return Err(fail(format!("larger than {MAX_BINARY} bytes")));
    }
    let mut file = tokio::fs::File::create(dest).await.map_err(io(dest))?;
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut resp = resp;
    let written = async {
        use tokio::io::AsyncWriteExt;
        while let Some(chunk) = resp.chunk().await.map_err(|e| fail(e.to_string()))? {
            total += chunk.len() as u64;
            if total > MAX_BINARY {
                return Err(fail(format!("larger than {MAX_BINARY} bytes")));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io(dest))?;
        }
        file.sync_all().await.map_err(io(dest))?;
        Ok(())
    }
    .await;
    drop(file);
    let checked = written.and_then(|()| {
        let actual: [u8; 32] = hasher.finalize().into();
        if &actual != expected {
            return Err(UpdateError::Checksum {
                expected: hex::encode(expected),
                actual: hex::encode(actual),
            });
        }
        Ok(())
    });
    if let Err(e) = checked {
        let _ = std::fs::remove_file(dest);
        return Err(e);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755)).map_err(io(dest))?;
    }
    Ok(())
}

/// Put `new` in place of `exe`, keeping the old binary as `exe.prev`, and record the update as
/// pending. Both renames stay in one directory, so each is atomic.
pub fn swap(
    state_dir: &Path,
    exe: &Path,
    new: &Path,
    from: &str,
    r: &AgentRelease,
) -> Result<(), UpdateError> {
    let prev = sibling(exe, "prev");
    let _ = std::fs::remove_file(&prev);
    if std::fs::hard_link(exe, &prev).is_err() {
        std::fs::copy(exe, &prev).map_err(io(&prev))?;
    }
    save_record(
        state_dir,
        &UpdateRecord {
            from: from.to_owned(),
            to: r.version.clone(),
            sha256: hex::encode(r.sha256),
            exe: exe.to_owned(),
            prev: prev.clone(),
            starts: 0,
            outcome: Outcome::Pending,
            at_unix: UnixMillis::now().as_secs(),
        },
    )?;
    std::fs::rename(new, exe).map_err(io(exe))?;
    Ok(())
}

/// `exe` with `.suffix` added to its file name, in the same directory.
pub fn sibling(exe: &Path, suffix: &str) -> PathBuf {
    let mut name = exe.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    exe.with_file_name(name)
}

/// The whole update for one advertised release: key, signature, download, checksum, swap.
/// Returns the executable to restart into.
pub async fn apply(
    config: &UpdateConfig,
    state_dir: &Path,
    current: &str,
    r: &AgentRelease,
) -> Result<PathBuf, UpdateError> {
    let key = release_key(config, state_dir, &r.public_key)?;
    verify_signature(r, &key)?;
    let base = config
        .url
        .clone()
        .filter(|u| !u.is_empty())
        .or_else(|| (!r.base_url.is_empty()).then(|| r.base_url.clone()))
        .ok_or(UpdateError::NoUrl)?;
    let url = format!("{}{}", base.trim_end_matches('/'), r.path);
    let exe = std::env::current_exe().map_err(io(Path::new("current executable")))?;
    let exe = exe.canonicalize().unwrap_or(exe);
    let download = sibling(&exe, "download");
    info!(from = %current, to = %r.version, %url, "downloading a newer agent");
    crate::tls::install_provider();
    let mut client = reqwest::Client::builder().timeout(Duration::from_secs(600));
    // A controller serving HTTPS with the fleet CA's certificate: the CA this agent pinned at
    // enrollment is trusted for the download too (besides the public roots).
    if let Some(ca) = std::fs::read(state_dir.join("ca.crt"))
        .ok()
        .and_then(|pem| reqwest::Certificate::from_pem(&pem).ok())
    {
        client = client.add_root_certificate(ca);
    }
    let client = client.build().map_err(|e| UpdateError::Download {
        url: url.clone(),
        message: e.to_string(),
    })?;
    download_verified(&client, &url, &r.sha256, &download).await?;
    swap(state_dir, &exe, &download, current, r)?;
    info!(from = %current, to = %r.version, "checksum and signature verified; binary swapped, restarting");
    Ok(exe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-file HTTP server on 127.0.0.1 (what the controller's `/downloads/` looks like to
    /// the agent), serving `body` to every request.
    async fn serve(body: Vec<u8>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: application/octet-stream\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&body).await;
                });
            }
        });
        format!("http://{addr}")
    }

    fn signed(binary: &[u8], key: &ring::signature::Ed25519KeyPair, version: &str) -> AgentRelease {
        use ring::signature::KeyPair;
        let sha256: [u8; 32] = Sha256::digest(binary).into();
        let manifest = release::manifest(
            version,
            std::env::consts::OS,
            std::env::consts::ARCH,
            &sha256,
        );
        AgentRelease {
            version: version.into(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            path: "/downloads/agent".into(),
            base_url: String::new(),
            sha256,
            signature: key.sign(manifest.as_bytes()).as_ref().to_vec(),
            public_key: key.public_key().as_ref().to_vec(),
        }
    }

    fn keypair() -> ring::signature::Ed25519KeyPair {
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .unwrap();
        ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
    }

    #[tokio::test]
    async fn a_download_with_the_wrong_checksum_is_refused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let good = b"#!/bin/sh\necho new agent\n".to_vec();
        let key = keypair();
        let r = signed(&good, &key, "9.0.0");
        crate::tls::install_provider();
        let client = reqwest::Client::new();
        let dest = dir.path().join("agent.download");
        // The server hands out other bytes than the release names.
        let url = serve(b"#!/bin/sh\necho tampered\n".to_vec()).await;
        let err = download_verified(&client, &format!("{url}/x"), &r.sha256, &dest)
            .await
            .unwrap_err();
        assert!(matches!(err, UpdateError::Checksum { .. }), "{err}");
        assert!(!dest.exists(), "a refused download is deleted");
        // The right bytes pass and are executable.
        let url = serve(good.clone()).await;
        download_verified(&client, &format!("{url}/x"), &r.sha256, &dest)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), good);
    }

    #[test]
    fn signatures_bind_version_platform_and_digest_to_the_key() {
        let key = keypair();
        let other = keypair();
        let r = signed(b"binary", &key, "2.0.0");
        let k: [u8; 32] = r.public_key.clone().try_into().unwrap();
        verify_signature(&r, &k).unwrap();
        // Another version, another digest, another key: refused.
        let mut v = r.clone();
        v.version = "3.0.0".into();
        assert!(matches!(
            verify_signature(&v, &k),
            Err(UpdateError::Signature)
        ));
        let mut d = r.clone();
        d.sha256[0] ^= 1;
        assert!(matches!(
            verify_signature(&d, &k),
            Err(UpdateError::Signature)
        ));
        let forged = signed(b"binary", &other, "2.0.0");
        assert!(matches!(
            verify_signature(&forged, &k),
            Err(UpdateError::Signature)
        ));
    }

    #[test]
    fn the_first_key_is_pinned_and_a_changed_key_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = UpdateConfig::default();
        let a = keypair();
        let b = keypair();
        use ring::signature::KeyPair;
        release_key(&cfg, dir.path(), a.public_key().as_ref()).unwrap();
        release_key(&cfg, dir.path(), a.public_key().as_ref()).unwrap();
        let err = release_key(&cfg, dir.path(), b.public_key().as_ref()).unwrap_err();
        assert!(matches!(err, UpdateError::KeyChanged { .. }), "{err}");
        // A configured key wins over what is advertised.
        let cfg = UpdateConfig {
            release_key: Some(hex::encode(b.public_key().as_ref())),
            ..UpdateConfig::default()
        };
        assert!(release_key(&cfg, dir.path(), a.public_key().as_ref()).is_err());
        assert!(release_key(&cfg, dir.path(), b.public_key().as_ref()).is_ok());
    }

    #[test]
    fn swap_confirm_and_roll_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let exe = dir.path().join("nebula-agent");
        std::fs::write(&exe, b"old").unwrap();
        let new = dir.path().join("new");
        std::fs::write(&new, b"new").unwrap();
        let r = signed(b"new", &keypair(), "1.1.0");
        swap(&state, &exe, &new, "1.0.0", &r).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"new");
        assert_eq!(std::fs::read(sibling(&exe, "prev")).unwrap(), b"old");
        // The new version starts and must confirm.
        let s = on_start(&state, "1.1.0", Duration::from_secs(60));
        assert!(matches!(s, Startup::Confirming { .. }));
        confirm(&state);
        assert_eq!(load_record(&state).unwrap().outcome, Outcome::Confirmed);
        assert!(!sibling(&exe, "prev").exists());
        assert_eq!(
            on_start(&state, "1.1.0", Duration::from_secs(60)),
            Startup::Normal
        );

        // A second update that never confirms: after MAX_STARTS starts the old binary is back.
        std::fs::write(&new, b"newer").unwrap();
        let r2 = signed(b"newer", &keypair(), "1.2.0");
        swap(&state, &exe, &new, "1.1.0", &r2).unwrap();
        for _ in 0..MAX_STARTS {
            assert!(matches!(
                on_start(&state, "1.2.0", Duration::from_secs(60)),
                Startup::Confirming { .. }
            ));
        }
        assert_eq!(
            on_start(&state, "1.2.0", Duration::from_secs(60)),
            Startup::RolledBack { exe: exe.clone() }
        );
        assert_eq!(std::fs::read(&exe).unwrap(), b"new");
        // That release is not picked again; a later one is.
        assert!(pick(std::slice::from_ref(&r2), "1.1.0", &state).is_none());
        let r3 = signed(b"newest", &keypair(), "1.3.0");
        assert!(pick(std::slice::from_ref(&r3), "1.1.0", &state).is_some());
        // Nothing older or equal is picked.
        assert!(pick(std::slice::from_ref(&r3), "1.3.0", &state).is_none());

        // A deadline rollback.
        swap(
            &state,
            &exe,
            &{
                std::fs::write(&new, b"x").unwrap();
                new.clone()
            },
            "1.1.0",
            &r3,
        )
        .unwrap();
        assert_eq!(
            roll_back_pending(&state, "no contact").unwrap(),
            Some(exe.clone())
        );
        assert_eq!(std::fs::read(&exe).unwrap(), b"new");
        assert_eq!(
            load_record(&state).unwrap().outcome,
            Outcome::RolledBack("no contact".into())
        );
        assert_eq!(roll_back_pending(&state, "again").unwrap(), None);
    }
}
