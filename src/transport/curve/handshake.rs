//! CURVE's handshake, side by side: the commands each side builds and checks, without
//! I/O (the connection's handshake does the reading and writing).

use bytes::{BufMut, Bytes, BytesMut};
use crypto_box::aead::{Aead, KeyInit, OsRng};
use crypto_box::{PublicKey, SalsaBox, SecretKey};
use crypto_secretbox::XSalsa20Poly1305;

use zeroize::Zeroizing;

use super::{
    crypto, getrandom_fill, malformed, nonce, random16, weak, CurveKeys, CurveSession, COOKIE_LEN,
    HELLO_LEN, INITIATE_MIN, READY_MIN, WELCOME_LEN,
};
use crate::transport::error::ProtocolViolation;

/// Splits a command body into its name and data, checking the name.
fn command<'a>(body: &'a [u8], name: &[u8]) -> Result<&'a [u8], ProtocolViolation> {
    let n = *body.first().ok_or(malformed("empty command"))? as usize;
    if body.len() < 1 + n || &body[1..1 + n] != name {
        if body.get(1..1 + n) == Some(b"ERROR".as_slice()) {
            // ERROR: a one-byte length, then the reason (at most 255 bytes).
            let len = body.get(1 + n).copied().unwrap_or(0) as usize;
            let reason = body.get(2 + n..).unwrap_or_default();
            let reason = &reason[..len.min(reason.len())];
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
    /// C' with S: HELLO and WELCOME. Each box is set up once (an X25519 operation).
    long: SalsaBox,
    server_transient: Option<PublicKey>,
    /// C' with S': INITIATE, READY, then the session's frames.
    short: Option<SalsaBox>,
    cookie: [u8; COOKIE_LEN],
}

impl ClientHandshake {
    /// A handshake with the server whose long-term public key is `server` (refused if
    /// it is of low order: all zeros, say, a placeholder anyone could answer for).
    pub fn new(keys: &CurveKeys, server: [u8; 32]) -> Result<Self, ProtocolViolation> {
        let (server, transient) = (PublicKey::from(server), SecretKey::generate(&mut OsRng));
        if weak(&transient, &server) {
            return Err(crypto("the server key is of low order"));
        }
        Ok(ClientHandshake {
            keys: keys.clone(),
            long: SalsaBox::new(&server, &transient),
            server,
            transient,
            server_transient: None,
            short: None,
            cookie: [0; COOKIE_LEN],
        })
    }

    /// HELLO (its body: name and data), nonce 1.
    pub fn hello(&self) -> Bytes {
        let mut b = named(b"HELLO", HELLO_LEN);
        b.put_slice(&[1, 0]);
        b.put_bytes(0, 72);
        b.put_slice(self.transient.public_key().as_bytes());
        let short = 1u64.to_be_bytes();
        b.put_slice(&short);
        let sealed = self
            .long
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
        let open = self
            .long
            .decrypt(&nonce(b"WELCOME-", n), sealed)
            .map_err(|_| crypto("WELCOME box does not open (not the server we know)"))?;
        let s_transient: [u8; 32] = open[..32].try_into().expect("128 bytes opened");
        let s_transient = PublicKey::from(s_transient);
        if weak(&self.transient, &s_transient) {
            return Err(crypto("WELCOME with a low-order transient key"));
        }
        self.short = Some(SalsaBox::new(&s_transient, &self.transient));
        self.server_transient = Some(s_transient);
        self.cookie.copy_from_slice(&open[32..]);
        Ok(())
    }

    /// INITIATE (nonce 2) carrying our long-term key, its vouch and `metadata`.
    pub fn initiate(&self, metadata: &[u8]) -> Result<Bytes, ProtocolViolation> {
        let (Some(s_transient), Some(short_box)) = (&self.server_transient, &self.short) else {
            return Err(malformed("INITIATE before WELCOME"));
        };
        let vouch_nonce = random16();
        let mut vouched = [0u8; 64];
        vouched[..32].copy_from_slice(self.transient.public_key().as_bytes());
        vouched[32..].copy_from_slice(self.server.as_bytes());
        let vouch = SalsaBox::new(s_transient, self.keys.secret_key())
            .encrypt(&nonce(b"VOUCH---", &vouch_nonce), &vouched[..])
            .expect("boxing cannot fail");
        let mut plain = Vec::with_capacity(32 + 16 + 80 + metadata.len());
        plain.extend_from_slice(self.keys.public_key().as_bytes());
        plain.extend_from_slice(&vouch_nonce);
        plain.extend_from_slice(&vouch);
        plain.extend_from_slice(metadata);
        let short = 2u64.to_be_bytes();
        let sealed = short_box
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
        let (Some(s_transient), Some(short_box)) = (self.server_transient, self.short) else {
            return Err(malformed("READY before WELCOME"));
        };
        let (short, sealed) = data.split_at(8);
        let metadata = short_box
            .decrypt(&nonce(b"CurveZMQREADY---", short), sealed)
            .map_err(|_| crypto("READY box does not open"))?;
        let last = u64::from_be_bytes(short.try_into().expect("8 bytes"));
        Ok((
            Bytes::from(metadata),
            CurveSession {
                shared: short_box,
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
    /// C' with s': INITIATE, READY, then the session's frames (set up once).
    short: Option<SalsaBox>,
    cookie_key: Zeroizing<[u8; 32]>,
    hello_nonce: u64,
}

impl ServerHandshake {
    /// A handshake proving `keys`.
    pub fn new(keys: &CurveKeys) -> Self {
        let mut cookie_key = Zeroizing::new([0u8; 32]);
        getrandom_fill(&mut cookie_key[..]);
        ServerHandshake {
            keys: keys.clone(),
            client_transient: None,
            transient: None,
            short: None,
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
        if weak(self.keys.secret_key(), &c_transient) {
            return Err(crypto("HELLO from a low-order transient key"));
        }
        // One box (C' with our long-term key) opens HELLO and seals WELCOME.
        let with_client = SalsaBox::new(&c_transient, self.keys.secret_key());
        let open = with_client
            .decrypt(&nonce(b"CurveZMQHELLO---", short), &data[114..])
            .map_err(|_| crypto("HELLO box does not open (the client has another server key)"))?;
        if open.iter().any(|&b| b != 0) {
            return Err(crypto("HELLO signature is not zero"));
        }
        self.hello_nonce = u64::from_be_bytes(short.try_into().expect("8 bytes"));
        let transient = SecretKey::generate(&mut OsRng);
        // The cookie: sealed with a key only this connection's state holds, it binds the
        // INITIATE to this HELLO's transient keys. (Stateless servers put s' in it; we
        // keep s' in the connection's state, so the cookie carries only public keys.)
        let cookie_nonce = random16();
        let mut inner = [0u8; 64];
        inner[..32].copy_from_slice(c_transient.as_bytes());
        inner[32..].copy_from_slice(transient.public_key().as_bytes());
        let sealed_cookie = XSalsa20Poly1305::new((&*self.cookie_key).into())
            .encrypt(&nonce(b"COOKIE--", &cookie_nonce), &inner[..])
            .expect("boxing cannot fail");
        let mut plain = Vec::with_capacity(32 + COOKIE_LEN);
        plain.extend_from_slice(transient.public_key().as_bytes());
        plain.extend_from_slice(&cookie_nonce);
        plain.extend_from_slice(&sealed_cookie);
        let welcome_nonce = random16();
        let sealed = with_client
            .encrypt(&nonce(b"WELCOME-", &welcome_nonce), &plain[..])
            .expect("boxing cannot fail");
        self.short = Some(SalsaBox::new(&c_transient, &transient));
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
        let (Some(c_transient), Some(transient), Some(short_box)) =
            (&self.client_transient, &self.transient, &self.short)
        else {
            return Err(malformed("INITIATE before HELLO"));
        };
        let (cookie, rest) = data.split_at(COOKIE_LEN);
        let inner = XSalsa20Poly1305::new((&*self.cookie_key).into())
            .decrypt(&nonce(b"COOKIE--", &cookie[..16]), &cookie[16..])
            .map_err(|_| crypto("INITIATE cookie does not open"))?;
        if inner[..32] != *c_transient.as_bytes()
            || inner[32..] != *transient.public_key().as_bytes()
        {
            return Err(crypto("INITIATE cookie is not this connection's"));
        }
        let (short, sealed) = rest.split_at(8);
        let short_n = u64::from_be_bytes(short.try_into().expect("8 bytes"));
        if short_n <= self.hello_nonce {
            return Err(ProtocolViolation::CurveNonce);
        }
        let plain = short_box
            .decrypt(&nonce(b"CurveZMQINITIATE", short), sealed)
            .map_err(|_| crypto("INITIATE box does not open"))?;
        if plain.len() < 32 + 16 + 80 {
            return Err(malformed("INITIATE box too short"));
        }
        let client: [u8; 32] = plain[..32].try_into().expect("in bounds");
        // X25519 ignores the top bit: with it set, one secret key would prove two
        // different public keys (and slip past a list of refused ones).
        if client[31] & 0x80 != 0 {
            return Err(crypto("client key out of range"));
        }
        let client_key = PublicKey::from(client);
        if weak(transient, &client_key) {
            return Err(crypto("client key of low order"));
        }
        let vouch = SalsaBox::new(&client_key, transient)
            .decrypt(&nonce(b"VOUCH---", &plain[32..48]), &plain[48..128])
            .map_err(|_| crypto("vouch does not open (the client does not hold its key)"))?;
        if vouch[..32] != *c_transient.as_bytes()
            || vouch[32..] != *self.keys.public_key().as_bytes()
        {
            return Err(crypto("vouch is for another connection or server"));
        }
        self.hello_nonce = short_n;
        Ok((client, Bytes::copy_from_slice(&plain[128..])))
    }

    /// The [`NODE_PROOF`](super::NODE_PROOF) value proving `node` (this server's own
    /// key, when it shares a cluster's): `Box[S'](N->C')`, which only the holder of `N`'s
    /// secret (or the client) can make, for this connection only.
    pub fn node_proof(&self, node: &CurveKeys) -> Result<Bytes, ProtocolViolation> {
        let (Some(c_transient), Some(transient)) = (&self.client_transient, &self.transient) else {
            return Err(malformed("node proof before HELLO"));
        };
        let n = random16();
        let sealed = SalsaBox::new(c_transient, node.secret_key())
            .encrypt(
                &nonce(b"PWNODE--", &n),
                transient.public_key().as_bytes().as_slice(),
            )
            .expect("boxing cannot fail");
        let mut b = BytesMut::with_capacity(32 + 16 + sealed.len());
        b.put_slice(node.public_key().as_bytes());
        b.put_slice(&n);
        b.put_slice(&sealed);
        Ok(b.freeze())
    }

    /// READY (nonce 1) with `metadata`, and the session for what follows. `client` is
    /// the key [`initiate`](Self::initiate) proved.
    pub fn ready(
        self,
        metadata: &[u8],
        client: [u8; 32],
    ) -> Result<(Bytes, CurveSession), ProtocolViolation> {
        let (Some(c_transient), Some(transient), Some(short_box)) =
            (self.client_transient, self.transient, self.short)
        else {
            return Err(malformed("READY before HELLO"));
        };
        let short = 1u64.to_be_bytes();
        let sealed = short_box
            .encrypt(&nonce(b"CurveZMQREADY---", &short), metadata)
            .expect("boxing cannot fail");
        let mut b = named(b"READY", 8 + sealed.len());
        b.put_slice(&short);
        b.put_slice(&sealed);
        Ok((
            b.freeze(),
            CurveSession {
                shared: short_box,
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
