//! Jobs, their log lines and the audit log.
//!
//! The job engine writes through [`Store::write_job_batch`]: one transaction per batch of job
//! upserts, log lines and audit entries (group commit), so that thousands of small jobs per second
//! cost a few commits rather than one each.

use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{from_json, to_json, Store, StoreError};
use nebula_types::jobs::{AuditRecord, JobLogLine, JobRecord, JobState};

/// Everything one group commit writes.
#[derive(Debug, Default)]
pub struct JobBatch {
    /// Inserted or updated (by id; each id at most once per batch).
    pub jobs: Vec<JobRecord>,
    pub logs: Vec<(Uuid, JobLogLine)>,
    pub audit: Vec<AuditRecord>,
}

impl JobBatch {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.logs.is_empty() && self.audit.is_empty()
    }
}

/// Filters for listing jobs (newest first).
#[derive(Debug, Default, Clone)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub node: Option<String>,
    pub kind: Option<String>,
    pub created_by: Option<String>,
    /// Only jobs older than this id (the page cursor).
    pub before: Option<Uuid>,
    pub limit: u32,
}

#[derive(Debug, Default, Clone)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub before: Option<Uuid>,
    /// The front end (`api`, `dashboard`, `discord`, `internal`).
    pub via: Option<String>,
    pub limit: u32,
}

const JOB_COLUMNS: &str = "id, kind, work, target, state, node_id, node_name, attempt, max_attempts, idempotent, \
    created_by, created_at, dispatched_at, started_at, finished_at, deadline, routing, reason, exit_code, error, \
    output, excluded_nodes, logs_next, idem_key";
const JOB_COLS: usize = 24;

impl Store {
    /// Write a batch in one transaction.
    pub async fn write_job_batch(&self, batch: &JobBatch) -> Result<(), StoreError> {
        self.write_job_batch_fenced(batch, None).await
    }

    /// [`Store::write_job_batch`] in a transaction only the holder of `fence` may commit
    /// (replicas on PostgreSQL): a deposed leader's job states, log lines and audit rows are
    /// refused with [`StoreError::Fenced`] and nothing is written.
    pub async fn write_job_batch_fenced(
        &self,
        batch: &JobBatch,
        fence: Option<&super::lease::Fence>,
    ) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        // Rows per statement: SQLite has a limit on parameters per statement (32766) and no
        // network; PostgreSQL prefers fewer round trips.
        let (job_rows, log_rows) = match self.backend {
            super::Backend::Sqlite => (32, 64),
            super::Backend::Postgres => (32, 100),
        };
        let mut tx = self.begin_fenced(fence).await?;
        for chunk in batch.jobs.chunks(job_rows) {
            let mut sql = format!("INSERT INTO jobs ({JOB_COLUMNS}) VALUES ");
            push_placeholders(&mut sql, self.backend, chunk.len(), JOB_COLS);
            sql.push_str(
                " ON CONFLICT (id) DO UPDATE SET state = excluded.state, node_id = excluded.node_id, \
                 node_name = excluded.node_name, attempt = excluded.attempt, dispatched_at = excluded.dispatched_at, \
                 started_at = excluded.started_at, finished_at = excluded.finished_at, routing = excluded.routing, \
                 reason = excluded.reason, exit_code = excluded.exit_code, error = excluded.error, \
                 output = excluded.output, excluded_nodes = excluded.excluded_nodes, logs_next = excluded.logs_next",
            );
            let mut q = sqlx::query(&sql);
            for j in chunk {
                q = q
                    .bind(j.id.to_string())
                    .bind(j.work.kind())
                    .bind(to_json(&j.work))
                    .bind(to_json(&j.target))
                    .bind(j.state.as_str())
                    .bind(j.node_id.map(|n| n.to_string()))
                    .bind(j.node.clone())
                    .bind(i64::from(j.attempt))
                    .bind(i64::from(j.max_attempts))
                    .bind(i64::from(j.idempotent))
                    .bind(j.created_by.clone())
                    .bind(j.created_at)
                    .bind(j.dispatched_at)
                    .bind(j.started_at)
                    .bind(j.finished_at)
                    .bind(j.deadline)
                    .bind(opt_text(&j.routing))
                    .bind(opt_text(&j.reason))
                    .bind(j.exit_code.map(i64::from))
                    .bind(opt_text(&j.error))
                    .bind(j.output.as_ref().map(to_json))
                    .bind(to_json(&j.excluded))
                    .bind(j.logs_next as i64)
                    .bind(opt_text(&j.key));
            }
            q.execute(&mut *tx).await?;
        }
        for chunk in batch.logs.chunks(log_rows) {
            let mut sql = String::from(
                "INSERT INTO job_logs (job_id, attempt, seq, at, stream, line) VALUES ",
            );
            push_placeholders(&mut sql, self.backend, chunk.len(), 6);
            sql.push_str(" ON CONFLICT (job_id, attempt, seq) DO NOTHING");
            let mut q = sqlx::query(&sql);
            for (id, l) in chunk {
                q = q
                    .bind(id.to_string())
                    .bind(i64::from(l.attempt))
                    .bind(l.seq as i64)
                    .bind(l.at)
                    .bind(l.stream.clone())
                    .bind(text(&l.line));
            }
            q.execute(&mut *tx).await?;
        }
        for chunk in batch.audit.chunks(log_rows) {
            let mut sql = String::from(
                "INSERT INTO audit_log (id, at, actor, action, target, detail) VALUES ",
            );
            push_placeholders(&mut sql, self.backend, chunk.len(), 6);
            let mut q = sqlx::query(&sql);
            for a in chunk {
                q = q
                    .bind(a.id.to_string())
                    .bind(a.at)
                    .bind(a.actor.clone())
                    .bind(a.action.clone())
                    .bind(text(&a.target))
                    .bind(a.detail.to_string());
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn job(&self, id: Uuid) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// The job created with idempotency key `key`, if any.
    pub async fn job_by_key(&self, key: &str) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE idem_key = $1 ORDER BY id LIMIT 1"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Jobs that have not ended (loaded at start-up).
    pub async fn active_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('queued', 'dispatched', 'running') ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    pub async fn list_jobs(&self, f: &JobFilter) -> Result<Vec<JobRecord>, StoreError> {
        let rows = self
            .newest_first(
                &format!("SELECT {JOB_COLUMNS} FROM jobs"),
                &[
                    ("state", "=", f.state.map(|s| s.as_str().to_owned())),
                    ("node_name", "=", f.node.clone()),
                    ("kind", "=", f.kind.clone()),
                    ("created_by", "=", f.created_by.clone()),
                    ("id", "<", f.before.map(|b| b.to_string())),
                ],
                f.limit,
            )
            .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// `select` with the given conditions (`None` values skipped), newest (highest id) first.
    async fn newest_first(
        &self,
        select: &str,
        conds: &[(&str, &str, Option<String>)],
        limit: u32,
    ) -> Result<Vec<AnyRow>, StoreError> {
        let mut sql = format!("{select} WHERE 1 = 1");
        let mut args: Vec<&String> = Vec::new();
        for (col, op, v) in conds {
            if let Some(v) = v {
                args.push(v);
                sql.push_str(&format!(" AND {col} {op} ${}", args.len()));
            }
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", limit.clamp(1, 1000)));
        let mut q = sqlx::query(&sql);
        for a in args {
            q = q.bind(a.clone());
        }
        Ok(q.fetch_all(&self.pool).await?)
    }

    /// Log lines of a job after `(attempt, seq)` (exclusive), oldest first.
    pub async fn job_logs(
        &self,
        id: Uuid,
        after: Option<(u32, u64)>,
        limit: u32,
    ) -> Result<Vec<JobLogLine>, StoreError> {
        let (a, s) = after
            .map(|(a, s)| (i64::from(a), s as i64))
            .unwrap_or((-1, -1));
        let rows = sqlx::query(
            "SELECT attempt, seq, at, stream, line FROM job_logs WHERE job_id = $1 \
             AND (attempt > $2 OR (attempt = $2 AND seq > $3)) ORDER BY attempt, seq LIMIT $4",
        )
        .bind(id.to_string())
        .bind(a)
        .bind(s)
        .bind(i64::from(limit.clamp(1, 100_000)))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(JobLogLine {
                    attempt: r.try_get::<i64, _>("attempt")? as u32,
                    seq: r.try_get::<i64, _>("seq")? as u64,
                    at: r.try_get("at")?,
                    stream: r.try_get("stream")?,
                    line: r.try_get("line")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// The next log sequence number of a job's attempt (0 when it has no lines).
    pub async fn next_log_seq(&self, id: Uuid, attempt: u32) -> Result<u64, StoreError> {
        let row =
            sqlx::query("SELECT MAX(seq) AS m FROM job_logs WHERE job_id = $1 AND attempt = $2")
                .bind(id.to_string())
                .bind(i64::from(attempt))
                .fetch_one(&self.pool)
                .await?;
        let max: Option<i64> = row.try_get("m")?;
        Ok(max.map_or(0, |m| m as u64 + 1))
    }

    pub async fn list_audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = self
            .newest_first(
                "SELECT id, at, actor, action, target, detail FROM audit_log",
                &[
                    ("actor", "=", f.actor.clone()),
                    ("action", "=", f.action.clone()),
                    ("id", "<", f.before.map(|b| b.to_string())),
                    (
                        "detail",
                        "LIKE",
                        f.via.as_ref().map(|v| format!("%\"via\":\"{v}\"%")),
                    ),
                ],
                f.limit,
            )
            .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get("id")?;
                let detail: String = r.try_get("detail")?;
                Ok(AuditRecord {
                    id: parse_uuid(&id)?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    detail: serde_json::from_str(&detail)
                        .map_err(|e| StoreError::Corrupt(format!("audit detail: {e}")))?,
                })
            })
            .collect()
    }
}

/// `(?, ?, ...)` rows for SQLite (anonymous parameters: binding them costs nothing per name),
/// `($1, $2, ...)` for PostgreSQL.
/// PostgreSQL's TEXT takes no NUL byte: store U+FFFD instead (SQLite would keep it, but both
/// backends store the same text).
fn text(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_owned()
    }
}

fn opt_text(s: &Option<String>) -> Option<String> {
    s.as_deref().map(text)
}

fn push_placeholders(sql: &mut String, backend: super::Backend, rows: usize, cols: usize) {
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..cols {
            if c > 0 {
                sql.push(',');
            }
            match backend {
                super::Backend::Sqlite => sql.push('?'),
                super::Backend::Postgres => sql.push_str(&format!("${}", i * cols + c + 1)),
            }
        }
        sql.push(')');
    }
}

fn parse_uuid(s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("id {s}: {e}")))
}

fn job_from_row(r: &AnyRow) -> Result<JobRecord, StoreError> {
    let id: String = r.try_get("id")?;
    let work: String = r.try_get("work")?;
    let target: String = r.try_get("target")?;
    let state: String = r.try_get("state")?;
    let node_id: Option<String> = r.try_get("node_id")?;
    let output: Option<String> = r.try_get("output")?;
    let excluded: String = r.try_get("excluded_nodes")?;
    Ok(JobRecord {
        id: parse_uuid(&id)?,
        work: from_json(&work)?,
        target: from_json(&target)?,
        state: JobState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("job state `{state}`")))?,
        node_id: node_id.as_deref().map(parse_uuid).transpose()?,
        node: r.try_get("node_name")?,
        attempt: r.try_get::<i64, _>("attempt")? as u32,
        max_attempts: r.try_get::<i64, _>("max_attempts")? as u32,
        idempotent: r.try_get::<i64, _>("idempotent")? != 0,
        created_by: r.try_get("created_by")?,
        created_at: r.try_get("created_at")?,
        dispatched_at: r.try_get("dispatched_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        deadline: r.try_get("deadline")?,
        routing: r.try_get("routing")?,
        reason: r.try_get("reason")?,
        exit_code: r.try_get::<Option<i64>, _>("exit_code")?.map(|c| c as i32),
        error: r.try_get("error")?,
        output: output.as_deref().map(from_json).transpose()?,
        excluded: from_json(&excluded)?,
        logs_next: r.try_get::<i64, _>("logs_next")? as u64,
        key: r.try_get("idem_key")?,
    })
}
