//! Secured nodes (`NodeBuilder::secure`): CURVE on every connection, node ids derived
//! from keys, allow lists, and what an outsider, a plain node and an impostor get.

mod support;

use std::time::Duration;

use peerwire::codec::{self, Header, Id, Kind};
use peerwire::node::{Node, NodeBuilder};
use peerwire::transport::curve::{Curve, CurveKeys};
use peerwire::transport::{Dealer, Message};
use serde_json::{json, Value};
use support::orders::V1;
use support::*;

fn secured(name: &str, keys: &CurveKeys) -> NodeBuilder {
    Node::builder(name)
        .secure(keys.clone())
        .socket_options(test_opts())
}

#[tokio::test]
async fn secured_nodes_find_and_call_each_other_under_ids_their_keys_prove() {
    init_tracing();
    let (ka, kb) = (CurveKeys::generate(), CurveKeys::generate());
    let a = echo_node(secured("a", &ka), "a.echo").await;
    // B knows A's key; A learns B's from B's handshake and dials it back.
    let b = echo_node(
        secured("b", &kb).peer_with_key(a.endpoint(), ka.public()),
        "b.echo",
    )
    .await;
    assert_eq!(a.id(), Id::of_key(&ka.public()));
    assert_eq!(b.id(), Id::of_key(&kb.public()));
    wait_service(&b, "a.echo", 1).await;
    wait_service(&a, "b.echo", 1).await;
    let r: Value = b.request("a.echo", &json!({"n": 1})).await.unwrap();
    assert_eq!(r, json!({"n": 1}));
    let r: Value = a.request("b.echo", &json!("back")).await.unwrap();
    assert_eq!(r, json!("back"));
    // Events too (the SUB dials the PUB with the same key).
    let mut events = b.subscribe::<u32>("tick");
    wait_until("subscribed", || !a.subscribers_of("tick").is_empty()).await;
    a.publish("tick", &7u32).unwrap();
    let e = within("the event", events.recv()).await.unwrap().unwrap();
    assert_eq!((e.value, e.publisher), (7, a.id()));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn an_outsider_a_plain_node_and_an_impostor_learn_nothing() {
    init_tracing();
    let (ka, kb, kc) = (
        CurveKeys::generate(),
        CurveKeys::generate(),
        CurveKeys::generate(),
    );
    // A lets in only B.
    let a = echo_node(secured("a", &ka).allow(kb.public()), "a.echo").await;
    let b = echo_node(
        secured("b", &kb).peer_with_key(a.endpoint(), ka.public()),
        "b.echo",
    )
    .await;
    wait_service(&b, "a.echo", 1).await;

    // C holds a key A does not list: refused in the handshake.
    let c = secured("c", &kc)
        .peer_with_key(a.endpoint(), ka.public())
        .start()
        .await
        .unwrap();
    wait_until("C refused", || {
        a.stats()
            .router
            .violations
            .get("not_authorized")
            .is_some_and(|n| *n >= 1)
    })
    .await;
    // A plain node: refused too (another mechanism).
    let plain = start_node("plain", &[a.endpoint()]).await;
    wait_until("the plain node refused", || {
        a.stats()
            .router
            .violations
            .get("mechanism_mismatch")
            .is_some_and(|n| *n >= 1)
    })
    .await;
    assert!(!c.wait_for_peers(1, Duration::from_millis(300)).await);
    assert!(plain.peers().iter().all(|p| !p.connected));

    // B's key, but a HELLO claiming another node's id: refused and counted, not answered.
    let d = Dealer::connect(
        a.endpoint(),
        test_opts().with_curve(Some(Curve::new(kb.clone()).server_key(ka.public()))),
    )
    .unwrap();
    let before = a.stats().hellos_refused;
    let hello = codec::Hello {
        node_id: Id::of_key(&kc.public()),
        name: "impostor".into(),
        cluster: "default".into(),
        host: "127.0.0.3".into(),
        router_port: 9,
        pub_port: 9,
        ..Default::default()
    };
    send_hello(&d, &hello).await;
    wait_until("the impostor's HELLO refused", || {
        a.stats().hellos_refused > before
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), d.recv())
            .await
            .is_err(),
        "no HELLO-ACK for an impostor"
    );
    assert!(a.peers().iter().all(|p| p.name != "impostor"));

    // The allow list holds both ways: told of C with its key, A still does not dial it
    // (C would hear A's HELLO, its catalog and its peers).
    let a2 = secured("a2", &ka)
        .allow(kb.public())
        .peer_with_key(c.endpoint(), kc.public())
        .start()
        .await
        .unwrap();
    let _ = c.wait_for_peers(1, Duration::from_millis(500)).await;
    assert!(c.peers().is_empty(), "{:?}", c.peers());
    assert!(a2.peers().is_empty());
    // And a list without security is a mistake, refused at start.
    assert!(Node::builder("x")
        .insecure()
        .allow(kb.public())
        .start()
        .await
        .is_err());
    // And no choice at all is refused too: security is never off by omission.
    match Node::builder("x").start().await {
        Err(peerwire::node::NodeError::Config(why)) => {
            assert!(why.contains("no security chosen"), "{why}")
        }
        other => panic!("started without a choice: {:?}", other.map(|n| n.id())),
    }
    for n in [a, a2, b, c, plain] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn one_seed_leads_a_secured_node_to_the_whole_cluster() {
    init_tracing();
    let keys: Vec<CurveKeys> = (0..3).map(|_| CurveKeys::generate()).collect();
    let seed = echo_node(secured("seed", &keys[0]), "seed.echo").await;
    let mut members = Vec::new();
    for (i, k) in keys[1..].iter().enumerate() {
        let n = echo_node(
            secured(&format!("m{i}"), k).peer_with_key(seed.endpoint(), keys[0].public()),
            &format!("m{i}.echo"),
        )
        .await;
        members.push(n);
    }
    // The members know only the seed's key; the seed's HELLOs name each with its key.
    wait_service(&members[0], "m1.echo", 1).await;
    wait_service(&members[1], "m0.echo", 1).await;
    let r: Value = members[0].request("m1.echo", &json!(1)).await.unwrap();
    assert_eq!(r, json!(1));
    let ids: Vec<Id> = members[1].peers().iter().map(|p| p.id).collect();
    assert!(ids.contains(&Id::of_key(&keys[1].public())), "{ids:?}");
    seed.shutdown().await;
    for m in members {
        m.shutdown().await;
    }
}

#[tokio::test]
async fn events_are_the_publishers_whose_key_their_connection_proved() {
    use peerwire::transport::Publisher;
    init_tracing();
    let (kn, kx) = (CurveKeys::generate(), CurveKeys::generate());
    let n = secured("n", &kn).start().await.unwrap();
    let mut events = n.subscribe::<u32>("t");
    // X: a PUB with its own key, and a HELLO (from X's key) naming that PUB, so that
    // N's SUB dials it.
    let xpub = Publisher::bind(
        "tcp://127.0.0.1:0",
        test_opts().with_curve(Some(Curve::new(kx.clone()))),
    )
    .await
    .unwrap();
    let d = Dealer::connect(
        n.endpoint(),
        test_opts().with_curve(Some(Curve::new(kx.clone()).server_key(kn.public()))),
    )
    .unwrap();
    let x_id = Id::of_key(&kx.public());
    let hello = codec::Hello {
        node_id: x_id,
        name: "x".into(),
        cluster: "default".into(),
        host: "127.0.0.1".into(),
        router_port: 9,
        pub_port: xpub.local_addr().port(),
        ..Default::default()
    };
    send_hello(&d, &hello).await;
    wait_subscribed(&xpub).await;
    let event = |sender: Id, v: u32| {
        let mut h = Header::new(Kind::Event, sender, "t");
        h.seq = 1;
        Message::from_frames(vec![
            bytes::Bytes::from_static(b"t"),
            codec::encode_header(&h),
            codec::encode_payload(&v).unwrap(),
        ])
    };
    // In another node's name: dropped and counted.
    let before = n.stats().unexpected;
    xpub.publish(event(n.id(), 1)).unwrap();
    wait_until("dropped", || n.stats().unexpected > before).await;
    // In its own: delivered, as X's.
    xpub.publish(event(x_id, 2)).unwrap();
    let e = within("X's event", events.recv()).await.unwrap().unwrap();
    assert_eq!((e.value, e.publisher), (2, x_id));
    n.shutdown().await;
}

#[tokio::test]
async fn a_gather_reply_in_another_nodes_name_does_not_count() {
    use peerwire::node::GatherOptions;
    use peerwire::transport::Subscriber;
    init_tracing();
    let (kg, kv, kx) = (
        CurveKeys::generate(),
        CurveKeys::generate(),
        CurveKeys::generate(),
    );
    let g = secured("g", &kg).start().await.unwrap();
    let v = secured("v", &kv)
        .peer_with_key(g.endpoint(), kg.public())
        .start()
        .await
        .unwrap();
    // V answers, a little late: X's forgery would come first.
    v.handle_gather("q", V1, |_: Value, _| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok("real".to_string())
    });
    wait_gatherable(&g, "q", 1).await;
    // X: a SUB on G's PUB (to see the gather's id) and a DEALER to G's ROUTER, on which
    // it claims V's id (refused) and then answers in V's name.
    let client =
        |k: &CurveKeys| test_opts().with_curve(Some(Curve::new(k.clone()).server_key(kg.public())));
    let xsub = Subscriber::new(client(&kx));
    xsub.subscribe("q".to_string());
    xsub.connect(g.pub_endpoint()).unwrap();
    let xd = Dealer::connect(g.endpoint(), client(&kx)).unwrap();
    let claim = codec::Hello {
        node_id: v.id(),
        name: "v".into(),
        cluster: "default".into(),
        host: "127.0.0.1".into(),
        router_port: 9,
        pub_port: 9,
        ..Default::default()
    };
    let before = g.stats().hellos_refused;
    send_hello(&xd, &claim).await;
    wait_until("the claim refused", || g.stats().hellos_refused > before).await;
    // G gathers until X has seen a request (its subscription may still be on its way).
    let (gather, request) = within("X seeing a gather request", async {
        loop {
            let gather = g
                .gather::<_, String>(
                    "q",
                    &json!(1),
                    GatherOptions::within(Duration::from_secs(2)),
                )
                .await
                .unwrap();
            if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(300), xsub.recv()).await {
                return (
                    gather,
                    codec::Envelope::from_pub_frames(m.frames()).unwrap(),
                );
            }
        }
    })
    .await;
    let mut forged = Header::new(Kind::GatherReply, v.id(), "");
    forged.correlation_id = request.header.id;
    let forged = codec::Envelope {
        header: forged,
        payload: codec::encode_payload(&"forged").unwrap(),
    };
    xd.send(Message::from_frames(forged.to_frames()))
        .await
        .unwrap();
    let out = within("the gather", gather.finish()).await;
    let got: Vec<String> = out
        .replies
        .into_iter()
        .filter_map(|r| r.result.ok())
        .collect();
    assert_eq!(got, ["real"], "only V's own reply counts");
    g.shutdown().await;
    v.shutdown().await;
}

#[tokio::test]
async fn a_secured_node_of_another_cluster_learns_only_that() {
    init_tracing();
    let (ka, kb) = (CurveKeys::generate(), CurveKeys::generate());
    let a = echo_node(secured("a", &ka), "a.echo").await;
    let b = secured("b", &kb)
        .cluster("elsewhere")
        .peer_with_key(a.endpoint(), ka.public())
        .start()
        .await
        .unwrap();
    wait_until("A told B it is of another cluster", || {
        b.stats().other_cluster >= 1 && a.stats().other_cluster >= 1
    })
    .await;
    assert!(a.peers().is_empty(), "{:?}", a.peers());
    assert!(
        b.peers().iter().all(|p| p.methods.is_empty()),
        "{:?}",
        b.peers()
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_request_in_another_nodes_name_is_refused() {
    init_tracing();
    let (ka, kx) = (CurveKeys::generate(), CurveKeys::generate());
    let a = echo_node(secured("a", &ka), "a.echo").await;
    let d = Dealer::connect(
        a.endpoint(),
        test_opts().with_curve(Some(Curve::new(kx.clone()).server_key(ka.public()))),
    )
    .unwrap();
    let request = |sender: Id| {
        let mut h = Header::new(Kind::Request, sender, "a.echo");
        h.deadline_ms = Some(5000);
        codec::Envelope {
            header: h,
            payload: codec::encode_payload(&json!(1)).unwrap(),
        }
    };
    // As a node it is not: refused, with a reply that says why.
    d.send(Message::from_frames(request(a.id()).to_frames()))
        .await
        .unwrap();
    let r =
        codec::Envelope::from_frames(within("a reply", d.recv()).await.unwrap().frames()).unwrap();
    assert_eq!(r.header.kind, Kind::ErrorReply);
    // As itself (the id its key proves): served.
    d.send(Message::from_frames(
        request(Id::of_key(&kx.public())).to_frames(),
    ))
    .await
    .unwrap();
    let r =
        codec::Envelope::from_frames(within("a reply", d.recv()).await.unwrap().frames()).unwrap();
    assert_eq!(r.header.kind, Kind::Reply);
    a.shutdown().await;
}

/// A member on the same address as B names B's ports as its own: while A's connection
/// there proves B's key, that HELLO is a lie, refused and counted; A keeps B's key and
/// keeps calling B.
#[tokio::test]
async fn a_member_cannot_claim_the_endpoints_of_another() {
    init_tracing();
    let (ka, kb, km) = (
        CurveKeys::generate(),
        CurveKeys::generate(),
        CurveKeys::generate(),
    );
    let a = echo_node(secured("a", &ka), "a.echo").await;
    let b = echo_node(
        secured("b", &kb).peer_with_key(a.endpoint(), ka.public()),
        "b.echo",
    )
    .await;
    wait_service(&a, "b.echo", 1).await;
    let port = |e: String| addr_of(&e).port();
    let d = Dealer::connect(
        a.endpoint(),
        test_opts().with_curve(Some(Curve::new(km.clone()).server_key(ka.public()))),
    )
    .unwrap();
    let before = a.stats().hellos_refused;
    let hello = codec::Hello {
        node_id: Id::of_key(&km.public()),
        name: "squatter".into(),
        cluster: "default".into(),
        host: "127.0.0.1".into(),
        router_port: port(b.endpoint()),
        pub_port: port(b.pub_endpoint()),
        ..Default::default()
    };
    send_hello(&d, &hello).await;
    wait_until("the squatter's HELLO refused", || {
        a.stats().hellos_refused > before
    })
    .await;
    // Its own (dead) ROUTER port but B's PUB port: refused too, and B's events still
    // reach A (forgetting the squatter must not take B's subscription with it).
    let before = a.stats().hellos_refused;
    let pub_squat = codec::Hello {
        router_port: 9,
        ..hello.clone()
    };
    send_hello(&d, &pub_squat).await;
    wait_until("the PUB squatter's HELLO refused", || {
        a.stats().hellos_refused > before
    })
    .await;
    let peers = a.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].id, b.id());
    let r: Value = a.request("b.echo", &json!(1)).await.unwrap();
    assert_eq!(r, json!(1));
    let mut events = a.subscribe::<u32>("tick");
    wait_until("subscribed", || !b.subscribers_of("tick").is_empty()).await;
    b.publish("tick", &5u32).unwrap();
    let e = within("B's event", events.recv()).await.unwrap().unwrap();
    assert_eq!((e.value, e.publisher), (5, b.id()));
    a.shutdown().await;
    b.shutdown().await;
}
