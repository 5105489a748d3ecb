//! The peer table: who is out there, how to reach them, what they serve.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::codec::{Catalog, Id, Version};
use crate::transport::Dealer;

/// What the node knows of one peer, as shown by [`Node::peers`](super::Node::peers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's node id.
    pub id: Id,
    /// Its name.
    pub name: String,
    /// Its ROUTER endpoint (requests go there).
    pub router_endpoint: String,
    /// Its PUB endpoint (its events come from there).
    pub pub_endpoint: String,
    /// The methods it serves, with versions.
    pub methods: BTreeMap<String, Version>,
    /// The gather topics it answers, with versions.
    pub gathers: BTreeMap<String, Version>,
    /// Whether our connection to its ROUTER is up.
    pub connected: bool,
}

pub(crate) struct Peer {
    pub info: PeerInfo,
    pub dealer: Arc<Dealer>,
    /// Revision of the catalog in `info` (see [`Catalog::revision`]).
    pub catalog_revision: u64,
    /// It was reachable once and its connection has since dropped (as opposed to a peer
    /// whose HELLO came in before our own connection to it is up).
    pub went_down: bool,
    /// Since it went down, its host refused a connection to its endpoint: the host is
    /// up and nothing listens there any more (the process ended). Only such a peer can
    /// be taken for the previous life of a node restarted elsewhere on that host.
    pub refused: bool,
}

#[derive(Default)]
pub(crate) struct PeerTable {
    pub by_id: HashMap<Id, Peer>,
    /// One DEALER per remote ROUTER endpoint, whether or not its HELLO came back yet.
    pub dealers: HashMap<String, Arc<Dealer>>,
    /// Stops the `dealer_loop` of each endpoint in `dealers` (cancelled when forgotten).
    pub dealer_stops: HashMap<String, tokio_util::sync::CancellationToken>,
    /// Round-robin cursor for choosing among instances.
    pub cursor: usize,
}

impl PeerTable {
    /// Records (or refreshes) a peer from its HELLO. Returns whether it is new, the
    /// PUB endpoints no peer uses any more (to disconnect from), and the reachable peers
    /// it replaced (another node id on the same endpoint).
    /// A different node id on an endpoint we knew (the peer restarted) replaces the old
    /// entry, so calls never go to a node that no longer exists.
    pub fn upsert(
        &mut self,
        id: Id,
        name: String,
        router_endpoint: String,
        pub_endpoint: String,
        catalog: Catalog,
        dealer: Arc<Dealer>,
    ) -> (bool, Vec<String>, Vec<PeerInfo>) {
        let (mut replaced, gone) = self.remove_at(&router_endpoint, Some(id));
        if let Some(p) = self.by_id.get(&id) {
            if p.info.pub_endpoint != pub_endpoint {
                replaced.push(p.info.pub_endpoint.clone());
            }
        }
        let connected = dealer.is_connected();
        let went_down = !connected && self.by_id.get(&id).is_some_and(|p| p.went_down);
        let refused = went_down && self.by_id.get(&id).is_some_and(|p| p.refused);
        // A catalog older than the one we have arrived late by the other connection.
        let (methods, gathers, catalog_revision) = match self.by_id.get(&id) {
            Some(p) if p.catalog_revision > catalog.revision => (
                p.info.methods.clone(),
                p.info.gathers.clone(),
                p.catalog_revision,
            ),
            _ => (catalog.methods, catalog.gathers, catalog.revision),
        };
        let info = PeerInfo {
            id,
            name,
            router_endpoint,
            pub_endpoint,
            methods,
            gathers,
            connected,
        };
        let new = self
            .by_id
            .insert(
                id,
                Peer {
                    info,
                    dealer,
                    catalog_revision,
                    went_down,
                    refused,
                },
            )
            .is_none();
        replaced.retain(|p| !self.by_id.values().any(|x| &x.info.pub_endpoint == p));
        (new, replaced, gone)
    }

    /// Whether `id` is known at an endpoint other than `router_endpoint` and connected
    /// there: a HELLO claiming it from elsewhere is not believed.
    pub fn claimed_elsewhere(&self, id: &Id, router_endpoint: &str) -> bool {
        self.by_id
            .get(id)
            .is_some_and(|p| p.info.connected && p.info.router_endpoint != router_endpoint)
    }

    /// Marks every peer reached through `endpoint` down; returns those that were up.
    pub fn set_down(&mut self, endpoint: &str) -> Vec<PeerInfo> {
        let mut went_down = Vec::new();
        for p in self.by_id.values_mut() {
            if p.info.router_endpoint == endpoint && p.info.connected {
                p.info.connected = false;
                p.went_down = true;
                p.refused = false;
                went_down.push(p.info.clone());
            }
        }
        went_down
    }

    /// Removes the peers reached through `endpoint` (but `keep`). Returns their PUB
    /// endpoints, and those of them that were connected (they have left).
    pub fn remove_at(&mut self, endpoint: &str, keep: Option<Id>) -> (Vec<String>, Vec<PeerInfo>) {
        let mut pubs = Vec::new();
        let mut left = Vec::new();
        self.by_id.retain(|id, p| {
            if Some(*id) == keep || p.info.router_endpoint != endpoint {
                return true;
            }
            pubs.push(p.info.pub_endpoint.clone());
            if p.info.connected {
                left.push(p.info.clone());
            }
            false
        });
        (pubs, left)
    }

    /// Records that `endpoint` refused a connection: the peers there that went down have
    /// ended (their host is up, their process is not).
    pub fn set_refused(&mut self, endpoint: &str) {
        for p in self.by_id.values_mut() {
            if p.info.router_endpoint == endpoint && p.went_down && !p.info.connected {
                p.refused = true;
            }
        }
    }

    /// Earlier lives of restarted nodes: peers that ended (down, then refused) while a
    /// node of the same name on the same host is connected under another id. Returns
    /// their endpoints and ids.
    pub fn restarts(&self) -> Vec<(String, Id)> {
        let host = |p: &Peer| super::dispatch::endpoint_ip(&p.info.router_endpoint);
        self.by_id
            .values()
            .filter(|old| old.went_down && old.refused && !old.info.connected)
            .filter(|old| {
                self.by_id.values().any(|new| {
                    new.info.connected
                        && new.info.id != old.info.id
                        && new.info.name == old.info.name
                        && host(new).is_some()
                        && host(new) == host(old)
                })
            })
            .map(|p| (p.info.router_endpoint.clone(), p.info.id))
            .collect()
    }

    /// Connected peers serving `target`, and whether any peer (connected or not) serves
    /// it at a version that cannot serve `wanted`.
    pub fn candidates(
        &self,
        target: &str,
        wanted: Option<Version>,
    ) -> (Vec<&Peer>, Option<Version>) {
        let mut out = Vec::new();
        let mut incompatible = None;
        for p in self.by_id.values() {
            if let Some(v) = p.info.methods.get(target) {
                if wanted.is_some_and(|w| !v.serves(w)) {
                    incompatible = Some(*v);
                } else if p.info.connected {
                    out.push(p);
                }
            }
        }
        // Stable order, so round robin really goes round.
        out.sort_by_key(|p| p.info.id);
        (out, incompatible)
    }

    /// Chooses one of the candidates for `target`, round robin (in the table's iteration
    /// order, which is stable while the table does not change). No allocation: this is on
    /// every call's path.
    pub fn pick(
        &mut self,
        target: &str,
        wanted: Option<Version>,
    ) -> Result<(Id, Arc<Dealer>), Option<Version>> {
        let mut incompatible = None;
        let fits = |p: &Peer, incompatible: &mut Option<Version>| match p.info.methods.get(target) {
            Some(v) if wanted.is_some_and(|w| !v.serves(w)) => {
                *incompatible = Some(*v);
                false
            }
            Some(_) => p.info.connected,
            None => false,
        };
        let n = self
            .by_id
            .values()
            .filter(|p| fits(p, &mut incompatible))
            .count();
        if n == 0 {
            return Err(incompatible);
        }
        self.cursor = self.cursor.wrapping_add(1);
        let p = self
            .by_id
            .values()
            .filter(|p| fits(p, &mut incompatible))
            .nth(self.cursor % n)
            .expect("counted above");
        Ok((p.info.id, p.dealer.clone()))
    }
}

/// A change in the peer table, as streamed by [`Node::presence`](super::Node::presence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceEvent {
    /// A peer became reachable (new, or back after a disconnection).
    Joined(PeerInfo),
    /// A reachable peer sent a HELLO that changed what we know (its catalog, say).
    Updated(PeerInfo),
    /// A peer stopped being reachable: its connection dropped (a crash, a partition, a
    /// shutdown) or it was forgotten (it said goodbye, or stayed unreachable).
    Left {
        /// What we knew of it.
        peer: PeerInfo,
        /// Why, for people.
        reason: String,
    },
    /// This stream fell behind and missed this many events;
    /// [`Node::peers`](super::Node::peers) has the current table.
    Lagged(u64),
}

/// A stream of [`PresenceEvent`]s: first a `Joined` for every peer reachable when it was
/// created, then every change. Bounded: a reader that falls behind gets `Lagged`.
pub struct Presence {
    pub(crate) snapshot: std::collections::VecDeque<PeerInfo>,
    pub(crate) rx: tokio::sync::broadcast::Receiver<PresenceEvent>,
}

impl Presence {
    /// The next event; `None` once the node has stopped.
    pub async fn next(&mut self) -> Option<PresenceEvent> {
        if let Some(p) = self.snapshot.pop_front() {
            return Some(PresenceEvent::Joined(p));
        }
        match self.rx.recv().await {
            Ok(e) => Some(e),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                Some(PresenceEvent::Lagged(n))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    }
}
