//! Retries: a request the chosen instance could not serve is sent again, to another
//! instance where there is one, after an exponential backoff with full jitter, within
//! the call's one deadline, only if the caller marked it idempotent, and only while the
//! node's retry budget allows, so that a failing service never gets a retry storm. A
//! retry keeps the message id of the first attempt (a deduplicating callee sees one
//! message).
//!
//! A request refused unrun by an instance that is stopping (`shutting_down`) is sent to
//! another instance whether or not it is idempotent: it was never run. That is what
//! makes rolling restarts cost no call.
//!
//! This module owns the budget and the loop; each attempt goes through the one call
//! pipeline like any other call.

use std::time::Duration;

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;

use super::calls::PendingReply;
use super::pipeline::{Call, Carried, Guards, Style};
use super::{CallError, CallOptions, Core};
use crate::codec::{codes, Id};

/// First backoff ceiling; it doubles with each retry, up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Retries allowed as a share of calls: each first attempt earns this much of a retry.
const BUDGET_RATIO: f64 = 0.2;
/// What the budget can save up (and starts with): a burst of retries after a quiet spell.
const BUDGET_MAX: f64 = 10.0;

/// The node's retry budget: a token bucket filled by calls and drained by retries.
pub(super) struct RetryBudget {
    tokens: Mutex<f64>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            tokens: Mutex::new(BUDGET_MAX),
        }
    }
}

impl RetryBudget {
    /// A call was made: it earns a share of a retry.
    fn deposit(&self) {
        let mut t = self.tokens.lock();
        *t = (*t + BUDGET_RATIO).min(BUDGET_MAX);
    }

    /// Whether a retry may go now (and takes its token if so).
    fn withdraw(&self) -> bool {
        let mut t = self.tokens.lock();
        if *t >= 1.0 {
            *t -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Attempts after the first for a request refused unrun (see [`not_run`]).
const NOT_RUN_RETRIES: u32 = 2;

/// Whether a failure says the request was not run at all: the instance was stopping
/// (PROTOCOL.md: a node answers `shutting_down` only for requests it did not run).
fn not_run(e: &CallError) -> bool {
    matches!(e, CallError::Remote { code, .. } if code == codes::SHUTTING_DOWN)
}

/// Whether a failure says the instance could not serve the call (another may), rather
/// than what the service answered or that the deadline passed.
fn retryable(e: &CallError) -> bool {
    match e {
        CallError::Disconnected(_) => true,
        CallError::Remote { code, .. } => code == codes::OVERLOADED || code == codes::SHUTTING_DOWN,
        _ => false,
    }
}

/// The backoff before retry `n` (1 for the first): uniformly random up to
/// `min(BACKOFF_MAX, BACKOFF_BASE × 2^(n-1))` ("full jitter").
fn backoff(n: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << (n.saturating_sub(1)).min(16))
        .min(BACKOFF_MAX);
    ceiling.mul_f64(fastrand::f64())
}

/// A request with up to `retries` retries (see [`CallOptions::retries`]; 0 for a call
/// that is not idempotent), and up to [`NOT_RUN_RETRIES`] for refusals of requests that
/// were not run, whatever the call. Every request takes this path: a first attempt
/// costs what a plain request costs (the budget is touched only with retries).
pub(super) async fn request<Req, Resp>(
    core: &Core,
    target: &str,
    req: &Req,
    opts: CallOptions,
    retries: u32,
) -> Result<Resp, CallError>
where
    Req: Serialize + ?Sized,
    Resp: DeserializeOwned,
{
    let timeout = core.policies.timeout(target, opts.timeout);
    let start = Instant::now();
    let deadline = super::calls::far_instant(start, timeout);
    // The first attempt's id, kept by the others.
    let mut id: Option<Id> = None;
    let mut tried = Vec::new();
    if retries > 0 {
        core.retry_budget.deposit();
    }
    let (mut attempt, mut unrun) = (0u32, 0u32);
    loop {
        // The first attempt starts when the call did (one clock reading for both).
        let now = match attempt + unrun {
            0 => start,
            _ => Instant::now(),
        };
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            return Err(CallError::Timeout {
                target: target.to_string(),
                timeout,
            });
        }
        let call = Call {
            style: Style::Request,
            target,
            req,
            encoded: None,
            timeout: Some(left),
            version: opts.version,
            carried: Carried::of(&opts),
            id,
            avoid: tried.clone(),
            guards: Guards::of(&opts),
            now,
        };
        let (result, instance) = match core.request(call).await {
            Ok((awaiting, instance)) => {
                id.get_or_insert(awaiting.id());
                (
                    PendingReply::<Resp>::new(awaiting).recv().await,
                    Some(instance),
                )
            }
            Err(e) => (Err(e), None),
        };
        match result {
            // Not run: another instance right away (its refusal was immediate).
            Err(e) if not_run(&e) && unrun < NOT_RUN_RETRIES => {
                unrun += 1;
                tried.extend(instance);
                tracing::debug!(target, ?id, error = %e, "not run there; sending it elsewhere");
            }
            Err(e) if retryable(&e) && attempt < retries && core.retry_budget.withdraw() => {
                attempt += 1;
                tried.extend(instance);
                let pause =
                    backoff(attempt).min(deadline.saturating_duration_since(Instant::now()));
                tracing::debug!(target, ?id, attempt, error = %e, ?pause, "retrying");
                tokio::time::sleep(pause).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_a_burst_then_a_fifth_of_calls() {
        let b = RetryBudget::default();
        let burst = (0..100).take_while(|_| b.withdraw()).count();
        assert_eq!(burst, 10, "what it saved up");
        // Then: one retry per five calls.
        let mut retries = 0;
        for _ in 0..100 {
            b.deposit();
            retries += b.withdraw() as usize;
        }
        assert_eq!(retries, 20);
    }

    #[test]
    fn backoff_is_jittered_under_a_doubling_ceiling() {
        for n in 1..20 {
            let ceiling = (BACKOFF_BASE * 2u32.pow((n - 1).min(16))).min(BACKOFF_MAX);
            for _ in 0..50 {
                assert!(backoff(n) <= ceiling);
            }
        }
        // Not always the same (full jitter).
        let draws: std::collections::HashSet<_> = (0..20).map(|_| backoff(5)).collect();
        assert!(draws.len() > 1);
    }
}
