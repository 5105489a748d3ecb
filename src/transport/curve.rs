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
use crypto_box::aead::{Aead, AeadInPlace, KeyInit, OsRng};
use crypto_box::{PublicKey, SalsaBox, SecretKey};
use crypto_secretbox::XSalsa20Poly1305;

use super::error::ProtocolViolation;
use super::wire::{encode_frame_header, Command, Decoded, Decoder};
use super::{Endpoint, Message};

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

/// A long-term key pair (X25519). The secret never appears in `Debug` output.
#[derive(Clone)]
pub struct CurveKeys {
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
        CurveKeys {
            public: secret.public_key(),
            secret,
        }
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    /// The secret key, for storing (keep it private).
    pub fn secret(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }
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
}

impl fmt::Debug for Curve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Curve")
            .field("keys", &self.keys)
            .field("server_key", &self.server_key.is_some())
            .field("authorize", &self.authorize.is_some())
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
        }
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
        self.server_key.as_ref().and_then(|f| f(endpoint))
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

/// Splits a command body into its name and data, checking the name.
fn command<'a>(body: &'a [u8], name: &[u8]) -> Result<&'a [u8], ProtocolViolation> {
    let n = *body.first().ok_or(malformed("empty command"))? as usize;
    if body.len() < 1 + n || &body[1..1 + n] != name {
        if body.get(1..1 + n) == Some(b"ERROR".as_slice()) {
            let reason = body.get(1 + n + 1..).unwrap_or_default();
            return Err(ProtocolViolation::PeerError(
                String::from_utf8_lossy(reason).into_owned(),
            ));
        }
        return Err(malformed("unexpected command during the CURVE handshake"));
    }
    Ok(&body[1 + n..])
}

fn named(name: &[u8], capacity: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(1 + name.len() + capacity);
    b.put_u8(name.len() as u8);
    b.put_slice(name);
    b
}

/// The client's side of a handshake.
pub struct ClientHandshake {
    keys: CurveKeys,
    server: PublicKey,
    transient: SecretKey,
    server_transient: Option<PublicKey>,
    cookie: [u8; COOKIE_LEN],
}

impl ClientHandshake {
    /// A handshake with the server whose long-term public key is `server`.
    pub fn new(keys: &CurveKeys, server: [u8; 32]) -> Self {
        ClientHandshake {
            keys: keys.clone(),
            server: PublicKey::from(server),
            transient: SecretKey::generate(&mut OsRng),
            server_transient: None,
            cookie: [0; COOKIE_LEN],
        }
    }

    /// HELLO (its body: name and data), nonce 1.
    pub fn hello(&self) -> Bytes {
        let mut b = named(b"HELLO", HELLO_LEN);
        b.put_slice(&[1, 0]);
        b.put_bytes(0, 72);
        b.put_slice(self.transient.public_key().as_bytes());
        let short = 1u64.to_be_bytes();
        b.put_slice(&short);
        let sealed = SalsaBox::new(&self.server, &self.transient)
            .encrypt(&nonce(b"CurveZMQHELLO---", &short), &[0u8; 64][..])
            .expect("boxing cannot fail");
        b.put_slice(&sealed);
        b.freeze()
    }

    /// Takes the server's WELCOME: its transient key and the cookie.
    pub fn welcome(&mut self, body: &[u8]) -> Result<(), ProtocolViolation> {
        let data = command(body, b"WELCOME")?;
        if body.len() != WELCOME_LEN {
            return Err(malformed("WELCOME of the wrong size"));
        }
        let (n, sealed) = data.split_at(16);
        let open = SalsaBox::new(&self.server, &self.transient)
            .decrypt(&nonce(b"WELCOME-", n), sealed)
            .map_err(|_| crypto("WELCOME box does not open (not the server we know)"))?;
        let s_transient: [u8; 32] = open[..32].try_into().expect("128 bytes opened");
        self.server_transient = Some(PublicKey::from(s_transient));
        self.cookie.copy_from_slice(&open[32..]);
        Ok(())
    }

    /// INITIATE (nonce 2) carrying our long-term key, its vouch and `metadata`.
    pub fn initiate(&self, metadata: &[u8]) -> Result<Bytes, ProtocolViolation> {
        let s_transient = self
            .server_transient
            .as_ref()
            .ok_or(malformed("INITIATE before WELCOME"))?;
        let vouch_nonce = random16();
        let mut vouched = [0u8; 64];
        vouched[..32].copy_from_slice(self.transient.public_key().as_bytes());
        vouched[32..].copy_from_slice(self.server.as_bytes());
        let vouch = SalsaBox::new(s_transient, &self.keys.secret)
            .encrypt(&nonce(b"VOUCH---", &vouch_nonce), &vouched[..])
            .expect("boxing cannot fail");
        let mut plain = Vec::with_capacity(32 + 16 + 80 + metadata.len());
        plain.extend_from_slice(self.keys.public.as_bytes());
        plain.extend_from_slice(&vouch_nonce);
        plain.extend_from_slice(&vouch);
        plain.extend_from_slice(metadata);
        let short = 2u64.to_be_bytes();
        let sealed = SalsaBox::new(s_transient, &self.transient)
            .encrypt(&nonce(b"CurveZMQINITIATE", &short), &plain[..])
            .expect("boxing cannot fail");
        let mut b = named(b"INITIATE", COOKIE_LEN + 8 + sealed.len());
        b.put_slice(&self.cookie);
        b.put_slice(&short);
        b.put_slice(&sealed);
        Ok(b.freeze())
    }

    /// Takes the server's READY: its metadata, and the session for what follows.
    pub fn ready(self, body: &[u8]) -> Result<(Bytes, CurveSession), ProtocolViolation> {
        let data = command(body, b"READY")?;
        if body.len() < READY_MIN {
            return Err(malformed("READY too short"));
        }
        let s_transient = self
            .server_transient
            .ok_or(malformed("READY before WELCOME"))?;
        let (short, sealed) = data.split_at(8);
        let metadata = SalsaBox::new(&s_transient, &self.transient)
            .decrypt(&nonce(b"CurveZMQREADY---", short), sealed)
            .map_err(|_| crypto("READY box does not open"))?;
        let last = u64::from_be_bytes(short.try_into().expect("8 bytes"));
        Ok((
            Bytes::from(metadata),
            CurveSession {
                their: s_transient,
                mine: self.transient,
                tx_prefix: b"CurveZMQMESSAGEC",
                tx_nonce: 3,
                rx_prefix: b"CurveZMQMESSAGES",
                rx_last: last,
                peer_key: *self.server.as_bytes(),
            },
        ))
    }
}

/// The server's side of a handshake.
pub struct ServerHandshake {
    keys: CurveKeys,
    client_transient: Option<PublicKey>,
    transient: Option<SecretKey>,
    cookie_key: [u8; 32],
    hello_nonce: u64,
}

impl ServerHandshake {
    /// A handshake proving `keys`.
    pub fn new(keys: &CurveKeys) -> Self {
        let mut cookie_key = [0u8; 32];
        getrandom_fill(&mut cookie_key);
        ServerHandshake {
            keys: keys.clone(),
            client_transient: None,
            transient: None,
            cookie_key,
            hello_nonce: 0,
        }
    }

    /// Takes the client's HELLO and answers with WELCOME.
    pub fn hello(&mut self, body: &[u8]) -> Result<Bytes, ProtocolViolation> {
        let data = command(body, b"HELLO")?;
        if body.len() != HELLO_LEN {
            return Err(malformed("HELLO of the wrong size"));
        }
        if data[..2] != [1, 0] {
            return Err(malformed("HELLO of an unknown CURVE version"));
        }
        let c_transient: [u8; 32] = data[74..106].try_into().expect("in bounds");
        let c_transient = PublicKey::from(c_transient);
        let short = &data[106..114];
        let open = SalsaBox::new(&c_transient, &self.keys.secret)
            .decrypt(&nonce(b"CurveZMQHELLO---", short), &data[114..])
            .map_err(|_| crypto("HELLO box does not open (the client has another server key)"))?;
        if open.iter().any(|&b| b != 0) {
            return Err(crypto("HELLO signature is not zero"));
        }
        self.hello_nonce = u64::from_be_bytes(short.try_into().expect("8 bytes"));
        let transient = SecretKey::generate(&mut OsRng);
        // The cookie: what we need back in INITIATE, sealed with a key only we hold, so
        // we keep nothing a flood of HELLOs could grow (beyond this connection's state).
        let cookie_nonce = random16();
        let mut inner = [0u8; 64];
        inner[..32].copy_from_slice(c_transient.as_bytes());
        inner[32..].copy_from_slice(&transient.to_bytes());
        let sealed_cookie = XSalsa20Poly1305::new(&self.cookie_key.into())
            .encrypt(&nonce(b"COOKIE--", &cookie_nonce), &inner[..])
            .expect("boxing cannot fail");
        let mut plain = Vec::with_capacity(32 + COOKIE_LEN);
        plain.extend_from_slice(transient.public_key().as_bytes());
        plain.extend_from_slice(&cookie_nonce);
        plain.extend_from_slice(&sealed_cookie);
        let welcome_nonce = random16();
        let sealed = SalsaBox::new(&c_transient, &self.keys.secret)
            .encrypt(&nonce(b"WELCOME-", &welcome_nonce), &plain[..])
            .expect("boxing cannot fail");
        self.client_transient = Some(c_transient);
        self.transient = Some(transient);
        let mut b = named(b"WELCOME", WELCOME_LEN);
        b.put_slice(&welcome_nonce);
        b.put_slice(&sealed);
        Ok(b.freeze())
    }

    /// Takes the client's INITIATE: its long-term public key (proven) and its metadata.
    pub fn initiate(&mut self, body: &[u8]) -> Result<([u8; 32], Bytes), ProtocolViolation> {
        let data = command(body, b"INITIATE")?;
        if body.len() < INITIATE_MIN {
            return Err(malformed("INITIATE too short"));
        }
        let (Some(c_transient), Some(transient)) = (&self.client_transient, &self.transient) else {
            return Err(malformed("INITIATE before HELLO"));
        };
        let (cookie, rest) = data.split_at(COOKIE_LEN);
        let inner = XSalsa20Poly1305::new(&self.cookie_key.into())
            .decrypt(&nonce(b"COOKIE--", &cookie[..16]), &cookie[16..])
            .map_err(|_| crypto("INITIATE cookie does not open"))?;
        if inner[..32] != *c_transient.as_bytes() || inner[32..] != transient.to_bytes() {
            return Err(crypto("INITIATE cookie is not this connection's"));
        }
        let (short, sealed) = rest.split_at(8);
        let short_n = u64::from_be_bytes(short.try_into().expect("8 bytes"));
        if short_n <= self.hello_nonce {
            return Err(ProtocolViolation::CurveNonce);
        }
        let plain = SalsaBox::new(c_transient, transient)
            .decrypt(&nonce(b"CurveZMQINITIATE", short), sealed)
            .map_err(|_| crypto("INITIATE box does not open"))?;
        if plain.len() < 32 + 16 + 80 {
            return Err(malformed("INITIATE box too short"));
        }
        let client: [u8; 32] = plain[..32].try_into().expect("in bounds");
        let vouch = SalsaBox::new(&PublicKey::from(client), transient)
            .decrypt(&nonce(b"VOUCH---", &plain[32..48]), &plain[48..128])
            .map_err(|_| crypto("vouch does not open (the client does not hold its key)"))?;
        if vouch[..32] != *c_transient.as_bytes() || vouch[32..] != *self.keys.public.as_bytes() {
            return Err(crypto("vouch is for another connection or server"));
        }
        self.hello_nonce = short_n;
        Ok((client, Bytes::copy_from_slice(&plain[128..])))
    }

    /// READY (nonce 1) with `metadata`, and the session for what follows. `client` is
    /// the key [`initiate`](Self::initiate) proved.
    pub fn ready(
        self,
        metadata: &[u8],
        client: [u8; 32],
    ) -> Result<(Bytes, CurveSession), ProtocolViolation> {
        let (Some(c_transient), Some(transient)) = (self.client_transient, self.transient) else {
            return Err(malformed("READY before HELLO"));
        };
        let short = 1u64.to_be_bytes();
        let sealed = SalsaBox::new(&c_transient, &transient)
            .encrypt(&nonce(b"CurveZMQREADY---", &short), metadata)
            .expect("boxing cannot fail");
        let mut b = named(b"READY", 8 + sealed.len());
        b.put_slice(&short);
        b.put_slice(&sealed);
        Ok((
            b.freeze(),
            CurveSession {
                their: c_transient,
                mine: transient,
                tx_prefix: b"CurveZMQMESSAGES",
                tx_nonce: 2,
                rx_prefix: b"CurveZMQMESSAGEC",
                rx_last: self.hello_nonce,
                peer_key: client,
            },
        ))
    }
}

/// Seals and opens the frames of one connection after its handshake.
pub struct CurveSession {
    /// The peer's transient public key and ours secret: the boxes of every frame.
    their: PublicKey,
    mine: SecretKey,
    tx_prefix: &'static [u8; 16],
    tx_nonce: u64,
    rx_prefix: &'static [u8; 16],
    rx_last: u64,
    peer_key: [u8; 32],
}

impl fmt::Debug for CurveSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CurveSession(peer {})", encode_key(&self.peer_key))
    }
}

impl CurveSession {
    /// The peer's long-term public key, as the handshake proved it.
    pub fn peer_key(&self) -> [u8; 32] {
        self.peer_key
    }

    /// The sealing half (for the writer) and the opening half (for the reader).
    pub fn split(self) -> (CurveSealer, CurveOpener) {
        (
            CurveSealer {
                shared: SalsaBox::new(&self.their, &self.mine),
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
                Some(Decoded::Command(Command::Error(r))) => {
                    return Err(ProtocolViolation::PeerError(r))
                }
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
mod tests {
    use super::*;
    use crate::transport::wire::DecodeLimits;

    fn handshake() -> (CurveSession, CurveSession, [u8; 32], [u8; 32]) {
        let (server, client) = (CurveKeys::generate(), CurveKeys::generate());
        let mut c = ClientHandshake::new(&client, server.public());
        let mut s = ServerHandshake::new(&server);
        let welcome = s.hello(&c.hello()).unwrap();
        c.welcome(&welcome).unwrap();
        let (who, meta) = s
            .initiate(&c.initiate(b"\x04Meta\0\0\0\x01x").unwrap())
            .unwrap();
        assert_eq!(who, client.public());
        assert_eq!(&meta[..], b"\x04Meta\0\0\0\x01x");
        let (ready, server_side) = s.ready(b"", who).unwrap();
        let (_, client_side) = c.ready(&ready).unwrap();
        (client_side, server_side, client.public(), server.public())
    }

    fn limits() -> DecodeLimits {
        DecodeLimits {
            max_frame_size: 1 << 20,
            max_message_size: 1 << 20,
            max_frames: 1,
        }
    }

    #[test]
    fn a_handshake_proves_both_keys_and_frames_go_both_ways() {
        let (client, server, ck, sk) = handshake();
        assert_eq!((client.peer_key(), server.peer_key()), (sk, ck));
        let (mut seal, _) = client.split();
        let (_, open) = server.split();
        let mut wire = BytesMut::new();
        seal.seal_frame(&mut wire, true, b"header");
        seal.seal_frame(&mut wire, false, b"payload");
        seal.seal_command(&mut wire, &Command::Subscribe(Bytes::from_static(b"t")));
        let mut r = CurveReader::new(open, 1 << 20, 8);
        let mut dec = Decoder::new(limits());
        match r.decode(&mut dec, &mut wire).unwrap() {
            Some(Decoded::Message(m)) => assert_eq!(m.frames(), [&b"header"[..], b"payload"]),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            r.decode(&mut dec, &mut wire).unwrap(),
            Some(Decoded::Command(Command::Subscribe(Bytes::from_static(
                b"t"
            ))))
        );
        assert_eq!(r.decode(&mut dec, &mut wire).unwrap(), None);
    }

    #[test]
    fn a_flipped_bit_a_replay_and_a_wrong_key_are_refused() {
        let (client, server, _, _) = handshake();
        let (mut seal, _) = client.split();
        let (_, open) = server.split();
        let mut r = CurveReader::new(open, 1 << 20, 8);
        let mut dec = Decoder::new(limits());
        let mut one = BytesMut::new();
        seal.seal_frame(&mut one, false, b"hello");
        // Any flipped bit in the box (past the frame header, the name and the nonce).
        // The reader is left as it was by a refusal, so the same one judges every copy
        // (and the untouched frame after them).
        for i in 2 + 16..one.len() {
            let mut bad = one.clone();
            bad[i] ^= 0x01;
            let mut fresh = Decoder::new(limits());
            assert!(r.decode(&mut fresh, &mut bad).is_err(), "byte {i}");
        }
        let mut again = one.clone();
        assert!(r.decode(&mut dec, &mut one).unwrap().is_some());
        // The same frame again: its nonce does not rise.
        assert_eq!(
            r.decode(&mut dec, &mut again),
            Err(ProtocolViolation::CurveNonce)
        );

        // A client that has another server key: the server cannot open its HELLO.
        let (server, client) = (CurveKeys::generate(), CurveKeys::generate());
        let c = ClientHandshake::new(&client, CurveKeys::generate().public());
        let mut s = ServerHandshake::new(&server);
        assert!(matches!(
            s.hello(&c.hello()),
            Err(ProtocolViolation::CurveCrypto(_))
        ));
    }

    #[test]
    fn truncated_and_replayed_handshake_commands_are_refused() {
        let (server, client) = (CurveKeys::generate(), CurveKeys::generate());
        let mut c = ClientHandshake::new(&client, server.public());
        let mut s = ServerHandshake::new(&server);
        let hello = c.hello();
        for n in [0, 1, 6, 100, 199] {
            assert!(
                ServerHandshake::new(&server).hello(&hello[..n]).is_err(),
                "{n}"
            );
        }
        let welcome = s.hello(&hello).unwrap();
        for n in [0, 8, 100, 167] {
            assert!(c.welcome(&welcome[..n]).is_err(), "{n}");
        }
        c.welcome(&welcome).unwrap();
        let initiate = c.initiate(b"").unwrap();
        assert!(s.initiate(&initiate[..256]).is_err());
        // An INITIATE replayed on another connection: its cookie is not that one's.
        let mut other = ServerHandshake::new(&server);
        other
            .hello(&ClientHandshake::new(&client, server.public()).hello())
            .unwrap();
        assert!(other.initiate(&initiate).is_err());
        s.initiate(&initiate).unwrap();
    }

    #[test]
    fn keys_read_and_write_as_z85() {
        let k = CurveKeys::generate();
        let text = encode_key(&k.public());
        assert_eq!(text.len(), 40);
        assert_eq!(decode_key(&text).unwrap(), k.public());
        assert_eq!(decode_key(&format!("{text}\0")).unwrap(), k.public());
        assert!(decode_key("too short").is_err());
        assert!(decode_key(&"~".repeat(40)).is_err());
        assert_eq!(CurveKeys::from_secret(k.secret()).public(), k.public());
        // The rfc 32 test vector.
        let v = [0x86, 0x4F, 0xD2, 0x6F, 0xB5, 0x59, 0xF7, 0x5B];
        assert_eq!(z85::encode(v), "HelloWorld");
    }
}
