//! Call correlation: the calls waiting for a reply, their deadlines, and the connection
//! each went out on, all under one lock.
//!
//! This module owns the table of pending calls and the one task that fails calls whose
//! deadline passed. It answers four questions, each without a scan: a reply arrived for
//! this correlation id (complete it); a connection dropped (fail every call sent on it,
//! through the index by connection); a deadline passed (fail it with `Timeout`); a caller
//! gave up (forget it). It also holds the caller's end of a call, [`PendingReply`], which
//! decodes the reply into the caller's type. It never sends anything and knows nothing
//! of peers beyond the [`ConnId`] the membership gave their connection.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use bytes::Bytes;

use super::breaker::Ticket;
use super::frames;
use super::CallError;
use crate::codec::{self, Envelope, ErrorBody, Header, Id, Kind};
use crate::transport::Dealer;
use std::marker::PhantomData;

/// Identifies one DEALER (one peer endpoint) for as long as the node knows it. Given by
/// the membership when it creates the DEALER; never reused within a node's life.
pub(super) type ConnId = u64;

/// What a waiting caller receives: the reply envelope, or why there will be none.
pub(super) type ReplyResult = Result<Envelope, CallError>;

/// Past this many heap entries, entries of answered calls are compacted away when they
/// outnumber the live ones four to one.
const COMPACT_ABOVE: usize = 4096;

/// `now + d`, or a year from now if that overflows (a `Duration::MAX` timeout).
pub(super) fn far_instant_after(d: Duration) -> Instant {
    far_instant(Instant::now(), d)
}

/// `at + d`, or a year after `at` if that overflows.
pub(super) fn far_instant(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .unwrap_or_else(|| at + Duration::from_secs(365 * 86_400))
}

struct Pending {
    tx: oneshot::Sender<ReplyResult>,
    conn: ConnId,
    target: Arc<str>,
    timeout: Duration,
    /// Where to say that we gave up on it.
    canceller: Canceller,
    /// Its instance's breaker's permit: told how the call went (dropped unused when the
    /// caller gives up or the node stops: the outcome is unknown).
    ticket: Option<Ticket>,
    _in_flight: Option<InFlight>,
    _bulkhead: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What a call's end involves besides its caller: telling the callee if the caller
/// gives up, and telling the instance's breaker how the call went.
pub(super) struct Ending {
    pub(super) canceller: Canceller,
    pub(super) ticket: Option<Ticket>,
    /// The instance's count of requests awaiting a reply, held until this one ends.
    pub(super) in_flight: Option<InFlight>,
    /// The request's place in its service's bulkhead, held until it ends.
    pub(super) bulkhead: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// One request counted in its instance's outstanding requests until dropped.
pub(super) struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    pub(super) fn new(count: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How a caller tells the callee that it gave up on a request: a CANCEL envelope on the
/// DEALER the request went out on, so the callee can stop a handler nobody waits for.
#[derive(Clone)]
pub(super) struct Canceller {
    pub(super) dealer: Weak<Dealer>,
    pub(super) local: Id,
}

impl Canceller {
    /// Sends CANCEL for request `id`, without waiting (a full queue means the peer is
    /// not reading; it will not be running our handler for long either).
    fn cancel(&self, id: Id) {
        if let Some(d) = self.dealer.upgrade() {
            let mut h = Header::new(Kind::Cancel, self.local, "");
            h.correlation_id = id;
            let _ = d.try_send(frames::message(&h, Bytes::new()));
        }
    }
}

impl Pending {
    fn timed_out(self) {
        let _ = self.tx.send(Err(CallError::Timeout {
            target: self.target.to_string(),
            timeout: self.timeout,
        }));
    }
}

#[derive(Default)]
struct Table {
    by_id: HashMap<Id, Pending, IdHash>,
    /// The ids in `by_id` sent on each connection. A connection's set is kept while it
    /// is empty (a connection making one call at a time would otherwise allocate a set
    /// per call) and dropped when the connection is lost or forgotten, so there is at
    /// most one per link.
    by_conn: HashMap<ConnId, HashSet<Id, IdHash>, IdHash>,
    /// Deadlines, earliest first. Entries of calls already answered stay until they come
    /// up (or are compacted away), so answering a call never searches the heap.
    deadlines: BinaryHeap<Reverse<(Instant, Id)>>,
}

impl Table {
    fn remove(&mut self, id: &Id) -> Option<Pending> {
        let p = self.by_id.remove(id)?;
        if let Some(ids) = self.by_conn.get_mut(&p.conn) {
            ids.remove(id);
        }
        Some(p)
    }
}

/// The pending-call table. See the [module documentation](self).
#[derive(Default)]
pub(super) struct Calls {
    table: Mutex<Table>,
    /// Signalled when a deadline earlier than every other is added.
    earlier: Notify,
}

impl Calls {
    /// Records a call sent (or about to be sent) on `conn`, failed with `Timeout` at
    /// `deadline` unless answered first. The caller's end forgets it when dropped.
    pub(super) fn register(
        self: &Arc<Self>,
        id: Id,
        conn: ConnId,
        target: Arc<str>,
        timeout: Duration,
        deadline: Instant,
        ending: Ending,
    ) -> Awaiting {
        let Ending {
            canceller,
            ticket,
            in_flight,
            bulkhead,
        } = ending;
        let (tx, rx) = oneshot::channel();
        let earliest = {
            let mut t = self.table.lock();
            t.by_id.insert(
                id,
                Pending {
                    tx,
                    conn,
                    target: target.clone(),
                    timeout,
                    canceller,
                    ticket,
                    _in_flight: in_flight,
                    _bulkhead: bulkhead,
                },
            );
            t.by_conn.entry(conn).or_default().insert(id);
            let earliest = t
                .deadlines
                .peek()
                .is_none_or(|Reverse((at, _))| deadline < *at);
            t.deadlines.push(Reverse((deadline, id)));
            if t.deadlines.len() > COMPACT_ABOVE && t.deadlines.len() > 4 * t.by_id.len() {
                let Table {
                    by_id, deadlines, ..
                } = &mut *t;
                deadlines.retain(|Reverse((_, id))| by_id.contains_key(id));
            }
            earliest
        };
        if earliest {
            self.earlier.notify_one();
        }
        Awaiting {
            id,
            rx,
            deadline,
            timeout,
            target,
            _guard: CallGuard {
                id,
                calls: Arc::downgrade(self),
            },
        }
    }

    /// A reply (or error reply) for `correlation` arrived: hands it to its caller.
    /// Returns whether a caller was waiting (late and unknown replies are not).
    pub(super) fn complete(&self, correlation: &Id, reply: Envelope) -> bool {
        let p = self.table.lock().remove(correlation);
        match p {
            Some(mut p) => {
                if let Some(t) = p.ticket.take() {
                    t.reply(&reply);
                }
                let _ = p.tx.send(Ok(reply));
                true
            }
            None => false,
        }
    }

    /// Forgets a call whose caller gave up.
    /// The caller dropped its handle: if the call was still waiting, the callee is told.
    fn forget(&self, id: &Id) {
        let gone = self.table.lock().remove(id);
        if let Some(p) = gone {
            p.canceller.cancel(*id);
        }
    }

    /// Fails every call sent on `conn` with `err()` (the connection was lost, or its
    /// endpoint forgotten) and drops its index. Returns how many calls there were.
    pub(super) fn fail_connection(&self, conn: ConnId, err: impl Fn() -> CallError) -> usize {
        let failed: Vec<Pending> = {
            let mut t = self.table.lock();
            let ids = t.by_conn.remove(&conn).unwrap_or_default();
            ids.iter().filter_map(|id| t.by_id.remove(id)).collect()
        };
        let n = failed.len();
        for mut p in failed {
            if let Some(t) = p.ticket.take() {
                t.failed();
            }
            let _ = p.tx.send(Err(err()));
        }
        n
    }

    /// Fails every call with `err()` (the node is stopping).
    pub(super) fn fail_all(&self, err: impl Fn() -> CallError) {
        let failed: Vec<Pending> = {
            let mut t = self.table.lock();
            t.by_conn.clear();
            t.deadlines.clear();
            t.by_id.drain().map(|(_, p)| p).collect()
        };
        for p in failed {
            let _ = p.tx.send(Err(err()));
        }
    }

    /// Calls waiting for a reply now.
    pub(super) fn len(&self) -> usize {
        self.table.lock().by_id.len()
    }

    /// Fails the calls whose deadline is at or before `now`; returns the next deadline.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let mut expired = Vec::new();
        let next = {
            let mut t = self.table.lock();
            while let Some(Reverse((at, id))) = t.deadlines.peek().copied() {
                if at > now {
                    break;
                }
                t.deadlines.pop();
                if let Some(p) = t.remove(&id) {
                    expired.push((id, p));
                }
            }
            t.deadlines.peek().map(|Reverse((at, _))| *at)
        };
        for (id, mut p) in expired {
            p.canceller.cancel(id);
            if let Some(t) = p.ticket.take() {
                t.failed();
            }
            p.timed_out();
        }
        next
    }

    /// Fails calls whose deadline passed, with `Timeout`, until `cancel` fires: one timer
    /// for the whole node rather than one per call.
    pub(super) async fn deadline_loop(calls: Weak<Calls>, cancel: CancellationToken) {
        loop {
            let Some(strong) = calls.upgrade() else {
                return;
            };
            let earlier = strong.earlier.notified();
            let next = strong.expire(Instant::now());
            let wake = next.unwrap_or_else(|| far_instant_after(Duration::MAX));
            // Holding `strong` while waiting is fine: the node's drop cancels the token.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(wake) => {}
                _ = earlier => {}
            }
        }
    }
}

/// Removes its call from the table when dropped: held by the caller's handle, so that a
/// caller that gives up (drops the handle, or the future sending the request) leaves
/// nothing behind.
struct CallGuard {
    id: Id,
    calls: Weak<Calls>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let Some(calls) = self.calls.upgrade() {
            calls.forget(&self.id);
        }
    }
}

/// A request waiting for its reply.
pub(super) struct Awaiting {
    id: Id,
    rx: oneshot::Receiver<ReplyResult>,
    deadline: Instant,
    timeout: Duration,
    target: Arc<str>,
    /// Forgets the call when the handle (or the future sending it) is dropped.
    _guard: CallGuard,
}

impl Awaiting {
    /// The request's message id.
    pub(super) fn id(&self) -> Id {
        self.id
    }
}

/// A reply envelope as the caller's type, or the remote error it carries.
pub(super) fn decode_reply<Resp: DeserializeOwned>(env: Envelope) -> Result<Resp, CallError> {
    codec::check_content_type(&env.header)?;
    match env.header.kind {
        Kind::ErrorReply => {
            let body: ErrorBody = codec::decode_payload(&env.payload)?;
            Err(CallError::Remote {
                code: body.code,
                message: body.message,
            })
        }
        _ => Ok(codec::decode_payload(&env.payload)?),
    }
}

/// The handle of an asynchronous request. Await [`PendingReply::recv`] or poll
/// [`PendingReply::try_recv`]; dropping it forgets the call (its table entry is freed).
pub struct PendingReply<Resp> {
    call: Awaiting,
    _t: PhantomData<fn() -> Resp>,
}

impl<Resp: DeserializeOwned> PendingReply<Resp> {
    pub(super) fn new(call: Awaiting) -> Self {
        PendingReply {
            call,
            _t: PhantomData,
        }
    }

    /// The request's message id.
    pub fn id(&self) -> Id {
        self.call.id
    }

    /// Waits for the reply until the call's deadline.
    pub async fn recv(mut self) -> Result<Resp, CallError> {
        // The node's deadline sweeper answers with `Timeout` when the deadline passes.
        match (&mut self.call.rx).await {
            Ok(r) => decode_reply(r?),
            Err(_) => Err(CallError::Shutdown),
        }
    }

    /// The reply if it has arrived (`None` while still waiting). After the deadline it
    /// returns the timeout error.
    pub fn try_recv(&mut self) -> Option<Result<Resp, CallError>> {
        match self.call.rx.try_recv() {
            Ok(r) => Some(r.and_then(decode_reply)),
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(CallError::Shutdown)),
            Err(oneshot::error::TryRecvError::Empty) => {
                if Instant::now() >= self.call.deadline {
                    Some(Err(CallError::Timeout {
                        target: self.call.target.to_string(),
                        timeout: self.call.timeout,
                    }))
                } else {
                    None
                }
            }
        }
    }
}

/// Hashes our own message ids by their random low half, and connection ids (a counter)
/// as they are. Only keys this node generated are ever inserted, so a peer cannot choose
/// colliding keys; SipHash would only cost time.
#[derive(Default, Clone, Copy)]
pub(super) struct IdHash;

impl std::hash::BuildHasher for IdHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[derive(Default)]
pub(super) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    fn write(&mut self, bytes: &[u8]) {
        // A UUIDv7's last 8 bytes are random.
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call's end with nothing but its caller: no DEALER to cancel on (these tests
    /// have no peer), no breaker, no bulkhead.
    fn nothing_else() -> Ending {
        Ending {
            canceller: Canceller {
                dealer: Weak::new(),
                local: Id::NIL,
            },
            ticket: None,
            in_flight: None,
            bulkhead: None,
        }
    }
    use crate::codec::{Header, Kind};
    use bytes::Bytes;

    fn reply(to: Id) -> Envelope {
        let mut h = Header::new(Kind::Reply, Id::new(), "");
        h.correlation_id = to;
        Envelope {
            header: h,
            payload: Bytes::new(),
        }
    }

    #[tokio::test]
    async fn a_dropped_connection_fails_only_its_calls() {
        let calls = Arc::new(Calls::default());
        let later = far_instant_after(Duration::from_secs(60));
        let (a, b) = (Id::new(), Id::new());
        let call_a = calls.register(
            a,
            1,
            "x.a".into(),
            Duration::from_secs(60),
            later,
            nothing_else(),
        );
        let mut call_b = calls.register(
            b,
            2,
            "x.b".into(),
            Duration::from_secs(60),
            later,
            nothing_else(),
        );
        assert_eq!(
            calls.fail_connection(1, || CallError::Disconnected("1".into())),
            1
        );
        let failed = PendingReply::<()>::new(call_a).recv().await;
        assert!(
            matches!(failed, Err(CallError::Disconnected(_))),
            "{failed:?}"
        );
        assert!(
            call_b.rx.try_recv().is_err(),
            "a call on another connection was failed"
        );
        assert!(calls.complete(&b, reply(b)));
        assert!(matches!((&mut call_b.rx).await, Ok(Ok(_))));
        assert_eq!(calls.len(), 0);
        // Connection 2's (empty) index stays until it is lost; 1's is gone.
        assert_eq!(calls.table.lock().by_conn.len(), 1);
        calls.fail_connection(2, || CallError::Disconnected("2".into()));
        assert!(calls.table.lock().by_conn.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_fail_calls_and_guards_forget_them() {
        let calls = Arc::new(Calls::default());
        let cancel = CancellationToken::new();
        tokio::spawn(Calls::deadline_loop(Arc::downgrade(&calls), cancel.clone()));
        let t = Duration::from_millis(50);
        let timed_out = calls.register(
            Id::new(),
            7,
            "x.y".into(),
            t,
            far_instant_after(t),
            nothing_else(),
        );
        let got = PendingReply::<()>::new(timed_out).recv().await;
        assert!(matches!(got, Err(CallError::Timeout { .. })), "{got:?}");
        let forgotten = calls.register(
            Id::new(),
            7,
            "x.y".into(),
            t,
            far_instant_after(t),
            nothing_else(),
        );
        assert_eq!(calls.len(), 1);
        drop(forgotten);
        assert_eq!(calls.len(), 0);
        assert!(calls.table.lock().by_conn[&7].is_empty());
        cancel.cancel();
    }
}
