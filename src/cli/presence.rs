//! How the CLI shows peers and presence: one line (or one JSON object) per peer or
//! change, names cleaned of control characters; `peerwire peers --watch`.

use anyhow::Result;
use serde_json::Value;

use peerwire::node::{PeerInfo, PresenceEvent};

use super::{logging, NodeArgs, StopSignal};

pub(super) fn peer_json(p: &PeerInfo) -> Value {
    serde_json::json!({
        "id": p.id.to_string(),
        "name": p.name,
        "router": p.router_endpoint,
        "pub": p.pub_endpoint,
        "dialled": p.dialled,
        "connected": p.connected,
        "leaving": p.leaving,
        "methods": p.methods.iter().map(|(k, v)| (k.clone(), Value::String(v.to_string()))).collect::<serde_json::Map<_, _>>(),
        "gathers": p.gathers.keys().collect::<Vec<_>>(),
    })
}

/// One line for people about a presence event.
pub(super) fn presence_line(e: &PresenceEvent) -> String {
    match e {
        PresenceEvent::Joined(p) => format!(
            "+ joined  {} ({}) at {}: {} method(s)",
            logging::clean(&p.name),
            p.id,
            p.router_endpoint,
            p.methods.len()
        ),
        PresenceEvent::Updated(p) if p.leaving => format!(
            "~ leaving {} ({}) at {}: draining, new calls go elsewhere",
            logging::clean(&p.name),
            p.id,
            p.router_endpoint,
        ),
        PresenceEvent::Updated(p) => format!(
            "~ updated {} ({}) at {}: {} method(s)",
            logging::clean(&p.name),
            p.id,
            p.router_endpoint,
            p.methods.len()
        ),
        PresenceEvent::Left { peer, reason } => format!(
            "- left    {} ({}) at {}: {}",
            logging::clean(&peer.name),
            peer.id,
            peer.router_endpoint,
            logging::clean(reason)
        ),
        PresenceEvent::Lagged(n) => {
            format!("! missed {n} event(s); run `peerwire peers` for the table")
        }
        // An event this build does not describe yet.
        other => format!("? {other:?}"),
    }
}

/// One JSON line about a presence event, with the time (Unix milliseconds).
fn presence_json(e: &PresenceEvent) -> Value {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    match e {
        PresenceEvent::Joined(p) => {
            serde_json::json!({"event": "joined", "t": t, "peer": peer_json(p)})
        }
        PresenceEvent::Updated(p) => {
            serde_json::json!({"event": "updated", "t": t, "peer": peer_json(p)})
        }
        PresenceEvent::Left { peer, reason } => {
            serde_json::json!({"event": "left", "t": t, "peer": peer_json(peer), "reason": reason})
        }
        PresenceEvent::Lagged(n) => serde_json::json!({"event": "lagged", "t": t, "missed": n}),
        other => serde_json::json!({"event": "other", "t": t, "debug": format!("{other:?}")}),
    }
}

/// `peerwire peers --watch`: the peers as they join, change and leave, until Ctrl-C
/// (or `count` events).
pub async fn watch(args: &NodeArgs, json: bool, count: Option<u64>) -> Result<()> {
    args.some_source()?;
    let mut stop = StopSignal::new();
    let node = args.start(args.builder("peerwire-watch", false)?).await?;
    let mut presence = node.presence();
    if !json {
        errln!("watching for peers (Ctrl-C to stop)");
    }
    let mut n = 0u64;
    while count.is_none_or(|c| n < c) {
        tokio::select! {
            _ = stop.recv() => break,
            e = presence.next() => match e {
                Some(e) => {
                    n += 1;
                    if json {
                        outln!("{}", presence_json(&e));
                    } else {
                        outln!("{}", presence_line(&e));
                    }
                }
                None => break,
            }
        }
    }
    node.shutdown().await;
    Ok(())
}
