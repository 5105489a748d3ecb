//! The demo's resilience part: a caller giving up and the callee told (cancellation), an
//! instance that hangs fenced off by its breaker while fallbacks answer, and recovery.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use peerwire::node::{BreakerConfig, BreakerEvent, BreakerState, CallOptions, Node, ServicePolicy};
use tokio::sync::{broadcast, mpsc};

use super::demo::{micros, section, V1};

/// How the demo's client calls `pricing`: a short deadline, a breaker that judges after
/// two calls and probes again after half a second.
pub fn pricing_policy() -> ServicePolicy {
    let breaker = BreakerConfig::default()
        .with_window(4, 2)
        .with_wait_in_open(Duration::from_millis(500))
        .with_probes(1, Duration::from_millis(200));
    ServicePolicy::new()
        .timeout(Duration::from_millis(150))
        .breaker(breaker)
}

/// Registers `pricing.quote` (which hangs while `hung` is set) and `reports.build` (which
/// takes ten seconds, and reports on `stopped` how long it ran if it is stopped first).
pub fn serve_pricing(node: &Node, hung: Arc<AtomicBool>, stopped: mpsc::UnboundedSender<String>) {
    let name = node.name().to_string();
    node.handle("pricing.quote", V1, move |item: String, _| {
        let (hung, name) = (hung.clone(), name.clone());
        async move {
            if hung.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            Ok(format!("{item}: 12.50 from {name}"))
        }
    });
    let name = node.name().to_string();
    node.handle("reports.build", V1, move |_: (), _| {
        // Reports when dropped before the end: the caller's CANCEL stopped it.
        struct Watch(Instant, String, Option<mpsc::UnboundedSender<String>>);
        impl Watch {
            fn finished(&mut self) {
                self.2 = None;
            }
        }
        impl Drop for Watch {
            fn drop(&mut self) {
                if let Some(tx) = self.2.take() {
                    let _ = tx.send(format!(
                        "    {} dropped the handler {} after it started: the caller's CANCEL",
                        self.1,
                        micros(self.0.elapsed())
                    ));
                }
            }
        }
        let mut watch = Watch(Instant::now(), name.clone(), Some(stopped.clone()));
        async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            watch.finished();
            Ok(())
        }
    });
}

/// Part 6 of the demo. `hung` makes the second pricing instance hang.
pub async fn run(
    client: &Node,
    hung: &AtomicBool,
    stopped: &mut mpsc::UnboundedReceiver<String>,
) -> Result<()> {
    section("6. resilience: cancellation, breaker, fallback, recovery");
    if !client
        .wait_for_service("pricing.quote", 2, Duration::from_secs(5))
        .await
    {
        bail!("the client did not discover the pricing instances");
    }
    // Cancellation across the wire.
    let t = Instant::now();
    let r = client
        .request_with::<_, ()>(
            "reports.build",
            &(),
            CallOptions::timeout(Duration::from_millis(100)),
        )
        .await;
    outln!(
        "  client → reports.build (10 s of work) with a 100 ms deadline: {}  ({})",
        r.err().map(|e| e.to_string()).unwrap_or_default(),
        micros(t.elapsed())
    );
    match tokio::time::timeout(Duration::from_secs(2), stopped.recv()).await {
        Ok(Some(line)) => outln!("{line}"),
        _ => bail!("the callee was not told that the caller gave up"),
    }

    // A hung instance: timeouts, then its breaker opens, and fallbacks answer meanwhile.
    hung.store(true, Ordering::SeqCst);
    outln!("  inventory-2 now hangs on pricing.quote; the client's deadline is 150 ms");
    let mut events = client.breaker_events();
    // One call; printed if `show`, or if it reached the recovered instance.
    let quote = |n: usize, show: bool| async move {
        let t = Instant::now();
        let a = client
            .request_or("pricing.quote", "book", CallOptions::default(), |_| {
                "book: 10.00 (fallback: list price)".to_string()
            })
            .await?;
        let why = match &a.fallback {
            Some(e) => format!(" ← {e}"),
            None => String::new(),
        };
        if show || a.value.ends_with("inventory-2") {
            outln!("    call {n}: {}{why}  ({})", a.value, micros(t.elapsed()));
        }
        anyhow::Ok(())
    };
    for n in 1..=6 {
        quote(n, true).await?;
        breaker_news(client, &mut events);
    }

    // Recovery: the instance answers again; after the breaker's wait a probe closes it.
    hung.store(false, Ordering::SeqCst);
    outln!(
        "  inventory-2 recovers; calls go to inventory-1 until its breaker lets a probe through"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut closed = false;
    let mut n = 7;
    while !closed && Instant::now() < deadline {
        quote(n, false).await?;
        n += 1;
        closed = breaker_news(client, &mut events);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !closed {
        bail!("the breaker did not close after the instance recovered");
    }
    Ok(())
}

/// Prints the breaker changes since the last look; whether one closed.
fn breaker_news(node: &Node, events: &mut broadcast::Receiver<BreakerEvent>) -> bool {
    let mut closed = false;
    while let Ok(e) = events.try_recv() {
        let name = node
            .peers()
            .into_iter()
            .find(|p| p.id == e.instance)
            .map(|p| super::logging::clean(&p.name))
            .unwrap_or_else(|| e.instance.to_string());
        outln!(
            "    breaker of pricing at {name}: {:?} → {:?}",
            e.from,
            e.to
        );
        closed |= e.to == BreakerState::Closed;
    }
    closed
}
