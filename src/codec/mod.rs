//! Envelopes: the MessagePack header and payload that every peerwire message carries.
//!
//! This module owns the mapping between envelopes and frames (plain `Bytes`). It does no
//! I/O, knows nothing of tokio, sockets or the transport (the node joins the two), and
//! never trusts a length it did not check: the transport has already bounded every
//! frame, and decoding here only reads what is in the frame. It is what the node encodes
//! before sending and decodes after receiving.
//!
//! Layout on the wire (see PROTOCOL.md, "Envelopes"):
//!
//! - ROUTER/DEALER traffic: `[header, payload]`
//! - PUB/SUB traffic: `[topic, header, payload]` (the topic frame first, because ZeroMQ
//!   subscriptions filter on the first frame)
//!
//! The header is a MessagePack map with short string keys. Decoders ignore keys they do
//! not know, so fields can be added without breaking older nodes; the major version
//! (`v`) changes only for incompatible changes, and a node receiving a major version it
//! does not speak answers with an error reply instead of guessing.

mod header;
mod message_type;

pub use message_type::MessageType;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Major version of the envelope format this build speaks.
pub const VERSION_MAJOR: u8 = 1;
/// Minor version: raised when fields are added.
pub const VERSION_MINOR: u8 = 0;
/// Content type of MessagePack payloads (the default).
pub const CONTENT_MSGPACK: &str = "application/msgpack";
/// Longest shard key (`sk`), in bytes: a header with a longer one does not decode, and a
/// call or delivery with one is refused before it is sent. A key names an entity (an
/// order, a customer); a consumer holds it while that key's messages queue.
pub const MAX_SHARD_KEY: usize = 1024;

/// A 128-bit identifier (message id, correlation id, node id), carried as 16 raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id(pub Uuid);

impl Id {
    /// A new time-ordered id (UUIDv7).
    pub fn new() -> Id {
        Id(Uuid::now_v7())
    }

    /// The id of the node whose CURVE public key is `key`: the first 16 bytes of
    /// SHA-256 over a domain tag and the key, as a UUIDv8. Nobody can claim it without
    /// the key's secret, which the connection's CURVE handshake proves.
    pub fn of_key(key: &[u8; 32]) -> Id {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"peerwire node id v1\0");
        h.update(key);
        let digest = h.finalize();
        let bytes: [u8; 16] = digest[..16].try_into().expect("32-byte digest");
        Id(Uuid::new_v8(bytes))
    }

    /// The nil id (all zeros), used where none applies.
    pub const NIL: Id = Id(Uuid::nil());

    /// Whether this is the nil id.
    pub fn is_nil(&self) -> bool {
        self.0.is_nil()
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0.as_bytes())
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Id, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("16 bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Id, E> {
                Uuid::from_slice(v).map(Id).map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Id, A::Error> {
                // Some MessagePack libraries write byte arrays as arrays of integers.
                let mut b = [0u8; 16];
                for (i, slot) in b.iter_mut().enumerate() {
                    *slot = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                Ok(Id(Uuid::from_bytes(b)))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// What an envelope is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A request expecting one reply (request/response, async request/response).
    Request,
    /// The reply to a request.
    Reply,
    /// A request that failed: the payload is an [`ErrorBody`].
    ErrorReply,
    /// A one-way message to exactly one instance of a service.
    Notification,
    /// A published event (publish/subscribe).
    Event,
    /// A request published to a topic, expecting replies from many (gather).
    GatherRequest,
    /// One responder's reply to a gather request.
    GatherReply,
    /// A node introducing itself: payload is a [`Hello`].
    Hello,
    /// The answer to a HELLO, with the answering node's own [`Hello`].
    HelloAck,
    /// The caller gave up on the request whose id is the `cid` (its deadline passed, or
    /// it dropped its handle): the callee stops the handler if it is still running.
    /// Never answered.
    Cancel,
    /// A kind this build does not know (from a newer node); answered with an error.
    Unknown(u8),
}

impl Kind {
    /// The code carried on the wire.
    pub fn code(self) -> u8 {
        match self {
            Kind::Request => 1,
            Kind::Reply => 2,
            Kind::ErrorReply => 3,
            Kind::Notification => 4,
            Kind::Event => 5,
            Kind::GatherRequest => 6,
            Kind::GatherReply => 7,
            Kind::Hello => 8,
            Kind::HelloAck => 9,
            Kind::Cancel => 10,
            Kind::Unknown(c) => c,
        }
    }

    /// The kind for a wire code.
    pub fn from_code(c: u8) -> Kind {
        match c {
            1 => Kind::Request,
            2 => Kind::Reply,
            3 => Kind::ErrorReply,
            4 => Kind::Notification,
            5 => Kind::Event,
            6 => Kind::GatherRequest,
            7 => Kind::GatherReply,
            8 => Kind::Hello,
            9 => Kind::HelloAck,
            10 => Kind::Cancel,
            c => Kind::Unknown(c),
        }
    }
}

impl Serialize for Kind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.code())
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Kind, D::Error> {
        u8::deserialize(d).map(Kind::from_code)
    }
}

/// A method or service version: callers name the major they were written against and
/// the least minor they need; a handler serves callers of its major with a minor no
/// higher than its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Version {
    /// Incompatible changes raise it.
    pub major: u16,
    /// Compatible additions raise it.
    pub minor: u16,
}

impl Version {
    /// `major.minor`.
    pub const fn new(major: u16, minor: u16) -> Version {
        Version { major, minor }
    }

    /// Whether a handler at `self` can serve a caller asking for `wanted`.
    pub fn serves(self, wanted: Version) -> bool {
        self.major == wanted.major && self.minor >= wanted.minor
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The header frame of every envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Header {
    /// Envelope format major version.
    #[serde(rename = "v")]
    pub version: u8,
    /// What this envelope is.
    #[serde(rename = "k")]
    pub kind: Kind,
    /// This message's id (UUIDv7).
    #[serde(rename = "id")]
    pub id: Id,
    /// The id of the message this one answers (replies), or nil.
    #[serde(rename = "cid", skip_serializing_if = "Id::is_nil")]
    pub correlation_id: Id,
    /// The sending node's id.
    #[serde(rename = "src")]
    pub sender: Id,
    /// `service.method` for requests and notifications, a topic for events and gathers.
    #[serde(rename = "tgt", skip_serializing_if = "String::is_empty")]
    pub target: String,
    /// Time the sender still allows, in milliseconds, relative to sending.
    #[serde(rename = "dl", skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Content type of the payload; absent means MessagePack.
    #[serde(rename = "ct", skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// String headers (trace context and the like).
    #[serde(rename = "h", skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Shard key, when the sender wants per-key ordering.
    #[serde(rename = "sk", skip_serializing_if = "Option::is_none")]
    pub shard_key: Option<String>,
    /// Per-sender sequence number (events: per publisher, so subscribers see gaps).
    #[serde(rename = "seq", skip_serializing_if = "is_zero")]
    pub seq: u64,
    /// Method version the caller asks for (requests, notifications, gathers).
    #[serde(rename = "mv", skip_serializing_if = "Option::is_none")]
    pub method_version: Option<Version>,
    /// The message type, when the sender named one ([`Header::effective_type`] gives
    /// the kind's default otherwise).
    #[serde(
        rename = "mt",
        skip_serializing_if = "Option::is_none",
        deserialize_with = "message_type::de_option"
    )]
    pub message_type: Option<MessageType>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Default for Header {
    fn default() -> Self {
        Header {
            version: VERSION_MAJOR,
            kind: Kind::Unknown(0),
            id: Id::NIL,
            correlation_id: Id::NIL,
            sender: Id::NIL,
            target: String::new(),
            deadline_ms: None,
            content_type: None,
            headers: BTreeMap::new(),
            shard_key: None,
            seq: 0,
            method_version: None,
            message_type: None,
        }
    }
}

impl Header {
    /// A header of `kind` from `sender` to `target`, with a fresh id.
    pub fn new(kind: Kind, sender: Id, target: impl Into<String>) -> Header {
        Header {
            kind,
            id: Id::new(),
            sender,
            target: target.into(),
            ..Header::default()
        }
    }

    /// The deadline as a duration, if any.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline_ms.map(Duration::from_millis)
    }

    /// The message type: the one named in `mt`, else its kind's default.
    pub fn effective_type(&self) -> Option<MessageType> {
        self.message_type
            .or_else(|| MessageType::default_for(self.kind))
    }
}

/// The payload of an error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable machine-readable code (see PROTOCOL.md for the ones peerwire uses).
    pub code: String,
    /// A human-readable message.
    pub message: String,
}

pub mod codes;

/// A service as announced in HELLO: its methods and their versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Catalog {
    /// `service.method` → version, for request and notification handlers.
    pub methods: BTreeMap<String, Version>,
    /// Topics this node answers gather requests on, with their versions.
    pub gathers: BTreeMap<String, Version>,
    /// Bumped by the node each time its handlers change. HELLOs from one node reach a
    /// peer over two connections (its DEALER and the peer's), so an older catalog can
    /// arrive after a newer one: the receiver keeps the highest revision. Absent (0) from
    /// nodes that predate it.
    pub revision: u64,
}

/// A node's introduction, the payload of HELLO and HELLO-ACK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Hello {
    /// The node's id.
    pub node_id: Id,
    /// Its human name.
    pub name: String,
    /// Its cluster; nodes of different clusters ignore each other.
    pub cluster: String,
    /// Host its sockets are reachable at, as the node knows it (may be unspecified,
    /// in which case the receiver uses the connection's source address).
    pub host: String,
    /// Port of its ROUTER (requests, notifications, gather replies).
    pub router_port: u16,
    /// Port of its PUB (events, gather requests).
    pub pub_port: u16,
    /// What it serves.
    pub catalog: Catalog,
    /// ROUTER endpoints of the peers it is connected to, so that a node reached through
    /// one seed learns of the others (gossip).
    pub peers: Vec<String>,
    /// The node is stopping: it still serves what reaches it, but peers should send new
    /// calls to other instances. Never cleared: a node that leaves does not come back
    /// (a restart is a new node id). Absent (false) from nodes that predate it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
    /// The node also accepts ROUTER connections over a Unix domain socket, in the
    /// directory this host key names (PROTOCOL.md section 10b): a node with the same key
    /// dials it there. Absent from nodes without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipc: Option<String>,
}

/// Why an envelope could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Wrong number of frames for the socket it came on.
    #[error("envelope has {got} frames, expected {expected}")]
    Frames {
        /// Frames received.
        got: usize,
        /// Frames expected.
        expected: usize,
    },
    /// The header is not a MessagePack map of the expected shape.
    #[error("malformed header: {0}")]
    Header(String),
    /// The payload could not be decoded into the requested type.
    #[error("payload does not decode as {type_name}: {reason}")]
    Payload {
        /// The Rust type asked for.
        type_name: &'static str,
        /// The decoder's message.
        reason: String,
    },
    /// A value could not be encoded.
    #[error("cannot encode: {0}")]
    Encode(String),
    /// The payload's content type (`ct`) is not one peerwire decodes.
    #[error("content type {0:?} is not supported (peerwire payloads are application/msgpack)")]
    ContentType(String),
}

/// Encodes a header (hand-written MessagePack, the same bytes serde would produce).
pub fn encode_header(h: &Header) -> Bytes {
    header::encode(h)
}

/// Decodes a header. A header with an unknown major version still decodes (so the node
/// can answer it); check [`Header::version`]. Unknown keys are skipped.
pub fn decode_header(b: &[u8]) -> Result<Header, CodecError> {
    header::decode(b)
}

/// What is needed to answer a header that does not decode: its `id`, if that is a valid
/// 16-byte id, and its kind code, if readable. `None`: it cannot be correlated at all.
pub fn salvage_header(b: &[u8]) -> Option<(Id, Option<u8>)> {
    header::salvage(b)
}

/// Encodes a payload value as MessagePack (named maps for structs, so fields can be added).
pub fn encode_payload<T: Serialize + ?Sized>(v: &T) -> Result<Bytes, CodecError> {
    let mut b = EncodeBuf::new();
    rmp_serde::encode::write_named(&mut b, v).map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(exact_bytes(b))
}

/// Where headers and payloads are encoded: on the stack up to a size that holds the
/// usual header and small payload, on the heap past it.
type EncodeBuf = smallvec::SmallVec<[u8; 256]>;

/// The encoded bytes as one shared buffer, made with one allocation: a small encoding
/// is copied once off the stack (where a growing `Vec` would have been reallocated as it
/// grew, then given a second allocation to be shared); a large one keeps its heap
/// buffer and is never copied.
fn exact_bytes(b: EncodeBuf) -> Bytes {
    if b.spilled() {
        Bytes::from(b.into_vec())
    } else {
        Bytes::copy_from_slice(&b)
    }
}

/// The payload content type peerwire speaks; a header without `ct` means this one.
pub const CONTENT_TYPE: &str = "application/msgpack";

/// Decodes a MessagePack payload into `T`, strictly: the payload must be exactly one
/// value. Bytes after it are an error, never silently dropped (a JSON text sent without
/// saying so would otherwise decode as its first character).
pub fn decode_payload<T: DeserializeOwned>(b: &[u8]) -> Result<T, CodecError> {
    let fail = |reason: String| CodecError::Payload {
        type_name: std::any::type_name::<T>(),
        reason,
    };
    let mut de = rmp_serde::Deserializer::new(b);
    let v = T::deserialize(&mut de).map_err(|e| fail(e.to_string()))?;
    let rest = de.get_ref().len();
    if rest > 0 {
        return Err(fail(format!(
            "{rest} byte(s) after the MessagePack value (a payload is exactly one value)"
        )));
    }
    Ok(v)
}

/// Checks that a header's content type is MessagePack (`ct` absent, or
/// [`CONTENT_TYPE`]): peerwire decodes nothing else, and must not misread it.
pub fn check_content_type(h: &Header) -> Result<(), CodecError> {
    match h.content_type.as_deref() {
        None | Some(CONTENT_TYPE) => Ok(()),
        Some(other) => Err(CodecError::ContentType(other.to_string())),
    }
}

/// A decoded envelope: header plus the raw payload (decoded later, by type).
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The header.
    pub header: Header,
    /// The payload bytes.
    pub payload: Bytes,
}

impl Envelope {
    /// Frames for ROUTER/DEALER: `[header, payload]`.
    pub fn to_frames(&self) -> Vec<Bytes> {
        vec![encode_header(&self.header), self.payload.clone()]
    }

    /// Frames for PUB: `[topic, header, payload]`, the topic being the header's target.
    pub fn to_pub_frames(&self) -> Vec<Bytes> {
        vec![
            Bytes::copy_from_slice(self.header.target.as_bytes()),
            encode_header(&self.header),
            self.payload.clone(),
        ]
    }

    /// Decodes `[header, payload]`.
    pub fn from_frames(frames: &[Bytes]) -> Result<Envelope, CodecError> {
        if frames.len() != 2 {
            return Err(CodecError::Frames {
                got: frames.len(),
                expected: 2,
            });
        }
        Ok(Envelope {
            header: decode_header(&frames[0])?,
            payload: frames[1].clone(),
        })
    }

    /// Decodes `[topic, header, payload]`.
    pub fn from_pub_frames(frames: &[Bytes]) -> Result<Envelope, CodecError> {
        if frames.len() != 3 {
            return Err(CodecError::Frames {
                got: frames.len(),
                expected: 3,
            });
        }
        Envelope::from_frames(&frames[1..])
    }
}

#[cfg(test)]
mod tests;
