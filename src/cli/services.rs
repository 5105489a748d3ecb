//! The built-in demo services a node hosts with `peerwire node --serve
//! echo|relay|sink`, and the faults `echo` can be told to inject, for trying callers'
//! resilience with real processes.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use peerwire::codec::{codes, Version};
use peerwire::node::{BreakerConfig, CallOptions, HandlerError, Node, ServicePolicy};
use serde_json::{json, Value};

/// Faults the `echo` service injects (`peerwire node --serve echo --delay-ms 300`).
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct Faults {
    /// `echo.echo` and `echo.upper` answer only after this many milliseconds: a slow
    /// instance.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub delay_ms: u64,
    /// The share (0.0 to 1.0) of `echo.echo` and `echo.upper` requests answered
    /// `overloaded`: a failing instance (callers' breakers count it, and idempotent
    /// calls are retried elsewhere).
    #[arg(long, default_value_t = 0.0, value_name = "RATE", value_parser = rate)]
    pub fail_rate: f64,
}

/// How the `sink` service remembers what it handled.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SinkArgs {
    /// `sink`: keep the ids of the messages handled in this file (redb), so copies are
    /// recognised across restarts (default: in memory, 1 000 000 ids for an hour).
    #[arg(long, value_name = "FILE")]
    pub dedup: Option<std::path::PathBuf>,
}

fn rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a rate between 0.0 and 1.0")),
    }
}

impl Faults {
    /// Applies the faults to one request: fails it, or delays it.
    async fn inject(self) -> Result<(), HandlerError> {
        if self.fail_rate > 0.0 && fastrand::f64() < self.fail_rate {
            return Err(HandlerError::new(
                codes::OVERLOADED,
                "injected fault (--fail-rate)",
            ));
        }
        if self.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.delay_ms)).await;
        }
        Ok(())
    }

    fn any(self) -> bool {
        self.delay_ms > 0 || self.fail_rate > 0.0
    }
}

/// Registers the `echo` services:
/// - `echo.echo` (request): returns its input;
/// - `echo.upper` (request): a string, upper-cased;
/// - `echo.log` (notification): prints what it got;
/// - `echo.broadcast` (request): publishes its input as an event on `echo.events` and
///   answers with how many subscribers took it and how many had no room;
/// - `echo.ping` (gather): answers with this node's name and clock.
pub fn serve_echo(node: &Node, faults: Faults) {
    let v1 = Version::new(1, 0);
    if faults.any() {
        node.handle("echo.echo", v1, move |v: Value, _| async move {
            faults.inject().await?;
            Ok(v)
        });
    } else {
        // No fault: answered where it arrives, with no task of its own.
        node.handle("echo.echo", v1, |v: Value, _| async move { Ok(v) });
    }
    node.handle("echo.upper", v1, move |v: Value, _| async move {
        faults.inject().await?;
        match v {
            Value::String(s) => Ok(Value::String(s.to_uppercase())),
            other => Err(HandlerError::new(
                "not_a_string",
                format!("echo.upper takes a JSON string, got {other}"),
            )),
        }
    });
    let name = node.name().to_string();
    node.handle("echo.log", v1, move |v: Value, ctx| {
        let name = name.clone();
        async move {
            // Not `outln!`: a node whose stdout is closed, or read by nobody, keeps
            // serving (the line is queued for a writer thread, or dropped and counted).
            super::logging::stdout()
                .line(&format!("[{name}] notification from {}: {v}", ctx.sender));
            Ok(Value::Null)
        }
    });
    let publisher = node.publishing();
    node.handle("echo.broadcast", v1, move |v: Value, _| {
        // What the handler publishes is bounded like any publish: per subscriber and in
        // total, slow subscribers dropped (see RELIABILITY.md).
        let report = publisher.publish("echo.events", &v);
        async move {
            let report = report.map_err(|e| HandlerError::new("publish_failed", e.to_string()))?;
            Ok(json!({ "queued": report.queued, "dropped": report.dropped }))
        }
    });
    let name = node.name().to_string();
    node.handle_gather("echo.ping", v1, move |_: Value, _| {
        let name = name.clone();
        async move {
            let ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            Ok(json!({ "node": name, "unix_ms": ms }))
        }
    });
}

/// How the relay calls `echo`: a short deadline of its own (within what is left of its
/// caller's), and a breaker that judges quickly and probes again soon.
pub fn relay_policy() -> ServicePolicy {
    let breaker = BreakerConfig::default()
        .with_window(10, 5)
        .with_wait_in_open(Duration::from_secs(2))
        .with_probes(2, Duration::from_millis(500));
    ServicePolicy::new()
        .timeout(Duration::from_millis(250))
        .breaker(breaker)
}

/// Registers the `relay` service, the middle of a chain A → relay → echo:
/// - `relay.echo` (request): calls `echo.echo` with its input (under [`relay_policy`]
///   and what is left of its own deadline) and answers `{"via": NAME, "reply": ...}`,
///   or, when no `echo` instance could answer (deadline, open breakers, none there),
///   `{"via": NAME, "fallback": true, "why": ...}`.
pub fn serve_relay(node: &Arc<Node>) {
    let weak: Weak<Node> = Arc::downgrade(node);
    let name = node.name().to_string();
    node.handle("relay.echo", Version::new(1, 0), move |v: Value, _| {
        let (weak, name) = (weak.clone(), name.clone());
        async move {
            let node = weak
                .upgrade()
                .ok_or_else(|| HandlerError::new(codes::SHUTTING_DOWN, "the node is stopping"))?;
            let answer = node
                .request_or(
                    "echo.echo",
                    &v,
                    CallOptions::default(),
                    |e| json!({ "fallback": true, "why": e.to_string() }),
                )
                .await
                .map_err(|e| HandlerError::new("relay_failed", e.to_string()))?;
            Ok(match answer.fallback {
                None => json!({ "via": name, "reply": answer.value }),
                Some(_) => {
                    let mut v = answer.value;
                    v["via"] = json!(name);
                    v
                }
            })
        }
    });
}

/// Registers the `sink` service, a consumer for deliveries (`peerwire deliver`,
/// `Node::deliver`):
/// - `sink.take` (request or notification): handles each message id once (an
///   idempotent consumer over a processed-messages table: `--dedup FILE`, else memory),
///   printing one JSON line per message handled, `{"node", "id", "key", "value"}`, and
///   answering `{"duplicate": false}`; a copy of a message already handled prints
///   nothing and is answered `{"duplicate": true}`.
pub fn serve_sink(node: &Node, args: &SinkArgs) -> anyhow::Result<()> {
    use peerwire::dedup::{DiskTable, Idempotent, MemoryTable, Outcome, ProcessedMessages};
    fn register<S: ProcessedMessages>(node: &Node, table: S) {
        let seen = Idempotent::new(table);
        let name = node.name().to_string();
        node.handle("sink.take", Version::new(1, 0), move |v: Value, ctx| {
            let (seen, name) = (seen.clone(), name.clone());
            async move {
                let id = ctx.message_id;
                let line =
                    json!({ "node": name, "id": id.to_string(), "key": ctx.shard_key, "value": v });
                let outcome = seen
                    .run(id, || async {
                        super::logging::stdout().line(&line.to_string());
                        Ok::<_, HandlerError>(())
                    })
                    .await?;
                Ok(json!({ "duplicate": outcome == Outcome::Duplicate }))
            }
        });
    }
    match &args.dedup {
        Some(path) => register(
            node,
            DiskTable::open(path, Duration::from_secs(7 * 24 * 3600))
                .map_err(|e| anyhow::anyhow!("--dedup {}: {e}", path.display()))?,
        ),
        None => register(node, MemoryTable::new(1_000_000, Duration::from_secs(3600))),
    }
    Ok(())
}
