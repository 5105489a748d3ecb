//! What the latency benchmarks share: histograms, runtimes and Markdown table rows.
#![allow(dead_code)]

use hdrhistogram::Histogram;

/// Interleaved rounds per implementation; each histogram merges its rounds.
pub const ROUNDS: usize = 3;

/// A histogram of nanoseconds, 1 ns to 60 s, 3 significant digits.
pub fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()
}

/// A current-thread runtime, or the multi-thread one (a worker per core).
pub fn runtime(multi: bool) -> tokio::runtime::Runtime {
    if multi {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .unwrap()
}

/// The table cells `p50 | p99 | p99.9 | max | p50 ratio` in µs, the ratio against `base`.
pub fn cells(h: &Histogram<u64>, base: u64) -> String {
    let us = |v: u64| v as f64 / 1000.0;
    format!(
        "{:.1} | {:.1} | {:.1} | {:.1} | {:.2}× |",
        us(h.value_at_quantile(0.5)),
        us(h.value_at_quantile(0.99)),
        us(h.value_at_quantile(0.999)),
        us(h.max()),
        h.value_at_quantile(0.5) as f64 / base as f64
    )
}
