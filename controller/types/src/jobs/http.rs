//! `http` and `infer` jobs: defaults, the request's checks, and URLs as shown to people.

use std::collections::BTreeMap;
use std::time::Duration;

pub(super) fn get() -> String {
    "GET".to_owned()
}

/// How long an `http` job waits by default.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an `infer` job waits by default (a model load included).
pub const INFER_TIMEOUT: Duration = Duration::from_secs(300);
/// Response bytes an `http` job keeps by default.
pub const HTTP_MAX_BYTES: u32 = 256 << 10;

/// An `http` job's request, checked before any agent sees it.
pub(super) fn validate_http(
    method: &str,
    url: &str,
    headers: &BTreeMap<String, String>,
    body: Option<&str>,
    timeout: Option<Duration>,
    max_bytes: Option<u32>,
) -> Result<(), String> {
    use nebula_protocol::jobs::{HttpSpec, MAX_HTTP_BODY};
    if !HttpSpec::METHODS.contains(&method) {
        return Err(format!(
            "http `method` must be one of {}, not `{method}`",
            HttpSpec::METHODS.join(", ")
        ));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 8192 {
        return Err(format!(
            "http `url` must be an http:// or https:// URL, not `{url}`"
        ));
    }
    // Headers that frame the request are the client's to set.
    const FRAMING: [&str; 6] = [
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
    ];
    let bad_header = headers.iter().find(|(k, v)| {
        FRAMING.contains(&k.to_ascii_lowercase().as_str())
            || k.is_empty()
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            || v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
    });
    if let Some((k, _)) = bad_header {
        return Err(format!(
            "http header `{k}` is not a header name with a one-line value"
        ));
    }
    if headers.len() > 64 || body.is_some_and(|b| b.len() > 1 << 20) {
        return Err("http takes at most 64 headers and a body of 1 MiB".into());
    }
    if timeout.is_some_and(|t| t > Duration::from_secs(600) || t.is_zero()) {
        return Err("http timeout must be between 1ms and 10m".into());
    }
    if max_bytes.is_some_and(|m| m > MAX_HTTP_BODY) {
        return Err(format!("http `max_bytes` is at most {MAX_HTTP_BODY}"));
    }
    Ok(())
}

/// A URL without its user information and with its query as `***` (either may hold a token).
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, _)) => (b, "?***"),
        None => (url, ""),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let host_start = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(host_start);
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => base.to_owned(),
    };
    format!("{base}{query}")
}
