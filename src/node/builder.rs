//! [`NodeBuilder`]: a node's settings, and `start`, which binds its sockets, builds its
//! parts, wires them together and starts their loops. It owns no state once the node
//! runs.

use std::collections::HashMap;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;

use super::admission::AdmitLimits;
use super::balance::Balancing;
use super::breaker::{BreakerConfig, Breakers};
use super::bulkhead::{BulkheadConfig, Bulkheads};
use super::calls::Calls;
use super::cluster_secret::ClusterSecret;
use super::gather::Gathers;
use super::inbound::{self, CoreCell, Inbound};
use super::membership::{Local, Membership, MembershipLimits, Setup};
use super::outbox::{self, Outbox, OutboxConfig};
use super::policy::{self, Policies, ServicePolicy};
use super::pubsub::{self, PubSub};
use super::registry::Registry;
use super::respond::Responder;
use super::security::{KeyBook, Security};
use super::{Core, Lifecycle, Node, NodeError};
use crate::codec::Id;
use crate::discovery::{Announcement, DnsSeed, Mdns, MdnsConfig};
use crate::transport::curve::CurveKeys;
use crate::transport::{Endpoint, Publisher, Router, SocketOptions, Subscriber};

/// Builds a [`Node`].
#[derive(Debug, Clone)]
#[must_use]
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
    max_in_flight_per_connection: usize,
    max_in_flight_per_source: usize,
    max_in_flight_bytes: usize,
    breakers: Option<BreakerConfig>,
    /// Same-host peers over Unix domain sockets (see [`NodeBuilder::ipc`]).
    ipc: bool,
    balancing: Balancing,
    bulkhead: Option<BulkheadConfig>,
    services: HashMap<String, ServicePolicy>,
    limits: MembershipLimits,
    socket: SocketOptions,
    security: Option<Security>,
    /// Client keys let in (secured nodes); empty: any.
    allowed: HashSet<[u8; 32]>,
    /// The secret every member of the cluster holds (secured nodes).
    cluster_secret: Option<ClusterSecret>,
    /// Running without security was chosen (see [`NodeBuilder::insecure`]).
    insecure: bool,
    /// Keys of static peers' endpoints (secured nodes).
    peer_keys: Vec<(String, [u8; 32])>,
    outbox: OutboxConfig,
}

impl NodeBuilder {
    pub(super) fn new(name: String) -> Self {
        NodeBuilder {
            name,
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
            max_in_flight_per_connection: 256,
            max_in_flight_per_source: 2048,
            max_in_flight_bytes: 256 << 20,
            breakers: Some(BreakerConfig::default()),
            ipc: true,
            balancing: Balancing::default(),
            bulkhead: None,
            services: HashMap::new(),
            limits: MembershipLimits::default(),
            socket: SocketOptions::default(),
            security: None,
            allowed: HashSet::new(),
            cluster_secret: None,
            insecure: false,
            peer_keys: Vec::new(),
            outbox: OutboxConfig::default(),
        }
    }

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

    /// Whether peers on this host reach this node over a Unix domain socket (`ipc://`)
    /// rather than TCP, and it reaches them so (default: yes, where the platform allows:
    /// Linux). The socket is `$XDG_RUNTIME_DIR/peerwire/<id>.sock` (else
    /// `/tmp/peerwire-UID/`), announced in the HELLO by a host key that only nodes of the
    /// same boot, network namespace and directory share (PROTOCOL.md section 10b). A peer
    /// dials it when it learns this node from a HELLO; a seed it was given is dialled as
    /// given (TCP).
    pub fn ipc(mut self, on: bool) -> Self {
        self.ipc = on;
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

    /// Deadline of calls that set none and whose service has none of its own
    /// ([`ServicePolicy::timeout`]) (default 5 s).
    pub fn default_timeout(mut self, t: Duration) -> Self {
        self.default_timeout = t;
        self
    }

    /// How long [`Node::shutdown`] may take in all (default 5 s): telling the peers it is
    /// leaving (at most 1 s), serving what they sent before they knew (at most 500 ms),
    /// and letting the handlers in flight finish with what is left.
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

    /// Most peer endpoints the node dials (default 1024), however it learned of them:
    /// static peers, HELLOs, gossip, mDNS, DNS. Past it, new peers are refused (counted
    /// in [`NodeStats::hellos_refused`](super::NodeStats::hellos_refused)) until others
    /// are forgotten.
    pub fn max_peers(mut self, n: usize) -> Self {
        self.limits.max_peers = n.max(1);
        self
    }

    /// Every bound on what peers can make the membership do (peers, catalogs, HELLO and
    /// dial rates); see [`MembershipLimits`] for each default.
    pub fn limits(mut self, limits: MembershipLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Most handlers that await running at once for one caller connection (default
    /// 256), so that one caller connection cannot take every slot of
    /// [`max_in_flight`](Self::max_in_flight).
    /// Past it a request is answered `overloaded` (a notification dropped) at once, and
    /// counted in [`NodeStats::overloaded`](super::NodeStats::overloaded).
    pub fn max_in_flight_per_connection(mut self, n: usize) -> Self {
        self.max_in_flight_per_connection = n.max(1);
        self
    }

    /// Most handlers that await running at once for callers from one address (default
    /// 2048; IPv6 addresses counted per /64), so that a caller opening many connections
    /// still cannot take every slot of [`max_in_flight`](Self::max_in_flight). Past it
    /// a request is answered `overloaded` at once, and counted in
    /// [`NodeStats::overloaded`](super::NodeStats::overloaded).
    pub fn max_in_flight_per_source(mut self, n: usize) -> Self {
        self.max_in_flight_per_source = n.max(1);
        self
    }

    /// Most request bytes held by handlers that await, all callers together (default
    /// 256 MiB), and a quarter of it for callers from one address: requests waiting on
    /// slow handlers cannot hold unbounded memory. Past it a request is answered
    /// `overloaded` at once (counted in
    /// [`NodeStats::overloaded`](super::NodeStats::overloaded)); a single request larger
    /// than the bound still runs when nothing else is held.
    pub fn max_in_flight_bytes(mut self, n: usize) -> Self {
        self.max_in_flight_bytes = n;
        self
    }

    /// How the circuit breaker of each service instance this node calls judges it,
    /// unless its service sets its own ([`ServicePolicy::breaker`]; see
    /// [`BreakerConfig`] for the defaults). On by default.
    pub fn breakers(mut self, config: BreakerConfig) -> Self {
        self.breakers = Some(config);
        self
    }

    /// A bulkhead for every service this node calls that has none of its own (default:
    /// none, no bound).
    pub fn bulkhead(mut self, config: BulkheadConfig) -> Self {
        self.bulkhead = Some(config);
        self
    }

    /// How calls to `service` (a target's part before its first dot) are made when
    /// the caller does not say otherwise: its deadline, retries, breaker, bulkhead and
    /// balancing (see [`ServicePolicy`]). Replaces an earlier policy for it.
    pub fn service(mut self, service: impl Into<String>, policy: ServicePolicy) -> Self {
        self.services.insert(service.into(), policy);
        self
    }

    /// Bounds of the outbox ([`Node::deliver`]) and whether it is kept on disk, so that
    /// what was not delivered survives a restart (default: in memory).
    pub fn outbox(mut self, config: OutboxConfig) -> Self {
        self.outbox = config;
        self
    }

    /// How calls choose among the instances of a service that sets no policy of its own
    /// (default round robin).
    pub fn balancing(mut self, balancing: Balancing) -> Self {
        self.balancing = balancing;
        self
    }

    /// No circuit breakers for services that do not set their own
    /// ([`ServicePolicy::breaker`]): every call goes to an instance, however it has fared.
    pub fn no_breakers(mut self) -> Self {
        self.breakers = None;
        self
    }

    /// Secures the node with CURVE (authenticated, encrypted connections, as ZeroMQ's
    /// CURVE mechanism): its id becomes a hash of `keys`' public key, so no other node
    /// can claim it; a HELLO whose node id is not the one its connection's key proves is
    /// refused (counted in `hellos_refused`). Any client key is let in unless
    /// [`allow`](Self::allow) lists them. A secured node dials only peers whose key it
    /// knows: static peers given with [`peer_with_key`](Self::peer_with_key), and
    /// peers that connected to it (their key proven by their handshake). Nodes without
    /// CURVE cannot connect to it, nor it to them.
    pub fn secure(mut self, keys: CurveKeys) -> Self {
        self.security = Some(Security {
            keys,
            allowed: None,
            cluster: None,
        });
        self
    }

    /// Runs the node without security (ZeroMQ's NULL mechanism): anyone who can reach
    /// its ports can call it, read its traffic and claim any node id. Security is never
    /// off by omission: [`start`](Self::start) refuses a node that is neither
    /// [`secure`](Self::secure), given a [`cluster_secret`](Self::cluster_secret), nor
    /// made insecure with this. A node that is secured as well ignores it. An insecure
    /// node logs a warning when it starts (target `peerwire::insecure`).
    pub fn insecure(mut self) -> Self {
        self.insecure = true;
        self
    }

    /// Makes membership of the cluster a matter of holding `secret` (see SECURITY.md):
    /// every member's accepting sockets prove a key pair derived from it, so that only
    /// a member can complete a handshake with another, either way: an outsider (or a
    /// node of another cluster) fails in the handshake and learns nothing, not even a
    /// node id. A member proves its own key too, so ids stay its own. Peers need no
    /// per-peer key ([`peer`](Self::peer) and DNS seeds are enough). Implies
    /// [`secure`](Self::secure), with a key pair for this run unless one is given;
    /// combines with [`allow`](Self::allow) (a member must also be listed).
    pub fn cluster_secret(mut self, secret: ClusterSecret) -> Self {
        self.cluster_secret = Some(secret);
        self
    }

    /// Lets in only the listed client keys (repeatable), and dials only peers holding
    /// one of them; for a node made [`secure`](Self::secure) (a node that is not
    /// refuses to start with a list). Other clients are refused in the handshake, before
    /// they learn anything (counted as `not_authorized` in the sockets' violations).
    pub fn allow(mut self, key: [u8; 32]) -> Self {
        self.allowed.insert(key);
        self
    }

    /// A static peer of a secured node, with the public key it must prove.
    pub fn peer_with_key(mut self, endpoint: impl Into<String>, key: [u8; 32]) -> Self {
        let endpoint = endpoint.into();
        self.peers.push(endpoint.clone());
        self.peer_keys.push((endpoint, key));
        self
    }

    /// Transport options for every socket of the node.
    pub fn socket_options(mut self, opts: SocketOptions) -> Self {
        self.socket = opts;
        self
    }

    /// Binds the sockets, connects to the static peers and starts the node.
    pub async fn start(mut self) -> Result<Node, NodeError> {
        if self.cluster.is_empty() || self.cluster.len() > crate::discovery::MAX_CLUSTER_LEN {
            return Err(NodeError::Config(format!(
                "the cluster name must be 1 to {} bytes, not {}",
                crate::discovery::MAX_CLUSTER_LEN,
                self.cluster.len()
            )));
        }
        let static_peers = self
            .peers
            .iter()
            .map(|p| Endpoint::parse(p))
            .collect::<Result<Vec<Endpoint>, _>>()?;
        if self.security.is_none() && self.cluster_secret.is_none() {
            if !self.insecure {
                return Err(NodeError::Config(
                    "no security chosen: NodeBuilder::secure(keys) or cluster_secret(secret), \
                     or insecure() to run without (anyone who reaches the node can then call \
                     it, read its traffic and claim any node id)"
                        .into(),
                ));
            }
            tracing::warn!(
                target: "peerwire::insecure",
                node = %self.name.escape_debug(),
                "running without security (NodeBuilder::insecure): anyone who can reach this \
                 node's ports can call it, read its traffic and claim any node id"
            );
        }
        if let Some(secret) = &self.cluster_secret {
            let security = self.security.get_or_insert_with(|| Security {
                keys: CurveKeys::generate(),
                allowed: None,
                cluster: None,
            });
            security.cluster = Some(secret.cluster_keys());
        }
        if !self.allowed.is_empty() {
            match &mut self.security {
                Some(s) => s.allowed = Some(Arc::new(self.allowed.clone())),
                None => {
                    return Err(NodeError::Config(
                        "an allow list needs a secured node (NodeBuilder::secure)".into(),
                    ))
                }
            }
        }
        // Before any socket: a file that cannot be opened fails the start cleanly.
        let max_payload = self.socket.max_message_size.min(self.socket.max_frame_size);
        let outbox = Arc::new(Outbox::open(self.outbox.clone(), max_payload)?);
        let id = self.security.as_ref().map_or_else(Id::new, |s| s.id());
        let keys = self.security.as_ref().map(|s| {
            Arc::new(match s.cluster {
                Some(_) => KeyBook::for_cluster(),
                None => KeyBook::default(),
            })
        });
        for (endpoint, key) in &self.peer_keys {
            if let Some(book) = &keys {
                book.given(Endpoint::parse(endpoint)?, *key);
            }
        }
        // Accepting sockets prove our key; dialling ones expect each peer's.
        let (server_opts, client_opts) = match (&self.security, &keys) {
            (Some(s), Some(book)) => (
                s.server(self.socket.clone()),
                s.client(self.socket.clone(), book),
            ),
            _ => (self.socket.clone(), self.socket.clone()),
        };
        let host = self.host.unwrap_or(match &self.mdns {
            Some(m) if m.reaches_other_hosts() => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
        });
        // Requests are dispatched inline by the sockets' connection tasks (no task hop);
        // the node is not built yet, so the dispatchers find it through this cell, and
        // decline (queue for the inbound loops) until it is there.
        let cell: CoreCell = Arc::new(OnceLock::new());
        let router = Router::bind_with_handler(
            SocketAddr::new(host, self.router_port),
            server_opts.clone(),
            inbound::router_handler(cell.clone()),
        )
        .await?;
        // Same-host peers: the ROUTER also at its ipc socket (a node that cannot bind it
        // keeps to TCP, and does not announce it).
        let mut ipc = if self.ipc {
            super::ipc::LocalIpc::detect()
        } else {
            None
        };
        if let Some(local) = &ipc {
            if let Err(e) = router.bind_also(local.endpoint_of(id)).await {
                tracing::warn!(error = %e, "no ipc socket for same-host peers (TCP only)");
                ipc = None;
            }
        }
        let publisher = Publisher::bind(SocketAddr::new(host, self.pub_port), server_opts).await?;
        // The SUB announces our node id, so a publisher can tell which peers subscribe.
        let subscriber = Subscriber::with_handler(
            client_opts
                .clone()
                .with_identity(Some(Bytes::copy_from_slice(id.0.as_bytes()))),
            inbound::subscriber_handler(cell.clone()),
        );
        // Subscribed before any message can be dispatched (the cell is still empty).
        let router_events = router.events();
        // Our label first: every PUB we connect to learns which node this SUB is.
        subscriber.subscribe(pubsub::label(id));
        let (router, publisher, subscriber) =
            (Arc::new(router), Arc::new(publisher), Arc::new(subscriber));
        let life = Lifecycle {
            cancel: tokio_util::sync::CancellationToken::new(),
            leave: tokio_util::sync::CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
        };
        let calls = Arc::new(Calls::default());
        let registry = Arc::new(Registry::default());
        let local = Local {
            id,
            name: self.name,
            cluster: self.cluster,
            host,
            router_port: router.local_addr().port(),
            pub_port: publisher.local_addr().port(),
            key: self.security.as_ref().map(|s| s.keys.public()),
        };
        let membership = Arc::new(Membership::new(Setup {
            local,
            registry: registry.clone(),
            calls: calls.clone(),
            subscriber: subscriber.clone(),
            socket: client_opts,
            dealer_sink: inbound::dealer_sink(cell.clone()),
            life: life.clone(),
            forget_after: self.forget_after,
            static_endpoints: static_peers.iter().cloned().collect::<HashSet<_>>(),
            limits: self.limits,
            keys,
            ipc,
        }));
        membership.start_announcer();
        let core = Arc::new(Core {
            life: life.clone(),
            policies: Policies::new(self.default_timeout, self.balancing, self.services.clone()),
            drain_timeout: self.drain_timeout,
            pubsub: Arc::new(PubSub::new(id, publisher.clone(), subscriber.clone())),
            breakers: Breakers::new(self.breakers.clone(), policy::breakers_of(&self.services)),
            bulkheads: Bulkheads::new(self.bulkhead, policy::bulkheads_of(&self.services)),
            retry_budget: Default::default(),
            fallbacks: Default::default(),
            router,
            publisher,
            subscriber,
            calls: calls.clone(),
            registry,
            membership: membership.clone(),
            gathers: Arc::new(Gathers::default()),
            responder: Responder::new(
                id,
                self.max_in_flight,
                AdmitLimits {
                    per_connection: self.max_in_flight_per_connection,
                    per_source: self.max_in_flight_per_source,
                    bytes: self.max_in_flight_bytes,
                },
            ),
            inbound: Inbound::default(),
            outbox: outbox.clone(),
            stopped: tokio::sync::OnceCell::new(),
        });
        membership.watch_router(&core.router, router_events);
        let weak = Arc::downgrade(&core);
        let _ = cell.set(weak.clone());
        core.responder.set_core(weak.clone());
        let cancel = &life.cancel;
        life.tasks
            .spawn(inbound::declined_loop(weak.clone(), cancel.clone(), true));
        life.tasks
            .spawn(inbound::declined_loop(weak.clone(), cancel.clone(), false));
        life.tasks.spawn(outbox::run(weak, outbox, cancel.clone()));
        life.tasks
            .spawn(Calls::deadline_loop(Arc::downgrade(&calls), cancel.clone()));
        let node = Node { core };
        // Discovery first: if it is refused, nothing has been dialled yet. Whatever did
        // start is shut down before the error is returned.
        let mdns = match &self.mdns {
            Some(cfg) => {
                let l = membership.local();
                let me = Announcement {
                    node_id: l.id,
                    name: l.name.clone(),
                    cluster: l.cluster.clone(),
                    router_port: l.router_port,
                    pub_port: l.pub_port,
                    key: l.key,
                };
                match Mdns::start(cfg, &me) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        node.shutdown().await;
                        return Err(e.into());
                    }
                }
            }
            None => None,
        };
        for p in &static_peers {
            if let Err(e) = membership.dial(p, super::membership::NamedBy::Direct) {
                if let Some(m) = mdns {
                    m.stop().await;
                }
                node.shutdown().await;
                return Err(e.into());
            }
        }
        if let Some(mdns) = mdns {
            membership.follow_mdns(mdns);
        }
        if !self.dns.is_empty() {
            membership.follow_dns(self.dns, self.dns_every);
        }
        Ok(node)
    }
}
