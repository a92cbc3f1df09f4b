//! Sign-in throttling that a stranger cannot turn against a real user.
//!
//! - Failures are counted per (username, source address). After [`FREE_FAILURES`] failures in a
//!   row, that pair waits before its next try, doubling from [`FIRST_HOLD`] up to [`MAX_HOLD`].
//!   A correct password from another address is never refused because of them.
//! - One sign-in at a time per source address ([`PER_SOURCE`]); more are answered `429` at
//!   once, so a flood from one address never queues ahead of anyone.
//! - Password hashing has a global budget ([`HASHING_SLOTS`] at once). A source with recent
//!   failures may take a slot only while [`RESERVED_SLOTS`] stay free for clean sources;
//!   beyond that it is answered `429` at once. Clean sources wait for a slot at most
//!   [`CLEAN_WAIT`], [`MAX_WAITERS`] of them at most. Nothing queues without bound.
//! - Failed sign-ins are audited at most once per pair per [`AUDIT_EVERY`], and at most
//!   [`AUDIT_BUDGET`] rows a minute overall; the next row counts what was left out.
//!
//! All state is in memory, bounded by [`MAX_ENTRIES`] pairs and sources (the oldest go first).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

/// Failures in a row a (username, source) pair may have before it waits.
pub const FREE_FAILURES: u32 = 5;
/// The first wait after [`FREE_FAILURES`]; each further failure doubles it.
pub const FIRST_HOLD: Duration = Duration::from_secs(2);
pub const MAX_HOLD: Duration = Duration::from_secs(300);
/// Argon2 computations at once (each takes about 19 MiB and tens of milliseconds).
pub const HASHING_SLOTS: usize = 4;
/// Slots that sources with recent failures may not take.
pub const RESERVED_SLOTS: usize = 2;
/// Sign-ins under way at once from one source address.
pub const PER_SOURCE: u32 = 1;
/// How long a clean source waits for a hashing slot before it is answered 429.
pub const CLEAN_WAIT: Duration = Duration::from_secs(2);
pub const MAX_WAITERS: usize = 32;
/// A source counts as suspect this long after its last failure.
pub const SUSPECT_FOR: Duration = Duration::from_secs(900);
pub const AUDIT_EVERY: Duration = Duration::from_secs(60);
pub const AUDIT_BUDGET: u32 = 60;
pub const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct PairState {
    failures: u32,
    last_failure: Instant,
    hold_until: Option<Instant>,
    last_audit: Option<Instant>,
    unaudited: u32,
}

#[derive(Debug, Clone, Copy)]
struct SourceState {
    last_failure: Instant,
    /// Sign-ins from this source waiting for a slot or hashing.
    in_flight: u32,
}

#[derive(Debug, Default)]
struct State {
    pairs: HashMap<(String, IpAddr), PairState>,
    sources: HashMap<IpAddr, SourceState>,
    audit_window: Option<Instant>,
    audited_in_window: u32,
    suppressed: u32,
}

/// Why a sign-in was not even checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many failed sign-ins for `{user}` from this address; try again in {secs} s")]
    HeldOff { user: String, secs: u64 },
    #[error("too many sign-ins at once; try again in a moment")]
    Busy,
}

/// What to write to the audit log for a failed sign-in, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditNote {
    /// Failures of this pair not written since the last row (this one included).
    pub failures: u32,
    /// Rows left out fleet-wide because the budget was spent.
    pub suppressed: u32,
}

#[derive(Debug)]
pub struct SignInGuard {
    state: Mutex<State>,
    hashing: Semaphore,
    waiters: AtomicUsize,
}

impl Default for SignInGuard {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            hashing: Semaphore::new(HASHING_SLOTS),
            waiters: AtomicUsize::new(0),
        }
    }
}

/// A sign-in under way from one source (waiting for a hashing slot or hashing); gives the
/// source's turn back when dropped.
#[derive(Debug)]
struct InFlight<'a> {
    guard: &'a SignInGuard,
    source: IpAddr,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut s = self.guard.lock();
        if let Some(src) = s.sources.get_mut(&self.source) {
            src.in_flight = src.in_flight.saturating_sub(1);
        }
    }
}

/// A hashing slot, held while the password is checked.
#[derive(Debug)]
pub struct Slot<'a> {
    _in_flight: InFlight<'a>,
    _permit: SemaphorePermit<'a>,
}

impl SignInGuard {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Check that `user` may try from `source` now, and take a hashing slot for it. One
    /// sign-in at a time per source: a flood from one address is answered 429 at once and
    /// never queues ahead of anyone else.
    pub async fn admit(&self, user: &str, source: IpAddr) -> Result<Slot<'_>, Refused> {
        let now = Instant::now();
        let (suspect, in_flight) = {
            let mut s = self.lock();
            if let Some(p) = s.pairs.get(&(user.to_owned(), source)) {
                if let Some(until) = p.hold_until.filter(|u| *u > now) {
                    return Err(Refused::HeldOff {
                        user: user.to_owned(),
                        secs: (until - now).as_secs() + 1,
                    });
                }
            }
            if s.sources.len() >= MAX_ENTRIES {
                s.sources.retain(|_, src| {
                    src.in_flight > 0 || now.duration_since(src.last_failure) < SUSPECT_FOR
                });
                if s.sources.len() >= MAX_ENTRIES {
                    evict_oldest(&mut s.sources, |p| p.last_failure);
                }
            }
            let src = s.sources.entry(source).or_insert(SourceState {
                // Clean until a failure says otherwise.
                last_failure: now.checked_sub(SUSPECT_FOR).unwrap_or(now),
                in_flight: 0,
            });
            if src.in_flight >= PER_SOURCE {
                return Err(Refused::Busy);
            }
            let suspect = now.duration_since(src.last_failure) < SUSPECT_FOR;
            if suspect && self.hashing.available_permits() <= RESERVED_SLOTS {
                return Err(Refused::Busy);
            }
            src.in_flight += 1;
            (
                suspect,
                InFlight {
                    guard: self,
                    source,
                },
            )
        };
        let permit = if suspect {
            self.hashing.try_acquire().map_err(|_| Refused::Busy)?
        } else {
            if self.waiters.fetch_add(1, Ordering::AcqRel) >= MAX_WAITERS {
                self.waiters.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::Busy);
            }
            let got = tokio::time::timeout(CLEAN_WAIT, self.hashing.acquire()).await;
            self.waiters.fetch_sub(1, Ordering::AcqRel);
            match got {
                Ok(Ok(p)) => p,
                _ => return Err(Refused::Busy),
            }
        };
        Ok(Slot {
            _in_flight: in_flight,
            _permit: permit,
        })
    }

    /// A correct password: this pair starts over.
    pub fn succeeded(&self, user: &str, source: IpAddr) {
        self.lock().pairs.remove(&(user.to_owned(), source));
    }

    /// A wrong password: count it, maybe hold the pair off; say whether to audit it.
    pub fn failed(&self, user: &str, source: IpAddr) -> Option<AuditNote> {
        let now = Instant::now();
        let mut s = self.lock();
        if s.pairs.len() >= MAX_ENTRIES {
            evict_oldest(&mut s.pairs, |p| p.last_failure);
        }
        if s.sources.len() >= MAX_ENTRIES {
            evict_oldest(&mut s.sources, |p| p.last_failure);
        }
        let src = s.sources.entry(source).or_insert(SourceState {
            last_failure: now,
            in_flight: 0,
        });
        src.last_failure = now;
        let pair = s
            .pairs
            .entry((user.to_owned(), source))
            .or_insert(PairState {
                failures: 0,
                last_failure: now,
                hold_until: None,
                last_audit: None,
                unaudited: 0,
            });
        pair.failures = pair.failures.saturating_add(1);
        pair.last_failure = now;
        pair.unaudited = pair.unaudited.saturating_add(1);
        if pair.failures >= FREE_FAILURES {
            let doublings = (pair.failures - FREE_FAILURES).min(16);
            let hold = FIRST_HOLD.saturating_mul(1 << doublings).min(MAX_HOLD);
            pair.hold_until = Some(now + hold);
        }
        let due = pair
            .last_audit
            .is_none_or(|t| now.duration_since(t) >= AUDIT_EVERY);
        if !due {
            return None;
        }
        let failures = pair.unaudited;
        // The fleet-wide budget, a fixed window of one minute.
        let window_open = s
            .audit_window
            .is_some_and(|w| now.duration_since(w) < Duration::from_secs(60));
        if !window_open {
            s.audit_window = Some(now);
            s.audited_in_window = 0;
        }
        if s.audited_in_window >= AUDIT_BUDGET {
            s.suppressed = s.suppressed.saturating_add(1);
            return None;
        }
        s.audited_in_window += 1;
        let suppressed = std::mem::take(&mut s.suppressed);
        if let Some(p) = s.pairs.get_mut(&(user.to_owned(), source)) {
            p.last_audit = Some(now);
            p.unaudited = 0;
        }
        Some(AuditNote {
            failures,
            suppressed,
        })
    }
}

fn evict_oldest<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    at: impl Fn(&V) -> Instant,
) {
    // Drop the older half in one pass: amortised O(1) per insert.
    let mut times: Vec<Instant> = map.values().map(&at).collect();
    let mid = times.len() / 2;
    times.select_nth_unstable(mid);
    let cut = times[mid];
    map.retain(|_, v| at(v) > cut);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[tokio::test]
    async fn a_strangers_failures_never_hold_off_another_source() {
        let g = SignInGuard::default();
        for _ in 0..20 {
            if let Ok(slot) = g.admit("admin", ip(1)).await {
                drop(slot);
                g.failed("admin", ip(1));
            }
        }
        assert!(matches!(
            g.admit("admin", ip(1)).await,
            Err(Refused::HeldOff { .. }) | Err(Refused::Busy)
        ));
        // The real admin, elsewhere: admitted at once.
        let slot = g.admit("admin", ip(2)).await.expect("admitted");
        drop(slot);
        g.succeeded("admin", ip(2));
    }

    #[tokio::test]
    async fn the_hold_doubles_and_a_success_resets_the_pair() {
        let g = SignInGuard::default();
        for _ in 0..FREE_FAILURES {
            g.failed("bob", ip(3));
        }
        match g.admit("bob", ip(3)).await {
            Err(Refused::HeldOff { secs, .. }) => assert!(secs <= FIRST_HOLD.as_secs() + 1),
            other => panic!("expected a hold, got {other:?}"),
        }
        g.failed("bob", ip(3));
        match g.admit("bob", ip(3)).await {
            Err(Refused::HeldOff { secs, .. }) => assert!(secs > FIRST_HOLD.as_secs() + 1),
            other => panic!("expected a longer hold, got {other:?}"),
        }
        g.succeeded("bob", ip(3));
        let s = g.lock();
        assert!(!s.pairs.contains_key(&("bob".to_owned(), ip(3))));
    }

    #[tokio::test]
    async fn suspect_sources_leave_slots_for_clean_ones() {
        let g = SignInGuard::default();
        g.failed("x", ip(4));
        let first = g
            .admit("y", ip(4))
            .await
            .expect("one slot for a suspect source");
        assert_eq!(g.admit("z", ip(4)).await.unwrap_err(), Refused::Busy);
        // Another suspect source may take one more, then the reserve is untouchable.
        g.failed("x", ip(5));
        let second = g
            .admit("y", ip(5))
            .await
            .expect("a slot while the reserve is free");
        g.failed("x", ip(6));
        assert_eq!(g.admit("y", ip(6)).await.unwrap_err(), Refused::Busy);
        // Clean sources get the reserved slots.
        let a = g.admit("admin", ip(7)).await.expect("reserved slot");
        let b = g.admit("admin", ip(8)).await.expect("reserved slot");
        drop((first, second, a, b));
        assert_eq!(g.hashing.available_permits(), HASHING_SLOTS);
    }

    #[tokio::test]
    async fn one_sign_in_at_a_time_per_source() {
        let g = SignInGuard::default();
        let first = g.admit("a", ip(10)).await.expect("admitted");
        assert_eq!(g.admit("b", ip(10)).await.unwrap_err(), Refused::Busy);
        let other = g.admit("a", ip(11)).await.expect("another source");
        drop(first);
        let again = g.admit("b", ip(10)).await.expect("its turn is back");
        drop((other, again));
        assert!(g.lock().sources.values().all(|s| s.in_flight == 0));
    }

    #[test]
    fn failed_sign_ins_are_audited_at_a_bounded_rate() {
        let g = SignInGuard::default();
        assert_eq!(
            g.failed("u", ip(9)),
            Some(AuditNote {
                failures: 1,
                suppressed: 0
            })
        );
        for _ in 0..100 {
            assert_eq!(g.failed("u", ip(9)), None, "one row per pair per minute");
        }
        let mut written = 1;
        for i in 0..200u32 {
            let source = IpAddr::from([10, 0, (i >> 8) as u8, i as u8]);
            if g.failed("u", source).is_some() {
                written += 1;
            }
        }
        assert_eq!(written, AUDIT_BUDGET, "the fleet-wide budget holds");
        assert!(g.lock().suppressed > 0);
    }

    #[test]
    fn the_tables_stay_bounded() {
        let g = SignInGuard::default();
        for i in 0..(MAX_ENTRIES as u32 + 500) {
            g.failed("u", IpAddr::from(i.to_be_bytes()));
        }
        let s = g.lock();
        assert!(s.pairs.len() <= MAX_ENTRIES);
        assert!(s.sources.len() <= MAX_ENTRIES);
    }
}
