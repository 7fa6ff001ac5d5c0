//! A password given in a connection argument is not on show in the process title
//! (`/proc/<pid>/cmdline`, what `ps` prints) while walshift runs — and still reaches the
//! server. A fake server asks for a cleartext password, records it, and then never answers, so
//! walshift stays running while its command line is read. And the originals handed over by
//! the scrubber never reach the cutover hooks or the clone's `pg_dump`/`psql`.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
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
    let mut child = common::cli::command(&["verify", "--source", source, "--target", source])
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

/// `KEY=value` lines of an `env` dump that mention `needle` or the scrubber's hand-over
/// variables.
fn leaks(dump: &str, needle: &str) -> Vec<String> {
    dump.lines()
        .filter(|l| {
            l.contains(needle)
                || l.starts_with("WALSHIFT_SCRUBBED_ARG_")
                || l.starts_with("WALSHIFT_ARGS_SCRUBBED")
        })
        .map(str::to_owned)
        .collect()
}

/// The originals the scrubber hands to the re-executed image are removed from its environment
/// before anything runs: the cutover hooks never see the password, and `pg_dump`/`psql` of the
/// clone get it only as their own `PGPASSWORD`. Started with password URLs; each hook and
/// each child (through a wrapper found via a `pg_config` earlier in `PATH`) dumps its
/// environment to a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_and_clone_programs_do_not_inherit_the_handed_over_arguments() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    use walshift::localpg::Cluster;
    use walshift::pgtools::PgBinaries;

    const PW: &str = "Pw-s3cret-42";
    let (source, target) = common::pair::clusters();
    source
        .execute(
            "postgres",
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' FROM generate_series(1, 20) g;",
        )
        .await
        .unwrap();
    let url = |c: &Cluster| format!("postgresql://postgres:{PW}@127.0.0.1:{}/postgres", c.port());
    let (su, tu) = (url(&source), url(&target));

    let work = tempfile::tempdir().unwrap();
    let dumps = work.path().join("dumps");
    let wrappers = work.path().join("wrappers");
    let fake_path = work.path().join("path");
    for d in [&dumps, &wrappers, &fake_path] {
        std::fs::create_dir(d).unwrap();
    }
    let real = PgBinaries::find().unwrap().bindir;
    let exec = |p: &std::path::Path, body: String| {
        std::fs::write(p, body).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    for name in ["initdb", "postgres"] {
        symlink(real.join(name), wrappers.join(name)).unwrap();
    }
    for name in ["pg_dump", "psql"] {
        exec(
            &wrappers.join(name),
            format!(
                "#!/bin/sh\nenv > {d}/{name}.$$.env\nexec {r} \"$@\"\n",
                d = dumps.display(),
                r = real.join(name).display()
            ),
        );
    }
    exec(
        &fake_path.join("pg_config"),
        format!("#!/bin/sh\necho {}\n", wrappers.display()),
    );
    let path = format!(
        "{}:{}",
        fake_path.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let buffer = work.path().join("buffer");
    let walshift = |args: &[&str]| {
        let o = common::cli::command(args)
            .env("PATH", &path)
            .env_remove("PGPASSWORD")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "walshift {}: {}",
            args[0],
            common::cli::text(&o)
        );
    };

    let lsn = common::capture::current_lsn(&source).await.to_string();
    let buf = buffer.to_str().unwrap();
    walshift(&[
        "capture",
        "--source",
        &su,
        "--buffer",
        buf,
        "--clone-to",
        &tu,
        "--until-lsn",
        &lsn,
        "--no-progress",
    ]);
    let hook = |name: &str| format!("env > {}/hook-{name}.env", dumps.display());
    let (before, switch, after) = (hook("before"), hook("switch"), hook("after"));
    walshift(&[
        "cutover", "--source", &su, "--target", &tu, "--buffer", buf, "--before", &before,
        "--switch", &switch, "--after", &after,
    ]);

    let mut seen = Vec::new();
    for e in std::fs::read_dir(&dumps).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let dump = std::fs::read_to_string(e.path()).unwrap();
        let found = leaks(&dump, PW);
        if name.starts_with("hook-") {
            assert!(found.is_empty(), "{name} inherited {found:?}");
        } else {
            assert_eq!(found, [format!("PGPASSWORD={PW}")], "{name}");
        }
        seen.push(name.split('.').next().unwrap().to_owned());
    }
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        [
            "hook-after",
            "hook-before",
            "hook-switch",
            "pg_dump",
            "psql"
        ],
        "every hook and clone program ran through its wrapper"
    );
}
