//! The keys secrets are encrypted under: a file only its owner may read, one key per line, the
//! first one the key new values are sealed with. Each value is sealed with AES-256-GCM (ring)
//! under a fresh random nonce, and bound to its name, version and key id as associated data,
//! so a sealed value moved to another name or version does not open.
//!
//! ```text
//! nebula-secret-key v1 3f9a0c1d <base64 of 32 bytes>
//! ```

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

const MAGIC: &str = "nebula-secret-key";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The key file's keys, the active one first.
pub struct Keyring {
    path: PathBuf,
    keys: Vec<(String, [u8; 32])>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        write!(f, "Keyring({}, keys {ids:?})", self.path.display())
    }
}

/// A value sealed under a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    /// Base64 of nonce, ciphertext and tag.
    pub data: String,
}

fn aad(name: &str, version: u32, key_id: &str) -> Vec<u8> {
    format!("nebula-secret/v1\0{name}\0{version}\0{key_id}").into_bytes()
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the system's random source");
    b
}

impl Keyring {
    /// Read the key file, or create it (0600) with one new key.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let keys = parse(&text)
                    .map_err(|e| anyhow::anyhow!("the secret key file {}: {e}", path.display()))?;
                Ok(Self {
                    path: path.to_owned(),
                    keys,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let ring = Self {
                    path: path.to_owned(),
                    keys: vec![new_key()],
                };
                ring.save()?;
                tracing::info!(
                    path = %path.display(),
                    "created the key secrets are encrypted under: back it up (without it the secrets are lost)"
                );
                Ok(ring)
            }
            Err(e) => Err(anyhow::anyhow!(
                "reading the secret key file {}: {e}",
                path.display()
            )),
        }
    }

    fn save(&self) -> std::io::Result<()> {
        let mut text = String::new();
        for (id, key) in &self.keys {
            text.push_str(&format!("{MAGIC} v1 {id} {}\n", B64.encode(key)));
        }
        crate::ca::write_private_io(&self.path, text.as_bytes())
    }

    /// The key new values are sealed with.
    pub fn active_id(&self) -> &str {
        &self.keys[0].0
    }

    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|(id, _)| id.clone()).collect()
    }

    fn key(&self, id: &str) -> Option<LessSafeKey> {
        let (_, k) = self.keys.iter().find(|(i, _)| i == id)?;
        Some(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k).ok()?))
    }

    /// Seal `value` as version `version` of `name` under the active key.
    pub fn seal(&self, name: &str, version: u32, value: &[u8]) -> Sealed {
        let key_id = self.active_id().to_owned();
        let key = self
            .key(&key_id)
            .expect("the active key is a valid AES-256 key");
        let nonce = random::<NONCE_LEN>();
        let mut buf = value.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(name, version, &key_id)),
            &mut buf,
        )
        .expect("sealing fits in memory");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Sealed {
            key_id,
            data: B64.encode(out),
        }
    }

    /// Open a sealed version of `name`.
    pub fn open(&self, name: &str, version: u32, sealed: &Sealed) -> Result<Vec<u8>, String> {
        let key = self.key(&sealed.key_id).ok_or_else(|| {
            format!(
                "`{name}` version {version} is encrypted under key {}, which the key file does not hold",
                sealed.key_id
            )
        })?;
        let bytes = B64
            .decode(&sealed.data)
            .map_err(|_| format!("`{name}` version {version} is not a sealed value"))?;
        if bytes.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(format!("`{name}` version {version} is cut short"));
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "a bad nonce")?;
        let mut buf = rest.to_vec();
        let plain = key
            .open_in_place(
                nonce,
                Aad::from(aad(name, version, &sealed.key_id)),
                &mut buf,
            )
            .map_err(|_| {
                format!(
                    "`{name}` version {version} does not open (altered, or moved from elsewhere)"
                )
            })?;
        Ok(plain.to_vec())
    }

    /// Put a new key first (new values are sealed with it); the others stay for reading.
    pub fn rotate(&mut self) -> std::io::Result<String> {
        let key = new_key();
        let id = key.0.clone();
        self.keys.insert(0, key);
        if let Err(e) = self.save() {
            self.keys.remove(0);
            return Err(e);
        }
        Ok(id)
    }

    /// Remove the keys other than the active one that no stored version uses (`in_use`).
    pub fn retire(&mut self, in_use: &[String]) -> std::io::Result<Vec<String>> {
        let active = self.active_id().to_owned();
        let before = self.keys.clone();
        self.keys
            .retain(|(id, _)| *id == active || in_use.contains(id));
        let removed: Vec<String> = before
            .iter()
            .filter(|(id, _)| !self.keys.iter().any(|(k, _)| k == id))
            .map(|(id, _)| id.clone())
            .collect();
        if !removed.is_empty() {
            if let Err(e) = self.save() {
                self.keys = before;
                return Err(e);
            }
        }
        Ok(removed)
    }
}

fn new_key() -> (String, [u8; 32]) {
    (hex::encode(random::<4>()), random::<32>())
}

fn parse(text: &str) -> Result<Vec<(String, [u8; 32])>, String> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [MAGIC, "v1", id, key] = parts.as_slice() else {
            return Err(format!("line {}: expected `{MAGIC} v1 ID KEY`", n + 1));
        };
        let key = B64
            .decode(key)
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
            .ok_or_else(|| format!("line {}: the key is not 32 bytes of base64", n + 1))?;
        if id.is_empty() || id.len() > 32 || keys.iter().any(|(k, _)| k == id) {
            return Err(format!(
                "line {}: key id `{id}` is empty, long or repeated",
                n + 1
            ));
        }
        keys.push(((*id).to_owned(), key));
    }
    if keys.is_empty() {
        return Err("it holds no key".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> (tempfile::TempDir, Keyring) {
        let dir = tempfile::tempdir().unwrap();
        let r = Keyring::load_or_create(&dir.path().join("secret.key")).unwrap();
        (dir, r)
    }

    #[test]
    fn a_value_opens_only_as_the_name_and_version_it_was_sealed_for() {
        let (_d, r) = ring();
        let s = r.seal("db_password", 2, b"hunter2");
        assert!(!s.data.contains("hunter2"));
        assert_eq!(r.open("db_password", 2, &s).unwrap(), b"hunter2");
        assert!(r.open("db_password", 3, &s).is_err(), "another version");
        assert!(r.open("api_key", 2, &s).is_err(), "another name");
        let other = Sealed {
            key_id: "feedbeef".into(),
            data: s.data.clone(),
        };
        assert!(r
            .open("db_password", 2, &other)
            .unwrap_err()
            .contains("feedbeef"));
        let mut altered = B64.decode(&s.data).unwrap();
        *altered.last_mut().unwrap() ^= 1;
        let altered = Sealed {
            key_id: s.key_id.clone(),
            data: B64.encode(altered),
        };
        assert!(r.open("db_password", 2, &altered).is_err());
        assert_ne!(
            r.seal("x", 1, b"v").data,
            r.seal("x", 1, b"v").data,
            "fresh nonces"
        );
    }

    #[test]
    fn the_key_file_is_private_and_rotation_keeps_old_keys_until_retired() {
        let (dir, mut r) = ring();
        let path = dir.path().join("secret.key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let old = r.active_id().to_owned();
        let sealed = r.seal("a", 1, b"one");
        let new = r.rotate().unwrap();
        assert_ne!(old, new);
        let again = Keyring::load_or_create(&path).unwrap();
        assert_eq!(again.active_id(), new);
        assert_eq!(
            again.open("a", 1, &sealed).unwrap(),
            b"one",
            "the old key still reads"
        );
        assert!(
            r.retire(std::slice::from_ref(&old)).unwrap().is_empty(),
            "in use"
        );
        assert_eq!(r.retire(&[]).unwrap(), vec![old.clone()]);
        let after = Keyring::load_or_create(&path).unwrap();
        assert_eq!(after.ids(), vec![new]);
        assert!(after.open("a", 1, &sealed).is_err());
    }

    #[test]
    fn a_broken_key_file_is_refused_with_its_line() {
        assert!(parse("").unwrap_err().contains("no key"));
        assert!(parse("nebula-secret-key v1 ab c2hvcnQ=\n")
            .unwrap_err()
            .contains("line 1"));
        let key = B64.encode([7u8; 32]);
        let twice = format!("{MAGIC} v1 ab {key}\n{MAGIC} v1 ab {key}\n");
        assert!(parse(&twice).unwrap_err().contains("line 2"));
        assert_eq!(
            parse(&format!("# backup me\n{MAGIC} v1 ab {key}\n"))
                .unwrap()
                .len(),
            1
        );
    }
}
