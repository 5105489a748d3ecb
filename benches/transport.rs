//! Transport benchmark: DEALER/ROUTER ping-pong latency beside a raw tokio TCP ping-pong
//! and the `zeromq` crate, then one-way DEALER→ROUTER throughput against the `zeromq`
//! crate. Every round trip after the warm-up goes into an HdrHistogram.
//!
//! Run: `cargo bench --bench transport` (add `-- --quick` for a short run). Pin to one core
//! with `taskset -c 0 cargo bench --bench transport`. The three implementations run in
//! interleaved rounds in the same process, so their ratios are comparable even on a noisy
//! machine; absolute numbers are not. `BENCH_CLIENT=task` runs each measuring loop on a
//! spawned task instead of the runtime's main future (see `measure`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use peerwire::transport::{Dealer, Message, Router, SocketOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

mod common;
use common::{cells, hist, runtime, ROUNDS};

#[derive(Clone)]
struct Plan {
    size: usize,
    warmup: usize,
    samples: usize,
}

fn plans(quick: bool) -> Vec<Plan> {
    let f = if quick { 10 } else { 1 };
    // BENCH_SIZES=64,1024 keeps only those sizes (to profile one, say).
    let sizes: Option<Vec<usize>> = std::env::var("BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect());
    let mut all = vec![
        Plan {
            size: 64,
            warmup: 2000 / f,
            samples: 20_000 / f,
        },
        Plan {
            size: 1024,
            warmup: 2000 / f,
            samples: 20_000 / f,
        },
        Plan {
            size: 64 * 1024,
            warmup: 500 / f,
            samples: 4000 / f,
        },
        Plan {
            size: 1 << 20,
            warmup: 50 / f,
            samples: 400 / f,
        },
    ];
    if let Some(sizes) = sizes {
        all.retain(|p| sizes.contains(&p.size));
    }
    all
}

/// Raw tokio TCP: 4-byte length prefix, TCP_NODELAY, echo server.
async fn raw_tcp(plan: &Plan, h: &mut Histogram<u64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = Vec::new();
        loop {
            let mut hdr = [0u8; 4];
            if s.read_exact(&mut hdr).await.is_err() {
                return;
            }
            let n = u32::from_be_bytes(hdr) as usize;
            buf.resize(4 + n, 0);
            buf[..4].copy_from_slice(&hdr);
            if s.read_exact(&mut buf[4..]).await.is_err() {
                return;
            }
            if s.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    let mut out = (plan.size as u32).to_be_bytes().to_vec();
    out.extend(std::iter::repeat_n(0xABu8, plan.size));
    let mut back = vec![0u8; 4 + plan.size];
    for i in 0..plan.warmup + plan.samples {
        let t = Instant::now();
        c.write_all(&out).await.unwrap();
        c.read_exact(&mut back).await.unwrap();
        if i >= plan.warmup {
            h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
    }
    drop(c);
    let _ = server.await;
}

async fn peerwire_pingpong(plan: &Plan, h: &mut Histogram<u64>) {
    let opts = SocketOptions::default().with_heartbeat_interval(None);
    pingpong_with(plan, h, opts.clone(), opts).await
}

/// The ping-pong with these options for the ROUTER and the DEALER.
async fn pingpong_with(
    plan: &Plan,
    h: &mut Histogram<u64>,
    server: SocketOptions,
    client: SocketOptions,
) {
    pingpong_at("tcp://127.0.0.1:0", plan, h, server, client).await
}

/// The ping-pong with the ROUTER bound at `bind` (`tcp://…` or `ipc://…`).
async fn pingpong_at(
    bind: &str,
    plan: &Plan,
    h: &mut Histogram<u64>,
    server: SocketOptions,
    client: SocketOptions,
) {
    let opts = client;
    let router = Router::bind(bind, server).await.unwrap();
    let endpoint = router.local_endpoint();
    let server = tokio::spawn(async move {
        while let Ok((id, m)) = router.recv().await {
            if router.send(&id, m).await.is_err() {
                break;
            }
        }
    });
    let dealer = Dealer::connect(&endpoint, opts).unwrap();
    let msg = Message::from(Bytes::from(vec![0xABu8; plan.size]));
    for i in 0..plan.warmup + plan.samples {
        let t = Instant::now();
        dealer.send(msg.clone()).await.unwrap();
        let r = dealer.recv().await.unwrap();
        if i >= plan.warmup {
            h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
        debug_assert_eq!(r.byte_len(), plan.size);
    }
    dealer.close().await;
    server.abort();
}

async fn zeromq_pingpong(plan: &Plan, h: &mut Histogram<u64>) {
    let mut router = zeromq::RouterSocket::new();
    let endpoint = router.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
    let server = tokio::spawn(async move {
        while let Ok(m) = router.recv().await {
            if router.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut dealer = zeromq::DealerSocket::new();
    dealer.connect(&endpoint).await.unwrap();
    let payload = Bytes::from(vec![0xABu8; plan.size]);
    for i in 0..plan.warmup + plan.samples {
        let t = Instant::now();
        dealer
            .send(ZmqMessage::from(payload.clone()))
            .await
            .unwrap();
        let _ = dealer.recv().await.unwrap();
        if i >= plan.warmup {
            h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
    }
    drop(dealer);
    server.abort();
}

fn row(name: &str, size: usize, h: &Histogram<u64>, base_p50: u64) -> String {
    format!("| {name} | {} | {}", human(size), cells(h, base_p50))
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1 << 20 => format!("{} MiB", n >> 20),
        n if n >= 1024 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

/// One-way throughput: `n` messages DEALER→ROUTER; returns messages per second and how
/// many arrived.
async fn peerwire_throughput(n: usize, size: usize) -> (f64, usize) {
    let opts = SocketOptions::default().with_heartbeat_interval(None);
    let router = Router::bind("tcp://127.0.0.1:0", opts.clone())
        .await
        .unwrap();
    let dealer = Dealer::connect(format!("tcp://{}", router.local_addr()), opts).unwrap();
    // Connect first so the measurement is of steady state.
    dealer.send("hi".into()).await.unwrap();
    router.recv().await.unwrap();
    let msg = Message::from(Bytes::from(vec![1u8; size]));
    let recv = tokio::spawn(async move {
        let mut got = 0;
        // One bound for the whole run (not one timer per message, which would be
        // measured too): anything lost shows as a shortfall when it expires.
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while got < n && router.recv().await.is_ok() {
                got += 1;
            }
        })
        .await;
        (got, Instant::now())
    });
    let t = Instant::now();
    for _ in 0..n {
        dealer.send(msg.clone()).await.unwrap();
    }
    let (got, end) = recv.await.unwrap();
    (got as f64 / end.duration_since(t).as_secs_f64(), got)
}

async fn zeromq_throughput(n: usize, size: usize) -> (f64, usize) {
    let mut router = zeromq::RouterSocket::new();
    let endpoint = router.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
    let mut dealer = zeromq::DealerSocket::new();
    dealer.connect(&endpoint).await.unwrap();
    dealer.send("hi".into()).await.unwrap();
    router.recv().await.unwrap();
    let payload = Bytes::from(vec![1u8; size]);
    let recv = tokio::spawn(async move {
        let mut got = 0;
        // One bound for the whole run (not one timer per message, which would be
        // measured too): anything lost shows as a shortfall when it expires.
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while got < n && router.recv().await.is_ok() {
                got += 1;
            }
        })
        .await;
        (got, Instant::now())
    });
    let t = Instant::now();
    for _ in 0..n {
        dealer
            .send(ZmqMessage::from(payload.clone()))
            .await
            .unwrap();
    }
    let (got, end) = recv.await.unwrap();
    (got as f64 / end.duration_since(t).as_secs_f64(), got)
}

/// One round's measuring loop, on the benchmark's main task (`block_on`), or with
/// `BENCH_CLIENT=task` on a task of its own, as a service's code usually runs. The
/// difference is tokio's, not the sockets': when another task wakes the `block_on`
/// future, the current-thread runtime polls its I/O driver once more (an `epoll_wait`)
/// before polling it, which a raw socket read by the main task itself never triggers.
async fn measure<F, Fut>(task: bool, plan: &Plan, h: Histogram<u64>, f: F) -> Histogram<u64>
where
    F: FnOnce(Plan, Histogram<u64>) -> Fut,
    Fut: std::future::Future<Output = Histogram<u64>> + Send + 'static,
{
    let fut = f(plan.clone(), h);
    if task {
        tokio::spawn(fut).await.expect("measuring task")
    } else {
        fut.await
    }
}

async fn latency(quick: bool) {
    println!("| implementation | size | p50 | p99 | p99.9 | max | p50 vs raw |");
    println!("|---|---|---|---|---|---|---|");
    for plan in plans(quick) {
        let (mut raw, mut pw, mut zq) = (hist(), hist(), hist());
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        let task = std::env::var("BENCH_CLIENT").as_deref() == Ok("task");
        for _ in 0..ROUNDS {
            if only.is_empty() || only == "raw" {
                raw = measure(task, &plan, raw, |p, mut h| async move {
                    raw_tcp(&p, &mut h).await;
                    h
                })
                .await;
            }
            if only.is_empty() || only == "peerwire" {
                pw = measure(task, &plan, pw, |p, mut h| async move {
                    peerwire_pingpong(&p, &mut h).await;
                    h
                })
                .await;
            }
            if only.is_empty() || only == "zeromq" {
                zq = measure(task, &plan, zq, |p, mut h| async move {
                    zeromq_pingpong(&p, &mut h).await;
                    h
                })
                .await;
            }
        }
        if !only.is_empty() {
            continue;
        }
        let base = raw.value_at_quantile(0.5);
        println!("{}", row("raw tokio TCP", plan.size, &raw, base));
        println!("{}", row("peerwire DEALER/ROUTER", plan.size, &pw, base));
        println!(
            "{}",
            row("zeromq crate DEALER/ROUTER", plan.size, &zq, base)
        );
    }
}

/// A raw ping-pong over a Unix domain socket (the floor for ipc, as `raw_tcp` is for TCP).
async fn raw_unix(plan: &Plan, h: &mut Histogram<u64>, path: &std::path::Path) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let size = plan.size;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; size];
        while s.read_exact(&mut buf).await.is_ok() {
            if s.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let mut c = tokio::net::UnixStream::connect(path).await.unwrap();
    let (msg, mut back) = (vec![0xABu8; size], vec![0u8; size]);
    for i in 0..plan.warmup + plan.samples {
        let t = Instant::now();
        c.write_all(&msg).await.unwrap();
        c.read_exact(&mut back).await.unwrap();
        if i >= plan.warmup {
            h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
    }
    drop(c);
    server.abort();
    let _ = std::fs::remove_file(path);
}

/// ipc:// against tcp:// loopback: raw and through peerwire's DEALER/ROUTER, in
/// interleaved rounds.
async fn ipc_cost(quick: bool) {
    let dir = std::env::temp_dir().join(format!("pw-bench-ipc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (raw_path, pw_ipc) = (
        dir.join("raw"),
        format!("ipc://{}", dir.join("pw").display()),
    );
    let opts = SocketOptions::default().with_heartbeat_interval(None);
    println!("| implementation | size | p50 | p99 | p99.9 | max | p50 vs raw tcp |");
    println!("|---|---|---|---|---|---|---|");
    for plan in plans(quick) {
        let (mut rt, mut ru, mut pt, mut pu) = (hist(), hist(), hist(), hist());
        for _ in 0..ROUNDS {
            raw_tcp(&plan, &mut rt).await;
            raw_unix(&plan, &mut ru, &raw_path).await;
            pingpong_at(
                "tcp://127.0.0.1:0",
                &plan,
                &mut pt,
                opts.clone(),
                opts.clone(),
            )
            .await;
            pingpong_at(&pw_ipc, &plan, &mut pu, opts.clone(), opts.clone()).await;
        }
        let base = rt.value_at_quantile(0.5);
        println!("{}", row("raw tokio TCP", plan.size, &rt, base));
        println!("{}", row("raw tokio Unix socket", plan.size, &ru, base));
        println!("{}", row("peerwire tcp://", plan.size, &pt, base));
        println!("{}", row("peerwire ipc://", plan.size, &pu, base));
        println!(
            "| peerwire ipc:// over tcp:// | {} | {:.2}× | | | | |",
            human(plan.size),
            pu.value_at_quantile(0.5) as f64 / pt.value_at_quantile(0.5).max(1) as f64
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// CURVE against NULL: the round trip at each size, and a connection's set-up (connect,
/// handshake, first round trip).
async fn curve_cost(quick: bool) {
    use peerwire::transport::curve::{Curve, CurveKeys};
    let base = SocketOptions::default().with_heartbeat_interval(None);
    let (sk, ck) = (CurveKeys::generate(), CurveKeys::generate());
    let server = base.clone().with_curve(Some(Curve::new(sk.clone())));
    let client = base
        .clone()
        .with_curve(Some(Curve::new(ck).server_key(sk.public())));
    println!("| mechanism | size | p50 | p99 | p99.9 | max | p50 vs NULL |");
    println!("|---|---|---|---|---|---|---|");
    for plan in plans(quick) {
        let (mut null, mut curve) = (hist(), hist());
        for _ in 0..ROUNDS {
            pingpong_with(&plan, &mut null, base.clone(), base.clone()).await;
            pingpong_with(&plan, &mut curve, server.clone(), client.clone()).await;
        }
        let b = null.value_at_quantile(0.5);
        println!("{}", row("NULL", plan.size, &null, b));
        println!("{}", row("CURVE", plan.size, &curve, b));
    }
    // Set-up: a fresh DEALER each time, to its first reply.
    let n = if quick { 20 } else { 200 };
    let (mut null, mut curve, mut cluster) = (hist(), hist(), hist());
    // A cluster with a secret: every server proves the shared key, then its own in READY.
    let shared = CurveKeys::generate();
    let (cluster_s, cluster_c) = (
        base.clone()
            .with_curve(Some(Curve::new(sk.clone()).cluster(shared.clone()))),
        base.clone().with_curve(Some(
            Curve::new(CurveKeys::generate()).cluster(shared.clone()),
        )),
    );
    for (opts_s, opts_c, h) in [
        (base.clone(), base.clone(), &mut null),
        (server.clone(), client.clone(), &mut curve),
        (cluster_s, cluster_c, &mut cluster),
    ] {
        let router = Router::bind("tcp://127.0.0.1:0", opts_s).await.unwrap();
        let endpoint = format!("tcp://{}", router.local_addr());
        let echo = tokio::spawn(async move {
            while let Ok((id, m)) = router.recv().await {
                let _ = router.send(&id, m).await;
            }
        });
        for _ in 0..n {
            let t = Instant::now();
            let d = Dealer::connect(&endpoint, opts_c.clone()).unwrap();
            d.send(Message::from(Bytes::from_static(b"x")))
                .await
                .unwrap();
            d.recv().await.unwrap();
            h.record(t.elapsed().as_nanos() as u64).unwrap();
            d.close().await;
        }
        echo.abort();
    }
    let b = null.value_at_quantile(0.5);
    println!(
        "{}",
        row("NULL: connect, handshake, first round trip", 1, &null, b)
    );
    println!(
        "{}",
        row("CURVE: connect, handshake, first round trip", 1, &curve, b)
    );
    println!(
        "{}",
        row("CURVE, cluster secret (+ node proof)", 1, &cluster, b)
    );
}

async fn throughput(quick: bool) {
    let n = if quick { 50_000 } else { 500_000 };
    println!("| implementation | msg/s | received | vs zeromq |");
    println!("|---|---|---|---|");
    let mut best = (0.0f64, 0usize, 0.0f64, 0usize);
    for _ in 0..ROUNDS {
        let (p, pg) = peerwire_throughput(n, 64).await;
        let (z, zg) = zeromq_throughput(n, 64).await;
        if p > best.0 {
            best.0 = p;
            best.1 = pg;
        }
        if z > best.2 {
            best.2 = z;
            best.3 = zg;
        }
        assert_eq!(pg, n, "peerwire lost messages");
    }
    println!(
        "| peerwire | {:.0} | {}/{n} | {:.2}× |",
        best.0,
        best.1,
        best.0 / best.2
    );
    println!("| zeromq crate | {:.0} | {}/{n} | 1.00× |", best.2, best.3);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let has = |a: &str| args.iter().any(|x| x == a);
    let quick = has("--quick");
    let only_throughput = has("--throughput");
    let only_latency = has("--latency");
    // Both runtimes: the multi-threaded one is what services use; the current-thread one
    // removes cross-thread wake-ups, the closest thing to pinning everything on one core.
    let which = std::env::var("BENCH_RUNTIME").unwrap_or_default();
    for (multi, name) in [
        (false, "current-thread runtime"),
        (true, "multi-thread runtime (2 workers)"),
    ] {
        if (which == "current" && multi) || (which == "multi" && !multi) {
            continue;
        }
        let rt = runtime(multi);
        if std::env::var("BENCH_ONLY").as_deref() == Ok("ipc") {
            println!("\n## ipc:// against tcp:// loopback, DEALER/ROUTER, {name} (µs)\n");
            rt.block_on(ipc_cost(quick));
            continue;
        }
        if std::env::var("BENCH_ONLY").as_deref() == Ok("curve") {
            println!("\n## CURVE against NULL, DEALER/ROUTER, {name} (µs)\n");
            rt.block_on(curve_cost(quick));
            continue;
        }
        if !only_throughput {
            println!("\n## Round-trip latency, one message in flight, {name} (µs)\n");
            rt.block_on(latency(quick));
        }
        if !only_latency {
            println!("\n## One-way DEALER→ROUTER throughput, 64 B, {name}\n");
            rt.block_on(throughput(quick));
        }
    }
    println!("\n(histograms merge {ROUNDS} interleaved rounds per implementation; throughput is the best of {ROUNDS} interleaved rounds)");
}
