//! The `peerwire` binary, run as a separate process.

mod support;

use std::process::Command;

use peerwire::transport::{Router, SocketOptions};
use support::*;

fn peerwire(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_peerwire"))
        .args(args)
        .output()
        .expect("run peerwire")
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
