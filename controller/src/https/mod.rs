//! HTTPS on the HTTP listener: one certificate resolver, fed by one source.
//!
//! * `files`: a certificate chain and key in PEM files (from certbot, a company CA, ...),
//!   read again whenever either changes on disk; a pair that does not load is logged and the
//!   certificate in use stays.
//! * `fleet-ca`: a certificate from the fleet's own CA (the one agents already pin) for the
//!   names listed, kept in `<data_dir>/pki/https.{crt,key}` and issued again at two thirds of
//!   its lifetime. Browsers must be told to trust the CA (`<data_dir>/pki/ca.crt`).
//! * `tailscale`: the node's tailnet certificate from tailscaled's local API.
//! * `acme`: a certificate from an ACME CA ([`acme`]).
//!
//! The listener hands each accepted connection to [`Https::acceptor`] before HTTP; requests that
//! came over TLS carry `x-forwarded-proto: https` (set by the listener, whatever the client
//! sent), so cookies get `Secure`. [`hsts`] adds `Strict-Transport-Security` when the name the
//! browser used is a public one. A second, plain listener (`redirect_listen`) answers every
//! request with a redirect to the HTTPS address.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ca::CertificateAuthority;

pub mod acme;
mod tailscale;

/// Lifetime of a certificate from the fleet CA for the HTTP listener.
pub const FLEET_CERT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// Where the HTTP listener's certificate comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HttpsMode {
    /// Certificate files when `cert_file` is set; else the fleet CA's certificate when the
    /// listener is on a non-loopback address, plain HTTP on loopback.
    #[default]
    Auto,
    Off,
    Files,
    FleetCa,
    /// The certificate of this node's tailnet name (`*.ts.net`), from tailscaled.
    Tailscale,
    /// A certificate for `names` from an ACME CA (Let's Encrypt by default).
    Acme,
}

/// `[https]`: TLS on the HTTP listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpsConfig {
    pub mode: HttpsMode,
    /// PEM certificate chain (leaf first) and its key, for `files`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Names (DNS names or IPs) of the `fleet-ca` certificate; default `localhost` and the
    /// controller's `server_names`.
    pub names: Vec<String>,
    /// tailscaled's local API socket, for `tailscale`.
    pub tailscale_socket: PathBuf,
    /// The ACME CA and challenge, for `acme`.
    pub acme: acme::AcmeConfig,
    /// How far ahead of the system clock renewals judge a certificate's age (tests only).
    #[serde(skip)]
    pub clock_skew: Duration,
    /// A plain-HTTP listener whose every answer is a redirect to HTTPS (`0.0.0.0:80`).
    pub redirect_listen: Option<SocketAddr>,
    /// How often the certificate files are looked at for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for HttpsConfig {
    fn default() -> Self {
        HttpsConfig {
            mode: HttpsMode::Auto,
            cert_file: None,
            key_file: None,
            names: Vec::new(),
            tailscale_socket: PathBuf::from(tailscale::DEFAULT_SOCKET),
            acme: acme::AcmeConfig::default(),
            clock_skew: Duration::ZERO,
            redirect_listen: None,
            reload_interval: Duration::from_secs(5),
        }
    }
}

impl HttpsConfig {
    /// The source in force (`None`: plain HTTP), or why the settings do not make one.
    pub fn source(
        &self,
        listen: SocketAddr,
        server_names: &[String],
        data_dir: &Path,
    ) -> Result<Option<Source>, String> {
        let files = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => return Err("https: give both cert_file and key_file".into()),
        };
        let mode = match (self.mode, &files) {
            (HttpsMode::Auto, None) if !listen.ip().is_loopback() => HttpsMode::FleetCa,
            (m, _) => m,
        };
        Ok(match (mode, files) {
            (HttpsMode::Off, _) | (HttpsMode::Auto, None) => None,
            (HttpsMode::Auto | HttpsMode::Files, Some((cert, key))) => {
                Some(Source::Files { cert, key })
            }
            (HttpsMode::Files, None) => {
                return Err("https: mode `files` needs cert_file and key_file".into())
            }
            (HttpsMode::Acme, _) => {
                if self.names.is_empty() {
                    return Err(
                        "https: mode `acme` needs the names to get a certificate for".into(),
                    );
                }
                let challenge = self.acme.challenge.unwrap_or(match self.redirect_listen {
                    Some(_) => acme::ChallengeKind::Http01,
                    None => acme::ChallengeKind::TlsAlpn01,
                });
                if challenge == acme::ChallengeKind::Http01 && self.redirect_listen.is_none() {
                    return Err(
                        "https: the ACME challenge http-01 is answered on the plain \
                                listener: set redirect_listen (port 80 of the names)"
                            .into(),
                    );
                }
                Some(Source::Acme(acme::Order {
                    names: self.names.clone(),
                    directory: self.acme.directory.clone(),
                    contact: self.acme.contact.clone(),
                    challenge,
                    directory_ca_file: self.acme.directory_ca_file.clone(),
                    dir: data_dir.join("acme"),
                }))
            }
            (HttpsMode::Tailscale, _) => Some(Source::Tailscale {
                socket: self.tailscale_socket.clone(),
            }),
            (HttpsMode::FleetCa, _) => {
                let mut names = vec!["localhost".to_owned()];
                // A specific address it listens on is a name browsers use.
                if !listen.ip().is_unspecified() {
                    names.push(listen.ip().to_string());
                }
                names.extend(server_names.iter().cloned());
                names.extend(self.names.iter().cloned());
                names.sort();
                names.dedup();
                Some(Source::FleetCa {
                    names,
                    dir: data_dir.join("pki"),
                })
            }
        })
    }
}

/// Where the certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// `dir`: where the certificate is kept (`<data_dir>/pki`).
    FleetCa {
        names: Vec<String>,
        dir: PathBuf,
    },
    Tailscale {
        socket: PathBuf,
    },
    Acme(acme::Order),
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Files { .. } => "files",
            Source::FleetCa { .. } => "fleet-ca",
            Source::Tailscale { .. } => "tailscale",
            Source::Acme(_) => "acme",
        }
    }
}

/// The certificate in use, swapped whole when its source has a new one; during an ACME
/// TLS-ALPN-01 validation, the challenge's certificate for the `acme-tls/1` protocol.
#[derive(Debug, Default)]
pub struct Resolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
    pub challenges: Arc<acme::Challenges>,
}

impl Resolver {
    pub fn set(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(key));
    }

    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == acme::ACME_TLS_ALPN));
        if acme {
            return hello
                .server_name()
                .and_then(|name| self.challenges.tls_answer(name));
        }
        self.current()
    }
}

/// TLS for the HTTP listener.
pub struct Https {
    pub source: Source,
    pub resolver: Arc<Resolver>,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for Https {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Https")
            .field("source", &self.source)
            .finish()
    }
}

impl Https {
    /// HTTPS as the config asks for it (`None`: plain HTTP).
    pub async fn from_config(
        config: &HttpsConfig,
        listen: SocketAddr,
        server_names: &[String],
        data_dir: &Path,
        ca: &CertificateAuthority,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        let source = config
            .source(listen, server_names, data_dir)
            .map_err(anyhow::Error::msg)?;
        match source {
            Some(source) => Ok(Some(Arc::new(
                Self::start(source, ca).await.map_err(anyhow::Error::msg)?,
            ))),
            None => Ok(None),
        }
    }

    /// Load the first certificate from `source` (an error stops the controller: it would
    /// otherwise serve no HTTPS at all).
    pub async fn start(source: Source, ca: &CertificateAuthority) -> Result<Self, String> {
        let resolver = Arc::new(Resolver::default());
        let first = match &source {
            Source::Files { cert, key } => Some(load_files(cert, key)?),
            Source::FleetCa { names, dir } => Some(fleet_cert(ca, names, dir, false)?),
            Source::Tailscale { socket } => Some(tailscale::fetch(socket).await?.0),
            // The one from an earlier run, else none until the first order is done.
            Source::Acme(order) => acme::saved(order),
        };
        if let Some(k) = first {
            resolver.set(k);
        }
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        if matches!(source, Source::Acme(_)) {
            config.alpn_protocols.push(acme::ACME_TLS_ALPN.to_vec());
        }
        Ok(Https {
            source,
            resolver,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }
}

impl Https {
    /// For the install one-liner when the certificate comes from the fleet CA (which `curl`
    /// does not trust yet): `sha256//BASE64` of the served key, for `curl --pinnedpubkey`.
    pub fn install_pin(&self) -> Option<String> {
        if !matches!(self.source, Source::FleetCa { .. }) {
            return None;
        }
        let key = self.resolver.current()?;
        let (_, cert) = x509_parser::parse_x509_certificate(key.cert.first()?.as_ref()).ok()?;
        let spki = cert.tbs_certificate.subject_pki.raw;
        Some(format!(
            "sha256//{}",
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                Sha256::digest(spki)
            )
        ))
    }
}

/// A certificate chain and key as rustls serves them.
pub fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'static>,
) -> Result<CertifiedKey, String> {
    if chain.is_empty() {
        return Err("no certificate".into());
    }
    let signing = rustls::crypto::ring::sign::any_supported_type(key)
        .map_err(|e| format!("the key cannot sign: {e}"))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| format!("the key does not belong to the certificate: {e}"))?;
    Ok(ck)
}

/// Read a PEM chain and key.
pub fn load_files(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    certified(chain, &key_der).map_err(|e| format!("{}: {e}", cert.display()))
}

/// What the files hold now (a change of any byte is a change).
fn fingerprint(paths: &[&Path]) -> Option<[u8; 32]> {
    let mut h = Sha256::new();
    for p in paths {
        h.update(std::fs::read(p).ok()?);
    }
    Some(h.finalize().into())
}

/// The names (DNS names and IP addresses) a certificate is for.
pub fn sans(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(ext)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => Some(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                16 => Some(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The fleet-CA certificate kept in `dir` (`https.crt`, `https.key`) while it names exactly
/// `names` and has a third of its life left, unless `renew`; else a new one, kept there. So a
/// restart serves the same key (install one-liners pin it).
fn fleet_cert(
    ca: &CertificateAuthority,
    names: &[String],
    dir: &Path,
    renew: bool,
) -> Result<CertifiedKey, String> {
    let (crt, key_path) = (dir.join("https.crt"), dir.join("https.key"));
    if !renew {
        if let Ok(k) = load_files(&crt, &key_path) {
            let leaf = k
                .cert
                .first()
                .map(|c| c.as_ref().to_vec())
                .unwrap_or_default();
            let mut have = sans(&leaf);
            have.sort();
            let fresh = renew_after(&leaf, Duration::ZERO).is_some_and(|d| !d.is_zero());
            if fresh && have == names {
                return Ok(k);
            }
        }
    }
    let (chain, key) = ca
        .issue_web_cert(names, FLEET_CERT_LIFETIME)
        .map_err(|e| format!("issuing the HTTPS certificate: {e}"))?;
    let pem = |label: &str, der: &[u8]| {
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    };
    let chain_pem: String = chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    crate::ca::write_private(&key_path, pem("PRIVATE KEY", key.secret_der()).as_bytes())
        .and_then(|()| crate::ca::write_private(&crt, chain_pem.as_bytes()))
        .map_err(|e| format!("keeping the HTTPS certificate: {e}"))?;
    certified(chain, &key)
}

/// Keep the certificate current: files read again when they change, a fleet-CA certificate
/// issued again at two thirds of its lifetime. Runs until `cancel`.
pub async fn keep_current(
    cp: Arc<crate::ControlPlane>,
    https: Arc<Https>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let (ca, reload_interval) = (&cp.ca, cp.config.https.reload_interval);
    let skew = cp.config.https.clock_skew;
    match https.source.clone() {
        Source::Files { cert, key } => {
            let mut seen = fingerprint(&[&cert, &key]);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(reload_interval) => {}
                }
                let now = fingerprint(&[&cert, &key]);
                if now.is_none() || now == seen {
                    continue;
                }
                match load_files(&cert, &key) {
                    Ok(k) => {
                        https.resolver.set(k);
                        seen = now;
                        tracing::info!(cert = %cert.display(), "HTTPS certificate reloaded");
                    }
                    // Half-written (a copy in progress) or wrong: the one in use stays, and
                    // the next change is tried again.
                    Err(e) => tracing::warn!("HTTPS certificate not reloaded: {e}"),
                }
            }
        }
        Source::Tailscale { socket } => loop {
            // tailscaled renews the certificate itself: asked again at two thirds of the life
            // of the one held (at least hourly, in case the node's name changed).
            let wait = https
                .resolver
                .current()
                .and_then(|k| k.cert.first().and_then(|c| renew_after(c.as_ref(), skew)))
                .unwrap_or(Duration::from_secs(3600))
                .min(Duration::from_secs(3600))
                // tailscaled may keep handing out the old one while it renews: no busy loop.
                .max(reload_interval.max(Duration::from_secs(60)));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match tailscale::fetch(&socket).await {
                Ok((k, name)) => {
                    let changed = https.resolver.current().is_none_or(|c| c.cert != k.cert);
                    if changed {
                        https.resolver.set(k);
                        tracing::info!(%name, "HTTPS certificate from tailscaled renewed");
                    }
                }
                Err(e) => tracing::warn!("HTTPS certificate from tailscaled: {e}"),
            }
        },
        Source::Acme(order) => {
            let mut pause = reload_interval;
            loop {
                let due = https
                    .resolver
                    .current()
                    .and_then(|k| k.cert.first().and_then(|c| renew_after(c.as_ref(), skew)));
                if let Some(wait) = due.filter(|w| !w.is_zero()) {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(wait.min(Duration::from_secs(3600))) => {}
                    }
                    continue;
                }
                tracing::info!(names = ?order.names, directory = %order.directory, "ordering the HTTPS certificate (ACME)");
                let done = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = acme::obtain(&order, &https.resolver.challenges) => r,
                };
                let next = match done {
                    Ok(k) => {
                        https.resolver.set(k);
                        tracing::info!(names = ?order.names, "HTTPS certificate from the ACME CA in use");
                        pause = reload_interval;
                        reload_interval
                    }
                    Err(e) => {
                        tracing::warn!(
                            "ACME: {e}; trying again in {}",
                            humantime::format_duration(pause)
                        );
                        let p = pause;
                        pause = (pause * 2).min(Duration::from_secs(3600));
                        p
                    }
                };
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(next) => {}
                }
            }
        }
        Source::FleetCa { names, dir } => loop {
            let wait = https
                .resolver
                .current()
                .and_then(|k| k.cert.first().and_then(|c| renew_after(c.as_ref(), skew)))
                .unwrap_or(Duration::ZERO)
                .min(Duration::from_secs(3600));
            if !wait.is_zero() {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            match fleet_cert(ca, &names, &dir, true) {
                Ok(k) => {
                    https.resolver.set(k);
                    tracing::info!("HTTPS certificate renewed from the fleet CA");
                }
                Err(e) => tracing::warn!("{e}"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(reload_interval.max(Duration::from_secs(60))) => {}
            }
        },
    }
}

/// How long until two thirds of a certificate's life have passed (zero when they have), by a
/// clock `skew` ahead of the system's.
pub fn renew_after(der: &[u8], skew: Duration) -> Option<Duration> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let from = cert.validity().not_before.timestamp();
    let to = cert.validity().not_after.timestamp();
    let at = from + (to - from) * 2 / 3;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64
        + skew.as_secs() as i64;
    Some(Duration::from_secs(at.saturating_sub(now).max(0) as u64))
}

/// The host of a URL or `HOST:PORT` (`https://nebula.example.net:8443/x` -> `nebula.example.net`,
/// `[fd00::1]:4433` -> `fd00::1`).
pub fn host_of(addr: &str) -> Option<String> {
    let rest = addr.split_once("://").map(|(_, r)| r).unwrap_or(addr);
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split_once(']')?.0,
        None => authority
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(authority),
    };
    (!host.is_empty()).then(|| host.to_owned())
}

/// Whether a browser that used `host` (the request's `Host`, port included or not) should be
/// told to keep to HTTPS: a DNS name under a public suffix, not an address, `localhost` or a
/// name only a LAN knows.
pub fn public_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((n, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !n.ends_with(':') => n,
        _ => host,
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name.starts_with('[') || name.parse::<IpAddr>().is_ok() || !name.contains('.') {
        return false;
    }
    const PRIVATE: [&str; 9] = [
        ".local",
        ".lan",
        ".home",
        ".internal",
        ".localdomain",
        ".home.arpa",
        ".test",
        ".localhost",
        ".invalid",
    ];
    !PRIVATE.iter().any(|s| name.ends_with(s))
}

/// `router` with [`hsts`] when TLS is on.
pub fn with_hsts(router: axum::Router, tls: bool) -> axum::Router {
    if tls {
        router.layer(axum::middleware::from_fn(hsts))
    } else {
        router
    }
}

/// `Strict-Transport-Security` on answers over TLS to a public name.
pub async fn hsts(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let over_tls = req
        .headers()
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    let public = req
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(public_host);
    let mut resp = next.run(req).await;
    if over_tls && public {
        resp.headers_mut().insert(
            axum::http::header::STRICT_TRANSPORT_SECURITY,
            axum::http::HeaderValue::from_static("max-age=31536000"),
        );
    }
    resp
}

/// Where a plain-HTTP request is sent: the same host and path on the HTTPS port.
pub fn redirect_target(
    host: Option<&str>,
    path_and_query: &str,
    https_port: u16,
) -> Option<String> {
    let host = host?.trim();
    // `[v6]:port`, `name:port` or a bare name; the port is replaced.
    let name = if let Some(rest) = host.strip_prefix('[') {
        format!("[{}]", rest.split_once(']')?.0)
    } else {
        host.split(':').next()?.to_owned()
    };
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-[]:".contains(&b));
    if !valid {
        return None;
    }
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = if path_and_query.starts_with('/') {
        path_and_query
    } else {
        "/"
    };
    Some(format!("https://{name}{port}{path}"))
}

/// The plain listener of `redirect_listen`, bound, with its router.
pub async fn bind_redirect(
    cp: &crate::ControlPlane,
    https_port: u16,
) -> anyhow::Result<Option<(tokio::net::TcpListener, axum::Router)>> {
    use anyhow::Context;
    match (cp.config.https.redirect_listen, &cp.https) {
        (Some(addr), Some(https)) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the HTTP redirect on {addr}"))?;
            let challenges = https.resolver.challenges.clone();
            Ok(Some((l, redirect_router(https_port, challenges))))
        }
        (Some(_), None) => anyhow::bail!("https.redirect_listen needs HTTPS on"),
        (None, _) => Ok(None),
    }
}

/// The plain listener's one answer: `308 Permanent Redirect` to HTTPS.
pub fn redirect_router(https_port: u16, challenges: Arc<acme::Challenges>) -> axum::Router {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    axum::Router::new().fallback(move |req: axum::extract::Request| async move {
        // ACME HTTP-01 answers are served here, never redirected.
        if let Some(token) = req
            .uri()
            .path()
            .strip_prefix("/.well-known/acme-challenge/")
        {
            return match challenges.http_answer(token) {
                Some(answer) => answer.into_response(),
                None => (StatusCode::NOT_FOUND, "no such challenge").into_response(),
            };
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        match redirect_target(host, path, https_port) {
            Some(to) => (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, to)]).into_response(),
            None => (StatusCode::BAD_REQUEST, "a Host header is needed").into_response(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_requests_go_to_the_same_host_and_path_on_the_https_port() {
        assert_eq!(
            redirect_target(Some("ctl.example.net"), "/ui/login?next=%2F", 443).as_deref(),
            Some("https://ctl.example.net/ui/login?next=%2F")
        );
        assert_eq!(
            redirect_target(Some("10.0.0.5:80"), "/", 8443).as_deref(),
            Some("https://10.0.0.5:8443/")
        );
        assert_eq!(
            redirect_target(Some("[fd00::5]:80"), "/x", 8443).as_deref(),
            Some("https://[fd00::5]:8443/x")
        );
        assert_eq!(redirect_target(None, "/", 443), None);
        assert_eq!(redirect_target(Some("evil.com/@x"), "/", 443), None);
    }

    #[test]
    fn hosts_come_out_of_urls_and_addresses() {
        assert_eq!(
            host_of("https://nebula.example.net:8443/ui").as_deref(),
            Some("nebula.example.net")
        );
        assert_eq!(host_of("http://10.0.0.5").as_deref(), Some("10.0.0.5"));
        assert_eq!(
            host_of("vps.example.net:4433").as_deref(),
            Some("vps.example.net")
        );
        assert_eq!(host_of("[fd00::1]:4433").as_deref(), Some("fd00::1"));
        assert_eq!(host_of("https://"), None);
    }

    #[test]
    fn only_public_names_get_hsts() {
        for public in [
            "nebula.example.net",
            "nebula.example.net:8443",
            "box.tail1234.ts.net",
        ] {
            assert!(public_host(public), "{public}");
        }
        for private in [
            "localhost",
            "localhost:8443",
            "127.0.0.1:8443",
            "[::1]:8443",
            "nas.local",
            "vps.lan",
            "ctl.home.arpa",
            "controller.nebula.internal",
            "router",
        ] {
            assert!(!public_host(private), "{private}");
        }
    }

    #[test]
    fn settings_make_one_source_or_say_what_is_missing() {
        let names = ["vps.example.net".to_owned()];
        let lo: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let mut c = HttpsConfig::default();
        assert_eq!(
            c.source(lo, &names, Path::new("/data")),
            Ok(None),
            "plain HTTP by default"
        );
        c.cert_file = Some("/c.pem".into());
        assert!(c
            .source(lo, &names, Path::new("/data"))
            .unwrap_err()
            .contains("both"));
        c.key_file = Some("/k.pem".into());
        assert_eq!(
            c.source(lo, &names, Path::new("/data"))
                .unwrap()
                .unwrap()
                .kind(),
            "files"
        );
        c.mode = HttpsMode::Off;
        assert_eq!(c.source(lo, &names, Path::new("/data")), Ok(None));
        let c = HttpsConfig {
            mode: HttpsMode::FleetCa,
            names: vec!["10.0.0.5".into()],
            ..Default::default()
        };
        assert_eq!(
            c.source(lo, &names, Path::new("/data")),
            Ok(Some(Source::FleetCa {
                names: vec![
                    "10.0.0.5".into(),
                    "127.0.0.1".into(),
                    "localhost".into(),
                    "vps.example.net".into()
                ],
                dir: "/data/pki".into(),
            }))
        );
        // Nothing set: plain HTTP on loopback, the fleet CA's certificate anywhere else.
        let auto = HttpsConfig::default();
        assert_eq!(auto.source(lo, &names, Path::new("/data")), Ok(None));
        let all: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let Ok(Some(Source::FleetCa { names: got, .. })) =
            auto.source(all, &names, Path::new("/d"))
        else {
            panic!("the fleet CA by default off loopback");
        };
        assert_eq!(got, ["localhost", "vps.example.net"], "no 0.0.0.0 name");
        let lan: SocketAddr = "192.168.1.5:8443".parse().unwrap();
        let Ok(Some(Source::FleetCa { names: got, .. })) = auto.source(lan, &[], Path::new("/d"))
        else {
            panic!("the fleet CA by default off loopback");
        };
        assert_eq!(got, ["192.168.1.5", "localhost"]);
        // ACME needs names, and picks its challenge by whether a plain listener exists.
        let mut acme_cfg = HttpsConfig {
            mode: HttpsMode::Acme,
            ..Default::default()
        };
        assert!(acme_cfg.source(lo, &[], Path::new("/d")).is_err());
        acme_cfg.names = vec!["nebula.example.net".into()];
        let Ok(Some(Source::Acme(order))) = acme_cfg.source(lo, &[], Path::new("/d")) else {
            panic!("an ACME source");
        };
        assert_eq!(order.challenge, acme::ChallengeKind::TlsAlpn01);
        assert_eq!(order.dir, Path::new("/d/acme"));
        acme_cfg.redirect_listen = Some("0.0.0.0:80".parse().unwrap());
        let Ok(Some(Source::Acme(order))) = acme_cfg.source(lo, &[], Path::new("/d")) else {
            panic!("an ACME source");
        };
        assert_eq!(order.challenge, acme::ChallengeKind::Http01);
        let c = HttpsConfig {
            mode: HttpsMode::Files,
            ..Default::default()
        };
        assert!(c
            .source(lo, &names, Path::new("/data"))
            .unwrap_err()
            .contains("mode `files`"));
    }
}
