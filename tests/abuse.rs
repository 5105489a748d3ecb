//! Attacks one level above the wire, against a node: a peer that never reads its
//! replies, floods of short-lived connections. Each asserts that a legitimate peer is
//! still served and that what the attacker costs is bounded and counted. (Wire-level
//! attacks on the sockets are in `hostile.rs`.)

mod support;

use std::time::Duration;

use peerwire::codec::{self, codes, Header, Id, Kind, Version};
use peerwire::node::{CallOptions, MembershipLimits, Node, Rate};
use peerwire::transport::{Dealer, Router};
use support::orders::*;
use support::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The legitimate client of the orders server is served.
async fn still_served(client: &Node) {
    let created: OrderCreated = client
        .request("orders.create", &order("book", 1))
        .await
        .unwrap();
    assert_eq!(created.item, "book");
}

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
        .insecure()
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

    let addr = addr_of(&server.endpoint());
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
                assert!(attacker.closed_within(BOUND).await);
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

/// A raw DEALER to `node` that has introduced itself with `hello` and got the HELLO-ACK,
/// which is returned.
async fn introduce(node: &Node, hello: &codec::Hello) -> (Dealer, codec::Hello) {
    let d = Dealer::connect(node.endpoint(), test_opts()).unwrap();
    send_hello(&d, hello).await;
    let ack = within("HELLO-ACK", d.recv()).await.unwrap();
    let ack = codec::Envelope::from_frames(ack.frames()).unwrap();
    assert_eq!(ack.header.kind, Kind::HelloAck);
    let back = codec::decode_payload(&ack.payload).unwrap();
    (d, back)
}

/// A HELLO of our cluster from a fresh id, claiming ROUTER and PUB ports on a loopback
/// address where nothing listens (so the node's dials are refused, and stay on this host).
fn fresh_hello(catalog: codec::Catalog) -> codec::Hello {
    codec::Hello {
        node_id: Id::new(),
        name: "intruder".into(),
        cluster: "default".into(),
        host: "127.0.0.3".into(),
        router_port: 9,
        pub_port: 9,
        catalog,
        ..Default::default()
    }
}

#[tokio::test]
async fn another_cluster_learns_nothing_but_that() {
    init_tracing();
    let server = orders_server().await;
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "orders.create", 1).await;
    let hello = codec::Hello {
        cluster: "elsewhere".into(),
        ..fresh_hello(codec::Catalog::default())
    };
    let (_d, ack) = introduce(&server, &hello).await;
    assert_eq!(ack.node_id, server.id());
    assert_eq!(ack.cluster, "default");
    assert!(ack.catalog.methods.is_empty(), "{ack:?}");
    assert!(ack.peers.is_empty(), "{ack:?}");
    assert_eq!(ack.name, "");
    assert!(server.stats().other_cluster >= 1);
}

#[tokio::test]
async fn oversized_catalogs_are_refused_and_counted() {
    init_tracing();
    let server = orders_server().await;
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "orders.create", 1).await;
    let heap0 = heap_bytes();
    let many = codec::Catalog {
        methods: (0..2000)
            .map(|i| (format!("svc.m{i}"), Version::new(1, 0)))
            .collect(),
        ..Default::default()
    };
    let long = codec::Catalog {
        methods: (0..100)
            .map(|i| (format!("{i}{}", "x".repeat(1000)), Version::new(1, 0)))
            .collect(),
        ..Default::default()
    };
    let mut held = Vec::new();
    for catalog in [many, long] {
        held.push(introduce(&server, &fresh_hello(catalog)).await);
    }
    wait_until("refused", || server.stats().hellos_refused == 2).await;
    assert!(server.peers().iter().all(|p| p.name != "intruder"));
    let grown = heap_bytes().saturating_sub(heap0);
    assert!(grown < 16 << 20, "heap grew by {grown} bytes");
    still_served(&client).await;
}

#[tokio::test]
async fn the_peer_cap_holds_whoever_names_the_peers() {
    // A HELLO flood from fresh ids (endpoints that refuse connections) used to make the
    // node dial every one of them: the cap applied to gossip only.
    init_tracing();
    let server = Node::builder("capped")
        .insecure()
        .max_peers(3)
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut hello = fresh_hello(codec::Catalog::default());
        // Each on a port of its own, so each is a new endpoint.
        hello.router_port = 10_000 + held.len() as u16;
        held.push(introduce(&server, &hello).await);
    }
    wait_until("17 refused", || server.stats().hellos_refused >= 17).await;
    assert!(server.peers().len() <= 3, "{:?}", server.peers());
}

#[tokio::test]
async fn a_burst_of_joins_is_announced_once_per_interval() {
    // Each new peer made the node send a HELLO to every connection at once: 1000 HELLOs
    // in made 5000 go out to five peers. Announcements are now coalesced.
    init_tracing();
    let observer = Router::bind("tcp://127.0.0.1:0", test_opts())
        .await
        .unwrap();
    let node = start_node("announcer", &[ep(observer.local_addr())]).await;
    // The node introduces itself first.
    let (_, first) = within("first HELLO", observer.recv()).await.unwrap();
    let first = codec::Envelope::from_frames(first.frames()).unwrap();
    assert_eq!(first.header.kind, Kind::Hello);
    // A burst of 100 joins (HELLOs of fresh ids) within a few milliseconds.
    let started = std::time::Instant::now();
    let mut held = Vec::new();
    for i in 0..100u16 {
        let mut hello = fresh_hello(codec::Catalog::default());
        hello.router_port = 20_000 + i;
        held.push(introduce(&node, &hello).await);
    }
    // Count the HELLOs the observer receives until things are quiet for a while.
    let mut hellos = 0usize;
    while let Ok(Ok((_, m))) =
        tokio::time::timeout(Duration::from_millis(500), observer.recv()).await
    {
        if codec::Envelope::from_frames(m.frames()).is_ok_and(|e| e.header.kind == Kind::Hello) {
            hellos += 1;
        }
    }
    let elapsed = started.elapsed();
    // At most one round per 100 ms of the burst and its tail, never one per join.
    let rounds = (elapsed.as_millis() / 100) as usize + 2;
    assert!(
        hellos <= rounds && hellos < 100,
        "{hellos} HELLOs in {elapsed:?} for 100 joins"
    );
    assert!(hellos >= 1, "the joins were never announced");
}

#[tokio::test]
async fn a_hello_flood_is_rate_limited() {
    init_tracing();
    let server = orders_server().await;
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "orders.create", 1).await;
    // One connection, a thousand HELLOs from fresh ids naming endpoints that refuse.
    let d = Dealer::connect(server.endpoint(), test_opts()).unwrap();
    for i in 0..1000u16 {
        let mut hello = fresh_hello(codec::Catalog::default());
        hello.router_port = 30_000 + i;
        send_hello(&d, &hello).await;
    }
    wait_until("limited", || server.stats().hellos_limited >= 900).await;
    assert!(server.peers().len() <= 30, "{} peers", server.peers().len());
    still_served(&client).await;
}

#[tokio::test]
async fn a_hello_lost_to_the_rate_limit_is_sent_again() {
    // Many nodes behind one address (a NAT) joining at once: past the per-address rate,
    // HELLOs are dropped unanswered. A node whose first HELLO was dropped used to stay
    // unintroduced until something else changed; now it sends it again until acknowledged.
    init_tracing();
    let mut limits = MembershipLimits::default();
    limits.hellos_per_source = Rate::new(1.0, 0.5);
    let server = Node::builder("server")
        .insecure()
        .limits(limits)
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    server.handle("echo.echo", V1, |n: u64, _| async move { Ok(n) });
    // Someone else at this address takes the burst.
    let d = Dealer::connect(server.endpoint(), test_opts()).unwrap();
    let hello = fresh_hello(codec::Catalog::default());
    send_hello(&d, &hello).await;
    wait_until("the burst taken", || server.peers().len() == 1).await;
    let client = start_node("client", &[server.endpoint()]).await;
    wait_until("the first HELLO dropped", || {
        server.stats().hellos_limited >= 1
    })
    .await;
    within_for(
        Duration::from_secs(10),
        "introduced on a later HELLO",
        async {
            while !client
                .wait_for_service("echo.echo", 1, Duration::from_millis(100))
                .await
            {}
        },
    )
    .await;
}

#[tokio::test]
async fn dials_of_named_endpoints_are_bounded() {
    // A HELLO's gossip names endpoints, which the node dials: endpoints that never
    // answer must not pile up connection attempts.
    init_tracing();
    let mut limits = peerwire::node::MembershipLimits::default();
    limits.max_dialling = 8;
    let server = Node::builder("dialler")
        .insecure()
        .limits(limits)
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    let mut hello = fresh_hello(codec::Catalog::default());
    hello.peers = (0..40)
        .map(|i| format!("tcp://127.0.0.3:{}", 40_000 + i))
        .collect();
    let _held = introduce(&server, &hello).await;
    wait_until("deferred", || server.stats().dials_deferred >= 30).await;
    assert!(server.peers().len() <= 9, "{} peers", server.peers().len());
}

#[tokio::test]
async fn one_caller_cannot_take_every_handler_slot() {
    // A caller with many slow requests in flight held every handler slot of the node,
    // and everybody else waited. Now one connection may run only so many at once; past
    // that its requests are answered `overloaded` at once.
    init_tracing();
    let server = Node::builder("server")
        .insecure()
        .max_in_flight(8)
        .max_in_flight_per_connection(4)
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    server.handle("slow.op", V1, move |_: (), _| {
        let r = r.clone();
        async move {
            r.notified().await;
            Ok(())
        }
    });
    server.handle("echo.echo", V1, |n: u64, _| async move { Ok(n) });
    let greedy = start_node("greedy", &[server.endpoint()]).await;
    let polite = start_node("polite", &[server.endpoint()]).await;
    wait_service(&greedy, "slow.op", 1).await;
    wait_service(&polite, "echo.echo", 1).await;
    let mut calls = Vec::new();
    for _ in 0..20 {
        let opts = CallOptions::timeout(Duration::from_secs(30));
        calls.push(
            greedy
                .request_async_with::<_, ()>("slow.op", &(), opts)
                .await
                .unwrap(),
        );
    }
    wait_until("16 refused", || server.stats().overloaded >= 16).await;
    // Four slots are held by the greedy caller; the polite one is served.
    let got: u64 = polite
        .request_with(
            "echo.echo",
            &5u64,
            CallOptions::timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap();
    assert_eq!(got, 5);
    release.notify_waiters();
    let mut overloaded = 0;
    for c in calls {
        match within("reply", c.recv()).await {
            Ok(()) => {}
            Err(peerwire::node::CallError::Remote { code, .. }) if code == codes::OVERLOADED => {
                overloaded += 1
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(overloaded, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_a_deep_backlog_does_not_delay_another() {
    // Before: past `max_in_flight`, declined messages waited in one FIFO for the whole
    // socket, so a request from a quiet peer waited behind every request a flooder had
    // queued (here about 4 s of them). Now each connection has its own lane, served in
    // turn: the quiet peer waits for about one of the flooder's requests per turn.
    init_tracing();
    let server = Node::builder("server")
        .insecure()
        .max_in_flight(2)
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    server.handle("slow.op", V1, |_: (), _| async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(())
    });
    let polite = start_node("polite", &[server.endpoint()]).await;
    wait_service(&polite, "slow.op", 1).await;
    let mut flooder = RawPeer::connect(addr_of(&server.endpoint())).await;
    flooder.handshake("DEALER").await;
    let mut h = Header::new(Kind::Request, Id::new(), "slow.op");
    h.deadline_ms = Some(60_000);
    let payload = codec::encode_payload(&()).unwrap();
    for _ in 0..400 {
        h.id = Id::new();
        let env = codec::Envelope {
            header: h.clone(),
            payload: payload.clone(),
        };
        let frames = env.to_frames();
        let frames: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
        flooder.send_message(&frames).await.unwrap();
    }
    // 400 × 20 ms over 2 slots: the backlog alone lasts about 4 s.
    wait_until("a backlog", || server.stats().router.messages_in >= 300).await;
    let started = std::time::Instant::now();
    polite
        .request_with::<_, ()>("slow.op", &(), CallOptions::timeout(Duration::from_secs(2)))
        .await
        .expect("served within 2 s although 4 s of another connection's requests wait");
    eprintln!("served after {:?}", started.elapsed());
}

/// A request envelope's frames for `target` with `payload`, as a raw peer sends them.
fn raw_request<T: serde::Serialize>(target: &str, payload: &T) -> Vec<bytes::Bytes> {
    let mut h = Header::new(Kind::Request, Id::new(), target);
    h.deadline_ms = Some(60_000);
    codec::Envelope {
        header: h,
        payload: codec::encode_payload(payload).unwrap(),
    }
    .to_frames()
}

async fn send_raw(peer: &mut RawPeer, frames: &[bytes::Bytes]) {
    let frames: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
    peer.send_message(&frames).await.unwrap();
}

/// A node whose `slow.op` handlers hold their slots until the gate opens
/// (`add_permits`), and the count of those started.
async fn node_with_a_slow_op(
    b: peerwire::node::NodeBuilder,
) -> (
    Node,
    std::sync::Arc<tokio::sync::Semaphore>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::{atomic::AtomicUsize, Arc};
    let server = b.socket_options(test_opts()).start().await.unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let (g, n) = (gate.clone(), started.clone());
    server.handle("slow.op", V1, move |_: String, _| {
        let (g, n) = (g.clone(), n.clone());
        async move {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = g.acquire().await;
            Ok(())
        }
    });
    (server, gate, started)
}

fn count(n: &std::sync::atomic::AtomicUsize) -> usize {
    n.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test]
async fn many_connections_from_one_address_cannot_take_every_handler_slot() {
    // One connection was limited, but an address may open 128 of them. Now handlers
    // that await are also counted per address.
    init_tracing();
    let (server, gate, started) = node_with_a_slow_op(
        Node::builder("server")
            .insecure()
            .max_in_flight(8)
            .max_in_flight_per_connection(4)
            .max_in_flight_per_source(6),
    )
    .await;
    let polite = start_node("polite", &[server.endpoint()]).await;
    wait_service(&polite, "slow.op", 1).await;
    let from: std::net::IpAddr = "127.0.0.3".parse().unwrap();
    let mut conns = Vec::new();
    for _ in 0..2 {
        let mut c = RawPeer::connect_from(from, addr_of(&server.endpoint())).await;
        c.handshake("DEALER").await;
        for _ in 0..5 {
            send_raw(&mut c, &raw_request("slow.op", &String::new())).await;
        }
        conns.push(c);
    }
    // 4 on the first connection (its limit), 2 on the second (the address's 6): 4 refused.
    wait_until("4 refused", || server.stats().overloaded >= 4).await;
    let call = polite
        .request_async_with::<_, ()>(
            "slow.op",
            &String::new(),
            CallOptions::timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    // The polite caller's handler got one of the two slots left.
    wait_until("7 running", || count(&started) == 7).await;
    gate.add_permits(100);
    within("polite served", call.recv()).await.unwrap();
    assert_eq!(server.stats().overloaded, 4);
}

#[tokio::test]
async fn requests_held_by_slow_handlers_are_bounded_in_bytes() {
    // Large requests to a slow handler each held their bytes until it finished: memory
    // followed the caller. Now request bytes held are bounded per address and in total.
    init_tracing();
    let (server, gate, started) = node_with_a_slow_op(
        Node::builder("server")
            .insecure()
            .max_in_flight_bytes(4 << 20),
    )
    .await;
    let polite = start_node("polite", &[server.endpoint()]).await;
    wait_service(&polite, "slow.op", 1).await;
    let big = "x".repeat(600 << 10);
    let mut attacker =
        RawPeer::connect_from("127.0.0.3".parse().unwrap(), addr_of(&server.endpoint())).await;
    attacker.handshake("DEALER").await;
    for _ in 0..3 {
        send_raw(&mut attacker, &raw_request("slow.op", &big)).await;
    }
    // A quarter of 4 MiB per address: the first 600 KiB request runs, the next two not.
    wait_until("2 refused", || server.stats().overloaded >= 2).await;
    let call = polite
        .request_async_with::<_, ()>(
            "slow.op",
            &big,
            CallOptions::timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    wait_until("the polite one running", || count(&started) == 2).await;
    gate.add_permits(100);
    within("polite served", call.recv()).await.unwrap();
    assert_eq!(server.stats().overloaded, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_not_reading_together_cannot_get_an_honest_one_dropped() {
    // Several callers that stop reading just under their own queue's bound fill the
    // ROUTER's total. Then it is the one holding the most that is dropped, never the
    // caller whose reply found no room.
    init_tracing();
    let server = Node::builder("server")
        .insecure()
        .socket_options(
            test_opts()
                .with_send_queue_bytes(16 << 20)
                .with_send_queue_total_bytes(2 << 20)
                .with_heartbeat_interval(None),
        )
        .start()
        .await
        .unwrap();
    server.handle("echo.echo", V1, |s: String, _| async move { Ok(s) });
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "echo.echo", 1).await;
    let addr = addr_of(&server.endpoint());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut attackers = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        attackers.push(tokio::spawn(async move {
            let mut h = Header::new(Kind::Request, Id::new(), "echo.echo");
            h.deadline_ms = Some(60_000);
            let header = codec::encode_header(&h);
            let payload = codec::encode_payload(&"x".repeat(32 * 1024)).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut a = RawPeer::connect(addr).await;
                a.handshake("DEALER").await;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if a.send_message(&[&header, &payload]).await.is_err() {
                        break;
                    }
                }
            }
        }));
    }
    for n in 0..300u64 {
        let got: String = client
            .request_with(
                "echo.echo",
                &n.to_string(),
                CallOptions::timeout(Duration::from_secs(2)),
            )
            .await
            .unwrap();
        assert_eq!(got, n.to_string());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for a in attackers {
        let _ = within("an attacker stops", a).await;
    }
    let stats = server.stats();
    assert!(
        stats.router.slow_dropped >= 1,
        "the attack never filled the total: {stats:?}"
    );
}
