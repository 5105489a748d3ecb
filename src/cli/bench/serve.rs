//! `peerwire bench serve`: the responder. A node serving the bench services, counting
//! what it receives, beside a raw TCP echo for the baseline.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::measure::{Counts, Info, Report};
use super::{tcp, V1};
use crate::cli::{NodeArgs, StopSignal};

/// Counts of one kind of message, on this process's clock.
#[derive(Default)]
struct Counter {
    received: u64,
    missed: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Counter {
    fn add(&mut self, missed: u64) {
        let now = Instant::now();
        self.received += 1;
        self.missed += missed;
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    fn counts(&self) -> Counts {
        let span = match (self.first, self.last) {
            (Some(f), Some(l)) => l.duration_since(f).as_micros() as u64,
            _ => 0,
        };
        Counts {
            received: self.received,
            missed: self.missed,
            span_us: span,
        }
    }
}

#[derive(Default)]
struct Tally {
    sink: Counter,
    events: Counter,
}

/// Runs the responder until Ctrl-C or SIGTERM.
pub(super) async fn serve(args: &NodeArgs, name: &str, port: u16) -> Result<()> {
    let mut stop_signal = StopSignal::new();
    let node = Arc::new(
        args.start(args.builder(name, true)?.router_port(port).ipc(false))
            .await?,
    );
    let host = peerwire::Endpoint::parse(&node.endpoint())?
        .socket_addr()
        .map(|a| a.ip())
        .context("the node's endpoint has no address")?;
    let listener = tokio::net::TcpListener::bind((host, 0))
        .await
        .context("binding the raw TCP echo")?;
    let tcp_port = listener.local_addr()?.port();
    let stop = CancellationToken::new();
    let echo = tokio::spawn(tcp::echo_server(listener, stop.clone()));

    let tally = Arc::new(Mutex::new(Tally::default()));
    node.handle("bench.echo", V1, |b: Bytes, _| async move { Ok(b) });
    let t = tally.clone();
    node.handle("bench.sink", V1, move |_: Bytes, _| {
        t.lock().sink.add(0);
        async { Ok(()) }
    });
    let id = node.id();
    node.handle("bench.info", V1, move |(): (), _| async move {
        Ok(Info { tcp_port, id })
    });
    node.handle_gather("bench.gather", V1, |b: Bytes, _| async move {
        Ok(b.len() as u64)
    });
    let (t, me) = (tally.clone(), name.to_string());
    node.handle_gather("bench.report", V1, move |(): (), _| {
        let t = t.lock();
        let report = Report {
            name: me.clone(),
            sink: t.sink.counts(),
            events: t.events.counts(),
        };
        async move { Ok(report) }
    });
    let t = tally.clone();
    node.handle_gather("bench.reset", V1, move |(): (), _| {
        *t.lock() = Tally::default();
        async { Ok(true) }
    });
    let mut events = node.subscribe::<serde::de::IgnoredAny>("bench.events.");
    let t = tally.clone();
    let counting = tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            // A payload that does not decode is still an event received.
            let missed = e.map(|e| e.missed).unwrap_or(0);
            t.lock().events.add(missed);
        }
    });

    crate::cli::print_endpoint(&node);
    errln!(
        "bench responder {name} ({}) ready: node {} and raw TCP echo on {host}:{tcp_port}",
        node.id(),
        node.endpoint()
    );
    stop_signal.recv().await;
    errln!("shutting down");
    stop.cancel();
    counting.abort();
    let _ = echo.await;
    node.shutdown().await;
    Ok(())
}
