//! Node benchmark: request/reply through the node runtime beside the bare transport
//! DEALER/ROUTER ping-pong it runs on, and a gather to 4 responders beside a 1:1
//! request, all in the same run. HdrHistogram of every round trip after a warm-up.
//!
//! Run: `cargo bench --bench node` (`-- --quick` for a short run).

use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use peerwire::codec::Version;
use peerwire::node::{CallOptions, GatherOptions, Node};
use peerwire::transport::{Dealer, Message, Router, SocketOptions};

mod common;
use common::{cells, hist, runtime, ROUNDS};

fn opts() -> SocketOptions {
    SocketOptions::default().with_heartbeat_interval(None)
}

async fn transport_pingpong(n: usize, warm: usize, h: &mut Histogram<u64>) {
    let router = Router::bind("tcp://127.0.0.1:0", opts()).await.unwrap();
    let ep = format!("tcp://{}", router.local_addr());
    let server = tokio::spawn(async move {
        while let Ok((id, m)) = router.recv().await {
            if router.send(&id, m).await.is_err() {
                break;
            }
        }
    });
    let dealer = Dealer::connect(&ep, opts()).unwrap();
    // Same shape as a node message: a small header frame and a 64-byte payload.
    let msg = Message::from_frames(vec![Bytes::from(vec![1u8; 90]), Bytes::from(vec![2u8; 64])]);
    for i in 0..warm + n {
        let t = Instant::now();
        dealer.send(msg.clone()).await.unwrap();
        dealer.recv().await.unwrap();
        if i >= warm {
            h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
    }
    dealer.close().await;
    server.abort();
}

/// What the client's call pipeline does besides choosing and sending.
#[derive(Clone, Copy)]
enum Guards {
    /// The defaults: a circuit breaker per instance, no bulkhead.
    Default,
    /// No breakers either.
    Bare,
    /// Breakers and a bulkhead on the service.
    Bulkhead,
}

async fn nodes(responders: usize) -> (Node, Vec<Node>) {
    nodes_with(responders, Guards::Default).await
}

async fn nodes_with(responders: usize, guards: Guards) -> (Node, Vec<Node>) {
    let mut rs = Vec::new();
    for i in 0..responders {
        let n = Node::builder(format!("r{i}"))
            .insecure()
            .socket_options(opts())
            .start()
            .await
            .unwrap();
        n.handle("bench.echo", Version::new(1, 0), |v: Bytes, _| async move {
            Ok(v)
        });
        n.handle_gather(
            "bench.gather",
            Version::new(1, 0),
            |v: Bytes, _| async move { Ok(v) },
        );
        rs.push(n);
    }
    let mut b = Node::builder("client").insecure().socket_options(opts());
    b = match guards {
        Guards::Default => b,
        Guards::Bare => b.no_breakers(),
        Guards::Bulkhead => b.service(
            "bench",
            peerwire::node::ServicePolicy::new()
                .bulkhead(peerwire::node::BulkheadConfig::new(1024, 1024)),
        ),
    };
    for r in &rs {
        b = b.peer(r.endpoint());
    }
    let client = b.start().await.unwrap();
    assert!(
        client
            .wait_for_service("bench.echo", responders, Duration::from_secs(10))
            .await
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.subscribers_of("bench.gather").len() < responders {
        assert!(Instant::now() < deadline, "responders did not subscribe");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (client, rs)
}

/// Request/reply to a responder on this host that the client learned from its HELLO
/// (the responder seeds the client), so the client dials it at its ipc socket; or, with
/// `ipc` false, both keep to TCP.
async fn node_request_same_host(ipc: bool, n: usize, warm: usize, h: &mut Histogram<u64>) {
    let client = Node::builder("client")
        .insecure()
        .ipc(ipc)
        .socket_options(opts())
        .start()
        .await
        .unwrap();
    let r = Node::builder("r")
        .insecure()
        .ipc(ipc)
        .peer(client.endpoint())
        .socket_options(opts())
        .start()
        .await
        .unwrap();
    r.handle("bench.echo", Version::new(1, 0), |v: Bytes, _| async move {
        Ok(v)
    });
    assert!(
        client
            .wait_for_service("bench.echo", 1, Duration::from_secs(10))
            .await
    );
    let dialled = client.peers()[0].dialled.to_string();
    assert_eq!(dialled.starts_with("ipc://"), ipc, "{dialled}");
    time_requests(&client, n, warm, h).await;
    client.shutdown().await;
    r.shutdown().await;
}

/// `warm` then `n` timed 64-byte requests to `bench.echo`, one at a time.
async fn time_requests(client: &Node, n: usize, warm: usize, h: &mut Histogram<u64>) {
    let payload = Bytes::from(vec![3u8; 64]);
    let o = CallOptions::timeout(Duration::from_secs(10));
    for i in 0..warm + n {
        let t = Instant::now();
        let _: Bytes = client
            .request_with("bench.echo", &payload, o.clone())
            .await
            .unwrap();
        if i >= warm {
            h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
    }
}

async fn node_request(n: usize, warm: usize, h: &mut Histogram<u64>) {
    node_request_with(Guards::Default, n, warm, h).await
}

async fn node_request_with(guards: Guards, n: usize, warm: usize, h: &mut Histogram<u64>) {
    let (client, rs) = nodes_with(1, guards).await;
    time_requests(&client, n, warm, h).await;
    client.shutdown().await;
    for r in rs {
        r.shutdown().await;
    }
}

async fn node_gather(responders: usize, n: usize, warm: usize, h: &mut Histogram<u64>) {
    let (client, rs) = nodes(responders).await;
    let payload = Bytes::from(vec![3u8; 64]);
    for i in 0..warm + n {
        let t = Instant::now();
        let g = client
            .gather::<_, Bytes>(
                "bench.gather",
                &payload,
                GatherOptions::within(Duration::from_secs(10)),
            )
            .await
            .unwrap();
        let out = g.finish().await;
        assert_eq!(out.replies.len(), responders);
        if i >= warm {
            h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
    }
    client.shutdown().await;
    for r in rs {
        r.shutdown().await;
    }
}

/// Responders as separate `peerwire node --serve echo` processes, as in a deployment:
/// request to one (`echo.echo`) and gather from all four (`echo.ping`), measured by a
/// client node in this process.
fn separate_processes(n: usize, warm: usize) {
    use std::io::BufRead;
    let mut children = Vec::new();
    let mut eps = Vec::new();
    // One thread per responder process: five processes share two cores here, and a
    // second worker per process only adds wake-ups. BENCH_NODE_ARGS overrides.
    let node_args = std::env::var("BENCH_NODE_ARGS").unwrap_or_else(|_| "--threads 1".into());
    for i in 0..4 {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_peerwire"))
            .env("PEERWIRE_MDNS", "off")
            .env("PEERWIRE_INSECURE", "1")
            .args(["node", "--name", &format!("p{i}"), "--serve", "echo"])
            .args(node_args.split_whitespace())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start a peerwire node process");
        let mut line = String::new();
        std::io::BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        eps.push(line.trim().to_string());
        children.push(c);
    }
    let rt = runtime(false);
    let (mut req, mut g4) = (hist(), hist());
    // CPU time spent by all five processes, per operation: what the cores must do, however
    // it overlaps. Read from the scheduler's per-thread run time (nanoseconds).
    let pids: Vec<u32> = std::iter::once(std::process::id())
        .chain(children.iter().map(|c| c.id()))
        .collect();
    let (mut req_cpu, mut g4_cpu) = (0u64, 0u64);
    let (mut req_own, mut g4_own) = (0u64, 0u64);
    rt.block_on(async {
        let mut b = Node::builder("client").insecure().socket_options(opts());
        for e in &eps {
            b = b.peer(e.clone());
        }
        let client = b.start().await.unwrap();
        assert!(
            client
                .wait_for_service("echo.echo", 4, Duration::from_secs(10))
                .await
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.subscribers_of("echo.ping").len() < 4 {
            assert!(Instant::now() < deadline, "responders did not subscribe");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let v = serde_json_value();
        for _ in 0..ROUNDS {
            let (mut c0, mut o0) = (0, 0);
            for i in 0..warm + n {
                if i == warm {
                    c0 = cpu_ns(&pids);
                    o0 = cpu_ns(&pids[..1]);
                }
                let t = Instant::now();
                let _: serde_json::Value = client.request("echo.echo", &v).await.unwrap();
                if i >= warm {
                    req.record(t.elapsed().as_nanos() as u64).unwrap();
                }
            }
            req_cpu += cpu_ns(&pids) - c0;
            req_own += cpu_ns(&pids[..1]) - o0;
            for i in 0..warm + n {
                if i == warm {
                    c0 = cpu_ns(&pids);
                    o0 = cpu_ns(&pids[..1]);
                }
                let t = Instant::now();
                let g = client
                    .gather::<_, serde_json::Value>(
                        "echo.ping",
                        &v,
                        GatherOptions::within(Duration::from_secs(10)),
                    )
                    .await
                    .unwrap();
                assert_eq!(g.finish().await.replies.len(), 4);
                if i >= warm {
                    g4.record(t.elapsed().as_nanos() as u64).unwrap();
                }
            }
            g4_cpu += cpu_ns(&pids) - c0;
            g4_own += cpu_ns(&pids[..1]) - o0;
        }
        client.shutdown().await;
    });
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    println!("\n## Responders as separate processes (µs)\n");
    println!("| what | p50 | p99 | p99.9 | max | p50 ratio |");
    println!("|---|---|---|---|---|---|");
    let base = req.value_at_quantile(0.5);
    println!(
        "{}",
        row("node request/reply to one process (base)", &req, base)
    );
    println!(
        "{}",
        row("node gather from 4 processes (vs request)", &g4, base)
    );
    let ops = (n * ROUNDS) as f64;
    let per_op = |ns: u64| ns as f64 / ops / 1000.0;
    let (rc, gc) = (per_op(req_cpu), per_op(g4_cpu));
    println!(
        "\nCPU time per operation, all five processes: request {rc:.1} µs (client {:.1}), \
         gather {gc:.1} µs (client {:.1}), {:.2}×; with the two cores of this machine a \
         gather cannot take less than {:.1} µs.",
        per_op(req_own),
        per_op(g4_own),
        gc / rc,
        gc / 2.0
    );
}

/// Run time of every thread of these processes so far, in nanoseconds (Linux schedstat).
fn cpu_ns(pids: &[u32]) -> u64 {
    let mut total = 0;
    for pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in dir.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                total += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

fn serde_json_value() -> serde_json::Value {
    serde_json::json!({ "payload": "x".repeat(48) })
}

fn row(name: &str, h: &Histogram<u64>, base: u64) -> String {
    format!("| {name} | {}", cells(h, base))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (n, warm, gn) = if quick {
        (2000, 200, 500)
    } else {
        (20_000, 2000, 5000)
    };
    let which = std::env::var("BENCH_RUNTIME").unwrap_or_default();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let only_request = only == "request";
    for (multi, name) in [
        (false, "current-thread runtime"),
        (true, "multi-thread runtime (2 workers)"),
    ] {
        if (which == "current" && multi) || (which == "multi" && !multi) || which == "processes" {
            continue;
        }
        let rt = runtime(multi);
        rt.block_on(async {
            let (mut tp, mut nr, mut g1, mut g4) = (hist(), hist(), hist(), hist());
            if only_request {
                node_request(n * 5, warm, &mut nr).await;
                return;
            }
            if only == "ipc" {
                // Same-host peers: request/reply over ipc:// against tcp:// loopback.
                let (mut tcp, mut ipc) = (hist(), hist());
                for _ in 0..ROUNDS {
                    node_request_same_host(false, n, warm, &mut tcp).await;
                    node_request_same_host(true, n, warm, &mut ipc).await;
                }
                println!("\n## Node request/reply to a same-host peer, 64 B, {name} (µs)\n");
                println!("| what | p50 | p99 | p99.9 | max | p50 ratio |");
                println!("|---|---|---|---|---|---|");
                let base = tcp.value_at_quantile(0.5);
                println!("{}", row("over tcp:// loopback (base)", &tcp, base));
                println!("{}", row("over ipc:// (chosen automatically)", &ipc, base));
                return;
            }
            if only == "guards" {
                // The cost of the resilience mechanisms on the request path.
                let (mut bare, mut bh) = (hist(), hist());
                for _ in 0..ROUNDS {
                    node_request_with(Guards::Bare, n, warm, &mut bare).await;
                    node_request_with(Guards::Default, n, warm, &mut nr).await;
                    node_request_with(Guards::Bulkhead, n, warm, &mut bh).await;
                }
                println!("\n## Node request/reply and its guards, 64 B, {name} (µs)\n");
                println!("| what | p50 | p99 | p99.9 | max | p50 ratio |");
                println!("|---|---|---|---|---|---|");
                let base = bare.value_at_quantile(0.5);
                println!("{}", row("no breakers, no bulkhead (base)", &bare, base));
                println!("{}", row("breakers (the default)", &nr, base));
                println!("{}", row("breakers and a bulkhead", &bh, base));
                return;
            }
            for _ in 0..ROUNDS {
                transport_pingpong(n, warm, &mut tp).await;
                node_request(n, warm, &mut nr).await;
                node_gather(1, gn, warm / 4, &mut g1).await;
                node_gather(4, gn, warm / 4, &mut g4).await;
            }
            println!("\n## Node round trips, 64 B payload, {name} (µs)\n");
            println!("| what | p50 | p99 | p99.9 | max | p50 ratio |");
            println!("|---|---|---|---|---|---|");
            let base = tp.value_at_quantile(0.5);
            println!(
                "{}",
                row("transport DEALER/ROUTER ping-pong (base)", &tp, base)
            );
            println!("{}", row("node request/reply (vs transport)", &nr, base));
            let nb = nr.value_at_quantile(0.5);
            println!(
                "{}",
                row("node gather, 1 responder (vs node request)", &g1, nb)
            );
            println!(
                "{}",
                row("node gather, 4 responders (vs node request)", &g4, nb)
            );
        });
    }
    if (which.is_empty() && only.is_empty()) || which == "processes" {
        separate_processes(n / 4, warm / 4);
    }
    println!("\n(histograms merge {ROUNDS} interleaved rounds)");
}
