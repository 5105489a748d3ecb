//! The node runtime: what a service embeds.
//!
//! A [`Node`] owns one ROUTER (requests, notifications, gather replies and HELLOs come in
//! there), one PUB (its events and gather requests go out there), one SUB (connected to
//! every peer's PUB) and one DEALER per peer ROUTER (its requests go out there, their
//! replies come back on it). It keeps a peer table from the HELLOs nodes exchange, a
//! registry of typed handlers, and the tables of calls waiting for replies.
//!
//! ```
//! use peerwire::{ClusterSecret, HandlerError, Node, Version};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct CreateOrder { item: String, qty: u32 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Who may join: holders of this secret (or listed keys; or `insecure()`).
//! let secret = ClusterSecret::generate();
//! let orders = Node::builder("orders").cluster_secret(secret.clone()).start().await?;
//! orders.handle("orders.create", Version::new(1, 0), |req: CreateOrder, _ctx| async move {
//!     if req.qty == 0 {
//!         return Err(HandlerError::new("invalid_qty", "quantity must be positive"));
//!     }
//!     Ok(format!("{} × {}", req.qty, req.item))
//! });
//!
//! let client = Node::builder("client")
//!     .cluster_secret(secret)
//!     .peer(orders.endpoint())
//!     .start()
//!     .await?;
//! client.wait_for_service("orders.create", 1, std::time::Duration::from_secs(5)).await;
//! let reply: String = client
//!     .request("orders.create", &CreateOrder { item: "book".into(), qty: 2 })
//!     .await?;
//! assert_eq!(reply, "2 × book");
//! client.shutdown().await;
//! orders.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! This file is the facade: [`Node`]'s methods delegate to the parts, each of which owns
//! its state and its lock (ARCHITECTURE.md has the map):
//!
//! - `builder`: [`NodeBuilder`], which binds the sockets and wires the parts together;
//! - `pipeline`: the one path of every outgoing call (admit, choose, send, await);
//! - `balance`: the seam where an instance is chosen (round robin by default);
//! - `calls`: pending calls and their deadlines, indexed by connection, and the
//!   caller's end ([`PendingReply`]);
//! - `inbound`: every envelope received, decoded once and routed by socket and kind;
//! - `respond`: running a handler and sending its reply (requests and gathers);
//! - `registry`: handlers and the catalog; `pubsub`; `gather`;
//! - `membership`: HELLO, the peer table, presence, the discovery loops;
//! - `frames`: where envelopes become transport messages and back.
//!
//! The node never touches bytes on the wire (that is [`crate::codec`] and
//! [`crate::transport`]) and never blocks a socket loop on a handler: a handler is
//! polled once where its request arrives (most finish there, with no task hop) and, if
//! it awaits, goes on in its own task under the caller's deadline.

mod admission;
mod balance;
mod breaker;
mod builder;
mod bulkhead;
mod calls;
mod cluster_secret;
mod error;
mod fallback;
mod frames;
mod gather;
mod inbound;
mod ipc;
mod keygate;
mod membership;
mod options;
mod outbox;
mod pipeline;
mod policy;
mod pubsub;
mod registry;
mod respond;
mod retry;
mod security;
mod stats;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::codec::{self, Id, Version};
use crate::transport::{Endpoint, PublishReport, Publisher, Router, Subscriber};

pub use balance::Balancing;
pub use breaker::{BreakerConfig, BreakerEvent, BreakerState};
pub use builder::NodeBuilder;
pub use bulkhead::BulkheadConfig;
pub use calls::PendingReply;
pub use cluster_secret::ClusterSecret;
pub use error::{CallError, NodeError};
pub use fallback::Answer;
pub use gather::{Gather, GatherEnd, GatherOptions, GatherOutcome, GatherReply};
pub use membership::{MembershipLimits, PeerInfo, Presence, PresenceEvent, Rate};
pub use options::CallOptions;
pub use outbox::{
    read_outbox, DeliveryOptions, OutboxConfig, OutboxStats, Receipt, Stage, Undelivered,
};
pub use policy::ServicePolicy;
pub use pubsub::{Event, Publishing, Subscription};
pub use registry::{Context, HandlerError};
pub use stats::NodeStats;

use calls::Calls;
use gather::Gathers;
use inbound::Inbound;
use membership::Membership;
use pipeline::{Call, Carried, Guards, Started, Style};
use pubsub::PubSub;
use registry::{erase, Registry, Table};
use respond::Responder;

/// How long a stopping node waits for its peers to acknowledge that it is leaving.
const LEAVE_ACK_WAIT: Duration = Duration::from_secs(1);
/// A stopping node stops taking work once no request has arrived for this long, or
/// `QUIET_AT_MOST` (at most half its drain timeout) has passed: callers that cannot go
/// elsewhere (a sole instance) or do not know (plain clients) keep sending, and a request
/// refused then is answered `shutting_down`, which any caller may send elsewhere.
const QUIET_BEFORE_STOP: Duration = Duration::from_millis(50);
const QUIET_AT_MOST: Duration = Duration::from_millis(500);

/// The node's tasks and the tokens that end them.
#[derive(Clone)]
struct Lifecycle {
    /// Cancelled when the node stops: every loop ends on it.
    cancel: CancellationToken,
    /// Cancelled when shutdown starts (before the drain): discovery says goodbye then.
    leave: CancellationToken,
    /// Every task the node spawns, but handlers (which `respond` tracks).
    tasks: TaskTracker,
}

/// The parts of a node, wired together. Each part owns its state (private fields, its
/// own lock); this struct only holds them, the sockets they share and the call seam.
struct Core {
    life: Lifecycle,
    /// The node's defaults and the per-service policies (deadline, retries, balancing).
    policies: policy::Policies,
    drain_timeout: Duration,
    router: Arc<Router>,
    publisher: Arc<Publisher>,
    subscriber: Arc<Subscriber>,
    calls: Arc<Calls>,
    registry: Arc<Registry>,
    membership: Arc<Membership>,
    /// One circuit breaker per service instance called.
    breakers: Arc<breaker::Breakers>,
    /// A bound on the requests in flight per service.
    bulkheads: bulkhead::Bulkheads,
    /// What retries may still be made.
    retry_budget: retry::RetryBudget,
    /// Per-service fallbacks.
    fallbacks: fallback::Fallbacks,
    pubsub: Arc<PubSub>,
    gathers: Arc<Gathers>,
    responder: Responder,
    inbound: Inbound,
    /// Messages given for at-least-once delivery ([`Node::deliver`]).
    outbox: Arc<outbox::Outbox>,
    /// Set once the node has stopped (see `shutdown`).
    stopped: tokio::sync::OnceCell<()>,
}

impl Core {
    /// Stops the node gracefully: it tells its peers it is leaving (and says goodbye
    /// on mDNS), so they send new calls elsewhere; it serves what they sent before they
    /// knew, until requests stop coming; then it stops taking work (late requests are
    /// answered `shutting_down`), lets the handlers in flight finish, and closes. All of
    /// it within the drain timeout.
    async fn shutdown(&self) {
        // Once, whoever asks first; others wait for it.
        self.stopped.get_or_init(|| self.stop()).await;
    }

    async fn stop(&self) {
        let started = tokio::time::Instant::now();
        let until = calls::far_instant_after(self.drain_timeout);
        self.life.leave.cancel();
        let told = self
            .membership
            .leave(LEAVE_ACK_WAIT.min(self.drain_timeout))
            .await;
        if !told {
            debug!(node = %self.membership.local().name, "not every peer acknowledged that we are leaving");
        }
        // Requests a peer sent before it knew are on their way; a node that serves
        // nothing has none coming.
        if !self.registry.catalog().methods.is_empty() {
            let quiet_until = started + (self.drain_timeout / 2).min(QUIET_AT_MOST);
            self.responder
                .wait_quiet(QUIET_BEFORE_STOP, quiet_until)
                .await;
        }
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if !self.responder.drain(left).await {
            warn!(node = %self.membership.local().name, "handlers still running after the drain timeout");
        }
        // What the outbox holds goes out while the drain allows.
        self.outbox.drain(until).await;
        self.life.cancel.cancel();
        self.outbox.close().await;
        self.pubsub.stop();
        self.calls.fail_all(|| CallError::Shutdown);
        self.gathers.clear();
        self.membership.close().await;
        self.router.shutdown().await;
        self.publisher.shutdown().await;
        self.subscriber.shutdown().await;
        self.life.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.life.tasks.wait()).await;
    }
}

/// A peerwire node. See the [module documentation](self).
///
/// Dropping a node stops it without draining; [`Node::shutdown`] drains first.
pub struct Node {
    core: Arc<Core>,
}

impl Node {
    /// A builder for a node called `name`.
    pub fn builder(name: impl Into<String>) -> NodeBuilder {
        NodeBuilder::new(name.into())
    }

    /// This node's id.
    pub fn id(&self) -> Id {
        self.core.membership.local().id
    }

    /// A secured node's public key (see [`NodeBuilder::secure`]); its id is derived
    /// from it. `None` for a node without CURVE.
    pub fn public_key(&self) -> Option<[u8; 32]> {
        self.core.membership.local().key
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.core.membership.local().name
    }

    /// The endpoint of this node's ROUTER (`tcp://host:port`), for other nodes' `peer(...)`.
    pub fn endpoint(&self) -> String {
        Endpoint::from_addr(self.core.router.local_addr()).to_string()
    }

    /// The endpoint of this node's PUB (`tcp://host:port`).
    pub fn pub_endpoint(&self) -> String {
        Endpoint::from_addr(self.core.publisher.local_addr()).to_string()
    }

    /// Connects to another node's ROUTER endpoint (as `NodeBuilder::peer` does at start).
    pub fn add_peer(&self, endpoint: &str) -> Result<(), NodeError> {
        self.core
            .membership
            .dial(&Endpoint::parse(endpoint)?, membership::NamedBy::Direct)?;
        Ok(())
    }

    /// Registers a typed handler for `target` (`service.method`) at `version`, for
    /// requests and notifications. Peers learn of it at once (a new HELLO goes out).
    pub fn handle<Req, Resp, F, Fut>(&self, target: &str, version: Version, f: F)
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(Req, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, HandlerError>> + Send + 'static,
    {
        self.core
            .registry
            .insert(Table::Methods, target, version, erase(f));
        self.core.membership.announce();
    }

    /// Registers a typed responder for gather requests published on `topic`.
    pub fn handle_gather<Req, Resp, F, Fut>(&self, topic: &str, version: Version, f: F)
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(Req, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, HandlerError>> + Send + 'static,
    {
        self.core
            .registry
            .insert(Table::Gathers, topic, version, erase(f));
        // Gather requests travel on the PUB: we must be subscribed to the topic.
        self.core.subscriber.subscribe(topic.to_string());
        self.core.membership.announce();
    }

    /// The peers known now.
    pub fn peers(&self) -> Vec<PeerInfo> {
        self.core.membership.peers()
    }

    /// Joined / updated / left events: first a `Joined` for every peer reachable now,
    /// then every change as it happens.
    pub fn presence(&self) -> Presence {
        self.core.membership.presence()
    }

    /// Waits until at least `n` connected peers serve `target`, or `within` passes.
    /// Returns whether they do.
    pub async fn wait_for_service(&self, target: &str, n: usize, within: Duration) -> bool {
        self.core
            .membership
            .wait_for_service(target, n, within)
            .await
    }

    /// Waits until at least `n` peers are known, or `within` passes.
    pub async fn wait_for_peers(&self, n: usize, within: Duration) -> bool {
        self.core.membership.wait_for_peers(n, within).await
    }

    /// Waits until every peer endpoint dialled so far (static peers, and those gossip
    /// and discovery named) has been tried: its node answered our HELLO, or a connection
    /// attempt failed. Returns whether that happened within `within`. What
    /// [`Node::peers`] says is then as complete as it will get without waiting for changes.
    pub async fn wait_settled(&self, within: Duration) -> bool {
        self.core.membership.wait_settled(within).await
    }

    /// Endpoints dialled where no peer answers, each with why the last attempt failed
    /// (connection refused, say).
    pub fn unreachable(&self) -> Vec<(Endpoint, String)> {
        self.core.membership.unreachable()
    }

    /// The circuit breakers' state changes (see [`BreakerConfig`]).
    pub fn breaker_events(&self) -> tokio::sync::broadcast::Receiver<BreakerEvent> {
        self.core.breakers.events()
    }

    /// Peers subscribed now to our events on `topic` (their SUB filter matches it).
    pub fn subscribers_of(&self, topic: &str) -> Vec<Id> {
        self.core.pubsub.subscribers_of(topic)
    }

    /// Request/response: sends `req` to one instance of `target` and awaits the typed
    /// reply under the node's default deadline.
    pub async fn request<Req, Resp>(&self, target: &str, req: &Req) -> Result<Resp, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.request_with(target, req, CallOptions::default()).await
    }

    /// [`Node::request`] with options (deadline, version, headers).
    pub async fn request_with<Req, Resp>(
        &self,
        target: &str,
        req: &Req,
        opts: CallOptions,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let retries = self.core.policies.retries(target, &opts);
        retry::request(&self.core, target, req, opts, retries).await
    }

    /// Asynchronous request/response: returns as soon as the request is queued; the
    /// reply is awaited ([`PendingReply::recv`]) or polled ([`PendingReply::try_recv`])
    /// later. Dropping the handle forgets the call.
    pub async fn request_async<Req, Resp>(
        &self,
        target: &str,
        req: &Req,
    ) -> Result<PendingReply<Resp>, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.request_async_with(target, req, CallOptions::default())
            .await
    }

    /// [`Node::request_async`] with options.
    pub async fn request_async_with<Req, Resp>(
        &self,
        target: &str,
        req: &Req,
        opts: CallOptions,
    ) -> Result<PendingReply<Resp>, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let (awaiting, _) = self
            .core
            .request(call(Style::Request, target, req, opts))
            .await?;
        Ok(PendingReply::new(awaiting))
    }

    /// One-way notification to exactly one instance of `target`. Returns once queued;
    /// fails at once if no instance is known.
    pub async fn notify<T: Serialize + ?Sized>(
        &self,
        target: &str,
        msg: &T,
    ) -> Result<(), CallError> {
        self.notify_with(target, msg, CallOptions::default()).await
    }

    /// [`Node::notify`] with options (version, headers; the timeout is carried as the
    /// handler's deadline).
    pub async fn notify_with<T: Serialize + ?Sized>(
        &self,
        target: &str,
        msg: &T,
        opts: CallOptions,
    ) -> Result<(), CallError> {
        self.core
            .call(call(Style::Notification, target, msg, opts))
            .await
            .map(|_| ())
    }

    /// Publishes an event on `topic` to every subscribed peer. Each topic has its own
    /// sequence number, so subscribers can count what they missed.
    pub fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        event: &T,
    ) -> Result<PublishReport, CallError> {
        if self.core.pubsub.is_stopped() {
            return Err(CallError::Shutdown);
        }
        pubsub::check_topic(topic)?;
        let payload = codec::encode_payload(event)?;
        Ok(self.core.pubsub.publish(topic, payload)?)
    }

    /// A handle that publishes on this node's behalf, for handlers and tasks.
    pub fn publishing(&self) -> Publishing {
        Publishing {
            pubsub: Arc::downgrade(&self.core.pubsub),
        }
    }

    /// Subscribes to events whose topic starts with `prefix`, from every peer.
    pub fn subscribe<T: DeserializeOwned>(&self, prefix: &str) -> Subscription<T> {
        self.core.pubsub.subscribe(prefix)
    }

    /// Publish/async responses: publishes `req` on `topic` and collects the replies of
    /// every peer that answers that topic (and is subscribed to us), until `opts.within`
    /// passes, every expected peer has answered, or `opts.quorum` replies are in.
    pub async fn gather<Req, Resp>(
        &self,
        topic: &str,
        req: &Req,
        opts: GatherOptions,
    ) -> Result<Gather<Resp>, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let call_opts = CallOptions {
            timeout: Some(opts.within),
            version: opts.version,
            ..CallOptions::default()
        };
        match self
            .core
            .call(call(Style::Gather, topic, req, call_opts))
            .await?
        {
            Started::Gather(opened) => Ok(Gather::new(opened, opts.within, opts.quorum)),
            _ => unreachable!("a gather collects replies"),
        }
    }

    /// The node's counters.
    pub fn stats(&self) -> NodeStats {
        let c = &self.core;
        NodeStats {
            malformed: c.inbound.malformed(),
            unexpected: c.inbound.unexpected(),
            other_cluster: c.membership.other_cluster(),
            other_version: c.membership.other_version(),
            events_dropped: c.pubsub.dropped(),
            replies_dropped: c.responder.replies_dropped(),
            callers_dropped: c.responder.callers_dropped(),
            overloaded: c.responder.overloaded(),
            cancelled: c.responder.cancelled(),
            breaker_refused: c.breakers.refused(),
            bulkhead_rejected: c.bulkheads.rejected(),
            expired: c.inbound.expired(),
            hellos_refused: c.membership.hellos_refused(),
            hellos_limited: c.membership.hellos_limited(),
            dials_deferred: c.membership.dials_deferred(),
            outbox: c.outbox.stats(),
            router: c.router.stats(),
            publisher: c.publisher.stats(),
            subscriber: c.subscriber.stats(),
        }
    }

    /// Calls waiting for a reply now (for tests and metrics).
    pub fn pending_calls(&self) -> usize {
        self.core.calls.len()
    }

    /// Stops gracefully, within the drain timeout: tells its peers it is leaving (they
    /// send new calls to other instances, and to this one only if there is no other),
    /// serves the requests they sent before they knew until requests stop coming, then
    /// stops taking work (later requests get a `shutting_down` error reply), lets
    /// handlers in flight finish, fails calls still waiting for a reply, closes every
    /// socket and returns once every task has ended.
    ///
    /// Takes `&self` so that a node shared with its own handlers (through a `Weak`, say)
    /// can be stopped; calling it again, or concurrently, waits for the one stop. A
    /// stopped node refuses calls with [`CallError::Shutdown`].
    pub async fn shutdown(&self) {
        self.core.shutdown().await;
    }
}

/// A call for the pipeline, the options unpacked.
fn call<'a, T: ?Sized>(
    style: Style,
    target: &'a str,
    req: &'a T,
    mut opts: CallOptions,
) -> Call<'a, T> {
    Call {
        style,
        target,
        req,
        encoded: None,
        guards: Guards::of(&opts),
        carried: Carried::take(&mut opts),
        timeout: opts.timeout,
        version: opts.version,
        id: None,
        avoid: Vec::new(),
        now: tokio::time::Instant::now(),
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Without `shutdown`, at least stop the loops; the sockets close as they drop.
        self.core.life.leave.cancel();
        self.core.life.cancel.cancel();
    }
}
