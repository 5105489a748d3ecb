//! Delivery guarantees with real processes: consumers are `peerwire node --serve sink`
//! processes (each handles a message id once, with a processed-messages table, and
//! prints what it handled), killed with SIGKILL and started mid-stream; the sender is a
//! node in this process, with its outbox in memory or on disk.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use peerwire::node::{DeliveryOptions, Node, OutboxConfig};
use serde_json::{json, Value};
use support::*;

/// One message a consumer printed as handled.
#[derive(Debug, Clone)]
struct Handled {
    node: String,
    id: String,
    key: String,
    n: u64,
}

fn handled(p: &mut NodeProc) -> Vec<Handled> {
    p.stdout
        .drain()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| Handled {
            node: v["node"].as_str().unwrap().to_string(),
            id: v["id"].as_str().unwrap().to_string(),
            key: v["key"].as_str().unwrap_or("").to_string(),
            n: v["value"]["n"].as_u64().unwrap(),
        })
        .collect()
}

fn consumer(name: &str, dir: &std::path::Path, seeds: &[&str]) -> NodeProc {
    let table = dir.join(format!("{name}.redb"));
    let mut args = vec!["--serve", "sink", "--dedup", table.to_str().unwrap()];
    for s in seeds {
        args.extend(["--peer", s]);
    }
    NodeProc::start_with(name, &args)
}

async fn sender(seeds: &[&str], outbox: OutboxConfig) -> Node {
    let mut b = Node::builder("sender")
        .insecure()
        .outbox(outbox)
        .socket_options(test_opts());
    for s in seeds {
        b = b.peer(s.to_string());
    }
    b.start().await.unwrap()
}

async fn deliver_range(s: &Node, range: std::ops::Range<u64>, keys: u64) {
    for n in range {
        let opts = DeliveryOptions::default()
            .with_shard_key(format!("key-{}", n % keys))
            .with_attempt_timeout(Duration::from_secs(2));
        s.deliver_with("sink.take", &json!({ "n": n }), opts)
            .await
            .unwrap();
    }
}

async fn delivered(s: &Node, n: u64) {
    wait_until_for(Duration::from_secs(60), "deliveries acknowledged", || {
        s.stats().outbox.delivered >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_over_a_hundred_keys_through_a_kill_and_a_join() {
    init_tracing();
    let dir = fresh_dir("channel-procs");
    let mut c1 = consumer("c1", &dir, &[]);
    let c1_ep = c1.endpoint.clone();
    let mut c2 = consumer("c2", &dir, &[&c1_ep]);
    let mut c3 = consumer("c3", &dir, &[&c1_ep]);
    let mut config = OutboxConfig::default();
    config.max_messages = 20_000;
    let s = sender(&[&c1_ep], config).await;
    wait_service(&s, "sink.take", 3).await;
    let (total, keys) = (10_000u64, 100u64);
    // Three consumers, nothing failing: each message handled exactly once.
    deliver_range(&s, 0..4000, keys).await;
    delivered(&s, 4000).await;
    let mut calm: Vec<Handled> = Vec::new();
    for c in [&mut c1, &mut c2, &mut c3] {
        calm.extend(handled(c));
    }
    let distinct: HashSet<u64> = calm.iter().map(|h| h.n).collect();
    assert_eq!((calm.len(), distinct.len()), (4000, 4000), "exactly once");
    // A consumer dies mid-stream, with messages in flight: nothing is lost.
    deliver_range(&s, 4000..7000, keys).await;
    delivered(&s, 5000).await;
    c2.child.kill().unwrap();
    let _ = c2.child.wait();
    delivered(&s, 7000).await;
    // A consumer joins mid-stream: it takes its keys, in order.
    let mut c4 = consumer("c4", &dir, &[&c1_ep]);
    deliver_range(&s, 7000..total, keys).await;
    delivered(&s, total).await;
    assert!(s.outbox().is_empty());
    let st = s.stats().outbox;
    assert_eq!((st.dead, st.expired, st.refused), (0, 0, 0), "{st:?}");

    // (`handled` returns every line a consumer printed so far.)
    let mut all = Vec::new();
    for c in [&mut c1, &mut c2, &mut c3, &mut c4] {
        all.extend(handled(c));
    }
    // Every message handled; a message handled twice only if it was in flight to the
    // consumer that died (it may have handled it before dying, unacknowledged).
    let mut times: HashMap<u64, Vec<&Handled>> = HashMap::new();
    for h in &all {
        times.entry(h.n).or_default().push(h);
    }
    assert_eq!(times.len() as u64, total, "every message handled");
    let twice: Vec<_> = times.values().filter(|v| v.len() > 1).collect();
    for copies in &twice {
        assert_eq!(copies.len(), 2, "{copies:?}");
        assert!(copies.iter().any(|h| h.node == "c2"), "{copies:?}");
        assert_eq!(copies[0].id, copies[1].id, "a redelivery keeps the id");
    }
    assert!(twice.len() as u64 <= keys, "at most one in flight per key");
    // Per key: each consumer saw its messages in order, and the consumers that held a
    // key over time held it one after another (no interleaving): the key was handed
    // over in order, when c2 died and when c4 joined.
    let mut per_key: BTreeMap<&str, BTreeMap<&str, Vec<u64>>> = BTreeMap::new();
    for h in &all {
        let seq = per_key
            .entry(&h.key)
            .or_default()
            .entry(&h.node)
            .or_default();
        if seq.last() != Some(&h.n) {
            seq.push(h.n);
        }
    }
    let mut moved = 0;
    for (key, by_node) in &per_key {
        let mut spans: Vec<(u64, u64, &str)> = Vec::new();
        for (node, ns) in by_node {
            assert!(
                ns.windows(2).all(|w| w[0] < w[1]),
                "{key} at {node}: {ns:?}"
            );
            spans.push((ns[0], *ns.last().unwrap(), node));
        }
        spans.sort();
        for w in spans.windows(2) {
            // The next holder starts after the last one's last (or on the very message
            // that was in flight when c2 died).
            assert!(w[1].0 >= w[0].1, "{key}: {spans:?}");
        }
        moved += spans.len() - 1;
    }
    eprintln!(
        "{} handled, {} twice (in flight at the kill), {moved} key moves",
        all.len(),
        twice.len()
    );
    let mut owners: HashSet<&str> = HashSet::new();
    for h in all.iter().filter(|h| h.n >= 9500) {
        owners.insert(&h.node);
    }
    assert!(owners.contains("c4"), "the joiner took keys: {owners:?}");
    assert!(!owners.contains("c2"));
    s.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A raw request to `sink.take` with a chosen message id, as any ZeroMQ client can send:
/// whether the consumer said it was a duplicate.
async fn take_with_id(endpoint: &str, id: peerwire::Id, n: u64) -> bool {
    use peerwire::codec::{decode_payload, Envelope, Header, Kind};
    use peerwire::transport::{Dealer, Message};
    let d = Dealer::connect(endpoint, test_opts()).unwrap();
    let mut h = Header::new(Kind::Request, peerwire::Id::NIL, "sink.take");
    h.id = id;
    h.deadline_ms = Some(5000);
    let env = Envelope {
        header: h,
        payload: peerwire::codec::encode_payload(&json!({ "n": n })).unwrap(),
    };
    d.send(Message::from_frames(env.to_frames())).await.unwrap();
    let reply = within("the reply", d.recv()).await.unwrap();
    let env = Envelope::from_frames(reply.frames()).unwrap();
    assert_eq!(env.header.kind, Kind::Reply, "{env:?}");
    let v: Value = decode_payload(&env.payload).unwrap();
    v["duplicate"].as_bool().unwrap()
}

#[tokio::test]
async fn copies_are_skipped_also_after_the_consumer_restarts() {
    init_tracing();
    let dir = fresh_dir("channel-dups");
    let mut c = consumer("dups", &dir, &[]);
    let id = peerwire::Id::new();
    assert!(
        !take_with_id(&c.endpoint, id, 1).await,
        "the first copy is handled"
    );
    assert!(
        take_with_id(&c.endpoint, id, 1).await,
        "the second is a duplicate"
    );
    c.stdout.wait_for("the message handled", BOUND, |l| {
        l.contains(&id.to_string())
    });
    // SIGKILL, then the same table: the id is still known.
    c.child.kill().unwrap();
    let _ = c.child.wait();
    let mut c = consumer("dups", &dir, &[]);
    assert!(
        take_with_id(&c.endpoint, id, 1).await,
        "known after the restart"
    );
    let other = peerwire::Id::new();
    assert!(!take_with_id(&c.endpoint, other, 2).await);
    let lines = c.stdout.drain().to_vec();
    assert_eq!(lines.len(), 1, "only the new message printed: {lines:?}");
    assert!(lines[0].contains(&other.to_string()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_outbox_on_disk_delivers_in_order_to_a_late_consumer_after_the_sender_restarts() {
    init_tracing();
    let dir = fresh_dir("channel-late");
    let outbox = dir.join("outbox.redb");
    // A node to reach the consumer through later; it serves nothing itself.
    let hub = start_node("hub", &[]).await;
    let hub_ep = hub.endpoint();
    {
        let s = sender(&[&hub_ep], OutboxConfig::on_disk(&outbox)).await;
        deliver_range(&s, 0..50, 5).await;
        s.shutdown().await;
    }
    let s = sender(&[&hub_ep], OutboxConfig::on_disk(&outbox)).await;
    assert_eq!(s.outbox().len(), 50, "kept across the restart");
    let mut c = consumer("late", &dir, &[&hub_ep]);
    delivered(&s, 50).await;
    let got = handled(&mut c);
    assert_eq!(got.len(), 50);
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for h in &got {
        per_key.entry(h.key.clone()).or_default().push(h.n);
    }
    for (key, ns) in &per_key {
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "{key}: {ns:?}");
        assert_eq!(ns.len(), 10);
    }
    s.shutdown().await;
    hub.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
