//! Endpoints: where a socket binds or connects, parsed once.
//!
//! An [`Endpoint`] is a TCP host and port, or (`ipc://`) the path of a Unix domain
//! socket, as libzmq's ipc transport names one. It is parsed from `tcp://host:port` (or
//! bare `host:port`) or `ipc://path` when a socket is given one, and rendered back the
//! same way for people and for other nodes. Nothing else in the transport formats or
//! parses endpoint strings; sockets connect to `(host, port)` so host names are resolved
//! at each attempt.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use super::error::TransportError;

/// The TCP scheme.
const SCHEME: &str = "tcp://";
/// The Unix domain socket scheme (libzmq's ipc transport).
const IPC: &str = "ipc://";
/// The longest socket path Linux takes (`sun_path` is 108 bytes, NUL included).
const MAX_IPC_PATH: usize = 107;

/// A TCP endpoint: a host (an IP literal or a DNS name) and a port.
///
/// Parsed from `tcp://host:port` or `host:port`; an IPv6 literal is written in brackets
/// (`tcp://[::1]:5555`). Displays as `tcp://host:port`, and compares equal to that
/// string.
///
/// ```
/// use peerwire::transport::Endpoint;
///
/// let ep = Endpoint::parse("tcp://[::1]:5555").unwrap();
/// assert_eq!(ep.host(), "::1");
/// assert_eq!(ep.port(), 5555);
/// assert_eq!(ep.to_string(), "tcp://[::1]:5555");
/// assert_eq!(ep, "tcp://[::1]:5555");
/// assert_eq!(Endpoint::parse("localhost:80").unwrap(), "tcp://localhost:80");
/// let ipc = Endpoint::parse("ipc:///tmp/node.sock").unwrap();
/// assert_eq!(ipc.ipc_path(), Some(std::path::Path::new("/tmp/node.sock")));
/// assert_eq!(ipc.to_string(), "ipc:///tmp/node.sock");
/// assert!(Endpoint::parse("inproc://x").is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// An IP literal in its canonical form (IPv6 without brackets), or a DNS name as
    /// given; empty for an ipc endpoint.
    host: String,
    port: u16,
    /// The socket path of an ipc endpoint.
    path: Option<Box<str>>,
}

impl Endpoint {
    /// Parses `tcp://host:port`, `host:port` or `ipc://path`. An IPv6 host must be in
    /// brackets (`[::1]:80`); IP literals are kept in their canonical form. Other schemes,
    /// a missing or invalid port, an empty host, and an empty, over-long (107 bytes on
    /// Linux) or abstract (`@name`) socket path are refused with
    /// [`TransportError::InvalidEndpoint`].
    pub fn parse(s: &str) -> Result<Endpoint, TransportError> {
        Self::parse_parts(s).ok_or_else(|| TransportError::InvalidEndpoint(s.to_string()))
    }

    fn parse_parts(s: &str) -> Option<Endpoint> {
        if let Some(path) = s.strip_prefix(IPC) {
            let ok = !path.is_empty()
                && path.len() <= MAX_IPC_PATH
                && !path.starts_with('@')
                && !path.contains('\0');
            return ok.then(|| Endpoint {
                host: String::new(),
                port: 0,
                path: Some(path.into()),
            });
        }
        let rest = match s.split_once("://") {
            Some(("tcp", rest)) => rest,
            Some(_) => return None,
            None => s,
        };
        let (host, port) = match rest.strip_prefix('[') {
            Some(bracketed) => {
                let (v6, port) = bracketed.split_once("]:")?;
                (v6.parse::<Ipv6Addr>().ok()?.to_string(), port)
            }
            None => {
                let (host, port) = rest.rsplit_once(':')?;
                // A colon left in the host is an IPv6 literal without brackets: its
                // port cannot be told from its last group.
                if host.is_empty() || host.contains([':', '[', ']', '/']) {
                    return None;
                }
                if host.chars().any(char::is_whitespace) {
                    return None;
                }
                match host.parse::<IpAddr>() {
                    Ok(ip) => (ip.to_string(), port),
                    Err(_) => (host.to_string(), port),
                }
            }
        };
        // Digits only: `u16::from_str` would also take a leading `+`.
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Endpoint {
            host,
            port: port.parse().ok()?,
            path: None,
        })
    }

    /// The endpoint of a socket address.
    pub fn from_addr(addr: SocketAddr) -> Endpoint {
        Endpoint {
            host: addr.ip().to_string(),
            port: addr.port(),
            path: None,
        }
    }

    /// The socket path of an `ipc://` endpoint (`None` for TCP).
    pub fn ipc_path(&self) -> Option<&std::path::Path> {
        self.path.as_deref().map(std::path::Path::new)
    }

    /// The host: an IP literal (IPv6 without brackets) or a DNS name (empty for ipc).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (0 for ipc).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host's IP, when the host is an IP literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// The socket address, when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.ip().map(|ip| SocketAddr::new(ip, self.port))
    }

    /// The same host with another port (an ipc endpoint is returned as it is).
    pub fn with_port(&self, port: u16) -> Endpoint {
        if self.path.is_some() {
            return self.clone();
        }
        Endpoint {
            host: self.host.clone(),
            port,
            path: None,
        }
    }

    /// Whether the host must be written in brackets (an IPv6 literal).
    fn bracketed(&self) -> bool {
        self.host.contains(':')
    }

    /// Whether `s` is exactly this endpoint's display form, without building it.
    fn is_display_form(&self, s: &str) -> bool {
        if let Some(path) = &self.path {
            return s.strip_prefix(IPC) == Some(&**path);
        }
        let Some(rest) = s.strip_prefix(SCHEME) else {
            return false;
        };
        let split = if self.bracketed() {
            rest.strip_prefix('[').and_then(|r| r.split_once("]:"))
        } else {
            rest.rsplit_once(':')
        };
        let Some((host, port)) = split else {
            return false;
        };
        // The display form of a port has no sign and no leading zero.
        host == self.host
            && port.bytes().all(|b| b.is_ascii_digit())
            && (port == "0" || !port.starts_with('0'))
            && port.parse() == Ok(self.port)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            return write!(f, "{IPC}{path}");
        }
        if self.bracketed() {
            write!(f, "{SCHEME}[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{SCHEME}{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for Endpoint {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Endpoint, TransportError> {
        Endpoint::parse(s)
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Endpoint {
        Endpoint::from_addr(addr)
    }
}

impl PartialEq<str> for Endpoint {
    fn eq(&self, other: &str) -> bool {
        self.is_display_form(other)
    }
}

impl PartialEq<&str> for Endpoint {
    fn eq(&self, other: &&str) -> bool {
        self.is_display_form(other)
    }
}

impl PartialEq<String> for Endpoint {
    fn eq(&self, other: &String) -> bool {
        self.is_display_form(other)
    }
}

impl serde::Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Endpoint, D::Error> {
        let s = String::deserialize(d)?;
        Endpoint::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Anything a socket can be given as an endpoint: a string (parsed), an [`Endpoint`]
/// or a socket address.
pub trait IntoEndpoint {
    /// The endpoint, or [`TransportError::InvalidEndpoint`] for a string that is not one.
    fn into_endpoint(self) -> Result<Endpoint, TransportError>;
}

impl IntoEndpoint for &str {
    fn into_endpoint(self) -> Result<Endpoint, TransportError> {
        Endpoint::parse(self)
    }
}

impl IntoEndpoint for String {
    fn into_endpoint(self) -> Result<Endpoint, TransportError> {
        Endpoint::parse(&self)
    }
}

impl IntoEndpoint for &String {
    fn into_endpoint(self) -> Result<Endpoint, TransportError> {
        Endpoint::parse(self)
    }
}

impl IntoEndpoint for Endpoint {
    fn into_endpoint(self) -> Result<Endpoint, TransportError> {
        Ok(self)
    }
}

impl IntoEndpoint for &Endpoint {
    fn into_endpoint(self) -> Result<Endpoint, TransportError> {
        Ok(self.clone())
    }
}

impl IntoEndpoint for SocketAddr {
    fn into_endpoint(self) -> Result<Endpoint, TransportError> {
        Ok(Endpoint::from_addr(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn ipv4_round_trip() {
        let e = ep("tcp://127.0.0.1:5555");
        assert_eq!((e.host(), e.port()), ("127.0.0.1", 5555));
        assert_eq!(e.to_string(), "tcp://127.0.0.1:5555");
        assert_eq!(ep(&e.to_string()), e);
        assert_eq!(ep("127.0.0.1:5555"), e);
        assert_eq!(e.ip(), Some(IpAddr::from([127, 0, 0, 1])));
        assert_eq!(e.socket_addr(), Some("127.0.0.1:5555".parse().unwrap()));
        assert_eq!(Endpoint::from_addr("127.0.0.1:5555".parse().unwrap()), e);
    }

    #[test]
    fn ipv6_round_trip() {
        let e = ep("tcp://[::1]:80");
        assert_eq!((e.host(), e.port()), ("::1", 80));
        assert_eq!(e.to_string(), "tcp://[::1]:80");
        assert_eq!(ep(&e.to_string()), e);
        assert_eq!(ep("[::1]:80"), e);
        // Canonical form, so equal addresses are equal endpoints.
        assert_eq!(ep("[0:0:0:0:0:0:0:1]:80"), e);
        let addr: SocketAddr = "[fe80::1]:7".parse().unwrap();
        let from = Endpoint::from(addr);
        assert_eq!(from.to_string(), "tcp://[fe80::1]:7");
        assert_eq!(from.socket_addr(), Some(addr));
        assert_eq!(ep(&from.to_string()), from);
    }

    #[test]
    fn host_names() {
        let e = ep("tcp://localhost:1");
        assert_eq!((e.host(), e.port()), ("localhost", 1));
        assert_eq!(e.ip(), None);
        assert_eq!(e.socket_addr(), None);
        assert_eq!(e.to_string(), "tcp://localhost:1");
        assert_eq!(ep("orders.svc.local:65535").port(), 65535);
        assert_eq!(e.with_port(9), ep("localhost:9"));
        assert_eq!("tcp://localhost:1".parse::<Endpoint>().unwrap(), e);
    }

    #[test]
    fn bad_inputs() {
        for s in [
            "",
            "tcp://",
            "inproc://x",
            "ipc://",
            "ipc://@abstract",
            "udp://127.0.0.1:5",
            "tcp://host",
            "tcp://:80",
            "tcp://host:",
            "tcp://host:65536",
            "tcp://host:-1",
            "tcp://host:+80",
            "tcp://host:8o",
            "tcp://::1:80",
            "tcp://[::1]",
            "tcp://[::1]80",
            "tcp://[127.0.0.1]:80",
            "tcp://[nothost]:80",
            "tcp://a b:80",
            "tcp://host/x:80",
        ] {
            match Endpoint::parse(s) {
                Err(TransportError::InvalidEndpoint(given)) => assert_eq!(given, s),
                other => panic!("{s:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn compares_with_display_form() {
        let e = ep("127.0.0.1:80");
        assert_eq!(e, "tcp://127.0.0.1:80");
        assert_eq!(e, *"tcp://127.0.0.1:80");
        assert_eq!(e, "tcp://127.0.0.1:80".to_string());
        assert_ne!(e, "127.0.0.1:80");
        assert_ne!(e, "tcp://127.0.0.1:080");
        assert_ne!(e, "tcp://127.0.0.1:81");
        let v6 = ep("[::1]:0");
        assert_eq!(v6, "tcp://[::1]:0");
        assert_ne!(v6, "tcp://::1:0");
    }

    #[test]
    fn into_endpoint() {
        let e = ep("tcp://127.0.0.1:80");
        let addr: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!("127.0.0.1:80".into_endpoint().unwrap(), e);
        assert_eq!(
            String::from("tcp://127.0.0.1:80").into_endpoint().unwrap(),
            e
        );
        assert_eq!((&String::from("127.0.0.1:80")).into_endpoint().unwrap(), e);
        assert_eq!((&e).into_endpoint().unwrap(), e);
        assert_eq!(addr.into_endpoint().unwrap(), e);
        assert_eq!(e.clone().into_endpoint().unwrap(), e);
        assert!("nope".into_endpoint().is_err());
    }

    #[test]
    fn serde_as_display_string() {
        let e = ep("[::1]:5");
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, "\"tcp://[::1]:5\"");
        assert_eq!(serde_json::from_str::<Endpoint>(&json).unwrap(), e);
        assert!(serde_json::from_str::<Endpoint>("\"inproc://x\"").is_err());
        let ipc = ep("ipc:///run/x.sock");
        let json = serde_json::to_string(&ipc).unwrap();
        assert_eq!(json, "\"ipc:///run/x.sock\"");
        assert_eq!(serde_json::from_str::<Endpoint>(&json).unwrap(), ipc);
        assert_eq!((ipc.host(), ipc.port(), ipc.ip()), ("", 0, None));
    }
}
