//! PUB: binds; sends each message to every subscriber whose prefix filter matches its
//! first frame. A slow subscriber loses messages (counted for it) and never stalls others.

use std::net::SocketAddr;

use super::Endpoint;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;

use super::conn::{spawn_listener, Attached, OutItem, PeerInfo, Role, Shared, Sink, Subscriptions};
use super::error::{ProtocolViolation, SendError, TransportError};
use super::queue::{Budget, Queue};
use super::socket::{socket_handle_methods, SocketCore};
use super::{bind, IntoEndpoint, Message, SocketOptions, SocketType};

struct Subscriber {
    addr: SocketAddr,
    identity: Bytes,
    filter: Arc<Subscriptions>,
    out: Arc<Queue<OutItem>>,
    dropped: AtomicU64,
    delivered: AtomicU64,
}

struct PubRole {
    shared: Arc<Shared>,
    subscribers: RwLock<Vec<Arc<Subscriber>>>,
    /// What every subscriber's queue holds together is bounded by this.
    budget: Arc<Budget>,
}

impl Role for PubRole {
    fn attach(&self, peer: &PeerInfo) -> Result<Attached, ProtocolViolation> {
        let opts = &self.shared.opts;
        let s = Arc::new(Subscriber {
            addr: peer.addr,
            identity: peer.identity.clone(),
            filter: Arc::new(Subscriptions::default()),
            out: Arc::new(Queue::with_budget(
                opts.send_queue_messages,
                opts.send_queue_bytes,
                self.budget.clone(),
            )),
            dropped: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        });
        self.subscribers.write().push(s.clone());
        Ok(Attached {
            out: s.out.clone(),
            side: Arc::default(),
            sink: Sink::Subscriptions(s.filter.clone()),
            identity: peer.identity.clone(),
        })
    }

    fn detach(&self, _peer: &PeerInfo, att: &Attached) {
        self.subscribers
            .write()
            .retain(|s| !Arc::ptr_eq(&s.out, &att.out));
    }
}

/// What one [`Publisher::publish`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishReport {
    /// Subscribers whose filter matched and whose queue took the message.
    pub queued: usize,
    /// Subscribers whose filter matched but whose queue was full: they lose this message.
    pub dropped: usize,
}

/// One subscriber of a [`Publisher`], as seen now.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriberInfo {
    /// Its address.
    pub addr: SocketAddr,
    /// The identity it announced (often empty).
    pub identity: Bytes,
    /// Its prefix filters.
    pub subscriptions: Vec<Bytes>,
    /// Messages queued for it.
    pub queued: usize,
    /// Messages it lost because its queue was full.
    pub dropped: u64,
    /// Messages queued for it in all.
    pub delivered: u64,
}

/// A PUB socket. See the [module documentation](super).
pub struct Publisher {
    /// First, so that it closes the socket before anything else of the handle goes.
    core: SocketCore,
    role: Arc<PubRole>,
    local_addr: SocketAddr,
    local_endpoint: Endpoint,
}

impl Publisher {
    /// Binds to `endpoint` (`tcp://host:port`, see [`IntoEndpoint`]; port 0 picks a free
    /// one).
    pub async fn bind(
        endpoint: impl IntoEndpoint,
        opts: SocketOptions,
    ) -> Result<Publisher, TransportError> {
        let listener = bind(&endpoint.into_endpoint()?).await?;
        let local_addr = listener.local_addr()?;
        let local_endpoint = listener.local_endpoint()?;
        let shared = Shared::new(opts, SocketType::Pub);
        let core = SocketCore::new(shared.clone(), None);
        let role = Arc::new(PubRole {
            shared: shared.clone(),
            subscribers: RwLock::new(Vec::new()),
            budget: Arc::new(Budget::new(shared.opts.send_queue_total_bytes)),
        });
        spawn_listener(listener, shared, role.clone());
        Ok(Publisher {
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

    /// Queues `msg` for every subscriber whose filter matches its first frame. Never
    /// waits: a subscriber whose queue is full loses the message, and that is counted
    /// (in the report, in [`Publisher::subscribers`] and in the socket's `dropped`).
    pub fn publish(&self, msg: Message) -> Result<PublishReport, SendError> {
        msg.check(&self.role.shared.opts)?;
        let mut report = PublishReport::default();
        let mut over_budget = false;
        let first = msg.frames()[0].clone();
        let subscribers = self.role.subscribers.read();
        for s in subscribers.iter() {
            // A subscriber being dropped takes nothing more.
            if s.out.is_interrupted() || !s.filter.matches(&first) {
                continue;
            }
            match s.out.try_push(OutItem::Msg(msg.clone())) {
                Ok(()) => {
                    s.delivered.fetch_add(1, Relaxed);
                    report.queued += 1;
                }
                Err((_, usage)) => {
                    over_budget |= usage.over_budget;
                    s.dropped.fetch_add(1, Relaxed);
                    self.role.shared.stats.dropped.fetch_add(1, Relaxed);
                    report.dropped += 1;
                }
            }
        }
        if over_budget {
            // One slow reader must not make everyone lose messages.
            self.role
                .shared
                .drop_slowest(subscribers.iter().map(|s| (&*s.out, s.addr)));
        }
        Ok(report)
    }

    /// Identities of the subscribers whose filter matches `topic` now (cheaper than
    /// [`Publisher::subscribers`]: nothing but the identities is copied).
    pub fn subscribers_matching(&self, topic: &[u8]) -> Vec<Bytes> {
        self.role
            .subscribers
            .read()
            .iter()
            .filter(|s| s.filter.matches(topic))
            .map(|s| s.identity.clone())
            .collect()
    }

    /// For each subscriber whose filter matches `topic` now: its identity and its labels
    /// (subscriptions starting with a zero byte, which a subscriber uses to say who it is
    /// where its ZeroMQ library sends no identity).
    pub fn subscribers_matching_with_labels(&self, topic: &[u8]) -> Vec<(Bytes, Vec<Bytes>)> {
        self.role
            .subscribers
            .read()
            .iter()
            .filter(|s| s.filter.matches(topic))
            .map(|s| (s.identity.clone(), s.filter.labels()))
            .collect()
    }

    /// The subscribers connected now, with their filters and loss counters.
    pub fn subscribers(&self) -> Vec<SubscriberInfo> {
        self.role
            .subscribers
            .read()
            .iter()
            .map(|s| SubscriberInfo {
                addr: s.addr,
                identity: s.identity.clone(),
                subscriptions: s.filter.list(),
                queued: s.out.usage().count,
                dropped: s.dropped.load(Relaxed),
                delivered: s.delivered.load(Relaxed),
            })
            .collect()
    }
}

socket_handle_methods!(
    Publisher,
    /// Flushes queued messages for up to the linger time and closes every connection.
    close
);
