//! Connection events and counters, the transport's report to the layer above.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use parking_lot::Mutex;

use super::error::{CloseReason, ProtocolViolation};

/// Something that happened to one connection of a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SocketEvent {
    /// A handshake completed.
    Connected {
        /// The peer's address.
        addr: SocketAddr,
        /// The peer's identity (announced, or assigned by a ROUTER).
        identity: Bytes,
        /// The socket type the peer announced.
        socket_type: String,
        /// The ZMTP minor version the peer announced (0 or 1).
        minor_version: u8,
    },
    /// A connection that had completed its handshake ended.
    Disconnected {
        /// The peer's address.
        addr: SocketAddr,
        /// The peer's identity.
        identity: Bytes,
        /// Why it ended.
        reason: CloseReason,
    },
    /// A connection ended before its handshake completed.
    HandshakeFailed {
        /// The peer's address.
        addr: SocketAddr,
        /// Why.
        reason: CloseReason,
    },
    /// A peer was disconnected for not reading what was queued for it while the socket's
    /// queues together held all they may (`send_queue_total_bytes`).
    SlowPeerDropped {
        /// The peer's address.
        addr: SocketAddr,
        /// Bytes queued for it when it was dropped.
        queued_bytes: usize,
    },
    /// A listener refused a connection because it already has `max_connections`.
    Refused {
        /// The refused peer's address.
        addr: SocketAddr,
    },
    /// A connecting socket could not reach its endpoint; it will try again.
    ConnectFailed {
        /// The endpoint, as `tcp://host:port`.
        endpoint: String,
        /// The error.
        error: String,
        /// The host answered that nothing listens there (connection refused): the
        /// host is up, the process is not.
        refused: bool,
    },
}

/// Counters of one socket, updated by its tasks. Read outside the transport only as a
/// [`StatsSnapshot`] (each socket's `stats()`).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) accepted: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) handshakes: AtomicU64,
    pub(crate) handshake_failures: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) messages_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) unknown_commands: AtomicU64,
    pub(crate) slow_dropped: AtomicU64,
    pub(crate) violations: Mutex<BTreeMap<&'static str, u64>>,
}

/// A copy of a socket's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// TCP connections accepted (listeners) or established (connecting sockets).
    pub accepted: u64,
    /// Connections refused at accept: `max_connections`, or the limits per source address.
    pub refused: u64,
    /// Handshakes completed.
    pub handshakes: u64,
    /// Connections that ended before their handshake completed.
    pub handshake_failures: u64,
    /// Connections that ended after their handshake.
    pub disconnects: u64,
    /// Messages received.
    pub messages_in: u64,
    /// Messages fully written to the socket.
    pub messages_out: u64,
    /// Messages dropped (PUB: subscriber queue full; SUB/DEALER: not deliverable).
    pub dropped: u64,
    /// Unknown commands received and ignored.
    pub unknown_commands: u64,
    /// Peers disconnected for not reading while the socket's queues were full (PUB).
    pub slow_dropped: u64,
    /// Connections closed for each kind of protocol violation, by [`ProtocolViolation::label`].
    pub violations: BTreeMap<&'static str, u64>,
}

impl Stats {
    /// A copy of the counters.
    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            accepted: self.accepted.load(Relaxed),
            refused: self.refused.load(Relaxed),
            handshakes: self.handshakes.load(Relaxed),
            handshake_failures: self.handshake_failures.load(Relaxed),
            disconnects: self.disconnects.load(Relaxed),
            messages_in: self.messages_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            unknown_commands: self.unknown_commands.load(Relaxed),
            slow_dropped: self.slow_dropped.load(Relaxed),
            violations: self.violations.lock().clone(),
        }
    }

    pub(crate) fn count_violation(&self, v: &ProtocolViolation) {
        *self.violations.lock().entry(v.label()).or_default() += 1;
    }
}

impl StatsSnapshot {
    /// Total connections closed for protocol violations of any kind.
    pub fn total_violations(&self) -> u64 {
        self.violations.values().sum()
    }
}
