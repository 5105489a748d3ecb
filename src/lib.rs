//! peerwire: a brokerless peer-to-peer messaging runtime for microservices.
//!
//! Nodes speak the ZeroMQ wire protocol (ZMTP 3.1) directly to each other; there is no
//! broker. This crate is built in layers, bottom to top:
//!
//! - [`transport`]: peerwire's own hardened ZMTP 3.1 implementation (ROUTER, DEALER,
//!   PUB, SUB over TCP), with limits checked before allocation, heartbeats, reconnection
//!   and bounded queues.
//!
//! The node runtime, envelopes, discovery and the interaction styles build on it; see
//! ARCHITECTURE.md for the map and PROTOCOL.md for the wire format.

#![warn(missing_docs)]

pub mod codec;
pub mod node;
pub mod transport;
