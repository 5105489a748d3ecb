//! The incremental decoder of what follows the greeting: frames cut out of a
//! connection's read buffer, checked against the limits at their header, assembled into
//! messages and commands.
//!
//! Owns the decoding state of one connection and nothing else; never reads a socket and
//! never reserves memory for a size not yet checked.

use bytes::{Buf, Bytes, BytesMut};

use super::{Command, FLAG_COMMAND, FLAG_LONG, FLAG_MORE, FLAG_RESERVED, MAX_COMMAND_SIZE};
use crate::transport::error::ProtocolViolation;
use crate::transport::Message;

/// Limits the decoder enforces; a copy of the relevant part of [`SocketOptions`](crate::transport::SocketOptions).
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest frame body accepted.
    pub max_frame_size: usize,
    /// Largest message (sum of its frame bodies) accepted.
    pub max_message_size: usize,
    /// Most frames in one message.
    pub max_frames: usize,
}

/// What the decoder produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A complete data message.
    Message(Message),
    /// A command frame.
    Command(Command),
}

/// Incremental decoder for the traffic after the greeting.
///
/// Feed it the connection's read buffer; it returns complete messages and commands and
/// leaves partial input in the buffer. Every size is checked against the limits as soon as
/// its header is complete, so a header claiming 1 TiB is refused after 9 bytes.
#[derive(Debug)]
pub struct Decoder {
    limits: DecodeLimits,
    /// Flags and body size of the frame whose header was read but whose body has not
    /// fully arrived yet.
    pending: Option<(u8, usize)>,
    /// Frames of the message being assembled.
    frames: Vec<Bytes>,
    /// Bytes in `frames`.
    message_bytes: usize,
    /// Refuse data frames at their header (during the handshake, before READY).
    commands_only: bool,
    /// Copy frames under [`COPY_BELOW`] out of the buffer instead of sharing it.
    copy_small: bool,
}

/// Frames smaller than this are copied out of a large read buffer (see
/// [`Decoder::copy_small_frames`]).
pub const COPY_BELOW: usize = 16 * 1024;

impl Decoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: DecodeLimits) -> Self {
        Decoder {
            limits,
            pending: None,
            frames: Vec::new(),
            message_bytes: 0,
            commands_only: false,
            copy_small: false,
        }
    }

    /// A decoder for the handshake: commands only. A data frame is refused as soon as
    /// its header arrives, so a peer cannot make us buffer a message before READY.
    pub fn commands_only() -> Self {
        Decoder {
            commands_only: true,
            ..Decoder::new(DecodeLimits {
                max_frame_size: 0,
                max_message_size: 0,
                max_frames: 0,
            })
        }
    }

    /// While set, frames under [`COPY_BELOW`] are copied out of the buffer rather than
    /// sharing its allocation. A frame cut from a buffer shares (and keeps alive) the
    /// buffer's whole allocation: after a large message, a small one held for long (a
    /// request in a slow handler) would otherwise keep megabytes.
    pub fn copy_small_frames(&mut self, on: bool) {
        self.copy_small = on;
    }

    /// Bytes of the message being assembled whose frames are complete (the rest of it is
    /// still in the read buffer).
    pub fn partial_bytes(&self) -> usize {
        self.message_bytes
    }

    /// How many more bytes the buffer needs before the next call can make progress,
    /// bounded by the limits. The connection reserves at most this much (capped at its
    /// read chunk), which is what keeps a slow sender of a huge frame from making us
    /// allocate ahead of the bytes it actually sent.
    pub fn wanted(&self, buffered: usize) -> usize {
        match self.pending {
            Some((flags, len)) => {
                let hdr = if flags & FLAG_LONG != 0 { 9 } else { 2 };
                (hdr + len).saturating_sub(buffered)
            }
            None => 9usize.saturating_sub(buffered).max(1),
        }
    }

    /// Decodes the next complete item from `buf`, consuming its bytes.
    /// `Ok(None)` means more input is needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, ProtocolViolation> {
        loop {
            let Some((flags, body)) = self.frame(buf)? else {
                return Ok(None);
            };
            if flags & FLAG_COMMAND != 0 {
                return Command::decode(body).map(|c| Some(Decoded::Command(c)));
            }
            self.message_bytes += body.len();
            self.frames.push(body);
            if flags & FLAG_MORE == 0 {
                self.message_bytes = 0;
                let msg: Message = self.frames.drain(..).collect();
                return Ok(Some(Decoded::Message(msg)));
            }
        }
    }

    /// The next command frame's body, unparsed (for a handshake whose commands are the
    /// mechanism's own, CURVE's). Meant for a [`commands_only`](Self::commands_only)
    /// decoder, which refuses data frames at their header.
    pub fn decode_command_body(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<Bytes>, ProtocolViolation> {
        Ok(self.frame(buf)?.map(|(_, body)| body))
    }

    /// Cuts the next complete frame out of `buf`: its flags and body.
    fn frame(&mut self, buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>, ProtocolViolation> {
        {
            let (flags, len, hdr) = match self.pending {
                Some((flags, len)) => (flags, len, header_len(flags)),
                None => {
                    let Some(&flags) = buf.first() else {
                        return Ok(None);
                    };
                    if flags & FLAG_RESERVED != 0 {
                        return Err(ProtocolViolation::ReservedFlags(flags));
                    }
                    let hdr = header_len(flags);
                    if buf.len() < hdr {
                        return Ok(None);
                    }
                    let raw = if flags & FLAG_LONG != 0 {
                        u64::from_be_bytes(buf[1..9].try_into().expect("8 bytes"))
                    } else {
                        buf[1] as u64
                    };
                    let len = self.check_size(flags, raw)?;
                    self.pending = Some((flags, len));
                    (flags, len, hdr)
                }
            };
            if buf.len() < hdr + len {
                return Ok(None);
            }
            self.pending = None;
            buf.advance(hdr);
            let body = if self.copy_small && len < COPY_BELOW {
                let b = Bytes::copy_from_slice(&buf[..len]);
                buf.advance(len);
                b
            } else {
                buf.split_to(len).freeze()
            };
            Ok(Some((flags, body)))
        }
    }

    /// Checks a frame size against every limit before anything is reserved for it.
    fn check_size(&self, flags: u8, raw: u64) -> Result<usize, ProtocolViolation> {
        if flags & FLAG_COMMAND != 0 {
            if flags & FLAG_MORE != 0 {
                return Err(ProtocolViolation::MalformedCommand(
                    "command frame with MORE flag",
                ));
            }
            if !self.frames.is_empty() {
                return Err(ProtocolViolation::MalformedCommand(
                    "command frame inside a multipart message",
                ));
            }
            if raw > MAX_COMMAND_SIZE as u64 {
                return Err(ProtocolViolation::FrameTooLarge {
                    size: raw,
                    max: MAX_COMMAND_SIZE,
                });
            }
            return Ok(raw as usize);
        }
        if self.commands_only {
            return Err(ProtocolViolation::Unexpected("message before READY"));
        }
        if raw > self.limits.max_frame_size as u64 {
            return Err(ProtocolViolation::FrameTooLarge {
                size: raw,
                max: self.limits.max_frame_size,
            });
        }
        let total = self.message_bytes as u64 + raw;
        if total > self.limits.max_message_size as u64 {
            return Err(ProtocolViolation::MessageTooLarge {
                size: total,
                max: self.limits.max_message_size,
            });
        }
        if self.frames.len() + 1 > self.limits.max_frames {
            return Err(ProtocolViolation::TooManyFrames {
                max: self.limits.max_frames,
            });
        }
        Ok(raw as usize)
    }
}

fn header_len(flags: u8) -> usize {
    if flags & FLAG_LONG != 0 {
        9
    } else {
        2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::wire::encode_frame_header;
    use bytes::BufMut;

    fn limits() -> DecodeLimits {
        DecodeLimits {
            max_frame_size: 1024,
            max_message_size: 4096,
            max_frames: 8,
        }
    }

    #[test]
    fn huge_header_refused_after_nine_bytes() {
        let mut d = Decoder::new(limits());
        let mut buf = BytesMut::new();
        buf.put_u8(FLAG_LONG);
        buf.put_u64(1 << 40);
        let err = d.decode(&mut buf).unwrap_err();
        assert!(matches!(err, ProtocolViolation::FrameTooLarge { size, .. } if size == 1 << 40));
    }

    #[test]
    fn message_limits_enforced_across_frames() {
        let mut d = Decoder::new(limits());
        let mut buf = BytesMut::new();
        for _ in 0..9 {
            encode_frame_header(&mut buf, FLAG_MORE, 1);
            buf.put_u8(7);
        }
        assert!(matches!(
            d.decode(&mut buf),
            Err(ProtocolViolation::TooManyFrames { max: 8 })
        ));
        let mut d = Decoder::new(limits());
        let mut buf = BytesMut::new();
        for _ in 0..5 {
            encode_frame_header(&mut buf, FLAG_MORE, 1000);
            buf.put_bytes(0, 1000);
        }
        assert!(matches!(
            d.decode(&mut buf),
            Err(ProtocolViolation::MessageTooLarge { .. })
        ));
    }

    #[test]
    fn commands_round_trip() {
        let cmds = [
            Command::Ready(vec![
                ("Socket-Type".into(), Bytes::from_static(b"DEALER")),
                ("Identity".into(), Bytes::from_static(b"abc")),
            ]),
            Command::Error("nope".into()),
            Command::Ping {
                ttl_ds: 30,
                context: Bytes::from_static(b"ctx"),
            },
            Command::Pong(Bytes::from_static(b"ctx")),
            Command::Subscribe(Bytes::from_static(b"topic")),
            Command::Cancel(Bytes::new()),
        ];
        let mut d = Decoder::new(limits());
        for c in cmds {
            let mut buf = BytesMut::new();
            c.encode(&mut buf);
            assert_eq!(d.decode(&mut buf).unwrap(), Some(Decoded::Command(c)));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn small_frames_can_be_copied_out_of_the_buffer() {
        let mut buf = BytesMut::new();
        for _ in 0..2 {
            encode_frame_header(&mut buf, 0, 10);
            buf.put_bytes(9, 10);
        }
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.capacity();
        let ptr_of = |d: Decoded| match d {
            Decoded::Message(m) => m.frames()[0].as_ptr() as usize,
            Decoded::Command(_) => unreachable!(),
        };
        let mut d = Decoder::new(limits());
        let shared = ptr_of(d.decode(&mut buf).unwrap().unwrap());
        assert!(
            range.contains(&shared),
            "by default a frame shares the buffer"
        );
        d.copy_small_frames(true);
        let copied = ptr_of(d.decode(&mut buf).unwrap().unwrap());
        assert!(
            !range.contains(&copied),
            "copied: keeps nothing of the buffer alive"
        );
    }

    #[test]
    fn reserved_flags_refused() {
        let mut d = Decoder::new(limits());
        let mut buf = BytesMut::from(&[0x80u8, 0][..]);
        assert_eq!(
            d.decode(&mut buf),
            Err(ProtocolViolation::ReservedFlags(0x80))
        );
    }
}
