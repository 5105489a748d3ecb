//! Same-host peers over Unix domain sockets: a node also accepts its ROUTER's
//! connections at `<dir>/<its id>.sock` (`ipc://`), says so in its HELLO with a *host
//! key*, and a node whose host key is the same dials that socket instead of TCP.
//!
//! The host key is a hash of a random id kept in the directory (`host-id`, made once),
//! the network namespace and the directory's path: two nodes share it only when they see
//! the same directory (the same file in it: two containers with private `/tmp`s do not)
//! and run in one network namespace (nodes in separate namespaces, as on the simulated
//! LAN, keep to TCP and its partitions). It says nothing about the host but that. And
//! where the socket cannot be reached after all, the node falls back to TCP (a DEALER
//! tries the socket, then the TCP endpoint, on every attempt).
//!
//! The directory is the user's own (`$XDG_RUNTIME_DIR/peerwire`, else
//! `/tmp/peerwire-UID`, mode 700, refused if anyone else owns it or can read it), and the
//! socket's name is derived from the peer's node id, never taken from a message: a peer
//! can make a node dial nothing but another node's socket there.
//!
//! This module owns the directory, the key and the paths; it never dials (the
//! membership does, `links.rs`) and never binds (the builder does).

use std::path::PathBuf;

use crate::codec::Id;
use crate::transport::Endpoint;

/// A socket path's limit on Linux (`sun_path`, NUL excluded), less the name.
const MAX_DIR_LEN: usize = 107 - "/0123456789abcdef0123456789abcdef.sock".len();

/// Where this node's and its same-host peers' ipc sockets are.
#[derive(Debug, Clone)]
pub(super) struct LocalIpc {
    dir: PathBuf,
    host_key: String,
}

impl LocalIpc {
    /// The directory and host key for this process, if ipc can be used here (Linux: the
    /// network namespace is readable, and a private directory with its host id exists or
    /// can be made). `None` otherwise: the node keeps to TCP.
    pub(super) fn detect() -> Option<LocalIpc> {
        let netns = std::fs::read_link("/proc/self/ns/net").ok()?;
        let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("peerwire"),
            _ => PathBuf::from(format!("/tmp/peerwire-{}", uid()?)),
        };
        // An absolute UTF-8 path short enough for a socket name (an `XDG_RUNTIME_DIR`
        // that is relative, or `@…`, would not make a valid `ipc://` endpoint).
        let usable =
            dir.is_absolute() && dir.to_str().is_some() && dir.as_os_str().len() <= MAX_DIR_LEN;
        if !usable || !private_dir(&dir) {
            tracing::debug!(dir = %dir.display(), "no ipc for same-host peers: no private directory");
            return None;
        }
        let host_id = host_id(&dir)?;
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"peerwire ipc host v1\0");
        h.update(host_id.as_bytes());
        h.update(b"\0");
        h.update(netns.as_os_str().as_encoded_bytes());
        h.update(b"\0");
        h.update(dir.as_os_str().as_encoded_bytes());
        let digest = h.finalize();
        let host_key = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        sweep(&dir, SWEEP_AGE);
        Some(LocalIpc { dir, host_key })
    }

    /// The key a HELLO carries (PROTOCOL.md, HELLO's `ipc`).
    pub(super) fn host_key(&self) -> &str {
        &self.host_key
    }

    /// The ROUTER socket of the node `id` on this host.
    pub(super) fn endpoint_of(&self, id: Id) -> Endpoint {
        let path = self.dir.join(format!("{}.sock", id.0.simple()));
        Endpoint::parse(&format!("ipc://{}", path.display()))
            .expect("a checked directory and a fixed-length name make a valid path")
    }
}

/// Most entries of the directory looked at when a node starts.
const SWEEP_MAX: usize = 1024;
/// Only sockets at least this old are swept: one just bound may not listen yet (between
/// `bind` and `listen` a connection is refused too).
const SWEEP_AGE: std::time::Duration = std::time::Duration::from_secs(30);

/// Removes the sockets of nodes that died without closing theirs (nobody accepts on
/// them any more), so that crashes do not pile files up. Bounded.
fn sweep(dir: &std::path::Path, min_age: std::time::Duration) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten().take(SWEEP_MAX) {
        let path = entry.path();
        let old_enough = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= min_age));
        let is_node_socket = entry.file_type().is_ok_and(|t| t.is_socket())
            && path.extension().is_some_and(|e| e == "sock")
            && old_enough;
        if is_node_socket && refuses(&path) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Whether nobody accepts on the socket at `path`. Never waits: the connection is
/// attempted without blocking (a live node whose backlog is full says "try again", not
/// "refused", and is kept).
fn refuses(path: &std::path::Path) -> bool {
    use socket2::{Domain, SockAddr, Socket, Type};
    let Ok(sock) = Socket::new(Domain::UNIX, Type::STREAM, None) else {
        return false;
    };
    let Ok(addr) = SockAddr::unix(path) else {
        return false;
    };
    sock.set_nonblocking(true).is_ok()
        && matches!(sock.connect(&addr), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// The random id kept in `dir/host-id` (made by the first node to need it; a node that
/// loses the race to make it reads the winner's).
fn host_id(dir: &std::path::Path) -> Option<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("host-id");
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path);
    if let Ok(mut f) = made {
        let id = format!("{}\n", Id::new().0.simple());
        f.write_all(id.as_bytes()).ok()?;
        f.sync_all().ok()?;
    }
    // Written in one call of 33 bytes: a reader sees all of it or (the maker between
    // open and write) nothing, and then gives up on ipc for this run.
    let id = std::fs::read_to_string(&path).ok()?;
    (id.len() == 33).then(|| id.trim().to_string())
}

/// This process's user id (the owner of `/proc/self`).
fn uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Makes `dir` (mode 700) if missing, and says whether it is ours alone.
fn private_dir(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let _ = std::fs::DirBuilder::new().mode(0o700).create(dir);
    let Some(me) = uid() else { return false };
    std::fs::symlink_metadata(dir)
        .is_ok_and(|m| m.is_dir() && m.uid() == me && m.mode() & 0o077 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_named_by_node_id_in_a_private_directory() {
        let Some(ipc) = LocalIpc::detect() else {
            return; // not Linux, or no private directory: nodes keep to TCP
        };
        let id = Id::new();
        let ep = ipc.endpoint_of(id);
        let path = ep.ipc_path().unwrap();
        assert!(path.starts_with(&ipc.dir));
        assert!(path
            .to_str()
            .unwrap()
            .ends_with(&format!("{}.sock", id.0.simple())));
        assert_eq!(ipc.host_key().len(), 32);
        assert_eq!(LocalIpc::detect().unwrap().host_key(), ipc.host_key());
    }

    #[test]
    fn a_dead_nodes_socket_is_swept_and_a_live_one_kept() {
        // A directory of its own: other tests' nodes bind in the shared one.
        let dir = std::env::temp_dir().join(format!("pw-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (dead, live) = (dir.join("dead.sock"), dir.join("live.sock"));
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        let _listening = std::os::unix::net::UnixListener::bind(&live).unwrap();
        sweep(&dir, SWEEP_AGE);
        assert!(dead.exists(), "too young to be swept");
        sweep(&dir, std::time::Duration::ZERO);
        assert!(!dead.exists());
        assert!(live.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
