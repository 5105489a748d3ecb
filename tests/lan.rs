//! Discovery on a simulated LAN: three or more hosts in network namespaces joined by a
//! bridge, every node a separate `peerwire` process in its own namespace, mDNS on the
//! LAN interface (the command's default). Join, graceful leave, SIGKILL, restart on a new
//! port, a partition, two clusters, DNS seeds and `peerwire doctor`.
//!
//! Needs root (network namespaces); without it each test says SKIPPED, and with CI=true
//! that is a failure. Times are printed for information; the targets are measured by
//! `scripts/discovery-times.sh`, not asserted here.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// Generous bounds: these wait on events, they do not time them.
const JOIN: Duration = Duration::from_secs(15);

fn event(line: &str) -> Option<(String, String, String)> {
    let v: Value = serde_json::from_str(line).ok()?;
    Some((
        v["event"].as_str()?.to_string(),
        v["peer"]["name"].as_str()?.to_string(),
        v["peer"]["router"].as_str()?.to_string(),
    ))
}

fn is(line: &str, ev: &str, name: &str) -> bool {
    event(line).is_some_and(|(e, n, _)| e == ev && n == name)
}

/// `peerwire peers --json ARGS` on host `i`: the peers it lists (it must succeed).
fn peers_json(lan: &Lan, i: usize, args: &[&str]) -> Vec<Value> {
    let out = lan.run(i, &[&["peers", "--json"], args].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Hosts are network namespaces of one machine: their nodes share a directory but not
    // a host key, so a node on another host is never reached over ipc (that would step
    // around partitions). (Nodes on this host itself may be.)
    let here = format!("tcp://{}:", lan.addr(i));
    for p in v.as_array().unwrap() {
        let router = p["router"].as_str().unwrap_or_default();
        let dialled = p["dialled"].as_str().unwrap_or_default();
        let elsewhere = !router.starts_with(&here) && !router.starts_with("tcp://127.");
        assert!(!elsewhere || dialled.starts_with("tcp://"), "{p}");
    }
    v.as_array().unwrap().clone()
}

/// The names in a `peers --json` list.
fn names(peers: &[Value]) -> Vec<&str> {
    peers.iter().filter_map(|p| p["name"].as_str()).collect()
}

fn node_args<'a>(name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["node", "--name", name, "--serve", "echo"];
    v.extend_from_slice(extra);
    v
}

#[test]
fn join_leave_crash_and_restart_on_a_new_port() {
    let Some(lan) = lan_or_skip(3) else { return };
    let (_w, mut watch, mut wlog) = lan.spawn(
        0,
        &["peers", "--watch", "--json"],
        &[("RUST_LOG", "peerwire::node=debug")],
    );

    let t = Instant::now();
    let (a, _, _) = lan.spawn(1, &node_args("a", &["--port", "7001"]), &[]);
    let (b, _, _) = lan.spawn(2, &node_args("b", &[]), &[]);
    watch.seen_or_wait("a joined", JOIN, |l| is(l, "joined", "a"));
    watch.seen_or_wait("b joined", JOIN, |l| is(l, "joined", "b"));
    eprintln!("a and b joined within {:?}", t.elapsed());

    // Graceful leave: SIGTERM runs the node's shutdown (goodbye on mDNS, sockets closed).
    let t = Instant::now();
    lan.signal(b, libc::SIGTERM);
    watch.wait_for("b left", JOIN, |l| is(l, "left", "b"));
    eprintln!("b left {:?} after SIGTERM", t.elapsed());

    // Crash: no goodbye at all.
    let t = Instant::now();
    lan.signal(a, libc::SIGKILL);
    watch.wait_for("a left", JOIN, |l| is(l, "left", "a"));
    eprintln!("a gone {:?} after SIGKILL", t.elapsed());

    // Restarted on another port: reached there, and the old endpoint is dropped at once
    // (not dialled until `forget_after`).
    let t = Instant::now();
    let (_a2, _, _) = lan.spawn(1, &node_args("a", &["--port", "7002"]), &[]);
    let line = watch.wait_for("a joined again", JOIN, |l| is(l, "joined", "a"));
    assert!(line.contains("10.77.0.2:7002"), "{line}");
    eprintln!("a reached at its new port {:?} after restart", t.elapsed());
    // Well inside `forget_after` (10 s): this is the restart being recognised, not the
    // unreachable endpoint timing out.
    wlog.wait_for("the old endpoint forgotten", Duration::from_secs(5), |l| {
        l.contains("forgot a peer") && l.contains("10.77.0.2:7001")
    });
}

#[test]
fn a_node_killed_and_restarted_on_the_same_port_is_kept() {
    let Some(lan) = lan_or_skip(3) else { return };
    let (_w, mut watch, _) = lan.spawn(0, &["peers", "--watch", "--json"], &[]);
    let _ = lan.spawn(2, &node_args("b", &[]), &[]);
    let (a, _, _) = lan.spawn(1, &node_args("a", &["--port", "7001"]), &[]);
    watch.seen_or_wait("a joined", JOIN, |l| is(l, "joined", "a"));
    lan.signal(a, libc::SIGKILL);
    watch.wait_for("a left", JOIN, |l| is(l, "left", "a"));
    let _ = lan.spawn(1, &node_args("a", &["--port", "7001"]), &[]);
    watch.wait_for("a back", JOIN, |l| is(l, "joined", "a"));
    // The dead instance's records linger; nothing about them may drop the new node.
    assert!(!watch.any_within(Duration::from_secs(3), |l| is(l, "left", "a")));
}

#[test]
fn a_long_partition_heals() {
    // Cut for longer than `forget_after`: both sides forget each other, and find each
    // other again from mDNS once the cable is back.
    let Some(lan) = lan_or_skip(3) else { return };
    let fast = ["--forget-after", "1000"];
    let debug = [("RUST_LOG", "peerwire::node=debug")];
    let (_w, mut watch, mut wlog) =
        lan.spawn(0, &["peers", "--watch", "--json", fast[0], fast[1]], &debug);
    let (_a, _, mut alog) = lan.spawn(1, &node_args("a", &fast), &debug);
    watch.seen_or_wait("a joined", JOIN, |l| is(l, "joined", "a"));
    lan.link(1, false);
    watch.wait_for("a left", JOIN, |l| is(l, "left", "a"));
    // Both sides forget each other (forget_after, 1 s, after the loss is noticed).
    let forgot = |who: &'static str| move |l: &str| l.contains("forgot a peer") && l.contains(who);
    wlog.seen_or_wait("the watcher forgets a", JOIN, forgot("10.77.0.2"));
    alog.seen_or_wait("a forgets the watcher", JOIN, forgot("10.77.0.1"));
    lan.link(1, true);
    watch.wait_for("a back after the partition", JOIN, |l| is(l, "joined", "a"));
}

#[test]
fn a_named_loopback_interface_finds_nodes_on_the_same_host() {
    let Some(lan) = lan_or_skip(1) else { return };
    let lo = ["--mdns-interface", "lo"];
    let _ = lan.spawn(0, &node_args("local", &lo), &[]);
    let peers = peers_json(&lan, 0, &["--wait", "5000", lo[0], lo[1]]);
    assert!(
        peers.iter().any(|p| p["name"] == "local"
            && p["router"]
                .as_str()
                .unwrap()
                .starts_with("tcp://127.0.0.1:")),
        "{peers:?}"
    );
}

#[test]
fn a_partition_is_detected_by_heartbeats_and_healed() {
    let Some(lan) = lan_or_skip(3) else { return };
    // Its debug log is shown if the partition goes unnoticed.
    let (_w, mut watch, mut wlog) = lan.spawn(
        0,
        &["peers", "--watch", "--json"],
        &[("RUST_LOG", "peerwire=debug")],
    );
    let _ = lan.spawn(1, &node_args("a", &[]), &[]);
    let _ = lan.spawn(2, &node_args("b", &[]), &[]);
    watch.seen_or_wait("a joined", JOIN, |l| is(l, "joined", "a"));
    watch.seen_or_wait("b joined", JOIN, |l| is(l, "joined", "b"));

    // Host 1's cable pulled: no FIN, no RST, only silence.
    let t = Instant::now();
    lan.link(1, false);
    if !watch.any_within(JOIN, |l| is(l, "left", "a")) {
        wlog.any_within(Duration::from_millis(100), |_| false);
        panic!(
            "a never left:\n{}\n{}",
            watch.seen.join("\n"),
            wlog.seen.join("\n")
        );
    }
    let line = watch.seen.last().unwrap().clone();
    eprintln!("partition detected after {:?}: {line}", t.elapsed());
    assert!(line.contains("heartbeat"), "{line}");
    // b stays.
    assert!(!watch.seen.iter().any(|l| is(l, "left", "b")));

    lan.link(1, true);
    watch.wait_for("a back", JOIN, |l| is(l, "joined", "a"));
}

#[test]
fn two_clusters_are_kept_apart_and_doctor_says_so() {
    let Some(lan) = lan_or_skip(3) else { return };
    let _ = lan.spawn(1, &node_args("blue-1", &["--cluster", "blue"]), &[]);
    let _ = lan.spawn(2, &node_args("red-1", &["--cluster", "red"]), &[]);

    let peers = peers_json(&lan, 0, &["--cluster", "blue", "--wait", "5000"]);
    let names = names(&peers);
    assert!(names.contains(&"blue-1"), "{names:?}");
    assert!(!names.contains(&"red-1"), "{names:?}");

    let out = lan.run(0, &["doctor", "--cluster", "blue", "--wait", "3000"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("eth0"), "{stdout}");
    assert!(stdout.contains("used (LAN interface)"), "{stdout}");
    assert!(
        stdout.contains("our own announcement came back"),
        "{stdout}"
    );
    assert!(stdout.contains("ignored, cluster \"red\""), "{stdout}");
    assert!(
        stdout.contains("reachable (ZMTP handshake completed)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("serves: echo.broadcast, echo.echo"),
        "{stdout}"
    );
}

#[test]
fn doctor_explains_a_peer_it_cannot_reach() {
    let Some(lan) = lan_or_skip(2) else { return };
    // Announced on the LAN, but listening on loopback only: the classic mistake.
    let _ = lan.spawn(1, &node_args("hidden", &["--listen", "127.0.0.1"]), &[]);
    let out = lan.run(0, &["doctor", "--wait", "3000"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("NOT reachable"), "{stdout}");
    assert!(stdout.to_lowercase().contains("refused"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("problem(s) found"), "{stderr}");
}

#[test]
fn dns_names_and_static_seeds_work_without_mdns() {
    let Some(lan) = lan_or_skip(3) else { return };
    let _ = lan.spawn(
        1,
        &node_args(
            "d1",
            &["--mdns", "off", "--listen", "0.0.0.0", "--port", "7100"],
        ),
        &[],
    );
    let _ = lan.spawn(
        2,
        &node_args(
            "d2",
            &["--mdns", "off", "--listen", "0.0.0.0", "--port", "7100"],
        ),
        &[],
    );
    lan.hosts_file(
        0,
        "127.0.0.1 localhost\n10.77.0.2 svc.lan\n10.77.0.3 svc.lan\n",
    );

    let peers = peers_json(
        &lan,
        0,
        &["--mdns", "off", "--dns", "svc.lan:7100", "--wait", "5000"],
    );
    let names = names(&peers);
    assert!(names.contains(&"d1") && names.contains(&"d2"), "{names:?}");

    let out = lan.run(
        0,
        &[
            "call",
            "echo.echo",
            "[1]",
            "--mdns",
            "off",
            "--peer",
            "tcp://10.77.0.3:7100",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `peerwire bench` between two hosts: every style measured, figures that make sense,
/// JSON that parses; then a responder killed mid-run stops the measuring side with a
/// clear error instead of a hang.
#[test]
fn bench_between_two_hosts() {
    let Some(lan) = lan_or_skip(2) else { return };
    let (addr, mine) = (lan.addr(0), lan.addr(1));
    let serve = ["bench", "serve", "--mdns", "off", "--listen", &addr];
    let (responder, mut out, _err) = lan.spawn(0, &serve, &[]);
    let endpoint = out.wait_for("the responder's endpoint", JOIN, |l| {
        l.starts_with("tcp://")
    });
    let run = lan.run(
        1,
        &[
            "bench", "run", "--mdns", "off", "--listen", &mine, "--peer", &endpoint, "--count",
            "300", "--warmup", "30", "--sizes", "64,16384", "--json",
        ],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let v: Value = serde_json::from_slice(&run.stdout).expect("bench --json parses");
    let latency = v["latency"].as_array().unwrap();
    assert_eq!(latency.len(), 6, "tcp, request, gather at two sizes: {v}");
    for l in latency {
        let q = |k: &str| l[k].as_f64().unwrap();
        assert_eq!(l["count"], 300, "{l}");
        assert!(q("p50_us") > 0.0 && q("p50_us") <= q("p90_us"), "{l}");
        assert!(
            q("p90_us") <= q("p99_us") && q("p99_us") <= q("p999_us"),
            "{l}"
        );
        assert!(q("p999_us") <= q("max_us") && q("msgs_per_s") > 0.0, "{l}");
        // Every series beside the raw TCP ping-pong between the same two hosts.
        assert!(q("p50_vs_tcp") > 0.0, "{l}");
    }
    let throughput = v["throughput"].as_array().unwrap();
    assert_eq!(throughput.len(), 4, "notify and pubsub at two sizes: {v}");
    for t in throughput {
        assert_eq!(t["sent"], 300, "{t}");
        let (received, lost) = (t["received"].as_u64().unwrap(), t["lost"].as_u64().unwrap());
        assert_eq!(received + lost, 300, "{t}");
        assert_eq!(t["receiver"], "bench-responder");
    }
    // A notification is never lost on a healthy link (each waits for room to be sent).
    assert!(throughput
        .iter()
        .filter(|t| t["style"] == "notify")
        .all(|t| t["lost"] == 0));

    // Killed mid-run: the measuring side says so and stops.
    let (_run, _out, mut err) = lan.spawn(
        1,
        &[
            "bench",
            "run",
            "--mdns",
            "off",
            "--listen",
            &mine,
            "--peer",
            &endpoint,
            "--styles",
            "request",
            "--sizes",
            "64",
            "--count",
            "100000000",
            "--timeout-ms",
            "1000",
        ],
        &[],
    );
    err.wait_for("measuring", JOIN, |l| l.contains("measuring request"));
    let killed = Instant::now();
    lan.signal(responder, libc::SIGKILL);
    let why = err.wait_for("the run's error", JOIN, |l| l.starts_with("error:"));
    assert!(why.contains("stopped answering"), "{why}");
    println!(
        "the measuring side stopped {:?} after the responder died",
        killed.elapsed()
    );
}
