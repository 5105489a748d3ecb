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
/// | `send_queue_messages` / `send_queue_bytes` | 100 000 / 64 MiB per connection |
/// | `recv_queue_messages` / `recv_queue_bytes` | 100 000 / 64 MiB per socket |
/// | `heartbeat_interval` / `heartbeat_timeout` | 500 ms / 2 s (ZMTP 3.1 peers only) |
/// | `reconnect_initial` / `reconnect_max` | 100 ms / 5 s, with jitter |
/// | `linger` | 1 s |
/// | `max_subscriptions` / `max_subscription_bytes` | 10 000 / 1 MiB per subscriber |
#[derive(Debug, Clone)]
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
    /// Most messages queued for sending, per connection (per socket for DEALER).
    pub send_queue_messages: usize,
    /// Most bytes queued for sending, per connection (per socket for DEALER).
    pub send_queue_bytes: usize,
    /// Most received messages waiting for `recv`, per socket. When full, connections stop
    /// reading and TCP pushes back on the senders.
    pub recv_queue_messages: usize,
    /// Most received bytes waiting for `recv`, per socket.
    pub recv_queue_bytes: usize,
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
            send_queue_messages: 100_000,
            send_queue_bytes: 64 << 20,
            recv_queue_messages: 100_000,
            recv_queue_bytes: 64 << 20,
            // A dead host (no FIN, no RST) is noticed within 2.5 s: the node's presence
            // promises a crashed peer gone within 3 s.
            heartbeat_interval: Some(Duration::from_millis(500)),
            heartbeat_timeout: Duration::from_secs(2),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            linger: Duration::from_secs(1),
            identity: None,
            max_subscriptions: 10_000,
            max_subscription_bytes: 1 << 20,
        }
    }
}

impl SocketOptions {
    pub(crate) fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_frame_size: self.max_frame_size,
            max_message_size: self.max_message_size,
            max_frames: self.max_frames_per_message,
        }
    }
}
