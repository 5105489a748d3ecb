//! The call pipeline: the one path every outgoing call takes, whatever its style
//! (request, asynchronous request, notification, gather).
//!
//! ```text
//! admit    the node still takes calls; the payload encoded          (bulkhead: here)
//! choose   the instance (Balance over the membership's candidates)  (breaker: skips here)
//!          or, for a gather, every expected responder
//! send     header filled, correlation registered (calls / gathers),
//!          queued on the chosen connection under the call's deadline
//! await    the caller's handle: PendingReply, Gather                (retry: wraps choose..await)
//! ```
//!
//! This module owns that order and the [`Balance`] seam where an instance is chosen
//! (round robin by default). It never touches a socket's internals, never reads a reply
//! off the wire (inbound routing hands replies to `calls`), and never decides who is
//! connected (the membership does).

use std::collections::{BTreeMap, HashSet};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::debug;

use super::calls::{far_instant_after, CallGuard, ConnId, ReplyResult};
use super::gather::Opened;
use super::membership::Instance;
use super::{frames, CallError, Core};
use crate::codec::{self, Envelope, ErrorBody, Header, Id, Kind, Version};

/// One instance a call could go to, as a [`Balance`] policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// The peer's node id.
    pub(crate) id: Id,
    /// The connection a call to it goes out on.
    pub(crate) conn: ConnId,
}

/// Chooses one instance among those serving a target: the seam where load-balancing
/// policies plug in (least outstanding, skipping open circuit breakers, ...).
pub(crate) trait Balance: Send + Sync + 'static {
    /// The index of the chosen one in `candidates`, which is never empty and is ordered
    /// by node id. Called under the membership's lock: it must be quick and must not
    /// block.
    fn choose(&self, target: &str, candidates: &[Candidate]) -> usize;
}

/// The default policy: each call to the next instance, in node id order.
#[derive(Debug, Default)]
pub(crate) struct RoundRobin {
    cursor: AtomicUsize,
}

impl Balance for RoundRobin {
    fn choose(&self, _target: &str, candidates: &[Candidate]) -> usize {
        self.cursor.fetch_add(1, Relaxed).wrapping_add(1) % candidates.len()
    }
}

/// The interaction style of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Style {
    /// One instance, one reply awaited.
    Request,
    /// One instance, no reply.
    Notification,
    /// Every subscribed responder of a topic, replies collected until the deadline or
    /// the quorum.
    Gather,
}

/// A call as the public functions hand it to the pipeline.
pub(super) struct Call<'a, T: ?Sized> {
    pub(super) style: Style,
    /// `service.method`, or the topic of a gather.
    pub(super) target: &'a str,
    /// The request, encoded once the call is admitted (a stopped node refuses before any
    /// user serialisation code runs).
    pub(super) req: &'a T,
    /// The caller's deadline; the node's default when `None`.
    pub(super) timeout: Option<Duration>,
    pub(super) version: Option<Version>,
    pub(super) headers: BTreeMap<String, String>,
}

/// What a started call left for its handle to await.
pub(super) enum Started {
    /// A request in flight.
    Reply(Awaiting),
    /// A notification queued.
    Sent,
    /// A gather published.
    Gather(Opened),
}

/// A request waiting for its reply.
pub(super) struct Awaiting {
    id: Id,
    rx: oneshot::Receiver<ReplyResult>,
    deadline: Instant,
    timeout: Duration,
    target: Arc<str>,
    /// Forgets the call when the handle (or the future sending it) is dropped.
    _guard: CallGuard,
}

/// Where a call goes.
enum Route {
    One(Instance),
    All(Vec<(Id, String)>),
}

/// A call admitted, its payload encoded: what the untyped rest of the pipeline needs.
struct Admitted<'a> {
    style: Style,
    target: &'a str,
    payload: Bytes,
    /// The deadline in force (the caller's or the node's default) and when it ends.
    timeout: Duration,
    deadline: Instant,
    /// The caller's own deadline, if it set one.
    asked: Option<Duration>,
    version: Option<Version>,
    headers: BTreeMap<String, String>,
}

impl Core {
    /// Runs `call` through the pipeline: admit, choose, send. See the
    /// [module documentation](self) for the order and where later mechanisms plug in.
    pub(super) async fn call<T: Serialize + ?Sized>(
        &self,
        call: Call<'_, T>,
    ) -> Result<Started, CallError> {
        // Admit. Handlers still draining at shutdown may call out; only a stopped node
        // refuses.
        if self.life.cancel.is_cancelled() {
            return Err(CallError::Shutdown);
        }
        let timeout = call.timeout.unwrap_or(self.default_timeout);
        // A request's deadline runs from here; encoding counts against it.
        let deadline = far_instant_after(timeout);
        let payload = codec::encode_payload(call.req)?;
        // The rest is not generic: one copy of it, whatever the request type.
        self.send(Admitted {
            style: call.style,
            target: call.target,
            payload,
            timeout,
            deadline,
            asked: call.timeout,
            version: call.version,
            headers: call.headers,
        })
        .await
    }

    /// Choose and send.
    async fn send(&self, call: Admitted<'_>) -> Result<Started, CallError> {
        let Admitted {
            timeout,
            deadline,
            payload,
            ..
        } = call;
        // Choose.
        let route = self.choose(call.style, call.target, call.version)?;
        // Send.
        let local = self.membership.local().id;
        let target = call.target;
        match route {
            Route::One(instance) => {
                let kind = match call.style {
                    Style::Request => Kind::Request,
                    _ => Kind::Notification,
                };
                let mut h = Header::new(kind, local, target);
                h.method_version = call.version;
                h.headers = call.headers;
                // A request always carries its deadline; a notification only one the
                // caller set (it becomes the handler's deadline).
                h.deadline_ms = match kind {
                    Kind::Request => Some(timeout.as_millis() as u64),
                    _ => call.asked.map(|t| t.as_millis() as u64),
                };
                let id = h.id;
                let msg = frames::message(&h, payload);
                let awaiting = (kind == Kind::Request).then(|| {
                    let target: Arc<str> = Arc::from(target);
                    let (rx, guard) =
                        self.calls
                            .register(id, instance.conn, target.clone(), timeout, deadline);
                    // From here the guard owns the entry: whether the send below fails,
                    // times out or is cancelled by the caller dropping this future, its
                    // drop removes it.
                    Awaiting {
                        id,
                        rx,
                        deadline,
                        timeout,
                        target,
                        _guard: guard,
                    }
                });
                // Waiting for room in the queue counts against the call's deadline too. A
                // notification has no reply to wait for: its timeout bounds the wait for
                // room alone.
                let send_by = match awaiting {
                    Some(_) => deadline,
                    None => far_instant_after(timeout),
                };
                match tokio::time::timeout_at(send_by, instance.dealer.send(msg)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => {
                        return Err(CallError::Timeout {
                            target: target.to_string(),
                            timeout,
                        })
                    }
                }
                match awaiting {
                    Some(a) => {
                        debug!(target = %target, peer = %instance.id, %id, "request sent");
                        Ok(Started::Reply(a))
                    }
                    None => Ok(Started::Sent),
                }
            }
            Route::All(expected) => {
                let mut h = Header::new(Kind::GatherRequest, local, target);
                h.deadline_ms = Some(timeout.as_millis() as u64);
                h.method_version = call.version;
                let opened = self.gathers.open(h.id, expected);
                // Dropping `opened` (on error) closes the gather again.
                self.pubsub.publish_gather(&h, payload)?;
                Ok(Started::Gather(opened))
            }
        }
    }

    /// The instance (or, for a gather, every responder) a call goes to.
    fn choose(
        &self,
        style: Style,
        target: &str,
        wanted: Option<Version>,
    ) -> Result<Route, CallError> {
        if style == Style::Gather {
            let listening: HashSet<Id> = self.pubsub.subscribers_of(target).into_iter().collect();
            let expected = self
                .membership
                .gather_responders(target, wanted, &listening);
            if expected.is_empty() {
                return Err(CallError::NoResponder(target.to_string()));
            }
            return Ok(Route::All(expected));
        }
        self.membership
            .pick(target, wanted, &*self.balance)
            .map(Route::One)
            .map_err(|incompatible| match (incompatible, wanted) {
                (Some(available), Some(wanted)) => CallError::IncompatibleVersion {
                    target: target.to_string(),
                    wanted,
                    available,
                },
                _ => CallError::NoResponder(target.to_string()),
            })
    }
}

/// A reply envelope as the caller's type, or the remote error it carries.
pub(super) fn decode_reply<Resp: DeserializeOwned>(env: Envelope) -> Result<Resp, CallError> {
    match env.header.kind {
        Kind::ErrorReply => {
            let body: ErrorBody = codec::decode_payload(&env.payload)?;
            Err(CallError::Remote {
                code: body.code,
                message: body.message,
            })
        }
        _ => Ok(codec::decode_payload(&env.payload)?),
    }
}

/// The handle of an asynchronous request. Await [`PendingReply::recv`] or poll
/// [`PendingReply::try_recv`]; dropping it forgets the call (its table entry is freed).
pub struct PendingReply<Resp> {
    call: Awaiting,
    _t: PhantomData<fn() -> Resp>,
}

impl<Resp: DeserializeOwned> PendingReply<Resp> {
    pub(super) fn new(call: Awaiting) -> Self {
        PendingReply {
            call,
            _t: PhantomData,
        }
    }

    /// The request's message id.
    pub fn id(&self) -> Id {
        self.call.id
    }

    /// Waits for the reply until the call's deadline.
    pub async fn recv(mut self) -> Result<Resp, CallError> {
        // The node's deadline sweeper answers with `Timeout` when the deadline passes.
        match (&mut self.call.rx).await {
            Ok(r) => decode_reply(r?),
            Err(_) => Err(CallError::Shutdown),
        }
    }

    /// The reply if it has arrived (`None` while still waiting). After the deadline it
    /// returns the timeout error.
    pub fn try_recv(&mut self) -> Option<Result<Resp, CallError>> {
        match self.call.rx.try_recv() {
            Ok(r) => Some(r.and_then(decode_reply)),
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(CallError::Shutdown)),
            Err(oneshot::error::TryRecvError::Empty) => {
                if Instant::now() >= self.call.deadline {
                    Some(Err(CallError::Timeout {
                        target: self.call.target.to_string(),
                        timeout: self.call.timeout,
                    }))
                } else {
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_goes_round_whatever_the_count() {
        let rr = RoundRobin::default();
        let c = |n: usize| -> Vec<Candidate> {
            (0..n)
                .map(|i| Candidate {
                    id: Id::new(),
                    conn: i as ConnId,
                })
                .collect()
        };
        let three = c(3);
        let picks: Vec<usize> = (0..6).map(|_| rr.choose("x.y", &three)).collect();
        assert_eq!(picks, [1, 2, 0, 1, 2, 0]);
        // One instance: always it.
        assert_eq!(rr.choose("x.y", &c(1)), 0);
    }
}
