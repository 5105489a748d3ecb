//! The demo's delivery part: competing consumers, order by shard key through a consumer
//! leaving, a copy skipped by the processed-messages table, and an outbox holding a
//! message until its consumer starts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use peerwire::dedup::{Idempotent, MemoryTable, Outcome};
use peerwire::node::{DeliveryOptions, HandlerError, Node, Stage};
use tokio::sync::mpsc;

use super::demo::{builder, micros, section, V1};

/// What a consumer did with a message: (consumer, message, skipped as a copy).
type Seen = (String, String, bool);

/// A consumer of `shipping.ship`: handles each message id once (a copy is skipped) and
/// says so on `seen`. For a message starting "lost-ack:", the first acknowledgement is
/// lost (simulated: the handler fails after the work is done and recorded), so the
/// sender sends it again.
fn consume(node: &Node, seen: &mpsc::UnboundedSender<Seen>) {
    let table = Idempotent::new(MemoryTable::new(10_000, Duration::from_secs(600)));
    let (name, seen) = (node.name().to_string(), seen.clone());
    let lost = Arc::new(AtomicBool::new(false));
    node.handle("shipping.ship", V1, move |what: String, ctx| {
        let (table, name, seen, lost) = (table.clone(), name.clone(), seen.clone(), lost.clone());
        async move {
            let out = table
                .run(ctx.message_id, || async { Ok::<_, HandlerError>(()) })
                .await?;
            let _ = seen.send((name, what.clone(), out == Outcome::Duplicate));
            if what.starts_with("lost-ack:") && !lost.swap(true, Ordering::SeqCst) {
                return Err(HandlerError::new(
                    "ack_lost",
                    "simulated: the acknowledgement was lost",
                ));
            }
            Ok(())
        }
    });
}

/// The next `n` things the consumers did, within a bound.
async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>, n: usize) -> Result<Vec<Seen>> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(s)) => out.push(s),
            _ => bail!("the consumers handled {} of {n} messages", out.len()),
        }
    }
    Ok(out)
}

/// Waits until `client` sees `n` instances of `shipping.ship`.
async fn instances(client: &Node, target: &str, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while client
        .peers()
        .iter()
        .filter(|p| p.connected && p.methods.contains_key(target))
        .count()
        != n
    {
        if Instant::now() >= deadline {
            bail!("the client did not see {n} instance(s) of {target}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

pub async fn run(client: &Node, mdns: bool, seed: &Node) -> Result<()> {
    section("7. delivery guarantees: competing consumers, order by key, copies, outbox");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut shipping = Vec::new();
    for name in ["shipping-1", "shipping-2", "shipping-3"] {
        let n = builder(name, mdns, &[seed]).start().await?;
        consume(&n, &tx);
        shipping.push(n);
    }
    instances(client, "shipping.ship", 3).await?;
    outln!("  client delivers 6 messages to shipping.ship (at least once; acknowledged by the handler)");
    for i in 1..=6 {
        client
            .deliver("shipping.ship", &format!("parcel-{i}"))
            .await?;
    }
    let mut got = next(&mut rx, 6).await?;
    got.sort_by(|a, b| a.1.cmp(&b.1));
    for (who, what, _) in &got {
        outln!("    {what} → {who}");
    }
    outln!("    each to exactly one of the three competing consumers");

    outln!("  client delivers 3 messages for each of the keys order-A, order-B, order-C");
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let keyed = |key: &str, i: u32| {
        let opts = DeliveryOptions::default().with_shard_key(key);
        (format!("{key}#{i}"), opts)
    };
    for i in 1..=3 {
        for key in ["order-A", "order-B", "order-C"] {
            let (what, opts) = keyed(key, i);
            client.deliver_with("shipping.ship", &what, opts).await?;
        }
    }
    for (who, what, _) in next(&mut rx, 9).await? {
        let key = what.split('#').next().unwrap_or("").to_string();
        owner.entry(key).or_insert(who);
    }
    for (key, who) in &owner {
        outln!("    {key}: #1, #2, #3 → {who}, in order");
    }
    // The owner of order-A leaves; its keys move, the others stay.
    let leaving = owner["order-A"].clone();
    let Some(idx) = shipping.iter().position(|n| n.name() == leaving) else {
        bail!("order-A was handled by {leaving}, which is not one of the demo's consumers");
    };
    shipping.remove(idx).shutdown().await;
    instances(client, "shipping.ship", 2).await?;
    outln!("  {leaving} leaves; client delivers #4 to #6 of each key");
    for i in 4..=6 {
        for key in ["order-A", "order-B", "order-C"] {
            let (what, opts) = keyed(key, i);
            client.deliver_with("shipping.ship", &what, opts).await?;
        }
    }
    let mut after: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for (who, what, _) in next(&mut rx, 9).await? {
        let mut parts = what.split('#');
        let key = parts.next().unwrap_or("").to_string();
        let e = after.entry(key).or_insert((who, Vec::new()));
        e.1.push(parts.next().unwrap_or("").to_string());
    }
    for (key, (who, order)) in &after {
        let moved = if owner[key] == *who {
            "stayed"
        } else {
            "moved"
        };
        outln!("    {key}: #{} → {who} ({moved})", order.join(", #"));
    }

    outln!("  client delivers \"lost-ack:parcel-7\" (key order-D); its first acknowledgement is lost on the way (simulated)");
    // With a shard key the copy goes back to the same consumer, whose table knows it
    // (without one it may go to another consumer, with a table of its own).
    let opts = DeliveryOptions::default().with_shard_key("order-D");
    client
        .deliver_with("shipping.ship", "lost-ack:parcel-7", opts)
        .await?;
    for (who, what, copy) in next(&mut rx, 2).await? {
        match copy {
            false => outln!("    {who} handled {what}"),
            true => outln!("    {who} skipped the copy sent again (its id was already processed)"),
        }
    }

    let t = Instant::now();
    let id = client.deliver("audit.record", "parcel-8 shipped").await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client
        .outbox()
        .iter()
        .any(|u| u.id == id && u.stage == Stage::Held)
    {
        if Instant::now() >= deadline {
            bail!("the message for audit.record was not held");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    outln!("  client delivers to audit.record, which no node serves: held in the outbox");
    let (audit_tx, mut audit_rx) = mpsc::unbounded_channel();
    let audit = builder("audit", mdns, &[seed]).start().await?;
    audit.handle("audit.record", V1, move |what: String, _| {
        let _ = audit_tx.send(what);
        async { Ok(()) }
    });
    outln!("  audit starts");
    match tokio::time::timeout(Duration::from_secs(10), audit_rx.recv()).await {
        Ok(Some(what)) => outln!(
            "    ← audit got \"{what}\", {} after it was given",
            micros(t.elapsed())
        ),
        _ => bail!("the held message did not reach audit"),
    }
    // Its acknowledgement is on its way back.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client.outbox().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let st = client.stats().outbox;
    outln!(
        "  client's outbox: {} delivered, {} redelivered, {} given up",
        st.delivered,
        st.redelivered,
        st.dead + st.expired
    );
    for n in shipping.into_iter().chain([audit]) {
        n.shutdown().await;
    }
    Ok(())
}
