//! Desired state: accepted service maps (versioned), the deployment history and rollback pins.

use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{Store, StoreError};

/// One accepted service map.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DesiredRecord {
    pub version: i64,
    pub document: String,
    pub digest: String,
    /// `api` or `file:<path>`.
    pub source: String,
    pub created_by: String,
    pub created_at: i64,
}

pub use nebula_types::api::desired::DeploymentRecord;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PinRecord {
    pub service: String,
    pub revision: String,
    #[serde(skip)]
    pub spec: String,
    /// The map's revision of the service when the pin was made; a new one ends the pin.
    pub base_revision: String,
    pub created_by: String,
    pub created_at: i64,
}

const DEPLOYMENT_COLUMNS: &str = "id, service, node_id, node_name, action, revision, previous, \
    spec, trigger_reason, outcome, message, job_id, desired_version, started_at, finished_at";

impl Store {
    /// Store a new map; its version is one more than the newest.
    pub async fn insert_desired(
        &self,
        document: &str,
        digest: &str,
        source: &str,
        created_by: &str,
        now: i64,
    ) -> Result<DesiredRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        // The next version is read, then written: on PostgreSQL two applies at once (two
        // controllers) would both read the same one, so the table is locked against other
        // writers first (SQLite's BEGIN IMMEDIATE already serializes them).
        if self.backend == super::Backend::Postgres {
            sqlx::query("LOCK TABLE desired_state IN SHARE ROW EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await?;
        }
        let version: i64 =
            sqlx::query("SELECT COALESCE(MAX(version), 0) + 1 AS v FROM desired_state")
                .fetch_one(&mut *tx)
                .await?
                .try_get("v")?;
        sqlx::query(
            "INSERT INTO desired_state (version, document, digest, source, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(version)
        .bind(document)
        .bind(digest)
        .bind(source)
        .bind(created_by)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(DesiredRecord {
            version,
            document: document.to_owned(),
            digest: digest.to_owned(),
            source: source.to_owned(),
            created_by: created_by.to_owned(),
            created_at: now,
        })
    }

    pub async fn latest_desired(&self) -> Result<Option<DesiredRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT version, document, digest, source, created_by, created_at FROM desired_state \
             ORDER BY version DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(DesiredRecord {
                version: r.try_get("version")?,
                document: r.try_get("document")?,
                digest: r.try_get("digest")?,
                source: r.try_get("source")?,
                created_by: r.try_get("created_by")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .transpose()
    }

    pub async fn insert_deployment(&self, d: &DeploymentRecord) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO deployments ({DEPLOYMENT_COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
        ))
        .bind(d.id.to_string())
        .bind(&d.service)
        .bind(d.node_id.to_string())
        .bind(&d.node)
        .bind(&d.action)
        .bind(&d.revision)
        .bind(d.previous.join(","))
        .bind(&d.spec)
        .bind(&d.trigger)
        .bind(&d.outcome)
        .bind(d.message.clone())
        .bind(d.job_id.map(|j| j.to_string()))
        .bind(d.desired_version)
        .bind(d.started_at)
        .bind(d.finished_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn finish_deployment(
        &self,
        id: Uuid,
        outcome: &str,
        message: Option<&str>,
        previous: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE deployments SET outcome = $2, message = $3, previous = $4, finished_at = $5 \
             WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(outcome)
        .bind(message.map(str::to_owned))
        .bind(previous.join(","))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn delete_deployment(&self, id: Uuid) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM deployments WHERE id = $1")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Newest first; `service: None` for all.
    pub async fn deployments(
        &self,
        service: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DeploymentRecord>, StoreError> {
        let limit = limit.clamp(1, 10_000);
        let rows = match service {
            Some(s) => {
                sqlx::query(&format!(
                    "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE service = $1 \
                     ORDER BY started_at DESC, id DESC LIMIT {limit}"
                ))
                .bind(s.to_owned())
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {DEPLOYMENT_COLUMNS} FROM deployments \
                     ORDER BY started_at DESC, id DESC LIMIT {limit}"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(deployment_row).collect()
    }

    /// Deployments still marked running (the controller stopped while they ran).
    pub async fn unfinished_deployments(&self) -> Result<Vec<DeploymentRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE outcome = 'running'"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(deployment_row).collect()
    }

    /// The spec of every revision deployed, newest last.
    pub async fn revision_specs(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT revision, spec FROM deployments WHERE action <> 'remove' ORDER BY started_at",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("revision")?, r.try_get("spec")?)))
            .collect()
    }

    pub async fn pins(&self) -> Result<Vec<PinRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT service, revision, spec, base_revision, created_by, created_at FROM service_pins",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PinRecord {
                    service: r.try_get("service")?,
                    revision: r.try_get("revision")?,
                    spec: r.try_get("spec")?,
                    base_revision: r.try_get("base_revision")?,
                    created_by: r.try_get("created_by")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    pub async fn set_pin(&self, p: &PinRecord) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM service_pins WHERE service = $1")
            .bind(&p.service)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO service_pins (service, revision, spec, base_revision, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&p.service)
        .bind(&p.revision)
        .bind(&p.spec)
        .bind(&p.base_revision)
        .bind(&p.created_by)
        .bind(p.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn delete_pin(&self, service: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM service_pins WHERE service = $1")
            .bind(service.to_owned())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

fn deployment_row(r: &AnyRow) -> Result<DeploymentRecord, StoreError> {
    let uuid = |s: String| Uuid::parse_str(&s).map_err(|e| StoreError::Corrupt(e.to_string()));
    let previous: String = r.try_get("previous")?;
    let job: Option<String> = r.try_get("job_id")?;
    Ok(DeploymentRecord {
        id: uuid(r.try_get("id")?)?,
        service: r.try_get("service")?,
        node_id: uuid(r.try_get("node_id")?)?,
        node: r.try_get("node_name")?,
        action: r.try_get("action")?,
        revision: r.try_get("revision")?,
        previous: previous
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        spec: r.try_get("spec")?,
        trigger: r.try_get("trigger_reason")?,
        outcome: r.try_get("outcome")?,
        message: r.try_get("message")?,
        job_id: job.map(uuid).transpose()?,
        desired_version: r.try_get("desired_version")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}
