//! The node runtime: what a service embeds.
//!
//! A [`Node`] owns one ROUTER (requests, notifications, gather replies and HELLOs come in
//! there), one PUB (its events and gather requests go out there), one SUB (connected to
//! every peer's PUB) and one DEALER per peer ROUTER (its requests go out there, their
//! replies come back on it). It keeps a peer table from the HELLOs nodes exchange, a
//! registry of typed handlers, and the tables of calls waiting for replies.
//!
//! ```
//! use peerwire::codec::Version;
//! use peerwire::node::{HandlerError, Node};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct CreateOrder { item: String, qty: u32 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let orders = Node::builder("orders").start().await?;
//! orders.handle("orders.create", Version::new(1, 0), |req: CreateOrder, _ctx| async move {
//!     if req.qty == 0 {
//!         return Err(HandlerError::new("invalid_qty", "quantity must be positive"));
//!     }
//!     Ok(format!("{} × {}", req.qty, req.item))
//! });
//!
//! let client = Node::builder("client").peer(orders.endpoint()).start().await?;
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
//! This module owns dispatch and the tasks that drive it; it never touches bytes on the
//! wire (that is [`crate::codec`] and [`crate::transport`]) and never blocks a socket
//! loop on a handler: a handler is polled once where its request arrives (most finish
//! there, with no task hop) and, if it awaits, goes on in its own task under the
//! caller's deadline.

mod handlers;
mod peers;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::future::Future;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed},
};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::codec::{
    self, codes, CodecError, Envelope, ErrorBody, Header, Hello, Id, Kind, Version,
};
use crate::transport::{
    Dealer, Message, MessageHandler, PublishReport, Publisher, Router, SendError, SocketEvent,
    SocketOptions, Subscriber, TransportError,
};

pub use handlers::{Context, HandlerError};
pub use peers::PeerInfo;

use handlers::{erase, lookup, Entry, Registry};
use peers::PeerTable;

/// Most endpoints followed from one HELLO's gossip list.
const MAX_GOSSIP: usize = 64;
/// Most peer endpoints a node dials.
const MAX_PEERS: usize = 1024;

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A socket could not be created.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Why a call (request, notification, gather) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
}

/// Per-call options.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Deadline for the reply; the node's default when `None`.
    pub timeout: Option<Duration>,
    /// Method version the caller was written against; any version when `None`.
    pub version: Option<Version>,
    /// String headers to carry (trace context).
    pub headers: std::collections::BTreeMap<String, String>,
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
}

/// Builds a [`Node`].
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    name: String,
    cluster: String,
    host: IpAddr,
    router_port: u16,
    pub_port: u16,
    peers: Vec<String>,
    default_timeout: Duration,
    drain_timeout: Duration,
    forget_after: Duration,
    max_in_flight: usize,
    socket: SocketOptions,
}

impl NodeBuilder {
    /// The cluster this node belongs to (default `default`). Nodes of other clusters
    /// are ignored.
    pub fn cluster(mut self, cluster: impl Into<String>) -> Self {
        self.cluster = cluster.into();
        self
    }

    /// Address to listen on (default 127.0.0.1: nothing leaves the host unless asked).
    pub fn listen(mut self, host: IpAddr) -> Self {
        self.host = host;
        self
    }

    /// Port of the ROUTER (default 0: any free port).
    pub fn router_port(mut self, port: u16) -> Self {
        self.router_port = port;
        self
    }

    /// Port of the PUB (default 0: any free port).
    pub fn pub_port(mut self, port: u16) -> Self {
        self.pub_port = port;
        self
    }

    /// A peer's ROUTER endpoint (`tcp://host:port`) to connect to at start. Repeatable.
    pub fn peer(mut self, endpoint: impl Into<String>) -> Self {
        self.peers.push(endpoint.into());
        self
    }

    /// Deadline of calls that set none (default 5 s).
    pub fn default_timeout(mut self, t: Duration) -> Self {
        self.default_timeout = t;
        self
    }

    /// How long [`Node::shutdown`] lets in-flight handlers finish (default 5 s).
    pub fn drain_timeout(mut self, t: Duration) -> Self {
        self.drain_timeout = t;
        self
    }

    /// How long a peer learned from another node (not a static peer) may stay
    /// unreachable before it is forgotten (default 10 s). Static peers are kept and
    /// retried for the node's whole life.
    pub fn forget_after(mut self, t: Duration) -> Self {
        self.forget_after = t;
        self
    }

    /// Most handlers running at once (default 10 000). Past it the node stops reading
    /// new requests until one finishes, so TCP pushes back on the callers.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Transport options for every socket of the node.
    pub fn socket_options(mut self, opts: SocketOptions) -> Self {
        self.socket = opts;
        self
    }

    /// Binds the sockets, connects to the static peers and starts the node.
    pub async fn start(self) -> Result<Node, NodeError> {
        let id = Id::new();
        // Requests are dispatched inline by the ROUTER's connection tasks (no task hop);
        // the node is not built yet, so the handler finds it through this cell, and
        // declines (queues for `router_loop`) until it is there.
        let cell: Arc<std::sync::OnceLock<Weak<Inner>>> = Arc::new(std::sync::OnceLock::new());
        let router = Router::bind_with_handler(
            &format!(
                "tcp://{}",
                std::net::SocketAddr::new(self.host, self.router_port)
            ),
            self.socket.clone(),
            router_handler(cell.clone()),
        )
        .await?;
        let publisher = Publisher::bind(
            &format!(
                "tcp://{}",
                std::net::SocketAddr::new(self.host, self.pub_port)
            ),
            self.socket.clone(),
        )
        .await?;
        // The SUB announces our node id, so a publisher can tell which peers subscribe.
        let subscriber = Subscriber::with_handler(
            SocketOptions {
                identity: Some(Bytes::copy_from_slice(id.0.as_bytes())),
                ..self.socket.clone()
            },
            subscriber_handler(cell.clone()),
        );
        let inner = Arc::new(Inner {
            id,
            name: self.name,
            cluster: self.cluster,
            host: self.host,
            router_port: router.local_addr().port(),
            pub_port: publisher.local_addr().port(),
            router,
            publisher,
            subscriber,
            socket: self.socket,
            registry: RwLock::new(Registry::default()),
            peers: Mutex::new(PeerTable::default()),
            sub_endpoints: Mutex::new(HashSet::new()),
            pending: Mutex::new(HashMap::default()),
            deadlines: Mutex::new(BinaryHeap::new()),
            earlier_deadline: Notify::new(),
            gathers: Mutex::new(HashMap::new()),
            subs: RwLock::new(Vec::new()),
            topic_seq: Mutex::new(HashMap::new()),
            next_sub: AtomicU64::new(1),
            default_timeout: self.default_timeout,
            drain_timeout: self.drain_timeout,
            forget_after: self.forget_after,
            static_endpoints: self.peers.iter().cloned().collect(),
            self_endpoints: Mutex::new(HashSet::new()),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            handler_tasks: TaskTracker::new(),
            handler_slots: Arc::new(tokio::sync::Semaphore::new(self.max_in_flight)),
            router_ids: Mutex::new(HashMap::new()),
            declined: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            changed: Notify::new(),
            counters: Counters::default(),
            presence: broadcast::channel(256).0,
        });
        let weak = Arc::downgrade(&inner);
        let _ = cell.set(weak.clone());
        inner
            .tasks
            .spawn(router_loop(weak.clone(), inner.cancel.clone()));
        inner
            .tasks
            .spawn(subscriber_loop(weak.clone(), inner.cancel.clone()));
        inner.tasks.spawn(deadline_loop(weak, inner.cancel.clone()));
        for p in &self.peers {
            inner.ensure_dealer(p)?;
        }
        Ok(Node { inner })
    }
}

/// Counters of the node's own decisions (the sockets keep theirs).
#[derive(Debug, Default)]
struct Counters {
    malformed: AtomicU64,
    unexpected: AtomicU64,
    other_cluster: AtomicU64,
    events_dropped: AtomicU64,
}

/// A copy of the node's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Envelopes that could not be decoded (dropped, logged).
    pub malformed: u64,
    /// Envelopes of a kind not expected on the socket they came on (dropped, logged).
    pub unexpected: u64,
    /// HELLOs from nodes of another cluster (ignored).
    pub other_cluster: u64,
    /// Events dropped because a local subscription's queue was full (subscribers see
    /// them as gaps in the sequence numbers).
    pub events_dropped: u64,
}

struct Pending {
    tx: oneshot::Sender<Result<Envelope, CallError>>,
    /// The DEALER it went out on (compared by pointer when a connection drops).
    dealer: Arc<Dealer>,
    target: Arc<str>,
    timeout: Duration,
}

struct LocalSub {
    id: u64,
    prefix: String,
    tx: mpsc::Sender<Envelope>,
}

struct Inner {
    id: Id,
    name: String,
    cluster: String,
    host: IpAddr,
    router_port: u16,
    pub_port: u16,
    router: Router,
    publisher: Publisher,
    subscriber: Subscriber,
    socket: SocketOptions,
    registry: RwLock<Registry>,
    peers: Mutex<PeerTable>,
    sub_endpoints: Mutex<HashSet<String>>,
    pending: Mutex<HashMap<Id, Pending, IdHash>>,
    /// Deadlines of pending calls, earliest first. One sweeper task fails the expired
    /// ones, instead of every call arming a timer of its own. Entries of calls already
    /// answered are skipped when they come up (and compacted away when they pile up).
    deadlines: Mutex<BinaryHeap<Reverse<(tokio::time::Instant, Id)>>>,
    /// Signalled when a deadline earlier than every other is added.
    earlier_deadline: Notify,
    gathers: Mutex<HashMap<Id, mpsc::Sender<Envelope>>>,
    subs: RwLock<Vec<LocalSub>>,
    topic_seq: Mutex<HashMap<String, u64>>,
    next_sub: AtomicU64,
    default_timeout: Duration,
    drain_timeout: Duration,
    forget_after: Duration,
    /// Endpoints given at start: never forgotten.
    static_endpoints: HashSet<String>,
    /// Endpoints found to lead back to this node (through gossip): never dialled again.
    self_endpoints: Mutex<HashSet<String>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    handler_tasks: TaskTracker,
    /// Bounds handlers running at once; when none is free the loops stop reading and
    /// TCP pushes back on the senders.
    handler_slots: Arc<tokio::sync::Semaphore>,
    /// Messages declined by the inline dispatchers and not yet dispatched by the loops.
    /// While any are outstanding, the inline dispatchers decline too, so that no
    /// connection's later message overtakes an earlier one.
    declined: AtomicU64,
    /// Which node each ROUTER identity introduced itself as, to check who sent a reply.
    router_ids: Mutex<HashMap<Bytes, Id>>,
    shutting_down: AtomicBool,
    /// Signalled whenever the peer table changes.
    changed: Notify,
    counters: Counters,
    presence: broadcast::Sender<PeerInfo>,
}

/// A peerwire node. See the [module documentation](self).
///
/// Dropping a node stops it without draining; [`Node::shutdown`] drains first.
pub struct Node {
    inner: Arc<Inner>,
}

impl Node {
    /// A builder for a node called `name`.
    pub fn builder(name: impl Into<String>) -> NodeBuilder {
        NodeBuilder {
            name: name.into(),
            cluster: "default".into(),
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            router_port: 0,
            pub_port: 0,
            peers: Vec::new(),
            default_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            forget_after: Duration::from_secs(10),
            max_in_flight: 10_000,
            socket: SocketOptions::default(),
        }
    }

    /// This node's id.
    pub fn id(&self) -> Id {
        self.inner.id
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The endpoint of this node's ROUTER, for other nodes' `peer(...)`.
    pub fn endpoint(&self) -> String {
        format!("tcp://{}", self.inner.router.local_addr())
    }

    /// The endpoint of this node's PUB.
    pub fn pub_endpoint(&self) -> String {
        format!("tcp://{}", self.inner.publisher.local_addr())
    }

    /// Connects to another node's ROUTER endpoint (as `NodeBuilder::peer` does at start).
    pub fn add_peer(&self, endpoint: &str) -> Result<(), NodeError> {
        self.inner.ensure_dealer(endpoint)?;
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
        self.inner.registry.write().methods.insert(
            target.to_string(),
            Entry {
                version,
                handler: erase(f),
            },
        );
        self.inner.announce();
    }

    /// Registers a typed responder for gather requests published on `topic`.
    pub fn handle_gather<Req, Resp, F, Fut>(&self, topic: &str, version: Version, f: F)
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(Req, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, HandlerError>> + Send + 'static,
    {
        self.inner.registry.write().gathers.insert(
            topic.to_string(),
            Entry {
                version,
                handler: erase(f),
            },
        );
        self.inner.subscriber.subscribe(topic.to_string());
        self.inner.announce();
    }

    /// The peers known now.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let mut v: Vec<PeerInfo> = self
            .inner
            .peers
            .lock()
            .by_id
            .values()
            .map(|p| p.info.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        v
    }

    /// A stream of peer-table updates: each HELLO learned (new or refreshed) is sent.
    pub fn presence(&self) -> broadcast::Receiver<PeerInfo> {
        self.inner.presence.subscribe()
    }

    /// Waits until at least `n` connected peers serve `target`, or `within` passes.
    /// Returns whether they do.
    pub async fn wait_for_service(&self, target: &str, n: usize, within: Duration) -> bool {
        let deadline = far_instant_after(within);
        loop {
            let notified = self.inner.changed.notified();
            if self.inner.peers.lock().candidates(target, None).0.len() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Waits until at least `n` peers are known, or `within` passes.
    pub async fn wait_for_peers(&self, n: usize, within: Duration) -> bool {
        let deadline = far_instant_after(within);
        loop {
            let notified = self.inner.changed.notified();
            if self.inner.peers.lock().by_id.len() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Peers subscribed now to our events on `topic` (their SUB filter matches it).
    pub fn subscribers_of(&self, topic: &str) -> Vec<Id> {
        self.inner
            .publisher
            .subscribers_matching(topic.as_bytes())
            .into_iter()
            .filter_map(|id| uuid::Uuid::from_slice(&id).ok().map(Id))
            .collect()
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
        self.request_async_with(target, req, opts)
            .await?
            .recv()
            .await
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
        let inner = &self.inner;
        // Handlers still draining at shutdown may call out; only a stopped node refuses.
        if inner.cancel.is_cancelled() {
            return Err(CallError::Shutdown);
        }
        let timeout = opts.timeout.unwrap_or(inner.default_timeout);
        let deadline = far_instant_after(timeout);
        let payload = codec::encode_payload(req)?;
        let (peer_id, dealer) = inner.pick(target, opts.version)?;
        let mut h = Header::new(Kind::Request, inner.id, target);
        h.deadline_ms = Some(timeout.as_millis() as u64);
        h.method_version = opts.version;
        h.headers = opts.headers;
        let id = h.id;
        let (tx, rx) = oneshot::channel();
        let target: Arc<str> = Arc::from(target);
        inner.pending.lock().insert(
            id,
            Pending {
                tx,
                dealer: dealer.clone(),
                target: target.clone(),
                timeout,
            },
        );
        inner.watch_deadline(deadline, id);
        let env = Envelope { header: h, payload };
        // From here the handle owns the entry: whether the send below fails, times out or
        // is cancelled by the caller dropping this future, its Drop removes it.
        let handle = PendingReply {
            id,
            rx,
            deadline,
            timeout,
            target: target.clone(),
            inner: Arc::downgrade(inner),
            _t: PhantomData,
        };
        // Waiting for room in the queue counts against the call's deadline too.
        match tokio::time::timeout_at(deadline, dealer.send(env.to_message())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(CallError::Timeout {
                    target: target.to_string(),
                    timeout,
                })
            }
        }
        debug!(target = %target, peer = %peer_id, %id, "request sent");
        Ok(handle)
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
        let inner = &self.inner;
        if inner.cancel.is_cancelled() {
            return Err(CallError::Shutdown);
        }
        let timeout = opts.timeout.unwrap_or(inner.default_timeout);
        let payload = codec::encode_payload(msg)?;
        let (_, dealer) = inner.pick(target, opts.version)?;
        let mut h = Header::new(Kind::Notification, inner.id, target);
        h.method_version = opts.version;
        h.headers = opts.headers;
        h.deadline_ms = opts.timeout.map(|t| t.as_millis() as u64);
        let env = Envelope { header: h, payload };
        tokio::time::timeout_at(far_instant_after(timeout), dealer.send(env.to_message()))
            .await
            .map_err(|_| CallError::Timeout {
                target: target.to_string(),
                timeout,
            })??;
        Ok(())
    }

    /// Publishes an event on `topic` to every subscribed peer. Each topic has its own
    /// sequence number, so subscribers can count what they missed.
    pub fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        event: &T,
    ) -> Result<PublishReport, CallError> {
        let inner = &self.inner;
        let payload = codec::encode_payload(event)?;
        let mut h = Header::new(Kind::Event, inner.id, topic);
        h.seq = {
            let mut seqs = inner.topic_seq.lock();
            let s = seqs.entry(topic.to_string()).or_insert(0);
            *s += 1;
            *s
        };
        let env = Envelope { header: h, payload };
        Ok(inner
            .publisher
            .publish(Message::from_frames(env.to_pub_frames()))?)
    }

    /// Subscribes to events whose topic starts with `prefix`, from every peer.
    pub fn subscribe<T: DeserializeOwned>(&self, prefix: &str) -> Subscription<T> {
        let (tx, rx) = mpsc::channel(4096);
        let id = self.inner.next_sub.fetch_add(1, Relaxed);
        self.inner.subs.write().push(LocalSub {
            id,
            prefix: prefix.to_string(),
            tx,
        });
        self.inner.subscriber.subscribe(prefix.to_string());
        Subscription {
            id,
            prefix: prefix.to_string(),
            rx,
            last: HashMap::new(),
            inner: Arc::downgrade(&self.inner),
            _t: PhantomData,
        }
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
        let inner = &self.inner;
        if inner.cancel.is_cancelled() {
            return Err(CallError::Shutdown);
        }
        let payload = codec::encode_payload(req)?;
        let listening: HashSet<Id> = self.subscribers_of(topic).into_iter().collect();
        let expected: Vec<(Id, String)> = {
            let peers = inner.peers.lock();
            let mut v: Vec<(Id, String)> = peers
                .by_id
                .values()
                .filter(|p| {
                    p.info
                        .gathers
                        .get(topic)
                        .is_some_and(|v| opts.version.is_none_or(|w| v.serves(w)))
                        && listening.contains(&p.info.id)
                })
                .map(|p| (p.info.id, p.info.name.clone()))
                .collect();
            v.sort();
            v
        };
        if expected.is_empty() {
            return Err(CallError::NoResponder(topic.to_string()));
        }
        let mut h = Header::new(Kind::GatherRequest, inner.id, topic);
        h.deadline_ms = Some(opts.within.as_millis() as u64);
        h.method_version = opts.version;
        let id = h.id;
        let (tx, rx) = mpsc::channel(expected.len() * 2 + 16);
        inner.gathers.lock().insert(id, tx);
        let env = Envelope { header: h, payload };
        if let Err(e) = inner
            .publisher
            .publish(Message::from_frames(env.to_pub_frames()))
        {
            inner.gathers.lock().remove(&id);
            return Err(e.into());
        }
        Ok(Gather {
            id,
            rx,
            started: Instant::now(),
            deadline: Box::pin(tokio::time::sleep_until(far_instant_after(opts.within))),
            quorum: opts.quorum,
            expected,
            answered: Vec::new(),
            finished: None,
            inner: Arc::downgrade(inner),
            _t: PhantomData,
        })
    }

    /// The node's counters.
    pub fn stats(&self) -> NodeStats {
        let c = &self.inner.counters;
        NodeStats {
            malformed: c.malformed.load(Relaxed),
            unexpected: c.unexpected.load(Relaxed),
            other_cluster: c.other_cluster.load(Relaxed),
            events_dropped: c.events_dropped.load(Relaxed),
        }
    }

    /// Calls waiting for a reply now (for tests and metrics).
    pub fn pending_calls(&self) -> usize {
        self.inner.pending.lock().len()
    }

    /// Stops taking work (new requests get a `shutting_down` error reply), lets handlers
    /// in flight finish for up to the drain timeout, fails calls still waiting for a
    /// reply, closes every socket and returns once every task has ended.
    pub async fn shutdown(self) {
        let inner = &self.inner;
        inner.shutting_down.store(true, Relaxed);
        inner.handler_tasks.close();
        if tokio::time::timeout(inner.drain_timeout, inner.handler_tasks.wait())
            .await
            .is_err()
        {
            warn!(node = %inner.name, "handlers still running after the drain timeout");
        }
        inner.cancel.cancel();
        for (_, p) in inner.pending.lock().drain() {
            let _ = p.tx.send(Err(CallError::Shutdown));
        }
        inner.gathers.lock().clear();
        let dealers: Vec<Arc<Dealer>> = inner.peers.lock().dealers.values().cloned().collect();
        for d in dealers {
            d.shutdown().await;
        }
        inner.router.shutdown().await;
        inner.publisher.shutdown().await;
        inner.subscriber.shutdown().await;
        inner.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), inner.tasks.wait()).await;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Without `shutdown`, at least stop the loops; the sockets close as they drop.
        self.inner.cancel.cancel();
    }
}

impl Inner {
    fn hello(&self) -> Hello {
        Hello {
            node_id: self.id,
            name: self.name.clone(),
            cluster: self.cluster.clone(),
            host: self.host.to_string(),
            router_port: self.router_port,
            pub_port: self.pub_port,
            catalog: self.registry.read().catalog(),
            peers: self
                .peers
                .lock()
                .by_id
                .values()
                .filter(|p| p.info.connected)
                .map(|p| p.info.router_endpoint.clone())
                .collect(),
        }
    }

    fn hello_envelope(&self, kind: Kind, correlation: Id) -> Envelope {
        let mut h = Header::new(kind, self.id, "");
        h.correlation_id = correlation;
        Envelope {
            header: h,
            payload: codec::encode_payload(&self.hello()).expect("a HELLO always encodes"),
        }
    }

    /// One declined message has been dispatched by a loop.
    fn undecline(&self) {
        // Saturating: messages declined before the node was ready were not counted.
        let _ = self
            .declined
            .fetch_update(AcqRel, Acquire, |n| Some(n.saturating_sub(1)));
    }

    /// Registers a pending call's deadline with the sweeper.
    fn watch_deadline(&self, at: tokio::time::Instant, id: Id) {
        let mut heap = self.deadlines.lock();
        let earliest = heap.peek().is_none_or(|Reverse((t, _))| at < *t);
        heap.push(Reverse((at, id)));
        // Answered calls leave their entry behind until it comes up: compact when those
        // outnumber the live ones, so the heap stays proportional to calls in flight.
        if heap.len() > 4096 && heap.len() > 4 * self.pending.lock().len() {
            let pending = self.pending.lock();
            heap.retain(|Reverse((_, id))| pending.contains_key(id));
        }
        drop(heap);
        if earliest {
            self.earlier_deadline.notify_one();
        }
    }

    /// Sends a fresh HELLO to every peer (the catalog changed).
    fn announce(&self) {
        let env = self.hello_envelope(Kind::Hello, Id::NIL);
        for d in self.peers.lock().dealers.values() {
            let _ = d.try_send(env.to_message());
        }
    }

    fn pick(&self, target: &str, wanted: Option<Version>) -> Result<(Id, Arc<Dealer>), CallError> {
        self.peers
            .lock()
            .pick(target, wanted)
            .map_err(|incompatible| match (incompatible, wanted) {
                (Some(available), Some(wanted)) => CallError::IncompatibleVersion {
                    target: target.to_string(),
                    wanted,
                    available,
                },
                _ => CallError::NoResponder(target.to_string()),
            })
    }

    /// The DEALER for a peer ROUTER endpoint, created (with its loop) if new.
    fn ensure_dealer(self: &Arc<Self>, endpoint: &str) -> Result<Arc<Dealer>, TransportError> {
        let mut peers = self.peers.lock();
        if self.self_endpoints.lock().contains(endpoint) {
            return Err(TransportError::InvalidEndpoint(format!(
                "{endpoint} is this node itself"
            )));
        }
        if let Some(d) = peers.dealers.get(endpoint) {
            return Ok(d.clone());
        }
        // Replies are dispatched inline by the DEALER's connection task: a reply wakes its
        // caller directly, with no task in between.
        let weak = Arc::downgrade(self);
        let ep = endpoint.to_string();
        let on_message: MessageHandler = Arc::new(move |_: &Bytes, msg: Message| {
            let Some(inner) = weak.upgrade() else {
                return Ok(());
            };
            match Envelope::from_frames(msg.frames()) {
                Ok(env) => inner.on_dealer(&ep, env),
                Err(e) => {
                    inner.counters.malformed.fetch_add(1, Relaxed);
                    warn!(error = %e, endpoint = %ep, "malformed envelope on a DEALER, dropped");
                }
            }
            Ok(())
        });
        let (dealer, events) =
            Dealer::connect_with_handler(endpoint, self.socket.clone(), on_message)?;
        let dealer = Arc::new(dealer);
        peers.dealers.insert(endpoint.to_string(), dealer.clone());
        drop(peers);
        self.tasks.spawn(dealer_loop(
            Arc::downgrade(self),
            endpoint.to_string(),
            dealer.clone(),
            events,
            self.cancel.clone(),
        ));
        Ok(dealer)
    }

    /// Records a peer from its HELLO (received on our ROUTER, or as a HELLO-ACK on a
    /// DEALER), connecting to it if it is new.
    fn learn(self: &Arc<Self>, mut hello: Hello, source_ip: Option<IpAddr>) {
        if hello.cluster != self.cluster {
            self.counters.other_cluster.fetch_add(1, Relaxed);
            debug!(peer = %hello.name, cluster = %hello.cluster, "ignoring a node of another cluster");
            return;
        }
        if hello.node_id == self.id {
            return;
        }
        // An unspecified listen address (0.0.0.0) means "wherever you reached me from".
        let host: IpAddr = match hello.host.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() => ip,
            _ => source_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        };
        let router_ep = format!(
            "tcp://{}",
            std::net::SocketAddr::new(host, hello.router_port)
        );
        let pub_ep = format!("tcp://{}", std::net::SocketAddr::new(host, hello.pub_port));
        if self
            .peers
            .lock()
            .claimed_elsewhere(&hello.node_id, &router_ep)
        {
            warn!(id = %hello.node_id, endpoint = %router_ep, "HELLO claims the id of a peer connected elsewhere; ignored");
            return;
        }
        let dealer = match self.ensure_dealer(&router_ep) {
            Ok(d) => d,
            Err(e) => {
                warn!(endpoint = %router_ep, error = %e, "cannot connect to a peer");
                return;
            }
        };
        if self.sub_endpoints.lock().insert(pub_ep.clone()) {
            if let Err(e) = self.subscriber.connect(&pub_ep) {
                warn!(endpoint = %pub_ep, error = %e, "cannot subscribe to a peer");
            }
        }
        let gossip = std::mem::take(&mut hello.peers);
        let (info, new_peer, stale_pubs) = {
            let mut peers = self.peers.lock();
            let was_up = peers
                .by_id
                .get(&hello.node_id)
                .is_some_and(|p| p.info.connected);
            let (new, stale) = peers.upsert(
                hello.node_id,
                hello.name,
                router_ep,
                pub_ep,
                hello.catalog,
                dealer,
            );
            let info = peers.by_id[&hello.node_id].info.clone();
            if new {
                debug!(node = %self.name, peer = %info.name, id = %info.id, "peer joined");
            }
            // Announce when a peer becomes reachable, not only when it is first heard of:
            // that is when the others can be told of it.
            let announce = new || (!was_up && info.connected);
            (info, announce, stale)
        };
        for p in stale_pubs {
            // The peer restarted (new PUB port) or was replaced: stop dialling the old one.
            self.subscriber.disconnect(&p);
            self.sub_endpoints.lock().remove(&p);
        }
        let is_new = new_peer;
        let _ = self.presence.send(info);
        self.changed.notify_waiters();
        // Gossip: connect to the peers it knows, and tell ours about the newcomer.
        let own = format!("tcp://{}", self.router.local_addr());
        // Bounded: a HELLO cannot make us open more than MAX_GOSSIP connections, nor
        // grow the table past MAX_PEERS.
        for ep in gossip.into_iter().take(MAX_GOSSIP) {
            if self.peers.lock().dealers.len() >= MAX_PEERS {
                warn!(node = %self.name, "peer limit reached; gossip not followed");
                break;
            }
            if ep != own && !self.peers.lock().dealers.contains_key(&ep) {
                if let Err(e) = self.ensure_dealer(&ep) {
                    debug!(endpoint = %ep, error = %e, "not following gossip");
                }
            }
        }
        if is_new {
            self.announce();
        }
    }

    /// Drops everything known about a peer endpoint that has stayed unreachable.
    /// Known gap: a HELLO learned while this runs (between its two lock sections) can
    /// leave that peer in the table without its SUB connection; its next HELLO (on
    /// reconnect) repairs it.
    async fn forget(self: &Arc<Self>, endpoint: &str) {
        let (dealer, pubs) = {
            let mut peers = self.peers.lock();
            let dealer = peers.dealers.remove(endpoint);
            let mut pubs = Vec::new();
            peers.by_id.retain(|_, p| {
                if p.info.router_endpoint == endpoint {
                    pubs.push(p.info.pub_endpoint.clone());
                    false
                } else {
                    true
                }
            });
            (dealer, pubs)
        };
        for p in pubs {
            self.subscriber.disconnect(&p);
            self.sub_endpoints.lock().remove(&p);
        }
        self.changed.notify_waiters();
        if let Some(d) = dealer {
            d.shutdown().await;
        }
        debug!(node = %self.name, %endpoint, "forgot an unreachable peer");
    }

    fn reply_error(&self, identity: &Bytes, to: &Header, code: &str, message: String) {
        let body = ErrorBody {
            code: code.to_string(),
            message,
        };
        let env = error_envelope(self.id, to, &body);
        if let Err(e) = self.router.try_send(identity, env.to_message()) {
            debug!(error = %e, "could not send an error reply");
        }
    }

    /// Starts a handler by polling it once: a handler that does not await (most do not)
    /// finishes here and is answered without a task hop (`Ok`). Otherwise (`Err`) the
    /// returned future finishes it under the caller's deadline, yielding `None` if the
    /// deadline passed: the caller has already given up (its timer started before ours),
    /// so no reply is sent at all rather than one that can only arrive too late.
    #[allow(clippy::type_complexity)]
    fn start_handler(
        &self,
        handler: handlers::ErasedHandler,
        env: Envelope,
    ) -> Result<
        Result<Bytes, ErrorBody>,
        Pin<Box<dyn Future<Output = Option<Result<Bytes, ErrorBody>>> + Send>>,
    > {
        let h = env.header;
        let deadline = h.deadline();
        let ctx = Context {
            message_id: h.id,
            sender: h.sender,
            target: h.target,
            deadline,
            headers: h.headers,
            shard_key: h.shard_key,
        };
        let message_id = ctx.message_id;
        let mut fut = handler(env.payload, ctx);
        let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
        if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Ok(out);
        }
        // The task polls it again with a real waker.
        Err(Box::pin(async move {
            match deadline {
                Some(d) => match tokio::time::timeout(d, fut).await {
                    Ok(r) => Some(r),
                    Err(_) => {
                        warn!(id = %message_id, deadline = ?d, "handler cut off at the caller's deadline; no reply sent");
                        None
                    }
                },
                None => Some(fut.await),
            }
        }))
    }

    fn on_router(
        self: &Arc<Self>,
        identity: Bytes,
        env: Envelope,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) {
        let h = &env.header;
        if h.version != codec::VERSION_MAJOR {
            let msg = format!(
                "envelope version {} is not supported (this node speaks {})",
                h.version,
                codec::VERSION_MAJOR
            );
            warn!(node = %self.name, version = h.version, "unsupported envelope version");
            self.reply_error(&identity, h, codes::UNSUPPORTED_VERSION, msg);
            return;
        }
        match h.kind {
            Kind::Request | Kind::Notification => {
                let is_request = h.kind == Kind::Request;
                if self.shutting_down.load(Relaxed) {
                    if is_request {
                        self.reply_error(
                            &identity,
                            h,
                            codes::SHUTTING_DOWN,
                            "node is shutting down".into(),
                        );
                    }
                    return;
                }
                let handler = lookup(&self.registry.read().methods, &h.target, h.method_version);
                let handler = match handler {
                    Ok(hd) => hd,
                    Err(body) => {
                        if is_request {
                            self.reply_error(&identity, h, &body.code, body.message);
                        } else {
                            warn!(target = %h.target, reason = %body.message, "notification not handled");
                        }
                        return;
                    }
                };
                let request = ReplyTo::of(&env.header);
                // The caller's deadline, but never longer than our default: it is the
                // peer's number.
                let reply_within = env
                    .header
                    .deadline()
                    .unwrap_or(self.default_timeout)
                    .min(self.default_timeout);
                match self.start_handler(handler, env) {
                    Ok(out) => {
                        let Some(reply) = self.reply_for(&request, is_request, Some(out)) else {
                            return;
                        };
                        match self.router.try_send(&identity, reply.clone()) {
                            Ok(()) => {}
                            Err(SendError::QueueFull { .. }) => {
                                // The caller's queue is full: wait for room in a task that
                                // keeps the handler slot, so a caller that never reads its
                                // replies runs out of slots (and is read no more) instead
                                // of growing tasks.
                                let weak = Arc::downgrade(self);
                                self.handler_tasks.spawn(async move {
                                    let _slot = slot;
                                    let Some(inner) = weak.upgrade() else { return };
                                    inner.send_reply(&identity, reply, reply_within).await;
                                });
                            }
                            Err(e) => debug!(error = %e, "reply not sent: caller gone"),
                        }
                    }
                    Err(run) => {
                        let weak = Arc::downgrade(self);
                        self.handler_tasks.spawn(async move {
                            let _slot = slot;
                            let out = run.await;
                            let Some(inner) = weak.upgrade() else { return };
                            if let Some(reply) = inner.reply_for(&request, is_request, out) {
                                inner.send_reply(&identity, reply, reply_within).await;
                            }
                        });
                    }
                }
            }
            Kind::Hello => {
                let hello: Hello = match codec::decode_payload(&env.payload) {
                    Ok(x) => x,
                    Err(e) => {
                        self.counters.malformed.fetch_add(1, Relaxed);
                        warn!(error = %e, "malformed HELLO");
                        return;
                    }
                };
                let source = self.router.peer_addr(&identity).map(|a| a.ip());
                {
                    let mut ids = self.router_ids.lock();
                    if ids.len() >= 4 * MAX_PEERS {
                        ids.clear(); // bounded; live peers re-introduce themselves
                    }
                    ids.insert(identity.clone(), hello.node_id);
                }
                let ack = self.hello_envelope(Kind::HelloAck, h.id);
                let _ = self.router.try_send(&identity, ack.to_message());
                self.learn(hello, source);
            }
            Kind::GatherReply | Kind::ErrorReply => {
                // Only the node that introduced itself on this connection may answer as
                // itself: a forged sender id could otherwise end a gather early.
                if self.router_ids.lock().get(&identity) != Some(&h.sender) {
                    self.counters.unexpected.fetch_add(1, Relaxed);
                    debug!(sender = %h.sender, "gather reply from a connection that is not its sender's, dropped");
                    return;
                }
                let tx = self.gathers.lock().get(&h.correlation_id).cloned();
                match tx {
                    Some(tx) => {
                        let _ = tx.try_send(env);
                    }
                    None => debug!("late or unknown gather reply dropped"),
                }
            }
            Kind::Unknown(k) => {
                self.reply_error(
                    &identity,
                    h,
                    codes::UNSUPPORTED_KIND,
                    format!("envelope kind {k} is not supported"),
                );
            }
            _ => {
                self.counters.unexpected.fetch_add(1, Relaxed);
                warn!(kind = ?h.kind, "unexpected envelope kind on the ROUTER, dropped");
            }
        }
    }

    /// The reply message for a handler's outcome, or `None` when there is nothing to send
    /// (a notification, or the caller's deadline passed).
    fn reply_for(
        &self,
        request: &ReplyTo,
        is_request: bool,
        out: Option<Result<Bytes, ErrorBody>>,
    ) -> Option<Message> {
        let out = out?;
        if !is_request {
            if let Err(e) = out {
                warn!(target = request.target.as_deref().unwrap_or(""), code = %e.code, message = %e.message, "notification handler failed");
            }
            return None;
        }
        Some(request.answer(self.id, out).to_message())
    }

    /// Sends a reply, waiting at most `within` for room (a caller that stops reading its
    /// replies must not pin a task).
    async fn send_reply(&self, identity: &Bytes, reply: Message, within: Duration) {
        match tokio::time::timeout(within, self.router.send(identity, reply)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "reply not sent: caller gone"),
            Err(_) => warn!("reply not sent: the caller's queue stayed full"),
        }
    }

    fn on_dealer(self: &Arc<Self>, endpoint: &str, env: Envelope) {
        match env.header.kind {
            Kind::Reply | Kind::ErrorReply => {
                if let Some(p) = self.pending.lock().remove(&env.header.correlation_id) {
                    let _ = p.tx.send(Ok(env));
                }
            }
            Kind::HelloAck => match codec::decode_payload::<Hello>(&env.payload) {
                Ok(hello) if hello.node_id == self.id => {
                    // Gossip led us to ourselves: never dial this endpoint again.
                    self.self_endpoints.lock().insert(endpoint.to_string());
                    let (me, ep) = (self.clone(), endpoint.to_string());
                    self.tasks.spawn(async move { me.forget(&ep).await });
                }
                Ok(hello) if hello.cluster != self.cluster => {
                    // Gossip led us to another cluster's node: stop dialling it (a static
                    // peer stays, the operator named it).
                    self.counters.other_cluster.fetch_add(1, Relaxed);
                    if !self.static_endpoints.contains(endpoint) {
                        let (me, ep) = (self.clone(), endpoint.to_string());
                        self.tasks.spawn(async move { me.forget(&ep).await });
                    }
                }
                Ok(hello) => {
                    let ip = endpoint_ip(endpoint);
                    self.learn(hello, ip);
                }
                Err(e) => {
                    self.counters.malformed.fetch_add(1, Relaxed);
                    warn!(error = %e, "malformed HELLO-ACK");
                }
            },
            other => {
                self.counters.unexpected.fetch_add(1, Relaxed);
                warn!(kind = ?other, %endpoint, "unexpected envelope kind on a DEALER, dropped");
            }
        }
    }

    fn on_published(self: &Arc<Self>, env: Envelope, slot: tokio::sync::OwnedSemaphorePermit) {
        match env.header.kind {
            Kind::Event => {
                for s in self.subs.read().iter() {
                    if env.header.target.starts_with(&s.prefix)
                        && s.tx.try_send(env.clone()).is_err()
                    {
                        self.counters.events_dropped.fetch_add(1, Relaxed);
                    }
                }
            }
            Kind::GatherRequest => {
                let h = &env.header;
                if h.sender == self.id || self.shutting_down.load(Relaxed) {
                    return;
                }
                // No handler here (we only subscribed to the prefix for events): stay
                // silent. The gatherer does not expect us, and an error reply would count.
                let Ok(handler) =
                    lookup(&self.registry.read().gathers, &h.target, h.method_version)
                else {
                    return;
                };
                let dealer = self
                    .peers
                    .lock()
                    .by_id
                    .get(&h.sender)
                    .map(|p| p.dealer.clone());
                let Some(dealer) = dealer else {
                    debug!(sender = %h.sender, "gather request from an unknown node ignored");
                    return;
                };
                let request = ReplyTo::of(&env.header);
                // The caller's deadline, but never longer than our default: it is the
                // peer's number.
                let reply_within = env
                    .header
                    .deadline()
                    .unwrap_or(self.default_timeout)
                    .min(self.default_timeout);
                let (kind_ok, kind_err) = (Kind::GatherReply, Kind::ErrorReply);
                let answer = move |id: Id, out: Result<Bytes, ErrorBody>| {
                    let mut env = request.answer(id, out);
                    env.header.kind = if env.header.kind == Kind::Reply {
                        kind_ok
                    } else {
                        kind_err
                    };
                    env.to_message()
                };
                match self.start_handler(handler, env) {
                    Ok(out) => {
                        let reply = answer(self.id, out);
                        if let Err(SendError::QueueFull { .. }) = dealer.try_send(reply.clone()) {
                            self.handler_tasks.spawn(async move {
                                let _slot = slot;
                                let _ =
                                    tokio::time::timeout(reply_within, dealer.send(reply)).await;
                            });
                        }
                    }
                    Err(run) => {
                        let id = self.id;
                        self.handler_tasks.spawn(async move {
                            let _slot = slot;
                            let Some(out) = run.await else { return };
                            let _ =
                                tokio::time::timeout(reply_within, dealer.send(answer(id, out)))
                                    .await;
                        });
                    }
                }
            }
            other => {
                self.counters.unexpected.fetch_add(1, Relaxed);
                warn!(kind = ?other, "unexpected envelope kind on the SUB, dropped");
            }
        }
    }

    fn on_dealer_event(self: &Arc<Self>, endpoint: &str, dealer: &Dealer, e: SocketEvent) {
        match e {
            SocketEvent::Connected { .. } => {
                // (Re)introduce ourselves: the peer may be new, or restarted.
                // The peer counts as connected again only once its HELLO-ACK says who it
                // is now: the endpoint may have been taken by a restarted or other node.
                let env = self.hello_envelope(Kind::Hello, Id::NIL);
                let _ = dealer.try_send(env.to_message());
            }
            SocketEvent::Disconnected { reason, .. } => {
                self.peers.lock().set_connected(endpoint, false);
                self.changed.notify_waiters();
                let failed: Vec<Pending> = {
                    let mut pending = self.pending.lock();
                    let ids: Vec<Id> = pending
                        .iter()
                        .filter(|(_, p)| std::ptr::eq(Arc::as_ptr(&p.dealer), dealer))
                        .map(|(id, _)| *id)
                        .collect();
                    ids.iter().filter_map(|id| pending.remove(id)).collect()
                };
                if !failed.is_empty() {
                    debug!(%endpoint, %reason, calls = failed.len(), "failing calls to a lost peer");
                }
                for p in failed {
                    let _ =
                        p.tx.send(Err(CallError::Disconnected(endpoint.to_string())));
                }
            }
            _ => {}
        }
    }
}

/// Hashes our own message ids by their random low half. Only ids this node generated
/// are ever inserted, so a peer cannot choose colliding keys; SipHash would only cost time.
#[derive(Default, Clone, Copy)]
struct IdHash;

impl std::hash::BuildHasher for IdHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // A UUIDv7's last 8 bytes are random.
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }
}

/// What a reply needs of the request it answers.
struct ReplyTo {
    id: Id,
    /// Kept for notifications only, whose failures are logged with it.
    target: Option<String>,
}

impl ReplyTo {
    fn of(h: &Header) -> ReplyTo {
        ReplyTo {
            id: h.id,
            target: (h.kind == Kind::Notification).then(|| h.target.clone()),
        }
    }

    /// The reply (or error reply) envelope. Replies carry no target: the correlation id
    /// says what they answer.
    fn answer(&self, sender: Id, out: Result<Bytes, ErrorBody>) -> Envelope {
        let (kind, payload) = match out {
            Ok(p) => (Kind::Reply, p),
            Err(body) => (
                Kind::ErrorReply,
                codec::encode_payload(&body).expect("an error body always encodes"),
            ),
        };
        let mut h = Header::new(kind, sender, String::new());
        h.correlation_id = self.id;
        Envelope { header: h, payload }
    }
}

/// `now + d`, or a year from now if that overflows (a `Duration::MAX` timeout).
fn far_instant_after(d: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
}

fn error_envelope(sender: Id, to: &Header, body: &ErrorBody) -> Envelope {
    // Like every reply, it names what it answers by correlation id alone.
    let mut h = Header::new(Kind::ErrorReply, sender, String::new());
    h.correlation_id = to.id;
    Envelope {
        header: h,
        payload: codec::encode_payload(body).expect("an error body always encodes"),
    }
}

/// The IP of an endpoint given as an IP literal. A host name gives `None`, so a peer
/// reached by name that listens on an unspecified address is recorded as 127.0.0.1
/// (known gap: the DEALER's connected address should be used instead).
fn endpoint_ip(endpoint: &str) -> Option<IpAddr> {
    let rest = endpoint.strip_prefix("tcp://").unwrap_or(endpoint);
    rest.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

/// The ROUTER's inline message handler: dispatches a request on the connection task that
/// received it. Declines (the message then waits for `router_loop`) when the node is not
/// ready, when no handler slot is free (backpressure), or while earlier messages are
/// queued (so a connection's messages keep their order).
fn router_handler(cell: Arc<std::sync::OnceLock<Weak<Inner>>>) -> MessageHandler {
    Arc::new(move |identity: &Bytes, msg: Message| {
        let Some(inner) = cell.get().and_then(Weak::upgrade) else {
            return Err(msg);
        };
        if inner.cancel.is_cancelled() || inner.declined.load(Acquire) > 0 {
            inner.declined.fetch_add(1, AcqRel);
            return Err(msg);
        }
        let Ok(slot) = inner.handler_slots.clone().try_acquire_owned() else {
            inner.declined.fetch_add(1, AcqRel);
            return Err(msg);
        };
        match Envelope::from_frames(msg.frames()) {
            Ok(env) => inner.on_router(identity.clone(), env, slot),
            Err(e) => {
                inner.counters.malformed.fetch_add(1, Relaxed);
                warn!(error = %e, "malformed envelope on the ROUTER, dropped");
            }
        }
        Ok(())
    })
}

/// The SUB's inline message handler: events and gather requests dispatched on the
/// connection task that received them; declined like `router_handler`'s.
fn subscriber_handler(cell: Arc<std::sync::OnceLock<Weak<Inner>>>) -> MessageHandler {
    Arc::new(move |_: &Bytes, msg: Message| {
        let Some(inner) = cell.get().and_then(Weak::upgrade) else {
            return Err(msg);
        };
        if inner.cancel.is_cancelled() || inner.declined.load(Acquire) > 0 {
            inner.declined.fetch_add(1, AcqRel);
            return Err(msg);
        }
        let Ok(slot) = inner.handler_slots.clone().try_acquire_owned() else {
            inner.declined.fetch_add(1, AcqRel);
            return Err(msg);
        };
        match Envelope::from_pub_frames(msg.frames()) {
            Ok(env) => inner.on_published(env, slot),
            Err(e) => {
                inner.counters.malformed.fetch_add(1, Relaxed);
                warn!(error = %e, "malformed envelope on the SUB, dropped");
            }
        }
        Ok(())
    })
}

/// Fails calls whose deadline passed, with `Timeout`. One timer for the whole node.
async fn deadline_loop(inner: Weak<Inner>, cancel: CancellationToken) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let next = strong.deadlines.lock().peek().map(|Reverse((t, _))| *t);
        let earlier = strong.earlier_deadline.notified();
        let wake = next.unwrap_or_else(|| far_instant_after(Duration::MAX));
        // Holding `strong` while waiting is fine: Node's drop cancels the token.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(wake) => {}
            _ = earlier => {}
        }
        let now = tokio::time::Instant::now();
        let mut expired = Vec::new();
        {
            let mut heap = strong.deadlines.lock();
            while let Some(Reverse((t, id))) = heap.peek() {
                if *t > now {
                    break;
                }
                expired.push(*id);
                heap.pop();
            }
        }
        for id in expired {
            let p = strong.pending.lock().remove(&id);
            if let Some(p) = p {
                let _ = p.tx.send(Err(CallError::Timeout {
                    target: p.target.to_string(),
                    timeout: p.timeout,
                }));
            }
        }
    }
}

async fn router_loop(inner: Weak<Inner>, cancel: CancellationToken) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let got = tokio::select! {
            _ = cancel.cancelled() => return,
            r = strong.router.recv() => r,
        };
        let Ok((identity, msg)) = got else { return };
        let slot = match strong.handler_slots.clone().try_acquire_owned() {
            Ok(s) => s,
            Err(_) => {
                let slots = strong.handler_slots.clone();
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    s = slots.acquire_owned() => match s { Ok(s) => s, Err(_) => return },
                }
            }
        };
        match Envelope::from_frames(msg.frames()) {
            Ok(env) => strong.on_router(identity, env, slot),
            Err(e) => {
                strong.counters.malformed.fetch_add(1, Relaxed);
                warn!(error = %e, "malformed envelope on the ROUTER, dropped");
            }
        }
        strong.undecline();
    }
}

async fn subscriber_loop(inner: Weak<Inner>, cancel: CancellationToken) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let got = tokio::select! {
            _ = cancel.cancelled() => return,
            r = strong.subscriber.recv() => r,
        };
        let Ok(msg) = got else { return };
        let slots = strong.handler_slots.clone();
        let slot = tokio::select! {
            _ = cancel.cancelled() => return,
            s = slots.acquire_owned() => match s { Ok(s) => s, Err(_) => return },
        };
        match Envelope::from_pub_frames(msg.frames()) {
            Ok(env) => strong.on_published(env, slot),
            Err(e) => {
                strong.counters.malformed.fetch_add(1, Relaxed);
                warn!(error = %e, "malformed envelope on the SUB, dropped");
            }
        }
        strong.undecline();
    }
}

async fn dealer_loop(
    inner: Weak<Inner>,
    endpoint: String,
    dealer: Arc<Dealer>,
    mut events: broadcast::Receiver<SocketEvent>,
    cancel: CancellationToken,
) {
    // A peer learned by gossip (not a static one) that stays unreachable is forgotten.
    let forgettable = inner
        .upgrade()
        .map(|i| (!i.static_endpoints.contains(&endpoint)).then_some(i.forget_after))
        .unwrap_or(None);
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let mut forget_at = forgettable
        .map(|t| tokio::time::Instant::now() + t)
        .unwrap_or(far);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(forget_at) => {
                let Some(strong) = inner.upgrade() else { return };
                strong.forget(&endpoint).await;
                return;
            }
            e = events.recv() => match e {
                Ok(e) => {
                    let Some(strong) = inner.upgrade() else { return };
                    match &e {
                        SocketEvent::Connected { .. } => forget_at = far,
                        SocketEvent::Disconnected { .. } => {
                            if let Some(t) = forgettable {
                                forget_at = far_instant_after(t);
                            }
                        }
                        _ => {}
                    }
                    strong.on_dealer_event(&endpoint, &dealer, e);
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(%endpoint, missed = n, "connection events lagged");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

fn decode_reply<Resp: DeserializeOwned>(env: Envelope) -> Result<Resp, CallError> {
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
    id: Id,
    rx: oneshot::Receiver<Result<Envelope, CallError>>,
    deadline: tokio::time::Instant,
    timeout: Duration,
    target: Arc<str>,
    inner: Weak<Inner>,
    _t: PhantomData<fn() -> Resp>,
}

impl<Resp: DeserializeOwned> PendingReply<Resp> {
    /// The request's message id.
    pub fn id(&self) -> Id {
        self.id
    }

    /// Waits for the reply until the call's deadline.
    pub async fn recv(mut self) -> Result<Resp, CallError> {
        // The node's deadline sweeper answers with `Timeout` when the deadline passes.
        match (&mut self.rx).await {
            Ok(r) => decode_reply(r?),
            Err(_) => Err(CallError::Shutdown),
        }
    }

    /// The reply if it has arrived (`None` while still waiting). After the deadline it
    /// returns the timeout error.
    pub fn try_recv(&mut self) -> Option<Result<Resp, CallError>> {
        match self.rx.try_recv() {
            Ok(r) => Some(r.and_then(decode_reply)),
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(CallError::Shutdown)),
            Err(oneshot::error::TryRecvError::Empty) => {
                if tokio::time::Instant::now() >= self.deadline {
                    Some(Err(CallError::Timeout {
                        target: self.target.to_string(),
                        timeout: self.timeout,
                    }))
                } else {
                    None
                }
            }
        }
    }
}

impl<Resp> Drop for PendingReply<Resp> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.pending.lock().remove(&self.id);
        }
    }
}

/// One event received by a [`Subscription`].
#[derive(Debug, Clone, PartialEq)]
pub struct Event<T> {
    /// Its topic.
    pub topic: String,
    /// The publishing node.
    pub publisher: Id,
    /// Its sequence number on that publisher's topic.
    pub seq: u64,
    /// How many events of this publisher on this topic were missed just before this
    /// one (0 normally; counted from the first event this subscription saw).
    pub missed: u64,
    /// The decoded value.
    pub value: T,
}

/// A typed subscription to events by topic prefix. Dropping it unsubscribes.
pub struct Subscription<T> {
    id: u64,
    prefix: String,
    rx: mpsc::Receiver<Envelope>,
    last: HashMap<(Id, String), u64>,
    inner: Weak<Inner>,
    _t: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Subscription<T> {
    /// The next event; `None` once the node has shut down. An event whose payload does
    /// not decode as `T` is returned as an error (and still counted for sequencing).
    pub async fn recv(&mut self) -> Option<Result<Event<T>, CodecError>> {
        let env = self.rx.recv().await?;
        let h = env.header;
        let key = (h.sender, h.target.clone());
        if self.last.len() >= 10_000 && !self.last.contains_key(&key) {
            // Bounded: forget old (publisher, topic) pairs rather than grow for ever.
            self.last.clear();
        }
        let missed = match self.last.insert(key, h.seq) {
            Some(prev) if h.seq > prev => h.seq - prev - 1,
            _ => 0,
        };
        Some(codec::decode_payload(&env.payload).map(|value| Event {
            topic: h.target,
            publisher: h.sender,
            seq: h.seq,
            missed,
            value,
        }))
    }

    /// The prefix subscribed to.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl<T> Drop for Subscription<T> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.subs.write().retain(|s| s.id != self.id);
            inner.subscriber.unsubscribe(self.prefix.as_bytes());
        }
    }
}

/// Options of a gather.
#[derive(Debug, Clone)]
pub struct GatherOptions {
    /// How long to collect replies.
    pub within: Duration,
    /// Finish as soon as this many replies are in.
    pub quorum: Option<usize>,
    /// Version asked of responders.
    pub version: Option<Version>,
}

impl GatherOptions {
    /// Collect for `within`.
    pub fn within(within: Duration) -> Self {
        GatherOptions {
            within,
            quorum: None,
            version: None,
        }
    }

    /// Finish early once `n` replies are in.
    pub fn quorum(mut self, n: usize) -> Self {
        self.quorum = Some(n);
        self
    }
}

/// One responder's answer to a gather.
#[derive(Debug, Clone, PartialEq)]
pub struct GatherReply<T> {
    /// Who answered.
    pub from: Id,
    /// Its name, from the peer table.
    pub name: String,
    /// Time from publishing to this reply.
    pub elapsed: Duration,
    /// The decoded reply, or the remote or decode error.
    pub result: Result<T, CallError>,
}

/// Why a gather stopped collecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatherEnd {
    /// Every expected responder answered.
    AllAnswered,
    /// The quorum was reached.
    Quorum,
    /// The deadline passed.
    Deadline,
}

/// What a gather collected.
#[derive(Debug, Clone, PartialEq)]
pub struct GatherOutcome<T> {
    /// Every reply, in arrival order.
    pub replies: Vec<GatherReply<T>>,
    /// Expected responders (id, name) that stayed silent.
    pub silent: Vec<(Id, String)>,
    /// Why it stopped.
    pub end: GatherEnd,
}

/// A gather in progress: replies arrive as a stream ([`Gather::next`]) until the
/// deadline, until every expected responder answered, or until the quorum.
pub struct Gather<T> {
    id: Id,
    rx: mpsc::Receiver<Envelope>,
    started: Instant,
    /// One timer for the whole gather, however many replies are awaited.
    deadline: Pin<Box<tokio::time::Sleep>>,
    quorum: Option<usize>,
    expected: Vec<(Id, String)>,
    answered: Vec<Id>,
    finished: Option<GatherEnd>,
    inner: Weak<Inner>,
    _t: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Gather<T> {
    /// The responders expected (id, name), from the peer table when it was published.
    pub fn expected(&self) -> &[(Id, String)] {
        &self.expected
    }

    /// The next reply, or `None` once the gather has ended.
    pub async fn next(&mut self) -> Option<GatherReply<T>> {
        if self.finished.is_some() {
            return None;
        }
        loop {
            let got = tokio::select! {
                biased;
                r = self.rx.recv() => r,
                _ = &mut self.deadline => None,
            };
            let Some(env) = got else {
                self.finished = Some(GatherEnd::Deadline);
                return None;
            };
            let from = env.header.sender;
            if self.answered.contains(&from) || !self.expected.iter().any(|(id, _)| *id == from) {
                continue; // one reply per expected responder; others do not count
            }
            self.answered.push(from);
            let name = self
                .expected
                .iter()
                .find(|(id, _)| *id == from)
                .map(|(_, n)| n.clone())
                .unwrap_or_default();
            let reply = GatherReply {
                from,
                name,
                elapsed: self.started.elapsed(),
                result: decode_reply(env),
            };
            if self.quorum.is_some_and(|q| self.answered.len() >= q) {
                self.finished = Some(GatherEnd::Quorum);
            } else if self
                .expected
                .iter()
                .all(|(id, _)| self.answered.contains(id))
            {
                self.finished = Some(GatherEnd::AllAnswered);
            }
            return Some(reply);
        }
    }

    /// Collects every remaining reply and reports who stayed silent.
    pub async fn finish(mut self) -> GatherOutcome<T> {
        let mut replies = Vec::new();
        while let Some(r) = self.next().await {
            replies.push(r);
        }
        let silent = self
            .expected
            .iter()
            .filter(|(id, _)| !self.answered.contains(id))
            .cloned()
            .collect();
        GatherOutcome {
            replies,
            silent,
            end: self.finished.unwrap_or(GatherEnd::Deadline),
        }
    }
}

impl<T> Drop for Gather<T> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.gathers.lock().remove(&self.id);
        }
    }
}
