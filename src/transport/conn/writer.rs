//! Outgoing bytes of one connection: queued items encoded into frames, written with
//! vectored writes, and accounted for once written; and the flush on close (linger).
//!
//! It never reads from the socket and never decides when a connection ends; it releases
//! the queue's bounds only for items whose last byte was written, so an item cut off by
//! a dropped connection can be handed back.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::io::WriteHalf;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;

use crate::transport::curve::CurveSealer;
use crate::transport::queue::{shrink_if_empty, Cost, Queue};
use crate::transport::wire::{encode_frame_header, Command, FLAG_MORE};

use super::{Attached, OutItem, Shared};

/// Frames at least this large are written straight from the caller's buffer (vectored
/// write) instead of being copied into the connection's staging buffer.
const ZERO_COPY_THRESHOLD: usize = 16 * 1024;
/// Most slices handed to one vectored write.
const MAX_IOV: usize = 64;

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
        }
    }

    pub(super) fn refill(&mut self, q: &Queue<OutItem>) {
        q.take_all(&mut self.taken);
        while let Some(item) = self.taken.pop_front() {
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
        shrink_if_empty(&mut self.taken);
        self.flush_staging();
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
pub(super) fn written(shared: &Shared, att: &Attached, count: usize, bytes: usize) {
    if count > 0 {
        shared.stats.messages_out.fetch_add(count as u64, Relaxed);
    }
    if count > 0 || bytes > 0 {
        att.out.release(count, bytes);
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

pub(super) fn try_write_chunks(
    wr: &impl WriteHalf,
    chunks: &VecDeque<Bytes>,
) -> std::io::Result<usize> {
    let mut slices = [IoSlice::new(&[]); MAX_IOV];
    let n = io_slices(chunks, &mut slices);
    let w = wr.try_write_vectored(&slices[..n])?;
    if w == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    Ok(w)
}

pub(super) async fn write_chunks<W: WriteHalf + Unpin>(
    wr: &mut W,
    chunks: &VecDeque<Bytes>,
) -> std::io::Result<usize> {
    let mut slices = [IoSlice::new(&[]); MAX_IOV];
    let n = io_slices(chunks, &mut slices);
    let w = wr.write_vectored(&slices[..n]).await?;
    if w == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    Ok(w)
}

/// On close, keeps writing what is already queued for at most `linger`.
pub(super) async fn linger<W: WriteHalf + Unpin>(
    wr: &mut W,
    w: &mut Writer,
    att: &Attached,
    linger: Duration,
) {
    let flush = async {
        loop {
            if w.chunks.is_empty() {
                w.refill(&att.out);
            }
            if w.chunks.is_empty() {
                break;
            }
            match write_chunks(wr, &w.chunks).await {
                Ok(n) => {
                    let (c, b) = w.advance(n);
                    att.out.release(c, b);
                }
                Err(_) => break,
            }
        }
        let _ = wr.shutdown().await;
    };
    let _ = timeout(linger, flush).await;
}
