//! Socket options: limits, timeouts, queue bounds, heartbeats and reconnection.

use std::time::Duration;

use bytes::Bytes;

use super::wire::DecodeLimits;

/// Options shared by every socket type. Every limit has a documented default and is
/// configurable; the defaults suit a LAN runtime carrying messages up to a few MiB.
///
/// | option | default |
/// |---|---|
/// | `max_frame_size` | 16 MiB |
/// | `max_message_size` | 16 MiB |
/// | `max_frames_per_message` | 64 |
/// | `greeting_timeout` | 5 s |
/// | `handshake_timeout` | 10 s |
/// | `max_connections` | 1024 per listener |
/// | `max_connections_per_source` | 128 per listener and source address |
/// | `max_handshakes_per_source` | 32 per listener and source address |
/// | `idle_timeout` | 120 s (accepted connections, any ZMTP version) |
/// | `send_queue_messages` / `send_queue_bytes` | 100 000 / 64 MiB per connection |
/// | `send_queue_total_bytes` | 256 MiB per listening socket (ROUTER, PUB), all connections |
/// | `recv_queue_messages` / `recv_queue_bytes` | 100 000 / 64 MiB per socket (a quarter per connection) |
/// | `recv_buffer_total_bytes` | 64 MiB per socket: messages still arriving, all connections |
/// | `heartbeat_interval` / `heartbeat_timeout` | 500 ms / 2 s (ZMTP 3.1 peers only) |
/// | `reconnect_initial` / `reconnect_max` | 100 ms / 5 s, with jitter |
/// | `linger` | 1 s |
/// | `max_subscriptions` / `max_subscription_bytes` | 10 000 / 1 MiB per subscriber |
/// | `curve` | `None` (the NULL mechanism) |
///
/// Build one from the defaults with the `with_*` setters (new options may be added, so
/// outside this crate it cannot be written as a struct literal):
///
/// ```
/// use std::time::Duration;
/// use peerwire::transport::SocketOptions;
///
/// let opts = SocketOptions::default()
///     .with_heartbeat_interval(None)
///     .with_linger(Duration::from_millis(200));
/// assert_eq!(opts.heartbeat_interval, None);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SocketOptions {
    /// Largest single frame accepted from a peer; a larger header closes the connection.
    pub max_frame_size: usize,
    /// Largest message (sum of its frames) accepted from a peer or queued for sending.
    pub max_message_size: usize,
    /// Most frames in one message.
    pub max_frames_per_message: usize,
    /// Time allowed for the peer's 64-byte greeting to arrive after TCP connect.
    pub greeting_timeout: Duration,
    /// Time allowed for the whole handshake (greeting and READY).
    pub handshake_timeout: Duration,
    /// Most live connections a listening socket (ROUTER, PUB) accepts; more are closed
    /// at once, counted and logged.
    pub max_connections: usize,
    /// Most live connections a listening socket accepts from one source address, so that
    /// one address can never hold every slot; more are closed at once, counted and logged.
    pub max_connections_per_source: usize,
    /// Most connections from one source address still in their handshake (a slowloris
    /// holds its slots in the handshake); more are closed at once, counted and logged.
    pub max_handshakes_per_source: usize,
    /// An accepted connection (ROUTER, PUB) that shows no activity for this long is
    /// closed, whatever its ZMTP version. Activity is anything received, and on a PUB also
    /// data the subscriber takes (our writes progressing): a ZMTP 3.0 peer is never
    /// heartbeated, so that is all there is to go on, while a 3.1 peer's PONGs keep it
    /// alive. Never shorter than two heartbeat intervals, and off when heartbeats are off
    /// (a quiet peer is then never asked anything). `None` keeps silent peers for ever.
    pub idle_timeout: Option<Duration>,
    /// Most messages queued for sending, per connection (per socket for DEALER).
    pub send_queue_messages: usize,
    /// Most bytes queued for sending, per connection (per socket for DEALER).
    pub send_queue_bytes: usize,
    /// Most bytes queued for sending by a listening socket (ROUTER, PUB) over all its
    /// connections together: past it, sends fail (`QueueFull`) and publishes drop, as at a
    /// connection's own bound, so many slow peers cannot add up to unbounded memory.
    pub send_queue_total_bytes: usize,
    /// Most received messages waiting for `recv`, per socket; on a ROUTER or SUB one
    /// connection may hold a quarter of it. When full, connections stop reading and TCP
    /// pushes back on the senders.
    pub recv_queue_messages: usize,
    /// Most received bytes waiting for `recv`, per socket (a quarter per connection on a
    /// ROUTER or SUB).
    pub recv_queue_bytes: usize,
    /// Most bytes of messages still arriving (read but not yet complete), all of a
    /// socket's connections together. A connection holds such bytes only while a large
    /// message comes in (under 64 KiB is not counted); past the total, the connection
    /// receiving most slowly (fewest bytes a second for its message so far) is closed,
    /// counted as the `receive_budget` violation. So many peers each sending part of a
    /// large message cannot add up to unbounded memory, and slow senders go first.
    pub recv_buffer_total_bytes: usize,
    /// How often to PING a ZMTP 3.1 peer; `None` disables heartbeats.
    pub heartbeat_interval: Option<Duration>,
    /// A peer from which nothing at all arrived for this long is disconnected.
    pub heartbeat_timeout: Duration,
    /// First reconnection delay of a connecting socket (DEALER, SUB).
    pub reconnect_initial: Duration,
    /// Largest reconnection delay; delays double up to it, each with random jitter.
    pub reconnect_max: Duration,
    /// On close, how long a connection keeps flushing what is already queued.
    pub linger: Duration,
    /// Identity announced in READY (DEALER, SUB); `None` lets the ROUTER assign one.
    /// 1 to 255 bytes, not starting with a zero byte.
    pub identity: Option<Bytes>,
    /// The CURVE mechanism (authenticated, encrypted connections; see
    /// [`curve`](super::curve)); `None`: the NULL mechanism, as ZeroMQ's default. A
    /// socket with CURVE refuses peers without it, and the other way round.
    pub curve: Option<super::curve::Curve>,
    /// Most topic prefixes one subscriber may hold on a PUB.
    pub max_subscriptions: usize,
    /// Most bytes of topic prefixes one subscriber may hold on a PUB.
    pub max_subscription_bytes: usize,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            max_frame_size: 16 << 20,
            max_message_size: 16 << 20,
            max_frames_per_message: 64,
            greeting_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_connections_per_source: 128,
            max_handshakes_per_source: 32,
            idle_timeout: Some(Duration::from_secs(120)),
            send_queue_messages: 100_000,
            send_queue_bytes: 64 << 20,
            send_queue_total_bytes: 256 << 20,
            recv_queue_messages: 100_000,
            recv_queue_bytes: 64 << 20,
            recv_buffer_total_bytes: 64 << 20,
            // A dead host (no FIN, no RST) is noticed within 2.5 s: the node's presence
            // promises a crashed peer gone within 3 s.
            heartbeat_interval: Some(Duration::from_millis(500)),
            heartbeat_timeout: Duration::from_secs(2),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            linger: Duration::from_secs(1),
            identity: None,
            curve: None,
            max_subscriptions: 10_000,
            max_subscription_bytes: 1 << 20,
        }
    }
}

impl SocketOptions {
    /// Sets [`max_frame_size`](Self::max_frame_size) (default 16 MiB).
    #[must_use]
    pub fn with_max_frame_size(mut self, v: usize) -> Self {
        self.max_frame_size = v;
        self
    }

    /// Sets [`max_message_size`](Self::max_message_size) (default 16 MiB).
    #[must_use]
    pub fn with_max_message_size(mut self, v: usize) -> Self {
        self.max_message_size = v;
        self
    }

    /// Sets [`max_frames_per_message`](Self::max_frames_per_message) (default 64).
    #[must_use]
    pub fn with_max_frames_per_message(mut self, v: usize) -> Self {
        self.max_frames_per_message = v;
        self
    }

    /// Sets [`greeting_timeout`](Self::greeting_timeout) (default 5 s).
    #[must_use]
    pub fn with_greeting_timeout(mut self, v: Duration) -> Self {
        self.greeting_timeout = v;
        self
    }

    /// Sets [`handshake_timeout`](Self::handshake_timeout) (default 10 s).
    #[must_use]
    pub fn with_handshake_timeout(mut self, v: Duration) -> Self {
        self.handshake_timeout = v;
        self
    }

    /// Sets [`max_connections`](Self::max_connections) (default 1024).
    #[must_use]
    pub fn with_max_connections(mut self, v: usize) -> Self {
        self.max_connections = v;
        self
    }

    /// Sets [`max_connections_per_source`](Self::max_connections_per_source) (default 128).
    #[must_use]
    pub fn with_max_connections_per_source(mut self, v: usize) -> Self {
        self.max_connections_per_source = v;
        self
    }

    /// Sets [`max_handshakes_per_source`](Self::max_handshakes_per_source) (default 32).
    #[must_use]
    pub fn with_max_handshakes_per_source(mut self, v: usize) -> Self {
        self.max_handshakes_per_source = v;
        self
    }

    /// Sets [`idle_timeout`](Self::idle_timeout) (default 120 s; `None`: never).
    #[must_use]
    pub fn with_idle_timeout(mut self, v: Option<Duration>) -> Self {
        self.idle_timeout = v;
        self
    }

    /// Sets [`send_queue_messages`](Self::send_queue_messages) (default 100 000).
    #[must_use]
    pub fn with_send_queue_messages(mut self, v: usize) -> Self {
        self.send_queue_messages = v;
        self
    }

    /// Sets [`send_queue_bytes`](Self::send_queue_bytes) (default 64 MiB).
    #[must_use]
    pub fn with_send_queue_bytes(mut self, v: usize) -> Self {
        self.send_queue_bytes = v;
        self
    }

    /// Sets [`send_queue_total_bytes`](Self::send_queue_total_bytes) (default 256 MiB).
    #[must_use]
    pub fn with_send_queue_total_bytes(mut self, v: usize) -> Self {
        self.send_queue_total_bytes = v;
        self
    }

    /// Sets [`recv_queue_messages`](Self::recv_queue_messages) (default 100 000).
    #[must_use]
    pub fn with_recv_queue_messages(mut self, v: usize) -> Self {
        self.recv_queue_messages = v;
        self
    }

    /// Sets [`recv_queue_bytes`](Self::recv_queue_bytes) (default 64 MiB).
    #[must_use]
    pub fn with_recv_queue_bytes(mut self, v: usize) -> Self {
        self.recv_queue_bytes = v;
        self
    }

    /// Sets [`recv_buffer_total_bytes`](Self::recv_buffer_total_bytes) (default 64 MiB).
    #[must_use]
    pub fn with_recv_buffer_total_bytes(mut self, v: usize) -> Self {
        self.recv_buffer_total_bytes = v;
        self
    }

    /// Sets [`heartbeat_interval`](Self::heartbeat_interval) (default 500 ms; `None`
    /// disables heartbeats).
    #[must_use]
    pub fn with_heartbeat_interval(mut self, v: Option<Duration>) -> Self {
        self.heartbeat_interval = v;
        self
    }

    /// Sets [`heartbeat_timeout`](Self::heartbeat_timeout) (default 2 s).
    #[must_use]
    pub fn with_heartbeat_timeout(mut self, v: Duration) -> Self {
        self.heartbeat_timeout = v;
        self
    }

    /// Sets [`reconnect_initial`](Self::reconnect_initial) (default 100 ms).
    #[must_use]
    pub fn with_reconnect_initial(mut self, v: Duration) -> Self {
        self.reconnect_initial = v;
        self
    }

    /// Sets [`reconnect_max`](Self::reconnect_max) (default 5 s).
    #[must_use]
    pub fn with_reconnect_max(mut self, v: Duration) -> Self {
        self.reconnect_max = v;
        self
    }

    /// Sets [`linger`](Self::linger) (default 1 s).
    #[must_use]
    pub fn with_linger(mut self, v: Duration) -> Self {
        self.linger = v;
        self
    }

    /// Sets [`identity`](Self::identity) (default `None`: a ROUTER assigns one).
    #[must_use]
    pub fn with_identity(mut self, v: Option<Bytes>) -> Self {
        self.identity = v;
        self
    }

    /// Sets [`curve`](Self::curve) (default `None`: the NULL mechanism).
    #[must_use]
    pub fn with_curve(mut self, v: Option<super::curve::Curve>) -> Self {
        self.curve = v;
        self
    }

    /// Sets [`max_subscriptions`](Self::max_subscriptions) (default 10 000).
    #[must_use]
    pub fn with_max_subscriptions(mut self, v: usize) -> Self {
        self.max_subscriptions = v;
        self
    }

    /// Sets [`max_subscription_bytes`](Self::max_subscription_bytes) (default 1 MiB).
    #[must_use]
    pub fn with_max_subscription_bytes(mut self, v: usize) -> Self {
        self.max_subscription_bytes = v;
        self
    }

    pub(crate) fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_frame_size: self.max_frame_size,
            max_message_size: self.max_message_size,
            max_frames: self.max_frames_per_message,
        }
    }
}
