//! The database as portable rows: every table read in one snapshot, and rows loaded into an
//! empty database of either engine. Backups, restores and `nebula migrate` are made of these.
//!
//! Tables come in the order the migrations create them, so a row is loaded after the rows it
//! references. Each value is an integer, a float, a string or null, written as JSON; the
//! target's own column types decide how it is bound, so a dump from SQLite loads into
//! PostgreSQL and back.

use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::{Backend, Store, StoreError};

/// One value of a row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
}

/// A column's type, as far as a dump cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Float,
    Text,
}

impl Kind {
    fn of(declared: &str) -> Kind {
        let d = declared.to_ascii_uppercase();
        if d.contains("INT") {
            Kind::Int
        } else if d.contains("DOUB") || d.contains("REAL") || d.contains("FLOA") {
            Kind::Float
        } else {
            Kind::Text
        }
    }
}

/// What the dump hands its sink, in order: a table, then its rows.
#[derive(Debug)]
pub enum DumpItem<'a> {
    Table {
        name: &'a str,
        columns: &'a [String],
    },
    Row(&'a [Cell]),
}

/// Where a dump goes, an item at a time.
pub trait DumpSink: Send {
    fn item(
        &mut self,
        item: DumpItem<'_>,
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

/// How far a load got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub tables: u64,
    pub rows: u64,
}

/// Tables of running processes only (which replicas are up), not part of a dump.
const RUNTIME_TABLES: &[&str] = &["replicas"];

/// Most rows in one multi-row `INSERT` (PostgreSQL allows 65,535 parameters).
const INSERT_ROWS: usize = 200;

impl Store {
    /// The tables a dump holds, in the order the migrations create them.
    pub fn tables(&self) -> Vec<String> {
        let migrator = match self.backend {
            Backend::Sqlite => &crate::SQLITE_MIGRATIONS,
            Backend::Postgres => &crate::POSTGRES_MIGRATIONS,
        };
        let mut tables: Vec<String> = Vec::new();
        for m in migrator.iter() {
            // Comments first: they may hold `;`.
            let sql: String = m
                .sql
                .lines()
                .map(|l| l.split("--").next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n");
            for statement in sql.split(';') {
                let words: Vec<String> = statement
                    .split_whitespace()
                    .map(|w| w.trim_matches('(').to_ascii_lowercase())
                    .collect();
                let w: Vec<&str> = words.iter().map(String::as_str).collect();
                match w.as_slice() {
                    ["create", "table", "if", "not", "exists", name, ..]
                    | ["create", "table", name, ..]
                        if !RUNTIME_TABLES.contains(name) =>
                    {
                        tables.push(name.to_string())
                    }
                    ["drop", "table", "if", "exists", name, ..] | ["drop", "table", name, ..] => {
                        tables.retain(|t| t != name)
                    }
                    _ => {}
                }
            }
        }
        tables
    }

    /// The latest migration applied by this build.
    pub fn schema_version(&self) -> i64 {
        crate::SQLITE_MIGRATIONS
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or(0)
    }

    async fn columns(
        &self,
        conn: &mut sqlx::AnyConnection,
        table: &str,
    ) -> Result<Vec<(String, Kind)>, StoreError> {
        let rows = match self.backend {
            Backend::Sqlite => {
                sqlx::query("SELECT name, type FROM pragma_table_info($1) ORDER BY cid")
                    .bind(table)
                    .fetch_all(&mut *conn)
                    .await?
            }
            Backend::Postgres => {
                sqlx::query(
                    "SELECT column_name::text, data_type::text FROM information_schema.columns \
                     WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
                )
                .bind(table)
                .fetch_all(&mut *conn)
                .await?
            }
        };
        let cols = rows
            .iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>(0)?,
                    Kind::of(&r.try_get::<String, _>(1)?),
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        if cols.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "table `{table}` has no columns"
            )));
        }
        Ok(cols)
    }

    /// Read every table in one snapshot (a repeatable-read transaction), handing each table and
    /// row to `sink` as it comes. Writers are not held up. A sink error ends the dump.
    pub async fn dump<S: DumpSink>(&self, sink: &mut S) -> Result<Counts, DumpError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
        let mut counts = Counts::default();
        for table in self.tables() {
            let cols = self.columns(&mut tx, &table).await?;
            let names: Vec<String> = cols.iter().map(|(n, _)| n.clone()).collect();
            sink.item(DumpItem::Table {
                name: &table,
                columns: &names,
            })
            .await?;
            counts.tables += 1;
            let list = names
                .iter()
                .map(|n| quote(n))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!("SELECT {list} FROM {}", quote(&table));
            let mut rows = sqlx::query(&sql).fetch(&mut *tx);
            let mut cells = Vec::with_capacity(cols.len());
            while let Some(row) = rows.try_next().await.map_err(StoreError::from)? {
                cells.clear();
                for (i, (name, kind)) in cols.iter().enumerate() {
                    cells.push(
                        read_cell(&row, i, *kind)
                            .map_err(|e| StoreError::Corrupt(format!("{table}.{name}: {e}")))?,
                    );
                }
                sink.item(DumpItem::Row(&cells)).await?;
                counts.rows += 1;
            }
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(counts)
    }

    /// Whether every table a dump holds is empty (a fresh database after its migrations).
    pub async fn is_empty(&self) -> Result<bool, StoreError> {
        for table in self.tables() {
            let sql = format!("SELECT 1 FROM {} LIMIT 1", quote(&table));
            if sqlx::query(&sql)
                .fetch_optional(&self.pool)
                .await?
                .is_some()
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Start loading a dump into this (empty) database: one transaction, committed by
    /// [`Loader::finish`]; dropped before that, nothing is kept.
    pub async fn loader(&self) -> Result<Loader, StoreError> {
        if !self.is_empty().await? {
            return Err(StoreError::NotEmpty);
        }
        let tables = self.tables();
        let tx = self.begin_write().await?;
        Ok(Loader {
            store: self.clone(),
            tx,
            tables,
            current: None,
            pending: Vec::new(),
            counts: Counts::default(),
        })
    }
}

/// Why a dump stopped.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the dump: {0}")]
    Sink(#[from] std::io::Error),
}

struct Target {
    table: String,
    /// The dump's column order, with each column's kind in this database.
    columns: Vec<(String, Kind)>,
}

/// Rows going into an empty database, table by table, in one transaction.
pub struct Loader {
    store: Store,
    tx: sqlx::Transaction<'static, sqlx::Any>,
    tables: Vec<String>,
    current: Option<Target>,
    pending: Vec<Vec<Cell>>,
    counts: Counts,
}

impl Loader {
    /// The next table and the dump's column names. A table this build does not know, or a
    /// column its table lacks, is refused; columns the dump lacks get their defaults.
    pub async fn table(&mut self, name: &str, columns: &[String]) -> Result<(), StoreError> {
        self.flush().await?;
        if !self.tables.iter().any(|t| t == name) {
            return Err(StoreError::Corrupt(format!(
                "the backup has a table `{name}` this version does not know (is it newer?)"
            )));
        }
        let known = self.store.columns(&mut self.tx, name).await?;
        let mut cols = Vec::with_capacity(columns.len());
        for c in columns {
            let Some((_, kind)) = known.iter().find(|(n, _)| n == c) else {
                return Err(StoreError::Corrupt(format!(
                    "the backup has a column `{name}.{c}` this version does not know"
                )));
            };
            cols.push((c.clone(), *kind));
        }
        self.current = Some(Target {
            table: name.to_string(),
            columns: cols,
        });
        self.counts.tables += 1;
        Ok(())
    }

    /// One row of the current table, in the order its columns were given.
    pub async fn row(&mut self, cells: Vec<Cell>) -> Result<(), StoreError> {
        let Some(t) = &self.current else {
            return Err(StoreError::Corrupt("a row before any table".into()));
        };
        if cells.len() != t.columns.len() {
            return Err(StoreError::Corrupt(format!(
                "a row of `{}` has {} values for {} columns",
                t.table,
                cells.len(),
                t.columns.len()
            )));
        }
        self.pending.push(cells);
        self.counts.rows += 1;
        if self.pending.len() >= INSERT_ROWS {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), StoreError> {
        let (Some(t), false) = (&self.current, self.pending.is_empty()) else {
            return Ok(());
        };
        let width = t.columns.len();
        let rows = std::mem::take(&mut self.pending);
        let list = t
            .columns
            .iter()
            .map(|(n, _)| quote(n))
            .collect::<Vec<_>>()
            .join(", ");
        let values = (0..rows.len())
            .map(|r| {
                let ps = (1..=width)
                    .map(|c| format!("${}", r * width + c))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("({ps})")
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!("INSERT INTO {} ({list}) VALUES {values}", quote(&t.table));
        let mut q = sqlx::query(&sql);
        for row in rows {
            for (cell, (name, kind)) in row.into_iter().zip(&t.columns) {
                q = bind_cell(q, cell, *kind)
                    .map_err(|e| StoreError::Corrupt(format!("{}.{name}: {e}", t.table)))?;
            }
        }
        q.execute(&mut *self.tx).await?;
        Ok(())
    }

    /// Tables and rows taken so far.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Commit everything loaded.
    pub async fn finish(mut self) -> Result<Counts, StoreError> {
        self.flush().await?;
        self.tx.commit().await?;
        Ok(self.counts)
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

fn bind_cell(q: Query<'_>, cell: Cell, kind: Kind) -> Result<Query<'_>, String> {
    Ok(match (kind, cell) {
        (Kind::Int, Cell::Null) => q.bind(None::<i64>),
        (Kind::Float, Cell::Null) => q.bind(None::<f64>),
        (Kind::Text, Cell::Null) => q.bind(None::<String>),
        (Kind::Int, Cell::Int(v)) => q.bind(v),
        (Kind::Float, Cell::Int(v)) => q.bind(v as f64),
        (Kind::Float, Cell::Float(v)) => q.bind(v),
        (Kind::Text, Cell::Text(v)) => q.bind(v),
        (kind, cell) => return Err(format!("a {cell:?} where a {kind:?} belongs")),
    })
}

fn read_cell(row: &sqlx::any::AnyRow, i: usize, kind: Kind) -> Result<Cell, sqlx::Error> {
    Ok(match kind {
        Kind::Int => row
            .try_get::<Option<i64>, _>(i)?
            .map_or(Cell::Null, Cell::Int),
        // SQLite keeps a whole number in a REAL column as an integer.
        Kind::Float => match row.try_get::<Option<f64>, _>(i) {
            Ok(v) => v.map_or(Cell::Null, Cell::Float),
            Err(e) => row
                .try_get::<Option<i64>, _>(i)
                .map_err(|_| e)?
                .map_or(Cell::Null, |v| Cell::Float(v as f64)),
        },
        Kind::Text => row
            .try_get::<Option<String>, _>(i)?
            .map_or(Cell::Null, Cell::Text),
    })
}

/// An identifier quoted for both engines (names come from the migrations and the catalog).
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A database copied into another: the dump's items loaded as they come.
impl DumpSink for Loader {
    async fn item(&mut self, item: DumpItem<'_>) -> std::io::Result<()> {
        let r = match item {
            DumpItem::Table { name, columns } => self.table(name, columns).await,
            DumpItem::Row(cells) => self.row(cells.to_vec()).await,
        };
        r.map_err(std::io::Error::other)
    }
}
