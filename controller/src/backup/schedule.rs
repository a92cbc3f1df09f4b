//! Scheduled backups: the `backup-scheduler` leader task writes one into `[backup] dir` every
//! `interval` and keeps the newest `keep`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::tasks::Trigger;
use crate::ControlPlane;

const PREFIX: &str = "nebula-backup-";
const SUFFIX: &str = ".jsonl.gz";

/// `[backup]` in the controller's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// Where scheduled backups go (`NEBULA_BACKUP_DIR`); none: no scheduled backups.
    pub dir: Option<PathBuf>,
    /// How often one is taken.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How many are kept (the oldest are removed).
    pub keep: usize,
    /// A file holding the passphrase the key files are sealed with
    /// (`NEBULA_BACKUP_PASSPHRASE_FILE`); required with `dir`.
    pub passphrase_file: Option<PathBuf>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            dir: None,
            interval: Duration::from_secs(24 * 3600),
            keep: 7,
            passphrase_file: None,
        }
    }
}

impl BackupConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.dir.is_some() && self.passphrase_file.is_none() {
            return Err(
                "[backup] dir needs a passphrase_file (the keys in a backup are sealed with it)"
                    .into(),
            );
        }
        if self.keep == 0 {
            return Err("[backup] keep must be at least 1".into());
        }
        if self.interval < Duration::from_secs(1) {
            return Err("[backup] interval must be at least 1s".into());
        }
        Ok(())
    }
}

/// The scheduled backups in `dir`, oldest first (their names sort by time).
pub fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    found.sort();
    Ok(found)
}

fn file_name(at: SystemTime) -> String {
    // 2026-12-07T06:15:00.123Z -> 20261207T061500123Z
    let stamp: String = crate::store::rfc3339_millis(at)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    format!("{PREFIX}{stamp}{SUFFIX}")
}

/// One run of the `backup-scheduler` task. At start, a backup younger than the interval
/// counts as this period's.
pub async fn run_scheduled(
    cp: &Arc<ControlPlane>,
    trigger: Trigger,
) -> anyhow::Result<serde_json::Value> {
    let cfg = &cp.config.backup;
    let Some(dir) = &cfg.dir else {
        return Ok(json!({ "skipped": "no [backup] dir configured" }));
    };
    let existing = list(dir)?;
    if trigger == Trigger::Start {
        if let Some(newest) = existing.last() {
            let age = std::fs::metadata(newest)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if age.is_some_and(|a| a < cfg.interval) {
                return Ok(json!({ "skipped": "the newest backup is recent", "newest": newest }));
            }
        }
    }
    let pass_file = cfg
        .passphrase_file
        .as_ref()
        .context("no [backup] passphrase_file")?;
    let passphrase = std::fs::read_to_string(pass_file)
        .with_context(|| format!("reading {}", pass_file.display()))?;
    let passphrase = passphrase.trim_end_matches(['\r', '\n']);
    super::keys::private_dir(dir)?;
    let path = dir.join(file_name(SystemTime::now()));
    let partial = path.with_extension("partial");
    let file = super::create_private(&partial)
        .await
        .with_context(|| format!("creating {}", partial.display()))?;
    let result = cp.backup_unchecked(passphrase, file).await;
    let summary = match result {
        Ok((file, summary)) => {
            file.sync_all().await?;
            tokio::fs::rename(&partial, &path).await?;
            summary
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
    };
    let mut all = list(dir)?;
    let mut removed = Vec::new();
    while all.len() > cfg.keep {
        let old = all.remove(0);
        std::fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
        removed.push(old);
    }
    tracing::info!(file = %path.display(), rows = summary.rows, bytes = summary.bytes, "scheduled backup written");
    Ok(json!({
        "file": path,
        "tables": summary.tables,
        "rows": summary.rows,
        "bytes": summary.bytes,
        "removed": removed,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_time_and_only_backups_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a = file_name(t);
        let b = file_name(t + Duration::from_millis(1500));
        assert!(a < b, "{a} {b}");
        assert!(a.starts_with(PREFIX) && a.ends_with(SUFFIX) && !a.contains(':'));
        for n in [&b, &a, &"notes.txt".to_string()] {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        let l = list(dir.path()).unwrap();
        assert_eq!(
            l.iter()
                .map(|p| p.file_name().unwrap().to_str().unwrap())
                .collect::<Vec<_>>(),
            [a.as_str(), b.as_str()]
        );
        assert!(BackupConfig {
            dir: Some(dir.path().into()),
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
