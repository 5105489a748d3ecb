//! The handshake: our greeting, the peer's, then the mechanism's exchange (NULL: READY
//! both ways; CURVE: HELLO, WELCOME, INITIATE, READY, see [`crate::transport::curve`]),
//! the peer's metadata checked against our socket type; and how a failed handshake is
//! reported.
//!
//! It never reads past the peer's READY into a buffer it drops: bytes that arrive with
//! the READY are handed on to the connection loop. It never waits without a bound (the
//! caller applies `handshake_timeout`, and the greeting has its own).

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tracing::warn;

use crate::transport::curve::{
    ClientHandshake, Curve, CurveSession, ServerHandshake, MECHANISM_CURVE, NODE_PROOF,
};
use crate::transport::error::{CloseReason, ProtocolViolation};
use crate::transport::events::SocketEvent;
use crate::transport::wire::{
    check_greeting_prefix, encode_frame_header, encode_greeting_with, encode_metadata,
    parse_greeting_any, parse_metadata, Command, Decoded, Decoder, FLAG_COMMAND, GREETING_LEN,
    MECHANISM_NULL,
};
use crate::transport::Endpoint;

use super::{PeerInfo, Shared, READ_MIN};

pub(super) fn handshake_failed(shared: &Shared, addr: SocketAddr, reason: CloseReason) {
    if reason == CloseReason::Shutdown {
        return;
    }
    shared.stats.handshake_failures.fetch_add(1, Relaxed);
    if let CloseReason::Violation(v) = &reason {
        shared.stats.count_violation(v);
    }
    if reason == CloseReason::PeerClosed {
        // Closed before its greeting was done: a port scan, or a node on this host
        // checking that our ipc socket is alive (counted, not worth a warning each).
        tracing::debug!(%addr, %reason, "handshake failed");
    } else {
        warn!(%addr, %reason, "handshake failed");
    }
    shared.emit(SocketEvent::HandshakeFailed { addr, reason });
}

/// What a completed handshake gives the connection: the peer's details, any bytes it
/// sent after its last handshake command (they belong to the first messages), and with
/// CURVE the session that boxes and unboxes every frame from now on.
pub(super) struct Handshaken {
    pub peer: PeerInfo,
    pub rbuf: BytesMut,
    pub curve: Option<CurveSession>,
}

/// The handshake of a connection we accepted (`dialled: None`) or dialled.
pub(super) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    addr: SocketAddr,
    shared: &Shared,
    dialled: Option<&Endpoint>,
) -> Result<Handshaken, CloseReason> {
    let curve = shared.opts.curve.as_ref();
    let ours: &[u8] = if curve.is_some() {
        MECHANISM_CURVE
    } else {
        MECHANISM_NULL
    };
    let mut out = BytesMut::with_capacity(128);
    out.put_slice(&encode_greeting_with(
        ours,
        dialled.is_none() && curve.is_some(),
    ));
    if curve.is_none() {
        // Greeting and READY go out together: with the NULL mechanism nothing we send
        // depends on the peer's greeting, and this saves a round trip.
        Command::Ready(our_metadata(shared)).encode(&mut out);
    }
    stream.write_all(&out).await?;

    let mut g = [0u8; GREETING_LEN];
    let read_greeting = async {
        let mut n = 0;
        while n < GREETING_LEN {
            let r = stream.read(&mut g[n..]).await?;
            if r == 0 {
                return Err(CloseReason::PeerClosed);
            }
            n += r;
            check_greeting_prefix(&g[..n])?;
        }
        Ok(())
    };
    timeout(shared.opts.greeting_timeout, read_greeting)
        .await
        .unwrap_or(Err(ProtocolViolation::GreetingTimeout.into()))?;
    let exchange = async {
        let greeting = parse_greeting_any(&g)?;
        if greeting.mechanism != MECHANISM_NULL && greeting.mechanism != MECHANISM_CURVE {
            return Err(ProtocolViolation::UnsupportedMechanism(
                String::from_utf8_lossy(&greeting.mechanism).into_owned(),
            )
            .into());
        }
        if greeting.mechanism != ours {
            return Err(ProtocolViolation::MechanismMismatch {
                ours: if curve.is_some() { "CURVE" } else { "NULL" },
                theirs: String::from_utf8_lossy(&greeting.mechanism).into_owned(),
            }
            .into());
        }
        match curve {
            None => ready_exchange(stream, shared, addr, greeting.minor).await,
            Some(c) => match dialled {
                Some(endpoint) => {
                    curve_client(stream, shared, c, endpoint, addr, greeting.minor).await
                }
                None => curve_server(stream, shared, c, addr, greeting.minor).await,
            },
        }
    };
    match exchange.await {
        Err(CloseReason::Violation(v)) => {
            // The peer speaks ZMTP: tell it why, as the spec asks, before closing; but
            // not which CURVE check failed (that would guide a prober), as libzmq.
            let reason = match v {
                ProtocolViolation::CurveCrypto(_)
                | ProtocolViolation::CurveNonce
                | ProtocolViolation::CurveMalformed(_) => "CURVE handshake failed".to_string(),
                ref v => v.to_string(),
            };
            let mut out = BytesMut::new();
            Command::Error(reason).encode(&mut out);
            let _ = timeout(Duration::from_millis(200), stream.write_all(&out)).await;
            Err(v.into())
        }
        other => other,
    }
}

/// The metadata our READY (or CURVE's INITIATE and READY) carries.
fn our_metadata(shared: &Shared) -> Vec<(String, Bytes)> {
    let mut props = vec![(
        "Socket-Type".to_string(),
        Bytes::from_static(shared.socket_type.as_str().as_bytes()),
    )];
    if let Some(id) = &shared.opts.identity {
        props.push(("Identity".to_string(), id.clone()));
    }
    props
}

/// Reads the next handshake command's body (CURVE's commands are not ZMTP's own).
async fn read_command<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    dec: &mut Decoder,
    rbuf: &mut BytesMut,
) -> Result<Bytes, CloseReason> {
    loop {
        if let Some(body) = dec.decode_command_body(rbuf)? {
            return Ok(body);
        }
        rbuf.reserve(dec.wanted(rbuf.len()).clamp(64, READ_MIN));
        if stream.read_buf(rbuf).await? == 0 {
            return Err(CloseReason::PeerClosed);
        }
    }
}

async fn write_command<S: AsyncWrite + Unpin>(
    stream: &mut S,
    body: &[u8],
) -> Result<(), CloseReason> {
    let mut out = BytesMut::with_capacity(9 + body.len());
    encode_frame_header(&mut out, FLAG_COMMAND, body.len());
    out.put_slice(body);
    stream.write_all(&out).await?;
    Ok(())
}

fn metadata_bytes(shared: &Shared) -> BytesMut {
    let mut m = BytesMut::new();
    encode_metadata(&our_metadata(shared), &mut m);
    m
}

/// CURVE as the client: HELLO, WELCOME, INITIATE, READY.
async fn curve_client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    shared: &Shared,
    curve: &Curve,
    endpoint: &Endpoint,
    addr: SocketAddr,
    minor: u8,
) -> Result<Handshaken, CloseReason> {
    let server = curve
        .server_key_for(endpoint)
        .ok_or(ProtocolViolation::CurveMalformed(
            "no server key known for this endpoint",
        ))?;
    let mut hs = ClientHandshake::new(&curve.keys, server)?;
    let (mut dec, mut rbuf) = (Decoder::commands_only(), BytesMut::with_capacity(512));
    write_command(stream, &hs.hello()).await?;
    hs.welcome(&read_command(stream, &mut dec, &mut rbuf).await?)?;
    write_command(stream, &hs.initiate(&metadata_bytes(shared))?).await?;
    let (metadata, mut session) = hs.ready(&read_command(stream, &mut dec, &mut rbuf).await?)?;
    let props = parse_metadata(metadata)?;
    if curve.in_cluster() {
        // Any member can answer for the cluster's key: the server must also prove its
        // own, for this connection, and be one we would let in.
        let proof = prop(&props, NODE_PROOF).ok_or(ProtocolViolation::CurveCrypto(
            "a cluster server that does not prove its own key",
        ))?;
        let node = session.accept_node_proof(&proof)?;
        if curve.is_cluster_key(&node) {
            return Err(
                ProtocolViolation::CurveCrypto("a member proving the cluster's key").into(),
            );
        }
        if curve.node_key_for(endpoint).is_some_and(|k| k != node) {
            return Err(ProtocolViolation::CurveCrypto(
                "the server proved another key than the one expected there",
            )
            .into());
        }
        if !curve.allows(&node) {
            return Err(ProtocolViolation::NotAuthorized.into());
        }
    }
    let peer = peer_info(shared, addr, minor, props)?;
    Ok(Handshaken {
        peer,
        rbuf,
        curve: Some(session),
    })
}

/// CURVE as the server: HELLO, WELCOME, INITIATE, then READY if the client's key is
/// accepted (an ERROR, in clear, if not).
async fn curve_server<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    shared: &Shared,
    curve: &Curve,
    addr: SocketAddr,
    minor: u8,
) -> Result<Handshaken, CloseReason> {
    let mut hs = ServerHandshake::new(curve.server_keys());
    let (mut dec, mut rbuf) = (Decoder::commands_only(), BytesMut::with_capacity(512));
    let welcome = hs.hello(&read_command(stream, &mut dec, &mut rbuf).await?)?;
    write_command(stream, &welcome).await?;
    let (client, metadata) = hs.initiate(&read_command(stream, &mut dec, &mut rbuf).await?)?;
    if curve.is_cluster_key(&client) {
        return Err(ProtocolViolation::CurveCrypto("a member proving the cluster's key").into());
    }
    if !curve.allows(&client) {
        return Err(ProtocolViolation::NotAuthorized.into());
    }
    let peer = peer_info(shared, addr, minor, parse_metadata(metadata)?)?;
    let mut metadata = metadata_bytes(shared);
    if curve.in_cluster() {
        encode_metadata(
            &[(NODE_PROOF.to_string(), hs.node_proof(&curve.keys)?)],
            &mut metadata,
        );
    }
    let (ready, session) = hs.ready(&metadata, client)?;
    write_command(stream, &ready).await?;
    Ok(Handshaken {
        peer,
        rbuf,
        curve: Some(session),
    })
}

/// Reads the peer's READY (the NULL mechanism) and checks its properties.
async fn ready_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    shared: &Shared,
    addr: SocketAddr,
    minor: u8,
) -> Result<Handshaken, CloseReason> {
    let mut dec = Decoder::commands_only();
    let mut rbuf = BytesMut::with_capacity(512);
    let props = loop {
        match dec.decode(&mut rbuf)? {
            Some(Decoded::Command(Command::Ready(p))) => break p,
            Some(Decoded::Command(Command::Error(r))) => {
                return Err(ProtocolViolation::PeerError(r).into())
            }
            Some(Decoded::Command(_)) => {
                return Err(ProtocolViolation::Unexpected("command before READY").into())
            }
            Some(Decoded::Message(_)) => {
                return Err(ProtocolViolation::Unexpected("message before READY").into())
            }
            None => {}
        }
        rbuf.reserve(dec.wanted(rbuf.len()).clamp(64, READ_MIN));
        if stream.read_buf(&mut rbuf).await? == 0 {
            return Err(CloseReason::PeerClosed);
        }
    };
    let peer = peer_info(shared, addr, minor, props)?;
    Ok(Handshaken {
        peer,
        rbuf,
        curve: None,
    })
}

/// A metadata property's value, by name (names are case-insensitive).
fn prop(props: &[(String, Bytes)], name: &str) -> Option<Bytes> {
    props
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

/// The peer as its metadata describes it, if its socket type can talk to ours.
fn peer_info(
    shared: &Shared,
    addr: SocketAddr,
    minor: u8,
    props: Vec<(String, Bytes)>,
) -> Result<PeerInfo, ProtocolViolation> {
    let socket_type = prop(&props, "Socket-Type").ok_or(ProtocolViolation::MissingSocketType)?;
    let socket_type = String::from_utf8_lossy(&socket_type).into_owned();
    if !shared.socket_type.accepts(&socket_type) {
        return Err(ProtocolViolation::IncompatibleSocketType {
            ours: shared.socket_type.as_str(),
            theirs: socket_type,
        });
    }
    let identity = prop(&props, "Identity").unwrap_or_default();
    Ok(PeerInfo {
        addr,
        minor,
        socket_type,
        identity,
        curve_key: None,
    })
}
