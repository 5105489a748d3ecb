//! What every socket handle has in common: its shared state, its incoming queue, and the
//! handle methods built on them (`events`, `stats`, `close`, `shutdown`, and closing on
//! drop), written once here for the four socket types.
//!
//! A handle never touches connections directly: it asks [`Shared`] to close them and
//! waits for its tasks. Nothing here is on a message's path.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::conn::Shared;
use super::events::{SocketEvent, StatsSnapshot};
use super::inbox::Incoming;

/// The part of a socket handle that ends the socket: dropping it closes every
/// connection (without waiting) and the incoming queue, so `recv` returns what is left
/// and then `Closed`.
pub(crate) struct SocketCore {
    shared: Arc<Shared>,
    /// The queue `recv` reads, if the socket type receives (not PUB).
    inbound: Option<Incoming>,
}

impl SocketCore {
    pub fn new(shared: Arc<Shared>, inbound: Option<Incoming>) -> SocketCore {
        SocketCore { shared, inbound }
    }

    /// The socket's shared state (for a listener added after it was bound).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn events(&self) -> broadcast::Receiver<SocketEvent> {
        self.shared.events.subscribe()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Closes every connection, each flushing what is queued for up to the linger time,
    /// waits for the socket's tasks, then closes the incoming queue.
    pub async fn shutdown(&self) {
        self.shared.shutdown().await;
        self.close_inbound();
    }

    fn close_inbound(&self) {
        if let Some(q) = &self.inbound {
            q.close();
        }
    }
}

impl Drop for SocketCore {
    fn drop(&mut self) {
        self.shared.close_all();
        self.close_inbound();
    }
}

/// Writes the handle methods every socket type shares (`events`, `stats`, `close` and
/// the crate-visible `shutdown`) for `$socket`, a struct with a `core: SocketCore`
/// field. The doc comment written before `close` in the invocation documents `close`:
/// what closing means differs by socket type.
///
/// ```text
/// socket_handle_methods!(
///     Publisher,
///     /// Flushes queued messages for up to the linger time and closes every connection.
///     close
/// );
/// ```
macro_rules! socket_handle_methods {
    ($socket:ty, $(#[$close_doc:meta])* close) => {
        impl $socket {
            /// Subscribes to connection events.
            pub fn events(
                &self,
            ) -> tokio::sync::broadcast::Receiver<$crate::transport::SocketEvent> {
                self.core.events()
            }

            /// The socket's counters.
            pub fn stats(&self) -> $crate::transport::StatsSnapshot {
                self.core.stats()
            }

            $(#[$close_doc])*
            pub async fn close(self) {
                self.shutdown().await;
            }

            /// What [`Self::close`] does, for owners that share the socket (the node).
            pub(crate) async fn shutdown(&self) {
                self.core.shutdown().await;
            }
        }
    };
}
pub(crate) use socket_handle_methods;
