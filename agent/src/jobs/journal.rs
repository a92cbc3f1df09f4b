//! The job journal: `<state_dir>/jobs.journal`, one JSON line per event (`started`, `finished`),
//! so that a job delivered again after a restart of either side is answered from here instead of
//! running twice.
//!
//! A `started` line of a job that changes the host (exec) is synced to disk before the job runs,
//! and its `finished` line is written at once. Lines of read-only jobs (probe, inventory, noop)
//! are buffered and written at most a second later (or when 32 KiB are waiting, or on close):
//! losing them in a crash only means such a job may run again, which changes nothing.
//! The file is rewritten with only the newest entries once it holds twice as many lines as it
//! keeps. A torn last line (a crash mid-write) is ignored on load.

use nebula_protocol::time::UnixMillis;
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// The most bytes of an HTTP answer the journal keeps.
const JOURNAL_BODY: usize = 64 * 1024;

use nebula_protocol::jobs::JobResult;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A job run is identified by its id and attempt: a retry is a new run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RunKey {
    pub id: Uuid,
    pub attempt: u32,
}

impl std::fmt::Display for RunKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.id, self.attempt)
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Line {
    Started {
        id: Uuid,
        attempt: u32,
        kind: String,
        at_unix_ms: i64,
    },
    Finished {
        id: Uuid,
        attempt: u32,
        at_unix_ms: i64,
        result: JobResult,
    },
}

/// What the journal knows about a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    Started { kind: String },
    Finished(JobResult),
}

#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    entries: HashMap<RunKey, Entry>,
    order: VecDeque<RunKey>,
    lines: usize,
    keep: usize,
    /// Lines of read-only jobs not written yet.
    pending: Vec<u8>,
    last_flush: std::time::Instant,
}

/// Buffered lines are written when this much waits, or this long after the last write.
const PENDING_BYTES: usize = 32 * 1024;
const PENDING_FOR: std::time::Duration = std::time::Duration::from_secs(1);

impl Drop for Journal {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(path = %self.path.display(), "writing the job journal: {e}");
        }
    }
}

impl Journal {
    /// Open (or create) the journal and read what it holds.
    pub fn open(path: &Path, keep: usize) -> std::io::Result<Journal> {
        let keep = keep.max(16);
        let mut entries = HashMap::new();
        let mut order = VecDeque::new();
        let mut lines = 0;
        if let Ok(f) = File::open(path) {
            for line in BufReader::new(f).lines() {
                let Ok(line) = line else { break };
                let Ok(parsed) = serde_json::from_str::<Line>(&line) else {
                    // A torn write at the end, or a line from a newer format: skip it.
                    continue;
                };
                lines += 1;
                let (key, entry) = match parsed {
                    Line::Started {
                        id, attempt, kind, ..
                    } => (RunKey { id, attempt }, Entry::Started { kind }),
                    Line::Finished {
                        id,
                        attempt,
                        result,
                        ..
                    } => (RunKey { id, attempt }, Entry::Finished(result)),
                };
                if entries.insert(key, entry).is_none() {
                    order.push_back(key);
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let mut j = Journal {
            path: path.to_owned(),
            file,
            entries,
            order,
            lines,
            keep,
            pending: Vec::new(),
            last_flush: std::time::Instant::now(),
        };
        j.trim();
        Ok(j)
    }

    pub fn get(&self, key: &RunKey) -> Option<&Entry> {
        self.entries.get(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Record that a run starts. `durable`: on disk (synced) before returning, for jobs that
    /// change the host and must never run twice, even across a power loss; otherwise buffered.
    pub fn started(&mut self, key: RunKey, kind: &str, durable: bool) -> std::io::Result<()> {
        self.append(
            &Line::Started {
                id: key.id,
                attempt: key.attempt,
                kind: kind.to_owned(),
                at_unix_ms: UnixMillis::now().as_i64(),
            },
            durable,
        )?;
        if self
            .entries
            .insert(
                key,
                Entry::Started {
                    kind: kind.to_owned(),
                },
            )
            .is_none()
        {
            self.order.push_back(key);
        }
        self.trim();
        Ok(())
    }

    /// Record a run's result. `durable`: written now (not buffered).
    pub fn finished(
        &mut self,
        key: RunKey,
        result: &JobResult,
        durable: bool,
    ) -> std::io::Result<()> {
        // An HTTP answer is kept to its first bytes: a redelivery after a lost stream gets
        // those (marked cut), and the journal stays small.
        let mut result = result.clone();
        if let nebula_protocol::jobs::JobOutput::Http(h) = &mut result.output {
            if h.body.len() > JOURNAL_BODY {
                h.body.truncate(JOURNAL_BODY);
                h.truncated = true;
            }
        }
        let result = &result;
        self.append(
            &Line::Finished {
                id: key.id,
                attempt: key.attempt,
                at_unix_ms: UnixMillis::now().as_i64(),
                result: result.clone(),
            },
            durable,
        )?;
        if durable {
            self.flush()?;
        }
        if self
            .entries
            .insert(key, Entry::Finished(result.clone()))
            .is_none()
        {
            self.order.push_back(key);
        }
        Ok(())
    }

    fn append(&mut self, line: &Line, sync: bool) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.pending, line).map_err(std::io::Error::other)?;
        self.pending.push(b'\n');
        self.lines += 1;
        if sync {
            self.flush()?;
            self.file.sync_data()?;
        } else if self.pending.len() >= PENDING_BYTES || self.last_flush.elapsed() >= PENDING_FOR {
            self.flush()?;
        }
        Ok(())
    }

    /// Write buffered lines (whole lines, in one append).
    pub fn flush(&mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            self.file.write_all(&self.pending)?;
            self.pending.clear();
        }
        self.last_flush = std::time::Instant::now();
        Ok(())
    }

    /// Forget the oldest finished runs beyond `keep`, and rewrite the file once it has grown to
    /// twice that. Runs still in progress are always kept.
    fn trim(&mut self) {
        let mut budget = self.order.len();
        while self.order.len() > self.keep && budget > 0 {
            budget -= 1;
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if matches!(self.entries.get(&oldest), Some(Entry::Started { .. })) {
                self.order.push_back(oldest);
            } else {
                self.entries.remove(&oldest);
            }
        }
        if self.lines > self.keep * 2 {
            if let Err(e) = self.rewrite() {
                tracing::warn!(path = %self.path.display(), "compacting the job journal: {e}");
            }
        }
    }

    fn rewrite(&mut self) -> std::io::Result<()> {
        self.pending.clear();
        let tmp = self.path.with_extension("journal.tmp");
        let mut out = std::io::BufWriter::new(File::create(&tmp)?);
        let mut lines = 0;
        for key in &self.order {
            let line = match self.entries.get(key) {
                Some(Entry::Started { kind }) => Line::Started {
                    id: key.id,
                    attempt: key.attempt,
                    kind: kind.clone(),
                    at_unix_ms: UnixMillis::now().as_i64(),
                },
                Some(Entry::Finished(result)) => Line::Finished {
                    id: key.id,
                    attempt: key.attempt,
                    at_unix_ms: UnixMillis::now().as_i64(),
                    result: result.clone(),
                },
                None => continue,
            };
            serde_json::to_writer(&mut out, &line).map_err(std::io::Error::other)?;
            out.write_all(b"\n")?;
            lines += 1;
        }
        out.flush()?;
        out.get_ref().sync_data()?;
        drop(out);
        std::fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.lines = lines;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nebula_protocol::jobs::JobStatus;

    fn key(n: u128) -> RunKey {
        RunKey {
            id: Uuid::from_u128(n),
            attempt: 1,
        }
    }

    #[test]
    fn survives_reopen_ignores_a_torn_line_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.journal");
        {
            let mut j = Journal::open(&path, 16).unwrap();
            j.started(key(1), "exec", true).unwrap();
            j.finished(key(1), &JobResult::new(JobStatus::Succeeded, None), true)
                .unwrap();
            j.started(key(2), "exec", false).unwrap();
        }
        // A crash mid-line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"event\":\"finished\",\"id\":").unwrap();
        drop(f);
        let mut j = Journal::open(&path, 16).unwrap();
        assert_eq!(
            j.get(&key(1)),
            Some(&Entry::Finished(JobResult::new(JobStatus::Succeeded, None)))
        );
        assert!(matches!(j.get(&key(2)), Some(Entry::Started { .. })));
        assert_eq!(j.get(&key(3)), None);
        // Another attempt of the same job is another run.
        assert_eq!(
            j.get(&RunKey {
                id: Uuid::from_u128(1),
                attempt: 2
            }),
            None
        );
        for n in 10..100 {
            j.started(key(n), "noop", false).unwrap();
            j.finished(key(n), &JobResult::new(JobStatus::Succeeded, None), false)
                .unwrap();
        }
        // The unfinished run 2 is kept however old; finished ones beyond 16 are forgotten.
        assert!(matches!(j.get(&key(2)), Some(Entry::Started { .. })));
        assert!(j.get(&key(99)).is_some());
        assert!(j.len() <= 17 + 1, "{}", j.len());
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(
            lines <= 16 * 2 + 2,
            "journal file not compacted: {lines} lines"
        );
        drop(j);
        let j = Journal::open(&path, 16).unwrap();
        assert!(j.get(&key(99)).is_some());
        assert!(matches!(j.get(&key(2)), Some(Entry::Started { .. })));
    }
}
