//! Per-service policies: how calls to one service are made when the caller does not say
//! otherwise (deadline, retries, breaker, bulkhead, balancing), and how a call's own
//! options, its service's policy and the node's defaults combine.
//!
//! Each mechanism has its own module (`bulkhead`, `breaker`, `retry`, `balance`,
//! `fallback`); this one only says which setting is in force for a call. The rule is
//! the same for each: the call's option, else its service's policy, else the node's
//! default. The order in which the mechanisms apply is the pipeline's (see
//! ARCHITECTURE.md, "Resilience").

use std::collections::HashMap;
use std::time::Duration;

use super::balance::{Balance, Balancing, LeastOutstanding, RoundRobin};
use super::breaker::{service_of, BreakerConfig};
use super::bulkhead::BulkheadConfig;
use super::CallOptions;

/// How calls to one service (a target's part before its first dot) are made when the
/// caller does not say otherwise; given to
/// [`NodeBuilder::service`](super::NodeBuilder::service). Every setting left unset is
/// the node's default.
///
/// ```
/// use std::time::Duration;
/// use peerwire::node::{Balancing, BulkheadConfig, ServicePolicy};
///
/// // Inventory reads are idempotent: retried twice, on another instance.
/// let inventory = ServicePolicy::new()
///     .timeout(Duration::from_millis(300))
///     .retries(2)
///     .bulkhead(BulkheadConfig::new(64, 128))
///     .balancing(Balancing::LeastOutstanding);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[must_use]
pub struct ServicePolicy {
    pub(super) timeout: Option<Duration>,
    pub(super) retries: Option<u32>,
    pub(super) breaker: Option<Option<BreakerConfig>>,
    pub(super) bulkhead: Option<BulkheadConfig>,
    pub(super) balancing: Option<Balancing>,
}

impl ServicePolicy {
    /// A policy with nothing set: the node's defaults throughout.
    pub fn new() -> Self {
        Self::default()
    }

    /// The deadline of its requests that set none (a notification carries only a
    /// deadline its caller set to its handler; this one bounds its wait for room).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Declares every method of the service idempotent (if `n > 0`) and retries a call
    /// that an instance could not serve up to `n` times (see [`CallOptions::retries`]).
    /// A call can still ask for fewer (`CallOptions::retries = Some(0)`) or more.
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = Some(n);
        self
    }

    /// Its instances' circuit breakers judge them by `config` rather than the node's.
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = Some(Some(config));
        self
    }

    /// No circuit breakers for its instances, whatever the node's setting.
    pub fn no_breaker(mut self) -> Self {
        self.breaker = Some(None);
        self
    }

    /// A bulkhead of its own (the node's default bulkhead otherwise, if any).
    pub fn bulkhead(mut self, config: BulkheadConfig) -> Self {
        self.bulkhead = Some(config);
        self
    }

    /// How its calls choose among its instances.
    pub fn balancing(mut self, balancing: Balancing) -> Self {
        self.balancing = Some(balancing);
        self
    }
}

/// The node's defaults and the per-service policies, fixed at start (no lock).
pub(super) struct Policies {
    default_timeout: Duration,
    balancing: Balancing,
    services: HashMap<String, ServicePolicy>,
    round_robin: RoundRobin,
}

impl Policies {
    pub fn new(
        default_timeout: Duration,
        balancing: Balancing,
        services: HashMap<String, ServicePolicy>,
    ) -> Self {
        Policies {
            default_timeout,
            balancing,
            services,
            round_robin: RoundRobin::default(),
        }
    }

    fn of(&self, target: &str) -> Option<&ServicePolicy> {
        if self.services.is_empty() {
            return None;
        }
        self.services.get(service_of(target))
    }

    /// The deadline of a call to `target` that asked for `asked`.
    pub fn timeout(&self, target: &str, asked: Option<Duration>) -> Duration {
        asked
            .or_else(|| self.of(target).and_then(|p| p.timeout))
            .unwrap_or(self.default_timeout)
    }

    /// The deadline of a call that asked for `asked`, whatever its service (gathers:
    /// their topic names no service).
    pub fn node_timeout(&self, asked: Option<Duration>) -> Duration {
        asked.unwrap_or(self.default_timeout)
    }

    /// Retries a request to `target` with `opts` may make: the call's count if it is
    /// marked idempotent, else its service's if the service declared retries.
    pub fn retries(&self, target: &str, opts: &CallOptions) -> u32 {
        // A service that declared retries (more than none) vouched for idempotence.
        let service = self.of(target).and_then(|p| p.retries).filter(|n| *n > 0);
        match (opts.retries, service) {
            // The call said how many; it is retried only if someone vouched that it
            // may be repeated (the call, or its service by declaring retries).
            (Some(n), _) if opts.idempotent || service.is_some() => n,
            (Some(_), _) => 0,
            (None, Some(n)) => n,
            (None, None) => 0,
        }
    }

    /// The balancing policy of a call to `target` that asked for `asked`.
    pub fn balance(&self, target: &str, asked: Option<Balancing>) -> &dyn Balance {
        let b = asked
            .or_else(|| self.of(target).and_then(|p| p.balancing))
            .unwrap_or(self.balancing);
        match b {
            Balancing::RoundRobin => &self.round_robin,
            Balancing::LeastOutstanding => &LeastOutstanding,
        }
    }
}

/// The per-service breaker settings of `services` (`None`: no breaker for it).
pub(super) fn breakers_of(
    services: &HashMap<String, ServicePolicy>,
) -> HashMap<String, Option<BreakerConfig>> {
    services
        .iter()
        .filter_map(|(s, p)| Some((s.clone(), p.breaker.clone()?)))
        .collect()
}

/// The per-service bulkheads of `services`.
pub(super) fn bulkheads_of(
    services: &HashMap<String, ServicePolicy>,
) -> HashMap<String, BulkheadConfig> {
    services
        .iter()
        .filter_map(|(s, p)| Some((s.clone(), p.bulkhead?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies() -> Policies {
        let mut services = HashMap::new();
        services.insert(
            "inventory".to_string(),
            ServicePolicy::new()
                .timeout(Duration::from_millis(300))
                .retries(2),
        );
        services.insert("orders".to_string(), ServicePolicy::new());
        services.insert("audit".to_string(), ServicePolicy::new().retries(0));
        Policies::new(Duration::from_secs(5), Balancing::RoundRobin, services)
    }

    #[test]
    fn the_call_wins_then_the_service_then_the_node() {
        let p = policies();
        let ms = Duration::from_millis;
        assert_eq!(p.timeout("inventory.get", None), ms(300));
        assert_eq!(p.timeout("inventory.get", Some(ms(50))), ms(50));
        assert_eq!(p.timeout("orders.create", None), Duration::from_secs(5));
        assert_eq!(p.timeout("unknown.x", None), Duration::from_secs(5));
        assert_eq!(p.node_timeout(None), Duration::from_secs(5));
    }

    #[test]
    fn retries_need_someone_to_vouch_for_idempotence() {
        let p = policies();
        let plain = CallOptions::default();
        // The service declared them.
        assert_eq!(p.retries("inventory.get", &plain), 2);
        // The call asks for fewer, or none.
        let none = CallOptions {
            retries: Some(0),
            ..Default::default()
        };
        assert_eq!(p.retries("inventory.get", &none), 0);
        // Another service: only a call marked idempotent is retried.
        assert_eq!(p.retries("orders.create", &plain), 0);
        let unvouched = CallOptions {
            retries: Some(3),
            ..Default::default()
        };
        assert_eq!(p.retries("orders.create", &unvouched), 0);
        assert_eq!(
            p.retries("orders.create", &CallOptions::default().with_retries(3)),
            3
        );
        // Declaring no retries vouches for nothing.
        assert_eq!(p.retries("audit.log", &unvouched), 0);
    }
}
