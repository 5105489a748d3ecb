//! Outgoing bytes of one connection: queued items encoded into frames, written with
//! vectored writes, and accounted for once written; the flush on close (linger); and the
//! [`WriteSide`] that lets a sender write a message itself when the connection has
//! nothing else to write.
//!
//! It never reads from the socket and never decides when a connection ends; it releases
//! the queue's bounds only for items whose last byte was written, so an item cut off by
//! a dropped connection can be handed back.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use std::sync::Arc;

use super::io::{RawWrite, WriteHalf};
use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::time::timeout;

use crate::transport::curve::CurveSealer;
use crate::transport::queue::{shrink_if_empty, Cost, Queue};
use crate::transport::wire::{encode_frame_header, Command, FLAG_MORE};

use super::{OutItem, Shared};

/// Frames at least this large are written straight from the caller's buffer (vectored
/// write) instead of being copied into the connection's staging buffer.
const ZERO_COPY_THRESHOLD: usize = 16 * 1024;
/// Most slices handed to one vectored write.
const MAX_IOV: usize = 64;
/// Largest message a sender writes itself (see [`WriteSide::try_send`]).
const DIRECT_MAX: usize = ZERO_COPY_THRESHOLD;

/// Outgoing bytes of one connection: encoded chunks waiting for the socket, and the items
/// they came from, so that the queue's bounds are released only once an item is written
/// and unwritten items can be handed back when the connection drops.
pub(super) struct Writer {
    pub(super) chunks: VecDeque<Bytes>,
    staging: BytesMut,
    pub(super) inflight: VecDeque<(OutItem, u64)>,
    taken: VecDeque<OutItem>,
    pub(super) appended: u64,
    pub(super) written: u64,
    minor: u8,
    /// With CURVE: boxes every frame and command.
    curve: Option<CurveSealer>,
    /// The last write attempt found the socket full: the next waits for room.
    blocked: bool,
    /// A sender wrote a message itself since the connection's task last looked.
    sent_directly: bool,
}

impl Writer {
    pub(super) fn new(minor: u8, curve: Option<CurveSealer>) -> Self {
        Writer {
            chunks: VecDeque::new(),
            staging: BytesMut::new(),
            inflight: VecDeque::new(),
            taken: VecDeque::new(),
            appended: 0,
            written: 0,
            minor,
            curve,
            blocked: false,
            sent_directly: false,
        }
    }

    pub(super) fn refill(&mut self, q: &Queue<OutItem>) {
        q.take_all(&mut self.taken);
        while let Some(item) = self.taken.pop_front() {
            self.encode(item);
        }
        shrink_if_empty(&mut self.taken);
        self.flush_staging();
    }

    /// Encodes one item behind what is already encoded.
    fn encode(&mut self, item: OutItem) {
        match &item {
            OutItem::Msg(m) => {
                let n = m.frames().len();
                for (i, f) in m.frames().iter().enumerate() {
                    self.frame(if i + 1 < n { FLAG_MORE } else { 0 }, f);
                }
            }
            OutItem::Subscribe(t) | OutItem::Cancel(t) => {
                let sub = matches!(item, OutItem::Subscribe(_));
                if self.minor >= 1 {
                    let c = if sub {
                        Command::Subscribe(t.clone())
                    } else {
                        Command::Cancel(t.clone())
                    };
                    self.command(&c);
                } else {
                    // ZMTP 3.0 form: a one-frame message, first byte 1 or 0.
                    let mut body = BytesMut::with_capacity(1 + t.len());
                    body.put_u8(sub as u8);
                    body.put_slice(t);
                    self.frame(0, &body.freeze());
                }
            }
        }
        self.inflight.push_back((item, self.appended));
    }

    fn frame(&mut self, flags: u8, body: &Bytes) {
        let before = self.staging.len();
        if let Some(c) = &mut self.curve {
            // Boxed in place in the staging buffer: no zero-copy path under CURVE.
            c.seal_frame(&mut self.staging, flags & FLAG_MORE != 0, body);
            self.appended += (self.staging.len() - before) as u64;
            if self.staging.len() >= ZERO_COPY_THRESHOLD {
                self.flush_staging();
            }
            return;
        }
        if self.staging.capacity() - before < 9 + ZERO_COPY_THRESHOLD {
            self.staging.reserve(9 + ZERO_COPY_THRESHOLD);
        }
        encode_frame_header(&mut self.staging, flags, body.len());
        self.appended += (self.staging.len() - before) as u64 + body.len() as u64;
        if body.len() >= ZERO_COPY_THRESHOLD {
            self.flush_staging();
            self.chunks.push_back(body.clone());
        } else {
            self.staging.put_slice(body);
        }
    }

    pub(super) fn command(&mut self, c: &Command) {
        let before = self.staging.len();
        match &mut self.curve {
            Some(s) => s.seal_command(&mut self.staging, c),
            None => c.encode(&mut self.staging),
        }
        self.appended += (self.staging.len() - before) as u64;
    }

    pub(super) fn flush_staging(&mut self) {
        if !self.staging.is_empty() {
            self.chunks.push_back(self.staging.split().freeze());
        }
    }

    /// Accounts for `n` bytes written; returns the cost of the items now fully written.
    pub(super) fn advance(&mut self, mut n: usize) -> (usize, usize) {
        self.written += n as u64;
        while n > 0 {
            let front = self.chunks.front_mut().expect("written bytes were queued");
            if front.len() <= n {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                let _ = front.split_to(n);
                n = 0;
            }
        }
        let mut done = (0, 0);
        while let Some((_, end)) = self.inflight.front() {
            if *end > self.written {
                break;
            }
            let (item, _) = self.inflight.pop_front().expect("front exists");
            let (c, b) = item.cost();
            done.0 += c;
            done.1 += b;
        }
        shrink_if_empty(&mut self.inflight);
        shrink_if_empty(&mut self.chunks);
        done
    }
}

/// Accounts for items fully written: counters and the queue's bounds.
pub(super) fn written(shared: &Shared, out: &Queue<OutItem>, count: usize, bytes: usize) {
    if count > 0 {
        shared.stats.messages_out.fetch_add(count as u64, Relaxed);
    }
    if count > 0 || bytes > 0 {
        out.release(count, bytes);
    }
}

/// A connection's [`Writer`] and the writing half of its stream, shared by the
/// connection's task and the socket's senders.
///
/// The task owns the stream: it reads it, waits for room to write, and ends it. But a
/// message sent while the connection has nothing queued and nothing half-written need
/// not wait for the task to be scheduled: [`WriteSide::try_send`] encodes it and writes
/// what the socket takes right away, from the sender's task, under this lock. What the
/// socket does not take stays in the writer for the task, which is nudged. Either way
/// bytes reach the socket in the order they were encoded, so frames (and CURVE nonces)
/// never interleave, and the queue's bounds count the message until it is written.
///
/// Lock order: this lock, then the queue's. Never held across an `.await`; senders only
/// ever `try_lock` it, so a sender never waits for the task.
#[derive(Default)]
pub(crate) struct WriteSide {
    active: Mutex<Option<Active>>,
}

struct Active {
    w: Writer,
    sock: Arc<dyn RawWrite>,
}

/// A connection's writer in its [`WriteSide`]. Dropped, it takes the writer (and the
/// stream's writing half) back out, so a connection whose task is dropped before it ends
/// (its runtime shutting down) does not leave its stream open in the socket's hands.
pub(super) struct Installed<'a>(&'a WriteSide);

impl Installed<'_> {
    /// The connection ends: senders go back to the queue. Returns the writer (with the
    /// items not completely written).
    pub(super) fn finish(self) -> Option<Writer> {
        self.0.remove()
    }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        self.0.remove();
    }
}

/// What one [`WriteSide::write_now`] did.
pub(super) struct Flushed {
    /// Some bytes were written.
    pub progressed: bool,
    /// Bytes are left for when the socket has room.
    pub pending: bool,
}

impl WriteSide {
    /// The connection's task starts writing through `sock`, until the guard returned
    /// is finished or dropped.
    pub(super) fn install(&self, w: Writer, sock: Arc<dyn RawWrite>) -> Installed<'_> {
        *self.active.lock() = Some(Active { w, sock });
        Installed(self)
    }

    fn remove(&self) -> Option<Writer> {
        self.active.lock().take().map(|a| a.w)
    }

    /// Runs `f` on the writer (installed: the connection's task only).
    pub(super) fn with<R>(&self, f: impl FnOnce(&mut Writer) -> R) -> R {
        f(&mut self.active.lock().as_mut().expect("writer installed").w)
    }

    /// Takes what is queued if nothing is left to write, and writes what the socket
    /// takes now: unless the last attempt found it full and `ready` (the socket said it
    /// has room since) is false.
    pub(super) fn write_now(
        &self,
        shared: &Shared,
        out: &Queue<OutItem>,
        ready: bool,
    ) -> std::io::Result<Flushed> {
        let mut g = self.active.lock();
        let a = g.as_mut().expect("writer installed");
        if ready {
            a.w.blocked = false;
        }
        a.w.sent_directly = false;
        if a.w.chunks.is_empty() {
            a.w.refill(out);
        }
        let progressed = a.flush(shared, out, true)?;
        Ok(Flushed {
            progressed,
            pending: !a.w.chunks.is_empty(),
        })
    }

    /// Writes `item` from the caller's task if the connection is up and has nothing
    /// queued or half-written (and no other task is writing); gives it back otherwise,
    /// to be queued. Fails, also giving it back, where a push to `out` would fail.
    pub(crate) fn try_send(
        &self,
        item: OutItem,
        out: &Queue<OutItem>,
        shared: &Shared,
    ) -> Result<(), OutItem> {
        // Only small messages: the connection's task may wait for this lock (briefly: it
        // is never held across an `.await`), so what is done under it stays short. A
        // large message (and its sealing, under CURVE) goes through the queue.
        let (n, b) = item.cost();
        // Checked again under the lock: this first look keeps a busy queue's senders off it.
        if b > DIRECT_MAX || !out.is_idle_and_open() {
            return Err(item);
        }
        let Some(mut g) = self.active.try_lock() else {
            return Err(item);
        };
        let Some(a) = g.as_mut() else {
            return Err(item);
        };
        // Nothing half-written, so nothing in flight: the queue counts nothing of this
        // connection, and its bounds cannot refuse the item. And only one message between
        // two turns of the task: a sender writing many in a row (a burst, which never
        // lets the task run) queues all but the first, and the task writes them in as
        // few system calls as it can, where one write each would cost a call each.
        if !a.w.chunks.is_empty() || a.w.sent_directly || !out.is_idle_and_open() {
            return Err(item);
        }
        a.w.sent_directly = true;
        a.w.encode(item);
        a.w.flush_staging();
        // A failed write is the task's to notice (its next write fails the same way),
        // like what the socket did not take.
        let _ = a.flush(shared, out, false);
        if a.w.chunks.is_empty() {
            // All written: it was never held, so the queue never counted it.
            shared.stats.messages_out.fetch_add(n as u64, Relaxed);
            return Ok(());
        }
        // What the socket did not take waits for the task, counted as taken from the
        // queue (released as usual once written).
        out.count_taken(n, b);
        out.nudge();
        Ok(())
    }
}

impl Active {
    /// Writes until the writer is empty or the socket full; returns whether any byte was
    /// written. Items completed are accounted for if `counted` (taken from the queue).
    fn flush(
        &mut self,
        shared: &Shared,
        out: &Queue<OutItem>,
        counted: bool,
    ) -> std::io::Result<bool> {
        let mut progressed = false;
        while !self.w.chunks.is_empty() && !self.w.blocked {
            match try_write_chunks(&*self.sock, &self.w.chunks) {
                Ok(n) => {
                    let (c, b) = self.w.advance(n);
                    if counted {
                        written(shared, out, c, b);
                    }
                    progressed = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.w.blocked = true,
                Err(e) => return Err(e),
            }
        }
        Ok(progressed)
    }
}

fn io_slices<'a>(chunks: &'a VecDeque<Bytes>, slices: &mut [IoSlice<'a>; MAX_IOV]) -> usize {
    let mut n = 0;
    for c in chunks.iter().take(MAX_IOV) {
        slices[n] = IoSlice::new(c);
        n += 1;
    }
    n
}

fn try_write_chunks(wr: &dyn RawWrite, chunks: &VecDeque<Bytes>) -> std::io::Result<usize> {
    let w = if chunks.len() == 1 {
        wr.try_write(&chunks[0])?
    } else {
        let mut slices = [IoSlice::new(&[]); MAX_IOV];
        let n = io_slices(chunks, &mut slices);
        wr.try_write_vectored(&slices[..n])?
    };
    if w == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    Ok(w)
}

/// On close, keeps writing what is already queued for at most `linger`. (The stream is
/// shut down for writing when its writing half is dropped, after this.)
pub(super) async fn linger<W: WriteHalf>(
    wr: &W,
    side: &WriteSide,
    shared: &Shared,
    out: &Queue<OutItem>,
    linger: Duration,
) {
    let flush = async {
        let mut ready = false;
        loop {
            match side.write_now(shared, out, ready) {
                Ok(f) if f.pending => {}
                _ => break,
            }
            if wr.writable().await.is_err() {
                break;
            }
            ready = true;
        }
    };
    let _ = timeout(linger, flush).await;
}
