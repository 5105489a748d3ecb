//! Fallbacks: what a call answers when no instance could: its deadline passed, every
//! instance's breaker is open, its service's bulkhead is full, or nobody serves it.
//! Given per call (a closure, or a value through one), or per service (registered once
//! on the node); the answer says that it came from a fallback, and why.
//!
//! This module owns the per-service fallbacks and the `Node` methods that use them; a
//! fallback never runs for an answer the service gave (a remote error is an answer).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::breaker::service_of;
use super::{CallError, CallOptions, Node};
use crate::codec::{self, CodecError};

/// A call's answer: the value, and, if a fallback gave it, the failure it stood in for.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Answer<T> {
    /// The value: the service's reply, or the fallback's.
    pub value: T,
    /// Why the fallback answered (`None`: the service did).
    pub fallback: Option<CallError>,
}

impl<T> Answer<T> {
    /// Whether a fallback gave the value.
    pub fn is_fallback(&self) -> bool {
        self.fallback.is_some()
    }
}

/// Whether a failure is one a fallback answers: the call could not reach a working
/// instance in time.
fn falls_back(e: &CallError) -> bool {
    matches!(
        e,
        CallError::Timeout { .. }
            | CallError::BreakerOpen(_)
            | CallError::BulkheadFull(_)
            | CallError::NoResponder(_)
    )
}

type ServiceFallback = Arc<dyn Fn(&str, &CallError) -> Result<Bytes, CodecError> + Send + Sync>;

/// The per-service fallbacks of a node.
#[derive(Default)]
pub(super) struct Fallbacks {
    by_service: RwLock<HashMap<String, ServiceFallback>>,
}

impl Node {
    /// Registers the fallback of `service` (a target's part before its first dot): what
    /// [`Node::request_answer`] answers for any of its targets when no instance could
    /// (given the target and why). Replaces an earlier one.
    pub fn fallback<Resp, F>(&self, service: &str, f: F)
    where
        Resp: Serialize,
        F: Fn(&str, &CallError) -> Resp + Send + Sync + 'static,
    {
        let erased: ServiceFallback =
            Arc::new(move |target, e| codec::encode_payload(&f(target, e)));
        self.core
            .fallbacks
            .by_service
            .write()
            .insert(service.to_string(), erased);
    }

    /// A request whose failure to reach a working instance (timeout, open breakers, full
    /// bulkhead, no responder) is answered by its service's fallback, if it has one
    /// (see [`Node::fallback`]). Other failures are returned as they are.
    pub async fn request_answer<Req, Resp>(
        &self,
        target: &str,
        req: &Req,
        opts: CallOptions,
    ) -> Result<Answer<Resp>, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let f = self
            .core
            .fallbacks
            .by_service
            .read()
            .get(service_of(target))
            .cloned();
        self.request_falling_back(target, req, opts, |e| match f {
            Some(f) => Ok(codec::decode_payload(&f(target, e)?)?),
            None => Err(e.clone()),
        })
        .await
    }

    /// A request whose failure to reach a working instance (timeout, open breakers, full
    /// bulkhead, no responder) is answered by `fallback` (given why). Other failures
    /// are returned as they are. For a fixed value: `|_| value`.
    pub async fn request_or<Req, Resp>(
        &self,
        target: &str,
        req: &Req,
        opts: CallOptions,
        fallback: impl FnOnce(&CallError) -> Resp,
    ) -> Result<Answer<Resp>, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.request_falling_back(target, req, opts, |e| Ok(fallback(e)))
            .await
    }

    /// The request, and `fallback` for the failures a fallback answers; its own error
    /// (none to give, or one that does not decode) is returned instead.
    async fn request_falling_back<Req, Resp>(
        &self,
        target: &str,
        req: &Req,
        opts: CallOptions,
        fallback: impl FnOnce(&CallError) -> Result<Resp, CallError>,
    ) -> Result<Answer<Resp>, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        match self.request_with(target, req, opts).await {
            Ok(value) => Ok(Answer {
                value,
                fallback: None,
            }),
            Err(e) if falls_back(&e) => Ok(Answer {
                value: fallback(&e)?,
                fallback: Some(e),
            }),
            Err(e) => Err(e),
        }
    }
}
