//! `peerwire doctor`: explains discovery. Which interfaces mDNS uses and why, whether its
//! packets go out and come back, which nodes were seen (and which were ignored, and why),
//! and whether each peer can be reached, with the reason when it cannot.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use peerwire::discovery::{interface_choices, Announcement, Mdns, Seen, Sighting};
use peerwire::node::Node;
use peerwire::transport::{Dealer, SocketEvent, SocketOptions};

use super::NodeArgs;

/// Runs the checks and prints a report. Fails (non-zero exit) when a problem was found.
pub async fn run(args: &NodeArgs) -> Result<()> {
    let mut problems: Vec<String> = Vec::new();
    let mdns_cfg = args.mdns_config();

    outln!("interfaces");
    match &mdns_cfg {
        None => outln!("  mDNS is off (--mdns off); only --peer and --dns are used"),
        Some(cfg) => {
            let choices = interface_choices(&cfg.interfaces);
            for c in &choices {
                outln!(
                    "  {:<12} {:<40} {}",
                    c.name,
                    c.addr.to_string(),
                    if c.used {
                        format!("used ({})", c.why)
                    } else {
                        format!("skipped: {}", c.why)
                    }
                );
            }
            if let peerwire::discovery::Interfaces::Named(names) = &cfg.interfaces {
                for n in names
                    .iter()
                    .filter(|n| !choices.iter().any(|c| &c.name == *n))
                {
                    problems.push(format!("there is no interface named {n:?} here"));
                }
            }
            if !choices.iter().any(|c| c.used) {
                problems.push(format!(
                    "no interface is usable for mDNS ({}); name one that is up with \
                     --mdns-interface",
                    cfg.interfaces
                ));
            }
        }
    }

    // A real node, so that peers that find us can also complete a HELLO with us. It does
    // not run mDNS itself: the doctor's own announcer below does, to see every sighting.
    let node = {
        // Unsecured: it only answers HELLOs, to see who can reach it.
        let mut b = Node::builder("peerwire-doctor")
            .cluster(args.cluster.clone())
            .insecure();
        if let Some(l) = args.listen {
            b = b.listen(l);
        } else if mdns_cfg.as_ref().is_some_and(|c| c.reaches_other_hosts()) {
            b = b.listen(std::net::Ipv4Addr::UNSPECIFIED.into());
        }
        b.start().await?
    };
    let wait = Duration::from_millis(args.wait_ms);
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let mut heard_own = false;
    if let Some(cfg) = mdns_cfg.as_ref().filter(|_| problems.is_empty()) {
        let router_port = port_of(&node.endpoint());
        let me = Announcement {
            node_id: node.id(),
            name: "peerwire-doctor".into(),
            cluster: args.cluster.clone(),
            router_port,
            pub_port: port_of(&node.pub_endpoint()),
            key: None,
        };
        match Mdns::start(cfg, &me) {
            Err(e) => problems.push(format!("mDNS cannot start: {e}")),
            Ok(mut mdns) => {
                outln!(
                    "\nmDNS: announcing {} on UDP port {}, browsing for {} ms",
                    mdns.fullname(),
                    cfg.port,
                    args.wait_ms
                );
                let deadline = Instant::now() + wait;
                let mut received = 0usize;
                while let Ok(Some(s)) = tokio::time::timeout(
                    deadline.saturating_duration_since(Instant::now()),
                    mdns.next(),
                )
                .await
                {
                    received += 1;
                    match s {
                        Sighting::Own => heard_own = true,
                        Sighting::Refreshed => {}
                        Sighting::Up(s) => {
                            seen.insert(s.instance.clone(), s);
                        }
                        Sighting::Down { instance } => {
                            seen.remove(&instance);
                        }
                        // A sighting this build does not know: nothing to report.
                        _ => {}
                    }
                }
                let m = mdns.metrics().await;
                let get = |k: &str| m.get(k).copied().unwrap_or(0);
                outln!(
                    "  sent: {} announcement(s) and resends, {} query round(s), {} response(s)",
                    get("register") + get("register-resend"),
                    get("browse"),
                    get("respond")
                );
                outln!(
                    "  received: {received} resolved answer(s) and goodbye(s); our own \
                     announcement {}; {} other instance(s)",
                    if heard_own {
                        "came back"
                    } else {
                        "never came back"
                    },
                    seen.len()
                );
                if !heard_own {
                    problems.push(
                        "our own mDNS announcement never came back: multicast is not \
                         looped back or UDP 5353 is filtered on the chosen interfaces"
                            .into(),
                    );
                }
                mdns.stop().await;
            }
        }
    }

    outln!("\npeers");
    let mut targets: Vec<(String, String)> = Vec::new();
    for s in seen.values() {
        let who = format!("{} ({}) via mDNS", s.name, s.instance);
        if s.cluster != args.cluster {
            outln!(
                "  {who}: ignored, cluster {:?} (ours is {:?})",
                s.cluster,
                args.cluster
            );
            continue;
        }
        if s.version != Some(peerwire::codec::VERSION_MAJOR) {
            outln!("  {who}: ignored, protocol version {:?}", s.version);
            problems.push(format!("{who} speaks another protocol version"));
            continue;
        }
        match &s.router {
            Some(ep) => targets.push((who, ep.to_string())),
            None => {
                outln!("  {who}: no usable address among {:?}", s.addresses);
                problems.push(format!("{who} announced no address we can use"));
            }
        }
    }
    for p in &args.peers {
        targets.push((format!("static peer {p}"), p.clone()));
    }
    for d in &args.dns {
        match d.resolve().await {
            Ok(eps) if eps.is_empty() => {
                outln!("  DNS {d}: no addresses");
                problems.push(format!("DNS name {d} has no addresses"));
            }
            Ok(eps) => {
                for ep in eps {
                    targets.push((format!("DNS {d}"), ep.to_string()));
                }
            }
            Err(e) => {
                outln!("  DNS {d}: does not resolve: {e}");
                problems.push(format!("DNS name {d} does not resolve: {e}"));
            }
        }
    }
    if targets.is_empty() {
        outln!("  none seen");
        problems.push("no peer was found".into());
    }
    for (who, ep) in &targets {
        match reach(ep, Duration::from_secs(2)).await {
            Ok(()) => {
                let _ = node.add_peer(ep);
                outln!("  {who} at {ep}: reachable (ZMTP handshake completed)");
            }
            Err(why) => {
                outln!("  {who} at {ep}: NOT reachable: {why}");
                problems.push(format!("{who} at {ep} is not reachable: {why}"));
            }
        }
    }
    // The HELLO tells what each reachable peer serves.
    if !targets.is_empty() {
        node.wait_for_peers(targets.len(), Duration::from_secs(2))
            .await;
        for p in node.peers().iter().filter(|p| p.connected) {
            outln!(
                "  {} ({}) serves: {}",
                p.name,
                p.id,
                if p.methods.is_empty() {
                    "nothing".to_string()
                } else {
                    p.methods.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            );
        }
    }
    node.shutdown().await;

    if problems.is_empty() {
        outln!("\nno problems found");
        Ok(())
    } else {
        outln!("\nproblems");
        for p in &problems {
            outln!("  - {p}");
        }
        bail!("{} problem(s) found", problems.len())
    }
}

fn port_of(endpoint: &str) -> u16 {
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// Connects to a ROUTER endpoint and completes the ZMTP handshake, or says why not.
async fn reach(endpoint: &str, bound: Duration) -> Result<(), String> {
    let opts = SocketOptions::default()
        .with_reconnect_initial(Duration::from_millis(100))
        .with_reconnect_max(Duration::from_millis(500));
    let (dealer, mut events) =
        Dealer::connect_with_events(endpoint, opts).map_err(|e| e.to_string())?;
    let mut last = None;
    let out = tokio::time::timeout(bound, async {
        loop {
            match events.recv().await {
                Ok(SocketEvent::Connected { .. }) => return Ok(()),
                Ok(SocketEvent::HandshakeFailed { reason, .. }) => {
                    return Err(format!("handshake failed: {reason}"))
                }
                Ok(SocketEvent::ConnectFailed { error, .. }) => last = Some(error),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    dealer.close().await;
    match out {
        Ok(r) => r,
        Err(_) => Err(match last {
            Some(e) => format!("{e} (for {bound:?})"),
            None => format!("no answer within {bound:?} (filtered?)"),
        }),
    }
}
