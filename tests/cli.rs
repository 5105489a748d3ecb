//! The `peerwire` binary, run as separate processes: the demo, the node commands with
//! JSON at the edge, errors, and a node process killed and restarted.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use peerwire::transport::{Router, SocketOptions};
use support::*;

fn peerwire(args: &[&str]) -> std::process::Output {
    peerwire_cmd().args(args).output().expect("run peerwire")
}

#[tokio::test]
async fn probe_reports_what_the_peer_announced() {
    let router = Router::bind("tcp://127.0.0.1:0", SocketOptions::default())
        .await
        .unwrap();
    let endpoint = ep(router.local_addr());
    let out = tokio::task::spawn_blocking(move || peerwire(&["probe", &endpoint]))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ZMTP 3.1"), "{stdout}");
    assert!(stdout.contains("socket type  ROUTER"), "{stdout}");
}

#[test]
fn bad_endpoint_is_a_one_line_error() {
    let out = peerwire(&["probe", "udp://nowhere"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
}

#[test]
fn unreachable_endpoint_fails_within_its_bound() {
    // Port 9 (discard) on loopback is closed on these machines: refused at once.
    let out = peerwire(&["probe", "tcp://127.0.0.1:9", "--timeout-ms", "300"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not reachable"), "{stderr}");
}

/// A `peerwire node` with both output streams piped: the child, its endpoint (its first
/// line), and its stdout after that line, still open.
fn piped_node(args: &[&str]) -> (Child, String, BufReader<std::process::ChildStdout>) {
    let mut child = peerwire_cmd()
        .arg("node")
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).expect("endpoint line");
    (child, line.trim().to_string(), out)
}

fn ok_stdout(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "exit {:?}: {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn one_line_error(out: &std::process::Output) -> String {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

#[test]
fn demo_runs_and_shows_every_style() {
    let out = peerwire(&["demo"]);
    let stdout = ok_stdout(&out);
    for s in [
        "request/response",
        "asynchronous request/response",
        "one-way notification",
        "publish/subscribe",
        "publish/async responses",
        "silent: inventory-3",
        "the caller's CANCEL",
        "(fallback: list price)",
        "breaker of pricing at inventory-2: Closed → Open",
        "from inventory-2",
        "breaker of pricing at inventory-2: HalfOpen → Closed",
        "each to exactly one of the three competing consumers",
        "(moved)",
        "skipped the copy sent again",
        "← audit got",
        "0 given up",
        "demo finished",
    ] {
        assert!(stdout.contains(s), "missing {s:?} in:\n{stdout}");
    }
}

#[test]
fn the_demo_prints_no_log_lines_in_the_middle_of_its_own() {
    // A person reads the demo in a terminal, where stderr and stdout mix: the nodes'
    // warnings (a handler cut off at the gather's deadline) must not show up there.
    let out = peerwire_cmd()
        .arg("demo")
        .env_remove("RUST_LOG")
        .output()
        .expect("run peerwire");
    ok_stdout(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "the demo logged:\n{stderr}");
}

#[test]
fn call_notify_gather_across_processes() {
    let a = NodeProc::start("echo-a", &[]);
    let b = NodeProc::start("echo-b", &["--peer", &a.endpoint]);
    let call = peerwire(&[
        "call",
        "echo.echo",
        r#"{"hello":[1,2,3]}"#,
        "--peer",
        &a.endpoint,
    ]);
    let v: serde_json::Value = serde_json::from_str(&ok_stdout(&call)).unwrap();
    assert_eq!(v, serde_json::json!({"hello": [1, 2, 3]}));

    let upper = peerwire(&["call", "echo.upper", r#""shout""#, "--peer", &a.endpoint]);
    assert_eq!(ok_stdout(&upper).trim(), r#""SHOUT""#);
    let err = peerwire(&["call", "echo.upper", "42", "--peer", &a.endpoint]);
    assert!(one_line_error(&err).contains("not_a_string"));

    ok_stdout(&peerwire(&[
        "notify",
        "echo.log",
        r#"{"n":1}"#,
        "--peer",
        &a.endpoint,
    ]));

    // Gather over both nodes, reached through one seed each.
    let g = peerwire(&[
        "gather",
        "echo.ping",
        "{}",
        "--within",
        "1500",
        "--peer",
        &a.endpoint,
        "--peer",
        &b.endpoint,
    ]);
    let stdout = ok_stdout(&g);
    let names: Vec<String> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["from"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        names.contains(&"echo-a".to_string()) && names.contains(&"echo-b".to_string()),
        "{stdout}"
    );

    let peers = ok_stdout(&peerwire(&["peers", "--json", "--peer", &a.endpoint]));
    let v: serde_json::Value = serde_json::from_str(&peers).unwrap();
    assert!(v.as_array().unwrap().iter().any(|p| p["name"] == "echo-a"));
}

#[test]
fn one_seed_is_enough_for_gather_and_peers() {
    // `gather` used to decide who was expected as soon as its seed answered, before
    // gossip named the others (0 of 8 gathers complete); `peers --peer A` listed A alone.
    let a = NodeProc::start("seed-a", &[]);
    let b = NodeProc::start("member-b", &["--peer", &a.endpoint]);
    let c = NodeProc::start("member-c", &["--peer", &b.endpoint]);
    // The members join in the background: ask until the seed knows them (bounded).
    // Each `peers` names everyone it learns by gossip, not only the seed.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let peers = ok_stdout(&peerwire(&["peers", "--json", "--peer", &a.endpoint]));
        let v: serde_json::Value = serde_json::from_str(&peers).unwrap();
        let names: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["name"].as_str().map(String::from))
            .collect();
        if ["seed-a", "member-b", "member-c"]
            .iter()
            .all(|n| names.iter().any(|m| m == n))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cluster never showed whole: {names:?}"
        );
    }
    for _ in 0..3 {
        let g = peerwire(&[
            "gather",
            "echo.ping",
            "{}",
            "--within",
            "2000",
            "--peer",
            &a.endpoint,
            "--wait",
            "5000",
        ]);
        let out = ok_stdout(&g);
        assert_eq!(out.lines().count(), 3, "every member answers: {out}");
        let stderr = String::from_utf8_lossy(&g.stderr);
        assert!(stderr.contains("silent: none"), "{stderr}");
    }
    drop((b, c));
}

#[test]
fn an_unreachable_peer_is_reported_with_why() {
    // A `call` to a seed where nothing listens said "no responder known", as if the
    // peer were up and served something else.
    let out = peerwire(&["call", "echo.echo", "1", "--peer", "tcp://127.0.0.1:9"]);
    let err = one_line_error(&out);
    assert!(err.contains("no peer reached"), "{err}");
    assert!(err.contains("tcp://127.0.0.1:9"), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
    let out = peerwire(&["peers", "--peer", "tcp://127.0.0.1:9"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tcp://127.0.0.1:9: unreachable"),
        "{stderr}"
    );
}

#[test]
fn publish_and_subscribe_across_processes() {
    let a = NodeProc::start("hub", &[]);
    let mut sub = peerwire_cmd()
        .args(["subscribe", "news.", "--count", "1", "--peer", &a.endpoint])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The subscriber announces itself to the hub; a publisher seeded with the hub reaches
    // it once the subscriber is connected to the publisher's PUB. Keep publishing from
    // fresh publisher processes until the subscriber has its event.
    let stdout = sub.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    });
    let sub_ep = {
        // The subscriber process is itself a node; the publisher learns of it through the hub.
        a.endpoint.clone()
    };
    let mut got = None;
    for _ in 0..20 {
        let _ = peerwire(&[
            "publish",
            "news.flash",
            r#"{"headline":"hi"}"#,
            "--peer",
            &sub_ep,
            "--wait",
            "500",
        ]);
        if reader.is_finished() {
            got = Some(reader.join().unwrap());
            break;
        }
    }
    let line = got.expect("subscriber got an event");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["topic"], "news.flash");
    assert_eq!(v["value"]["headline"], "hi");
    assert!(sub.wait().unwrap().success());
}

#[test]
fn bad_json_and_unknown_service_are_one_line_errors() {
    let a = NodeProc::start("errs", &[]);
    let e = one_line_error(&peerwire(&[
        "call",
        "echo.echo",
        "{not json",
        "--peer",
        &a.endpoint,
    ]));
    assert!(e.contains("not valid JSON"), "{e}");
    let e = one_line_error(&peerwire(&[
        "call",
        "nope.nothing",
        "{}",
        "--peer",
        &a.endpoint,
        "--wait",
        "500",
    ]));
    assert!(
        e.contains("no responder known for nope.nothing") && e.contains("echo.echo"),
        "{e}"
    );
    let e = one_line_error(&peerwire(&["publish", "t", "[1,", "--peer", &a.endpoint]));
    assert!(e.contains("not valid JSON"), "{e}");
    let e = one_line_error(&peerwire(&["call", "echo.echo", "{}"]));
    assert!(e.contains("--peer"), "{e}");
}

#[tokio::test]
async fn node_process_killed_and_restarted_mid_stream() {
    use peerwire::node::{CallError, CallOptions};
    let a = NodeProc::start("victim", &[]);
    let port = a.port();
    let client = start_node("client", std::slice::from_ref(&a.endpoint)).await;
    wait_service(&client, "echo.echo", 1).await;
    let mut a = Some(a);
    let mut restarted = None;
    let (mut ok, mut failed) = (0, 0);
    for i in 0..300u64 {
        if i == 50 {
            drop(a.take()); // SIGKILL
        }
        if i == 100 {
            restarted = Some(NodeProc::start("victim-2", &["--port", &port]));
        }
        let r = client
            .request_with::<_, u64>(
                "echo.echo",
                &i,
                CallOptions::timeout(Duration::from_secs(2)),
            )
            .await;
        match r {
            Ok(v) => {
                assert_eq!(v, i);
                ok += 1;
            }
            Err(
                CallError::Disconnected(_) | CallError::NoResponder(_) | CallError::Timeout { .. },
            ) => {
                failed += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(restarted.is_some());
    assert!(ok > 100 && failed > 0, "ok {ok} failed {failed}");
    wait_until("restarted node known", || {
        client
            .peers()
            .iter()
            .any(|p| p.name == "victim-2" && p.connected)
    })
    .await;
    assert_eq!(
        client.request::<_, u64>("echo.echo", &1u64).await.unwrap(),
        1
    );
}

#[tokio::test]
async fn a_node_outlives_a_closed_log_and_output() {
    // Both pipes closed by their reader: every later log line and output line fails to
    // write. The node must keep serving (a panic on EPIPE once killed nodes here).
    let mut child = peerwire_cmd()
        .args(["node", "--name", "quiet", "--serve", "echo"])
        .env("RUST_LOG", "peerwire=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    drop(child.stderr.take());
    let endpoint = line.trim().to_string();
    // A malformed greeting makes the node log a warning (to the closed stderr).
    let mut raw = RawPeer::connect(endpoint.trim_start_matches("tcp://").parse().unwrap()).await;
    let _ = raw.send(b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(raw.closed_within(BOUND).await);
    for _ in 0..3 {
        let ep = endpoint.clone();
        let out = tokio::task::spawn_blocking(move || {
            peerwire(&["call", "echo.echo", "[1]", "--peer", &ep])
        })
        .await
        .unwrap();
        ok_stdout(&out);
    }
    assert!(child.try_wait().unwrap().is_none(), "the node died");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn mdns_on_a_missing_interface_is_a_one_line_error_with_a_hint() {
    // Refused before any mDNS socket exists: nothing is sent anywhere.
    let out = peerwire(&["peers", "--mdns-interface", "no-such-if0"]);
    let err = one_line_error(&out);
    assert!(err.contains("no usable interface"), "{err}");
    assert!(err.contains("peerwire doctor"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_output_nobody_reads_keeps_serving() {
    // A node writes presence lines, logs and what `echo.log` prints. When its stdout or
    // stderr is a pipe that nobody drains, a write blocks; a runtime thread blocked in a
    // write stopped the node. Now those lines are queued for a writer thread, and dropped
    // (counted) when it falls behind.
    let (mut child, endpoint, out) = piped_node(&["--name", "mute", "--serve", "echo"]);
    // Both pipes stay open and unread from here on.
    let _unread = (out, child.stderr.take());
    let client = start_node("flooder", std::slice::from_ref(&endpoint)).await;
    wait_service(&client, "echo.log", 1).await;
    // Far more than a pipe holds (64 KiB): 20 000 lines of some 150 bytes.
    let pad = "x".repeat(100);
    for i in 0..20_000u32 {
        client
            .notify("echo.log", &serde_json::json!({ "i": i, "pad": pad }))
            .await
            .unwrap();
    }
    for n in 0..20u64 {
        let got: u64 = client
            .request_with(
                "echo.echo",
                &n,
                peerwire::node::CallOptions::timeout(Duration::from_secs(3)),
            )
            .await
            .unwrap();
        assert_eq!(got, n);
    }
    client.shutdown().await;
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_from_the_network_cannot_forge_lines() {
    // A peer's name is the peer's to choose: newlines and terminal escapes in it are
    // shown escaped, on one line.
    let (mut child, endpoint, _out) = piped_node(&["--name", "watcher"]);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let evil = peerwire::node::Node::builder("evil\nWARN forged line\u{1b}[2J")
        .insecure()
        .peer(endpoint)
        .socket_options(test_opts())
        .start()
        .await
        .unwrap();
    let mut seen = Vec::new();
    let joined = loop {
        let l = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a joined line");
        seen.push(l.clone());
        if l.contains("joined") {
            break l;
        }
    };
    assert!(
        joined.contains("evil\\nWARN forged line\\u{1b}[2J"),
        "{joined:?}"
    );
    assert!(
        seen.iter().all(|l| !l.starts_with("WARN forged")),
        "{seen:?}"
    );
    evil.shutdown().await;
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_messages_is_not_a_flood_of_log_lines() {
    // 200 000 malformed messages once wrote 41.6 MB of warnings in 5 s. Each log call
    // site now writes at most 20 lines a second and then says how many it suppressed.
    let (mut child, endpoint, _out) = piped_node(&["--name", "target", "--serve", "echo"]);
    let stderr = child.stderr.take().unwrap();
    let logged = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            lines.push(l);
        }
        lines
    });
    let addr = addr_of(&endpoint);
    let mut raw = RawPeer::connect(addr).await;
    raw.handshake("DEALER").await;
    let mut junk = bytes::BytesMut::new();
    for _ in 0..1000 {
        junk.extend_from_slice(&[0x00, 0x04, b'j', b'u', b'n', b'k']);
    }
    for _ in 0..200 {
        raw.send(&junk).await.unwrap();
    }
    // The node still answers, and says it is busy refusing.
    let client = start_node("client", std::slice::from_ref(&endpoint)).await;
    wait_service(&client, "echo.echo", 1).await;
    let got: u64 = client.request("echo.echo", &3u64).await.unwrap();
    assert_eq!(got, 3);
    client.shutdown().await;
    // SIGTERM: the node stops and its stderr closes, which ends the reader.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    let lines = logged.join().unwrap();
    let malformed = lines.iter().filter(|l| l.contains("malformed")).count();
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    assert!(malformed >= 1, "the flood was not logged at all: {lines:?}");
    assert!(
        malformed < 200,
        "{malformed} lines about malformed messages"
    );
    assert!(
        bytes < 64 * 1024,
        "{bytes} bytes of log for 200 000 bad messages"
    );
    assert!(
        lines.iter().any(|l| l.contains("were suppressed")),
        "no count of the suppressed lines: {lines:?}"
    );
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "colour codes in a pipe"
    );
}

#[test]
fn keys_are_made_shown_and_never_overwritten() {
    let dir = fresh_dir("keys");
    let name = dir.join("node");
    let name = name.to_str().unwrap();
    let made = ok_stdout(&peerwire(&["keys", "new", name]));
    let public = made.trim();
    assert_eq!(public.len(), 40, "{made}");
    for file in [format!("{name}.key"), format!("{name}.key_secret")] {
        assert_eq!(
            ok_stdout(&peerwire(&["keys", "show", &file])).trim(),
            public
        );
    }
    // The secret file is the owner's only, and a second `new` does not replace it.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(format!("{name}.key_secret"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(one_line_error(&peerwire(&["keys", "new", name])).contains("exists"));
    assert!(
        one_line_error(&peerwire(&["keys", "show", "/nonexistent/x.key"])).contains("No such file")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_secured_node_answers_callers_that_know_its_key_and_only_those_it_allows() {
    let dir = fresh_dir("secure");
    let path = |n: &str| dir.join(n).to_str().unwrap().to_string();
    // The caller's key pair, made first: the node lets only it in.
    let caller_public = ok_stdout(&peerwire(&["keys", "new", &path("caller")]));
    let caller_public = caller_public.trim();
    let node = NodeProc::start_with(
        "vault",
        &[
            "--serve",
            "echo",
            "--key",
            &path("vault.key_secret"),
            "--allow",
            caller_public,
        ],
    );
    // Its endpoint line carries its key, as --peer takes it.
    let (at, key) = node
        .endpoint
        .split_once('#')
        .expect("a key in the endpoint line");
    assert_eq!(key.len(), 40);
    let call = |extra: &[&str]| {
        let mut args = vec![
            "call",
            "echo.echo",
            "7",
            "--wait",
            "1500",
            "--timeout-ms",
            "1000",
        ];
        args.extend_from_slice(extra);
        peerwire(&args)
    };
    let ok = call(&[
        "--peer",
        &node.endpoint,
        "--key",
        &path("caller.key_secret"),
    ]);
    assert_eq!(ok_stdout(&ok).trim(), "7");
    // A key the node does not allow, and a caller without CURVE: no answer.
    assert!(!call(&["--peer", &node.endpoint]).status.success());
    let plain = call(&["--peer", at]);
    let why = String::from_utf8_lossy(&plain.stderr);
    assert!(
        !plain.status.success() && why.contains("the peer is secured"),
        "{why}"
    );
    // --allow without security is a mistake, said at once.
    let err = one_line_error(&peerwire(&[
        "call",
        "x.y",
        "1",
        "--peer",
        at,
        "--allow",
        caller_public,
    ]));
    assert!(err.contains("--allow needs a secured node"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn security_is_never_off_by_omission() {
    let out = peerwire_cmd()
        .env_remove("PEERWIRE_INSECURE")
        .args(["node", "--name", "x"])
        .output()
        .expect("run peerwire");
    let err = one_line_error(&out);
    assert!(
        err.contains("no security chosen") && err.contains("--insecure"),
        "{err}"
    );
}

#[test]
fn members_holding_the_cluster_secret_call_each_other_and_nobody_else_can() {
    let dir = fresh_dir("cluster");
    let path = |n: &str| dir.join(n).to_str().unwrap().to_string();
    for name in ["ours", "theirs"] {
        assert!(peerwire(&["keys", "secret", &path(name)]).status.success());
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path("ours"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(one_line_error(&peerwire(&["keys", "secret", &path("ours")])).contains("exists"));

    let node = NodeProc::start_with(
        "member",
        &["--serve", "echo", "--cluster-secret", &path("ours")],
    );
    let (at, _) = node
        .endpoint
        .split_once('#')
        .expect("a secured node's line");
    let call = |secret: &str| {
        peerwire(&[
            "call",
            "echo.echo",
            "7",
            "--wait",
            "1500",
            "--timeout-ms",
            "1000",
            "--peer",
            at,
            "--cluster-secret",
            secret,
        ])
    };
    // A member needs no key for its seed: the secret is enough.
    assert_eq!(ok_stdout(&call(&path("ours"))).trim(), "7");
    // Another cluster's secret: the handshake fails, nothing is learned.
    let other = call(&path("theirs"));
    assert!(!other.status.success(), "another cluster was answered");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `peerwire bench` on loopback, secured (the CURVE path is what users run): JSON that
/// parses with every series beside the raw TCP baseline, and a plot.
#[test]
fn bench_measures_each_style_beside_raw_tcp_and_plots_it() {
    use std::io::BufRead;
    use std::process::Stdio;
    let mut responder = peerwire_cmd()
        .args(["bench", "serve", "--secure"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the responder");
    let mut endpoint = String::new();
    std::io::BufReader::new(responder.stdout.take().unwrap())
        .read_line(&mut endpoint)
        .unwrap();
    let endpoint = endpoint.trim().to_string();
    assert!(
        endpoint.contains('#'),
        "a secured responder's line: {endpoint}"
    );
    let svg = std::env::temp_dir().join(format!("pw-bench-{}.svg", std::process::id()));
    let out = peerwire(&[
        "bench",
        "run",
        "--peer",
        &endpoint,
        "--count",
        "200",
        "--warmup",
        "20",
        "--sizes",
        "64,4096",
        "--rate",
        "2000",
        "--json",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let _ = responder.kill();
    let _ = responder.wait();
    let v: serde_json::Value = serde_json::from_str(&ok_stdout(&out)).expect("bench --json parses");
    assert_eq!(v["plan"]["rate"], 2000.0);
    let styles: Vec<&str> = v["latency"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["style"].as_str().unwrap())
        .collect();
    assert_eq!(
        styles,
        ["tcp", "request", "gather", "tcp", "request", "gather"]
    );
    for l in v["latency"].as_array().unwrap() {
        assert_eq!(l["count"], 200, "{l}");
        assert!(l["p50_us"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["p50_vs_tcp"].as_f64().unwrap() > 0.0, "{l}");
    }
    assert_eq!(v["throughput"].as_array().unwrap().len(), 4, "{v}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(
        plot.starts_with("<svg") && plot.contains("request 64 B"),
        "{plot:.200}"
    );
    std::fs::remove_file(&svg).unwrap();
}

#[test]
fn bench_without_a_responder_says_how_to_start_one() {
    let out = peerwire(&[
        "bench",
        "run",
        "--peer",
        "tcp://127.0.0.1:9",
        "--wait",
        "500",
    ]);
    assert!(!out.status.success());
    // Which peer could not be reached, then what to do.
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.trim().lines().collect();
    assert!(lines[0].contains("Connection refused"), "{err}");
    assert!(
        lines.len() == 2 && lines[1].contains("start `peerwire bench serve`"),
        "{err}"
    );
    let err = one_line_error(&peerwire(&[
        "bench",
        "run",
        "--sizes",
        "0",
        "--peer",
        "tcp://127.0.0.1:9",
    ]));
    assert!(err.contains("--sizes"), "{err}");
}

#[test]
fn deliver_keeps_what_is_not_acknowledged_in_its_outbox_file_for_the_next_run() {
    let dir = fresh_dir("cli-outbox");
    let file = dir.join("outbox.redb");
    let file = file.to_str().unwrap();
    // A node serving nothing: the message has nowhere to go yet.
    let b = NodeProc::start_with("b", &[]);
    let out = peerwire(&[
        "deliver",
        "echo.log",
        r#"{"n":1}"#,
        "--peer",
        &b.endpoint,
        "--outbox",
        file,
        "--ack-within",
        "300",
    ]);
    assert!(one_line_error(&out).contains("kept in"));
    let listed = ok_stdout(&peerwire(&["outbox", file, "--json"]));
    let rows: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{listed}");
    assert_eq!(rows[0]["target"], "echo.log");
    // An instance appears (b gossips it); the next run sends both.
    let _a = NodeProc::start("a", &["--peer", &b.endpoint]);
    let out = peerwire(&[
        "deliver",
        "echo.log",
        r#"{"n":2}"#,
        "--peer",
        &b.endpoint,
        "--outbox",
        file,
    ]);
    let id = ok_stdout(&out);
    assert_eq!(id.trim().len(), 36, "the message id: {id}");
    assert_eq!(ok_stdout(&peerwire(&["outbox", file, "--json"])), "");
    // Garbage and missing files: one clear line.
    assert!(
        one_line_error(&peerwire(&["outbox", "/nonexistent/outbox.redb"]))
            .contains("reading the outbox")
    );
    let _ = std::fs::remove_dir_all(&dir);
}
