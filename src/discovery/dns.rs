//! DNS seeds: a host name whose every address is a peer, resolved again and again (a
//! Kubernetes headless service, say). Resolves names; never connects.

use std::str::FromStr;

use super::DiscoveryError;
use crate::transport::Endpoint;

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
