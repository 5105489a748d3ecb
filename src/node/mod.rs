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

mod discover;
mod dispatch;
mod handlers;
mod handles;
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
use crate::discovery::{Announcement, DiscoveryError, DnsSeed, Mdns, MdnsConfig};
use crate::transport::{
    Dealer, Message, MessageHandler, PublishReport, Publisher, Router, SendError, SocketEvent,
    SocketOptions, Subscriber, TransportError,
};

pub use handlers::{Context, HandlerError};
pub use handles::{
    Event, Gather, GatherEnd, GatherOptions, GatherOutcome, GatherReply, PendingReply, Subscription,
};
pub use peers::{PeerInfo, Presence, PresenceEvent};

use dispatch::{
    deadline_loop, far_instant_after, router_handler, router_loop, subscriber_handler,
    subscriber_loop, IdHash,
};
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
    /// A discovery source could not start (mDNS with no usable interface, say).
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The builder was given a setting the node cannot use.
    #[error("{0}")]
    Config(String),
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
    host: Option<IpAddr>,
    router_port: u16,
    pub_port: u16,
    peers: Vec<String>,
    mdns: Option<MdnsConfig>,
    dns: Vec<DnsSeed>,
    dns_every: Duration,
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

    /// Address to listen on. Default: 127.0.0.1 (nothing leaves the host unless asked),
    /// or 0.0.0.0 when mDNS is on for interfaces other than loopback.
    pub fn listen(mut self, host: IpAddr) -> Self {
        self.host = Some(host);
        self
    }

    /// Finds peers (and is found) by mDNS on the interfaces `cfg` selects. Off unless
    /// set: a library should not multicast on every interface without being asked (the
    /// `peerwire` command turns it on by default).
    pub fn mdns(mut self, cfg: MdnsConfig) -> Self {
        self.mdns = Some(cfg);
        self
    }

    /// A DNS name whose every address is a peer (`NAME:PORT`), resolved at start and
    /// then every [`dns_every`](Self::dns_every). Repeatable.
    pub fn dns(mut self, seed: DnsSeed) -> Self {
        self.dns.push(seed);
        self
    }

    /// How often DNS seeds are resolved again (default 5 s). Addresses that disappear
    /// from the answer are forgotten.
    pub fn dns_every(mut self, every: Duration) -> Self {
        self.dns_every = every.max(Duration::from_millis(100));
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
        if self.cluster.is_empty() || self.cluster.len() > crate::discovery::MAX_CLUSTER_LEN {
            return Err(NodeError::Config(format!(
                "the cluster name must be 1 to {} bytes, not {}",
                crate::discovery::MAX_CLUSTER_LEN,
                self.cluster.len()
            )));
        }
        let id = Id::new();
        let host = self.host.unwrap_or(match &self.mdns {
            Some(m) if m.reaches_other_hosts() => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
        });
        // Requests are dispatched inline by the ROUTER's connection tasks (no task hop);
        // the node is not built yet, so the handler finds it through this cell, and
        // declines (queues for `router_loop`) until it is there.
        let cell: Arc<std::sync::OnceLock<Weak<Inner>>> = Arc::new(std::sync::OnceLock::new());
        let router = Router::bind_with_handler(
            &format!(
                "tcp://{}",
                std::net::SocketAddr::new(host, self.router_port)
            ),
            self.socket.clone(),
            router_handler(cell.clone()),
        )
        .await?;
        let publisher = Publisher::bind(
            &format!("tcp://{}", std::net::SocketAddr::new(host, self.pub_port)),
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
            host,
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
            retired: Mutex::new(discover::Retired::default()),
            unannounced: Mutex::new(HashSet::new()),
            cancel: CancellationToken::new(),
            leave: CancellationToken::new(),
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
        // Discovery first: if it is refused, nothing has been dialled yet. Whatever did
        // start is shut down before the error is returned.
        let mdns = match &self.mdns {
            Some(cfg) => {
                let me = Announcement {
                    node_id: inner.id,
                    name: inner.name.clone(),
                    cluster: inner.cluster.clone(),
                    router_port: inner.router_port,
                    pub_port: inner.pub_port,
                };
                match Mdns::start(cfg, &me) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        Node { inner }.shutdown().await;
                        return Err(e.into());
                    }
                }
            }
            None => None,
        };
        for p in &self.peers {
            if let Err(e) = inner.ensure_dealer(p) {
                if let Some(m) = mdns {
                    m.stop().await;
                }
                Node { inner }.shutdown().await;
                return Err(e.into());
            }
        }
        if let Some(mdns) = mdns {
            inner
                .tasks
                .spawn(discover::mdns_loop(Arc::downgrade(&inner), mdns));
        }
        if !self.dns.is_empty() {
            inner.tasks.spawn(discover::dns_loop(
                Arc::downgrade(&inner),
                self.dns,
                self.dns_every,
                inner.leave.clone(),
            ));
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
    other_version: AtomicU64,
    events_dropped: AtomicU64,
}

/// A copy of the node's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Envelopes that could not be decoded (dropped, logged).
    pub malformed: u64,
    /// Envelopes of a kind not expected on the socket they came on (dropped, logged).
    pub unexpected: u64,
    /// HELLOs and mDNS sightings of nodes of another cluster (ignored).
    pub other_cluster: u64,
    /// mDNS sightings of nodes announcing another protocol major version (ignored).
    pub other_version: u64,
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
    /// Node ids that restarted elsewhere: their lingering mDNS records are not dialled.
    retired: Mutex<discover::Retired>,
    /// Endpoints whose mDNS instance went away while still connected: forgotten as soon
    /// as their connection drops, rather than after `forget_after`.
    unannounced: Mutex<HashSet<String>>,
    cancel: CancellationToken,
    /// Cancelled when shutdown starts (before the drain): discovery says goodbye then.
    leave: CancellationToken,
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
    presence: broadcast::Sender<PresenceEvent>,
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
            host: None,
            router_port: 0,
            pub_port: 0,
            peers: Vec::new(),
            mdns: None,
            dns: Vec::new(),
            dns_every: Duration::from_secs(5),
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
        {
            let mut r = self.inner.registry.write();
            r.methods.insert(
                target.to_string(),
                Entry {
                    version,
                    handler: erase(f),
                },
            );
            r.revision += 1;
        }
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
        {
            let mut r = self.inner.registry.write();
            r.gathers.insert(
                topic.to_string(),
                Entry {
                    version,
                    handler: erase(f),
                },
            );
            r.revision += 1;
        }
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

    /// Joined / updated / left events: first a `Joined` for every peer reachable now,
    /// then every change as it happens.
    pub fn presence(&self) -> Presence {
        // Under the table's lock, where events are sent: nothing missed, nothing twice.
        let peers = self.inner.peers.lock();
        let rx = self.inner.presence.subscribe();
        let mut snapshot: Vec<PeerInfo> = peers
            .by_id
            .values()
            .filter(|p| p.info.connected)
            .map(|p| p.info.clone())
            .collect();
        snapshot.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        Presence {
            snapshot: snapshot.into(),
            rx,
        }
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
            // Look up before inserting: no key allocated on every publish.
            match seqs.get_mut(topic) {
                Some(s) => {
                    *s += 1;
                    *s
                }
                None => {
                    seqs.insert(topic.to_string(), 1);
                    1
                }
            }
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
            other_version: c.other_version.load(Relaxed),
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
        // Say goodbye first, so peers stop sending us work while we drain.
        inner.leave.cancel();
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
        self.inner.leave.cancel();
        self.inner.cancel.cancel();
    }
}
