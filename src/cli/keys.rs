//! `peerwire keys`: CURVE key pairs in ZeroMQ's certificate format, readable by pyzmq's
//! `zmq.auth.load_certificate` and czmq's `zcert`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use peerwire::node::{ClusterSecret, NodeBuilder};
use peerwire::transport::curve::{
    decode_key, encode_key, read_certificate, write_certificate, CurveKeys,
};

use super::NodeArgs;

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
    /// Create a cluster secret in FILE (readable by you only): give the file to every
    /// member, as `--cluster-secret FILE`. Only nodes holding it can talk to each other.
    Secret {
        /// The file to create (never overwritten).
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
        KeysCommand::Secret { file } => {
            ClusterSecret::generate()
                .write(file)
                .with_context(|| format!("cannot write {}", file.display()))?;
            errln!(
                "wrote {} (a cluster secret, mode 600): give it to every member as \
                 --cluster-secret {}",
                file.display(),
                file.display()
            );
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

/// Adds the peers and, when asked for (--key, --secure, --cluster-secret, or a --peer
/// with a key), the node's security to `b`.
pub(super) fn secure(args: &NodeArgs, mut b: NodeBuilder, create_key: bool) -> Result<NodeBuilder> {
    let (mut keyed, mut keyless) = (false, None);
    for p in &args.peers {
        match p.split_once('#') {
            Some((ep, key)) => {
                let key = decode_key(key).map_err(|e| anyhow!("--peer {p}: {e}"))?;
                b = b.peer_with_key(ep, key);
                keyed = true;
            }
            None => {
                keyless.get_or_insert(p.clone());
                b = b.peer(p.clone());
            }
        }
    }
    let secret = match &args.cluster_secret {
        Some(path) => Some(
            ClusterSecret::read(path)
                .with_context(|| format!("--cluster-secret {}", path.display()))?,
        ),
        None => None,
    };
    let keys = match &args.key {
        Some(path) => Some(node_keys(path, create_key)?),
        None if args.secure || keyed || secret.is_some() => Some(CurveKeys::generate()),
        None if args.insecure => None,
        None => bail!(
            "no security chosen: give --key FILE (the node's key pair, created if missing), \
             --secure (a key pair for this run) or --cluster-secret FILE (membership by a \
             shared secret), or --insecure to run without security (PEERWIRE_INSECURE=1 \
             does the same)"
        ),
    };
    let Some(keys) = keys else {
        if !args.allow.is_empty() {
            bail!("--allow needs a secured node (--key FILE, --secure or --cluster-secret)");
        }
        return Ok(b.insecure());
    };
    match (keyless, secret) {
        (_, Some(secret)) => b = b.cluster_secret(secret),
        (Some(p), None) => bail!(
            "--peer {p}: a secured node dials a peer only with its key (--peer {p}#KEY), \
             or with --cluster-secret"
        ),
        (None, None) => {}
    }
    b = b.secure(keys);
    for a in &args.allow {
        b = b.allow(allowed_key(a)?);
    }
    Ok(b)
}

/// The key pair in `path` (a secret certificate), made there first if `create`.
fn node_keys(path: &Path, create: bool) -> Result<CurveKeys> {
    if create && !path.exists() {
        let keys = CurveKeys::generate();
        write_certificate(path, &keys, true)
            .with_context(|| format!("cannot create {}", path.display()))?;
        errln!(
            "created {} (this node's key pair); its public key: {}",
            path.display(),
            encode_key(&keys.public())
        );
        return Ok(keys);
    }
    let cert = read_certificate(path).with_context(|| format!("--key {}", path.display()))?;
    cert.keys.ok_or_else(|| {
        anyhow!(
            "--key {}: a public certificate; a node needs its secret one (.key_secret)",
            path.display()
        )
    })
}

/// A key given to --allow: Z85 text, or a certificate file.
fn allowed_key(text: &str) -> Result<[u8; 32]> {
    if let Ok(k) = decode_key(text) {
        return Ok(k);
    }
    let cert = read_certificate(Path::new(text)).with_context(|| {
        format!("--allow {text}: neither a key (40 characters of Z85) nor a certificate")
    })?;
    Ok(cert.public)
}
