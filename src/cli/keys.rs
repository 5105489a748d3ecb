//! `peerwire keys`: CURVE key pairs in ZeroMQ's certificate format, readable by pyzmq's
//! `zmq.auth.load_certificate` and czmq's `zcert`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use peerwire::transport::curve::{encode_key, read_certificate, write_certificate, CurveKeys};

/// What `peerwire keys` does.
#[derive(clap::Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a key pair: NAME.key_secret (both keys, readable by you only) and NAME.key
    /// (the public key, to give to peers). Prints the public key.
    New {
        /// Path and base name of the two files.
        name: PathBuf,
    },
    /// Print the public key of a certificate (public or secret).
    Show {
        /// The certificate file.
        file: PathBuf,
    },
}

/// Runs a `peerwire keys` command.
pub fn run(cmd: &KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::New { name } => {
            let keys = CurveKeys::generate();
            let (secret, public) = (with_ext(name, "key_secret"), with_ext(name, "key"));
            write_certificate(&secret, &keys, true)
                .with_context(|| format!("cannot write {}", secret.display()))?;
            write_certificate(&public, &keys, false)
                .with_context(|| format!("cannot write {}", public.display()))?;
            outln!("{}", encode_key(&keys.public()));
            errln!(
                "wrote {} (secret, mode 600) and {} (public)",
                secret.display(),
                public.display()
            );
        }
        KeysCommand::Show { file } => {
            let cert = read_certificate(file)?;
            outln!("{}", encode_key(&cert.public));
        }
    }
    Ok(())
}

fn with_ext(name: &Path, ext: &str) -> PathBuf {
    let mut s = name.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}
