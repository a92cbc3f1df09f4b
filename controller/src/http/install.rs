//! Public routes for installing agents: `/install.sh` and `/install.ps1` pre-filled with this
//! controller's addresses, CA pin, release key and checksums; `/downloads/nebula-agent-{os}-{arch}`
//! with `.sha256`, `.manifest` and `.sig` beside each. No token: the scripts hold no secret, and
//! the join token is given on the command line.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use nebula_protocol::release;

use super::{ApiError, ApiResult};
use crate::ControlPlane;

pub const INSTALL_SH: &str = include_str!("../../../installers/install.sh");
pub const INSTALL_PS1: &str = include_str!("../../../installers/install.ps1");

const BEGIN: &str = "# @nebula-defaults-begin";
const END: &str = "# @nebula-defaults-end";

/// Where clients reach this controller: the HTTP base URL and the QUIC address agents dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicAddresses {
    pub url: String,
    pub quic: String,
}

/// The configured public addresses, else ones derived from the request: `Host` (checked: it ends
/// up inside a script) and `X-Forwarded-Proto` from a TLS proxy.
pub fn public_addresses(cp: &ControlPlane, headers: &HeaderMap) -> ApiResult<PublicAddresses> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let host_ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b));
    let url = match &cp.config.public_url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => {
            if !host_ok {
                return Err(ApiError::bad_request(
                    "the Host header is missing or not a host name (or set public_url)",
                ));
            }
            let https = headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|p| p.eq_ignore_ascii_case("https"));
            format!("{}://{host}", if https { "https" } else { "http" })
        }
    };
    let quic = match &cp.config.public_address {
        Some(a) => a.clone(),
        None => {
            let name = url
                .split_once("://")
                .map_or(url.as_str(), |(_, rest)| rest)
                .split('/')
                .next()
                .unwrap_or_default();
            // Strip a port, keeping an IPv6 literal's brackets.
            let name = match name.rfind(':') {
                Some(i) if !name[i..].contains(']') => &name[..i],
                _ => name,
            };
            format!("{name}:{}", cp.quic_port())
        }
    };
    Ok(PublicAddresses { url, quic })
}

/// The served builds, looked at again (on a blocking thread: changed files are hashed).
pub(crate) async fn scanned(
    cp: &Arc<ControlPlane>,
) -> ApiResult<Arc<Vec<nebula_protocol::release::AgentRelease>>> {
    let r = cp.releases.clone();
    tokio::task::spawn_blocking(move || r.scan())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// The addresses to put in a script, each safe inside single quotes.
fn script_addresses(cp: &ControlPlane, headers: &HeaderMap) -> ApiResult<PublicAddresses> {
    let addrs = public_addresses(cp, headers)?;
    if !quotable(&addrs.url) || !quotable(&addrs.quic) {
        return Err(ApiError::bad_request(
            "the controller's address cannot be quoted",
        ));
    }
    Ok(addrs)
}

/// A value safe inside single quotes in both sh and PowerShell.
fn quotable(v: &str) -> bool {
    !v.contains('\'') && !v.contains('\n') && !v.contains('\r')
}

/// Every replica's QUIC address, space-separated, for the script (addresses that could not be
/// quoted safely, or hold spaces or quotes, are left out).
fn replica_list(cp: &ControlPlane) -> String {
    let list = cp.ha.quic_addrs();
    let list = list.borrow();
    list.iter()
        .filter(|a| quotable(a) && !a.contains([' ', '"', '\\', '$', '`']))
        .cloned()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fill in the script's defaults block.
fn render(template: &str, block: &str) -> Option<String> {
    let start = template.find(BEGIN)?;
    let end = template[start..].find(END)? + start;
    let end = end + template[end..].find('\n')? + 1;
    Some(format!("{}{block}{}", &template[..start], &template[end..]))
}

pub async fn install_sh(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let addrs = script_addresses(&cp, &headers)?;
    let releases = scanned(&cp).await?;
    let signer = cp.releases.signer();
    let mut cases = String::new();
    for r in releases.iter().filter(|r| r.os == "linux") {
        cases.push_str(&format!(
            "        {}) echo '{}' ;;\n",
            release::file_name(&r.os, &r.arch),
            hex::encode(r.sha256)
        ));
    }
    let block = format!(
        "# Filled in by the controller at {url}.\n\
         DEFAULT_URL='{url}'\n\
         DEFAULT_CONTROLLER='{quic}'\n\
         DEFAULT_REPLICAS='{replicas}'\n\
         CA_PIN='{pin}'\n\
         CA_PEM='{ca_pem}'\n\
         RELEASE_KEY_HEX='{key}'\n\
         RELEASE_KEY_PEM='{pem}'\n\
         expected_sha256() {{\n    case \"$1\" in\n{cases}        *) ;;\n    esac\n}}\n",
        url = addrs.url,
        quic = addrs.quic,
        replicas = replica_list(&cp),
        pin = cp.ca.pin_hex(),
        ca_pem = match cp.https.as_ref().map(|h| &h.source) {
            Some(crate::https::Source::FleetCa { .. }) => cp.ca.ca_pem(),
            _ => String::new(),
        },
        key = signer.public_key_hex(),
        pem = signer.public_key_pem().trim_end(),
    );
    let script = render(INSTALL_SH, &block)
        .ok_or_else(|| ApiError::internal("install.sh has no defaults block"))?;
    Ok(script_response(script, "text/x-shellscript; charset=utf-8"))
}

pub async fn install_ps1(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let addrs = script_addresses(&cp, &headers)?;
    let releases = scanned(&cp).await?;
    let mut table = String::new();
    for r in releases.iter().filter(|r| r.os == "windows") {
        table.push_str(&format!(
            "    '{}' = '{}'\n",
            release::file_name(&r.os, &r.arch),
            hex::encode(r.sha256)
        ));
    }
    let block = format!(
        "# Filled in by the controller at {url}.\n\
         $DefaultUrl = '{url}'\n\
         $DefaultController = '{quic}'\n\
         $CaPin = '{pin}'\n\
         $ReleaseKeyHex = '{key}'\n\
         $ExpectedSha256 = @{{\n{table}}}\n",
        url = addrs.url,
        quic = addrs.quic,
        pin = cp.ca.pin_hex(),
        key = cp.releases.signer().public_key_hex(),
    );
    let script = render(INSTALL_PS1, &block)
        .ok_or_else(|| ApiError::internal("install.ps1 has no defaults block"))?;
    Ok(script_response(script, "text/plain; charset=utf-8"))
}

fn script_response(script: String, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        script,
    )
        .into_response()
}

/// `GET /downloads/{file}`: a binary, or its `.sha256` (sha256sum format), `.manifest` (the line
/// the signature covers) or `.sig` (64 raw bytes).
pub async fn download(
    State(cp): State<Arc<ControlPlane>>,
    Path(file): Path<String>,
) -> ApiResult<Response> {
    let (name, kind) = ["sha256", "manifest", "sig"]
        .iter()
        .find_map(|ext| {
            file.strip_suffix(&format!(".{ext}"))
                .map(|n| (n.to_owned(), *ext))
        })
        .unwrap_or((file.clone(), "binary"));
    if release::parse_file_name(&name).is_none() {
        return Err(ApiError::not_found(format!(
            "no such download `{file}` (files are named nebula-agent-{{os}}-{{arch}})"
        )));
    }
    let found = {
        let r = cp.releases.clone();
        let name = name.clone();
        tokio::task::spawn_blocking(move || r.find(&name))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
    };
    let Some(served) = found else {
        return Err(ApiError::not_found(format!(
            "this controller serves no `{name}` (put it in the agent directory)"
        )));
    };
    let r = &served.release;
    let text = |body: String| {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            )],
            body,
        )
            .into_response()
    };
    Ok(match kind {
        "sha256" => text(format!("{}  {name}\n", hex::encode(r.sha256))),
        "manifest" => text(release::manifest(&r.version, &r.os, &r.arch, &r.sha256)),
        "sig" => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            )],
            r.signature.clone(),
        )
            .into_response(),
        _ => {
            let file = tokio::fs::File::open(&served.path)
                .await
                .map_err(|e| ApiError::internal(format!("opening the agent binary: {e}")))?;
            let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
            let mut resp = Body::from_stream(stream).into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(served.len));
            h.insert(
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&format!("attachment; filename=\"{name}\""))
                    .map_err(|e| ApiError::internal(e.to_string()))?,
            );
            if let Ok(v) = HeaderValue::from_str(&r.version) {
                h.insert("x-nebula-agent-version", v);
            }
            *resp.status_mut() = StatusCode::OK;
            resp
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_block_is_replaced_and_nothing_else() {
        let out = render(INSTALL_SH, "DEFAULT_URL='http://x'\n").unwrap();
        assert!(out.starts_with("#!/bin/sh\n"));
        assert!(out.contains("DEFAULT_URL='http://x'\n\nBIN=/usr/local/bin/nebula-agent"));
        assert!(!out.contains(BEGIN) && !out.contains(END));
        assert_eq!(out.matches("DEFAULT_URL=").count(), 1);
        let ps = render(INSTALL_PS1, "$DefaultUrl = 'http://x'\n").unwrap();
        assert!(ps.contains("$DefaultUrl = 'http://x'\n\n$ServiceName"));
        assert!(render("no block", "x").is_none());
    }
}
