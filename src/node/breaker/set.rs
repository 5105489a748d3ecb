//! The node's set of breakers, one per (service, instance), and the [`Ticket`] a call
//! carries from its breaker's permit to its outcome. Owns the map and the events; the
//! state machine is the parent module's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{Breaker, BreakerConfig, BreakerState, Outcome, Permit, Refused};
use crate::codec::{codes, Envelope, ErrorBody, Id, Kind};

/// A breaker changed state, as [`Node::breaker_events`](crate::node::Node::breaker_events)
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerEvent {
    /// The service (a target's part before its first dot).
    pub service: String,
    /// The instance: the node serving it.
    pub instance: Id,
    /// The state it left.
    pub from: BreakerState,
    /// The state it entered.
    pub to: BreakerState,
}

/// Most breakers kept; past it, closed ones (which hold only history) are dropped.
const MAX_BREAKERS: usize = 4096;

/// The node's breakers, one per (service, instance), made on first use.
pub(in crate::node) struct Breakers {
    /// For services without a setting of their own; `None`: breakers are off.
    config: Option<BreakerConfig>,
    /// Per-service settings (`None`: no breaker for that service).
    per_service: HashMap<String, Option<BreakerConfig>>,
    map: Mutex<HashMap<Arc<str>, Service>>,
    events: broadcast::Sender<BreakerEvent>,
    refused: AtomicU64,
}

/// One service's breakers, and its name as the map holds it (shared with tickets, so a
/// call allocates nothing for it and a known breaker is found with two lookups).
struct Service {
    name: Arc<str>,
    instances: HashMap<Id, Breaker>,
}

/// The service a target belongs to: its part before the first dot.
pub(in crate::node) fn service_of(target: &str) -> &str {
    target.split('.').next().unwrap_or(target)
}

impl Breakers {
    pub fn new(
        config: Option<BreakerConfig>,
        per_service: HashMap<String, Option<BreakerConfig>>,
    ) -> Arc<Breakers> {
        Arc::new(Breakers {
            config,
            per_service,
            map: Mutex::new(HashMap::new()),
            events: broadcast::channel(256).0,
            refused: AtomicU64::new(0),
        })
    }

    pub fn events(&self) -> broadcast::Receiver<BreakerEvent> {
        self.events.subscribe()
    }

    /// Counts a call refused because every instance's breaker was open.
    pub fn note_refused(&self) {
        self.refused.fetch_add(1, Relaxed);
    }

    /// Calls refused by an open breaker.
    pub fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }

    /// How `service`'s instances are judged (`None`: no breakers for it).
    fn config_of(&self, service: &str) -> Option<&BreakerConfig> {
        match self.per_service.get(service) {
            Some(own) => own.as_ref(),
            None => self.config.as_ref(),
        }
    }

    /// The instances of `service` whose breaker would refuse a call now.
    pub fn refusing(&self, service: &str, now: Instant) -> Vec<Id> {
        if self.config_of(service).is_none() {
            return Vec::new();
        }
        let mut map = self.map.lock();
        let Some(s) = map.get_mut(service) else {
            return Vec::new();
        };
        s.instances
            .iter_mut()
            .filter_map(|(id, b)| (!b.would_admit(now)).then_some(*id))
            .collect()
    }

    /// A permit for a call to `instance` of `service`, as a ticket that records the
    /// call's outcome (or gives the permit back if it is dropped unused); `Ok(None)` when
    /// breakers are off.
    pub fn acquire(
        self: &Arc<Self>,
        service: &str,
        instance: Id,
        now: Instant,
    ) -> Result<Option<Ticket>, Refused> {
        let Some(config) = self.config_of(service) else {
            return Ok(None);
        };
        let (result, change, key) = {
            let mut map = self.map.lock();
            let known = map
                .get_mut(service)
                .and_then(|s| Some((s.name.clone(), s.instances.get_mut(&instance)?)));
            let (key, b) = match known {
                Some(found) => found,
                None => {
                    // Only a new breaker can take the count past the bound, so only then
                    // is it counted (not on every call).
                    let total: usize = map.values().map(|s| s.instances.len()).sum();
                    if total >= MAX_BREAKERS {
                        for s in map.values_mut() {
                            s.instances.retain(|_, b| b.state() != BreakerState::Closed);
                        }
                        map.retain(|_, s| !s.instances.is_empty());
                    }
                    let s = map
                        .entry(Arc::from(service))
                        .or_insert_with_key(|name| Service {
                            name: name.clone(),
                            instances: HashMap::new(),
                        });
                    let b = s
                        .instances
                        .entry(instance)
                        .or_insert_with(|| Breaker::new(config.clone()));
                    (s.name.clone(), b)
                }
            };
            let (result, change) = b.try_acquire(now);
            (result, change, key)
        };
        self.report(service, instance, change);
        match result {
            Ok(permit) => Ok(Some(Ticket {
                breakers: self.clone(),
                service: key,
                instance,
                permit: Some(permit),
            })),
            Err(r) => {
                self.refused.fetch_add(1, Relaxed);
                Err(r)
            }
        }
    }

    fn report(&self, service: &str, instance: Id, change: Option<(BreakerState, BreakerState)>) {
        if let Some((from, to)) = change {
            tracing::info!(service, %instance, ?from, ?to, "circuit breaker");
            let _ = self.events.send(BreakerEvent {
                service: service.to_string(),
                instance,
                from,
                to,
            });
        }
    }

    fn with(
        &self,
        service: &str,
        instance: Id,
        f: impl FnOnce(&mut Breaker) -> Option<(BreakerState, BreakerState)>,
    ) {
        let change = {
            let mut map = self.map.lock();
            map.get_mut(service)
                .and_then(|s| s.instances.get_mut(&instance))
                .and_then(f)
        };
        self.report(service, instance, change);
    }
}

/// One call's permit from its instance's breaker. Record its outcome with
/// [`Ticket::reply`] or [`Ticket::failed`]; dropped without, it gives the permit back
/// (the caller gave up: the outcome is unknown).
pub(in crate::node) struct Ticket {
    breakers: Arc<Breakers>,
    service: Arc<str>,
    instance: Id,
    permit: Option<Permit>,
}

impl Ticket {
    /// The call was answered with `reply`: a failure if the instance could not serve it
    /// (overloaded, shutting down, its handler panicked), a success otherwise (a
    /// business error is an answer); slow if it took longer than the slow-call duration.
    pub fn reply(mut self, reply: &Envelope) {
        let failed = reply.header.kind == Kind::ErrorReply
            && crate::codec::decode_payload::<ErrorBody>(&reply.payload).is_ok_and(|b| {
                [
                    codes::OVERLOADED,
                    codes::SHUTTING_DOWN,
                    codes::HANDLER_PANICKED,
                ]
                .contains(&b.code.as_str())
            });
        self.finish(failed);
    }

    /// The call failed for want of the instance (no reply by the deadline, or its
    /// connection lost).
    pub fn failed(mut self) {
        self.finish(true);
    }

    fn finish(&mut self, failed: bool) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let now = Instant::now();
        self.breakers.with(&self.service, self.instance, |b| {
            let slow = now.saturating_duration_since(permit.started) > b.slow_call_duration();
            b.record(permit, Outcome { failed, slow }, now)
        });
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.breakers.with(&self.service, self.instance, |b| {
                b.release(permit);
                None
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_can_have_its_own_breaker_or_none() {
        let own = BreakerConfig {
            window: 2,
            minimum_calls: 2,
            ..Default::default()
        };
        let per_service = HashMap::from([
            ("quiet".to_string(), None),
            ("strict".to_string(), Some(own)),
        ]);
        let b = Breakers::new(Some(BreakerConfig::default()), per_service);
        let now = Instant::now();
        let (one, two) = (Id::new(), Id::new());
        // No breaker for `quiet`: no ticket, never refused.
        assert!(b.acquire("quiet", one, now).unwrap().is_none());
        // `strict` opens after two failures; the node's default needs ten.
        for _ in 0..2 {
            b.acquire("strict", one, now).unwrap().unwrap().failed();
            b.acquire("other", two, now).unwrap().unwrap().failed();
        }
        assert_eq!(b.refusing("strict", Instant::now()), vec![one]);
        assert!(b.refusing("other", Instant::now()).is_empty());
        assert!(b.refusing("quiet", Instant::now()).is_empty());
    }
}
