//! The node runtime over loopback, several nodes in one process: every interaction
//! style, its errors, and what happens when peers fail.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use peerwire::codec::{self, codes, Header, Id, Kind, Version};
use peerwire::node::{CallError, CallOptions, GatherEnd, GatherOptions, HandlerError, Node};
use peerwire::transport::{Dealer, Message};
use serde::{Deserialize, Serialize};
use support::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CreateOrder {
    item: String,
    qty: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderCreated {
    id: u64,
    item: String,
}

const V1: Version = Version::new(1, 0);

fn order(item: &str, qty: u32) -> CreateOrder {
    CreateOrder {
        item: item.into(),
        qty,
    }
}

async fn orders_server() -> Node {
    let server = start_node("orders", &[]).await;
    server.handle(
        "orders.create",
        Version::new(1, 2),
        |req: CreateOrder, _ctx| async move {
            if req.qty == 0 {
                return Err(HandlerError::new(
                    "invalid_qty",
                    "quantity must be positive",
                ));
            }
            if req.item == "boom" {
                panic!("the handler exploded");
            }
            if req.item == "slow" {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            Ok(OrderCreated {
                id: req.qty as u64 * 10,
                item: req.item,
            })
        },
    );
    server
}

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
async fn publish_subscribe_with_prefixes_and_sequence_gaps() {
    init_tracing();
    let publisher = start_node("pub", &[]).await;
    let a = start_node("sub-a", &[publisher.endpoint()]).await;
    let b = start_node("sub-b", &[publisher.endpoint()]).await;
    let mut orders_a = a.subscribe::<OrderCreated>("orders.");
    let mut all_b = b.subscribe::<serde_json::Value>("");
    wait_until("both subscribed", || {
        publisher.subscribers_of("orders.created").len() == 2
    })
    .await;

    publisher
        .publish(
            "orders.created",
            &OrderCreated {
                id: 1,
                item: "book".into(),
            },
        )
        .unwrap();
    publisher
        .publish("stock.low", &serde_json::json!({"item": "book"}))
        .unwrap();
    publisher
        .publish(
            "orders.created",
            &OrderCreated {
                id: 2,
                item: "pen".into(),
            },
        )
        .unwrap();

    let e1 = within("a1", orders_a.recv()).await.unwrap().unwrap();
    let e2 = within("a2", orders_a.recv()).await.unwrap().unwrap();
    assert_eq!((e1.value.id, e1.seq, e2.value.id, e2.seq), (1, 1, 2, 2));
    assert_eq!((e1.missed, e2.missed), (0, 0));
    assert_eq!(e1.publisher, publisher.id());
    let mut topics = Vec::new();
    for _ in 0..3 {
        topics.push(within("b", all_b.recv()).await.unwrap().unwrap().topic);
    }
    assert_eq!(topics, ["orders.created", "stock.low", "orders.created"]);

    // Overflow a subscription that is not being read: the gaps say how many were lost.
    let total = 10_000u64;
    for i in 0..total {
        publisher
            .publish(
                "orders.created",
                &OrderCreated {
                    id: i,
                    item: "x".into(),
                },
            )
            .unwrap();
    }
    // Nobody reads yet, so the 4096-event subscription queue must overflow.
    wait_until("local overflow", || a.stats().events_dropped > 0).await;
    // Once the burst is out, markers follow until one gets through (a marker arriving
    // while the queue is still full is itself dropped, and counted, like any event).
    let publisher = Arc::new(publisher);
    let p2 = publisher.clone();
    let marker = tokio::spawn(async move {
        loop {
            p2.publish(
                "orders.created",
                &OrderCreated {
                    id: u64::MAX,
                    item: "marker".into(),
                },
            )
            .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut received = 0u64;
    let mut missed = 0u64;
    let last_seq = loop {
        let e = within("event after overflow", orders_a.recv())
            .await
            .unwrap()
            .unwrap();
        received += 1;
        missed += e.missed;
        if e.value.item == "marker" {
            break e.seq;
        }
    };
    marker.abort();
    assert_eq!(
        received + missed,
        last_seq - 2,
        "every event is either received or counted as missed"
    );
    let total = received + missed;
    assert!(missed > 0, "the subscription queue must have overflowed");
    assert!(total >= 10_000);
    assert_eq!(a.stats().events_dropped, missed);
}

#[tokio::test]
async fn gather_collects_until_all_answer_quorum_or_deadline() {
    init_tracing();
    let mut responders = Vec::new();
    for (name, delay_ms) in [
        ("inv-1", 0u64),
        ("inv-2", 10),
        ("inv-3", 20),
        ("inv-slow", 5000),
    ] {
        let n = start_node(name, &[]).await;
        let label = name.to_string();
        n.handle_gather("stock.check", V1, move |item: String, _| {
            let label = label.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                Ok(format!("{label} has {item}"))
            }
        });
        responders.push(n);
    }
    let asker = start_node(
        "asker",
        &responders.iter().map(|r| r.endpoint()).collect::<Vec<_>>(),
    )
    .await;
    wait_until("all responders known and subscribed", || {
        asker.subscribers_of("stock.check").len() == 4
    })
    .await;
    wait_until("catalogs known", || {
        asker
            .peers()
            .iter()
            .filter(|p| p.gathers.contains_key("stock.check"))
            .count()
            == 4
    })
    .await;

    // Deadline: three answer, the slow one stays silent and is named.
    let g = asker
        .gather::<_, String>(
            "stock.check",
            "book",
            GatherOptions::within(Duration::from_millis(700)),
        )
        .await
        .unwrap();
    assert_eq!(g.expected().len(), 4);
    let out = within("gather", g.finish()).await;
    assert_eq!(out.end, GatherEnd::Deadline);
    assert_eq!(out.replies.len(), 3);
    assert!(out
        .replies
        .iter()
        .all(|r| r.result.as_ref().unwrap().ends_with("has book")));
    assert_eq!(
        out.silent
            .iter()
            .map(|(_, n)| n.as_str())
            .collect::<Vec<_>>(),
        ["inv-slow"]
    );

    // Quorum: done after two replies, well before the deadline.
    let started = std::time::Instant::now();
    let g = asker
        .gather::<_, String>(
            "stock.check",
            "pen",
            GatherOptions::within(Duration::from_secs(8)).quorum(2),
        )
        .await
        .unwrap();
    let out = within("quorum", g.finish()).await;
    assert_eq!(out.end, GatherEnd::Quorum);
    assert_eq!(out.replies.len(), 2);
    assert!(started.elapsed() < Duration::from_secs(4));

    // All answered: without the slow one, it ends as soon as the last reply is in.
    responders.pop().unwrap().shutdown().await;
    wait_until("slow one gone", || {
        asker.subscribers_of("stock.check").len() == 3
    })
    .await;
    let started = std::time::Instant::now();
    let g = asker
        .gather::<_, String>(
            "stock.check",
            "ink",
            GatherOptions::within(Duration::from_secs(8)),
        )
        .await
        .unwrap();
    let out = within("all answered", g.finish()).await;
    assert_eq!(out.end, GatherEnd::AllAnswered);
    assert!(out.silent.is_empty());
    assert!(started.elapsed() < Duration::from_secs(4));

    assert!(matches!(
        asker
            .gather::<_, String>(
                "nobody.listens",
                "x",
                GatherOptions::within(Duration::from_secs(1))
            )
            .await,
        Err(CallError::NoResponder(_))
    ));
}

#[tokio::test]
async fn peer_killed_and_restarted_mid_stream() {
    init_tracing();
    let server = start_node("echo-1", &[]).await;
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    server.handle("echo.echo", V1, move |x: u64, _| {
        let counter = counter.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(x)
        }
    });
    let endpoint = server.endpoint();
    let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let client = Arc::new(start_node("client", std::slice::from_ref(&endpoint)).await);
    wait_service(&client, "echo.echo", 1).await;

    // A stream of calls, each either succeeding or failing with a clear error; never hanging.
    let c = client.clone();
    let stream = tokio::spawn(async move {
        let (mut ok, mut failed) = (0, 0);
        for i in 0..400u64 {
            match c
                .request_with::<_, u64>(
                    "echo.echo",
                    &i,
                    CallOptions::timeout(Duration::from_secs(2)),
                )
                .await
            {
                Ok(v) => {
                    assert_eq!(v, i);
                    ok += 1
                }
                Err(
                    CallError::Disconnected(_)
                    | CallError::NoResponder(_)
                    | CallError::Timeout { .. },
                ) => {
                    failed += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        (ok, failed)
    });
    // Kill it once calls are flowing, restart it once the client has noticed.
    wait_until("some calls done", || served.load(Ordering::SeqCst) >= 20).await;
    drop(server); // killed: no drain, sockets closed at once
    wait_until("client saw the loss", || {
        client
            .peers()
            .iter()
            .all(|p| p.name != "echo-1" || !p.connected)
    })
    .await;
    let restarted = Node::builder("echo-2")
        .router_port(port)
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    restarted.handle("echo.echo", V1, |x: u64, _| async move { Ok(x) });
    let (ok, failed) = within_for(Duration::from_secs(60), "call stream", stream)
        .await
        .unwrap();
    assert!(ok > 0 && failed > 0, "ok {ok}, failed {failed}");
    // After the restart, calls go to the new instance.
    wait_until("new instance known", || {
        client
            .peers()
            .iter()
            .any(|p| p.name == "echo-2" && p.connected)
    })
    .await;
    assert_eq!(
        client.request::<_, u64>("echo.echo", &7u64).await.unwrap(),
        7
    );
    assert!(
        client.peers().iter().all(|p| p.name != "echo-1"),
        "the dead node left the table"
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
async fn one_seed_leads_to_the_whole_cluster() {
    init_tracing();
    let seed = start_node("seed", &[]).await;
    let b = start_node("b", &[seed.endpoint()]).await;
    b.handle("b.hello", V1, |_: (), _| async { Ok("from b") });
    let c = start_node("c", &[seed.endpoint()]).await;
    // c was only given the seed; gossip brings it b (and b learns of c).
    wait_service(&c, "b.hello", 1).await;
    assert_eq!(
        c.request::<_, String>("b.hello", &()).await.unwrap(),
        "from b"
    );
    wait_until("b knows c", || b.peers().iter().any(|p| p.name == "c")).await;
    // A node of another cluster is ignored.
    let other = Node::builder("stranger")
        .cluster("elsewhere")
        .peer(seed.endpoint())
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    wait_until("stranger refused", || seed.stats().other_cluster > 0).await;
    assert!(seed.peers().iter().all(|p| p.name != "stranger"));
    drop(other);
}

#[tokio::test]
async fn gather_ignores_bystanders_without_a_handler() {
    init_tracing();
    let responder = start_node("responder", &[]).await;
    responder.handle_gather("census.count", V1, |_: (), _| async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(1u32)
    });
    let asker = start_node("asker", &[responder.endpoint()]).await;
    // A bystander subscribed to every topic (for events) also receives the request.
    let bystander = start_node("bystander", &[asker.endpoint()]).await;
    let _all = bystander.subscribe::<serde_json::Value>("");
    wait_until("both subscribed", || {
        asker.subscribers_of("census.count").len() == 2
    })
    .await;
    wait_until("catalog", || {
        asker
            .peers()
            .iter()
            .any(|p| p.gathers.contains_key("census.count"))
    })
    .await;
    let g = asker
        .gather::<_, u32>(
            "census.count",
            &(),
            GatherOptions::within(Duration::from_secs(5)).quorum(1),
        )
        .await
        .unwrap();
    assert_eq!(g.expected().len(), 1, "only the responder is expected");
    let out = within("gather", g.finish()).await;
    assert_eq!(out.end, GatherEnd::Quorum);
    assert_eq!(out.replies.len(), 1);
    assert_eq!(out.replies[0].name, "responder");
    assert_eq!(out.replies[0].result, Ok(1));
}

#[tokio::test]
async fn handler_concurrency_is_bounded_and_excess_requests_wait_their_turn() {
    init_tracing();
    let server = Node::builder("bounded")
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

#[tokio::test]
async fn presence_streams_joins_updates_and_leaves() {
    let a = start_node("a", &[]).await;
    let watcher = start_node("watcher", &[a.endpoint()]).await;
    let mut presence = watcher.presence();
    use peerwire::node::{Presence, PresenceEvent};
    async fn next(p: &mut Presence) -> PresenceEvent {
        within("a presence event", p.next())
            .await
            .expect("stream open")
    }
    match next(&mut presence).await {
        PresenceEvent::Joined(p) => assert_eq!(p.name, "a"),
        other => panic!("{other:?}"),
    }
    // A new handler on `a` reaches the watcher as an update of its catalog.
    a.handle("a.ping", V1, |_: (), _| async { Ok(()) });
    match next(&mut presence).await {
        PresenceEvent::Updated(p) => assert!(p.methods.contains_key("a.ping")),
        other => panic!("{other:?}"),
    }
    // A second stream starts with a snapshot of who is there now.
    let mut late = watcher.presence();
    assert!(matches!(next(&mut late).await, PresenceEvent::Joined(p) if p.name == "a"));
    a.shutdown().await;
    match next(&mut presence).await {
        PresenceEvent::Left { peer, reason } => {
            assert_eq!(peer.name, "a");
            assert!(!reason.is_empty());
        }
        other => panic!("{other:?}"),
    }
    watcher.shutdown().await;
}

#[tokio::test]
async fn a_dns_seed_finds_its_peers() {
    let server = orders_server().await;
    let port = server
        .endpoint()
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let client = Node::builder("client")
        .socket_options(test_opts())
        .dns(format!("localhost:{port}").parse().unwrap())
        .dns_every(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    wait_service(&client, "orders.create", 1).await;
    let created: OrderCreated = client
        .request("orders.create", &order("dns", 1))
        .await
        .unwrap();
    assert_eq!(created.item, "dns");
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn mdns_with_no_usable_interface_is_a_clear_error() {
    let err = Node::builder("x")
        .mdns(peerwire::discovery::MdnsConfig::interfaces(["no-such-if0"]))
        .start()
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("no usable interface"), "{err}");
}

/// No `Left` event for any peer within `bound`.
async fn no_leave(p: &mut peerwire::node::Presence, bound: Duration) {
    use peerwire::node::PresenceEvent;
    let _ = tokio::time::timeout(bound, async {
        while let Some(e) = p.next().await {
            if let PresenceEvent::Left { peer, reason } = e {
                panic!("{} left: {reason}", peer.name);
            }
        }
    })
    .await;
}

#[tokio::test]
async fn replicas_with_one_name_are_all_kept() {
    // Two live instances called "orders" on one host are replicas, not a restart. They
    // introduce themselves to the client (on its ROUTER) before the client's own
    // connections to them are up: that is when a replica could pass for a restart.
    for _ in 0..5 {
        let client = start_node("client", &[]).await;
        let a = Node::builder("orders")
            .socket_options(test_opts())
            .peer(client.endpoint())
            .start();
        let b = Node::builder("orders")
            .socket_options(test_opts())
            .peer(client.endpoint())
            .start();
        let (a, b) = tokio::join!(a, b);
        let (a, b) = (a.unwrap(), b.unwrap());
        let mut p = client.presence();
        wait_until("both replicas connected", || {
            client
                .peers()
                .iter()
                .filter(|p| p.name == "orders" && p.connected)
                .count()
                == 2
        })
        .await;
        no_leave(&mut p, Duration::from_millis(200)).await;
        assert_eq!(client.peers().len(), 2);
        client.shutdown().await;
        a.shutdown().await;
        b.shutdown().await;
    }
}
