//! Inbound routing: every message the node receives, on its ROUTER, its SUB or any of
//! its DEALERs, is decoded here, in one place ([`Core::receive`]), and routed by the
//! socket it came on and its kind to the part that owns it. This is where a check that
//! applies to every envelope goes.
//!
//! ```text
//! ROUTER  REQUEST, NOTIFICATION   → registry (which handler) → respond
//!         HELLO                   → membership (learn, HELLO-ACK)
//!         GATHER-REPLY, ERROR     → gathers (once the sender is checked)
//! DEALER  REPLY, ERROR-REPLY      → calls (complete by correlation id)
//!         HELLO-ACK               → membership
//! SUB     EVENT                   → pubsub (local subscriptions)
//!         GATHER-REQUEST          → registry → respond (reply on our DEALER)
//! ```
//!
//! It also owns the inline dispatchers the sockets call from their connection tasks (no
//! task hop per message), the loops that dispatch what those declined, and the counters
//! of what it rejected. It never runs a handler itself, never keeps a table of its own
//! and never sends anything but what the parts it calls send.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::frames::{self, Framing};
use super::membership::DealerSink;
use super::registry::Table;
use super::respond::ReplyPath;
use super::Core;
use crate::codec::{self, codes, Envelope, Kind};
use crate::transport::{Endpoint, Message, MessageHandler};

/// Where the node finds itself from a socket's inline dispatcher: set once the node is
/// built (the sockets are made first); until then messages are declined.
pub(super) type CoreCell = Arc<OnceLock<Weak<Core>>>;

/// Counters of what inbound routing rejected, and the count of declined messages.
#[derive(Default)]
pub(super) struct Inbound {
    malformed: AtomicU64,
    unexpected: AtomicU64,
    expired: AtomicU64,
}

impl Inbound {
    /// Envelopes (or HELLO payloads) that could not be decoded.
    pub(super) fn malformed(&self) -> u64 {
        self.malformed.load(Relaxed)
    }

    /// Requests and notifications not run: their deadline passed before a handler slot
    /// was free (or they came with `dl: 0`).
    pub(super) fn expired(&self) -> u64 {
        self.expired.load(Relaxed)
    }

    /// Envelopes of a kind not expected on the socket they came on.
    pub(super) fn unexpected(&self) -> u64 {
        self.unexpected.load(Relaxed)
    }

    fn count_malformed(&self) {
        self.malformed.fetch_add(1, Relaxed);
    }

    fn count_unexpected(&self) {
        self.unexpected.fetch_add(1, Relaxed);
    }
}

/// Which socket a message came in on, with what routing it needs.
pub(super) enum Via<'a> {
    /// The ROUTER, from the connection with this identity; a handler slot is held. The
    /// instant is when it arrived, if it waited in the queue since (declined).
    Router(Bytes, OwnedSemaphorePermit, Option<Instant>),
    /// The SUB, from the publisher connection with this identity (with CURVE, the key
    /// it proved); a handler slot is held.
    Sub(OwnedSemaphorePermit, Bytes),
    /// Our DEALER to `endpoint`.
    Dealer(&'a Endpoint),
}

impl Via<'_> {
    fn socket(&self) -> &'static str {
        match self {
            Via::Router(..) => "ROUTER",
            Via::Sub(..) => "SUB",
            Via::Dealer(_) => "DEALER",
        }
    }
}

impl Core {
    /// Decodes a received message and routes it by socket and kind. The one place every
    /// envelope the node receives is decoded.
    pub(super) fn receive(self: &Arc<Self>, via: Via<'_>, msg: &Message) {
        let framing = match via {
            Via::Sub(..) => Framing::Published,
            _ => Framing::Direct,
        };
        let env = match frames::decode(framing, msg) {
            Ok(env) => env,
            Err(e) => {
                self.inbound.count_malformed();
                match via {
                    Via::Dealer(endpoint) => {
                        warn!(error = %e, %endpoint, socket = "DEALER", "malformed envelope, dropped")
                    }
                    Via::Router(ref identity, ..) => {
                        warn!(error = %e, socket = "ROUTER", "malformed envelope");
                        self.answer_malformed(identity, msg, &e);
                    }
                    _ => warn!(error = %e, socket = via.socket(), "malformed envelope, dropped"),
                }
                return;
            }
        };
        if let Err(e) = codec::check_content_type(&env.header) {
            // Replies are the caller's to judge (its call fails with this error).
            if !matches!(via, Via::Dealer(_)) {
                self.inbound.count_malformed();
                warn!(error = %e, socket = via.socket(), kind = ?env.header.kind, "payload not decoded");
                if let (Via::Router(identity, ..), Kind::Request) = (&via, env.header.kind) {
                    let path = ReplyPath::Router(&self.router, identity.clone());
                    self.responder.reply_error(
                        &path,
                        &env.header,
                        codes::BAD_REQUEST,
                        e.to_string(),
                    );
                }
                return;
            }
        }
        match via {
            Via::Router(identity, slot, arrived) => {
                let mut env = env;
                if self.expired_on_arrival(&mut env.header, arrived) {
                    return;
                }
                self.on_router(identity, env, slot)
            }
            Via::Sub(slot, publisher) => self.on_published(env, slot, &publisher),
            Via::Dealer(endpoint) => self.on_dealer(endpoint, env),
        }
    }

    /// Whether a request or notification's deadline passed before its handler could
    /// start (it waited for a slot since `arrived`; `dl: 0` has passed on arrival): the
    /// caller has given up, so it is not run at all, and counted.
    /// Otherwise the deadline is what is left of it: counted from arrival, not from now.
    fn expired_on_arrival(&self, h: &mut codec::Header, arrived: Option<Instant>) -> bool {
        let (Some(dl), Kind::Request | Kind::Notification) = (h.deadline_ms, h.kind) else {
            return false;
        };
        let waited = arrived.map(|a| a.elapsed()).unwrap_or_default();
        let waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
        if waited_ms < dl {
            h.deadline_ms = Some(dl - waited_ms);
            return false;
        }
        self.inbound.expired.fetch_add(1, Relaxed);
        debug!(target = ?h.target, waited = ?waited, deadline_ms = dl, "deadline passed before the handler could start: not run");
        true
    }

    /// A ROUTER message whose envelope does not decode: answered `bad_request` if it can
    /// be correlated at all (its `id` is readable) and may be a request, so that the
    /// caller learns why rather than waiting for its deadline.
    fn answer_malformed(&self, identity: &Bytes, msg: &Message, e: &codec::CodecError) {
        let Some((id, kind)) = msg.frames().first().and_then(|h| codec::salvage_header(h)) else {
            return;
        };
        if !matches!(kind, None | Some(1)) {
            return;
        }
        let to = codec::Header {
            id,
            ..Default::default()
        };
        let path = ReplyPath::Router(&self.router, identity.clone());
        self.responder
            .reply_error(&path, &to, codes::BAD_REQUEST, e.to_string());
    }

    fn on_router(self: &Arc<Self>, identity: Bytes, env: Envelope, slot: OwnedSemaphorePermit) {
        let h = &env.header;
        let reply_to = |identity| ReplyPath::Router(&self.router, identity);
        // Secured: whatever comes on a connection is the node's whose key it proved (a
        // handler's `Context::sender` can be trusted); another sender is refused. (A
        // HELLO is judged by the id it carries, in `on_hello`.)
        if self.membership.is_secured()
            && h.kind != Kind::Hello
            && self
                .router
                .peer_key(&identity)
                .is_none_or(|k| crate::codec::Id::of_key(&k) != h.sender)
        {
            self.inbound.count_unexpected();
            warn!(sender = %h.sender, kind = ?h.kind, "sent in another node's name, refused");
            if h.kind == Kind::Request {
                let msg = "the sender is not the node this connection's key proves";
                self.responder.reply_error(
                    &reply_to(identity.clone()),
                    h,
                    codes::BAD_REQUEST,
                    msg.into(),
                );
            }
            return;
        }
        if h.version != codec::VERSION_MAJOR {
            let msg = format!(
                "envelope version {} is not supported (this node speaks {})",
                h.version,
                codec::VERSION_MAJOR
            );
            warn!(node = %self.membership.local().name, version = h.version, "unsupported envelope version");
            // Answered only if it is a request: nothing else is ever answered.
            if h.kind == Kind::Request {
                self.responder
                    .reply_error(&reply_to(identity), h, codes::UNSUPPORTED_VERSION, msg);
            }
            return;
        }
        match h.kind {
            Kind::Request | Kind::Notification => {
                let is_request = h.kind == Kind::Request;
                let path = reply_to(identity);
                // A node that is stopping still answers hand-over questions: its keys'
                // handlers are finishing, and the new owners wait for exactly that.
                if self.responder.is_draining() && !super::respond::is_handover(h) {
                    if is_request {
                        let msg = "node is shutting down".into();
                        self.responder
                            .reply_error(&path, h, codes::SHUTTING_DOWN, msg);
                    }
                    return;
                }
                match self
                    .registry
                    .lookup(Table::Methods, &h.target, h.method_version)
                {
                    Ok(handler) => self.responder.respond(handler, env, path, slot),
                    Err(body) if is_request => {
                        self.responder
                            .reply_error(&path, h, &body.code, body.message)
                    }
                    Err(body) => {
                        warn!(target = ?h.target, reason = ?body.message, "notification not handled")
                    }
                }
            }
            Kind::Hello => {
                if let Err(e) = self
                    .membership
                    .on_hello(&self.router, &identity, h, &env.payload)
                {
                    self.inbound.count_malformed();
                    warn!(error = %e, "malformed HELLO");
                }
            }
            Kind::GatherReply | Kind::ErrorReply => {
                // Only the node that introduced itself on this connection may answer as
                // itself: a forged sender id could otherwise end a gather early.
                if self.membership.introduced_as(&identity) != Some(h.sender) {
                    self.inbound.count_unexpected();
                    debug!(sender = %h.sender, "gather reply from a connection that is not its sender's, dropped");
                    return;
                }
                self.gathers.deliver(env);
            }
            Kind::Cancel => {
                if !self.responder.cancel(&identity, h.correlation_id) {
                    debug!(cid = %h.correlation_id, "CANCEL for nothing running here (done already)");
                }
            }
            Kind::Unknown(k) => self.responder.reply_error(
                &reply_to(identity),
                h,
                codes::UNSUPPORTED_KIND,
                format!("envelope kind {k} is not supported"),
            ),
            _ => {
                self.inbound.count_unexpected();
                warn!(kind = ?h.kind, "unexpected envelope kind on the ROUTER, dropped");
            }
        }
    }

    fn on_dealer(self: &Arc<Self>, endpoint: &Endpoint, env: Envelope) {
        match env.header.kind {
            Kind::Reply | Kind::ErrorReply => {
                let correlation = env.header.correlation_id;
                self.calls.complete(&correlation, env);
            }
            Kind::HelloAck => {
                if let Err(e) = self
                    .membership
                    .on_hello_ack(endpoint, &env.header, &env.payload)
                {
                    self.inbound.count_malformed();
                    warn!(error = %e, "malformed HELLO-ACK");
                }
            }
            other => {
                self.inbound.count_unexpected();
                warn!(kind = ?other, %endpoint, "unexpected envelope kind on a DEALER, dropped");
            }
        }
    }

    fn on_published(
        self: &Arc<Self>,
        env: Envelope,
        slot: OwnedSemaphorePermit,
        publisher: &Bytes,
    ) {
        // Secured: an event or a gather request is the node's whose key its connection
        // proved, whatever its header says.
        if self.membership.is_secured()
            && !<[u8; 32]>::try_from(&publisher[..])
                .is_ok_and(|k| crate::codec::Id::of_key(&k) == env.header.sender)
        {
            self.inbound.count_unexpected();
            warn!(sender = %env.header.sender, "published in another node's name, dropped");
            return;
        }
        match env.header.kind {
            Kind::Event => self.pubsub.deliver(env),
            Kind::GatherRequest => {
                let h = &env.header;
                if h.sender == self.membership.local().id || self.responder.is_draining() {
                    return;
                }
                // No handler here (we only subscribed to the prefix for events): stay
                // silent. The gatherer does not expect us, and an error reply would count.
                let Ok(handler) = self
                    .registry
                    .lookup(Table::Gathers, &h.target, h.method_version)
                else {
                    return;
                };
                let Some(dealer) = self.membership.dealer_of(&h.sender) else {
                    debug!(sender = %h.sender, "gather request from an unknown node ignored");
                    return;
                };
                self.responder
                    .respond(handler, env, ReplyPath::Dealer(dealer), slot);
            }
            other => {
                self.inbound.count_unexpected();
                warn!(kind = ?other, "unexpected envelope kind on the SUB, dropped");
            }
        }
    }

    /// A handler slot for a message offered to an inline dispatcher, or `None` to
    /// decline it: when the node is stopping, or when no slot is free (backpressure). A
    /// declined message waits in its connection's lane of the socket's queue; the socket
    /// offers that connection's later messages to no dispatcher until it has been taken
    /// and dispatched (see `transport::inbox::Taken`), so each connection's order holds,
    /// while other connections' messages go on being dispatched inline.
    fn inline_slot(&self) -> Option<OwnedSemaphorePermit> {
        if self.life.cancel.is_cancelled() {
            return None;
        }
        self.responder.try_slot()
    }
}

/// An inline dispatcher for the ROUTER (`router`) or the SUB: runs on the connection
/// task that received the message, and declines (the message then waits for its loop)
/// when the node is not ready or [`Core::inline_slot`] says so.
fn inline_handler(cell: CoreCell, router: bool) -> MessageHandler {
    Arc::new(move |identity: &Bytes, msg: Message| {
        let Some(core) = cell.get().and_then(Weak::upgrade) else {
            return Err(msg);
        };
        let Some(slot) = core.inline_slot() else {
            return Err(msg);
        };
        let via = if router {
            Via::Router(identity.clone(), slot, None)
        } else {
            Via::Sub(slot, identity.clone())
        };
        core.receive(via, &msg);
        Ok(())
    })
}

/// The ROUTER's inline dispatcher: requests, notifications, HELLOs, gather replies.
pub(super) fn router_handler(cell: CoreCell) -> MessageHandler {
    inline_handler(cell, true)
}

/// The SUB's inline dispatcher: events and gather requests.
pub(super) fn subscriber_handler(cell: CoreCell) -> MessageHandler {
    inline_handler(cell, false)
}

/// Where every DEALER's messages go: replies and HELLO-ACKs, never declined (they need
/// no handler slot).
pub(super) fn dealer_sink(cell: CoreCell) -> DealerSink {
    Arc::new(move |endpoint: &Endpoint, msg: Message| {
        if let Some(core) = cell.get().and_then(Weak::upgrade) {
            core.receive(Via::Dealer(endpoint), &msg);
        }
    })
}

/// Dispatches what the ROUTER's (`router`) or the SUB's inline dispatcher declined,
/// waiting for handler slots, until `cancel` fires. The socket hands them over one
/// connection after the other (each connection has its own lane), so a connection that
/// keeps many waiting delays another's by at most one of its messages per turn.
pub(super) async fn declined_loop(core: Weak<Core>, cancel: CancellationToken, router: bool) {
    loop {
        let Some(strong) = core.upgrade() else {
            return;
        };
        let next = async {
            if router {
                strong
                    .router
                    .recv_declined()
                    .await
                    .map(|(id, m, at, taken)| (Ok((id, at)), m, taken))
            } else {
                strong
                    .subscriber
                    .recv_declined()
                    .await
                    .map(|(publisher, m, taken)| (Err(publisher), m, taken))
            }
        };
        let got = tokio::select! {
            _ = cancel.cancelled() => return,
            r = next => r,
        };
        // `_taken` keeps this connection's later messages queued behind this one until
        // it is dispatched (dropped at the end of the turn).
        let Ok((identity, msg, _taken)) = got else {
            return;
        };
        let slot = tokio::select! {
            _ = cancel.cancelled() => return,
            s = strong.responder.slot() => match s { Some(s) => s, None => return },
        };
        let via = match identity {
            Ok((id, arrived)) => Via::Router(id, slot, arrived),
            Err(publisher) => Via::Sub(slot, publisher),
        };
        strong.receive(via, &msg);
    }
}
