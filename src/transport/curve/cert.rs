//! Key files in ZeroMQ's certificate format (ZPL, as czmq's `zcert` and pyzmq's
//! `zmq.auth.create_certificates` write them), so that keys move between peerwire and
//! libzmq tools unchanged:
//!
//! ```text
//! #   ZeroMQ CURVE **Secret** Certificate
//! #   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.
//!
//! metadata
//! curve
//!     public-key = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"
//!     secret-key = "D:)Q[IlAW!ahhC2ac:9*A}h:p?([4%wOTJ%JR%cs"
//! ```
//!
//! A public certificate has only `public-key`. A secret one is written readable by its
//! owner only (mode 0600 on Unix), and refused when anyone else may read it.

use std::io::Write;
use std::path::Path;

use super::{decode_key, encode_key, CurveKeys};

/// What a certificate file holds.
#[derive(Debug, Clone)]
pub struct Certificate {
    /// The public key.
    pub public: [u8; 32],
    /// The key pair, if the file is a secret certificate.
    pub keys: Option<CurveKeys>,
}

fn invalid(why: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why)
}

/// Reads a certificate (public or secret). A secret one must match its public key and,
/// on Unix, be unreadable by group and others.
pub fn read_certificate(path: &Path) -> std::io::Result<Certificate> {
    let text = std::fs::read_to_string(path)?;
    let value = |name: &str| -> Option<String> {
        text.lines().find_map(|l| {
            let (k, v) = l.trim().split_once('=')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
        })
    };
    let key = |name: &str| -> std::io::Result<Option<[u8; 32]>> {
        value(name)
            .map(|v| {
                decode_key(&v).map_err(|e| invalid(format!("{}: {name}: {e}", path.display())))
            })
            .transpose()
    };
    let public = key("public-key")?;
    let secret = key("secret-key")?;
    let keys = match secret {
        None => None,
        Some(s) => {
            check_private(path)?;
            let k = CurveKeys::from_secret(s);
            if public.is_some_and(|p| p != k.public()) {
                return Err(invalid(format!(
                    "{}: the public key is not the secret key's",
                    path.display()
                )));
            }
            Some(k)
        }
    };
    let public = match (&keys, public) {
        (Some(k), _) => k.public(),
        (None, Some(p)) => p,
        (None, None) => return Err(invalid(format!("{}: no public-key", path.display()))),
    };
    Ok(Certificate { public, keys })
}

/// Refuses a secret file that anyone but its owner may read (on Unix).
pub(crate) fn check_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(invalid(format!(
                "{}: a secret readable by others (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            )));
        }
    }
    Ok(())
}

/// Creates a new file (never overwriting one) readable by its owner only if `secret`.
pub(crate) fn create_new(path: &Path, secret: bool) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    opts.open(path)
}

/// Writes a certificate: the secret one (with both keys, mode 0600) if `secret`, else
/// the public one. Refuses to overwrite an existing file.
pub fn write_certificate(path: &Path, keys: &CurveKeys, secret: bool) -> std::io::Result<()> {
    let mut f = create_new(path, secret)?;
    let kind = if secret { "**Secret** " } else { "" };
    let mut text = format!("#   ZeroMQ CURVE {kind}Certificate\n");
    if secret {
        text.push_str("#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n");
    }
    text.push_str("\nmetadata\ncurve\n");
    text.push_str(&format!(
        "    public-key = \"{}\"\n",
        encode_key(&keys.public())
    ));
    if secret {
        text.push_str(&format!(
            "    secret-key = \"{}\"\n",
            encode_key(&keys.secret())
        ));
    }
    f.write_all(text.as_bytes())?;
    f.sync_all()
}
