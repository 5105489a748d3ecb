//! Publish/subscribe: our events out, peers' events in.
//!
//! This module owns the per-topic sequence numbers of the events we publish and the
//! local subscriptions that peers' events are delivered to (and counts the events a full
//! subscription had to drop). It never decodes an envelope (inbound routing hands it
//! decoded events) and never connects to a peer's PUB (the membership does).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::frames;
use bytes::Bytes;

use crate::codec::{self, CodecError, Envelope, Header, Id, Kind, MessageType};
use crate::transport::{PublishReport, Publisher, SendError, Subscriber};

/// How a node's SUB says which node it is: it subscribes to this prefix followed by the
/// node id's 16 bytes (its label), which no event topic can match (a topic never starts
/// with a zero byte). Any ZeroMQ library can subscribe to it; a SUB identity, which
/// libzmq never sends for SUB sockets, is only a fallback.
pub(super) const LABEL_PREFIX: &[u8] = b"\x00peerwire.node:";

/// The label a node with `id` subscribes to on every PUB it connects to.
pub(super) fn label(id: Id) -> Bytes {
    let mut l = Vec::with_capacity(LABEL_PREFIX.len() + 16);
    l.extend_from_slice(LABEL_PREFIX);
    l.extend_from_slice(id.0.as_bytes());
    Bytes::from(l)
}

/// Refuses a topic that starts with a zero byte: those are subscriber labels.
pub(super) fn check_topic(topic: &str) -> Result<(), CodecError> {
    if topic.as_bytes().first() == Some(&0) {
        return Err(CodecError::Encode(format!(
            "topic {topic:?} starts with a zero byte, which is reserved for subscriber labels"
        )));
    }
    Ok(())
}

/// Events queued for one local subscription before further ones are dropped (and seen
/// by the subscriber as gaps in the sequence numbers).
const SUBSCRIPTION_QUEUE: usize = 4096;

/// Most (publisher, topic) pairs a subscription remembers a sequence number for.
const MAX_SEQUENCES: usize = 10_000;

struct LocalSub {
    id: u64,
    prefix: String,
    tx: mpsc::Sender<Envelope>,
}

/// Publishes events on a node's behalf where the [`Node`](super::Node) itself is not at
/// hand: in a handler, or a task of its own (from [`Node::publishing`](super::Node::publishing)).
/// Cheap to clone. It does not keep the node alive: once the node is gone, publishing
/// fails with [`CallError::Shutdown`](super::CallError::Shutdown).
#[derive(Clone)]
pub struct Publishing {
    pub(super) pubsub: Weak<PubSub>,
}

impl Publishing {
    /// Publishes an event on `topic`, as [`Node::publish`](super::Node::publish) does.
    pub fn publish<T: serde::Serialize + ?Sized>(
        &self,
        topic: &str,
        event: &T,
    ) -> Result<PublishReport, super::CallError> {
        let pubsub = self.pubsub.upgrade().ok_or(super::CallError::Shutdown)?;
        if pubsub.is_stopped() {
            return Err(super::CallError::Shutdown);
        }
        check_topic(topic)?;
        let payload = codec::encode_payload(event)?;
        Ok(pubsub.publish(topic, payload)?)
    }
}

/// Our side of publish/subscribe. See the [module documentation](self).
pub(super) struct PubSub {
    node_id: Id,
    publisher: Arc<Publisher>,
    subscriber: Arc<Subscriber>,
    subs: RwLock<Vec<LocalSub>>,
    topic_seq: Mutex<HashMap<String, u64>>,
    next_sub: AtomicU64,
    dropped: AtomicU64,
    /// Set when the node stops: publishing is refused from then on.
    stopped: std::sync::atomic::AtomicBool,
}

impl PubSub {
    pub(super) fn new(node_id: Id, publisher: Arc<Publisher>, subscriber: Arc<Subscriber>) -> Self {
        PubSub {
            node_id,
            publisher,
            subscriber,
            subs: RwLock::new(Vec::new()),
            topic_seq: Mutex::new(HashMap::new()),
            next_sub: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
            stopped: Default::default(),
        }
    }

    /// The node stopped: publishing is refused from now on.
    pub(super) fn stop(&self) {
        self.stopped.store(true, Relaxed);
    }

    pub(super) fn is_stopped(&self) -> bool {
        self.stopped.load(Relaxed)
    }

    /// Publishes an event, numbered in its topic's sequence.
    pub(super) fn publish(
        &self,
        topic: &str,
        payload: bytes::Bytes,
    ) -> Result<PublishReport, SendError> {
        let mut h = Header::new(Kind::Event, self.node_id, topic);
        h.seq = {
            let mut seqs = self.topic_seq.lock();
            // Look up before inserting: no key allocated on every publish.
            match seqs.get_mut(topic) {
                Some(s) => {
                    *s += 1;
                    *s
                }
                None => {
                    seqs.insert(topic.to_string(), 1);
                    1
                }
            }
        };
        self.publisher.publish(frames::pub_message(&h, payload))
    }

    /// Publishes a gather request (its header made by the call pipeline). Subscribers
    /// of its topic that serve it answer on our ROUTER.
    pub(super) fn publish_gather(
        &self,
        h: &Header,
        payload: bytes::Bytes,
    ) -> Result<PublishReport, SendError> {
        self.publisher.publish(frames::pub_message(h, payload))
    }

    /// Subscribes to events whose topic starts with `prefix`.
    pub(super) fn subscribe<T>(self: &Arc<Self>, prefix: &str) -> Subscription<T> {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
        let id = self.next_sub.fetch_add(1, Relaxed);
        self.subs.write().push(LocalSub {
            id,
            prefix: prefix.to_string(),
            tx,
        });
        self.subscriber.subscribe(prefix.to_string());
        Subscription {
            id,
            prefix: prefix.to_string(),
            rx,
            last: HashMap::new(),
            pubsub: Arc::downgrade(self),
            _t: PhantomData,
        }
    }

    fn unsubscribe(&self, id: u64, prefix: &str) {
        self.subs.write().retain(|s| s.id != id);
        self.subscriber.unsubscribe(prefix.as_bytes());
    }

    /// Hands a peer's event to every local subscription whose prefix it matches; a full
    /// one loses it (counted).
    pub(super) fn deliver(&self, event: Envelope) {
        for s in self.subs.read().iter() {
            if event.header.target.starts_with(&s.prefix) && s.tx.try_send(event.clone()).is_err() {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Peers whose SUB filter matches `topic` now: known by the label their SUB
    /// subscribes to ([`label`]), or else by the SUB's ZMTP identity (16 bytes).
    pub(super) fn subscribers_of(&self, topic: &str) -> Vec<Id> {
        self.publisher
            .subscribers_matching_with_labels(topic.as_bytes())
            .into_iter()
            .filter_map(|(identity, labels)| {
                // The first label that is a well-formed id, else the identity.
                let id = |raw: &[u8]| uuid::Uuid::from_slice(raw).ok().map(Id);
                labels
                    .iter()
                    .filter_map(|l| l.strip_prefix(LABEL_PREFIX))
                    .find_map(id)
                    .or_else(|| id(&identity))
            })
            .collect()
    }

    /// Events dropped because a local subscription was full.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

/// One event received by a [`Subscription`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
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
    /// What the publisher marked it as: an event unless it said otherwise (a document,
    /// say, for a published snapshot of state).
    pub message_type: MessageType,
    /// The decoded value.
    pub value: T,
}

/// A typed subscription to events by topic prefix. Dropping it unsubscribes.
pub struct Subscription<T> {
    id: u64,
    prefix: String,
    rx: mpsc::Receiver<Envelope>,
    last: HashMap<(Id, String), u64>,
    pubsub: Weak<PubSub>,
    _t: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Subscription<T> {
    /// The next event; `None` once the node has shut down. An event whose payload does
    /// not decode as `T` is returned as an error (and still counted for sequencing).
    pub async fn recv(&mut self) -> Option<Result<Event<T>, CodecError>> {
        let env = self.rx.recv().await?;
        let h = env.header;
        let key = (h.sender, h.target.clone());
        if self.last.len() >= MAX_SEQUENCES && !self.last.contains_key(&key) {
            // Bounded: forget old (publisher, topic) pairs rather than grow for ever.
            self.last.clear();
        }
        let missed = match self.last.insert(key, h.seq) {
            Some(prev) if h.seq > prev => h.seq - prev - 1,
            _ => 0,
        };
        let message_type = h.effective_type().unwrap_or(MessageType::Event);
        Some(codec::decode_payload(&env.payload).map(|value| Event {
            message_type,
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
        if let Some(pubsub) = self.pubsub.upgrade() {
            pubsub.unsubscribe(self.id, &self.prefix);
        }
    }
}
