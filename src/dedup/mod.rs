//! Duplicate handling on the consumer's side: a processed-messages table and the
//! idempotent consumer built on it.
//!
//! A message can arrive more than once: a caller retries a request on another instance
//! after a lost connection, a notification is redelivered when its consumer was not
//! known to have finished. Every retry and redelivery keeps the message id, so a
//! consumer that records the ids it has processed can recognise a duplicate and skip it.
//!
//! - [`ProcessedMessages`]: the table, behind a small trait: "was this id processed?",
//!   "record it as processed".
//! - [`MemoryTable`]: in memory, bounded, with expiry. Forgets on restart.
//! - [`DiskTable`]: on disk (redb), surviving restarts; [`DiskTable::process`] runs the
//!   handler's own writes and records the id in one commit.
//! - [`Idempotent`]: the consumer's side of the pattern. An id is recorded only once its
//!   handler succeeded; a duplicate arriving while the first copy is still being handled
//!   waits for it (and runs itself if the first failed).
//!
//! This module never sends or receives anything and never touches the node: a handler
//! uses it with its [`Context::message_id`](crate::node::Context::message_id).

mod disk;
mod memory;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::codec::Id;

pub use disk::{DiskTable, ProcessError, Processed};
pub use memory::MemoryTable;

/// What a processed-messages table could not do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DedupError {
    /// The store failed (disk full, a corrupt file, ...): whether the id was processed
    /// is not known, so the message must not be acknowledged as handled.
    #[error("processed-messages table: {0}")]
    Store(String),
}

/// In a handler, a table that failed fails the message (code `dedup_failed`): it was
/// not acknowledged, so its sender sends it again.
impl From<DedupError> for crate::node::HandlerError {
    fn from(e: DedupError) -> Self {
        crate::node::HandlerError::new("dedup_failed", e.to_string())
    }
}

/// A table of the ids of messages already processed. Implementations must be safe to
/// share between tasks; [`Idempotent`] makes sure one id is not handled twice at once
/// through it.
pub trait ProcessedMessages: Send + Sync + 'static {
    /// Whether `id` is recorded as processed (and not expired).
    fn contains(&self, id: Id) -> Result<bool, DedupError>;

    /// Records `id` as processed. Called only once its handler succeeded.
    fn record(&self, id: Id) -> Result<(), DedupError>;

    /// Whether calls may block (on disk, say): [`Idempotent`] then makes them on a
    /// blocking thread rather than on the runtime's.
    fn blocks(&self) -> bool {
        false
    }
}

/// What [`Idempotent::run`] did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// Its handler ran and succeeded, and its id is now recorded.
    Processed(T),
    /// Its id was already recorded: the handler did not run.
    Duplicate,
}

/// An idempotent consumer: runs a message's handler only if its id is not recorded as
/// processed, and records it once the handler succeeds.
///
/// ```no_run
/// # use std::time::Duration;
/// # use peerwire::dedup::{Idempotent, MemoryTable, Outcome};
/// # use peerwire::{Context, HandlerError, Node};
/// # fn f(node: &Node) {
/// let seen = Idempotent::new(MemoryTable::new(100_000, Duration::from_secs(3600)));
/// node.handle("orders.ship", peerwire::Version::new(1, 0), move |order: u64, ctx: Context| {
///     let seen = seen.clone();
///     async move {
///         match seen.run(ctx.message_id, || async { /* ship it */ Ok::<_, HandlerError>(()) }).await? {
///             Outcome::Processed(()) | Outcome::Duplicate => Ok(()),
///         }
///     }
/// });
/// # }
/// ```
///
/// Cheap to clone (clones share the table). While a message is being handled, another
/// copy of it (a redelivery that overtook it) waits for the first: if the first
/// succeeds the copy is a [`Outcome::Duplicate`]; if it fails the copy runs. Only ids
/// being handled right now are held beside the table, so what this holds is bounded by
/// how many handlers run at once.
pub struct Idempotent<S> {
    table: Arc<S>,
    running: Arc<Mutex<HashMap<Id, watch::Receiver<()>>>>,
}

impl<S> Clone for Idempotent<S> {
    fn clone(&self) -> Self {
        Idempotent {
            table: self.table.clone(),
            running: self.running.clone(),
        }
    }
}

/// The right to handle one id, held while its handler runs; dropping it lets a waiting
/// copy go on.
struct Claim {
    id: Id,
    running: Arc<Mutex<HashMap<Id, watch::Receiver<()>>>>,
    // Dropped with the claim: waiters see the channel close.
    _done: watch::Sender<()>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.running.lock().remove(&self.id);
    }
}

impl<S: ProcessedMessages> Idempotent<S> {
    /// An idempotent consumer over `table`.
    pub fn new(table: S) -> Self {
        Idempotent {
            table: Arc::new(table),
            running: Arc::default(),
        }
    }

    /// The table.
    pub fn table(&self) -> &S {
        &self.table
    }

    /// Runs `handler` for the message `id` unless it was processed already, and records
    /// `id` once it succeeds. A handler error is returned as it is and nothing is
    /// recorded (a redelivery runs it again); so is a table error, converted with
    /// `From<DedupError>`. If the handler succeeded but recording failed, the error is
    /// returned: the message was handled, but its next copy will not be known as a
    /// duplicate, so the caller must not acknowledge it as if all were well.
    pub async fn run<T, E, F, Fut>(&self, id: Id, handler: F) -> Result<Outcome<T>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<DedupError>,
    {
        let _claim = self.claim(id).await;
        if self.call(id, |t, id| t.contains(id)).await? {
            return Ok(Outcome::Duplicate);
        }
        let out = handler().await?;
        self.call(id, |t, id| t.record(id)).await?;
        Ok(Outcome::Processed(out))
    }

    /// Waits until no other copy of `id` is being handled, then claims it.
    async fn claim(&self, id: Id) -> Claim {
        loop {
            let mut wait = {
                let mut running = self.running.lock();
                match running.get(&id) {
                    Some(rx) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(());
                        running.insert(id, rx);
                        return Claim {
                            id,
                            running: self.running.clone(),
                            _done: tx,
                        };
                    }
                }
            };
            // Nothing is ever sent: this returns when the claim's holder drops it.
            let _ = wait.changed().await;
        }
    }

    async fn call<R: Send + 'static>(
        &self,
        id: Id,
        f: fn(&S, Id) -> Result<R, DedupError>,
    ) -> Result<R, DedupError> {
        if !self.table.blocks() {
            return f(&self.table, id);
        }
        let table = self.table.clone();
        tokio::task::spawn_blocking(move || f(&table, id))
            .await
            .map_err(|e| DedupError::Store(format!("the table's thread failed: {e}")))?
    }
}
