//! The outbox's delivery loop: starts attempts as there is room, learns how each went,
//! and moves every message between ready, in flight, retrying and held.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::de::IgnoredAny;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{now_ms, Job, Outbox, Outcome, Stage, State};
use crate::codec::codes;
use crate::node::calls::PendingReply;
use crate::node::pipeline::{Call, Carried, Guards, Style};
use crate::node::{CallError, Core};
use crate::transport::SendError;

/// First backoff ceiling after a failed attempt; it doubles with each, up to
/// [`BACKOFF_MAX`] (full jitter, as for retries).
const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Instances a message remembers as having failed it (its next attempts avoid them
/// while another serves the target).
const AVOID_MAX: usize = 8;
/// How often messages held for want of an instance are checked for expiry, and
/// acknowledged messages removed from the disk log (one commit for all of them).
const HELD_SWEEP: Duration = Duration::from_millis(200);
/// How often messages held for want of an instance are tried again whatever happened:
/// a breaker that half-opens says nothing to the membership, and a change can come
/// between an attempt finding no instance and its message being filed as held.
const HELD_RETRY: Duration = Duration::from_secs(1);

fn backoff(attempts: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    ceiling.mul_f64(fastrand::f64())
}

/// The delivery loop of `outbox`, until `cancel`.
pub(in crate::node) async fn run(core: Weak<Core>, outbox: Arc<Outbox>, cancel: CancellationToken) {
    let mut flying = FuturesUnordered::new();
    let mut sweep = Instant::now() + HELD_SWEEP;
    let mut retry_held = Instant::now() + HELD_RETRY;
    loop {
        let Some(strong) = core.upgrade() else {
            return;
        };
        // Before looking: a change from here on wakes the wait below.
        let changed = strong.membership.changed();
        let wake = outbox.wake.notified();
        let room = outbox.config.max_in_flight.saturating_sub(flying.len());
        let (jobs, next_due, holding) = outbox.take_ready(Instant::now(), room);
        for job in jobs {
            flying.push(attempt(strong.clone(), job));
        }
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            Some((seq, outcome)) = flying.next(), if !flying.is_empty() => {
                outbox.finish(seq, outcome);
            }
            _ = wake => {}
            _ = tokio::time::sleep_until(next_due.unwrap_or(far)), if next_due.is_some() => {}
            _ = changed, if holding => outbox.release_held(),
            _ = tokio::time::sleep_until(sweep), if holding || outbox.removals_pending() => {
                let now = Instant::now();
                sweep = now + HELD_SWEEP;
                outbox.expire_held();
                if now >= retry_held {
                    retry_held = now + HELD_RETRY;
                    outbox.release_held();
                }
                outbox.flush_removals().await;
            }
        }
    }
}

/// One attempt: the message as a request through the pipeline, its reply awaited.
async fn attempt(core: Arc<Core>, job: Job) -> (u64, Outcome) {
    let call = Call {
        style: Style::Request,
        target: &job.target,
        req: &(),
        encoded: Some(job.payload),
        timeout: job.timeout,
        version: job.version,
        carried: job.carried,
        id: Some(job.id),
        avoid: job.avoid,
        guards: Guards::default(),
        now: Instant::now(),
    };
    let (result, instance) = match core.request(call).await {
        Ok((awaiting, instance)) => (
            PendingReply::<IgnoredAny>::new(awaiting)
                .recv()
                .await
                .map(|_| ()),
            Some(instance),
        ),
        Err(e) => (Err(e), None),
    };
    let outcome = match result {
        Ok(()) => Outcome::Acked,
        // The reply came (the handler ran and succeeded) but does not decode: still the
        // acknowledgement.
        Err(CallError::Codec(e)) if instance.is_some() => {
            debug!(id = %job.id, "outbox: an acknowledgement that does not decode ({e}); taken as one");
            Outcome::Acked
        }
        Err(CallError::NoResponder(_))
        | Err(CallError::BreakerOpen(_))
        | Err(CallError::IncompatibleVersion { .. }) => Outcome::NoInstance,
        // A message this transport can never send: no attempt will do better.
        Err(
            e
            @ CallError::Send(SendError::MessageTooLarge { .. } | SendError::TooManyFrames { .. }),
        ) => Outcome::Unsendable(e),
        // Back-pressure here, or the reply's wait ended by the node stopping (the loop
        // ends too): the message never counted against its attempts.
        Err(e @ (CallError::BulkheadFull(_) | CallError::Send(_) | CallError::Shutdown)) => {
            Outcome::Refused(e)
        }
        Err(error) => Outcome::Failed { error, instance },
    };
    (job.seq, outcome)
}

impl Outbox {
    /// Up to `room` messages to send now (marked in flight), when the next retrying one
    /// is due, and whether any is held for want of an instance.
    fn take_ready(&self, now: Instant, room: usize) -> (Vec<Job>, Option<Instant>, bool) {
        let mut st = self.state.lock();
        while let Some(&(due, seq)) = st.delayed.first() {
            if due > now {
                break;
            }
            st.delayed.pop_first();
            st.ready.push_back(seq);
        }
        let mut jobs = Vec::new();
        let wall = now_ms();
        while jobs.len() < room {
            let Some(seq) = st.ready.pop_front() else {
                break;
            };
            let Some(e) = st.entries.get_mut(&seq) else {
                continue;
            };
            if wall >= e.msg.expires_ms {
                self.give_up(&mut st, seq, false);
                continue;
            }
            e.stage = Stage::InFlight;
            if e.attempts > 0 {
                self.redelivered.fetch_add(1, Relaxed);
            }
            let m = &e.msg;
            jobs.push(Job {
                seq,
                id: m.id,
                target: m.target.clone(),
                payload: m.payload.clone(),
                carried: Carried {
                    headers: m.headers.clone(),
                    shard_key: m.shard_key.clone(),
                    message_type: m.message_type,
                },
                version: m.version,
                timeout: m.attempt_timeout_ms.map(Duration::from_millis),
                // A key goes to its owner among the connected instances, whatever failed
                // before: a message that timed out may still be running there, and its
                // key must not start elsewhere until the owner finished or is gone.
                avoid: match m.shard_key {
                    Some(_) => Vec::new(),
                    None => e.avoid.clone(),
                },
            });
            st.in_flight += 1;
        }
        let next_due = st.delayed.first().map(|(due, _)| *due);
        (jobs, next_due, !st.held.is_empty())
    }

    /// Learns how the attempt at `seq` went.
    fn finish(&self, seq: u64, outcome: Outcome) {
        let mut st = self.state.lock();
        st.in_flight -= 1;
        // A drain waits for what is in flight.
        self.left.notify_waiters();
        let Some(e) = st.entries.get_mut(&seq) else {
            return;
        };
        match outcome {
            Outcome::Acked => {
                self.delivered.fetch_add(1, Relaxed);
                self.remove(&mut st, seq, Ok(()));
            }
            Outcome::NoInstance => {
                e.stage = Stage::Held;
                st.held.push(seq);
            }
            Outcome::Unsendable(error) => {
                e.last_error = Some(error.to_string());
                self.give_up(&mut st, seq, true);
            }
            Outcome::Refused(error) => {
                e.stage = Stage::Retrying;
                e.last_error = Some(error.to_string());
                let pause = backoff(e.refusals.saturating_add(1));
                e.refusals = e.refusals.saturating_add(1);
                st.delayed.insert((Instant::now() + pause, seq));
            }
            Outcome::Failed { error, instance } => {
                e.attempts += 1;
                e.refusals = 0;
                e.last_error = Some(error.to_string());
                if let Some(i) = instance {
                    if e.avoid.len() >= AVOID_MAX {
                        e.avoid.remove(0);
                    }
                    e.avoid.push(i);
                }
                if e.attempts >= self.config.max_attempts {
                    self.give_up(&mut st, seq, true);
                    return;
                }
                let pause = match &error {
                    // Refused unrun because the instance is stopping, or its handler
                    // went: another may take it at once (this one is avoided).
                    CallError::Remote { code, .. }
                        if [codes::SHUTTING_DOWN, codes::NO_HANDLER].contains(&code.as_str()) =>
                    {
                        Duration::ZERO
                    }
                    _ => backoff(e.attempts),
                };
                debug!(id = %e.msg.id, target = %e.msg.target, attempts = e.attempts, %error, ?pause, "outbox: attempt failed; sending again");
                e.stage = Stage::Retrying;
                st.delayed.insert((Instant::now() + pause, seq));
            }
        }
    }

    /// Messages held for want of an instance go back to the ready queue (the
    /// membership changed), oldest first.
    fn release_held(&self) {
        let mut st = self.state.lock();
        let mut held = std::mem::take(&mut st.held);
        held.sort_unstable();
        for &seq in held.iter().rev() {
            if let Some(e) = st.entries.get_mut(&seq) {
                e.stage = Stage::Queued;
                st.ready.push_front(seq);
            }
        }
    }

    /// Held messages past their expiry are given up.
    fn expire_held(&self) {
        let wall = now_ms();
        let mut st = self.state.lock();
        let held = std::mem::take(&mut st.held);
        let mut kept = Vec::with_capacity(held.len());
        for seq in held {
            match st.entries.get(&seq) {
                Some(e) if wall >= e.msg.expires_ms => self.give_up(&mut st, seq, false),
                Some(_) => kept.push(seq),
                None => {}
            }
        }
        st.held = kept;
    }

    /// Gives up on `seq`: dead (`max_attempts` failed) or expired. Counted and logged.
    fn give_up(&self, st: &mut State, seq: u64, dead: bool) {
        let mut why = String::new();
        if let Some(e) = st.entries.get(&seq) {
            let (id, target, attempts) = (e.msg.id, &e.msg.target, e.attempts);
            let error = e.last_error.as_deref().unwrap_or("none");
            if dead {
                self.dead.fetch_add(1, Relaxed);
                warn!(%id, %target, attempts, last_error = error, "outbox: message given up after its last attempt failed");
            } else {
                self.expired.fetch_add(1, Relaxed);
                warn!(%id, %target, attempts, last_error = error, "outbox: message given up: not acknowledged before it expired");
            }
            why = match dead {
                true => format!("{attempts} attempt(s) failed, the last with: {error}"),
                false => format!("expired after {attempts} attempt(s) (last error: {error})"),
            };
        }
        self.remove(st, seq, Err(why));
    }

    /// `seq` leaves the outbox (`how`: acknowledged, or why not): its key's next message
    /// becomes ready, and a receipt is told.
    fn remove(&self, st: &mut State, seq: u64, how: super::Finished) {
        let Some(mut e) = st.entries.remove(&seq) else {
            return;
        };
        if let Some(receipt) = e.receipt.take() {
            let _ = receipt.send(how);
        }
        st.bytes -= e.msg.payload.len();
        if let Some(key) = &e.msg.shard_key {
            if let Some(lane) = st.lanes.get_mut(key) {
                if lane.front() == Some(&seq) {
                    lane.pop_front();
                }
                match lane.front() {
                    Some(&next) => st.ready.push_back(next),
                    None => {
                        st.lanes.remove(key);
                    }
                }
            }
        }
        if let Some(disk) = &self.disk {
            disk.remove(seq);
        }
        self.left.notify_waiters();
    }
}
