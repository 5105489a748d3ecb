//! `peerwire call`: one request, with what a caller can ask of the resilience
//! mechanisms: a deadline, retries for an idempotent call, a fallback answer.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use peerwire::node::CallOptions;
use serde_json::Value;

use super::{logging, no_responder, parse_json, parse_version, NodeArgs};

/// How `peerwire call` calls.
#[derive(clap::Args, Debug, Clone)]
pub struct CallArgs {
    /// Deadline in milliseconds (all attempts together).
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// Method version wanted, MAJOR.MINOR.
    #[arg(long)]
    pub version: Option<String>,
    /// The call may safely be repeated (running it twice does no harm).
    #[arg(long)]
    pub idempotent: bool,
    /// Attempts after the first, each on another instance where there is one, when an
    /// instance could not serve the call (connection lost, overloaded, shutting down).
    /// Needs --idempotent.
    #[arg(long, default_value_t = 0, requires = "idempotent")]
    pub retries: u32,
    /// The answer to print when no instance could give one (deadline passed, every
    /// breaker open, bulkhead full, no responder), as JSON; stderr says why.
    #[arg(long, value_name = "JSON")]
    pub fallback: Option<String>,
}

/// `peerwire call`.
pub async fn call(args: &NodeArgs, target: &str, json: &str, how: &CallArgs) -> Result<()> {
    let req = parse_json("the request", json)?;
    let version = how.version.as_deref().map(parse_version).transpose()?;
    let fallback = how
        .fallback
        .as_deref()
        .map(|f| parse_json("the fallback", f))
        .transpose()?;
    let node = args.client_node().await?;
    let found = node.wait_for_service(target, 1, args.wait()).await;
    if !found && fallback.is_none() {
        let why = no_responder(&node, target);
        node.shutdown().await;
        bail!("{why}");
    }
    let mut opts = CallOptions::timeout(Duration::from_millis(how.timeout_ms));
    opts.version = version;
    opts.idempotent = how.idempotent;
    opts.retries = Some(how.retries);
    let started = Instant::now();
    // The value, and why a fallback gave it, if one did.
    let out = match fallback {
        Some(f) => node
            .request_or::<_, Value>(target, &req, opts, |_| f)
            .await
            .map(|a| (a.value, a.fallback)),
        None => node
            .request_with::<_, Value>(target, &req, opts)
            .await
            .map(|v| (v, None)),
    };
    let took = started.elapsed();
    node.shutdown().await;
    let (value, fell_back) = out?;
    outln!("{}", serde_json::to_string_pretty(&value)?);
    match &fell_back {
        Some(why) => errln!(
            "(fallback after {} µs: {})",
            took.as_micros(),
            logging::clean(&why.to_string())
        ),
        None => errln!("({} µs)", took.as_micros()),
    }
    Ok(())
}
