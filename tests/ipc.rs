//! ZMTP over Unix domain sockets (`ipc://`): our sockets with each other (plain and
//! CURVE, request/reply and pub/sub), the socket file's life (taken over when stale,
//! refused while another listens, removed on close), and libzmq's ipc transport (pyzmq)
//! both ways. Without Python the interop test says it was skipped; with CI=true that is
//! a failure.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use bytes::Bytes;
use peerwire::transport::curve::{Curve, CurveKeys};
use peerwire::transport::{Dealer, Message, Publisher, Router, Subscriber, TransportError};
use support::*;

/// A socket path of its own for each test, in a fresh directory.
fn socket_path(name: &str) -> PathBuf {
    let dir = fresh_dir(&format!("ipc-{name}"));
    dir.join("s")
}

fn ipc(path: &std::path::Path) -> String {
    format!("ipc://{}", path.display())
}

#[tokio::test]
async fn dealer_router_and_pub_sub_over_ipc_plain_and_curve() {
    init_tracing();
    let path = socket_path("rr");
    let router = Router::bind(ipc(&path), test_opts()).await.unwrap();
    assert_eq!(router.local_endpoint(), ipc(&path));
    let dealer = Dealer::connect(ipc(&path), test_opts()).unwrap();
    let big = Bytes::from(vec![7u8; 1 << 20]);
    for m in [
        Message::from(Bytes::from_static(b"hi")),
        Message::from_frames(vec![Bytes::from_static(b"a"), big.clone()]),
    ] {
        dealer.send(m.clone()).await.unwrap();
        let (id, got) = within("router recv", router.recv()).await.unwrap();
        assert_eq!(got, m);
        router.send(&id, got).await.unwrap();
        assert_eq!(within("dealer recv", dealer.recv()).await.unwrap(), m);
    }
    // A peer over ipc is on this host, and accounted as such.
    assert!(router.peers()[0].addr.ip().is_loopback());

    // CURVE over ipc: the same handshake, the same boxes.
    let cpath = socket_path("curve");
    let (server, client) = (CurveKeys::generate(), CurveKeys::generate());
    let secured = Router::bind(
        ipc(&cpath),
        test_opts().with_curve(Some(Curve::new(server.clone()))),
    )
    .await
    .unwrap();
    let d = Dealer::connect(
        ipc(&cpath),
        test_opts().with_curve(Some(Curve::new(client.clone()).server_key(server.public()))),
    )
    .unwrap();
    d.send(Bytes::from_static(b"sealed").into()).await.unwrap();
    let (id, got) = within("curve recv", secured.recv()).await.unwrap();
    assert_eq!(&got.frames()[0][..], b"sealed");
    assert_eq!(secured.peer_key(&id), Some(client.public()));

    // Pub/sub.
    let ppath = socket_path("pub");
    let publisher = Publisher::bind(ipc(&ppath), test_opts()).await.unwrap();
    let sub = Subscriber::new(test_opts());
    sub.subscribe("t".to_string());
    sub.connect(ipc(&ppath)).unwrap();
    wait_subscribed(&publisher).await;
    publisher
        .publish(Message::from_frames(vec![
            Bytes::from_static(b"t.1"),
            Bytes::from_static(b"x"),
        ]))
        .unwrap();
    let got = within("event", sub.recv()).await.unwrap();
    assert_eq!(&got.frames()[0][..], b"t.1");
}

#[tokio::test]
async fn the_socket_file_is_taken_over_when_stale_refused_while_live_and_removed_on_close() {
    init_tracing();
    let path = socket_path("life");
    // A file left by a process that died: a socket nobody accepts on.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "the stale socket file is there");
    let router = Router::bind(ipc(&path), test_opts()).await.unwrap();
    // Another socket cannot take a path where one listens.
    match Router::bind(ipc(&path), test_opts()).await {
        Err(TransportError::Bind { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse)
        }
        other => panic!("bound twice: {:?}", other.map(|r| r.local_endpoint())),
    }
    router.close().await;
    wait_until("the socket file removed", || !path.exists()).await;
    // Paths too long for a Unix socket, abstract names and empty paths are refused.
    let long = format!("ipc:///{}", "x".repeat(120));
    for bad in ["ipc://", "ipc://@abstract", long.as_str()] {
        assert!(
            matches!(
                Router::bind(bad, test_opts()).await,
                Err(TransportError::InvalidEndpoint(_))
            ),
            "{bad}"
        );
    }
}

/// libzmq's ipc transport (pyzmq): its DEALER calls our ROUTER, and our DEALER calls its
/// ROUTER, over the same kind of socket file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libzmq_ipc_peers_talk_to_ours_both_ways() {
    if !python_ready("the ipc interop test") {
        return;
    }
    init_tracing();
    let ours = socket_path("py-ours");
    let router = Router::bind(ipc(&ours), test_opts()).await.unwrap();
    let echo = tokio::spawn(async move {
        while let Ok((id, m)) = router.recv().await {
            let _ = router.send(&id, m).await;
        }
    });
    let theirs = socket_path("py-theirs");
    let script = r#"
import sys, zmq
ctx = zmq.Context()
d = ctx.socket(zmq.DEALER); d.rcvtimeo = 10000
d.connect("ipc://" + sys.argv[1])
d.send_multipart([b"from", b"libzmq"])
print("echo " + b" ".join(d.recv_multipart()).decode(), flush=True)
r = ctx.socket(zmq.ROUTER); r.rcvtimeo = 10000
r.bind("ipc://" + sys.argv[2])
print("bound", flush=True)
who, *msg = r.recv_multipart()
r.send_multipart([who] + msg)
r.close(linger=1000)
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .arg(&ours)
        .arg(&theirs)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3");
    let mut lines = Lines::new(child.stdout.take().unwrap());
    let echoed = tokio::task::block_in_place(|| {
        lines.wait_for("libzmq's echo", BOUND, |l| l.starts_with("echo"))
    });
    assert_eq!(echoed, "echo from libzmq");
    tokio::task::block_in_place(|| lines.wait_for("libzmq bound", BOUND, |l| l == "bound"));
    let dealer = Dealer::connect(ipc(&theirs), test_opts()).unwrap();
    let m = Message::from_frames(vec![Bytes::from_static(b"to"), Bytes::from_static(b"zmq")]);
    dealer.send(m.clone()).await.unwrap();
    assert_eq!(within("libzmq's reply", dealer.recv()).await.unwrap(), m);
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    assert!(status.success());
    echo.abort();
}
