//! Backups, restores and moving a controller from SQLite to PostgreSQL.
//!
//! A backup is one gzip file of JSON lines: a header (format, versions, the source engine, and
//! the key files sealed with a passphrase, [`keys`]), then each table's name and columns
//! followed by its rows as arrays, and an end line with the counts. It is taken from one
//! snapshot of the database while the controller runs (`nebula backup create`, `POST
//! /api/v1/backup`, or on a schedule by the `backup-scheduler` task), and loads into an empty
//! database of either engine ([`restore`]). [`migrate`] copies a database into another without
//! a file; the key files stay where they are, so agents reconnect without joining again.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::authz::{Change, Op, OpCtx};
use crate::store::dump::{Cell, Counts, DumpItem, DumpSink, Loader};
use crate::store::{Store, StoreError};
use crate::{ControlPlane, ControllerConfig, OpError};

pub mod keys;
pub mod replica;
mod schedule;

pub use keys::{KeyFiles, SealedKeys};
pub use schedule::{run_scheduled, BackupConfig};

/// The header's `format`.
pub const FORMAT: &str = "nebula-backup";
const VERSION: u32 = 1;
/// Compressed bytes gathered before they are written out.
const CHUNK: usize = 64 * 1024;

/// A backup's first line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub created_at: String,
    pub nebula_version: String,
    pub schema_version: i64,
    /// `sqlite` or `postgres`.
    pub source: String,
    pub keys: SealedKeys,
}

#[derive(Serialize, Deserialize)]
struct TableLine {
    table: String,
    columns: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct EndLine {
    end: Counts,
}

/// What a finished backup holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub tables: u64,
    pub rows: u64,
    pub bytes: u64,
}

/// JSON lines through gzip into an async writer, a chunk at a time.
struct LineWriter<W> {
    gz: GzEncoder<Vec<u8>>,
    out: W,
    bytes: u64,
}

impl<W: AsyncWrite + Unpin + Send> LineWriter<W> {
    fn new(out: W) -> Self {
        Self {
            gz: GzEncoder::new(
                Vec::with_capacity(CHUNK * 2),
                flate2::Compression::default(),
            ),
            out,
            bytes: 0,
        }
    }

    async fn line(&mut self, value: &impl Serialize) -> std::io::Result<()> {
        use std::io::Write as _;
        serde_json::to_writer(&mut self.gz, value)?;
        self.gz.write_all(b"\n")?;
        if self.gz.get_ref().len() >= CHUNK {
            let chunk = std::mem::take(self.gz.get_mut());
            self.put(&chunk).await?;
        }
        Ok(())
    }

    async fn put(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.out.write_all(chunk).await?;
        self.bytes += chunk.len() as u64;
        Ok(())
    }

    async fn finish(mut self) -> std::io::Result<(W, u64)> {
        let gz = std::mem::replace(&mut self.gz, GzEncoder::new(Vec::new(), Default::default()));
        let rest = gz.finish()?;
        self.put(&rest).await?;
        self.out.flush().await?;
        Ok((self.out, self.bytes))
    }
}

impl<W: AsyncWrite + Unpin + Send> DumpSink for LineWriter<W> {
    async fn item(&mut self, item: DumpItem<'_>) -> std::io::Result<()> {
        match item {
            DumpItem::Table { name, columns } => {
                self.line(&TableLine {
                    table: name.to_string(),
                    columns: columns.to_vec(),
                })
                .await
            }
            DumpItem::Row(cells) => self.line(&cells).await,
        }
    }
}

/// A new backup file, readable by its owner only (it holds sink URLs and their signing
/// secrets as stored, beside the sealed keys).
pub async fn create_private(path: &Path) -> std::io::Result<tokio::fs::File> {
    let mut o = tokio::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    o.mode(0o600);
    o.open(path).await
}

/// Write a backup of `store` and the key files of `config` to `out`.
pub async fn create<W: AsyncWrite + Unpin + Send>(
    store: &Store,
    config: &ControllerConfig,
    passphrase: &str,
    out: W,
) -> anyhow::Result<(W, Summary)> {
    let keys = KeyFiles::collect(config)?;
    let pass = passphrase.to_owned();
    let sealed = tokio::task::spawn_blocking(move || keys.seal(&pass)).await??;
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        created_at: crate::store::rfc3339_millis(SystemTime::now()),
        nebula_version: env!("CARGO_PKG_VERSION").into(),
        schema_version: store.schema_version(),
        source: backend_name(store).into(),
        keys: sealed,
    };
    let mut w = LineWriter::new(out);
    w.line(&header).await?;
    let counts = store.dump(&mut w).await?;
    w.line(&EndLine { end: counts }).await?;
    let (out, bytes) = w.finish().await?;
    Ok((
        out,
        Summary {
            tables: counts.tables,
            rows: counts.rows,
            bytes,
        },
    ))
}

fn backend_name(store: &Store) -> &'static str {
    match store.backend() {
        crate::store::Backend::Sqlite => "sqlite",
        crate::store::Backend::Postgres => "postgres",
    }
}

impl ControlPlane {
    /// A backup of this controller, written to `out` as it is read (admins only; audited).
    /// Secret keys cannot be rotated meanwhile, so every sealed value opens with the keys the
    /// backup holds.
    pub async fn backup<W: AsyncWrite + Unpin + Send>(
        &self,
        cx: &OpCtx,
        passphrase: &str,
        out: W,
    ) -> Result<(W, Summary), OpError> {
        self.authorize(cx, Op::Backup)?;
        if passphrase.chars().count() < keys::MIN_PASSPHRASE {
            return Err(OpError::Invalid(format!(
                "the passphrase needs at least {} characters",
                keys::MIN_PASSPHRASE
            )));
        }
        let (out, summary) = self.backup_unchecked(passphrase, out).await.map_err(|e| {
            tracing::error!("backup failed: {e:#}");
            OpError::Conflict(format!("the backup failed: {e:#}"))
        })?;
        self.record(
            cx,
            Change {
                action: "backup.create",
                target: "controller".into(),
                detail: json!({ "tables": summary.tables, "rows": summary.rows, "bytes": summary.bytes }),
                event: None,
            },
        );
        Ok((out, summary))
    }

    pub(crate) async fn backup_unchecked<W: AsyncWrite + Unpin + Send>(
        &self,
        passphrase: &str,
        out: W,
    ) -> anyhow::Result<(W, Summary)> {
        let _no_rekey = self.secrets.hold_keys().await;
        create(&self.store, &self.config, passphrase, out).await
    }
}

/// One line of a backup after the header.
enum Line {
    Table(TableLine),
    Row(Vec<Cell>),
    End(Counts),
}

fn parse_line(text: &str) -> anyhow::Result<Line> {
    if text.starts_with('[') {
        return Ok(Line::Row(serde_json::from_str(text)?));
    }
    let v: serde_json::Value = serde_json::from_str(text)?;
    if v.get("end").is_some() {
        return Ok(Line::End(serde_json::from_value::<EndLine>(v)?.end));
    }
    Ok(Line::Table(serde_json::from_value(v)?))
}

/// Reads a backup file's lines on a blocking thread.
struct Reader {
    header: Header,
    lines: tokio::sync::mpsc::Receiver<anyhow::Result<(u64, String)>>,
}

/// Longest line a backup may have (one row; job outputs and map documents are the big ones).
const MAX_LINE: u64 = 64 << 20;

/// The next line, at most [`MAX_LINE`] bytes: `None` at the end.
fn next_line(r: &mut impl std::io::BufRead) -> anyhow::Result<Option<String>> {
    use std::io::{BufRead as _, Read as _};
    let mut buf = Vec::new();
    let n = r.by_ref().take(MAX_LINE + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if n as u64 > MAX_LINE {
        bail!("a line longer than {} MiB", MAX_LINE >> 20);
    }
    Ok(Some(
        String::from_utf8(buf).context("a line that is not UTF-8")?,
    ))
}

fn open_backup(path: &Path) -> anyhow::Result<Reader> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut lines = std::io::BufReader::new(flate2::read::GzDecoder::new(file));
    let first = next_line(&mut lines)
        .context("the file is not a Nebula backup (not gzip)")?
        .context("the file is empty")?;
    let header: Header = serde_json::from_str(&first)
        .ok()
        .filter(|h: &Header| h.format == FORMAT)
        .context("the file is not a Nebula backup")?;
    if header.version != VERSION {
        bail!("backup format version {} is not supported", header.version);
    }
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    std::thread::spawn(move || {
        for n in 2u64.. {
            let item = match next_line(&mut lines) {
                Ok(None) => return,
                Ok(Some(l)) => Ok((n, l)),
                Err(e) => Err(anyhow::anyhow!("reading line {n} of the backup: {e:#}")),
            };
            let stop = item.is_err();
            if tx.blocking_send(item).is_err() || stop {
                return;
            }
        }
    });
    Ok(Reader { header, lines: rx })
}

/// A backup's header, read without loading anything.
pub fn inspect(path: &Path) -> anyhow::Result<Header> {
    Ok(open_backup(path)?.header)
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    pub header_created_at: String,
    pub source: String,
    pub tables: u64,
    pub rows: u64,
    pub key_files: Vec<PathBuf>,
}

/// Load a backup into the empty database of `config` and its keys into its (new) data dir.
/// Nothing is kept unless everything loads: the rows go in one transaction, and the keys are
/// written only after it commits. `progress` hears the rows loaded so far.
pub async fn restore(
    path: &Path,
    config: &ControllerConfig,
    passphrase: &str,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<Restored> {
    let mut reader = open_backup(path)?;
    let header = reader.header.clone();
    let (sealed, pass) = (header.keys.clone(), passphrase.to_owned());
    let keys = tokio::task::spawn_blocking(move || KeyFiles::open(&sealed, &pass)).await??;
    keys.check_free(config)?;
    let store = open_empty(config).await?;
    if header.schema_version > store.schema_version() {
        bail!(
            "the backup comes from a newer version (schema {}, this build has {})",
            header.schema_version,
            store.schema_version()
        );
    }
    let mut loader = store.loader().await?;
    let mut end = None;
    while let Some(item) = reader.lines.recv().await {
        let (n, text) = item?;
        if end.is_some() {
            bail!("line {n}: data after the end of the backup");
        }
        match parse_line(&text).with_context(|| format!("line {n} of the backup"))? {
            Line::Table(t) => loader
                .table(&t.table, &t.columns)
                .await
                .with_context(|| format!("line {n}"))?,
            Line::Row(cells) => {
                loader
                    .row(cells)
                    .await
                    .with_context(|| format!("line {n}"))?;
                if n % 1000 == 0 {
                    progress(n);
                }
            }
            Line::End(c) => end = Some(c),
        }
    }
    let Some(expected) = end else {
        bail!("the backup is cut short (no end line): nothing was restored");
    };
    let counts = check_counts(loader, expected).await?;
    let key_files = keys.install(config)?;
    store.close().await;
    Ok(Restored {
        header_created_at: header.created_at,
        source: header.source,
        tables: counts.tables,
        rows: counts.rows,
        key_files,
    })
}

async fn check_counts(loader: Loader, expected: Counts) -> anyhow::Result<Counts> {
    let counts = loader.counts();
    if counts != expected {
        bail!(
            "the backup says {} tables and {} rows but holds {} and {}: nothing was restored",
            expected.tables,
            expected.rows,
            counts.tables,
            counts.rows
        );
    }
    Ok(loader.finish().await?)
}

async fn open_empty(config: &ControllerConfig) -> anyhow::Result<Store> {
    keys::private_dir(&config.data_dir)?;
    let url = config.database_url();
    let store = Store::connect(&url)
        .await
        .with_context(|| format!("opening {}", crate::store::redact_url(&url)))?;
    if !store.is_empty().await? {
        bail!("{}", StoreError::NotEmpty);
    }
    Ok(store)
}

/// What a migration did.
#[derive(Debug, Clone, Serialize)]
pub struct Migrated {
    pub tables: u64,
    pub rows: u64,
    pub took: Duration,
}

/// Copy the database at `from` into the empty one at `to` (any engines), in one snapshot of
/// the source and one transaction on the target. The controller must be stopped: what it
/// writes after the snapshot would not be copied.
pub async fn migrate(from: &str, to: &str) -> anyhow::Result<Migrated> {
    let t0 = std::time::Instant::now();
    if from == to {
        bail!("the source and the target are the same database");
    }
    let source = Store::connect(from)
        .await
        .with_context(|| format!("opening {}", crate::store::redact_url(from)))?;
    let target = Store::connect(to)
        .await
        .with_context(|| format!("opening {}", crate::store::redact_url(to)))?;
    if !target.is_empty().await? {
        bail!(
            "{} is not empty: migrate needs a new database",
            crate::store::redact_url(to)
        );
    }
    let mut loader = target.loader().await?;
    let counts = source.dump(&mut loader).await?;
    check_counts(loader, counts).await?;
    source.close().await;
    target.close().await;
    Ok(Migrated {
        tables: counts.tables,
        rows: counts.rows,
        took: t0.elapsed(),
    })
}
