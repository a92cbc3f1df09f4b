//! The `tailscale` source: the certificate of this node's tailnet name (`box.tail1234.ts.net`),
//! from tailscaled's local API (`/localapi/v0/status` for the name, `/localapi/v0/cert/NAME`
//! for the pair). tailscaled gets it from Let's Encrypt and renews it; the tailnet needs
//! HTTPS certificates switched on in its admin console.

use std::path::Path;

use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
};
use rustls::sign::CertifiedKey;

/// Where tailscaled listens on Linux.
pub const DEFAULT_SOCKET: &str = "/var/run/tailscale/tailscaled.sock";

/// The certificate and key for this node's first certificate name, and that name.
#[cfg(unix)]
pub async fn fetch(socket: &Path) -> Result<(CertifiedKey, String), String> {
    let api = tailscale_localapi::LocalApi::new_with_socket_path(socket);
    let said =
        |e: tailscale_localapi::Error| format!("tailscaled at {}: {e} ({e:?})", socket.display());
    let status = api.status().await.map_err(said)?;
    let name = status
        .cert_domains
        .first()
        .cloned()
        .or_else(|| {
            let n = status.self_status.dnsname.trim_end_matches('.');
            (!n.is_empty()).then(|| n.to_owned())
        })
        .ok_or_else(|| {
            "tailscaled names no certificate domain: switch HTTPS certificates on in the \
             tailnet's admin console"
                .to_owned()
        })?;
    let (key, chain) = api.certificate_pair(&name).await.map_err(said)?;
    let chain: Vec<CertificateDer<'static>> = chain
        .into_iter()
        .map(|c| CertificateDer::from(c.0))
        .collect();
    // The local API's key comes without its PEM label: try each encoding.
    let candidates = [
        PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(key.0.clone())),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.0.clone())),
        PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(key.0)),
    ];
    let mut last = String::new();
    for k in &candidates {
        match super::certified(chain.clone(), k) {
            Ok(ck) => return Ok((ck, name)),
            Err(e) => last = e,
        }
    }
    Err(format!(
        "the certificate tailscaled gave for {name}: {last}"
    ))
}

#[cfg(not(unix))]
pub async fn fetch(_socket: &Path) -> Result<(CertifiedKey, String), String> {
    Err("the tailscale source needs tailscaled's Unix socket (Linux, macOS)".into())
}
