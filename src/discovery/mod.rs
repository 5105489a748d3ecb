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

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use mdns_sd::{IfKind, IfPredicate, ServiceDaemon, ServiceEvent, ServiceInfo};
use tracing::{debug, warn};

use crate::codec::{Id, VERSION_MAJOR};
use crate::transport::Endpoint;

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

/// Which interfaces mDNS announces and listens on (IPv4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interfaces {
    /// 127.0.0.0/8 only: nodes on this host (tests, the demo).
    Loopback,
    /// Exactly these interfaces, whatever their kind (a container bridge or a veth is
    /// used when it is named).
    Named(Vec<String>),
    /// Every interface that is up and not loopback, point-to-point, a container bridge
    /// or a veth (see [`is_virtual_name`]): a real LAN.
    Lan,
}

impl std::fmt::Display for Interfaces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Interfaces::Loopback => f.write_str("loopback"),
            Interfaces::Named(n) => write!(f, "interfaces {}", n.join(",")),
            Interfaces::Lan => f.write_str("lan"),
        }
    }
}

/// mDNS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MdnsConfig {
    /// Interfaces to use.
    pub interfaces: Interfaces,
    /// UDP port (5353, the mDNS port, unless testing).
    pub port: u16,
}

impl MdnsConfig {
    /// Loopback only.
    pub fn loopback() -> Self {
        MdnsConfig {
            interfaces: Interfaces::Loopback,
            port: mdns_sd::MDNS_PORT,
        }
    }

    /// Every LAN interface (see [`Interfaces::Lan`]).
    pub fn lan() -> Self {
        MdnsConfig {
            interfaces: Interfaces::Lan,
            port: mdns_sd::MDNS_PORT,
        }
    }

    /// The named interfaces only.
    pub fn interfaces<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        MdnsConfig {
            interfaces: Interfaces::Named(names.into_iter().map(Into::into).collect()),
            port: mdns_sd::MDNS_PORT,
        }
    }

    /// Uses another UDP port than 5353 (every node of a cluster must agree).
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Whether nodes using this selection are reached beyond this host, so must listen
    /// on more than loopback.
    pub fn reaches_other_hosts(&self) -> bool {
        self.interfaces != Interfaces::Loopback
    }
}

/// Interface name prefixes of container bridges, veth pairs, overlay networks and VPNs.
/// In [`Interfaces::Lan`] these are skipped: announcing a node there makes it appear at
/// addresses that other hosts cannot reach, the commonest way discovery "finds" a peer
/// and then cannot connect.
const VIRTUAL_PREFIXES: &[&str] = &[
    "docker",
    "br-",
    "veth",
    "virbr",
    "cni",
    "flannel",
    "cali",
    "weave",
    "vxlan",
    "podman",
    "lxc",
    "lxdbr",
    "kube",
    "cilium",
    "tun",
    "tap",
    "wg",
    "zt",
    "tailscale",
    "utun",
];

/// Whether an interface name looks like a container bridge, veth, overlay or VPN.
pub fn is_virtual_name(name: &str) -> bool {
    VIRTUAL_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// One address of one interface of this host, and whether mDNS uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceChoice {
    /// Interface name.
    pub name: String,
    /// The address.
    pub addr: IpAddr,
    /// Its netmask, for an IPv4 address.
    pub netmask: Option<std::net::Ipv4Addr>,
    /// Whether mDNS announces and listens there.
    pub used: bool,
    /// Why (or why not).
    pub why: &'static str,
}

fn choose(
    sel: &Interfaces,
    name: &str,
    ip: IpAddr,
    loopback: bool,
    p2p: bool,
) -> (bool, &'static str) {
    if !ip.is_ipv4() {
        return (false, "IPv6 (peerwire's mDNS uses IPv4)");
    }
    match sel {
        Interfaces::Loopback if loopback => (true, "loopback"),
        Interfaces::Loopback => (false, "not loopback (loopback-only mode)"),
        Interfaces::Named(names) if names.iter().any(|n| n == name) => (true, "named"),
        Interfaces::Named(_) => (false, "not named"),
        Interfaces::Lan if loopback => (false, "loopback"),
        Interfaces::Lan if p2p => (false, "point-to-point (VPN or tunnel)"),
        Interfaces::Lan if is_virtual_name(name) => (
            false,
            "container bridge, veth or overlay (name it to use it)",
        ),
        Interfaces::Lan => (true, "LAN interface"),
    }
}

/// Every address of every interface, with the decision `sel` makes about it.
pub fn interface_choices(sel: &Interfaces) -> Vec<InterfaceChoice> {
    let mut out: Vec<InterfaceChoice> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| {
            let (used, why) = if i.is_oper_up() {
                choose(sel, &i.name, i.ip(), i.is_loopback(), i.is_p2p())
            } else {
                (false, "down")
            };
            InterfaceChoice {
                name: i.name.clone(),
                addr: i.ip(),
                netmask: match &i.addr {
                    if_addrs::IfAddr::V4(a) => Some(a.netmask),
                    if_addrs::IfAddr::V6(_) => None,
                },
                used,
                why,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.addr.cmp(&b.addr)));
    out
}

/// What a node announces about itself.
#[derive(Debug, Clone)]
pub struct Announcement {
    /// Node id.
    pub node_id: Id,
    /// Node name.
    pub name: String,
    /// Cluster.
    pub cluster: String,
    /// ROUTER port.
    pub router_port: u16,
    /// PUB port.
    pub pub_port: u16,
}

/// What mDNS saw of another node.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Sighting {
    /// An instance was resolved (or changed).
    Up(Seen),
    /// An instance said goodbye or expired.
    Down {
        /// Its instance name.
        instance: String,
    },
    /// Our own announcement came back: multicast goes out and comes in on at least one
    /// selected interface.
    Own,
    /// Browsing started again (see [`Mdns::refresh`]); the instances still cached are
    /// reported again as `Up` right after, so a reader can tell which are gone.
    Refreshed,
}

/// A resolved peerwire instance.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Seen {
    /// mDNS instance name (`name-xxxxxxxx`).
    pub instance: String,
    /// Node id from TXT (`None` if missing or not a UUID).
    pub node_id: Option<Id>,
    /// Node name from TXT.
    pub name: String,
    /// Cluster from TXT.
    pub cluster: String,
    /// Protocol major version from TXT.
    pub version: Option<u8>,
    /// The ROUTER endpoint to dial, if it announced an IPv4 address.
    pub router: Option<Endpoint>,
    /// Every address it announced.
    pub addresses: Vec<IpAddr>,
}

/// The mDNS instance name for a node: its name (at most 40 bytes, cut at a character
/// boundary, dots and spaces replaced) and the last 8 hex digits of its id: under the
/// 63-byte limit of a DNS label, unique enough on one LAN and still readable in
/// `avahi-browse` or `dns-sd -B`.
pub fn instance_name(name: &str, id: Id) -> String {
    let clean: String = truncate(name, 40)
        .chars()
        .map(|c| {
            if c == '.' || c.is_whitespace() {
                '-'
            } else {
                c
            }
        })
        .collect();
    let hex = id.0.simple().to_string();
    format!("{clean}-{}", &hex[hex.len() - 8..])
}

/// An mDNS announcer and browser for one node.
pub struct Mdns {
    daemon: ServiceDaemon,
    fullname: String,
    events: mdns_sd::Receiver<ServiceEvent>,
    /// (address, netmask) of every IPv4 address mDNS uses here: a peer's address in one
    /// of these subnets is preferred (a multi-homed peer announces all of its own).
    local_nets: Vec<(std::net::Ipv4Addr, std::net::Ipv4Addr)>,
    /// Whether any interface in use is loopback (then peers' loopback addresses count).
    loopback: bool,
}

impl Mdns {
    /// Starts announcing `me` and browsing for the other nodes on the selected
    /// interfaces.
    ///
    /// Note: `mdns-sd` joins the mDNS multicast group on every interface as its daemon
    /// starts, before this selection applies; the group join (an IGMP report) is the one
    /// packet that can reach an interface outside the selection. Run the node in a
    /// network namespace where that matters (the demo and the tests do).
    pub fn start(cfg: &MdnsConfig, me: &Announcement) -> Result<Mdns, DiscoveryError> {
        let choices = interface_choices(&cfg.interfaces);
        if !choices.iter().any(|c| c.used) {
            match &cfg.interfaces {
                // A laptop offline or a container before its network is up: mdns-sd
                // checks the interfaces again later and starts on the first that fits.
                Interfaces::Lan => warn!(
                    "mDNS: no LAN interface is up yet; announcing once one comes up \
                     (`peerwire doctor` lists the interfaces)"
                ),
                Interfaces::Named(names) => {
                    let missing: Vec<&String> = names
                        .iter()
                        .filter(|n| !choices.iter().any(|c| &c.name == *n))
                        .collect();
                    let here: Vec<String> = {
                        let mut v: Vec<String> = choices.iter().map(|c| c.name.clone()).collect();
                        v.dedup();
                        v
                    };
                    return Err(DiscoveryError::NoInterface(format!(
                        "{} ({}; interfaces here: {})",
                        cfg.interfaces,
                        if missing.is_empty() {
                            "none has an IPv4 address".to_string()
                        } else {
                            format!(
                                "no interface named {}",
                                missing
                                    .iter()
                                    .map(|s| s.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        },
                        if here.is_empty() {
                            "none".into()
                        } else {
                            here.join(", ")
                        }
                    )));
                }
                Interfaces::Loopback => {
                    return Err(DiscoveryError::NoInterface(cfg.interfaces.to_string()))
                }
            }
        }
        let local_nets: Vec<(std::net::Ipv4Addr, std::net::Ipv4Addr)> = choices
            .iter()
            .filter(|c| c.used)
            .filter_map(|c| match (c.addr, c.netmask) {
                (IpAddr::V4(ip), Some(mask)) => Some((ip, mask)),
                _ => None,
            })
            .collect();
        let loopback = local_nets.iter().any(|(ip, _)| ip.is_loopback());
        let err = |e: mdns_sd::Error| DiscoveryError::Mdns(e.to_string());
        // Everything that can be refused is checked before the daemon (a thread) exists.
        let instance = instance_name(&me.name, me.node_id);
        let host = format!("{instance}.local.");
        let props = [
            ("id", me.node_id.to_string()),
            ("name", truncate(&me.name, 100).to_string()),
            (
                "cluster",
                truncate(&me.cluster, MAX_CLUSTER_LEN).to_string(),
            ),
            ("rp", me.router_port.to_string()),
            ("pp", me.pub_port.to_string()),
            ("v", VERSION_MAJOR.to_string()),
        ];
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            &instance,
            &host,
            "",
            me.router_port,
            &props[..],
        )
        .map_err(err)?
        .enable_addr_auto();
        let daemon = ServiceDaemon::new_with_port(cfg.port).map_err(err)?;
        let fail = |daemon: ServiceDaemon, e: mdns_sd::Error| {
            let _ = daemon.shutdown();
            Err(err(e))
        };
        if let Err(e) = daemon.disable_interface(IfKind::All) {
            return fail(daemon, e);
        }
        let sel = cfg.interfaces.clone();
        if let Err(e) = daemon.enable_interface(IfKind::Predicate(IfPredicate::new(move |i| {
            choose(&sel, &i.name, i.ip(), i.is_loopback(), i.is_p2p()).0
        }))) {
            return fail(daemon, e);
        }
        let fullname = info.get_fullname().to_string();
        if let Err(e) = daemon.register(info) {
            return fail(daemon, e);
        }
        let events = match daemon.browse(SERVICE_TYPE) {
            Ok(ev) => ev,
            Err(e) => return fail(daemon, e),
        };
        debug!(%fullname, interfaces = %cfg.interfaces, "mDNS started");
        Ok(Mdns {
            daemon,
            fullname,
            events,
            local_nets,
            loopback,
        })
    }

    /// This node's own instance, as others see it (`name-xxxxxxxx._peerwire._tcp.local.`).
    pub fn fullname(&self) -> &str {
        &self.fullname
    }

    /// The next sighting. `None` once the daemon has stopped.
    pub async fn next(&mut self) -> Option<Sighting> {
        loop {
            let Ok(ev) = self.events.recv_async().await else {
                // The daemon ends a browse whose channel it found full (a reader that fell
                // behind), and events are lost with it: browse again rather than stop
                // discovering, and say so. It fails only if the daemon itself has stopped.
                warn!("mDNS: browsing again after the event stream ended");
                if !self.refresh() {
                    return None;
                }
                return Some(Sighting::Refreshed);
            };
            match ev {
                ServiceEvent::ServiceResolved(r) if r.fullname == self.fullname => {
                    return Some(Sighting::Own);
                }
                ServiceEvent::ServiceResolved(r) => {
                    return Some(Sighting::Up(self.seen(&r)));
                }
                ServiceEvent::ServiceRemoved(_, fullname) if fullname != self.fullname => {
                    return Some(Sighting::Down {
                        instance: short(&fullname),
                    });
                }
                _ => {}
            }
        }
    }

    fn seen(&self, r: &mdns_sd::ResolvedService) -> Seen {
        let txt = |k: &str| r.txt_properties.get_property_val_str(k).map(str::to_string);
        let mut addresses: Vec<IpAddr> = r.addresses.iter().map(|a| a.to_ip_addr()).collect();
        addresses.sort();
        let ip = pick_address(&addresses, self.loopback, &self.local_nets);
        let port = txt("rp")
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or(r.port);
        Seen {
            instance: short(&r.fullname),
            node_id: txt("id").and_then(|s| s.parse::<uuid::Uuid>().ok()).map(Id),
            name: txt("name").unwrap_or_default(),
            cluster: txt("cluster").unwrap_or_default(),
            version: txt("v").and_then(|v| v.parse().ok()),
            router: ip.map(|ip| Endpoint::from_addr(SocketAddr::new(ip, port))),
            addresses,
        }
    }

    /// Browses again: queries the LAN anew (answers to it reach peers whose records
    /// expired during a long partition) and reports every instance still cached as `Up`.
    /// Returns false if the daemon has stopped.
    pub fn refresh(&mut self) -> bool {
        match self.daemon.browse(SERVICE_TYPE) {
            Ok(ev) => {
                self.events = ev;
                true
            }
            Err(_) => false,
        }
    }

    /// The daemon's counters (queries and responses sent, records cached), for
    /// `peerwire doctor`.
    pub async fn metrics(&self) -> BTreeMap<String, i64> {
        let Ok(rx) = self.daemon.get_metrics() else {
            return BTreeMap::new();
        };
        match tokio::time::timeout(Duration::from_secs(1), rx.recv_async()).await {
            Ok(Ok(m)) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        }
    }

    /// Says goodbye (so the others drop this node at once rather than when its records
    /// expire) and stops the daemon. Bounded: at most about a second.
    pub async fn stop(self) {
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            let _ = tokio::time::timeout(Duration::from_secs(1), rx.recv_async()).await;
        }
        match self.daemon.shutdown() {
            Ok(rx) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), rx.recv_async()).await;
            }
            Err(e) => warn!(error = %e, "mDNS daemon did not stop cleanly"),
        }
    }
}

/// The address to dial among those a peer announced: IPv4, loopback only if we use a
/// loopback interface ourselves. One in a subnet we are on wins, then the first that is
/// not loopback, then the first (the list is sorted, so every node picks the same one).
fn pick_address(
    addresses: &[IpAddr],
    loopback: bool,
    local_nets: &[(std::net::Ipv4Addr, std::net::Ipv4Addr)],
) -> Option<IpAddr> {
    let usable: Vec<IpAddr> = addresses
        .iter()
        .copied()
        .filter(|a| a.is_ipv4() && (loopback || !a.is_loopback()))
        .collect();
    let on_our_subnet = |a: &IpAddr| match a {
        IpAddr::V4(v4) => local_nets.iter().any(|(ip, mask)| {
            u32::from(*v4) & u32::from(*mask) == u32::from(*ip) & u32::from(*mask)
        }),
        IpAddr::V6(_) => false,
    };
    usable
        .iter()
        .copied()
        .find(|a| on_our_subnet(a))
        .or_else(|| usable.iter().copied().find(|a| !a.is_loopback()))
        .or(usable.first().copied())
}

/// `s` cut to at most `max` bytes at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Longest cluster name (bytes): it travels in every TXT record and HELLO.
pub const MAX_CLUSTER_LEN: usize = 64;

fn short(fullname: &str) -> String {
    fullname
        .strip_suffix(SERVICE_TYPE)
        .map(|s| s.trim_end_matches('.'))
        .unwrap_or(fullname)
        .to_string()
}

/// A DNS name whose every address is a peer: `NAME:PORT`, e.g. the headless service
/// `orders.default.svc.cluster.local:5555`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSeed {
    /// Host name.
    pub host: String,
    /// The peers' ROUTER port.
    pub port: u16,
}

impl FromStr for DnsSeed {
    type Err = DiscoveryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DiscoveryError::BadDnsSeed(s.to_string());
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 || host.contains('/') {
            return Err(bad());
        }
        Ok(DnsSeed {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for DnsSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl DnsSeed {
    /// Resolves the name now (the system resolver, on a blocking thread): the ROUTER
    /// endpoints of every address, sorted and without duplicates.
    pub async fn resolve(&self) -> std::io::Result<Vec<Endpoint>> {
        let addrs = tokio::net::lookup_host((self.host.as_str(), self.port)).await?;
        let mut eps: Vec<Endpoint> = addrs.map(Endpoint::from_addr).collect();
        eps.sort();
        eps.dedup();
        Ok(eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_selection() {
        let v4 = IpAddr::from([192, 168, 1, 2]);
        let lo = IpAddr::from([127, 0, 0, 1]);
        assert!(choose(&Interfaces::Lan, "eth0", v4, false, false).0);
        assert!(!choose(&Interfaces::Lan, "lo", lo, true, false).0);
        assert!(!choose(&Interfaces::Lan, "docker0", v4, false, false).0);
        assert!(!choose(&Interfaces::Lan, "veth12ab", v4, false, false).0);
        assert!(!choose(&Interfaces::Lan, "wg0", v4, false, true).0);
        assert!(
            choose(
                &Interfaces::Named(vec!["veth12ab".into()]),
                "veth12ab",
                v4,
                false,
                false
            )
            .0
        );
        assert!(
            !choose(
                &Interfaces::Named(vec!["eth1".into()]),
                "eth0",
                v4,
                false,
                false
            )
            .0
        );
        assert!(choose(&Interfaces::Loopback, "lo", lo, true, false).0);
        assert!(!choose(&Interfaces::Loopback, "eth0", v4, false, false).0);
        let v6: IpAddr = "fe80::1".parse().unwrap();
        assert!(!choose(&Interfaces::Lan, "eth0", v6, false, false).0);
    }

    #[test]
    fn instance_names_are_short_and_clean() {
        let id = Id::new();
        let n = instance_name("orders.eu west", id);
        assert!(n.starts_with("orders-eu-west-"));
        assert_eq!(n.len(), "orders-eu-west-".len() + 8);
        assert!(instance_name(&"x".repeat(100), id).len() <= 49);
        // Bytes, not characters: 40 × "é" is 80 bytes, over a DNS label's 63.
        let n = instance_name(&"é".repeat(40), id);
        assert!(n.len() <= 49, "{}", n.len());
        assert!(n.starts_with("éé"));
        assert_eq!(short(&format!("{n}.{SERVICE_TYPE}")), n);
    }

    #[test]
    fn the_address_on_our_subnet_is_dialled() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let nets = [(
            "10.77.0.1".parse().unwrap(),
            "255.255.255.0".parse().unwrap(),
        )];
        let announced = [a("10.1.0.5"), a("10.77.0.5"), a("127.0.0.1"), a("fe80::1")];
        assert_eq!(pick_address(&announced, false, &nets), Some(a("10.77.0.5")));
        // Nothing on our subnets: the first usable one.
        assert_eq!(pick_address(&announced, false, &[]), Some(a("10.1.0.5")));
        // Loopback mode, or a named `lo`: loopback is our subnet.
        let lo = [("127.0.0.1".parse().unwrap(), "255.0.0.0".parse().unwrap())];
        assert_eq!(pick_address(&announced, true, &lo), Some(a("127.0.0.1")));
        assert_eq!(
            pick_address(&[a("127.0.0.1")], true, &lo),
            Some(a("127.0.0.1"))
        );
        assert_eq!(pick_address(&[a("127.0.0.1")], false, &nets), None);
        assert_eq!(pick_address(&[a("fe80::1")], false, &nets), None);
    }

    #[test]
    fn dns_seeds_parse() {
        let s: DnsSeed = "orders.default.svc.cluster.local:5555".parse().unwrap();
        assert_eq!(s.port, 5555);
        assert_eq!(s.to_string(), "orders.default.svc.cluster.local:5555");
        for bad in [
            "orders",
            "orders:",
            ":5555",
            "orders:0",
            "orders:99999",
            "tcp://x:1",
        ] {
            assert!(bad.parse::<DnsSeed>().is_err(), "{bad}");
        }
    }
}
