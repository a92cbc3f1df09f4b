//! Leader terms (replicas on PostgreSQL, protocol 1.10).
//!
//! Every replica that leads does so in a term, a number the database raises at each takeover.
//! The leader says its term when a session starts (`ControllerMessage::Term`) and puts it on
//! every job (`JobControl::Fenced`). The agent keeps the highest term it has seen, in memory and
//! in its state file, and refuses a lower one: a leader that was paused past its lease and woke
//! up after another took over cannot make this node act.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The highest leader term seen.
#[derive(Debug, Default)]
pub struct Terms {
    highest: AtomicU64,
    /// The state dir a raised term is saved in.
    state: OnceLock<PathBuf>,
}

impl Terms {
    pub fn new(highest: u64) -> Self {
        Terms {
            highest: AtomicU64::new(highest),
            state: OnceLock::new(),
        }
    }

    /// Start from the term saved in this state dir, and save every raised term there.
    pub fn keep_in(&self, dir: &Path, saved: u64) {
        let _ = self.state.set(dir.to_owned());
        self.highest.fetch_max(saved, Ordering::SeqCst);
    }

    pub fn highest(&self) -> u64 {
        self.highest.load(Ordering::SeqCst)
    }

    /// May a leader of `term` act here? `Ok(true)` when it raised the highest term (saved in
    /// the state dir), `Ok(false)` when it equals it, and the reason when it is lower.
    pub fn admit(&self, term: u64) -> Result<bool, String> {
        let before = self.highest.fetch_max(term, Ordering::SeqCst);
        if term < before {
            return Err(format!(
                "term {term} is over: this agent has seen the leader of term {before}"
            ));
        }
        let raised = term > before;
        if let (true, Some(dir)) = (raised, self.state.get()) {
            if let Err(e) = crate::identity::StateDir::new(dir).save_term(term) {
                tracing::warn!("saving the leader's term: {e}");
            }
        }
        Ok(raised)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lower_term_is_refused_and_never_lowers_the_highest() {
        let t = Terms::new(3);
        assert_eq!(t.admit(3), Ok(false));
        assert_eq!(t.admit(5), Ok(true));
        let why = t.admit(4).unwrap_err();
        assert!(
            why.contains("term 4 is over") && why.contains("term 5"),
            "{why}"
        );
        assert_eq!(t.highest(), 5);
        assert_eq!(t.admit(5), Ok(false));
    }
}
