//! A node in another language: `examples/python/peerwire_node.py` (pyzmq and msgpack,
//! written from PROTOCOL.md) joins a Rust cluster through one seed, and every interaction
//! style is checked in both directions. Without Python, pyzmq or msgpack the test says it
//! was skipped; with CI=true that is a failure (`.ci/run` installs them).

mod support;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use peerwire::codec::Id;
use peerwire::node::{GatherEnd, GatherOptions, Node, NodeBuilder};
use peerwire::transport::curve::{decode_key, encode_key, CurveKeys};
use serde_json::{json, Value};
use support::orders::V1;
use support::*;

const BOUND: Duration = Duration::from_secs(15);

/// A Rust node serving `rust.echo`, `rust.note` (counted) and the gather `rust.ping`.
async fn rust_node(name: &'static str, b: NodeBuilder, notes: Arc<AtomicUsize>) -> Node {
    let node = b.socket_options(test_opts()).start().await.unwrap();
    node.handle("rust.echo", V1, |v: Value, _| async move { Ok(v) });
    node.handle("rust.note", V1, move |_: Value, _| {
        notes.fetch_add(1, Ordering::SeqCst);
        async { Ok(()) }
    });
    node.handle_gather("rust.ping", V1, move |_: Value, _| async move {
        Ok(json!({ "node": name }))
    });
    node
}

/// The Python process, killed if the test ends early (a failed assertion must not
/// leave it running, holding the test's output open).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Three asynchronous requests to `py.greet`, all sent before any reply is awaited.
async fn futures_join(node: &Node, whos: [&str; 3]) -> Vec<peerwire::PendingReply<String>> {
    let mut out = Vec::new();
    for who in whos {
        out.push(node.request_async("py.greet", &who).await.unwrap());
    }
    out
}

fn json_line(l: &str) -> Value {
    serde_json::from_str(l).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_node_is_a_full_member() {
    full_member(false).await;
}

/// The same with CURVE everywhere (PROTOCOL.md section 10a): the Python node's id is
/// its key's, it learns keys from its seed's `#KEY` and the gossip, and libzmq's CURVE
/// ROUTER, DEALERs, XPUB and SUBs talk to ours both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secured_python_node_is_a_full_member() {
    full_member(true).await;
}

async fn full_member(secured: bool) {
    if !python_ready("the Python node test") {
        return;
    }
    init_tracing();
    let notes = Arc::new(AtomicUsize::new(0));
    let (k1, k2) = (CurveKeys::generate(), CurveKeys::generate());
    let builder = |name: &str, k: &CurveKeys| match secured {
        true => Node::builder(name).secure(k.clone()),
        false => Node::builder(name).insecure(),
    };
    let r1 = rust_node("rust-1", builder("rust-1", &k1), notes.clone()).await;
    let seed = match secured {
        true => format!("{}#{}", r1.endpoint(), encode_key(&k1.public())),
        false => r1.endpoint(),
    };
    let r2 = rust_node(
        "rust-2",
        builder("rust-2", &k2).peer_with_key(r1.endpoint(), k1.public()),
        notes.clone(),
    )
    .await;
    wait_service(&r2, "rust.echo", 1).await;

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python/peerwire_node.py"
    );
    let mut child = Killed(
        Command::new("python3")
            .args([script, "--seed", &seed, "--name", "py"])
            .args(secured.then_some("--secure"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs"),
    );
    let mut out = Lines::new(child.0.stdout.take().unwrap());
    let wait = |out: &mut Lines, what: &str, f: &dyn Fn(&Value) -> bool| {
        tokio::task::block_in_place(|| out.seen_or_wait(what, BOUND, |l| f(&json_line(l))))
    };
    let started = json_line(&wait(&mut out, "started", &|v| v["event"] == "started"));
    let py_id = started["id"].as_str().unwrap().to_string();
    if secured {
        // Its id is its key's, derived in Python as in Rust.
        let (_, key) = started["endpoint"]
            .as_str()
            .unwrap()
            .split_once('#')
            .unwrap();
        let id = Id::of_key(&decode_key(key).unwrap());
        assert_eq!(id.0.simple().to_string(), py_id);
    }

    // Python → Rust: it learned both Rust nodes from one seed, called, notified, gathered.
    let joined = json_line(&wait(&mut out, "joined", &|v| v["event"] == "joined"));
    assert_eq!(joined["peers"], json!(["rust-1", "rust-2"]));
    let call = json_line(&wait(&mut out, "call", &|v| v["event"] == "call"));
    assert_eq!(call["reply"], json!({"from": "py", "n": 7}));
    let asynced = json_line(&wait(&mut out, "async", &|v| v["event"] == "async"));
    assert_eq!(asynced["replies"], json!([{"n": 2}, {"n": 1}, {"n": 0}]));
    wait_until("the notification", || notes.load(Ordering::SeqCst) >= 1).await;
    let gather = json_line(&wait(&mut out, "gather", &|v| v["event"] == "gather"));
    assert_eq!(gather["replies"], json!(["rust-1", "rust-2"]));

    // Rust → Python: rust-2 knows it by gossip only (it joined through rust-1).
    wait_service(&r2, "py.greet", 1).await;
    let greeting: String = r2.request("py.greet", &"rust-2").await.unwrap();
    assert_eq!(greeting, "hello rust-2, from py");
    let pending: Vec<_> = futures_join(&r2, ["a", "b", "c"]).await;
    for (who, p) in ["a", "b", "c"].into_iter().zip(pending) {
        let got: String = within("an async reply", p.recv()).await.unwrap();
        assert_eq!(got, format!("hello {who}, from py"));
    }
    // Errors come back as errors: a handler that is not there.
    match r2.request::<_, Value>("py.nothing", &1).await {
        Err(peerwire::CallError::NoResponder(_)) => {}
        other => panic!("{other:?}"),
    }
    r2.notify("py.log", &json!({"n": 1})).await.unwrap();
    let notified = json_line(&wait(&mut out, "notified", &|v| v["event"] == "notified"));
    assert_eq!(notified["value"], json!({"n": 1}));

    // Its events reach a Rust subscription, numbered.
    let mut ticks = r2.subscribe::<Value>("py.events.");
    let a = within("a Python event", ticks.recv())
        .await
        .unwrap()
        .unwrap();
    let b = within("another", ticks.recv()).await.unwrap().unwrap();
    assert_eq!(a.topic, "py.events.tick");
    assert_eq!(a.publisher.0.simple().to_string(), py_id);
    assert_eq!(b.seq, a.seq + b.missed + 1);

    // It is an expected gather responder (known by its SUB's label, not an identity).
    wait_gatherable(&r1, "py.ping", 1).await;
    let g = r1
        .gather::<_, Value>(
            "py.ping",
            &json!({}),
            GatherOptions::within(Duration::from_secs(3)),
        )
        .await
        .unwrap();
    let outcome = g.finish().await;
    assert_eq!(
        outcome.end,
        GatherEnd::AllAnswered,
        "silent: {:?}",
        outcome.silent
    );
    let from: Vec<_> = outcome.replies.iter().map(|r| r.name.clone()).collect();
    assert_eq!(from, ["py"]);

    // It receives Rust events on its prefix.
    wait_until("py subscribed", || {
        !r1.subscribers_of("rust.events.x").is_empty()
    })
    .await;
    r1.publish("rust.events.x", &json!({"hello": "py"}))
        .unwrap();
    let ev = json_line(&wait(&mut out, "a Rust event", &|v| v["event"] == "event"));
    assert_eq!(
        (ev["topic"].clone(), ev["value"].clone()),
        (json!("rust.events.x"), json!({"hello": "py"}))
    );

    // And stops when told.
    r2.notify("py.stop", &Value::Null).await.unwrap();
    wait(&mut out, "stopped", &|v| v["event"] == "stopped");
    let status = tokio::task::block_in_place(|| child.0.wait()).unwrap();
    assert!(status.success());
}
