//! `peerwire deliver` (at-least-once delivery from the command line, through an outbox
//! that can be kept in a file) and `peerwire outbox` (what such a file holds).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use peerwire::node::{read_outbox, DeliveryOptions, OutboxConfig, Undelivered};
use serde_json::json;

use super::{logging::clean, parse_json, NodeArgs};

/// How `peerwire deliver` is asked to deliver.
#[derive(clap::Args, Debug, Clone)]
pub struct DeliverArgs {
    /// Shard key: messages with the same key go to the same instance, one at a time, in
    /// the order given.
    #[arg(long)]
    pub shard_key: Option<String>,
    /// Keep the outbox in this file: what is not acknowledged before the command ends
    /// stays there, and the next `peerwire deliver --outbox FILE` sends it (first).
    #[arg(long)]
    pub outbox: Option<PathBuf>,
    /// How long to wait for the acknowledgement, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub ack_within: u64,
    /// How long one attempt may take before the message is sent again (elsewhere if it
    /// can be), in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub attempt_timeout: u64,
}

/// `peerwire deliver`.
pub async fn deliver(args: &NodeArgs, target: &str, json: &str, how: &DeliverArgs) -> Result<()> {
    let msg = parse_json("the message", json)?;
    let config = match &how.outbox {
        Some(path) => OutboxConfig::on_disk(path),
        None => OutboxConfig::default(),
    };
    let node = args.client_node_with(|b| b.outbox(config)).await?;
    let earlier = node.outbox().len();
    if earlier > 0 {
        errln!("{earlier} message(s) left by an earlier run are sent first");
    }
    let mut opts = DeliveryOptions::default()
        .with_attempt_timeout(Duration::from_millis(how.attempt_timeout.max(1)));
    if let Some(k) = &how.shard_key {
        opts = opts.with_shard_key(k.clone());
    }
    let receipt = match node.deliver_tracked(target, &msg, opts).await {
        Ok(r) => r,
        Err(e) => {
            node.shutdown().await;
            return Err(e.into());
        }
    };
    let id = receipt.id;
    let outcome = tokio::time::timeout(
        Duration::from_millis(how.ack_within),
        receipt.acknowledged(),
    )
    .await;
    // (What is still in flight when the node stops stays in the file, if there is one.)
    let left = node.outbox();
    node.shutdown().await;
    match outcome {
        Ok(Ok(())) => {
            outln!("{id}");
            errln!(
                "delivered to one instance of {} and acknowledged",
                clean(target)
            );
            Ok(())
        }
        Ok(Err(e)) => bail!("{}", clean(&e.to_string())),
        Err(_) => {
            let why = left
                .iter()
                .find(|u| u.id == id)
                .and_then(|u| u.last_error.as_deref())
                .map(clean)
                .unwrap_or_else(|| format!("no instance of {} acknowledged it yet", clean(target)));
            match &how.outbox {
                Some(path) => bail!(
                    "message {id} not acknowledged within {} ms ({why}); kept in {} with {} \
                     other(s): `peerwire outbox {}` lists them, the next `peerwire deliver \
                     --outbox {}` sends them",
                    how.ack_within,
                    path.display(),
                    left.len().saturating_sub(1),
                    path.display(),
                    path.display()
                ),
                None => bail!(
                    "message {id} not acknowledged within {} ms ({why}); dropped with the \
                     command (--outbox FILE keeps it)",
                    how.ack_within
                ),
            }
        }
    }
}

/// `peerwire outbox FILE`.
pub fn list(path: &Path, as_json: bool) -> Result<()> {
    let held = read_outbox(path)?;
    if as_json {
        for u in &held {
            outln!("{}", row_json(u));
        }
        return Ok(());
    }
    if held.is_empty() {
        errln!("{}: empty, every message was acknowledged", path.display());
        return Ok(());
    }
    outln!(
        "{:<36}  {:<28}  {:<16}  {:>8}  {:>10}",
        "id",
        "target",
        "shard key",
        "bytes",
        "age"
    );
    for u in &held {
        outln!(
            "{:<36}  {:<28}  {:<16}  {:>8}  {:>9}s",
            u.id,
            clean(&u.target),
            clean(u.shard_key.as_deref().unwrap_or("-")),
            u.bytes,
            u.age.as_secs()
        );
    }
    errln!("{} message(s) not yet acknowledged", held.len());
    Ok(())
}

fn row_json(u: &Undelivered) -> serde_json::Value {
    json!({
        "id": u.id.to_string(),
        "target": u.target,
        "shard_key": u.shard_key,
        "bytes": u.bytes,
        "age_ms": u.age.as_millis() as u64,
    })
}
