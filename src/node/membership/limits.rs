//! The limits of what peers can make the membership do ([`MembershipLimits`]), and the
//! token buckets that enforce the rates among them.

use std::collections::HashMap;
use std::hash::Hash;

use std::net::IpAddr;

use bytes::Bytes;
use tokio::time::Instant;

/// Most keys a [`Buckets`] keeps; past it, the full (idle) buckets are dropped.
const MAX_KEYS: usize = 4096;

/// A rate: a burst, then so many a second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// How many at once, after a quiet spell.
    pub burst: f64,
    /// How many a second after that.
    pub per_second: f64,
}

impl Rate {
    /// `burst` at once, then `per_second`.
    pub const fn new(burst: f64, per_second: f64) -> Self {
        Rate { burst, per_second }
    }
}

/// What peers can make a node's membership do, each bounded. Set with
/// [`NodeBuilder::limits`](crate::node::NodeBuilder::limits); every refusal is counted in
/// [`NodeStats`](crate::node::NodeStats).
///
/// ```
/// let mut limits = peerwire::node::MembershipLimits::default();
/// limits.max_peers = 64;
/// assert_eq!(limits.max_catalog_entries, 1024);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MembershipLimits {
    /// Most peer endpoints dialled, however they were named (static seeds, HELLOs,
    /// gossip, mDNS, DNS). Default 1024.
    pub max_peers: usize,
    /// Most methods and gather topics one peer's catalog may announce. Default 1024.
    pub max_catalog_entries: usize,
    /// Most bytes of names one peer's catalog may announce. Default 64 KiB.
    pub max_catalog_bytes: usize,
    /// Largest HELLO (or HELLO-ACK) payload decoded; a larger one is refused unread.
    /// Default 256 KiB: a catalog at its bounds plus a full gossip list fit in far less.
    pub max_hello_bytes: usize,
    /// HELLOs one ROUTER connection may send. A node sends one on connecting and one per
    /// change, at most ten a second. Default 20 at once, then 10 a second.
    pub hellos_per_connection: Rate,
    /// HELLOs from one source address, its connections together (several nodes may
    /// share a host). Default 200 at once, then 100 a second.
    pub hellos_per_source: Rate,
    /// New peer endpoints dialled (named by HELLOs, gossip or discovery; static peers are
    /// always dialled). Default 100 at once, then 50 a second.
    pub new_dials: Rate,
    /// Most dialled endpoints whose connection is not up yet. Default 128.
    pub max_dialling: usize,
}

impl Default for MembershipLimits {
    fn default() -> Self {
        MembershipLimits {
            max_peers: 1024,
            max_catalog_entries: 1024,
            max_catalog_bytes: 64 * 1024,
            max_hello_bytes: 256 * 1024,
            hellos_per_connection: Rate::new(20.0, 10.0),
            hellos_per_source: Rate::new(200.0, 100.0),
            new_dials: Rate::new(100.0, 50.0),
            max_dialling: 128,
        }
    }
}

/// One token bucket.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub(super) fn full(rate: Rate, now: Instant) -> Self {
        Bucket {
            tokens: rate.burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.at = now;
    }

    /// Takes one token if there is one.
    pub(super) fn take(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        self.tokens >= rate.burst
    }
}

/// A bucket per key (connection, source address), bounded in keys.
pub(super) struct Buckets<K> {
    rate: Rate,
    by_key: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub(super) fn new(rate: Rate) -> Self {
        Buckets {
            rate,
            by_key: HashMap::new(),
        }
    }

    /// Takes one token from `key`'s bucket if there is one.
    pub(super) fn take(&mut self, key: &K, now: Instant) -> bool {
        if self.by_key.len() >= MAX_KEYS && !self.by_key.contains_key(key) {
            // A full bucket says nothing a new one would not: dropping them loses no limit.
            let rate = self.rate;
            self.by_key.retain(|_, b| !b.is_full(rate, now));
            if self.by_key.len() >= MAX_KEYS {
                // Keys follow live connections, which are fewer; should that ever fail,
                // limits start afresh rather than the table growing.
                self.by_key.clear();
            }
        }
        let rate = self.rate;
        self.by_key
            .entry(key.clone())
            .or_insert_with(|| Bucket::full(rate, now))
            .take(rate, now)
    }

    /// Forgets `key` (its connection ended).
    pub(super) fn remove(&mut self, key: &K) {
        self.by_key.remove(key);
    }
}

/// The HELLO rates: per ROUTER connection and per source address.
pub(super) struct Rates {
    pub(super) per_connection: Buckets<Bytes>,
    per_source: Buckets<IpAddr>,
    new_dials: Bucket,
    new_dial_rate: Rate,
}

impl Rates {
    pub(super) fn new(l: &MembershipLimits) -> Self {
        Rates {
            per_connection: Buckets::new(l.hellos_per_connection),
            per_source: Buckets::new(l.hellos_per_source),
            new_dials: Bucket::full(l.new_dials, tokio::time::Instant::now()),
            new_dial_rate: l.new_dials,
        }
    }

    /// Whether a new endpoint may be dialled now.
    pub(super) fn new_dial(&mut self) -> bool {
        self.new_dials
            .take(self.new_dial_rate, tokio::time::Instant::now())
    }

    /// Whether a HELLO from connection `identity` (from `source`) may be handled now.
    pub(super) fn hello(&mut self, identity: &Bytes, source: Option<IpAddr>) -> bool {
        let now = tokio::time::Instant::now();
        self.per_connection.take(identity, now)
            && source.is_none_or(|ip| self.per_source.take(&crate::transport::source_key(ip), now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let rate = Rate {
            burst: 3.0,
            per_second: 2.0,
        };
        let t0 = Instant::now();
        let mut b = Bucket::full(rate, t0);
        assert!((0..3).all(|_| b.take(rate, t0)));
        assert!(!b.take(rate, t0));
        assert!(b.take(rate, t0 + Duration::from_millis(500)));
        assert!(!b.take(rate, t0 + Duration::from_millis(500)));
    }

    #[test]
    fn buckets_stay_bounded_in_keys() {
        let rate = Rate {
            burst: 1.0,
            per_second: 1.0,
        };
        let mut bs: Buckets<u32> = Buckets::new(rate);
        let t0 = Instant::now();
        for k in 0..10_000 {
            bs.take(&k, t0);
        }
        // Later, every bucket has refilled: the table is pruned as new keys arrive.
        let later = t0 + Duration::from_secs(5);
        bs.take(&10_001, later);
        assert!(bs.by_key.len() <= MAX_KEYS, "{}", bs.by_key.len());
    }
}
