//! HELLO: building ours and announcing it, answering a peer's (a HELLO-ACK, or for a
//! node of another cluster only enough to say so), bounding what a HELLO may cost
//! (size, rate, catalog), remembering who introduced itself on which ROUTER connection
//! for as long as that connection lives, and following the peers a HELLO names.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::broadcast;
use tracing::{debug, warn};

use super::{Membership, MembershipLimits, NamedBy, MAX_GOSSIP, MAX_INTRODUCED};
use crate::codec::{self, CodecError, Header, Hello, Id, Kind};
use crate::node::frames;
use crate::node::security::claims_its_own_id;
use crate::transport::is_ipc_peer;
use crate::transport::{Endpoint, Message, Router, SocketEvent};

impl Membership {
    /// Our HELLO: who we are, what we serve, whom we are connected to.
    pub(in crate::node) fn hello(&self) -> Hello {
        Hello {
            node_id: self.given.local.id,
            name: self.given.local.name.clone(),
            cluster: self.given.local.cluster.clone(),
            host: self.given.local.host.to_string(),
            router_port: self.given.local.router_port,
            pub_port: self.given.local.pub_port,
            catalog: self.given.registry.catalog(),
            peers: self.gossip_entries(),
            leaving: self.is_leaving(),
            ipc: self.given.ipc.as_ref().map(|i| i.host_key().to_string()),
        }
    }

    /// Our peers as HELLO names them: ROUTER endpoints, each with `#` and its key (Z85)
    /// when this node is secured, so that a peer can dial them (PROTOCOL.md section 9).
    fn gossip_entries(&self) -> Vec<String> {
        // (An `ipc://` peer an operator gave is ours to dial, nobody else's.)
        let mut endpoints = self.state.lock().table.connected_endpoints();
        endpoints.retain(|e| e.ipc_path().is_none());
        let Some(book) = &self.given.keys else {
            return endpoints.iter().map(ToString::to_string).collect();
        };
        endpoints
            .iter()
            .filter_map(|e| match book.key_of(e) {
                Some(key) => Some(format!("{e}#{}", crate::transport::curve::encode_key(&key))),
                // A member of a cluster with a secret needs no key to dial.
                None => book.may_dial(e).then(|| e.to_string()),
            })
            .collect()
    }

    pub(super) fn hello_message(&self, kind: Kind, correlation: Id) -> Message {
        self.hello_envelope(kind, correlation).1
    }

    /// Our HELLO as a message, and its message id (which the ACK's `cid` will carry).
    pub(super) fn hello_envelope(&self, kind: Kind, correlation: Id) -> (Id, Message) {
        let mut h = Header::new(kind, self.given.local.id, "");
        h.correlation_id = correlation;
        let payload = codec::encode_payload(&self.hello()).expect("a HELLO always encodes");
        (h.id, frames::message(&h, payload))
    }

    /// Asks for a fresh HELLO to every peer (our catalog or our peers changed). Sent by
    /// the announcer at once if it is idle, else at the end of its interval: a burst of
    /// changes makes one round of HELLOs, not one per change.
    pub(in crate::node) fn announce(&self) {
        self.announce_wanted.store(true, Relaxed);
        self.announce_wake.notify_one();
    }

    pub(super) fn send_hellos(&self) {
        let msg = self.hello_message(Kind::Hello, Id::NIL);
        for d in self.state.lock().table.dealers() {
            let _ = d.try_send(msg.clone());
        }
    }

    /// The HELLO-ACK for a node of another cluster: who we are and our cluster, which is
    /// all it needs to stop talking to us, and nothing of our catalog or peers.
    pub(super) fn wrong_cluster_ack(&self, correlation: Id) -> Message {
        let mut h = Header::new(Kind::HelloAck, self.given.local.id, "");
        h.correlation_id = correlation;
        let hello = Hello {
            node_id: self.given.local.id,
            cluster: self.given.local.cluster.clone(),
            ..Hello::default()
        };
        let payload = codec::encode_payload(&hello).expect("a HELLO always encodes");
        frames::message(&h, payload)
    }

    /// A HELLO that arrived on our ROUTER from the connection `identity`: answered with
    /// a HELLO-ACK, and its sender learned.
    pub(in crate::node) fn on_hello(
        self: &Arc<Self>,
        router: &Router,
        identity: &Bytes,
        header: &Header,
        payload: &[u8],
    ) -> Result<(), CodecError> {
        let source = router.peer_addr(identity);
        if !self.rates.lock().hello(identity, source.map(|a| a.ip())) {
            // Dropped before it is even decoded: a flood costs a map lookup each.
            self.hellos_limited.fetch_add(1, Relaxed);
            debug!(addr = ?source, "HELLO dropped: too many from this connection or address");
            return Ok(());
        }
        if !self.hello_size_ok(payload) {
            return Ok(());
        }
        let hello: Hello = codec::decode_payload(payload)?;
        // Secured: the key this connection proved decides whose HELLO it can be, before
        // anything of it is believed (who sent what on this connection included).
        let key = router.peer_key(identity);
        if !claims_its_own_id(self.is_secured(), hello.node_id, key) {
            self.hellos_refused.fetch_add(1, Relaxed);
            warn!(addr = ?source, id = %hello.node_id, "HELLO refused: its node id is not the one its key proves");
            return Ok(());
        }
        if let Some(addr) = source {
            self.introduce(router, identity, hello.node_id, addr);
        }
        // Learned before it is acknowledged: a node that waits for our ACK (one that is
        // leaving, say) knows that we know when the ACK comes.
        let ours = hello.cluster == self.given.local.cluster;
        // Its id is checked above: learned as it is. Over ipc there is no source address
        // to judge its endpoints by: it is on this host, which is what ipc proves.
        let source_ip = source.filter(|a| !is_ipc_peer(a)).map(|a| a.ip());
        self.learn(hello, source_ip, key);
        let ack = match ours {
            true => self.hello_message(Kind::HelloAck, header.id),
            false => self.wrong_cluster_ack(header.id),
        };
        send_ack(router, identity, ack);
        Ok(())
    }

    /// Records that `node` introduced itself on the live ROUTER connection `identity`.
    pub(super) fn introduce(&self, router: &Router, identity: &Bytes, node: Id, addr: SocketAddr) {
        let mut ids = self.router_ids.lock();
        if ids.len() >= MAX_INTRODUCED {
            // Only entries whose end we missed (lagged events) can be stale: keep the
            // live connections' and drop the rest. Nothing live is ever wiped.
            let live: HashSet<Bytes> = router.peers().into_iter().map(|p| p.identity).collect();
            ids.retain(|id, _| live.contains(id));
        }
        ids.insert(identity.clone(), (node, addr));
    }

    /// Whether a HELLO payload is small enough to decode (what it decodes into is kept).
    pub(super) fn hello_size_ok(&self, payload: &[u8]) -> bool {
        let max = self.given.limits.max_hello_bytes;
        if payload.len() <= max {
            return true;
        }
        self.hellos_refused.fetch_add(1, Relaxed);
        warn!(
            bytes = payload.len(),
            max, "HELLO refused unread: too large"
        );
        false
    }

    /// The node that introduced itself on the ROUTER connection `identity`, if any.
    pub(in crate::node) fn introduced_as(&self, identity: &Bytes) -> Option<Id> {
        self.router_ids.lock().get(identity).map(|(id, _)| *id)
    }

    /// Watches our ROUTER's connections until the node stops, forgetting who introduced
    /// itself on each as it ends. `events` must be subscribed before the first HELLO can
    /// be handled.
    pub(in crate::node) fn watch_router(
        self: &Arc<Self>,
        router: &Arc<Router>,
        mut events: broadcast::Receiver<SocketEvent>,
    ) {
        let (me, router) = (Arc::downgrade(self), Arc::downgrade(router));
        let cancel = self.given.life.cancel.clone();
        self.given.life.tasks.spawn(async move {
            loop {
                let e = tokio::select! {
                    _ = cancel.cancelled() => return,
                    e = events.recv() => e,
                };
                let Some(m) = me.upgrade() else { return };
                match e {
                    Ok(SocketEvent::Disconnected { addr, identity, .. }) => {
                        let mut ids = m.router_ids.lock();
                        // The same identity may already belong to a newer connection.
                        if ids.get(&identity).is_some_and(|(_, a)| *a == addr) {
                            ids.remove(&identity);
                        }
                        drop(ids);
                        m.rates.lock().per_connection.remove(&identity);
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Some ends were missed: keep only the live connections' entries.
                        let Some(r) = router.upgrade() else { return };
                        let live: HashSet<Bytes> =
                            r.peers().into_iter().map(|p| p.identity).collect();
                        m.router_ids.lock().retain(|id, _| live.contains(id));
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    /// A HELLO-ACK that arrived on our DEALER to `endpoint`.
    pub(in crate::node) fn on_hello_ack(
        self: &Arc<Self>,
        endpoint: &Endpoint,
        header: &Header,
        payload: &[u8],
    ) -> Result<(), CodecError> {
        if !self.hello_size_ok(payload) {
            return Ok(());
        }
        let hello: Hello = codec::decode_payload(payload)?;
        // The key this DEALER's connection proved (not what the book says now). A secured
        // node believes nothing of an ACK, not even that it is itself or of another
        // cluster, unless its id is that key's.
        let dealer = self
            .state
            .lock()
            .table
            .link(endpoint)
            .map(|l| l.dealer.clone());
        let key = dealer.as_ref().and_then(|d| d.peer_key());
        if !claims_its_own_id(self.is_secured(), hello.node_id, key) {
            self.hellos_refused.fetch_add(1, Relaxed);
            warn!(%endpoint, id = %hello.node_id, "HELLO-ACK refused: its node id is not the one its connection's key proves");
            return Ok(());
        }
        // If this acknowledges our leaving, that peer knows (see `leave`).
        self.leave_acknowledged(endpoint, header.correlation_id);
        if hello.node_id == self.given.local.id {
            // Gossip led us to ourselves: never dial this endpoint again.
            self.state.lock().self_endpoints.insert(endpoint.clone());
            self.forget_later(endpoint.clone(), "is this node");
        } else if hello.cluster != self.given.local.cluster {
            // Gossip led us to another cluster's node: stop dialling it (a static peer
            // stays, the operator named it).
            self.other_cluster.fetch_add(1, Relaxed);
            if !self.given.static_endpoints.contains(endpoint) {
                self.forget_later(endpoint.clone(), "another cluster");
            }
        } else {
            // Where our connection actually went (a host name resolved), for a peer that
            // listens on an unspecified address.
            let ip = dealer
                .as_ref()
                .and_then(|d| d.peer_addr())
                .filter(|a| !is_ipc_peer(a))
                .map(|a| a.ip())
                .or_else(|| endpoint.ip());
            self.learn(hello, ip, key);
        }
        // Whoever it is, the endpoint answered on this link (see `PeerTable::settled`).
        // Only now that what it said is recorded: a client waiting for the table to
        // settle must find the peer in it (and the endpoints its gossip named dialled).
        if let Some(l) = self.state.lock().table.link(endpoint) {
            l.acked.store(true, Relaxed);
        }
        self.note_change();
        Ok(())
    }
}

/// Whether a catalog is within the limits; the reason if not. What a peer announces is
/// kept (and copied into every `PeerInfo`) for as long as it is known, so its size is
/// bounded before anything is kept.
pub(super) fn catalog_within_bounds(
    c: &codec::Catalog,
    l: &MembershipLimits,
) -> Result<(), &'static str> {
    if c.methods.len() + c.gathers.len() > l.max_catalog_entries {
        return Err("its catalog has too many entries");
    }
    let bytes: usize = c
        .methods
        .keys()
        .chain(c.gathers.keys())
        .map(String::len)
        .sum();
    if bytes > l.max_catalog_bytes {
        return Err("its catalog's names are too long in total");
    }
    Ok(())
}

/// Sends a HELLO-ACK without waiting. When the ROUTER's queues together are full (callers
/// not reading their replies), the one holding the most is dropped and the ACK takes the
/// room: a peer's introduction is not lost to others' backlog.
pub(super) fn send_ack(router: &Router, identity: &Bytes, ack: Message) {
    if let Err(crate::transport::SendError::BudgetSpent { .. }) =
        router.try_send(identity, ack.clone())
    {
        if router.drop_slowest() {
            let _ = router.try_send(identity, ack);
        }
    }
}

impl Membership {
    /// Connects to the peers a HELLO names. Bounded: a HELLO cannot make us open more
    /// than MAX_GOSSIP connections, nor grow the table past `max_peers`.
    pub(super) fn follow_gossip(self: &Arc<Self>, gossip: Vec<String>) {
        let own = Endpoint::from_addr((self.given.local.host, self.given.local.router_port).into());
        for entry in gossip.into_iter().take(MAX_GOSSIP) {
            // `tcp://host:port`, with `#KEY` from a secured node.
            let (ep, key) = match entry.split_once('#') {
                Some((ep, key)) => (ep, Some(key)),
                None => (entry.as_str(), None),
            };
            // TCP only: a peer must never make us connect to a local socket it names.
            let Some(ep) = Endpoint::parse(ep).ok().filter(|e| e.ipc_path().is_none()) else {
                debug!(endpoint = %entry.escape_debug(), "not following gossip: not a TCP endpoint");
                continue;
            };
            // A key named by a peer (a member that proved its own) is taken for an
            // endpoint we know no key of; it never replaces one we know. A wrong one
            // costs a handshake that fails.
            let mut named_key = false;
            if let (Some(book), Some(key)) = (&self.given.keys, key) {
                match crate::transport::curve::decode_key(key) {
                    Ok(k) => named_key = book.learn_if_unknown(ep.clone(), k),
                    Err(_) => {
                        debug!(endpoint = %entry.escape_debug(), "not following gossip: a bad key");
                        continue;
                    }
                }
            }
            {
                let st = self.state.lock();
                if st.table.link_count() >= self.given.limits.max_peers {
                    debug!(node = %self.given.local.name, "peer limit reached; gossip not followed");
                    break;
                }
                if ep == own || st.table.link(&ep).is_some() {
                    continue;
                }
            }
            if let Err(e) = self.ensure_link(&ep, NamedBy::Hearsay) {
                debug!(endpoint = %ep, error = %e, "not following gossip");
                if let (Some(book), true) = (&self.given.keys, named_key) {
                    book.forget_hearsay(&ep);
                }
            }
        }
    }
}
