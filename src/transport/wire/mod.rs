//! ZMTP 3.1 wire codec: greeting, frames, commands and READY metadata.
//!
//! Exposed only for fuzzing and the protocol tests; not part of the stable API.
//!
//! This module owns the byte layout of ZMTP and nothing else. It performs no I/O, knows
//! nothing of tokio, and never allocates more than the limits it was given allow: every
//! length read from the network is checked against [`SocketOptions`](super::SocketOptions) before a
//! single byte is reserved for it. That makes it the piece the fuzz target and the
//! property tests exercise on their own.

use bytes::{Buf, BufMut, Bytes, BytesMut};

mod decode;

pub use decode::{DecodeLimits, Decoded, Decoder, COPY_BELOW};

use super::error::ProtocolViolation;
use super::Message;

/// Length of a ZMTP 3.x greeting.
pub const GREETING_LEN: usize = 64;

/// Flag bit: more frames follow in this message.
pub const FLAG_MORE: u8 = 0x01;
/// Flag bit: the size field is 8 bytes (big-endian) instead of 1.
pub const FLAG_LONG: u8 = 0x02;
/// Flag bit: the frame is a command, not message data.
pub const FLAG_COMMAND: u8 = 0x04;
const FLAG_RESERVED: u8 = !(FLAG_MORE | FLAG_LONG | FLAG_COMMAND);

/// Largest command frame accepted. Commands are small (READY metadata, PING contexts,
/// subscriptions); a larger one is refused before it is buffered.
pub const MAX_COMMAND_SIZE: usize = 64 * 1024;

/// The NULL security mechanism's name (CURVE's is in [`crate::transport::curve`]).
pub const MECHANISM_NULL: &[u8] = b"NULL";

/// What a peer announced in its greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// Major protocol version (3 for every peer accepted).
    pub major: u8,
    /// Minor protocol version: 0 for ZMTP 3.0, 1 for ZMTP 3.1 (or higher).
    pub minor: u8,
    /// Mechanism name, trailing NUL padding removed.
    pub mechanism: Vec<u8>,
    /// The as-server flag.
    pub as_server: bool,
}

/// Encodes our greeting: ZMTP 3.1, NULL mechanism (see [`encode_greeting_with`] for
/// another).
///
/// ```
/// use peerwire::transport::wire::{encode_greeting, parse_greeting};
/// let g = encode_greeting(false);
/// assert_eq!((g[0], g[9], g[10], g[11]), (0xFF, 0x7F, 3, 1));
/// assert_eq!(parse_greeting(&g).unwrap().mechanism, b"NULL");
/// ```
pub fn encode_greeting(as_server: bool) -> [u8; GREETING_LEN] {
    encode_greeting_with(MECHANISM_NULL, as_server)
}

/// Encodes our greeting: ZMTP 3.1 with `mechanism` (at most 20 bytes).
pub fn encode_greeting_with(mechanism: &[u8], as_server: bool) -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0] = 0xFF;
    g[9] = 0x7F;
    g[10] = 3;
    g[11] = 1;
    let m = &mechanism[..mechanism.len().min(20)];
    g[12..12 + m.len()].copy_from_slice(m);
    g[32] = as_server as u8;
    g
}

/// Checks the greeting bytes received so far, so a peer that is not speaking ZMTP 3 is
/// refused as soon as its first wrong byte arrives rather than after the full 64.
pub fn check_greeting_prefix(bytes: &[u8]) -> Result<(), ProtocolViolation> {
    if let Some(&b) = bytes.first() {
        if b != 0xFF {
            return Err(ProtocolViolation::BadSignature);
        }
    }
    if let Some(&b) = bytes.get(9) {
        if b != 0x7F {
            return Err(ProtocolViolation::BadSignature);
        }
    }
    if let Some(&major) = bytes.get(10) {
        if major < 3 {
            return Err(ProtocolViolation::UnsupportedVersion { major, minor: 0 });
        }
    }
    Ok(())
}

/// Parses a complete greeting and checks that it announces ZMTP 3.x with NULL.
pub fn parse_greeting(bytes: &[u8; GREETING_LEN]) -> Result<Greeting, ProtocolViolation> {
    let g = parse_greeting_any(bytes)?;
    if g.mechanism != MECHANISM_NULL {
        return Err(ProtocolViolation::UnsupportedMechanism(
            String::from_utf8_lossy(&g.mechanism).into_owned(),
        ));
    }
    Ok(g)
}

/// Parses a complete greeting announcing ZMTP 3.x, whatever its mechanism (the caller
/// checks it against its own).
pub fn parse_greeting_any(bytes: &[u8; GREETING_LEN]) -> Result<Greeting, ProtocolViolation> {
    check_greeting_prefix(bytes)?;
    let major = bytes[10];
    let minor = bytes[11];
    if major != 3 {
        // ZMTP 4+ does not exist; a peer announcing it would expect us to downgrade,
        // which the spec only defines for lower versions.
        return Err(ProtocolViolation::UnsupportedVersion { major, minor });
    }
    let mech = &bytes[12..32];
    let end = mech.iter().position(|&b| b == 0).unwrap_or(mech.len());
    let mechanism = mech[..end].to_vec();
    Ok(Greeting {
        major,
        minor,
        mechanism,
        as_server: bytes[32] == 1,
    })
}

/// A command, as ZMTP 3.1 defines them. Unknown commands are kept by name so the
/// connection can count and ignore them (the spec says to ignore unknown commands).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// READY with its metadata properties, in the order received.
    Ready(Vec<(String, Bytes)>),
    /// ERROR with its reason.
    Error(String),
    /// PING with its time-to-live in deciseconds and its context.
    Ping {
        /// Deciseconds the peer asks us to wait for traffic before giving up on it.
        ttl_ds: u16,
        /// Opaque context (at most 16 bytes) to echo back in PONG.
        context: Bytes,
    },
    /// PONG with the context of the PING it answers.
    Pong(Bytes),
    /// SUBSCRIBE (ZMTP 3.1 form) with its topic prefix.
    Subscribe(Bytes),
    /// CANCEL (ZMTP 3.1 form) with its topic prefix.
    Cancel(Bytes),
    /// Any other command: name only.
    Unknown(String),
}

impl Command {
    /// Decodes a command frame body.
    pub fn decode(mut body: Bytes) -> Result<Command, ProtocolViolation> {
        if body.is_empty() {
            return Err(ProtocolViolation::MalformedCommand("empty command frame"));
        }
        let name_len = body.get_u8() as usize;
        if name_len == 0 || body.len() < name_len {
            return Err(ProtocolViolation::MalformedCommand(
                "command name longer than its frame",
            ));
        }
        let name = body.split_to(name_len);
        if !name.iter().all(|b| b.is_ascii_alphabetic()) {
            return Err(ProtocolViolation::MalformedCommand(
                "command name is not alphabetic",
            ));
        }
        Ok(match &name[..] {
            b"READY" => Command::Ready(parse_metadata(body)?),
            b"ERROR" => {
                if body.is_empty() {
                    return Err(ProtocolViolation::MalformedCommand("ERROR without reason"));
                }
                let len = body.get_u8() as usize;
                if body.len() < len {
                    return Err(ProtocolViolation::MalformedCommand(
                        "ERROR reason longer than its frame",
                    ));
                }
                Command::Error(String::from_utf8_lossy(&body[..len]).into_owned())
            }
            b"PING" => {
                if body.len() < 2 {
                    return Err(ProtocolViolation::MalformedCommand("PING without TTL"));
                }
                let ttl_ds = body.get_u16();
                if body.len() > 16 {
                    return Err(ProtocolViolation::MalformedCommand(
                        "PING context over 16 bytes",
                    ));
                }
                Command::Ping {
                    ttl_ds,
                    context: body,
                }
            }
            b"PONG" => {
                if body.len() > 16 {
                    return Err(ProtocolViolation::MalformedCommand(
                        "PONG context over 16 bytes",
                    ));
                }
                Command::Pong(body)
            }
            b"SUBSCRIBE" => Command::Subscribe(body),
            b"CANCEL" => Command::Cancel(body),
            other => Command::Unknown(String::from_utf8_lossy(other).into_owned()),
        })
    }

    /// Encodes this command as a complete frame (header included) into `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let mut body = BytesMut::new();
        self.encode_body(&mut body);
        encode_frame_header(out, FLAG_COMMAND, body.len());
        out.put_slice(&body);
    }

    /// Encodes this command's body (name and data, no frame header) into `body`.
    pub fn encode_body(&self, body: &mut BytesMut) {
        let mut name = |n: &[u8]| {
            body.put_u8(n.len() as u8);
            body.put_slice(n);
        };
        match self {
            Command::Ready(props) => {
                name(b"READY");
                encode_metadata(props, body);
            }
            Command::Error(reason) => {
                name(b"ERROR");
                let r = &reason.as_bytes()[..reason.len().min(255)];
                body.put_u8(r.len() as u8);
                body.put_slice(r);
            }
            Command::Ping { ttl_ds, context } => {
                name(b"PING");
                body.put_u16(*ttl_ds);
                body.put_slice(&context[..context.len().min(16)]);
            }
            Command::Pong(context) => {
                name(b"PONG");
                body.put_slice(&context[..context.len().min(16)]);
            }
            Command::Subscribe(topic) => {
                name(b"SUBSCRIBE");
                body.put_slice(topic);
            }
            Command::Cancel(topic) => {
                name(b"CANCEL");
                body.put_slice(topic);
            }
            Command::Unknown(n) => name(&n.as_bytes()[..n.len().min(255)]),
        }
    }
}

/// Encodes metadata properties: `name-len(1) name value-len(4, BE) value`, repeated (as
/// READY carries them, and CURVE's INITIATE and READY inside their boxes).
pub fn encode_metadata(props: &[(String, Bytes)], out: &mut BytesMut) {
    for (k, v) in props {
        out.put_u8(k.len() as u8);
        out.put_slice(k.as_bytes());
        out.put_u32(v.len() as u32);
        out.put_slice(v);
    }
}

/// Parses READY metadata: `name-len(1) name value-len(4, BE) value`, repeated.
pub fn parse_metadata(mut body: Bytes) -> Result<Vec<(String, Bytes)>, ProtocolViolation> {
    let mut props = Vec::new();
    while body.has_remaining() {
        let name_len = body.get_u8() as usize;
        if name_len == 0 || body.len() < name_len + 4 {
            return Err(ProtocolViolation::MalformedCommand(
                "READY property truncated",
            ));
        }
        let name = body.split_to(name_len);
        if !name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(b))
        {
            return Err(ProtocolViolation::MalformedCommand(
                "READY property name has invalid characters",
            ));
        }
        let value_len = body.get_u32() as usize;
        if body.len() < value_len {
            return Err(ProtocolViolation::MalformedCommand(
                "READY property value longer than its frame",
            ));
        }
        let value = body.split_to(value_len);
        props.push((String::from_utf8_lossy(&name).into_owned(), value));
    }
    Ok(props)
}

/// Writes a frame header (flags and size, short or long form as the size requires).
pub fn encode_frame_header(out: &mut BytesMut, flags: u8, len: usize) {
    if len <= 255 {
        out.put_u8(flags & !FLAG_LONG);
        out.put_u8(len as u8);
    } else {
        out.put_u8(flags | FLAG_LONG);
        out.put_u64(len as u64);
    }
}

/// Length of the header that [`encode_frame_header`] writes for a body of `len` bytes.
pub fn frame_header_len(len: usize) -> usize {
    if len <= 255 {
        2
    } else {
        9
    }
}

/// Encodes a whole data message (every frame, MORE set on all but the last).
/// Used by tests and tools; the connection writer avoids this copy for large frames.
pub fn encode_message(msg: &Message, out: &mut BytesMut) {
    let n = msg.frames().len();
    for (i, f) in msg.frames().iter().enumerate() {
        let flags = if i + 1 < n { FLAG_MORE } else { 0 };
        encode_frame_header(out, flags, f.len());
        out.put_slice(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_round_trip() {
        let g = encode_greeting(true);
        let p = parse_greeting(&g).unwrap();
        assert_eq!((p.major, p.minor), (3, 1));
        assert_eq!(p.mechanism, b"NULL");
        assert!(p.as_server);
    }

    #[test]
    fn greeting_accepts_3_0_and_refuses_others() {
        let mut g = encode_greeting(false);
        g[11] = 0;
        assert_eq!(parse_greeting(&g).unwrap().minor, 0);
        g[10] = 2;
        assert!(matches!(
            parse_greeting(&g),
            Err(ProtocolViolation::UnsupportedVersion { major: 2, .. })
        ));
        let mut g = encode_greeting(false);
        g[12..17].copy_from_slice(b"CURVE");
        assert!(matches!(
            parse_greeting(&g),
            Err(ProtocolViolation::UnsupportedMechanism(m)) if m == "CURVE"
        ));
        assert_eq!(
            check_greeting_prefix(b"GET / HTTP/1.1"),
            Err(ProtocolViolation::BadSignature)
        );
    }
}
