//! What a service calls: `Node::deliver`, `deliver_with`, `deliver_tracked` and
//! `outbox`, the [`Receipt`] of a tracked message, and [`read_outbox`] for a file no node
//! has open.

use std::time::Duration;

use tokio::sync::oneshot;

use super::disk::DiskLog;
use super::{now_ms, DeliveryOptions, Finished, Stage, Undelivered};
use crate::codec::Id;
use crate::node::CallError;

/// Where a message given with [`Node::deliver_tracked`](crate::node::Node::deliver_tracked)
/// ends up.
#[derive(Debug)]
pub struct Receipt {
    /// Its message id.
    pub id: Id,
    rx: oneshot::Receiver<Finished>,
}

impl Receipt {
    /// Completes when an instance acknowledged the message: `Ok`; or when the outbox
    /// gave it up: [`CallError::Outbox`] saying why (expired, or its last attempt's
    /// error); or [`CallError::Shutdown`] if the node stopped first (an outbox on disk
    /// still holds it for the next start).
    pub async fn acknowledged(self) -> Result<(), CallError> {
        match self.rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(CallError::Outbox(format!(
                "message {} given up: {why}",
                self.id
            ))),
            Err(_) => Err(CallError::Shutdown),
        }
    }
}

/// The messages an outbox file holds ([`OutboxConfig::path`](super::OutboxConfig::path)), oldest first, read
/// without a node: for `peerwire outbox`, or to see what a stopped service left
/// undelivered. Refused while a node has the file open. Attempt counts and errors are
/// not kept on disk: they read as none.
pub fn read_outbox(
    path: impl AsRef<std::path::Path>,
) -> Result<Vec<Undelivered>, crate::node::NodeError> {
    let now = now_ms();
    Ok(DiskLog::read(path.as_ref())?
        .into_iter()
        .map(|(_, m)| Undelivered {
            id: m.id,
            target: m.target,
            shard_key: m.shard_key,
            bytes: m.payload.len(),
            attempts: 0,
            age: Duration::from_millis(now.saturating_sub(m.given_ms)),
            last_error: None,
            stage: Stage::Queued,
        })
        .collect())
}

impl crate::node::Node {
    /// At-least-once delivery of `msg` to one instance of `target` (a command, unless
    /// marked otherwise): returns its message id once the outbox holds it (on disk
    /// first, when the outbox is kept there; see [`OutboxConfig`](super::OutboxConfig)). The outbox sends it
    /// as a request and takes the instance's reply (its handler succeeded) as the
    /// acknowledgement; until then it sends it again, with the same id, to another
    /// instance where there is one (after its instance died, timed out, refused it or
    /// failed it), and holds it while no instance serves `target`. A consumer may
    /// therefore see it more than once: [`dedup`](crate::dedup) recognises the copies.
    ///
    /// Fails at once, the message not taken, if the outbox is full
    /// ([`CallError::OutboxFull`]), its file fails ([`CallError::Outbox`]), `msg` does
    /// not serialise ([`CallError::Codec`]), `target` is empty, or the node is stopping.
    pub async fn deliver<T: serde::Serialize + ?Sized>(
        &self,
        target: &str,
        msg: &T,
    ) -> Result<Id, CallError> {
        self.deliver_with(target, msg, DeliveryOptions::default())
            .await
    }

    /// [`Node::deliver`](crate::node::Node::deliver) with options: a shard key (messages with
    /// the same key are delivered one at a time, in the order given, to the instance the
    /// key maps to), the message type, how long one attempt may take.
    pub async fn deliver_with<T: serde::Serialize + ?Sized>(
        &self,
        target: &str,
        msg: &T,
        opts: DeliveryOptions,
    ) -> Result<Id, CallError> {
        let payload = self.checked(target, msg, &opts)?;
        self.core.outbox.give(target, payload, opts, None).await
    }

    /// [`Node::deliver_with`](crate::node::Node::deliver_with), with a [`Receipt`] that says
    /// when the message is acknowledged (or given up).
    pub async fn deliver_tracked<T: serde::Serialize + ?Sized>(
        &self,
        target: &str,
        msg: &T,
        opts: DeliveryOptions,
    ) -> Result<Receipt, CallError> {
        let payload = self.checked(target, msg, &opts)?;
        let (tx, rx) = oneshot::channel();
        let id = self
            .core
            .outbox
            .give(target, payload, opts, Some(tx))
            .await?;
        Ok(Receipt { id, rx })
    }

    /// What every delivery is checked for before the outbox takes it (the node still
    /// running, a target, a key and headers a receiver accepts), and its payload.
    fn checked<T: serde::Serialize + ?Sized>(
        &self,
        target: &str,
        msg: &T,
        opts: &DeliveryOptions,
    ) -> Result<bytes::Bytes, CallError> {
        if self.core.life.cancel.is_cancelled() {
            return Err(CallError::Shutdown);
        }
        if target.is_empty() {
            return Err(CallError::NoResponder(String::new()));
        }
        crate::node::pipeline::check_shard_key(opts.shard_key.as_deref())?;
        crate::node::pipeline::check_headers(&opts.headers)?;
        Ok(crate::codec::encode_payload(msg)?)
    }

    /// The messages the outbox holds (not yet acknowledged), oldest first.
    pub fn outbox(&self) -> Vec<Undelivered> {
        self.core.outbox.list()
    }
}
