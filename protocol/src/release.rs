//! Agent releases: what the controller serves at `/downloads/` and advertises to agents
//! ([`crate::ControllerMessage::AgentReleases`], protocol 1.3), and the rules both sides (and the
//! installers) use to check a downloaded binary.
//!
//! A release is trusted when its SHA-256 matches and an Ed25519 signature by the controller's
//! release-signing key covers its [`manifest`]: one line naming the version, platform and digest,
//! so that a signature cannot be replayed for another version or platform.

use serde::{Deserialize, Serialize};

/// Bytes that precede the version inside every agent binary ([`VERSION_STAMP_LEN`] bytes in all,
/// NUL-padded). The controller reads a served binary's version from it without running it (the
/// binary may be for another platform).
pub const VERSION_STAMP_PREFIX: &[u8] = b"nebula-agent-version:";

/// Size of the stamp: the prefix, the version and NUL padding.
pub const VERSION_STAMP_LEN: usize = 64;

/// One agent binary the controller serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRelease {
    /// The version stamped in the binary, e.g. `0.1.0`.
    pub version: String,
    /// `std::env::consts::OS` of the platform it runs on (`linux`, `windows`).
    pub os: String,
    /// `std::env::consts::ARCH` (`x86_64`, `aarch64`).
    pub arch: String,
    /// Where to download it: a path on the controller's HTTP server (`/downloads/...`).
    pub path: String,
    /// The controller's own idea of its public HTTP address, when configured (else empty: the
    /// agent uses the address it was installed from).
    pub base_url: String,
    pub sha256: [u8; 32],
    /// Ed25519 signature of [`manifest`] (64 bytes).
    pub signature: Vec<u8>,
    /// The controller's release-signing public key (32 bytes).
    pub public_key: Vec<u8>,
}

/// The file name a platform's binary is served under.
pub fn file_name(os: &str, arch: &str) -> String {
    let exe = if os == "windows" { ".exe" } else { "" };
    format!("nebula-agent-{os}-{arch}{exe}")
}

/// The platform of a served file name (`nebula-agent-linux-x86_64` -> (`linux`, `x86_64`)).
pub fn parse_file_name(name: &str) -> Option<(String, String)> {
    let rest = name.strip_prefix("nebula-agent-")?;
    let rest = rest.strip_suffix(".exe").unwrap_or(rest);
    let (os, arch) = rest.split_once('-')?;
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    (ok(os) && ok(arch) && file_name(os, arch) == name).then(|| (os.to_owned(), arch.to_owned()))
}

/// The exact text a release signature covers (one line, newline-terminated).
pub fn manifest(version: &str, os: &str, arch: &str, sha256: &[u8; 32]) -> String {
    let mut hex = String::with_capacity(64);
    for b in sha256 {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("nebula-agent {version} {os}-{arch} sha256:{hex}\n")
}

/// The version stamped in a binary, if it has a stamp. The prefix alone also appears in a
/// binary's constants: the first occurrence that reads as a whole stamp counts.
pub fn find_version_stamp(binary: &[u8]) -> Option<String> {
    find_version_stamp_at(binary).map(|(_, v)| v)
}

/// Where the stamp starts, and the version in it.
pub fn find_version_stamp_at(binary: &[u8]) -> Option<(usize, String)> {
    binary
        .windows(VERSION_STAMP_PREFIX.len())
        .enumerate()
        .filter(|(_, w)| *w == VERSION_STAMP_PREFIX)
        .find_map(|(at, _)| {
            let stamp = binary.get(at..at + VERSION_STAMP_LEN)?;
            Some((at, parse_version_stamp(stamp)?))
        })
}

/// The version inside one stamp (prefix, version, NUL padding).
pub fn parse_version_stamp(stamp: &[u8]) -> Option<String> {
    let rest = stamp.strip_prefix(VERSION_STAMP_PREFIX)?;
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let v = std::str::from_utf8(&rest[..end]).ok()?;
    (!v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-+".contains(&b)))
    .then(|| v.to_owned())
}

/// A stamp for `version` (a `const fn`, so that the agent can place it in a static).
pub const fn version_stamp(version: &str) -> [u8; VERSION_STAMP_LEN] {
    let mut out = [0u8; VERSION_STAMP_LEN];
    let p = VERSION_STAMP_PREFIX;
    let v = version.as_bytes();
    assert!(
        p.len() + v.len() < VERSION_STAMP_LEN,
        "version too long for the stamp"
    );
    let mut i = 0;
    while i < p.len() {
        out[i] = p[i];
        i += 1;
    }
    let mut j = 0;
    while j < v.len() {
        out[i + j] = v[j];
        j += 1;
    }
    out
}

/// Compare two dotted versions numerically (`0.10.0` > `0.9.1`); a pre-release suffix
/// (`1.0.0-rc1`) sorts before the release. `None` when either is not a version.
pub fn compare_versions(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    fn parts(v: &str) -> Option<(Vec<u64>, Option<&str>)> {
        let v = v.split('+').next()?;
        let (core, pre) = match v.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (v, None),
        };
        let nums = core
            .split('.')
            .map(|p| p.parse::<u64>().ok())
            .collect::<Option<Vec<_>>>()?;
        Some((nums, pre))
    }
    let (an, ap) = parts(a)?;
    let (bn, bp) = parts(b)?;
    let len = an.len().max(bn.len());
    for i in 0..len {
        let (x, y) = (
            an.get(i).copied().unwrap_or(0),
            bn.get(i).copied().unwrap_or(0),
        );
        if x != y {
            return Some(x.cmp(&y));
        }
    }
    Some(match (ap, bp) {
        (None, None) => std::cmp::Ordering::Equal,
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (Some(x), Some(y)) => x.cmp(y),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering::*;

    #[test]
    fn stamps_are_found_and_read() {
        let stamp = version_stamp("0.4.2");
        // The bare prefix (a constant in the binary) before the stamp is skipped.
        let mut bin = VERSION_STAMP_PREFIX.to_vec();
        bin.extend_from_slice(b".\x01rest");
        bin.extend_from_slice(&[7u8; 1000]);
        bin.extend_from_slice(&stamp);
        bin.extend_from_slice(&[1, 2, 3]);
        assert_eq!(find_version_stamp(&bin).as_deref(), Some("0.4.2"));
        assert_eq!(find_version_stamp(&[0u8; 100]), None);
        // A stamp cut short by the end of the file is not read.
        assert_eq!(find_version_stamp(&stamp[..30]), None);
        let mut bad = stamp;
        bad[VERSION_STAMP_PREFIX.len()] = b' ';
        assert_eq!(parse_version_stamp(&bad), None);
    }

    #[test]
    fn file_names_round_trip_and_junk_is_refused() {
        assert_eq!(
            file_name("windows", "x86_64"),
            "nebula-agent-windows-x86_64.exe"
        );
        assert_eq!(
            parse_file_name("nebula-agent-linux-aarch64"),
            Some(("linux".into(), "aarch64".into()))
        );
        assert_eq!(
            parse_file_name("nebula-agent-windows-x86_64.exe"),
            Some(("windows".into(), "x86_64".into()))
        );
        for bad in [
            "nebula-agent-linux",
            "nebula-agent-linux-x86_64.exe",
            "nebula-agent-../x",
            "nebula-agent-linux-x86_64.sha256",
            "other",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("0.10.0", "0.9.1"), Some(Greater));
        assert_eq!(compare_versions("1.0", "1.0.0"), Some(Equal));
        assert_eq!(compare_versions("1.0.0-rc1", "1.0.0"), Some(Less));
        assert_eq!(compare_versions("0.1.0", "0.1.1"), Some(Less));
        assert_eq!(compare_versions("x", "0.1.1"), None);
    }

    #[test]
    fn the_manifest_names_version_platform_and_digest() {
        let m = manifest("0.1.0", "linux", "x86_64", &[0xab; 32]);
        assert_eq!(
            m,
            format!(
                "nebula-agent 0.1.0 linux-x86_64 sha256:{}\n",
                "ab".repeat(32)
            )
        );
    }
}
