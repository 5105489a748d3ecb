//! Presence: what the node tells its user about peers (the peer info it shows, and the
//! joined / updated / left events). Types only; the membership produces them.

use std::collections::{BTreeMap, VecDeque};

use tokio::sync::broadcast;

use crate::codec::{Id, Version};
use crate::transport::Endpoint;

/// What the node knows of one peer, as shown by [`Node::peers`](crate::node::Node::peers).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The peer's node id.
    pub id: Id,
    /// Its name.
    pub name: String,
    /// Its ROUTER endpoint (requests go there).
    pub router_endpoint: Endpoint,
    /// Its PUB endpoint (its events come from there).
    pub pub_endpoint: Endpoint,
    /// The methods it serves, with versions.
    pub methods: BTreeMap<String, Version>,
    /// The gather topics it answers, with versions.
    pub gathers: BTreeMap<String, Version>,
    /// Whether our connection to its ROUTER is up.
    pub connected: bool,
    /// Where our connection to it is dialled: its ROUTER endpoint, or, when it is on this
    /// host, its `ipc://` socket first (then its ROUTER endpoint if the socket cannot be
    /// reached; see [`NodeBuilder::ipc`](crate::node::NodeBuilder::ipc)).
    pub dialled: Endpoint,
    /// It said it is stopping (it drains what it has, then closes): calls go to it only
    /// when no other instance serves them.
    pub leaving: bool,
}

/// A change in the peer table, as streamed by [`Node::presence`](crate::node::Node::presence).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// [`Node::peers`](crate::node::Node::peers) has the current table.
    Lagged(u64),
}

/// A stream of [`PresenceEvent`]s: first a `Joined` for every peer reachable when it was
/// created, then every change. Bounded: a reader that falls behind gets `Lagged`.
pub struct Presence {
    snapshot: VecDeque<PeerInfo>,
    rx: broadcast::Receiver<PresenceEvent>,
}

impl Presence {
    pub(super) fn new(snapshot: Vec<PeerInfo>, rx: broadcast::Receiver<PresenceEvent>) -> Self {
        Presence {
            snapshot: snapshot.into(),
            rx,
        }
    }

    /// The next event; `None` once the node has stopped.
    pub async fn next(&mut self) -> Option<PresenceEvent> {
        if let Some(p) = self.snapshot.pop_front() {
            return Some(PresenceEvent::Joined(p));
        }
        match self.rx.recv().await {
            Ok(e) => Some(e),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(PresenceEvent::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}
