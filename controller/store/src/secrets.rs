//! The secret store's rows: sealed versions of each secret (the store never sees a value).

use sqlx::Row;

use super::{Store, StoreError};

/// One sealed version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRecord {
    pub name: String,
    pub version: u32,
    pub key_id: String,
    pub sealed: String,
    pub created_by: String,
    pub created_at: i64,
}

fn row(r: &sqlx::any::AnyRow) -> Result<SecretRecord, StoreError> {
    let version: i64 = r.try_get("version")?;
    Ok(SecretRecord {
        name: r.try_get("name")?,
        version: u32::try_from(version)
            .map_err(|_| StoreError::Corrupt(format!("secret version {version}")))?,
        key_id: r.try_get("key_id")?,
        sealed: r.try_get("sealed")?,
        created_by: r.try_get("created_by")?,
        created_at: r.try_get("created_at")?,
    })
}

const COLUMNS: &str = "name, version, key_id, sealed, created_by, created_at";

impl Store {
    /// The number the next version of `name` gets: after its newest, or after the last one it
    /// had before it was removed (numbers are never used twice).
    pub async fn next_secret_version(&self, name: &str) -> Result<u32, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM secrets WHERE name = $1")
            .bind(name.to_owned())
            .fetch_one(&self.pool)
            .await?;
        let kept: i64 = row.try_get("v")?;
        let removed: Option<i64> =
            sqlx::query("SELECT last_version FROM secret_removals WHERE name = $1")
                .bind(name.to_owned())
                .fetch_optional(&self.pool)
                .await?
                .map(|r| r.try_get("last_version"))
                .transpose()?;
        let v = kept.max(removed.unwrap_or(0));
        u32::try_from(v + 1).map_err(|_| StoreError::Corrupt(format!("secret version {v}")))
    }

    /// Store a version; `false` when that version exists already (a concurrent writer).
    pub async fn insert_secret(&self, rec: &SecretRecord) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO secrets (name, version, key_id, sealed, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name, version) DO NOTHING",
        )
        .bind(rec.name.clone())
        .bind(i64::from(rec.version))
        .bind(rec.key_id.clone())
        .bind(rec.sealed.clone())
        .bind(rec.created_by.clone())
        .bind(rec.created_at)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Every version of every secret (sealed), by name then newest first.
    pub async fn secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM secrets ORDER BY name, version DESC"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row).collect()
    }

    /// The newest version of each secret, by name.
    pub async fn latest_secret_versions(
        &self,
    ) -> Result<std::collections::BTreeMap<String, u32>, StoreError> {
        let rows = sqlx::query("SELECT name, MAX(version) AS v FROM secrets GROUP BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let v: i64 = r.try_get("v")?;
                let v = u32::try_from(v)
                    .map_err(|_| StoreError::Corrupt(format!("secret version {v}")))?;
                Ok((r.try_get("name")?, v))
            })
            .collect()
    }

    /// One version of `name` (`None`: the latest).
    pub async fn secret(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<SecretRecord>, StoreError> {
        let q = match version {
            Some(_) => format!("SELECT {COLUMNS} FROM secrets WHERE name = $1 AND version = $2"),
            None => format!(
                "SELECT {COLUMNS} FROM secrets WHERE name = $1 ORDER BY version DESC LIMIT 1"
            ),
        };
        let mut query = sqlx::query(&q).bind(name.to_owned());
        if let Some(v) = version {
            query = query.bind(i64::from(v));
        }
        query
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(row)
            .transpose()
    }

    /// Remove every version of `name`; how many there were. The last version number is kept.
    pub async fn delete_secret(&self, name: &str) -> Result<u64, StoreError> {
        sqlx::query(
            "INSERT INTO secret_removals (name, last_version) \
             SELECT name, MAX(version) FROM secrets WHERE name = $1 GROUP BY name \
             ON CONFLICT (name) DO UPDATE SET last_version = excluded.last_version",
        )
        .bind(name.to_owned())
        .execute(&self.pool)
        .await?;
        let r = sqlx::query("DELETE FROM secrets WHERE name = $1")
            .bind(name.to_owned())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// Up to `limit` versions sealed under a key other than `key_id`.
    pub async fn secrets_not_under(
        &self,
        key_id: &str,
        limit: u32,
    ) -> Result<Vec<SecretRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM secrets WHERE key_id <> $1 ORDER BY name, version LIMIT $2"
        ))
        .bind(key_id.to_owned())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row).collect()
    }

    /// Replace a version's sealed value if it is still under `old_key` (`false`: it changed).
    pub async fn reseal_secret(
        &self,
        rec: &SecretRecord,
        old_key: &str,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE secrets SET key_id = $1, sealed = $2 \
             WHERE name = $3 AND version = $4 AND key_id = $5",
        )
        .bind(rec.key_id.clone())
        .bind(rec.sealed.clone())
        .bind(rec.name.clone())
        .bind(i64::from(rec.version))
        .bind(old_key.to_owned())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The keys some stored version is sealed under.
    pub async fn secret_key_ids(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT DISTINCT key_id FROM secrets")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get("key_id").map_err(StoreError::from))
            .collect()
    }
}
