//! Persistent state: nodes, labels, join tokens, certificates and API tokens.
//!
//! One `Store` over sqlx's `Any` driver: an embedded SQLite file by default (WAL), PostgreSQL when
//! the URL says `postgres://`. The SQL is kept to the dialect both understand (`$n` placeholders,
//! BIGINT Unix milliseconds, TEXT JSON); migrations live per dialect under `migrations/`.
//! Only this crate talks to the database (`scripts/check-boundaries` checks that no other
//! crate depends on sqlx).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use nebula_protocol::{Labels, NodeFacts};
use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use uuid::Uuid;

mod ai;
pub mod alerts;
pub mod desired;
pub mod discord;
pub mod dump;
pub mod jobs;
pub mod lease;
pub mod monitors;
pub mod secrets;
mod telemetry;
pub mod users;
pub mod workflows;

pub use ai::UsageRow;
pub use telemetry::Rollup;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored value is not valid: {0}")]
    Corrupt(String),
    #[error("unsupported database URL `{0}` (use sqlite:// or postgres://)")]
    UnsupportedUrl(String),
    #[error("the database is not empty: restore and migrate need a new one")]
    NotEmpty,
    /// A leader-only write under a term that is over.
    #[error("refused: term {term} is over (term {current} leads)")]
    Fenced { term: i64, current: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Milliseconds since the Unix epoch.
pub fn millis(t: SystemTime) -> i64 {
    nebula_protocol::time::UnixMillis::from_system(t).as_i64()
}

pub fn from_millis(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms.clamp(0, MAX_RFC3339_MILLIS) as u64)
}

/// 9999-12-31T23:59:59.999Z: the last instant RFC 3339 can write (four-digit years).
pub const MAX_RFC3339_MILLIS: i64 = 253_402_300_799_999;

/// A time clamped into what RFC 3339 can write (1970 to 9999), so that formatting never
/// panics whatever a client asked for or an agent reported.
pub fn clamp_time(t: SystemTime) -> SystemTime {
    from_millis(millis(t).min(MAX_RFC3339_MILLIS))
}

/// RFC 3339 with milliseconds, clamped to 1970..=9999.
pub fn rfc3339_millis(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(clamp_time(t)).to_string()
}

/// RFC 3339 to the second, clamped to 1970..=9999.
pub fn rfc3339_seconds(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(clamp_time(t)).to_string()
}

/// A node as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: Uuid,
    pub name: String,
    pub labels: Labels,
    pub facts: NodeFacts,
    pub agent_version: String,
    pub enrolled_at: i64,
    pub last_seen_at: Option<i64>,
    /// Expiry of the newest unrevoked certificate, if any.
    pub cert_not_after: Option<i64>,
}

/// A join token as stored (the secret only as its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    pub id: String,
    pub description: String,
    pub labels: Labels,
    pub created_by: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    /// `None`: unlimited.
    pub uses_left: Option<i64>,
    pub uses: i64,
    pub revoked_at: Option<i64>,
}

pub struct NewJoinToken<'a> {
    pub id: &'a str,
    pub secret_hash: &'a str,
    pub description: &'a str,
    pub labels: &'a Labels,
    pub created_by: &'a str,
    pub expires_at: Option<i64>,
    pub uses_left: Option<i64>,
}

/// A certificate issued to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRecord {
    pub serial: String,
    pub node_id: Uuid,
    pub not_before: i64,
    pub not_after: i64,
    pub issued_at: i64,
    pub revoked_at: Option<i64>,
}

/// Everything written when a node enrolls, in one transaction.
pub struct Enrollment<'a> {
    pub token_id: &'a str,
    pub secret_hash: &'a str,
    pub node_id: Uuid,
    pub name: &'a str,
    pub requested_labels: &'a Labels,
    pub facts: &'a NodeFacts,
    pub cert: CertRecord,
    pub now: i64,
}

/// Why an enrollment was refused by the store.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("unknown join token")]
    UnknownToken,
    #[error("join token expired")]
    Expired,
    #[error("join token has no uses left")]
    Exhausted,
    #[error("join token was revoked")]
    Revoked,
    #[error("a node named `{0}` already exists")]
    NameTaken(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for EnrollError {
    fn from(e: sqlx::Error) -> Self {
        EnrollError::Store(StoreError::Database(e))
    }
}

/// An API token as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenRecord {
    pub id: String,
    pub name: String,
    pub role: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// PostgreSQL, in the election's own handle ([`Store::for_election`]): two connections
    /// of its own for the lease and the replica list, so that a busy pool (a reconnection
    /// storm's session writes) cannot delay a renewal past the lease.
    election: Option<AnyPool>,
    backend: Backend,
    /// For connections outside the pool (notification listeners).
    url: std::sync::Arc<str>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .finish()
    }
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

impl Store {
    /// Connect and run migrations. `sqlite://path?mode=rwc` or `postgres://...`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        };
        let opts = sqlx::any::AnyConnectOptions::from_str(url)?;
        let pool_opts = match backend {
            Backend::Sqlite => AnyPoolOptions::new()
                .max_connections(4)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA foreign_keys = ON")
                            .execute(&mut *conn)
                            .await?;
                        Ok(())
                    })
                }),
            Backend::Postgres => AnyPoolOptions::new().max_connections(16),
        };
        let pool = pool_opts
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await?;
        if backend == Backend::Sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        Ok(Store {
            pool,
            election: None,
            backend,
            url: url.into(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A write transaction. On SQLite it takes the write lock at once (`BEGIN IMMEDIATE`): a
    /// deferred transaction that reads before it writes fails at once with `SQLITE_BUSY` when
    /// another connection commits a write in between (the busy timeout does not apply to that
    /// upgrade), which a busy controller with several writers (rollups, alerts, monitor
    /// hours, jobs) meets; taken at the start, the lock is waited for instead.
    pub(crate) async fn begin_write(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ----- join tokens -----

    pub async fn create_join_token(&self, t: &NewJoinToken<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO join_tokens (id, secret_hash, description, labels, created_by, created_at, expires_at, uses_left) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(t.id)
        .bind(t.secret_hash)
        .bind(t.description)
        .bind(to_json(t.labels))
        .bind(t.created_by)
        .bind(millis(SystemTime::now()))
        .bind(t.expires_at)
        .bind(t.uses_left)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn list_join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, description, labels, created_by, created_at, expires_at, uses_left, uses, revoked_at \
             FROM join_tokens ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(join_token_from_row).collect()
    }

    pub async fn join_token(&self, id: &str) -> Result<Option<JoinTokenRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, description, labels, created_by, created_at, expires_at, uses_left, uses, revoked_at \
             FROM join_tokens WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(join_token_from_row).transpose()
    }

    /// Revoke a join token. Returns false when no such (unrevoked) token exists.
    pub async fn revoke_join_token(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE join_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(millis(SystemTime::now()))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    // ----- enrollment -----

    /// Consume one use of the token and create the node, its labels and its first certificate,
    /// all or nothing. Returns the node's effective labels (token labels win over requested ones).
    pub async fn enroll(&self, e: &Enrollment<'_>) -> Result<Labels, EnrollError> {
        let mut tx = self.begin_write().await?;
        // The conditional update is the atomic check-and-consume: two agents racing for the last
        // use cannot both succeed.
        let consumed = sqlx::query(
            "UPDATE join_tokens SET uses = uses + 1, \
               uses_left = CASE WHEN uses_left IS NULL THEN NULL ELSE uses_left - 1 END \
             WHERE id = $1 AND secret_hash = $2 AND revoked_at IS NULL \
               AND (expires_at IS NULL OR expires_at > $3) AND (uses_left IS NULL OR uses_left > 0)",
        )
        .bind(e.token_id)
        .bind(e.secret_hash)
        .bind(e.now)
        .execute(&mut *tx)
        .await?;
        if consumed.rows_affected() != 1 {
            let row = sqlx::query(
                "SELECT secret_hash, expires_at, uses_left, revoked_at FROM join_tokens WHERE id = $1",
            )
            .bind(e.token_id)
            .fetch_optional(&mut *tx)
            .await?;
            tx.rollback().await?;
            let Some(row) = row else {
                return Err(EnrollError::UnknownToken);
            };
            let hash: String = row.try_get("secret_hash")?;
            let expires_at: Option<i64> = row.try_get("expires_at")?;
            let uses_left: Option<i64> = row.try_get("uses_left")?;
            let revoked_at: Option<i64> = row.try_get("revoked_at")?;
            return Err(if hash != e.secret_hash {
                EnrollError::UnknownToken
            } else if revoked_at.is_some() {
                EnrollError::Revoked
            } else if expires_at.is_some_and(|x| x <= e.now) {
                EnrollError::Expired
            } else if uses_left.is_some_and(|u| u <= 0) {
                EnrollError::Exhausted
            } else {
                EnrollError::UnknownToken
            });
        }
        let token_labels: String = sqlx::query("SELECT labels FROM join_tokens WHERE id = $1")
            .bind(e.token_id)
            .fetch_one(&mut *tx)
            .await?
            .try_get("labels")?;
        let mut labels = e.requested_labels.clone();
        labels.extend(from_json::<Labels>(&token_labels)?);

        let taken = sqlx::query("SELECT id FROM nodes WHERE name = $1")
            .bind(e.name)
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            tx.rollback().await?;
            return Err(EnrollError::NameTaken(e.name.to_owned()));
        }
        let inserted = sqlx::query(
            "INSERT INTO nodes (id, name, facts, agent_version, token_id, enrolled_at, last_seen_at) \
             VALUES ($1, $2, $3, '', $4, $5, NULL)",
        )
        .bind(e.node_id.to_string())
        .bind(e.name)
        .bind(to_json(e.facts))
        .bind(e.token_id)
        .bind(e.now)
        .execute(&mut *tx)
        .await;
        if let Err(err) = inserted {
            if is_unique_violation(&err) {
                return Err(EnrollError::NameTaken(e.name.to_owned()));
            }
            return Err(err.into());
        }
        for (k, v) in &labels {
            sqlx::query("INSERT INTO node_labels (node_id, key, value) VALUES ($1, $2, $3)")
                .bind(e.node_id.to_string())
                .bind(k)
                .bind(v)
                .execute(&mut *tx)
                .await?;
        }
        insert_cert(&mut tx, &e.cert).await?;
        tx.commit().await?;
        Ok(labels)
    }

    // ----- nodes -----

    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let rows = sqlx::query(NODE_SELECT_ALL).fetch_all(&self.pool).await?;
        let labels = sqlx::query("SELECT node_id, key, value FROM node_labels")
            .fetch_all(&self.pool)
            .await?;
        let mut by_node: BTreeMap<String, Labels> = BTreeMap::new();
        for l in &labels {
            by_node
                .entry(l.try_get("node_id")?)
                .or_default()
                .insert(l.try_get("key")?, l.try_get("value")?);
        }
        rows.iter()
            .map(|r| {
                let id: String = r.try_get("id")?;
                node_from_row(r, by_node.remove(&id).unwrap_or_default())
            })
            .collect()
    }

    pub async fn node_by_name(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        let row = sqlx::query(&format!("{NODE_SELECT} WHERE n.name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        self.finish_node(row).await
    }

    pub async fn node_by_id(&self, id: Uuid) -> Result<Option<NodeRecord>, StoreError> {
        let row = sqlx::query(&format!("{NODE_SELECT} WHERE n.id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        self.finish_node(row).await
    }

    async fn finish_node(&self, row: Option<AnyRow>) -> Result<Option<NodeRecord>, StoreError> {
        let Some(row) = row else { return Ok(None) };
        let id: String = row.try_get("id")?;
        let labels = sqlx::query("SELECT key, value FROM node_labels WHERE node_id = $1")
            .bind(&id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|l| Ok((l.try_get("key")?, l.try_get("value")?)))
            .collect::<Result<Labels, sqlx::Error>>()?;
        node_from_row(&row, labels).map(Some)
    }

    /// Record what a node said in its latest `Hello`.
    /// A session started: the agent's facts and version, and which replica holds its
    /// connection (`None` on a single controller).
    pub async fn record_session(
        &self,
        id: Uuid,
        facts: &NodeFacts,
        agent_version: &str,
        replica: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE nodes SET facts = $2, agent_version = $3, last_seen_at = $4, \
             session_replica = $5 WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(to_json(facts))
        .bind(agent_version)
        .bind(now)
        .bind(replica)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A session ended: when it was last seen; it has no owner any more, unless another
    /// replica recorded itself since (`owner`: the ended session's).
    pub async fn touch_last_seen(
        &self,
        id: Uuid,
        owner: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE nodes SET last_seen_at = $2, session_replica = CASE \
             WHEN session_replica = $3 THEN NULL ELSE session_replica END WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(now)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Remove a node: revoke all its certificates and delete it (labels go with it).
    /// Returns its id, or `None` when no node has that name.
    pub async fn remove_node(&self, name: &str, now: i64) -> Result<Option<Uuid>, StoreError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query("SELECT id FROM nodes WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let id: String = row.try_get("id")?;
        sqlx::query(
            "UPDATE certificates SET revoked_at = $2 WHERE node_id = $1 AND revoked_at IS NULL",
        )
        .bind(&id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM node_labels WHERE node_id = $1")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Uuid::parse_str(&id)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("node id {id}: {e}")))
    }

    // ----- certificates -----

    pub async fn add_certificate(&self, cert: &CertRecord) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        insert_cert(&mut tx, cert).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Revoke the node's live certificates issued before `serial` (which the node has shown it
    /// holds): after a renewal, the old key stops working. Returns how many were revoked.
    pub async fn revoke_superseded_certificates(
        &self,
        node_id: Uuid,
        serial: &str,
        now: i64,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE certificates SET revoked_at = $3 \
             WHERE node_id = $1 AND serial <> $2 AND revoked_at IS NULL \
             AND issued_at <= (SELECT issued_at FROM certificates WHERE serial = $2 AND node_id = $1)",
        )
        .bind(node_id.to_string())
        .bind(serial)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Whether the node has live certificates issued before `serial`: a read, so that session
    /// starts (thousands at once after a restart) do not each take SQLite's write lock.
    pub async fn has_superseded_certificates(
        &self,
        node_id: Uuid,
        serial: &str,
    ) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT 1 AS found FROM certificates \
             WHERE node_id = $1 AND serial <> $2 AND revoked_at IS NULL \
             AND issued_at <= (SELECT issued_at FROM certificates WHERE serial = $2 AND node_id = $1) \
             LIMIT 1",
        )
        .bind(node_id.to_string())
        .bind(serial)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    pub async fn certificate(&self, serial: &str) -> Result<Option<CertRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT serial, node_id, not_before, not_after, issued_at, revoked_at FROM certificates WHERE serial = $1",
        )
        .bind(serial)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let node: String = r.try_get("node_id")?;
            Ok(CertRecord {
                serial: r.try_get("serial")?,
                node_id: Uuid::parse_str(&node)
                    .map_err(|e| StoreError::Corrupt(format!("node id {node}: {e}")))?,
                not_before: r.try_get("not_before")?,
                not_after: r.try_get("not_after")?,
                issued_at: r.try_get("issued_at")?,
                revoked_at: r.try_get("revoked_at")?,
            })
        })
        .transpose()
    }

    // ----- API tokens -----

    pub async fn api_token_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM api_tokens")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    /// Create (or, for the same name, replace the secret of) an API token.
    pub async fn upsert_api_token(
        &self,
        name: &str,
        token_hash: &str,
        role: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM api_tokens WHERE name = $1 OR token_hash = $2")
            .bind(name)
            .bind(token_hash)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, name, token_hash, role, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(Uuid::now_v7().to_string())
        .bind(name)
        .bind(token_hash)
        .bind(role)
        .bind(millis(SystemTime::now()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn api_token_by_hash(
        &self,
        hash: &str,
    ) -> Result<Option<ApiTokenRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, role, created_at, last_used_at FROM api_tokens WHERE token_hash = $1",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row
            .map(|r| -> Result<ApiTokenRecord, sqlx::Error> {
                Ok(ApiTokenRecord {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    role: r.try_get("role")?,
                    created_at: r.try_get("created_at")?,
                    last_used_at: r.try_get("last_used_at")?,
                })
            })
            .transpose()?)
    }
}

impl Store {
    /// Replace a node's facts (the GPU list and container runtime change over time).
    pub async fn update_facts(&self, id: Uuid, facts: &NodeFacts) -> Result<(), StoreError> {
        sqlx::query("UPDATE nodes SET facts = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(to_json(facts))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

const NODE_SELECT: &str = "SELECT n.id, n.name, n.facts, n.agent_version, n.enrolled_at, n.last_seen_at, \
    (SELECT MAX(c.not_after) FROM certificates c WHERE c.node_id = n.id AND c.revoked_at IS NULL) AS cert_not_after \
    FROM nodes n";
const NODE_SELECT_ALL: &str = "SELECT n.id, n.name, n.facts, n.agent_version, n.enrolled_at, n.last_seen_at, \
    (SELECT MAX(c.not_after) FROM certificates c WHERE c.node_id = n.id AND c.revoked_at IS NULL) AS cert_not_after \
    FROM nodes n ORDER BY n.name";

async fn insert_cert(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    c: &CertRecord,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO certificates (serial, node_id, not_before, not_after, issued_at, revoked_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&c.serial)
    .bind(c.node_id.to_string())
    .bind(c.not_before)
    .bind(c.not_after)
    .bind(c.issued_at)
    .bind(c.revoked_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn node_from_row(r: &AnyRow, labels: Labels) -> Result<NodeRecord, StoreError> {
    let id: String = r.try_get("id")?;
    let facts: String = r.try_get("facts")?;
    Ok(NodeRecord {
        id: Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt(format!("node id {id}: {e}")))?,
        name: r.try_get("name")?,
        labels,
        facts: from_json(&facts)?,
        agent_version: r.try_get("agent_version")?,
        enrolled_at: r.try_get("enrolled_at")?,
        last_seen_at: r.try_get("last_seen_at")?,
        cert_not_after: r.try_get("cert_not_after")?,
    })
}

fn join_token_from_row(r: &AnyRow) -> Result<JoinTokenRecord, StoreError> {
    let labels: String = r.try_get("labels")?;
    Ok(JoinTokenRecord {
        id: r.try_get("id")?,
        description: r.try_get("description")?,
        labels: from_json(&labels)?,
        created_by: r.try_get("created_by")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        uses_left: r.try_get("uses_left")?,
        uses: r.try_get("uses")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("labels and facts always serialise")
}

fn from_json<T: for<'de> Deserialize<'de>>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A database URL with its password hidden, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://nebula:hunter2@db:5432/nebula"),
            "postgres://nebula:***@db:5432/nebula"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }
}
