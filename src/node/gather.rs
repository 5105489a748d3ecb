//! Gather collection: publish/async responses. The table of gathers in progress (each
//! waiting for the replies to one gather request), and the handle that collects them.
//!
//! This module owns which gathers are open and hands each the replies addressed to it;
//! it never checks who sent a reply (inbound routing does, against the membership's
//! record of who introduced itself on which connection), never publishes (the call
//! pipeline does) and never decides who is expected (the pipeline asks the membership).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::debug;

use super::calls::decode_reply;
use super::calls::far_instant_after;
use super::CallError;
use crate::codec::{Envelope, Id, Version};

/// The gathers in progress. See the [module documentation](self).
#[derive(Default)]
pub(super) struct Gathers {
    open: Mutex<HashMap<Id, mpsc::Sender<Envelope>>>,
}

/// A gather just opened: where its replies arrive, and who is expected.
pub(super) struct Opened {
    rx: mpsc::Receiver<Envelope>,
    expected: Vec<(Id, String)>,
    guard: GatherGuard,
}

impl Gathers {
    /// Opens gather `id`, expecting `expected` (id, name) to answer.
    pub(super) fn open(self: &Arc<Self>, id: Id, expected: Vec<(Id, String)>) -> Opened {
        // Room for every expected reply twice over (a forged or repeated reply does not
        // make a real one wait) and a margin.
        let (tx, rx) = mpsc::channel(expected.len() * 2 + 16);
        self.open.lock().insert(id, tx);
        Opened {
            rx,
            expected,
            guard: GatherGuard {
                id,
                gathers: Arc::downgrade(self),
            },
        }
    }

    /// A reply to the gather its correlation id names (a reply nobody waits for is
    /// dropped).
    pub(super) fn deliver(&self, reply: Envelope) {
        let tx = self.open.lock().get(&reply.header.correlation_id).cloned();
        match tx {
            Some(tx) => {
                let _ = tx.try_send(reply);
            }
            None => debug!("late or unknown gather reply dropped"),
        }
    }

    /// Ends every gather (the node is stopping): their handles see the end at once.
    pub(super) fn clear(&self) {
        self.open.lock().clear();
    }
}

/// Closes its gather when dropped (the handle went away, or publishing it failed).
pub(super) struct GatherGuard {
    id: Id,
    gathers: Weak<Gathers>,
}

impl Drop for GatherGuard {
    fn drop(&mut self) {
        if let Some(g) = self.gathers.upgrade() {
            g.open.lock().remove(&self.id);
        }
    }
}

/// Options of a gather.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GatherOptions {
    /// How long to collect replies.
    pub within: Duration,
    /// Finish as soon as this many replies are in.
    pub quorum: Option<usize>,
    /// Version asked of responders.
    pub version: Option<Version>,
}

impl GatherOptions {
    /// Collect for `within`.
    pub fn within(within: Duration) -> Self {
        GatherOptions {
            within,
            quorum: None,
            version: None,
        }
    }

    /// Finish early once `n` replies are in.
    pub fn quorum(mut self, n: usize) -> Self {
        self.quorum = Some(n);
        self
    }
}

/// One responder's answer to a gather.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct GatherReply<T> {
    /// Who answered.
    pub from: Id,
    /// Its name, from the peer table.
    pub name: String,
    /// Time from publishing to this reply.
    pub elapsed: Duration,
    /// The decoded reply, or the remote or decode error.
    pub result: Result<T, CallError>,
}

/// Why a gather stopped collecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GatherEnd {
    /// Every expected responder answered.
    AllAnswered,
    /// The quorum was reached.
    Quorum,
    /// The deadline passed.
    Deadline,
}

/// What a gather collected.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct GatherOutcome<T> {
    /// Every reply, in arrival order.
    pub replies: Vec<GatherReply<T>>,
    /// Expected responders (id, name) that stayed silent.
    pub silent: Vec<(Id, String)>,
    /// Why it stopped.
    pub end: GatherEnd,
}

/// A gather in progress: replies arrive as a stream ([`Gather::next`]) until the
/// deadline, until every expected responder answered, or until the quorum.
pub struct Gather<T> {
    rx: mpsc::Receiver<Envelope>,
    started: Instant,
    /// One timer for the whole gather, however many replies are awaited.
    deadline: Pin<Box<tokio::time::Sleep>>,
    quorum: Option<usize>,
    expected: Vec<(Id, String)>,
    answered: Vec<Id>,
    finished: Option<GatherEnd>,
    /// Removes the gather from the table when the handle goes.
    _open: GatherGuard,
    _t: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Gather<T> {
    pub(super) fn new(open: Opened, within: Duration, quorum: Option<usize>) -> Self {
        Gather {
            rx: open.rx,
            started: Instant::now(),
            deadline: Box::pin(tokio::time::sleep_until(far_instant_after(within))),
            quorum,
            expected: open.expected,
            answered: Vec::new(),
            finished: None,
            _open: open.guard,
            _t: PhantomData,
        }
    }

    /// The responders expected (id, name), from the peer table when it was published.
    pub fn expected(&self) -> &[(Id, String)] {
        &self.expected
    }

    /// The next reply, or `None` once the gather has ended.
    pub async fn next(&mut self) -> Option<GatherReply<T>> {
        if self.finished.is_some() {
            return None;
        }
        loop {
            let got = tokio::select! {
                biased;
                r = self.rx.recv() => r,
                _ = &mut self.deadline => None,
            };
            let Some(env) = got else {
                self.finished = Some(GatherEnd::Deadline);
                return None;
            };
            let from = env.header.sender;
            if self.answered.contains(&from) || !self.expected.iter().any(|(id, _)| *id == from) {
                continue; // one reply per expected responder; others do not count
            }
            self.answered.push(from);
            let name = self
                .expected
                .iter()
                .find(|(id, _)| *id == from)
                .map(|(_, n)| n.clone())
                .unwrap_or_default();
            let reply = GatherReply {
                from,
                name,
                elapsed: self.started.elapsed(),
                result: decode_reply(env),
            };
            if self.quorum.is_some_and(|q| self.answered.len() >= q) {
                self.finished = Some(GatherEnd::Quorum);
            } else if self
                .expected
                .iter()
                .all(|(id, _)| self.answered.contains(id))
            {
                self.finished = Some(GatherEnd::AllAnswered);
            }
            return Some(reply);
        }
    }

    /// Collects every remaining reply and reports who stayed silent.
    pub async fn finish(mut self) -> GatherOutcome<T> {
        let mut replies = Vec::new();
        while let Some(r) = self.next().await {
            replies.push(r);
        }
        let silent = self
            .expected
            .iter()
            .filter(|(id, _)| !self.answered.contains(id))
            .cloned()
            .collect();
        GatherOutcome {
            replies,
            silent,
            end: self.finished.unwrap_or(GatherEnd::Deadline),
        }
    }
}
