//! A circuit breaker per (node, model): opens on overload or repeated failures, cools down,
//! lets one probe through half-open, closes on its success.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::AiConfig;

/// How a request to a node ended, as far as its breaker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// 429 or 503: the node says it is overloaded; open at once.
    Overloaded,
    Timeout,
    Failure,
    /// Not the node's fault (a bad request, the client went away).
    Neutral,
}

/// A circuit breaker for one (node, model).
#[derive(Debug, Clone)]
pub(super) struct Breaker {
    state: BreakerState,
    /// Outcomes of the last requests while closed (true: failed).
    recent: VecDeque<bool>,
    consecutive: u32,
    cooldown: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: BreakerState::Closed,
            recent: VecDeque::new(),
            consecutive: 0,
            cooldown: None,
        }
    }
}

/// Outcomes looked at for the failure ratio, and the least that count.
const RATIO_WINDOW: usize = 20;
const RATIO_MIN: usize = 10;

impl Breaker {
    /// Open or half-open: requests are being kept away.
    pub(super) fn is_open(&self) -> bool {
        self.state != BreakerState::Closed
    }

    pub(super) fn may_try(&self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { until } => now >= until,
            BreakerState::HalfOpen { probing } => !probing,
        }
    }

    pub(super) fn begin(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen { probing: true };
                true
            }
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { probing: false } => {
                self.state = BreakerState::HalfOpen { probing: true };
                true
            }
            BreakerState::HalfOpen { probing: true } => false,
        }
    }

    pub(super) fn record(&mut self, outcome: Outcome, now: Instant, cfg: &AiConfig) {
        if outcome == Outcome::Neutral {
            if let BreakerState::HalfOpen { .. } = self.state {
                self.state = BreakerState::HalfOpen { probing: false };
            }
            return;
        }
        let failed = outcome != Outcome::Success;
        match self.state {
            BreakerState::HalfOpen { .. } => {
                if failed {
                    let next = self
                        .cooldown
                        .map_or(cfg.breaker_cooldown, |c| c * 2)
                        .min(cfg.breaker_max_cooldown);
                    self.open(now, next);
                } else {
                    self.state = BreakerState::Closed;
                    self.cooldown = None;
                    self.recent.clear();
                    self.consecutive = 0;
                }
            }
            BreakerState::Open { .. } => {}
            BreakerState::Closed => {
                self.recent.push_back(failed);
                if self.recent.len() > RATIO_WINDOW {
                    self.recent.pop_front();
                }
                self.consecutive = if failed { self.consecutive + 1 } else { 0 };
                let failures = self.recent.iter().filter(|f| **f).count();
                let ratio_trip =
                    self.recent.len() >= RATIO_MIN && failures * 2 >= self.recent.len();
                if outcome == Outcome::Overloaded
                    || self.consecutive >= cfg.breaker_failures.max(1)
                    || ratio_trip
                {
                    self.open(now, cfg.breaker_cooldown);
                }
            }
        }
    }

    fn open(&mut self, now: Instant, cooldown: Duration) {
        self.cooldown = Some(cooldown);
        self.state = BreakerState::Open {
            until: now + cooldown,
        };
        self.recent.clear();
        self.consecutive = 0;
    }

    pub(super) fn state_name(&self, now: Instant) -> &'static str {
        match self.state {
            BreakerState::Closed => "closed",
            BreakerState::Open { until } if now >= until => "half-open",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half-open",
        }
    }
}
