//! The outbox's log on disk (redb): every message given is written before `deliver`
//! returns, and removed once acknowledged or given up, so what a node had not delivered
//! when it stopped (or crashed) is delivered after it starts again.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::Message;
use crate::node::{CallError, NodeError};

/// Sequence number → the message (MessagePack).
const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("peerwire_outbox");

fn err(what: &str, e: impl Into<redb::Error>) -> String {
    format!("outbox on disk: {what}: {}", e.into())
}

/// The messages a log holds, in the order given (none if it has no table yet). A message
/// that does not decode (a file from an incompatible version, say) is skipped and
/// logged, not fatal.
fn rows(txn: &redb::ReadTransaction) -> Result<Vec<(u64, Message)>, NodeError> {
    let config = |e: String| NodeError::Config(e);
    let table = match txn.open_table(MESSAGES) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(config(err("table", e))),
    };
    let mut out = Vec::new();
    for row in table.iter().map_err(|e| config(err("read", e)))? {
        let (seq, bytes) = row.map_err(|e| config(err("read", e)))?;
        match rmp_serde::from_slice::<Message>(bytes.value()) {
            Ok(m) => out.push((seq.value(), m)),
            Err(e) => tracing::warn!(
                seq = seq.value(),
                "outbox on disk: a message that does not decode is skipped: {e}"
            ),
        }
    }
    Ok(out)
}

pub(super) struct DiskLog {
    /// Taken at shutdown ([`DiskLog::close`]), which closes the file.
    db: Mutex<Option<Arc<Database>>>,
    /// Acknowledged messages not yet removed from the file: removed together, a few times
    /// a second (a crash before that only redelivers them).
    removals: Mutex<Vec<u64>>,
}

impl DiskLog {
    /// Opens (or creates) the log at `path`; the messages it holds, in the order given.
    pub(super) fn open(path: &Path) -> Result<(DiskLog, Vec<(u64, Message)>), NodeError> {
        let config = |e: String| NodeError::Config(e);
        let db = Database::create(path)
            .map_err(|e| config(format!("opening the outbox at {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(|e| config(err("begin", e)))?;
        txn.open_table(MESSAGES)
            .map_err(|e| config(err("table", e)))?;
        txn.commit().map_err(|e| config(err("commit", e)))?;
        let kept = rows(&db.begin_read().map_err(|e| config(err("read", e)))?)?;
        Ok((
            DiskLog {
                db: Mutex::new(Some(Arc::new(db))),
                removals: Mutex::new(Vec::new()),
            },
            kept,
        ))
    }

    /// The messages in the file at `path`, read-only (refused while a node has it open).
    pub(super) fn read(path: &Path) -> Result<Vec<(u64, Message)>, NodeError> {
        let config = |e: String| NodeError::Config(e);
        let db = redb::ReadOnlyDatabase::open(path).map_err(|e| {
            let hint = match e {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    " (a node has it open: it must stop first)"
                }
                _ => "",
            };
            config(format!(
                "reading the outbox at {}: {e}{hint}",
                path.display()
            ))
        })?;
        rows(&db.begin_read().map_err(|e| config(err("read", e)))?)
    }

    /// Writes `msg` (a durable commit, on a blocking thread), with any removals due.
    pub(super) async fn add(&self, seq: u64, msg: &Message) -> Result<(), CallError> {
        let bytes = rmp_serde::to_vec_named(msg)
            .map_err(|e| CallError::Outbox(format!("encoding the message: {e}")))?;
        let db = self.db.lock().clone().ok_or(CallError::Shutdown)?;
        let removals = std::mem::take(&mut *self.removals.lock());
        let removals_back = removals.clone();
        let written = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let txn = db.begin_write().map_err(|e| err("begin", e))?;
            {
                let mut t = txn.open_table(MESSAGES).map_err(|e| err("table", e))?;
                t.insert(seq, bytes.as_slice())
                    .map_err(|e| err("insert", e))?;
                for r in &removals {
                    t.remove(r).map_err(|e| err("remove", e))?;
                }
            }
            txn.commit().map_err(|e| err("commit", e))
        })
        .await
        .map_err(|e| CallError::Outbox(format!("outbox on disk: the writer failed: {e}")))
        .and_then(|w| w.map_err(CallError::Outbox));
        if written.is_err() {
            // Not removed after all: kept for the next write.
            self.removals.lock().extend(removals_back);
        }
        written
    }

    /// Marks `seq` for removal (done by the next `flush` or `add`).
    pub(super) fn remove(&self, seq: u64) {
        self.removals.lock().push(seq);
    }

    pub(super) fn removals_pending(&self) -> bool {
        !self.removals.lock().is_empty()
    }

    /// Removes what was marked, in one commit (blocking: call off the runtime).
    pub(super) fn flush_blocking(db: &Database, removals: &[u64]) -> Result<(), String> {
        let txn = db.begin_write().map_err(|e| err("begin", e))?;
        {
            let mut t = txn.open_table(MESSAGES).map_err(|e| err("table", e))?;
            for r in removals {
                t.remove(r).map_err(|e| err("remove", e))?;
            }
        }
        txn.commit().map_err(|e| err("commit", e))
    }

    /// Removes what was marked, on a blocking thread. A failure is logged and the
    /// removals kept for the next try.
    pub(super) async fn flush(&self) {
        let removals = std::mem::take(&mut *self.removals.lock());
        if removals.is_empty() {
            return;
        }
        let Some(db) = self.db.lock().clone() else {
            return;
        };
        let r = removals.clone();
        let done = tokio::task::spawn_blocking(move || Self::flush_blocking(&db, &r)).await;
        if let Err(e) = done.map_err(|e| e.to_string()).and_then(|r| r) {
            tracing::warn!(
                "outbox on disk: removing delivered messages failed (kept for the next try): {e}"
            );
            self.removals.lock().extend(removals);
        }
    }

    /// At shutdown: what was marked is removed, and the file closed once the writes
    /// still running on blocking threads are done (so the next start, in this process or
    /// another, can open it at once).
    pub(super) async fn close(&self) {
        let Some(mut db) = self.db.lock().take() else {
            return;
        };
        // A write still running holds a reference: wait for it (writes take milliseconds;
        // bounded all the same).
        for _ in 0..1000 {
            match Arc::try_unwrap(db) {
                Ok(only) => {
                    let removals = std::mem::take(&mut *self.removals.lock());
                    let flushed =
                        tokio::task::spawn_blocking(move || Self::flush_blocking(&only, &removals))
                            .await;
                    if let Err(e) = flushed.map_err(|e| e.to_string()).and_then(|r| r) {
                        tracing::warn!("outbox on disk: removing delivered messages at shutdown failed (they will be delivered again): {e}");
                    }
                    return;
                }
                Err(shared) => db = shared,
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tracing::warn!("outbox on disk: a write did not finish within a second of shutdown; the file stays open until it does");
    }
}

impl Drop for DiskLog {
    /// A node dropped without `shutdown` still removes what was acknowledged (rather
    /// than deliver it again after the next start). This commits on the dropping thread
    /// (a fraction of a millisecond; `shutdown` does it on a blocking thread instead).
    fn drop(&mut self) {
        let removals = std::mem::take(&mut *self.removals.lock());
        if let (Some(db), false) = (self.db.lock().take(), removals.is_empty()) {
            if let Err(e) = Self::flush_blocking(&db, &removals) {
                tracing::warn!("outbox on disk: removing delivered messages failed (they will be delivered again): {e}");
            }
        }
    }
}
