//! Hand-written MessagePack encoding of the envelope header.
//!
//! The header is on every message, so it is encoded and decoded without serde: this is
//! several times faster and allocates only the strings it returns. The bytes are exactly
//! what `rmp_serde::to_vec_named(&header)` produces (a unit test checks it), and the
//! decoder accepts anything a MessagePack writer may send for the same values (any
//! integer width, nil for absent options, a struct as an array) and skips unknown keys.

use std::collections::BTreeMap;

use bytes::Bytes;
use rmp::encode as enc;

use super::{CodecError, Header, Id, Kind, MessageType, Version};

/// Deepest nesting skipped inside an unknown value (bounds recursion on hostile input).
const MAX_DEPTH: usize = 32;
/// Largest header accepted. Real headers are a few hundred bytes; the cap keeps what a
/// header can make us allocate (strings, the `h` map) small whatever the frame limit.
pub(super) const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most entries in the `h` (string headers) map.
pub(super) const MAX_HEADERS: usize = 64;

pub(super) fn encode(h: &Header) -> Bytes {
    let mut b = super::EncodeBuf::new();
    let w = &mut b;
    let mut n = 4; // v, k, id, src
    n += !h.correlation_id.is_nil() as u32;
    n += !h.target.is_empty() as u32;
    n += h.deadline_ms.is_some() as u32;
    n += h.content_type.is_some() as u32;
    n += !h.headers.is_empty() as u32;
    n += h.shard_key.is_some() as u32;
    n += (h.seq != 0) as u32;
    n += h.method_version.is_some() as u32;
    n += h.message_type.is_some() as u32;
    // Writing into a Vec cannot fail.
    let _ = enc::write_map_len(w, n);
    key(w, "v");
    let _ = enc::write_uint(w, h.version as u64);
    key(w, "k");
    let _ = enc::write_uint(w, h.kind.code() as u64);
    key(w, "id");
    let _ = enc::write_bin(w, h.id.0.as_bytes());
    if !h.correlation_id.is_nil() {
        key(w, "cid");
        let _ = enc::write_bin(w, h.correlation_id.0.as_bytes());
    }
    key(w, "src");
    let _ = enc::write_bin(w, h.sender.0.as_bytes());
    if !h.target.is_empty() {
        key(w, "tgt");
        let _ = enc::write_str(w, &h.target);
    }
    if let Some(dl) = h.deadline_ms {
        key(w, "dl");
        let _ = enc::write_uint(w, dl);
    }
    if let Some(ct) = &h.content_type {
        key(w, "ct");
        let _ = enc::write_str(w, ct);
    }
    if !h.headers.is_empty() {
        key(w, "h");
        let _ = enc::write_map_len(w, h.headers.len() as u32);
        for (k, v) in &h.headers {
            let _ = enc::write_str(w, k);
            let _ = enc::write_str(w, v);
        }
    }
    if let Some(sk) = &h.shard_key {
        key(w, "sk");
        let _ = enc::write_str(w, sk);
    }
    if h.seq != 0 {
        key(w, "seq");
        let _ = enc::write_uint(w, h.seq);
    }
    if let Some(v) = h.method_version {
        key(w, "mv");
        let _ = enc::write_map_len(w, 2);
        key(w, "major");
        let _ = enc::write_uint(w, v.major as u64);
        key(w, "minor");
        let _ = enc::write_uint(w, v.minor as u64);
    }
    if let Some(t) = h.message_type {
        key(w, "mt");
        let _ = enc::write_uint(w, t.code() as u64);
    }
    super::exact_bytes(b)
}

fn key(w: &mut super::EncodeBuf, k: &str) {
    let _ = enc::write_str(w, k);
}

/// A cursor over MessagePack bytes.
struct Rd<'a> {
    b: &'a [u8],
}

/// A length from the wire as `usize`, refused where it does not fit (32-bit targets).
fn len(n: u64) -> Result<usize, CodecError> {
    usize::try_from(n).map_err(|_| err("too long"))
}

fn err(what: &str) -> CodecError {
    CodecError::Header(what.to_string())
}

impl<'a> Rd<'a> {
    fn byte(&mut self) -> Result<u8, CodecError> {
        let (&x, rest) = self.b.split_first().ok_or_else(|| err("truncated"))?;
        self.b = rest;
        Ok(x)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.b.len() < n {
            return Err(err("truncated"));
        }
        let (x, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(x)
    }

    fn be(&mut self, n: usize) -> Result<u64, CodecError> {
        Ok(self.take(n)?.iter().fold(0u64, |a, &x| (a << 8) | x as u64))
    }

    fn peek(&self) -> Option<u8> {
        self.b.first().copied()
    }

    /// Consumes a nil if one is next.
    fn nil(&mut self) -> bool {
        if self.peek() == Some(0xc0) {
            self.b = &self.b[1..];
            true
        } else {
            false
        }
    }

    fn uint(&mut self) -> Result<u64, CodecError> {
        let m = self.byte()?;
        Ok(match m {
            0x00..=0x7f => m as u64,
            0xcc => self.be(1)?,
            0xcd => self.be(2)?,
            0xce => self.be(4)?,
            0xcf => self.be(8)?,
            // Signed encodings of non-negative values are legal MessagePack too.
            0xd0..=0xd3 => {
                let n = 1usize << (m - 0xd0);
                let raw = self.be(n)?;
                let shift = 64 - 8 * n as u32;
                let v = ((raw << shift) as i64) >> shift;
                u64::try_from(v).map_err(|_| err("negative integer"))?
            }
            _ => return Err(err("expected an unsigned integer")),
        })
    }

    fn str_len(&mut self) -> Result<usize, CodecError> {
        let m = self.byte()?;
        Ok(match m {
            0xa0..=0xbf => (m & 0x1f) as usize,
            0xd9 => self.be(1)? as usize,
            0xda => self.be(2)? as usize,
            0xdb => self.be(4)? as usize,
            _ => return Err(err("expected a string")),
        })
    }

    /// A map key: compared as bytes, so no UTF-8 check is needed for it.
    fn key(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.str_len()?;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a str, CodecError> {
        let n = self.str_len()?;
        std::str::from_utf8(self.take(n)?).map_err(|_| err("string is not UTF-8"))
    }

    fn bin(&mut self) -> Result<&'a [u8], CodecError> {
        let m = self.byte()?;
        let n = match m {
            0xc4 => self.be(1)? as usize,
            0xc5 => self.be(2)? as usize,
            0xc6 => self.be(4)? as usize,
            _ => return Err(err("expected binary")),
        };
        self.take(n)
    }

    fn map_len(&mut self) -> Result<usize, CodecError> {
        let m = self.byte()?;
        Ok(match m {
            0x80..=0x8f => (m & 0x0f) as usize,
            0xde => self.be(2)? as usize,
            0xdf => self.be(4)? as usize,
            _ => return Err(err("expected a map")),
        })
    }

    fn id(&mut self) -> Result<Id, CodecError> {
        // Some writers send byte arrays as arrays of integers.
        if let Some(m @ (0x90..=0x9f | 0xdc)) = self.peek() {
            let n = if m == 0xdc {
                self.byte()?;
                self.be(2)? as usize
            } else {
                self.byte()?;
                (m & 0x0f) as usize
            };
            if n != 16 {
                return Err(err("an id is 16 bytes"));
            }
            let mut b = [0u8; 16];
            for x in &mut b {
                *x = u8::try_from(self.uint()?).map_err(|_| err("id byte over 255"))?;
            }
            return Ok(Id(uuid::Uuid::from_bytes(b)));
        }
        let b = self.bin()?;
        uuid::Uuid::from_slice(b)
            .map(Id)
            .map_err(|_| err("an id is 16 bytes"))
    }

    fn version(&mut self) -> Result<Version, CodecError> {
        let m = self.peek().ok_or_else(|| err("truncated"))?;
        let small = |v: u64| u16::try_from(v).map_err(|_| err("version part over 65535"));
        if matches!(m, 0x90..=0x9f | 0xdc | 0xdd) {
            let n = match self.byte()? {
                0xdc => self.be(2)? as usize,
                0xdd => self.be(4)? as usize,
                m => (m & 0x0f) as usize,
            };
            if n != 2 {
                return Err(err("a version is [major, minor]"));
            }
            return Ok(Version::new(small(self.uint()?)?, small(self.uint()?)?));
        }
        let mut v = Version::default();
        for _ in 0..self.map_len()? {
            match self.key()? {
                b"major" => v.major = small(self.uint()?)?,
                b"minor" => v.minor = small(self.uint()?)?,
                _ => self.skip(0)?,
            }
        }
        Ok(v)
    }

    /// Skips one value of any type.
    fn skip(&mut self, depth: usize) -> Result<(), CodecError> {
        if depth > MAX_DEPTH {
            return Err(err("nested too deeply"));
        }
        let m = self.byte()?;
        let (data, items): (usize, usize) = match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * (m & 0x0f) as usize),
            0x90..=0x9f => (0, (m & 0x0f) as usize),
            0xa0..=0xbf => ((m & 0x1f) as usize, 0),
            0xc4 | 0xd9 => (self.be(1)? as usize, 0),
            0xc5 | 0xda => (self.be(2)? as usize, 0),
            0xc6 | 0xdb => (self.be(4)? as usize, 0),
            0xc7 => (self.be(1)? as usize + 1, 0),
            0xc8 => (self.be(2)? as usize + 1, 0),
            0xc9 => (
                len(self.be(4)?)?
                    .checked_add(1)
                    .ok_or_else(|| err("too long"))?,
                0,
            ),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, self.be(2)? as usize),
            0xdd => (0, self.be(4)? as usize),
            0xde => (0, 2 * self.be(2)? as usize),
            0xdf => (
                0,
                len(self.be(4)?)?
                    .checked_mul(2)
                    .ok_or_else(|| err("too long"))?,
            ),
            _ => return Err(err("invalid MessagePack marker 0xc1")),
        };
        self.take(data)?;
        // Every item needs at least one byte: a count larger than what is left is a lie,
        // refused before looping over it.
        if items > self.b.len() {
            return Err(err("truncated"));
        }
        for _ in 0..items {
            self.skip(depth + 1)?;
        }
        Ok(())
    }
}

pub(super) fn decode(bytes: &[u8]) -> Result<Header, CodecError> {
    if bytes.len() > MAX_HEADER_BYTES {
        return Err(err("header larger than 64 KiB"));
    }
    let mut r = Rd { b: bytes };
    let mut h = Header::default();
    let n = r.map_len()?;
    if n > r.b.len() {
        return Err(err("truncated"));
    }
    // `v`, `k` and `id` are required: without them a message cannot be understood or
    // answered. Everything else has a default.
    let mut required = 0u8;
    for _ in 0..n {
        let k = r.key()?;
        match k {
            b"v" => {
                h.version = u8::try_from(r.uint()?).map_err(|_| err("version over 255"))?;
                required |= 1;
            }
            b"k" => {
                h.kind =
                    Kind::from_code(u8::try_from(r.uint()?).map_err(|_| err("kind over 255"))?);
                required |= 2;
            }
            b"id" => {
                h.id = r.id()?;
                required |= 4;
            }
            b"cid" => h.correlation_id = if r.nil() { Id::NIL } else { r.id()? },
            b"src" => h.sender = r.id()?,
            b"tgt" => {
                h.target = if r.nil() {
                    String::new()
                } else {
                    r.str()?.to_string()
                }
            }
            b"dl" => h.deadline_ms = if r.nil() { None } else { Some(r.uint()?) },
            b"ct" => {
                h.content_type = if r.nil() {
                    None
                } else {
                    Some(r.str()?.to_string())
                }
            }
            b"h" => {
                if !r.nil() {
                    let n = r.map_len()?;
                    if n > MAX_HEADERS {
                        return Err(err("more than 64 string headers"));
                    }
                    let mut m = BTreeMap::new();
                    for _ in 0..n {
                        let k = r.str()?.to_string();
                        let v = r.str()?.to_string();
                        m.insert(k, v);
                    }
                    h.headers = m;
                }
            }
            b"sk" => {
                h.shard_key = if r.nil() {
                    None
                } else {
                    let k = r.str()?;
                    if k.len() > super::MAX_SHARD_KEY {
                        return Err(err("shard key longer than 1024 bytes"));
                    }
                    Some(k.to_string())
                }
            }
            b"seq" => h.seq = if r.nil() { 0 } else { r.uint()? },
            b"mv" => h.method_version = if r.nil() { None } else { Some(r.version()?) },
            // A type this build does not know is treated as absent (a newer sender's):
            // the kind's default stands.
            b"mt" => {
                h.message_type = if r.nil() {
                    None
                } else {
                    MessageType::from_code(r.uint()?)
                }
            }
            _ => r.skip(0)?,
        }
    }
    match required {
        7 => Ok(h),
        r => Err(err(match (r & 1, r & 2, r & 4) {
            (0, ..) => "the required field `v` is missing",
            (_, 0, _) => "the required field `k` is missing",
            _ => "the required field `id` is missing",
        })),
    }
}

/// From a header that does not decode, what is needed to answer it anyway: its `id`
/// (when that is a valid 16-byte id) and its kind code (when readable). `None` when the
/// `id` cannot be read: such a message cannot be correlated with anything.
pub(super) fn salvage(bytes: &[u8]) -> Option<(Id, Option<u8>)> {
    // (A `k` that is not an unsigned integer reads as "unknown kind": answered.)
    if bytes.len() > MAX_HEADER_BYTES {
        return None;
    }
    let mut r = Rd { b: bytes };
    let n = r.map_len().ok()?;
    let (mut id, mut kind) = (None, None);
    // Anything unreadable ends the scan: what was read before it stands.
    for _ in 0..n.min(bytes.len()) {
        let Ok(key) = r.key() else { break };
        let read = match key {
            b"id" => r.id().map(|v| id = Some(v)),
            b"k" => r.uint().map(|k| kind = u8::try_from(k).ok()),
            _ => r.skip(0),
        };
        if read.is_err() || (id.is_some() && kind.is_some()) {
            break;
        }
    }
    id.map(|id| (id, kind))
}
