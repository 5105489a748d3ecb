//! The `peerwire` command's subcommands. JSON at the edge, MessagePack on the wire.

pub mod demo;
pub mod services;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use peerwire::codec::Version;
use peerwire::node::{CallOptions, GatherOptions, Node, NodeBuilder};
use serde_json::Value;

/// Options shared by every command that runs a node.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// A peer's ROUTER endpoint, tcp://host:port (repeatable).
    #[arg(long = "peer", value_name = "ENDPOINT")]
    pub peers: Vec<String>,
    /// Cluster name; nodes of other clusters are ignored.
    #[arg(long, default_value = "default")]
    pub cluster: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub listen: IpAddr,
    /// How long to wait for peers (and, for calls, for a responder), in milliseconds.
    #[arg(long = "wait", default_value_t = 3000)]
    pub wait_ms: u64,
}

impl NodeArgs {
    fn builder(&self, name: &str) -> NodeBuilder {
        let mut b = Node::builder(name)
            .cluster(self.cluster.clone())
            .listen(self.listen);
        for p in &self.peers {
            b = b.peer(p.clone());
        }
        b
    }

    fn wait(&self) -> Duration {
        Duration::from_millis(self.wait_ms)
    }

    /// Starts a short-lived node for one command and waits for its static peers.
    async fn client_node(&self) -> Result<Node> {
        if self.peers.is_empty() {
            bail!("no peers: give at least one --peer tcp://host:port");
        }
        let node = self.builder("peerwire-cli").start().await?;
        node.wait_for_peers(self.peers.len(), self.wait()).await;
        Ok(node)
    }
}

/// Parses a JSON argument, with a one-line error naming what was wrong.
pub fn parse_json(what: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| anyhow!("{what} is not valid JSON: {e}"))
}

/// Node names of a list of (id, name), comma-separated, or "none".
pub fn names(list: &[(peerwire::codec::Id, String)]) -> String {
    if list.is_empty() {
        return "none".into();
    }
    list.iter()
        .map(|(_, n)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `MAJOR.MINOR`.
pub fn parse_version(s: &str) -> Result<Version> {
    let (a, b) = s.split_once('.').unwrap_or((s, "0"));
    Ok(Version::new(
        a.parse().with_context(|| format!("bad version {s:?}"))?,
        b.parse().with_context(|| format!("bad version {s:?}"))?,
    ))
}

fn known_services(node: &Node) -> String {
    let mut all: Vec<String> = node
        .peers()
        .iter()
        .flat_map(|p| p.methods.keys().cloned())
        .collect();
    all.sort();
    all.dedup();
    if all.is_empty() {
        "none".into()
    } else {
        all.join(", ")
    }
}

/// `peerwire node`: runs a node until Ctrl-C.
pub async fn run_node(
    args: &NodeArgs,
    name: &str,
    port: u16,
    pub_port: u16,
    serve: &[String],
) -> Result<()> {
    let node = args
        .builder(name)
        .router_port(port)
        .pub_port(pub_port)
        .start()
        .await?;
    for s in serve {
        match s.as_str() {
            "echo" => services::serve_echo(&node),
            other => bail!("unknown built-in service {other:?} (available: echo)"),
        }
    }
    // The first line is the endpoint, for scripts to read.
    println!("{}", node.endpoint());
    eprintln!(
        "node {name} ({}) listening: router {} pub {}",
        node.id(),
        node.endpoint(),
        node.pub_endpoint()
    );
    let mut presence = node.presence();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            p = presence.recv() => if let Ok(p) = p {
                eprintln!("peer {} ({}) at {}: {} method(s)", p.name, p.id, p.router_endpoint, p.methods.len());
            }
        }
    }
    eprintln!("shutting down");
    node.shutdown().await;
    Ok(())
}

/// `peerwire peers`.
pub async fn peers(args: &NodeArgs, json: bool) -> Result<()> {
    let node = args.client_node().await?;
    let peers = node.peers();
    if json {
        let v: Vec<Value> = peers
            .iter()
            .map(|p| {
                serde_json::json!({
                    "id": p.id.to_string(),
                    "name": p.name,
                    "router": p.router_endpoint,
                    "pub": p.pub_endpoint,
                    "connected": p.connected,
                    "methods": p.methods.iter().map(|(k, v)| (k.clone(), Value::String(v.to_string()))).collect::<serde_json::Map<_, _>>(),
                    "gathers": p.gathers.keys().collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if peers.is_empty() {
        println!("no peers answered within {} ms", args.wait_ms);
    } else {
        for p in &peers {
            println!(
                "{:<20} {}  {}  {}",
                p.name,
                p.id,
                p.router_endpoint,
                if p.connected { "connected" } else { "down" }
            );
            for (m, v) in &p.methods {
                println!("    {m} {v}");
            }
            for (g, v) in &p.gathers {
                println!("    {g} {v} (gather)");
            }
        }
    }
    node.shutdown().await;
    Ok(())
}

/// `peerwire call`.
pub async fn call(
    args: &NodeArgs,
    target: &str,
    json: &str,
    timeout_ms: u64,
    version: Option<&str>,
) -> Result<()> {
    let req = parse_json("the request", json)?;
    let version = version.map(parse_version).transpose()?;
    let node = args.client_node().await?;
    if !node.wait_for_service(target, 1, args.wait()).await {
        let known = known_services(&node);
        node.shutdown().await;
        bail!("no responder known for {target} (services seen: {known})");
    }
    let mut opts = CallOptions::timeout(Duration::from_millis(timeout_ms));
    opts.version = version;
    let started = Instant::now();
    let out = node.request_with::<_, Value>(target, &req, opts).await;
    let took = started.elapsed();
    node.shutdown().await;
    let reply = out?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    eprintln!("({} µs)", took.as_micros());
    Ok(())
}

/// `peerwire notify`.
pub async fn notify(args: &NodeArgs, target: &str, json: &str) -> Result<()> {
    let msg = parse_json("the notification", json)?;
    let node = args.client_node().await?;
    if !node.wait_for_service(target, 1, args.wait()).await {
        let known = known_services(&node);
        node.shutdown().await;
        bail!("no responder known for {target} (services seen: {known})");
    }
    let out = node.notify(target, &msg).await;
    node.shutdown().await;
    out?;
    eprintln!("notification sent to one instance of {target}");
    Ok(())
}

/// `peerwire publish`.
pub async fn publish(args: &NodeArgs, topic: &str, json: &str) -> Result<()> {
    let event = parse_json("the event", json)?;
    let node = args.client_node().await?;
    // Subscribers learn of this short-lived node from its HELLO and then connect.
    let deadline = Instant::now() + args.wait();
    while node.subscribers_of(topic).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = node.publish(topic, &event)?;
    node.shutdown().await;
    eprintln!(
        "published on {topic} to {} subscriber(s){}",
        report.queued,
        if report.dropped > 0 {
            format!(", {} dropped", report.dropped)
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `peerwire subscribe`.
pub async fn subscribe(args: &NodeArgs, topic: &str, count: Option<u64>) -> Result<()> {
    let node = args.client_node().await?;
    let mut sub = node.subscribe::<Value>(topic);
    eprintln!("subscribed to {topic:?}; Ctrl-C to stop");
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            e = sub.recv() => match e {
                Some(Ok(e)) => {
                    let line = serde_json::json!({
                        "topic": e.topic, "publisher": e.publisher.to_string(),
                        "seq": e.seq, "missed": e.missed, "value": e.value,
                    });
                    println!("{line}");
                    n += 1;
                    if count.is_some_and(|c| n >= c) {
                        break;
                    }
                }
                Some(Err(err)) => eprintln!("undecodable event: {err}"),
                None => break,
            }
        }
    }
    drop(sub);
    node.shutdown().await;
    Ok(())
}

/// `peerwire gather`.
pub async fn gather(
    args: &NodeArgs,
    topic: &str,
    json: &str,
    within_ms: u64,
    quorum: Option<usize>,
) -> Result<()> {
    let req = parse_json("the request", json)?;
    let node = args.client_node().await?;
    // Responders subscribe to this node's PUB once they have its HELLO.
    let deadline = Instant::now() + args.wait();
    let expected = node
        .peers()
        .iter()
        .filter(|p| p.gathers.contains_key(topic))
        .count();
    while node.subscribers_of(topic).len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut opts = GatherOptions::within(Duration::from_millis(within_ms));
    opts.quorum = quorum;
    let g = match node.gather::<_, Value>(topic, &req, opts).await {
        Ok(g) => g,
        Err(e) => {
            node.shutdown().await;
            return Err(e.into());
        }
    };
    let out = g.finish().await;
    for r in &out.replies {
        let value = match &r.result {
            Ok(v) => v.clone(),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        println!(
            "{}",
            serde_json::json!({ "from": r.name, "id": r.from.to_string(), "micros": r.elapsed.as_micros() as u64, "reply": value })
        );
    }
    eprintln!(
        "{} repl{} ({:?}); silent: {}",
        out.replies.len(),
        if out.replies.len() == 1 { "y" } else { "ies" },
        out.end,
        names(&out.silent)
    );
    node.shutdown().await;
    Ok(())
}
