//! The ZMTP 3.1 transport: peerwire's own implementation of the ZeroMQ wire protocol
//! over TCP, hardened for a LAN runtime.
//!
//! This module owns every socket peerwire opens for messaging. It provides four socket
//! behaviours with standard ZeroMQ semantics, wire-compatible with libzmq, pyzmq and the
//! `zeromq` crate:
//!
//! - [`Router`]: binds; receives `(identity, message)`; routes replies by identity.
//! - [`Dealer`]: connects to one endpoint; reconnects with backoff; queues while away.
//! - [`Publisher`]: binds; per-subscriber prefix filters and bounded queues.
//! - [`Subscriber`]: connects to many publishers; resubscribes after reconnecting.
//!
//! It never interprets message contents (that is the codec's and the node's job), never
//! blocks one peer on another, and never allocates for a length read from the network
//! before checking it against [`SocketOptions`]. Only the NULL security mechanism is
//! implemented; heartbeats (PING/PONG) are used with peers that announce ZMTP 3.1.
//!
//! A DEALER and a ROUTER on loopback:
//!
//! ```
//! use peerwire::transport::{Dealer, Endpoint, Message, Router, SocketOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let router = Router::bind("tcp://127.0.0.1:0", SocketOptions::default()).await?;
//! let endpoint = Endpoint::from(router.local_addr());
//! let dealer = Dealer::connect(&endpoint, SocketOptions::default())?;
//! assert_eq!(dealer.endpoint(), &endpoint);
//!
//! dealer.send(Message::from("ping")).await?;
//! let (identity, msg) = router.recv().await?;
//! router.send(&identity, msg).await?;
//! assert_eq!(&dealer.recv().await?.frames()[0][..], b"ping");
//! # Ok(())
//! # }
//! ```
//!
//! Endpoints are given as anything [`IntoEndpoint`]: a `tcp://host:port` string, an
//! [`Endpoint`] or a `SocketAddr`.
//!
//! Each connection is driven by one task that owns its `TcpStream`; sockets talk to those
//! tasks only through bounded queues (`queue`). See PROTOCOL.md for the wire format and
//! ARCHITECTURE.md for the task layout.

mod conn;
pub mod curve;
mod dealer;
mod endpoint;
mod error;
mod events;
pub(crate) mod inbox;
mod options;
mod publisher;
pub(crate) mod queue;
mod router;
mod socket;
mod subscriber;
#[doc(hidden)]
pub mod wire;

use bytes::Bytes;
use smallvec::SmallVec;

/// Frames kept inline in a [`Message`] before it allocates: most peerwire messages
/// (header + payload) have two.
const INLINE_FRAMES: usize = 3;

pub use conn::MessageHandler;
pub use dealer::{Dealer, FirstMessage};
pub use endpoint::{Endpoint, IntoEndpoint};
pub use error::{
    display_identity, CloseReason, ProtocolViolation, RecvError, SendError, TransportError,
};
pub use events::{SocketEvent, StatsSnapshot};
pub use options::SocketOptions;
pub use publisher::{PublishReport, Publisher, SubscriberInfo};
pub use router::{PeerSummary, Router};
pub use subscriber::Subscriber;

/// What limits per source address count by: an IPv4 address as it is, an IPv6 address by
/// its /64 network (a host can use any address of its /64, so counting single addresses
/// would let it escape every such limit).
pub fn source_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V4(_) => ip,
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0).into()
            }
        },
    }
}

/// A multipart message: one or more frames.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    frames: SmallVec<[Bytes; INLINE_FRAMES]>,
}

impl Message {
    /// An empty message; add frames with [`Message::push`].
    pub fn new() -> Self {
        Message {
            frames: SmallVec::new(),
        }
    }

    /// A message made of these frames.
    pub fn from_frames(frames: Vec<Bytes>) -> Self {
        Message {
            frames: frames.into_iter().collect(),
        }
    }

    /// Appends a frame.
    pub fn push(&mut self, frame: impl Into<Bytes>) {
        self.frames.push(frame.into());
    }

    /// The frames.
    pub fn frames(&self) -> &[Bytes] {
        &self.frames
    }

    /// The frames, by value.
    pub fn into_frames(self) -> Vec<Bytes> {
        self.frames.into_vec()
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether the message has no frames.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Total bytes of all frame bodies.
    pub fn byte_len(&self) -> usize {
        self.frames.iter().map(|f| f.len()).sum()
    }

    /// Checks the message against the sending limits of `opts`.
    pub(crate) fn check(&self, opts: &SocketOptions) -> Result<(), SendError> {
        if self.frames.is_empty() {
            return Err(SendError::EmptyMessage);
        }
        if self.frames.len() > opts.max_frames_per_message {
            return Err(SendError::TooManyFrames {
                frames: self.frames.len(),
                max: opts.max_frames_per_message,
            });
        }
        let size = self.byte_len();
        if size > opts.max_message_size {
            return Err(SendError::MessageTooLarge {
                size,
                max: opts.max_message_size,
            });
        }
        if let Some(big) = self.frames.iter().find(|f| f.len() > opts.max_frame_size) {
            return Err(SendError::MessageTooLarge {
                size: big.len(),
                max: opts.max_frame_size,
            });
        }
        Ok(())
    }
}

impl From<Vec<Bytes>> for Message {
    fn from(frames: Vec<Bytes>) -> Self {
        Message::from_frames(frames)
    }
}

impl From<Bytes> for Message {
    fn from(frame: Bytes) -> Self {
        let mut frames = SmallVec::new();
        frames.push(frame);
        Message { frames }
    }
}

impl FromIterator<Bytes> for Message {
    fn from_iter<I: IntoIterator<Item = Bytes>>(iter: I) -> Self {
        Message {
            frames: iter.into_iter().collect(),
        }
    }
}

impl From<Vec<u8>> for Message {
    fn from(frame: Vec<u8>) -> Self {
        Bytes::from(frame).into()
    }
}

impl From<&'static str> for Message {
    fn from(frame: &'static str) -> Self {
        Bytes::from_static(frame.as_bytes()).into()
    }
}

/// The ZeroMQ socket types this transport implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketType {
    /// DEALER
    Dealer,
    /// ROUTER
    Router,
    /// PUB
    Pub,
    /// SUB
    Sub,
}

impl SocketType {
    /// The name announced in READY's Socket-Type property.
    pub fn as_str(self) -> &'static str {
        match self {
            SocketType::Dealer => "DEALER",
            SocketType::Router => "ROUTER",
            SocketType::Pub => "PUB",
            SocketType::Sub => "SUB",
        }
    }

    /// Whether a peer announcing `theirs` may connect to this type (ZMTP's valid pairs).
    ///
    /// ```
    /// use peerwire::transport::SocketType;
    /// assert!(SocketType::Router.accepts("DEALER"));
    /// assert!(!SocketType::Router.accepts("PUB"));
    /// ```
    pub fn accepts(self, theirs: &str) -> bool {
        let ok: &[&str] = match self {
            SocketType::Dealer => &["ROUTER", "DEALER", "REP"],
            SocketType::Router => &["DEALER", "ROUTER", "REQ"],
            SocketType::Pub => &["SUB", "XSUB"],
            SocketType::Sub => &["PUB", "XPUB"],
        };
        ok.iter().any(|t| t.eq_ignore_ascii_case(theirs))
    }
}

/// Whether a peer address is the one a peer over `ipc://` is accounted under (it has
/// none of its own: 127.0.0.1 port 0).
pub(crate) fn is_ipc_peer(addr: &std::net::SocketAddr) -> bool {
    *addr == conn::io::IPC_PEER
}

/// Binds a listener (TCP, or a Unix domain socket for `ipc://`) for `endpoint`.
pub(crate) async fn bind(endpoint: &Endpoint) -> Result<conn::io::Listener, TransportError> {
    conn::io::Listener::bind(endpoint).await
}
