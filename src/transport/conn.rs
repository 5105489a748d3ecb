//! One connection: handshake, then a loop that reads, writes and heartbeats.
//!
//! A connection is driven by exactly one task, which owns the `TcpStream`. The socket
//! types (ROUTER, DEALER, PUB, SUB) differ only in what they do when a handshake
//! completes and ends ([`Role`]) and where received messages go ([`Sink`]); the byte
//! handling is all here. Nothing in this module holds a lock across an `.await`.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::WriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::error::{display_identity, CloseReason, ProtocolViolation};
use super::events::{SocketEvent, Stats};
use super::options::SocketOptions;
use super::queue::{Cost, Queue};
use super::wire::{
    check_greeting_prefix, encode_frame_header, encode_greeting, parse_greeting, Command, Decoded,
    Decoder, FLAG_MORE, GREETING_LEN,
};
use super::{Endpoint, Message, SocketType};

/// Frames at least this large are written straight from the caller's buffer (vectored
/// write) instead of being copied into the connection's staging buffer.
const ZERO_COPY_THRESHOLD: usize = 16 * 1024;
/// Least spare capacity kept in the read buffer before a read.
const READ_MIN: usize = 8 * 1024;
/// Most capacity reserved ahead of bytes that actually arrived: a peer announcing a
/// large frame makes us hold at most this much more than it has really sent.
const READ_AHEAD_MAX: usize = 256 * 1024;
/// Most slices handed to one vectored write.
const MAX_IOV: usize = 64;

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
}

impl Cost for Inbound {
    fn cost(&self) -> (usize, usize) {
        (1, self.msg.byte_len())
    }
}

/// Prefix filters a PUB keeps for one subscriber (a multiset, as in ZeroMQ: subscribing
/// twice and cancelling once leaves the prefix subscribed).
#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    prefixes: RwLock<Vec<Bytes>>,
}

impl Subscriptions {
    /// Applies a SUBSCRIBE or CANCEL. Refuses to grow past `max` prefixes or
    /// `max_bytes` of them, so a subscriber cannot exhaust memory or slow every publish.
    pub fn apply(
        &self,
        subscribe: bool,
        topic: &[u8],
        max: usize,
        max_bytes: usize,
    ) -> Result<(), ProtocolViolation> {
        let mut p = self.prefixes.write();
        if subscribe {
            let bytes: usize = p.iter().map(|t| t.len()).sum();
            if p.len() >= max || bytes + topic.len() > max_bytes {
                return Err(ProtocolViolation::TooManySubscriptions { max, max_bytes });
            }
            // Copied: a slice would keep the connection's whole read buffer alive.
            p.push(Bytes::copy_from_slice(topic));
        } else if let Some(i) = p.iter().position(|t| t[..] == *topic) {
            p.swap_remove(i);
        }
        Ok(())
    }

    pub fn matches(&self, first_frame: &[u8]) -> bool {
        self.prefixes
            .read()
            .iter()
            .any(|p| first_frame.starts_with(p))
    }

    pub fn list(&self) -> Vec<Bytes> {
        self.prefixes.read().clone()
    }
}

/// A function that takes every received message with the identity of its connection,
/// run inline by the connection task: it must be quick and must not block. Returning the
/// message back (`Err`) declines it: a ROUTER then queues it for `recv` as usual (with
/// the usual backpressure); a DEALER drops it and counts it.
pub type MessageHandler = Arc<dyn Fn(&Bytes, Message) -> Result<(), Message> + Send + Sync>;

/// Where a connection puts what it receives.
pub(crate) enum Sink {
    /// Messages go to the socket's incoming queue.
    Deliver(Arc<Queue<Inbound>>),
    /// Messages are handed to a function, inline (no queue, no task hop); those it
    /// declines go to the queue if there is one.
    Handler(MessageHandler, Option<Arc<Queue<Inbound>>>),
    /// Messages and SUBSCRIBE/CANCEL commands update a PUB's filter for this peer.
    Subscriptions(Arc<Subscriptions>),
}

/// What a socket type decided when a handshake completed.
pub(crate) struct Attached {
    pub out: Arc<Queue<OutItem>>,
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
    /// Outgoing queues of the connections running now; interrupting one closes it.
    live: Mutex<Vec<Arc<Queue<OutItem>>>>,
    ticker_started: AtomicBool,
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
        })
    }

    fn emit(&self, e: SocketEvent) {
        // No receiver is fine: events are for whoever listens.
        let _ = self.events.send(e);
    }

    /// Stops the socket's listener or connector and closes every connection (each
    /// flushes what is queued for at most `linger`). Does not wait.
    pub fn close_all(&self) {
        self.cancel.cancel();
        for q in self.live.lock().iter() {
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
                for q in shared.live.lock().iter() {
                    q.tick();
                }
            }
        });
    }

    fn register(self: &Arc<Self>, q: &Arc<Queue<OutItem>>) {
        self.ensure_ticker();
        self.live.lock().push(q.clone());
        // close_all cancels before it walks the list: if it ran before the push, the
        // token tells us.
        if self.cancel.is_cancelled() {
            q.interrupt();
        }
    }

    fn unregister(&self, q: &Arc<Queue<OutItem>>) {
        self.live.lock().retain(|x| !Arc::ptr_eq(x, q));
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

/// Accepts connections until the socket is cancelled, each served by its own task.
pub(crate) fn spawn_listener(listener: TcpListener, shared: Arc<Shared>, role: Arc<dyn Role>) {
    let tracker = shared.tracker.clone();
    tracker.spawn(async move {
        let live = Arc::new(AtomicUsize::new(0));
        loop {
            let accepted = tokio::select! {
                _ = shared.cancel.cancelled() => break,
                r = listener.accept() => r,
            };
            let (stream, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = shared.cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            };
            if live.load(Relaxed) >= shared.opts.max_connections {
                shared.stats.refused.fetch_add(1, Relaxed);
                warn!(%addr, max = shared.opts.max_connections, "connection refused: max_connections reached");
                shared.emit(SocketEvent::Refused { addr });
                drop(stream);
                continue;
            }
            live.fetch_add(1, Relaxed);
            shared.stats.accepted.fetch_add(1, Relaxed);
            let (shared2, role2, live2) = (shared.clone(), role.clone(), live.clone());
            shared.tracker.spawn(async move {
                serve(stream, addr, &shared2, &*role2).await;
                live2.fetch_sub(1, Relaxed);
            });
        }
    });
}

/// Connects to `endpoint` and keeps reconnecting, with exponential backoff and jitter,
/// until the socket is cancelled.
/// `stop` ends this connector (it is the socket's token, or a child of it for a SUB's
/// per-endpoint connectors).
pub(crate) fn spawn_connector(
    endpoint: Endpoint,
    shared: Arc<Shared>,
    role: Arc<dyn Role>,
    stop: CancellationToken,
) {
    let tracker = shared.tracker.clone();
    tracker.spawn(async move {
        let opts = &shared.opts;
        let mut delay = opts.reconnect_initial;
        loop {
            let attempt = async {
                let stream = TcpStream::connect((endpoint.host(), endpoint.port())).await?;
                let addr = stream.peer_addr()?;
                Ok::<_, std::io::Error>((stream, addr))
            };
            let res = tokio::select! {
                _ = stop.cancelled() => break,
                r = timeout(opts.handshake_timeout, attempt) => r,
            };
            match res {
                Ok(Ok((stream, addr))) => {
                    shared.stats.accepted.fetch_add(1, Relaxed);
                    if serve(stream, addr, &shared, &*role).await {
                        delay = opts.reconnect_initial;
                    }
                }
                Ok(Err(e)) => {
                    debug!(%endpoint, error = %e, "connect failed");
                    shared.emit(SocketEvent::ConnectFailed {
                        endpoint: endpoint.to_string(),
                        error: e.to_string(),
                        refused: e.kind() == std::io::ErrorKind::ConnectionRefused,
                    });
                }
                Err(_) => shared.emit(SocketEvent::ConnectFailed {
                    endpoint: endpoint.to_string(),
                    error: "connect timed out".into(),
                    refused: false,
                }),
            }
            if stop.is_cancelled() {
                break;
            }
            // Jitter in [0.5, 1.0) of the delay spreads out reconnect storms.
            let wait = delay.mul_f64(0.5 + fastrand::f64() * 0.5);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            delay = (delay * 2).min(opts.reconnect_max);
        }
    });
}

/// Runs one connection from handshake to close, reporting events and counters.
/// Returns whether the handshake completed.
pub(crate) async fn serve(
    mut stream: TcpStream,
    addr: SocketAddr,
    shared: &Arc<Shared>,
    role: &dyn Role,
) -> bool {
    let _ = stream.set_nodelay(true);
    let hs = tokio::select! {
        _ = shared.cancel.cancelled() => Err(CloseReason::Shutdown),
        r = timeout(shared.opts.handshake_timeout, handshake(&mut stream, shared)) => {
            r.unwrap_or(Err(ProtocolViolation::HandshakeTimeout.into()))
        }
    };
    let (peer, rbuf) = match hs {
        Ok(ok) => ok,
        Err(reason) => {
            handshake_failed(shared, addr, reason);
            return false;
        }
    };
    let attached = match role.attach(&PeerInfo {
        addr,
        ..peer.clone()
    }) {
        Ok(a) => a,
        Err(v) => {
            let mut out = BytesMut::new();
            Command::Error(v.to_string()).encode(&mut out);
            let _ = timeout(Duration::from_millis(200), stream.write_all(&out)).await;
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
    shared.register(&attached.out);
    let reason = run(stream, rbuf, &peer, shared, &attached).await;
    shared.unregister(&attached.out);
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

fn handshake_failed(shared: &Shared, addr: SocketAddr, reason: CloseReason) {
    if reason == CloseReason::Shutdown {
        return;
    }
    shared.stats.handshake_failures.fetch_add(1, Relaxed);
    if let CloseReason::Violation(v) = &reason {
        shared.stats.count_violation(v);
    }
    warn!(%addr, %reason, "handshake failed");
    shared.emit(SocketEvent::HandshakeFailed { addr, reason });
}

/// Greeting and READY exchange. Returns the peer's details and any bytes it sent after
/// its READY (which belong to the first messages).
async fn handshake(
    stream: &mut TcpStream,
    shared: &Shared,
) -> Result<(PeerInfo, BytesMut), CloseReason> {
    let addr = stream.peer_addr()?;
    // Greeting and READY go out together: with the NULL mechanism nothing we send depends
    // on the peer's greeting, and this saves a round trip.
    let mut out = BytesMut::with_capacity(128);
    out.put_slice(&encode_greeting(false));
    let mut props = vec![(
        "Socket-Type".to_string(),
        Bytes::from_static(shared.socket_type.as_str().as_bytes()),
    )];
    if let Some(id) = &shared.opts.identity {
        props.push(("Identity".to_string(), id.clone()));
    }
    Command::Ready(props).encode(&mut out);
    stream.write_all(&out).await?;

    let mut g = [0u8; GREETING_LEN];
    let read_greeting = async {
        let mut n = 0;
        while n < GREETING_LEN {
            let r = stream.read(&mut g[n..]).await?;
            if r == 0 {
                return Err(CloseReason::PeerClosed);
            }
            n += r;
            check_greeting_prefix(&g[..n])?;
        }
        Ok(())
    };
    timeout(shared.opts.greeting_timeout, read_greeting)
        .await
        .unwrap_or(Err(ProtocolViolation::GreetingTimeout.into()))?;
    let greeting = parse_greeting(&g)?;
    match ready_exchange(stream, shared, addr, greeting.minor).await {
        Err(CloseReason::Violation(v)) => {
            // The peer speaks ZMTP: tell it why, as the spec asks, before closing.
            let mut out = BytesMut::new();
            Command::Error(v.to_string()).encode(&mut out);
            let _ = timeout(Duration::from_millis(200), stream.write_all(&out)).await;
            Err(v.into())
        }
        other => other,
    }
}

/// Reads the peer's READY and checks its properties.
async fn ready_exchange(
    stream: &mut TcpStream,
    shared: &Shared,
    addr: SocketAddr,
    minor: u8,
) -> Result<(PeerInfo, BytesMut), CloseReason> {
    let mut dec = Decoder::commands_only();
    let mut rbuf = BytesMut::with_capacity(512);
    let props = loop {
        match dec.decode(&mut rbuf)? {
            Some(Decoded::Command(Command::Ready(p))) => break p,
            Some(Decoded::Command(Command::Error(r))) => {
                return Err(ProtocolViolation::PeerError(r).into())
            }
            Some(Decoded::Command(_)) => {
                return Err(ProtocolViolation::Unexpected("command before READY").into())
            }
            Some(Decoded::Message(_)) => {
                return Err(ProtocolViolation::Unexpected("message before READY").into())
            }
            None => {}
        }
        rbuf.reserve(dec.wanted(rbuf.len()).clamp(64, READ_MIN));
        if stream.read_buf(&mut rbuf).await? == 0 {
            return Err(CloseReason::PeerClosed);
        }
    };
    let prop = |name: &str| {
        props
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let socket_type = prop("Socket-Type").ok_or(ProtocolViolation::MissingSocketType)?;
    let socket_type = String::from_utf8_lossy(&socket_type).into_owned();
    if !shared.socket_type.accepts(&socket_type) {
        return Err(ProtocolViolation::IncompatibleSocketType {
            ours: shared.socket_type.as_str(),
            theirs: socket_type,
        }
        .into());
    }
    let identity = prop("Identity").unwrap_or_default();
    Ok((
        PeerInfo {
            addr,
            minor,
            socket_type,
            identity,
        },
        rbuf,
    ))
}

/// Outgoing bytes of one connection: encoded chunks waiting for the socket, and the items
/// they came from, so that the queue's bounds are released only once an item is written
/// and unwritten items can be handed back when the connection drops.
struct Writer {
    chunks: VecDeque<Bytes>,
    staging: BytesMut,
    inflight: VecDeque<(OutItem, u64)>,
    taken: VecDeque<OutItem>,
    appended: u64,
    written: u64,
    minor: u8,
}

impl Writer {
    fn new(minor: u8) -> Self {
        Writer {
            chunks: VecDeque::new(),
            staging: BytesMut::new(),
            inflight: VecDeque::new(),
            taken: VecDeque::new(),
            appended: 0,
            written: 0,
            minor,
        }
    }

    fn refill(&mut self, q: &Queue<OutItem>) {
        q.take_all(&mut self.taken);
        while let Some(item) = self.taken.pop_front() {
            match &item {
                OutItem::Msg(m) => {
                    let n = m.frames().len();
                    for (i, f) in m.frames().iter().enumerate() {
                        self.frame(if i + 1 < n { FLAG_MORE } else { 0 }, f);
                    }
                }
                OutItem::Subscribe(t) | OutItem::Cancel(t) => {
                    let sub = matches!(item, OutItem::Subscribe(_));
                    if self.minor >= 1 {
                        let c = if sub {
                            Command::Subscribe(t.clone())
                        } else {
                            Command::Cancel(t.clone())
                        };
                        self.command(&c);
                    } else {
                        // ZMTP 3.0 form: a one-frame message, first byte 1 or 0.
                        let mut body = BytesMut::with_capacity(1 + t.len());
                        body.put_u8(sub as u8);
                        body.put_slice(t);
                        self.frame(0, &body.freeze());
                    }
                }
            }
            self.inflight.push_back((item, self.appended));
        }
        self.flush_staging();
    }

    fn frame(&mut self, flags: u8, body: &Bytes) {
        let before = self.staging.len();
        if self.staging.capacity() - before < 9 + ZERO_COPY_THRESHOLD {
            self.staging.reserve(9 + ZERO_COPY_THRESHOLD);
        }
        encode_frame_header(&mut self.staging, flags, body.len());
        self.appended += (self.staging.len() - before) as u64 + body.len() as u64;
        if body.len() >= ZERO_COPY_THRESHOLD {
            self.flush_staging();
            self.chunks.push_back(body.clone());
        } else {
            self.staging.put_slice(body);
        }
    }

    fn command(&mut self, c: &Command) {
        let before = self.staging.len();
        c.encode(&mut self.staging);
        self.appended += (self.staging.len() - before) as u64;
    }

    fn flush_staging(&mut self) {
        if !self.staging.is_empty() {
            self.chunks.push_back(self.staging.split().freeze());
        }
    }

    /// Accounts for `n` bytes written; returns the cost of the items now fully written.
    fn advance(&mut self, mut n: usize) -> (usize, usize) {
        self.written += n as u64;
        while n > 0 {
            let front = self.chunks.front_mut().expect("written bytes were queued");
            if front.len() <= n {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                let _ = front.split_to(n);
                n = 0;
            }
        }
        let mut done = (0, 0);
        while let Some((_, end)) = self.inflight.front() {
            if *end > self.written {
                break;
            }
            let (item, _) = self.inflight.pop_front().expect("front exists");
            let (c, b) = item.cost();
            done.0 += c;
            done.1 += b;
        }
        done
    }
}

/// Accounts for items fully written: counters and the queue's bounds.
fn written(shared: &Shared, att: &Attached, count: usize, bytes: usize) {
    if count > 0 {
        shared.stats.messages_out.fetch_add(count as u64, Relaxed);
    }
    if count > 0 || bytes > 0 {
        att.out.release(count, bytes);
    }
}

fn io_slices<'a>(chunks: &'a VecDeque<Bytes>, slices: &mut [IoSlice<'a>; MAX_IOV]) -> usize {
    let mut n = 0;
    for c in chunks.iter().take(MAX_IOV) {
        slices[n] = IoSlice::new(c);
        n += 1;
    }
    n
}

fn try_write_chunks(wr: &WriteHalf<'_>, chunks: &VecDeque<Bytes>) -> std::io::Result<usize> {
    let mut slices = [IoSlice::new(&[]); MAX_IOV];
    let n = io_slices(chunks, &mut slices);
    let w = wr.try_write_vectored(&slices[..n])?;
    if w == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    Ok(w)
}

async fn write_chunks(wr: &mut WriteHalf<'_>, chunks: &VecDeque<Bytes>) -> std::io::Result<usize> {
    let mut slices = [IoSlice::new(&[]); MAX_IOV];
    let n = io_slices(chunks, &mut slices);
    let w = wr.write_vectored(&slices[..n]).await?;
    if w == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    Ok(w)
}

/// The connection loop after the handshake. Returns why it ended.
async fn run(
    mut stream: TcpStream,
    mut rbuf: BytesMut,
    peer: &PeerInfo,
    shared: &Shared,
    att: &Attached,
) -> CloseReason {
    let opts = &shared.opts;
    let (mut rd, mut wr) = stream.split();
    let mut dec = Decoder::new(opts.decode_limits());
    let mut w = Writer::new(peer.minor);
    let mut pending: Option<Inbound> = None;
    let heartbeat = opts.heartbeat_interval.filter(|_| peer.minor >= 1);
    let mut peer_ttl: Option<Duration> = None;
    let mut last_pong_end = 0u64;
    // Liveness is checked on the socket's periodic tick (see `Shared::tick_period`)
    // rather than by reading the clock on every read or polling a timer on every turn:
    // reads only set `rx_seen`, and the tick turns that into `last_rx`. Silence is
    // therefore detected between `limit` and `limit + 2 ticks` after the last byte.
    let tick = shared.tick_period();
    let mut rx_seen = false;
    let mut last_rx = Instant::now();
    let mut next_ping = Instant::now() + heartbeat.unwrap_or(Duration::MAX / 4);

    let reason = 'conn: loop {
        // Decode whatever is buffered, unless the sink is full.
        let mut received = 0u64;
        while pending.is_none() {
            match dec.decode(&mut rbuf) {
                Ok(None) => break,
                Ok(Some(Decoded::Message(msg))) => {
                    received += 1;
                    match &att.sink {
                        Sink::Deliver(q) => {
                            let item = Inbound {
                                identity: att.identity.clone(),
                                msg,
                            };
                            if let Err((item, _)) = q.try_push(item) {
                                pending = Some(item);
                            }
                        }
                        Sink::Handler(f, fallback) => {
                            if let Err(msg) = f(&att.identity, msg) {
                                match fallback {
                                    Some(q) => {
                                        let item = Inbound {
                                            identity: att.identity.clone(),
                                            msg,
                                        };
                                        if let Err((item, _)) = q.try_push(item) {
                                            pending = Some(item);
                                        }
                                    }
                                    None => {
                                        shared.stats.dropped.fetch_add(1, Relaxed);
                                    }
                                }
                            }
                        }
                        Sink::Subscriptions(subs) => {
                            // ZMTP 3.0 subscription form: a one-frame message starting
                            // with 1 or 0. Other messages from a subscriber mean nothing
                            // to a PUB and are ignored.
                            let f = &msg.frames()[0];
                            if let (1, Some(&kind @ (0 | 1))) = (msg.len(), f.first()) {
                                if let Err(v) = subs.apply(
                                    kind == 1,
                                    &f[1..],
                                    opts.max_subscriptions,
                                    opts.max_subscription_bytes,
                                ) {
                                    break 'conn v.into();
                                }
                            }
                        }
                    }
                }
                Ok(Some(Decoded::Command(c))) => match c {
                    Command::Ping { ttl_ds, context } => {
                        if ttl_ds > 0 {
                            peer_ttl = Some(Duration::from_millis(ttl_ds as u64 * 100));
                        }
                        // At most one unwritten PONG: a peer flooding PINGs while never
                        // reading must not grow our write buffer. Any traffic from us
                        // proves liveness, so skipping a PONG loses nothing.
                        if w.written >= last_pong_end {
                            w.command(&Command::Pong(context));
                            w.flush_staging();
                            last_pong_end = w.appended;
                        }
                    }
                    Command::Pong(_) => {}
                    Command::Error(r) => break 'conn ProtocolViolation::PeerError(r).into(),
                    Command::Subscribe(ref t) | Command::Cancel(ref t) => {
                        let sub = matches!(c, Command::Subscribe(_));
                        if let Sink::Subscriptions(s) = &att.sink {
                            if let Err(v) =
                                s.apply(sub, t, opts.max_subscriptions, opts.max_subscription_bytes)
                            {
                                break 'conn v.into();
                            }
                        }
                    }
                    Command::Ready(_) => {
                        break 'conn ProtocolViolation::Unexpected("second READY").into()
                    }
                    Command::Unknown(name) => {
                        shared.stats.unknown_commands.fetch_add(1, Relaxed);
                        debug!(addr = %peer.addr, command = %name, "unknown command ignored");
                    }
                },
                Err(v) => break 'conn v.into(),
            }
        }
        if received > 0 {
            shared.stats.messages_in.fetch_add(received, Relaxed);
        }
        if w.chunks.is_empty() {
            w.refill(&att.out);
            // Try the write now: usually the socket has room and this saves a turn of
            // the select below. WouldBlock just leaves the bytes for that turn.
            while !w.chunks.is_empty() {
                match try_write_chunks(&wr, &w.chunks) {
                    Ok(n) => {
                        let (c, b) = w.advance(n);
                        written(shared, att, c, b);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => break 'conn e.into(),
                }
            }
        }
        if att.out.is_interrupted() {
            linger(&mut wr, &mut w, att, opts.linger).await;
            break CloseReason::Shutdown;
        }
        if att.out.take_tick() {
            let now = Instant::now();
            if rx_seen || pending.is_some() {
                last_rx = now;
                rx_seen = false;
            }
            let silence_limit = match (heartbeat.map(|_| opts.heartbeat_timeout), peer_ttl) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(limit) = silence_limit {
                if now.duration_since(last_rx) >= limit {
                    break ProtocolViolation::HeartbeatTimeout.into();
                }
            }
            if let Some(ivl) = heartbeat {
                if now + tick / 2 >= next_ping {
                    let ttl_ds =
                        (opts.heartbeat_timeout.as_millis() / 100).min(u16::MAX as u128) as u16;
                    w.command(&Command::Ping {
                        ttl_ds,
                        context: Bytes::new(),
                    });
                    w.flush_staging();
                    next_ping = now + ivl;
                }
            }
            // Written by the next turn's select (the write branch is enabled).
        }
        let want_items = w.chunks.is_empty();
        let want = dec.wanted(rbuf.len());
        rbuf.reserve(want.clamp(READ_MIN, READ_AHEAD_MAX.max(rbuf.len())));

        tokio::select! {
            biased;
            r = write_chunks(&mut wr, &w.chunks), if !w.chunks.is_empty() => match r {
                Ok(n) => {
                    let (c, b) = w.advance(n);
                    written(shared, att, c, b);
                }
                Err(e) => break e.into(),
            },
            r = rd.read_buf(&mut rbuf), if pending.is_none() => match r {
                Ok(0) => break CloseReason::PeerClosed,
                Ok(_) => rx_seen = true,
                Err(e) => break e.into(),
            },
            _ = wait_sink(&att.sink), if pending.is_some() => {
                if let Sink::Deliver(q) | Sink::Handler(_, Some(q)) = &att.sink {
                    if let Err((item, _)) = q.try_push(pending.take().expect("pending")) {
                        pending = Some(item);
                    } else {
                        // We were not reading while blocked; that was not the peer's silence.
                        rx_seen = true;
                    }
                }
            },
            // New items to write, a tick or an interrupt (handled at the top of the loop).
            _ = std::future::poll_fn(|cx| att.out.poll_readable(cx, want_items)) => {},
        }
    };
    // Whatever was not completely written goes back to the queue: a DEALER sends it on
    // its next connection; for other sockets the queue dies with the connection.
    let unsent = w.inflight.drain(..).map(|(item, _)| item);
    att.out
        .requeue_front(unsent.collect::<Vec<_>>().into_iter());
    if let Some(item) = pending {
        // Received but not deliverable because we are closing: counted, not silent.
        shared.stats.dropped.fetch_add(1, Relaxed);
        drop(item);
    }
    reason
}

async fn wait_sink(sink: &Sink) {
    match sink {
        Sink::Deliver(q) | Sink::Handler(_, Some(q)) => q.writable().await,
        Sink::Handler(_, None) | Sink::Subscriptions(_) => std::future::pending().await,
    }
}

/// On close, keeps writing what is already queued for at most `linger`.
async fn linger(wr: &mut WriteHalf<'_>, w: &mut Writer, att: &Attached, linger: Duration) {
    let flush = async {
        loop {
            if w.chunks.is_empty() {
                w.refill(&att.out);
            }
            if w.chunks.is_empty() {
                break;
            }
            match write_chunks(wr, &w.chunks).await {
                Ok(n) => {
                    let (c, b) = w.advance(n);
                    att.out.release(c, b);
                }
                Err(_) => break,
            }
        }
        let _ = wr.shutdown().await;
    };
    let _ = timeout(linger, flush).await;
}
