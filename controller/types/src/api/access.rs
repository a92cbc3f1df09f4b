//! Join tokens, API tokens and dashboard users.

use nebula_protocol::Labels;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// A duration such as `1h` or `30m`; absent: never expires.
    pub ttl: Option<String>,
    /// How many agents may join with it; absent: unlimited.
    pub uses: Option<u32>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub description: String,
}

/// A join token just created: the token itself is shown only once.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CreatedTokenView {
    /// The join token to hand to `nebula-agent join --token`.
    pub token: String,
    #[serde(flatten)]
    pub record: TokenView,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TokenView {
    pub id: String,
    pub description: String,
    pub labels: Labels,
    pub created_by: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub uses_left: Option<i64>,
    pub uses: i64,
    /// active, expired, exhausted or revoked.
    pub state: String,
}

/// `DELETE /api/v1/tokens/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TokenRevoked {
    pub revoked: String,
}

/// `POST /api/v1/users`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    pub username: String,
    pub password: String,
    /// admin, operator or viewer (default viewer).
    #[serde(default)]
    pub role: Option<String>,
}

/// A dashboard user (never its password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserView {
    pub id: Uuid,
    pub username: String,
    /// admin, operator or viewer.
    pub role: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// `GET /api/v1/users`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct UserList {
    pub items: Vec<UserView>,
}

/// `POST /api/v1/api-tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiTokenRequest {
    pub name: String,
    /// `ai` (the gateway only), `viewer`, `operator` or `admin`.
    pub role: String,
}

/// An API token just created: shown once (the same name replaces the old one).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CreatedApiToken {
    pub name: String,
    pub role: String,
    pub token: String,
}
