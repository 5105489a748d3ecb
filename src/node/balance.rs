//! Load balancing: which instance of a target a call goes to.
//!
//! The [`Balance`] trait is the seam the call pipeline chooses through; this module owns
//! it and the policies: [`RoundRobin`] (the default), [`LeastOutstanding`], and
//! [`Rendezvous`], which every call with a shard key goes through. A policy never sees a
//! socket or the peer table: the membership hands it the candidates, under its lock
//! (instances whose breaker is open, or that are leaving, already left out).

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
pub(crate) trait Balance: Send + Sync {
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

/// Rendezvous (highest random weight) hashing of a shard key: each candidate gets a score,
/// a hash of its node id and the key, and the highest score wins. The same key goes to
/// the same instance for as long as that instance is a candidate, on every caller (the
/// hash is XXH3, fixed, with no per-process seed); when an instance goes, only the keys
/// it held move (each to its next-highest instance), and when one joins it takes about
/// 1/n of the keys from the others, with nothing else moving. PROTOCOL.md ("Shard keys")
/// gives the function for other languages; tests pin it with golden vectors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rendezvous<'a> {
    pub(crate) key: &'a str,
}

/// A candidate's score for `key`: XXH3-64 (seed 0) of the node id's 16 bytes followed
/// by the key's UTF-8 bytes.
pub(crate) fn rendezvous_score(key: &str, node: Id) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(node.0.as_bytes());
    h.update(key.as_bytes());
    h.digest()
}

impl Balance for Rendezvous<'_> {
    fn choose(&self, _target: &str, candidates: &[Candidate]) -> usize {
        // Candidates are in node id order: on the (2^-64) tie, the lower id wins.
        let mut best = (0, 0u64);
        for (i, c) in candidates.iter().enumerate() {
            let score = rendezvous_score(self.key, c.id);
            if i == 0 || score > best.1 {
                best = (i, score);
            }
        }
        best.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u128) -> Id {
        Id(uuid::Uuid::from_u128(n))
    }

    fn candidates(ids: &[Id]) -> Vec<Candidate> {
        let mut v: Vec<Candidate> = ids
            .iter()
            .map(|&id| Candidate {
                id,
                conn: 0,
                outstanding: 0,
            })
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// The function other implementations must compute: if this test changes, keys move
    /// between instances across versions, which the documentation promises they do not.
    #[test]
    fn rendezvous_scores_are_pinned() {
        // XXH3-64 itself (the published value for empty input).
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        let a = node(0x0192_0000_0000_7000_8000_0000_0000_0001);
        let b = node(0x0192_0000_0000_7000_8000_0000_0000_0002);
        let c = node(0x0192_0000_0000_7000_8000_0000_0000_0003);
        let golden = [
            ("customer-42", a, GOLDEN[0]),
            ("customer-42", b, GOLDEN[1]),
            ("customer-42", c, GOLDEN[2]),
            ("", a, GOLDEN[3]),
            ("ключ", b, GOLDEN[4]),
        ];
        for (key, id, want) in golden {
            assert_eq!(rendezvous_score(key, id), want, "{key:?} {id}");
            // The same as hashing the concatenation in one go.
            let mut bytes = id.0.as_bytes().to_vec();
            bytes.extend_from_slice(key.as_bytes());
            assert_eq!(xxhash_rust::xxh3::xxh3_64(&bytes), want);
        }
    }

    /// Computed with the reference C implementation (Python's `xxhash` package,
    /// `xxh3_64_intdigest(uuid.UUID(int=n).bytes + key.encode())`), not with this code.
    const GOLDEN: [u64; 5] = [
        0xf6d5_e1ad_4bdc_b51e,
        0xffeb_ad5c_cf3f_cf1a,
        0x030f_c01c_a5a2_b3b7,
        0xcf2c_0abc_21fc_0670,
        0xddaf_cd03_b5e7_c957,
    ];

    #[test]
    fn rendezvous_keeps_keys_where_they_are_and_moves_only_the_leavers() {
        let ids: Vec<Id> = (1..=5u128).map(|n| node(n << 64 | n)).collect();
        let all = candidates(&ids);
        let keys: Vec<String> = (0..5000).map(|k| format!("order-{k}")).collect();
        let owner =
            |cands: &[Candidate], key: &str| cands[Rendezvous { key }.choose("t", cands)].id;
        let before: Vec<Id> = keys.iter().map(|k| owner(&all, k)).collect();
        // Spread: each of 5 instances holds about a fifth.
        for id in &ids {
            let held = before.iter().filter(|o| *o == id).count();
            assert!((800..1200).contains(&held), "{id}: {held}");
        }
        // Stable: asked again (a new policy value, as each call makes), the same answer.
        assert!(keys.iter().zip(&before).all(|(k, o)| owner(&all, k) == *o));
        // One leaves: exactly its keys move, and they spread over the others.
        let gone = ids[2];
        let rest = candidates(
            &ids.iter()
                .copied()
                .filter(|i| *i != gone)
                .collect::<Vec<_>>(),
        );
        let mut moved = 0;
        for (k, o) in keys.iter().zip(&before) {
            let now = owner(&rest, k);
            if *o == gone {
                moved += 1;
            } else {
                assert_eq!(now, *o, "{k} moved although its owner stayed");
            }
        }
        assert!((800..1200).contains(&moved), "{moved}");
        // One joins: it takes about a sixth, and every key that moves moves to it.
        let newcomer = node(0xAB << 64 | 0xCD);
        let mut six = ids.clone();
        six.push(newcomer);
        let six = candidates(&six);
        let taken = keys
            .iter()
            .zip(&before)
            .filter(|(k, o)| {
                let now = owner(&six, k);
                assert!(
                    now == **o || now == newcomer,
                    "{k} moved to an old instance"
                );
                now == newcomer
            })
            .count();
        assert!((650..1050).contains(&taken), "{taken}");
        // Order of the candidate list does not matter beyond ties.
        let one = candidates(&[ids[0]]);
        assert_eq!(Rendezvous { key: "x" }.choose("t", &one), 0);
    }

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
