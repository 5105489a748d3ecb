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
    for (what, t) in [("created", MessageType::Event), ("doc", MessageType::Document)] {
        let opts = CallOptions::default().with_message_type(t);
        client.notify_with("orders.note", &what, opts).await.unwrap();
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
