//! The node runtime over loopback, several nodes in one process: request/response,
//! asynchronous requests, notifications, their errors, backpressure and shutdown.
//! (`node_events.rs`: publish/subscribe and gather; `node_peers.rs`: peers failing,
//! joining and leaving.)

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use peerwire::codec::{self, codes, Header, Id, Kind, Version};
use peerwire::node::{CallError, CallOptions, Node};
use peerwire::transport::{Dealer, Message};
use support::orders::*;
use support::*;

#[tokio::test]
async fn request_response_typed_with_errors_and_panics() {
    init_tracing();
    let server = orders_server().await;
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "orders.create", 1).await;

    let ok: OrderCreated = client
        .request("orders.create", &order("book", 2))
        .await
        .unwrap();
    assert_eq!(
        ok,
        OrderCreated {
            id: 20,
            item: "book".into()
        }
    );

    let err = client
        .request::<_, OrderCreated>("orders.create", &order("book", 0))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CallError::Remote {
            code: "invalid_qty".into(),
            message: "quantity must be positive".into()
        }
    );

    let err = client
        .request::<_, OrderCreated>("orders.create", &order("boom", 1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CallError::Remote { code, message } if code == codes::HANDLER_PANICKED && message.contains("exploded")),
        "{err}"
    );
    // The node goes on after the panic.
    let ok: OrderCreated = client
        .request("orders.create", &order("pen", 1))
        .await
        .unwrap();
    assert_eq!(ok.item, "pen");

    // A reply that does not decode as the caller's type.
    let err = client
        .request::<_, String>("orders.create", &order("pen", 1))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Codec(_)), "{err}");
    // A request that does not decode as the handler's type.
    let err = client
        .request::<_, OrderCreated>("orders.create", &"not an order")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CallError::Remote { code, .. } if code == codes::BAD_REQUEST),
        "{err}"
    );
}

#[tokio::test]
async fn versions_no_responder_and_timeouts() {
    init_tracing();
    let server = orders_server().await;
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "orders.create", 1).await;
    let book = order("book", 1);

    // Compatible: 1.2 serves 1.0 and 1.2; not 1.3 nor 2.0. Refused at once, locally.
    for ok in [Version::new(1, 0), Version::new(1, 2)] {
        let _: OrderCreated = client
            .request_with(
                "orders.create",
                &book,
                CallOptions::default().with_version(ok),
            )
            .await
            .unwrap();
    }
    for bad in [Version::new(1, 3), Version::new(2, 0)] {
        let err = within(
            "refusal",
            client.request_with::<_, OrderCreated>(
                "orders.create",
                &book,
                CallOptions::default().with_version(bad),
            ),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, CallError::IncompatibleVersion { available, .. } if available == Version::new(1, 2)),
            "{err}"
        );
    }

    // No responder: fails at once, not after the timeout.
    let started = std::time::Instant::now();
    let err = client
        .request_with::<_, OrderCreated>(
            "billing.charge",
            &book,
            CallOptions::timeout(Duration::from_secs(30)),
        )
        .await
        .unwrap_err();
    assert_eq!(err, CallError::NoResponder("billing.charge".into()));
    assert!(started.elapsed() < Duration::from_secs(5));

    // Timeout: the handler takes 3 s, the caller allows 200 ms.
    let err = client
        .request_with::<_, OrderCreated>(
            "orders.create",
            &order("slow", 1),
            CallOptions::timeout(Duration::from_millis(200)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout { .. }), "{err}");
    assert_eq!(client.pending_calls(), 0);
}

#[tokio::test]
async fn ten_thousand_async_requests_in_flight() {
    init_tracing();
    let server = start_node("square", &[]).await;
    server.handle("math.square", V1, |x: u64, _| async move { Ok(x * x) });
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "math.square", 1).await;
    let mut handles = Vec::with_capacity(10_000);
    for i in 0..10_000u64 {
        handles.push(
            client
                .request_async_with::<_, u64>(
                    "math.square",
                    &i,
                    CallOptions::timeout(Duration::from_secs(60)),
                )
                .await
                .unwrap(),
        );
    }
    assert!(client.pending_calls() > 0);
    for (i, h) in handles.into_iter().enumerate() {
        let i = i as u64;
        assert_eq!(within("reply", h.recv()).await.unwrap(), i * i);
    }
    assert_eq!(client.pending_calls(), 0);
}

#[tokio::test]
async fn dropping_a_handle_frees_its_entry_and_polling_works() {
    init_tracing();
    let server = start_node("sleepy", &[]).await;
    server.handle("sleepy.wait", V1, |ms: u64, _| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(ms)
    });
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "sleepy.wait", 1).await;
    let mut handles = Vec::new();
    for _ in 0..100 {
        handles.push(
            client
                .request_async::<_, u64>("sleepy.wait", &2000u64)
                .await
                .unwrap(),
        );
    }
    assert_eq!(client.pending_calls(), 100);
    drop(handles);
    assert_eq!(
        client.pending_calls(),
        0,
        "dropped handles leave nothing behind"
    );

    let mut h = client
        .request_async::<_, u64>("sleepy.wait", &50u64)
        .await
        .unwrap();
    assert!(h.try_recv().is_none(), "not yet");
    let got = within("poll", async {
        loop {
            if let Some(r) = h.try_recv() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(got.unwrap(), 50);
}

#[tokio::test]
async fn notification_reaches_exactly_one_instance() {
    init_tracing();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(parking_lot::Mutex::new(Vec::<u32>::new()));
    let mut servers = Vec::new();
    for name in ["mailer-a", "mailer-b"] {
        let n = start_node(name, &[]).await;
        let (count, seen) = (count.clone(), seen.clone());
        n.handle("mail.send", V1, move |x: u32, _| {
            let (count, seen) = (count.clone(), seen.clone());
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                seen.lock().push(x);
                Ok(())
            }
        });
        servers.push(n);
    }
    let client = start_node(
        "client",
        &servers.iter().map(|s| s.endpoint()).collect::<Vec<_>>(),
    )
    .await;
    wait_service(&client, "mail.send", 2).await;
    for i in 0..100u32 {
        client.notify("mail.send", &i).await.unwrap();
    }
    wait_until("all notifications handled", || {
        count.load(Ordering::SeqCst) == 100
    })
    .await;
    let mut s = seen.lock().clone();
    s.sort();
    assert_eq!(
        s,
        (0..100).collect::<Vec<_>>(),
        "each delivered exactly once"
    );
    assert_eq!(
        client.notify("nobody.home", &1).await,
        Err(CallError::NoResponder("nobody.home".into()))
    );
}

#[tokio::test]
async fn malformed_envelopes_are_dropped_or_answered() {
    init_tracing();
    let server = orders_server().await;
    let raw = Dealer::connect(server.endpoint(), test_opts()).unwrap();
    // Garbage: one frame, and a header that is not MessagePack. Dropped and counted.
    raw.send(Message::from("just one frame")).await.unwrap();
    raw.send(Message::from_frames(vec![
        Bytes::from_static(b"\xc1\xc1"),
        Bytes::new(),
    ]))
    .await
    .unwrap();
    wait_until("counted", || server.stats().malformed == 2).await;

    // A newer major version: answered with an error reply, not a crash.
    let mut h = Header::new(Kind::Request, Id::new(), "orders.create");
    h.version = 9;
    let env = codec::Envelope {
        header: h.clone(),
        payload: codec::encode_payload(&1).unwrap(),
    };
    raw.send(Message::from_frames(env.to_frames()))
        .await
        .unwrap();
    let reply = within("error reply", raw.recv()).await.unwrap();
    let back = codec::Envelope::from_frames(reply.frames()).unwrap();
    assert_eq!(back.header.kind, Kind::ErrorReply);
    assert_eq!(back.header.correlation_id, h.id);
    let body: codec::ErrorBody = codec::decode_payload(&back.payload).unwrap();
    assert_eq!(body.code, codes::UNSUPPORTED_VERSION);

    // An unknown kind from a newer node: answered too.
    let mut h = Header::new(Kind::Unknown(77), Id::new(), "orders.create");
    h.version = codec::VERSION_MAJOR;
    raw.send(Message::from_frames(
        codec::Envelope {
            header: h,
            payload: Bytes::new(),
        }
        .to_frames(),
    ))
    .await
    .unwrap();
    let reply = within("error reply", raw.recv()).await.unwrap();
    let body: codec::ErrorBody = codec::decode_payload(
        &codec::Envelope::from_frames(reply.frames())
            .unwrap()
            .payload,
    )
    .unwrap();
    assert_eq!(body.code, codes::UNSUPPORTED_KIND);

    // And the node still serves a real client.
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "orders.create", 1).await;
    let ok: OrderCreated = client
        .request("orders.create", &order("x", 1))
        .await
        .unwrap();
    assert_eq!(ok.id, 10);
}

#[tokio::test]
async fn shutdown_drains_in_flight_work() {
    init_tracing();
    let server = start_node("drain", &[]).await;
    let started = Arc::new(AtomicUsize::new(0));
    let s2 = started.clone();
    server.handle("work.do", V1, move |ms: u64, _| {
        let s2 = s2.clone();
        async move {
            s2.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(ms)
        }
    });
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "work.do", 1).await;
    let h = client
        .request_async::<_, u64>("work.do", &300u64)
        .await
        .unwrap();
    wait_until("handler started", || started.load(Ordering::SeqCst) == 1).await;
    within("shutdown", server.shutdown()).await;
    // The handler in flight finished and its reply went out before the sockets closed.
    assert_eq!(within("drained reply", h.recv()).await.unwrap(), 300);
}

#[tokio::test]
async fn handler_concurrency_is_bounded_and_excess_requests_wait_their_turn() {
    init_tracing();
    let server = Node::builder("bounded")
        .insecure()
        .max_in_flight(2)
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    server.handle("slow.op", V1, move |x: u32, _| {
        let (r, p) = (r.clone(), p.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            r.fetch_sub(1, Ordering::SeqCst);
            Ok(x)
        }
    });
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "slow.op", 1).await;
    let mut handles = Vec::new();
    for i in 0..20u32 {
        handles.push(client.request_async::<_, u32>("slow.op", &i).await.unwrap());
    }
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(within("reply", h.recv()).await.unwrap(), i as u32);
    }
    assert!(
        peak.load(Ordering::SeqCst) <= 2,
        "peak {}",
        peak.load(Ordering::SeqCst)
    );
    assert_eq!(peak.load(Ordering::SeqCst), 2, "the two slots were used");
}

#[tokio::test]
async fn a_handler_panicking_before_its_future_is_caught_too() {
    init_tracing();
    let server = start_node("eager", &[]).await;
    // The closure itself panics (indexing an empty list) before returning a future.
    server.handle("list.first", V1, |v: Vec<u32>, _| {
        let first = v[0];
        async move { Ok(first) }
    });
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "list.first", 1).await;
    for _ in 0..3 {
        let err = client
            .request::<_, u32>("list.first", &Vec::<u32>::new())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CallError::Remote { code, .. } if code == codes::HANDLER_PANICKED),
            "{err}"
        );
    }
    assert_eq!(
        client
            .request::<_, u32>("list.first", &vec![7u32])
            .await
            .unwrap(),
        7
    );
}

/// A handler that awaits for ever and reports when its future is dropped, and (through
/// a task it spawned) when its context says the caller gave up.
fn never_ending(
    node: &Node,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<std::time::Instant>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    struct Dropped(tokio::sync::mpsc::UnboundedSender<std::time::Instant>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.send(std::time::Instant::now());
        }
    }
    let (dropped_tx, dropped) = tokio::sync::mpsc::unbounded_channel();
    let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
    node.handle("slow.forever", V1, move |_: (), ctx| {
        let guard = Dropped(dropped_tx.clone());
        let seen_tx = seen_tx.clone();
        async move {
            let watcher = ctx.clone();
            tokio::spawn(async move {
                watcher.cancelled().await;
                let _ = seen_tx.send(());
            });
            let _guard = guard;
            std::future::pending::<()>().await;
            Ok(())
        }
    });
    (dropped, seen)
}

#[tokio::test]
async fn a_caller_giving_up_stops_the_handler() {
    init_tracing();
    let server = orders_server().await;
    let (mut dropped, mut seen) = never_ending(&server);
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "slow.forever", 1).await;

    // The deadline passes: the caller gives up, and says so.
    let got = client
        .request_with::<_, ()>(
            "slow.forever",
            &(),
            CallOptions::timeout(Duration::from_millis(200)),
        )
        .await;
    let gave_up = std::time::Instant::now();
    assert!(matches!(got, Err(CallError::Timeout { .. })), "{got:?}");
    let at = within("the handler dropped", dropped.recv()).await.unwrap();
    within("the handler's context cancelled", seen.recv())
        .await
        .unwrap();
    let late = at.saturating_duration_since(gave_up);
    eprintln!("handler dropped {late:?} after the caller's deadline");
    assert!(late < Duration::from_millis(500), "{late:?}");

    // (Stopped by whichever came first: the CANCEL, or the callee's own deadline.)
    let before = server.stats().cancelled;

    // The handle of an asynchronous request is dropped: the same.
    let pending = client
        .request_async_with::<_, ()>(
            "slow.forever",
            &(),
            CallOptions::timeout(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    // The CANCEL follows the request on the same connection, so it finds it running.
    let dropped_at = std::time::Instant::now();
    drop(pending);
    let at = within("the handler dropped", dropped.recv()).await.unwrap();
    eprintln!(
        "handler dropped {:?} after its handle",
        at.saturating_duration_since(dropped_at)
    );
    within("its context cancelled", seen.recv()).await.unwrap();
    assert_eq!(server.stats().cancelled, before + 1);

    // A call that completes sends no CANCEL.
    let created: OrderCreated = client
        .request("orders.create", &order("book", 1))
        .await
        .unwrap();
    assert_eq!(created.item, "book");
    assert_eq!(server.stats().cancelled, before + 1);
}

#[tokio::test]
async fn a_handler_s_calls_inherit_its_deadline() {
    init_tracing();
    // C records the deadline each request brings.
    let c = start_node("c", &[]).await;
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    c.handle("deadline.seen", V1, move |_: (), ctx| {
        let _ = tx.send(ctx.deadline);
        async { Ok(()) }
    });
    // B's handler calls C with no timeout of its own (the node's default is 5 s).
    let b = Arc::new(start_node("b", &[c.endpoint()]).await);
    wait_service(&b, "deadline.seen", 1).await;
    let weak = Arc::downgrade(&b);
    b.handle("mid.op", V1, move |_: (), _| {
        let weak = weak.clone();
        async move {
            let node = weak.upgrade().expect("b is up");
            node.request::<_, ()>("deadline.seen", &())
                .await
                .map_err(|e| peerwire::HandlerError::new("inner", e.to_string()))
        }
    });
    let a = start_node("a", &[b.endpoint()]).await;
    wait_service(&a, "mid.op", 1).await;
    a.request_with::<_, ()>(
        "mid.op",
        &(),
        CallOptions::timeout(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    // What C was given is what was left of B's 300 ms, not B's default 5 s.
    let dl = within("C's deadline", seen.recv()).await.unwrap().unwrap();
    assert!(
        dl <= Duration::from_millis(300) && dl > Duration::ZERO,
        "{dl:?}"
    );
    // Outside a handler, the default applies.
    b.request::<_, ()>("deadline.seen", &()).await.unwrap();
    let dl = within("C's deadline", seen.recv()).await.unwrap().unwrap();
    assert!(dl > Duration::from_secs(1), "{dl:?}");
}

#[tokio::test]
async fn a_request_whose_deadline_passed_while_queued_is_not_run() {
    init_tracing();
    let server = Node::builder("server")
        .insecure()
        .max_in_flight(1)
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    server.handle("count.me", V1, move |_: (), _| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Ok(()) }
    });
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    server.handle("hold.slot", V1, move |_: (), _| {
        let g = g.clone();
        async move {
            let _ = g.acquire().await;
            Ok(())
        }
    });
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "count.me", 1).await;
    // The one slot is taken; a request with 100 ms to live waits for it longer than that.
    let holder = client
        .request_async_with::<_, ()>(
            "hold.slot",
            &(),
            CallOptions::timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    let late = client
        .request_async_with::<_, ()>(
            "count.me",
            &(),
            CallOptions::timeout(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    assert!(matches!(
        within("the late call's timeout", late.recv()).await,
        Err(CallError::Timeout { .. })
    ));
    // The server counts the deadline from the request's arrival, a little after the
    // client started its clock: let the deadline pass on the server's clock too (time
    // passing is what this test is about).
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.add_permits(1);
    within("the holder", holder.recv()).await.unwrap();
    wait_until("counted as expired", || server.stats().expired == 1).await;
    // `dl: 0` has passed on arrival: not run either.
    let raw = Dealer::connect(server.endpoint(), test_opts()).unwrap();
    let mut h = Header::new(Kind::Request, Id::new(), "count.me");
    h.deadline_ms = Some(0);
    let env = codec::Envelope {
        header: h,
        payload: codec::encode_payload(&()).unwrap(),
    };
    raw.send(Message::from_frames(env.to_frames()))
        .await
        .unwrap();
    wait_until("dl 0 expired", || server.stats().expired == 2).await;
    // A live one still runs.
    client.request::<_, ()>("count.me", &()).await.unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1, "only the live request ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_s_messages_are_handled_in_order_under_backpressure() {
    // With one handler slot and handlers that await, most messages are declined and
    // queued while some go inline: none may overtake an earlier one of its connection.
    init_tracing();
    let server = Node::builder("server")
        .insecure()
        .max_in_flight(1)
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    server.handle("seq.note", V1, move |n: u32, _| {
        let _ = tx.send(n);
        async {
            tokio::task::yield_now().await;
            Ok(())
        }
    });
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "seq.note", 1).await;
    for n in 0..500u32 {
        client.notify("seq.note", &n).await.unwrap();
    }
    for want in 0..500u32 {
        let got = within("the next notification", rx.recv()).await.unwrap();
        assert_eq!(got, want, "handled out of order");
    }
}
