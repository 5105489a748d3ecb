//! Helpers shared by the integration tests: bounded waits, test options, a raw ZMTP
//! peer for hostile input, and memory readings.
#![allow(dead_code, unused_imports)]

pub mod orders;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use peerwire::transport::wire::{encode_frame_header, encode_greeting, Command, FLAG_MORE};
use peerwire::transport::{SocketEvent, SocketOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;

/// The bytes of a ZMTP 3.1 greeting (NULL) followed by READY with this socket type.
pub fn greeting_and_ready(socket_type: &str) -> BytesMut {
    greeting_and_ready_as(1, socket_type)
}

/// [`greeting_and_ready`] announcing ZMTP 3.`minor` (0: a peer that is never heartbeated).
pub fn greeting_and_ready_as(minor: u8, socket_type: &str) -> BytesMut {
    let mut out = BytesMut::new();
    let mut g = encode_greeting(false);
    g[11] = minor;
    out.put_slice(&g);
    Command::Ready(vec![(
        "Socket-Type".into(),
        Bytes::copy_from_slice(socket_type.as_bytes()),
    )])
    .encode(&mut out);
    out
}

/// Sends `hello` on `d` as a HELLO envelope from its own node id.
pub async fn send_hello(d: &peerwire::transport::Dealer, hello: &peerwire::codec::Hello) {
    let env = peerwire::codec::Envelope {
        header: peerwire::codec::Header::new(peerwire::codec::Kind::Hello, hello.node_id, ""),
        payload: peerwire::codec::encode_payload(hello).unwrap(),
    };
    d.send(peerwire::transport::Message::from_frames(env.to_frames()))
        .await
        .unwrap();
}

/// Waits (bounded) until some subscriber of `publisher` holds a subscription.
pub async fn wait_subscribed(publisher: &peerwire::transport::Publisher) {
    wait_until("subscribed", || {
        publisher
            .subscribers()
            .iter()
            .any(|s| !s.subscriptions.is_empty())
    })
    .await;
}

/// A fresh SUB subscribed to `topic` receives what `publisher` publishes on it.
pub async fn pub_serves(publisher: &peerwire::transport::Publisher, topic: &str) {
    let sub = peerwire::transport::Subscriber::new(test_opts());
    sub.subscribe(topic.to_string());
    sub.connect(ep(publisher.local_addr())).unwrap();
    wait_subscribed(publisher).await;
    publisher
        .publish(peerwire::transport::Message::from(Bytes::copy_from_slice(
            topic.as_bytes(),
        )))
        .unwrap();
    assert_eq!(
        &within(topic, sub.recv()).await.unwrap().frames()[0][..],
        topic.as_bytes()
    );
}

/// Default bound for any wait in a test.
pub const BOUND: Duration = Duration::from_secs(10);

/// Sets up tracing once (RUST_LOG controls it).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Awaits `fut`, panicking with `what` if it takes longer than `BOUND`.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within_for(BOUND, what, fut).await
}

/// Awaits `fut`, panicking with `what` if it takes longer than `bound`.
pub async fn within_for<T>(bound: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(bound, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {bound:?} waiting for {what}"),
    }
}

/// Waits for the first event matching `pred`.
pub async fn wait_event(
    rx: &mut broadcast::Receiver<SocketEvent>,
    what: &str,
    pred: impl Fn(&SocketEvent) -> bool,
) -> SocketEvent {
    within(what, async {
        loop {
            match rx.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    })
    .await
}

/// Polls `cond` until it holds (for state with no event, such as counters).
pub async fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    wait_until_for(BOUND, what, cond).await
}

/// [`wait_until`] with a bound of its own (for what takes longer than [`BOUND`]).
pub async fn wait_until_for(bound: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    within_for(bound, what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// Options with short timeouts so failure paths finish quickly.
pub fn test_opts() -> SocketOptions {
    SocketOptions::default()
        .with_greeting_timeout(Duration::from_millis(500))
        .with_handshake_timeout(Duration::from_secs(2))
        .with_reconnect_initial(Duration::from_millis(20))
        .with_reconnect_max(Duration::from_millis(200))
        .with_linger(Duration::from_millis(200))
        // Generous: a test runtime starved by a flood (or by parallel test runs) must not
        // drop a well-behaved peer for silence. Tests of heartbeats set their own.
        .with_heartbeat_timeout(Duration::from_secs(10))
}

/// `tcp://` endpoint for an address.
pub fn ep(addr: SocketAddr) -> String {
    format!("tcp://{addr}")
}

/// Resident set size of this process, in KiB.
pub fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A hand-driven ZMTP peer for sending exactly the bytes a test wants.
pub struct RawPeer {
    pub stream: TcpStream,
    pub rbuf: BytesMut,
}

impl RawPeer {
    pub async fn connect(addr: SocketAddr) -> RawPeer {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        RawPeer {
            stream,
            rbuf: BytesMut::new(),
        }
    }

    /// Connects from the local address `from` (another loopback address, say, to look
    /// like a second host).
    pub async fn connect_from(from: std::net::IpAddr, addr: SocketAddr) -> RawPeer {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(from, 0))
            .expect("bind the source");
        let stream = socket.connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        RawPeer {
            stream,
            rbuf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Greeting (3.1, NULL) and READY with this socket type.
    pub async fn handshake(&mut self, socket_type: &str) {
        self.handshake_as(1, socket_type).await
    }

    /// Greeting announcing ZMTP 3.`minor` (NULL) and READY with this socket type.
    pub async fn handshake_as(&mut self, minor: u8, socket_type: &str) {
        self.send(&greeting_and_ready_as(minor, socket_type))
            .await
            .unwrap();
        // Their greeting then their READY.
        self.read_exact(64).await;
        let f = self.read_frame().await.expect("peer READY");
        assert_eq!(f.0 & 0x04, 0x04, "READY is a command");
    }

    pub async fn send_message(&mut self, frames: &[&[u8]]) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        for (i, f) in frames.iter().enumerate() {
            encode_frame_header(
                &mut out,
                if i + 1 < frames.len() { FLAG_MORE } else { 0 },
                f.len(),
            );
            out.put_slice(f);
        }
        self.send(&out).await
    }

    pub async fn send_command(&mut self, c: &Command) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        c.encode(&mut out);
        self.send(&out).await
    }

    pub async fn read_exact(&mut self, n: usize) -> Bytes {
        while self.rbuf.len() < n {
            if self.stream.read_buf(&mut self.rbuf).await.unwrap() == 0 {
                panic!("closed while reading");
            }
        }
        self.rbuf.split_to(n).freeze()
    }

    /// Reads one frame: (flags, body); `None` if the peer closed the connection.
    pub async fn read_frame(&mut self) -> Option<(u8, Bytes)> {
        loop {
            if self.rbuf.len() >= 2 {
                let flags = self.rbuf[0];
                let (hdr, len) = if flags & 0x02 != 0 {
                    if self.rbuf.len() < 9 {
                        None
                    } else {
                        Some((
                            9,
                            u64::from_be_bytes(self.rbuf[1..9].try_into().unwrap()) as usize,
                        ))
                    }
                } else {
                    Some((2, self.rbuf[1] as usize))
                }
                .unwrap_or((usize::MAX, 0));
                if hdr != usize::MAX && self.rbuf.len() >= hdr + len {
                    let _ = self.rbuf.split_to(hdr);
                    return Some((flags, self.rbuf.split_to(len).freeze()));
                }
            }
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Reads until the peer closes the connection (returns true) or `bound` passes.
    pub async fn closed_within(&mut self, bound: Duration) -> bool {
        tokio::time::timeout(bound, async {
            let mut buf = [0u8; 4096];
            loop {
                match self.stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }
}

/// A global allocator that counts live heap bytes, for tests that check memory stays
/// bounded (RSS alone would miss memory reserved but never touched). A test binary opts
/// in with `#[global_allocator] static A: CountingAlloc = CountingAlloc;`.
pub struct CountingAlloc;

static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        let p = std::alloc::System.alloc(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size(), std::sync::atomic::Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        std::alloc::System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        let q = std::alloc::System.realloc(p, l, new);
        if !q.is_null() {
            LIVE.fetch_add(new, std::sync::atomic::Ordering::Relaxed);
            LIVE.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
        }
        q
    }
}

/// Live heap bytes, when the binary uses [`CountingAlloc`]; otherwise 0.
pub fn heap_bytes() -> usize {
    LIVE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Starts a node called `name` on loopback with these static peers.
pub async fn start_node(name: &str, peers: &[String]) -> peerwire::node::Node {
    let mut b = peerwire::node::Node::builder(name)
        .insecure()
        .socket_options(test_opts());
    for p in peers {
        b = b.peer(p.clone());
    }
    b.start().await.expect("node starts")
}

/// An empty directory of the test's own under the system's temporary directory (named
/// `pw-NAME-PID`), made afresh; the test removes it when done.
pub fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pw-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts the node `b` describes, serving `service` (any JSON value back as it came).
pub async fn echo_node(b: peerwire::node::NodeBuilder, service: &str) -> peerwire::node::Node {
    let n = b.start().await.unwrap();
    n.handle(service, orders::V1, |v: serde_json::Value, _| async move {
        Ok(v)
    });
    n
}

/// The address of a `tcp://IP:port` endpoint (a node's, say), for a raw connection.
pub fn addr_of(endpoint: &str) -> SocketAddr {
    peerwire::Endpoint::parse(endpoint)
        .ok()
        .and_then(|e| e.socket_addr())
        .unwrap_or_else(|| panic!("{endpoint:?} is not tcp://IP:port"))
}

/// Waits until `n` peers subscribe to `asker`'s `topic` and one's catalog answers
/// gathers on it: what a gather on `topic` needs to expect them.
pub async fn wait_gatherable(asker: &peerwire::node::Node, topic: &str, n: usize) {
    wait_until("subscribed", || asker.subscribers_of(topic).len() == n).await;
    wait_until("catalog", || {
        asker.peers().iter().any(|p| p.gathers.contains_key(topic))
    })
    .await;
}

/// Waits until `node` sees `n` connected peers serving `target`.
pub async fn wait_service(node: &peerwire::node::Node, target: &str, n: usize) {
    assert!(
        node.wait_for_service(target, n, BOUND).await,
        "{} never saw {n} instance(s) of {target}",
        node.name()
    );
}

/// The `peerwire` binary, with mDNS off: tests on the host never multicast on its
/// interfaces (those that want mDNS run it in a network namespace of their own).
pub fn peerwire_cmd() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_peerwire"));
    // Security is chosen explicitly; tests that want it give --key or #KEY, which win.
    c.env("PEERWIRE_MDNS", "off").env("PEERWIRE_INSECURE", "1");
    c
}

/// A `peerwire node` process on loopback (mDNS off), its stderr followed line by line;
/// killed (SIGKILL) when dropped.
pub struct NodeProc {
    pub child: std::process::Child,
    /// Its ROUTER endpoint (the first line it prints).
    pub endpoint: String,
    /// Its stderr: presence, breaker and log lines.
    pub stderr: Lines,
    /// Its stdout after the endpoint line (what its services print).
    pub stdout: Lines,
}

impl NodeProc {
    /// A node called `name` serving `echo`, with `extra` arguments.
    pub fn start(name: &str, extra: &[&str]) -> NodeProc {
        let mut args = vec!["--serve", "echo"];
        args.extend_from_slice(extra);
        NodeProc::start_with(name, &args)
    }

    /// A node called `name` with exactly these arguments after `node --name NAME`.
    pub fn start_with(name: &str, args: &[&str]) -> NodeProc {
        use std::process::Stdio;
        let mut child = peerwire_cmd()
            .args(["node", "--name", name])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node");
        let mut stderr = Lines::new(child.stderr.take().unwrap());
        let stdout = Lines::new(child.stdout.take().unwrap());
        let endpoint = match stdout.rx.recv_timeout(BOUND) {
            Ok(line) => line.trim().to_string(),
            Err(_) => {
                let _ = stderr.any_within(Duration::from_millis(200), |_| false);
                panic!(
                    "{name}: no endpoint line; stderr:\n{}",
                    stderr.seen.join("\n")
                )
            }
        };
        assert!(endpoint.starts_with("tcp://127.0.0.1:"), "{endpoint:?}");
        NodeProc {
            child,
            endpoint,
            stderr,
            stdout,
        }
    }

    /// Its ROUTER port.
    pub fn port(&self) -> String {
        self.endpoint.rsplit(':').next().unwrap().to_string()
    }

    /// Sends it `sig` (SIGSTOP to make it hang, SIGCONT to let it go on, ...).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Sends SIGTERM and waits (bounded) for it to end; returns whether it ended well.
    pub fn terminate(&mut self, bound: Duration) -> bool {
        self.signal(libc::SIGTERM);
        let deadline = std::time::Instant::now() + bound;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("node did not stop within {bound:?} of SIGTERM");
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A simulated LAN: one network namespace per host, each with `eth0` (10.77.0.N/24) on a
/// bridge that lives in a namespace of its own, so nothing touches the real host's
/// interfaces. Torn down on drop. Needs root and `ip` (iproute2).
pub struct Lan {
    tag: String,
    /// Host namespaces, `hosts[i]` at `10.77.0.{i+1}`.
    pub hosts: Vec<String>,
    switch: String,
    children: std::sync::Mutex<Vec<std::process::Child>>,
}

/// Why a LAN cannot be built here, or `None` if it can.
pub fn lan_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespaces need CAP_SYS_ADMIN".into());
    }
    match std::process::Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("the `ip` command (iproute2) is missing".into()),
    }
}

/// Skips the calling test (returns `None`) when a LAN cannot be built, saying why; with
/// CI=true that is a failure instead, so CI never passes by skipping.
/// Whether `python3` can import zmq and msgpack here. If not, says that `what` was
/// skipped, or, with CI=true (where `.ci/run` installs them), fails.
pub fn python_ready(what: &str) -> bool {
    let why = match std::process::Command::new("python3")
        .args(["-c", "import zmq, msgpack"])
        .output()
    {
        Ok(o) if o.status.success() => return true,
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => format!("python3: {e}"),
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} cannot run: {why}");
    }
    eprintln!("SKIPPED: {what} needs python3 with pyzmq and msgpack ({why})");
    false
}

pub fn lan_or_skip(hosts: usize) -> Option<Lan> {
    if let Some(why) = lan_unavailable() {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("CI=true but the simulated LAN cannot be built: {why}");
        }
        // Straight to the file descriptor: the test harness captures `eprintln!`, and a
        // skip must be seen.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: simulated LAN unavailable: {why}"
        );
        return None;
    }
    Some(Lan::new(hosts))
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lan {
    /// Builds a LAN of `n` hosts.
    pub fn new(n: usize) -> Lan {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tag = format!(
            "{}{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let switch = format!("pwsw{tag}");
        let mut lan = Lan {
            hosts: Vec::new(),
            switch: switch.clone(),
            tag,
            children: std::sync::Mutex::new(Vec::new()),
        };
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for i in 0..n {
            let h = format!("pwh{i}x{}", lan.tag);
            ip(&["netns", "add", &h]);
            lan.hosts.push(h.clone());
            let port = format!("p{i}");
            ip(&[
                "link", "add", "eth0", "netns", &h, "type", "veth", "peer", "name", &port, "netns",
                &switch,
            ]);
            ip(&["-n", &switch, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &switch, "link", "set", &port, "up"]);
            ip(&[
                "-n",
                &h,
                "addr",
                "add",
                &format!("10.77.0.{}/24", i + 1),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &h, "link", "set", "eth0", "up"]);
            ip(&["-n", &h, "link", "set", "lo", "up"]);
        }
        lan
    }

    /// The address of host `i`.
    pub fn addr(&self, i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// `peerwire ARGS` on host `i` (mDNS on the LAN, the command's default), stdout and
    /// stderr piped.
    pub fn peerwire(&self, i: usize, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.hosts[i],
            env!("CARGO_BIN_EXE_peerwire"),
        ])
        .args(args)
        .env("PEERWIRE_MDNS", "lan")
        .env("PEERWIRE_INSECURE", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        c
    }

    /// Runs a command on host `i` to completion.
    pub fn run(&self, i: usize, args: &[&str]) -> std::process::Output {
        self.peerwire(i, args).output().expect("run peerwire")
    }

    /// Takes a link down (`up = false`) or up again: a partition of host `i`.
    pub fn link(&self, i: usize, up: bool) {
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &format!("p{i}"),
            if up { "up" } else { "down" },
        ]);
    }

    /// Writes `/etc/netns/<host>/hosts` (bind-mounted over /etc/hosts by `ip netns exec`)
    /// so that names resolve on host `i` as given.
    pub fn hosts_file(&self, i: usize, lines: &str) {
        let dir = format!("/etc/netns/{}", self.hosts[i]);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/hosts"), lines).unwrap();
    }

    /// Starts `peerwire ARGS` on host `i` with extra environment; killed when the LAN is
    /// torn down. Returns its pid and its stdout and stderr lines.
    pub fn spawn(&self, i: usize, args: &[&str], env: &[(&str, &str)]) -> (u32, Lines, Lines) {
        let mut c = self.peerwire(i, args);
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("spawn peerwire");
        let out = Lines::new(child.stdout.take().unwrap());
        let err = Lines::new(child.stderr.take().unwrap());
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        (pid, out, err)
    }

    /// Sends `sig` to a process started by [`Lan::spawn`] and reaps it if it ends.
    pub fn signal(&self, pid: u32, sig: i32) {
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        unsafe {
            libc::kill(pid as i32, sig);
        }
        let mut children = self.children.lock().unwrap();
        if let Some(c) = children.iter_mut().find(|c| c.id() == pid) {
            let deadline = std::time::Instant::now() + BOUND;
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for c in self.children.lock().unwrap().iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for h in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", h])
                .output();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{h}"));
        }
    }
}

/// Lines of a child's output, read by a thread, for bounded waits.
pub struct Lines {
    rx: std::sync::mpsc::Receiver<String>,
    /// Every line seen so far.
    pub seen: Vec<String>,
}

impl Lines {
    /// Follows `r` line by line.
    pub fn new(r: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// The first line (from now) that satisfies `f`, within `bound`; panics naming `what`
    /// (and everything seen) if none comes.
    pub fn wait_for(
        &mut self,
        what: &str,
        bound: Duration,
        mut f: impl FnMut(&str) -> bool,
    ) -> String {
        let deadline = std::time::Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if f(&l) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no {what} within {bound:?}; seen:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Like [`Lines::wait_for`], but a line already seen counts too (for events whose
    /// order among themselves does not matter).
    pub fn seen_or_wait(
        &mut self,
        what: &str,
        bound: Duration,
        mut f: impl FnMut(&str) -> bool,
    ) -> String {
        if let Some(l) = self.seen.iter().find(|l| f(l)) {
            return l.clone();
        }
        self.wait_for(what, bound, f)
    }

    /// Every line that has arrived so far (moved into [`Lines::seen`], which it returns).
    pub fn drain(&mut self) -> &[String] {
        while let Ok(l) = self.rx.try_recv() {
            self.seen.push(l);
        }
        &self.seen
    }

    /// Whether a line satisfying `f` arrives within `bound` (for checks that something
    /// does not happen).
    pub fn any_within(&mut self, bound: Duration, mut f: impl FnMut(&str) -> bool) -> bool {
        let deadline = std::time::Instant::now() + bound;
        while let Ok(l) = self
            .rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        {
            self.seen.push(l.clone());
            if f(&l) {
                return true;
            }
        }
        false
    }
}
