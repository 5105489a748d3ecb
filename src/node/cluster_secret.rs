//! A cluster secret: what every member of one cluster holds (see [`ClusterSecret`]).
//!
//! This module owns the secret, its file format and the derivation. It never touches a
//! socket; the transport's [`Curve::cluster`](crate::transport::curve::Curve::cluster)
//! does the handshakes with the derived keys.

use std::fmt;
use std::io::Write;
use std::path::Path;

use zeroize::Zeroizing;

use crate::transport::curve::{check_private, create_new, decode_key, encode_key, CurveKeys};

/// The domain tag of the derivation: a cluster key is never any other key made from the
/// same bytes.
const TAG: &[u8] = b"peerwire cluster key v1\0";

/// 32 random bytes that every member of one cluster holds, from which the CURVE key pair
/// all members' accepting sockets share is derived (see
/// [`NodeBuilder::cluster_secret`](super::NodeBuilder::cluster_secret) and SECURITY.md).
/// `Debug` never shows it, and clones share one copy.
///
/// The derivation is public, so that a peer in another language can join:
///
/// ```text
/// cluster secret key = SHA-256("peerwire cluster key v1" 0x00 || the 32 secret bytes)
/// cluster public key = X25519(cluster secret key, 9)     (libsodium's crypto_scalarmult_base)
/// ```
///
/// A secret file is text, readable by its owner only:
///
/// ```text
/// #   peerwire cluster secret: whoever holds it can join the cluster.
/// #   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.
/// secret = "<the 32 bytes in Z85>"
/// ```
#[derive(Clone)]
pub struct ClusterSecret(std::sync::Arc<Zeroizing<[u8; 32]>>);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// A new random secret (from the operating system's generator).
    pub fn generate() -> Self {
        let keys = CurveKeys::generate();
        // 32 bytes from the OS generator, as a key's secret is made.
        ClusterSecret::from_bytes(*keys.secret())
    }

    /// The secret made of these bytes (which should be random: the cluster is as safe
    /// as they are hard to guess).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ClusterSecret(std::sync::Arc::new(Zeroizing::new(bytes)))
    }

    /// Reads a secret file (as [`write`](Self::write) makes it), refused when anyone
    /// but its owner may read it.
    pub fn read(path: &Path) -> std::io::Result<Self> {
        let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
        let text = Zeroizing::new(std::fs::read_to_string(path)?);
        check_private(path)?;
        let value = text
            .lines()
            .find_map(|l| {
                let (k, v) = l.trim().split_once('=')?;
                (k.trim() == "secret").then(|| v.trim().trim_matches('"'))
            })
            .ok_or_else(|| invalid(format!("{}: no `secret = \"…\"` line", path.display())))?;
        let bytes = Zeroizing::new(
            decode_key(value).map_err(|e| invalid(format!("{}: secret: {e}", path.display())))?,
        );
        Ok(ClusterSecret::from_bytes(*bytes))
    }

    /// Writes the secret to a new file, readable by its owner only (never overwriting
    /// one).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut f = create_new(path, true)?;
        let text = Zeroizing::new(format!(
            "#   peerwire cluster secret: whoever holds it can join the cluster.\n\
             #   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n\
             secret = \"{}\"\n",
            encode_key(&self.0)
        ));
        f.write_all(text.as_bytes())?;
        f.sync_all()
    }

    /// The key pair every member's accepting sockets share.
    pub(crate) fn cluster_keys(&self) -> CurveKeys {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(TAG);
        h.update(&self.0[..]);
        let derived = Zeroizing::new(<[u8; 32]>::from(h.finalize()));
        CurveKeys::from_secret(*derived)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derivation_is_fixed_and_files_round_trip() {
        // The documented derivation, for peers in other languages: a known vector.
        // (computed with Python's hashlib and pyzmq's zmq.curve_public).
        let s = ClusterSecret::from_bytes([7; 32]);
        assert_eq!(
            encode_key(&s.cluster_keys().public()),
            "dZCwoMvoNP><J6p(yU37T]EmC.s6GNwsyickWiXk"
        );
        assert_ne!(
            s.cluster_keys().public(),
            ClusterSecret::from_bytes([8; 32]).cluster_keys().public()
        );
        assert_eq!(format!("{s:?}"), "ClusterSecret(..)");

        let dir = std::env::temp_dir().join(format!("pw-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.secret");
        let _ = std::fs::remove_file(&path);
        s.write(&path).unwrap();
        assert!(s.write(&path).is_err(), "never overwrites");
        let read = ClusterSecret::read(&path).unwrap();
        assert_eq!(read.cluster_keys().public(), s.cluster_keys().public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = ClusterSecret::read(&path).unwrap_err().to_string();
            assert!(e.contains("readable by others"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
