//! Attacks one level above the wire, against a node: a peer that never reads its
//! replies, floods of short-lived connections. Each asserts that a legitimate peer is
//! still served and that what the attacker costs is bounded and counted. (Wire-level
//! attacks on the sockets are in `hostile.rs`.)

mod support;

use std::time::Duration;

use peerwire::codec::{self, Header, Id, Kind};
use peerwire::node::{CallOptions, Node};
use support::orders::*;
use support::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// A request envelope's frames for `echo.echo` carrying `n`.
fn echo_request(n: u64) -> [Vec<u8>; 2] {
    let mut h = Header::new(Kind::Request, Id::new(), "echo.echo");
    h.deadline_ms = Some(60_000);
    let env = codec::Envelope {
        header: h,
        payload: codec::encode_payload(&n).unwrap(),
    };
    let [header, payload]: [bytes::Bytes; 2] = env.to_frames().try_into().unwrap();
    [header.to_vec(), payload.to_vec()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_never_reads_its_replies_delays_nobody() {
    // Before: once its reply queue was full, each further request held one of the node's
    // handler slots while its reply waited for room (up to 5 s), so a few megabytes of
    // requests locked every other peer out. Now the reply is dropped, counted, and the
    // connection closed; no slot waits for it.
    init_tracing();
    let server = Node::builder("server")
        .max_in_flight(4)
        .socket_options(
            test_opts()
                .with_send_queue_messages(64)
                .with_heartbeat_interval(None),
        )
        .start()
        .await
        .unwrap();
    server.handle("echo.echo", V1, |n: u64, _| async move { Ok(n) });
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "echo.echo", 1).await;
    let heap0 = heap_bytes();

    let addr: std::net::SocketAddr = server.endpoint()["tcp://".len()..].parse().unwrap();
    // The attacker sends far more requests than the socket buffers and its reply queue
    // hold, never reading; closed, it comes back and does it again, until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacking = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let [h, p] = echo_request(7);
            let mut rounds = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut attacker = RawPeer::connect(addr).await;
                attacker.handshake("DEALER").await;
                rounds += 1;
                for _ in 0..200_000 {
                    if attacker.send_message(&[&h, &p]).await.is_err() {
                        break; // closed on us: what should happen
                    }
                }
                assert!(attacker.closed_by_peer().await);
            }
            rounds
        })
    };
    wait_until("the attacker dropped", || {
        server.stats().callers_dropped >= 1
    })
    .await;
    // Meanwhile the legitimate client is served, each call well within its deadline.
    for n in 0..500u64 {
        let got: u64 = client
            .request_with(
                "echo.echo",
                &n,
                CallOptions::timeout(Duration::from_secs(2)),
            )
            .await
            .unwrap();
        assert_eq!(got, n);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = within("the attack ends", attacking).await.unwrap();
    // Each of its connections was closed once, however many replies were dropped.
    let stats = server.stats();
    assert_eq!(stats.callers_dropped, rounds as u64, "{stats:?}");
    assert!(stats.replies_dropped >= stats.callers_dropped);
    assert!(server.stats().replies_dropped >= 1);
    let grown = heap_bytes().saturating_sub(heap0);
    assert!(grown < 64 << 20, "heap grew by {grown} bytes");
    let got: u64 = client.request("echo.echo", &99u64).await.unwrap();
    assert_eq!(got, 99);
    client.shutdown().await;
    server.shutdown().await;
}
