//! The secret store: names, versions, who and when. Values go in and never come out through
//! the API.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `PUT /api/v1/secrets/{name}`: a new version's value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecret {
    pub value: String,
}

impl std::fmt::Debug for SetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SetSecret { value: *** }")
    }
}

/// The version a value was stored as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretSet {
    pub name: String,
    pub version: u32,
}

/// One stored version (no value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretVersionView {
    pub version: u32,
    pub created_by: String,
    pub created_at: String,
    /// The key it is encrypted under.
    pub key_id: String,
}

/// A secret: its name and versions, newest first (no value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretView {
    pub name: String,
    pub latest: u32,
    pub updated_by: String,
    pub updated_at: String,
    pub versions: Vec<SecretVersionView>,
}

/// `POST /api/v1/secrets/import`: a `.env` file's text.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportEnv {
    pub env: String,
}

impl std::fmt::Debug for ImportEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImportEnv { env: *** }")
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Imported {
    /// Stored as a new version.
    pub set: Vec<SecretSet>,
    /// The same value as the latest version: nothing stored.
    pub unchanged: Vec<String>,
    /// Lines that are not `NAME=value`, with why (`line 3: ...`).
    pub refused: Vec<String>,
}

/// What a key rotation did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Rekeyed {
    /// The key every version is encrypted under now.
    pub key_id: String,
    /// Versions encrypted again under it by this run.
    pub reencrypted: u64,
    /// Keys no version uses any more, removed from the key file.
    pub removed_keys: Vec<String>,
}

/// `POST /api/v1/backup`: the passphrase the backup's key files are sealed with (at least 10
/// characters; keep it apart from the file).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TakeBackup {
    pub passphrase: String,
}

impl std::fmt::Debug for TakeBackup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TakeBackup { passphrase: *** }")
    }
}
