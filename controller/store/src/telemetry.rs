//! Telemetry rollups: one row per node and minute (average and maximum of each figure).

use sqlx::Row;
use uuid::Uuid;

use super::{Store, StoreError};

/// Average and maximum of one node's telemetry over one minute, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    pub node_id: Uuid,
    /// Unix milliseconds at the start of the minute.
    pub minute: i64,
    pub samples: i64,
    pub cpu: (f64, f64),
    pub mem_used: (f64, f64),
    pub load1: (f64, f64),
    pub net_rx: (f64, f64),
    pub net_tx: (f64, f64),
    pub gpu_util: Option<(f64, f64)>,
    pub gpu_mem_used: Option<(f64, f64)>,
    pub gpu_temp: Option<(f64, f64)>,
    pub containers_running: f64,
}

impl Store {
    /// Write rollups in batches (one statement per 50 rows). A minute already stored is kept.
    pub async fn insert_rollups(&self, rollups: &[Rollup]) -> Result<(), StoreError> {
        const COLS: usize = 20;
        let mut tx = self.begin_write().await?;
        for chunk in rollups.chunks(50) {
            let mut sql = String::from(
                "INSERT INTO telemetry_rollups (node_id, minute, samples, cpu_avg, cpu_max, mem_used_avg, mem_used_max, \
                 load1_avg, load1_max, net_rx_avg, net_rx_max, net_tx_avg, net_tx_max, gpu_util_avg, gpu_util_max, \
                 gpu_mem_used_avg, gpu_mem_used_max, gpu_temp_avg, gpu_temp_max, containers_running) VALUES ",
            );
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push(',');
                }
                sql.push('(');
                for c in 0..COLS {
                    if c > 0 {
                        sql.push(',');
                    }
                    sql.push_str(&format!("${}", i * COLS + c + 1));
                }
                sql.push(')');
            }
            sql.push_str(" ON CONFLICT (node_id, minute) DO NOTHING");
            let mut q = sqlx::query(&sql);
            for r in chunk {
                q = q
                    .bind(r.node_id.to_string())
                    .bind(r.minute)
                    .bind(r.samples)
                    .bind(r.cpu.0)
                    .bind(r.cpu.1)
                    .bind(r.mem_used.0)
                    .bind(r.mem_used.1)
                    .bind(r.load1.0)
                    .bind(r.load1.1)
                    .bind(r.net_rx.0)
                    .bind(r.net_rx.1)
                    .bind(r.net_tx.0)
                    .bind(r.net_tx.1)
                    .bind(r.gpu_util.map(|v| v.0))
                    .bind(r.gpu_util.map(|v| v.1))
                    .bind(r.gpu_mem_used.map(|v| v.0))
                    .bind(r.gpu_mem_used.map(|v| v.1))
                    .bind(r.gpu_temp.map(|v| v.0))
                    .bind(r.gpu_temp.map(|v| v.1))
                    .bind(r.containers_running);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Rollups of one node from `since_ms` on, oldest first.
    pub async fn rollups(&self, node_id: Uuid, since_ms: i64) -> Result<Vec<Rollup>, StoreError> {
        let rows = sqlx::query(
            "SELECT node_id, minute, samples, cpu_avg, cpu_max, mem_used_avg, mem_used_max, load1_avg, load1_max, \
             net_rx_avg, net_rx_max, net_tx_avg, net_tx_max, gpu_util_avg, gpu_util_max, gpu_mem_used_avg, \
             gpu_mem_used_max, gpu_temp_avg, gpu_temp_max, containers_running \
             FROM telemetry_rollups WHERE node_id = $1 AND minute >= $2 ORDER BY minute",
        )
        .bind(node_id.to_string())
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let pair = |a: &str, b: &str| -> Result<(f64, f64), sqlx::Error> {
                    Ok((r.try_get(a)?, r.try_get(b)?))
                };
                let opt = |a: &str, b: &str| -> Result<Option<(f64, f64)>, sqlx::Error> {
                    let x: Option<f64> = r.try_get(a)?;
                    let y: Option<f64> = r.try_get(b)?;
                    Ok(x.zip(y))
                };
                Ok(Rollup {
                    node_id,
                    minute: r.try_get("minute")?,
                    samples: r.try_get("samples")?,
                    cpu: pair("cpu_avg", "cpu_max")?,
                    mem_used: pair("mem_used_avg", "mem_used_max")?,
                    load1: pair("load1_avg", "load1_max")?,
                    net_rx: pair("net_rx_avg", "net_rx_max")?,
                    net_tx: pair("net_tx_avg", "net_tx_max")?,
                    gpu_util: opt("gpu_util_avg", "gpu_util_max")?,
                    gpu_mem_used: opt("gpu_mem_used_avg", "gpu_mem_used_max")?,
                    gpu_temp: opt("gpu_temp_avg", "gpu_temp_max")?,
                    containers_running: r.try_get("containers_running")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Delete rollups older than `before_ms` if `fence` still leads (retention is a leader
    /// task); returns how many went.
    pub async fn delete_rollups_before(
        &self,
        fence: Option<&crate::lease::Fence>,
        before_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin_fenced(fence).await?;
        let n = sqlx::query("DELETE FROM telemetry_rollups WHERE minute < $1")
            .bind(before_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n)
    }
}
