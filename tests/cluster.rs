//! Membership by a cluster secret (`NodeBuilder::cluster_secret`): members find each
//! other through keyless seeds and keep ids their keys prove; a node of another cluster,
//! a node without the secret and a server that knows the secret but not its own key's
//! proof are all refused in the handshake, counted, and learn nothing.

mod support;

use peerwire::codec::Id;
use peerwire::node::{ClusterSecret, Node, NodeBuilder};
use peerwire::transport::curve::{Curve, CurveKeys};
use peerwire::transport::Router;
use serde_json::{json, Value};
use support::*;

fn member(name: &str, secret: &ClusterSecret, keys: &CurveKeys) -> NodeBuilder {
    Node::builder(name)
        .secure(keys.clone())
        .cluster_secret(secret.clone())
        .socket_options(test_opts())
}

fn violations(n: &Node, label: &str) -> u64 {
    n.stats().router.violations.get(label).copied().unwrap_or(0)
}

#[tokio::test]
async fn members_join_through_keyless_seeds_under_ids_their_keys_prove() {
    init_tracing();
    let secret = ClusterSecret::generate();
    let (ka, kb, kc) = (
        CurveKeys::generate(),
        CurveKeys::generate(),
        CurveKeys::generate(),
    );
    let a = echo_node(member("a", &secret, &ka), "a.echo").await;
    // B names A without a key; C names only B and learns A by gossip.
    let b = echo_node(member("b", &secret, &kb).peer(a.endpoint()), "b.echo").await;
    let c = echo_node(member("c", &secret, &kc).peer(b.endpoint()), "c.echo").await;
    wait_service(&c, "a.echo", 1).await;
    wait_service(&a, "c.echo", 1).await;
    wait_service(&a, "b.echo", 1).await;
    assert_eq!(a.id(), Id::of_key(&ka.public()));
    for (n, k) in [(&a, &ka), (&b, &kb), (&c, &kc)] {
        assert_eq!(n.public_key(), Some(k.public()));
    }
    // Each peer is known under the id its own key proves.
    let ids: Vec<Id> = c.peers().iter().map(|p| p.id).collect();
    assert!(ids.contains(&Id::of_key(&ka.public())), "{ids:?}");
    assert!(ids.contains(&Id::of_key(&kb.public())), "{ids:?}");
    let r: Value = c.request("a.echo", &json!({"n": 1})).await.unwrap();
    assert_eq!(r, json!({"n": 1}));
    let r: Value = a.request("c.echo", &json!("back")).await.unwrap();
    assert_eq!(r, json!("back"));
    // Events are attributed to the publisher's own key, not the cluster's.
    let mut events = c.subscribe::<u32>("tick");
    wait_until("subscribed", || !a.subscribers_of("tick").is_empty()).await;
    a.publish("tick", &7u32).unwrap();
    let e = within("the event", events.recv()).await.unwrap().unwrap();
    assert_eq!((e.value, e.publisher), (7, a.id()));
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn another_cluster_and_a_node_without_the_secret_learn_nothing() {
    init_tracing();
    let raw = [42u8; 32];
    let secret = ClusterSecret::from_bytes(raw);
    let ka = CurveKeys::generate();
    let a = echo_node(member("a", &secret, &ka), "a.echo").await;

    // Another cluster's secret, seeded with A: the handshake fails at A's side (the
    // HELLO box does not open).
    let other = echo_node(
        member("x", &ClusterSecret::generate(), &CurveKeys::generate()).peer(a.endpoint()),
        "x.echo",
    )
    .await;
    wait_until("A refused the other cluster", || {
        violations(&a, "curve_crypto") >= 1
    })
    .await;
    // A node secured by its own key only, even one that knows A's node key.
    let lone = Node::builder("lone")
        .secure(CurveKeys::generate())
        .peer_with_key(a.endpoint(), ka.public())
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    wait_until("A refused the lone node", || {
        violations(&a, "curve_crypto") >= 2
    })
    .await;
    for outsider in [&other, &lone] {
        assert!(outsider.wait_settled(BOUND).await);
        assert!(
            outsider
                .peers()
                .iter()
                .all(|p| !p.connected && p.methods.is_empty()),
            "{:?}",
            outsider.peers()
        );
        assert!(!outsider.unreachable().is_empty());
    }
    assert!(a.peers().is_empty(), "A learned {:?}", a.peers());

    // A member dialling a server without the secret (it cannot open the HELLO), and one
    // that has the cluster's key but does not prove its own (a libzmq server, say).
    let stranger = Router::bind(
        "tcp://127.0.0.1:0",
        test_opts().with_curve(Some(Curve::new(CurveKeys::generate()))),
    )
    .await
    .unwrap();
    let unproven = Router::bind(
        "tcp://127.0.0.1:0",
        test_opts().with_curve(Some(Curve::new(derived(raw)))),
    )
    .await
    .unwrap();
    let b = member("b", &secret, &CurveKeys::generate())
        .peer(ep(stranger.local_addr()))
        .peer(ep(unproven.local_addr()))
        .start()
        .await
        .unwrap();
    assert!(b.wait_settled(BOUND).await);
    let unreachable = b.unreachable();
    assert_eq!(unreachable.len(), 2, "{unreachable:?}");
    let why = |port: u16| {
        unreachable
            .iter()
            .find(|(e, _)| e.to_string().ends_with(&format!(":{port}")))
            .map(|(_, why)| why.clone())
            .unwrap_or_default()
    };
    assert!(
        why(stranger.local_addr().port()).contains("CURVE handshake failed"),
        "{unreachable:?}"
    );
    assert!(
        why(unproven.local_addr().port()).contains("does not prove its own key"),
        "{unreachable:?}"
    );
    assert!(b.peers().iter().all(|p| !p.connected), "{:?}", b.peers());
    for n in [a, other, lone, b] {
        n.shutdown().await;
    }
}

/// The cluster's key pair by the documented derivation (src/node/cluster_secret.rs,
/// SECURITY.md), to play a server that has the secret but proves no key of its own.
fn derived(raw: [u8; 32]) -> CurveKeys {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"peerwire cluster key v1\0");
    h.update(raw);
    CurveKeys::from_secret(h.finalize().into())
}

#[tokio::test]
async fn an_allow_list_narrows_the_cluster_both_ways() {
    init_tracing();
    let secret = ClusterSecret::generate();
    let kb = CurveKeys::generate();
    // C holds the secret but A does not list it.
    let c = member("c", &secret, &CurveKeys::generate())
        .start()
        .await
        .unwrap();
    // A lets in only B among the members, and dials only B: C, named as a peer, proves
    // its key in READY and A hangs up before saying anything.
    let a = echo_node(
        member("a", &secret, &CurveKeys::generate())
            .allow(kb.public())
            .peer(c.endpoint()),
        "a.echo",
    )
    .await;
    let b = echo_node(member("b", &secret, &kb).peer(a.endpoint()), "b.echo").await;
    wait_service(&b, "a.echo", 1).await;
    wait_service(&a, "b.echo", 1).await;
    assert!(a.wait_settled(BOUND).await);
    let unreachable = a.unreachable();
    assert!(
        unreachable.iter().any(|(e, _)| *e == c.endpoint()),
        "{unreachable:?}"
    );
    assert!(c.peers().is_empty(), "C learned {:?}", c.peers());
    // D holds the secret, is not listed, and dials A: refused in A's handshake.
    let d = member("d", &secret, &CurveKeys::generate())
        .peer(a.endpoint())
        .start()
        .await
        .unwrap();
    wait_until("A refused D", || violations(&a, "not_authorized") >= 1).await;
    assert!(d.wait_settled(BOUND).await);
    assert!(d.peers().iter().all(|p| p.methods.is_empty()));
    let ids: Vec<Id> = a.peers().iter().map(|p| p.id).collect();
    assert_eq!(ids, [b.id()]);
    for n in [a, b, c, d] {
        n.shutdown().await;
    }
}

/// What a review found, each refused and counted: a HELLO-ACK whose id is not the key
/// its connection proved (here, the dialler's own id, which would make it stop dialling
/// that endpoint for good), a key the operator pinned for an endpoint where another
/// member answers, and a member using the cluster's key as its own.
#[tokio::test]
async fn acks_pins_and_the_cluster_key_hold_in_a_cluster() {
    use peerwire::codec::{self, Envelope, Header, Kind};
    use peerwire::transport::Message;
    init_tracing();
    let raw = [9u8; 32];
    let secret = ClusterSecret::from_bytes(raw);
    // M: a member's ROUTER (it proves its own key) answering every HELLO with an ACK in
    // the dialler's name.
    let km = CurveKeys::generate();
    let m = Router::bind(
        "tcp://127.0.0.1:0",
        test_opts().with_curve(Some(Curve::new(km.clone()).cluster(derived(raw)))),
    )
    .await
    .unwrap();
    let m_endpoint = ep(m.local_addr());
    let forger = tokio::spawn(async move {
        while let Ok((who, msg)) = m.recv().await {
            let Ok(env) = Envelope::from_frames(msg.frames()) else {
                continue;
            };
            if env.header.kind != Kind::Hello {
                continue;
            }
            let victim: codec::Hello = codec::decode_payload(&env.payload).unwrap();
            let mut h = Header::new(Kind::HelloAck, victim.node_id, "");
            h.correlation_id = env.header.id;
            let ack = Envelope {
                header: h,
                payload: codec::encode_payload(&victim).unwrap(),
            };
            let _ = m.send(&who, Message::from_frames(ack.to_frames())).await;
        }
    });
    let v = member("v", &secret, &CurveKeys::generate())
        .peer(m_endpoint.clone())
        .start()
        .await
        .unwrap();
    wait_until("the forged ACK refused", || v.stats().hellos_refused >= 1).await;
    // V still takes that endpoint for someone else's (it would refuse it as its own).
    v.add_peer(&m_endpoint).unwrap();
    forger.abort();

    // A pinned key is the key: a member that answers at A's endpoint with another one is
    // refused (here, the key given is simply wrong).
    let a = echo_node(member("a", &secret, &CurveKeys::generate()), "a.echo").await;
    let pinned = member("pinned", &secret, &CurveKeys::generate())
        .peer_with_key(a.endpoint(), CurveKeys::generate().public())
        .start()
        .await
        .unwrap();
    assert!(pinned.wait_settled(BOUND).await);
    let unreachable = pinned.unreachable();
    assert!(
        unreachable
            .iter()
            .any(|(_, why)| why.contains("another key than the one expected")),
        "{unreachable:?}"
    );
    assert!(pinned.peers().iter().all(|p| p.methods.is_empty()));

    // The cluster's key as a member's own: refused by A, which learns nothing.
    let before = violations(&a, "curve_crypto");
    let shared = member("shared", &secret, &derived(raw))
        .peer(a.endpoint())
        .start()
        .await
        .unwrap();
    wait_until("the cluster key refused as a member's", || {
        violations(&a, "curve_crypto") > before
    })
    .await;
    assert!(a.peers().iter().all(|p| p.id != shared.id()));
    for n in [v, a, pinned, shared] {
        n.shutdown().await;
    }
}
