//! Throughput of deliveries through the outbox (at least once, acknowledged), beside
//! plain one-way notifications, in the same run: without a key, sharded over 100 keys
//! (one message in flight per key), with the consumer's processed-messages table in
//! memory and on disk, and with the sender's outbox on disk too.
//!
//! Run: `cargo bench --bench channels` (`-- --quick` for a short run).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerwire::codec::Version;
use peerwire::dedup::{DiskTable, Idempotent, MemoryTable, ProcessedMessages};
use peerwire::node::{DeliveryOptions, HandlerError, Node, OutboxConfig};
use peerwire::transport::SocketOptions;

mod common;
use common::{runtime, ROUNDS};

const V1: Version = Version::new(1, 0);

#[derive(Clone, Copy, PartialEq)]
enum Way {
    /// `Node::notify`: one instance, no acknowledgement, nothing kept.
    Notify,
    /// `Node::deliver`, no key, no dedup.
    Deliver,
    /// Sharded over 100 keys, dedup in memory.
    KeysMemoryDedup,
    /// Sharded over 100 keys, dedup on disk (a durable commit per message).
    KeysDiskDedup,
    /// The same with the sender's outbox on disk as well.
    KeysDiskDedupDiskOutbox,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Notify => "notify (no acknowledgement, nothing kept)",
            Way::Deliver => "deliver, no key, no dedup",
            Way::KeysMemoryDedup => "deliver, 100 keys, dedup in memory",
            Way::KeysDiskDedup => "deliver, 100 keys, dedup on disk (redb)",
            Way::KeysDiskDedupDiskOutbox => "deliver, 100 keys, dedup and outbox on disk",
        }
    }
}

fn opts() -> SocketOptions {
    SocketOptions::default().with_heartbeat_interval(None)
}

fn consume<S: ProcessedMessages>(node: &Node, table: Option<S>, count: Arc<AtomicU64>) {
    match table {
        None => node.handle("bench.take", V1, move |_: u64, _| {
            count.fetch_add(1, Relaxed);
            async { Ok(()) }
        }),
        Some(t) => {
            let seen = Idempotent::new(t);
            node.handle("bench.take", V1, move |_: u64, ctx| {
                let (seen, count) = (seen.clone(), count.clone());
                async move {
                    seen.run(ctx.message_id, || async {
                        count.fetch_add(1, Relaxed);
                        Ok::<_, HandlerError>(())
                    })
                    .await?;
                    Ok(())
                }
            })
        }
    }
}

/// Messages per second from the first send to the last one handled (and, for
/// deliveries, acknowledged).
async fn run(way: Way, n: u64, dir: &std::path::Path) -> f64 {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let consumer = Node::builder("consumer")
        .insecure()
        .socket_options(opts())
        .start()
        .await
        .unwrap();
    let count = Arc::new(AtomicU64::new(0));
    match way {
        Way::Notify | Way::Deliver => consume::<MemoryTable>(&consumer, None, count.clone()),
        Way::KeysMemoryDedup => consume(
            &consumer,
            Some(MemoryTable::new(1_000_000, Duration::from_secs(600))),
            count.clone(),
        ),
        Way::KeysDiskDedup | Way::KeysDiskDedupDiskOutbox => consume(
            &consumer,
            Some(DiskTable::open(dir.join("dedup.redb"), Duration::from_secs(600)).unwrap()),
            count.clone(),
        ),
    }
    let mut outbox = OutboxConfig::default();
    outbox.max_messages = n as usize + 1;
    if way == Way::KeysDiskDedupDiskOutbox {
        outbox.path = Some(dir.join("outbox.redb"));
    }
    let sender = Node::builder("sender")
        .insecure()
        .outbox(outbox)
        .socket_options(opts())
        .peer(consumer.endpoint())
        .start()
        .await
        .unwrap();
    assert!(
        sender
            .wait_for_service("bench.take", 1, Duration::from_secs(10))
            .await
    );
    let t = Instant::now();
    for i in 0..n {
        match way {
            Way::Notify => sender.notify("bench.take", &i).await.unwrap(),
            Way::Deliver => {
                sender.deliver("bench.take", &i).await.unwrap();
            }
            _ => {
                let o = DeliveryOptions::default().with_shard_key(format!("k{}", i % 100));
                sender.deliver_with("bench.take", &i, o).await.unwrap();
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = count.load(Relaxed) >= n
            && (way == Way::Notify || sender.stats().outbox.delivered >= n);
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "{}: not all handled", way.name());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    sender.shutdown().await;
    consumer.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
    rate
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: u64 = if quick { 2_000 } else { 20_000 };
    let dir = std::env::temp_dir().join(format!("pw-bench-channels-{}", std::process::id()));
    let ways = [
        Way::Notify,
        Way::Deliver,
        Way::KeysMemoryDedup,
        Way::KeysDiskDedup,
        Way::KeysDiskDedupDiskOutbox,
    ];
    for (multi, name) in [
        (false, "current-thread runtime"),
        (true, "multi-thread runtime (2 workers)"),
    ] {
        let which = std::env::var("BENCH_RUNTIME").unwrap_or_default();
        if (which == "current" && multi) || (which == "multi" && !multi) {
            continue;
        }
        let rt = runtime(multi);
        let mut best = vec![0f64; ways.len()];
        rt.block_on(async {
            for _ in 0..ROUNDS {
                for (i, w) in ways.iter().enumerate() {
                    best[i] = best[i].max(run(*w, n, &dir).await);
                }
            }
        });
        println!("\n## Deliveries against notifications, 64-bit payload, {n} messages, {name}\n");
        println!("| way | msg/s (best of {ROUNDS}) | vs notify |");
        println!("|---|---|---|");
        for (i, w) in ways.iter().enumerate() {
            println!(
                "| {} | {:.0} | {:.2}× |",
                w.name(),
                best[i],
                best[i] / best[0]
            );
        }
    }
}
