//! The in-memory processed-messages table: bounded, with expiry.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{DedupError, ProcessedMessages};
use crate::codec::Id;

/// A processed-messages table in memory: at most `capacity` ids, each kept for `ttl`.
///
/// Both bounds decide how long after a first delivery a duplicate is still recognised:
/// make `ttl` longer than the longest a sender redelivers (its call's deadline and
/// retries, an outbox's hold) and `capacity` larger than the messages that arrive in
/// `ttl`. When full, the oldest id is forgotten first and counted
/// ([`MemoryTable::evicted`]): a copy of it arriving later would run again. Forgets
/// everything on restart; [`DiskTable`](super::DiskTable) does not.
pub struct MemoryTable {
    capacity: usize,
    ttl: Duration,
    inner: Mutex<Inner>,
    evicted: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// Id → when it was recorded.
    ids: HashMap<Id, Instant>,
    /// The same ids, oldest first (expiry and eviction take from the front).
    order: VecDeque<(Instant, Id)>,
}

impl Inner {
    /// Forgets the ids recorded before `cutoff`.
    fn expire(&mut self, cutoff: Instant) {
        while let Some(&(at, id)) = self.order.front() {
            if at >= cutoff {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&id);
        }
    }
}

impl MemoryTable {
    /// A table of at most `capacity` ids (at least 1), each kept for `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        MemoryTable {
            capacity: capacity.max(1),
            ttl,
            inner: Mutex::default(),
            evicted: AtomicU64::new(0),
        }
    }

    /// Ids forgotten before their time because the table was full.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Relaxed)
    }

    /// Ids held now (expired ones go as new ones are recorded).
    pub fn len(&self) -> usize {
        self.inner.lock().ids.len()
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ProcessedMessages for MemoryTable {
    fn contains(&self, id: Id) -> Result<bool, DedupError> {
        let inner = self.inner.lock();
        Ok(inner.ids.get(&id).is_some_and(|at| at.elapsed() < self.ttl))
    }

    fn record(&self, id: Id) -> Result<(), DedupError> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        if let Some(cutoff) = now.checked_sub(self.ttl) {
            inner.expire(cutoff);
        }
        if inner.ids.contains_key(&id) {
            // Recorded already (within its time): it keeps its first time.
            return Ok(());
        }
        while inner.ids.len() >= self.capacity {
            let Some((_, old)) = inner.order.pop_front() else {
                break;
            };
            inner.ids.remove(&old);
            self.evicted.fetch_add(1, Relaxed);
        }
        inner.ids.insert(id, now);
        inner.order.push_back((now, id));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_oldest_first_and_counted() {
        let t = MemoryTable::new(3, Duration::from_secs(60));
        let ids: Vec<Id> = (0..5).map(|_| Id::new()).collect();
        for id in &ids {
            t.record(*id).unwrap();
        }
        assert_eq!(t.len(), 3);
        assert_eq!(t.evicted(), 2);
        assert!(!t.contains(ids[0]).unwrap() && !t.contains(ids[1]).unwrap());
        assert!(ids[2..].iter().all(|id| t.contains(*id).unwrap()));
        // Recording one held again changes nothing.
        t.record(ids[4]).unwrap();
        assert_eq!((t.len(), t.evicted()), (3, 2));
    }

    #[test]
    fn ids_expire() {
        let t = MemoryTable::new(10, Duration::from_millis(20));
        let id = Id::new();
        t.record(id).unwrap();
        assert!(t.contains(id).unwrap());
        // Past its time to live (the clock must move on; nothing here is timed).
        std::thread::sleep(Duration::from_millis(30));
        assert!(!t.contains(id).unwrap());
        t.record(Id::new()).unwrap();
        assert_eq!(t.len(), 1, "expired ids go as new ones are recorded");
        assert_eq!(t.evicted(), 0, "expiry is not eviction");
    }
}
