//! A queue bounded both in items and in bytes, shared between tasks.
//!
//! Used for every outgoing queue (one per connection, or one per DEALER so that it
//! survives reconnection) and for each socket's incoming queue. The mutex is a
//! `parking_lot` one held only for a push or a pop, never across an `.await`;
//! waiting happens on [`Notify`]s.
//!
//! Items taken by a writer with [`Queue::take_all`] stay counted until the writer calls
//! [`Queue::release`] once they are on the wire, so the bound covers bytes the connection
//! task holds as well as bytes still in the queue; unwritten items can be put back in
//! front with [`Queue::requeue_front`] when a connection drops.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// Largest capacity an empty `VecDeque` of a connection keeps. A burst can grow a queue
/// to its item bound (100 000 by default); kept after it drains, that capacity would be
/// megabytes per connection that no byte budget counts, and a peer could leave it behind
/// on every connection in turn. Past this, an emptied queue gives its memory back.
pub(crate) const KEEP_CAPACITY: usize = 256;

/// Frees an empty deque's buffer if it is larger than [`KEEP_CAPACITY`].
pub(crate) fn shrink_if_empty<T>(v: &mut VecDeque<T>) {
    if v.is_empty() && v.capacity() > KEEP_CAPACITY {
        *v = VecDeque::new();
    }
}

/// The cost of one item against the queue's bounds.
pub(crate) trait Cost {
    /// `(items, bytes)` this item counts for. Control items count for `(0, 0)`.
    fn cost(&self) -> (usize, usize);
}

struct State<T> {
    items: VecDeque<T>,
    count: usize,
    bytes: usize,
    closed: bool,
}

/// A byte budget shared by several queues (the connections of one listening socket): a
/// push fails once the queues together hold the budget, as it does at a queue's own
/// bound, so that many connections' bounds cannot add up to an unbounded total.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    pub fn new(max: usize) -> Self {
        Budget {
            used: AtomicUsize::new(0),
            max,
        }
    }

    /// Bytes held now by the queues sharing it.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// The queue. See the module documentation.
pub(crate) struct Queue<T> {
    state: Mutex<State<T>>,
    max_items: usize,
    max_bytes: usize,
    /// A total this queue shares with others, if any.
    budget: Option<std::sync::Arc<Budget>>,
    /// Signalled when an item is pushed, for consumers using [`Queue::pop`].
    readable: Notify,
    /// The waker of the single consumer using [`Queue::poll_readable`] (a connection
    /// task). Cheaper than registering with `readable` on every turn of its loop.
    consumer: AtomicWaker,
    /// Signalled (all waiters) when room is made or the queue closes.
    writable: Notify,
    /// Tasks inside [`Queue::writable`]. `notify_waiters` takes a lock every time, so it
    /// is skipped when nobody waits: the common case on the hot path.
    writers_waiting: AtomicUsize,
    /// Set by [`Queue::interrupt`]: the consumer should stop (its connection is closing).
    interrupted: AtomicBool,
    /// Set by [`Queue::tick`]: the consumer's periodic heartbeat work is due.
    ticked: AtomicBool,
    /// Set by [`Queue::nudge`]: the consumer should look again at its own state.
    nudged: AtomicBool,
    /// Mirrors `closed`, for lock-free checks.
    closed: AtomicBool,
    /// A task is waiting in [`Queue::pop`] on the `AtomicWaker`.
    solo_waiting: AtomicBool,
    /// Whether `items` is non-empty, mirrored outside the lock (written under it) so the
    /// connection task's poll does not take the lock when nothing is queued.
    has_items: AtomicBool,
}

/// Counts at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    pub count: usize,
    pub bytes: usize,
    /// A push failed because the shared budget, not this queue's bound, is spent.
    pub over_budget: bool,
}

impl<T: Cost> Queue<T> {
    pub fn new(max_items: usize, max_bytes: usize) -> Self {
        Self::build(max_items, max_bytes, None)
    }

    /// A queue whose bytes also count against `budget`.
    pub fn with_budget(max_items: usize, max_bytes: usize, budget: std::sync::Arc<Budget>) -> Self {
        Self::build(max_items, max_bytes, Some(budget))
    }

    fn build(max_items: usize, max_bytes: usize, budget: Option<std::sync::Arc<Budget>>) -> Self {
        Queue {
            budget,
            state: Mutex::new(State {
                items: VecDeque::new(),
                count: 0,
                bytes: 0,
                closed: false,
            }),
            max_items,
            max_bytes,
            readable: Notify::new(),
            consumer: AtomicWaker::new(),
            writable: Notify::new(),
            writers_waiting: AtomicUsize::new(0),
            interrupted: AtomicBool::new(false),
            has_items: AtomicBool::new(false),
            ticked: AtomicBool::new(false),
            nudged: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            solo_waiting: AtomicBool::new(false),
        }
    }

    fn wake_consumer(&self) {
        self.consumer.wake();
        self.readable.notify_one();
    }

    /// For the queue's single polling consumer (a connection task): ready when the queue
    /// was interrupted, or, if `want_items`, when it holds at least one item. Checking an
    /// atomic here is what lets a connection loop notice that it must close without
    /// polling a cancellation token on every turn.
    pub fn poll_readable(&self, cx: &mut Context<'_>, want_items: bool) -> Poll<()> {
        self.consumer.register(cx.waker());
        if self.is_interrupted()
            || self.ticked.load(Ordering::Relaxed)
            || (want_items && self.has_items.load(Ordering::Acquire))
            || (self.nudged.load(Ordering::Relaxed) && self.nudged.swap(false, Ordering::AcqRel))
        {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Tells the consumer to stop, and wakes it.
    /// Returns whether this call interrupted it (false if it already was).
    pub fn interrupt(&self) -> bool {
        let first = !self.interrupted.swap(true, Ordering::SeqCst);
        self.consumer.wake();
        first
    }

    /// Tells the consumer its periodic work is due, and wakes it. One timer per socket
    /// does this for every connection, which is far cheaper than each connection
    /// polling a timer of its own on every turn of its loop.
    pub fn tick(&self) {
        self.ticked.store(true, Ordering::Relaxed);
        self.consumer.wake();
    }

    /// Wakes the consumer so that it looks again at state kept outside the queue (a
    /// connection's writer, which a sender left with bytes the socket did not take).
    pub fn nudge(&self) {
        self.nudged.store(true, Ordering::Release);
        self.consumer.wake();
    }

    /// Whether [`Queue::tick`] was called since the last call; clears the flag.
    pub fn take_tick(&self) -> bool {
        self.ticked.load(Ordering::Relaxed) && self.ticked.swap(false, Ordering::Relaxed)
    }

    /// Whether [`Queue::interrupt`] was called.
    pub fn is_interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }

    /// Pushes while the queue holds fewer than its item bound and fewer bytes than its
    /// byte bound; gives the item back otherwise. The byte bound is soft by one item (as
    /// ZeroMQ's high-water marks are): queued bytes never exceed the bound plus one
    /// message, and a message larger than the whole bound can still be sent alone. This
    /// is exactly the condition [`Queue::writable`] waits for, so a waiter never spins.
    pub fn try_push(&self, item: T) -> Result<(), (T, Usage)> {
        let (n, b) = item.cost();
        {
            let mut s = self.state.lock();
            let fits = n == 0 || (s.count < self.max_items && s.bytes < self.max_bytes);
            let over_budget = n > 0 && self.budget_spent();
            if s.closed || !fits || over_budget {
                let u = Usage {
                    count: s.count,
                    bytes: s.bytes,
                    over_budget: fits && over_budget,
                };
                return Err((item, u));
            }
            s.count += n;
            s.bytes += b;
            self.charge(b);
            s.items.push_back(item);
            self.has_items.store(true, Ordering::Release);
        }
        self.wake_consumer();
        Ok(())
    }

    /// Whether a push may succeed, judged without the lock: the queue is not closed,
    /// holds no item, and the budget it shares (if any) is not spent. A sender that
    /// writes a message itself (see `conn::WriteSide`) asks this first, so it never
    /// sends what a push would have refused.
    pub fn is_idle_and_open(&self) -> bool {
        // (Zero bounds refuse every push: nothing may bypass them either.)
        self.max_items > 0
            && self.max_bytes > 0
            && !self.has_items.load(Ordering::Acquire)
            && !self.closed.load(Ordering::Acquire)
            && !self.budget_spent()
    }

    /// Whether the budget this queue shares, if any, is spent (a push of a counted item
    /// fails then).
    fn budget_spent(&self) -> bool {
        self.budget
            .as_ref()
            .is_some_and(|g| g.used.load(Ordering::Relaxed) >= g.max)
    }

    /// Counts an item of cost `(n, b)` that bypassed the queue (its sender wrote part of
    /// it itself and left the rest to the connection's writer) as if it had been taken
    /// with [`Queue::take_all`]; [`Queue::release`] gives it back once written.
    pub fn count_taken(&self, n: usize, b: usize) {
        let mut s = self.state.lock();
        s.count += n;
        s.bytes += b;
        self.charge(b);
    }

    /// Pushes regardless of the bounds (control items such as subscriptions).
    pub fn push_unbounded(&self, item: T) {
        let (n, b) = item.cost();
        {
            let mut s = self.state.lock();
            s.count += n;
            s.bytes += b;
            self.charge(b);
            s.items.push_back(item);
            self.has_items.store(true, Ordering::Release);
        }
        self.wake_consumer();
    }

    /// Pushes in front of everything queued, regardless of the bounds: a message that
    /// must open a connection (a DEALER's first message), ahead of what waited for one.
    pub fn push_front_unbounded(&self, item: T) {
        let (n, b) = item.cost();
        {
            let mut s = self.state.lock();
            s.count += n;
            s.bytes += b;
            self.charge(b);
            s.items.push_front(item);
            self.has_items.store(true, Ordering::Release);
        }
        self.wake_consumer();
    }

    fn charge(&self, bytes: usize) {
        if let Some(g) = &self.budget {
            g.used.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    fn refund(&self, bytes: usize) {
        if let Some(g) = &self.budget {
            g.used.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Returns when the queue has room for at least one more item, is closed, or
    /// [`Queue::wake_writers`] was called. Callers re-check their own conditions after.
    pub async fn writable(&self) {
        self.writable_unless(|| false).await
    }

    /// [`Queue::writable`], also returning at once if `stop()` holds. `stop` is checked
    /// after the wake-up is registered, so a condition changed together with a
    /// [`Queue::wake_writers`] call is never missed.
    pub async fn writable_unless(&self, stop: impl Fn() -> bool) {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let notified = self.writable.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Registered before the check below, so a release that the check misses sees us.
        self.writers_waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.writers_waiting);
        if stop() {
            return;
        }
        {
            let s = self.state.lock();
            if s.closed || (s.count < self.max_items && s.bytes < self.max_bytes) {
                return;
            }
        }
        notified.await;
    }

    fn notify_writers(&self) {
        if self.writers_waiting.load(Ordering::SeqCst) > 0 {
            self.writable.notify_waiters();
        }
    }

    /// Wakes every task waiting in [`Queue::writable`] so it re-checks its conditions.
    pub fn wake_writers(&self) {
        self.writable.notify_waiters();
    }

    /// Waits until there is at least one item (or the queue is closed).
    pub async fn readable(&self) {
        loop {
            let notified = self.readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.state.lock();
                if s.closed || !s.items.is_empty() {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Pops the first item, releasing its cost.
    pub fn try_pop(&self) -> Option<T> {
        let item = {
            let mut s = self.state.lock();
            let item = s.items.pop_front()?;
            self.has_items.store(!s.items.is_empty(), Ordering::Release);
            shrink_if_empty(&mut s.items);
            let (n, b) = item.cost();
            s.count -= n;
            s.bytes -= b;
            self.refund(b);
            if !s.items.is_empty() {
                // Chain the wake-up so a second consumer is not left waiting.
                self.readable.notify_one();
            }
            item
        };
        self.notify_writers();
        Some(item)
    }

    /// Waits for and pops the next item; `None` once closed and empty.
    ///
    /// The usual case, one task receiving, waits on the queue's `AtomicWaker` (cheap);
    /// further concurrent receivers wait on the `Notify`. Every push wakes both.
    pub async fn pop(&self) -> Option<T> {
        struct Solo<'a>(&'a AtomicBool);
        impl Drop for Solo<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        loop {
            if let Some(item) = self.try_pop() {
                return Some(item);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            if self
                .solo_waiting
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let _solo = Solo(&self.solo_waiting);
                std::future::poll_fn(|cx| {
                    self.consumer.register(cx.waker());
                    if self.has_items.load(Ordering::Acquire) || self.closed.load(Ordering::Acquire)
                    {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                })
                .await;
            } else {
                self.readable().await;
            }
        }
    }

    /// Moves every item into `out` without releasing their cost (see [`Queue::release`]).
    pub fn take_all(&self, out: &mut VecDeque<T>) {
        if !self.has_items.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.state.lock();
        out.extend(s.items.drain(..));
        self.has_items.store(false, Ordering::Release);
        shrink_if_empty(&mut s.items);
    }

    /// Releases the cost of items taken with [`Queue::take_all`] once they are written.
    pub fn release(&self, count: usize, bytes: usize) {
        {
            let mut s = self.state.lock();
            s.count -= count;
            s.bytes -= bytes;
            self.refund(bytes);
        }
        self.notify_writers();
    }

    /// Puts items taken with [`Queue::take_all`] back in front, in order.
    pub fn requeue_front(&self, items: impl DoubleEndedIterator<Item = T>) {
        let mut s = self.state.lock();
        let mut any = false;
        for item in items.rev() {
            s.items.push_front(item);
            any = true;
        }
        if any {
            self.has_items.store(true, Ordering::Release);
        }
        drop(s);
        if any {
            self.wake_consumer();
        }
    }

    /// Closes the queue: pushes fail, and waiters wake up.
    pub fn close(&self) {
        self.state.lock().closed = true;
        self.closed.store(true, Ordering::Release);
        self.readable.notify_waiters();
        self.wake_consumer();
        self.writable.notify_waiters();
    }

    /// Current counts (including items a writer holds).
    pub fn usage(&self) -> Usage {
        let s = self.state.lock();
        Usage {
            count: s.count,
            bytes: s.bytes,
            over_budget: false,
        }
    }

    /// Removes everything, releasing its cost; returns how many counted items were dropped.
    pub fn clear(&self) -> usize {
        let dropped = {
            let mut s = self.state.lock();
            let n: usize = s.items.iter().map(|i| i.cost().0).sum();
            let b: usize = s.items.iter().map(|i| i.cost().1).sum();
            s.items = VecDeque::new();
            self.has_items.store(false, Ordering::Release);
            s.count -= n;
            s.bytes -= b;
            self.refund(b);
            n
        };
        self.notify_writers();
        dropped
    }
}

impl<T> Drop for Queue<T> {
    fn drop(&mut self) {
        // What is still counted here (queued, or taken and never released) goes back to
        // the shared budget with the queue.
        if let Some(g) = &self.budget {
            g.used
                .fetch_sub(self.state.get_mut().bytes, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
