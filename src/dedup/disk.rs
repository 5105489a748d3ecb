//! The persistent processed-messages table, in a redb database file.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{DedupError, ProcessedMessages};
use crate::codec::Id;

/// Id → when it was recorded (milliseconds since the Unix epoch).
const PROCESSED: TableDefinition<[u8; 16], u64> = TableDefinition::new("peerwire_processed");
/// (when, id) → nothing: the same ids in the order they were recorded, for expiry.
const BY_TIME: TableDefinition<(u64, [u8; 16]), ()> =
    TableDefinition::new("peerwire_processed_by_time");

/// Expired ids are removed at most this many per record, so one record never stalls on
/// a large backlog; a steady stream of records clears any backlog.
const EXPIRE_BATCH: usize = 64;

fn store(e: impl Into<redb::Error>) -> DedupError {
    DedupError::Store(e.into().to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A processed-messages table on disk (a [redb](https://docs.rs/redb) database): it
/// survives restarts, so a message redelivered after the consumer crashed and came back
/// is still known.
///
/// Each record is a durable commit (fsync). [`DiskTable::process`] puts the handler's
/// own writes (in tables of its own, in the same file) and the id in one commit: either
/// both are there after a crash or neither is, so a message is never half-applied nor
/// applied twice. Ids are kept for `retention` (measured on the wall clock); expired
/// ones are removed a few at a time as new ones are recorded.
///
/// The file holds every id recorded within `retention`: it grows with the rate of
/// messages times the retention (about 60 bytes an id), so choose the retention from
/// how long copies can arrive after the first (the senders' expiry), not "for ever".
/// redb lets one process open a file at a time: a second open of the same file fails
/// with [`DedupError::Store`].
pub struct DiskTable {
    db: Database,
    retention: Duration,
    expired: AtomicU64,
    /// Ids recorded by concurrent callers go into one commit (one fsync for all).
    group: Mutex<Group>,
    committed: Condvar,
}

/// Group commit of [`ProcessedMessages::record`]: a caller that finds no commit running
/// commits the batch being filled (its own id and any that joined it) while later
/// callers fill the next one and wait.
#[derive(Default)]
struct Group {
    /// The batch being filled.
    filling: Option<Arc<Batch>>,
    /// A caller is committing.
    leading: bool,
}

/// The commit in progress: when it ends, the batch has a result and the lead is free.
struct Leading<'a> {
    table: &'a DiskTable,
    batch: Arc<Batch>,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        let _ = self
            .batch
            .result
            .set(Err("the commit panicked".to_string()));
        let mut g = self.table.group.lock().unwrap_or_else(|p| p.into_inner());
        g.leading = false;
        drop(g);
        self.table.committed.notify_all();
    }
}

#[derive(Default)]
struct Batch {
    ids: parking_lot::Mutex<Vec<Id>>,
    /// Set once committed (or failed).
    result: std::sync::OnceLock<Result<(), String>>,
}

/// What [`DiskTable::process`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed<T> {
    /// The handler ran, and its writes and the id were committed together.
    Done(T),
    /// The id was recorded already: the handler did not run.
    Duplicate,
}

/// Why [`DiskTable::process`] failed: nothing was committed either way.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError<E> {
    /// The handler failed: its writes were rolled back and the id not recorded.
    #[error("handler: {0}")]
    Handler(E),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] DedupError),
}

impl DiskTable {
    /// Opens (or creates) the table in the redb file at `path`, keeping ids for
    /// `retention`.
    pub fn open(path: impl AsRef<Path>, retention: Duration) -> Result<Self, DedupError> {
        let path = path.as_ref();
        let db = Database::create(path)
            .map_err(|e| DedupError::Store(format!("opening {}: {e}", path.display())))?;
        // Both tables exist from the start, so readers never find them missing.
        let txn = db.begin_write().map_err(store)?;
        txn.open_table(PROCESSED).map_err(store)?;
        txn.open_table(BY_TIME).map_err(store)?;
        txn.commit().map_err(store)?;
        Ok(DiskTable {
            db,
            retention,
            expired: AtomicU64::new(0),
            group: Mutex::default(),
            committed: Condvar::new(),
        })
    }

    /// Ids removed because their retention passed.
    pub fn expired(&self) -> u64 {
        self.expired.load(Relaxed)
    }

    /// Runs `handler` in a write transaction unless `id` is recorded: the handler makes
    /// its own writes through the transaction (`txn.open_table(...)`), and if it
    /// succeeds they and `id` are committed together. If it fails, everything is rolled
    /// back. Blocking (a durable commit): call it from a blocking thread, or use
    /// [`DiskTable::process_async`].
    ///
    /// Writers are serialised by the database, so two copies of one message processed
    /// at once cannot both run: the second sees the first's commit.
    pub fn process<T, E>(
        &self,
        id: Id,
        handler: impl FnOnce(&WriteTransaction) -> Result<T, E>,
    ) -> Result<Processed<T>, ProcessError<E>> {
        let txn = self.db.begin_write().map_err(store)?;
        if self.recorded(&txn, id)? {
            txn.abort().map_err(store)?;
            return Ok(Processed::Duplicate);
        }
        let out = match handler(&txn) {
            Ok(out) => out,
            Err(e) => {
                txn.abort().map_err(store)?;
                return Err(ProcessError::Handler(e));
            }
        };
        self.insert(&txn, id)?;
        txn.commit().map_err(store)?;
        Ok(Processed::Done(out))
    }

    /// [`DiskTable::process`] on a blocking thread.
    pub async fn process_async<T, E, F>(
        self: &Arc<Self>,
        id: Id,
        handler: F,
    ) -> Result<Processed<T>, ProcessError<E>>
    where
        F: FnOnce(&WriteTransaction) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.process(id, handler))
            .await
            .map_err(|e| DedupError::Store(format!("the table's thread failed: {e}")))?
    }

    fn recorded(&self, txn: &WriteTransaction, id: Id) -> Result<bool, DedupError> {
        self.fresh(&txn.open_table(PROCESSED).map_err(store)?, id)
    }

    /// Whether `table` holds `id`, recorded within the retention.
    fn fresh(&self, table: &impl ReadableTable<[u8; 16], u64>, id: Id) -> Result<bool, DedupError> {
        let at = table
            .get(id.0.into_bytes())
            .map_err(store)?
            .map(|g| g.value());
        Ok(at.is_some_and(|at| !self.is_expired(at, now_ms())))
    }

    /// Records `ids` in one write transaction.
    fn commit(&self, ids: &[Id]) -> Result<(), DedupError> {
        let txn = self.db.begin_write().map_err(store)?;
        for id in ids {
            self.insert(&txn, *id)?;
        }
        txn.commit().map_err(store)
    }

    fn is_expired(&self, at: u64, now: u64) -> bool {
        now.saturating_sub(at) >= self.retention.as_millis() as u64
    }

    /// Records `id` in `txn` and removes a few expired ids.
    fn insert(&self, txn: &WriteTransaction, id: Id) -> Result<(), DedupError> {
        let now = now_ms();
        let key = id.0.into_bytes();
        let mut processed = txn.open_table(PROCESSED).map_err(store)?;
        let mut by_time = txn.open_table(BY_TIME).map_err(store)?;
        // An id recorded and not expired keeps its first time (as in `MemoryTable`); an
        // expired record of it is replaced, its time entry with it.
        let held = processed.get(key).map_err(store)?.map(|g| g.value());
        if let Some(at) = held {
            if !self.is_expired(at, now) {
                return Ok(());
            }
            by_time.remove((at, key)).map_err(store)?;
        }
        processed.insert(key, now).map_err(store)?;
        by_time.insert((now, key), ()).map_err(store)?;
        let cutoff = now.saturating_sub(self.retention.as_millis() as u64);
        let mut gone = 0u64;
        for _ in 0..EXPIRE_BATCH {
            let Some((first, _)) = by_time.first().map_err(store)? else {
                break;
            };
            let (at, old) = first.value();
            drop(first);
            if at >= cutoff || (at, old) == (now, key) {
                break;
            }
            by_time.remove((at, old)).map_err(store)?;
            processed.remove(old).map_err(store)?;
            gone += 1;
        }
        self.expired.fetch_add(gone, Relaxed);
        Ok(())
    }
}

impl ProcessedMessages for DiskTable {
    fn contains(&self, id: Id) -> Result<bool, DedupError> {
        let txn = self.db.begin_read().map_err(store)?;
        self.fresh(&txn.open_table(PROCESSED).map_err(store)?, id)
    }

    fn record(&self, id: Id) -> Result<(), DedupError> {
        let mut g = self.group.lock().unwrap_or_else(|p| p.into_inner());
        let batch = g.filling.get_or_insert_with(Arc::default).clone();
        batch.ids.lock().push(id);
        // Until our batch is committed: commit the filling batch (ours, with whatever
        // joined it) when nobody else is committing, else wait. Each caller commits at
        // most one batch, so none is kept busy committing everyone else's for long.
        while batch.result.get().is_none() {
            if g.leading {
                g = self.committed.wait(g).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let Some(next) = g.filling.take() else {
                break;
            };
            g.leading = true;
            drop(g);
            // Hands the lead back however the commit ends, a panic included (else every
            // later record would wait for ever).
            let lead = Leading {
                table: self,
                batch: next,
            };
            let ids = std::mem::take(&mut *lead.batch.ids.lock());
            let _ = lead
                .batch
                .result
                .set(self.commit(&ids).map_err(|e| e.to_string()));
            drop(lead);
            g = self.group.lock().unwrap_or_else(|p| p.into_inner());
        }
        drop(g);
        match batch.result.get() {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(DedupError::Store(e.clone())),
            None => Err(DedupError::Store(
                "the group commit ended without a result".into(),
            )),
        }
    }

    fn blocks(&self) -> bool {
        true
    }
}
