//! Bulkheads: a bound on the requests a node has in flight to one service, so that a
//! slow service cannot take every task, connection slot and pending-call entry the node
//! has, and calls to other services keep going. Past the bound a call waits in a bounded
//! queue (for at most its own deadline), or fails at once when the queue is full or has
//! no room at all (`max_waiting: 0`).
//!
//! This module owns the per-service semaphores and the waiting counts; the pipeline asks
//! it at admission, and the permit lives with the pending call until the call ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::breaker::service_of;
use super::CallError;

/// How many requests to one service may be in flight, and how many may wait for a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BulkheadConfig {
    /// Requests to the service awaiting their reply at once.
    pub max_concurrent: usize,
    /// Calls waiting for one of those places; past it (or with 0) a call fails at once
    /// with [`CallError::BulkheadFull`].
    pub max_waiting: usize,
}

impl BulkheadConfig {
    /// At most `max_concurrent` in flight, and `max_waiting` waiting.
    pub fn new(max_concurrent: usize, max_waiting: usize) -> Self {
        BulkheadConfig {
            max_concurrent: max_concurrent.max(1),
            max_waiting,
        }
    }
}

struct Bulkhead {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// Most services with a bulkhead of their own made on first use (the per-service
/// settings given to the builder are always kept).
const MAX_BULKHEADS: usize = 4096;

/// The node's bulkheads. See the [module documentation](self).
#[derive(Default)]
pub(super) struct Bulkheads {
    /// Applied to every service without a setting of its own; `None`: no bound.
    default: Option<BulkheadConfig>,
    per_service: HashMap<String, BulkheadConfig>,
    live: Mutex<HashMap<Arc<str>, Arc<Bulkhead>>>,
    rejected: AtomicU64,
}

impl Bulkheads {
    pub fn new(
        default: Option<BulkheadConfig>,
        per_service: HashMap<String, BulkheadConfig>,
    ) -> Self {
        Bulkheads {
            default,
            per_service,
            ..Default::default()
        }
    }

    /// Calls refused by a full bulkhead.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Relaxed)
    }

    fn bulkhead(&self, service: &str) -> Option<Arc<Bulkhead>> {
        let config = self.per_service.get(service).copied().or(self.default)?;
        let mut live = self.live.lock();
        if let Some(b) = live.get(service) {
            return Some(b.clone());
        }
        if live.len() >= MAX_BULKHEADS {
            // Forget the idle ones (no permit out: each holds the semaphore; nobody
            // waiting): nothing is lost but their empty state.
            live.retain(|_, b| Arc::strong_count(&b.slots) > 1 || b.waiting.load(Relaxed) > 0);
        }
        let b = Arc::new(Bulkhead {
            slots: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            waiting: AtomicUsize::new(0),
            max_waiting: config.max_waiting,
        });
        live.insert(Arc::from(service), b.clone());
        Some(b)
    }

    /// A place for a request to `target` (held until the call ends), waiting in the
    /// bounded queue until `deadline` at most (not at all if `fail_fast`); `Ok(None)`
    /// when the service has no bound.
    pub async fn admit(
        &self,
        target: &str,
        deadline: Instant,
        fail_fast: bool,
    ) -> Result<Option<OwnedSemaphorePermit>, CallError> {
        let service = service_of(target);
        let Some(b) = self.bulkhead(service) else {
            return Ok(None);
        };
        if let Ok(p) = b.slots.clone().try_acquire_owned() {
            return Ok(Some(p));
        }
        let full = || CallError::BulkheadFull(service.to_string());
        // Claim a place in the queue, or fail at once.
        if fail_fast
            || b.waiting
                .fetch_update(Relaxed, Relaxed, |w| (w < b.max_waiting).then_some(w + 1))
                .is_err()
        {
            self.rejected.fetch_add(1, Relaxed);
            return Err(full());
        }
        let got = tokio::time::timeout_at(deadline, b.slots.clone().acquire_owned()).await;
        b.waiting.fetch_sub(1, Relaxed);
        match got {
            Ok(Ok(p)) => Ok(Some(p)),
            Ok(Err(_)) => Err(CallError::Shutdown),
            Err(_) => {
                self.rejected.fetch_add(1, Relaxed);
                Err(full())
            }
        }
    }
}
