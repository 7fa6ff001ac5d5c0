//! Issue 13, item 8: a server that accepts the TCP connection and never answers does not hang
//! walshift. Every connection — startup and authentication included, not only the TCP
//! connect — is bounded by the connect timeout (`connect_timeout` in the connection string,
//! or `PGCONNECT_TIMEOUT`).

mod common;

use std::net::{TcpListener, TcpStream};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use walshift::buffer::BufferMeta;

/// A listener on 127.0.0.1 that accepts every connection and never sends a byte (the accepted
/// sockets stay open for the life of the test).
fn silent_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            held.lock().unwrap().push(s);
        }
    });
    port
}

/// Runs walshift, killing it if it is still running after `limit`.
fn run_bounded(args: &[&str], env: &[(&str, &str)], limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut cmd = common::cli::command(args);
    cmd.env_remove("PGCONNECT_TIMEOUT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), started.elapsed())
}

fn check_failed_in_time(what: &str, out: &Output, took: Duration, port: u16) {
    let err = common::cli::stderr(out);
    assert!(
        took < Duration::from_secs(12),
        "{what} still waiting after {took:?}: the timeout does not bound startup"
    );
    assert!(!out.status.success(), "{what}: {err}");
    assert!(err.contains("timed out after 2 s"), "{what}: {err}");
    assert!(
        err.contains(&format!("host=127.0.0.1 port={port}")),
        "{what} names the server: {err}"
    );
}

#[test]
fn capture_gives_up_on_a_silent_server_within_connect_timeout() {
    let port = silent_server();
    let dir = tempfile::tempdir().unwrap();
    let source = format!("host=127.0.0.1 port={port} user=app dbname=shop connect_timeout=2");
    let (out, took) = run_bounded(
        &[
            "capture",
            "--source",
            &source,
            "--buffer",
            dir.path().join("b").to_str().unwrap(),
        ],
        &[],
        Duration::from_secs(40),
    );
    check_failed_in_time("capture", &out, took, port);
}

#[test]
fn replay_gives_up_on_a_silent_server_within_pgconnect_timeout() {
    let port = silent_server();
    let dir = tempfile::tempdir().unwrap();
    BufferMeta::new(7, "shop", "walshift", "walshift")
        .write(dir.path())
        .unwrap();
    let target = format!("postgresql://app@127.0.0.1:{port}/shop");
    let (out, took) = run_bounded(
        &[
            "replay",
            "--buffer",
            dir.path().to_str().unwrap(),
            "--target",
            &target,
            "--no-progress",
        ],
        &[("PGCONNECT_TIMEOUT", "2")],
        Duration::from_secs(40),
    );
    check_failed_in_time("replay", &out, took, port);
}
