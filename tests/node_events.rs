//! The node runtime over loopback: publish/subscribe (prefixes, sequence gaps) and
//! publish/async responses (gather: all answered, quorum, deadline, bystanders).

mod support;

use std::sync::Arc;
use std::time::Duration;

use peerwire::codec::{self, Header, Id, Kind};
use peerwire::node::{CallError, GatherEnd, GatherOptions, MembershipLimits, Node, Rate};
use peerwire::transport::{Dealer, Message};
use support::orders::*;
use support::*;

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
async fn a_handler_publishes_through_a_publishing_handle() {
    init_tracing();
    let server = start_node("server", &[]).await;
    let events = server.publishing();
    server.handle("orders.create", V1, move |o: CreateOrder, _| {
        let report = events.publish(
            "orders.created",
            &OrderCreated {
                id: 7,
                item: o.item.clone(),
            },
        );
        async move {
            report.map_err(|e| peerwire::HandlerError::new("publish_failed", e.to_string()))?;
            Ok(OrderCreated {
                id: 7,
                item: o.item,
            })
        }
    });
    let client = start_node("client", &[server.endpoint()]).await;
    let mut created = client.subscribe::<OrderCreated>("orders.");
    wait_until("subscribed", || {
        server.subscribers_of("orders.created").len() == 1
    })
    .await;
    let _: OrderCreated = client
        .request("orders.create", &order("book", 1))
        .await
        .unwrap();
    let e = within("event", created.recv()).await.unwrap().unwrap();
    assert_eq!((e.value.item.as_str(), e.publisher), ("book", server.id()));
    // Once the node has stopped, publishing through the handle says so.
    let handle = server.publishing();
    server.shutdown().await;
    assert!(matches!(
        handle.publish("orders.created", &1u8),
        Err(CallError::Shutdown)
    ));
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
    wait_gatherable(&asker, "census.count", 2).await;
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

/// A client connection introducing itself (HELLO) and waiting for the HELLO-ACK, then
/// leaving: what short-lived CLI clients do. Of another cluster, so that the node does
/// not dial it back.
async fn hello_and_leave(endpoint: &str) {
    let d = Dealer::connect(endpoint, test_opts()).unwrap();
    let hello = codec::Hello {
        node_id: Id::new(),
        name: "passer-by".into(),
        cluster: "elsewhere".into(),
        ..Default::default()
    };
    let h = Header::new(Kind::Hello, hello.node_id, "");
    let env = codec::Envelope {
        header: h,
        payload: codec::encode_payload(&hello).unwrap(),
    };
    d.send(Message::from_frames(env.to_frames())).await.unwrap();
    let ack = within("HELLO-ACK", d.recv()).await.unwrap();
    let ack = codec::Envelope::from_frames(ack.frames()).unwrap();
    assert_eq!(ack.header.kind, Kind::HelloAck);
    d.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gather_replies_survive_connection_churn() {
    // Which node introduced itself on which connection is what lets a gather reply be
    // believed. More short-lived connections than that record once held (it was wiped
    // whole at 4096) must not make a real responder "silent".
    init_tracing();
    let responder = start_node("responder", &[]).await;
    responder.handle_gather("census.count", V1, |_: (), _| async { Ok(1u32) });
    // Thousands of HELLOs a second from one address: far past the default HELLO rate,
    // which this test is not about.
    let mut limits = MembershipLimits::default();
    limits.hellos_per_source = Rate::new(1e6, 1e6);
    let asker = Node::builder("asker")
        .insecure()
        .peer(responder.endpoint())
        .limits(limits)
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    wait_gatherable(&asker, "census.count", 1).await;
    let endpoint = asker.endpoint();
    for _ in 0..5000 / 50 {
        let batch = (0..50).map(|_| hello_and_leave(&endpoint));
        futures_util::future::join_all(batch).await;
    }
    assert!(asker.stats().other_cluster >= 5000);
    let g = asker
        .gather::<_, u32>(
            "census.count",
            &(),
            GatherOptions::within(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    let out = within("gather", g.finish()).await;
    assert_eq!(out.end, GatherEnd::AllAnswered, "silent: {:?}", out.silent);
    assert_eq!(out.replies[0].result, Ok(1));
}
