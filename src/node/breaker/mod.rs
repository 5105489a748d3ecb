//! Circuit breakers: one per service instance (a service's name on one node), with
//! resilience4j's semantics, so that a caller stops sending to an instance that fails or
//! is slow, gives it time, then probes it with a few calls before trusting it again.
//!
//! - **Closed**: calls go through; the outcomes of the last `window` calls are kept. Once
//!   at least `minimum_calls` are recorded, a failure rate or a slow-call rate at or above
//!   its threshold opens the breaker.
//! - **Open**: calls are refused at once (`CallError::BreakerOpen`) for `wait_in_open`.
//! - **Half-open**: after the wait, `permitted_in_half_open` calls go through as probes,
//!   each under its own `probe_timeout` (a probe not finished by then counts as failed,
//!   so a hung probe cannot keep the breaker half-open for ever); when all have an
//!   outcome, the same rates decide: open again, or closed with a fresh window.
//!
//! This module owns the state machine and nothing else: it never sends, never reads the
//! clock itself (every call is given `now`, so tests run it on a paused clock), and tells
//! its caller about state changes so the node can report them as events.

mod set;

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

pub use set::BreakerEvent;
pub(in crate::node) use set::{service_of, Breakers, Ticket};

/// How a breaker judges an instance. Defaults: a window of 20 calls, at least 10 before
/// judging, open at 50 % failures or 100 % slow calls (slower than 2 s), 5 s open, then
/// 3 probes with 2 s each.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Calls whose outcomes are kept while closed (a count-based sliding window).
    pub window: usize,
    /// Calls recorded before the rates are judged at all.
    pub minimum_calls: usize,
    /// Failure rate (0.0–1.0) at or above which the breaker opens.
    pub failure_rate: f64,
    /// Slow-call rate (0.0–1.0) at or above which the breaker opens.
    pub slow_call_rate: f64,
    /// A call slower than this is slow (whether it succeeded or not).
    pub slow_call_duration: Duration,
    /// How long the breaker stays open before it lets probes through.
    pub wait_in_open: Duration,
    /// Probes let through in half-open.
    pub permitted_in_half_open: usize,
    /// How long a probe may take before it counts as failed.
    pub probe_timeout: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: 20,
            minimum_calls: 10,
            failure_rate: 0.5,
            slow_call_rate: 1.0,
            slow_call_duration: Duration::from_secs(2),
            wait_in_open: Duration::from_secs(5),
            permitted_in_half_open: 3,
            probe_timeout: Duration::from_secs(2),
        }
    }
}

impl BreakerConfig {
    /// Judges the last `window` calls, once at least `minimum_calls` are in.
    #[must_use]
    pub fn with_window(mut self, window: usize, minimum_calls: usize) -> Self {
        self.window = window;
        self.minimum_calls = minimum_calls;
        self
    }

    /// Opens when at least `rate` (0.0–1.0) of the calls judged took longer than
    /// `slower_than`.
    #[must_use]
    pub fn with_slow_calls(mut self, rate: f64, slower_than: Duration) -> Self {
        self.slow_call_rate = rate;
        self.slow_call_duration = slower_than;
        self
    }

    /// Stays open this long before letting probes through.
    #[must_use]
    pub fn with_wait_in_open(mut self, wait: Duration) -> Self {
        self.wait_in_open = wait;
        self
    }

    /// Lets `permitted` probes through in half-open, each failed if it takes longer
    /// than `timeout`.
    #[must_use]
    pub fn with_probes(mut self, permitted: usize, timeout: Duration) -> Self {
        self.permitted_in_half_open = permitted;
        self.probe_timeout = timeout;
        self
    }
}

/// A breaker's state, as reported in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused.
    Open,
    /// A few probe calls go through.
    HalfOpen,
}

/// The outcome of one call, as a breaker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Outcome {
    pub failed: bool,
    pub slow: bool,
}

/// The breaker refused a call: it is open (or half-open with every probe taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refused;

/// A call the breaker let through; hand it back with [`Breaker::record`] or
/// [`Breaker::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Permit {
    /// The half-open generation it probes, if it is a probe (a probe of an earlier
    /// half-open spell no longer counts).
    probe: Option<u64>,
    started: Instant,
}

#[derive(Debug)]
enum State {
    Closed {
        outcomes: VecDeque<Outcome>,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        generation: u64,
        /// Probes let through: their start times (`None` once they have an outcome).
        probes: Vec<Option<Instant>>,
        outcomes: Vec<Outcome>,
    },
}

/// One instance's breaker. Not synchronised: the node keeps it under a lock.
#[derive(Debug)]
pub(super) struct Breaker {
    config: BreakerConfig,
    state: State,
    generation: u64,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Breaker {
            state: State::Closed {
                outcomes: VecDeque::with_capacity(config.window.min(64)),
            },
            config,
            generation: 0,
        }
    }

    /// A call slower than this counts as slow.
    pub fn slow_call_duration(&self) -> Duration {
        self.config.slow_call_duration
    }

    /// The state now (an open breaker whose wait is over still says open until a call
    /// asks for a permit).
    pub fn state(&self) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a call would be let through now (without taking a permit).
    pub fn would_admit(&mut self, now: Instant) -> bool {
        self.expire_probes(now);
        match &self.state {
            State::Closed { .. } => true,
            State::Open { until } => now >= *until,
            State::HalfOpen { probes, .. } => probes.len() < self.config.permitted_in_half_open,
        }
    }

    /// Asks to let a call through at `now`. Returns the permit (or the refusal) and the
    /// state change this caused, if any.
    pub fn try_acquire(
        &mut self,
        now: Instant,
    ) -> (
        Result<Permit, Refused>,
        Option<(BreakerState, BreakerState)>,
    ) {
        let mut change = self.expire_probes(now);
        if let State::Open { until } = self.state {
            if now < until {
                return (Err(Refused), change);
            }
            self.generation += 1;
            self.state = State::HalfOpen {
                generation: self.generation,
                probes: Vec::new(),
                outcomes: Vec::new(),
            };
            change = Some((BreakerState::Open, BreakerState::HalfOpen));
        }
        let permitted = self.config.permitted_in_half_open;
        let result = match &mut self.state {
            State::Closed { .. } => Ok(Permit {
                probe: None,
                started: now,
            }),
            State::HalfOpen {
                generation, probes, ..
            } => {
                if probes.len() < permitted {
                    probes.push(Some(now));
                    Ok(Permit {
                        probe: Some(*generation),
                        started: now,
                    })
                } else {
                    Err(Refused)
                }
            }
            State::Open { .. } => unreachable!("left above"),
        };
        (result, change)
    }

    /// Records the outcome of a call let through with `permit`. Returns the state change
    /// it caused, if any.
    pub fn record(
        &mut self,
        permit: Permit,
        outcome: Outcome,
        now: Instant,
    ) -> Option<(BreakerState, BreakerState)> {
        if let Some(change) = self.expire_probes(now) {
            // The probe timed out first and was counted as failed: the outcome that came
            // late no longer matters.
            if permit.probe.is_some() {
                return Some(change);
            }
        }
        let config = &self.config;
        match (&mut self.state, permit.probe) {
            (State::Closed { outcomes }, None) => {
                outcomes.push_back(outcome);
                while outcomes.len() > config.window.max(1) {
                    outcomes.pop_front();
                }
                let over = outcomes.len() >= config.minimum_calls.max(1)
                    && over_threshold(config, outcomes.iter());
                over.then(|| self.open(now, BreakerState::Closed))
            }
            (
                State::HalfOpen {
                    generation,
                    probes,
                    outcomes,
                },
                Some(g),
            ) if *generation == g => {
                // The earliest probe still running is the one that finished (probes are
                // interchangeable; only how many have an outcome matters).
                if let Some(slot) = probes.iter_mut().find(|p| p.is_some()) {
                    *slot = None;
                    outcomes.push(outcome);
                }
                self.judge_half_open(now)
            }
            // A permit from another state or an earlier half-open spell: stale.
            _ => None,
        }
    }

    /// A call let through whose outcome will never be known (its caller gave up before
    /// the reply): a probe's slot is given back, nothing is counted.
    pub fn release(&mut self, permit: Permit) {
        if let (
            State::HalfOpen {
                generation, probes, ..
            },
            Some(g),
        ) = (&mut self.state, permit.probe)
        {
            if *generation == g {
                if let Some(i) = probes.iter().position(|p| p.is_some()) {
                    probes.remove(i);
                }
            }
        }
    }

    fn open(&mut self, now: Instant, from: BreakerState) -> (BreakerState, BreakerState) {
        self.state = State::Open {
            until: now + self.config.wait_in_open,
        };
        (from, BreakerState::Open)
    }

    /// In half-open, probes running past `probe_timeout` count as failed.
    fn expire_probes(&mut self, now: Instant) -> Option<(BreakerState, BreakerState)> {
        let timeout = self.config.probe_timeout;
        let State::HalfOpen {
            probes, outcomes, ..
        } = &mut self.state
        else {
            return None;
        };
        let mut expired = false;
        for p in probes.iter_mut() {
            if p.is_some_and(|started| now.saturating_duration_since(started) >= timeout) {
                *p = None;
                outcomes.push(Outcome {
                    failed: true,
                    slow: true,
                });
                expired = true;
            }
        }
        if expired {
            self.judge_half_open(now)
        } else {
            None
        }
    }

    /// Once every permitted probe has an outcome: open again, or close.
    fn judge_half_open(&mut self, now: Instant) -> Option<(BreakerState, BreakerState)> {
        let State::HalfOpen { outcomes, .. } = &self.state else {
            return None;
        };
        if outcomes.len() < self.config.permitted_in_half_open.max(1) {
            return None;
        }
        if over_threshold(&self.config, outcomes.iter()) {
            Some(self.open(now, BreakerState::HalfOpen))
        } else {
            self.state = State::Closed {
                outcomes: VecDeque::new(),
            };
            Some((BreakerState::HalfOpen, BreakerState::Closed))
        }
    }
}

/// Whether the failure rate or the slow-call rate of `outcomes` reaches its threshold.
fn over_threshold<'a>(
    config: &BreakerConfig,
    outcomes: impl Iterator<Item = &'a Outcome> + Clone,
) -> bool {
    let n = outcomes.clone().count().max(1) as f64;
    let failed = outcomes.clone().filter(|o| o.failed).count() as f64;
    let slow = outcomes.filter(|o| o.slow).count() as f64;
    failed / n >= config.failure_rate || slow / n >= config.slow_call_rate
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Outcome = Outcome {
        failed: false,
        slow: false,
    };
    const FAIL: Outcome = Outcome {
        failed: true,
        slow: false,
    };
    const SLOW: Outcome = Outcome {
        failed: false,
        slow: true,
    };

    fn config() -> BreakerConfig {
        BreakerConfig {
            window: 10,
            minimum_calls: 5,
            failure_rate: 0.5,
            slow_call_rate: 0.8,
            slow_call_duration: Duration::from_millis(100),
            wait_in_open: Duration::from_secs(5),
            permitted_in_half_open: 2,
            probe_timeout: Duration::from_secs(1),
        }
    }

    fn call(b: &mut Breaker, o: Outcome) -> Option<(BreakerState, BreakerState)> {
        let now = Instant::now();
        let (p, _) = b.try_acquire(now);
        b.record(p.expect("let through"), o, now)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_at_the_threshold_and_not_below_the_minimum() {
        let mut b = Breaker::new(config());
        // Four failures: 100 %, but fewer than the minimum of five calls.
        for _ in 0..4 {
            assert_eq!(call(&mut b, FAIL), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // The fifth: five calls, all failed.
        assert_eq!(
            call(&mut b, FAIL),
            Some((BreakerState::Closed, BreakerState::Open))
        );
        assert_eq!(b.try_acquire(Instant::now()).0, Err(Refused));

        // Below the threshold it stays closed: 2 failures in 5 (40 %).
        let mut b = Breaker::new(config());
        for o in [FAIL, OK, FAIL, OK, OK] {
            assert_eq!(call(&mut b, o), None);
        }
        // One more failure: the window of six holds 3 failures (50 %): open.
        assert_eq!(
            call(&mut b, FAIL),
            Some((BreakerState::Closed, BreakerState::Open))
        );

        // Slow calls open it too, at their own threshold (80 %).
        let mut b = Breaker::new(config());
        for o in [SLOW, SLOW, SLOW, OK] {
            assert_eq!(call(&mut b, o), None);
        }
        assert_eq!(
            call(&mut b, SLOW),
            Some((BreakerState::Closed, BreakerState::Open))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides() {
        let mut b = Breaker::new(config());
        for o in [FAIL, FAIL, OK, OK, OK] {
            assert_eq!(call(&mut b, o), None, "2 in 5 is under 50 %");
        }
        // Ten successes push the failures out of the window of ten.
        for _ in 0..10 {
            assert_eq!(call(&mut b, OK), None);
        }
        for _ in 0..4 {
            assert_eq!(call(&mut b, FAIL), None, "4 in 10 is under 50 %");
        }
    }

    fn opened() -> Breaker {
        let mut b = Breaker::new(config());
        for _ in 0..5 {
            call(&mut b, FAIL);
        }
        assert_eq!(b.state(), BreakerState::Open);
        b
    }

    #[tokio::test(start_paused = true)]
    async fn stays_open_for_the_wait_then_lets_exactly_the_probes_through() {
        let mut b = opened();
        tokio::time::advance(Duration::from_millis(4999)).await;
        assert_eq!(b.try_acquire(Instant::now()).0, Err(Refused), "still open");
        tokio::time::advance(Duration::from_millis(1)).await;
        let now = Instant::now();
        let (p1, change) = b.try_acquire(now);
        assert_eq!(change, Some((BreakerState::Open, BreakerState::HalfOpen)));
        let (p2, _) = b.try_acquire(now);
        assert!(p1.is_ok() && p2.is_ok());
        assert_eq!(b.try_acquire(now).0, Err(Refused), "only two probes");
        // Both succeed: closed, with a fresh window.
        assert_eq!(b.record(p1.unwrap(), OK, now), None);
        assert_eq!(
            b.record(p2.unwrap(), OK, now),
            Some((BreakerState::HalfOpen, BreakerState::Closed))
        );
        for _ in 0..4 {
            assert_eq!(call(&mut b, FAIL), None, "the old failures are gone");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_it() {
        let mut b = opened();
        tokio::time::advance(Duration::from_secs(5)).await;
        let now = Instant::now();
        let (p1, _) = b.try_acquire(now);
        let (p2, _) = b.try_acquire(now);
        b.record(p1.unwrap(), OK, now);
        assert_eq!(
            b.record(p2.unwrap(), FAIL, now),
            Some((BreakerState::HalfOpen, BreakerState::Open)),
            "1 failure in 2 probes is 50 %"
        );
        assert_eq!(b.try_acquire(now).0, Err(Refused));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_probe_counts_as_failed_after_its_timeout() {
        let mut b = opened();
        tokio::time::advance(Duration::from_secs(5)).await;
        let now = Instant::now();
        let (p1, _) = b.try_acquire(now);
        let (_hung, _) = b.try_acquire(now);
        b.record(p1.unwrap(), OK, now);
        assert_eq!(b.state(), BreakerState::HalfOpen, "one probe still out");
        // The other never answers: after its timeout it is a failure, and the breaker
        // does not stay half-open.
        tokio::time::advance(Duration::from_secs(1)).await;
        let (refused, change) = b.try_acquire(Instant::now());
        assert_eq!(change, Some((BreakerState::HalfOpen, BreakerState::Open)));
        assert_eq!(refused, Err(Refused));
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_probe_frees_its_slot() {
        let mut b = opened();
        tokio::time::advance(Duration::from_secs(5)).await;
        let now = Instant::now();
        let (p1, _) = b.try_acquire(now);
        let (_p2, _) = b.try_acquire(now);
        b.release(p1.unwrap());
        assert!(b.try_acquire(now).0.is_ok(), "its slot was given back");
    }
}
