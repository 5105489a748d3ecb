//! The node's side of discovery: the loops that turn mDNS sightings and DNS answers into
//! DEALER connections (and forget what disappears). What a peer serves is learned from
//! its HELLO once connected, never from discovery. No public items.

use super::*;
use crate::discovery::{Sighting, VERSION_MAJOR_TXT};

/// Follows mDNS until the node leaves, then says goodbye.
pub(super) async fn mdns_loop(inner: Weak<Inner>, mdns: Mdns) {
    let Some(leave) = inner.upgrade().map(|i| i.leave.clone()) else {
        return;
    };
    // Instance → the endpoint we dial for it.
    let mut dialled: HashMap<String, String> = HashMap::new();
    loop {
        let sighting = tokio::select! {
            _ = leave.cancelled() => break,
            s = mdns.next() => match s {
                Some(s) => s,
                None => {
                    warn!("mDNS daemon stopped; discovery by mDNS ends");
                    break;
                }
            },
        };
        let Some(inner) = inner.upgrade() else { break };
        match sighting {
            Sighting::Up(seen) => {
                if seen.cluster != inner.cluster {
                    inner.counters.other_cluster.fetch_add(1, Relaxed);
                    debug!(instance = %seen.instance, cluster = %seen.cluster, "mDNS: a node of another cluster, ignored");
                    continue;
                }
                if seen.node_id == Some(inner.id) {
                    continue;
                }
                if seen.version != Some(VERSION_MAJOR_TXT) {
                    inner.counters.other_version.fetch_add(1, Relaxed);
                    warn!(instance = %seen.instance, version = ?seen.version, "mDNS: a node speaking another protocol version, ignored");
                    continue;
                }
                let Some(ep) = seen.router else {
                    debug!(instance = %seen.instance, addresses = ?seen.addresses, "mDNS: no usable address");
                    continue;
                };
                if let Some(old) = dialled.insert(seen.instance.clone(), ep.clone()) {
                    if old != ep && !inner.static_endpoints.contains(&old) {
                        inner.forget(&old, "moved").await;
                    }
                }
                debug!(node = %inner.name, instance = %seen.instance, endpoint = %ep, "mDNS: found a peer");
                if let Err(e) = inner.ensure_dealer(&ep) {
                    debug!(endpoint = %ep, error = %e, "mDNS: not dialling");
                }
            }
            Sighting::Own => {}
            Sighting::Down { instance } => {
                if let Some(ep) = dialled.remove(&instance) {
                    debug!(node = %inner.name, %instance, endpoint = %ep, "mDNS: peer said goodbye");
                    if !inner.static_endpoints.contains(&ep) {
                        inner.forget(&ep, "said goodbye").await;
                    }
                }
            }
        }
    }
    mdns.stop().await;
}

/// Resolves the DNS seeds every `every` until the node leaves: new addresses are dialled,
/// vanished ones forgotten.
pub(super) async fn dns_loop(
    inner: Weak<Inner>,
    seeds: Vec<DnsSeed>,
    every: Duration,
    leave: CancellationToken,
) {
    let mut current: HashSet<String> = HashSet::new();
    let mut last_error: HashMap<String, String> = HashMap::new();
    loop {
        let mut found: HashSet<String> = HashSet::new();
        let mut failed = false;
        for seed in &seeds {
            let res = tokio::select! {
                _ = leave.cancelled() => return,
                r = seed.resolve() => r,
            };
            match res {
                Ok(eps) => {
                    if last_error.remove(&seed.to_string()).is_some() {
                        debug!(%seed, "DNS seed resolves again");
                    }
                    found.extend(eps);
                }
                Err(e) => {
                    failed = true;
                    // Logged when it starts failing or fails differently, not every round.
                    let msg = e.to_string();
                    if last_error.insert(seed.to_string(), msg.clone()).as_ref() != Some(&msg) {
                        warn!(%seed, error = %msg, "DNS seed does not resolve");
                    }
                }
            }
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        for ep in found.difference(&current) {
            if let Err(e) = strong.ensure_dealer(ep) {
                debug!(endpoint = %ep, error = %e, "DNS: not dialling");
            }
        }
        // A failed lookup proves nothing: keep what we had until an answer drops it.
        if !failed {
            for ep in current.difference(&found) {
                if !strong.static_endpoints.contains(ep) {
                    strong.forget(ep, "gone from DNS").await;
                }
            }
            current = found;
        } else {
            current.extend(found);
        }
        drop(strong);
        tokio::select! {
            _ = leave.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
