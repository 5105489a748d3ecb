//! Responding: running a handler for a request, a notification or a gather request,
//! building its reply and sending it back the way the request came.
//!
//! This module owns the handler slots (at most `max_in_flight` handlers at once), the
//! tasks of handlers that await, and the draining flag of a node that is shutting down.
//! Reply building is written once here: a request is answered with REPLY or ERROR-REPLY
//! on the ROUTER connection it came from, a gather request with GATHER-REPLY or
//! ERROR-REPLY on our DEALER to its sender, a notification with nothing. It never decodes
//! envelopes (inbound routing does) and never chooses a handler (the registry does).
//!
//! A reply never waits for room. A caller whose reply queue is full is not reading what
//! it asked for: the reply is dropped (counted) and that connection closed, so that no
//! handler slot, task or memory is held for it and nobody else waits behind it. (The
//! queue bounds, per connection and in total, are the transport's.)

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::admission::{Admission, AdmitLimits, Caller};
mod keyed;

pub(super) use keyed::HANDOVER;

use super::frames;
use super::keygate::{Entry, KeyGate};
use super::registry::{Context, ErasedHandler};
use parking_lot::Mutex;

use crate::codec::{self, codes, Envelope, ErrorBody, Header, Id, Kind, MessageType};
use crate::transport::{source_key, Dealer, Message, Router, SendError};

/// Whether `h` is a hand-over question (see `keyed`): a request with a shard key and the
/// [`keyed::HANDOVER`] header.
pub(super) fn is_handover(h: &Header) -> bool {
    h.kind == Kind::Request && h.shard_key.is_some() && h.headers.contains_key(keyed::HANDOVER)
}

/// Where a reply goes: back on the ROUTER connection a request came from, or on our
/// DEALER to the node that published a gather request. Borrowed while the reply is sent
/// inline (no reference counting on the hot path); [`ReplyPath::detach`]ed when a task
/// has to finish the job.
pub(super) enum ReplyPath<'a> {
    /// The ROUTER connection with this identity.
    Router(&'a Arc<Router>, Bytes),
    /// Our DEALER to the gatherer.
    Dealer(Arc<Dealer>),
}

impl ReplyPath<'_> {
    /// Sends without waiting; on failure, the message back where it can be retried.
    #[allow(clippy::result_large_err)] // see Router::try_send_or_back
    fn try_send(&self, msg: Message) -> Result<(), (SendError, Option<Message>)> {
        match self {
            ReplyPath::Router(r, identity) => r
                .try_send_or_back(identity, msg)
                .map_err(|(e, m)| (e, Some(m))),
            ReplyPath::Dealer(d) => d.try_send(msg).map_err(|e| (e, None)),
        }
    }

    /// The caller is not reading its replies: close its connection, dropping what is
    /// queued for it (a gatherer is ours to dial, so our DEALER to it stays). Returns
    /// whether this closed it.
    fn give_up(&self) -> bool {
        match self {
            ReplyPath::Router(r, identity) => r.drop_peer(identity),
            ReplyPath::Dealer(_) => false,
        }
    }

    /// The ROUTER's queues together are full (other callers are not reading): the caller
    /// holding the most is dropped (if one holds more than its share), not this one.
    fn shed_slowest(&self) {
        if let ReplyPath::Router(r, _) = self {
            r.drop_slowest();
        }
    }

    /// The path for a task. The ROUTER is held weakly: a handler still running must not
    /// keep a dropped node's socket open.
    fn detach(self) -> Detached {
        match self {
            ReplyPath::Router(r, identity) => Detached::Router(Arc::downgrade(r), identity),
            ReplyPath::Dealer(d) => Detached::Dealer(d),
        }
    }
}

/// A [`ReplyPath`] a task can own.
enum Detached {
    Router(Weak<Router>, Bytes),
    Dealer(Arc<Dealer>),
}

/// The kinds of a successful and a failed answer to `request`, or `None` for a
/// notification (never answered).
fn answer_kinds(request: Kind) -> Option<(Kind, Kind)> {
    match request {
        Kind::Request => Some((Kind::Reply, Kind::ErrorReply)),
        Kind::GatherRequest => Some((Kind::GatherReply, Kind::ErrorReply)),
        _ => None,
    }
}

/// The answer envelope to a message with id `to`. Answers carry no target: the
/// correlation id says what they answer.
fn answer(sender: Id, to: Id, kind: Kind, payload: Bytes) -> Message {
    let mut h = Header::new(kind, sender, String::new());
    h.correlation_id = to;
    frames::message(&h, payload)
}

fn error_payload(body: &ErrorBody) -> Bytes {
    codec::encode_payload(body).expect("an error body always encodes")
}

/// What a reply needs of the message it answers once the handler has consumed it.
struct Answering {
    id: Id,
    kinds: Option<(Kind, Kind)>,
    /// Kept for notifications only, whose failures are logged with it.
    target: Option<String>,
}

impl Answering {
    fn of(h: &Header) -> Answering {
        let kinds = answer_kinds(h.kind);
        Answering {
            id: h.id,
            kinds,
            target: kinds.is_none().then(|| h.target.clone()),
        }
    }

    /// The reply for a handler's outcome, or `None` when there is nothing to send.
    fn reply(&self, sender: Id, out: Result<Bytes, ErrorBody>) -> Option<Message> {
        let Some((ok, err)) = self.kinds else {
            if let Err(e) = out {
                warn!(target = ?self.target, code = ?e.code, message = ?e.message, "notification handler failed");
            }
            return None;
        };
        Some(match out {
            Ok(p) => answer(sender, self.id, ok, p),
            Err(body) => answer(sender, self.id, err, error_payload(&body)),
        })
    }
}

/// What became of replies that could not be sent.
#[derive(Default)]
struct Undelivered {
    /// Replies dropped because the caller's queue was full.
    replies: AtomicU64,
    /// Connections closed for not reading their replies.
    callers: AtomicU64,
}

impl Undelivered {
    /// Sends `reply` on `path` without waiting; a full queue drops it (counted) and
    /// closes a ROUTER caller's connection.
    fn send(&self, path: &ReplyPath<'_>, reply: Message) {
        match path.try_send(reply) {
            Ok(()) => {}
            Err((SendError::BudgetSpent { used }, back)) => {
                // Its queue was dropped at once: the room it held is there for this reply.
                // Tried again even when this call dropped nobody: a reply to another
                // caller, at the same moment on another thread, may have dropped the
                // slowest already (and then nobody is left over their share here).
                path.shed_slowest();
                let retried = back.is_some_and(|m| path.try_send(m).is_ok());
                if !retried {
                    self.replies.fetch_add(1, Relaxed);
                    debug!(used, "reply dropped: the reply queues are full");
                }
            }
            Err((
                SendError::QueueFull {
                    messages, bytes, ..
                },
                _,
            )) => {
                self.replies.fetch_add(1, Relaxed);
                // Once per connection: replies to requests it sent before it is closed
                // are dropped too, but it is closed once.
                if path.give_up() {
                    self.callers.fetch_add(1, Relaxed);
                    warn!(
                        queued = messages,
                        bytes, "caller not reading its replies: reply dropped, connection closed"
                    );
                }
            }
            Err((e, _)) => debug!(error = %e, "reply not sent: caller gone"),
        }
    }

    /// [`Undelivered::send`] from a task: the node may be gone by then.
    fn send_detached(&self, path: &Detached, reply: Message) {
        match path {
            Detached::Router(router, identity) => {
                if let Some(r) = router.upgrade() {
                    self.send(&ReplyPath::Router(&r, identity.clone()), reply);
                }
            }
            Detached::Dealer(d) => self.send(&ReplyPath::Dealer(d.clone()), reply),
        }
    }
}

/// The requests whose handlers await, by caller connection and request id, so that a
/// CANCEL from that connection can stop one. Bounded by the handlers running.
#[derive(Default)]
struct Cancels {
    running: Mutex<HashMap<(Bytes, Id), CancellationToken>>,
    cancelled: AtomicU64,
}

impl Cancels {
    fn watch(self: &Arc<Self>, key: (Bytes, Id), token: CancellationToken) -> Watched {
        self.running.lock().insert(key.clone(), token);
        Watched {
            cancels: self.clone(),
            key,
        }
    }
}

/// A running handler's entry in [`Cancels`], removed when the handler ends.
struct Watched {
    cancels: Arc<Cancels>,
    key: (Bytes, Id),
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.cancels.running.lock().remove(&self.key);
    }
}

/// Runs handlers and sends their replies. See the [module documentation](self).
pub(super) struct Responder {
    node_id: Id,
    admission: Arc<Admission>,
    cancels: Arc<Cancels>,
    /// Bounds handlers running at once; when none is free the inbound loops stop reading
    /// and TCP pushes back on the senders.
    slots: Arc<Semaphore>,
    tasks: TaskTracker,
    draining: AtomicBool,
    undelivered: Arc<Undelivered>,
    /// Requests, notifications and gather requests handed to `respond` so far (a node
    /// that is leaving waits for them to stop coming before it stops taking work).
    arrived: AtomicU64,
    /// Messages with a shard key: one handler at a time per target and key.
    keys: Arc<KeyGate>,
    /// The node, for the hand-over questions (set once it is built).
    core: std::sync::OnceLock<Weak<super::Core>>,
}

impl Responder {
    pub(super) fn new(node_id: Id, max_in_flight: usize, limits: AdmitLimits) -> Self {
        Responder {
            node_id,
            admission: Arc::new(Admission::new(limits)),
            cancels: Arc::default(),
            slots: Arc::new(Semaphore::new(max_in_flight)),
            tasks: TaskTracker::new(),
            draining: AtomicBool::new(false),
            undelivered: Arc::default(),
            arrived: AtomicU64::new(0),
            keys: Arc::default(),
            core: std::sync::OnceLock::new(),
        }
    }

    /// The node this responder is part of (for the hand-over of keys).
    pub(super) fn set_core(&self, core: Weak<super::Core>) {
        if let Some(c) = core.upgrade() {
            self.keys.follow(c.membership.change_counter());
        }
        let _ = self.core.set(core);
    }

    /// A handler slot if one is free now.
    pub(super) fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Waits for a handler slot.
    pub(super) async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }

    /// Whether the node has stopped taking work (it is shutting down).
    pub(super) fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Stops taking work: requests arriving from now on are answered `shutting_down`.
    pub(super) fn stop_taking_work(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Waits until no request has arrived for `quiet`, or until `until`.
    pub(super) async fn wait_quiet(&self, quiet: Duration, until: tokio::time::Instant) {
        let mut seen = self.arrived.load(Relaxed);
        loop {
            let wake = (tokio::time::Instant::now() + quiet).min(until);
            tokio::time::sleep_until(wake).await;
            let now = self.arrived.load(Relaxed);
            if now == seen || wake >= until {
                return;
            }
            seen = now;
        }
    }

    /// Stops taking work and waits up to `within` for the handlers in flight. Returns
    /// whether they all finished.
    pub(super) async fn drain(&self, within: Duration) -> bool {
        self.stop_taking_work();
        self.tasks.close();
        tokio::time::timeout(within, self.tasks.wait())
            .await
            .is_ok()
    }

    /// Replies dropped because their caller's queue was full.
    pub(super) fn replies_dropped(&self) -> u64 {
        self.undelivered.replies.load(Relaxed)
    }

    /// Caller connections closed for not reading their replies.
    pub(super) fn callers_dropped(&self) -> u64 {
        self.undelivered.callers.load(Relaxed)
    }

    /// Requests, notifications and gather requests not run: their caller (connection
    /// or address) had as many handlers or request bytes held as it may, or all callers
    /// together did.
    pub(super) fn overloaded(&self) -> u64 {
        self.admission.refused()
    }

    /// The caller on ROUTER connection `identity` gave up on its request `id`: its
    /// handler, if still running, is dropped. Only the connection a request came on can
    /// cancel it. Returns whether one was running.
    pub(super) fn cancel(&self, identity: &Bytes, id: Id) -> bool {
        let token = self.cancels.running.lock().remove(&(identity.clone(), id));
        match token {
            Some(t) => {
                t.cancel();
                self.cancels.cancelled.fetch_add(1, Relaxed);
                true
            }
            None => false,
        }
    }

    /// Handlers stopped because their caller gave up.
    pub(super) fn cancelled(&self) -> u64 {
        self.cancels.cancelled.load(Relaxed)
    }

    /// Answers `to` with an error reply at once (no handler runs).
    pub(super) fn reply_error(
        &self,
        path: &ReplyPath<'_>,
        to: &Header,
        code: &str,
        message: String,
    ) {
        let body = ErrorBody {
            code: code.to_string(),
            message,
        };
        let reply = answer(self.node_id, to.id, Kind::ErrorReply, error_payload(&body));
        self.undelivered.send(path, reply);
    }

    /// Runs `handler` on `env` (a request, notification or gather request) holding `slot`,
    /// and sends its reply on `path`. The handler is polled once here: one that does not
    /// await (most do not) is answered without a task hop; one that does goes on in a
    /// task of its own under the caller's deadline, holding the slot until it finishes.
    pub(super) fn respond(
        &self,
        handler: ErasedHandler,
        env: Envelope,
        path: ReplyPath<'_>,
        slot: OwnedSemaphorePermit,
    ) {
        self.arrived.fetch_add(1, Relaxed);
        let caller = match &path {
            ReplyPath::Router(router, identity) => Some(Caller {
                identity: identity.clone(),
                source: router.peer_addr(identity).map(|a| source_key(a.ip())),
            }),
            ReplyPath::Dealer(_) => None,
        };
        let len = env.payload.len();
        if !self.admission.admits(caller.as_ref(), len) {
            self.admission.refuse();
            debug!(target = ?env.header.target, "not run: its caller holds as many handlers or bytes as it may");
            if env.header.kind != Kind::Notification {
                let msg = "too many requests of this caller are running; retry later";
                self.reply_error(&path, &env.header, codes::OVERLOADED, msg.into());
            }
            return;
        }
        let answering = Answering::of(&env.header);
        let sender = self.node_id;
        // A request from a ROUTER connection can be cancelled by its caller (CANCEL,
        // same connection, `cid` = its id) while its handler awaits.
        let cancellable = match (&path, env.header.kind) {
            (ReplyPath::Router(_, identity), Kind::Request) => {
                Some((identity.clone(), env.header.id))
            }
            _ => None,
        };
        let cancel = CancellationToken::new();
        // A message with a shard key runs when no other of its target and key does, and,
        // if the key is cold here, once the instance that had it is done with it
        // (`keyed`); a hand-over question only waits for its turn.
        let turn = match (&env.header.shard_key, env.header.kind) {
            (Some(key), Kind::Request | Kind::Notification) => {
                let question = is_handover(&env.header);
                let (entry, cold) = self.keys.enter(&env.header.target, key);
                let ask = (cold && !question)
                    .then(|| self.core.get().cloned())
                    .flatten();
                match entry {
                    Entry::Go(mut turn) if ask.is_none() && !question => {
                        turn.runs();
                        Some(turn)
                    }
                    entry => {
                        let running = self.admission.started(caller, len);
                        let watch = cancellable.map(|key| self.cancels.watch(key, cancel.clone()));
                        let queued = keyed::Queued {
                            handler: (!question).then_some(handler),
                            env,
                            waiting: match entry {
                                Entry::Go(t) => keyed::Waiting::Now(t),
                                Entry::Wait(rx) => keyed::Waiting::Later(rx),
                            },
                            ask,
                            cancel,
                            path: path.detach(),
                            answering,
                            sender,
                            undelivered: self.undelivered.clone(),
                            held: (slot, running, watch),
                        };
                        self.tasks.spawn(queued.run());
                        return;
                    }
                }
            }
            _ => None,
        };
        match start(handler, env, cancel.clone()) {
            Ok(out) => {
                drop(slot);
                if let Some(reply) = answering.reply(sender, out) {
                    self.undelivered.send(&path, reply);
                }
                drop(turn);
            }
            Err(run) => {
                let running = self.admission.started(caller, len);
                let path = path.detach();
                let undelivered = self.undelivered.clone();
                let watch = cancellable.map(|key| self.cancels.watch(key, cancel.clone()));
                self.tasks.spawn(async move {
                    // Dropping the handler's future is what stops it: at its next await.
                    let out = tokio::select! {
                        biased;
                        _ = cancel.cancelled() => None,
                        out = run => out,
                    };
                    if out.is_none() {
                        // Cut off at the deadline (or cancelled): work the handler handed
                        // elsewhere learns it through its context.
                        cancel.cancel();
                    }
                    drop(watch);
                    drop(slot);
                    drop(running);
                    if let Some(reply) = out.and_then(|out| answering.reply(sender, out)) {
                        undelivered.send_detached(&path, reply);
                    }
                    drop(turn);
                });
            }
        }
    }
}

type Finishing = Pin<Box<dyn Future<Output = Option<Result<Bytes, ErrorBody>>> + Send>>;

/// Starts a handler by polling it once: a handler that does not await finishes here
/// (`Ok`). Otherwise (`Err`) the returned future finishes it under the caller's
/// deadline, yielding `None` if the deadline passed: the caller has already given up
/// (its timer started before ours), so no reply is sent at all rather than one that can
/// only arrive too late.
fn start(
    handler: ErasedHandler,
    env: Envelope,
    cancel: CancellationToken,
) -> Result<Result<Bytes, ErrorBody>, Finishing> {
    let h = env.header;
    let deadline = h.deadline();
    let message_type = h.effective_type().unwrap_or(MessageType::Command);
    let ctx = Context {
        message_type,
        message_id: h.id,
        sender: h.sender,
        target: h.target,
        deadline,
        headers: h.headers,
        shard_key: h.shard_key,
        cancel,
    };
    let message_id = ctx.message_id;
    let mut fut = handler(env.payload, ctx);
    let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
    if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
        return Ok(out);
    }
    // The task polls it again with a real waker.
    Err(Box::pin(async move {
        match deadline {
            Some(d) => match tokio::time::timeout(d, fut).await {
                Ok(r) => Some(r),
                Err(_) => {
                    warn!(id = %message_id, deadline = ?d, "handler cut off at the caller's deadline; no reply sent");
                    None
                }
            },
            None => Some(fut.await),
        }
    }))
}
