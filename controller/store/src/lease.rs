//! The leader lease of replicas on one PostgreSQL, the replica list, and fencing.
//!
//! One row (`leader_lease`, id 1) says who leads, under which term, until when. Times are the
//! database's own clock (`clock_timestamp()`), so replicas' clocks need not agree. Taking the
//! row over (expired or released) raises the term; renewing needs the same holder and term and
//! an unexpired lease. A leader-only write begins with [`Store::begin_fenced`], which locks the
//! row for share and checks the term in the same transaction: a takeover waits for that
//! transaction, and a deposed leader's write is refused ([`StoreError::Fenced`]).
//!
//! Wake-ups travel as PostgreSQL notifications ([`Store::listen`], [`Store::notify`]).

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::{Backend, Store, StoreError};

/// The database's clock in Unix milliseconds.
const NOW_MS: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

/// The channel a released lease is announced on.
pub const LEADER_CHANNEL: &str = "nebula_leader";

/// Who may make leader-only writes: this replica, under this term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub holder: String,
    pub term: i64,
}

/// The lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub holder: String,
    pub term: i64,
    pub expires_at: i64,
    pub renewed_at: i64,
}

/// A replica as it registered itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub id: String,
    pub hostname: String,
    pub http_url: String,
    pub quic_addr: String,
    pub version: String,
    pub started_at: i64,
    pub seen_at: i64,
}

impl Store {
    /// A handle for the leader election: on PostgreSQL its lease and replica-list queries
    /// use two connections of their own, opened when first used, on the runtime that uses
    /// them (the election's own thread); everything else shares this store's pool. Close them
    /// with [`Store::close_election`] on that runtime.
    pub fn for_election(&self) -> Result<Store, StoreError> {
        let mut s = self.clone();
        if self.backend == Backend::Postgres {
            let opts = <sqlx::any::AnyConnectOptions as std::str::FromStr>::from_str(&self.url)?;
            s.election = Some(
                sqlx::any::AnyPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(std::time::Duration::from_secs(30))
                    .connect_lazy_with(opts),
            );
        }
        Ok(s)
    }

    /// Close the election's own connections (see [`Store::for_election`]).
    pub async fn close_election(&self) {
        if let Some(p) = &self.election {
            p.close().await;
        }
    }

    /// The election's own connections (PostgreSQL), else the pool.
    fn election_pool(&self) -> &sqlx::AnyPool {
        self.election.as_ref().unwrap_or(&self.pool)
    }

    fn require_postgres(&self) -> Result<(), StoreError> {
        match self.backend {
            Backend::Postgres => Ok(()),
            Backend::Sqlite => Err(StoreError::Corrupt(
                "leader election needs PostgreSQL (a controller on SQLite always leads)".into(),
            )),
        }
    }

    /// Take the lease when it is free (never held, released, or expired): the new term, or
    /// `None` while another replica holds it. A term is the database clock's millisecond at
    /// the takeover, and at least one more than the last: a database restored from a backup,
    /// or a new one, never goes back to a term agents have already seen.
    pub async fn lease_acquire(
        &self,
        holder: &str,
        ttl_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        self.require_postgres()?;
        let row = sqlx::query(&format!(
            "INSERT INTO leader_lease (id, holder, term, expires_at, renewed_at) \
             VALUES (1, $1, {NOW_MS}, {NOW_MS} + $2, {NOW_MS}) \
             ON CONFLICT (id) DO UPDATE SET holder = $1, \
               term = GREATEST(leader_lease.term + 1, {NOW_MS}), \
               expires_at = {NOW_MS} + $2, renewed_at = {NOW_MS} \
             WHERE leader_lease.holder = '' OR leader_lease.expires_at < {NOW_MS} \
             RETURNING term"
        ))
        .bind(holder)
        .bind(ttl_ms)
        .fetch_optional(self.election_pool())
        .await?;
        Ok(row.map(|r| r.try_get::<i64, _>(0)).transpose()?)
    }

    /// Renew a lease this holder has under this term and that has not expired.
    pub async fn lease_renew(&self, fence: &Fence, ttl_ms: i64) -> Result<bool, StoreError> {
        self.require_postgres()?;
        let done = sqlx::query(&format!(
            "UPDATE leader_lease SET expires_at = {NOW_MS} + $3, renewed_at = {NOW_MS} \
             WHERE id = 1 AND holder = $1 AND term = $2 AND expires_at >= {NOW_MS}"
        ))
        .bind(&fence.holder)
        .bind(fence.term)
        .bind(ttl_ms)
        .execute(self.election_pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Give the lease up (on a clean shutdown) and tell the other replicas at once.
    pub async fn lease_release(&self, fence: &Fence) -> Result<bool, StoreError> {
        self.require_postgres()?;
        let done = sqlx::query(
            "UPDATE leader_lease SET holder = '', expires_at = 0 WHERE id = 1 AND holder = $1 AND term = $2",
        )
        .bind(&fence.holder)
        .bind(fence.term)
        .execute(self.election_pool())
        .await?;
        notify_on(
            self.election_pool(),
            LEADER_CHANNEL,
            &fence.term.to_string(),
        )
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The lease as it stands (none before the first election).
    pub async fn lease(&self) -> Result<Option<Lease>, StoreError> {
        if self.backend == Backend::Sqlite {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT holder, term, expires_at, renewed_at FROM leader_lease WHERE id = 1",
        )
        .fetch_optional(self.election_pool())
        .await?;
        row.map(|r| {
            Ok(Lease {
                holder: r.try_get(0)?,
                term: r.try_get(1)?,
                expires_at: r.try_get(2)?,
                renewed_at: r.try_get(3)?,
            })
        })
        .transpose()
        .map_err(|e: sqlx::Error| e.into())
    }

    /// A write transaction that only the holder of `fence` may commit: on PostgreSQL the lease
    /// row is locked for share and its term and holder checked first. Without a fence (a
    /// controller on SQLite, which always leads) it is an ordinary write transaction.
    pub async fn begin_fenced(
        &self,
        fence: Option<&Fence>,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        let mut tx = self.begin_write().await?;
        if let (Some(f), Backend::Postgres) = (fence, self.backend) {
            let row = sqlx::query("SELECT holder, term FROM leader_lease WHERE id = 1 FOR SHARE")
                .fetch_optional(&mut *tx)
                .await?;
            let (holder, term): (String, i64) = match row {
                Some(r) => (r.try_get(0)?, r.try_get(1)?),
                None => (String::new(), 0),
            };
            if holder != f.holder || term != f.term {
                return Err(StoreError::Fenced {
                    term: f.term,
                    current: term,
                });
            }
        }
        Ok(tx)
    }

    /// Register this replica or say it is still here (`seen_at` by the database's clock).
    pub async fn replica_seen(&self, r: &ReplicaRecord) -> Result<(), StoreError> {
        self.require_postgres()?;
        sqlx::query(&format!(
            "INSERT INTO replicas (id, hostname, http_url, quic_addr, version, started_at, seen_at) \
             VALUES ($1, $2, $3, $4, $5, $6, {NOW_MS}) \
             ON CONFLICT (id) DO UPDATE SET http_url = excluded.http_url, \
               quic_addr = excluded.quic_addr, seen_at = excluded.seen_at"
        ))
        .bind(&r.id)
        .bind(&r.hostname)
        .bind(&r.http_url)
        .bind(&r.quic_addr)
        .bind(&r.version)
        .bind(r.started_at)
        .execute(self.election_pool())
        .await?;
        Ok(())
    }

    /// Replicas seen within the last `window_ms` (by the database's clock), oldest first;
    /// older rows are removed.
    pub async fn replicas(&self, window_ms: i64) -> Result<Vec<ReplicaRecord>, StoreError> {
        self.require_postgres()?;
        sqlx::query(&format!(
            "DELETE FROM replicas WHERE seen_at < {NOW_MS} - $1"
        ))
        .bind(window_ms)
        .execute(self.election_pool())
        .await?;
        self.live_replicas(window_ms).await
    }

    /// Replicas seen within the last `window_ms` (by the database's clock), oldest first,
    /// leaving the older rows.
    pub async fn live_replicas(&self, window_ms: i64) -> Result<Vec<ReplicaRecord>, StoreError> {
        self.require_postgres()?;
        let rows = sqlx::query(&format!(
            "SELECT id, hostname, http_url, quic_addr, version, started_at, seen_at FROM replicas \
             WHERE seen_at >= {NOW_MS} - $1 ORDER BY started_at, id"
        ))
        .bind(window_ms)
        .fetch_all(self.election_pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ReplicaRecord {
                    id: r.try_get(0)?,
                    hostname: r.try_get(1)?,
                    http_url: r.try_get(2)?,
                    quic_addr: r.try_get(3)?,
                    version: r.try_get(4)?,
                    started_at: r.try_get(5)?,
                    seen_at: r.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Remove a replica's row (it stops).
    pub async fn replica_gone(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(id)
            .execute(self.election_pool())
            .await?;
        Ok(())
    }

    /// Agent sessions per replica holding them, as recorded when they started.
    pub async fn sessions_by_replica(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT session_replica, COUNT(*) AS n FROM nodes \
             WHERE session_replica IS NOT NULL GROUP BY session_replica",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("session_replica")?, r.try_get("n")?)))
            .collect()
    }

    /// Forget every session's owner (a new leader: the sessions of the last one are gone, and
    /// each records its owner again when it starts).
    pub async fn clear_session_owners(&self) -> Result<(), StoreError> {
        sqlx::query("UPDATE nodes SET session_replica = NULL WHERE session_replica IS NOT NULL")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Send a notification on a channel (PostgreSQL; nothing on SQLite, whose only
    /// controller hears its own events in process).
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), StoreError> {
        if self.backend == Backend::Postgres {
            notify_on(&self.pool, channel, payload).await?;
        }
        Ok(())
    }

    /// Listen on channels (PostgreSQL only): a dedicated connection that yields each
    /// notification's channel and payload.
    pub async fn listen(&self, channels: &[&str]) -> Result<Listener, StoreError> {
        self.require_postgres()?;
        let mut l = sqlx::postgres::PgListener::connect(&self.url).await?;
        l.listen_all(channels.iter().copied()).await?;
        Ok(Listener(l))
    }
}

async fn notify_on(pool: &sqlx::AnyPool, channel: &str, payload: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(pool)
        .await?;
    Ok(())
}

/// Notifications from PostgreSQL.
pub struct Listener(sqlx::postgres::PgListener);

impl Listener {
    /// The next notification: its channel and payload; `None` when the connection dropped
    /// (the next call reconnects; notifications meanwhile are lost, so callers resync).
    pub async fn recv(&mut self) -> Result<Option<(String, String)>, StoreError> {
        Ok(self
            .0
            .try_recv()
            .await?
            .map(|n| (n.channel().to_owned(), n.payload().to_owned())))
    }
}

impl Store {
    /// The fleet CA's pin this database belongs to, if one was recorded.
    pub async fn fleet_ca_pin(&self) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT ca_pin FROM fleet_identity WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Record the fleet CA's pin unless one is recorded; the pin in force either way.
    pub async fn claim_fleet_ca_pin(&self, pin: &str, now: i64) -> Result<String, StoreError> {
        sqlx::query(
            "INSERT INTO fleet_identity (id, ca_pin, created_at) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(pin)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(self.fleet_ca_pin().await?.unwrap_or_else(|| pin.to_owned()))
    }

    /// Whether the database holds a fleet already (nodes, tokens or users), for a controller
    /// that would otherwise make new keys.
    pub async fn has_fleet(&self) -> Result<bool, StoreError> {
        for t in ["nodes", "api_tokens", "users", "join_tokens"] {
            let sql = format!("SELECT 1 FROM {t} LIMIT 1");
            if sqlx::query(&sql)
                .fetch_optional(&self.pool)
                .await?
                .is_some()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
