//! What a bench run prints: a table (or JSON) with p50, p90, p99, p99.9, max and
//! messages per second per series, each latency beside the raw TCP baseline at the same
//! size; and the latency distributions as an SVG percentile plot.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::measure::{Latency, Throughput};
use super::{Plan, Style};

/// Quantiles reported, and their names.
const QUANTILES: [(f64, &str); 4] = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")];

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// Messages per second over the measured part of a series.
fn rate(l: &Latency) -> f64 {
    l.hist.len() as f64 / l.elapsed.as_secs_f64().max(1e-9)
}

/// A series' p50 over the raw TCP baseline's at the same size, if measured.
fn vs_tcp(l: &Latency, all: &[Latency]) -> Option<f64> {
    let tcp = all
        .iter()
        .find(|t| t.style == Style::Tcp && t.size == l.size)?;
    Some(l.hist.value_at_quantile(0.5) as f64 / tcp.hist.value_at_quantile(0.5).max(1) as f64)
}

/// Messages per second a receiver counted, by its own clock.
fn received_rate(t: &Throughput) -> f64 {
    if t.counts.received < 2 {
        return 0.0;
    }
    (t.counts.received - 1) as f64 / (t.counts.span_us as f64 / 1e6).max(1e-9)
}

/// Lost: sent to it and never received. Notifications are shared among the responders
/// (round robin), so a notify row's loss is the run's, over all of them.
fn lost(t: &Throughput, all: &[Throughput]) -> u64 {
    match t.style {
        Style::Notify => {
            let got: u64 = all
                .iter()
                .filter(|o| o.style == Style::Notify && o.size == t.size)
                .map(|o| o.counts.received)
                .sum();
            t.sent.saturating_sub(got)
        }
        _ => t.sent.saturating_sub(t.counts.received),
    }
}

/// The human table, on stdout.
pub(super) fn table(plan: &Plan, latency: &[Latency], throughput: &[Throughput]) {
    let how = match plan.rate {
        Some(r) => format!(
            "tcp and request at {r} msg/s, latency from each message's intended send time; \
             gather back to back"
        ),
        None => "back to back".to_string(),
    };
    if !latency.is_empty() {
        outln!("latency (µs), {how}:");
        outln!("| style | size | count | p50 | p90 | p99 | p99.9 | max | msg/s | p50 vs tcp |");
        outln!("|---|---|---|---|---|---|---|---|---|---|");
        for l in latency {
            let q: Vec<String> = QUANTILES
                .iter()
                .map(|(q, _)| format!("{:.1}", us(l.hist.value_at_quantile(*q))))
                .collect();
            outln!(
                "| {} | {} | {} | {} | {:.1} | {:.0} | {} |",
                l.style.name(),
                l.size,
                l.hist.len(),
                q.join(" | "),
                us(l.hist.max()),
                rate(l),
                vs_tcp(l, latency).map_or("".into(), |r| format!("{r:.2}×"))
            );
        }
    }
    if !throughput.is_empty() {
        outln!("throughput, back to back (each receiver's clock):");
        outln!("| style | size | receiver | sent | received | lost | missed (gaps) | msg/s |");
        outln!("|---|---|---|---|---|---|---|---|");
        for t in throughput {
            outln!(
                "| {} | {} | {} | {} | {} | {} | {} | {:.0} |",
                t.style.name(),
                t.size,
                t.responder.escape_debug(),
                t.sent,
                t.counts.received,
                lost(t, throughput),
                t.counts.missed,
                received_rate(t)
            );
        }
    }
}

/// The same as JSON (one object).
pub(super) fn json(plan: &Plan, latency: &[Latency], throughput: &[Throughput]) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let latency: Vec<Value> = latency
        .iter()
        .map(|l| {
            let mut o = json!({
                "style": l.style,
                "size": l.size,
                "count": l.hist.len(),
                "max_us": us(l.hist.max()),
                "mean_us": l.hist.mean() / 1000.0,
                "msgs_per_s": rate(l),
                "p50_vs_tcp": vs_tcp(l, latency),
            });
            for (q, name) in QUANTILES {
                o[format!("{}_us", name.replace('.', ""))] = json!(us(l.hist.value_at_quantile(q)));
            }
            o
        })
        .collect();
    let throughput: Vec<Value> = throughput
        .iter()
        .map(|t| {
            json!({
                "style": t.style,
                "size": t.size,
                "receiver": t.responder,
                "sent": t.sent,
                "received": t.counts.received,
                "lost": lost(t, throughput),
                "missed": t.counts.missed,
                "msgs_per_s": received_rate(t),
            })
        })
        .collect();
    json!({
        "peerwire": env!("CARGO_PKG_VERSION"),
        "unix_time": now,
        "plan": {
            "styles": plan.styles,
            "sizes": plan.sizes,
            "count": plan.count,
            "warmup": plan.warmup,
            "rate": plan.rate,
            "responders": plan.responders,
        },
        "latency": latency,
        "throughput": throughput,
    })
}

/// The latency distributions as a percentile plot: x is the percentile on a scale of
/// nines (90 %, 99 %, 99.9 %…), y the latency in µs (log scale), one line per series.
pub(super) fn svg(path: &Path, latency: &[Latency]) -> Result<()> {
    use plotters::prelude::*;
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        const NINES: f64 = 5.0;
        let lo = latency
            .iter()
            .map(|l| us(l.hist.min()))
            .fold(f64::MAX, f64::min)
            .max(0.1)
            * 0.8;
        let hi = latency.iter().map(|l| us(l.hist.max())).fold(1.0, f64::max) * 1.25;
        let root = SVGBackend::new(path, (1000, 620)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("peerwire bench: latency by percentile", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..NINES, (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (µs)")
            .x_labels(6)
            .x_label_formatter(&|x| match x.round() as i32 {
                0 => "0%".into(),
                1 => "90%".into(),
                2 => "99%".into(),
                3 => "99.9%".into(),
                4 => "99.99%".into(),
                _ => "99.999%".into(),
            })
            .draw()?;
        for (i, l) in latency.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points: Vec<(f64, f64)> = l
                .hist
                .iter_quantiles(2)
                .map(|v| {
                    let q = v.quantile_iterated_to();
                    let x = if q >= 1.0 {
                        NINES
                    } else {
                        (-(1.0 - q).log10()).min(NINES)
                    };
                    (x, us(v.value_iterated_to()).max(lo))
                })
                .collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(format!("{} {} B", l.style.name(), l.size))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("--svg {}", path.display()))
}
