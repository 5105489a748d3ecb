//! Where the node joins the codec and the transport: envelopes become transport messages
//! here, and transport messages become envelopes here.
//!
//! The codec knows nothing of sockets and the transport nothing of envelopes; this module
//! is the only place that knows both. Decoding happens in exactly one place
//! ([`decode`], called by inbound routing); encoding of every envelope the node sends
//! goes through [`message`] or [`pub_message`].

use bytes::Bytes;

use crate::codec::{self, CodecError, Envelope, Header};
use crate::transport::Message;

/// The ROUTER/DEALER message `[header, payload]`.
pub(super) fn message(h: &Header, payload: Bytes) -> Message {
    [codec::encode_header(h), payload].into_iter().collect()
}

/// The PUB message `[topic, header, payload]`, the topic being the header's target
/// (ZeroMQ subscriptions filter on the first frame).
pub(super) fn pub_message(h: &Header, payload: Bytes) -> Message {
    [
        Bytes::copy_from_slice(h.target.as_bytes()),
        codec::encode_header(h),
        payload,
    ]
    .into_iter()
    .collect()
}

/// Which framing a received message has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// `[header, payload]` (ROUTER and DEALER).
    Direct,
    /// `[topic, header, payload]` (SUB).
    Published,
}

/// Decodes a received message.
pub(super) fn decode(framing: Framing, msg: &Message) -> Result<Envelope, CodecError> {
    match framing {
        Framing::Direct => Envelope::from_frames(msg.frames()),
        Framing::Published => Envelope::from_pub_frames(msg.frames()),
    }
}
