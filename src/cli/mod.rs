//! The `peerwire` command's subcommands. JSON at the edge, MessagePack on the wire.

pub mod bench;
pub mod call;
pub mod demo;
mod demo_channels;
mod demo_resilience;
pub mod doctor;
pub mod isolate;
pub mod keys;
pub mod logging;
pub mod outbox;
mod presence;
pub mod services;

pub use presence::watch;
use presence::{peer_json, presence_line};

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use peerwire::codec::Version;
use peerwire::discovery::{DiscoveryError, DnsSeed, MdnsConfig};
use peerwire::node::{GatherOptions, Node, NodeBuilder, NodeError};
use serde_json::Value;

/// How a command's node uses mDNS.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MdnsMode {
    /// No mDNS: only --peer and --dns.
    Off,
    /// mDNS on loopback only (nodes on this host).
    Loopback,
    /// mDNS on every LAN interface (not loopback, container bridges, veth or VPNs).
    Lan,
}

/// Options shared by every command that runs a node.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// A peer's ROUTER endpoint, tcp://host:port, or tcp://host:port#KEY for a secured
    /// peer (KEY: its public key in Z85, as `peerwire keys show` prints it). Repeatable.
    #[arg(long = "peer", value_name = "ENDPOINT")]
    pub peers: Vec<String>,
    /// Secure this node with CURVE using the key pair in FILE (a ZeroMQ secret
    /// certificate, as `peerwire keys new` writes; `peerwire node` creates it if
    /// missing): every connection authenticated and encrypted, the node id derived from
    /// the key.
    #[arg(long, value_name = "FILE")]
    pub key: Option<std::path::PathBuf>,
    /// Secure this node with a key pair made for this run (implied by a --peer with #KEY).
    #[arg(long)]
    pub secure: bool,
    /// Membership by a cluster secret: only nodes holding the secret in FILE (as
    /// `peerwire keys secret FILE` writes it) can complete a handshake with this node,
    /// either way. Secures the node (with --key's key pair, or one for this run), and
    /// peers need no #KEY.
    #[arg(long, value_name = "FILE", env = "PEERWIRE_CLUSTER_SECRET_FILE")]
    pub cluster_secret: Option<std::path::PathBuf>,
    /// Run without security (the NULL mechanism: anyone who reaches the node can call
    /// it, read its traffic and claim any id) when no --key, --secure, --cluster-secret
    /// or #KEY is given.
    /// One of them is required: security is never off by omission.
    #[arg(
        long,
        env = "PEERWIRE_INSECURE",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub insecure: bool,
    /// With security, let in only these client keys (Z85, or a certificate file).
    /// Repeatable.
    #[arg(long = "allow", value_name = "KEY")]
    pub allow: Vec<String>,
    /// A DNS name whose every address is a peer, NAME:PORT (repeatable), resolved again
    /// every --dns-every ms: a Kubernetes headless service, say.
    #[arg(long = "dns", value_name = "NAME:PORT")]
    pub dns: Vec<DnsSeed>,
    /// How often DNS names are resolved again, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub dns_every: u64,
    /// mDNS discovery: off, loopback or lan. --mdns-interface overrides the choice of
    /// interfaces.
    #[arg(long, value_enum, env = "PEERWIRE_MDNS", default_value = "lan")]
    pub mdns: MdnsMode,
    /// Use mDNS on exactly this interface (repeatable), even a bridge or a veth.
    #[arg(long = "mdns-interface", value_name = "NAME")]
    pub mdns_interfaces: Vec<String>,
    /// UDP port for mDNS (every node must agree).
    #[arg(long, env = "PEERWIRE_MDNS_PORT", default_value_t = 5353)]
    pub mdns_port: u16,
    /// Cluster name; nodes of other clusters are ignored.
    #[arg(long, default_value = "default")]
    pub cluster: String,
    /// Address to listen on (default: 127.0.0.1, or 0.0.0.0 when mDNS uses LAN
    /// interfaces).
    #[arg(long)]
    pub listen: Option<IpAddr>,
    /// How long to wait for peers (and, for calls, for a responder), in milliseconds.
    #[arg(long = "wait", default_value_t = 3000)]
    pub wait_ms: u64,
    /// How long a discovered peer may stay unreachable before it is forgotten, in
    /// milliseconds (it is dialled again while discovery still announces it).
    #[arg(long, default_value_t = 10_000)]
    pub forget_after: u64,
}

impl NodeArgs {
    /// The mDNS configuration these options ask for, if any.
    pub fn mdns_config(&self) -> Option<MdnsConfig> {
        let cfg = if !self.mdns_interfaces.is_empty() {
            MdnsConfig::interfaces(self.mdns_interfaces.clone())
        } else {
            match self.mdns {
                MdnsMode::Off => return None,
                MdnsMode::Loopback => MdnsConfig::loopback(),
                MdnsMode::Lan => MdnsConfig::lan(),
            }
        };
        Some(cfg.with_port(self.mdns_port))
    }

    /// The node these options describe; `create_key`: a missing --key file is created.
    fn builder(&self, name: &str, create_key: bool) -> Result<NodeBuilder> {
        let mut b = Node::builder(name)
            .cluster(self.cluster.clone())
            .dns_every(Duration::from_millis(self.dns_every))
            .forget_after(Duration::from_millis(self.forget_after));
        if let Some(l) = self.listen {
            b = b.listen(l);
        }
        if let Some(m) = self.mdns_config() {
            b = b.mdns(m);
        }
        for d in &self.dns {
            b = b.dns(d.clone());
        }
        keys::secure(self, b, create_key)
    }

    pub(crate) fn wait(&self) -> Duration {
        Duration::from_millis(self.wait_ms)
    }

    /// Fails unless at least one discovery source is given.
    fn some_source(&self) -> Result<()> {
        if self.peers.is_empty() && self.dns.is_empty() && self.mdns_config().is_none() {
            bail!("no way to find peers: give --peer tcp://host:port, --dns NAME:PORT, or --mdns loopback|lan");
        }
        Ok(())
    }

    /// Starts a node from `b`, with a hint for the mistakes people make with mDNS.
    async fn start(&self, b: NodeBuilder) -> Result<Node> {
        b.start().await.map_err(|e| match e {
            NodeError::Discovery(DiscoveryError::NoInterface(_)) => anyhow!(
                "{e} (see `peerwire doctor`; choose one with --mdns-interface NAME, or use \
                 --mdns loopback or --mdns off with --peer)"
            ),
            e => e.into(),
        })
    }

    /// Starts a short-lived node for one command and waits for membership to settle:
    /// (with mDNS or DNS) until discovery has been still for a moment, then until every
    /// endpoint named so far, gossip included, has answered or failed, all within
    /// `--wait`. ([`NodeArgs::report_unreachable`] says which `--peer` could not be
    /// reached.)
    pub(crate) async fn client_node(&self) -> Result<Node> {
        self.client_node_with(|b| b).await
    }

    /// [`client_node`](Self::client_node), with `adjust` applied to the node's builder.
    pub(crate) async fn client_node_with(
        &self,
        adjust: impl FnOnce(NodeBuilder) -> NodeBuilder,
    ) -> Result<Node> {
        self.some_source()?;
        let node = self
            .start(adjust(self.builder("peerwire-cli", false)?))
            .await?;
        let deadline = Instant::now() + self.wait();
        if !(self.dns.is_empty() && self.mdns_config().is_none()) {
            settle(&node, self.wait()).await;
        }
        node.wait_settled(deadline.saturating_duration_since(Instant::now()))
            .await;
        Ok(node)
    }

    /// Says on stderr which `--peer` could not be reached, and why.
    pub(crate) fn report_unreachable(&self, node: &Node) {
        for (endpoint, why) in node.unreachable() {
            if self
                .peers
                .iter()
                .any(|p| peerwire::Endpoint::parse(p).is_ok_and(|p| p == endpoint))
            {
                errln!("{endpoint}: unreachable ({})", logging::clean(&why));
            }
        }
    }
}

/// Waits until at least one peer is connected and the table has not changed for 300 ms,
/// or `bound` passes.
async fn settle(node: &Node, bound: Duration) {
    let deadline = Instant::now() + bound;
    let quiet = Duration::from_millis(300);
    let mut presence = node.presence();
    let mut seen = 0usize;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let wait = if seen > 0 { quiet.min(left) } else { left };
        match tokio::time::timeout(wait, presence.next()).await {
            Ok(Some(_)) => seen += 1,
            Ok(None) => return,
            Err(_) if seen > 0 => return,
            Err(_) => {}
        }
    }
}

/// Why nobody answers for `target`: the services seen, or, when no peer was reached at
/// all, the endpoints that could not be and why.
pub(crate) fn no_responder(node: &Node, target: &str) -> String {
    let unreachable = node.unreachable();
    if node.peers().iter().all(|p| !p.connected) && !unreachable.is_empty() {
        let list: Vec<String> = unreachable
            .iter()
            .map(|(ep, why)| format!("{ep}: {}", logging::clean(why)))
            .collect();
        return format!(
            "no responder known for {target}: no peer reached ({})",
            list.join("; ")
        );
    }
    format!(
        "no responder known for {target} (services seen: {})",
        known_services(node)
    )
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
        .map(|(_, n)| logging::clean(n))
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
    faults: services::Faults,
    sink: &services::SinkArgs,
) -> Result<()> {
    logging::keep_heap_small();
    for s in serve {
        if !["echo", "relay", "sink"].contains(&s.as_str()) {
            bail!("unknown built-in service {s:?} (available: echo, relay, sink)");
        }
    }
    let relay = serve.iter().any(|s| s == "relay");
    // Listening before the endpoint line is printed: a script that reads it and at
    // once sends SIGTERM must get a graceful stop.
    let mut stop = StopSignal::new();
    let mut builder = args
        .builder(name, true)?
        .router_port(port)
        .pub_port(pub_port);
    if relay {
        builder = builder.service("echo", services::relay_policy());
    }
    let node = std::sync::Arc::new(args.start(builder).await?);
    if serve.iter().any(|s| s == "echo") {
        services::serve_echo(&node, faults);
    }
    if relay {
        services::serve_relay(&node);
    }
    if serve.iter().any(|s| s == "sink") {
        if let Err(e) = services::serve_sink(&node, sink) {
            node.shutdown().await;
            return Err(e);
        }
    }
    print_endpoint(&node);
    errln!(
        "node {name} ({}) listening: router {} pub {}",
        node.id(),
        node.endpoint(),
        node.pub_endpoint()
    );
    let mut presence = node.presence();
    let mut breakers = node.breaker_events();
    let mut trim = tokio::time::interval(logging::TRIM_EVERY);
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            e = presence.next() => match e {
                // Not `errln!`: a stderr nobody reads must not stop the node.
                Some(e) => logging::stderr().line(&presence_line(&e)),
                None => break,
            },
            Ok(e) = breakers.recv() => logging::stderr().line(&format!(
                "! breaker {} at {}: {:?} -> {:?}",
                logging::clean(&e.service),
                e.instance,
                e.from,
                e.to
            )),
            _ = trim.tick() => logging::give_back_memory().await,
        }
    }
    logging::stderr().line("shutting down");
    node.shutdown().await;
    for (what, lines) in [("stdout", logging::stdout()), ("stderr", logging::stderr())] {
        if lines.dropped() > 0 {
            logging::stderr().line(&format!(
                "{} line(s) of {what} were dropped: nothing was reading it",
                lines.dropped()
            ));
        }
    }
    Ok(())
}

/// Prints a long-running node's first line, its endpoint, for scripts to read: with its
/// key when secured, as other commands' --peer takes it. (Unsecured, the node has logged
/// its warning as it started.)
pub(crate) fn print_endpoint(node: &Node) {
    match node.public_key() {
        Some(k) => outln!(
            "{}#{}",
            node.endpoint(),
            peerwire::transport::curve::encode_key(&k)
        ),
        None => outln!("{}", node.endpoint()),
    }
}

/// Ctrl-C or SIGTERM (so `kill` stops a node as gracefully as Ctrl-C). Listening starts
/// when this is created, once, before the loop that waits on it: a signal listener made
/// afresh on each turn of a `select!` misses a signal that lands between two turns.
pub struct StopSignal {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl StopSignal {
    /// Starts listening.
    pub fn new() -> StopSignal {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            StopSignal {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        StopSignal {}
    }

    /// Resolves when one of them arrives (or arrived since `new`).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            let term = async {
                match &mut self.term {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let int = async {
                match &mut self.int {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term => {}
                _ = int => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `peerwire peers`.
pub async fn peers(args: &NodeArgs, json: bool) -> Result<()> {
    let node = args.client_node().await?;
    args.report_unreachable(&node);
    let peers = node.peers();
    if json {
        let v: Vec<Value> = peers.iter().map(peer_json).collect();
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else if peers.is_empty() {
        outln!("no peers answered within {} ms", args.wait_ms);
    } else {
        for p in &peers {
            outln!(
                "{:<20} {}  {}  {}",
                logging::clean(&p.name),
                p.id,
                p.router_endpoint,
                match (p.connected, p.leaving) {
                    (true, true) => "connected, leaving",
                    (true, false) => "connected",
                    (false, _) => "down",
                }
            );
            for (m, v) in &p.methods {
                outln!("    {} {v}", logging::clean(m));
            }
            for (g, v) in &p.gathers {
                outln!("    {} {v} (gather)", logging::clean(g));
            }
        }
    }
    node.shutdown().await;
    Ok(())
}

/// `peerwire notify`.
pub async fn notify(args: &NodeArgs, target: &str, json: &str) -> Result<()> {
    let msg = parse_json("the notification", json)?;
    let node = args.client_node().await?;
    if !node.wait_for_service(target, 1, args.wait()).await {
        let why = no_responder(&node, target);
        node.shutdown().await;
        bail!("{why}");
    }
    let out = node.notify(target, &msg).await;
    node.shutdown().await;
    out?;
    errln!("notification sent to one instance of {target}");
    Ok(())
}

/// `peerwire publish`.
pub async fn publish(args: &NodeArgs, topic: &str, json: &str) -> Result<()> {
    let event = parse_json("the event", json)?;
    let node = args.client_node().await?;
    args.report_unreachable(&node);
    // Subscribers learn of this short-lived node from its HELLO and then connect.
    let deadline = Instant::now() + args.wait();
    while node.subscribers_of(topic).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = node.publish(topic, &event)?;
    node.shutdown().await;
    errln!(
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
    let mut stop = StopSignal::new();
    let node = args.client_node().await?;
    let mut sub = node.subscribe::<Value>(topic);
    errln!("subscribed to {topic:?}; Ctrl-C to stop");
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            e = sub.recv() => match e {
                Some(Ok(e)) => {
                    let line = serde_json::json!({
                        "topic": e.topic, "publisher": e.publisher.to_string(),
                        "seq": e.seq, "missed": e.missed, "value": e.value,
                    });
                    outln!("{line}");
                    n += 1;
                    if count.is_some_and(|c| n >= c) {
                        break;
                    }
                }
                Some(Err(err)) => errln!("undecodable event: {err}"),
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
    args.report_unreachable(&node);
    // Responders subscribe to this node's PUB once they have its HELLO: wait until every
    // peer known to answer `topic` is among the subscribers (by id, not by count: one
    // subscribed early must not stand in for another not yet subscribed).
    let deadline = Instant::now() + args.wait();
    loop {
        let listening = node.subscribers_of(topic);
        let all_listen = node
            .peers()
            .iter()
            .filter(|p| p.gathers.contains_key(topic))
            .all(|p| listening.contains(&p.id));
        if all_listen || Instant::now() >= deadline {
            break;
        }
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
        outln!(
            "{}",
            serde_json::json!({ "from": r.name, "id": r.from.to_string(), "micros": r.elapsed.as_micros() as u64, "reply": value })
        );
    }
    errln!(
        "{} repl{} ({:?}); silent: {}",
        out.replies.len(),
        if out.replies.len() == 1 { "y" } else { "ies" },
        out.end,
        names(&out.silent)
    );
    node.shutdown().await;
    Ok(())
}
