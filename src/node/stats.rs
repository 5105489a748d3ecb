//! The node's counters, as [`Node::stats`](super::Node::stats) copies them. Each part
//! of the node keeps its own; this module only names them.

use crate::transport::StatsSnapshot;

/// A copy of the node's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeStats {
    /// Envelopes that could not be decoded (dropped, logged).
    pub malformed: u64,
    /// Envelopes of a kind not expected on the socket they came on (dropped, logged).
    pub unexpected: u64,
    /// HELLOs and mDNS sightings of nodes of another cluster (ignored).
    pub other_cluster: u64,
    /// mDNS sightings of nodes announcing another protocol major version (ignored).
    pub other_version: u64,
    /// Events dropped because a local subscription's queue was full (subscribers see
    /// them as gaps in the sequence numbers).
    pub events_dropped: u64,
    /// Replies dropped because the caller's queue was full (it was not reading them).
    pub replies_dropped: u64,
    /// Caller connections closed for not reading their replies.
    pub callers_dropped: u64,
    /// Requests answered `overloaded` (and notifications dropped): their caller
    /// connection or address had as many handlers running, or request bytes held, as it
    /// may (`max_in_flight_per_connection`, `max_in_flight_per_source`,
    /// `max_in_flight_bytes`).
    pub overloaded: u64,
    /// Handlers stopped because their caller gave up on the request (a CANCEL came).
    pub cancelled: u64,
    /// Calls refused because the breaker of the instance chosen (or of every instance)
    /// was open.
    pub breaker_refused: u64,
    /// Requests refused because their service's bulkhead was full.
    pub bulkhead_rejected: u64,
    /// Requests and notifications not run because their deadline passed before a
    /// handler could start (they waited for a slot), or came already passed (`dl: 0`).
    pub expired: u64,
    /// HELLOs and HELLO-ACKs refused: a catalog past its bounds, a HELLO too large to
    /// read, a new peer past `max_peers` (see
    /// [`MembershipLimits`](super::MembershipLimits)); on a secured node, a node id that
    /// is not the one its connection's key proves, or endpoints another key serves.
    pub hellos_refused: u64,
    /// HELLOs dropped for coming too fast from one connection or one address (see
    /// [`MembershipLimits`](super::MembershipLimits)).
    pub hellos_limited: u64,
    /// Endpoints named by gossip or discovery not dialled when named (the dial rate, or
    /// the dials in progress; see [`MembershipLimits`](super::MembershipLimits));
    /// discovery names them again.
    pub dials_deferred: u64,
    /// The outbox's counters: messages held, delivered, redelivered, given up.
    pub outbox: super::OutboxStats,
    /// The ROUTER's counters: connections refused (in total, per address, in the
    /// handshake), closed for violations or idleness, messages dropped.
    pub router: StatsSnapshot,
    /// The PUB's counters: subscribers refused or dropped for being slow, events dropped.
    pub publisher: StatsSnapshot,
    /// The SUB's counters.
    pub subscriber: StatsSnapshot,
}
