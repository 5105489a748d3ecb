//! The handshake: our greeting and READY, the peer's greeting and READY, checked
//! against our socket type; and how a failed handshake is reported.
//!
//! It never reads past the peer's READY into a buffer it drops: bytes that arrive with
//! the READY are handed on to the connection loop. It never waits without a bound (the
//! caller applies `handshake_timeout`, and the greeting has its own).

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::warn;

use crate::transport::error::{CloseReason, ProtocolViolation};
use crate::transport::events::SocketEvent;
use crate::transport::wire::{
    check_greeting_prefix, encode_greeting, parse_greeting, Command, Decoded, Decoder, GREETING_LEN,
};

use super::{PeerInfo, Shared, READ_MIN};

pub(super) fn handshake_failed(shared: &Shared, addr: SocketAddr, reason: CloseReason) {
    if reason == CloseReason::Shutdown {
        return;
    }
    shared.stats.handshake_failures.fetch_add(1, Relaxed);
    if let CloseReason::Violation(v) = &reason {
        shared.stats.count_violation(v);
    }
    warn!(%addr, %reason, "handshake failed");
    shared.emit(SocketEvent::HandshakeFailed { addr, reason });
}

/// Greeting and READY exchange. Returns the peer's details and any bytes it sent after
/// its READY (which belong to the first messages).
pub(super) async fn handshake(
    stream: &mut TcpStream,
    shared: &Shared,
) -> Result<(PeerInfo, BytesMut), CloseReason> {
    let addr = stream.peer_addr()?;
    // Greeting and READY go out together: with the NULL mechanism nothing we send depends
    // on the peer's greeting, and this saves a round trip.
    let mut out = BytesMut::with_capacity(128);
    out.put_slice(&encode_greeting(false));
    let mut props = vec![(
        "Socket-Type".to_string(),
        Bytes::from_static(shared.socket_type.as_str().as_bytes()),
    )];
    if let Some(id) = &shared.opts.identity {
        props.push(("Identity".to_string(), id.clone()));
    }
    Command::Ready(props).encode(&mut out);
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
    let greeting = parse_greeting(&g)?;
    match ready_exchange(stream, shared, addr, greeting.minor).await {
        Err(CloseReason::Violation(v)) => {
            // The peer speaks ZMTP: tell it why, as the spec asks, before closing.
            let mut out = BytesMut::new();
            Command::Error(v.to_string()).encode(&mut out);
            let _ = timeout(Duration::from_millis(200), stream.write_all(&out)).await;
            Err(v.into())
        }
        other => other,
    }
}

/// Reads the peer's READY and checks its properties.
async fn ready_exchange(
    stream: &mut TcpStream,
    shared: &Shared,
    addr: SocketAddr,
    minor: u8,
) -> Result<(PeerInfo, BytesMut), CloseReason> {
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
    let prop = |name: &str| {
        props
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let socket_type = prop("Socket-Type").ok_or(ProtocolViolation::MissingSocketType)?;
    let socket_type = String::from_utf8_lossy(&socket_type).into_owned();
    if !shared.socket_type.accepts(&socket_type) {
        return Err(ProtocolViolation::IncompatibleSocketType {
            ours: shared.socket_type.as_str(),
            theirs: socket_type,
        }
        .into());
    }
    let identity = prop("Identity").unwrap_or_default();
    Ok((
        PeerInfo {
            addr,
            minor,
            socket_type,
            identity,
        },
        rbuf,
    ))
}
