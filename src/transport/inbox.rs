//! The incoming side of a socket with many connections (ROUTER, SUB): one lane per
//! connection, served in turn, so that a connection sending fast cannot make the others'
//! messages wait behind its own.
//!
//! A single FIFO shared by every connection lets one peer that keeps it full push
//! everybody else's messages to the back: with a deep queue, a request from another peer
//! waits for all the flooder's messages ahead of it. Here each connection appends to its
//! own lane, and [`Inbox::pop`] takes one message from each lane that has any, in turn
//! (round robin). A message from a quiet peer therefore waits for at most one message of
//! each other busy connection, however deep their lanes are.
//!
//! Bounds: the lanes together hold at most the socket's `recv_queue_messages` and
//! `recv_queue_bytes`, and one lane at most a quarter of either, so one connection can
//! never fill the whole queue. A connection whose push fails stops reading (TCP pushes
//! back on that peer only) and waits on its lane's own wake-up: a pop from its lane if
//! its lane was full, or its turn among the lanes waiting for room in the total (a FIFO:
//! the waiters are woken in the order they started waiting, though a connection that
//! was not waiting may still take the room first). Waking one lane per pop, rather than every waiter,
//! keeps a thousand blocked connections from turning each pop into a thousand wake-ups.
//!
//! Messages a lane holds when its connection ends are still delivered (events from a
//! publisher that just left are still events); the lane goes once it is empty. The mutex
//! is held only for a push or a pop, never across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::conn::Inbound;
use super::queue::{shrink_if_empty, Cost, Queue};

/// One connection's lane in its socket's [`Inbox`]. Dropping it does not remove the lane:
/// [`Lane::detach`] does, once the connection ends.
pub(crate) struct Lane {
    inbox: Arc<Inbox>,
    id: u64,
    /// Woken when this lane may have room again.
    room: Arc<Notify>,
    /// Messages in the lane, mirrored outside the lock (written under it).
    held: Arc<AtomicUsize>,
}

struct LaneState {
    items: VecDeque<Inbound>,
    bytes: usize,
    room: Arc<Notify>,
    held: Arc<AtomicUsize>,
    /// Its connection ended: remove the lane once it is empty.
    detached: bool,
    /// A push failed at the lane's own bound: wake it at the next pop from this lane.
    full: bool,
    /// Messages taken from the lane whose [`Taken`] is not dropped yet: until then the
    /// lane still "holds" them, so its connection does not hand later messages to an
    /// inline handler ahead of them.
    taken: usize,
    /// In `State::waiting` (a push failed at the total).
    waiting: bool,
}

#[derive(Default)]
struct State {
    lanes: HashMap<u64, LaneState>,
    /// Lanes holding messages, in the order they are served.
    ready: VecDeque<u64>,
    /// Lanes whose last push failed because the total was reached, first come first.
    waiting: VecDeque<u64>,
    count: usize,
    bytes: usize,
    next_id: u64,
    closed: bool,
}

/// The incoming queue of a ROUTER or SUB. See the module documentation.
pub(crate) struct Inbox {
    state: Mutex<State>,
    max_items: usize,
    max_bytes: usize,
    lane_items: usize,
    lane_bytes: usize,
    /// Signalled when a message is pushed (consumers in [`Inbox::pop`]).
    readable: Notify,
    closed: AtomicBool,
}

impl Inbox {
    /// An inbox holding at most `max_items` messages and `max_bytes` bytes in total.
    pub fn new(max_items: usize, max_bytes: usize) -> Arc<Inbox> {
        Arc::new(Inbox {
            state: Mutex::new(State::default()),
            max_items,
            max_bytes,
            lane_items: (max_items / 4).max(1),
            lane_bytes: (max_bytes / 4).max(1),
            readable: Notify::new(),
            closed: AtomicBool::new(false),
        })
    }

    /// A lane for a new connection.
    pub fn lane(self: &Arc<Self>) -> Lane {
        let room = Arc::new(Notify::new());
        let held = Arc::new(AtomicUsize::new(0));
        let mut s = self.state.lock();
        let id = s.next_id;
        s.next_id += 1;
        s.lanes.insert(
            id,
            LaneState {
                items: VecDeque::new(),
                bytes: 0,
                room: room.clone(),
                held: held.clone(),
                detached: false,
                full: false,
                waiting: false,
                taken: 0,
            },
        );
        Lane {
            inbox: self.clone(),
            id,
            room,
            held,
        }
    }

    /// Messages held now, all lanes together.
    pub fn len(&self) -> usize {
        self.state.lock().count
    }

    /// Takes the next message, one lane after the other; `None` when nothing is held.
    #[cfg(test)]
    pub fn try_pop(self: &Arc<Self>) -> Option<Inbound> {
        self.try_take().map(|(item, _)| item)
    }

    /// [`Inbox::try_pop`], with a [`Taken`]: until it is dropped, the message's lane still
    /// counts it as held (see [`Lane::holds_messages`]).
    pub fn try_take(self: &Arc<Self>) -> Option<(Inbound, Taken)> {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        let id = s.ready.pop_front()?;
        let lane = s.lanes.get_mut(&id).expect("a ready lane exists");
        let item = lane
            .items
            .pop_front()
            .expect("a ready lane holds a message");
        let (n, b) = item.cost();
        lane.bytes -= b;
        lane.taken += 1;
        lane.held
            .store(lane.items.len() + lane.taken, Ordering::Release);
        if std::mem::take(&mut lane.full) {
            lane.room.notify_one();
        }
        if !lane.items.is_empty() {
            s.ready.push_back(id);
        } else if lane.detached {
            s.lanes.remove(&id);
        } else {
            shrink_if_empty(&mut lane.items);
        }
        s.count -= n;
        s.bytes -= b;
        if s.ready.is_empty() {
            // Everything was taken: whoever waits for room has it now.
            while let Some(w) = s.waiting.pop_front() {
                wake_waiting(s, w);
            }
        } else {
            if s.count < self.max_items && s.bytes < self.max_bytes {
                while let Some(w) = s.waiting.pop_front() {
                    if wake_waiting(s, w) {
                        break;
                    }
                }
            }
            // Chain the wake-up so a second consumer is not left waiting.
            self.readable.notify_one();
        }
        Some((
            item,
            Taken {
                inbox: self.clone(),
                lane: id,
            },
        ))
    }

    /// Waits for and takes the next message; `None` once closed and empty.
    pub async fn pop(self: &Arc<Self>) -> Option<Inbound> {
        self.take().await.map(|(item, _)| item)
    }

    /// [`Inbox::pop`], with its [`Taken`].
    pub async fn take(self: &Arc<Self>) -> Option<(Inbound, Taken)> {
        loop {
            let notified = self.readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(item) = self.try_take() {
                return Some(item);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            notified.await;
        }
    }

    /// Closes the inbox: pushes fail, consumers get what is left and then `None`, and
    /// every waiting connection wakes up.
    pub fn close(&self) {
        let mut s = self.state.lock();
        s.closed = true;
        self.closed.store(true, Ordering::Release);
        for lane in s.lanes.values() {
            lane.room.notify_one();
        }
        drop(s);
        self.readable.notify_waiters();
    }
}

/// Wakes a lane that waits for room in the total; false if it is gone or its
/// connection ended.
/// A message taken from a lane and not yet dealt with: while it lives, its connection
/// offers no later message to an inline handler (they queue behind it), so whoever takes
/// messages from the queue and dispatches them keeps each connection's order.
pub(crate) struct Taken {
    inbox: Arc<Inbox>,
    lane: u64,
}

impl Drop for Taken {
    fn drop(&mut self) {
        let mut s = self.inbox.state.lock();
        if let Some(lane) = s.lanes.get_mut(&self.lane) {
            lane.taken -= 1;
            lane.held
                .store(lane.items.len() + lane.taken, Ordering::Release);
        }
    }
}

fn wake_waiting(s: &mut State, id: u64) -> bool {
    match s.lanes.get_mut(&id) {
        // A lane whose connection ended pushes nothing more: the room goes to the next.
        Some(lane) if !lane.detached => {
            lane.waiting = false;
            lane.room.notify_one();
            true
        }
        _ => false,
    }
}

impl Lane {
    /// Appends a message behind this connection's earlier ones, or gives it back if the
    /// lane or the total is at its bound (or the inbox is closed); the connection then
    /// waits in [`Lane::writable`] before trying again.
    // The message comes back by value: boxing it would allocate on every push.
    #[allow(clippy::result_large_err)]
    pub fn try_push(&self, item: Inbound) -> Result<(), Inbound> {
        let (n, b) = item.cost();
        let inbox = &*self.inbox;
        let mut s = inbox.state.lock();
        let total_fits = s.count < inbox.max_items && s.bytes < inbox.max_bytes;
        let State {
            lanes,
            ready,
            waiting,
            count,
            bytes,
            closed,
            ..
        } = &mut *s;
        let Some(lane) = lanes.get_mut(&self.id) else {
            return Err(item);
        };
        if *closed || lane.detached {
            return Err(item);
        }
        if lane.items.len() >= inbox.lane_items || lane.bytes >= inbox.lane_bytes {
            lane.full = true;
            return Err(item);
        }
        if !total_fits {
            if !lane.waiting {
                lane.waiting = true;
                waiting.push_back(self.id);
            }
            return Err(item);
        }
        if lane.items.is_empty() {
            ready.push_back(self.id);
        }
        lane.items.push_back(item);
        lane.bytes += b;
        lane.held
            .store(lane.items.len() + lane.taken, Ordering::Release);
        *count += n;
        *bytes += b;
        drop(s);
        inbox.readable.notify_one();
        Ok(())
    }

    /// Whether the lane holds messages not yet taken, or taken and not yet dealt with
    /// (their [`Taken`] is alive).
    pub fn holds_messages(&self) -> bool {
        self.held.load(Ordering::Acquire) > 0
    }

    /// Returns once this lane may have room again (or the inbox closed). Callers try
    /// again after; a spurious wake-up only costs that try.
    pub async fn writable(&self) {
        if self.inbox.closed.load(Ordering::Acquire) {
            return;
        }
        self.room.notified().await;
    }

    /// The connection ended: the lane goes once the messages it holds are taken.
    pub fn detach(&self) {
        let mut s = self.inbox.state.lock();
        let Some(lane) = s.lanes.get_mut(&self.id) else {
            return;
        };
        if lane.items.is_empty() {
            let was_waiting = lane.waiting;
            s.lanes.remove(&self.id);
            if was_waiting {
                s.waiting.retain(|&w| w != self.id);
            }
        } else {
            lane.detached = true;
        }
    }
}

/// Where a connection puts the messages it receives for `recv`: its lane of a ROUTER's
/// or SUB's [`Inbox`], or a DEALER's single queue (one connection at a time).
pub(crate) enum Intake {
    /// The DEALER's queue.
    Queue(Arc<Queue<Inbound>>),
    /// A lane of an [`Inbox`].
    Lane(Lane),
}

impl Intake {
    /// Pushes, or gives the message back when there is no room now.
    // The message comes back by value: boxing it would allocate on every push.
    #[allow(clippy::result_large_err)]
    pub fn try_push(&self, item: Inbound) -> Result<(), Inbound> {
        match self {
            Intake::Queue(q) => q.try_push(item).map_err(|(item, _)| item),
            Intake::Lane(l) => l.try_push(item),
        }
    }

    /// Whether messages this connection pushed earlier are still waiting (a DEALER's
    /// queue is never a fallback for declined messages, so it says no).
    pub fn holds_messages(&self) -> bool {
        match self {
            Intake::Queue(_) => false,
            Intake::Lane(l) => l.holds_messages(),
        }
    }

    /// Returns once a push may succeed again.
    pub async fn writable(&self) {
        match self {
            Intake::Queue(q) => q.writable().await,
            Intake::Lane(l) => l.writable().await,
        }
    }
}

/// What a socket's `recv` reads, closed with the socket.
pub(crate) enum Incoming {
    /// A DEALER's queue.
    Queue(Arc<Queue<Inbound>>),
    /// A ROUTER's or SUB's inbox.
    Inbox(Arc<Inbox>),
}

impl Incoming {
    /// Closes it: `recv` returns what is left, then `Closed`.
    pub fn close(&self) {
        match self {
            Incoming::Queue(q) => q.close(),
            Incoming::Inbox(i) => i.close(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Message;
    use bytes::Bytes;

    fn item(conn: u8, seq: u8) -> Inbound {
        Inbound {
            identity: Bytes::from(vec![conn]),
            msg: Message::from(vec![Bytes::from(vec![seq])]),
            arrived: None,
        }
    }

    fn pop_conn(inbox: &Arc<Inbox>) -> (u8, u8) {
        let i = inbox.try_pop().expect("an item");
        (i.identity[0], i.msg.frames()[0][0])
    }

    #[test]
    fn lanes_are_served_in_turn_each_in_order() {
        let inbox = Inbox::new(1000, 1 << 20);
        let (a, b) = (inbox.lane(), inbox.lane());
        for seq in 0..10 {
            a.try_push(item(1, seq)).unwrap();
        }
        b.try_push(item(2, 0)).unwrap();
        b.try_push(item(2, 1)).unwrap();
        // The flooder's ten came first, yet the other connection's are served second
        // and fourth, and each connection's messages stay in order.
        let got: Vec<_> = (0..12).map(|_| pop_conn(&inbox)).collect();
        assert_eq!(&got[..4], &[(1, 0), (2, 0), (1, 1), (2, 1)]);
        assert_eq!(
            got[4..].iter().map(|g| g.1).collect::<Vec<_>>(),
            (2..10).collect::<Vec<_>>()
        );
        assert!(inbox.try_pop().is_none());
    }

    #[test]
    fn a_taken_message_is_held_until_dealt_with() {
        let inbox = Inbox::new(100, 1 << 20);
        let a = inbox.lane();
        a.try_push(item(1, 0)).unwrap();
        let (_, taken) = inbox.try_take().unwrap();
        assert!(a.holds_messages(), "taken but not dispatched yet");
        drop(taken);
        assert!(!a.holds_messages());
    }

    #[test]
    fn one_lane_holds_at_most_a_quarter() {
        let inbox = Inbox::new(8, 1 << 20);
        let (a, b) = (inbox.lane(), inbox.lane());
        a.try_push(item(1, 0)).unwrap();
        a.try_push(item(1, 1)).unwrap();
        assert!(a.try_push(item(1, 2)).is_err(), "a lane's bound is 8 / 4");
        b.try_push(item(2, 0)).unwrap();
        assert_eq!(inbox.len(), 3);
    }

    #[tokio::test]
    async fn a_full_lane_wakes_when_its_own_message_is_taken() {
        let inbox = Inbox::new(4, 1 << 20);
        let a = inbox.lane();
        a.try_push(item(1, 0)).unwrap();
        assert!(a.try_push(item(1, 1)).is_err());
        inbox.try_pop().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), a.writable())
            .await
            .expect("woken by the pop");
        a.try_push(item(1, 1)).unwrap();
    }

    #[tokio::test]
    async fn room_in_the_total_goes_to_waiting_lanes_first_come_first_served() {
        // Total of 2 messages; lanes of 1 (a quarter, at least one).
        let inbox = Inbox::new(2, 1 << 20);
        let lanes: Vec<Lane> = (0..4).map(|_| inbox.lane()).collect();
        lanes[0].try_push(item(0, 0)).unwrap();
        lanes[1].try_push(item(1, 0)).unwrap();
        assert!(lanes[2].try_push(item(2, 0)).is_err());
        assert!(lanes[3].try_push(item(3, 0)).is_err());
        // One pop (the queue still holds one): only the first waiter is woken.
        inbox.try_pop().unwrap();
        let soon = std::time::Duration::from_millis(50);
        tokio::time::timeout(soon, lanes[2].writable())
            .await
            .expect("first waiter woken");
        assert!(tokio::time::timeout(soon, lanes[3].writable())
            .await
            .is_err());
        // Taking everything wakes whoever still waits.
        inbox.try_pop().unwrap();
        tokio::time::timeout(soon, lanes[3].writable())
            .await
            .expect("woken once the inbox is empty");
    }

    #[test]
    fn a_detached_lane_is_drained_then_removed() {
        let inbox = Inbox::new(100, 1 << 20);
        let a = inbox.lane();
        a.try_push(item(1, 0)).unwrap();
        a.detach();
        assert!(
            a.try_push(item(1, 1)).is_err(),
            "nothing more once detached"
        );
        assert_eq!(pop_conn(&inbox), (1, 0));
        assert_eq!(
            inbox.state.lock().lanes.len(),
            0,
            "the lane went once empty"
        );
        let b = inbox.lane();
        b.detach();
        assert_eq!(inbox.state.lock().lanes.len(), 0);
    }

    #[tokio::test]
    async fn pop_waits_then_close_ends_it() {
        let inbox = Inbox::new(10, 1 << 20);
        let a = inbox.lane();
        let i2 = inbox.clone();
        let waiter = tokio::spawn(async move { i2.pop().await.map(|i| i.identity[0]) });
        tokio::task::yield_now().await;
        a.try_push(item(7, 0)).unwrap();
        assert_eq!(waiter.await.unwrap(), Some(7));
        a.try_push(item(7, 1)).unwrap();
        inbox.close();
        assert!(
            inbox.pop().await.is_some(),
            "what is left is still delivered"
        );
        assert!(inbox.pop().await.is_none());
        assert!(a.try_push(item(7, 2)).is_err());
    }
}
