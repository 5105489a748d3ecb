//! Load balancing: which instance of a target a call goes to.
//!
//! The [`Balance`] trait is the seam the call pipeline chooses through (resilience
//! policies will plug in here: least outstanding, skipping open circuit breakers); this
//! module owns it and the default policy, [`RoundRobin`]. A policy never sees a socket or
//! the peer table: the membership hands it the candidates, under its lock.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::calls::ConnId;
use crate::codec::Id;

/// One instance a call could go to, as a [`Balance`] policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// The peer's node id.
    pub(crate) id: Id,
    /// The connection a call to it goes out on.
    pub(crate) conn: ConnId,
    /// Requests sent to it and not answered yet.
    pub(crate) outstanding: usize,
}

/// Chooses one instance among those serving a target: the seam where load-balancing
/// policies plug in (least outstanding, skipping open circuit breakers, ...).
pub(crate) trait Balance: Send + Sync + 'static {
    /// The index of the chosen one in `candidates`, which is never empty and is ordered
    /// by node id. Called under the membership's lock: it must be quick and must not
    /// block.
    fn choose(&self, target: &str, candidates: &[Candidate]) -> usize;
}

/// The default policy: each call to the next instance, in node id order.
#[derive(Debug, Default)]
pub(crate) struct RoundRobin {
    cursor: AtomicUsize,
}

impl Balance for RoundRobin {
    fn choose(&self, _target: &str, candidates: &[Candidate]) -> usize {
        self.cursor.fetch_add(1, Relaxed).wrapping_add(1) % candidates.len()
    }
}

/// How calls choose among the instances of a service: the node's default
/// ([`NodeBuilder::balancing`](super::NodeBuilder::balancing)), a service's
/// ([`ServicePolicy::balancing`](super::ServicePolicy::balancing)) or a call's
/// ([`CallOptions::balancing`](super::CallOptions::balancing)). Instances whose circuit
/// breaker is open, or that are leaving, are skipped whatever the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Balancing {
    /// Each call to the next instance, in node id order.
    #[default]
    RoundRobin,
    /// Least outstanding requests, by the power of two choices: two instances drawn at
    /// random, the one with fewer requests awaiting a reply chosen. A slow instance
    /// accumulates outstanding requests and so gets fewer new ones, without every call
    /// scanning every instance or all callers herding onto the same one.
    LeastOutstanding,
}

/// See [`Balancing::LeastOutstanding`].
#[derive(Debug, Default)]
pub(crate) struct LeastOutstanding;

impl Balance for LeastOutstanding {
    fn choose(&self, _target: &str, candidates: &[Candidate]) -> usize {
        let n = candidates.len();
        if n == 1 {
            return 0;
        }
        let a = fastrand::usize(..n);
        // A second draw among the others.
        let b = (a + 1 + fastrand::usize(..n - 1)) % n;
        if candidates[b].outstanding < candidates[a].outstanding {
            b
        } else {
            a
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_goes_round_whatever_the_count() {
        let rr = RoundRobin::default();
        let c = |n: usize| -> Vec<Candidate> {
            (0..n)
                .map(|i| Candidate {
                    id: Id::new(),
                    conn: i as ConnId,
                    outstanding: 0,
                })
                .collect()
        };
        let three = c(3);
        let picks: Vec<usize> = (0..6).map(|_| rr.choose("x.y", &three)).collect();
        assert_eq!(picks, [1, 2, 0, 1, 2, 0]);
        // One instance: always it.
        assert_eq!(rr.choose("x.y", &c(1)), 0);
    }

    #[test]
    fn least_outstanding_avoids_the_busy_one() {
        let mk = |outstanding: usize| Candidate {
            id: Id::new(),
            conn: 0,
            outstanding,
        };
        // Of two, always the one with fewer outstanding.
        let two = [mk(5), mk(1)];
        assert!((0..100).all(|_| LeastOutstanding.choose("x.y", &two) == 1));
        // Of many, the busiest is never chosen (it loses every pair it is drawn in),
        // and the others share the load.
        let many = [mk(0), mk(0), mk(0), mk(50)];
        let mut counts = [0; 4];
        for _ in 0..1000 {
            counts[LeastOutstanding.choose("x.y", &many)] += 1;
        }
        assert_eq!(counts[3], 0, "{counts:?}");
        assert!(counts[..3].iter().all(|&c| c > 100), "{counts:?}");
        assert_eq!(LeastOutstanding.choose("x.y", &[mk(3)]), 0);
    }
}
