//! Errors of the transport: why a connection was closed, why a send or receive failed.

use std::fmt;

/// Why a connection was refused or closed for breaking the protocol or a limit.
/// Each one is logged and counted; it closes that one connection and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolViolation {
    /// The greeting does not start with the ZMTP signature.
    #[error("bad greeting signature (not a ZMTP 3 peer)")]
    BadSignature,
    /// The peer speaks a ZMTP version other than 3.x.
    #[error("unsupported ZMTP version {major}.{minor}")]
    UnsupportedVersion {
        /// Announced major version.
        major: u8,
        /// Announced minor version.
        minor: u8,
    },
    /// The peer wants a security mechanism we do not implement.
    #[error("unsupported security mechanism {0:?}")]
    UnsupportedMechanism(String),
    /// A frame's flags byte sets reserved bits.
    #[error("reserved flag bits set: {0:#04x}")]
    ReservedFlags(u8),
    /// A frame header claims more bytes than the frame-size limit.
    #[error("frame of {size} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Size the header claimed.
        size: u64,
        /// The limit in force.
        max: usize,
    },
    /// A multipart message grows past the message-size limit.
    #[error("message of at least {size} bytes exceeds the limit of {max}")]
    MessageTooLarge {
        /// Size reached so far, including the frame that broke the limit.
        size: u64,
        /// The limit in force.
        max: usize,
    },
    /// A multipart message has more frames than allowed.
    #[error("message has more than {max} frames")]
    TooManyFrames {
        /// The limit in force.
        max: usize,
    },
    /// A command frame could not be parsed.
    #[error("malformed command: {0}")]
    MalformedCommand(&'static str),
    /// A frame arrived that is not allowed at this point (data before READY, say).
    #[error("unexpected {0} during handshake")]
    Unexpected(&'static str),
    /// READY did not carry a Socket-Type.
    #[error("READY without Socket-Type")]
    MissingSocketType,
    /// The peer's socket type cannot talk to ours.
    #[error("socket type {theirs} cannot talk to {ours}")]
    IncompatibleSocketType {
        /// Our socket type.
        ours: &'static str,
        /// The type the peer announced.
        theirs: String,
    },
    /// A ROUTER already has a live connection with the identity this peer claims.
    #[error("identity {0} is already connected")]
    IdentityInUse(String),
    /// The peer's identity is not acceptable (over 255 bytes, or starting with a zero byte,
    /// which ZeroMQ reserves for generated identities).
    #[error("invalid identity")]
    InvalidIdentity,
    /// A subscriber holds more subscriptions (or subscription bytes) than allowed.
    #[error("subscriber exceeds {max} subscriptions or {max_bytes} bytes of prefixes")]
    TooManySubscriptions {
        /// Most subscriptions per subscriber.
        max: usize,
        /// Most bytes of prefixes per subscriber.
        max_bytes: usize,
    },
    /// The peer sent an ERROR command.
    #[error("peer sent ERROR: {0}")]
    PeerError(String),
    /// The peer announced another security mechanism than ours (NULL against CURVE).
    #[error("the peer uses the {theirs} security mechanism, this socket {ours}")]
    MechanismMismatch {
        /// Ours.
        ours: &'static str,
        /// Theirs.
        theirs: String,
    },
    /// A CURVE command or boxed frame has the wrong shape or size.
    #[error("malformed CURVE traffic: {0}")]
    CurveMalformed(&'static str),
    /// A CURVE box did not open, or opened to the wrong content: the peer does not hold
    /// the key it claims, or the bytes were altered.
    #[error("CURVE authentication failed: {0}")]
    CurveCrypto(&'static str),
    /// A CURVE nonce did not increase (a replayed or reordered frame).
    #[error("CURVE nonce not increasing (replayed or reordered)")]
    CurveNonce,
    /// The client's long-term key is not one this server accepts.
    #[error("client key not authorized")]
    NotAuthorized,
    /// The greeting did not arrive in time.
    #[error("greeting not received within the greeting timeout")]
    GreetingTimeout,
    /// The handshake did not complete in time.
    #[error("handshake not completed within the handshake timeout")]
    HandshakeTimeout,
    /// Nothing arrived from the peer within the heartbeat timeout.
    #[error("peer silent past the heartbeat timeout")]
    HeartbeatTimeout,
    /// Nothing arrived from an accepted peer within the idle timeout (whatever its ZMTP
    /// version: a ZMTP 3.0 peer is never heartbeated, so silence is all there is to go on).
    #[error("peer idle past the idle timeout")]
    IdleTimeout,
    /// The socket's connections together held more bytes of messages still arriving than
    /// its receive budget, and this one was receiving most slowly.
    #[error("{held} bytes of a message still arriving, over the socket's receive budget of {budget} bytes, and sent the most slowly")]
    ReceiveBudget {
        /// Bytes this connection held.
        held: usize,
        /// The budget in force.
        budget: usize,
    },
}

impl ProtocolViolation {
    /// A short stable label, used as the key of the per-reason counters.
    pub fn label(&self) -> &'static str {
        match self {
            ProtocolViolation::BadSignature => "bad_signature",
            ProtocolViolation::UnsupportedVersion { .. } => "unsupported_version",
            ProtocolViolation::UnsupportedMechanism(_) => "unsupported_mechanism",
            ProtocolViolation::ReservedFlags(_) => "reserved_flags",
            ProtocolViolation::FrameTooLarge { .. } => "frame_too_large",
            ProtocolViolation::MessageTooLarge { .. } => "message_too_large",
            ProtocolViolation::TooManyFrames { .. } => "too_many_frames",
            ProtocolViolation::MalformedCommand(_) => "malformed_command",
            ProtocolViolation::Unexpected(_) => "unexpected_frame",
            ProtocolViolation::MissingSocketType => "missing_socket_type",
            ProtocolViolation::IncompatibleSocketType { .. } => "incompatible_socket_type",
            ProtocolViolation::IdentityInUse(_) => "identity_in_use",
            ProtocolViolation::InvalidIdentity => "invalid_identity",
            ProtocolViolation::TooManySubscriptions { .. } => "too_many_subscriptions",
            ProtocolViolation::PeerError(_) => "peer_error",
            ProtocolViolation::MechanismMismatch { .. } => "mechanism_mismatch",
            ProtocolViolation::CurveMalformed(_) => "curve_malformed",
            ProtocolViolation::CurveCrypto(_) => "curve_crypto",
            ProtocolViolation::CurveNonce => "curve_nonce",
            ProtocolViolation::NotAuthorized => "not_authorized",
            ProtocolViolation::GreetingTimeout => "greeting_timeout",
            ProtocolViolation::HandshakeTimeout => "handshake_timeout",
            ProtocolViolation::HeartbeatTimeout => "heartbeat_timeout",
            ProtocolViolation::IdleTimeout => "idle_timeout",
            ProtocolViolation::ReceiveBudget { .. } => "receive_budget",
        }
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer broke the protocol or a limit.
    Violation(ProtocolViolation),
    /// The peer closed the TCP connection.
    PeerClosed,
    /// A socket error.
    Io(String),
    /// Our socket is closing.
    Shutdown,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Silence is how a vanished host looks, not something the peer did wrong.
            CloseReason::Violation(
                v @ (ProtocolViolation::HeartbeatTimeout | ProtocolViolation::IdleTimeout),
            ) => write!(f, "{v}"),
            CloseReason::Violation(v) => write!(f, "protocol violation: {v}"),
            CloseReason::PeerClosed => f.write_str("peer closed the connection"),
            CloseReason::Io(e) => write!(f, "I/O error: {e}"),
            CloseReason::Shutdown => f.write_str("socket closed locally"),
        }
    }
}

impl From<ProtocolViolation> for CloseReason {
    fn from(v: ProtocolViolation) -> Self {
        CloseReason::Violation(v)
    }
}

impl From<std::io::Error> for CloseReason {
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match e.kind() {
            UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted => {
                CloseReason::PeerClosed
            }
            _ => CloseReason::Io(e.to_string()),
        }
    }
}

/// Errors creating a socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The endpoint string is not `tcp://host:port` or `host:port`.
    #[error("invalid endpoint {0:?}: expected tcp://host:port")]
    InvalidEndpoint(String),
    /// Binding the listener failed.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The identity in the options is empty, over 255 bytes or starts with a zero byte.
    #[error("invalid identity: it must be 1 to 255 bytes and not start with a zero byte")]
    InvalidIdentity,
    /// Any other socket error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Why a message could not be queued for sending.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The outgoing queue is at its message or byte bound.
    #[error("send queue full ({messages} messages, {bytes} bytes queued){}", if *.connected { "" } else { " while disconnected" })]
    QueueFull {
        /// Messages queued.
        messages: usize,
        /// Bytes queued.
        bytes: usize,
        /// Whether a peer was connected at the time.
        connected: bool,
    },
    /// The queues of all the socket's connections together hold `send_queue_total_bytes`
    /// (this peer's own queue may have room): some other peers are not reading.
    #[error("the socket's send queues are full ({used} bytes queued in all)")]
    BudgetSpent {
        /// Bytes queued over all connections.
        used: usize,
    },
    /// The message is larger than the configured maximum message size or frame size.
    #[error("message of {size} bytes exceeds the limit of {max}")]
    MessageTooLarge {
        /// Size of the message (or of its largest frame).
        size: usize,
        /// The limit in force.
        max: usize,
    },
    /// The message has more frames than the configured maximum.
    #[error("message has {frames} frames, more than the limit of {max}")]
    TooManyFrames {
        /// Frames in the message.
        frames: usize,
        /// The limit in force.
        max: usize,
    },
    /// A message must have at least one frame.
    #[error("a message needs at least one frame")]
    EmptyMessage,
    /// No connected peer has this identity (ROUTER).
    #[error("no connected peer with identity {0}")]
    UnknownPeer(String),
}

/// Why a receive failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// The socket was closed and every received message has been taken.
    #[error("socket closed")]
    Closed,
}

/// Renders an identity for logs: printable ASCII as is, anything else as hex.
pub fn display_identity(id: &[u8]) -> String {
    if !id.is_empty() && id.iter().all(|b| b.is_ascii_graphic()) {
        String::from_utf8_lossy(id).into_owned()
    } else {
        let mut s = String::with_capacity(2 + id.len() * 2);
        s.push_str("0x");
        for b in id {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}
