//! The built-in demo services a node hosts with `peerwire node --serve echo`.

use std::time::{SystemTime, UNIX_EPOCH};

use peerwire::codec::Version;
use peerwire::node::{HandlerError, Node};
use serde_json::{json, Value};

/// Registers the `echo` services:
/// - `echo.echo` (request): returns its input;
/// - `echo.upper` (request): a string, upper-cased;
/// - `echo.log` (notification): prints what it got;
/// - `echo.broadcast` (request): publishes its input as an event on `echo.events` and
///   answers with how many subscribers took it and how many had no room;
/// - `echo.ping` (gather): answers with this node's name and clock.
pub fn serve_echo(node: &Node) {
    let v1 = Version::new(1, 0);
    node.handle("echo.echo", v1, |v: Value, _| async move { Ok(v) });
    node.handle("echo.upper", v1, |v: Value, _| async move {
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
