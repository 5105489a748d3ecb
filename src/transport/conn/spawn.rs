//! The tasks that make connections: a listener accepting them (ROUTER, PUB) and a
//! connector dialling one endpoint with backoff (DEALER, SUB). Each connection is handed
//! to [`serve`] on its own task (listener) or in turn (connector).
//!
//! They never touch a connection's bytes, and never hold more connections than
//! `max_connections` in total, `max_connections_per_source` from one address or
//! `max_handshakes_per_source` from one address still in the handshake (listener), or
//! one at a time (connector).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::transport::events::SocketEvent;
use crate::transport::Endpoint;

use super::io::{Connected, Listener};
use super::{serve, Role, Shared};

/// The connections of one listener by source address: (live, still in the handshake).
type Sources = Arc<Mutex<HashMap<IpAddr, (usize, usize)>>>;

/// One accepted connection's place in its listener's counts, given back when dropped
/// (however its task ends).
pub(crate) struct Admitted {
    sources: Sources,
    live: Arc<AtomicUsize>,
    ip: IpAddr,
    handshaking: bool,
}

impl Admitted {
    /// The handshake completed: the connection no longer counts as one in progress.
    pub(crate) fn handshaken(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            if let Some(e) = self.sources.lock().get_mut(&self.ip) {
                e.1 -= 1;
            }
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Relaxed);
        let mut sources = self.sources.lock();
        if let Some(e) = sources.get_mut(&self.ip) {
            e.0 -= 1;
            if self.handshaking {
                e.1 -= 1;
            }
            if e.0 == 0 {
                sources.remove(&self.ip);
            }
        }
    }
}

/// Why a connection was refused at accept.
fn over_limit(shared: &Shared, live: usize, from_source: (usize, usize)) -> Option<&'static str> {
    let opts = &shared.opts;
    if live >= opts.max_connections {
        Some("max_connections reached")
    } else if from_source.0 >= opts.max_connections_per_source {
        Some("max_connections_per_source reached for its address")
    } else if from_source.1 >= opts.max_handshakes_per_source {
        Some("max_handshakes_per_source reached for its address")
    } else {
        None
    }
}

/// At most one warning a second about refused connections, with the count of those not
/// logged: a flood of connections must not become a flood of log lines.
struct RefusalLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    fn refused(&mut self, addr: SocketAddr, why: &str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        self.last = Some(now);
        warn!(%addr, why, suppressed, "connection refused");
    }
}

/// Accepts connections until the socket is cancelled, each served by its own task,
/// within the limits in total, per source address, and per source address still in the
/// handshake.
pub(crate) fn spawn_listener(listener: Listener, shared: Arc<Shared>, role: Arc<dyn Role>) {
    let tracker = shared.tracker.clone();
    tracker.spawn(async move {
        let live = Arc::new(AtomicUsize::new(0));
        let sources: Sources = Arc::default();
        let mut log = RefusalLog {
            last: None,
            suppressed: 0,
        };
        loop {
            let accepted = tokio::select! {
                _ = shared.cancel.cancelled() => break,
                r = Connected::accept(&listener) => r,
            };
            let (stream, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = shared.cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            };
            let admitted = {
                let source = crate::transport::source_key(addr.ip());
                let mut by_ip = sources.lock();
                let counts = by_ip.get(&source).copied().unwrap_or_default();
                match over_limit(&shared, live.load(Relaxed), counts) {
                    Some(why) => Err(why),
                    None => {
                        let e = by_ip.entry(source).or_default();
                        e.0 += 1;
                        e.1 += 1;
                        live.fetch_add(1, Relaxed);
                        Ok(Admitted {
                            sources: sources.clone(),
                            live: live.clone(),
                            ip: source,
                            handshaking: true,
                        })
                    }
                }
            };
            let mut admitted = match admitted {
                Ok(a) => a,
                Err(why) => {
                    shared.stats.refused.fetch_add(1, Relaxed);
                    log.refused(addr, why);
                    shared.emit(SocketEvent::Refused { addr });
                    drop(stream);
                    continue;
                }
            };
            shared.stats.accepted.fetch_add(1, Relaxed);
            let (shared2, role2) = (shared.clone(), role.clone());
            shared.tracker.spawn(async move {
                serve_either(stream, addr, &shared2, &*role2, Some(&mut admitted), None).await;
                drop(admitted);
            });
        }
    });
}

/// Connects to the first of `endpoints` that can be reached (each attempt tries them in
/// order: a peer's ipc socket, then its TCP endpoint) and keeps reconnecting, with
/// exponential backoff and jitter, until the socket is cancelled.
/// `stop` ends this connector (it is the socket's token, or a child of it for a SUB's
/// per-endpoint connectors).
pub(crate) fn spawn_connector(
    endpoints: Vec<Endpoint>,
    shared: Arc<Shared>,
    role: Arc<dyn Role>,
    stop: CancellationToken,
) {
    let tracker = shared.tracker.clone();
    tracker.spawn(async move {
        let opts = &shared.opts;
        let mut delay = opts.reconnect_initial;
        loop {
            let attempt = async {
                let mut failed = None;
                for endpoint in &endpoints {
                    match Connected::connect(endpoint).await {
                        Ok((conn, addr)) => return Ok((conn, addr, endpoint)),
                        Err(e) => failed = Some((e, endpoint)),
                    }
                }
                Err(failed.expect("at least one endpoint"))
            };
            let res = tokio::select! {
                _ = stop.cancelled() => break,
                r = timeout(opts.handshake_timeout, attempt) => r,
            };
            // (What failed is said of the last endpoint tried: the one always reachable
            // if any is, its TCP endpoint.)
            let last = endpoints.last().expect("at least one endpoint");
            match res {
                Ok(Ok((stream, addr, endpoint))) => {
                    shared.stats.accepted.fetch_add(1, Relaxed);
                    if serve_either(stream, addr, &shared, &*role, None, Some(endpoint)).await {
                        delay = opts.reconnect_initial;
                    }
                }
                Ok(Err((e, endpoint))) => {
                    debug!(%endpoint, error = %e, "connect failed");
                    shared.emit(SocketEvent::ConnectFailed {
                        endpoint: endpoint.to_string(),
                        error: e.to_string(),
                        refused: e.kind() == std::io::ErrorKind::ConnectionRefused,
                    });
                }
                Err(_) => shared.emit(SocketEvent::ConnectFailed {
                    endpoint: last.to_string(),
                    error: "connect timed out".into(),
                    refused: false,
                }),
            }
            if stop.is_cancelled() {
                break;
            }
            // Jitter in [0.5, 1.0) of the delay spreads out reconnect storms.
            let wait = delay.mul_f64(0.5 + fastrand::f64() * 0.5);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            delay = (delay * 2).min(opts.reconnect_max);
        }
    });
}

/// Send and receive buffer asked for an ipc connection (the kernel caps it at its
/// `wmem_max`/`rmem_max`).
const IPC_BUFFER: usize = 1 << 20;

/// [`serve`] for a connection of either kind (each kind's handshake and loop are their
/// own code: see `io`).
async fn serve_either(
    conn: Connected,
    addr: SocketAddr,
    shared: &Arc<Shared>,
    role: &dyn Role,
    admitted: Option<&mut Admitted>,
    dialled: Option<&Endpoint>,
) -> bool {
    match conn {
        Connected::Tcp(stream) => {
            // Small messages go out at once (ZeroMQ does the same).
            let _ = stream.set_nodelay(true);
            serve(stream, addr, shared, role, admitted, dialled).await
        }
        Connected::Ipc(stream) => {
            // Unix sockets' default buffers (about 200 KiB) make a large message take
            // many reads and wake-ups; loopback TCP's grow to megabytes by themselves.
            let sock = socket2::SockRef::from(&stream);
            let _ = sock.set_send_buffer_size(IPC_BUFFER);
            let _ = sock.set_recv_buffer_size(IPC_BUFFER);
            serve(stream, addr, shared, role, admitted, dialled).await
        }
    }
}
