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
                })
                .collect()
        };
        let three = c(3);
        let picks: Vec<usize> = (0..6).map(|_| rr.choose("x.y", &three)).collect();
        assert_eq!(picks, [1, 2, 0, 1, 2, 0]);
        // One instance: always it.
        assert_eq!(rr.choose("x.y", &c(1)), 0);
    }
}
