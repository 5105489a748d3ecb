//! Helpers shared by the integration tests: bounded waits, test options, a raw ZMTP
//! peer for hostile input, and memory readings.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use peerwire::transport::wire::{encode_frame_header, encode_greeting, Command, FLAG_MORE};
use peerwire::transport::{SocketEvent, SocketOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;

/// Default bound for any wait in a test.
pub const BOUND: Duration = Duration::from_secs(10);

/// Sets up tracing once (RUST_LOG controls it).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Awaits `fut`, panicking with `what` if it takes longer than `BOUND`.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within_for(BOUND, what, fut).await
}

/// Awaits `fut`, panicking with `what` if it takes longer than `bound`.
pub async fn within_for<T>(bound: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(bound, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {bound:?} waiting for {what}"),
    }
}

/// Waits for the first event matching `pred`.
pub async fn wait_event(
    rx: &mut broadcast::Receiver<SocketEvent>,
    what: &str,
    pred: impl Fn(&SocketEvent) -> bool,
) -> SocketEvent {
    within(what, async {
        loop {
            match rx.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    })
    .await
}

/// Polls `cond` until it holds (for state with no event, such as counters).
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// Options with short timeouts so failure paths finish quickly.
pub fn test_opts() -> SocketOptions {
    SocketOptions {
        greeting_timeout: Duration::from_millis(500),
        handshake_timeout: Duration::from_secs(2),
        reconnect_initial: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        linger: Duration::from_millis(200),
        // Generous: a test runtime starved by a flood (or by parallel test runs) must not
        // drop a well-behaved peer for silence. Tests of heartbeats set their own.
        heartbeat_timeout: Duration::from_secs(10),
        ..SocketOptions::default()
    }
}

/// `tcp://` endpoint for an address.
pub fn ep(addr: SocketAddr) -> String {
    format!("tcp://{addr}")
}

/// Resident set size of this process, in KiB.
pub fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A hand-driven ZMTP peer for sending exactly the bytes a test wants.
pub struct RawPeer {
    pub stream: TcpStream,
    pub rbuf: BytesMut,
}

impl RawPeer {
    pub async fn connect(addr: SocketAddr) -> RawPeer {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        RawPeer {
            stream,
            rbuf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Greeting (3.1, NULL) and READY with this socket type.
    pub async fn handshake(&mut self, socket_type: &str) {
        let mut out = BytesMut::new();
        out.put_slice(&encode_greeting(false));
        Command::Ready(vec![(
            "Socket-Type".into(),
            Bytes::copy_from_slice(socket_type.as_bytes()),
        )])
        .encode(&mut out);
        self.send(&out).await.unwrap();
        // Their greeting then their READY.
        self.read_exact(64).await;
        let f = self.read_frame().await.expect("peer READY");
        assert_eq!(f.0 & 0x04, 0x04, "READY is a command");
    }

    pub async fn send_message(&mut self, frames: &[&[u8]]) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        for (i, f) in frames.iter().enumerate() {
            encode_frame_header(
                &mut out,
                if i + 1 < frames.len() { FLAG_MORE } else { 0 },
                f.len(),
            );
            out.put_slice(f);
        }
        self.send(&out).await
    }

    pub async fn send_command(&mut self, c: &Command) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        c.encode(&mut out);
        self.send(&out).await
    }

    pub async fn read_exact(&mut self, n: usize) -> Bytes {
        while self.rbuf.len() < n {
            if self.stream.read_buf(&mut self.rbuf).await.unwrap() == 0 {
                panic!("closed while reading");
            }
        }
        self.rbuf.split_to(n).freeze()
    }

    /// Reads one frame: (flags, body); `None` if the peer closed the connection.
    pub async fn read_frame(&mut self) -> Option<(u8, Bytes)> {
        loop {
            if self.rbuf.len() >= 2 {
                let flags = self.rbuf[0];
                let (hdr, len) = if flags & 0x02 != 0 {
                    if self.rbuf.len() < 9 {
                        None
                    } else {
                        Some((
                            9,
                            u64::from_be_bytes(self.rbuf[1..9].try_into().unwrap()) as usize,
                        ))
                    }
                } else {
                    Some((2, self.rbuf[1] as usize))
                }
                .unwrap_or((usize::MAX, 0));
                if hdr != usize::MAX && self.rbuf.len() >= hdr + len {
                    let _ = self.rbuf.split_to(hdr);
                    return Some((flags, self.rbuf.split_to(len).freeze()));
                }
            }
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Reads until the peer closes the connection (returns true) or `bound` passes.
    pub async fn closed_within(&mut self, bound: Duration) -> bool {
        tokio::time::timeout(bound, async {
            let mut buf = [0u8; 4096];
            loop {
                match self.stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }
}

/// A global allocator that counts live heap bytes, for tests that check memory stays
/// bounded (RSS alone would miss memory reserved but never touched). A test binary opts
/// in with `#[global_allocator] static A: CountingAlloc = CountingAlloc;`.
pub struct CountingAlloc;

static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        let p = std::alloc::System.alloc(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size(), std::sync::atomic::Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        std::alloc::System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        let q = std::alloc::System.realloc(p, l, new);
        if !q.is_null() {
            LIVE.fetch_add(new, std::sync::atomic::Ordering::Relaxed);
            LIVE.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
        }
        q
    }
}

/// Live heap bytes, when the binary uses [`CountingAlloc`]; otherwise 0.
pub fn heap_bytes() -> usize {
    LIVE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Starts a node called `name` on loopback with these static peers.
pub async fn start_node(name: &str, peers: &[String]) -> peerwire::node::Node {
    let mut b = peerwire::node::Node::builder(name).socket_options(test_opts());
    for p in peers {
        b = b.peer(p.clone());
    }
    b.start().await.expect("node starts")
}

/// Waits until `node` sees `n` connected peers serving `target`.
pub async fn wait_service(node: &peerwire::node::Node, target: &str, n: usize) {
    assert!(
        node.wait_for_service(target, n, BOUND).await,
        "{} never saw {n} instance(s) of {target}",
        node.name()
    );
}

/// The `peerwire` binary, with mDNS off: tests on the host never multicast on its
/// interfaces (those that want mDNS run it in a network namespace of their own).
pub fn peerwire_cmd() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_peerwire"));
    c.env("PEERWIRE_MDNS", "off");
    c
}
