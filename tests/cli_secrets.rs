//! A password given in a connection argument is not on show in the process title
//! (`/proc/<pid>/cmdline`, what `ps` prints) while walshift runs — and still reaches the
//! server. A fake server asks for a cleartext password, records it, and then never answers, so
//! walshift stays running while its command line is read.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A server on 127.0.0.1 that reads a startup packet, asks for a cleartext password, sends the
/// password it gets on the channel, then holds the connection without a word.
fn fake_server() -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut len = [0u8; 4];
                loop {
                    if s.read_exact(&mut len).is_err() {
                        return;
                    }
                    let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
                    if s.read_exact(&mut body).is_err() {
                        return;
                    }
                    if body[..4] == 80877103u32.to_be_bytes() {
                        let _ = s.write_all(b"N"); // no TLS
                        continue;
                    }
                    break;
                }
                let _ = s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
                let mut head = [0u8; 5];
                if s.read_exact(&mut head).is_err() || head[0] != b'p' {
                    return;
                }
                let n = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
                let mut pw = vec![0u8; n];
                if s.read_exact(&mut pw).is_ok() {
                    let _ = tx.send(
                        String::from_utf8_lossy(&pw)
                            .trim_end_matches('\0')
                            .to_owned(),
                    );
                }
                std::thread::sleep(Duration::from_secs(120));
            });
        }
    });
    (port, rx)
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Runs `walshift verify --source <source> …` against the fake server and returns what the
/// server received as the password and the process's command line once it was received.
fn observe(source: &str, rx: &mpsc::Receiver<String>) -> (String, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_walshift"))
        .args(["verify", "--source", source, "--target", source])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pw = rx.recv_timeout(Duration::from_secs(30));
    let args = cmdline(child.id());
    let _ = child.kill();
    let _ = child.wait();
    (pw.expect("the server never got a password"), args)
}

#[test]
fn passwords_in_arguments_are_scrubbed_from_the_process_title() {
    let (port, rx) = fake_server();
    let url = format!("postgresql://app:s3cret@127.0.0.1:{port}/shop?application_name=probe");
    let (pw, args) = observe(&url, &rx);
    assert_eq!(pw, "s3cret", "the password still reaches the server");
    assert!(
        !args.iter().any(|a| a.contains("s3cret")),
        "the password is visible in /proc/<pid>/cmdline: {args:?}"
    );
    assert!(
        args.contains(&format!(
            "postgresql://app@127.0.0.1:{port}/shop?application_name=probe"
        )),
        "{args:?}"
    );

    let (port, rx) = fake_server();
    let kv = format!("host=127.0.0.1 port={port} user=app password='s3 cret' dbname=shop");
    let (pw, args) = observe(&kv, &rx);
    assert_eq!(pw, "s3 cret");
    assert!(!args.iter().any(|a| a.contains("s3 cret")), "{args:?}");
    assert!(
        args.contains(&format!("host=127.0.0.1 port={port} user=app dbname=shop")),
        "{args:?}"
    );
}
