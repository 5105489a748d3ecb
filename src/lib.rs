//! peerwire: a brokerless peer-to-peer messaging runtime for microservices.
//!
//! Nodes speak the ZeroMQ wire protocol (ZMTP 3.1) directly to each other; there is no
//! broker. This crate is built in layers, bottom to top:
//!
//! - [`transport`]: peerwire's own hardened ZMTP 3.1 implementation (ROUTER, DEALER,
//!   PUB, SUB over TCP), with limits checked before allocation, heartbeats, reconnection
//!   and bounded queues.
//! - [`codec`]: the MessagePack envelopes every node message carries; no I/O.
//! - [`discovery`]: where peers come from: mDNS on the LAN, static seeds, DNS names.
//! - [`node`]: the runtime a service embeds: typed handlers, the five interaction styles
//!   (request/response, asynchronous request/response, notification, publish/subscribe,
//!   gather), peers and their catalogs.
//!
//! Start with [`node::Node::builder`]. ARCHITECTURE.md has the map, PROTOCOL.md the
//! wire format.

#![warn(missing_docs)]

pub mod codec;
pub mod discovery;
pub mod node;
pub mod transport;
