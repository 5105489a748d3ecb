//! Fault injection with real processes: `peerwire node` instances made slow, killed with
//! SIGKILL, hung with SIGSTOP (and let go with SIGCONT), restarted one at a time with
//! SIGTERM, while a node in this test keeps calling them. Every process is on loopback
//! with mDNS off. The tests take turns (`one_at_a_time`): each loads the two cores with
//! several processes, and their bounds assume the machine is theirs.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use peerwire::node::{BreakerConfig, BreakerState, CallError, CallOptions, Node, ServicePolicy};
use serde_json::{json, Value};
use support::*;

/// Held by each test for its whole run.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

/// Runs blocking process work (starting a node, waiting for one to exit) without
/// stalling the runtime worker the caller node's tasks share.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A caller connected to `seed`, with `policy` for the `echo` service.
async fn caller(seed: &str, policy: ServicePolicy) -> Arc<Node> {
    Arc::new(
        Node::builder("caller")
            .insecure()
            .peer(seed)
            .service("echo", policy)
            .socket_options(test_opts())
            .start()
            .await
            .unwrap(),
    )
}

/// The id of the peer called `name`.
fn id_of(node: &Node, name: &str) -> peerwire::codec::Id {
    node.peers()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no peer {name}"))
        .id
}

/// Waits (bounded) for a breaker event of `instance` entering `to`.
async fn breaker_enters(
    events: &mut tokio::sync::broadcast::Receiver<peerwire::node::BreakerEvent>,
    instance: peerwire::codec::Id,
    to: BreakerState,
) {
    within_for(Duration::from_secs(20), "a breaker event", async {
        loop {
            match events.recv().await {
                Ok(e) if e.instance == instance && e.to == to => return,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
}

/// `lanes` tasks calling `echo.echo` with `opts` until `stop` is set, counting the calls
/// answered in `answered`; each returns its failures as text.
fn keep_calling(
    node: &Arc<Node>,
    lanes: usize,
    opts: CallOptions,
    stop: &Arc<AtomicBool>,
    answered: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<Vec<String>>> {
    (0..lanes)
        .map(|lane| {
            let (node, opts, stop) = (node.clone(), opts.clone(), stop.clone());
            let ok = answered.clone();
            tokio::spawn(async move {
                let mut failed = Vec::new();
                let mut i = 0u64;
                while !stop.load(Relaxed) {
                    i += 1;
                    let req = json!([lane, i]);
                    match node
                        .request_with::<_, Value>("echo.echo", &req, opts.clone())
                        .await
                    {
                        Ok(v) if v == req => {
                            ok.fetch_add(1, Relaxed);
                        }
                        Ok(v) => failed.push(format!("wrong reply {v}")),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                failed
            })
        })
        .collect()
}

/// Every lane's failures, once they have all ended.
async fn failures(lanes: Vec<tokio::task::JoinHandle<Vec<String>>>) -> Vec<String> {
    let mut failed = Vec::new();
    for l in lanes {
        failed.extend(within("a lane's end", l).await.unwrap());
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_instance_is_left_out_by_its_breaker() {
    let _turn = one_at_a_time().await;
    init_tracing();
    let fast = NodeProc::start("fast", &[]);
    let _other = NodeProc::start("fast2", &["--peer", &fast.endpoint]);
    let _slow = NodeProc::start("slow", &["--peer", &fast.endpoint, "--delay-ms", "1000"]);
    let breaker = BreakerConfig::default()
        .with_window(4, 2)
        .with_slow_calls(0.5, Duration::from_millis(100))
        .with_wait_in_open(Duration::from_secs(60));
    let a = caller(&fast.endpoint, ServicePolicy::new().breaker(breaker)).await;
    wait_service(&a, "echo.echo", 3).await;
    let slow = id_of(&a, "slow");
    let mut events = a.breaker_events();
    // Every call is answered; the slow one's breaker opens after its second slow call.
    for i in 0..12 {
        let v: Value = a.request("echo.echo", &json!(i)).await.unwrap();
        assert_eq!(v, json!(i));
    }
    breaker_enters(&mut events, slow, BreakerState::Open).await;
    // From then on no call waits for it: a second round never reaches it (its breaker
    // stays open for a minute), so none takes the second it would.
    for i in 0..12 {
        let started = std::time::Instant::now();
        let v: Value = a.request("echo.echo", &json!(i)).await.unwrap();
        assert_eq!(v, json!(i));
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "call {i} waited for the slow instance"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_call_costs_idempotent_calls_nothing() {
    let _turn = one_at_a_time().await;
    init_tracing();
    let one = NodeProc::start("one", &[]);
    let _two = NodeProc::start("two", &["--peer", &one.endpoint]);
    let mut victim = NodeProc::start("victim", &["--peer", &one.endpoint]);
    let a = caller(&one.endpoint, ServicePolicy::new()).await;
    wait_service(&a, "echo.echo", 3).await;
    let (stop, answered) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let opts = CallOptions::timeout(Duration::from_secs(5)).with_retries(2);
    let lanes = keep_calling(&a, 8, opts, &stop, &answered);
    wait_until("calls flowing", || a.pending_calls() > 0).await;
    victim.signal(libc::SIGKILL);
    let _ = blocking(|| victim.child.wait());
    wait_service(&a, "echo.echo", 2).await;
    // Calls go on without it: a few hundred more answered.
    let before = a.stats().breaker_refused;
    let mark = answered.load(Relaxed);
    wait_until("calls answered without it", || {
        answered.load(Relaxed) >= mark + 300
    })
    .await;
    stop.store(true, Relaxed);
    let failed = failures(lanes).await;
    let ok = answered.load(Relaxed);
    eprintln!("{ok} calls answered, {} failed", failed.len());
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 0);
    assert_eq!(a.stats().breaker_refused, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_instance_is_fenced_off_and_taken_back() {
    let _turn = one_at_a_time().await;
    init_tracing();
    let steady = NodeProc::start("steady", &[]);
    let flappy = NodeProc::start("flappy", &["--peer", &steady.endpoint]);
    let breaker = BreakerConfig::default()
        .with_window(4, 2)
        .with_wait_in_open(Duration::from_millis(500))
        .with_probes(1, Duration::from_millis(200));
    let policy = ServicePolicy::new()
        .timeout(Duration::from_millis(150))
        .breaker(breaker);
    let a = caller(&steady.endpoint, policy).await;
    wait_service(&a, "echo.echo", 2).await;
    let flappy_id = id_of(&a, "flappy");
    let mut events = a.breaker_events();
    // Calls keep coming, each answered by an instance or by the fallback, never later
    // than its deadline allows.
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, fallbacks) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut lanes = Vec::new();
    for _ in 0..4 {
        let (a, stop) = (a.clone(), stop.clone());
        let (answered, fallbacks) = (answered.clone(), fallbacks.clone());
        lanes.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                let started = std::time::Instant::now();
                let got = a
                    .request_or("echo.echo", &json!("x"), CallOptions::default(), |_| {
                        json!("fallback")
                    })
                    .await
                    .expect("answered");
                // The deadline (150 ms) with room for a loaded machine.
                assert!(started.elapsed() < Duration::from_secs(2));
                answered.fetch_add(1, Relaxed);
                fallbacks.fetch_add(got.is_fallback() as u64, Relaxed);
            }
        }));
    }
    // It hangs and wakes five times.
    for _ in 0..5 {
        flappy.signal(libc::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(300)).await;
        flappy.signal(libc::SIGCONT);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    breaker_enters(&mut events, flappy_id, BreakerState::Open).await;
    // Steady again: its breaker lets a probe through and closes.
    breaker_enters(&mut events, flappy_id, BreakerState::Closed).await;
    stop.store(true, Relaxed);
    for l in lanes {
        within("a lane's end", l).await.unwrap();
    }
    eprintln!(
        "{} calls answered, {} by the fallback",
        answered.load(Relaxed),
        fallbacks.load(Relaxed)
    );
    assert!(answered.load(Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_whose_last_link_hangs_degrades_and_recovers() {
    let _turn = one_at_a_time().await;
    init_tracing();
    // A (this test) → B (relay) → C (echo).
    let c = NodeProc::start("c", &[]);
    let mut b = NodeProc::start_with("b", &["--serve", "relay", "--peer", &c.endpoint]);
    let a = caller(&b.endpoint, ServicePolicy::new()).await;
    wait_service(&a, "relay.echo", 1).await;
    let a2 = a.clone();
    let relay = move |i: u64| {
        let a = a2.clone();
        async move {
            // B answers within its own 250 ms deadline for C; A allows for a loaded
            // machine.
            let opts = CallOptions::timeout(Duration::from_secs(3));
            let started = std::time::Instant::now();
            let v: Value = a
                .request_with("relay.echo", &json!(i), opts)
                .await
                .expect("A always gets an answer");
            (v, started.elapsed())
        }
    };
    // B reaches C (its presence line says so), and relays to it.
    blocking(|| {
        b.stderr
            .seen_or_wait("B joining C", Duration::from_secs(10), |l| {
                l.starts_with("+ joined  c ")
            })
    });
    assert!(relay(0).await.0.get("reply").is_some());

    // C hangs. A's calls are all answered, by B's fallback, well within A's deadline.
    c.signal(libc::SIGSTOP);
    let mut lanes = Vec::new();
    for lane in 0..4 {
        let relay = relay.clone();
        lanes.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..10 {
                out.push(relay(lane * 100 + i).await);
            }
            out
        }));
    }
    let mut fallbacks = 0;
    for l in lanes {
        for (v, took) in within("a lane", l).await.unwrap() {
            assert!(took < Duration::from_secs(3), "{took:?}: {v}");
            fallbacks += (v["fallback"] == json!(true)) as usize;
        }
    }
    assert!(
        fallbacks >= 30,
        "{fallbacks} of 40 answered by the fallback"
    );
    // B's breaker to C opened.
    b.stderr
        .seen_or_wait("B's breaker opening", Duration::from_secs(10), |l| {
            l.contains("breaker echo") && l.ends_with("Closed -> Open")
        });

    // C comes back: B's calls reach it again.
    c.signal(libc::SIGCONT);
    within_for(
        Duration::from_secs(20),
        "A's calls reaching C again",
        async {
            while relay(1).await.0.get("reply").is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_sigterm_restarts_fail_no_call() {
    let _turn = one_at_a_time().await;
    init_tracing();
    let a = Arc::new(
        Node::builder("caller")
            .insecure()
            .socket_options(test_opts())
            .start()
            .await
            .unwrap(),
    );
    let here = a.endpoint();
    let mut instances: Vec<NodeProc> = blocking(|| {
        (0..3)
            .map(|i| NodeProc::start(&format!("echo{i}"), &["--peer", &here]))
            .collect()
    });
    wait_service(&a, "echo.echo", 3).await;
    // 32 calls kept in flight, none marked idempotent: nothing is retried.
    let (stop, answered) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let lanes = keep_calling(
        &a,
        32,
        CallOptions::timeout(Duration::from_secs(5)),
        &stop,
        &answered,
    );
    // For a longer measurement (RELIABILITY.md), a pause between restarts: pacing, not
    // waiting for an event.
    let gap = std::env::var("PEERWIRE_ROLLING_GAP_MS")
        .ok()
        .and_then(|g| g.parse().ok())
        .map(Duration::from_millis);
    for round in 0..10 {
        if let Some(gap) = gap {
            tokio::time::sleep(gap).await;
        }
        let i = round % 3;
        assert!(
            instances[i].terminate(Duration::from_secs(10)),
            "clean exit"
        );
        instances[i] = NodeProc::start(&format!("echo{i}"), &["--peer", &here]);
        wait_until("the new instance serving", || {
            a.peers()
                .iter()
                .filter(|p| p.connected && !p.leaving && p.methods.contains_key("echo.echo"))
                .count()
                == 3
        })
        .await;
    }
    stop.store(true, Relaxed);
    let failed = failures(lanes).await;
    let ok = answered.load(Relaxed);
    eprintln!(
        "10 rolling SIGTERM restarts: {ok} calls answered, {} failed",
        failed.len()
    );
    assert!(ok > 1000, "{ok}");
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(10)]
    );
    let err = a.request::<_, Value>("nothing.here", &json!(1)).await;
    assert!(matches!(err, Err(CallError::NoResponder(_))), "{err:?}");
}
