//! The controller's own certificate authority: created on first start in the data dir, signs the
//! controller's server certificate and every node's client certificate.
//!
//! Files (keys 0600): `ca.crt`, `ca.key`, `server.crt`, `server.key`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nebula_protocol::{CONTROLLER_SERVER_NAME, NODE_SAN_SUFFIX};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Errors from the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading or writing {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate operation failed")]
    Rcgen(#[from] rcgen::Error),
    #[error("the certificate signing request is not valid")]
    BadCsr(#[source] rcgen::Error),
    #[error("{path} holds no PEM certificate")]
    NoPem { path: PathBuf },
}

/// A certificate just issued to a node.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub der: Vec<u8>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl IssuedCert {
    /// The row the store keeps for this certificate.
    pub fn record(&self, node_id: Uuid, issued_at: i64) -> crate::store::CertRecord {
        crate::store::CertRecord {
            serial: self.serial.clone(),
            node_id,
            not_before: crate::store::millis(self.not_before),
            not_after: crate::store::millis(self.not_after),
            issued_at,
            revoked_at: None,
        }
    }
}

pub struct CertificateAuthority {
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key_der: Vec<u8>,
    pin: [u8; 32],
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("pin", &self.pin_hex())
            .finish()
    }
}

const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const SERVER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Re-issue the server certificate at start when it has less than this left.
const SERVER_RENEW_MARGIN: Duration = Duration::from_secs(30 * 24 * 3600);

impl CertificateAuthority {
    /// Load the CA from `dir`, creating it (and the server certificate) on first start.
    pub fn load_or_create(dir: &Path, extra_server_names: &[String]) -> Result<Self, CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let ca_crt = dir.join("ca.crt");
        let ca_key = dir.join("ca.key");
        let (ca_pem, key_pem) = if ca_crt.exists() && ca_key.exists() {
            (read(&ca_crt)?, read(&ca_key)?)
        } else {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::CommonName, "Nebula Command fleet CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let now = SystemTime::now();
            params.not_before = (now - Duration::from_secs(3600)).into();
            params.not_after = (now + CA_LIFETIME).into();
            params.serial_number = Some(random_serial());
            let cert = params.self_signed(&key)?;
            write_private(&ca_key, key.serialize_pem().as_bytes())?;
            write_public(&ca_crt, cert.pem().as_bytes())?;
            (cert.pem(), key.serialize_pem())
        };
        let ca_key = KeyPair::from_pem(&key_pem)?;
        let ca_der = pem_to_der(&ca_pem).ok_or_else(|| CaError::NoPem {
            path: ca_crt.clone(),
        })?;
        let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key)?;
        let pin: [u8; 32] = Sha256::digest(ca_der.as_ref()).into();

        let server_crt = dir.join("server.crt");
        let server_key = dir.join("server.key");
        let reuse = server_crt.exists()
            && server_key.exists()
            && read(&server_crt)
                .ok()
                .and_then(|p| pem_to_der(&p))
                .and_then(|d| not_after(&d))
                .is_some_and(|na| na > SystemTime::now() + SERVER_RENEW_MARGIN);
        if !reuse {
            let key = KeyPair::generate()?;
            let mut names = vec![CONTROLLER_SERVER_NAME.to_owned(), "localhost".to_owned()];
            names.extend(extra_server_names.iter().cloned());
            names.dedup();
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::CommonName, "Nebula Command controller");
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let now = SystemTime::now();
            params.not_before = (now - Duration::from_secs(3600)).into();
            params.not_after = (now + SERVER_LIFETIME).into();
            params.serial_number = Some(random_serial());
            let cert = params.signed_by(&key, &issuer)?;
            write_private(&server_key, key.serialize_pem().as_bytes())?;
            write_public(&server_crt, cert.pem().as_bytes())?;
        }
        let server_der = pem_to_der(&read(&server_crt)?).ok_or_else(|| CaError::NoPem {
            path: server_crt.clone(),
        })?;
        let server_key_der = KeyPair::from_pem(&read(&server_key)?)?.serialize_der();
        Ok(CertificateAuthority {
            server_chain: vec![server_der, ca_der.clone()],
            ca_der,
            issuer,
            server_key_der,
            pin,
        })
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &self.ca_der);
        let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----");
        out
    }

    /// SHA-256 of the CA certificate (DER): the pin in every join token.
    pub fn pin(&self) -> [u8; 32] {
        self.pin
    }

    pub fn pin_hex(&self) -> String {
        hex::encode(self.pin)
    }

    /// Server certificate chain (leaf, CA) and key for the QUIC endpoint.
    pub fn server_identity(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            self.server_chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone())),
        )
    }

    /// Issue a client certificate for `node_id` from the node's CSR. Only the CSR's public key is
    /// used: subject, SANs and usages are set here, so a node cannot ask for someone else's id.
    pub fn issue_node_cert(
        &self,
        node_id: Uuid,
        node_name: &str,
        csr_der: &[u8],
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(CaError::BadCsr)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, node_name);
        params.subject_alt_names = vec![SanType::DnsName(
            format!("{node_id}{NODE_SAN_SUFFIX}").try_into()?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = SystemTime::now();
        // Slack for clock skew between controller and agent (bounded so that short test
        // lifetimes still renew on time).
        let not_before = now - (lifetime / 10).min(Duration::from_secs(300));
        let not_after = now + lifetime;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(IssuedCert {
            der: cert.der().to_vec(),
            serial: serial_hex,
            not_before,
            not_after,
        })
    }

    /// A server certificate for the HTTP listener (`https` mode `fleet-ca`) naming `names`
    /// (DNS names or IP addresses), with a new key: the chain (leaf, CA) and the key.
    pub fn issue_web_cert(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let sans = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        let (back, until) = (Duration::from_secs(3600), lifetime);
        self.issue_with_new_key(
            "Nebula Command controller (HTTPS)",
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            back,
            until,
        )
    }

    /// A certificate for a new key: the chain (leaf, CA) and the key. Valid from `back` ago
    /// (clock skew) for `lifetime`.
    fn issue_with_new_key(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        back: Duration,
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let now = SystemTime::now();
        params.not_before = (now - back).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((
            vec![cert.der().clone(), self.ca_der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }
}

/// The SAN suffix of a replica's own client certificate (`<replica id>.replica...`), which
/// it presents to the leader to relay its agents' sessions. No node certificate carries it.
pub const REPLICA_SAN_SUFFIX: &str = ".replica.nebula.internal";

impl CertificateAuthority {
    /// A short-lived client certificate and a new key for this replica (`replica` is its id),
    /// which other replicas accept on the relay ALPN. Made at every start, never stored: every
    /// replica has the CA key.
    pub fn issue_replica_identity(
        &self,
        replica: &str,
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let san = SanType::DnsName(format!("{replica}{REPLICA_SAN_SUFFIX}").try_into()?);
        let usage = ExtendedKeyUsagePurpose::ClientAuth;
        let back = Duration::from_secs(300);
        self.issue_with_new_key("Nebula Command replica", vec![san], usage, back, lifetime)
    }
}

/// The replica id of a client certificate the TLS layer has verified against the CA, when it
/// is a replica's (see [`REPLICA_SAN_SUFFIX`]).
pub fn replica_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => d
            .strip_suffix(REPLICA_SAN_SUFFIX)
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()))
            .map(str::to_owned),
        _ => None,
    })
}

/// Identity read from a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub node_id: Uuid,
    pub serial: String,
    pub not_after: SystemTime,
}

/// Read the node id (from the SAN), serial and expiry of a client certificate the TLS layer has
/// already verified against the CA.
pub fn peer_identity(der: &[u8]) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let node_id = san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => d
            .strip_suffix(NODE_SAN_SUFFIX)
            .and_then(|id| Uuid::parse_str(id).ok()),
        _ => None,
    })?;
    let serial = hex::encode(cert.raw_serial());
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(cert.validity().not_after.timestamp()).ok()?);
    Some(PeerIdentity {
        node_id,
        serial,
        not_after,
    })
}

fn not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte, so the hex form is stable
    SerialNumber::from_slice(&bytes)
}

/// First PEM block's DER.
pub fn pem_to_der(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).ok()
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    std::fs::write(path, bytes).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Write a secret file readable by its owner only (0600 from creation, no window).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    write_private_io(path, bytes).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn write_private_io(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_reloads_the_same_ca_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let a = CertificateAuthority::load_or_create(dir.path(), &[]).unwrap();
        let b = CertificateAuthority::load_or_create(dir.path(), &[]).unwrap();
        assert_eq!(a.pin(), b.pin());
        #[cfg(unix)]
        for key in ["ca.key", "server.key"] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }

    #[test]
    fn node_cert_carries_the_node_id_not_what_the_csr_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), &[]).unwrap();
        let key = KeyPair::generate().unwrap();
        // The CSR asks for another identity; it must be ignored.
        let evil = Uuid::new_v4();
        let csr = CertificateParams::new(vec![format!("{evil}{NODE_SAN_SUFFIX}")])
            .unwrap()
            .serialize_request(&key)
            .unwrap();
        let id = Uuid::now_v7();
        let issued = ca
            .issue_node_cert(id, "box", csr.der(), Duration::from_secs(60))
            .unwrap();
        let peer = peer_identity(&issued.der).unwrap();
        assert_eq!(peer.node_id, id);
        assert_eq!(peer.serial, issued.serial);
        assert!(ca
            .issue_node_cert(id, "box", b"not a csr", Duration::from_secs(60))
            .is_err());
    }

    #[test]
    fn replica_and_node_certificates_never_pass_for_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), &[]).unwrap();
        let (chain, _) = ca
            .issue_replica_identity("0123abcd", Duration::from_secs(60))
            .unwrap();
        assert_eq!(replica_identity(&chain[0]).as_deref(), Some("0123abcd"));
        assert_eq!(peer_identity(&chain[0]), None, "a replica is not a node");
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(vec!["x".to_owned()])
            .unwrap()
            .serialize_request(&key)
            .unwrap();
        let node = ca
            .issue_node_cert(Uuid::now_v7(), "box", csr.der(), Duration::from_secs(60))
            .unwrap();
        assert_eq!(replica_identity(&node.der), None, "a node is not a replica");
    }
}
