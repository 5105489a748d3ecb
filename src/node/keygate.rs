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
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Keys with a handler running, each with the messages waiting behind it.
#[derive(Default)]
pub(super) struct KeyGate {
    queues: Mutex<HashMap<String, Waiting>>,
    /// Keys whose last handler here ended lately, and when.
    warm: Mutex<HashMap<String, Instant>>,
}

/// How long a key stays warm after its last handler here ended: a key that comes back
/// later is handed over again (one round trip to the instance that had it).
const WARM_FOR: Duration = Duration::from_secs(10);
/// Most warm keys remembered; past it (and once expired ones are forgotten), a key is
/// not remembered and its next message is handed over again: a cost, never an error.
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
    /// Whether the key is warm here once this turn ends (see [`Turn::ran_nothing`]).
    warms: bool,
}

impl Turn {
    /// No handler ran in this turn (a hand-over question took it): if it is the key's
    /// last, the key is not warm for it.
    pub(super) fn ran_nothing(&mut self) {
        self.warms = false;
    }
}

impl KeyGate {
    /// Enters the queue of `target` and `key`; also whether the key is cold here (no
    /// handler of it running, none ended within [`WARM_FOR`]).
    pub(super) fn enter(self: &Arc<Self>, target: &str, key: &str) -> (Entry, bool) {
        // The target's length first: no two (target, key) pairs make the same string.
        let k = format!("{}:{target}{key}", target.len());
        let mut queues = self.queues.lock();
        let running = queues.contains_key(&k);
        let cold = !running
            && self
                .warm
                .lock()
                .get(&k)
                .is_none_or(|at| at.elapsed() >= WARM_FOR);
        (self.enter_locked(&mut queues, k), cold)
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
                    warms: true,
                })
            }
        }
    }

    /// `k`'s last handler here just ended.
    fn warmed(&self, k: &str) {
        let mut warm = self.warm.lock();
        if warm.len() >= WARM_MAX && !warm.contains_key(k) {
            warm.retain(|_, at| at.elapsed() < WARM_FOR);
            if warm.len() >= WARM_MAX {
                return;
            }
        }
        warm.insert(k.to_string(), Instant::now());
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
                warms: true,
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
        let (Entry::Go(first), true) = gate.enter("t.m", "k") else {
            panic!("the first goes at once");
        };
        // Another key, or the same key of another target: not held up.
        assert!(matches!(gate.enter("t.m", "other"), (Entry::Go(_), true)));
        assert!(matches!(gate.enter("t.n", "k"), (Entry::Go(_), true)));
        let waits: Vec<_> = (0..3)
            .map(|_| match gate.enter("t.m", "k") {
                (Entry::Wait(rx), false) => rx,
                _ => panic!("the key is taken (and so warm)"),
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
        // But it ran lately: warm.
        assert!(matches!(gate.enter("t.m", "k"), (Entry::Go(_), false)));
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
