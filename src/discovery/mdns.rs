//! mDNS: announcing this node as one instance of [`SERVICE_TYPE`] with a small TXT
//! record, browsing for the others, and turning what `mdns-sd` reports into
//! [`Sighting`]s. The only module of the crate that uses `mdns-sd`. It never connects to
//! a peer and never spawns a task: the node drives [`Mdns::next`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mdns_sd::{IfKind, IfPredicate, ServiceDaemon, ServiceEvent, ServiceInfo};
use tracing::{debug, warn};

use super::interfaces::{choose, interface_choices, Interfaces};
use super::{DiscoveryError, MdnsConfig, SERVICE_TYPE};
use crate::codec::Id;
use crate::codec::VERSION_MAJOR;
use crate::transport::Endpoint;

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
    /// A secured node's public key (TXT `pk`, Z85), so that peers can dial it.
    pub key: Option<[u8; 32]>,
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
    /// A secured node's public key, from TXT `pk` (`None` if missing or not a key).
    pub key: Option<[u8; 32]>,
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
        let mut props = vec![
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
        if let Some(k) = &me.key {
            props.push(("pk", crate::transport::curve::encode_key(k)));
        }
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
            key: txt("pk").and_then(|k| crate::transport::curve::decode_key(&k).ok()),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
