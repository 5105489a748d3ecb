//! Messages with a shard key that cannot run at once: their key is busy here (they wait
//! for its turn), or cold here (it may have just moved from another instance, which is
//! asked to finish it first: the hand-over), or they are that question themselves.
//!
//! The hand-over: before running the first message of a key that did not run here
//! lately, a node asks the instance that would own the key without it (by rendezvous
//! among the others serving the target) with a request to the same target and key,
//! marked [`HANDOVER`]. That instance runs no handler for it: it answers once every
//! message of the key that arrived there before is done (the question takes its turn in
//! the key's queue). So a key that moved here (this node joined, or the other's breaker
//! opened at some caller) starts here only after its messages there are done, whoever
//! sent them; or after the question's deadline, if the other does not answer (gone,
//! hung, or not a peerwire node).

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::{start, Answering, Detached, ErasedHandler, Undelivered, Watched};
use crate::codec::{Envelope, Id};
use crate::node::keygate::Turn;
use crate::node::Core;

/// The string header that marks a hand-over question (PROTOCOL.md, "Deliveries").
pub(in crate::node) const HANDOVER: &str = "x-peerwire-handover";

/// The longest a node waits for the other instance to finish a key.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// How a queued message gets its turn.
pub(super) enum Waiting {
    /// It has it: the key was free, but cold.
    Now(Turn),
    /// It comes when the messages before it here are done.
    Later(tokio::sync::oneshot::Receiver<Turn>),
}

/// A message waiting for its key's turn (see `keygate`), or for the hand-over, with
/// what it holds meanwhile: its handler slot, its admission, its entry for a CANCEL.
pub(super) struct Queued {
    /// `None` for a hand-over question: nothing runs, the answer is the turn itself.
    pub(super) handler: Option<ErasedHandler>,
    pub(super) env: Envelope,
    pub(super) waiting: Waiting,
    /// Set when the key is cold here: whom to ask before running.
    pub(super) ask: Option<Weak<Core>>,
    pub(super) cancel: CancellationToken,
    pub(super) path: Detached,
    pub(super) answering: Answering,
    pub(super) sender: Id,
    pub(super) undelivered: Arc<Undelivered>,
    pub(super) held: (
        OwnedSemaphorePermit,
        crate::node::admission::Running,
        Option<Watched>,
    ),
}

impl Queued {
    /// Waits for the turn and the hand-over (under the caller's deadline, and its
    /// CANCEL), then runs the handler with what is left of the deadline, and answers.
    pub(super) async fn run(mut self) {
        let arrived = std::time::Instant::now();
        let deadline = self.env.header.deadline();
        let cancel = self.cancel.clone();
        let ask = self.ask.take();
        let (target, key) = (
            self.env.header.target.clone(),
            self.env.header.shard_key.clone().unwrap_or_default(),
        );
        let waiting = self.waiting;
        let ready = async move {
            let turn = match waiting {
                Waiting::Now(t) => t,
                Waiting::Later(rx) => rx.await.ok()?,
            };
            // A message before this one may have run the key here meanwhile.
            let ask = ask.filter(|_| !turn.is_warm());
            if let Some(core) = ask.and_then(|w| w.upgrade()) {
                // At most half of what the caller still allows: the other half is the
                // handler's, even when the old owner does not answer.
                let left = deadline.map_or(HANDOVER_WAIT, |d| {
                    (d.saturating_sub(arrived.elapsed()) / 2).min(HANDOVER_WAIT)
                });
                core.hand_over(&target, &key, left).await;
            }
            Some(turn)
        };
        let turn = match deadline {
            Some(d) => tokio::select! {
                biased;
                _ = cancel.cancelled() => None,
                t = tokio::time::timeout(d, ready) => t.ok().flatten(),
            },
            None => tokio::select! {
                biased;
                _ = cancel.cancelled() => None,
                t = ready => t,
            },
        };
        let Some(mut turn) = turn else {
            // Its caller gave up (or the node stopped) before its turn came: not run.
            self.cancel.cancel();
            return;
        };
        if let Some(ms) = &mut self.env.header.deadline_ms {
            *ms = ms
                .saturating_sub(arrived.elapsed().as_millis() as u64)
                .max(1);
        }
        let out = match self.handler {
            // The question is answered once its turn came: nothing before it remains.
            None => Some(Ok(crate::codec::encode_payload(&()).expect("unit encodes"))),
            Some(handler) => {
                turn.runs();
                match start(handler, self.env, self.cancel.clone()) {
                    Ok(out) => Some(out),
                    Err(run) => tokio::select! {
                        biased;
                        _ = self.cancel.cancelled() => None,
                        out = run => out,
                    },
                }
            }
        };
        if out.is_none() {
            self.cancel.cancel();
        }
        drop(self.held);
        if let Some(reply) = out.and_then(|out| self.answering.reply(self.sender, out)) {
            self.undelivered.send_detached(&self.path, reply);
        }
        drop(turn);
    }
}

impl Core {
    /// Asks the instance that would own `key` of `target` without this node to finish
    /// the messages of the key it has, waiting at most `within`. Whatever the answer
    /// (none serves it, an error, no answer in time), the caller goes on.
    async fn hand_over(&self, target: &str, key: &str, within: Duration) {
        use crate::node::pipeline::{Call, Carried, Guards, Style};
        let mut carried = Carried {
            shard_key: Some(key.to_string()),
            ..Carried::default()
        };
        carried
            .headers
            .insert(HANDOVER.to_string(), "1".to_string());
        let call = Call {
            style: Style::Request,
            target,
            req: &(),
            encoded: None,
            timeout: Some(within.max(Duration::from_millis(1))),
            version: None,
            carried,
            id: None,
            avoid: Vec::new(),
            // A question about a key, not a call to judge the instance by.
            guards: Guards {
                bypass_breaker: true,
                question: true,
                ..Guards::default()
            },
            now: tokio::time::Instant::now(),
        };
        let outcome = match self.request(call).await {
            Ok((awaiting, _)) => crate::node::PendingReply::<serde::de::IgnoredAny>::new(awaiting)
                .recv()
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => tracing::debug!(
                target,
                key,
                "hand-over: the key's earlier messages are done elsewhere"
            ),
            Err(crate::node::CallError::NoResponder(_)) => {}
            Err(e) => tracing::debug!(target, key, error = %e, "hand-over: no answer; going on"),
        }
    }
}
