//! `peerwire demo`: several nodes on loopback in this process, each interaction style in
//! turn, with what was sent, by whom, what came back and how long it took; then
//! resilience (`demo_resilience`) and delivery guarantees (`demo_channels`).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use peerwire::codec::Version;
use peerwire::discovery::MdnsConfig;
use peerwire::node::{GatherOptions, HandlerError, Node};
use peerwire::transport::curve::CurveKeys;
use serde::{Deserialize, Serialize};

use super::demo_resilience as resilience;

#[derive(Debug, Serialize, Deserialize)]
struct Reserve {
    item: String,
    qty: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Reserved {
    by: String,
    item: String,
    left: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct StockLow {
    item: String,
    left: u32,
}

pub(super) const V1: Version = Version::new(1, 0);

pub(super) fn micros(d: Duration) -> String {
    if d < Duration::from_millis(10) {
        format!("{} µs", d.as_micros())
    } else {
        format!("{} ms", d.as_millis())
    }
}

pub(super) fn section(title: &str) {
    outln!("\n── {title} ──");
}

/// A node of the demo: secured with a key pair made for this run (CURVE on every
/// connection, its id derived from its key), found by mDNS on the private loopback when
/// there is one (its key in the announcement), otherwise through static seeds and their
/// keys.
pub(super) fn builder(name: &str, mdns: bool, seeds: &[&Node]) -> peerwire::node::NodeBuilder {
    let mut b = Node::builder(name).secure(CurveKeys::generate());
    if mdns {
        b = b.mdns(MdnsConfig::loopback());
    } else {
        for s in seeds {
            let key = s.public_key().expect("demo nodes are secured");
            b = b.peer_with_key(s.endpoint(), key);
        }
    }
    b
}

async fn inventory(name: &str, stock: u32, slow: bool, mdns: bool) -> Result<Node> {
    let node = builder(name, mdns, &[]).start().await?;
    let left = Arc::new(AtomicU32::new(stock));
    let (n, l) = (name.to_string(), left.clone());
    node.handle("inventory.reserve", V1, move |r: Reserve, _| {
        let (n, l) = (n.clone(), l.clone());
        async move {
            let before = l.load(Ordering::SeqCst);
            if r.qty > before {
                return Err(HandlerError::new(
                    "out_of_stock",
                    format!("{n} has only {before} {}", r.item),
                ));
            }
            let left = l.fetch_sub(r.qty, Ordering::SeqCst) - r.qty;
            Ok(Reserved {
                by: n,
                item: r.item,
                left,
            })
        }
    });
    let (n, l) = (name.to_string(), left.clone());
    node.handle("inventory.restock", V1, move |qty: u32, _| {
        let (n, l) = (n.clone(), l.clone());
        async move {
            let now = l.fetch_add(qty, Ordering::SeqCst) + qty;
            outln!("    {n} handled the notification: restocked {qty}, now {now}");
            Ok(())
        }
    });
    let (n, l) = (name.to_string(), left);
    node.handle_gather("inventory.count", V1, move |item: String, _| {
        let (n, l) = (n.clone(), l.clone());
        async move {
            if slow {
                // Deliberately past the gather window: reported as silent.
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Ok(format!("{n}: {} {item}", l.load(Ordering::SeqCst)))
        }
    });
    Ok(node)
}

/// Runs the demo. Nothing leaves the host: every node binds 127.0.0.1, and mDNS runs only
/// inside the private network namespace `net` says was set up (else static seeds).
pub async fn run(net: Result<(), String>) -> Result<()> {
    let t0 = Instant::now();
    let mdns = net.is_ok();
    outln!("peerwire demo: five nodes on 127.0.0.1, no broker");
    match &net {
        Ok(()) => outln!(
            "  discovery: mDNS on loopback, inside a network namespace of this process's own"
        ),
        Err(why) => outln!("  discovery: static seeds (no private network for mDNS: {why})"),
    }
    outln!(
        "  security: CURVE on every connection, a key pair generated for each node of this \
         run, node ids derived from the keys"
    );
    let inv1 = inventory("inventory-1", 10, false, mdns).await?;
    let inv2 = inventory("inventory-2", 10, false, mdns).await?;
    let inv3 = inventory("inventory-3", 10, true, mdns).await?;
    // Pricing, for part 6: on inventory-1 and inventory-2, the second made to hang.
    let (stopped_tx, mut stopped) = tokio::sync::mpsc::unbounded_channel();
    let hung = Arc::new(AtomicBool::new(false));
    resilience::serve_pricing(&inv1, Arc::new(AtomicBool::new(false)), stopped_tx.clone());
    resilience::serve_pricing(&inv2, hung.clone(), stopped_tx);
    let watcher = builder("watcher", mdns, &[&inv1]).start().await?;
    let client = builder("client", mdns, &[&inv1, &inv2, &inv3])
        .service("pricing", resilience::pricing_policy())
        .start()
        .await?;
    for n in [&inv1, &inv2, &inv3, &watcher, &client] {
        outln!(
            "  {:<12} router {}  pub {}",
            n.name(),
            n.endpoint(),
            n.pub_endpoint()
        );
    }
    if !client
        .wait_for_service("inventory.reserve", 3, Duration::from_secs(5))
        .await
    {
        bail!("the client did not discover the inventory nodes");
    }
    outln!(
        "  client knows {} peers after {} ({}, then a HELLO with each)",
        client.peers().len(),
        micros(t0.elapsed()),
        if mdns { "mDNS" } else { "static seeds" }
    );

    section("1. request/response (sync, 1-1)");
    for qty in [2, 50] {
        let req = Reserve {
            item: "book".into(),
            qty,
        };
        outln!(
            "  client → inventory.reserve {}",
            serde_json::to_string(&req)?
        );
        let t = Instant::now();
        match client
            .request::<_, Reserved>("inventory.reserve", &req)
            .await
        {
            Ok(r) => outln!(
                "    ← {}: reserved, {} left  ({})",
                r.by,
                r.left,
                micros(t.elapsed())
            ),
            Err(e) => outln!("    ← error: {e}  ({})", micros(t.elapsed())),
        }
    }
    let t = Instant::now();
    match client.request::<_, Reserved>("billing.charge", &1).await {
        Ok(_) => bail!("billing.charge should have no responder"),
        Err(e) => outln!("  client → billing.charge: {e}  ({})", micros(t.elapsed())),
    }

    section("2. asynchronous request/response (async, 1-1)");
    let t = Instant::now();
    let mut handles = Vec::new();
    for i in 0..4 {
        let req = Reserve {
            item: format!("pen-{i}"),
            qty: 1,
        };
        handles.push(
            client
                .request_async::<_, Reserved>("inventory.reserve", &req)
                .await?,
        );
    }
    outln!(
        "  client sent 4 requests in {} without waiting",
        micros(t.elapsed())
    );
    for h in handles {
        let r = h.recv().await?;
        outln!(
            "    ← {} reserved {}  ({} since sending)",
            r.by,
            r.item,
            micros(t.elapsed())
        );
    }

    section("3. one-way notification (async, 1-1)");
    for qty in [5, 6, 7] {
        outln!("  client → inventory.restock {qty} (to exactly one instance)");
        client.notify("inventory.restock", &qty).await?;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    section("4. publish/subscribe (async, 1-many)");
    let mut sub = watcher.subscribe::<StockLow>("stock.");
    let deadline = Instant::now() + Duration::from_secs(5);
    while inv1.subscribers_of("stock.low").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for left in [3, 2, 1] {
        let e = StockLow {
            item: "book".into(),
            left,
        };
        inv1.publish("stock.low", &e)?;
        outln!(
            "  inventory-1 published stock.low {}",
            serde_json::to_string(&e)?
        );
    }
    for _ in 0..3 {
        let t = Instant::now();
        match tokio::time::timeout(Duration::from_secs(5), sub.recv()).await {
            Ok(Some(Ok(e))) => outln!(
                "    watcher got {} #{} ({} missed): {} left  ({})",
                e.topic,
                e.seq,
                e.missed,
                e.value.left,
                micros(t.elapsed())
            ),
            other => bail!("watcher did not get the event: {other:?}"),
        }
    }

    section("5. publish/async responses (async, 1-many): gather");
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.subscribers_of("inventory.count").len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    outln!("  client gathers inventory.count \"book\" within 300 ms");
    let t = Instant::now();
    let mut g = client
        .gather::<_, String>(
            "inventory.count",
            "book",
            GatherOptions::within(Duration::from_millis(300)),
        )
        .await?;
    outln!("    expecting: {}", super::names(g.expected()));
    while let Some(r) = g.next().await {
        match r.result {
            Ok(v) => outln!("    ← {v}  ({})", micros(r.elapsed)),
            Err(e) => outln!("    ← {}: error {e}", r.name),
        }
    }
    let out = g.finish().await;
    outln!(
        "    ended: {:?} after {}; silent: {}",
        out.end,
        micros(t.elapsed()),
        super::names(&out.silent)
    );

    resilience::run(&client, &hung, &mut stopped).await?;
    super::demo_channels::run(&client, mdns, &inv1).await?;

    section("shutdown");
    for n in [client, watcher, inv1, inv2, inv3] {
        let name = n.name().to_string();
        n.shutdown().await;
        outln!("  {name} stopped");
    }
    outln!("\ndemo finished in {}", micros(t0.elapsed()));
    Ok(())
}
