//! The node runtime over loopback: peers killed and restarted mid-stream, a cluster found
//! from one seed, presence events, DNS seeds, replicas of one name.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use peerwire::node::{CallError, CallOptions, Node, ServicePolicy};
use support::orders::*;
use support::*;

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
        .insecure()
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
        .insecure()
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
    // It says it is leaving first, then its connections close.
    match next(&mut presence).await {
        PresenceEvent::Updated(p) => assert!(p.leaving, "{p:?}"),
        other => panic!("{other:?}"),
    }
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
        .insecure()
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
        .insecure()
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
            .insecure()
            .socket_options(test_opts())
            .peer(client.endpoint())
            .start();
        let b = Node::builder("orders")
            .insecure()
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

#[tokio::test]
async fn a_breaker_opens_on_a_failing_instance_and_closes_when_it_recovers() {
    use peerwire::node::{BreakerConfig, BreakerState};
    use std::sync::atomic::{AtomicBool, Ordering};
    init_tracing();
    let failing = Arc::new(AtomicBool::new(true));
    let bad = start_node("bad", &[]).await;
    let f = failing.clone();
    bad.handle("flaky.op", V1, move |_: (), _| {
        // A panicking handler: `handler_panicked`, which a breaker counts as a failure.
        assert!(!f.load(Ordering::SeqCst), "boom");
        async { Ok("bad") }
    });
    let good = start_node("good", &[bad.endpoint()]).await;
    good.handle("flaky.op", V1, |_: (), _| async { Ok("good") });
    let config = BreakerConfig::default()
        .with_window(4, 4)
        .with_wait_in_open(Duration::from_millis(300))
        .with_probes(1, Duration::from_secs(2));
    // The service's own breaker settings (the node's default would not judge before
    // ten calls).
    let client = Node::builder("client")
        .insecure()
        .peer(bad.endpoint())
        .service("flaky", ServicePolicy::new().breaker(config))
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    let mut events = client.breaker_events();
    wait_service(&client, "flaky.op", 2).await;

    // Round robin sends every other call to `bad`: its fourth failure opens its breaker.
    for _ in 0..8 {
        let _ = client.request::<_, String>("flaky.op", &()).await;
    }
    let e = within("opened", events.recv()).await.unwrap();
    assert_eq!(
        (e.service.as_str(), e.instance, e.from, e.to),
        ("flaky", bad.id(), BreakerState::Closed, BreakerState::Open)
    );
    // From now on `bad` is skipped: every call succeeds on `good`.
    for _ in 0..10 {
        let who: String = client.request("flaky.op", &()).await.unwrap();
        assert_eq!(who, "good");
    }

    // With `good` gone, the only instance left is open: refused at once, not sent.
    good.shutdown().await;
    wait_service(&client, "flaky.op", 1).await;
    wait_until("good gone", || {
        client.peers().iter().filter(|p| p.connected).count() == 1
    })
    .await;
    let refused = client.request::<_, String>("flaky.op", &()).await;
    assert!(
        matches!(refused, Err(CallError::BreakerOpen(_))),
        "{refused:?}"
    );
    assert!(client.stats().breaker_refused >= 1);
    // A call that bypasses the breakers still reaches it (and is not recorded).
    let mut past = CallOptions::default();
    past.bypass_breaker = true;
    let reached = client
        .request_with::<_, String>("flaky.op", &(), past)
        .await;
    assert!(
        matches!(&reached, Err(CallError::Remote { code, .. }) if code == "handler_panicked"),
        "{reached:?}"
    );

    // `bad` recovers: after the wait, one probe goes through, succeeds, and closes it.
    failing.store(false, Ordering::SeqCst);
    let who: String = within("a probe let through", async {
        loop {
            match client.request::<_, String>("flaky.op", &()).await {
                Err(CallError::BreakerOpen(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                other => return other,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(who, "bad");
    let half = within("half-open", events.recv()).await.unwrap();
    assert_eq!(
        (half.from, half.to),
        (BreakerState::Open, BreakerState::HalfOpen)
    );
    let closed = within("closed", events.recv()).await.unwrap();
    assert_eq!(
        (closed.from, closed.to),
        (BreakerState::HalfOpen, BreakerState::Closed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_outstanding_sends_less_to_a_slow_instance() {
    use peerwire::node::Balancing;
    init_tracing();
    let slow = start_node("slow", &[]).await;
    slow.handle("work.do", V1, |_: (), _| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok("slow")
    });
    let fast = start_node("fast", &[slow.endpoint()]).await;
    fast.handle("work.do", V1, |_: (), _| async { Ok("fast") });
    // The service's policy (the node's default stays round robin).
    let client = Arc::new(
        Node::builder("client")
            .insecure()
            .peer(slow.endpoint())
            .service(
                "work",
                ServicePolicy::new().balancing(Balancing::LeastOutstanding),
            )
            .socket_options(test_opts())
            .start()
            .await
            .unwrap(),
    );
    wait_service(&client, "work.do", 2).await;
    // Four callers, twelve calls each, one at a time: round robin would send half to
    // the slow instance; least outstanding sends it only what finds it idle.
    let mut lanes = Vec::new();
    for _ in 0..4 {
        let c = client.clone();
        lanes.push(tokio::spawn(async move {
            let mut to_slow = 0;
            for _ in 0..12 {
                let who: String = c.request("work.do", &()).await.unwrap();
                to_slow += (who == "slow") as usize;
            }
            to_slow
        }));
    }
    let mut to_slow = 0;
    for l in lanes {
        to_slow += within("a caller's calls", l).await.unwrap();
    }
    eprintln!("{to_slow} of 48 calls went to the slow instance");
    assert!(to_slow < 16, "{to_slow} of 48 to the slow instance");
    // A call can choose otherwise: round robin alternates, whatever the load.
    let mut rr = CallOptions::default();
    rr.balancing = Some(Balancing::RoundRobin);
    let mut to_slow = 0;
    for _ in 0..6 {
        let who: String = client
            .request_with("work.do", &(), rr.clone())
            .await
            .unwrap();
        to_slow += (who == "slow") as usize;
    }
    assert_eq!(to_slow, 3, "every other call");
}

#[tokio::test]
async fn a_full_bulkhead_queues_then_fails_fast() {
    use peerwire::node::BulkheadConfig;
    init_tracing();
    let server = start_node("server", &[]).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    server.handle("slow.op", V1, move |_: (), _| {
        let g = g.clone();
        async move {
            let _ = g.acquire().await.map(|p| p.forget());
            Ok(())
        }
    });
    server.handle("other.op", V1, |_: (), _| async { Ok(()) });
    // Two in flight to `slow`, one more may wait; other services are not bounded.
    let client = Arc::new(
        Node::builder("client")
            .insecure()
            .peer(server.endpoint())
            .service(
                "slow",
                ServicePolicy::new().bulkhead(BulkheadConfig::new(2, 1)),
            )
            .socket_options(test_opts())
            .start()
            .await
            .unwrap(),
    );
    wait_service(&client, "slow.op", 1).await;
    let long = CallOptions::timeout(Duration::from_secs(10));
    let spawn_call = |calls: &mut Vec<_>| {
        let (c, o) = (client.clone(), long.clone());
        calls.push(tokio::spawn(async move {
            c.request_with::<_, ()>("slow.op", &(), o).await
        }));
    };
    let mut calls = Vec::new();
    for _ in 0..2 {
        spawn_call(&mut calls);
    }
    wait_until("two in flight", || client.pending_calls() == 2).await;
    // A call that will not wait is refused at once, though the queue has room.
    let mut now_or_never = long.clone();
    now_or_never.fail_fast = true;
    let refused = client
        .request_with::<_, ()>("slow.op", &(), now_or_never)
        .await;
    assert!(
        matches!(refused, Err(CallError::BulkheadFull(_))),
        "{refused:?}"
    );
    for _ in 0..2 {
        spawn_call(&mut calls);
    }
    // One waits, and the last finds the queue full: refused at once.
    wait_until("one more refused", || client.stats().bulkhead_rejected == 2).await;
    // Another service is not held up by it.
    client.request::<_, ()>("other.op", &()).await.unwrap();
    gate.add_permits(3);
    let mut full = 0;
    for c in calls {
        match within("a call's end", c).await.unwrap() {
            Ok(()) => {}
            Err(CallError::BulkheadFull(s)) => {
                assert_eq!(s, "slow");
                full += 1
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(full, 1, "exactly one refused");
}

#[tokio::test]
async fn idempotent_calls_are_retried_on_another_instance_with_the_same_id() {
    use peerwire::codec::codes;
    use peerwire::HandlerError;
    init_tracing();
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let bad = start_node("bad", &[]).await;
    let t = tx.clone();
    bad.handle("stock.read", V1, move |_: (), ctx| {
        let _ = t.send(("bad", ctx.message_id));
        async { Err::<String, _>(HandlerError::new(codes::OVERLOADED, "busy")) }
    });
    let good = start_node("good", &[bad.endpoint()]).await;
    let t = tx.clone();
    good.handle("stock.read", V1, move |_: (), ctx| {
        let _ = t.send(("good", ctx.message_id));
        async { Ok("good".to_string()) }
    });
    let client = Node::builder("client")
        .insecure()
        .peer(bad.endpoint())
        .no_breakers()
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    wait_service(&client, "stock.read", 2).await;

    // Without retries, the calls that reach `bad` fail.
    let mut failed = 0;
    for _ in 0..4 {
        failed += client
            .request::<_, String>("stock.read", &())
            .await
            .is_err() as usize;
    }
    assert_eq!(failed, 2, "round robin: every other call to `bad`");
    while seen.try_recv().is_ok() {}

    // Marked idempotent with retries, every call succeeds; a call that reached `bad`
    // was sent again to `good` under the same message id.
    let opts = CallOptions::timeout(Duration::from_secs(5)).with_retries(2);
    for _ in 0..4 {
        let got: String = client
            .request_with("stock.read", &(), opts.clone())
            .await
            .unwrap();
        assert_eq!(got, "good");
    }
    let mut by_id: std::collections::HashMap<_, Vec<&str>> = Default::default();
    while let Ok((who, id)) = seen.try_recv() {
        by_id.entry(id).or_default().push(who);
    }
    assert_eq!(
        by_id.len(),
        4,
        "four messages, however many attempts: {by_id:?}"
    );
    assert!(by_id.values().any(|w| w == &["bad", "good"]), "{by_id:?}");

    // Not idempotent: not retried, whatever `retries` says.
    let mut once = CallOptions::timeout(Duration::from_secs(5)).with_retries(2);
    once.idempotent = false;
    let mut failed = 0;
    for _ in 0..4 {
        failed += client
            .request_with::<_, String>("stock.read", &(), once.clone())
            .await
            .is_err() as usize;
    }
    assert_eq!(failed, 2);
}

#[tokio::test]
async fn fallbacks_answer_when_no_instance_can_and_say_so() {
    init_tracing();
    let server = start_node("server", &[]).await;
    server.handle("price.quote", V1, |_: (), _| async {
        std::future::pending::<()>().await;
        Ok(0u32)
    });
    server.handle("price.fail", V1, |_: (), _| async {
        Err::<u32, _>(peerwire::HandlerError::new("no_price", "unknown item"))
    });
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "price.quote", 1).await;
    let quick = CallOptions::timeout(Duration::from_millis(100));

    // Per call: a timeout is answered by the fallback, which says why.
    let a = client
        .request_or("price.quote", &(), quick.clone(), |_| 42u32)
        .await
        .unwrap();
    assert_eq!(a.value, 42);
    assert!(
        matches!(a.fallback, Some(CallError::Timeout { .. })),
        "{a:?}"
    );
    // Nobody serves it: the same.
    let a = client
        .request_or("nobody.home", &(), quick.clone(), |_| 7u32)
        .await
        .unwrap();
    assert!(matches!(a.fallback, Some(CallError::NoResponder(_))));
    // The service's own answer, an error, is not replaced.
    let e = client
        .request_or("price.fail", &(), quick.clone(), |_| 1u32)
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::Remote { .. }), "{e:?}");

    // Per service: registered once, used for any of its targets.
    client.fallback("price", |target, _| format!("cached {target}"));
    let a: peerwire::Answer<String> = client
        .request_answer("price.quote", &(), quick.clone())
        .await
        .unwrap();
    assert_eq!(a.value, "cached price.quote");
    assert!(a.is_fallback());
    // A service without one: the failure as it is.
    let e = client
        .request_answer::<_, u32>("nobody.home", &(), quick)
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::NoResponder(_)));
}

/// A peer on this host that a node learns from a HELLO is dialled at its ipc socket
/// (same directory, network namespace and user); a seed stays as given; and a node made
/// `ipc(false)` keeps to TCP both ways.
#[tokio::test]
async fn same_host_peers_learned_by_hello_are_dialled_over_ipc() {
    init_tracing();
    let a = start_node("a", &[]).await;
    a.handle("a.echo", V1, |v: serde_json::Value, _| async move { Ok(v) });
    let b = start_node("b", &[a.endpoint()]).await;
    b.handle("b.echo", V1, |v: serde_json::Value, _| async move { Ok(v) });
    wait_service(&a, "b.echo", 1).await;
    wait_service(&b, "a.echo", 1).await;
    let via = |n: &Node| n.peers()[0].dialled.to_string();
    if std::fs::metadata("/proc/self/ns/net").is_err() {
        return; // not Linux: TCP only, checked by every other test
    }
    assert!(via(&a).starts_with("ipc://"), "A reaches B at {}", via(&a));
    assert_eq!(via(&b), a.endpoint(), "a seed is dialled as given");
    let r: serde_json::Value = a.request("b.echo", &serde_json::json!(1)).await.unwrap();
    assert_eq!(r, serde_json::json!(1));

    let c = Node::builder("c")
        .insecure()
        .ipc(false)
        .peer(a.endpoint())
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    wait_until("A knows C", || a.peers().iter().any(|p| p.name == "c")).await;
    let to_c = a.peers().into_iter().find(|p| p.name == "c").unwrap();
    assert_eq!(to_c.dialled, to_c.router_endpoint);
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

/// A same-host peer whose ipc socket cannot be reached (the file is gone, or this
/// process sees another directory) is reached over TCP instead, on the same link.
#[tokio::test]
async fn a_peer_whose_ipc_socket_is_gone_is_reached_over_tcp() {
    init_tracing();
    let a = start_node("a", &[]).await;
    let b = start_node("b", &[]).await;
    b.handle("b.echo", V1, |v: serde_json::Value, _| async move { Ok(v) });
    // B's socket file removed before anyone dials it; then B introduces itself to A.
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(|d| std::path::PathBuf::from(d).join("peerwire"))
        .unwrap_or_else(|| {
            use std::os::unix::fs::MetadataExt;
            let uid = std::fs::metadata("/proc/self").unwrap().uid();
            std::path::PathBuf::from(format!("/tmp/peerwire-{uid}"))
        });
    let socket = dir.join(format!("{}.sock", b.id().0.simple()));
    if std::fs::remove_file(&socket).is_err() {
        return; // no ipc here: TCP only, as every other test checks
    }
    b.add_peer(&a.endpoint()).unwrap();
    wait_service(&a, "b.echo", 1).await;
    let r: serde_json::Value = a
        .request("b.echo", &serde_json::json!("tcp"))
        .await
        .unwrap();
    assert_eq!(r, serde_json::json!("tcp"));
    assert!(a.peers()[0].dialled.to_string().starts_with("ipc://"));
    a.shutdown().await;
    b.shutdown().await;
}

/// Gossip never makes a node connect to a local socket: `ipc://` entries are ignored.
#[tokio::test]
async fn gossip_naming_a_local_socket_is_ignored() {
    use peerwire::codec;
    use peerwire::transport::Dealer;
    init_tracing();
    let a = start_node("a", &[]).await;
    let dir = fresh_dir("gossip-ipc");
    let bait = dir.join("bait.sock");
    let listener = tokio::net::UnixListener::bind(&bait).unwrap();
    let d = Dealer::connect(a.endpoint(), test_opts()).unwrap();
    let hello = codec::Hello {
        node_id: peerwire::Id::new(),
        name: "gossiper".into(),
        cluster: "default".into(),
        host: "127.0.0.3".into(),
        router_port: 9,
        pub_port: 9,
        peers: vec![format!("ipc://{}", bait.display())],
        ..Default::default()
    };
    send_hello(&d, &hello).await;
    within("the HELLO-ACK", d.recv()).await.unwrap();
    // (Waiting for something that must not happen: a bounded look.)
    let dialled = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
    assert!(dialled.is_err(), "A connected to a socket gossip named");
    a.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A call that waited for its place in a bulkhead is timed by its instance's breaker from
/// when it got the place: our own queueing never makes a healthy instance look slow (and
/// never opens its breaker).
#[tokio::test]
async fn waiting_in_a_bulkhead_is_not_counted_as_a_slow_call() {
    use peerwire::node::{BreakerConfig, BulkheadConfig};
    init_tracing();
    let server = start_node("server", &[]).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    server.handle("slow.op", V1, move |hold: bool, _| {
        let g = g.clone();
        async move {
            if hold {
                let _ = g.acquire().await.map(|p| p.forget());
            }
            Ok(())
        }
    });
    let slow_call = Duration::from_millis(100);
    let policy = ServicePolicy::new()
        .bulkhead(BulkheadConfig::new(1, 10))
        .breaker(
            BreakerConfig::default()
                .with_window(5, 5)
                .with_slow_calls(0.5, slow_call),
        );
    let client = Arc::new(
        Node::builder("client")
            .insecure()
            .peer(server.endpoint())
            .service("slow", policy)
            .socket_options(test_opts())
            .start()
            .await
            .unwrap(),
    );
    wait_service(&client, "slow.op", 1).await;
    let mut events = client.breaker_events();
    let long = CallOptions::timeout(Duration::from_secs(10));
    let call = |hold: bool| {
        let (c, o) = (client.clone(), long.clone());
        tokio::spawn(async move { c.request_with::<_, ()>("slow.op", &hold, o).await })
    };
    // One call holds the only place; four quick ones wait behind it.
    let mut calls = vec![call(true)];
    wait_until("the first in flight", || client.pending_calls() == 1).await;
    calls.extend((0..4).map(|_| call(false)));
    // What is measured is time itself: the four must wait longer than a slow call.
    tokio::time::sleep(slow_call * 2).await;
    gate.add_permits(1);
    for c in calls {
        within("a call's end", c).await.unwrap().unwrap();
    }
    // One slow call in five is under the slow-call rate: the breaker stayed closed.
    assert!(events.try_recv().is_err(), "the breaker changed state");
    client.request::<_, ()>("slow.op", &false).await.unwrap();
    assert_eq!(client.stats().breaker_refused, 0);
}
