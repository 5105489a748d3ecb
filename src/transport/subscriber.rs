//! SUB: connects to any number of publishers, keeps every connection up, and re-sends its
//! subscriptions on each new connection.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::conn::{
    spawn_connector, Attached, MessageHandler, OutItem, PeerInfo, Role, Shared, Sink,
};
use super::error::{ProtocolViolation, RecvError, TransportError};
use super::inbox::{Inbox, Incoming, Intake, Taken};
use super::queue::Queue;
use super::socket::{socket_handle_methods, SocketCore};
use super::{Endpoint, IntoEndpoint, Message, SocketOptions, SocketType};

#[derive(Default)]
struct Topics {
    /// Subscribed prefixes (a multiset, as in ZeroMQ).
    prefixes: Vec<Bytes>,
    /// Outgoing queues of the live connections. Kept under the same lock as `prefixes`
    /// so that a connection coming up and a subscribe racing it cannot miss or double
    /// the subscription.
    live: Vec<(std::net::SocketAddr, Arc<Queue<OutItem>>)>,
    /// The connector of each endpoint, to stop it on `disconnect`.
    connectors: std::collections::HashMap<Endpoint, tokio_util::sync::CancellationToken>,
}

struct SubRole {
    shared: Arc<Shared>,
    topics: Mutex<Topics>,
    inbound: Arc<Inbox>,
    /// When set, received messages go to this function first.
    handler: Option<MessageHandler>,
}

impl Role for SubRole {
    fn attach(&self, peer: &PeerInfo) -> Result<Attached, ProtocolViolation> {
        let opts = &self.shared.opts;
        let out = Arc::new(Queue::new(opts.send_queue_messages, opts.send_queue_bytes));
        let mut t = self.topics.lock();
        for p in &t.prefixes {
            out.push_unbounded(OutItem::Subscribe(p.clone()));
        }
        t.live.push((peer.addr, out.clone()));
        let lane = Intake::Lane(self.inbound.lane());
        Ok(Attached {
            out,
            side: Arc::default(),
            sink: match &self.handler {
                Some(f) => Sink::Handler(f.clone(), Some(lane)),
                None => Sink::Deliver(lane),
            },
            // With CURVE, the publisher is known by the key its handshake proved (what
            // its events are attributed to); PUBs announce no identity otherwise.
            identity: match peer.curve_key {
                Some(k) => Bytes::copy_from_slice(&k),
                None => peer.identity.clone(),
            },
        })
    }

    fn detach(&self, _peer: &PeerInfo, att: &Attached) {
        att.sink.detach();
        self.topics
            .lock()
            .live
            .retain(|(_, q)| !Arc::ptr_eq(q, &att.out));
    }
}

/// A SUB socket. See the [module documentation](super).
pub struct Subscriber {
    /// First, so that it closes the socket before anything else of the handle goes.
    core: SocketCore,
    role: Arc<SubRole>,
}

impl Subscriber {
    /// A subscriber with no connections yet.
    pub fn new(opts: SocketOptions) -> Subscriber {
        Self::build(opts, None)
    }

    /// Like [`Subscriber::new`], but each received message is first offered to
    /// `handler`, called inline by its connection's task (quick, never blocking; the
    /// identity it gets is the publisher's, usually empty). It sees every message the
    /// publishers send, so it filters by topic itself. Messages it declines are queued
    /// for [`Subscriber::recv`], which filters them.
    pub fn with_handler(opts: SocketOptions, handler: MessageHandler) -> Subscriber {
        Self::build(opts, Some(handler))
    }

    fn build(opts: SocketOptions, handler: Option<MessageHandler>) -> Subscriber {
        let inbound = Inbox::new(opts.recv_queue_messages, opts.recv_queue_bytes);
        let shared = Shared::new(opts, SocketType::Sub);
        Subscriber {
            core: SocketCore::new(shared.clone(), Some(Incoming::Inbox(inbound.clone()))),
            role: Arc::new(SubRole {
                shared,
                topics: Mutex::new(Topics::default()),
                inbound,
                handler,
            }),
        }
    }

    /// Starts connecting to a publisher at `endpoint` (see [`IntoEndpoint`]); kept up
    /// (and resubscribed) in the background until the socket closes.
    /// Connecting twice to the same endpoint does nothing the second time.
    pub fn connect(&self, endpoint: impl IntoEndpoint) -> Result<(), TransportError> {
        let endpoint = endpoint.into_endpoint()?;
        let stop = {
            let mut t = self.role.topics.lock();
            if t.connectors.contains_key(&endpoint) {
                return Ok(());
            }
            let stop = self.role.shared.cancel.child_token();
            t.connectors.insert(endpoint.clone(), stop.clone());
            stop
        };
        spawn_connector(
            vec![endpoint],
            self.role.shared.clone(),
            self.role.clone(),
            stop,
        );
        Ok(())
    }

    /// Stops connecting to `endpoint` and closes its connection if one is up.
    /// Returns whether it was connected (or connecting); `false` for an endpoint that
    /// does not parse.
    pub fn disconnect(&self, endpoint: impl IntoEndpoint) -> bool {
        let Ok(endpoint) = endpoint.into_endpoint() else {
            return false;
        };
        let mut t = self.role.topics.lock();
        let Some(stop) = t.connectors.remove(&endpoint) else {
            return false;
        };
        stop.cancel();
        let addr = endpoint.socket_addr();
        for (a, q) in &t.live {
            if Some(*a) == addr {
                q.interrupt();
            }
        }
        true
    }

    /// Subscribes to messages whose first frame starts with `prefix` (empty: all).
    pub fn subscribe(&self, prefix: impl Into<Bytes>) {
        let prefix = prefix.into();
        let mut t = self.role.topics.lock();
        for (_, q) in &t.live {
            q.push_unbounded(OutItem::Subscribe(prefix.clone()));
        }
        t.prefixes.push(prefix);
    }

    /// Cancels one earlier subscription to `prefix`. Returns whether there was one.
    pub fn unsubscribe(&self, prefix: &[u8]) -> bool {
        let mut t = self.role.topics.lock();
        let Some(i) = t.prefixes.iter().position(|p| p == prefix) else {
            return false;
        };
        let p = t.prefixes.remove(i);
        for (_, q) in &t.live {
            q.push_unbounded(OutItem::Cancel(p.clone()));
        }
        true
    }

    /// Whether no received message is waiting for [`Subscriber::recv`].
    pub fn is_recv_queue_empty(&self) -> bool {
        self.role.inbound.len() == 0
    }

    /// Receives the next message matching a subscription. Publishers filter too; this
    /// check covers those that do not (an XPUB, or messages in flight across a CANCEL).
    pub async fn recv(&self) -> Result<Message, RecvError> {
        self.recv_declined().await.map(|(_, msg, _)| msg)
    }

    /// [`Subscriber::recv`] for messages an inline handler declined, with the identity
    /// of the connection it came on (with CURVE, the publisher's proven key) and the
    /// [`Taken`] that keeps that publisher's later messages from the handler until it is
    /// dropped.
    pub(crate) async fn recv_declined(&self) -> Result<(Bytes, Message, Taken), RecvError> {
        loop {
            let Some((i, taken)) = self.role.inbound.take().await else {
                return Err(RecvError::Closed);
            };
            let first = &i.msg.frames()[0];
            let wanted = self
                .role
                .topics
                .lock()
                .prefixes
                .iter()
                .any(|p| first.starts_with(p));
            if wanted {
                return Ok((i.identity, i.msg, taken));
            }
            self.role.shared.stats.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Number of publishers connected now.
    pub fn connections(&self) -> usize {
        self.role.topics.lock().live.len()
    }
}

socket_handle_methods!(
    Subscriber,
    /// Closes every connection and waits for their tasks.
    close
);
