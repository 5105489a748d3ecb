//! Messaging between nodes: message types, shard keys, processed-message tables.

mod support;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use peerwire::node::{CallOptions, Context, Node};
use peerwire::MessageType;
use support::orders::V1;
use support::*;

/// Three instances of `kv.owner`, each answering with its name and what it saw of the
/// call, and a client that sees all three.
async fn three_owners() -> (Node, Vec<Node>) {
    let mut owners: Vec<Node> = Vec::new();
    for name in ["a", "b", "c"] {
        let seeds: Vec<String> = owners.iter().map(|n| n.endpoint()).collect();
        let n = start_node(name, &seeds).await;
        let me = name.to_string();
        n.handle("kv.owner", V1, move |(): (), ctx: Context| {
            let me = me.clone();
            async move { Ok((me, ctx.shard_key, ctx.message_type.to_string())) }
        });
        owners.push(n);
    }
    let client = start_node("client", &[owners[0].endpoint()]).await;
    wait_service(&client, "kv.owner", 3).await;
    (client, owners)
}

type Seen = (String, Option<String>, String);

#[tokio::test]
async fn a_shard_key_always_reaches_the_same_instance_and_only_a_leavers_keys_move() {
    init_tracing();
    let (client, mut owners) = three_owners().await;
    let keys: Vec<String> = (0..60).map(|k| format!("order-{k}")).collect();
    let mut first: HashMap<String, String> = HashMap::new();
    for round in 0..3 {
        for k in &keys {
            let opts = CallOptions::default().with_shard_key(k.clone());
            let (who, key, mt): Seen = client.request_with("kv.owner", &(), opts).await.unwrap();
            assert_eq!(key.as_deref(), Some(k.as_str()), "the handler sees the key");
            assert_eq!(mt, "command");
            match round {
                0 => {
                    first.insert(k.clone(), who);
                }
                _ => assert_eq!(first[k], who, "{k} moved while every instance stayed"),
            }
        }
    }
    // Keys spread over all three.
    for name in ["a", "b", "c"] {
        let held = first.values().filter(|w| *w == name).count();
        assert!(held >= 5, "{name} holds {held} of 60 keys: {first:?}");
    }
    // Whatever balancing a call asks for, its key decides.
    let k = &keys[0];
    let mut opts = CallOptions::default().with_shard_key(k.clone());
    opts.balancing = Some(peerwire::Balancing::LeastOutstanding);
    let (who, _, _): Seen = client.request_with("kv.owner", &(), opts).await.unwrap();
    assert_eq!(first[k], who);
    // "b" leaves: its keys move, nobody else's.
    let b = owners.remove(1);
    b.shutdown().await;
    wait_until("b gone", || {
        client.peers().iter().filter(|p| p.connected).count() == 2
    })
    .await;
    for k in &keys {
        let opts = CallOptions::default().with_shard_key(k.clone());
        let (who, _, _): Seen = client.request_with("kv.owner", &(), opts).await.unwrap();
        if first[k] == "b" {
            assert_ne!(who, "b");
        } else {
            assert_eq!(first[k], who, "{k} moved although its owner stayed");
        }
    }
    // Without a key, calls go round as before.
    let mut names = std::collections::HashSet::new();
    for _ in 0..4 {
        let (who, key, _): Seen = client.request("kv.owner", &()).await.unwrap();
        assert_eq!(key, None);
        names.insert(who);
    }
    assert_eq!(names.len(), 2, "{names:?}");
    client.shutdown().await;
    for o in owners {
        o.shutdown().await;
    }
}

#[tokio::test]
async fn message_types_travel_with_calls_notifications_and_events() {
    init_tracing();
    let server = start_node("server", &[]).await;
    let seen: Arc<Mutex<Vec<(String, MessageType)>>> = Arc::default();
    let s = seen.clone();
    server.handle("orders.note", V1, move |what: String, ctx: Context| {
        s.lock().push((what, ctx.message_type));
        async { Ok(()) }
    });
    server.handle("orders.get", V1, |(): (), ctx: Context| async move {
        Ok(ctx.message_type.to_string())
    });
    let client = start_node("client", &[server.endpoint()]).await;
    wait_service(&client, "orders.note", 1).await;
    // A request is a command unless marked otherwise.
    let t: String = client.request("orders.get", &()).await.unwrap();
    assert_eq!(t, "command");
    let opts = CallOptions::default().with_message_type(MessageType::Document);
    let t: String = client.request_with("orders.get", &(), opts).await.unwrap();
    assert_eq!(t, "document");
    // Notifications: a command by default, or an event or a document.
    client.notify("orders.note", &"plain").await.unwrap();
    for (what, t) in [
        ("created", MessageType::Event),
        ("doc", MessageType::Document),
    ] {
        let opts = CallOptions::default().with_message_type(t);
        client
            .notify_with("orders.note", &what, opts)
            .await
            .unwrap();
    }
    wait_until("three notifications", || seen.lock().len() == 3).await;
    let mut got = seen.lock().clone();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        [
            ("created".to_string(), MessageType::Event),
            ("doc".to_string(), MessageType::Document),
            ("plain".to_string(), MessageType::Command),
        ]
    );
    // Published events are events.
    let mut sub = server.subscribe::<u32>("stock.");
    wait_until("subscribed", || {
        client.subscribers_of("stock.level").len() == 1
    })
    .await;
    client.publish("stock.level", &7u32).unwrap();
    let e = within("the event", sub.recv()).await.unwrap().unwrap();
    assert_eq!((e.value, e.message_type), (7, MessageType::Event));
    client.shutdown().await;
    server.shutdown().await;
}

mod dedup {
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    use std::sync::Arc;
    use std::time::Duration;

    use peerwire::dedup::{
        DedupError, DiskTable, Idempotent, MemoryTable, Outcome, ProcessError, Processed,
        ProcessedMessages,
    };
    use peerwire::Id;
    use redb::{ReadableTable, TableDefinition};

    use super::support::{fresh_dir, within};

    #[derive(Debug, PartialEq)]
    enum Failed {
        Handler,
        Table(String),
    }

    impl From<DedupError> for Failed {
        fn from(e: DedupError) -> Self {
            Failed::Table(e.to_string())
        }
    }

    /// The idempotent consumer's contract, whatever the table.
    async fn consumer_contract<S: ProcessedMessages>(table: S) {
        let c = Idempotent::new(table);
        let runs = Arc::new(AtomicU32::new(0));
        let id = Id::new();
        let handle = |fail: bool| {
            let runs = runs.clone();
            move || async move {
                runs.fetch_add(1, SeqCst);
                if fail {
                    Err(Failed::Handler)
                } else {
                    Ok(7)
                }
            }
        };
        // A failed handler records nothing: the next copy runs.
        assert_eq!(c.run(id, handle(true)).await, Err(Failed::Handler));
        assert!(!c.table().contains(id).unwrap());
        assert_eq!(c.run(id, handle(false)).await, Ok(Outcome::Processed(7)));
        assert_eq!(c.run(id, handle(false)).await, Ok(Outcome::Duplicate));
        assert_eq!(runs.load(SeqCst), 2);
        // A copy that arrives while the first is still being handled waits for it.
        for first_fails in [false, true] {
            let id = Id::new();
            let (go, wait) = tokio::sync::oneshot::channel::<()>();
            let started = Arc::new(tokio::sync::Notify::new());
            let first = {
                let (c, started) = (c.clone(), started.clone());
                tokio::spawn(async move {
                    c.run(id, || async move {
                        started.notify_one();
                        let _ = wait.await;
                        if first_fails {
                            Err(Failed::Handler)
                        } else {
                            Ok(1)
                        }
                    })
                    .await
                })
            };
            within("the first copy starts", started.notified()).await;
            let second = {
                let c = c.clone();
                tokio::spawn(async move { c.run(id, || async { Ok::<_, Failed>(2) }).await })
            };
            // The second cannot finish while the first holds the id.
            tokio::task::yield_now().await;
            assert!(!second.is_finished());
            go.send(()).unwrap();
            let first = within("the first copy", first).await.unwrap();
            let second = within("the second copy", second).await.unwrap();
            if first_fails {
                assert_eq!(first, Err(Failed::Handler));
                assert_eq!(
                    second,
                    Ok(Outcome::Processed(2)),
                    "it ran in the first's place"
                );
            } else {
                assert_eq!(first, Ok(Outcome::Processed(1)));
                assert_eq!(second, Ok(Outcome::Duplicate));
            }
        }
    }

    #[tokio::test]
    async fn the_idempotent_consumer_over_memory() {
        consumer_contract(MemoryTable::new(1000, Duration::from_secs(60))).await;
    }

    #[tokio::test]
    async fn the_idempotent_consumer_over_disk() {
        let dir = fresh_dir("dedup-contract");
        consumer_contract(DiskTable::open(dir.join("t.redb"), Duration::from_secs(60)).unwrap())
            .await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    const BALANCES: TableDefinition<&str, u64> = TableDefinition::new("balances");

    #[tokio::test]
    async fn the_disk_table_commits_the_handlers_writes_with_the_id_and_survives_a_restart() {
        let dir = fresh_dir("dedup-disk");
        let path = dir.join("processed.redb");
        let credit = |n: u64| {
            move |txn: &redb::WriteTransaction| -> Result<u64, String> {
                let mut t = txn.open_table(BALANCES).map_err(|e| e.to_string())?;
                let old = t
                    .get("acct")
                    .map_err(|e| e.to_string())?
                    .map_or(0, |g| g.value());
                if n == 0 {
                    return Err("refused".into());
                }
                t.insert("acct", old + n).map_err(|e| e.to_string())?;
                Ok(old + n)
            }
        };
        let (a, b) = (Id::new(), Id::new());
        {
            let t = Arc::new(DiskTable::open(&path, Duration::from_secs(3600)).unwrap());
            assert_eq!(
                t.process_async(a, credit(5)).await.unwrap(),
                Processed::Done(5)
            );
            assert_eq!(
                t.process_async(a, credit(5)).await.unwrap(),
                Processed::Duplicate
            );
            // A failing handler: its writes are rolled back, its id not recorded.
            match t.process_async(b, credit(0)).await {
                Err(ProcessError::Handler(e)) => assert_eq!(e, "refused"),
                other => panic!("{other:?}"),
            }
            assert!(!t.contains(b).unwrap());
            // A second open of the same file (another process, say) is refused clearly.
            let second = DiskTable::open(&path, Duration::from_secs(3600));
            assert!(matches!(second, Err(DedupError::Store(_))));
        }
        // After a restart: the duplicate is still known, and the balance is 5, not 10.
        let t = Arc::new(DiskTable::open(&path, Duration::from_secs(3600)).unwrap());
        assert!(t.contains(a).unwrap());
        assert_eq!(
            t.process_async(a, credit(5)).await.unwrap(),
            Processed::Duplicate
        );
        assert_eq!(
            t.process_async(b, credit(2)).await.unwrap(),
            Processed::Done(7)
        );
        drop(t);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn concurrent_records_on_disk_are_committed_together_and_all_kept() {
        let dir = fresh_dir("dedup-group");
        let t = Arc::new(DiskTable::open(dir.join("t.redb"), Duration::from_secs(60)).unwrap());
        let threads: Vec<_> = (0..32)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    let ids: Vec<Id> = (0..50).map(|_| Id::new()).collect();
                    for id in &ids {
                        t.record(*id).unwrap();
                        // Recorded means committed: visible to a new reader at once.
                        assert!(t.contains(*id).unwrap());
                    }
                    ids
                })
            })
            .collect();
        let ids: Vec<Id> = threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(ids.len(), 1600);
        assert!(ids.iter().all(|id| t.contains(*id).unwrap()));
        drop(t);
        // And durable: a fresh open sees them all.
        let t = DiskTable::open(dir.join("t.redb"), Duration::from_secs(60)).unwrap();
        assert!(ids.iter().all(|id| t.contains(*id).unwrap()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn disk_ids_expire_after_their_retention() {
        let dir = fresh_dir("dedup-expiry");
        let t = DiskTable::open(dir.join("t.redb"), Duration::from_millis(50)).unwrap();
        let old: Vec<Id> = (0..10).map(|_| Id::new()).collect();
        for id in &old {
            t.record(*id).unwrap();
        }
        assert!(t.contains(old[0]).unwrap());
        // The wall clock must move past the retention; nothing here is timed.
        std::thread::sleep(Duration::from_millis(80));
        assert!(
            !t.contains(old[0]).unwrap(),
            "expired ids are not duplicates"
        );
        t.record(Id::new()).unwrap();
        assert_eq!(t.expired(), 10, "removed as new ones are recorded");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

mod outbox {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Arc;
    use std::time::Duration;

    use parking_lot::Mutex;
    use peerwire::node::{CallError, Context, DeliveryOptions, Node, OutboxConfig, Stage};
    use peerwire::{HandlerError, Id};

    use super::support::orders::V1;
    use super::support::*;

    /// (consumer, message id, key, value) in the order handled, across consumers.
    type Log = Arc<Mutex<Vec<(String, Id, Option<String>, u64)>>>;

    fn consume(node: &Node, name: &str, log: &Log) {
        let (name, log) = (name.to_string(), log.clone());
        node.handle("work.do", V1, move |n: u64, ctx: Context| {
            log.lock()
                .push((name.clone(), ctx.message_id, ctx.shard_key.clone(), n));
            async { Ok(()) }
        });
    }

    fn sender(seeds: &[String], config: OutboxConfig) -> peerwire::NodeBuilder {
        let mut b = Node::builder("sender")
            .insecure()
            .outbox(config)
            .socket_options(test_opts());
        for s in seeds {
            b = b.peer(s.clone());
        }
        b
    }

    async fn all_delivered(node: &Node, n: u64) {
        wait_until("every message acknowledged", || {
            node.stats().outbox.delivered >= n && node.outbox().is_empty()
        })
        .await;
    }

    #[tokio::test]
    async fn each_message_goes_to_exactly_one_of_the_competing_consumers() {
        init_tracing();
        let log: Log = Arc::default();
        let mut consumers = Vec::new();
        for name in ["c1", "c2", "c3"] {
            let seeds: Vec<String> = consumers.iter().map(|c: &Node| c.endpoint()).collect();
            let c = start_node(name, &seeds).await;
            consume(&c, name, &log);
            consumers.push(c);
        }
        let s = sender(&[consumers[0].endpoint()], OutboxConfig::default())
            .start()
            .await
            .unwrap();
        wait_service(&s, "work.do", 3).await;
        let mut ids = Vec::new();
        for n in 0..300u64 {
            ids.push(s.deliver("work.do", &n).await.unwrap());
        }
        all_delivered(&s, 300).await;
        let log = log.lock().clone();
        assert_eq!(log.len(), 300, "each handled once");
        let mut by_consumer: HashMap<&str, usize> = HashMap::new();
        for (who, ..) in &log {
            *by_consumer.entry(who.as_str()).or_default() += 1;
        }
        assert_eq!(by_consumer.len(), 3, "{by_consumer:?}");
        let mut seen: Vec<Id> = log.iter().map(|(_, id, ..)| *id).collect();
        seen.sort();
        ids.sort();
        assert_eq!(seen, ids, "the ids given are the ids handled");
        let st = s.stats().outbox;
        assert_eq!(
            (st.delivered, st.redelivered, st.dead, st.expired),
            (300, 0, 0, 0)
        );
        s.shutdown().await;
        for c in consumers {
            c.shutdown().await;
        }
    }

    #[tokio::test]
    async fn a_consumer_that_does_not_acknowledge_has_its_messages_redelivered_elsewhere() {
        init_tracing();
        let log: Log = Arc::default();
        // "stuck" takes messages and never finishes them.
        let stuck = start_node("stuck", &[]).await;
        stuck.handle("work.do", V1, |_: u64, _: Context| async {
            std::future::pending::<()>().await;
            Ok(())
        });
        let good = start_node("good", &[stuck.endpoint()]).await;
        consume(&good, "good", &log);
        let s = sender(&[stuck.endpoint()], OutboxConfig::default())
            .start()
            .await
            .unwrap();
        wait_service(&s, "work.do", 2).await;
        let opts = DeliveryOptions::default().with_attempt_timeout(Duration::from_millis(300));
        let mut ids = Vec::new();
        for n in 0..20u64 {
            ids.push(s.deliver_with("work.do", &n, opts.clone()).await.unwrap());
        }
        all_delivered(&s, 20).await;
        let mut seen: Vec<Id> = log.lock().iter().map(|(_, id, ..)| *id).collect();
        seen.sort();
        ids.sort();
        assert_eq!(
            seen, ids,
            "every message, with its own id, handled by the good one"
        );
        assert!(s.stats().outbox.redelivered >= 1);
        // A consumer that dies with messages in flight: they go to the other.
        let dying = start_node("dying", &[good.endpoint()]).await;
        dying.handle("work.do", V1, |_: u64, _: Context| async {
            std::future::pending::<()>().await;
            Ok(())
        });
        stuck.shutdown().await;
        wait_service(&s, "work.do", 2).await;
        let before = log.lock().len();
        let opts = DeliveryOptions::default().with_attempt_timeout(Duration::from_secs(30));
        for n in 0..10u64 {
            s.deliver_with("work.do", &n, opts.clone()).await.unwrap();
        }
        wait_until("some sent to the dying one", || {
            s.outbox().iter().any(|u| u.stage == Stage::InFlight)
                && log.lock().len() + s.outbox().len() >= before + 10
        })
        .await;
        // Dropped without a drain: its connections reset.
        drop(dying);
        all_delivered(&s, 30).await;
        assert_eq!(log.lock().len(), before + 10);
        s.shutdown().await;
        good.shutdown().await;
    }

    #[tokio::test]
    async fn messages_of_one_key_arrive_in_order_also_when_their_consumer_leaves() {
        init_tracing();
        let log: Log = Arc::default();
        let mut consumers = Vec::new();
        for name in ["k1", "k2", "k3"] {
            let seeds: Vec<String> = consumers.iter().map(|c: &Node| c.endpoint()).collect();
            let c = start_node(name, &seeds).await;
            let (name, log) = (name.to_string(), log.clone());
            // Some take a while, so keys overlap in flight.
            c.handle("work.do", V1, move |n: u64, ctx: Context| {
                let (name, log) = (name.clone(), log.clone());
                async move {
                    if n % 7 == 0 {
                        tokio::task::yield_now().await;
                    }
                    log.lock().push((name, ctx.message_id, ctx.shard_key, n));
                    Ok(())
                }
            });
            consumers.push(c);
        }
        let s = sender(&[consumers[0].endpoint()], OutboxConfig::default())
            .start()
            .await
            .unwrap();
        wait_service(&s, "work.do", 3).await;
        let keys = 10;
        let mut n = 0u64;
        for _ in 0..30 {
            for k in 0..keys {
                let opts = DeliveryOptions::default().with_shard_key(format!("key-{k}"));
                s.deliver_with("work.do", &n, opts).await.unwrap();
                n += 1;
            }
        }
        // One consumer leaves mid-stream; its keys move.
        wait_until("a third delivered", || s.stats().outbox.delivered >= n / 3).await;
        let leaving = consumers.remove(1);
        leaving.shutdown().await;
        for _ in 0..30 {
            for k in 0..keys {
                let opts = DeliveryOptions::default().with_shard_key(format!("key-{k}"));
                s.deliver_with("work.do", &n, opts).await.unwrap();
                n += 1;
            }
        }
        all_delivered(&s, n).await;
        // Per key: the values in the order handled, duplicates (none expected) aside.
        let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (who, _, key, v) in log.lock().iter() {
            let key = key.clone().expect("every message has a key");
            let vs = per_key.entry(key.clone()).or_default();
            if vs.last() != Some(v) {
                vs.push(*v);
            }
            let o = owners.entry(key).or_default();
            if o.last() != Some(who) {
                o.push(who.clone());
            }
        }
        assert_eq!(per_key.len(), keys);
        for (key, vs) in &per_key {
            assert!(
                vs.windows(2).all(|w| w[0] < w[1]),
                "{key} out of order: {vs:?}"
            );
            assert_eq!(vs.len(), 60, "{key}: {vs:?}");
        }
        // A key changes hands at most once (when its owner left), never back and forth.
        for (key, o) in &owners {
            assert!(o.len() <= 2, "{key} handled by {o:?}");
        }
        s.shutdown().await;
        for c in consumers {
            c.shutdown().await;
        }
    }

    #[tokio::test]
    async fn messages_for_a_service_nobody_runs_are_held_until_it_starts() {
        init_tracing();
        let s = sender(&[], OutboxConfig::default()).start().await.unwrap();
        for n in 0..5u64 {
            s.deliver("work.do", &n).await.unwrap();
        }
        wait_until("held", || {
            let o = s.outbox();
            o.len() == 5 && o.iter().all(|u| u.stage == Stage::Held)
        })
        .await;
        let log: Log = Arc::default();
        let late = start_node("late", &[s.endpoint()]).await;
        consume(&late, "late", &log);
        all_delivered(&s, 5).await;
        let got: Vec<u64> = log.lock().iter().map(|(.., n)| *n).collect();
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2, 3, 4]);
        s.shutdown().await;
        late.shutdown().await;
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_and_failing_messages_are_given_up_and_counted() {
        init_tracing();
        let mut config = OutboxConfig::default();
        config.max_messages = 3;
        config.max_attempts = 3;
        let s = sender(&[], config).start().await.unwrap();
        for n in 0..3u64 {
            s.deliver("nobody.home", &n).await.unwrap();
        }
        match s.deliver("nobody.home", &3u64).await {
            Err(CallError::OutboxFull { messages: 3, .. }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(s.stats().outbox.refused, 1);
        // A handler that always fails: given up after three attempts.
        let failing = start_node("failing", &[s.endpoint()]).await;
        failing.handle("work.fail", V1, |_: u64, _: Context| async {
            Err::<(), _>(HandlerError::new("nope", "always"))
        });
        wait_service(&s, "work.fail", 1).await;
        // Room is made by nothing: the three held stay. Use a sender of its own.
        let mut config = OutboxConfig::default();
        config.max_attempts = 3;
        let s2 = sender(&[failing.endpoint()], config).start().await.unwrap();
        wait_service(&s2, "work.fail", 1).await;
        s2.deliver("work.fail", &1u64).await.unwrap();
        wait_until("given up", || s2.stats().outbox.dead == 1).await;
        assert!(s2.outbox().is_empty());
        s2.shutdown().await;
        // At shutdown, what an in-memory outbox still holds is counted as dropped.
        let stats_before = s.stats().outbox.dropped_at_shutdown;
        assert_eq!(stats_before, 0);
        s.shutdown().await;
        assert_eq!(s.stats().outbox.dropped_at_shutdown, 3);
        failing.shutdown().await;
    }

    #[tokio::test]
    async fn an_outbox_on_disk_delivers_after_the_sender_restarts() {
        init_tracing();
        let dir = fresh_dir("outbox-disk");
        let path = dir.join("outbox.redb");
        let mut given = Vec::new();
        {
            let s = sender(&[], OutboxConfig::on_disk(&path))
                .start()
                .await
                .unwrap();
            for n in 0..5u64 {
                let opts = DeliveryOptions::default().with_shard_key("one-key");
                given.push(s.deliver_with("work.do", &n, opts).await.unwrap());
            }
            s.shutdown().await;
            assert_eq!(s.stats().outbox.dropped_at_shutdown, 0, "kept on disk");
        }
        let log: Log = Arc::default();
        let consumer = start_node("consumer", &[]).await;
        consume(&consumer, "consumer", &log);
        let s = sender(&[consumer.endpoint()], OutboxConfig::on_disk(&path))
            .start()
            .await
            .unwrap();
        assert_eq!(s.outbox().len(), 5, "what the last run left");
        all_delivered(&s, 5).await;
        let got: Vec<(Id, u64)> = log.lock().iter().map(|(_, id, _, n)| (*id, *n)).collect();
        let want: Vec<(Id, u64)> = given.iter().copied().zip(0..5).collect();
        assert_eq!(got, want, "same ids, in the order given");
        s.shutdown().await;
        // Delivered ones are gone from the file.
        let s = sender(&[], OutboxConfig::on_disk(&path))
            .start()
            .await
            .unwrap();
        assert!(s.outbox().is_empty());
        s.shutdown().await;
        consumer.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_deliveries_are_all_kept_and_delivered_in_each_senders_order() {
        init_tracing();
        let log: Log = Arc::default();
        let c = start_node("c", &[]).await;
        consume(&c, "c", &log);
        let s = Arc::new(
            sender(&[c.endpoint()], OutboxConfig::default())
                .start()
                .await
                .unwrap(),
        );
        wait_service(&s, "work.do", 1).await;
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..400u64 {
                    let opts = DeliveryOptions::default().with_shard_key("one");
                    s.deliver_with("work.do", &(t * 1000 + i), opts)
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            within("a sender's deliveries", t).await.unwrap();
        }
        all_delivered(&s, 1600).await;
        let got: Vec<u64> = log.lock().iter().map(|(.., n)| *n).collect();
        assert_eq!(got.len(), 1600);
        // One key: one at a time, so each sending task's messages in its order.
        for t in 0..4u64 {
            let mine: Vec<u64> = got.iter().copied().filter(|n| n / 1000 == t).collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "task {t}");
            assert_eq!(mine.len(), 400);
        }
        s.shutdown().await;
        c.shutdown().await;
    }

    #[tokio::test]
    async fn refusals_on_the_senders_side_are_not_attempts() {
        use peerwire::node::{BulkheadConfig, ServicePolicy};
        init_tracing();
        let log: Log = Arc::default();
        let c = start_node("c", &[]).await;
        let (name, l) = ("c".to_string(), log.clone());
        c.handle("work.do", V1, move |n: u64, ctx: Context| {
            let (name, l) = (name.clone(), l.clone());
            async move {
                tokio::task::yield_now().await;
                l.lock().push((name, ctx.message_id, None, n));
                Ok(())
            }
        });
        let mut config = OutboxConfig::default();
        config.max_attempts = 2;
        // One request to `work` at a time, none waiting: most sends are refused here.
        let s = sender(&[c.endpoint()], config)
            .service(
                "work",
                ServicePolicy::new().bulkhead(BulkheadConfig::new(1, 0)),
            )
            .start()
            .await
            .unwrap();
        wait_service(&s, "work.do", 1).await;
        for n in 0..100u64 {
            s.deliver("work.do", &n).await.unwrap();
        }
        all_delivered(&s, 100).await;
        let st = s.stats().outbox;
        assert_eq!((st.dead, st.redelivered), (0, 0), "{st:?}");
        assert_eq!(log.lock().len(), 100);
        s.shutdown().await;
        c.shutdown().await;
    }

    #[tokio::test]
    async fn messages_held_by_open_breakers_go_once_an_instance_recovers() {
        use peerwire::node::{BreakerConfig, ServicePolicy};
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        init_tracing();
        let log: Log = Arc::default();
        let c = start_node("c", &[]).await;
        let failing = Arc::new(AtomicBool::new(true));
        let (f, l) = (failing.clone(), log.clone());
        c.handle("work.do", V1, move |n: u64, ctx: Context| {
            let (f, l) = (f.clone(), l.clone());
            async move {
                if f.load(SeqCst) {
                    // What a breaker counts as the instance failing.
                    return Err(HandlerError::new("overloaded", "not yet"));
                }
                l.lock().push(("c".into(), ctx.message_id, None, n));
                Ok(())
            }
        });
        let breaker = BreakerConfig::default()
            .with_window(2, 2)
            .with_wait_in_open(Duration::from_millis(300));
        let mut config = OutboxConfig::default();
        config.max_attempts = 1000;
        let s = sender(&[c.endpoint()], config)
            .service("work", ServicePolicy::new().breaker(breaker))
            .start()
            .await
            .unwrap();
        wait_service(&s, "work.do", 1).await;
        for n in 0..10u64 {
            s.deliver("work.do", &n).await.unwrap();
        }
        wait_until("held behind the open breaker", || {
            s.outbox().iter().any(|u| u.stage == Stage::Held)
        })
        .await;
        // The instance recovers; nothing changes in the membership.
        failing.store(false, SeqCst);
        all_delivered(&s, 10).await;
        assert_eq!(log.lock().len(), 10);
        s.shutdown().await;
        c.shutdown().await;
    }

    #[tokio::test]
    async fn a_receipt_says_how_a_message_ended() {
        init_tracing();
        let log: Log = Arc::default();
        let c = start_node("c", &[]).await;
        consume(&c, "c", &log);
        c.handle("work.fail", V1, |_: u64, _: Context| async {
            Err::<(), _>(HandlerError::new("nope", "always"))
        });
        let mut config = OutboxConfig::default();
        config.max_attempts = 2;
        let s = sender(&[c.endpoint()], config).start().await.unwrap();
        wait_service(&s, "work.fail", 1).await;
        let ok = s
            .deliver_tracked("work.do", &1u64, DeliveryOptions::default())
            .await
            .unwrap();
        within("the acknowledgement", ok.acknowledged())
            .await
            .unwrap();
        let bad = s
            .deliver_tracked("work.fail", &2u64, DeliveryOptions::default())
            .await
            .unwrap();
        match within("giving up", bad.acknowledged()).await {
            Err(CallError::Outbox(why)) => assert!(why.contains("nope"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Held for a service nobody runs, then the node stops: it says so.
        let held = s
            .deliver_tracked("nobody.home", &3u64, DeliveryOptions::default())
            .await
            .unwrap();
        s.shutdown().await;
        assert_eq!(
            within("the stop", held.acknowledged()).await,
            Err(CallError::Shutdown)
        );
        c.shutdown().await;
    }

    #[tokio::test]
    async fn no_room_in_flight_is_taken_as_room_for_one() {
        init_tracing();
        let log: Log = Arc::default();
        let c = start_node("c", &[]).await;
        consume(&c, "c", &log);
        let mut config = OutboxConfig::default();
        config.max_in_flight = 0;
        let s = sender(&[c.endpoint()], config).start().await.unwrap();
        wait_service(&s, "work.do", 1).await;
        for n in 0..5u64 {
            s.deliver("work.do", &n).await.unwrap();
        }
        all_delivered(&s, 5).await;
        s.shutdown().await;
        c.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_runs_one_handler_at_a_time_per_key_whoever_sent_them() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    init_tracing();
    let server = start_node("server", &[]).await;
    // Per key: handlers running now; overall: the most running at once.
    let running: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let (overlaps, now, most) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let order: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let (r, o, n, m, ord) = (
        running.clone(),
        overlaps.clone(),
        now.clone(),
        most.clone(),
        order.clone(),
    );
    server.handle(
        "work.keyed",
        V1,
        move |(sender, i): (String, u32), ctx: Context| {
            let (r, o, n, m, ord) = (r.clone(), o.clone(), n.clone(), m.clone(), ord.clone());
            async move {
                let key = ctx.shard_key.clone().unwrap();
                {
                    let mut r = r.lock();
                    let c = r.entry(key.clone()).or_default();
                    if *c > 0 {
                        o.fetch_add(1, SeqCst);
                    }
                    *c += 1;
                }
                m.fetch_max(n.fetch_add(1, SeqCst) + 1, SeqCst);
                ord.lock()
                    .entry(format!("{key}/{sender}"))
                    .or_default()
                    .push(i);
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                n.fetch_sub(1, SeqCst);
                *r.lock().get_mut(&key).unwrap() -= 1;
                Ok(())
            }
        },
    );
    let mut senders = Vec::new();
    for name in ["s1", "s2", "s3"] {
        let s = start_node(name, &[server.endpoint()]).await;
        wait_service(&s, "work.keyed", 1).await;
        senders.push(Arc::new(s));
    }
    let mut tasks = Vec::new();
    for s in &senders {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40u32 {
                let key = format!("k{}", i % 4);
                let opts = CallOptions::default().with_shard_key(key);
                s.notify_with("work.keyed", &(s.name().to_string(), i), opts)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        within("sending", t).await.unwrap();
    }
    wait_until("all handled", || {
        order.lock().values().map(|v| v.len()).sum::<usize>() == 120
    })
    .await;
    assert_eq!(overlaps.load(SeqCst), 0, "two handlers of one key at once");
    assert!(most.load(SeqCst) > 1, "other keys ran in parallel");
    // One sender's messages of one key: in the order it sent them (one connection).
    for (k, v) in order.lock().iter() {
        assert!(v.windows(2).all(|w| w[0] < w[1]), "{k}: {v:?}");
    }
    for s in senders {
        s.shutdown().await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_messages_and_shard_keys_are_refused_when_given() {
    use peerwire::node::{CallError, DeliveryOptions, OutboxConfig};
    init_tracing();
    let opts = test_opts().with_max_message_size(64 * 1024);
    let s = Node::builder("sender")
        .insecure()
        .socket_options(opts)
        .outbox(OutboxConfig::default())
        .start()
        .await
        .unwrap();
    let big = vec![7u8; 100 * 1024];
    match s.deliver("work.do", &serde_bytes_like(&big)).await {
        Err(CallError::Send(peerwire::transport::SendError::MessageTooLarge { .. })) => {}
        other => panic!("{other:?}"),
    }
    assert!(s.outbox().is_empty(), "not taken");
    let long = "k".repeat(peerwire::codec::MAX_SHARD_KEY + 1);
    let d = DeliveryOptions::default().with_shard_key(long.clone());
    assert!(matches!(
        s.deliver_with("work.do", &1, d).await,
        Err(CallError::Codec(_))
    ));
    let c = CallOptions::default().with_shard_key(long.clone());
    let r: Result<(), _> = s.request_with("work.do", &1, c).await;
    assert!(matches!(r, Err(CallError::Codec(_))), "{r:?}");
    // On the wire: a header with a longer key does not decode.
    let mut h =
        peerwire::codec::Header::new(peerwire::codec::Kind::Request, peerwire::Id::NIL, "a.b");
    h.shard_key = Some(long);
    let bytes = peerwire::codec::encode_header(&h);
    assert!(peerwire::codec::decode_header(&bytes).is_err());
    s.shutdown().await;
}

/// Bytes serialised as MessagePack bin, without a serde helper crate.
fn serde_bytes_like(b: &[u8]) -> impl serde::Serialize + '_ {
    struct Bin<'a>(&'a [u8]);
    impl serde::Serialize for Bin<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }
    Bin(b)
}

type Span = (String, String, std::time::Instant, std::time::Instant);

/// Instances of `work.slow` for the hand-over tests: the message "first" takes 400 ms
/// (the old owner is busy with it while the key moves), anything else none; each
/// handler's start and end are recorded.
#[derive(Clone, Default)]
struct SlowFirst {
    /// (instance, message, start, end) of each handler run.
    spans: Arc<Mutex<Vec<Span>>>,
    started: Arc<Mutex<Vec<String>>>,
}

impl SlowFirst {
    fn serve(&self, node: &Node) {
        let (name, me) = (node.name().to_string(), self.clone());
        node.handle("work.slow", V1, move |what: String, _: Context| {
            let (name, me) = (name.clone(), me.clone());
            async move {
                let t = std::time::Instant::now();
                me.started.lock().push(what.clone());
                if what == "first" {
                    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
                }
                me.spans
                    .lock()
                    .push((name, what, t, std::time::Instant::now()));
                Ok(())
            }
        });
    }

    /// Once "first" and "second" are handled: that each ran where expected, and that
    /// "second" started only after "first" ended.
    async fn second_after_first(&self, first_at: &str, second_at: &str) {
        wait_until("both handled", || self.spans.lock().len() == 2).await;
        let spans = self.spans.lock().clone();
        let first = spans.iter().find(|s| s.1 == "first").unwrap();
        let second = spans.iter().find(|s| s.1 == "second").unwrap();
        assert_eq!((first.0.as_str(), second.0.as_str()), (first_at, second_at));
        assert!(
            second.2 >= first.3,
            "the new owner started before the old one finished: {:?} before {:?}",
            second.2,
            first.3
        );
    }
}

/// A node's rendezvous score for `key` (PROTOCOL.md, "Shard keys").
fn score(id: peerwire::Id, key: &str) -> u64 {
    let mut b = id.0.as_bytes().to_vec();
    b.extend_from_slice(key.as_bytes());
    xxhash_rust::xxh3::xxh3_64(&b)
}

/// The first key for which `order` ranks the nodes from highest score to lowest.
fn key_ranking(order: &[peerwire::Id]) -> String {
    (0..)
        .map(|i| format!("order-{i}"))
        .find(|k| order.windows(2).all(|w| score(w[0], k) > score(w[1], k)))
        .unwrap()
}

#[tokio::test]
async fn a_key_that_moves_to_a_new_instance_starts_there_after_its_messages_elsewhere() {
    init_tracing();
    let work = SlowFirst::default();
    let x = start_node("x", &[]).await;
    work.serve(&x);
    // `n` is up, but serves nothing yet; the key is one it will own once it does.
    let n = start_node("n", &[x.endpoint()]).await;
    let key = key_ranking(&[n.id(), x.id()]);
    let a = start_node("a", &[x.endpoint()]).await;
    let b = start_node("b", &[x.endpoint()]).await;
    wait_service(&a, "work.slow", 1).await;
    let opts = CallOptions::default().with_shard_key(key);
    a.notify_with("work.slow", &"first", opts.clone())
        .await
        .unwrap();
    // While x runs it, `n` starts serving: the key moves to `n`, and another sender
    // sends the key's next message there.
    wait_until("x busy with the first", || !work.started.lock().is_empty()).await;
    work.serve(&n);
    wait_service(&b, "work.slow", 2).await;
    b.notify_with("work.slow", &"second", opts).await.unwrap();
    work.second_after_first("x", "n").await;
    for node in [a, b, n, x] {
        node.shutdown().await;
    }
}

#[tokio::test]
async fn a_key_whose_instance_leaves_starts_elsewhere_after_its_messages_there() {
    init_tracing();
    let work = SlowFirst::default();
    let x = Arc::new(start_node("x", &[]).await);
    work.serve(&x);
    let n = start_node("n", &[x.endpoint()]).await;
    work.serve(&n);
    // A third instance: `n`'s question must still go to `x`, though it is leaving.
    let m = start_node("m", &[x.endpoint()]).await;
    work.serve(&m);
    // A key `x` owns while it is there, and `n` after it.
    let key = key_ranking(&[x.id(), n.id(), m.id()]);
    let s = start_node("s", &[x.endpoint()]).await;
    wait_service(&s, "work.slow", 3).await;
    wait_service(&n, "work.slow", 2).await;
    let opts = CallOptions::default().with_shard_key(key);
    s.notify_with("work.slow", &"first", opts.clone())
        .await
        .unwrap();
    wait_until("x busy with the first", || !work.started.lock().is_empty()).await;
    // `x` stops gracefully (a rolling restart): the key moves to `n`.
    let leaving = {
        let x = x.clone();
        tokio::spawn(async move { x.shutdown().await })
    };
    wait_until("x known to be leaving", || {
        s.peers().iter().any(|p| p.name == "x" && p.leaving)
    })
    .await;
    s.notify_with("work.slow", &"second", opts).await.unwrap();
    work.second_after_first("x", "n").await;
    within("x's shutdown", leaving).await.unwrap();
    for node in [s, n, m] {
        node.shutdown().await;
    }
}

#[tokio::test]
async fn the_hand_over_header_is_the_nodes_own() {
    use peerwire::node::{CallError, DeliveryOptions};
    init_tracing();
    let s = start_node("s", &[]).await;
    let c = CallOptions::default().with_header("x-peerwire-handover", "1");
    let r: Result<(), _> = s.request_with("work.do", &1, c).await;
    assert!(matches!(r, Err(CallError::Codec(_))), "{r:?}");
    let mut d = DeliveryOptions::default();
    d.headers.insert("x-peerwire-handover".into(), "1".into());
    assert!(matches!(
        s.deliver_with("work.do", &1, d).await,
        Err(CallError::Codec(_))
    ));
    s.shutdown().await;
}
