//! Output that can never stop a node: its logs, its presence lines and what the demo
//! services print (and, beside it, handing freed memory back: `give_back_memory`).
//!
//! Writing to a pipe nobody drains blocks, and a runtime thread blocked in a write stops
//! serving. So every line a running node writes goes through [`Lines`]: a bounded queue
//! to a thread of its own that does the writing; when the queue is full the line is
//! dropped and counted. Every line is also made one line: control characters that came
//! in a peer's name, target or error message are escaped, so nothing read from the
//! network can forge a log line or drive the terminal. And log events are rate-limited
//! per call site ([`RateLimit`]), with a count of what was suppressed, so a flood of bad
//! messages is not a flood of log lines.
//!
//! (Not tracing-appender's non-blocking writer: its guard prints to stdout with
//! `println!` when the writer thread is stuck, which panics when stdout is closed.)

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::callsite::Identifier;
use tracing::{Event, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// Lines a writer thread may fall behind by before further ones are dropped.
const QUEUED_LINES: usize = 8192;
/// Events one call site may log per window before the rest are suppressed.
const EVENTS_PER_WINDOW: u32 = 20;
/// The rate-limiting window.
const WINDOW: Duration = Duration::from_secs(1);
/// Call sites whose counts are kept; more reset the table (call sites are code, so
/// this is never reached in practice).
const MAX_CALLSITES: usize = 4096;

enum Msg {
    Line(Vec<u8>),
    Flush(SyncSender<()>),
}

/// A lossy, non-blocking line writer. Cloning shares the queue.
#[derive(Clone)]
pub struct Lines {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl Lines {
    /// Starts the writer thread for `sink`.
    fn spawn(name: &str, mut sink: impl Write + Send + 'static) -> Lines {
        let (tx, rx): (SyncSender<Msg>, Receiver<Msg>) = sync_channel(QUEUED_LINES);
        let spawned = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                for msg in rx {
                    match msg {
                        // A closed or failing sink: the line is lost, the node goes on.
                        Msg::Line(l) => {
                            let _ = sink.write_all(&l);
                        }
                        Msg::Flush(done) => {
                            let _ = sink.flush();
                            let _ = done.send(());
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            // Without the thread every line is dropped (and counted): still never blocks.
            let _ = writeln!(std::io::stderr(), "cannot start the {name} writer: {e}");
        }
        Lines {
            tx,
            dropped: Arc::default(),
        }
    }

    /// Queues one line (a newline is added), made one line; drops it if the queue is full.
    pub fn line(&self, s: &str) {
        let mut l = Vec::with_capacity(s.len() + 1);
        one_line(s.as_bytes(), &mut l);
        l.push(b'\n');
        self.send(l);
    }

    fn send(&self, l: Vec<u8>) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.tx.try_send(Msg::Line(l))
        {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Lines dropped so far because the writer had fallen behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    /// Waits up to `within` for what is queued to be written.
    pub fn flush(&self, within: Duration) {
        let (done, wait) = sync_channel(1);
        let deadline = Instant::now() + within;
        let mut msg = Msg::Flush(done);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    msg = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = wait.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// For the tracing subscriber: each formatted event arrives as one `write` of a whole
/// line, which is queued, not written here.
impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        let mut l = Vec::with_capacity(buf.len() + 8);
        one_line(body, &mut l);
        l.push(b'\n');
        self.send(l);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Copies `s` into `out` with every control character but tab and ESC escaped as
/// `\xNN`. ESC is left to tracing-subscriber, which escapes it in field values and uses
/// it for its own colours.
fn one_line(s: &[u8], out: &mut Vec<u8>) {
    for &b in s {
        if (b < 0x20 && b != b'\t' && b != 0x1b) || b == 0x7f {
            let _ = write!(out, "\\x{b:02x}");
        } else {
            out.push(b);
        }
    }
}

/// Escapes control characters (and the like) in a string from the network, for a line
/// of the command's output.
pub fn clean(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped = c.is_control() || ('\u{80}'..='\u{9f}').contains(&c);
            let out: Box<dyn Iterator<Item = char>> = if escaped {
                Box::new(c.escape_default())
            } else {
                Box::new(std::iter::once(c))
            };
            out
        })
        .collect()
}

static STDOUT: OnceLock<Lines> = OnceLock::new();
static STDERR: OnceLock<Lines> = OnceLock::new();

/// The process's non-blocking standard output.
pub fn stdout() -> &'static Lines {
    STDOUT.get_or_init(|| Lines::spawn("stdout-writer", std::io::stdout()))
}

/// The process's non-blocking standard error (logs go there too).
pub fn stderr() -> &'static Lines {
    STDERR.get_or_init(|| Lines::spawn("stderr-writer", std::io::stderr()))
}

/// Reports what the log filter suppressed, then flushes both streams (bounded), at exit.
pub fn flush() {
    if let Some(r) = RATE_LIMIT.get() {
        r.report_suppressed();
    }
    for l in [STDOUT.get(), STDERR.get()].into_iter().flatten() {
        l.flush(Duration::from_millis(500));
    }
}

struct Window {
    meta: &'static Metadata<'static>,
    started: Instant,
    seen: u32,
    suppressed: u64,
}

/// A per-layer filter that lets each call site log at most `EVENTS_PER_WINDOW` events a
/// second; the rest are suppressed and counted, and the count is written when the call
/// site logs again in a later window, or at exit ([`flush`]).
#[derive(Clone, Default)]
pub struct RateLimit {
    sites: Arc<Mutex<HashMap<Identifier, Window>>>,
}

/// The filter in use, for the count of what it suppressed at exit.
static RATE_LIMIT: OnceLock<RateLimit> = OnceLock::new();

impl RateLimit {
    /// The process's filter (one, so that its counts can be reported at exit).
    pub fn global() -> RateLimit {
        RATE_LIMIT.get_or_init(RateLimit::default).clone()
    }

    /// Writes how many lines each call site had suppressed and not yet reported.
    fn report_suppressed(&self) {
        let pending: Vec<(&'static Metadata<'static>, u64)> = self
            .sites
            .lock()
            .values_mut()
            .filter(|w| w.suppressed > 0)
            .map(|w| (w.meta, std::mem::take(&mut w.suppressed)))
            .collect();
        for (meta, n) in pending {
            stderr().line(&suppressed_line(meta, n));
        }
    }
}

fn suppressed_line(meta: &Metadata<'_>, n: u64) -> String {
    format!(
        "{} {}: {n} more like the last were suppressed ({})",
        meta.level(),
        meta.target(),
        meta.name()
    )
}

impl<S> Filter<S> for RateLimit {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        let meta = event.metadata();
        let now = Instant::now();
        let report = {
            let mut sites = self.sites.lock();
            if sites.len() >= MAX_CALLSITES {
                sites.clear();
            }
            let w = sites.entry(meta.callsite()).or_insert(Window {
                meta,
                started: now,
                seen: 0,
                suppressed: 0,
            });
            let mut report = 0;
            if now.duration_since(w.started) >= WINDOW {
                report = std::mem::take(&mut w.suppressed);
                w.started = now;
                w.seen = 0;
            }
            w.seen += 1;
            if w.seen > EVENTS_PER_WINDOW {
                w.suppressed += 1;
                return false;
            }
            report
        };
        if report > 0 {
            stderr().line(&suppressed_line(meta, report));
        }
        true
    }
}

// Not logging, but the same concern: what a long-running node keeps of what it was sent.

/// How often a running node hands freed memory back to the system.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Fixes glibc's trim threshold (128 KiB, its default starting point). Left alone, glibc
/// raises its thresholds after large buffers are freed (a burst of large messages), and
/// then keeps tens of MiB at the top of its per-thread arenas, which `malloc_trim` does
/// not reach: measured, 28 MiB still resident a minute after a 5 s flood, against 8 MiB
/// with the threshold fixed. A no-op elsewhere.
pub fn keep_heap_small() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator tuning; any value is valid for this
        // parameter and it has no preconditions.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
        }
    }
}

/// Hands the heap's free memory back to the system. glibc's allocator keeps what a burst
/// of traffic (an attack, say) freed, so a node's resident memory would stay at its peak;
/// this brings it back near its working set. A no-op elsewhere.
pub async fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // On a blocking thread: trimming a large heap can take milliseconds.
        let _ = tokio::task::spawn_blocking(|| {
            // SAFETY: malloc_trim only returns free pages to the kernel; it touches no
            // memory that is in use and has no preconditions.
            unsafe { libc::malloc_trim(0) }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_escapes_what_could_forge_a_line() {
        let mut out = Vec::new();
        one_line(b"name\nWARN forged\r\x07 ok\ttab", &mut out);
        assert_eq!(out, b"name\\x0aWARN forged\\x0d\\x07 ok\ttab");
        assert_eq!(clean("a\nb\u{1b}[2Jc\u{85}"), "a\\nb\\u{1b}[2Jc\\u{85}");
        assert_eq!(clean("plain é"), "plain é");
    }
}
