//! The call pipeline: the one path every outgoing call takes, whatever its style
//! (request, asynchronous request, notification, gather).
//!
//! ```text
//!          (fallback: fallback.rs, around everything)
//!          (retry: retry.rs, around admit..await, one deadline, same message id)
//! admit    the node still takes calls; the deadline fixed (call's, service's, node's;
//!          capped by a handler's own); the payload encoded; a bulkhead place taken
//! choose   instances whose breaker refuses left out; the shard key's instance
//!          (rendezvous), else the balancing policy (call's, service's, node's) picks
//!          one, or for a gather every expected responder;
//!          the chosen one's breaker permit taken
//! send     header filled, correlation registered (calls / gathers),
//!          queued on the chosen connection under the call's deadline
//! await    the caller's handle: PendingReply, Gather (CANCEL sent if it gives up)
//! ```
//!
//! This module owns that order (ARCHITECTURE.md, "Resilience", says why it is this
//! one). It never touches a socket's internals, never reads a reply off the wire
//! (inbound routing hands replies to `calls`), and never decides who is connected (the
//! membership does).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::time::Instant;
use tracing::debug;

use super::balance::{Balance, Rendezvous};
use super::breaker;
use super::calls::{far_instant, far_instant_after, Awaiting, Canceller, Ending, InFlight};
use super::gather::Opened;
use super::membership::Instance;
use super::membership::NotPicked;
use super::{frames, Balancing, CallError, CallOptions, Core};
use crate::codec::{self, Header, Id, Kind, MessageType, Version};

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
    /// The request already encoded (a delivery from the outbox, encoded when it was
    /// accepted): used instead of `req`.
    pub(super) encoded: Option<Bytes>,
    /// The caller's deadline; its service's, else the node's default, when `None`
    /// (gathers: the node's).
    pub(super) timeout: Option<Duration>,
    pub(super) version: Option<Version>,
    pub(super) carried: Carried,
    /// The message id to use (a retry keeps its first attempt's); a new one if `None`.
    pub(super) id: Option<Id>,
    /// Instances to avoid if another serves the target (those a retry already tried).
    pub(super) avoid: Vec<Id>,
    /// The call's own settings of the breaker, bulkhead and balancing.
    pub(super) guards: Guards,
    /// When the call began: one reading of the clock serves the whole pipeline (its
    /// deadline, its breaker's window), where each step reading its own would cost a
    /// system-clock read apiece on the path every call takes.
    pub(super) now: Instant,
}

/// What a call's header carries for its receiver beyond the pipeline's own fields (see
/// [`CallOptions`]).
#[derive(Debug, Clone, Default)]
pub(super) struct Carried {
    pub(super) headers: BTreeMap<String, String>,
    /// Also what the instance is chosen by (rendezvous hashing, `balance`).
    pub(super) shard_key: Option<String>,
    pub(super) message_type: Option<MessageType>,
}

impl Carried {
    /// A copy of what `opts` carries (a retry sends it again).
    pub(super) fn of(opts: &CallOptions) -> Carried {
        Carried {
            headers: opts.headers.clone(),
            shard_key: opts.shard_key.clone(),
            message_type: opts.message_type,
        }
    }

    /// What `opts` carries, taken out of it (a call made once).
    pub(super) fn take(opts: &mut CallOptions) -> Carried {
        Carried {
            headers: std::mem::take(&mut opts.headers),
            shard_key: opts.shard_key.take(),
            message_type: opts.message_type,
        }
    }
}

/// Refuses a shard key longer than [`codec::MAX_SHARD_KEY`] (receivers would refuse it).
pub(super) fn check_shard_key(key: Option<&str>) -> Result<(), CallError> {
    match key {
        Some(k) if k.len() > codec::MAX_SHARD_KEY => {
            Err(CallError::Codec(codec::CodecError::Encode(format!(
                "a shard key of {} bytes (at most {})",
                k.len(),
                codec::MAX_SHARD_KEY
            ))))
        }
        _ => Ok(()),
    }
}

/// Refuses headers a node reserves for itself (`x-peerwire-handover`: a message carrying
/// it would be taken for a hand-over question, and no handler would run for it).
pub(super) fn check_headers(headers: &BTreeMap<String, String>) -> Result<(), CallError> {
    match headers.contains_key(super::respond::HANDOVER) {
        true => Err(CallError::Codec(codec::CodecError::Encode(format!(
            "the header {:?} is reserved for the node itself",
            super::respond::HANDOVER
        )))),
        false => Ok(()),
    }
}

/// A call's own settings of the mechanisms inside the pipeline (see [`CallOptions`]).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Guards {
    pub(super) balancing: Option<Balancing>,
    pub(super) bypass_breaker: bool,
    pub(super) fail_fast: bool,
    /// A key's hand-over question (`respond/keyed.rs`): no bulkhead place, and leaving
    /// instances are candidates like the others (the one it asks may be leaving).
    pub(super) question: bool,
}

impl Guards {
    pub(super) fn of(opts: &CallOptions) -> Guards {
        Guards {
            balancing: opts.balancing,
            bypass_breaker: opts.bypass_breaker,
            fail_fast: opts.fail_fast,
            question: false,
        }
    }
}

/// What a started call left for its handle to await.
pub(super) enum Started {
    /// A request in flight, and the instance it went to.
    Reply(Awaiting, Id),
    /// A notification queued.
    Sent,
    /// A gather published.
    Gather(Opened),
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
    /// The deadline in force (the caller's, its service's or the node's, capped by a
    /// handler's own) and when it ends.
    timeout: Duration,
    deadline: Instant,
    /// The caller's own deadline, if it set one.
    asked: Option<Duration>,
    version: Option<Version>,
    carried: Carried,
    bulkhead: Option<tokio::sync::OwnedSemaphorePermit>,
    id: Option<Id>,
    avoid: Vec<Id>,
    guards: Guards,
    now: Instant,
}

impl Core {
    /// Sends a request through the pipeline: the pending call and the instance it went to.
    pub(super) async fn request<T: Serialize + ?Sized>(
        &self,
        call: Call<'_, T>,
    ) -> Result<(Awaiting, Id), CallError> {
        match self.call(call).await? {
            Started::Reply(awaiting, instance) => Ok((awaiting, instance)),
            _ => unreachable!("a request awaits its reply"),
        }
    }

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
        if call.style == Style::Gather {
            super::pubsub::check_topic(call.target)?;
        }
        check_shard_key(call.carried.shard_key.as_deref())?;
        if !call.guards.question {
            check_headers(&call.carried.headers)?;
        }
        let asked = call.timeout;
        let mut timeout = match call.style {
            Style::Gather => self.policies.node_timeout(call.timeout),
            _ => self.policies.timeout(call.target, call.timeout),
        };
        // Inside a handler, a call never outlives the handler's own deadline: its caller
        // will have given up by then.
        if let Some(d) = super::registry::inherited_deadline() {
            let left = d.saturating_duration_since(call.now);
            if left.is_zero() {
                return Err(CallError::Timeout {
                    target: call.target.to_string(),
                    timeout: left,
                });
            }
            timeout = timeout.min(left);
        }
        // A request's deadline runs from here; encoding counts against it.
        let deadline = far_instant(call.now, timeout);
        let payload = match call.encoded {
            Some(b) => b,
            None => codec::encode_payload(call.req)?,
        };
        // A request takes a place in its service's bulkhead first (waiting counts
        // against its deadline), kept until it ends.
        let bulkhead = match call.style {
            Style::Request if !call.guards.question => {
                self.bulkheads
                    .admit(call.target, deadline, call.guards.fail_fast)
                    .await?
            }
            _ => None,
        };
        // A place in a bulkhead may have been waited for: the breaker's window (and its
        // slow-call clock) starts from now, not from before the wait, or our own queueing
        // would count against the instance.
        let now = match bulkhead {
            Some(_) => Instant::now(),
            None => call.now,
        };
        // The rest is not generic: one copy of it, whatever the request type.
        self.send(Admitted {
            style: call.style,
            target: call.target,
            payload,
            timeout,
            deadline,
            asked,
            version: call.version,
            carried: call.carried,
            bulkhead,
            id: call.id,
            avoid: call.avoid,
            guards: call.guards,
            now,
        })
        .await
    }

    /// Choose and send.
    async fn send(&self, mut call: Admitted<'_>) -> Result<Started, CallError> {
        // Choose.
        let route = self.choose(&call)?;
        let (timeout, deadline) = (call.timeout, call.deadline);
        let payload = std::mem::take(&mut call.payload);
        let bulkhead = call.bulkhead.take();
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
                if let Some(id) = call.id {
                    h.id = id;
                }
                h.method_version = call.version;
                h.headers = call.carried.headers;
                h.shard_key = call.carried.shard_key;
                h.message_type = call.carried.message_type;
                // A request always carries its deadline; a notification only one the
                // caller set (it becomes the handler's deadline).
                h.deadline_ms = match kind {
                    Kind::Request => Some(timeout.as_millis() as u64),
                    _ => call.asked.map(|t| t.as_millis() as u64),
                };
                let id = h.id;
                // The chosen instance's breaker lets this call through (and learns how it
                // went), or refuses it after all (its last probe was just taken).
                let ticket = if call.guards.bypass_breaker {
                    None
                } else {
                    self.breakers
                        .acquire(breaker::service_of(target), instance.id, call.now)
                        .map_err(|_| CallError::BreakerOpen(target.to_string()))?
                };
                let msg = frames::message(&h, payload);
                // From here `awaiting` owns the entry: whether the send below fails, times
                // out or is cancelled by the caller dropping this future, its drop
                // removes it.
                let awaiting = (kind == Kind::Request).then(|| {
                    self.calls.register(
                        id,
                        instance.conn,
                        Arc::from(target),
                        timeout,
                        deadline,
                        Ending {
                            canceller: Canceller {
                                dealer: Arc::downgrade(&instance.dealer),
                                local,
                            },
                            ticket,
                            in_flight: Some(InFlight::new(instance.outstanding.clone())),
                            bulkhead,
                        },
                    )
                });
                // Its connection may have dropped since it was chosen, before the call was
                // registered (so the membership, failing that connection's calls, missed
                // it): fail it now rather than let it wait for a reconnection until its
                // deadline. (A drop after registering fails it through the membership.)
                if awaiting.is_some() && !instance.dealer.is_connected() {
                    return Err(CallError::Disconnected(
                        instance.dealer.endpoint().to_string(),
                    ));
                }
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
                        debug!(target = ?target, peer = %instance.id, %id, "request sent");
                        Ok(Started::Reply(a, instance.id))
                    }
                    None => Ok(Started::Sent),
                }
            }
            Route::All(expected) => {
                let mut h = Header::new(Kind::GatherRequest, local, target);
                h.deadline_ms = Some(timeout.as_millis() as u64);
                h.method_version = call.version;
                // Every responder answers: there is no instance for a key to choose.
                h.headers = call.carried.headers;
                h.message_type = call.carried.message_type;
                let opened = self.gathers.open(h.id, expected);
                // Dropping `opened` (on error) closes the gather again.
                self.pubsub.publish_gather(&h, payload)?;
                Ok(Started::Gather(opened))
            }
        }
    }

    /// The instance (or, for a gather, every responder) a call goes to.
    fn choose(&self, call: &Admitted<'_>) -> Result<Route, CallError> {
        let (target, wanted) = (call.target, call.version);
        if call.style == Style::Gather {
            let listening: HashSet<Id> = self.pubsub.subscribers_of(target).into_iter().collect();
            let expected = self
                .membership
                .gather_responders(target, wanted, &listening);
            if expected.is_empty() {
                return Err(CallError::NoResponder(target.to_string()));
            }
            return Ok(Route::All(expected));
        }
        let refusing = match call.guards.bypass_breaker {
            true => Vec::new(),
            false => self
                .breakers
                .refusing(breaker::service_of(target), call.now),
        };
        // A shard key decides by itself: the same key, the same instance.
        let by_key = call
            .carried
            .shard_key
            .as_deref()
            .map(|key| Rendezvous { key });
        let balance: &dyn Balance = match &by_key {
            Some(r) => r,
            None => self.policies.balance(target, call.guards.balancing),
        };
        let mut skip = refusing.clone();
        skip.extend_from_slice(&call.avoid);
        // Instances to avoid are avoided only while another is there.
        self.membership
            .pick(target, wanted, balance, &skip, call.guards.question)
            .or_else(|_| {
                self.membership
                    .pick(target, wanted, balance, &refusing, call.guards.question)
            })
            .map(Route::One)
            .map_err(|why| match (why, wanted) {
                (NotPicked::Incompatible(available), Some(wanted)) => {
                    CallError::IncompatibleVersion {
                        target: target.to_string(),
                        wanted,
                        available,
                    }
                }
                (NotPicked::BreakersOpen, _) => {
                    self.breakers.note_refused();
                    CallError::BreakerOpen(target.to_string())
                }
                _ => CallError::NoResponder(target.to_string()),
            })
    }
}
