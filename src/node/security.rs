//! A secured node: its CURVE key pair (its id is derived from the public key), which
//! client keys it lets in, and the book of which public key is expected at which peer
//! endpoint (a DEALER or the SUB can only dial an endpoint whose key it knows).
//!
//! This module owns the key book and the checks that tie a HELLO's node id to the key
//! its connection proved; the transport does the handshakes (`transport::curve`) and the
//! membership asks here before it believes a HELLO or dials an endpoint. It never sends
//! anything.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::codec::Id;
use crate::transport::curve::{Curve, CurveKeys};
use crate::transport::{Endpoint, SocketOptions};

/// Most endpoint keys kept: two per peer (ROUTER and PUB) up to well past the peer
/// limit's default.
const MAX_KEYS: usize = 4096;
/// Most of them named by others (gossip, mDNS) and not proven yet: what others name can
/// never crowd out what handshakes proved or the operator gave.
const MAX_HEARSAY: usize = 1024;

/// How the key of an endpoint became known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Given by the operator (a static peer): never replaced or forgotten.
    Given,
    /// Proven by the node there, in a handshake, for the endpoints it named as its own.
    Proven,
    /// Named by another node's gossip or an mDNS announcement.
    Hearsay,
}

/// Client keys a node lets in (see [`NodeBuilder::allow`](super::NodeBuilder::allow)).
pub(super) type Allowed = Arc<HashSet<[u8; 32]>>;

/// How a secured node authenticates (see [`NodeBuilder::secure`](super::NodeBuilder::secure)).
#[derive(Clone)]
pub(super) struct Security {
    pub(super) keys: CurveKeys,
    /// Client keys let in, and the only servers dialled; `None`: any key.
    pub(super) allowed: Option<Allowed>,
    /// The key pair derived from a cluster secret, which every member's accepting
    /// sockets prove: membership is knowing it (see `Curve::cluster`).
    pub(super) cluster: Option<CurveKeys>,
}

/// Which public key each peer endpoint (ROUTER or PUB) is expected to prove.
#[derive(Default)]
pub(super) struct KeyBook {
    book: RwLock<HashMap<Endpoint, ([u8; 32], Origin)>>,
    /// A member of a cluster with a secret can dial any endpoint: the handshake needs
    /// only the cluster's key, and proves the key of whoever answers.
    any_member: bool,
}

impl KeyBook {
    /// A book for a node of a cluster with a secret (any endpoint may be dialled).
    pub(super) fn for_cluster() -> Self {
        KeyBook {
            any_member: true,
            ..KeyBook::default()
        }
    }

    /// Whether a handshake with `endpoint` can be tried: its key is known, or the
    /// cluster's key is all it needs.
    pub(super) fn may_dial(&self, endpoint: &Endpoint) -> bool {
        self.any_member || self.key_of(endpoint).is_some()
    }

    /// A static peer's key, as the operator gave it.
    pub(super) fn given(&self, endpoint: Endpoint, key: [u8; 32]) {
        self.book.write().insert(endpoint, (key, Origin::Given));
    }

    /// Records that `endpoint` is served by the holder of `key`, as that node proved (a
    /// node restarted there with another key replaces the old one; what the operator
    /// gave is kept). When the book is full, a key named by others makes room.
    pub(super) fn learn(&self, endpoint: Endpoint, key: [u8; 32]) {
        let mut book = self.book.write();
        match book.get(&endpoint) {
            Some((_, Origin::Given)) => return,
            Some(_) => {}
            None if book.len() >= MAX_KEYS => {
                let hearsay = book
                    .iter()
                    .find(|(_, (_, o))| *o == Origin::Hearsay)
                    .map(|(e, _)| e.clone());
                match hearsay {
                    Some(e) => {
                        book.remove(&e);
                    }
                    None => {
                        tracing::warn!(%endpoint, "key book full: this endpoint's key is not recorded");
                        return;
                    }
                }
            }
            None => {}
        }
        book.insert(endpoint, (key, Origin::Proven));
    }

    /// Records `key` for `endpoint` as others named it, unless a key is known there:
    /// what others name never replaces what was proven or given, and is bounded. Returns
    /// whether it was recorded (its caller forgets it again if it does not dial).
    pub(super) fn learn_if_unknown(&self, endpoint: Endpoint, key: [u8; 32]) -> bool {
        let mut book = self.book.write();
        if book.contains_key(&endpoint) || book.len() >= MAX_KEYS {
            return false;
        }
        if book.values().filter(|(_, o)| *o == Origin::Hearsay).count() >= MAX_HEARSAY {
            return false;
        }
        book.insert(endpoint, (key, Origin::Hearsay));
        true
    }

    /// Forgets a key others named for `endpoint`, if that is all that is known of it (an
    /// endpoint named but not dialled: its key must not hold a place in the book).
    pub(super) fn forget_hearsay(&self, endpoint: &Endpoint) {
        let mut book = self.book.write();
        if book
            .get(endpoint)
            .is_some_and(|(_, o)| *o == Origin::Hearsay)
        {
            book.remove(endpoint);
        }
    }

    /// Forgets the key of an endpoint no longer dialled (unless the operator gave it).
    pub(super) fn forget(&self, endpoint: &Endpoint) {
        let mut book = self.book.write();
        if book.get(endpoint).is_some_and(|(_, o)| *o != Origin::Given) {
            book.remove(endpoint);
        }
    }

    /// The key expected at `endpoint` if the operator gave it or a handshake proved it.
    pub(super) fn pinned_key_of(&self, endpoint: &Endpoint) -> Option<[u8; 32]> {
        match self.book.read().get(endpoint) {
            Some((k, Origin::Given | Origin::Proven)) => Some(*k),
            _ => None,
        }
    }

    /// The key expected at `endpoint`.
    pub(super) fn key_of(&self, endpoint: &Endpoint) -> Option<[u8; 32]> {
        self.book.read().get(endpoint).map(|(k, _)| *k)
    }
}

impl std::fmt::Debug for Security {
    // The cluster's public key is a secret too: never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("keys", &self.keys)
            .field("allowed", &self.allowed.as_ref().map(|a| a.len()))
            .field("cluster", &self.cluster.is_some())
            .finish()
    }
}

impl Security {
    /// This node's id: derived from its public key.
    pub(super) fn id(&self) -> Id {
        Id::of_key(&self.keys.public())
    }

    /// Options for the sockets that accept connections (ROUTER, PUB).
    pub(super) fn server(&self, opts: SocketOptions) -> SocketOptions {
        opts.with_curve(Some(self.curve()))
    }

    /// Our keys, the cluster's if any, and the allow list as the judge of peer keys.
    fn curve(&self) -> Curve {
        let mut curve = Curve::new(self.keys.clone());
        if let Some(cluster) = &self.cluster {
            curve = curve.cluster(cluster.clone());
        }
        if let Some(allowed) = &self.allowed {
            let allowed = allowed.clone();
            curve = curve.authorize(Arc::new(move |k| allowed.contains(k)));
        }
        curve
    }

    /// Options for the sockets that dial (DEALERs, SUB): each endpoint's key from `book`.
    pub(super) fn client(&self, opts: SocketOptions, book: &Arc<KeyBook>) -> SocketOptions {
        if self.cluster.is_some() {
            // Every member serves with the cluster's key and proves its own in READY,
            // where the allow list judges it as it judges clients, and where a key the
            // operator gave or a handshake proved is expected (what others named is not:
            // a member needs no key to dial).
            let book = book.clone();
            let curve = self
                .curve()
                .server_key_of(Arc::new(move |e| book.pinned_key_of(e)));
            return opts.with_curve(Some(curve));
        }
        // With an allow list, only the keys it lists: nobody outside it can make us dial
        // it and hear our HELLO (our catalog, our peers).
        let (book, allowed) = (book.clone(), self.allowed.clone());
        let curve = Curve::new(self.keys.clone()).server_key_of(Arc::new(move |e| {
            book.key_of(e)
                .filter(|k| allowed.as_ref().is_none_or(|a| a.contains(k)))
        }));
        opts.with_curve(Some(curve))
    }
}

/// Whether a HELLO naming `node_id` may be believed from a connection that proved `key`.
/// A secured node believes nothing from a connection whose key it cannot tell (one gone
/// since, say); an unsecured one has nothing to check.
pub(super) fn claims_its_own_id(secured: bool, node_id: Id, key: Option<[u8; 32]>) -> bool {
    match key {
        Some(k) => Id::of_key(&k) == node_id,
        None => !secured,
    }
}
