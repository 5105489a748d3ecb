//! The tasks that make connections: a listener accepting them (ROUTER, PUB) and a
//! connector dialling one endpoint with backoff (DEALER, SUB). Each connection is handed
//! to [`serve`] on its own task (listener) or in turn (connector).
//!
//! They never touch a connection's bytes, and never hold more connections than
//! `max_connections` (listener) or one at a time (connector).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::transport::events::SocketEvent;
use crate::transport::Endpoint;

use super::{serve, Role, Shared};

/// Accepts connections until the socket is cancelled, each served by its own task.
pub(crate) fn spawn_listener(listener: TcpListener, shared: Arc<Shared>, role: Arc<dyn Role>) {
    let tracker = shared.tracker.clone();
    tracker.spawn(async move {
        let live = Arc::new(AtomicUsize::new(0));
        loop {
            let accepted = tokio::select! {
                _ = shared.cancel.cancelled() => break,
                r = listener.accept() => r,
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
            if live.load(Relaxed) >= shared.opts.max_connections {
                shared.stats.refused.fetch_add(1, Relaxed);
                warn!(%addr, max = shared.opts.max_connections, "connection refused: max_connections reached");
                shared.emit(SocketEvent::Refused { addr });
                drop(stream);
                continue;
            }
            live.fetch_add(1, Relaxed);
            shared.stats.accepted.fetch_add(1, Relaxed);
            let (shared2, role2, live2) = (shared.clone(), role.clone(), live.clone());
            shared.tracker.spawn(async move {
                serve(stream, addr, &shared2, &*role2).await;
                live2.fetch_sub(1, Relaxed);
            });
        }
    });
}

/// Connects to `endpoint` and keeps reconnecting, with exponential backoff and jitter,
/// until the socket is cancelled.
/// `stop` ends this connector (it is the socket's token, or a child of it for a SUB's
/// per-endpoint connectors).
pub(crate) fn spawn_connector(
    endpoint: Endpoint,
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
                let stream = TcpStream::connect((endpoint.host(), endpoint.port())).await?;
                let addr = stream.peer_addr()?;
                Ok::<_, std::io::Error>((stream, addr))
            };
            let res = tokio::select! {
                _ = stop.cancelled() => break,
                r = timeout(opts.handshake_timeout, attempt) => r,
            };
            match res {
                Ok(Ok((stream, addr))) => {
                    shared.stats.accepted.fetch_add(1, Relaxed);
                    if serve(stream, addr, &shared, &*role).await {
                        delay = opts.reconnect_initial;
                    }
                }
                Ok(Err(e)) => {
                    debug!(%endpoint, error = %e, "connect failed");
                    shared.emit(SocketEvent::ConnectFailed {
                        endpoint: endpoint.to_string(),
                        error: e.to_string(),
                        refused: e.kind() == std::io::ErrorKind::ConnectionRefused,
                    });
                }
                Err(_) => shared.emit(SocketEvent::ConnectFailed {
                    endpoint: endpoint.to_string(),
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
