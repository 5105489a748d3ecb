//! A private network for the demo: this process moves into a network namespace of its
//! own, where only a loopback interface exists, so mDNS can run for real without a
//! packet reaching any interface of the host.

use std::io::Write;

/// Moves the whole process into a fresh network namespace with `lo` up. Must run before
/// any other thread starts (the runtime's included): namespaces belong to threads, and a
/// user namespace can only be entered by a single-threaded process.
///
/// As root, a network namespace alone; otherwise a user namespace too (where the
/// kernel allows unprivileged ones). Returns why not when it cannot.
pub fn private_network() -> Result<(), String> {
    // SAFETY: plain system calls on this thread; no memory is shared with them.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            let (uid, gid) = (libc::geteuid(), libc::getegid());
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
                return Err(format!(
                    "cannot create a network namespace: {}",
                    std::io::Error::last_os_error()
                ));
            }
            // Map ourselves to root inside, which is what allows configuring `lo`.
            write_file("/proc/self/setgroups", "deny")?;
            write_file("/proc/self/uid_map", &format!("0 {uid} 1"))?;
            write_file("/proc/self/gid_map", &format!("0 {gid} 1"))?;
        }
    }
    loopback_up()
}

fn write_file(path: &str, text: &str) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("{path}: {e}"))
}

/// `ip link set lo up`, by ioctl (no `ip` binary needed).
fn loopback_up() -> Result<(), String> {
    // SAFETY: `ifreq` is plain data, zeroed then filled; the socket is closed on every path.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        let mut out = Ok(());
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) != 0 {
            out = Err(format!(
                "SIOCGIFFLAGS lo: {}",
                std::io::Error::last_os_error()
            ));
        } else {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) != 0 {
                out = Err(format!(
                    "SIOCSIFFLAGS lo: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        libc::close(fd);
        out
    }
}
