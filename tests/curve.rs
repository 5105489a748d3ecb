//! CURVE on real sockets: our sockets with each other and with libzmq (pyzmq, through
//! `tests/python/curve_peer.py`), and the refusals: a wrong server key, a client the
//! server does not authorize, a peer without CURVE. Without Python the interop tests
//! say they were skipped; with CI=true that is a failure (`.ci/run` installs pyzmq).

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use peerwire::transport::curve::{decode_key, encode_key, Curve, CurveKeys};
use peerwire::transport::{Dealer, Message, Publisher, Router, SocketEvent, SocketOptions};
use serde_json::Value;
use support::*;

fn curve(keys: &CurveKeys) -> SocketOptions {
    test_opts().with_curve(Some(Curve::new(keys.clone())))
}

fn client(keys: &CurveKeys, server: [u8; 32]) -> SocketOptions {
    test_opts().with_curve(Some(Curve::new(keys.clone()).server_key(server)))
}

fn msg(frames: &[&'static [u8]]) -> Message {
    frames.iter().map(|f| Bytes::from_static(f)).collect()
}

/// The peer's handshake failure (as our socket reports it), within the bound.
async fn handshake_failure(events: &mut tokio::sync::broadcast::Receiver<SocketEvent>) -> String {
    within("a failed handshake", async {
        loop {
            if let Ok(SocketEvent::HandshakeFailed { reason, .. }) = events.recv().await {
                return reason.to_string();
            }
        }
    })
    .await
}

#[tokio::test]
async fn our_sockets_talk_over_curve_and_know_who_is_there() {
    init_tracing();
    let (server_keys, client_keys) = (CurveKeys::generate(), CurveKeys::generate());
    let router = Router::bind("tcp://127.0.0.1:0", curve(&server_keys))
        .await
        .unwrap();
    let dealer = Dealer::connect(
        ep(router.local_addr()),
        client(&client_keys, server_keys.public()),
    )
    .unwrap();
    // A large frame too (boxed in the staging buffer, not written zero-copy).
    let big = vec![7u8; 200_000];
    dealer
        .send(
            [Bytes::from_static(b"hi"), Bytes::from(big.clone())]
                .into_iter()
                .collect(),
        )
        .await
        .unwrap();
    let (id, got) = within("the request", router.recv()).await.unwrap();
    assert_eq!(got.frames()[0], &b"hi"[..]);
    assert_eq!(got.frames()[1], &big[..]);
    assert_eq!(router.peer_key(&id), Some(client_keys.public()));
    router.send(&id, msg(&[b"back"])).await.unwrap();
    let reply = within("the reply", dealer.recv()).await.unwrap();
    assert_eq!(reply.frames(), [&b"back"[..]]);
}

#[tokio::test]
async fn a_wrong_key_an_unauthorized_client_and_a_plain_peer_are_refused() {
    init_tracing();
    let (server_keys, client_keys) = (CurveKeys::generate(), CurveKeys::generate());
    let allowed = client_keys.public();
    let opts = test_opts().with_curve(Some(
        Curve::new(server_keys.clone()).authorize(Arc::new(move |k| *k == allowed)),
    ));
    let router = Router::bind("tcp://127.0.0.1:0", opts).await.unwrap();
    let mut events = router.events();
    let at = ep(router.local_addr());

    // A client that believes the server has another key: its HELLO does not open.
    let (_wrong, _) = Dealer::connect_with_events(
        at.clone(),
        client(&client_keys, CurveKeys::generate().public()),
    )
    .unwrap();
    let why = handshake_failure(&mut events).await;
    assert!(why.contains("CURVE authentication failed"), "{why}");
    drop(_wrong);

    // A client with the right server key but a key the server does not accept.
    let (_stranger, _) = Dealer::connect_with_events(
        at.clone(),
        client(&CurveKeys::generate(), server_keys.public()),
    )
    .unwrap();
    let why = handshake_failure(&mut events).await;
    assert!(why.contains("not authorized"), "{why}");
    drop(_stranger);

    // A peer without CURVE.
    let (_plain, _) = Dealer::connect_with_events(at.clone(), test_opts()).unwrap();
    let why = handshake_failure(&mut events).await;
    assert!(why.contains("NULL"), "{why}");
    drop(_plain);

    let v = router.stats().violations;
    for label in ["curve_crypto", "not_authorized", "mechanism_mismatch"] {
        assert!(v.get(label).copied().unwrap_or(0) >= 1, "{label}: {v:?}");
    }
    // The allowed client still gets in.
    let ok = Dealer::connect(at, client(&client_keys, server_keys.public())).unwrap();
    ok.send(msg(&[b"x"])).await.unwrap();
    let (id, _) = within("the allowed client's message", router.recv())
        .await
        .unwrap();
    assert_eq!(router.peer_key(&id), Some(client_keys.public()));
}

/// A `curve_peer.py` process and its JSON lines.
struct Py {
    child: Child,
    lines: Lines,
}

impl Py {
    fn start(args: &[&str]) -> Py {
        let mut child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python/curve_peer.py"
            ))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let lines = Lines::new(child.stdout.take().unwrap());
        Py { child, lines }
    }

    fn next(&mut self, what: &str) -> Value {
        let l = self.lines.wait_for(what, Duration::from_secs(15), |_| true);
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l}: {e}"))
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn key_of(v: &Value) -> [u8; 32] {
    decode_key(v["public"].as_str().expect("a public key")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pyzmq_curve_dealer_calls_our_router() {
    if !python_ready("the CURVE interop test") {
        return;
    }
    init_tracing();
    let keys = CurveKeys::generate();
    let router = Router::bind("tcp://127.0.0.1:0", curve(&keys))
        .await
        .unwrap();
    let port = router.local_addr().port().to_string();
    let mut py =
        tokio::task::block_in_place(|| Py::start(&["dealer", &port, &encode_key(&keys.public())]));
    let theirs = tokio::task::block_in_place(|| key_of(&py.next("the dealer's key")));
    // Two requests a second apart, heartbeats (boxed PINGs and PONGs) in between.
    for _ in 0..2 {
        let (id, got) = within("a request", router.recv()).await.unwrap();
        assert_eq!(got.frames(), [&b"a"[..], b"bc"]);
        assert_eq!(router.peer_key(&id), Some(theirs));
        router.send(&id, got).await.unwrap();
        let echo = tokio::task::block_in_place(|| py.next("the echo"));
        assert_eq!(echo["echo"], serde_json::json!(["a", "bc"]));
    }
    assert_eq!(router.stats().total_violations(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_dealer_calls_a_pyzmq_curve_router() {
    if !python_ready("the CURVE interop test") {
        return;
    }
    init_tracing();
    let mut py = tokio::task::block_in_place(|| Py::start(&["echo-server"]));
    let hello = tokio::task::block_in_place(|| py.next("the server's port and key"));
    let (port, server) = (hello["port"].as_u64().unwrap(), key_of(&hello));
    let dealer = Dealer::connect(
        format!("tcp://127.0.0.1:{port}"),
        client(&CurveKeys::generate(), server),
    )
    .unwrap();
    dealer.send(msg(&[b"one", b"two"])).await.unwrap();
    let echo = within("the echo", dealer.recv()).await.unwrap();
    assert_eq!(echo.frames(), [&b"one"[..], b"two"]);
    dealer.send(msg(&[b"bye"])).await.unwrap();
    within("the last echo", dealer.recv()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pyzmq_curve_sub_receives_our_events() {
    if !python_ready("the CURVE interop test") {
        return;
    }
    init_tracing();
    let keys = CurveKeys::generate();
    let publisher = Publisher::bind("tcp://127.0.0.1:0", curve(&keys))
        .await
        .unwrap();
    let port = publisher.local_addr().port().to_string();
    let mut py = tokio::task::block_in_place(|| {
        Py::start(&["sub", &port, &encode_key(&keys.public()), "news.", "3"])
    });
    tokio::task::block_in_place(|| py.next("the subscriber's key"));
    // Its SUBSCRIBE came boxed: once it is in, what we publish on news. reaches it.
    wait_subscribed(&publisher).await;
    let events: [(&'static [u8], &'static [u8]); 4] = [
        (b"news.a", b"1"),
        (b"other", b"x"),
        (b"news.b", b"2"),
        (b"news.c", b"3"),
    ];
    for (topic, body) in events {
        publisher.publish(msg(&[topic, body])).unwrap();
    }
    let got: Vec<Value> = tokio::task::block_in_place(|| {
        (0..3)
            .map(|_| py.next("an event")["event"].clone())
            .collect()
    });
    assert_eq!(
        got,
        [
            serde_json::json!(["news.a", "1"]),
            serde_json::json!(["news.b", "2"]),
            serde_json::json!(["news.c", "3"])
        ]
    );
}

/// A libzmq client that holds the cluster secret derives the cluster's key (PROTOCOL.md
/// section 10a) and calls a member; with another cluster's secret it is refused in the
/// handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pyzmq_client_holding_the_cluster_secret_calls_a_member() {
    use peerwire::node::{ClusterSecret, Node};
    if !python_ready("the CURVE interop test") {
        return;
    }
    init_tracing();
    let dir = fresh_dir("py-cluster");
    let (ours, theirs) = (dir.join("ours"), dir.join("theirs"));
    let secret = ClusterSecret::generate();
    secret.write(&ours).unwrap();
    ClusterSecret::generate().write(&theirs).unwrap();
    let node = Node::builder("member")
        .cluster_secret(secret)
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    node.handle(
        "member.echo",
        support::orders::V1,
        |v: Value, _| async move { Ok(v) },
    );
    let port = addr_of(&node.endpoint()).port().to_string();
    let call = |secret: &std::path::Path| {
        Py::start(&[
            "cluster-call",
            &port,
            secret.to_str().unwrap(),
            "member.echo",
        ])
    };
    let mut py = tokio::task::block_in_place(|| call(&ours));
    let reply = tokio::task::block_in_place(|| py.next("the reply"));
    assert_eq!(reply, serde_json::json!({"reply": "hi"}));
    let refused = |n: &Node| {
        let v = n.stats().router.violations;
        v.get("curve_crypto").copied().unwrap_or(0)
    };
    assert_eq!(refused(&node), 0);
    let _other = tokio::task::block_in_place(|| call(&theirs));
    wait_until("the other cluster's client refused", || refused(&node) >= 1).await;
    node.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
