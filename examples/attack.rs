//! Attacks a running node, as a peer on the LAN could, while a legitimate client calls
//! it, and reports how many of the legitimate calls succeeded. For `scripts/abuse.sh`.
//!
//! Run: `cargo run --release --example attack -- ATTACK ENDPOINT SECONDS`, where the
//! node at ENDPOINT (`peerwire node --serve echo`) serves `echo.echo`. Only connect to
//! nodes on this machine. ATTACK is one of:
//!
//! - `silent-conns`: 1100 connections that complete a ZMTP 3.0 handshake, then say nothing;
//! - `unread-replies`: requests of 64 KiB, as fast as possible, replies never read;
//! - `hello-flood`: HELLOs from fresh node ids naming endpoints where nothing listens;
//! - `big-catalogs`: HELLOs announcing catalogs of 4 MB;
//! - `malformed`: 6-byte messages that are not envelopes, as fast as possible;
//! - `slow-subscribers`: 50 subscribers to every topic of the node's PUB (with 10,000
//!   prefixes each) that never read,
//!   while `echo.broadcast` calls make the node publish 64 KiB events as fast as it can;
//! - `log-flood`: envelopes each of which the node logs a warning for (malformed,
//!   unsupported version, a notification nobody handles whose target holds a newline and
//!   terminal escape sequences), as fast as possible. Run the node with `RUST_LOG=warn`
//!   and its output on a pipe nobody reads to see that logging never blocks it.
//!
//! Prints one JSON line: the attack, the legitimate calls made and answered in time, and
//! the worst latency of those answered.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use peerwire::codec::{self, Catalog, Header, Hello, Id, Kind, Version};
use peerwire::transport::wire::{encode_frame_header, encode_greeting, Command, FLAG_MORE};
use peerwire::{CallOptions, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Greeting announcing ZMTP 3.`minor`, and READY as a DEALER.
fn greeting(minor: u8) -> BytesMut {
    let mut out = BytesMut::new();
    let mut g = encode_greeting(false);
    g[11] = minor;
    out.put_slice(&g);
    Command::Ready(vec![("Socket-Type".into(), Bytes::from_static(b"DEALER"))]).encode(&mut out);
    out
}

/// A raw connection that has done its handshake (their greeting and READY are read and
/// ignored as they come).
async fn raw(addr: SocketAddr, minor: u8) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&greeting(minor)).await?;
    let mut buf = [0u8; 128];
    let _ = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await;
    Ok(s)
}

/// A raw SUB connection subscribed to every topic (and to 9,999 prefixes besides, the
/// most a subscriber may hold, to make matching expensive if it could be), with a small
/// receive buffer, that will never read again after its handshake.
async fn slow_subscriber(addr: SocketAddr) -> Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_recv_buffer_size(4096)?;
    let mut s = sock.connect(addr).await?;
    let mut out = BytesMut::new();
    out.put_slice(&encode_greeting(false));
    Command::Ready(vec![("Socket-Type".into(), Bytes::from_static(b"SUB"))]).encode(&mut out);
    Command::Subscribe(Bytes::new()).encode(&mut out);
    for i in 0..9_999 {
        Command::Subscribe(Bytes::from(format!("p{i}."))).encode(&mut out);
    }
    s.write_all(&out).await?;
    let mut buf = [0u8; 128];
    let _ = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await;
    Ok(s)
}

/// Writes `batch` over and over until `until`, connecting again whenever the node
/// closes the connection on us.
async fn flood(addr: SocketAddr, batch: &[u8], until: Instant) {
    while Instant::now() < until {
        let Ok(mut s) = raw(addr, 1).await else {
            continue;
        };
        while Instant::now() < until {
            if s.write_all(batch).await.is_err() {
                break;
            }
        }
    }
}

fn frames(parts: &[&[u8]]) -> BytesMut {
    let mut out = BytesMut::new();
    for (i, f) in parts.iter().enumerate() {
        let more = if i + 1 < parts.len() { FLAG_MORE } else { 0 };
        encode_frame_header(&mut out, more, f.len());
        out.put_slice(f);
    }
    out
}

fn envelope(kind: Kind, sender: Id, target: &str, payload: Bytes) -> BytesMut {
    let mut h = Header::new(kind, sender, target);
    h.deadline_ms = Some(60_000);
    frames(&[&codec::encode_header(&h), &payload])
}

fn hello(catalog: Catalog, port: u16) -> BytesMut {
    let hello = Hello {
        node_id: Id::new(),
        name: "attacker".into(),
        cluster: "default".into(),
        host: "127.0.0.3".into(),
        router_port: port,
        pub_port: port,
        catalog,
        ..Default::default()
    };
    let payload = codec::encode_payload(&hello).expect("a HELLO encodes");
    envelope(Kind::Hello, hello.node_id, "", payload)
}

/// The node attacked: its ROUTER and its PUB.
struct Target {
    addr: SocketAddr,
    pub_addr: SocketAddr,
}

async fn attack(name: &str, target: &Target, until: Instant) -> Result<()> {
    let addr = target.addr;
    match name {
        "silent-conns" => {
            let mut held = Vec::new();
            for _ in 0..1100 {
                if Instant::now() > until {
                    break;
                }
                if let Ok(s) = raw(addr, 0).await {
                    held.push(s);
                }
            }
            tokio::time::sleep_until(until.into()).await;
        }
        "unread-replies" => {
            let payload = codec::encode_payload(&"x".repeat(64 * 1024))?;
            let msg = envelope(Kind::Request, Id::new(), "echo.echo", payload);
            while Instant::now() < until {
                let Ok(mut s) = raw(addr, 1).await else {
                    continue;
                };
                while Instant::now() < until {
                    if s.write_all(&msg).await.is_err() {
                        break; // closed on us: connect again
                    }
                }
            }
        }
        "hello-flood" => {
            let mut port = 10_000u16;
            while Instant::now() < until {
                let Ok(mut s) = raw(addr, 1).await else {
                    continue;
                };
                for _ in 0..100 {
                    port = port.wrapping_add(1).max(10_000);
                    if s.write_all(&hello(Catalog::default(), port)).await.is_err() {
                        break;
                    }
                }
            }
        }
        "big-catalogs" => {
            let catalog = Catalog {
                methods: (0..40_000)
                    .map(|i| (format!("svc{i:05}.{}", "m".repeat(90)), Version::new(1, 0)))
                    .collect(),
                ..Default::default()
            };
            let mut port = 20_000u16;
            let mut held = Vec::new();
            while Instant::now() < until && held.len() < 60 {
                let Ok(mut s) = raw(addr, 1).await else {
                    continue;
                };
                port += 1;
                let _ = s.write_all(&hello(catalog.clone(), port)).await;
                held.push(s);
            }
            tokio::time::sleep_until(until.into()).await;
        }
        "malformed" => {
            let junk = frames(&[b"junk!!"]);
            let mut batch = BytesMut::new();
            for _ in 0..1000 {
                batch.put_slice(&junk);
            }
            flood(addr, &batch, until).await;
        }
        "slow-subscribers" => {
            // Held for the whole attack; the node drops them when its queues are full.
            let mut subs = Vec::new();
            while subs.len() < 50 && Instant::now() < until {
                if let Ok(s) = slow_subscriber(target.pub_addr).await {
                    subs.push(s);
                }
            }
            let payload = codec::encode_payload(&"x".repeat(64 * 1024))?;
            let msg = envelope(Kind::Request, Id::new(), "echo.broadcast", payload);
            while Instant::now() < until {
                let Ok(mut s) = raw(addr, 1).await else {
                    continue;
                };
                let mut replies = [0u8; 64 * 1024];
                for _ in 0..200 {
                    if s.write_all(&msg).await.is_err() {
                        break;
                    }
                    // Read the small replies, so it is the subscribers that are slow.
                    let _ =
                        tokio::time::timeout(Duration::from_millis(1), s.read(&mut replies)).await;
                }
            }
        }
        "log-flood" => {
            let sender = Id::new();
            let mut batch = BytesMut::new();
            let mut old = Header::new(Kind::Request, sender, "echo.echo");
            old.version = 9;
            let evil = "evil\n2026-12-02T00:00:00Z ERROR forged line\x1b[2J\x1b[31m";
            for _ in 0..300 {
                batch.put_slice(&frames(&[b"junk!!"]));
                batch.put_slice(&frames(&[&codec::encode_header(&old), b"\xc0"]));
                batch.put_slice(&envelope(
                    Kind::Notification,
                    sender,
                    evil,
                    Bytes::from_static(b"\xc0"),
                ));
            }
            flood(addr, &batch, until).await;
        }
        other => bail!("unknown attack {other:?}"),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, endpoint, secs] = args.as_slice() else {
        bail!("usage: attack ATTACK ENDPOINT SECONDS");
    };
    let secs: u64 = secs.parse().context("SECONDS")?;
    let endpoint = peerwire::Endpoint::parse(endpoint)?;
    let addr = endpoint.socket_addr().context("an IP:port endpoint")?;
    if !addr.ip().is_loopback() {
        bail!("attack only nodes on this machine (a loopback address)");
    }
    let client = Node::builder("legit")
        .insecure()
        .peer(endpoint.to_string())
        .start()
        .await?;
    if !client
        .wait_for_service("echo.echo", 1, Duration::from_secs(5))
        .await
    {
        bail!("the node does not serve echo.echo");
    }
    let pub_addr = client
        .peers()
        .first()
        .and_then(|p| p.pub_endpoint.socket_addr())
        .context("the node's PUB endpoint")?;
    let until = Instant::now() + Duration::from_secs(secs);
    let name2 = name.clone();
    let target = Target { addr, pub_addr };
    let attacker = tokio::spawn(async move { attack(&name2, &target, until).await });
    // The legitimate client: one call every 100 ms, each given 1 s.
    let (mut calls, mut ok, mut worst) = (0u32, 0u32, Duration::ZERO);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < until {
        tick.tick().await;
        calls += 1;
        let started = Instant::now();
        let r: Result<u64, _> = client
            .request_with(
                "echo.echo",
                &7u64,
                CallOptions::timeout(Duration::from_secs(1)),
            )
            .await;
        if r.is_ok() {
            ok += 1;
            worst = worst.max(started.elapsed());
        }
    }
    attacker.await??;
    println!(
        "{{\"attack\":\"{name}\",\"calls\":{calls},\"ok\":{ok},\"worst_ms\":{}}}",
        worst.as_millis()
    );
    client.shutdown().await;
    Ok(())
}
