//! Per-call options: deadline, version, headers, and the call's own settings of the
//! resilience mechanisms (retries, balancing, breaker, bulkhead), each of which
//! overrides its service's policy ([`ServicePolicy`](super::ServicePolicy)) and the
//! node's default.

use std::time::Duration;

use super::Balancing;
use crate::codec::{MessageType, Version};

/// Per-call options.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CallOptions {
    /// Deadline for the reply; the service's (see
    /// [`ServicePolicy::timeout`](super::ServicePolicy::timeout)) or else the node's
    /// default when `None`.
    pub timeout: Option<Duration>,
    /// Method version the caller was written against; any version when `None`.
    pub version: Option<Version>,
    /// String headers to carry (trace context).
    pub headers: std::collections::BTreeMap<String, String>,
    /// The shard key: calls with the same key go to the same instance for as long as it
    /// serves the target (rendezvous hashing over the instances that serve it, whatever
    /// the [`balancing`](CallOptions::balancing) setting), and the handler sees it in
    /// [`Context::shard_key`](super::Context::shard_key). When that instance leaves (or
    /// its breaker opens), only its keys move, each to the instance next in its order.
    /// Not used to choose for gathers, which go to every responder.
    pub shard_key: Option<String>,
    /// The message type to mark the call with; its kind's default when `None` (a
    /// command for requests and notifications). The receiver sees it in
    /// [`Context::message_type`](super::Context::message_type).
    pub message_type: Option<MessageType>,
    /// The call may be repeated safely (running it twice does no harm). A call is
    /// retried only if it is marked so, or its service declared retries
    /// ([`ServicePolicy::retries`](super::ServicePolicy::retries)).
    pub idempotent: bool,
    /// Attempts after the first when the instance could not serve the call (its
    /// connection lost, or it answered `overloaded` or `shutting_down`), each on another
    /// instance where there is one, after an exponential backoff with full jitter, all
    /// within the one deadline, and only while the node's retry budget allows (retries
    /// are at most about a fifth of calls). A retry keeps the message id, so a callee
    /// that deduplicates recognises it. `None`: the service's policy (no retries if it
    /// has none). Only for [`Node::request`](super::Node::request),
    /// [`Node::request_with`](super::Node::request_with) and the fallback variants.
    pub retries: Option<u32>,
    /// How this call chooses among the instances; the service's policy, else the node's
    /// default, when `None`.
    pub balancing: Option<Balancing>,
    /// Ignore the circuit breakers for this call: it may go to an instance whose breaker
    /// is open, and its outcome is not recorded (for an operator's probe or a health
    /// check that must reach an instance whatever its record).
    pub bypass_breaker: bool,
    /// Fail at once with [`CallError::BulkheadFull`](super::CallError::BulkheadFull)
    /// when the service's bulkhead is full, rather than wait in its queue.
    pub fail_fast: bool,
}

impl CallOptions {
    /// Options with this timeout.
    pub fn timeout(t: Duration) -> Self {
        CallOptions {
            timeout: Some(t),
            ..Default::default()
        }
    }

    /// Sets the version asked for.
    pub fn with_version(mut self, v: Version) -> Self {
        self.version = Some(v);
        self
    }

    /// Sets the deadline for the reply.
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Marks the call idempotent and allows `n` retries (see [`CallOptions::retries`]).
    pub fn with_retries(mut self, n: u32) -> Self {
        self.idempotent = true;
        self.retries = Some(n);
        self
    }

    /// Sets the shard key (see [`CallOptions::shard_key`]).
    pub fn with_shard_key(mut self, key: impl Into<String>) -> Self {
        self.shard_key = Some(key.into());
        self
    }

    /// Marks the call as a command, an event or a document (see
    /// [`CallOptions::message_type`]).
    pub fn with_message_type(mut self, t: MessageType) -> Self {
        self.message_type = Some(t);
        self
    }

    /// Adds a string header (trace context and the like).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
}
