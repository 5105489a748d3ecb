//! The connection loop after the handshake: decodes what arrives and puts it in the
//! connection's [`Sink`], answers PINGs, writes what is queued (see `writer`), and
//! watches the peer's silence on the socket's tick.
//!
//! It never blocks one peer on another: when the sink is full it stops reading this
//! connection only, and TCP pushes back on that peer. Each pass of the loop allocates
//! nothing per message beyond what decoding needs.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tracing::debug;

use crate::transport::curve::{CurveReader, CurveSession, MESSAGE_OVERHEAD};
use crate::transport::error::{CloseReason, ProtocolViolation};
use crate::transport::wire::{Command, Decoded, Decoder};
use crate::transport::SocketType;

use super::io::WriteHalf;
use super::writer::{linger, Writer};
use super::{Attached, Inbound, Meter, PeerInfo, Shared, Sink, READ_MIN};

/// Spare room in the read buffer below which the next read gets a fresh chunk.
const READ_LOW: usize = READ_MIN / 4;

/// Most capacity reserved ahead of bytes that actually arrived: a peer announcing a
/// large frame makes us hold at most this much more than it has really sent.
const READ_AHEAD_MAX: usize = 256 * 1024;

/// The connection loop after the handshake. Returns why it ended.
pub(super) async fn run<S: super::io::Stream>(
    stream: S,
    mut rbuf: BytesMut,
    peer: &PeerInfo,
    shared: &Shared,
    att: &Attached,
    meter: &Meter,
    curve: Option<CurveSession>,
) -> CloseReason {
    let opts = &shared.opts;
    let (mut rd, wr) = stream.into_split();
    let wr = Arc::new(wr);
    let side = &att.side;
    let (sealer, mut reader, mut dec) = match curve {
        None => (None, None, Decoder::new(opts.decode_limits())),
        Some(session) => {
            // Boxed frames arrive one per outer frame, each a little larger than what it
            // carries; the reader applies the socket's limits to what they carry.
            let (sealer, opener) = session.split();
            let mut outer = opts.decode_limits();
            outer.max_frame_size = outer.max_frame_size.saturating_add(MESSAGE_OVERHEAD);
            outer.max_message_size = outer.max_frame_size;
            outer.max_frames = 1;
            let reader =
                CurveReader::new(opener, opts.max_message_size, opts.max_frames_per_message);
            (Some(sealer), Some(reader), Decoder::new(outer))
        }
    };
    let installed = side.install(Writer::new(peer.minor, sealer), wr.clone());
    let mut pending: Option<Inbound> = None;
    // The read buffer has been past `READ_AHEAD_MAX` since it was last made fresh.
    let mut grown = false;
    // Whether nothing of a message is buffered (the next byte read starts one), and the
    // socket's tick when the message arriving now began (for the receive budget).
    let mut at_boundary;
    let mut msg_start = shared.ticks();
    let heartbeat = opts.heartbeat_interval.filter(|_| peer.minor >= 1);
    // Accepted connections only: a connecting socket chose its peer, and a quiet ROUTER
    // or PUB at the other end is not an attack on us.
    // Never shorter than two of our PING intervals: a heartbeated peer's PONGs must keep
    // it alive whatever the two settings. Without heartbeats, silence proves nothing (a
    // quiet peer is not asked anything), so there is no idle timeout either. A PUB's
    // subscriber reads what we write and has nothing to say: data it takes (our writes
    // progressing) counts as its activity.
    let idle_limit = opts
        .idle_timeout
        .filter(|_| matches!(shared.socket_type, SocketType::Router | SocketType::Pub))
        .and_then(|idle| opts.heartbeat_interval.map(|ivl| idle.max(ivl * 2)));
    let writes_count = shared.socket_type == SocketType::Pub;
    let mut last_active = Instant::now();
    let mut peer_ttl: Option<Duration> = None;
    let mut last_pong_end = 0u64;
    // Liveness is checked on the socket's periodic tick (see `Shared::tick_period`)
    // rather than by reading the clock on every read or polling a timer on every turn:
    // reads only set `rx_seen`, and the tick turns that into `last_rx`. Silence is
    // therefore detected between `limit` and `limit + 2 ticks` after the last byte.
    let tick = shared.tick_period();
    let mut rx_seen = false;
    let mut tx_seen = false;
    let mut last_rx = Instant::now();
    let mut next_ping = Instant::now() + heartbeat.unwrap_or(Duration::MAX / 4);

    let reason = 'conn: loop {
        // Decode whatever is buffered, unless the sink is full.
        let mut received = 0u64;
        dec.copy_small_frames(grown);
        while pending.is_none() {
            let next = match &mut reader {
                Some(r) => r.decode(&mut dec, &mut rbuf),
                None => dec.decode(&mut rbuf),
            };
            match next {
                Ok(None) => break,
                Ok(Some(Decoded::Message(msg))) => {
                    received += 1;
                    match &att.sink {
                        Sink::Deliver(q) => {
                            let item = Inbound {
                                identity: att.identity.clone(),
                                msg,
                                arrived: None,
                            };
                            if let Err(item) = q.try_push(item) {
                                pending = Some(item);
                            }
                        }
                        Sink::Handler(f, fallback) => {
                            // Behind this connection's declined messages, if any wait:
                            // offering it now could let it overtake them.
                            let declined = match fallback {
                                Some(q) if q.holds_messages() => Err(msg),
                                _ => f(&att.identity, msg),
                            };
                            if let Err(msg) = declined {
                                match fallback {
                                    Some(q) => {
                                        let item = Inbound {
                                            identity: att.identity.clone(),
                                            msg,
                                            arrived: Some(std::time::Instant::now()),
                                        };
                                        if let Err(item) = q.try_push(item) {
                                            pending = Some(item);
                                        }
                                    }
                                    None => {
                                        shared.stats.dropped.fetch_add(1, Relaxed);
                                    }
                                }
                            }
                        }
                        Sink::Subscriptions(subs) => {
                            // ZMTP 3.0 subscription form: a one-frame message starting
                            // with 1 or 0. Other messages from a subscriber mean nothing
                            // to a PUB and are ignored.
                            let f = &msg.frames()[0];
                            if let (1, Some(&kind @ (0 | 1))) = (msg.len(), f.first()) {
                                if let Err(v) = subs.apply(
                                    kind == 1,
                                    &f[1..],
                                    opts.max_subscriptions,
                                    opts.max_subscription_bytes,
                                ) {
                                    break 'conn v.into();
                                }
                            }
                        }
                    }
                }
                Ok(Some(Decoded::Command(c))) => match c {
                    Command::Ping { ttl_ds, context } => {
                        if ttl_ds > 0 {
                            peer_ttl = Some(Duration::from_millis(ttl_ds as u64 * 100));
                        }
                        // At most one unwritten PONG: a peer flooding PINGs while never
                        // reading must not grow our write buffer. Any traffic from us
                        // proves liveness, so skipping a PONG loses nothing.
                        side.with(|w| {
                            if w.written >= last_pong_end {
                                w.command(&Command::Pong(context));
                                w.flush_staging();
                                last_pong_end = w.appended;
                            }
                        });
                    }
                    Command::Pong(_) => {}
                    Command::Error(r) => break 'conn ProtocolViolation::PeerError(r).into(),
                    Command::Subscribe(ref t) | Command::Cancel(ref t) => {
                        let sub = matches!(c, Command::Subscribe(_));
                        if let Sink::Subscriptions(s) = &att.sink {
                            if let Err(v) =
                                s.apply(sub, t, opts.max_subscriptions, opts.max_subscription_bytes)
                            {
                                break 'conn v.into();
                            }
                        }
                    }
                    Command::Ready(_) => {
                        break 'conn ProtocolViolation::Unexpected("second READY").into()
                    }
                    Command::Unknown(name) => {
                        shared.stats.unknown_commands.fetch_add(1, Relaxed);
                        debug!(addr = %peer.addr, command = %name, "unknown command ignored");
                    }
                },
                Err(v) => break 'conn v.into(),
            }
        }
        if received > 0 {
            shared.stats.messages_in.fetch_add(received, Relaxed);
        }
        // A large message leaves its allocation behind in the read buffer (the buffer
        // still points into it after the message is cut out): once little is left, the
        // rest moves to a fresh small buffer so the large one goes with the message. An
        // idle connection never keeps megabytes for what it once received.
        // (Not while a large frame is still coming: it would be reserved again at once.)
        if grown && rbuf.len() < READ_MIN && dec.wanted(rbuf.len()) <= READ_AHEAD_MAX {
            let mut fresh = BytesMut::with_capacity(READ_MIN);
            fresh.extend_from_slice(&rbuf);
            rbuf = fresh;
            grown = false;
        }
        // What this connection holds of a message still arriving: its buffer's capacity
        // (bytes reserved count as much as bytes read) and the complete frames of a
        // multipart message not finished yet.
        let partial = dec.partial_bytes() + reader.as_ref().map_or(0, |r| r.partial_bytes());
        let held = if grown { rbuf.capacity() } else { rbuf.len() } + partial;
        meter.report(shared, held, msg_start, pending.is_some());
        at_boundary = rbuf.is_empty() && partial == 0;
        if att.out.is_interrupted() {
            if meter.is_evicted() {
                let budget = opts.recv_buffer_total_bytes;
                break ProtocolViolation::ReceiveBudget { held, budget }.into();
            }
            linger(&*wr, side, shared, &att.out, opts.linger).await;
            break CloseReason::Shutdown;
        }
        if att.out.take_tick() {
            let now = Instant::now();
            if rx_seen || pending.is_some() {
                last_rx = now;
                last_active = now;
                rx_seen = false;
            }
            if writes_count && std::mem::take(&mut tx_seen) {
                last_active = now;
            }
            let silence_limit = match (heartbeat.map(|_| opts.heartbeat_timeout), peer_ttl) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let silent_for = now.duration_since(last_rx);
            if let Some(limit) = silence_limit {
                if silent_for >= limit {
                    break ProtocolViolation::HeartbeatTimeout.into();
                }
            }
            if idle_limit.is_some_and(|limit| now.duration_since(last_active) >= limit) {
                break ProtocolViolation::IdleTimeout.into();
            }
            if let Some(ivl) = heartbeat {
                if now + tick / 2 >= next_ping {
                    let ttl_ds =
                        (opts.heartbeat_timeout.as_millis() / 100).min(u16::MAX as u128) as u16;
                    side.with(|w| {
                        w.command(&Command::Ping {
                            ttl_ds,
                            context: Bytes::new(),
                        });
                        w.flush_staging();
                    });
                    next_ping = now + ivl;
                }
            }
        }
        // Usually the socket has room for what is queued: writing it now saves a turn of
        // the select below.
        let need_write = match side.write_now(shared, &att.out, false) {
            Ok(f) => {
                tx_seen |= f.progressed;
                f.pending
            }
            Err(e) => break e.into(),
        };
        // A fresh chunk only when what is left of this one is low (or too small for the
        // frame coming): small messages then share a chunk, where reserving a whole
        // chunk after each one would give each its own (an allocation per message, and
        // a whole chunk kept alive by each message held).
        let want = dec.wanted(rbuf.len());
        if rbuf.capacity() - rbuf.len() < want.max(READ_LOW) {
            rbuf.reserve(want.clamp(READ_MIN, READ_AHEAD_MAX.max(rbuf.len())));
        }
        grown |= rbuf.capacity() > READ_AHEAD_MAX;

        tokio::select! {
            biased;
            r = wr.writable(), if need_write => {
                match r.and_then(|()| side.write_now(shared, &att.out, true)) {
                    Ok(f) => tx_seen |= f.progressed,
                    Err(e) => break e.into(),
                }
            },
            r = rd.read_buf(&mut rbuf), if pending.is_none() => match r {
                Ok(0) => break CloseReason::PeerClosed,
                Ok(_) => {
                    rx_seen = true;
                    if at_boundary {
                        // The first bytes of a new message.
                        msg_start = shared.ticks();
                    }
                }
                Err(e) => break e.into(),
            },
            _ = wait_sink(&att.sink), if pending.is_some() => {
                if let Sink::Deliver(q) | Sink::Handler(_, Some(q)) = &att.sink {
                    if let Err(item) = q.try_push(pending.take().expect("pending")) {
                        pending = Some(item);
                    } else {
                        // We were not reading while blocked; that was not the peer's silence.
                        rx_seen = true;
                    }
                }
            },
            // New items to write, a tick or an interrupt (handled at the top of the loop).
            _ = std::future::poll_fn(|cx| att.out.poll_readable(cx, !need_write)) => {},
        }
    };
    // Whatever was not completely written goes back to the queue: a DEALER sends it on
    // its next connection; for other sockets the queue dies with the connection.
    if let Some(mut w) = installed.finish() {
        let unsent = w.inflight.drain(..).map(|(item, _)| item);
        att.out
            .requeue_front(unsent.collect::<Vec<_>>().into_iter());
    }
    if let Some(item) = pending {
        // Received but not deliverable because we are closing: counted, not silent.
        shared.stats.dropped.fetch_add(1, Relaxed);
        drop(item);
    }
    reason
}

async fn wait_sink(sink: &Sink) {
    match sink {
        Sink::Deliver(q) | Sink::Handler(_, Some(q)) => q.writable().await,
        Sink::Handler(_, None) | Sink::Subscriptions(_) => std::future::pending().await,
    }
}
