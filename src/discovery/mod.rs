//! Discovery: where the ROUTER endpoints of other nodes come from.
//!
//! Three sources, usable alone or together:
//! - **mDNS** ([`Mdns`]): each node announces one instance of [`SERVICE_TYPE`] on the
//!   interfaces chosen by [`Interfaces`], with a small TXT record (node id, name, cluster,
//!   ports, protocol version), and browses for the others. This module is the only one
//!   that uses `mdns-sd`.
//! - **static seeds**: endpoints given to the node builder (nothing to do here).
//! - **DNS names** ([`DnsSeed`]): a host name resolved again and again, every address a
//!   peer (a Kubernetes headless service, say).
//!
//! This module owns interface selection, the TXT record format and the translation of
//! mDNS events into [`Sighting`]s. It never connects to a peer, never keeps the peer table
//! and never spawns a task: the node drives [`Mdns::next`] and [`DnsSeed::resolve`] from
//! its own loops and decides what a sighting means (the service catalog travels in the
//! HELLO, not in TXT).

mod dns;
mod interfaces;
mod mdns;

use crate::codec::VERSION_MAJOR;

pub use dns::DnsSeed;
pub use interfaces::{interface_choices, is_virtual_name, InterfaceChoice, Interfaces, MdnsConfig};
pub use mdns::{instance_name, Announcement, Mdns, Seen, Sighting, MAX_CLUSTER_LEN};

/// The protocol major version as announced in TXT (`v`).
pub const VERSION_MAJOR_TXT: u8 = VERSION_MAJOR;

/// The DNS-SD service type every peerwire node announces.
pub const SERVICE_TYPE: &str = "_peerwire._tcp.local.";

/// Errors of the discovery sources.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The mDNS daemon could not start or refused a command.
    #[error("mDNS: {0}")]
    Mdns(String),
    /// No interface of this host matches the selection.
    #[error("mDNS: no usable interface for {0}")]
    NoInterface(String),
    /// A DNS seed is not `NAME:PORT`.
    #[error("bad DNS seed {0:?}: expected NAME:PORT")]
    BadDnsSeed(String),
}
