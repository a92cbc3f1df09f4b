//! The bundle that adds a replica: the key files of a running replica sealed with a
//! passphrase, made on one of its hosts (`nebula replica add`) and installed into the new
//! replica's empty data dir (`nebula replica join`). Keys are copied, never generated twice: a
//! controller whose data dir lacks the fleet CA refuses to start on a database that has a fleet.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::keys::{KeyFiles, SealedKeys};
use crate::ControllerConfig;

const FORMAT: &str = "nebula-replica";

#[derive(Debug, Serialize, Deserialize)]
struct Bundle {
    format: String,
    version: u32,
    /// The fleet CA's pin, readable without the passphrase (to check the bundle's fleet).
    ca_pin: String,
    keys: SealedKeys,
}

/// A bundle of this controller's keys (run where a replica's data dir is).
pub fn make_bundle(config: &ControllerConfig, passphrase: &str) -> anyhow::Result<String> {
    let keys = KeyFiles::collect(config)?;
    let ca = std::fs::read_to_string(config.data_dir.join("pki").join("ca.crt"))
        .context("reading the fleet CA")?;
    let pin = crate::ca::pem_to_der(&ca)
        .map(|der| hex::encode(ring::digest::digest(&ring::digest::SHA256, &der)))
        .context("the fleet CA is not a PEM certificate")?;
    let bundle = Bundle {
        format: FORMAT.into(),
        version: 1,
        ca_pin: pin,
        keys: keys.seal(passphrase)?,
    };
    Ok(serde_json::to_string_pretty(&bundle)?)
}

/// Install a bundle's keys into a new replica's data dir; the fleet CA's pin.
pub fn install_bundle(
    text: &str,
    config: &ControllerConfig,
    passphrase: &str,
) -> anyhow::Result<String> {
    let bundle: Bundle = serde_json::from_str(text)
        .ok()
        .filter(|b: &Bundle| b.format == FORMAT)
        .context("not a replica bundle (made by `nebula replica add`)")?;
    if bundle.version != 1 {
        bail!("replica bundle version {} is not supported", bundle.version);
    }
    let keys = KeyFiles::open(&bundle.keys, passphrase)?;
    super::keys::private_dir(&config.data_dir)?;
    keys.install(config)?;
    Ok(bundle.ca_pin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_carries_the_fleet_keys_into_an_empty_data_dir_only() {
        let from = tempfile::tempdir().unwrap();
        let cfg = |d: &std::path::Path| ControllerConfig {
            data_dir: d.to_owned(),
            ..Default::default()
        };
        let ca =
            crate::ca::CertificateAuthority::load_or_create(&from.path().join("pki"), &[]).unwrap();
        std::fs::write(from.path().join("pki/reset.key"), b"r").unwrap();
        std::fs::write(from.path().join("pki/release-signing.pk8"), b"s").unwrap();
        std::fs::write(from.path().join("secret.key"), b"k").unwrap();
        let text = make_bundle(&cfg(from.path()), "replica passphrase").unwrap();
        assert!(!text.contains("PRIVATE KEY"));
        let to = tempfile::tempdir().unwrap();
        let err = install_bundle(&text, &cfg(to.path()), "not the passphrase").unwrap_err();
        assert!(format!("{err:#}").contains("wrong passphrase"));
        assert!(install_bundle("{}", &cfg(to.path()), "x").is_err());
        let pin = install_bundle(&text, &cfg(to.path()), "replica passphrase").unwrap();
        assert_eq!(pin, ca.pin_hex());
        let again =
            crate::ca::CertificateAuthority::load_or_create(&to.path().join("pki"), &[]).unwrap();
        assert_eq!(again.pin_hex(), ca.pin_hex(), "the same CA, not a new one");
        assert!(install_bundle(&text, &cfg(to.path()), "replica passphrase").is_err());
    }
}
