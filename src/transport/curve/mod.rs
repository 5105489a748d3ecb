//! CURVE: ZeroMQ's security mechanism (ZMTP-CURVE, rfc.zeromq.org spec 25; CurveZMQ,
//! spec 26), wire-compatible with libzmq. A connection is authenticated (each side proves
//! it holds the secret key of the public key the other expects or accepts) and every
//! frame after the handshake is encrypted and authenticated.
//!
//! This module owns the keys, the handshake's commands (built and checked, no I/O) and
//! the boxing of frames once the handshake is done. It never touches a socket (the
//! connection's handshake and loop do) and writes no cryptography: the boxes are
//! RustCrypto's `crypto_box` (X25519, XSalsa20-Poly1305, as libsodium makes them) and the
//! cookie its `crypto_secretbox`.
//!
//! Roles follow the connection: the side that accepted it is the CURVE server (it proves
//! the key it is configured with and judges the client's), the side that dialled is the
//! client (it must know the server's public key before it can say anything).
//!
//! On the wire, after both greetings announce `CURVE`:
//!
//! ```text
//! client  HELLO     C' + Box[64 zero bytes](C'->S)
//! server  WELCOME   Box[S' + cookie](S->C')          cookie = secretbox[C' + s'] (key K)
//! client  INITIATE  cookie + Box[C + vouch + metadata](C'->S'),  vouch = Box[C' + S](C->S')
//! server  READY     Box[metadata](S'->C')            (or ERROR, in clear)
//! then    MESSAGE   nonce + Box[flags + frame](C'<->S'), one per frame, nonces rising
//! ```

use std::fmt;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use crypto_box::aead::generic_array::GenericArray;
use crypto_box::aead::{Aead, AeadInPlace, OsRng};
use crypto_box::{PublicKey, SalsaBox, SecretKey};
use zeroize::Zeroizing;

use super::error::ProtocolViolation;
use super::wire::{encode_frame_header, Command, Decoded, Decoder, MAX_COMMAND_SIZE};
use super::{Endpoint, Message};

mod cert;
mod handshake;

pub(crate) use cert::{check_private, create_new};
pub use cert::{read_certificate, write_certificate, Certificate};
pub use handshake::{ClientHandshake, ServerHandshake};

/// The READY property in which a server of a cluster (see [`Curve::cluster`]) proves its
/// own long-term key: `N` (32 bytes), a nonce (16) and `Box[S'](N->C')` (48).
pub const NODE_PROOF: &str = "X-Peerwire-Node";
const NODE_PROOF_LEN: usize = 32 + 16 + 32 + MAC;

/// The mechanism name a CURVE greeting announces.
pub const MECHANISM_CURVE: &[u8] = b"CURVE";

/// Bytes a boxed frame adds to the frame it carries: `\x07MESSAGE`, the nonce, the MAC
/// and the flags byte.
pub const MESSAGE_OVERHEAD: usize = 8 + 8 + 16 + 1;

const MAC: usize = 16;
const HELLO_LEN: usize = 200;
const WELCOME_LEN: usize = 168;
const INITIATE_MIN: usize = 257;
const READY_MIN: usize = 30;
const COOKIE_LEN: usize = 96;

/// Inner flags of a boxed frame (inside the box, not the outer frame's flags).
const INNER_MORE: u8 = 0x01;
const INNER_COMMAND: u8 = 0x02;

/// A long-term key pair (X25519). The secret never appears in `Debug` output, and
/// clones share one copy of it (held behind an `Arc`), so that no clone leaves another
/// behind in freed memory.
#[derive(Clone)]
pub struct CurveKeys(Arc<KeyPair>);

struct KeyPair {
    secret: SecretKey,
    public: PublicKey,
}

impl fmt::Debug for CurveKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CurveKeys(public {})", encode_key(&self.public()))
    }
}

impl CurveKeys {
    /// A new key pair from the operating system's random source.
    pub fn generate() -> Self {
        Self::of(SecretKey::generate(&mut OsRng))
    }

    /// The key pair of a stored secret key.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self::of(SecretKey::from(secret))
    }

    fn of(secret: SecretKey) -> Self {
        CurveKeys(Arc::new(KeyPair {
            public: secret.public_key(),
            secret,
        }))
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        *self.0.public.as_bytes()
    }

    /// The secret key, for storing (keep it private; wiped when dropped).
    pub fn secret(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.secret.to_bytes())
    }

    pub(crate) fn secret_key(&self) -> &SecretKey {
        &self.0.secret
    }

    pub(crate) fn public_key(&self) -> &PublicKey {
        &self.0.public
    }
}

/// Whether the X25519 result of `mine` with `theirs` is all zeros: `theirs` is of low
/// order, and the box between them would be under a key anyone can compute. libsodium
/// refuses such keys (crypto_box does not check); so do we, for every key a peer
/// sends and every server key we are given.
pub(crate) fn weak(mine: &SecretKey, theirs: &PublicKey) -> bool {
    let shared = Zeroizing::new(x25519_dalek::x25519(mine.to_bytes(), *theirs.as_bytes()));
    shared.iter().all(|&b| b == 0)
}

/// Why a text key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a key: expected 40 characters of Z85 (ZeroMQ's text form of a 32-byte key)")]
pub struct KeyError;

/// A 32-byte key as Z85 text (40 characters), as ZeroMQ's tools print keys.
pub fn encode_key(key: &[u8; 32]) -> String {
    z85::encode(key)
}

/// A key from its Z85 text (a trailing NUL, as some tools write, is ignored).
pub fn decode_key(text: &str) -> Result<[u8; 32], KeyError> {
    let text = text.trim().trim_end_matches('\0');
    if text.len() != 40 {
        return Err(KeyError);
    }
    let bytes = z85::decode(text).map_err(|_| KeyError)?;
    bytes.try_into().map_err(|_| KeyError)
}

/// Decides whether a client's long-term public key may connect (a server's ZAP, in
/// libzmq's terms). Called once per handshake.
pub type Authorizer = Arc<dyn Fn(&[u8; 32]) -> bool + Send + Sync>;

/// The public key of the server at an endpoint, for a socket that dials several.
pub type ServerKeyOf = Arc<dyn Fn(&Endpoint) -> Option<[u8; 32]> + Send + Sync>;

/// A socket's CURVE settings (see [`SocketOptions::with_curve`](super::SocketOptions::with_curve)).
#[derive(Clone)]
pub struct Curve {
    pub(crate) keys: CurveKeys,
    server_key: Option<ServerKeyOf>,
    authorize: Option<Authorizer>,
    cluster: Option<CurveKeys>,
}

impl fmt::Debug for Curve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Curve")
            .field("keys", &self.keys)
            .field("server_key", &self.server_key.is_some())
            .field("authorize", &self.authorize.is_some())
            .field("cluster", &self.cluster.is_some())
            .finish()
    }
}

impl Curve {
    /// CURVE with this key pair. A socket that accepts connections proves it and, with
    /// no [`authorize`](Self::authorize), accepts any client that completes the
    /// handshake; a socket that dials needs its server's public key
    /// ([`server_key`](Self::server_key)).
    pub fn new(keys: CurveKeys) -> Self {
        Curve {
            keys,
            server_key: None,
            authorize: None,
            cluster: None,
        }
    }

    /// Makes this socket one of a cluster whose servers all share `cluster`, a key pair
    /// only members hold (peerwire derives it from a cluster secret):
    ///
    /// - accepting, the socket proves `cluster` in the handshake (so only a client that
    ///   knows its public key gets past HELLO), and proves its own key in a READY
    ///   property ([`NODE_PROOF`]) bound to this connection's transient keys;
    /// - dialling, it expects `cluster`'s public key at every endpoint (no per-endpoint
    ///   key is needed) and refuses a server that does not prove its own key in READY;
    ///   [`peer_key`](CurveSession::peer_key) is then that key, judged by
    ///   [`authorize`](Self::authorize) as a client's is, and
    ///   [`server_key_of`](Self::server_key_of) names the key a server at an endpoint
    ///   must prove as its own (`None`: any member).
    ///
    /// Nobody may use the cluster's key as its own (a key every member holds proves
    /// nobody in particular): a client or server that does is refused.
    ///
    /// The cluster's public key is a secret too: knowing it is what proves membership
    /// (it never crosses the wire in clear; CURVE only ever sends it inside a box).
    pub fn cluster(mut self, cluster: CurveKeys) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// The key pair this socket proves as a server: the cluster's, or its own.
    pub(crate) fn server_keys(&self) -> &CurveKeys {
        self.cluster.as_ref().unwrap_or(&self.keys)
    }

    /// Whether this socket is one of a cluster (see [`cluster`](Self::cluster)).
    pub(crate) fn in_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// The public key of the server every connection of this socket dials.
    pub fn server_key(mut self, key: [u8; 32]) -> Self {
        self.server_key = Some(Arc::new(move |_| Some(key)));
        self
    }

    /// The public key of the server at each endpoint dialled (`None`: that endpoint is
    /// not dialled: the handshake fails at once).
    pub fn server_key_of(mut self, f: ServerKeyOf) -> Self {
        self.server_key = Some(f);
        self
    }

    /// Which clients an accepting socket lets in, by long-term public key.
    pub fn authorize(mut self, f: Authorizer) -> Self {
        self.authorize = Some(f);
        self
    }

    /// Whether a client with this long-term key may connect.
    pub(crate) fn allows(&self, client: &[u8; 32]) -> bool {
        self.authorize.as_ref().is_none_or(|f| f(client))
    }

    /// The server key for a dial of `endpoint`.
    pub(crate) fn server_key_for(&self, endpoint: &Endpoint) -> Option<[u8; 32]> {
        if let Some(c) = &self.cluster {
            return Some(c.public());
        }
        self.server_key.as_ref().and_then(|f| f(endpoint))
    }

    /// In a cluster, the key the server at `endpoint` must prove as its own, if one is
    /// expected there.
    pub(crate) fn node_key_for(&self, endpoint: &Endpoint) -> Option<[u8; 32]> {
        self.cluster.as_ref()?;
        self.server_key.as_ref().and_then(|f| f(endpoint))
    }

    /// Whether `key` is the cluster's (which nobody may use as its own).
    pub(crate) fn is_cluster_key(&self, key: &[u8; 32]) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.public() == *key)
    }
}

fn nonce(prefix: &[u8], rest: &[u8]) -> GenericArray<u8, crypto_box::aead::consts::U24> {
    let mut n = [0u8; 24];
    n[..prefix.len()].copy_from_slice(prefix);
    n[prefix.len()..].copy_from_slice(rest);
    n.into()
}

fn random16() -> [u8; 16] {
    let mut r = [0u8; 16];
    getrandom_fill(&mut r);
    r
}

fn getrandom_fill(buf: &mut [u8]) {
    use crypto_box::aead::rand_core::RngCore;
    OsRng.fill_bytes(buf);
}

fn malformed(what: &'static str) -> ProtocolViolation {
    ProtocolViolation::CurveMalformed(what)
}

fn crypto(what: &'static str) -> ProtocolViolation {
    ProtocolViolation::CurveCrypto(what)
}

/// Seals and opens the frames of one connection after its handshake.
pub struct CurveSession {
    /// The handshake's box between the transient keys: it seals every frame we send.
    shared: SalsaBox,
    /// The peer's transient public key and ours secret: the opening half's own box (the
    /// crate's boxes cannot be cloned).
    their: PublicKey,
    mine: SecretKey,
    tx_prefix: &'static [u8; 16],
    tx_nonce: u64,
    rx_prefix: &'static [u8; 16],
    rx_last: u64,
    peer_key: [u8; 32],
}

impl fmt::Debug for CurveSession {
    // (Not the peer key: until a cluster server's proof is accepted, it is the
    // cluster's, which is a secret.)
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurveSession(..)")
    }
}

impl CurveSession {
    /// The peer's long-term public key, as the handshake proved it.
    pub fn peer_key(&self) -> [u8; 32] {
        self.peer_key
    }

    /// Checks a cluster server's [`NODE_PROOF`] (the client's side): the box must open
    /// between the key it names and our transient key, and hold the server's transient
    /// key, so it was made for this connection by the holder of that key. The session's
    /// peer key becomes that key.
    pub fn accept_node_proof(&mut self, proof: &[u8]) -> Result<[u8; 32], ProtocolViolation> {
        if proof.len() != NODE_PROOF_LEN {
            return Err(malformed("node proof of the wrong size"));
        }
        let node: [u8; 32] = proof[..32].try_into().expect("in bounds");
        if node[31] & 0x80 != 0 {
            return Err(crypto("node key out of range"));
        }
        let node_key = PublicKey::from(node);
        if weak(&self.mine, &node_key) {
            return Err(crypto("node key of low order"));
        }
        let open = SalsaBox::new(&node_key, &self.mine)
            .decrypt(&nonce(b"PWNODE--", &proof[32..48]), &proof[48..])
            .map_err(|_| crypto("node proof does not open"))?;
        if open[..] != *self.their.as_bytes() {
            return Err(crypto("node proof is for another connection"));
        }
        self.peer_key = node;
        Ok(node)
    }

    /// The sealing half (for the writer) and the opening half (for the reader).
    pub fn split(self) -> (CurveSealer, CurveOpener) {
        (
            CurveSealer {
                shared: self.shared,
                prefix: self.tx_prefix,
                nonce: self.tx_nonce,
            },
            CurveOpener {
                shared: SalsaBox::new(&self.their, &self.mine),
                prefix: self.rx_prefix,
                last: self.rx_last,
            },
        )
    }
}

/// Boxes the frames a connection sends.
pub struct CurveSealer {
    shared: SalsaBox,
    prefix: &'static [u8; 16],
    nonce: u64,
}

impl CurveSealer {
    /// Appends one frame (`more`: others of its message follow) as a boxed MESSAGE frame.
    pub fn seal_frame(&mut self, out: &mut BytesMut, more: bool, body: &[u8]) {
        self.seal(out, if more { INNER_MORE } else { 0 }, body);
    }

    /// Appends a command (PING, PONG, SUBSCRIBE, CANCEL) as a boxed MESSAGE frame.
    pub fn seal_command(&mut self, out: &mut BytesMut, c: &Command) {
        let mut body = BytesMut::new();
        c.encode_body(&mut body);
        self.seal(out, INNER_COMMAND, &body);
    }

    fn seal(&mut self, out: &mut BytesMut, flags: u8, body: &[u8]) {
        let short = self.nonce.to_be_bytes();
        // Never reused: a connection would need 2^64 frames to wrap.
        self.nonce += 1;
        encode_frame_header(out, 0, MESSAGE_OVERHEAD + body.len());
        out.put_slice(b"\x07MESSAGE");
        out.put_slice(&short);
        let mac_at = out.len();
        out.put_bytes(0, MAC);
        let text_at = out.len();
        out.put_u8(flags);
        out.put_slice(body);
        let tag = self
            .shared
            .encrypt_in_place_detached(&nonce(self.prefix, &short), b"", &mut out[text_at..])
            .expect("boxing cannot fail");
        out[mac_at..text_at].copy_from_slice(&tag);
    }
}

/// Opens the frames a connection receives, refusing any whose nonce does not rise.
pub struct CurveOpener {
    shared: SalsaBox,
    prefix: &'static [u8; 16],
    last: u64,
}

impl CurveOpener {
    /// Opens one MESSAGE frame body: its inner flags and the frame it carries.
    fn open(&mut self, frame: &[u8]) -> Result<(u8, Bytes), ProtocolViolation> {
        if frame.len() < MESSAGE_OVERHEAD || &frame[..8] != b"\x07MESSAGE" {
            return Err(malformed("not a CURVE MESSAGE"));
        }
        let short = &frame[8..16];
        let n = u64::from_be_bytes(short.try_into().expect("8 bytes"));
        if n <= self.last {
            return Err(ProtocolViolation::CurveNonce);
        }
        let tag = GenericArray::clone_from_slice(&frame[16..32]);
        let mut text = BytesMut::from(&frame[32..]);
        self.shared
            .decrypt_in_place_detached(&nonce(self.prefix, short), b"", &mut text, &tag)
            .map_err(|_| crypto("MESSAGE box does not open"))?;
        self.last = n;
        let flags = text[0];
        if flags & !(INNER_MORE | INNER_COMMAND) != 0 {
            return Err(ProtocolViolation::ReservedFlags(flags));
        }
        text.advance(1);
        Ok((flags, text.freeze()))
    }
}

/// Reads a CURVE connection after its handshake: boxed frames in, plain messages and
/// commands out, with the socket's limits applied to what the boxes carry.
pub struct CurveReader {
    opener: CurveOpener,
    parts: Vec<Bytes>,
    bytes: usize,
    max_message: usize,
    max_frames: usize,
}

impl CurveReader {
    /// Reads with `opener`, refusing messages over `max_message` bytes or `max_frames`
    /// frames.
    pub fn new(opener: CurveOpener, max_message: usize, max_frames: usize) -> Self {
        CurveReader {
            opener,
            parts: Vec::new(),
            bytes: 0,
            max_message,
            max_frames,
        }
    }

    /// Bytes held of a message whose last frame has not arrived.
    pub fn partial_bytes(&self) -> usize {
        self.bytes
    }

    /// The next message or command in `buf` (decoded by `dec`, whose limits must allow
    /// [`MESSAGE_OVERHEAD`] more than the socket's), or `None` if more bytes are needed.
    pub fn decode(
        &mut self,
        dec: &mut Decoder,
        buf: &mut BytesMut,
    ) -> Result<Option<Decoded>, ProtocolViolation> {
        loop {
            let frames = match dec.decode(buf)? {
                None => return Ok(None),
                Some(Decoded::Message(m)) => m,
                // Even ERROR: anyone on the path could inject a clear one.
                Some(Decoded::Command(_)) => {
                    return Err(ProtocolViolation::Unexpected("command outside a CURVE box"))
                }
            };
            // libzmq sends one boxed frame per outer frame, never with MORE outside.
            let [frame] = frames.frames() else {
                return Err(malformed("boxed frames must be sent one per message"));
            };
            {
                let (flags, body) = self.opener.open(frame)?;
                if flags & INNER_COMMAND != 0 {
                    if body.len() > MAX_COMMAND_SIZE {
                        return Err(ProtocolViolation::FrameTooLarge {
                            size: body.len() as u64,
                            max: MAX_COMMAND_SIZE,
                        });
                    }
                    if !self.parts.is_empty() {
                        return Err(ProtocolViolation::Unexpected("command inside a message"));
                    }
                    return Ok(Some(Decoded::Command(Command::decode(body)?)));
                }
                self.bytes += body.len();
                if self.bytes > self.max_message {
                    return Err(ProtocolViolation::MessageTooLarge {
                        size: self.bytes as u64,
                        max: self.max_message,
                    });
                }
                if self.parts.len() >= self.max_frames {
                    return Err(ProtocolViolation::TooManyFrames {
                        max: self.max_frames,
                    });
                }
                self.parts.push(body);
                if flags & INNER_MORE == 0 {
                    self.bytes = 0;
                    let parts = std::mem::take(&mut self.parts);
                    return Ok(Some(Decoded::Message(Message::from_frames(parts))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
