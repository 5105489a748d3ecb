//! DEALER: connects to one endpoint, keeps reconnecting, and queues while disconnected.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use tokio::sync::broadcast;

use super::conn::{
    spawn_connector, Attached, Inbound, MessageHandler, OutItem, PeerInfo, Role, Shared, Sink,
    WriteSide,
};
use super::error::{ProtocolViolation, RecvError, SendError, TransportError};
use super::events::SocketEvent;
use super::inbox::{Incoming, Intake};
use super::queue::Queue;
use super::socket::{socket_handle_methods, SocketCore};
use super::{Endpoint, IntoEndpoint, Message, SocketOptions, SocketType};

/// Makes the message a DEALER sends first on every connection (see
/// [`Dealer::connect_with_first_message`]); `None` sends nothing first.
pub type FirstMessage = Arc<dyn Fn() -> Option<Message> + Send + Sync>;

struct DealerRole {
    shared: Arc<Shared>,
    /// When set, received messages go to this function instead of `inbound`.
    handler: Option<MessageHandler>,
    /// When set, what it makes is written first on every connection.
    first: Option<FirstMessage>,
    /// One queue for the socket's whole life, so messages queued while disconnected (and
    /// those not fully written when a connection dropped) go out on the next connection.
    out: Arc<Queue<OutItem>>,
    /// The current connection's writer, for sends written straight away.
    side: Arc<WriteSide>,
    inbound: Arc<Queue<Inbound>>,
    connected: AtomicBool,
    /// Address of the peer of the current (or last) connection.
    peer_addr: parking_lot::Mutex<Option<std::net::SocketAddr>>,
    /// With CURVE, the server key the current (or last) connection's handshake proved.
    peer_key: parking_lot::Mutex<Option<[u8; 32]>>,
}

impl Role for DealerRole {
    fn attach(&self, peer: &PeerInfo) -> Result<Attached, ProtocolViolation> {
        *self.peer_addr.lock() = Some(peer.addr);
        *self.peer_key.lock() = peer.curve_key;
        // Before the writer starts: ahead of what was queued while disconnected, and of
        // anything sent once `connected` is seen.
        if let Some(msg) = self.first.as_ref().and_then(|f| f()) {
            self.out.push_front_unbounded(OutItem::Msg(msg));
        }
        self.connected.store(true, Relaxed);
        Ok(Attached {
            out: self.out.clone(),
            side: self.side.clone(),
            sink: match &self.handler {
                Some(f) => Sink::Handler(f.clone(), None),
                None => Sink::Deliver(Intake::Queue(self.inbound.clone())),
            },
            identity: peer.identity.clone(),
        })
    }

    fn detach(&self, _peer: &PeerInfo, _att: &Attached) {
        self.connected.store(false, Relaxed);
        // Senders waiting for room re-check: while disconnected they fail fast.
        self.out.wake_writers();
    }
}

/// A DEALER socket. See the [module documentation](super).
///
/// Messages sent while no connection is up are queued, up to `send_queue_messages` and
/// `send_queue_bytes`; past that [`Dealer::send`] fails at once with
/// [`SendError::QueueFull`]. While connected, `send` waits for room instead, so a
/// message whose `send` returned `Ok` is written unless the connection itself dies.
pub struct Dealer {
    /// First, so that it closes the socket before anything else of the handle goes.
    core: SocketCore,
    role: Arc<DealerRole>,
    endpoint: Endpoint,
}

impl Dealer {
    /// Starts connecting to `endpoint` (`tcp://host:port`, see [`IntoEndpoint`]). Returns
    /// at once; the connection is made (and remade) in the background.
    pub fn connect(
        endpoint: impl IntoEndpoint,
        opts: SocketOptions,
    ) -> Result<Dealer, TransportError> {
        Self::connect_with_events(endpoint, opts).map(|(d, _)| d)
    }

    /// Like [`Dealer::connect`], also returning an event receiver subscribed before the
    /// first connection attempt, so not even the first `Connected` can be missed.
    pub fn connect_with_events(
        endpoint: impl IntoEndpoint,
        opts: SocketOptions,
    ) -> Result<(Dealer, broadcast::Receiver<SocketEvent>), TransportError> {
        Self::start(endpoint.into_endpoint()?, opts, None, None)
    }

    /// Like [`Dealer::connect_with_events`], but every received message is passed to
    /// `handler`, called inline by the connection's task (so it must be quick and must
    /// not block), instead of waiting for [`Dealer::recv`], which then never returns a
    /// message. This saves a task hop per message for a caller that only dispatches
    /// replies (the node does).
    pub fn connect_with_handler(
        endpoint: impl IntoEndpoint,
        opts: SocketOptions,
        handler: MessageHandler,
    ) -> Result<(Dealer, broadcast::Receiver<SocketEvent>), TransportError> {
        Self::start(endpoint.into_endpoint()?, opts, Some(handler), None)
    }

    /// Like [`Dealer::connect_with_handler`], and on every connection (reconnections
    /// included) the message `first` makes is the first one written, ahead of
    /// anything queued before or sent meanwhile: a peer that must hear who we are
    /// before anything else (a HELLO) does, whoever else sends on this socket.
    pub fn connect_with_first_message(
        endpoint: impl IntoEndpoint,
        opts: SocketOptions,
        handler: MessageHandler,
        first: FirstMessage,
    ) -> Result<(Dealer, broadcast::Receiver<SocketEvent>), TransportError> {
        Self::start(endpoint.into_endpoint()?, opts, Some(handler), Some(first))
    }

    /// Like [`Dealer::connect_with_first_message`], but each connection attempt tries
    /// `preferred` first and `endpoint` when `preferred` cannot be reached (a peer's ipc
    /// socket, then its TCP endpoint: a socket file that is gone or not visible here
    /// costs one failed connect, not the peer). [`Dealer::endpoint`] is `endpoint`.
    pub fn connect_preferring(
        preferred: impl IntoEndpoint,
        endpoint: impl IntoEndpoint,
        opts: SocketOptions,
        handler: MessageHandler,
        first: FirstMessage,
    ) -> Result<(Dealer, broadcast::Receiver<SocketEvent>), TransportError> {
        let preferred = preferred.into_endpoint()?;
        Self::start_at(
            vec![preferred, endpoint.into_endpoint()?],
            opts,
            Some(handler),
            Some(first),
        )
    }

    fn start(
        endpoint: Endpoint,
        opts: SocketOptions,
        handler: Option<MessageHandler>,
        first: Option<FirstMessage>,
    ) -> Result<(Dealer, broadcast::Receiver<SocketEvent>), TransportError> {
        Self::start_at(vec![endpoint], opts, handler, first)
    }

    /// Starts a DEALER dialling the first reachable of `endpoints` (the last one is its
    /// [`endpoint`](Dealer::endpoint)).
    fn start_at(
        endpoints: Vec<Endpoint>,
        opts: SocketOptions,
        handler: Option<MessageHandler>,
        first: Option<FirstMessage>,
    ) -> Result<(Dealer, broadcast::Receiver<SocketEvent>), TransportError> {
        if let Some(id) = &opts.identity {
            // What every ROUTER would refuse anyway (ZMTP: 1..=255 bytes; a leading zero
            // byte is reserved for generated identities).
            if id.is_empty() || id.len() > 255 || id[0] == 0 {
                return Err(TransportError::InvalidIdentity);
            }
        }
        let out = Arc::new(Queue::new(opts.send_queue_messages, opts.send_queue_bytes));
        let inbound = Arc::new(Queue::new(opts.recv_queue_messages, opts.recv_queue_bytes));
        let shared = Shared::new(opts, SocketType::Dealer);
        let core = SocketCore::new(shared.clone(), Some(Incoming::Queue(inbound.clone())));
        let role = Arc::new(DealerRole {
            shared: shared.clone(),
            handler,
            first,
            out,
            side: Arc::default(),
            inbound,
            connected: AtomicBool::new(false),
            peer_addr: parking_lot::Mutex::new(None),
            peer_key: parking_lot::Mutex::new(None),
        });
        let events = shared.events.subscribe();
        let stop = shared.cancel.clone();
        let endpoint = endpoints.last().expect("at least one endpoint").clone();
        spawn_connector(endpoints, shared, role.clone(), stop);
        let dealer = Dealer {
            role,
            core,
            endpoint,
        };
        Ok((dealer, events))
    }

    /// The endpoint this socket connects to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The address the current (or last) connection reached: the endpoint resolved.
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        *self.role.peer_addr.lock()
    }

    /// With CURVE, the long-term key the server of the current (or last) connection
    /// proved in its handshake.
    pub fn peer_key(&self) -> Option<[u8; 32]> {
        *self.role.peer_key.lock()
    }

    /// Whether a connection is up (handshake completed) right now.
    pub fn is_connected(&self) -> bool {
        self.role.connected.load(Relaxed)
    }

    /// Queues `msg`. While connected, waits for room if the queue is full; while
    /// disconnected, fails at once when the queue is full.
    pub async fn send(&self, msg: Message) -> Result<(), SendError> {
        msg.check(&self.role.shared.opts)?;
        let role = &self.role;
        let Err(mut item) = role
            .side
            .try_send(OutItem::Msg(msg), &role.out, &role.shared)
        else {
            return Ok(());
        };
        loop {
            match self.role.out.try_push(item) {
                Ok(()) => return Ok(()),
                Err((back, usage)) => {
                    if !self.is_connected() {
                        return Err(SendError::QueueFull {
                            messages: usage.count,
                            bytes: usage.bytes,
                            connected: false,
                        });
                    }
                    item = back;
                }
            }
            // Woken by room, or by the connection dropping (detach calls wake_writers).
            self.role
                .out
                .writable_unless(|| !self.role.connected.load(Relaxed))
                .await;
        }
    }

    /// Queues `msg` without waiting; fails with [`SendError::QueueFull`] at a bound.
    pub fn try_send(&self, msg: Message) -> Result<(), SendError> {
        msg.check(&self.role.shared.opts)?;
        let role = &self.role;
        let Err(item) = role
            .side
            .try_send(OutItem::Msg(msg), &role.out, &role.shared)
        else {
            return Ok(());
        };
        role.out
            .try_push(item)
            .map_err(|(_, u)| SendError::QueueFull {
                messages: u.count,
                bytes: u.bytes,
                connected: self.is_connected(),
            })
    }

    /// Receives the next message from the peer.
    pub async fn recv(&self) -> Result<Message, RecvError> {
        match self.role.inbound.pop().await {
            Some(i) => Ok(i.msg),
            None => Err(RecvError::Closed),
        }
    }

    /// Messages and bytes queued and not yet written.
    pub fn queued(&self) -> (usize, usize) {
        let u = self.role.out.usage();
        (u.count, u.bytes)
    }
}

socket_handle_methods!(
    Dealer,
    /// Flushes queued messages for up to the linger time, closes the connection and
    /// waits for the socket's task.
    close
);
