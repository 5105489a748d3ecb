//! The node's series: request/reply and gather latency (back to back or at a fixed
//! rate), notification and pub/sub throughput with loss counted; and what both sides
//! exchange about it.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use peerwire::{CallOptions, GatherEnd, GatherOptions, Node};
use serde::{Deserialize, Serialize};

use super::{Plan, Style};

/// A new histogram: 1 ns to 1 h, 3 significant digits (longer samples are counted as 1 h).
pub(super) fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds")
}

/// Most requests in flight at a fixed rate: past it, the schedule waits for replies (and
/// the wait shows in every later message's latency, measured from its intended time).
const MAX_IN_FLIGHT: usize = 10_000;

/// Waits until `at`, precisely: tokio's timer has a millisecond's grain, so it sleeps
/// to a millisecond before and yields (letting replies in) for the rest, rather than
/// charge a late wake-up to the latency measured from `at`.
pub(super) async fn until(at: Instant) {
    let early = Duration::from_millis(1);
    if let Some(before) = at.checked_sub(early) {
        if Instant::now() < before {
            tokio::time::sleep_until(before.into()).await;
        }
    }
    while Instant::now() < at {
        tokio::task::yield_now().await;
    }
}

/// When messages are sent.
#[derive(Debug, Clone, Copy)]
pub(super) enum Schedule {
    /// The next when the last reply came.
    BackToBack,
    /// At this many per second, whatever the replies do.
    Rate(f64),
}

/// One latency series: every sample (ns) and how long the measured part took.
pub(super) struct Latency {
    pub style: Style,
    pub size: usize,
    pub hist: Histogram<u64>,
    pub elapsed: Duration,
}

impl Latency {
    pub(super) fn new(style: Style, size: usize, hist: Histogram<u64>, elapsed: Duration) -> Self {
        Latency {
            style,
            size,
            hist,
            elapsed,
        }
    }
}

/// What one responder counted of a throughput run (its own clock).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Counts {
    /// Messages received.
    pub received: u64,
    /// Messages it knows it missed (events: gaps in sequence numbers).
    pub missed: u64,
    /// Microseconds from the first to the last message received.
    pub span_us: u64,
}

/// A responder's report (gather `bench.report`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Report {
    pub name: String,
    pub sink: Counts,
    pub events: Counts,
}

/// The responder's raw TCP echo, for the baseline (request `bench.info`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Info {
    pub tcp_port: u16,
    pub id: peerwire::Id,
}

/// One responder's share of a throughput run.
pub(super) struct Throughput {
    pub style: Style,
    pub size: usize,
    pub responder: String,
    pub sent: u64,
    pub counts: Counts,
}

fn opts(plan: &Plan) -> CallOptions {
    CallOptions::timeout(plan.timeout())
}

fn stopped(style: Style, i: u64, total: u64, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!(
        "{}: the responder stopped answering after {i} of {total} messages: {e}",
        style.name()
    )
}

/// Request/reply to `bench.echo`.
pub(super) async fn request(node: &Node, size: usize, plan: &Plan) -> Result<Latency> {
    let payload = Bytes::from(vec![0xA5u8; size]);
    let (warmup, count) = (plan.warmup_for(size), plan.count_for(size));
    let total = warmup + count;
    let mut h = hist();
    let schedule = plan.rate.map_or(Schedule::BackToBack, Schedule::Rate);
    let call = |p: Bytes| async move {
        node.request_with::<_, Bytes>("bench.echo", &p, opts(plan))
            .await
            .map(|b| b.len())
    };
    let measured_from = match schedule {
        Schedule::BackToBack => {
            let mut from = Instant::now();
            for i in 0..total {
                if i == warmup {
                    from = Instant::now();
                }
                let t = Instant::now();
                let n = call(payload.clone())
                    .await
                    .map_err(|e| stopped(Style::Request, i, total, e))?;
                if n != size {
                    bail!("request: a reply of {n} bytes to a request of {size}");
                }
                if i >= warmup {
                    h.saturating_record(t.elapsed().as_nanos() as u64);
                }
            }
            from
        }
        Schedule::Rate(per_second) => {
            // Open loop: each request goes at its intended time; its latency counts
            // from then, so a stall delays (and shows in) every message behind it.
            let start = Instant::now();
            let period = Duration::from_secs_f64(1.0 / per_second);
            let mut in_flight = FuturesUnordered::new();
            let (mut sent, mut done) = (0u64, 0u64);
            while done < total {
                let next = start + period.mul_f64(sent as f64);
                let room = in_flight.len() < MAX_IN_FLIGHT;
                tokio::select! {
                    _ = until(next), if sent < total && room => {
                        let (i, p) = (sent, payload.clone());
                        in_flight.push(async move { (i, next, call(p).await) });
                        sent += 1;
                    }
                    Some((i, at, r)) = in_flight.next() => {
                        let n = r.map_err(|e| stopped(Style::Request, done, total, e))?;
                        if n != size {
                            bail!("request: a reply of {n} bytes to a request of {size}");
                        }
                        if i >= warmup {
                            h.saturating_record(at.elapsed().as_nanos() as u64);
                        }
                        done += 1;
                    }
                }
            }
            start + period.mul_f64(warmup as f64)
        }
    };
    Ok(Latency::new(
        Style::Request,
        size,
        h,
        measured_from.elapsed(),
    ))
}

/// Gather on `bench.gather` until every one of `responders` answered, back to back.
pub(super) async fn gather(
    node: &Node,
    size: usize,
    plan: &Plan,
    responders: usize,
) -> Result<Latency> {
    let payload = Bytes::from(vec![0xA5u8; size]);
    let (warmup, count) = (plan.warmup_for(size), plan.count_for(size));
    let total = warmup + count;
    let mut h = hist();
    let mut from = Instant::now();
    for i in 0..total {
        if i == warmup {
            from = Instant::now();
        }
        let t = Instant::now();
        let g = node
            .gather::<_, u64>(
                "bench.gather",
                &payload,
                GatherOptions::within(plan.timeout()),
            )
            .await
            .map_err(|e| stopped(Style::Gather, i, total, e))?;
        let outcome = g.finish().await;
        let answered = outcome.replies.iter().filter(|r| r.result.is_ok()).count();
        if outcome.end != GatherEnd::AllAnswered || answered < responders {
            bail!(
                "gather: after {i} of {total}, {answered} of {responders} responders answered \
                 within {} ms (silent: {:?})",
                plan.timeout_ms,
                outcome.silent.iter().map(|(_, n)| n).collect::<Vec<_>>()
            );
        }
        if i >= warmup {
            h.saturating_record(t.elapsed().as_nanos() as u64);
        }
    }
    Ok(Latency::new(Style::Gather, size, h, from.elapsed()))
}

/// Every responder's report, once the counts have stopped moving (or `expected` is
/// reached, or the bound passes).
async fn reports(
    node: &Node,
    plan: &Plan,
    responders: usize,
    expected: u64,
) -> Result<Vec<Report>> {
    let deadline = Instant::now() + plan.timeout();
    let (mut last, mut still_since) = (u64::MAX, Instant::now());
    loop {
        // A gather request travels on the PUB behind the events just published, and a
        // subscriber that fell behind loses it with them: ask again until the bound.
        let got = match gather_reports(node, plan, responders).await {
            Ok(got) => got,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let total: u64 = got
            .iter()
            .map(|r| r.sink.received + r.events.received)
            .sum();
        if total != last {
            (last, still_since) = (total, Instant::now());
        }
        let quiet = still_since.elapsed() >= Duration::from_millis(500);
        if total >= expected || quiet || Instant::now() >= deadline {
            return Ok(got);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One `bench.report` or `bench.reset` round: every responder must answer.
async fn gather_reports(node: &Node, plan: &Plan, responders: usize) -> Result<Vec<Report>> {
    let g = node
        .gather::<_, Report>(
            "bench.report",
            &(),
            GatherOptions::within(plan.timeout().min(Duration::from_secs(1))),
        )
        .await
        .map_err(|e| anyhow!("asking the responders for their counts: {e}"))?;
    let outcome = g.finish().await;
    let got: Vec<Report> = outcome
        .replies
        .into_iter()
        .filter_map(|r| r.result.ok())
        .collect();
    if got.len() < responders {
        bail!(
            "only {} of {responders} responders reported their counts",
            got.len()
        );
    }
    Ok(got)
}

/// Zeroes every responder's counts.
async fn reset(node: &Node, plan: &Plan, responders: usize) -> Result<()> {
    let g = node
        .gather::<_, bool>("bench.reset", &(), GatherOptions::within(plan.timeout()))
        .await
        .map_err(|e| anyhow!("resetting the responders' counts: {e}"))?;
    let n = g.finish().await.replies.len();
    if n < responders {
        bail!("only {n} of {responders} responders reset their counts");
    }
    Ok(())
}

/// Notifications to `bench.sink`, back to back (each responder gets its share, round
/// robin): what each received, by its own clock.
pub(super) async fn notify(
    node: &Node,
    size: usize,
    plan: &Plan,
    responders: usize,
) -> Result<Vec<Throughput>> {
    let payload = Bytes::from(vec![0xA5u8; size]);
    let count = plan.count_for(size);
    reset(node, plan, responders).await?;
    for i in 0..count {
        tokio::time::timeout(plan.timeout(), node.notify("bench.sink", &payload))
            .await
            .map_err(|_| stopped(Style::Notify, i, count, "the send queue stayed full"))?
            .map_err(|e| stopped(Style::Notify, i, count, e))?;
    }
    let got = reports(node, plan, responders, count).await?;
    Ok(got
        .into_iter()
        .map(|r| Throughput {
            style: Style::Notify,
            size,
            responder: r.name,
            sent: count,
            counts: r.sink,
        })
        .collect())
}

/// Events on `bench.events.<size>`, back to back: what each subscriber received and
/// missed, by its own clock.
pub(super) async fn pubsub(
    node: &Node,
    size: usize,
    plan: &Plan,
    responders: usize,
) -> Result<Vec<Throughput>> {
    let topic = format!("bench.events.{size}");
    let deadline = Instant::now() + plan.timeout();
    while node.subscribers_of(&topic).len() < responders {
        if Instant::now() >= deadline {
            bail!(
                "pubsub: {} of {responders} responders subscribed to our events",
                node.subscribers_of(&topic).len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let payload = Bytes::from(vec![0xA5u8; size]);
    let count = plan.count_for(size);
    reset(node, plan, responders).await?;
    for _ in 0..count {
        // A subscriber too slow to keep up loses events (counted on both sides).
        node.publish(&topic, &payload)?;
        tokio::task::yield_now().await;
    }
    let got = reports(node, plan, responders, count * responders as u64).await?;
    Ok(got
        .into_iter()
        .map(|r| Throughput {
            style: Style::Pubsub,
            size,
            responder: r.name,
            sent: count,
            counts: r.events,
        })
        .collect())
}
