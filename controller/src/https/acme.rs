//! The `acme` source: a certificate for the listed names from an ACME CA (Let's Encrypt by
//! default), proven with HTTP-01 (answered on the plain `redirect_listen` listener, which must
//! be reachable on port 80 of those names) or TLS-ALPN-01 (answered on the HTTPS listener
//! itself, port 443). State lives in `<data_dir>/acme/`: the account (`account.json`), the
//! certificate (`cert.pem`) and its key (`key.pem`), so a restart serves the certificate it
//! has instead of asking again. Renewal at two thirds of the certificate's life; a failed try
//! is tried again with a growing pause (at most an hour).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, CustomExtension, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// How the CA is shown that this controller answers for a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChallengeKind {
    /// A file under `/.well-known/acme-challenge/` on the plain listener (port 80).
    Http01,
    /// A certificate on the HTTPS listener (port 443) for the `acme-tls/1` protocol.
    TlsAlpn01,
}

/// `[https.acme]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AcmeConfig {
    /// The CA's directory URL.
    pub directory: String,
    /// Contact addresses for the account (`mailto:ops@example.net`).
    pub contact: Vec<String>,
    /// Default: `http-01` when `redirect_listen` is set, else `tls-alpn-01`.
    pub challenge: Option<ChallengeKind>,
    /// A CA certificate (PEM) to trust for the directory's own HTTPS (a private ACME CA).
    pub directory_ca_file: Option<PathBuf>,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            directory: LETS_ENCRYPT.to_owned(),
            contact: Vec::new(),
            challenge: None,
            directory_ca_file: None,
        }
    }
}

/// What the listeners answer while an order is being proven.
#[derive(Debug, Default)]
pub struct Challenges {
    /// HTTP-01: token -> key authorization.
    pub http: RwLock<HashMap<String, String>>,
    /// TLS-ALPN-01: name -> the certificate carrying the key authorization's digest.
    pub tls: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl Challenges {
    pub fn http_answer(&self, token: &str) -> Option<String> {
        self.http
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
    }

    pub fn tls_answer(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn clear(&self) {
        self.http.write().unwrap_or_else(|p| p.into_inner()).clear();
        self.tls.write().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// The order's settings, as the source holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub names: Vec<String>,
    pub directory: String,
    pub contact: Vec<String>,
    pub challenge: ChallengeKind,
    pub directory_ca_file: Option<PathBuf>,
    /// `<data_dir>/acme`.
    pub dir: PathBuf,
}

/// The certificate kept from an earlier run, when it came from the same directory and still
/// names every name.
pub fn saved(order: &Order) -> Option<CertifiedKey> {
    let account: serde_json::Value =
        serde_json::from_slice(&std::fs::read(order.dir.join("account.json")).ok()?).ok()?;
    if account["directory"] != order.directory.as_str() {
        return None;
    }
    let k = super::load_files(&order.dir.join("cert.pem"), &order.dir.join("key.pem")).ok()?;
    let sans = super::sans(k.cert.first()?.as_ref());
    order.names.iter().all(|n| sans.contains(n)).then_some(k)
}

async fn account(order: &Order) -> Result<Account, String> {
    let builder = match &order.directory_ca_file {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    }
    .map_err(|e| format!("ACME client: {e}"))?;
    let path = order.dir.join("account.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        #[derive(Deserialize)]
        struct Saved {
            directory: String,
            credentials: AccountCredentials,
        }
        if let Ok(saved) = serde_json::from_str::<Saved>(&text) {
            if saved.directory == order.directory {
                return builder
                    .from_credentials(saved.credentials)
                    .await
                    .map_err(|e| format!("ACME account from {}: {e}", path.display()));
            }
        }
    }
    let contact: Vec<&str> = order.contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            order.directory.clone(),
            None,
        )
        .await
        .map_err(|e| format!("creating an ACME account at {}: {e}", order.directory))?;
    let saved = serde_json::json!({ "directory": order.directory, "credentials": credentials });
    crate::ca::write_private(&path, saved.to_string().as_bytes())
        .map_err(|e| format!("saving the ACME account: {e}"))?;
    Ok(account)
}

/// The certificate a TLS-ALPN-01 validation is shown for `name` (RFC 8737): self-signed, the
/// name alone, the key authorization's digest in the `acmeIdentifier` extension.
fn alpn_certificate(name: &str, digest: &[u8]) -> Result<CertifiedKey, String> {
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    // Not checked with `keys_match`: the certificate parser there refuses the critical
    // `acmeIdentifier` extension this certificate must carry. Both halves were made above.
    let signing = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
        PrivatePkcs8KeyDer::from(key.serialize_der()),
    ))
    .map_err(|e| e.to_string())?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing))
}

/// Order a certificate, prove every name, and keep the result in the data dir.
pub async fn obtain(order: &Order, challenges: &Challenges) -> Result<CertifiedKey, String> {
    std::fs::create_dir_all(&order.dir)
        .map_err(|e| format!("creating {}: {e}", order.dir.display()))?;
    let account = account(order).await?;
    let identifiers: Vec<Identifier> = order
        .names
        .iter()
        .map(|n| Identifier::Dns(n.clone()))
        .collect();
    let mut acme = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(|e| format!("ACME order for {}: {e}", order.names.join(", ")))?;
    let kind = match order.challenge {
        ChallengeKind::Http01 => ChallengeType::Http01,
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let proven = async {
        let mut authorizations = acme.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| format!("ACME authorization: {e}"))?;
            if authz.status == AuthorizationStatus::Valid {
                continue;
            }
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or_else(|| format!("the CA offers no {kind:?} challenge"))?;
            let name = challenge.identifier().to_string();
            let key_auth = challenge.key_authorization();
            match order.challenge {
                ChallengeKind::Http01 => {
                    challenges
                        .http
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(challenge.token.clone(), key_auth.as_str().to_owned());
                }
                ChallengeKind::TlsAlpn01 => {
                    let cert = alpn_certificate(&name, key_auth.digest().as_ref())?;
                    challenges
                        .tls
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.clone(), Arc::new(cert));
                }
            }
            challenge
                .set_ready()
                .await
                .map_err(|e| format!("ACME challenge for {name}: {e}"))?;
        }
        Ok::<(), String>(())
    }
    .await;
    let result = match proven {
        Ok(()) => finish(order, &mut acme).await,
        Err(e) => Err(e),
    };
    challenges.clear();
    result
}

async fn finish(order: &Order, acme: &mut instant_acme::Order) -> Result<CertifiedKey, String> {
    let retries = RetryPolicy::new().timeout(Duration::from_secs(120));
    let status = acme
        .poll_ready(&retries)
        .await
        .map_err(|e| format!("ACME order: {e}"))?;
    if status != OrderStatus::Ready {
        let why = acme
            .state()
            .error
            .as_ref()
            .map(|p| format!(": {}", p.detail.clone().unwrap_or_default()))
            .unwrap_or_default();
        return Err(format!(
            "the CA did not accept the challenges ({status:?}){why}"
        ));
    }
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let params = CertificateParams::new(order.names.clone()).map_err(|e| e.to_string())?;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| format!("certificate request: {e}"))?;
    acme.finalize_csr(csr.der())
        .await
        .map_err(|e| format!("ACME finalize: {e}"))?;
    let chain_pem = acme
        .poll_certificate(&retries)
        .await
        .map_err(|e| format!("ACME certificate: {e}"))?;
    let key_pem = key.serialize_pem();
    save(&order.dir, &chain_pem, &key_pem)?;
    let chain: Vec<CertificateDer<'static>> =
        rustls::pki_types::pem::PemObject::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("the CA's certificate: {e}"))?;
    super::certified(
        chain,
        &PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

fn save(dir: &Path, chain_pem: &str, key_pem: &str) -> Result<(), String> {
    crate::ca::write_private(&dir.join("key.pem"), key_pem.as_bytes())
        .and_then(|()| crate::ca::write_private(&dir.join("cert.pem"), chain_pem.as_bytes()))
        .map_err(|e| format!("saving the ACME certificate: {e}"))
}
