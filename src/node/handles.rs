//! The handles callers hold: a pending asynchronous request, a subscription, a gather.
//! Each removes its entry from the node's tables when dropped.

use super::*;
pub(super) fn decode_reply<Resp: DeserializeOwned>(env: Envelope) -> Result<Resp, CallError> {
    match env.header.kind {
        Kind::ErrorReply => {
            let body: ErrorBody = codec::decode_payload(&env.payload)?;
            Err(CallError::Remote {
                code: body.code,
                message: body.message,
            })
        }
        _ => Ok(codec::decode_payload(&env.payload)?),
    }
}

/// The handle of an asynchronous request. Await [`PendingReply::recv`] or poll
/// [`PendingReply::try_recv`]; dropping it forgets the call (its table entry is freed).
pub struct PendingReply<Resp> {
    pub(super) id: Id,
    pub(super) rx: oneshot::Receiver<Result<Envelope, CallError>>,
    pub(super) deadline: tokio::time::Instant,
    pub(super) timeout: Duration,
    pub(super) target: Arc<str>,
    pub(super) inner: Weak<Inner>,
    pub(super) _t: PhantomData<fn() -> Resp>,
}

impl<Resp: DeserializeOwned> PendingReply<Resp> {
    /// The request's message id.
    pub fn id(&self) -> Id {
        self.id
    }

    /// Waits for the reply until the call's deadline.
    pub async fn recv(mut self) -> Result<Resp, CallError> {
        // The node's deadline sweeper answers with `Timeout` when the deadline passes.
        match (&mut self.rx).await {
            Ok(r) => decode_reply(r?),
            Err(_) => Err(CallError::Shutdown),
        }
    }

    /// The reply if it has arrived (`None` while still waiting). After the deadline it
    /// returns the timeout error.
    pub fn try_recv(&mut self) -> Option<Result<Resp, CallError>> {
        match self.rx.try_recv() {
            Ok(r) => Some(r.and_then(decode_reply)),
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(CallError::Shutdown)),
            Err(oneshot::error::TryRecvError::Empty) => {
                if tokio::time::Instant::now() >= self.deadline {
                    Some(Err(CallError::Timeout {
                        target: self.target.to_string(),
                        timeout: self.timeout,
                    }))
                } else {
                    None
                }
            }
        }
    }
}

impl<Resp> Drop for PendingReply<Resp> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.pending.lock().remove(&self.id);
        }
    }
}

/// One event received by a [`Subscription`].
#[derive(Debug, Clone, PartialEq)]
pub struct Event<T> {
    /// Its topic.
    pub topic: String,
    /// The publishing node.
    pub publisher: Id,
    /// Its sequence number on that publisher's topic.
    pub seq: u64,
    /// How many events of this publisher on this topic were missed just before this
    /// one (0 normally; counted from the first event this subscription saw).
    pub missed: u64,
    /// The decoded value.
    pub value: T,
}

/// A typed subscription to events by topic prefix. Dropping it unsubscribes.
pub struct Subscription<T> {
    pub(super) id: u64,
    pub(super) prefix: String,
    pub(super) rx: mpsc::Receiver<Envelope>,
    pub(super) last: HashMap<(Id, String), u64>,
    pub(super) inner: Weak<Inner>,
    pub(super) _t: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Subscription<T> {
    /// The next event; `None` once the node has shut down. An event whose payload does
    /// not decode as `T` is returned as an error (and still counted for sequencing).
    pub async fn recv(&mut self) -> Option<Result<Event<T>, CodecError>> {
        let env = self.rx.recv().await?;
        let h = env.header;
        let key = (h.sender, h.target.clone());
        if self.last.len() >= 10_000 && !self.last.contains_key(&key) {
            // Bounded: forget old (publisher, topic) pairs rather than grow for ever.
            self.last.clear();
        }
        let missed = match self.last.insert(key, h.seq) {
            Some(prev) if h.seq > prev => h.seq - prev - 1,
            _ => 0,
        };
        Some(codec::decode_payload(&env.payload).map(|value| Event {
            topic: h.target,
            publisher: h.sender,
            seq: h.seq,
            missed,
            value,
        }))
    }

    /// The prefix subscribed to.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl<T> Drop for Subscription<T> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.subs.write().retain(|s| s.id != self.id);
            inner.subscriber.unsubscribe(self.prefix.as_bytes());
        }
    }
}

/// Options of a gather.
#[derive(Debug, Clone)]
pub struct GatherOptions {
    /// How long to collect replies.
    pub within: Duration,
    /// Finish as soon as this many replies are in.
    pub quorum: Option<usize>,
    /// Version asked of responders.
    pub version: Option<Version>,
}

impl GatherOptions {
    /// Collect for `within`.
    pub fn within(within: Duration) -> Self {
        GatherOptions {
            within,
            quorum: None,
            version: None,
        }
    }

    /// Finish early once `n` replies are in.
    pub fn quorum(mut self, n: usize) -> Self {
        self.quorum = Some(n);
        self
    }
}

/// One responder's answer to a gather.
#[derive(Debug, Clone, PartialEq)]
pub struct GatherReply<T> {
    /// Who answered.
    pub from: Id,
    /// Its name, from the peer table.
    pub name: String,
    /// Time from publishing to this reply.
    pub elapsed: Duration,
    /// The decoded reply, or the remote or decode error.
    pub result: Result<T, CallError>,
}

/// Why a gather stopped collecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatherEnd {
    /// Every expected responder answered.
    AllAnswered,
    /// The quorum was reached.
    Quorum,
    /// The deadline passed.
    Deadline,
}

/// What a gather collected.
#[derive(Debug, Clone, PartialEq)]
pub struct GatherOutcome<T> {
    /// Every reply, in arrival order.
    pub replies: Vec<GatherReply<T>>,
    /// Expected responders (id, name) that stayed silent.
    pub silent: Vec<(Id, String)>,
    /// Why it stopped.
    pub end: GatherEnd,
}

/// A gather in progress: replies arrive as a stream ([`Gather::next`]) until the
/// deadline, until every expected responder answered, or until the quorum.
pub struct Gather<T> {
    pub(super) id: Id,
    pub(super) rx: mpsc::Receiver<Envelope>,
    pub(super) started: Instant,
    /// One timer for the whole gather, however many replies are awaited.
    pub(super) deadline: Pin<Box<tokio::time::Sleep>>,
    pub(super) quorum: Option<usize>,
    pub(super) expected: Vec<(Id, String)>,
    pub(super) answered: Vec<Id>,
    pub(super) finished: Option<GatherEnd>,
    pub(super) inner: Weak<Inner>,
    pub(super) _t: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Gather<T> {
    /// The responders expected (id, name), from the peer table when it was published.
    pub fn expected(&self) -> &[(Id, String)] {
        &self.expected
    }

    /// The next reply, or `None` once the gather has ended.
    pub async fn next(&mut self) -> Option<GatherReply<T>> {
        if self.finished.is_some() {
            return None;
        }
        loop {
            let got = tokio::select! {
                biased;
                r = self.rx.recv() => r,
                _ = &mut self.deadline => None,
            };
            let Some(env) = got else {
                self.finished = Some(GatherEnd::Deadline);
                return None;
            };
            let from = env.header.sender;
            if self.answered.contains(&from) || !self.expected.iter().any(|(id, _)| *id == from) {
                continue; // one reply per expected responder; others do not count
            }
            self.answered.push(from);
            let name = self
                .expected
                .iter()
                .find(|(id, _)| *id == from)
                .map(|(_, n)| n.clone())
                .unwrap_or_default();
            let reply = GatherReply {
                from,
                name,
                elapsed: self.started.elapsed(),
                result: decode_reply(env),
            };
            if self.quorum.is_some_and(|q| self.answered.len() >= q) {
                self.finished = Some(GatherEnd::Quorum);
            } else if self
                .expected
                .iter()
                .all(|(id, _)| self.answered.contains(id))
            {
                self.finished = Some(GatherEnd::AllAnswered);
            }
            return Some(reply);
        }
    }

    /// Collects every remaining reply and reports who stayed silent.
    pub async fn finish(mut self) -> GatherOutcome<T> {
        let mut replies = Vec::new();
        while let Some(r) = self.next().await {
            replies.push(r);
        }
        let silent = self
            .expected
            .iter()
            .filter(|(id, _)| !self.answered.contains(id))
            .cloned()
            .collect();
        GatherOutcome {
            replies,
            silent,
            end: self.finished.unwrap_or(GatherEnd::Deadline),
        }
    }
}

impl<T> Drop for Gather<T> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.gathers.lock().remove(&self.id);
        }
    }
}
