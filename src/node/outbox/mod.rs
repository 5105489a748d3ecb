//! The outbox: at-least-once delivery to one instance of a service, with competing
//! consumers, order by shard key, redelivery, and messages held while no instance is
//! there.
//!
//! [`Node::deliver`](super::Node::deliver) hands a message to the outbox and returns
//! once it is held. The outbox's task then sends it as a request (same message id on
//! every attempt) to one instance chosen by the call pipeline (by its shard key, if it
//! has one), and the instance's reply is its acknowledgement: the handler ran and
//! succeeded. A message whose instance dies, does not answer within the attempt's
//! deadline, refuses it unrun or fails it is sent again after a backoff: to another
//! instance where there is one, or, with a shard key, to its key's owner among the
//! instances still there. A message nobody serves is held until an instance appears.
//! Messages with the same shard key go one at a time, in the order they were given: the
//! next is sent only once the one before is acknowledged (or given up), so a key that
//! moves to another instance (its owner left) is handed over in order.
//!
//! What it gives up on is counted and logged, never silent: messages past their expiry
//! and messages that failed `max_attempts` times ("dead"), and at shutdown what it could
//! not deliver within the drain (unless the outbox is on disk, where it waits for the
//! next start).
//!
//! This module owns the outbox's state and its delivery loop (`deliver.rs`) and the disk
//! log (`disk.rs`). It never chooses an instance or touches a socket: every attempt goes
//! through the call pipeline like any request.

mod api;
mod deliver;
mod disk;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::pipeline::Carried;
use super::CallError;
use crate::codec::{Id, MessageType, Version};

pub use api::{read_outbox, Receipt};
pub(super) use deliver::run;
use disk::DiskLog;

/// How a node's outbox is bounded and where it keeps its messages
/// ([`NodeBuilder::outbox`](super::NodeBuilder::outbox)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OutboxConfig {
    /// Most messages held (not yet acknowledged); a delivery past it is refused with
    /// [`CallError::OutboxFull`]. Default 10 000.
    pub max_messages: usize,
    /// Most payload bytes held. Default 64 MiB.
    pub max_bytes: usize,
    /// Most deliveries awaiting their acknowledgement at once. Default 256.
    pub max_in_flight: usize,
    /// Attempts before a message is given up as dead: sends that an instance answered
    /// with an error, or did not answer in time (waiting for room in a full queue
    /// counts against that time), or whose connection dropped before the answer.
    /// Refusals on this side (no instance, open breakers, a full bulkhead, a queue
    /// refusing while its connection is down) are not attempts: the message waits and
    /// is sent again. Default 10.
    pub max_attempts: u32,
    /// How long a message is held, from when it was given, before it is given up as
    /// expired. Default one hour.
    pub expire_after: Duration,
    /// Where the outbox keeps its messages so that they survive a restart (a redb
    /// file); in memory only when `None` (the default).
    pub path: Option<PathBuf>,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_messages: 10_000,
            max_bytes: 64 << 20,
            max_in_flight: 256,
            max_attempts: 10,
            expire_after: Duration::from_secs(3600),
            path: None,
        }
    }
}

impl OutboxConfig {
    /// The defaults, kept on disk at `path`.
    pub fn on_disk(path: impl Into<PathBuf>) -> Self {
        OutboxConfig {
            path: Some(path.into()),
            ..Default::default()
        }
    }
}

/// Options of one delivery ([`Node::deliver_with`](super::Node::deliver_with)).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct DeliveryOptions {
    /// Messages with the same key go to the same instance (rendezvous hashing, as for
    /// calls) and are delivered one at a time, in the order given.
    pub shard_key: Option<String>,
    /// The message type; a command when `None`.
    pub message_type: Option<MessageType>,
    /// Method version the sender was written against.
    pub version: Option<Version>,
    /// String headers to carry.
    pub headers: BTreeMap<String, String>,
    /// How long an instance has to acknowledge one attempt before the message is sent
    /// again (elsewhere if it can be); the service's timeout, else the node's default,
    /// when `None`.
    pub attempt_timeout: Option<Duration>,
}

impl DeliveryOptions {
    /// Sets the shard key.
    pub fn with_shard_key(mut self, key: impl Into<String>) -> Self {
        self.shard_key = Some(key.into());
        self
    }

    /// Sets the message type.
    pub fn with_message_type(mut self, t: MessageType) -> Self {
        self.message_type = Some(t);
        self
    }

    /// Sets the time an instance has to acknowledge one attempt.
    pub fn with_attempt_timeout(mut self, t: Duration) -> Self {
        self.attempt_timeout = Some(t);
        self
    }
}

/// Where an undelivered message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// Waiting for its turn (its key's earlier messages, or room in flight).
    Queued,
    /// Sent; its acknowledgement is awaited.
    InFlight,
    /// An attempt failed; sent again after a backoff.
    Retrying,
    /// No instance serves its target: sent when one appears.
    Held,
}

/// A message in the outbox, as [`Node::outbox`](super::Node::outbox) lists it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Undelivered {
    /// Its message id (the same on every attempt).
    pub id: Id,
    /// `service.method`.
    pub target: String,
    /// Its shard key.
    pub shard_key: Option<String>,
    /// Its payload's size.
    pub bytes: usize,
    /// Attempts made so far.
    pub attempts: u32,
    /// How long ago it was given.
    pub age: Duration,
    /// Why its last attempt failed.
    pub last_error: Option<String>,
    /// Where it stands.
    pub stage: Stage,
}

/// The outbox's counters ([`NodeStats`](super::NodeStats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxStats {
    /// Messages in the outbox now (not yet acknowledged nor given up), whatever their
    /// [`Stage`].
    pub held: u64,
    /// Messages acknowledged.
    pub delivered: u64,
    /// Attempts after a message's first.
    pub redelivered: u64,
    /// Messages given up because they were not acknowledged within `expire_after`.
    pub expired: u64,
    /// Messages given up after `max_attempts` attempts.
    pub dead: u64,
    /// Deliveries refused because the outbox was full.
    pub refused: u64,
    /// Messages in memory still undelivered when the node stopped.
    pub dropped_at_shutdown: u64,
}

/// Milliseconds since the Unix epoch: when a message was given and when it expires are
/// kept on the wall clock, which a restart does not reset.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A message held. On disk as a MessagePack map with these field names (so a later
/// version can add fields and still read what an earlier one left).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Message {
    id: Id,
    target: String,
    payload: Bytes,
    shard_key: Option<String>,
    message_type: Option<MessageType>,
    version: Option<Version>,
    headers: BTreeMap<String, String>,
    attempt_timeout_ms: Option<u64>,
    given_ms: u64,
    expires_ms: u64,
}

/// A message and what the outbox knows of its delivery.
struct Entry {
    msg: Message,
    attempts: u32,
    /// Refusals on this side in a row (their backoff grows; they are not attempts).
    refusals: u32,
    last_error: Option<String>,
    stage: Stage,
    /// Instances that failed it lately: the next attempt goes elsewhere if it can.
    avoid: Vec<Id>,
    /// Told how it ended, if the sender asked ([`Node::deliver_tracked`](super::Node)).
    receipt: Option<oneshot::Sender<Finished>>,
}

/// How a tracked message left the outbox: acknowledged, or given up (why).
pub(super) type Finished = Result<(), String>;

/// What one attempt needs (a copy, so the lock is not held while it runs).
struct Job {
    seq: u64,
    id: Id,
    target: String,
    payload: Bytes,
    carried: Carried,
    version: Option<Version>,
    timeout: Option<Duration>,
    avoid: Vec<Id>,
}

#[derive(Default)]
struct State {
    /// By sequence number: the order messages were given.
    entries: BTreeMap<u64, Entry>,
    bytes: usize,
    next_seq: u64,
    /// Ready to send, oldest first: messages without a key, and the first of each key.
    ready: VecDeque<u64>,
    /// Each key's messages in order; only the first is ever ready, in flight, retrying
    /// or held.
    lanes: HashMap<String, VecDeque<u64>>,
    /// Retrying: when each may go again.
    delayed: BTreeSet<(Instant, u64)>,
    /// Waiting for an instance of their target.
    held: Vec<u64>,
    in_flight: usize,
}

/// The outbox of a node. See the [module documentation](self).
pub(super) struct Outbox {
    config: OutboxConfig,
    /// The largest payload the node's connections can carry: a larger one is refused
    /// when given, rather than tried until it expires.
    max_payload: usize,
    state: Mutex<State>,
    /// Told when a message is given (the delivery loop may have room for it).
    wake: Notify,
    /// Told when a message leaves (delivered or given up): `drain` waits on it.
    left: Notify,
    disk: Option<DiskLog>,
    /// Held while a message is written to disk (one at a time).
    writing: tokio::sync::Mutex<()>,
    delivered: AtomicU64,
    redelivered: AtomicU64,
    expired: AtomicU64,
    dead: AtomicU64,
    refused: AtomicU64,
    dropped_at_shutdown: AtomicU64,
}

/// What became of one attempt.
pub(super) enum Outcome {
    /// Acknowledged.
    Acked,
    /// No instance to send it to (none serves its target, or every one's breaker is
    /// open): held until one may.
    NoInstance,
    /// Refused on this side before it reached an instance (its service's bulkhead or the
    /// connection's queue full): sent again after a backoff, not counted as an attempt.
    Refused(CallError),
    /// It can never be sent (larger than the connection's limits): given up at once.
    Unsendable(CallError),
    /// The attempt failed (`instance` is where it went, if it got that far).
    Failed {
        error: CallError,
        instance: Option<Id>,
    },
}

impl Outbox {
    /// An outbox as `config` says, with what its disk log holds from an earlier run.
    pub(super) fn open(
        config: OutboxConfig,
        max_payload: usize,
    ) -> Result<Outbox, super::NodeError> {
        let (disk, kept) = match &config.path {
            Some(path) => {
                let (log, kept) = DiskLog::open(path)?;
                (Some(log), kept)
            }
            None => (None, Vec::new()),
        };
        let mut config = config;
        // Nothing would ever be sent (nor expire) with no room in flight.
        config.max_in_flight = config.max_in_flight.max(1);
        let outbox = Outbox {
            config,
            max_payload,
            state: Mutex::default(),
            wake: Notify::new(),
            left: Notify::new(),
            disk,
            writing: tokio::sync::Mutex::new(()),
            delivered: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            dropped_at_shutdown: AtomicU64::new(0),
        };
        {
            let mut st = outbox.state.lock();
            for (seq, msg) in kept {
                st.next_seq = st.next_seq.max(seq + 1);
                outbox.insert(&mut st, seq, msg, None);
            }
        }
        Ok(outbox)
    }

    /// Takes `payload` for delivery to `target`; its id once held (on disk first, when
    /// the outbox is kept there).
    pub(super) async fn give(
        &self,
        target: &str,
        payload: Bytes,
        opts: DeliveryOptions,
        receipt: Option<oneshot::Sender<Finished>>,
    ) -> Result<Id, CallError> {
        if payload.len() > self.max_payload {
            return Err(CallError::Send(
                crate::transport::SendError::MessageTooLarge {
                    size: payload.len(),
                    max: self.max_payload,
                },
            ));
        }
        let now = now_ms();
        let msg = Message {
            id: Id::new(),
            target: target.to_string(),
            payload,
            shard_key: opts.shard_key,
            message_type: opts.message_type,
            version: opts.version,
            headers: opts.headers,
            attempt_timeout_ms: opts.attempt_timeout.map(|t| t.as_millis() as u64),
            given_ms: now,
            expires_ms: now.saturating_add(self.config.expire_after.as_millis() as u64),
        };
        let id = msg.id;
        // On disk, one message is written at a time (the async `writing` lock), so
        // sequence numbers reach the state in order and a key's messages stay in the
        // order given; in memory, the check, the number and the insertion are one
        // critical section.
        let Some(disk) = &self.disk else {
            let mut st = self.state.lock();
            self.check_room(&st, msg.payload.len())?;
            let seq = st.next_seq;
            st.next_seq += 1;
            self.insert(&mut st, seq, msg, receipt);
            drop(st);
            self.wake.notify_one();
            return Ok(id);
        };
        let _writing = self.writing.lock().await;
        let seq = {
            let mut st = self.state.lock();
            self.check_room(&st, msg.payload.len())?;
            // Taken before the write: a `deliver` cancelled after its commit leaves a
            // row that is delivered after a restart (at least once), never one that the
            // next message overwrites.
            st.next_seq += 1;
            st.next_seq - 1
        };
        disk.add(seq, &msg).await?;
        let mut st = self.state.lock();
        self.insert(&mut st, seq, msg, receipt);
        drop(st);
        self.wake.notify_one();
        Ok(id)
    }

    /// Refuses (and counts) a message of `len` bytes past the bounds.
    fn check_room(&self, st: &State, len: usize) -> Result<(), CallError> {
        if st.entries.len() >= self.config.max_messages
            || st.bytes.saturating_add(len) > self.config.max_bytes
        {
            self.refused.fetch_add(1, Relaxed);
            return Err(CallError::OutboxFull {
                messages: st.entries.len(),
                bytes: st.bytes,
            });
        }
        Ok(())
    }

    fn insert(
        &self,
        st: &mut State,
        seq: u64,
        msg: Message,
        receipt: Option<oneshot::Sender<Finished>>,
    ) {
        st.bytes += msg.payload.len();
        match &msg.shard_key {
            Some(key) => {
                let lane = st.lanes.entry(key.clone()).or_default();
                lane.push_back(seq);
                if lane.len() == 1 {
                    st.ready.push_back(seq);
                }
            }
            None => st.ready.push_back(seq),
        }
        let mut entry = Entry::new(msg);
        entry.receipt = receipt;
        st.entries.insert(seq, entry);
    }

    /// The messages held, oldest first.
    pub(super) fn list(&self) -> Vec<Undelivered> {
        let now = now_ms();
        let st = self.state.lock();
        st.entries
            .values()
            .map(|e| Undelivered {
                id: e.msg.id,
                target: e.msg.target.clone(),
                shard_key: e.msg.shard_key.clone(),
                bytes: e.msg.payload.len(),
                attempts: e.attempts,
                age: Duration::from_millis(now.saturating_sub(e.msg.given_ms)),
                last_error: e.last_error.clone(),
                stage: e.stage,
            })
            .collect()
    }

    /// The counters.
    pub(super) fn stats(&self) -> OutboxStats {
        OutboxStats {
            held: self.state.lock().entries.len() as u64,
            delivered: self.delivered.load(Relaxed),
            redelivered: self.redelivered.load(Relaxed),
            expired: self.expired.load(Relaxed),
            dead: self.dead.load(Relaxed),
            refused: self.refused.load(Relaxed),
            dropped_at_shutdown: self.dropped_at_shutdown.load(Relaxed),
        }
    }

    /// Waits until no message is in flight or ready to go, or `until`: what can be
    /// delivered now is. (Messages held for want of an instance, or waiting out a
    /// backoff, do not hold up a shutdown.)
    pub(super) async fn drain(&self, until: Instant) -> bool {
        loop {
            let left = self.left.notified();
            {
                let st = self.state.lock();
                if st.in_flight == 0 && st.ready.is_empty() {
                    return true;
                }
            }
            if tokio::time::timeout_at(until, left).await.is_err() {
                return false;
            }
        }
    }

    fn removals_pending(&self) -> bool {
        self.disk.as_ref().is_some_and(|d| d.removals_pending())
    }

    async fn flush_removals(&self) {
        if let Some(d) = &self.disk {
            d.flush().await;
        }
    }

    /// At shutdown: what is still here is lost (in memory) or kept for the next start
    /// (on disk, whose file is closed here). Counted and logged either way.
    pub(super) async fn close(&self) {
        if let Some(d) = &self.disk {
            // No message is being written from here on.
            let _writing = self.writing.lock().await;
            d.close().await;
        }
        let mut st = self.state.lock();
        // The delivery loop has ended: its attempts were dropped with it.
        st.in_flight = 0;
        for e in st.entries.values_mut() {
            if e.stage == Stage::InFlight {
                e.stage = Stage::Queued;
            }
            // A receipt learns the node stopped (its message, on disk, is the next
            // start's to deliver).
            e.receipt = None;
        }
        let n = st.entries.len();
        if n == 0 {
            return;
        }
        if self.disk.is_some() {
            tracing::info!(
                messages = n,
                "outbox: undelivered messages kept on disk for the next start"
            );
        } else {
            self.dropped_at_shutdown.fetch_add(n as u64, Relaxed);
            tracing::warn!(
                messages = n,
                "outbox: undelivered messages dropped at shutdown (the outbox is in memory)"
            );
        }
    }
}

impl Entry {
    fn new(msg: Message) -> Entry {
        Entry {
            msg,
            attempts: 0,
            refusals: 0,
            last_error: None,
            stage: Stage::Queued,
            avoid: Vec::new(),
            receipt: None,
        }
    }
}
