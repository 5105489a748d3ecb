//! One handler at a time per target and shard key: messages with a key run in the order
//! they arrive, whoever sent them, while other keys run in parallel.
//!
//! A message whose key has a handler running waits for its turn (holding its handler
//! slot, so waiting is bounded like running); each turn, when it ends, passes to the
//! next in arrival order. A handler that calls its own target and key on its own node
//! therefore waits for itself, until its deadline (README says so).
//!
//! It also remembers, for a while and within a bound, which keys ran here lately: a key
//! that did not ("cold") may have just moved here from another instance, and `respond`
//! then asks that instance to finish the key first (the hand-over, PROTOCOL.md). This
//! module owns only that state: it never runs a handler nor sends anything.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Keys with a handler running, each with the messages waiting behind it.
pub(super) struct KeyGate {
    queues: Mutex<HashMap<String, Waiting>>,
    warm: Mutex<Warm>,
    /// Keys are remembered by a hash with this node's own seed: nobody can make one key
    /// pass for another.
    seed: u64,
    /// The membership's count of changes: a key is warm only while the instances are as
    /// they were when it ran (a key that moves back must be handed over again).
    changes: std::sync::OnceLock<Arc<AtomicU64>>,
}

/// Keys a handler ran for lately: (seeded hash) → when, and the membership's count of
/// changes then.
#[derive(Default)]
struct Warm {
    keys: HashMap<u64, (Instant, u64)>,
    /// When full, expired keys are swept out at most this often; in between a new key
    /// is not remembered (its next message is handed over again: a cost, not an error).
    next_sweep: Option<Instant>,
}

impl Default for KeyGate {
    fn default() -> Self {
        KeyGate {
            queues: Mutex::default(),
            warm: Mutex::default(),
            seed: fastrand::u64(..),
            changes: std::sync::OnceLock::new(),
        }
    }
}

/// How long a key stays warm after a handler ran for it here: a key that comes back
/// later is handed over again (one round trip to the instance that had it).
const WARM_FOR: Duration = Duration::from_secs(10);
/// Most warm keys remembered (about 40 bytes each).
const WARM_MAX: usize = 65_536;

/// The messages waiting behind a key's running handler, oldest first. One that gave up
/// (its deadline, a CANCEL) leaves its entry behind, closed: entries are swept out when
/// the queue has doubled since the last sweep, so what gave up costs nothing lasting
/// (each sweep is paid for by as many entries as it scans) and the queue stays within
/// twice the live waiters, who each hold a handler slot.
#[derive(Default)]
struct Waiting {
    queue: VecDeque<oneshot::Sender<Turn>>,
    sweep_at: usize,
}

/// The smallest queue swept.
const SWEEP_MIN: usize = 64;

/// Whether a message may run now.
pub(super) enum Entry {
    /// Its turn: held while its handler runs.
    Go(Turn),
    /// Another handler of its key is running: the turn comes here when it is this
    /// message's (never, if the node stops first).
    Wait(oneshot::Receiver<Turn>),
}

/// The right to run a handler for one key; dropping it passes it on.
pub(super) struct Turn {
    gate: Arc<KeyGate>,
    key: String,
    /// Handed to the next in line: this value's drop does nothing.
    passed: bool,
    /// A handler ran in this turn: the key is warm here (again) when it ends.
    warms: bool,
}

impl Turn {
    /// A handler is about to run in this turn: the key is warm here from now on (a
    /// hand-over question, which runs none, or a message that gave up before its
    /// handler, leaves it as it was).
    pub(super) fn runs(&mut self) {
        self.warms = true;
        self.gate.warmed(&self.key);
    }

    /// Whether a handler ran for this key here lately (it may have become so while this
    /// turn was waiting).
    pub(super) fn is_warm(&self) -> bool {
        self.gate.is_warm(&self.key)
    }
}

impl KeyGate {
    /// The membership's change counter (set once the node is built).
    pub(super) fn follow(&self, changes: Arc<AtomicU64>) {
        let _ = self.changes.set(changes);
    }

    fn generation(&self) -> u64 {
        self.changes.get().map_or(0, |c| c.load(Relaxed))
    }

    /// Enters the queue of `target` and `key`; also whether the key is cold here (no
    /// handler ran for it within [`WARM_FOR`], or the instances changed since).
    pub(super) fn enter(self: &Arc<Self>, target: &str, key: &str) -> (Entry, bool) {
        // The target's length first: no two (target, key) pairs make the same string.
        let k = format!("{}:{target}{key}", target.len());
        let cold = !self.is_warm(&k);
        let mut queues = self.queues.lock();
        (self.enter_locked(&mut queues, k), cold)
    }

    fn hash(&self, k: &str) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_seed(k.as_bytes(), self.seed)
    }

    fn is_warm(&self, k: &str) -> bool {
        let h = self.hash(k);
        let generation = self.generation();
        self.warm
            .lock()
            .keys
            .get(&h)
            .is_some_and(|(at, g)| *g == generation && at.elapsed() < WARM_FOR)
    }

    fn enter_locked(self: &Arc<Self>, queues: &mut HashMap<String, Waiting>, k: String) -> Entry {
        match queues.get_mut(&k) {
            Some(waiting) => {
                if waiting.queue.len() >= waiting.sweep_at.max(SWEEP_MIN) {
                    waiting.queue.retain(|tx| !tx.is_closed());
                    waiting.sweep_at = 2 * waiting.queue.len();
                }
                let (tx, rx) = oneshot::channel();
                waiting.queue.push_back(tx);
                Entry::Wait(rx)
            }
            None => {
                queues.insert(k.clone(), Waiting::default());
                Entry::Go(Turn {
                    gate: self.clone(),
                    key: k,
                    passed: false,
                    warms: false,
                })
            }
        }
    }

    /// A handler ran for `k` here, now.
    fn warmed(&self, k: &str) {
        let (h, generation, now) = (self.hash(k), self.generation(), Instant::now());
        let mut warm = self.warm.lock();
        if warm.keys.len() >= WARM_MAX && !warm.keys.contains_key(&h) {
            if warm.next_sweep.is_some_and(|at| now < at) {
                return;
            }
            warm.keys
                .retain(|_, (at, g)| *g == generation && now.duration_since(*at) < WARM_FOR);
            warm.next_sweep = Some(now + WARM_FOR / 4);
            if warm.keys.len() >= WARM_MAX {
                return;
            }
        }
        warm.keys.insert(h, (now, generation));
    }

    /// Keys with a handler running (for tests).
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.queues.lock().len()
    }

    /// Entries queued behind `target` and `key`, live or not (for tests).
    #[cfg(test)]
    fn queued(&self, target: &str, key: &str) -> usize {
        let k = format!("{}:{target}{key}", target.len());
        self.queues.lock().get(&k).map_or(0, |w| w.queue.len())
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if self.passed {
            return;
        }
        // To the next waiter still there (one that gave up has dropped its receiver),
        // else the key is free.
        loop {
            let next = {
                let mut queues = self.gate.queues.lock();
                let Some(waiting) = queues.get_mut(&self.key) else {
                    return;
                };
                match waiting.queue.pop_front() {
                    Some(tx) => tx,
                    None => {
                        queues.remove(&self.key);
                        drop(queues);
                        if self.warms {
                            self.gate.warmed(&self.key);
                        }
                        return;
                    }
                }
            };
            let turn = Turn {
                gate: self.gate.clone(),
                key: self.key.clone(),
                passed: false,
                warms: false,
            };
            match next.send(turn) {
                Ok(()) => return,
                Err(mut back) => back.passed = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_at_a_time_per_key_in_arrival_order_and_nothing_kept_after() {
        let gate = Arc::new(KeyGate::default());
        let (Entry::Go(mut first), true) = gate.enter("t.m", "k") else {
            panic!("the first goes at once, cold");
        };
        first.runs();
        // Another key, or the same key of another target: not held up.
        assert!(matches!(gate.enter("t.m", "other"), (Entry::Go(_), true)));
        assert!(matches!(gate.enter("t.n", "k"), (Entry::Go(_), true)));
        let waits: Vec<_> = (0..3)
            .map(|_| match gate.enter("t.m", "k") {
                (Entry::Wait(rx), false) => rx,
                _ => panic!("the key is taken, and warm (a handler runs for it)"),
            })
            .collect();
        let mut waits = waits.into_iter();
        let (w1, w2, w3) = (
            waits.next().unwrap(),
            waits.next().unwrap(),
            waits.next().unwrap(),
        );
        // The second gives up before its turn: it is skipped.
        drop(w2);
        drop(first);
        let t1 = w1.await.unwrap();
        let mut w3 = w3;
        assert!(w3.try_recv().is_err(), "not its turn yet");
        drop(t1);
        let t3 = w3.await.unwrap();
        drop(t3);
        assert_eq!(gate.keys(), 0, "nothing kept once the last ends");
        // But it ran lately: warm, until the instances change.
        assert!(matches!(gate.enter("t.m", "k"), (Entry::Go(_), false)));
        let changes = Arc::new(AtomicU64::new(0));
        gate.follow(changes.clone());
        changes.fetch_add(1, Relaxed);
        assert!(matches!(gate.enter("t.m", "k"), (Entry::Go(_), true)));
        // A turn in which no handler ran (a hand-over question) warms nothing.
        let (Entry::Go(question), true) = gate.enter("t.m", "q") else {
            panic!("cold");
        };
        drop(question);
        assert!(matches!(gate.enter("t.m", "q"), (Entry::Go(_), true)));
    }

    #[test]
    fn waiters_that_gave_up_are_swept_out() {
        let gate = Arc::new(KeyGate::default());
        let _busy = gate.enter("t.m", "hot");
        // 100 000 waiters that give up at once (a hostile caller with 1 ms deadlines).
        for _ in 0..100_000 {
            drop(gate.enter("t.m", "hot"));
        }
        assert!(
            gate.queued("t.m", "hot") <= SWEEP_MIN,
            "{}",
            gate.queued("t.m", "hot")
        );
        // Live ones are kept, in order.
        let live: Vec<_> = (0..1000).map(|_| gate.enter("t.m", "hot")).collect();
        for _ in 0..10_000 {
            drop(gate.enter("t.m", "hot"));
        }
        let q = gate.queued("t.m", "hot");
        assert!((1000..=2 * 1000 + SWEEP_MIN).contains(&q), "{q}");
        drop(live);
    }

    #[test]
    fn targets_and_keys_do_not_run_together() {
        let gate = Arc::new(KeyGate::default());
        let _a = gate.enter("ab", "c");
        assert!(matches!(gate.enter("a", "bc"), (Entry::Go(_), true)));
    }
}
