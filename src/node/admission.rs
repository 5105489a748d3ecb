//! Admission of handlers that await: how many each caller connection and each caller
//! address may hold, and the bytes of their requests, so that no caller, however many
//! connections it opens, takes every handler slot or holds unbounded memory.
//!
//! This module owns the counts; the responder asks it before a handler that awaits
//! goes on in a task, and the `Running` guard it returns gives the place back. It never
//! runs a handler and never replies (the responder answers `overloaded`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

/// What one caller (a ROUTER connection, and the address it comes from) may hold in
/// handlers that await; see [`Admission`].
#[derive(Debug, Clone, Copy)]
pub(super) struct AdmitLimits {
    /// Handlers that await, per caller connection.
    pub per_connection: usize,
    /// Handlers that await, per caller address (IPv6: per /64).
    pub per_source: usize,
    /// Request bytes held by handlers that await, all callers together; a quarter of it
    /// per caller address.
    pub bytes: usize,
}

/// Handlers that await, counted per caller connection and per caller address, and the
/// bytes of their requests (per address and in total): so that no caller, however many
/// connections it opens, can take every handler slot, and requests waiting on slow
/// handlers cannot hold unbounded memory. Counted only for handlers that await: one that
/// finishes when first polled holds nothing.
pub(super) struct Admission {
    limits: AdmitLimits,
    /// Handlers that await, all callers; while low enough, no caller can be at a limit
    /// and the maps are not even looked at (the common case costs two atomic loads).
    running: AtomicUsize,
    bytes: AtomicUsize,
    counts: Mutex<Counts>,
    refused: AtomicU64,
}

#[derive(Default)]
struct Counts {
    by_connection: HashMap<Bytes, usize>,
    /// Handlers and request bytes per caller address.
    by_source: HashMap<IpAddr, (usize, usize)>,
}

/// Who a request came from, for [`Admission`]: its ROUTER connection and address.
pub(super) struct Caller {
    pub(super) identity: Bytes,
    pub(super) source: Option<IpAddr>,
}

impl Admission {
    pub(super) fn new(limits: AdmitLimits) -> Self {
        Admission {
            limits,
            running: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            counts: Mutex::new(Counts::default()),
            refused: AtomicU64::new(0),
        }
    }

    /// Counts a request refused for its caller's holdings.
    pub(super) fn refuse(&self) {
        self.refused.fetch_add(1, Relaxed);
    }

    /// Requests refused so far.
    pub(super) fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }

    fn per_source_bytes(&self) -> usize {
        self.limits.bytes / 4
    }

    /// Whether a handler for a request of `len` bytes from `caller` (none: a gather
    /// request on our DEALER) may start. A request larger than a bound is still admitted
    /// when its caller (or everyone) holds nothing, as queues admit one message larger
    /// than their bound.
    pub(super) fn admits(&self, caller: Option<&Caller>, len: usize) -> bool {
        let bytes = self.bytes.load(Relaxed);
        if bytes > 0 && bytes + len > self.limits.bytes {
            return false;
        }
        let Some(caller) = caller else {
            return true;
        };
        let l = &self.limits;
        if self.running.load(Relaxed) < l.per_connection.min(l.per_source)
            && bytes + len <= self.per_source_bytes()
        {
            return true;
        }
        let counts = self.counts.lock();
        let conn = counts.by_connection.get(&caller.identity).copied();
        if conn.unwrap_or(0) >= l.per_connection {
            return false;
        }
        match caller.source.and_then(|s| counts.by_source.get(&s)) {
            Some(&(n, b)) => n < l.per_source && (b == 0 || b + len <= self.per_source_bytes()),
            None => true,
        }
    }

    pub(super) fn started(self: &Arc<Self>, caller: Option<Caller>, len: usize) -> Running {
        self.running.fetch_add(1, Relaxed);
        self.bytes.fetch_add(len, Relaxed);
        if let Some(c) = &caller {
            let mut counts = self.counts.lock();
            *counts.by_connection.entry(c.identity.clone()).or_default() += 1;
            if let Some(s) = c.source {
                let e = counts.by_source.entry(s).or_default();
                e.0 += 1;
                e.1 += len;
            }
        }
        Running {
            counts: self.clone(),
            caller,
            len,
        }
    }
}

/// One handler that awaits, counted against its caller until dropped.
pub(super) struct Running {
    counts: Arc<Admission>,
    caller: Option<Caller>,
    len: usize,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.counts.running.fetch_sub(1, Relaxed);
        self.counts.bytes.fetch_sub(self.len, Relaxed);
        let Some(c) = &self.caller else {
            return;
        };
        let mut counts = self.counts.counts.lock();
        if let Some(n) = counts.by_connection.get_mut(&c.identity) {
            *n -= 1;
            if *n == 0 {
                counts.by_connection.remove(&c.identity);
            }
        }
        if let Some(s) = c.source {
            if let Some(e) = counts.by_source.get_mut(&s) {
                e.0 -= 1;
                e.1 -= self.len;
                if e.0 == 0 {
                    counts.by_source.remove(&s);
                }
            }
        }
    }
}
