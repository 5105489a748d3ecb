//! The node's public errors: why a node could not start ([`NodeError`]) and why a call
//! failed ([`CallError`]). Each variant says what happened in terms a caller can act on;
//! nothing here decides anything.

use std::time::Duration;

use crate::codec::{CodecError, Version};
use crate::discovery::DiscoveryError;
use crate::transport::{SendError, TransportError};

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A socket could not be created.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A discovery source could not start (mDNS with no usable interface, say).
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The builder was given a setting the node cannot use.
    #[error("{0}")]
    Config(String),
}

/// Why a call (request, notification, gather) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// No reply within the deadline.
    #[error("no reply from {target} within {timeout:?}")]
    Timeout {
        /// The target called.
        target: String,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// No connected peer serves the target (reported at once, not after the timeout).
    #[error("no responder known for {0}")]
    NoResponder(String),
    /// Peers serve the target, but none at a version compatible with the one asked for.
    #[error("{target} is served at version {available}, not compatible with {wanted}")]
    IncompatibleVersion {
        /// The target.
        target: String,
        /// The version asked for.
        wanted: Version,
        /// A version a peer serves.
        available: Version,
    },
    /// The remote handler (or the remote node) answered with an error.
    #[error("remote error {code}: {message}")]
    Remote {
        /// Its code (see `codec::codes` for peerwire's own).
        code: String,
        /// Its message.
        message: String,
    },
    /// The request or reply could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The connection to the chosen peer dropped before its reply arrived. The request
    /// may or may not have run there (it may even still be delivered, if it was queued
    /// and the same peer comes back): retry only what is safe to repeat.
    #[error("connection to {0} lost before the reply arrived")]
    Disconnected(String),
    /// The message could not be queued.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The node is shutting down.
    #[error("node is shutting down")]
    Shutdown,
    /// Every instance serving the target has its circuit breaker open: the call was
    /// refused at once, without being sent (see `BreakerConfig`).
    #[error("circuit breaker open for every instance of {0}")]
    BreakerOpen(String),
    /// The service's bulkhead is full: as many requests to it are in flight as allowed
    /// and its waiting queue is full (or the call's deadline passed while it waited).
    #[error("bulkhead full for {0}: too many requests to it in flight")]
    BulkheadFull(String),
    /// The outbox holds as many messages or bytes as it may
    /// ([`OutboxConfig`](super::OutboxConfig)): the message was not taken.
    #[error("outbox full ({messages} messages, {bytes} bytes held): the message was not taken")]
    OutboxFull {
        /// Messages held.
        messages: usize,
        /// Payload bytes held.
        bytes: usize,
    },
    /// The outbox could not keep the message (its file on disk failed): it was not taken.
    #[error("{0}")]
    Outbox(String),
}
