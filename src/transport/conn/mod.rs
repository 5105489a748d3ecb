//! One connection's shared vocabulary, and [`serve`], which runs a connection from
//! handshake to close.
//!
//! A connection is driven by exactly one task, which owns the stream: it reads it, waits
//! for room to write, and closes it. A sender may write a message onto it itself, under
//! the writer's lock, when nothing else waits to be written (see [`WriteSide`]). The socket
//! types (ROUTER, DEALER, PUB, SUB) differ only in what they do when a handshake
//! completes and ends ([`Role`]) and where received messages go ([`Sink`]); the byte
//! handling is all in this module's children, one per phase:
//!
//! - `spawn`: the tasks that accept or dial TCP connections and hand each to [`serve`].
//! - `handshake`: greeting and READY, up to a peer we know.
//! - `writer`: encoding queued items into frames and writing them, releasing the
//!   queue's bounds only once bytes are on the socket.
//! - `run`: the loop after the handshake: read, decode, deliver, write, heartbeat.
//!
//! This file owns the types they share (what is sent and received, the socket's
//! [`Shared`] state) and the events and counters of a connection's life. Nothing in
//! this module or its children holds a lock across an `.await`.

mod handshake;
pub(crate) mod io;
mod run;
mod spawn;
mod subscriptions;
mod writer;

use std::net::SocketAddr;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize,
    Ordering::{AcqRel, Acquire, Relaxed},
};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::error::{display_identity, CloseReason, ProtocolViolation};
use super::events::{SocketEvent, Stats};
use super::inbox::Intake;
use super::options::SocketOptions;
use super::queue::{Cost, Queue};
use super::wire::Command;
use super::{Endpoint, Message, SocketType};

pub(crate) use spawn::{spawn_connector, spawn_listener};
pub(crate) use subscriptions::Subscriptions;
pub(crate) use writer::WriteSide;

use handshake::{handshake, handshake_failed};
use run::run;

/// Least spare capacity kept in the read buffer before a read.
const READ_MIN: usize = 8 * 1024;

/// What a connection sends.
#[derive(Debug)]
pub(crate) enum OutItem {
    /// A data message.
    Msg(Message),
    /// Subscribe to a prefix (SUB): encoded as a command or a message by peer version.
    Subscribe(Bytes),
    /// Cancel a subscription (SUB).
    Cancel(Bytes),
}

impl Cost for OutItem {
    fn cost(&self) -> (usize, usize) {
        match self {
            OutItem::Msg(m) => (1, m.byte_len()),
            _ => (0, 0),
        }
    }
}

/// A received message and the identity of the connection it came from.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub identity: Bytes,
    pub msg: Message,
    /// When it arrived, for messages an inline handler declined (they wait in the
    /// queue, and whoever takes them may care how long); `None` otherwise, which saves
    /// reading the clock per message on the common path.
    pub arrived: Option<std::time::Instant>,
}

impl Cost for Inbound {
    fn cost(&self) -> (usize, usize) {
        (1, self.msg.byte_len())
    }
}

/// A function that takes every received message with the identity of its connection,
/// run inline by the connection task: it must be quick and must not block. Returning the
/// message back (`Err`) declines it: a ROUTER then queues it for `recv` as usual (with
/// the usual backpressure); a DEALER drops it and counts it.
pub type MessageHandler = Arc<dyn Fn(&Bytes, Message) -> Result<(), Message> + Send + Sync>;

/// Where a connection puts what it receives.
pub(crate) enum Sink {
    /// Messages go to the socket's incoming queue (this connection's lane of it).
    Deliver(Intake),
    /// Messages are handed to a function, inline (no queue, no task hop); those it
    /// declines go to the queue if there is one. While earlier declined messages of this
    /// connection wait there, later ones go behind them without being offered, so a
    /// connection's messages are handled in the order they arrived.
    Handler(MessageHandler, Option<Intake>),
    /// Messages and SUBSCRIBE/CANCEL commands update a PUB's filter for this peer.
    Subscriptions(Arc<Subscriptions>),
}

impl Sink {
    /// The connection ended: its lane, if it has one, goes once emptied.
    pub fn detach(&self) {
        if let Sink::Deliver(Intake::Lane(l)) | Sink::Handler(_, Some(Intake::Lane(l))) = self {
            l.detach();
        }
    }
}

/// What a socket type decided when a handshake completed.
pub(crate) struct Attached {
    pub out: Arc<Queue<OutItem>>,
    /// Where the connection's writer is, for senders that write themselves (see
    /// [`WriteSide`]); a socket whose senders always queue gives a fresh one.
    pub side: Arc<WriteSide>,
    pub sink: Sink,
    /// The identity the connection is known by (announced or assigned).
    pub identity: Bytes,
}

/// What the handshake learned of the peer.
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    pub addr: SocketAddr,
    pub minor: u8,
    pub socket_type: String,
    pub identity: Bytes,
    /// With CURVE: the peer's long-term public key, as the handshake proved it.
    pub curve_key: Option<[u8; 32]>,
}

/// The per-socket-type part of a connection's life.
pub(crate) trait Role: Send + Sync + 'static {
    /// Registers a connection whose handshake completed, or refuses it.
    fn attach(&self, peer: &PeerInfo) -> Result<Attached, ProtocolViolation>;
    /// Unregisters it when it ends.
    fn detach(&self, peer: &PeerInfo, attached: &Attached);
}

/// State every socket shares with its tasks.
pub(crate) struct Shared {
    pub opts: SocketOptions,
    pub socket_type: SocketType,
    pub stats: Stats,
    pub events: broadcast::Sender<SocketEvent>,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
    /// The connections running now: their outgoing queues (interrupting one closes it)
    /// and what each holds of messages still arriving.
    live: Mutex<Vec<Live>>,
    ticker_started: AtomicBool,
    /// Bytes of messages still arriving, all connections (see [`Meter`]).
    recv_held: AtomicUsize,
    /// A coarse clock: how many times the socket's ticker has ticked. Reading it costs
    /// an atomic load, where the real clock would cost a system call per message.
    ticks: AtomicU64,
}

/// A running connection: its outgoing queue and its [`Meter`].
type Live = (Arc<Queue<OutItem>>, Arc<Meter>);

/// Received bytes below this, per connection, are not counted against
/// `recv_buffer_total_bytes`: the common small message never touches the shared counter.
const RECV_COUNT_FROM: usize = 64 * 1024;

/// What one connection holds of a message still arriving (its read buffer and the
/// frames of a multipart message not complete yet), against the socket's
/// `recv_buffer_total_bytes`. The connection reports after each read; when the total is
/// past the budget, the connection receiving most slowly is evicted: its bytes are taken
/// off the total at once (so one eviction is not repeated by every reporter) and it
/// closes with [`ProtocolViolation::ReceiveBudget`].
#[derive(Default)]
pub(crate) struct Meter {
    held: AtomicUsize,
    /// The socket's tick (see [`Shared::ticks`]) when the first byte of the message now
    /// arriving was read.
    since: AtomicU64,
    /// The connection is not reading because we are not taking its messages (its queue
    /// is full): what it holds is our doing, not its slowness, so it is never evicted.
    blocked: AtomicBool,
    evicted: AtomicBool,
}

impl Meter {
    /// Reports `held` bytes now, of a message whose first byte came at tick `since`;
    /// `blocked`: we are not reading this connection (its queue is full).
    pub fn report(&self, shared: &Shared, held: usize, since: u64, blocked: bool) {
        let held = if held >= RECV_COUNT_FROM { held } else { 0 };
        let old = self.held.load(Relaxed);
        if held == 0 && old == 0 {
            return;
        }
        self.since.store(since, Relaxed);
        self.blocked.store(blocked, Relaxed);
        if held == old || self.evicted.load(Relaxed) {
            return;
        }
        let old = self.held.swap(held, AcqRel);
        if held > old {
            let total = shared.recv_held.fetch_add(held - old, AcqRel) + (held - old);
            if total > shared.opts.recv_buffer_total_bytes {
                shared.evict_slowest_receiver();
            }
        } else {
            shared.recv_held.fetch_sub(old - held, AcqRel);
        }
    }

    /// The connection ends: whatever it held goes back to the total.
    pub fn release(&self, shared: &Shared) {
        shared
            .recv_held
            .fetch_sub(self.held.swap(0, AcqRel), AcqRel);
    }

    /// Whether the budget evicted this connection.
    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Relaxed)
    }
}

impl Shared {
    pub fn new(opts: SocketOptions, socket_type: SocketType) -> Arc<Shared> {
        Arc::new(Shared {
            opts,
            socket_type,
            stats: Stats::default(),
            events: broadcast::channel(1024).0,
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            live: Mutex::new(Vec::new()),
            ticker_started: AtomicBool::new(false),
            recv_held: AtomicUsize::new(0),
            ticks: AtomicU64::new(0),
        })
    }

    /// The coarse clock (see `ticks`).
    pub(crate) fn ticks(&self) -> u64 {
        self.ticks.load(Relaxed)
    }

    /// The total of messages still arriving is past the budget: evicts the connection
    /// receiving its message most slowly (fewest bytes a second so far), if the total is
    /// still over once we look. A slow sender is the cheap way to hold memory; a peer
    /// sending a large message at full speed is not what the budget is for.
    fn evict_slowest_receiver(&self) {
        let live = self.live.lock();
        if self.recv_held.load(Acquire) <= self.opts.recv_buffer_total_bytes {
            return;
        }
        let now = self.ticks();
        // Bytes per tick since the message began (a message begun this tick counts as
        // one tick old).
        let rate = |m: &Meter| {
            let age = now.saturating_sub(m.since.load(Relaxed)).max(1);
            m.held.load(Relaxed) as u64 / age
        };
        let slowest = live
            .iter()
            .filter(|(_, m)| {
                m.held.load(Relaxed) > 0 && !m.is_evicted() && !m.blocked.load(Relaxed)
            })
            .min_by_key(|(_, m)| rate(m));
        if let Some((out, m)) = slowest {
            if !m.evicted.swap(true, AcqRel) {
                self.recv_held.fetch_sub(m.held.swap(0, AcqRel), AcqRel);
                out.interrupt();
            }
        }
    }

    pub(crate) fn emit(&self, e: SocketEvent) {
        // No receiver is fine: events are for whoever listens.
        let _ = self.events.send(e);
    }

    /// Stops the socket's listener or connector and closes every connection (each
    /// flushes what is queued for at most `linger`). Does not wait.
    pub fn close_all(&self) {
        self.cancel.cancel();
        for (q, _) in self.live.lock().iter() {
            q.interrupt();
        }
    }

    /// How often connections do their heartbeat work: half the heartbeat interval, or a
    /// quarter of the timeout if shorter (250 ms with the defaults), so silence is noticed
    /// at most one tick late.
    pub fn tick_period(&self) -> Duration {
        (self
            .opts
            .heartbeat_interval
            .unwrap_or(Duration::from_secs(1))
            / 2)
        .min(self.opts.heartbeat_timeout / 4)
        .max(Duration::from_millis(10))
    }

    /// Starts the socket's ticker on first use (so constructing a socket outside a
    /// runtime never spawns): one task that ticks every live connection's queue.
    fn ensure_ticker(self: &Arc<Self>) {
        if self.ticker_started.swap(true, Relaxed) {
            return;
        }
        let shared = Arc::downgrade(self);
        let cancel = self.cancel.clone();
        let period = self.tick_period();
        self.tracker.spawn(async move {
            let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                let Some(shared) = shared.upgrade() else {
                    break;
                };
                shared.ticks.fetch_add(1, Relaxed);
                for (q, _) in shared.live.lock().iter() {
                    q.tick();
                }
            }
        });
    }

    fn register(self: &Arc<Self>, q: &Arc<Queue<OutItem>>, meter: &Arc<Meter>) {
        self.ensure_ticker();
        self.live.lock().push((q.clone(), meter.clone()));
        // close_all cancels before it walks the list: if it ran before the push, the
        // token tells us.
        if self.cancel.is_cancelled() {
            q.interrupt();
        }
    }

    fn unregister(&self, q: &Arc<Queue<OutItem>>, meter: &Meter) {
        self.live.lock().retain(|(x, _)| !Arc::ptr_eq(x, q));
        meter.release(self);
    }

    /// [`Shared::close_all`], then waits for every task, at most `linger` plus a margin.
    pub async fn shutdown(&self) {
        self.close_all();
        self.tracker.close();
        let bound = self.opts.linger + Duration::from_secs(1);
        if timeout(bound, self.tracker.wait()).await.is_err() {
            warn!(
                socket = self.socket_type.as_str(),
                "tasks still running after close"
            );
        }
    }
}

/// Closes a connection whose peer is not reading: interrupts it, refuses further pushes
/// and drops what is queued (nothing of it is worth the linger, and the memory goes back
/// now). Returns whether this call did it.
pub(crate) fn drop_queue(q: &Queue<OutItem>) -> bool {
    let first = q.interrupt();
    if first {
        q.close();
        q.clear();
    }
    first
}

impl Shared {
    /// The queues of a listening socket's connections (`peers`: each queue and its
    /// peer's address) together hold the whole send budget: drops the peer holding the
    /// most, if it holds more than its share, counted (`slow_dropped`) and reported
    /// (`SlowPeerDropped`). Returns whether one was dropped.
    pub(crate) fn drop_slowest<'a>(
        &self,
        peers: impl ExactSizeIterator<Item = (&'a Queue<OutItem>, SocketAddr)>,
    ) -> bool {
        let share = self.opts.send_queue_total_bytes / peers.len().max(1);
        let slowest = peers
            .filter(|(q, _)| !q.is_interrupted())
            .map(|(q, addr)| (q.usage().bytes, q, addr))
            .max_by_key(|(bytes, ..)| *bytes);
        let Some((bytes, q, addr)) = slowest else {
            return false;
        };
        if bytes <= share || !drop_queue(q) {
            return false;
        }
        self.stats.slow_dropped.fetch_add(1, Relaxed);
        warn!(%addr, queued_bytes = bytes, socket = self.socket_type.as_str(), "slow peer dropped: the send queues are full");
        self.emit(SocketEvent::SlowPeerDropped {
            addr,
            queued_bytes: bytes,
        });
        true
    }
}

/// Runs one connection from handshake to close, reporting events and counters.
/// Returns whether the handshake completed.
pub(crate) async fn serve<S: io::Stream>(
    mut stream: S,
    addr: SocketAddr,
    shared: &Arc<Shared>,
    role: &dyn Role,
    admitted: Option<&mut spawn::Admitted>,
    dialled: Option<&Endpoint>,
) -> bool {
    let hs = tokio::select! {
        _ = shared.cancel.cancelled() => Err(CloseReason::Shutdown),
        r = timeout(shared.opts.handshake_timeout, handshake(&mut stream, addr, shared, dialled)) => {
            r.unwrap_or(Err(ProtocolViolation::HandshakeTimeout.into()))
        }
    };
    let (peer, rbuf, curve) = match hs {
        Ok(h) => (
            PeerInfo {
                curve_key: h.curve.as_ref().map(|c| c.peer_key()),
                ..h.peer
            },
            h.rbuf,
            h.curve,
        ),
        Err(reason) => {
            handshake_failed(shared, addr, reason);
            return false;
        }
    };
    if let Some(a) = admitted {
        a.handshaken();
    }
    let attached = match role.attach(&PeerInfo {
        addr,
        ..peer.clone()
    }) {
        Ok(a) => a,
        Err(v) => {
            // With CURVE everything after READY is boxed: a clear ERROR would only look
            // like an attack to the peer, so the connection just closes.
            if curve.is_none() {
                let mut out = BytesMut::new();
                Command::Error(v.to_string()).encode(&mut out);
                let _ = timeout(Duration::from_millis(200), stream.write_all(&out)).await;
            }
            handshake_failed(shared, addr, v.into());
            return false;
        }
    };
    shared.stats.handshakes.fetch_add(1, Relaxed);
    debug!(%addr, identity = %display_identity(&attached.identity), peer_type = %peer.socket_type, "connected");
    shared.emit(SocketEvent::Connected {
        addr,
        identity: attached.identity.clone(),
        socket_type: peer.socket_type.clone(),
        minor_version: peer.minor,
    });
    let meter = Arc::new(Meter::default());
    shared.register(&attached.out, &meter);
    let reason = run(stream, rbuf, &peer, shared, &attached, &meter, curve).await;
    shared.unregister(&attached.out, &meter);
    role.detach(&peer, &attached);
    shared.stats.disconnects.fetch_add(1, Relaxed);
    if let CloseReason::Violation(v) = &reason {
        shared.stats.count_violation(v);
        // `reason` reads "protocol violation: …", or says the peer went silent.
        warn!(%addr, identity = %display_identity(&attached.identity), %reason, "connection closed");
    } else {
        debug!(%addr, %reason, "disconnected");
    }
    shared.emit(SocketEvent::Disconnected {
        addr,
        identity: attached.identity.clone(),
        reason,
    });
    true
}
