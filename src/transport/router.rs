//! ROUTER: binds, receives `(identity, message)` from every connected peer, and routes
//! replies by identity.

use std::collections::HashMap;
use std::net::SocketAddr;

use super::Endpoint;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;

use super::conn::{
    spawn_listener, Attached, MessageHandler, OutItem, PeerInfo, Role, Shared, Sink, WriteSide,
};
use super::error::{display_identity, ProtocolViolation, RecvError, SendError, TransportError};
use super::inbox::{Inbox, Incoming, Intake, Taken};
use super::queue::{Budget, Queue};
use super::socket::{socket_handle_methods, SocketCore};
use super::{bind, IntoEndpoint, Message, SocketOptions, SocketType};

struct Route {
    conn: Arc<RouteConn>,
    addr: SocketAddr,
    /// With CURVE: the client's long-term public key, as its handshake proved it.
    key: Option<[u8; 32]>,
}

/// What a sender needs of a connection, behind one pointer (one reference count taken
/// per send).
struct RouteConn {
    out: Arc<Queue<OutItem>>,
    side: Arc<WriteSide>,
    alive: AtomicBool,
}

struct RouterRole {
    shared: Arc<Shared>,
    /// When set, received messages go to this function first (see [`Router::bind_with_handler`]).
    handler: Option<MessageHandler>,
    routes: Mutex<HashMap<Bytes, Route>>,
    inbound: Arc<Inbox>,
    next_id: AtomicU32,
    /// What every connection's outgoing queue holds together is bounded by this.
    budget: Arc<Budget>,
}

impl Role for RouterRole {
    fn attach(&self, peer: &PeerInfo) -> Result<Attached, ProtocolViolation> {
        let opts = &self.shared.opts;
        let mut routes = self.routes.lock();
        let identity = if peer.identity.is_empty() {
            // libzmq's scheme: a zero byte then a counter, so generated identities can
            // never collide with announced ones (which may not start with zero).
            loop {
                let mut id = BytesMut::with_capacity(5);
                id.put_u8(0);
                id.put_u32(self.next_id.fetch_add(1, Relaxed));
                let id = id.freeze();
                if !routes.contains_key(&id) {
                    break id;
                }
            }
        } else {
            if peer.identity.len() > 255 || peer.identity[0] == 0 {
                return Err(ProtocolViolation::InvalidIdentity);
            }
            if routes.contains_key(&peer.identity) {
                // libzmq's default (no ROUTER_HANDOVER): the newcomer is refused and the
                // established connection keeps its identity.
                return Err(ProtocolViolation::IdentityInUse(display_identity(
                    &peer.identity,
                )));
            }
            peer.identity.clone()
        };
        let lane = self.inbound.lane();
        let out = Arc::new(Queue::with_budget(
            opts.send_queue_messages,
            opts.send_queue_bytes,
            self.budget.clone(),
        ));
        let side = Arc::<WriteSide>::default();
        routes.insert(
            identity.clone(),
            Route {
                conn: Arc::new(RouteConn {
                    out: out.clone(),
                    side: side.clone(),
                    alive: AtomicBool::new(true),
                }),
                addr: peer.addr,
                key: peer.curve_key,
            },
        );
        Ok(Attached {
            out,
            side,
            sink: match &self.handler {
                Some(f) => Sink::Handler(f.clone(), Some(Intake::Lane(lane))),
                None => Sink::Deliver(Intake::Lane(lane)),
            },
            identity,
        })
    }

    fn detach(&self, _peer: &PeerInfo, att: &Attached) {
        att.sink.detach();
        let mut routes = self.routes.lock();
        if let Some(r) = routes.get(&att.identity) {
            if Arc::ptr_eq(&r.conn.out, &att.out) {
                r.conn.alive.store(false, Relaxed);
                r.conn.out.wake_writers();
                let dropped = r.conn.out.clear();
                self.shared.stats.dropped.fetch_add(dropped as u64, Relaxed);
                routes.remove(&att.identity);
            }
        }
    }
}

/// A connected peer of a [`Router`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerSummary {
    /// Its identity.
    pub identity: Bytes,
    /// Its address.
    pub addr: SocketAddr,
    /// Messages queued for it and not yet written.
    pub queued_messages: usize,
    /// Bytes queued for it and not yet written.
    pub queued_bytes: usize,
}

/// A ROUTER socket. See the [module documentation](super).
///
/// Dropping it closes every connection (without waiting); [`Router::close`] also waits
/// for queued messages to be flushed, up to the linger time.
pub struct Router {
    /// First, so that it closes the socket before anything else of the handle goes.
    core: SocketCore,
    role: Arc<RouterRole>,
    local_addr: SocketAddr,
    local_endpoint: Endpoint,
}

impl Router {
    /// Binds to `endpoint` (`tcp://host:port`, see [`IntoEndpoint`]; port 0 picks a free
    /// one).
    pub async fn bind(
        endpoint: impl IntoEndpoint,
        opts: SocketOptions,
    ) -> Result<Router, TransportError> {
        Self::start(endpoint, opts, None).await
    }

    /// Like [`Router::bind`], but each received message is first offered to `handler`,
    /// called inline by its connection's task with the sender's identity (quick, never
    /// blocking). Messages it declines (returns) are queued for [`Router::recv`]. This
    /// saves a task hop per message for a caller that dispatches (the node does).
    pub async fn bind_with_handler(
        endpoint: impl IntoEndpoint,
        opts: SocketOptions,
        handler: MessageHandler,
    ) -> Result<Router, TransportError> {
        Self::start(endpoint, opts, Some(handler)).await
    }

    async fn start(
        endpoint: impl IntoEndpoint,
        opts: SocketOptions,
        handler: Option<MessageHandler>,
    ) -> Result<Router, TransportError> {
        let listener = bind(&endpoint.into_endpoint()?).await?;
        let local_addr = listener.local_addr()?;
        let local_endpoint = listener.local_endpoint()?;
        let inbound = Inbox::new(opts.recv_queue_messages, opts.recv_queue_bytes);
        let shared = Shared::new(opts, SocketType::Router);
        let core = SocketCore::new(shared.clone(), Some(Incoming::Inbox(inbound.clone())));
        let role = Arc::new(RouterRole {
            shared: shared.clone(),
            handler,
            routes: Mutex::new(HashMap::new()),
            inbound,
            next_id: AtomicU32::new(fastrand::u32(..)),
            budget: Arc::new(Budget::new(shared.opts.send_queue_total_bytes)),
        });
        spawn_listener(listener, shared, role.clone());
        Ok(Router {
            role,
            core,
            local_addr,
            local_endpoint,
        })
    }

    /// The address the listener is bound to (for an `ipc://` socket, which has none,
    /// 127.0.0.1 port 0: see [`local_endpoint`](Self::local_endpoint)).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The endpoint the listener is bound to (a port chosen by the system filled in), as
    /// a peer would connect to it.
    pub fn local_endpoint(&self) -> Endpoint {
        self.local_endpoint.clone()
    }

    /// Also accepts connections at `endpoint` (an `ipc://` path beside a `tcp://` port,
    /// say), until the socket closes, with the same connection limits (counted for this
    /// listener on its own). Returns it as bound.
    pub async fn bind_also(&self, endpoint: impl IntoEndpoint) -> Result<Endpoint, TransportError> {
        let listener = bind(&endpoint.into_endpoint()?).await?;
        let bound = listener.local_endpoint()?;
        spawn_listener(listener, self.core.shared().clone(), self.role.clone());
        Ok(bound)
    }

    /// Whether no received message is waiting for [`Router::recv`].
    pub fn is_recv_queue_empty(&self) -> bool {
        self.role.inbound.len() == 0
    }

    /// Receives the next message and the identity of the peer that sent it.
    pub async fn recv(&self) -> Result<(Bytes, Message), RecvError> {
        match self.role.inbound.pop().await {
            Some(i) => Ok((i.identity, i.msg)),
            None => Err(RecvError::Closed),
        }
    }

    /// [`Router::recv`], with when the message arrived if an inline handler declined it
    /// (it waited in the queue since).
    /// The [`Taken`] keeps the connection's later messages from its inline handler
    /// until it is dropped (after the message is dispatched), so order is kept.
    pub(crate) async fn recv_declined(
        &self,
    ) -> Result<(Bytes, Message, Option<std::time::Instant>, Taken), RecvError> {
        match self.role.inbound.take().await {
            Some((i, taken)) => Ok((i.identity, i.msg, i.arrived, taken)),
            None => Err(RecvError::Closed),
        }
    }

    /// Queues `msg` for the peer with `identity`, waiting for room while that peer's
    /// queue is full. Fails if no such peer is connected (or it disconnects while we wait).
    pub async fn send(&self, identity: &[u8], msg: Message) -> Result<(), SendError> {
        msg.check(&self.role.shared.opts)?;
        let mut c = self.route(identity)?;
        let mut item = match c
            .side
            .try_send(OutItem::Msg(msg), &c.out, &self.role.shared)
        {
            Ok(()) => return Ok(()),
            Err(item) => item,
        };
        loop {
            match c.out.try_push(item) {
                Ok(()) => return Ok(()),
                // Room in the total comes from other connections' writes, which this
                // connection's queue would not wake us for: fail now rather than wait.
                Err((_, u)) if u.over_budget => {
                    return Err(SendError::BudgetSpent {
                        used: self.role.budget.used(),
                    })
                }
                Err((back, _)) => item = back,
            }
            if !c.alive.load(Relaxed) {
                return Err(SendError::UnknownPeer(display_identity(identity)));
            }
            c.out.writable().await;
            c = self.route(identity)?;
        }
    }

    /// Queues `msg` for the peer with `identity` without waiting: fails with
    /// [`SendError::QueueFull`] if its queue is at a bound.
    pub fn try_send(&self, identity: &[u8], msg: Message) -> Result<(), SendError> {
        self.try_send_or_back(identity, msg).map_err(|(e, _)| e)
    }

    /// [`Router::try_send`], giving the message back when it fails (for a caller that
    /// may try again, and would otherwise keep a clone of every message it sends).
    // Large only when it fails, which is rare; boxing would allocate on that path alone,
    // and the success path returns no more than a tag either way.
    #[allow(clippy::result_large_err)]
    pub(crate) fn try_send_or_back(
        &self,
        identity: &[u8],
        msg: Message,
    ) -> Result<(), (SendError, Message)> {
        if let Err(e) = msg.check(&self.role.shared.opts) {
            return Err((e, msg));
        }
        let c = match self.route(identity) {
            Ok(c) => c,
            Err(e) => return Err((e, msg)),
        };
        let Err(item) = c
            .side
            .try_send(OutItem::Msg(msg), &c.out, &self.role.shared)
        else {
            return Ok(());
        };
        c.out.try_push(item).map_err(|(item, u)| {
            let e = if u.over_budget {
                SendError::BudgetSpent {
                    used: self.role.budget.used(),
                }
            } else {
                SendError::QueueFull {
                    messages: u.count,
                    bytes: u.bytes,
                    connected: true,
                }
            };
            match item {
                OutItem::Msg(m) => (e, m),
                _ => unreachable!("a message was pushed"),
            }
        })
    }

    /// The queue, writer and liveness of the connection with `identity`.
    fn route(&self, identity: &[u8]) -> Result<Arc<RouteConn>, SendError> {
        let routes = self.role.routes.lock();
        let r = routes
            .get(identity)
            .ok_or_else(|| SendError::UnknownPeer(display_identity(identity)))?;
        Ok(r.conn.clone())
    }

    /// The peers connected now.
    pub fn peers(&self) -> Vec<PeerSummary> {
        self.role
            .routes
            .lock()
            .iter()
            .map(|(id, r)| {
                let u = r.conn.out.usage();
                PeerSummary {
                    identity: id.clone(),
                    addr: r.addr,
                    queued_messages: u.count,
                    queued_bytes: u.bytes,
                }
            })
            .collect()
    }

    /// The address of the connected peer with `identity`, if any.
    pub fn peer_addr(&self, identity: &[u8]) -> Option<SocketAddr> {
        self.role.routes.lock().get(identity).map(|r| r.addr)
    }

    /// With CURVE, the long-term public key the peer connected as `identity` proved in
    /// its handshake (what to attribute its messages to); `None` without CURVE or if no
    /// such peer is connected.
    pub fn peer_key(&self, identity: &[u8]) -> Option<[u8; 32]> {
        self.role.routes.lock().get(identity).and_then(|r| r.key)
    }

    /// Closes the connection of one peer, after flushing what is queued for it (at most
    /// the linger time). Returns whether this call closed it: false if no such peer is
    /// connected, or it is already closing.
    pub fn disconnect(&self, identity: &[u8]) -> bool {
        match self.role.routes.lock().get(identity) {
            Some(r) => r.conn.out.interrupt(),
            None => false,
        }
    }

    /// Closes the connection of a peer that is not reading: what is queued for it is
    /// dropped at once (its memory given back), nothing more is queued, nothing flushed.
    /// Returns whether this call closed it.
    pub fn drop_peer(&self, identity: &[u8]) -> bool {
        match self.role.routes.lock().get(identity) {
            Some(r) => super::conn::drop_queue(&r.conn.out),
            None => false,
        }
    }

    /// The socket's queues together are full: drops the peer holding the most, if it
    /// holds more than its share (counted as `slow_dropped`, a `SlowPeerDropped` event).
    /// Returns whether one was dropped.
    pub fn drop_slowest(&self) -> bool {
        let routes = self.role.routes.lock();
        self.role
            .shared
            .drop_slowest(routes.values().map(|r| (&*r.conn.out, r.addr)))
    }
}

socket_handle_methods!(
    Router,
    /// Stops accepting, flushes queued messages for up to the linger time, closes every
    /// connection and waits for their tasks.
    close
);
