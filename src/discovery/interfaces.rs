//! Which network interfaces mDNS uses: the selection a user gives ([`Interfaces`]), and
//! the addresses of this host it resolves to. Reads the host's interfaces; never sends.

use std::net::IpAddr;

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
#[non_exhaustive]
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

pub(super) fn choose(
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
}
