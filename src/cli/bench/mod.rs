//! `peerwire bench`: latency and throughput between two processes (on one machine or
//! two), with a raw-TCP ping-pong between the same two processes as the baseline.
//!
//! The responder (`bench serve`) is a node serving `bench.echo` (request/reply),
//! `bench.sink` (notifications, counted), `bench.info` (its raw-TCP echo port),
//! `bench.reset` and the gather topics `bench.gather` and `bench.report`; it subscribes to
//! `bench.events.` and counts what arrives and what it missed (sequence gaps), per
//! publisher. Beside the node it runs a raw TCP echo (length-prefixed frames). The
//! measuring side (`bench run`) is a node too: it finds responders as any command does
//! (`--peer`, DNS, mDNS), then measures each style at each size and prints one table (or
//! `--json`, and a latency plot with `--svg`).
//!
//! Latency is recorded in an HdrHistogram per series. Back to back, a message is sent when
//! the last reply came; at a fixed rate (`--rate`), messages are sent on a schedule
//! whatever the replies do, and each latency is measured from the message's intended send
//! time, so a stall shows in the tail instead of slowing the schedule (no coordinated
//! omission). This module owns the bench protocol between the two sides; it never
//! touches a socket but the raw TCP baseline's.

use std::time::Duration;

use anyhow::{bail, Result};

use super::NodeArgs;

mod measure;
mod report;
mod run;
mod serve;
mod tcp;

/// Version of the bench services (both sides must match).
const V1: peerwire::Version = peerwire::Version::new(1, 0);
/// The largest message the raw TCP echo takes (its frames are length-prefixed).
const MAX_TCP_FRAME: usize = 16 << 20;

/// What `peerwire bench` does.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Be the responder: serve the bench services and a raw TCP echo until Ctrl-C.
    /// Prints its endpoint first (with #KEY when secured), for --peer.
    Serve {
        /// Node name.
        #[arg(long, default_value = "bench-responder")]
        name: String,
        /// ROUTER port (0: any).
        #[arg(long, default_value_t = 0)]
        port: u16,
        #[command(flatten)]
        net: NodeArgs,
    },
    /// Measure against the responders found (--peer, --dns or --mdns).
    Run {
        #[command(flatten)]
        plan: Plan,
        #[command(flatten)]
        net: NodeArgs,
    },
}

/// What to measure, and how.
#[derive(clap::Args, Debug, Clone)]
pub struct Plan {
    /// Styles to measure, comma-separated: tcp (the raw TCP baseline), request,
    /// notify, pubsub, gather.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tcp,request,notify,pubsub,gather"
    )]
    pub styles: Vec<Style>,
    /// Message sizes in bytes, comma-separated (64 to 1 MiB).
    #[arg(long, value_delimiter = ',', default_value = "64,1024,65536,1048576")]
    pub sizes: Vec<usize>,
    /// Messages measured per series (large sizes use fewer: see --max-bytes).
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Messages sent first and not measured, per series.
    #[arg(long, default_value_t = 1_000)]
    pub warmup: u64,
    /// At most this many bytes per series: a size's count is cut to fit (at least 100).
    #[arg(long, default_value_t = 1 << 30)]
    pub max_bytes: u64,
    /// Send at this many messages per second (latency measured from each message's
    /// intended send time) instead of back to back. Latency series only.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Wait for this many responders (gather and pub/sub go to all of them).
    #[arg(long, default_value_t = 1)]
    pub responders: usize,
    /// Give up on a message (and the run) after this many milliseconds without an answer.
    #[arg(long, default_value_t = 5_000)]
    pub timeout_ms: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write the latency distributions (one line per series) as an SVG plot to FILE.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<std::path::PathBuf>,
}

/// A style of interaction measured.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    /// Raw TCP ping-pong between the same two processes: the baseline.
    Tcp,
    /// Node request/reply (`bench.echo`).
    Request,
    /// Notifications (`bench.sink`): throughput, loss counted.
    Notify,
    /// Events (`bench.events.*`): throughput per subscriber, loss counted.
    Pubsub,
    /// Gather to every responder: latency until all answered.
    Gather,
}

impl Style {
    fn name(self) -> &'static str {
        match self {
            Style::Tcp => "tcp",
            Style::Request => "request",
            Style::Notify => "notify",
            Style::Pubsub => "pubsub",
            Style::Gather => "gather",
        }
    }
}

impl Plan {
    fn check(&self) -> Result<()> {
        if self.sizes.is_empty() || self.styles.is_empty() {
            bail!("--sizes and --styles need at least one value each");
        }
        for &s in &self.sizes {
            if !(1..=MAX_TCP_FRAME / 2).contains(&s) {
                bail!("--sizes: {s} is out of range (1 byte to 8 MiB)");
            }
        }
        if self.count == 0 {
            bail!("--count must be at least 1");
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0 && r <= 1e7) {
                bail!("--rate must be between 0 and 10 000 000 messages per second");
            }
        }
        if self.responders == 0 {
            bail!("--responders must be at least 1");
        }
        Ok(())
    }

    /// How many messages of `size` to measure: --count, cut to --max-bytes (never
    /// below 100, nor above --count).
    fn count_for(&self, size: usize) -> u64 {
        let fit = self.max_bytes / size as u64;
        self.count.min(fit.max(100))
    }

    fn warmup_for(&self, size: usize) -> u64 {
        self.warmup.min(self.count_for(size) / 10 + 1)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }
}

/// Runs a `peerwire bench` command.
pub async fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Serve { name, port, net } => serve::serve(&net, &name, port).await,
        BenchCommand::Run { plan, net } => {
            plan.check()?;
            run::run(&net, &plan).await
        }
    }
}
