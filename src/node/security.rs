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
/// limit's default; past it, keys of new endpoints are not learned (their dials fail).
const MAX_KEYS: usize = 4096;

/// How a secured node authenticates (see [`NodeBuilder::secure`](super::NodeBuilder::secure)).
#[derive(Debug, Clone)]
pub(super) struct Security {
    pub(super) keys: CurveKeys,
    /// Client keys let in; `None`: any key that completes the handshake.
    pub(super) allowed: Option<Arc<HashSet<[u8; 32]>>>,
}

/// Which public key each peer endpoint (ROUTER or PUB) is expected to prove.
#[derive(Default)]
pub(super) struct KeyBook(RwLock<HashMap<Endpoint, [u8; 32]>>);

impl KeyBook {
    /// Records that `endpoint` is served by the holder of `key` (a later record for the
    /// same endpoint replaces it: a node restarted there with another key).
    pub(super) fn learn(&self, endpoint: Endpoint, key: [u8; 32]) {
        let mut book = self.0.write();
        if book.len() < MAX_KEYS || book.contains_key(&endpoint) {
            book.insert(endpoint, key);
        } else {
            tracing::warn!(%endpoint, "key book full: this endpoint's key is not recorded");
        }
    }

    /// Records `key` for `endpoint` unless one is known (what others name, as gossip or
    /// mDNS, never replaces what a handshake proved or the operator gave).
    pub(super) fn learn_if_unknown(&self, endpoint: Endpoint, key: [u8; 32]) {
        if self.key_of(&endpoint).is_none() {
            self.learn(endpoint, key);
        }
    }

    /// Forgets the key of an endpoint no longer dialled.
    pub(super) fn forget(&self, endpoint: &Endpoint) {
        self.0.write().remove(endpoint);
    }

    /// The key expected at `endpoint`.
    pub(super) fn key_of(&self, endpoint: &Endpoint) -> Option<[u8; 32]> {
        self.0.read().get(endpoint).copied()
    }
}

impl Security {
    /// This node's id: derived from its public key.
    pub(super) fn id(&self) -> Id {
        Id::of_key(&self.keys.public())
    }

    /// Options for the sockets that accept connections (ROUTER, PUB).
    pub(super) fn server(&self, opts: SocketOptions) -> SocketOptions {
        let mut curve = Curve::new(self.keys.clone());
        if let Some(allowed) = &self.allowed {
            let allowed = allowed.clone();
            curve = curve.authorize(Arc::new(move |k| allowed.contains(k)));
        }
        opts.with_curve(Some(curve))
    }

    /// Options for the sockets that dial (DEALERs, SUB): each endpoint's key from `book`.
    pub(super) fn client(&self, opts: SocketOptions, book: &Arc<KeyBook>) -> SocketOptions {
        let book = book.clone();
        let curve = Curve::new(self.keys.clone()).server_key_of(Arc::new(move |e| book.key_of(e)));
        opts.with_curve(Some(curve))
    }
}

/// Whether a HELLO naming `node_id` may be believed from a connection that proved `key`
/// (`None`: the node is not secured, nothing to check).
pub(super) fn claims_its_own_id(node_id: Id, key: Option<[u8; 32]>) -> bool {
    key.is_none_or(|k| Id::of_key(&k) == node_id)
}
