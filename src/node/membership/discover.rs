//! The node's side of discovery: the loops that turn mDNS sightings and DNS answers into
//! DEALER connections (and forget what disappears). What a peer serves is learned from
//! its HELLO once connected, never from discovery. No public items.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use std::sync::atomic::Ordering::Relaxed;

use super::Membership;
use crate::codec::Id;
use crate::discovery::{DnsSeed, Mdns, Sighting, VERSION_MAJOR_TXT};
use crate::node::calls::far_instant_after;
use crate::transport::Endpoint;

/// How often endpoints that discovery still vouches for are dialled again if dispatch
/// forgot them (a partition longer than `forget_after`, say). Dialling a known endpoint
/// is a no-op, so this costs a table lookup per endpoint.
const REDIAL_EVERY: Duration = Duration::from_secs(5);

/// How often the LAN is asked again who is there. Records live 120 s: a peer whose
/// records expired during a partition answers the next refresh once it heals.
const REFRESH_EVERY: Duration = Duration::from_secs(120);

/// After a refresh, how long instances have to be reported again before the ones that
/// were not are taken as gone.
const CONFIRM_WITHIN: Duration = Duration::from_secs(3);

/// Most node ids remembered as retired (restarted elsewhere), oldest dropped first.
const MAX_RETIRED: usize = 1024;

/// Node ids known to be gone for good: a peer that restarted under a new id. Their mDNS
/// records linger in caches until they expire (minutes); they must not be dialled again.
#[derive(Default)]
pub(super) struct Retired {
    order: std::collections::VecDeque<Id>,
    set: HashSet<Id>,
}

impl Retired {
    pub(super) fn add(&mut self, id: Id) {
        if self.set.insert(id) {
            self.order.push_back(id);
            if self.order.len() > MAX_RETIRED {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    pub(super) fn contains(&self, id: &Id) -> bool {
        self.set.contains(id)
    }

    pub(super) fn remove(&mut self, id: &Id) {
        if self.set.remove(id) {
            self.order.retain(|x| x != id);
        }
    }
}

/// What to do with an endpoint whose mDNS instance went away (goodbye or expiry).
#[derive(Debug, PartialEq, Eq)]
enum OnDown {
    /// Nothing: another instance is announced there now, or another node answers there.
    Keep,
    /// Forget it now: nobody reachable is there.
    Forget,
    /// The peer is still connected (its goodbye comes before its connections close, and
    /// multicast can fail while TCP works): forget it when its connection drops.
    WhenDisconnected,
}

/// The decision for an endpoint `ep` whose instance, announced by node `gone` (from its
/// TXT), went away. `others` are the endpoints of the instances still announced; `at` is
/// the peer at `ep` now (id, connected).
fn on_down<'a>(
    ep: &Endpoint,
    gone: Option<Id>,
    mut others: impl Iterator<Item = &'a Endpoint>,
    at: Option<(Id, bool)>,
) -> OnDown {
    if others.any(|e| e == ep) {
        return OnDown::Keep;
    }
    match at {
        None => OnDown::Forget,
        // Another node lives at that endpoint now (the instance's node restarted there):
        // the old instance expiring must not drop it.
        Some((id, _)) if gone.is_some_and(|g| g != id) => OnDown::Keep,
        Some((_, true)) => OnDown::WhenDisconnected,
        Some((_, false)) => OnDown::Forget,
    }
}

/// An instance went away (goodbye, expiry, or not reported again after a refresh).
fn instance_gone(
    m: &Arc<Membership>,
    dialled: &mut HashMap<String, (Endpoint, Option<Id>)>,
    instance: &str,
) {
    let Some((ep, gone)) = dialled.remove(instance) else {
        return;
    };
    if m.given.static_endpoints.contains(&ep) {
        return;
    }
    let at = m.state.lock().table.peer_at(&ep);
    let decision = on_down(&ep, gone, dialled.values().map(|(e, _)| e), at);
    debug!(node = %m.given.local.name, instance = ?instance, endpoint = %ep, ?decision, "mDNS: instance gone");
    match decision {
        OnDown::Keep => {}
        OnDown::Forget => m.forget_later(ep, "gone from mDNS"),
        OnDown::WhenDisconnected => {
            let dropped = {
                let mut st = m.state.lock();
                // Only while a dealer is there: a mark left behind would make a later
                // connection to this endpoint be forgotten on its first blip.
                if st.table.link(&ep).is_some() {
                    st.unannounced.insert(ep.clone());
                }
                // It may have dropped between the look and the mark.
                st.table.down_at(&ep)
            };
            if dropped {
                m.forget_later(ep, "gone from mDNS");
            }
        }
    }
}

/// Follows mDNS until the node leaves, then says goodbye.
pub(super) async fn mdns_loop(membership: Weak<Membership>, mut mdns: Mdns) {
    let Some(leave) = membership.upgrade().map(|m| m.given.life.leave.clone()) else {
        return;
    };
    // Instance → the endpoint we dial for it and the node id it announced.
    let mut dialled: HashMap<String, (Endpoint, Option<Id>)> = HashMap::new();
    let mut redial =
        tokio::time::interval_at(tokio::time::Instant::now() + REDIAL_EVERY, REDIAL_EVERY);
    redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh =
        tokio::time::interval_at(tokio::time::Instant::now() + REFRESH_EVERY, REFRESH_EVERY);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // After a refresh: until when instances may confirm they are still there, and which did.
    let mut confirming: Option<(tokio::time::Instant, HashSet<String>)> = None;
    let far = far_instant_after(Duration::MAX);
    loop {
        let confirm_at = confirming.as_ref().map_or(far, |(at, _)| *at);
        let sighting = tokio::select! {
            biased;
            _ = leave.cancelled() => break,
            _ = redial.tick() => {
                let Some(m) = membership.upgrade() else { break };
                for (ep, id) in dialled.values() {
                    if id.is_some_and(|id| m.state.lock().retired.contains(&id)) {
                        continue;
                    }
                    if let Err(e) = m.dial(ep, super::NamedBy::Hearsay) {
                        debug!(endpoint = %ep, error = %e, "mDNS: not dialling again");
                    }
                }
                continue;
            }
            _ = refresh.tick() => {
                if !mdns.refresh() {
                    warn!("mDNS daemon stopped; discovery by mDNS ends");
                    break;
                }
                Sighting::Refreshed
            }
            _ = tokio::time::sleep_until(confirm_at), if confirming.is_some() => {
                let (_, confirmed) = confirming.take().expect("checked");
                let gone: Vec<String> = dialled
                    .keys()
                    .filter(|i| !confirmed.contains(*i))
                    .cloned()
                    .collect();
                let Some(m) = membership.upgrade() else { break };
                for instance in gone {
                    debug!(node = %m.given.local.name, instance = ?instance, "mDNS: not reported again after a refresh");
                    instance_gone(&m, &mut dialled, &instance);
                }
                continue;
            }
            s = mdns.next() => match s {
                Some(s) => s,
                None => {
                    warn!("mDNS daemon stopped; discovery by mDNS ends");
                    break;
                }
            },
        };
        let Some(m) = membership.upgrade() else { break };
        match sighting {
            Sighting::Up(seen) => {
                if seen.cluster != m.given.local.cluster {
                    m.other_cluster.fetch_add(1, Relaxed);
                    debug!(instance = ?seen.instance, cluster = ?seen.cluster, "mDNS: a node of another cluster, ignored");
                    continue;
                }
                if seen.node_id == Some(m.given.local.id) {
                    continue;
                }
                if seen.version != Some(VERSION_MAJOR_TXT) {
                    m.other_version.fetch_add(1, Relaxed);
                    warn!(instance = ?seen.instance, version = ?seen.version, "mDNS: a node speaking another protocol version, ignored");
                    continue;
                }
                if seen
                    .node_id
                    .is_some_and(|id| m.state.lock().retired.contains(&id))
                {
                    debug!(instance = ?seen.instance, "mDNS: a lingering record of a node that restarted, ignored");
                    continue;
                }
                let Some(ep) = seen.router else {
                    debug!(instance = ?seen.instance, addresses = ?seen.addresses, "mDNS: no usable address");
                    continue;
                };
                if let Some((_, confirmed)) = &mut confirming {
                    confirmed.insert(seen.instance.clone());
                }
                m.state.lock().unannounced.remove(&ep);
                let previous = dialled.insert(seen.instance.clone(), (ep.clone(), seen.node_id));
                if let Some((old, _)) = previous {
                    if old != ep
                        && !m.given.static_endpoints.contains(&old)
                        && !dialled.values().any(|(e, _)| *e == old)
                    {
                        m.forget_later(old, "moved");
                    }
                }
                // A secured node's key, for an endpoint whose key we do not know yet (a
                // wrong one costs a handshake that fails, until the endpoint is forgotten).
                let named_key = match (&m.given.keys, seen.key) {
                    (Some(book), Some(key)) => book.learn_if_unknown(ep.clone(), key),
                    _ => false,
                };
                debug!(node = %m.given.local.name, instance = ?seen.instance, endpoint = %ep, "mDNS: found a peer");
                if let Err(e) = m.dial(&ep, super::NamedBy::Hearsay) {
                    debug!(endpoint = %ep, error = %e, "mDNS: not dialling");
                    // (Named again at its next sighting, with its key.)
                    if let (Some(book), true) = (&m.given.keys, named_key) {
                        book.forget_hearsay(&ep);
                    }
                }
            }
            Sighting::Own => {}
            Sighting::Refreshed => {
                confirming = Some((tokio::time::Instant::now() + CONFIRM_WITHIN, HashSet::new()));
            }
            Sighting::Down { instance } => instance_gone(&m, &mut dialled, &instance),
        }
    }
    mdns.stop().await;
}

/// Resolves the DNS seeds every `every` until the node leaves: every address is dialled
/// (again, if dispatch forgot it), vanished ones forgotten.
pub(super) async fn dns_loop(
    membership: Weak<Membership>,
    seeds: Vec<DnsSeed>,
    every: Duration,
    leave: CancellationToken,
) {
    let mut current: HashSet<Endpoint> = HashSet::new();
    let mut last_error: HashMap<String, String> = HashMap::new();
    loop {
        let mut found: HashSet<Endpoint> = HashSet::new();
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
        let Some(strong) = membership.upgrade() else {
            return;
        };
        // All of them, not only the new ones: an address dispatch forgot (unreachable for
        // a while) is dialled again while DNS still lists it. Known ones are a no-op.
        for ep in &found {
            if let Err(e) = strong.dial(ep, super::NamedBy::Hearsay) {
                debug!(endpoint = %ep, error = %e, "DNS: not dialling");
            }
        }
        // A failed lookup proves nothing: keep what we had until an answer drops it.
        if !failed {
            for ep in current.difference(&found) {
                if !strong.given.static_endpoints.contains(ep) {
                    strong.forget_later(ep.clone(), "gone from DNS");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Node, Presence, PresenceEvent};

    fn endpoint(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap()
    }

    #[test]
    fn an_expiring_instance_never_drops_the_node_that_replaced_it() {
        let (old, new) = (Id::new(), Id::new());
        let ep = &endpoint("tcp://10.0.0.2:7001");
        let none: Vec<Endpoint> = Vec::new();
        // The restarted node answers at the same endpoint: keep it.
        assert_eq!(
            on_down(ep, Some(old), none.iter(), Some((new, true))),
            OnDown::Keep
        );
        assert_eq!(
            on_down(ep, Some(old), none.iter(), Some((new, false))),
            OnDown::Keep
        );
        // Another instance announces the endpoint now: keep it.
        let others = [ep.clone()];
        assert_eq!(on_down(ep, Some(old), others.iter(), None), OnDown::Keep);
        // The same node, still connected (its goodbye precedes its close): later.
        assert_eq!(
            on_down(ep, Some(old), none.iter(), Some((old, true))),
            OnDown::WhenDisconnected
        );
        // Down, or never reached: now.
        assert_eq!(
            on_down(ep, Some(old), none.iter(), Some((old, false))),
            OnDown::Forget
        );
        assert_eq!(on_down(ep, Some(old), none.iter(), None), OnDown::Forget);
    }

    /// Waits (bounded) for `n` joins; other events are skipped.
    async fn joins(p: &mut Presence, n: usize) {
        let mut seen = 0;
        tokio::time::timeout(Duration::from_secs(10), async {
            while seen < n {
                if let Some(PresenceEvent::Joined(_)) = p.next().await {
                    seen += 1;
                }
            }
        })
        .await
        .expect("peers never joined");
    }

    /// Fails if any peer leaves within `bound`.
    async fn no_leave(p: &mut Presence, bound: Duration) {
        let _ = tokio::time::timeout(bound, async {
            while let Some(e) = p.next().await {
                assert!(!matches!(e, PresenceEvent::Left { .. }), "{e:?}");
            }
        })
        .await;
    }

    #[tokio::test]
    async fn a_forgotten_endpoints_loop_never_touches_its_successor() {
        // `b` reaches `a` through a HELLO (not a static peer, so forgettable). `a` forgets
        // it (as discovery would on a goodbye), then dials the same endpoint again: the
        // first dealer's loop must be gone, not forget the second after `forget_after`.
        let forget = Duration::from_millis(200);
        let a = Node::builder("a")
            .insecure()
            .forget_after(forget)
            .start()
            .await
            .unwrap();
        let mut presence = a.presence();
        let b = Node::builder("b")
            .insecure()
            .peer(a.endpoint())
            .start()
            .await
            .unwrap();
        let ep = b.endpoint();
        let connected = |n: &Node| {
            n.peers()
                .iter()
                .any(|p| p.router_endpoint == ep && p.connected)
        };
        joins(&mut presence, 1).await;
        a.core.membership.forget(&endpoint(&ep), "test", None).await;
        a.add_peer(&ep).unwrap();
        joins(&mut presence, 1).await;
        // Several `forget_after`s: a stray loop would have struck by now.
        no_leave(&mut presence, forget * 5).await;
        assert!(connected(&a), "the new connection to b was forgotten");
        b.shutdown().await;
        a.shutdown().await;
    }

    #[tokio::test]
    async fn replicas_that_both_blipped_are_not_restarts_of_each_other() {
        // Two live replicas called "orders" both lose their connections (a network blip)
        // and one's HELLO comes back first: the other is not an earlier life of it,
        // since nothing has refused a connection at its endpoint.
        let client = Node::builder("client").insecure().start().await.unwrap();
        let a = Node::builder("orders").insecure().start().await.unwrap();
        let b = Node::builder("orders").insecure().start().await.unwrap();
        let mut presence = client.presence();
        client.add_peer(&a.endpoint()).unwrap();
        client.add_peer(&b.endpoint()).unwrap();
        joins(&mut presence, 2).await;
        let m = &client.core.membership;
        let (a_ep, b_ep) = (endpoint(&a.endpoint()), endpoint(&b.endpoint()));
        let retired = |id: Id| m.state.lock().retired.contains(&id);
        {
            let mut st = m.state.lock();
            st.table.set_down(&a_ep);
            st.table.set_down(&b_ep);
        }
        m.learn(b.core.membership.hello(), None, None);
        assert!(!retired(a.id()));
        assert!(m.state.lock().table.link(&a_ep).is_some());
        // Once a's endpoint refuses connections (its process ended), it is.
        m.state.lock().table.set_refused(&a_ep);
        m.learn(b.core.membership.hello(), None, None);
        assert!(retired(a.id()));
        // And a HELLO from a retired id (it was alive after all) brings it back.
        m.learn(a.core.membership.hello(), None, None);
        assert!(!retired(a.id()));
        for n in [client, a, b] {
            n.shutdown().await;
        }
    }

    #[test]
    fn retired_ids_are_bounded() {
        let mut r = Retired::default();
        let first = Id::new();
        r.add(first);
        for _ in 0..MAX_RETIRED {
            r.add(Id::new());
        }
        assert!(!r.contains(&first));
        assert_eq!(r.set.len(), MAX_RETIRED);
    }
}
