//! peerwire: a brokerless peer-to-peer messaging runtime for microservices.
//!
//! Nodes speak the ZeroMQ wire protocol (ZMTP 3.1) directly to each other; there is no
//! broker. This crate is built in layers, bottom to top:
//!
//! - [`transport`]: peerwire's own hardened ZMTP 3.1 implementation (ROUTER, DEALER,
//!   PUB, SUB over TCP), with limits checked before allocation, heartbeats, reconnection
//!   and bounded queues.
//! - [`codec`]: the MessagePack envelopes every node message carries; no I/O. The codec
//!   and the transport do not know each other: the node joins them.
//! - [`discovery`]: where peers come from: mDNS on the LAN, static seeds, DNS names.
//! - [`node`]: the runtime a service embeds: typed handlers, the five interaction styles
//!   (request/response, asynchronous request/response, notification, publish/subscribe,
//!   gather), peers and their catalogs.
//!
//! The types a service needs are re-exported here. Start with [`Node::builder`].
//! ARCHITECTURE.md has the map, PROTOCOL.md the wire format.
//!
//! Features: `cli` (on by default) builds the `peerwire` command and pulls in what only
//! it uses (clap, anyhow, tracing-subscriber, serde_json); a service embedding the
//! library can turn it off with `default-features = false`.

#![warn(missing_docs)]

pub mod codec;
pub mod dedup;
pub mod discovery;
pub mod node;
pub mod transport;

pub use codec::{Id, MessageType, Version};
pub use discovery::{DnsSeed, Interfaces, MdnsConfig};
pub use node::{
    Answer, Balancing, BreakerConfig, BulkheadConfig, CallError, CallOptions, ClusterSecret,
    Context, DeliveryOptions, Event, Gather, GatherEnd, GatherOptions, GatherOutcome, GatherReply,
    HandlerError, Node, NodeBuilder, NodeError, NodeStats, PeerInfo, PendingReply, Presence,
    PresenceEvent, Publishing, ServicePolicy, Subscription,
};
pub use transport::{Endpoint, SocketOptions};
