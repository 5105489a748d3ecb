//! Interoperability with the `zeromq` crate (0.7), in both directions, for every socket
//! pair peerwire uses: multipart messages, empty frames and 1 MiB messages.

mod support;

use bytes::Bytes;
use peerwire::transport::{Dealer, Message, Publisher, Router, SocketEvent, Subscriber};
use support::*;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

fn cases() -> Vec<Vec<Bytes>> {
    vec![
        vec![Bytes::from_static(b"hello")],
        vec![
            Bytes::from_static(b"a"),
            Bytes::new(),
            Bytes::from_static(b"c"),
            Bytes::new(),
        ],
        vec![
            Bytes::from_static(b"big"),
            Bytes::from(vec![0x5Au8; 1 << 20]),
        ],
    ]
}

fn zmsg(frames: &[Bytes]) -> ZmqMessage {
    ZmqMessage::try_from(frames.to_vec()).unwrap()
}

fn frames(m: ZmqMessage) -> Vec<Bytes> {
    m.into_vec()
}

#[tokio::test]
async fn our_dealer_with_their_router() {
    init_tracing();
    let mut router = zeromq::RouterSocket::new();
    let endpoint = router.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
    let dealer = Dealer::connect(&endpoint, test_opts()).unwrap();
    for case in cases() {
        dealer
            .send(Message::from_frames(case.clone()))
            .await
            .unwrap();
        let got = frames(within("their router recv", router.recv()).await.unwrap());
        // Their ROUTER prepends our identity.
        assert_eq!(&got[1..], &case[..]);
        router.send(zmsg(&got)).await.unwrap();
        let back = within("our dealer recv", dealer.recv()).await.unwrap();
        assert_eq!(back.into_frames(), case);
    }
}

#[tokio::test]
async fn their_dealer_with_our_router() {
    init_tracing();
    let router = Router::bind("tcp://127.0.0.1:0", test_opts())
        .await
        .unwrap();
    let mut dealer = zeromq::DealerSocket::new();
    dealer.connect(&ep(router.local_addr())).await.unwrap();
    for case in cases() {
        dealer.send(zmsg(&case)).await.unwrap();
        let (id, got) = within("our router recv", router.recv()).await.unwrap();
        assert_eq!(got.frames(), &case[..]);
        router.send(&id, got).await.unwrap();
        let back = frames(within("their dealer recv", dealer.recv()).await.unwrap());
        assert_eq!(back, case);
    }
}

#[tokio::test]
async fn our_pub_to_their_sub() {
    init_tracing();
    let publisher = Publisher::bind("tcp://127.0.0.1:0", test_opts())
        .await
        .unwrap();
    let mut events = publisher.events();
    let mut sub = zeromq::SubSocket::new();
    sub.subscribe("topic").await.unwrap();
    sub.connect(&ep(publisher.local_addr())).await.unwrap();
    wait_event(&mut events, "their sub connected", |e| {
        matches!(e, SocketEvent::Connected { .. })
    })
    .await;
    wait_until("their subscription", || {
        publisher
            .subscribers()
            .iter()
            .any(|s| s.subscriptions == vec![Bytes::from_static(b"topic")])
    })
    .await;
    for mut case in cases() {
        case[0] = Bytes::from([b"topic".as_slice(), &case[0]].concat());
        publisher
            .publish(Message::from_frames(vec![Bytes::from_static(b"other")]))
            .unwrap();
        let r = publisher
            .publish(Message::from_frames(case.clone()))
            .unwrap();
        assert_eq!(r.queued, 1);
        let got = frames(within("their sub recv", sub.recv()).await.unwrap());
        assert_eq!(got, case);
    }
}

#[tokio::test]
async fn their_pub_to_our_sub() {
    init_tracing();
    let mut publisher = zeromq::PubSocket::new();
    let endpoint = publisher
        .bind("tcp://127.0.0.1:0")
        .await
        .unwrap()
        .to_string();
    let sub = Subscriber::new(test_opts());
    sub.subscribe("topic");
    sub.connect(&endpoint).unwrap();
    wait_until("connected", || sub.connections() == 1).await;
    let all = cases();
    for (n, mut case) in all.iter().cloned().enumerate() {
        case[0] = Bytes::from([b"topic".as_slice(), &case[0]].concat());
        // Their PUB learns the subscription asynchronously: publish until this case
        // arrives. Copies of earlier cases may still be in flight; "other" never may.
        within("our sub recv", async {
            loop {
                publisher
                    .send(zmsg(&[Bytes::from_static(b"other")]))
                    .await
                    .unwrap();
                publisher.send(zmsg(&case)).await.unwrap();
                while let Ok(Ok(m)) =
                    tokio::time::timeout(std::time::Duration::from_millis(50), sub.recv()).await
                {
                    let got = m.into_frames();
                    assert!(got[0].starts_with(b"topic"), "filtered message delivered");
                    if got == case {
                        return;
                    }
                    assert!(n > 0, "unexpected message {got:?}");
                }
            }
        })
        .await;
    }
}
