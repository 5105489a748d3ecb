//! Per-call options: deadline, version, headers, retries.

use std::time::Duration;

use crate::codec::Version;

/// Per-call options.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CallOptions {
    /// Deadline for the reply; the node's default when `None`.
    pub timeout: Option<Duration>,
    /// Method version the caller was written against; any version when `None`.
    pub version: Option<Version>,
    /// String headers to carry (trace context).
    pub headers: std::collections::BTreeMap<String, String>,
    /// The call may be repeated safely (running it twice does no harm): only such a
    /// call is retried.
    pub idempotent: bool,
    /// Attempts after the first when the instance could not serve the call (its
    /// connection lost, or it answered `overloaded` or `shutting_down`), each on another
    /// instance where there is one, after an exponential backoff with full jitter, all
    /// within the one deadline, and only while the node's retry budget allows (retries
    /// are at most about a fifth of calls). A retry keeps the message id, so a callee
    /// that deduplicates recognises it. Only for [`Node::request`](super::Node::request)
    /// and [`Node::request_with`](super::Node::request_with), and only if `idempotent`.
    pub retries: u32,
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
        self.retries = n;
        self
    }

    /// Adds a string header (trace context and the like).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
}
