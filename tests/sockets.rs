//! Behaviour of peerwire's own sockets talking to each other over loopback.

mod support;

use std::time::Duration;

use bytes::Bytes;
use peerwire::transport::wire::Command;
use peerwire::transport::{
    CloseReason, Dealer, Message, ProtocolViolation, Publisher, Router, SendError, SocketEvent,
    Subscriber,
};
use support::*;

fn msg(frames: &[&[u8]]) -> Message {
    Message::from_frames(frames.iter().map(|f| Bytes::copy_from_slice(f)).collect())
}

#[tokio::test]
async fn dealer_router_round_trip_multipart_empty_and_large() {
    init_tracing();
    let router = Router::bind("tcp://127.0.0.1:0", test_opts())
        .await
        .unwrap();
    let dealer = Dealer::connect(ep(router.local_addr()), test_opts()).unwrap();
    let big = vec![0xA5u8; 1 << 20];
    for m in [msg(&[b"hello"]), msg(&[b"", b"a", b""]), msg(&[b"x", &big])] {
        dealer.send(m.clone()).await.unwrap();
        let (id, got) = within("router recv", router.recv()).await.unwrap();
        assert_eq!(got, m);
        router.send(&id, got).await.unwrap();
        let back = within("dealer recv", dealer.recv()).await.unwrap();
        assert_eq!(back, m);
    }
    assert_eq!(router.peers().len(), 1);
}

#[tokio::test]
async fn router_routes_by_identity_and_refuses_a_duplicate() {
    init_tracing();
    let router = Router::bind("tcp://127.0.0.1:0", test_opts())
        .await
        .unwrap();
    let mut events = router.events();
    let with_id =
        |id: &'static str| test_opts().with_identity(Some(Bytes::from_static(id.as_bytes())));
    let a = Dealer::connect(ep(router.local_addr()), with_id("alpha")).unwrap();
    let b = Dealer::connect(ep(router.local_addr()), with_id("beta")).unwrap();
    a.send("from a".into()).await.unwrap();
    b.send("from b".into()).await.unwrap();
    for _ in 0..2 {
        let (id, m) = within("recv", router.recv()).await.unwrap();
        let expect: &[u8] = if &id[..] == b"alpha" {
            b"from a"
        } else {
            b"from b"
        };
        assert_eq!(&m.frames()[0][..], expect);
    }
    router.send(b"beta", "to b".into()).await.unwrap();
    router.send(b"alpha", "to a".into()).await.unwrap();
    assert_eq!(
        &within("a", a.recv()).await.unwrap().frames()[0][..],
        b"to a"
    );
    assert_eq!(
        &within("b", b.recv()).await.unwrap().frames()[0][..],
        b"to b"
    );

    // A second "alpha" is refused; the first keeps its place.
    let imposter = Dealer::connect(ep(router.local_addr()), with_id("alpha")).unwrap();
    let e = wait_event(&mut events, "refusal of duplicate identity", |e| {
        matches!(
            e,
            SocketEvent::HandshakeFailed {
                reason: CloseReason::Violation(ProtocolViolation::IdentityInUse(_)),
                ..
            }
        )
    })
    .await;
    drop(e);
    let _ = imposter.try_send("imposter".into());
    router.send(b"alpha", "still a".into()).await.unwrap();
    assert_eq!(
        &within("a", a.recv()).await.unwrap().frames()[0][..],
        b"still a"
    );
    a.send("a again".into()).await.unwrap();
    let (id, m) = within("recv", router.recv()).await.unwrap();
    assert_eq!(
        (&id[..], &m.frames()[0][..]),
        (&b"alpha"[..], &b"a again"[..])
    );
    assert!(
        router
            .stats()
            .violations
            .get("identity_in_use")
            .copied()
            .unwrap_or(0)
            >= 1
    );
    assert!(matches!(
        router.send(b"nobody", "x".into()).await,
        Err(SendError::UnknownPeer(_))
    ));
}

#[tokio::test]
async fn dealer_queues_while_disconnected_and_delivers_after_restart() {
    init_tracing();
    let router = Router::bind("tcp://127.0.0.1:0", test_opts())
        .await
        .unwrap();
    let addr = router.local_addr();
    let opts = test_opts().with_send_queue_messages(5);
    let dealer = Dealer::connect(ep(addr), opts).unwrap();
    let mut events = dealer.events();
    dealer.send("first".into()).await.unwrap();
    let (_, m) = within("first", router.recv()).await.unwrap();
    assert_eq!(&m.frames()[0][..], b"first");

    router.close().await;
    wait_event(&mut events, "disconnect", |e| {
        matches!(e, SocketEvent::Disconnected { .. })
    })
    .await;
    assert!(!dealer.is_connected());
    for i in 0..5 {
        dealer
            .send(format!("queued {i}").into_bytes().into())
            .await
            .unwrap();
    }
    // Full while disconnected: fails at once, with a clear error.
    let err = within("fail fast", dealer.send("overflow".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SendError::QueueFull {
                connected: false,
                messages: 5,
                ..
            }
        ),
        "{err}"
    );

    // The router comes back on the same port: everything queued arrives, in order.
    let router = Router::bind(&ep(addr), test_opts()).await.unwrap();
    for i in 0..5 {
        let (_, m) = within("queued message", router.recv()).await.unwrap();
        assert_eq!(m.frames()[0], format!("queued {i}").into_bytes());
    }
    assert!(dealer.is_connected());
}

#[tokio::test]
async fn dealer_queue_is_bounded_in_bytes() {
    let opts = test_opts().with_send_queue_bytes(10_000);
    // Nothing listens on the discard port: the DEALER stays disconnected.
    let dealer = Dealer::connect("tcp://127.0.0.1:9", opts).unwrap();
    // Accepted while under 10 000 bytes (the bound is soft by one message).
    for _ in 0..3 {
        dealer.send(vec![0u8; 4000].into()).await.unwrap();
    }
    let err = dealer.send(vec![0u8; 10].into()).await.unwrap_err();
    assert!(
        matches!(
            err,
            SendError::QueueFull {
                messages: 3,
                bytes: 12000,
                connected: false
            }
        ),
        "{err}"
    );
    assert_eq!(dealer.queued(), (3, 12000));
}

#[test]
fn dealer_refuses_identities_no_router_would_accept() {
    for bad in [&b""[..], &[0u8, 1][..], &[b'x'; 256][..]] {
        let opts = test_opts().with_identity(Some(Bytes::copy_from_slice(bad)));
        assert!(matches!(
            Dealer::connect("tcp://127.0.0.1:9", opts),
            Err(peerwire::transport::TransportError::InvalidIdentity)
        ));
    }
}

#[tokio::test]
async fn send_rejects_messages_over_the_limits() {
    let opts = test_opts()
        .with_max_message_size(100)
        .with_max_frames_per_message(2);
    let dealer = Dealer::connect("tcp://127.0.0.1:9", opts).unwrap();
    assert!(matches!(
        dealer.try_send(vec![0u8; 101].into()),
        Err(SendError::MessageTooLarge {
            size: 101,
            max: 100
        })
    ));
    assert!(matches!(
        dealer.try_send(msg(&[b"a", b"b", b"c"])),
        Err(SendError::TooManyFrames { frames: 3, max: 2 })
    ));
    assert_eq!(
        dealer.try_send(Message::new()),
        Err(SendError::EmptyMessage)
    );
}

#[tokio::test]
async fn pub_sub_prefix_filters_and_many_subscribers() {
    init_tracing();
    let publisher = Publisher::bind("tcp://127.0.0.1:0", test_opts())
        .await
        .unwrap();
    let mut events = publisher.events();
    let s1 = Subscriber::new(test_opts());
    s1.subscribe("weather.");
    s1.connect(ep(publisher.local_addr())).unwrap();
    let s2 = Subscriber::new(test_opts());
    s2.subscribe("");
    s2.connect(ep(publisher.local_addr())).unwrap();
    for _ in 0..2 {
        wait_event(&mut events, "subscriber connected", |e| {
            matches!(e, SocketEvent::Connected { .. })
        })
        .await;
    }
    wait_until("subscriptions applied", || {
        publisher
            .subscribers()
            .iter()
            .all(|s| !s.subscriptions.is_empty())
    })
    .await;
    publisher.publish(msg(&[b"sport.goal", b"1"])).unwrap();
    publisher.publish(msg(&[b"weather.rain", b"2"])).unwrap();
    let m = within("s1", s1.recv()).await.unwrap();
    assert_eq!(m, msg(&[b"weather.rain", b"2"]));
    assert_eq!(
        &within("s2", s2.recv()).await.unwrap().frames()[1][..],
        b"1"
    );
    assert_eq!(
        &within("s2", s2.recv()).await.unwrap().frames()[1][..],
        b"2"
    );

    // Unsubscribe: the publisher stops sending the prefix.
    assert!(s1.unsubscribe(b"weather."));
    wait_until("cancel applied", || {
        publisher
            .subscribers()
            .iter()
            .any(|s| s.subscriptions.is_empty())
    })
    .await;
    let r = publisher.publish(msg(&[b"weather.sun"])).unwrap();
    assert_eq!(r.queued, 1, "only the catch-all subscriber matches");
}

#[tokio::test]
async fn slow_subscriber_loses_counted_messages_and_never_stalls_others() {
    init_tracing();
    let opts = test_opts().with_send_queue_messages(200);
    let publisher = Publisher::bind("tcp://127.0.0.1:0", opts).await.unwrap();
    let fast = Subscriber::new(test_opts());
    fast.subscribe("");
    fast.connect(ep(publisher.local_addr())).unwrap();
    // The slow subscriber completes its handshake, subscribes, and never reads again.
    let mut slow = RawPeer::connect(publisher.local_addr()).await;
    slow.handshake("SUB").await;
    slow.send_command(&Command::Subscribe(Bytes::new()))
        .await
        .unwrap();
    wait_until("both subscribed", || {
        let s = publisher.subscribers();
        s.len() == 2 && s.iter().all(|s| !s.subscriptions.is_empty())
    })
    .await;

    let payload = vec![7u8; 4096];
    let total = 5_000u32;
    let mut got = 0u32;
    for batch in 0..(total / 100) {
        for i in 0..100 {
            let n = batch * 100 + i;
            publisher
                .publish(Message::from_frames(vec![
                    Bytes::from(n.to_be_bytes().to_vec()),
                    Bytes::from(payload.clone()),
                ]))
                .unwrap();
        }
        // The fast subscriber keeps up: it gets every message, in order.
        while got < (batch + 1) * 100 {
            let m = within("fast subscriber", fast.recv()).await.unwrap();
            assert_eq!(&m.frames()[0][..], &got.to_be_bytes());
            got += 1;
        }
    }
    let subs = publisher.subscribers();
    let slow_info = subs
        .iter()
        .find(|s| s.dropped > 0)
        .expect("slow one dropped");
    let fast_info = subs
        .iter()
        .find(|s| s.dropped == 0)
        .expect("fast one lost nothing");
    assert_eq!(fast_info.delivered, total as u64);
    assert_eq!(slow_info.delivered + slow_info.dropped, total as u64);
    assert_eq!(publisher.stats().dropped, slow_info.dropped);
}

#[tokio::test]
async fn subscriber_reconnects_and_resubscribes() {
    init_tracing();
    let publisher = Publisher::bind("tcp://127.0.0.1:0", test_opts())
        .await
        .unwrap();
    let addr = publisher.local_addr();
    let sub = Subscriber::new(test_opts());
    sub.subscribe("t");
    sub.connect(ep(addr)).unwrap();
    wait_subscribed(&publisher).await;
    publisher.publish("t1".into()).unwrap();
    assert_eq!(
        &within("t1", sub.recv()).await.unwrap().frames()[0][..],
        b"t1"
    );
    publisher.close().await;

    let publisher = Publisher::bind(&ep(addr), test_opts()).await.unwrap();
    wait_until("resubscribed", || {
        publisher
            .subscribers()
            .iter()
            .any(|s| s.subscriptions == vec![Bytes::from_static(b"t")])
    })
    .await;
    publisher.publish("t2".into()).unwrap();
    assert_eq!(
        &within("t2", sub.recv()).await.unwrap().frames()[0][..],
        b"t2"
    );
}

#[tokio::test]
async fn silent_peer_is_dropped_by_heartbeat_and_pings_are_answered() {
    init_tracing();
    let opts = test_opts()
        .with_heartbeat_interval(Some(Duration::from_millis(100)))
        .with_heartbeat_timeout(Duration::from_millis(400));
    let router = Router::bind("tcp://127.0.0.1:0", opts).await.unwrap();
    let mut events = router.events();
    let mut peer = RawPeer::connect(router.local_addr()).await;
    peer.handshake("DEALER").await;
    peer.send_command(&Command::Ping {
        ttl_ds: 0,
        context: Bytes::from_static(b"hi"),
    })
    .await
    .unwrap();
    // We get PINGs from the router and the PONG for ours.
    let mut saw_pong = false;
    let mut saw_ping = false;
    while !(saw_pong && saw_ping) {
        let (_, body) = within("heartbeat frames", peer.read_frame())
            .await
            .expect("open");
        match Command::decode(body).unwrap() {
            Command::Pong(ctx) => {
                assert_eq!(&ctx[..], b"hi");
                saw_pong = true
            }
            Command::Ping { .. } => saw_ping = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    // Then the peer goes silent: the router gives up on it.
    let e = wait_event(&mut events, "heartbeat timeout", |e| {
        matches!(e, SocketEvent::Disconnected { .. })
    })
    .await;
    assert!(matches!(
        e,
        SocketEvent::Disconnected {
            reason: CloseReason::Violation(ProtocolViolation::HeartbeatTimeout),
            ..
        }
    ));
    assert!(router.peers().is_empty());
}

#[tokio::test]
async fn dealer_detects_dead_router_and_reconnects() {
    init_tracing();
    let router = Router::bind("tcp://127.0.0.1:0", test_opts())
        .await
        .unwrap();
    let addr = router.local_addr();
    let dealer = Dealer::connect(ep(addr), test_opts()).unwrap();
    let mut events = dealer.events();
    dealer.send("one".into()).await.unwrap();
    within("one", router.recv()).await.unwrap();
    drop(router);
    wait_event(&mut events, "disconnect", |e| {
        matches!(e, SocketEvent::Disconnected { .. })
    })
    .await;
    let router = Router::bind(&ep(addr), test_opts()).await.unwrap();
    wait_event(&mut events, "reconnect", |e| {
        matches!(e, SocketEvent::Connected { .. })
    })
    .await;
    dealer.send("two".into()).await.unwrap();
    let (_, m) = within("two", router.recv()).await.unwrap();
    assert_eq!(&m.frames()[0][..], b"two");
}

#[tokio::test]
async fn listener_refuses_past_max_connections_and_serves_the_rest() {
    init_tracing();
    let opts = test_opts().with_max_connections(2);
    let router = Router::bind("tcp://127.0.0.1:0", opts).await.unwrap();
    let mut events = router.events();
    let a = Dealer::connect(ep(router.local_addr()), test_opts()).unwrap();
    let b = Dealer::connect(ep(router.local_addr()), test_opts()).unwrap();
    for d in [&a, &b] {
        d.send("hi".into()).await.unwrap();
        within("hi", router.recv()).await.unwrap();
    }
    let mut third = RawPeer::connect(router.local_addr()).await;
    wait_event(&mut events, "refusal", |e| {
        matches!(e, SocketEvent::Refused { .. })
    })
    .await;
    assert!(third.closed_within(BOUND).await);
    assert_eq!(router.stats().refused, 1);
    a.send("still served".into()).await.unwrap();
    let (_, m) = within("after refusal", router.recv()).await.unwrap();
    assert_eq!(&m.frames()[0][..], b"still served");
}

#[tokio::test]
async fn close_flushes_queued_messages() {
    init_tracing();
    let router = Router::bind("tcp://127.0.0.1:0", test_opts())
        .await
        .unwrap();
    let dealer = Dealer::connect(ep(router.local_addr()), test_opts()).unwrap();
    dealer.send("hello".into()).await.unwrap();
    within("hello", router.recv()).await.unwrap();
    for i in 0..1000u32 {
        dealer
            .send(Message::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap();
    }
    within("close", dealer.close()).await;
    for i in 0..1000u32 {
        let (_, m) = within("flushed", router.recv()).await.unwrap();
        assert_eq!(&m.frames()[0][..], &i.to_be_bytes());
    }
}

/// A message of `len` bytes that says who sent it and its place in that sender's
/// sequence, and is otherwise filled with a pattern of both (so a frame cut short, or
/// spliced with another, does not pass for a whole one).
fn tagged(sender: u8, seq: u32, len: usize) -> Message {
    let mut body = vec![sender; len.max(5)];
    body[1..5].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in body.iter_mut().enumerate().skip(5) {
        *b = (seq as usize + i) as u8 ^ sender;
    }
    Message::from(Bytes::from(body))
}

fn untag(m: &Message) -> (u8, u32) {
    let f = &m.frames()[0];
    let seq = u32::from_be_bytes(f[1..5].try_into().unwrap());
    assert_eq!(
        *m,
        tagged(f[0], seq, f.len()),
        "message {seq} of {} garbled",
        f[0]
    );
    (f[0], seq)
}

/// Senders write a message themselves when the connection has nothing else to write,
/// and queue it otherwise (a burst, or a socket the peer is not emptying). Whatever mix
/// of the two a run takes, each sender's messages arrive whole and in order: here with
/// senders on several threads, a receiver that stops reading until the senders back up
/// into the queues, sizes from a few bytes to past the zero-copy threshold, and with and
/// without CURVE (whose nonces would fail any reordering of the bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_writing_directly_and_through_the_queue_keep_each_senders_order() {
    use peerwire::transport::curve::{Curve, CurveKeys};
    init_tracing();
    let keys = CurveKeys::generate();
    for secure in [false, true] {
        let (server, client) = if secure {
            (
                test_opts().with_curve(Some(Curve::new(keys.clone()))),
                test_opts().with_curve(Some(
                    Curve::new(CurveKeys::generate()).server_key(keys.public()),
                )),
            )
        } else {
            (test_opts(), test_opts())
        };
        // The DEALER takes few messages before it stops reading: the socket fills.
        let client = client.with_recv_queue_messages(4);
        let router = std::sync::Arc::new(Router::bind("tcp://127.0.0.1:0", server).await.unwrap());
        let dealer = Dealer::connect(ep(router.local_addr()), client).unwrap();
        dealer.send(msg(&[b"hi"])).await.unwrap();
        let (id, _) = within("hello", router.recv()).await.unwrap();
        const SENDERS: u8 = 3;
        const EACH: u32 = 500;
        let mut tasks = Vec::new();
        for s in 0..SENDERS {
            let (router, id) = (router.clone(), id.clone());
            tasks.push(tokio::spawn(async move {
                for seq in 0..EACH {
                    let len = [3, 200, 5000, 40_000][(seq as usize + s as usize) % 4];
                    router.send(&id, tagged(s, seq, len)).await.unwrap();
                    if seq % 7 == 0 {
                        // Let the connection's task run now and then, so senders also
                        // find it idle and write themselves.
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        // Not reading until the senders' messages are backing up in the queue.
        wait_until("messages queued behind a full socket", || {
            router.peers().iter().any(|p| p.queued_messages > 0)
        })
        .await;
        let mut next = [0u32; SENDERS as usize];
        for _ in 0..SENDERS as u32 * EACH {
            let m = within("dealer recv", dealer.recv()).await.unwrap();
            let (s, seq) = untag(&m);
            assert_eq!(
                seq, next[s as usize],
                "sender {s} out of order (secure: {secure})"
            );
            next[s as usize] += 1;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(router.stats().messages_out, SENDERS as u64 * EACH as u64);
    }
}

/// Fills what a ROUTER holds for a peer that never reads, by `try_send`s of small
/// messages (the kind a sender may write itself), until one is refused; returns how many
/// were taken and why the last was refused.
fn fill(router: &Router, id: &[u8]) -> (usize, SendError) {
    let msg = Message::from(Bytes::from(vec![7u8; 10_000]));
    for taken in 0..100_000 {
        if let Err(e) = router.try_send(id, msg.clone()) {
            return (taken, e);
        }
    }
    panic!("never refused");
}

/// Fills until the kernel's buffers for that connection have stopped growing (loopback
/// TCP autotunes them to megabytes while the connection's task drains the queue into
/// them): done when a fill finds the queue still full from the one before.
async fn fill_to_the_brim(router: &Router, id: &[u8]) -> SendError {
    for _ in 0..10_000 {
        let (taken, e) = fill(router, id);
        if taken == 0 {
            return e;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }
    panic!("the connection never stopped taking");
}

/// A peer that never reads holds at most its own queue's bound (plus one message) of our
/// memory, whether its messages were written by their senders or by the connection's task,
/// and all of it comes back to the socket's shared total when it is dropped: a second
/// such peer can then fill its own bound where, before, the total stopped it.
#[tokio::test]
async fn a_peer_that_never_reads_holds_its_bound_and_gives_it_back_when_dropped() {
    init_tracing();
    let bound = 256 << 10;
    let opts = test_opts()
        .with_send_queue_bytes(bound)
        .with_send_queue_total_bytes(bound + bound / 8);
    let router = Router::bind("tcp://127.0.0.1:0", opts).await.unwrap();
    let mut first = RawPeer::connect(router.local_addr()).await;
    first.handshake("DEALER").await;
    wait_until("first attached", || router.peers().len() == 1).await;
    let a = router.peers()[0].identity.clone();
    let e = fill_to_the_brim(&router, &a).await;
    assert!(matches!(e, SendError::QueueFull { .. }), "{e:?}");
    let held = router.peers()[0].queued_bytes;
    assert!(held >= bound && held <= bound + 10_000, "holds {held}");

    let mut second = RawPeer::connect(router.local_addr()).await;
    second.handshake("DEALER").await;
    wait_until("second attached", || router.peers().len() == 2).await;
    let b = router
        .peers()
        .into_iter()
        .find(|p| p.identity != a)
        .unwrap()
        .identity;
    // While the first holds its bound, the total stops the second early.
    let e = fill_to_the_brim(&router, &b).await;
    assert!(matches!(e, SendError::BudgetSpent { .. }), "{e:?}");
    assert!(router.drop_peer(&a));
    wait_until("first gone", || router.peers().len() == 1).await;
    // Everything the first held is back: the second now reaches its own bound.
    let e = fill_to_the_brim(&router, &b).await;
    assert!(matches!(e, SendError::QueueFull { .. }), "{e:?}");
    let held = router.peers()[0].queued_bytes;
    assert!(held >= bound && held <= bound + 10_000, "holds {held}");
    assert!(
        router.stats().dropped > 0,
        "what the first held was counted as dropped"
    );
    drop((first, second));
}

/// `try_send` from a thread outside the runtime: the sender writes itself when it can,
/// and what the socket does not take is finished by the connection's task, which the
/// sender wakes. Every message arrives, whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_send_from_a_plain_thread_delivers_everything_in_order() {
    init_tracing();
    let router = std::sync::Arc::new(
        Router::bind("tcp://127.0.0.1:0", test_opts())
            .await
            .unwrap(),
    );
    // Takes few messages before it stops reading: the socket fills now and then.
    let dealer = Dealer::connect(
        ep(router.local_addr()),
        test_opts().with_recv_queue_messages(4),
    )
    .unwrap();
    dealer.send(msg(&[b"hi"])).await.unwrap();
    let (id, _) = within("hello", router.recv()).await.unwrap();
    const N: u32 = 3000;
    let r = router.clone();
    let sender = std::thread::spawn(move || {
        for seq in 0..N {
            let m = tagged(9, seq, [20, 3000, 12_000][seq as usize % 3]);
            loop {
                match r.try_send(&id, m.clone()) {
                    Ok(()) => break,
                    Err(SendError::QueueFull { .. }) => std::thread::yield_now(),
                    Err(e) => panic!("{e}"),
                }
            }
        }
    });
    // Not reading until the socket is full and messages wait in the queue: the write
    // that filled it was, as often as not, one a sender made itself and could only
    // finish in part.
    wait_until("messages queued behind a full socket", || {
        router.peers().iter().any(|p| p.queued_messages > 0)
    })
    .await;
    for seq in 0..N {
        let m = within("dealer recv", dealer.recv()).await.unwrap();
        assert_eq!(untag(&m), (9, seq));
    }
    sender.join().unwrap();
}
