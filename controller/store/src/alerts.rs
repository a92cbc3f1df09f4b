//! Alerting: the evaluator's state with the notifications it produced (one transaction, so a
//! restart neither repeats nor loses one), sinks, silences and the outbox.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::{Store, StoreError};

/// Where notifications go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkRecord {
    pub name: String,
    /// `webhook` (Standard Webhooks signature).
    pub kind: String,
    pub url: String,
    /// The signing secret (`whsec_` and base64).
    pub secret: String,
    /// `info`, `warning` or `critical`: less severe alerts are not sent here.
    pub min_severity: String,
    /// JSON: which alerts it takes beyond the severity (rules, nodes, services, labels).
    pub filters: String,
    pub created_by: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SilenceRecord {
    pub id: String,
    /// JSON: the matchers.
    pub matchers: String,
    pub starts_at: i64,
    pub ends_at: i64,
    pub created_by: String,
    pub comment: String,
    pub created_at: i64,
}

/// One notification for one sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecord {
    pub id: String,
    pub sink: String,
    /// The JSON body as it is sent.
    pub payload: String,
    /// `pending`, `sent` or `failed` (gave up).
    pub state: String,
    pub attempts: i64,
    pub next_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub sent_at: Option<i64>,
}

fn outbox_row(r: &sqlx::any::AnyRow) -> Result<OutboxRecord, StoreError> {
    Ok(OutboxRecord {
        id: r.try_get("id")?,
        sink: r.try_get("sink")?,
        payload: r.try_get("payload")?,
        state: r.try_get("state")?,
        attempts: r.try_get("attempts")?,
        next_at: r.try_get("next_at")?,
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
        sent_at: r.try_get("sent_at")?,
    })
}

const OUTBOX_COLUMNS: &str =
    "id, sink, payload, state, attempts, next_at, last_error, created_at, sent_at";

impl Store {
    /// The evaluator's stored state (JSON), if any.
    pub async fn alert_engine(&self) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT state FROM alert_engine WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("state")).transpose()?)
    }

    /// Store the evaluator's state and the notifications it produced, together, if `fence`
    /// still leads (the evaluator is a leader task).
    pub async fn save_alert_step(
        &self,
        fence: Option<&crate::lease::Fence>,
        state: &str,
        outbox: &[OutboxRecord],
        now: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_fenced(fence).await?;
        sqlx::query(
            "INSERT INTO alert_engine (id, state, updated_at) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
        )
        .bind(state)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        for o in outbox {
            sqlx::query(&format!(
                "INSERT INTO alert_outbox ({OUTBOX_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ))
            .bind(&o.id)
            .bind(&o.sink)
            .bind(&o.payload)
            .bind(&o.state)
            .bind(o.attempts)
            .bind(o.next_at)
            .bind(&o.last_error)
            .bind(o.created_at)
            .bind(o.sent_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Notifications due to be sent at `now`, oldest first.
    pub async fn due_outbox(&self, now: i64, limit: i64) -> Result<Vec<OutboxRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM alert_outbox WHERE state = 'pending' AND next_at <= $1 \
             ORDER BY created_at, id LIMIT $2"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(outbox_row).collect()
    }

    /// Record one delivery attempt: `sent`, or `pending` again at `next_at`, or `failed`. The
    /// last error stays after a later success (the history says what was retried).
    pub async fn outbox_attempt(
        &self,
        id: &str,
        state: &str,
        next_at: i64,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE alert_outbox SET state = $1, attempts = attempts + 1, next_at = $2, \
             last_error = COALESCE($3, last_error), sent_at = CASE WHEN $1 = 'sent' THEN $4 ELSE sent_at END WHERE id = $5",
        )
        .bind(state)
        .bind(next_at)
        .bind(error)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The newest notifications (delivery history), newest first.
    pub async fn outbox(&self, limit: i64) -> Result<Vec<OutboxRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM alert_outbox ORDER BY created_at DESC, id DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(outbox_row).collect()
    }

    /// Add a sink or replace the one of that name.
    pub async fn put_sink(&self, s: &SinkRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO alert_sinks (name, kind, url, secret, min_severity, created_by, created_at, filters) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, \
             url = excluded.url, secret = excluded.secret, min_severity = excluded.min_severity, \
             created_by = excluded.created_by, created_at = excluded.created_at, filters = excluded.filters",
        )
        .bind(&s.name)
        .bind(&s.kind)
        .bind(&s.url)
        .bind(&s.secret)
        .bind(&s.min_severity)
        .bind(&s.created_by)
        .bind(s.created_at)
        .bind(&s.filters)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn sinks(&self) -> Result<Vec<SinkRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, kind, url, secret, min_severity, created_by, created_at, filters FROM alert_sinks \
             ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SinkRecord {
                    name: r.try_get("name")?,
                    kind: r.try_get("kind")?,
                    url: r.try_get("url")?,
                    secret: r.try_get("secret")?,
                    min_severity: r.try_get("min_severity")?,
                    filters: r.try_get("filters")?,
                    created_by: r.try_get("created_by")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// True when there was one of that name.
    pub async fn delete_sink(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM alert_sinks WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn add_silence(&self, s: &SilenceRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO alert_silences (id, matchers, starts_at, ends_at, created_by, comment, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&s.id)
        .bind(&s.matchers)
        .bind(s.starts_at)
        .bind(s.ends_at)
        .bind(&s.created_by)
        .bind(&s.comment)
        .bind(s.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Silences that have not ended by `now`, soonest end first.
    pub async fn silences(&self, now: i64) -> Result<Vec<SilenceRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, matchers, starts_at, ends_at, created_by, comment, created_at \
             FROM alert_silences WHERE ends_at > $1 ORDER BY ends_at, id",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SilenceRecord {
                    id: r.try_get("id")?,
                    matchers: r.try_get("matchers")?,
                    starts_at: r.try_get("starts_at")?,
                    ends_at: r.try_get("ends_at")?,
                    created_by: r.try_get("created_by")?,
                    comment: r.try_get("comment")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// End a silence now; true when it was still on.
    pub async fn expire_silence(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE alert_silences SET ends_at = $1 WHERE id = $2 AND ends_at > $1")
                .bind(now)
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }
}
