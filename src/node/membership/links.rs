//! Links: our DEALER to each peer endpoint, the loop that watches its connection, and
//! forgetting an endpoint (unreachable too long, restarted elsewhere, gone from
//! discovery, leading back to ourselves or to another cluster).

use std::sync::{Arc, Weak};

use bytes::Bytes;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::table::Link;
use super::{Membership, PresenceEvent};
use crate::codec::{Id, Kind};
use crate::node::calls::far_instant_after;
use crate::node::CallError;
use crate::transport::{
    Dealer, Endpoint, FirstMessage, Message, MessageHandler, SocketEvent, TransportError,
};

/// Who named an endpoint to dial: what decides whether the dial rate applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::node) enum NamedBy {
    /// The user (static peers, `Node::add_peer`), or a peer's HELLO naming the address
    /// it reached us from (its HELLOs are rate-limited already): dialled at once.
    Direct,
    /// Gossip, discovery, or a HELLO naming another address: dialled within the dial
    /// rate and the dials in progress, and named again later (discovery re-dials every
    /// few seconds, a peer says HELLO again on every reconnection).
    Hearsay,
}

impl Membership {
    /// The link to a peer ROUTER endpoint, created (DEALER and loop) if new.
    pub(super) fn ensure_link(
        self: &Arc<Self>,
        endpoint: &Endpoint,
        named_by: NamedBy,
    ) -> Result<Link, TransportError> {
        self.ensure_link_via(endpoint, named_by, None)
    }

    /// [`ensure_link`](Self::ensure_link), the DEALER of a new link connecting to `via`
    /// (the peer's ipc socket on this host) rather than to `endpoint` itself.
    pub(super) fn ensure_link_via(
        self: &Arc<Self>,
        endpoint: &Endpoint,
        named_by: NamedBy,
        via: Option<&Endpoint>,
    ) -> Result<Link, TransportError> {
        let mut st = self.state.lock();
        if st.self_endpoints.contains(endpoint) {
            return Err(TransportError::InvalidEndpoint(format!(
                "{endpoint} is this node itself"
            )));
        }
        if let Some(l) = st.table.link(endpoint) {
            return Ok(l.clone());
        }
        // A secured node dials only endpoints whose key it knows (its handshake needs it),
        // or with a cluster secret, any (only a member can complete the handshake).
        if let Some(book) = &self.given.keys {
            if !book.may_dial(via.unwrap_or(endpoint)) {
                return Err(TransportError::InvalidEndpoint(format!(
                    "{endpoint}: no key known for it (a secured node dials only peers whose key it knows)"
                )));
            }
        }
        if st.table.link_count() >= self.given.limits.max_peers {
            return Err(TransportError::InvalidEndpoint(format!(
                "{endpoint}: the peer limit ({}) is reached",
                self.given.limits.max_peers
            )));
        }
        // Endpoints someone else named are dialled at a bounded rate and with a bounded
        // number still connecting: a flood of HELLOs, gossip or sightings naming
        // endpoints that do not answer must not turn into a flood of connection attempts.
        if named_by == NamedBy::Hearsay && !self.given.static_endpoints.contains(endpoint) {
            let dialling = st.table.dialling();
            let allowed = dialling < self.given.limits.max_dialling && self.rates.lock().new_dial();
            if !allowed {
                self.dials_deferred
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(TransportError::InvalidEndpoint(format!(
                    "{endpoint}: not dialled now ({dialling} dials in progress, or too many new ones this second)"
                )));
            }
        }
        let conn = self
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Replies are dispatched inline by the DEALER's connection task: a reply wakes its
        // caller directly, with no task in between.
        let sink = self.given.dealer_sink.clone();
        let ep = endpoint.clone();
        let on_message: MessageHandler = Arc::new(move |_: &Bytes, msg: Message| {
            sink(&ep, msg);
            Ok(())
        });
        let acked: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        // (Re)introduce ourselves first thing on every connection (PROTOCOL.md: the first
        // message on every DEALER connection), ahead of replies, requests or CANCELs
        // queued meanwhile: a gatherer ignores gather replies on a connection whose
        // sender has not said HELLO on it. Made as the connection comes up.
        let first: FirstMessage = {
            let (me, acked) = (Arc::downgrade(self), acked.clone());
            Arc::new(move || {
                // The HELLO-ACK that counts is the one answering this HELLO; it may come
                // back before `dealer_loop` hears of the connection, so this is where the
                // previous connection's is forgotten.
                acked.store(false, std::sync::atomic::Ordering::Relaxed);
                Some(me.upgrade()?.hello_message(Kind::Hello, Id::NIL))
            })
        };
        // A same-host peer: its ipc socket first, its TCP endpoint when that cannot be
        // reached (the socket is gone, or this host's view of the directory differs).
        let (dealer, events) = match via {
            Some(via) => Dealer::connect_preferring(
                via,
                endpoint,
                self.given.socket.clone(),
                on_message,
                first,
            )?,
            None => Dealer::connect_with_first_message(
                endpoint,
                self.given.socket.clone(),
                on_message,
                first,
            )?,
        };
        // Its loop ends with the node, or when this endpoint is forgotten: a loop that
        // outlived its dealer would act on whatever dealer the endpoint has later.
        let link = Link {
            dealer: Arc::new(dealer),
            dialled: via.unwrap_or(endpoint).clone(),
            conn,
            stop: self.given.life.cancel.child_token(),
            last_error: Arc::default(),
            acked,
            outstanding: Arc::default(),
        };
        st.table.add_link(endpoint.clone(), link.clone());
        drop(st);
        self.given.life.tasks.spawn(dealer_loop(
            Arc::downgrade(self),
            endpoint.clone(),
            link.clone(),
            events,
        ));
        Ok(link)
    }

    /// Dials `endpoint`, named by `named_by`.
    pub(in crate::node) fn dial(
        self: &Arc<Self>,
        endpoint: &Endpoint,
        named_by: NamedBy,
    ) -> Result<(), TransportError> {
        self.ensure_link(endpoint, named_by).map(|_| ())
    }

    /// Forgets `endpoint` in a task of its own (closing its DEALER waits).
    pub(super) fn forget_later(self: &Arc<Self>, endpoint: Endpoint, why: &'static str) {
        let me = self.clone();
        self.given
            .life
            .tasks
            .spawn(async move { me.forget(&endpoint, why, None).await });
    }

    /// Forgets the endpoints of earlier lives of restarted nodes, and retires their ids:
    /// their mDNS records linger in caches for minutes and must not be dialled again.
    pub(super) fn supersede(self: &Arc<Self>, old: Vec<(Endpoint, Id)>) {
        for (ep, old_id) in old {
            if self.given.static_endpoints.contains(&ep) {
                continue;
            }
            self.state.lock().retired.add(old_id);
            debug!(node = %self.given.local.name, endpoint = %ep, "a restarted peer replaces its old endpoint");
            self.forget_later(ep, "restarted elsewhere");
        }
    }

    /// Drops everything known about a peer endpoint.
    /// Known gap: a HELLO learned while this runs (between its two lock sections) can
    /// leave that peer in the table without its SUB connection; its next HELLO (on
    /// reconnect) repairs it.
    /// With `only`, nothing happens unless that DEALER is still the endpoint's: a decision
    /// about one connection must not remove a newer one.
    pub(super) async fn forget(
        self: &Arc<Self>,
        endpoint: &Endpoint,
        why: &str,
        only: Option<&Arc<Dealer>>,
    ) {
        let (link, pubs) = {
            let mut st = self.state.lock();
            if let Some(expected) = only {
                if !st
                    .table
                    .link(endpoint)
                    .is_some_and(|l| Arc::ptr_eq(&l.dealer, expected))
                {
                    return;
                }
            }
            let link = st.table.remove_link(endpoint);
            if let Some(l) = &link {
                l.stop.cancel();
            }
            // A key learned for it (from gossip or mDNS, perhaps wrong) goes with it;
            // an operator's static peer keeps its key.
            if let Some(book) = &self.given.keys {
                if !self.given.static_endpoints.contains(endpoint) {
                    book.forget(endpoint);
                }
                // And the key of the ipc socket it was dialled at.
                if let Some(l) = link.as_ref().filter(|l| l.dialled != *endpoint) {
                    book.forget(&l.dialled);
                }
            }
            st.unannounced.remove(endpoint);
            let (pubs, left) = st.table.remove_at(endpoint, None);
            if let Some(book) = &self.given.keys {
                for p in &pubs {
                    book.forget(p);
                }
            }
            for peer in left {
                let _ = self.presence.send(PresenceEvent::Left {
                    peer,
                    reason: why.to_string(),
                });
            }
            (link, pubs)
        };
        self.drop_subscriptions(pubs);
        self.note_change();
        if let Some(l) = link {
            // Closing the DEALER ends its connection, so no reply can come back on it:
            // calls still waiting on it fail now rather than at their deadline.
            self.given
                .calls
                .fail_connection(l.conn, || CallError::Disconnected(endpoint.to_string()));
            l.dealer.shutdown().await;
        }
        debug!(node = %self.given.local.name, %endpoint, why, "forgot a peer");
    }

    /// What a DEALER's connection event means for the peer behind it.
    fn on_link_event(self: &Arc<Self>, endpoint: &Endpoint, link: &Link, e: SocketEvent) {
        match e {
            SocketEvent::Connected { .. } => {
                // A new connection: what failed before is history. (Our HELLO went first
                // on it: the DEALER's first message. The peer counts as connected again only
                // once its HELLO-ACK says who it is now: the endpoint may have been taken
                // by a restarted or other node.)
                *link.last_error.lock() = None;
            }
            SocketEvent::Disconnected { reason, .. } => {
                {
                    let mut st = self.state.lock();
                    for peer in st.table.set_down(endpoint) {
                        let _ = self.presence.send(PresenceEvent::Left {
                            peer,
                            reason: reason.to_string(),
                        });
                    }
                }
                self.note_change();
                let failed = self
                    .given
                    .calls
                    .fail_connection(link.conn, || CallError::Disconnected(endpoint.to_string()));
                if failed > 0 {
                    debug!(%endpoint, %reason, calls = failed, "failing calls to a lost peer");
                }
            }
            SocketEvent::ConnectFailed { ref error, .. } if !is_refusal(&e) => {
                *link.last_error.lock() = Some(error.clone());
                self.note_change();
            }
            SocketEvent::ConnectFailed {
                refused: true,
                ref error,
                ..
            } => {
                *link.last_error.lock() = Some(error.clone());
                self.note_change();
                // The process behind it has ended. If the same node already came back
                // elsewhere on that host, this endpoint is its earlier life.
                let old = {
                    let mut st = self.state.lock();
                    st.table.set_refused(endpoint);
                    st.table.restarts()
                };
                self.supersede(old);
            }
            // The peer answered but the handshake failed (another security mechanism,
            // a key that does not match, not let in): say why, as for a failed connect.
            SocketEvent::HandshakeFailed { ref reason, .. } => {
                let why = match reason {
                    crate::transport::CloseReason::Violation(
                        crate::transport::ProtocolViolation::MechanismMismatch { ours, theirs },
                    ) if *ours == "NULL" => format!(
                        "the peer is secured ({theirs}) and this node is not: dial it with its key"
                    ),
                    crate::transport::CloseReason::Violation(
                        crate::transport::ProtocolViolation::MechanismMismatch { theirs, .. },
                    ) => format!("the peer is not secured ({theirs}) and this node is"),
                    other => other.to_string(),
                };
                *link.last_error.lock() = Some(why);
                self.note_change();
            }
            _ => {}
        }
    }
}

fn is_refusal(e: &SocketEvent) -> bool {
    matches!(e, SocketEvent::ConnectFailed { refused: true, .. })
}

/// The first wait for a HELLO-ACK before our HELLO is sent again; each further wait
/// doubles, the last being this much.
const HELLO_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const HELLO_RETRY_LAST: std::time::Duration = std::time::Duration::from_secs(16);

/// Watches one link's connection events until the node stops or the endpoint is
/// forgotten; forgets a peer learned by gossip (not a static one) that stays
/// unreachable for `forget_after`.
async fn dealer_loop(
    membership: Weak<Membership>,
    endpoint: Endpoint,
    link: Link,
    mut events: broadcast::Receiver<SocketEvent>,
) {
    let forgettable = membership
        .upgrade()
        .map(|m| (!m.given.static_endpoints.contains(&endpoint)).then_some(m.given.forget_after))
        .unwrap_or(None);
    let far = far_instant_after(std::time::Duration::MAX);
    let mut forget_at = forgettable.map(far_instant_after).unwrap_or(far);
    let cancel: CancellationToken = link.stop.clone();
    // Our HELLO on a new connection may be lost to the peer's rate limits (many nodes
    // behind one address joining at once): until its HELLO-ACK comes, it is sent again
    // after 1, 2, 4, 8 and 16 s.
    let mut hello_at = far;
    let mut hello_gap = HELLO_RETRY_FIRST;
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(forget_at) => {
                let Some(strong) = membership.upgrade() else { return };
                strong.forget(&endpoint, "unreachable", Some(&link.dealer)).await;
                return;
            }
            _ = tokio::time::sleep_until(hello_at) => {
                let Some(strong) = membership.upgrade() else { return };
                let acked = link.acked.load(std::sync::atomic::Ordering::Relaxed);
                hello_at = far;
                if !acked && link.dealer.is_connected() && hello_gap <= HELLO_RETRY_LAST {
                    debug!(%endpoint, "no HELLO-ACK yet: HELLO sent again");
                    let _ = link.dealer.try_send(strong.hello_message(Kind::Hello, Id::NIL));
                    hello_at = tokio::time::Instant::now() + hello_gap;
                    hello_gap *= 2;
                }
            }
            e = events.recv() => match e {
                Ok(e) => {
                    let Some(strong) = membership.upgrade() else { return };
                    let down = matches!(e, SocketEvent::Disconnected { .. });
                    if matches!(e, SocketEvent::Connected { .. }) {
                        forget_at = far;
                        hello_gap = HELLO_RETRY_FIRST;
                        hello_at = tokio::time::Instant::now() + hello_gap;
                        hello_gap *= 2;
                    }
                    // The table first (marks the peer down), then the decision, which
                    // reads what discovery said meanwhile.
                    strong.on_link_event(&endpoint, &link, e);
                    if down {
                        if let Some(t) = forgettable {
                            // Gone from mDNS already: nothing vouches for it any more.
                            let unannounced = strong.state.lock().unannounced.contains(&endpoint);
                            forget_at = if unannounced {
                                tokio::time::Instant::now()
                            } else {
                                far_instant_after(t)
                            };
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(%endpoint, missed = n, "connection events lagged");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}
