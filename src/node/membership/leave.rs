//! Leaving: a node that is stopping tells its peers (a HELLO saying so) and waits,
//! bounded, for each to acknowledge it, so that they choose other instances before it
//! stops taking work.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::Membership;
use crate::codec::{Id, Kind};
use crate::transport::Endpoint;

impl Membership {
    /// Tells every peer that this node is leaving (a HELLO saying so, sent now), so
    /// that they choose other instances for new calls, and waits until each peer
    /// connected now has acknowledged it, or `within` passes. Returns whether all did.
    pub(in crate::node) async fn leave(&self, within: Duration) -> bool {
        self.leaving.store(true, Relaxed);
        let (id, msg) = self.hello_envelope(Kind::Hello, Id::NIL);
        let waiting: HashSet<Endpoint> = {
            let st = self.state.lock();
            st.table
                .connected_dealers()
                .filter(|(_, d)| d.try_send(msg.clone()).is_ok())
                .map(|(e, _)| e.clone())
                .collect()
        };
        *self.leave_hello.lock() = Some((id, waiting));
        self.wait_for(within, || {
            self.leave_hello
                .lock()
                .as_ref()
                .is_none_or(|(_, waiting)| waiting.is_empty())
        })
        .await
    }

    /// A HELLO-ACK for `correlation` came on our DEALER to `endpoint`: if it
    /// acknowledges our leaving, that peer knows.
    pub(super) fn leave_acknowledged(&self, endpoint: &Endpoint, correlation: Id) {
        let mut leave = self.leave_hello.lock();
        if let Some((id, waiting)) = leave.as_mut() {
            if *id == correlation && waiting.remove(endpoint) && waiting.is_empty() {
                drop(leave);
                self.note_change();
            }
        }
    }
}
