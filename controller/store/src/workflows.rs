//! Workflows: definitions (from `workflows.yml` or the API), runs, and every attempt of every
//! step. The driver writes a pass's changes in one fenced transaction before it acts on them,
//! so a controller that restarts carries on from these rows.

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{Store, StoreError};

/// A workflow's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowDefRecord {
    pub name: String,
    /// `file` (workflows.yml) or `api`.
    pub source: String,
    /// The checked workflow, JSON.
    pub definition: String,
    pub updated_by: String,
    pub updated_at: i64,
}

/// A run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: Uuid,
    pub workflow: String,
    /// The definition it started with, JSON.
    pub definition: String,
    pub state: String,
    /// JSON.
    pub inputs: String,
    /// What started it, JSON.
    pub trigger: String,
    pub group: Option<String>,
    pub cancelled: bool,
    pub created_by: String,
    /// The role of whoever started it: its steps may do what that role may.
    pub created_role: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub error: Option<String>,
}

/// One attempt of one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub run_id: Uuid,
    pub step: String,
    pub attempt: u32,
    pub state: String,
    pub job_id: Option<Uuid>,
    /// JSON.
    pub outputs: Option<String>,
    pub error: Option<String>,
    pub not_before: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

const RUN_COLUMNS: &str =
    "id, workflow, definition, state, inputs, trigger_data, concurrency_group, \
    cancelled, created_by, created_role, created_at, started_at, finished_at, error";
const STEP_COLUMNS: &str =
    "run_id, step, attempt, state, job_id, outputs, error, not_before, started_at, finished_at";

fn uuid(s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("id {s}: {e}")))
}

fn run_row(r: &AnyRow) -> Result<RunRecord, StoreError> {
    Ok(RunRecord {
        id: uuid(&r.try_get::<String, _>("id")?)?,
        workflow: r.try_get("workflow")?,
        definition: r.try_get("definition")?,
        state: r.try_get("state")?,
        inputs: r.try_get("inputs")?,
        trigger: r.try_get("trigger_data")?,
        group: r.try_get("concurrency_group")?,
        cancelled: r.try_get::<i64, _>("cancelled")? != 0,
        created_by: r.try_get("created_by")?,
        created_role: r.try_get("created_role")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        error: r.try_get("error")?,
    })
}

fn step_row(r: &AnyRow) -> Result<StepRecord, StoreError> {
    let job: Option<String> = r.try_get("job_id")?;
    Ok(StepRecord {
        run_id: uuid(&r.try_get::<String, _>("run_id")?)?,
        step: r.try_get("step")?,
        attempt: r.try_get::<i64, _>("attempt")? as u32,
        state: r.try_get("state")?,
        job_id: job.as_deref().map(uuid).transpose()?,
        outputs: r.try_get("outputs")?,
        error: r.try_get("error")?,
        not_before: r.try_get("not_before")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}

fn def_row(r: &AnyRow) -> Result<WorkflowDefRecord, StoreError> {
    Ok(WorkflowDefRecord {
        name: r.try_get("name")?,
        source: r.try_get("source")?,
        definition: r.try_get("definition")?,
        updated_by: r.try_get("updated_by")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// The tables that hold definitions (the same columns): workflows and AI agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defs {
    Workflows,
    Agents,
}

impl Defs {
    fn table(self) -> &'static str {
        match self {
            Defs::Workflows => "workflows",
            Defs::Agents => "agents",
        }
    }

    fn upsert(self) -> String {
        format!(
            "INSERT INTO {} (name, source, definition, updated_by, updated_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET source = excluded.source, \
             definition = excluded.definition, updated_by = excluded.updated_by, \
             updated_at = excluded.updated_at",
            self.table()
        )
    }
}

impl Store {
    /// Every workflow definition, by name.
    pub async fn workflow_defs(&self) -> Result<Vec<WorkflowDefRecord>, StoreError> {
        self.defs(Defs::Workflows).await
    }

    pub async fn workflow_def(&self, name: &str) -> Result<Option<WorkflowDefRecord>, StoreError> {
        self.def(Defs::Workflows, name).await
    }

    /// Every definition of one kind, by name.
    pub async fn defs(&self, kind: Defs) -> Result<Vec<WorkflowDefRecord>, StoreError> {
        let sql = format!(
            "SELECT name, source, definition, updated_by, updated_at FROM {} ORDER BY name",
            kind.table()
        );
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(def_row).collect()
    }

    pub async fn def(
        &self,
        kind: Defs,
        name: &str,
    ) -> Result<Option<WorkflowDefRecord>, StoreError> {
        let sql = format!(
            "SELECT name, source, definition, updated_by, updated_at FROM {} WHERE name = $1",
            kind.table()
        );
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(def_row).transpose()
    }

    /// Make the `file` workflows and agents exactly these (a file's definitions replace the
    /// earlier file's; those from the API stay unless the file now names them), together.
    pub async fn replace_file_workflows(
        &self,
        workflows: &[WorkflowDefRecord],
        agents: &[WorkflowDefRecord],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for (kind, defs) in [(Defs::Workflows, workflows), (Defs::Agents, agents)] {
            let sql = format!("SELECT name FROM {} WHERE source = 'file'", kind.table());
            let old: Vec<String> = sqlx::query(&sql)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get("name"))
                .collect::<Result<_, _>>()?;
            let delete = format!("DELETE FROM {} WHERE name = $1", kind.table());
            for name in old.iter().filter(|n| !defs.iter().any(|d| &d.name == *n)) {
                sqlx::query(&delete).bind(name).execute(&mut *tx).await?;
            }
            let upsert = kind.upsert();
            for d in defs {
                sqlx::query(&upsert)
                    .bind(&d.name)
                    .bind(&d.source)
                    .bind(&d.definition)
                    .bind(&d.updated_by)
                    .bind(d.updated_at)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Create or replace one workflow.
    pub async fn put_workflow_def(&self, d: &WorkflowDefRecord) -> Result<(), StoreError> {
        self.put_def(Defs::Workflows, d).await
    }

    /// Create or replace one definition.
    pub async fn put_def(&self, kind: Defs, d: &WorkflowDefRecord) -> Result<(), StoreError> {
        sqlx::query(&kind.upsert())
            .bind(&d.name)
            .bind(&d.source)
            .bind(&d.definition)
            .bind(&d.updated_by)
            .bind(d.updated_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn delete_workflow_def(&self, name: &str) -> Result<bool, StoreError> {
        self.delete_def(Defs::Workflows, name).await
    }

    pub async fn delete_def(&self, kind: Defs, name: &str) -> Result<bool, StoreError> {
        let sql = format!("DELETE FROM {} WHERE name = $1", kind.table());
        let r = sqlx::query(&sql).bind(name).execute(&self.pool).await?;
        Ok(r.rows_affected() > 0)
    }

    /// Store runs and step attempts (new or changed) together, if `fence` still leads.
    pub async fn save_workflow_changes(
        &self,
        fence: Option<&crate::lease::Fence>,
        runs: &[RunRecord],
        steps: &[StepRecord],
    ) -> Result<(), StoreError> {
        if runs.is_empty() && steps.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_fenced(fence).await?;
        for r in runs {
            sqlx::query(&format!(
                "INSERT INTO workflow_runs ({RUN_COLUMNS}) VALUES \
                 ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
                 ON CONFLICT (id) DO UPDATE SET state = excluded.state, \
                 cancelled = excluded.cancelled, started_at = excluded.started_at, \
                 finished_at = excluded.finished_at, error = excluded.error"
            ))
            .bind(r.id.to_string())
            .bind(&r.workflow)
            .bind(&r.definition)
            .bind(&r.state)
            .bind(&r.inputs)
            .bind(&r.trigger)
            .bind(&r.group)
            .bind(i64::from(r.cancelled))
            .bind(&r.created_by)
            .bind(&r.created_role)
            .bind(r.created_at)
            .bind(r.started_at)
            .bind(r.finished_at)
            .bind(&r.error)
            .execute(&mut *tx)
            .await?;
        }
        for s in steps {
            sqlx::query(&format!(
                "INSERT INTO workflow_steps ({STEP_COLUMNS}) VALUES \
                 ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (run_id, step, attempt) DO UPDATE SET state = excluded.state, \
                 job_id = excluded.job_id, outputs = excluded.outputs, error = excluded.error, \
                 not_before = excluded.not_before, started_at = excluded.started_at, \
                 finished_at = excluded.finished_at"
            ))
            .bind(s.run_id.to_string())
            .bind(&s.step)
            .bind(i64::from(s.attempt))
            .bind(&s.state)
            .bind(s.job_id.map(|j| j.to_string()))
            .bind(&s.outputs)
            .bind(&s.error)
            .bind(s.not_before)
            .bind(s.started_at)
            .bind(s.finished_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn workflow_run(&self, id: Uuid) -> Result<Option<RunRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM workflow_runs WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(run_row).transpose()
    }

    /// Runs, newest first (of one workflow when given).
    pub async fn workflow_runs(
        &self,
        workflow: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let rows = match workflow {
            Some(w) => {
                sqlx::query(&format!(
                    "SELECT {RUN_COLUMNS} FROM workflow_runs WHERE workflow = $1 \
                     ORDER BY id DESC LIMIT $2"
                ))
                .bind(w)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {RUN_COLUMNS} FROM workflow_runs ORDER BY id DESC LIMIT $1"
                ))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(run_row).collect()
    }

    /// Runs that have not ended, oldest first, with every attempt of their steps.
    pub async fn open_workflow_runs(
        &self,
    ) -> Result<(Vec<RunRecord>, Vec<StepRecord>), StoreError> {
        let runs = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM workflow_runs WHERE state IN ('queued', 'running') ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        let steps = sqlx::query(&format!(
            "SELECT {} FROM workflow_steps s JOIN workflow_runs r ON r.id = s.run_id \
             WHERE r.state IN ('queued', 'running') ORDER BY s.run_id, s.step, s.attempt",
            STEP_COLUMNS
                .split(", ")
                .map(|c| format!("s.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok((
            runs.iter().map(run_row).collect::<Result<_, _>>()?,
            steps.iter().map(step_row).collect::<Result<_, _>>()?,
        ))
    }

    /// Every attempt of a run's steps, by step and attempt.
    pub async fn workflow_steps(&self, run: Uuid) -> Result<Vec<StepRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {STEP_COLUMNS} FROM workflow_steps WHERE run_id = $1 ORDER BY step, attempt"
        ))
        .bind(run.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(step_row).collect()
    }

    /// Runs of one workflow that have not ended, oldest first.
    pub async fn open_runs_of(&self, workflow: &str) -> Result<Vec<RunRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM workflow_runs WHERE workflow = $1 \
             AND state IN ('queued', 'running') ORDER BY id"
        ))
        .bind(workflow)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_row).collect()
    }

    /// Take a webhook delivery: `false` when this workflow has taken its id before.
    pub async fn claim_delivery(
        &self,
        workflow: &str,
        delivery: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO workflow_deliveries (workflow, delivery, run_id, received_at) \
             VALUES ($1, $2, NULL, $3) ON CONFLICT (workflow, delivery) DO NOTHING",
        )
        .bind(workflow)
        .bind(delivery)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Give a delivery id back (its run was not started).
    pub async fn unclaim_delivery(&self, workflow: &str, delivery: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM workflow_deliveries WHERE workflow = $1 AND delivery = $2")
            .bind(workflow)
            .bind(delivery)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The run a delivery started (`None` while none has, or when it started none).
    pub async fn delivery_run(
        &self,
        workflow: &str,
        delivery: &str,
    ) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(
            "SELECT run_id FROM workflow_deliveries WHERE workflow = $1 AND delivery = $2",
        )
        .bind(workflow)
        .bind(delivery)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.try_get("run_id")).transpose()?.flatten())
    }

    pub async fn set_delivery_run(
        &self,
        workflow: &str,
        delivery: &str,
        run: Uuid,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE workflow_deliveries SET run_id = $1 WHERE workflow = $2 AND delivery = $3",
        )
        .bind(run.to_string())
        .bind(workflow)
        .bind(delivery)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forget deliveries received before `before` (their senders stopped retrying long ago).
    pub async fn prune_deliveries(&self, before: i64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM workflow_deliveries WHERE received_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// Every schedule's last look: (workflow, schedule, unix ms).
    pub async fn schedule_marks(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let rows = sqlx::query("SELECT workflow, schedule, last_checked FROM workflow_schedules")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("workflow")?,
                    r.try_get("schedule")?,
                    r.try_get("last_checked")?,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Record a schedule's last look, if `fence` still leads.
    pub async fn set_schedule_mark(
        &self,
        fence: Option<&crate::lease::Fence>,
        workflow: &str,
        schedule: &str,
        last_checked: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_fenced(fence).await?;
        sqlx::query(
            "INSERT INTO workflow_schedules (workflow, schedule, last_checked) VALUES ($1, $2, $3) \
             ON CONFLICT (workflow, schedule) DO UPDATE SET last_checked = excluded.last_checked",
        )
        .bind(workflow)
        .bind(schedule)
        .bind(last_checked)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
