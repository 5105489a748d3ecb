//! The raw TCP baseline: an echo of length-prefixed frames (a 4-byte big-endian length,
//! then that many bytes) on the responder, and the ping-pong that measures it on the
//! measuring side, between the same two processes as the node's series.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::measure::{hist, Latency, Schedule};
use super::{Style, MAX_TCP_FRAME};

/// At most this many echo connections at once: each may hold a frame being received.
const MAX_CONNECTIONS: usize = 16;

/// Serves the echo until `stop`.
pub(super) async fn echo_server(listener: TcpListener, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, peer)) = accepted else {
            // Out of descriptors, say: wait a little rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "bench TCP echo: too many connections; refused");
            continue;
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                r = echo_connection(stream) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "bench TCP echo connection ended: {e}");
                    }
                }
            }
            drop(slot);
        });
    }
}

/// An echo connection silent this long is closed (its slot is for a measuring side).
const IDLE: Duration = Duration::from_secs(60);

async fn echo_connection(mut stream: TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::new();
    loop {
        let len = match tokio::time::timeout(IDLE, stream.read_u32()).await {
            Err(_) => bail!("idle for {IDLE:?}"),
            Ok(Ok(n)) => n as usize,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e.into()),
        };
        if len > MAX_TCP_FRAME {
            bail!("a frame of {len} bytes (at most {MAX_TCP_FRAME})");
        }
        // Grown as the bytes arrive, not on the length's word.
        buf.clear();
        buf.extend_from_slice(&(len as u32).to_be_bytes());
        let mut left = len;
        let mut chunk = [0u8; 64 * 1024];
        while left > 0 {
            let n = tokio::time::timeout(IDLE, stream.read(&mut chunk[..left.min(64 * 1024)]))
                .await
                .map_err(|_| anyhow!("idle for {IDLE:?} in the middle of a frame"))??;
            if n == 0 {
                bail!("closed in the middle of a frame");
            }
            buf.extend_from_slice(&chunk[..n]);
            left -= n;
        }
        stream.write_all(&buf).await?;
        if buf.capacity() > 4 << 20 {
            buf = Vec::new();
        }
    }
}

/// Ping-pong of `size`-byte frames with the echo at `addr`.
pub(super) async fn pingpong(
    addr: SocketAddr,
    size: usize,
    warmup: u64,
    count: u64,
    schedule: Schedule,
    timeout: Duration,
) -> Result<Latency> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("tcp: connecting to the echo at {addr} timed out"))?
        .with_context(|| format!("tcp: connecting to the echo at {addr}"))?;
    stream.set_nodelay(true)?;
    let mut frame = Vec::with_capacity(4 + size);
    frame.extend_from_slice(&(size as u32).to_be_bytes());
    frame.resize(4 + size, 0xA5);
    match schedule {
        Schedule::BackToBack => back_to_back(stream, &frame, warmup, count, timeout).await,
        Schedule::Rate(per_second) => {
            at_rate(stream, frame, warmup, count, per_second, timeout).await
        }
    }
}

async fn back_to_back(
    mut stream: TcpStream,
    frame: &[u8],
    warmup: u64,
    count: u64,
    timeout: Duration,
) -> Result<Latency> {
    let mut h = hist();
    let mut back = vec![0u8; frame.len()];
    let mut started = Instant::now();
    for i in 0..warmup + count {
        if i == warmup {
            started = Instant::now();
        }
        let t = Instant::now();
        let round = async {
            stream.write_all(frame).await?;
            stream.read_exact(&mut back).await
        };
        tokio::time::timeout(timeout, round)
            .await
            .map_err(|_| stopped(i, warmup + count, "timed out"))?
            .map_err(|e| stopped(i, warmup + count, &e.to_string()))?;
        if i >= warmup {
            h.saturating_record(t.elapsed().as_nanos() as u64);
        }
    }
    Ok(Latency::new(
        Style::Tcp,
        frame.len() - 4,
        h,
        started.elapsed(),
    ))
}

/// Open loop: a writer sends on the schedule whatever the replies do; the reader takes
/// the replies (in order: one TCP stream) and measures each from its intended send time.
async fn at_rate(
    stream: TcpStream,
    frame: Vec<u8>,
    warmup: u64,
    count: u64,
    per_second: f64,
    timeout: Duration,
) -> Result<Latency> {
    let (mut rd, mut wr) = stream.into_split();
    let total = warmup + count;
    let (tx, mut intended) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let start = Instant::now();
    let period = Duration::from_secs_f64(1.0 / per_second);
    let size = frame.len() - 4;
    let writer = tokio::spawn(async move {
        for i in 0..total {
            let at = start + period.mul_f64(i as f64);
            super::measure::until(at).await;
            if wr.write_all(&frame).await.is_err() || tx.send(at).is_err() {
                return;
            }
        }
    });
    let mut h = hist();
    let result = async {
        let mut buf = Vec::new();
        let mut measured_from = start;
        for i in 0..total {
            let at = tokio::time::timeout(timeout + period, intended.recv())
                .await
                .map_err(|_| stopped(i, total, "the sender stalled"))?
                .ok_or_else(|| stopped(i, total, "the connection closed"))?;
            if i == warmup {
                measured_from = at;
            }
            let read = async {
                // An echo answers what it was sent: nothing else is read (nor allocated).
                let len = rd.read_u32().await? as usize;
                if len != size {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("an echo of {len} bytes to {size}"),
                    ));
                }
                buf.resize(len, 0);
                rd.read_exact(&mut buf).await.map(|_| ())
            };
            tokio::time::timeout(timeout, read)
                .await
                .map_err(|_| stopped(i, total, "timed out"))?
                .map_err(|e| stopped(i, total, &e.to_string()))?;
            if i >= warmup {
                h.saturating_record(at.elapsed().as_nanos() as u64);
            }
        }
        Ok::<_, anyhow::Error>(measured_from.elapsed())
    }
    .await;
    writer.abort();
    Ok(Latency::new(Style::Tcp, size, h, result?))
}

fn stopped(i: u64, total: u64, why: &str) -> anyhow::Error {
    anyhow!("tcp: the responder stopped answering after {i} of {total} messages ({why})")
}
