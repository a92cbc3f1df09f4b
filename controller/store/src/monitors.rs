//! Monitors: the ones made through the API, and their results rolled up per hour and node.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::{Store, StoreError};

/// A monitor made through the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorRecord {
    pub name: String,
    /// JSON: the monitor as declared (the map's `monitors:` entry format).
    pub spec: String,
    pub created_by: String,
    pub created_at: i64,
}

/// One hour of one monitor's results on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HourRollup {
    /// Hours since the Unix epoch.
    pub hour: i64,
    pub checks: i64,
    pub up: i64,
    pub latency_sum_us: i64,
    pub latency_max_us: i64,
}

/// Rows per INSERT (7 values each, well under either engine's bind limit).
const ROWS_PER_STATEMENT: usize = 200;

impl Store {
    pub async fn put_monitor(&self, m: &MonitorRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO monitors (name, spec, created_by, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, \
             created_by = excluded.created_by, created_at = excluded.created_at",
        )
        .bind(&m.name)
        .bind(&m.spec)
        .bind(&m.created_by)
        .bind(m.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn monitors(&self) -> Result<Vec<MonitorRecord>, StoreError> {
        let rows =
            sqlx::query("SELECT name, spec, created_by, created_at FROM monitors ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(MonitorRecord {
                    name: r.try_get("name")?,
                    spec: r.try_get("spec")?,
                    created_by: r.try_get("created_by")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    pub async fn delete_monitor(&self, name: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM monitors WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Add results to their hours (counts add up; the maximum latency is kept), in one
    /// transaction.
    pub async fn add_monitor_hours(
        &self,
        rows: &[(String, String, HourRollup)],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut sql = String::from(
                "INSERT INTO monitor_hours (monitor, node, hour, checks, up, latency_sum_us, latency_max_us) VALUES ",
            );
            for i in 0..chunk.len() {
                let b = i * 7;
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7
                ));
            }
            sql.push_str(
                " ON CONFLICT (monitor, node, hour) DO UPDATE SET \
                 checks = monitor_hours.checks + excluded.checks, \
                 up = monitor_hours.up + excluded.up, \
                 latency_sum_us = monitor_hours.latency_sum_us + excluded.latency_sum_us, \
                 latency_max_us = CASE WHEN excluded.latency_max_us > monitor_hours.latency_max_us \
                 THEN excluded.latency_max_us ELSE monitor_hours.latency_max_us END",
            );
            let mut q = sqlx::query(&sql);
            for (monitor, node, h) in chunk {
                q = q
                    .bind(monitor)
                    .bind(node)
                    .bind(h.hour)
                    .bind(h.checks)
                    .bind(h.up)
                    .bind(h.latency_sum_us)
                    .bind(h.latency_max_us);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every hour from `since_hour` on, by monitor and node.
    pub async fn monitor_hours(
        &self,
        since_hour: i64,
    ) -> Result<Vec<(String, String, HourRollup)>, StoreError> {
        let rows = sqlx::query(
            "SELECT monitor, node, hour, checks, up, latency_sum_us, latency_max_us \
             FROM monitor_hours WHERE hour >= $1 ORDER BY monitor, node, hour",
        )
        .bind(since_hour)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("monitor")?,
                    r.try_get("node")?,
                    HourRollup {
                        hour: r.try_get("hour")?,
                        checks: r.try_get("checks")?,
                        up: r.try_get("up")?,
                        latency_sum_us: r.try_get("latency_sum_us")?,
                        latency_max_us: r.try_get("latency_max_us")?,
                    },
                ))
            })
            .collect()
    }

    /// Drop hours before `before_hour`; how many went.
    pub async fn prune_monitor_hours(&self, before_hour: i64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM monitor_hours WHERE hour < $1")
            .bind(before_hour)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}
