//! The byte streams a connection runs on: TCP, or a Unix domain socket (`ipc://`, as
//! libzmq's ipc transport: the same ZMTP bytes over a stream socket). The handshake and
//! the connection's loop are generic over [`Stream`], so each is compiled once per kind
//! of stream and neither pays for the other.
//!
//! This module owns only that seam and the listener of either kind; it never reads or
//! writes a byte itself.

use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::transport::error::TransportError;
use crate::transport::Endpoint;

/// The address a peer over ipc is accounted under (per-address limits, stats, events):
/// it is a process on this host.
pub(crate) const IPC_PEER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// A connected stream, split after its handshake into a reading half, which only the
/// connection's task uses, and a writing half, which the task shares with the socket's
/// senders (see `writer::WriteSide`).
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The reading half.
    type Read: AsyncRead + Unpin + Send + 'static;
    /// The writing half.
    type Write: WriteHalf;
    /// Both halves, owned. Dropping the writing half shuts the stream down for writing.
    fn into_split(self) -> (Self::Read, Self::Write);
}

/// What any task may do with a writing half: write what the socket takes now, without
/// waiting. Object-safe, so a socket's senders need not know the kind of stream.
pub(crate) trait RawWrite: Send + Sync + 'static {
    /// Writes what the socket takes now, or `WouldBlock`.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// The same for one buffer (`send` rather than `writev`: the kernel does less).
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
}

/// What the connection's task also needs of its writing half: waiting for room.
pub(crate) trait WriteHalf: RawWrite {
    /// Returns once the socket may take more bytes (or has failed).
    fn writable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
}

/// `Stream` and its writing half's traits for a tokio stream type whose owned halves
/// are in module `$m` (`tcp` or `unix`).
macro_rules! stream_impls {
    ($stream:ty, $m:ident) => {
        impl Stream for $stream {
            type Read = tokio::net::$m::OwnedReadHalf;
            type Write = tokio::net::$m::OwnedWriteHalf;
            fn into_split(self) -> (Self::Read, Self::Write) {
                <$stream>::into_split(self)
            }
        }

        impl RawWrite for tokio::net::$m::OwnedWriteHalf {
            fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                tokio::net::$m::OwnedWriteHalf::try_write_vectored(self, bufs)
            }
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                tokio::net::$m::OwnedWriteHalf::try_write(self, buf)
            }
        }

        impl WriteHalf for tokio::net::$m::OwnedWriteHalf {
            fn writable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
                tokio::net::$m::OwnedWriteHalf::writable(self)
            }
        }
    };
}

stream_impls!(TcpStream, tcp);
stream_impls!(UnixStream, unix);

/// A bound listener of either kind. An ipc listener removes its socket file when
/// dropped (as libzmq does when its socket closes).
pub(crate) enum Listener {
    Tcp(TcpListener),
    /// The listener, its path, and the file it made there (device and inode).
    Ipc(UnixListener, PathBuf, Option<(u64, u64)>),
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Only the file this listener made: another socket may have taken the path
        // since (after deciding ours was stale, say).
        if let Listener::Ipc(_, path, Some(made)) = self {
            if file_id(path) == Some(*made) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A file's device and inode.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn ipc_listener(l: UnixListener, path: &Path) -> Listener {
    Listener::Ipc(l, path.to_path_buf(), file_id(path))
}

impl Listener {
    /// Binds `endpoint`. An ipc path whose socket file is left from a process that died
    /// (nobody accepts on it) is taken over; one where a socket still listens is
    /// refused (address in use).
    pub(crate) async fn bind(endpoint: &Endpoint) -> Result<Listener, TransportError> {
        let failed = |source| TransportError::Bind {
            addr: endpoint.to_string(),
            source,
        };
        let Some(path) = endpoint.ipc_path() else {
            return TcpListener::bind((endpoint.host(), endpoint.port()))
                .await
                .map(Listener::Tcp)
                .map_err(failed);
        };
        match UnixListener::bind(path) {
            Ok(l) => Ok(ipc_listener(l, path)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && stale(path).await => {
                std::fs::remove_file(path).map_err(failed)?;
                UnixListener::bind(path)
                    .map(|l| ipc_listener(l, path))
                    .map_err(failed)
            }
            Err(e) => Err(failed(e)),
        }
    }

    /// The bound address (for ipc, [`IPC_PEER`]: it has none).
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr(),
            Listener::Ipc(..) => Ok(IPC_PEER),
        }
    }

    /// The bound endpoint (a TCP port chosen by the system filled in).
    pub(crate) fn local_endpoint(&self) -> io::Result<Endpoint> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(Endpoint::from_addr),
            Listener::Ipc(_, path, _) => Endpoint::parse(&format!("ipc://{}", path.display()))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string())),
        }
    }
}

/// Whether a socket file is left over: something is there, and nobody accepts on it.
async fn stale(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    is_socket
        && matches!(
            UnixStream::connect(path).await,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
        )
}

/// A connection of either kind, before its handshake.
pub(crate) enum Connected {
    Tcp(TcpStream),
    Ipc(UnixStream),
}

impl Connected {
    /// Waits for the next connection on `listener`, and who it is from.
    pub(crate) async fn accept(listener: &Listener) -> io::Result<(Connected, SocketAddr)> {
        match listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, a)| (Connected::Tcp(s), a)),
            Listener::Ipc(l, ..) => l.accept().await.map(|(s, _)| (Connected::Ipc(s), IPC_PEER)),
        }
    }

    /// Connects to `endpoint` (a host name is resolved at each attempt).
    pub(crate) async fn connect(endpoint: &Endpoint) -> io::Result<(Connected, SocketAddr)> {
        match endpoint.ipc_path() {
            Some(path) => Ok((Connected::Ipc(UnixStream::connect(path).await?), IPC_PEER)),
            None => {
                let s = TcpStream::connect((endpoint.host(), endpoint.port())).await?;
                let addr = s.peer_addr()?;
                Ok((Connected::Tcp(s), addr))
            }
        }
    }
}
