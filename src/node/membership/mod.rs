//! Membership: who the node's peers are, how it reaches them, and what they serve.
//!
//! This module owns the peer table, the DEALER to each peer's ROUTER (and the loop that
//! watches its connection), our SUB's connections to the peers' PUBs, the HELLO exchange
//! (introducing ourselves, learning peers from theirs, following their gossip), forgetting
//! peers that stay unreachable or restarted elsewhere, presence events, and the discovery
//! loops that turn mDNS sightings and DNS answers into DEALERs. What a peer serves is
//! learned from its HELLO once connected, never from discovery.
//!
//! It never decodes an envelope header (inbound routing hands it HELLOs), never sends a
//! call (the pipeline asks it for an instance and sends), and never touches a pending
//! call except to fail the calls of a connection that dropped.
//!
//! Its state is under one lock (`state`), plus `router_ids` (who introduced itself on
//! which ROUTER connection), which is never taken while `state` is held. Presence events
//! are sent while `state` is held, so that [`Membership::presence`] can take a snapshot
//! and subscribe without missing or repeating an event.

mod discover;
mod hello;
mod leave;
mod limits;
mod links;
mod presence;
mod table;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{broadcast, Notify};
use tracing::{debug, warn};

pub use limits::{MembershipLimits, Rate};
pub use presence::{PeerInfo, Presence, PresenceEvent};

use super::balance::Balance;
use super::calls::{far_instant_after, Calls, ConnId};
use super::registry::Registry;
use super::security::KeyBook;
use super::Lifecycle;
use crate::codec::{Hello, Id, Version};
use crate::discovery::{DnsSeed, Mdns};
use crate::transport::{Dealer, Endpoint, Message, SocketOptions, Subscriber};
use discover::Retired;
use hello::catalog_within_bounds;
use limits::Rates;
pub(super) use links::NamedBy;
pub(super) use table::NotPicked;
use table::{Heard, PeerTable};

/// Most endpoints followed from one HELLO's gossip list.
const MAX_GOSSIP: usize = 64;
/// Shortest time between two rounds of HELLOs to every peer: a burst of changes (peers
/// joining, handlers registered) is announced once.
const ANNOUNCE_EVERY: Duration = Duration::from_millis(100);
/// Entries of `router_ids` past which those of connections no longer live are pruned
/// (they leave with their connection; this catches ends whose events were missed).
const MAX_INTRODUCED: usize = 4096;
/// Presence events buffered for a slow reader before it sees `Lagged`.
const PRESENCE_BUFFER: usize = 256;

/// Who this node is, as it introduces itself.
pub(super) struct Local {
    pub(super) id: Id,
    pub(super) name: String,
    pub(super) cluster: String,
    pub(super) host: IpAddr,
    pub(super) router_port: u16,
    pub(super) pub_port: u16,
    /// A secured node's public key (its id is derived from it).
    pub(super) key: Option<[u8; 32]>,
}

/// Where the messages a DEALER receives go (inbound routing): called inline by the
/// DEALER's connection task with the endpoint it is connected to.
pub(super) type DealerSink = Arc<dyn Fn(&Endpoint, Message) + Send + Sync>;

/// One instance chosen for a call.
pub(super) struct Instance {
    /// The peer's node id.
    pub(super) id: Id,
    /// Our DEALER to it.
    pub(super) dealer: Arc<Dealer>,
    /// That DEALER's connection id (its calls fail if it drops).
    pub(super) conn: ConnId,
    /// Requests to it not yet answered.
    pub(super) outstanding: Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(Default)]
struct State {
    table: PeerTable,
    /// PUB endpoints our SUB is connected to.
    sub_endpoints: HashSet<Endpoint>,
    /// Endpoints found to lead back to this node (through gossip): never dialled again.
    self_endpoints: HashSet<Endpoint>,
    /// Node ids that restarted elsewhere: their lingering mDNS records are not dialled.
    retired: Retired,
    /// Endpoints whose mDNS instance went away while still connected: forgotten as soon
    /// as their connection drops, rather than after `forget_after`.
    unannounced: HashSet<Endpoint>,
}

/// What the node knows of its peers. See the [module documentation](self).
pub(super) struct Membership {
    given: Setup,
    state: Mutex<State>,
    /// Which node introduced itself on each live ROUTER connection (identity → node id
    /// and the connection's address), to check who sent a gather reply. An entry leaves
    /// when its connection ends, so its size follows the live connections.
    router_ids: Mutex<HashMap<Bytes, (Id, SocketAddr)>>,
    presence: broadcast::Sender<PresenceEvent>,
    /// Signalled whenever the peer table changes.
    changed: Notify,
    /// Changes of the peer table so far (see [`Membership::change_counter`]).
    changes: Arc<AtomicU64>,
    next_conn: AtomicU64,
    other_cluster: AtomicU64,
    other_version: AtomicU64,
    /// HELLOs refused: a catalog past its bounds, or a new peer past `max_peers`.
    hellos_refused: AtomicU64,
    /// HELLOs dropped for coming too fast (per connection, per source address).
    hellos_limited: AtomicU64,
    /// New endpoints not dialled (yet) for the dial rate or the dials in progress.
    dials_deferred: AtomicU64,
    /// Buckets of the HELLO and dial rates (taken inside `state` by a new dial, never
    /// the other way round).
    rates: Mutex<Rates>,
    /// Set when an announcement is wanted; the announcer sends it.
    announce_wanted: AtomicBool,
    announce_wake: Notify,
    /// Set when the node starts to stop: our HELLO says so from then on.
    leaving: AtomicBool,
    /// The HELLO that said so, and the endpoints whose acknowledgement we wait for
    /// (at most one per link).
    leave_hello: Mutex<Option<(Id, HashSet<Endpoint>)>>,
}

/// What the membership is given: who we are, the parts it works with, its settings.
pub(super) struct Setup {
    pub(super) local: Local,
    /// For the catalog our HELLO carries.
    pub(super) registry: Arc<Registry>,
    /// To fail the calls of a connection that dropped.
    pub(super) calls: Arc<Calls>,
    /// Our SUB, connected to every peer's PUB.
    pub(super) subscriber: Arc<Subscriber>,
    /// Options of every DEALER.
    pub(super) socket: SocketOptions,
    pub(super) dealer_sink: DealerSink,
    pub(super) life: Lifecycle,
    /// How long a gossiped peer may stay unreachable before it is forgotten.
    pub(super) forget_after: Duration,
    /// Endpoints given at start: never forgotten.
    pub(super) static_endpoints: HashSet<Endpoint>,
    /// Its bounds.
    pub(super) limits: MembershipLimits,
    /// For a secured node: the key expected at each peer endpoint (`None`: not secured).
    pub(super) keys: Option<Arc<KeyBook>>,
    /// Same-host peers over ipc (`None`: TCP only).
    pub(super) ipc: Option<super::ipc::LocalIpc>,
}

impl Membership {
    pub(super) fn new(given: Setup) -> Self {
        let rates = Rates::new(&given.limits);
        Membership {
            given,
            state: Mutex::new(State::default()),
            router_ids: Mutex::new(HashMap::new()),
            presence: broadcast::channel(PRESENCE_BUFFER).0,
            changed: Notify::new(),
            changes: Arc::default(),
            next_conn: AtomicU64::new(1),
            other_cluster: AtomicU64::new(0),
            other_version: AtomicU64::new(0),
            hellos_refused: AtomicU64::new(0),
            hellos_limited: AtomicU64::new(0),
            dials_deferred: AtomicU64::new(0),
            rates: Mutex::new(rates),
            announce_wanted: AtomicBool::new(false),
            announce_wake: Notify::new(),
            leaving: AtomicBool::new(false),
            leave_hello: Mutex::new(None),
        }
    }

    /// Starts the announcer: the task that sends our HELLO to every peer when something
    /// changed, at most once per `ANNOUNCE_EVERY`, until the node stops.
    pub(super) fn start_announcer(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let cancel = self.given.life.cancel.clone();
        self.given.life.tasks.spawn(async move {
            loop {
                let Some(m) = me.upgrade() else { return };
                // Holding `m` while waiting is fine: the node's drop cancels the token.
                let woken = m.announce_wake.notified();
                if !m.announce_wanted.swap(false, Relaxed) {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = woken => continue,
                    }
                }
                m.send_hellos();
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(ANNOUNCE_EVERY) => {}
                }
            }
        });
    }

    /// Who this node is.
    pub(super) fn local(&self) -> &Local {
        &self.given.local
    }

    /// Starts following mDNS (until the node leaves, when it says goodbye).
    pub(super) fn follow_mdns(self: &Arc<Self>, mdns: Mdns) {
        self.given
            .life
            .tasks
            .spawn(discover::mdns_loop(Arc::downgrade(self), mdns));
    }

    /// Starts resolving DNS seeds every `every` (until the node leaves).
    pub(super) fn follow_dns(self: &Arc<Self>, seeds: Vec<DnsSeed>, every: Duration) {
        self.given.life.tasks.spawn(discover::dns_loop(
            Arc::downgrade(self),
            seeds,
            every,
            self.given.life.leave.clone(),
        ));
    }

    /// Records a peer from its HELLO (received on our ROUTER, or as a HELLO-ACK on a
    /// DEALER), whose id was checked against its connection's key already
    /// (`claims_its_own_id`), connecting to it if it is new, and follows its gossip.
    pub(super) fn learn(
        self: &Arc<Self>,
        mut hello: Hello,
        source_ip: Option<IpAddr>,
        key: Option<[u8; 32]>,
    ) {
        if hello.cluster != self.given.local.cluster {
            self.other_cluster.fetch_add(1, Relaxed);
            debug!(peer = ?hello.name, cluster = ?hello.cluster, "ignoring a node of another cluster");
            return;
        }
        if hello.node_id == self.given.local.id {
            return;
        }
        if let Err(why) = catalog_within_bounds(&hello.catalog, &self.given.limits) {
            self.hellos_refused.fetch_add(1, Relaxed);
            warn!(peer = ?hello.name, id = %hello.node_id, why, "HELLO refused");
            return;
        }
        // An unspecified listen address (0.0.0.0) means "wherever you reached me from".
        let host: IpAddr = match hello.host.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() => ip,
            _ => source_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        };
        let router_ep = Endpoint::from_addr((host, hello.router_port).into());
        let pub_ep = Endpoint::from_addr((host, hello.pub_port).into());
        // A secured node dials a peer only with the key it proved, at the endpoints it
        // names for itself: only from the address it speaks from (a member naming
        // another host's endpoints would otherwise make us expect its key there, and
        // cut us off from the node that really listens there).
        if let (Some(book), Some(key)) = (&self.given.keys, key) {
            // Two nodes cannot listen on one port: while our connection there proves
            // another key, a HELLO naming it is a member (on the same address) lying.
            let taken = {
                let st = self.state.lock();
                let serving = st.table.link(&router_ep).and_then(|l| {
                    l.dealer
                        .is_connected()
                        .then(|| l.dealer.peer_key())
                        .flatten()
                });
                serving.is_some_and(|k| k != key)
                    || st.table.pub_of_another(&pub_ep, &hello.node_id)
            };
            if taken {
                self.hellos_refused.fetch_add(1, Relaxed);
                warn!(peer = ?hello.name, id = %hello.node_id, endpoint = %router_ep, "HELLO refused: it names an endpoint another node serves");
                return;
            }
            if source_ip.is_none_or(|ip| ip == host) {
                book.learn(router_ep.clone(), key);
                book.learn(pub_ep.clone(), key);
            }
        }
        {
            let mut st = self.state.lock();
            // Whoever speaks is alive: an id retired by mistake is dialled again.
            st.retired.remove(&hello.node_id);
            if st.table.claimed_elsewhere(&hello.node_id, &router_ep) {
                warn!(id = %hello.node_id, endpoint = %router_ep, "HELLO claims the id of a peer connected elsewhere; ignored");
                return;
            }
        }
        {
            let st = self.state.lock();
            if st.table.link(&router_ep).is_none()
                && st.table.link_count() >= self.given.limits.max_peers
            {
                drop(st);
                self.hellos_refused.fetch_add(1, Relaxed);
                debug!(endpoint = %router_ep, max = self.given.limits.max_peers, "HELLO of a new peer refused: the peer limit is reached");
                return;
            }
        }
        // A node on its way out makes no new links.
        if self.is_leaving() && self.state.lock().table.link(&router_ep).is_none() {
            return;
        }
        // A node speaking for its own address (the one it reached us from) is dialled at
        // once; an endpoint elsewhere is hearsay, dialled within the dial rate.
        let named_by = if source_ip.is_none_or(|ip| ip == host) {
            NamedBy::Direct
        } else {
            NamedBy::Hearsay
        };
        // A peer on this host (the same host key) is dialled at its ipc socket, with the
        // key it proved expected there too.
        let via = match (&self.given.ipc, &hello.ipc) {
            (Some(local), Some(theirs)) if local.host_key() == theirs => {
                let via = local.endpoint_of(hello.node_id);
                // Recorded for a link about to be made through it (and forgotten with
                // it), not for every HELLO: the book must not fill up with sockets.
                let new_link = self.state.lock().table.link(&router_ep).is_none();
                if let (Some(book), Some(key), true) = (&self.given.keys, key, new_link) {
                    book.learn(via.clone(), key);
                }
                Some(via)
            }
            _ => None,
        };
        let link = match self.ensure_link_via(&router_ep, named_by, via.as_ref()) {
            Ok(l) => l,
            Err(e) => {
                warn!(endpoint = %router_ep, error = %e, "cannot connect to a peer");
                return;
            }
        };
        let subscribe = self.state.lock().sub_endpoints.insert(pub_ep.clone());
        if subscribe {
            if let Err(e) = self.given.subscriber.connect(&pub_ep) {
                warn!(endpoint = %pub_ep, error = %e, "cannot subscribe to a peer");
            }
        }
        let gossip = std::mem::take(&mut hello.peers);
        let (announce, stale_pubs, superseded) = {
            let mut st = self.state.lock();
            let before = st.table.info(&hello.node_id).cloned();
            let was_up = before.as_ref().is_some_and(|p| p.connected);
            let heard = Heard {
                id: hello.node_id,
                name: hello.name,
                router_endpoint: router_ep,
                pub_endpoint: pub_ep,
                catalog: hello.catalog,
                // Believed only from the host it speaks for (the flag cannot be
                // taken back, so a third party must not be able to set it).
                leaving: hello.leaving && source_ip.is_none_or(|ip| ip == host),
            };
            let up = st.table.upsert(heard, link);
            for peer in up.replaced {
                let _ = self.presence.send(PresenceEvent::Left {
                    peer,
                    reason: "replaced by another node at its endpoint".into(),
                });
            }
            let info = st
                .table
                .info(&hello.node_id)
                .cloned()
                .expect("just upserted");
            if up.new {
                debug!(node = %self.given.local.name, peer = %info.name, id = %info.id, "peer joined");
            }
            // A peer of the same name on the same host, under another id, whose endpoint
            // now refuses connections, is this one before a restart (on another port,
            // say): stop dialling it now rather than after `forget_after`. (Not merely
            // unreachable: replicas of one name that both lost their connections in a
            // network blip are not restarts of each other.)
            let superseded = st.table.restarts();
            if info.connected && !was_up {
                let _ = self.presence.send(PresenceEvent::Joined(info.clone()));
            } else if was_up && before.as_ref() != Some(&info) {
                let _ = self.presence.send(PresenceEvent::Updated(info.clone()));
            }
            // Announce when a peer becomes reachable, not only when it is first heard of:
            // that is when the others can be told of it.
            let announce = up.new || (!was_up && info.connected);
            (announce, up.stale_pubs, superseded)
        };
        // The peer restarted (new PUB port) or was replaced: stop dialling the old one.
        self.drop_subscriptions(stale_pubs);
        self.supersede(superseded);
        self.note_change();
        if !self.is_leaving() {
            self.follow_gossip(gossip);
        }
        if announce {
            self.announce();
        }
    }

    /// Disconnects our SUB from PUB endpoints no peer uses any more.
    fn drop_subscriptions(&self, pubs: Vec<Endpoint>) {
        for p in pubs {
            if let Some(book) = &self.given.keys {
                book.forget(&p);
            }
            self.given.subscriber.disconnect(&p);
            self.state.lock().sub_endpoints.remove(&p);
        }
    }

    /// Chooses an instance of `target` for a call: `balance` picks among the connected
    /// peers serving it at a version compatible with `wanted`. `Err` carries a version
    /// some peer serves it at that cannot serve `wanted`, if any.
    pub(super) fn pick(
        &self,
        target: &str,
        wanted: Option<Version>,
        balance: &dyn Balance,
        refusing: &[Id],
        leaving_too: bool,
    ) -> Result<Instance, NotPicked> {
        self.state
            .lock()
            .table
            .pick(target, wanted, balance, refusing, leaving_too)
    }

    /// Peers answering gathers on `topic` at a version compatible with `wanted` and
    /// subscribed to us (`listening`), as (id, name), sorted.
    pub(super) fn gather_responders(
        &self,
        topic: &str,
        wanted: Option<Version>,
        listening: &HashSet<Id>,
    ) -> Vec<(Id, String)> {
        self.state
            .lock()
            .table
            .gather_responders(topic, wanted, listening)
    }

    /// Our DEALER to peer `id`.
    pub(super) fn dealer_of(&self, id: &Id) -> Option<Arc<Dealer>> {
        self.state.lock().table.dealer_of(id)
    }

    /// The peers known now, sorted by name then id.
    pub(super) fn peers(&self) -> Vec<PeerInfo> {
        self.state.lock().table.infos(false)
    }

    /// Joined / updated / left events, starting with the peers reachable now.
    pub(super) fn presence(&self) -> Presence {
        // Under the state lock, where events are sent: nothing missed, nothing twice.
        let st = self.state.lock();
        let rx = self.presence.subscribe();
        Presence::new(st.table.infos(true), rx)
    }

    /// Waits until `enough` holds of the peer table, or `within` passes.
    async fn wait_until(&self, within: Duration, enough: impl Fn(&PeerTable) -> bool) -> bool {
        self.wait_for(within, || enough(&self.state.lock().table))
            .await
    }

    /// Waits until `done` holds (checked whenever the membership changes), or `within`
    /// passes.
    async fn wait_for(&self, within: Duration, done: impl Fn() -> bool) -> bool {
        let deadline = far_instant_after(within);
        loop {
            let notified = self.changed.notified();
            if done() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Waits until at least `n` connected peers serve `target`, or `within` passes.
    pub(super) async fn wait_for_service(&self, target: &str, n: usize, within: Duration) -> bool {
        self.wait_until(within, |t| t.serving(target, None) >= n)
            .await
    }

    /// Waits until at least `n` peers are known, or `within` passes.
    pub(super) async fn wait_for_peers(&self, n: usize, within: Duration) -> bool {
        self.wait_until(within, |t| t.len() >= n).await
    }

    /// Waits until every endpoint dialled has been tried (answered our HELLO, or failed
    /// to connect), or `within` passes.
    pub(in crate::node) async fn wait_settled(&self, within: Duration) -> bool {
        self.wait_until(within, |t| t.settled()).await
    }

    /// Endpoints dialled that no peer answers on, and why.
    pub(in crate::node) fn unreachable(&self) -> Vec<(Endpoint, String)> {
        self.state.lock().table.unreachable()
    }

    /// HELLOs and mDNS sightings of nodes of another cluster (ignored).
    /// The peer table changed: counted, and whoever waits for a change is woken.
    fn note_change(&self) {
        self.changes.fetch_add(1, Relaxed);
        self.changed.notify_waiters();
    }

    /// A count of the peer table's changes (catalogs, connections, leaving), shared:
    /// a part that keeps something valid only while the instances stay as they were
    /// (which keys ran here lately) compares it.
    pub(in crate::node) fn change_counter(&self) -> Arc<AtomicU64> {
        self.changes.clone()
    }

    /// Completes at the next change of the peer table (catalogs, connections); made
    /// before looking at the table, so a change in between is not missed.
    pub(in crate::node) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    pub(super) fn other_cluster(&self) -> u64 {
        self.other_cluster.load(Relaxed)
    }

    /// mDNS sightings of nodes announcing another protocol major version (ignored).
    pub(super) fn other_version(&self) -> u64 {
        self.other_version.load(Relaxed)
    }

    /// HELLOs refused (catalog past its bounds, or a new peer past `max_peers`).
    pub(super) fn hellos_refused(&self) -> u64 {
        self.hellos_refused.load(Relaxed)
    }

    /// HELLOs dropped for coming too fast.
    pub(super) fn hellos_limited(&self) -> u64 {
        self.hellos_limited.load(Relaxed)
    }

    /// New endpoints not dialled (yet): the dial rate, or too many dials in progress.
    pub(super) fn dials_deferred(&self) -> u64 {
        self.dials_deferred.load(Relaxed)
    }

    /// Whether this node is secured (CURVE, ids derived from keys).
    pub(in crate::node) fn is_secured(&self) -> bool {
        self.given.keys.is_some()
    }

    /// Whether this node is leaving.
    pub(super) fn is_leaving(&self) -> bool {
        self.leaving.load(Relaxed)
    }

    /// Closes every DEALER (the node is stopping), waiting for each.
    pub(super) async fn close(&self) {
        let dealers: Vec<Arc<Dealer>> = self.state.lock().table.dealers().cloned().collect();
        for d in dealers {
            d.shutdown().await;
        }
    }
}
