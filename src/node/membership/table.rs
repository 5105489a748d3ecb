//! The peer table: who is out there, how to reach them, what they serve.
//!
//! Owned by the membership, under its lock. Pure bookkeeping: it never sends, never
//! spawns, and never emits presence events (it returns what changed and the membership
//! says so).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use smallvec::SmallVec;

use super::presence::PeerInfo;
use std::sync::atomic::Ordering::Relaxed;

use super::Instance;
use crate::codec::{Catalog, Id, Version};
use crate::node::balance::{Balance, Candidate};
use crate::node::calls::ConnId;
use crate::transport::{Dealer, Endpoint};

/// Why no instance was picked for a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::node) enum NotPicked {
    /// No connected peer serves the target.
    NoneServing,
    /// Peers serve it, none at a compatible version (one that is offered).
    Incompatible(Version),
    /// The connected instances that serve it all have their breaker open.
    BreakersOpen,
}

/// Our DEALER to one remote ROUTER endpoint, whether or not its HELLO came back yet.
#[derive(Clone)]
pub(super) struct Link {
    pub(super) dealer: Arc<Dealer>,
    /// Where the DEALER connects: the peer's ROUTER endpoint, or its ipc socket.
    pub(super) dialled: Endpoint,
    pub(super) conn: ConnId,
    /// Stops the endpoint's `dealer_loop` (cancelled when the endpoint is forgotten).
    pub(super) stop: CancellationToken,
    /// Why the last connection attempt failed, if one did (set by `dealer_loop`): the
    /// endpoint has been tried, and a client can say why it is unreachable.
    pub(super) last_error: Arc<parking_lot::Mutex<Option<String>>>,
    /// A HELLO-ACK came back on the current connection (cleared when it drops).
    pub(super) acked: Arc<std::sync::atomic::AtomicBool>,
    /// Requests sent on it and not yet answered (for least-outstanding balancing).
    pub(super) outstanding: Arc<std::sync::atomic::AtomicUsize>,
}

struct Peer {
    info: PeerInfo,
    link: Link,
    /// Revision of the catalog in `info` (see [`Catalog::revision`]).
    catalog_revision: u64,
    /// It was reachable once and its connection has since dropped (as opposed to a peer
    /// whose HELLO came in before our own connection to it is up).
    went_down: bool,
    /// Since it went down, its host refused a connection to its endpoint: the host is
    /// up and nothing listens there any more (the process ended). Only such a peer can
    /// be taken for the previous life of a node restarted elsewhere on that host.
    refused: bool,
}

/// What a peer's HELLO told us, as [`PeerTable::upsert`] records it.
pub(super) struct Heard {
    pub(super) id: Id,
    pub(super) name: String,
    pub(super) router_endpoint: Endpoint,
    pub(super) pub_endpoint: Endpoint,
    pub(super) catalog: Catalog,
    /// It said it is stopping.
    pub(super) leaving: bool,
}

/// What [`PeerTable::upsert`] changed.
pub(super) struct Upserted {
    /// The peer was not known before.
    pub(super) new: bool,
    /// PUB endpoints no peer uses any more (to disconnect from).
    pub(super) stale_pubs: Vec<Endpoint>,
    /// Reachable peers it replaced (another node id at the same endpoint).
    pub(super) replaced: Vec<PeerInfo>,
}

#[derive(Default)]
pub(super) struct PeerTable {
    by_id: HashMap<Id, Peer>,
    links: HashMap<Endpoint, Link>,
}

impl PeerTable {
    /// The link to `endpoint`, if we dial it.
    pub(super) fn link(&self, endpoint: &Endpoint) -> Option<&Link> {
        self.links.get(endpoint)
    }

    /// Starts dialling `endpoint` through `link`.
    pub(super) fn add_link(&mut self, endpoint: Endpoint, link: Link) {
        self.links.insert(endpoint, link);
    }

    /// Stops dialling `endpoint`; returns its link.
    pub(super) fn remove_link(&mut self, endpoint: &Endpoint) -> Option<Link> {
        self.links.remove(endpoint)
    }

    /// Endpoints dialled.
    pub(super) fn link_count(&self) -> usize {
        self.links.len()
    }

    /// Whether every endpoint dialled has been tried: its peer answered our HELLO, or a
    /// connection attempt failed. Until then, what the table says may still grow (each
    /// HELLO-ACK names more peers).
    pub(super) fn settled(&self) -> bool {
        self.links
            .values()
            .all(|l| l.acked.load(Relaxed) || l.last_error.lock().is_some())
    }

    /// Endpoints dialled that no node has answered on, with why the last attempt failed.
    pub(super) fn unreachable(&self) -> Vec<(Endpoint, String)> {
        let mut out: Vec<_> = self
            .links
            .iter()
            .filter(|(_, l)| !l.acked.load(Relaxed))
            .filter_map(|(ep, l)| l.last_error.lock().clone().map(|e| (ep.clone(), e)))
            .collect();
        out.sort_by_key(|(ep, _)| ep.to_string());
        out
    }

    /// Endpoints dialled whose connection is not up.
    pub(super) fn dialling(&self) -> usize {
        self.links
            .values()
            .filter(|l| !l.dealer.is_connected())
            .count()
    }

    /// Every DEALER.
    pub(super) fn dealers(&self) -> impl Iterator<Item = &Arc<Dealer>> {
        self.links.values().map(|l| &l.dealer)
    }

    /// The DEALERs connected now, with their endpoints.
    pub(super) fn connected_dealers(&self) -> impl Iterator<Item = (&Endpoint, &Arc<Dealer>)> {
        self.links
            .iter()
            .filter(|(_, l)| l.dealer.is_connected())
            .map(|(e, l)| (e, &l.dealer))
    }

    /// Peers known (connected or not).
    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// What we know of `id`.
    pub(super) fn info(&self, id: &Id) -> Option<&PeerInfo> {
        self.by_id.get(id).map(|p| &p.info)
    }

    /// Every peer, sorted by name then id; only the connected ones if `connected_only`.
    pub(super) fn infos(&self, connected_only: bool) -> Vec<PeerInfo> {
        let mut v: Vec<PeerInfo> = self
            .by_id
            .values()
            .filter(|p| !connected_only || p.info.connected)
            .map(|p| p.info.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        v
    }

    /// ROUTER endpoints of the connected peers (the gossip in our HELLO).
    pub(super) fn connected_endpoints(&self) -> Vec<Endpoint> {
        self.by_id
            .values()
            .filter(|p| p.info.connected)
            .map(|p| p.info.router_endpoint.clone())
            .collect()
    }

    /// The DEALER to peer `id`.
    pub(super) fn dealer_of(&self, id: &Id) -> Option<Arc<Dealer>> {
        self.by_id.get(id).map(|p| p.link.dealer.clone())
    }

    /// The node id at a ROUTER endpoint, and whether it is connected.
    pub(super) fn peer_at(&self, endpoint: &Endpoint) -> Option<(Id, bool)> {
        self.by_id
            .values()
            .find(|p| p.info.router_endpoint == *endpoint)
            .map(|p| (p.info.id, p.info.connected))
    }

    /// Whether a peer at `endpoint` is known and down.
    pub(super) fn down_at(&self, endpoint: &Endpoint) -> bool {
        self.by_id
            .values()
            .any(|p| p.info.router_endpoint == *endpoint && !p.info.connected)
    }

    /// Records (or refreshes) a peer from its HELLO. A different node id on an endpoint
    /// we knew (the peer restarted) replaces the old entry, so calls never go to a node
    /// that no longer exists.
    pub(super) fn upsert(&mut self, heard: Heard, link: Link) -> Upserted {
        let Heard {
            id,
            name,
            router_endpoint,
            pub_endpoint,
            catalog,
            leaving,
        } = heard;
        let (mut stale_pubs, replaced) = self.remove_at(&router_endpoint, Some(id));
        let known = self.by_id.get(&id);
        if let Some(p) = known {
            if p.info.pub_endpoint != pub_endpoint {
                stale_pubs.push(p.info.pub_endpoint.clone());
            }
        }
        let connected = link.dealer.is_connected();
        let went_down = !connected && known.is_some_and(|p| p.went_down);
        let refused = went_down && known.is_some_and(|p| p.refused);
        // A catalog older than the one we have arrived late by the other connection.
        let (methods, gathers, catalog_revision) = match known {
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
            dialled: link.dialled.clone(),
            // Once it said so, it stays so: a late HELLO from before cannot undo it.
            leaving: leaving || known.is_some_and(|p| p.info.leaving),
        };
        let new = self
            .by_id
            .insert(
                id,
                Peer {
                    info,
                    link,
                    catalog_revision,
                    went_down,
                    refused,
                },
            )
            .is_none();
        stale_pubs.retain(|p| !self.by_id.values().any(|x| &x.info.pub_endpoint == p));
        Upserted {
            new,
            stale_pubs,
            replaced,
        }
    }

    /// Whether `id` is known at an endpoint other than `router_endpoint` and connected
    /// there: a HELLO claiming it from elsewhere is not believed.
    pub(super) fn claimed_elsewhere(&self, id: &Id, router_endpoint: &Endpoint) -> bool {
        self.by_id
            .get(id)
            .is_some_and(|p| p.info.connected && p.info.router_endpoint != *router_endpoint)
    }

    /// Marks every peer reached through `endpoint` down; returns those that were up.
    pub(super) fn set_down(&mut self, endpoint: &Endpoint) -> Vec<PeerInfo> {
        let mut went_down = Vec::new();
        for p in self.by_id.values_mut() {
            if p.info.router_endpoint == *endpoint && p.info.connected {
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
    pub(super) fn remove_at(
        &mut self,
        endpoint: &Endpoint,
        keep: Option<Id>,
    ) -> (Vec<Endpoint>, Vec<PeerInfo>) {
        let mut pubs = Vec::new();
        let mut left = Vec::new();
        self.by_id.retain(|id, p| {
            if Some(*id) == keep || p.info.router_endpoint != *endpoint {
                return true;
            }
            pubs.push(p.info.pub_endpoint.clone());
            if p.info.connected {
                left.push(p.info.clone());
            }
            false
        });
        // A PUB endpoint another peer still names stays subscribed (a peer that named
        // someone else's must not take that one's events away when it goes).
        pubs.retain(|p| !self.by_id.values().any(|x| &x.info.pub_endpoint == p));
        (pubs, left)
    }

    /// Whether a connected peer other than `id` publishes at `pub_endpoint`.
    pub(super) fn pub_of_another(&self, pub_endpoint: &Endpoint, id: &Id) -> bool {
        self.by_id
            .values()
            .any(|p| p.info.id != *id && p.info.connected && p.info.pub_endpoint == *pub_endpoint)
    }

    /// Records that `endpoint` refused a connection: the peers there that went down have
    /// ended (their host is up, their process is not).
    pub(super) fn set_refused(&mut self, endpoint: &Endpoint) {
        for p in self.by_id.values_mut() {
            if p.info.router_endpoint == *endpoint && p.went_down && !p.info.connected {
                p.refused = true;
            }
        }
    }

    /// Earlier lives of restarted nodes: peers that ended (down, then refused) while a
    /// node of the same name on the same host is connected under another id. Returns
    /// their endpoints and ids.
    pub(super) fn restarts(&self) -> Vec<(Endpoint, Id)> {
        let host = |p: &Peer| p.info.router_endpoint.ip();
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

    /// How many connected peers serve `target` at a version compatible with `wanted`.
    pub(super) fn serving(&self, target: &str, wanted: Option<Version>) -> usize {
        self.by_id
            .values()
            .filter(|p| {
                // A leaving node is not counted on to answer.
                !p.info.leaving
                    && p.info.connected
                    && p.info
                        .methods
                        .get(target)
                        .is_some_and(|v| wanted.is_none_or(|w| v.serves(w)))
            })
            .count()
    }

    /// Chooses an instance of `target`: `balance` picks among the connected peers
    /// serving it at a version compatible with `wanted`, given in node id order (stable,
    /// so a round robin really goes round). `Err` carries a version some peer (connected
    /// or not) serves `target` at that cannot serve `wanted`, if any. No allocation up to
    /// eight candidates and no second lookup: this is on every call's path.
    pub(super) fn pick(
        &self,
        target: &str,
        wanted: Option<Version>,
        balance: &dyn Balance,
        refusing: &[Id],
        leaving_too: bool,
    ) -> Result<Instance, NotPicked> {
        let mut found: SmallVec<[(Candidate, &Link, bool); 8]> = SmallVec::new();
        let mut incompatible = None;
        let mut refused = false;
        for p in self.by_id.values() {
            if let Some(v) = p.info.methods.get(target) {
                if wanted.is_some_and(|w| !v.serves(w)) {
                    incompatible = Some(*v);
                } else if p.info.connected && refusing.contains(&p.info.id) {
                    refused = true;
                } else if p.info.connected {
                    let c = Candidate {
                        id: p.info.id,
                        conn: p.link.conn,
                        outstanding: p.link.outstanding.load(Relaxed),
                    };
                    found.push((c, &p.link, p.info.leaving));
                }
            }
        }
        // A leaving instance still serves what reaches it, but gets new calls only when
        // no other can take them (unless asked: a key's hand-over goes to it).
        if !leaving_too && found.iter().any(|(_, _, leaving)| !leaving) {
            found.retain(|(_, _, leaving)| !*leaving);
        }
        if found.is_empty() {
            return Err(match (refused, incompatible) {
                (true, _) => NotPicked::BreakersOpen,
                (false, Some(v)) => NotPicked::Incompatible(v),
                (false, None) => NotPicked::NoneServing,
            });
        }
        found.sort_unstable_by_key(|(c, _, _)| c.id);
        let candidates: SmallVec<[Candidate; 8]> = found.iter().map(|(c, _, _)| *c).collect();
        let (chosen, link, _) = found[balance.choose(target, &candidates).min(found.len() - 1)];
        Ok(Instance {
            id: chosen.id,
            dealer: link.dealer.clone(),
            outstanding: link.outstanding.clone(),
            conn: chosen.conn,
        })
    }

    /// Peers answering gathers on `topic` at a version compatible with `wanted` and
    /// `listening` (subscribed to us), as (id, name), sorted.
    pub(super) fn gather_responders(
        &self,
        topic: &str,
        wanted: Option<Version>,
        listening: &HashSet<Id>,
    ) -> Vec<(Id, String)> {
        let mut v: Vec<(Id, String)> = self
            .by_id
            .values()
            .filter(|p| {
                // A leaving node is not counted on to answer.
                !p.info.leaving
                    && p.info
                        .gathers
                        .get(topic)
                        .is_some_and(|v| wanted.is_none_or(|w| v.serves(w)))
                    && listening.contains(&p.info.id)
            })
            .map(|p| (p.info.id, p.info.name.clone()))
            .collect();
        v.sort();
        v
    }
}
