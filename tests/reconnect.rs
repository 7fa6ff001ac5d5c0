//! Issue 15, "connections that survive": capture and replay reconnect after their server
//! restarts (fast and immediate shutdowns, under a writer) and the copy still equals the
//! source, nothing lost or doubled; a source that stays down makes capture give up after
//! `--reconnect-attempts`; a problem waiting does not fix (the slot dropped while capture was
//! away) stops it at once; a server that cannot be reached at the start is an error at once,
//! naming it.
//!
//! The binaries run as child processes (their stderr in a file, read at the end), the servers
//! are real localpg clusters restarted with [`Cluster::restart`].

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use walshift::Lsn;
use walshift::buffer::BufferReader;
use walshift::conn::ConnInfo;
use walshift::localpg::{Cluster, ClusterOptions, ShutdownMode};

const SCHEMA: &str = "
    CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL, note text);
    CREATE TABLE tally (n bigint NOT NULL, at timestamptz NOT NULL);
    ALTER TABLE tally REPLICA IDENTITY FULL;
    INSERT INTO acct SELECT g, g * 10, 'seed ' || g FROM generate_series(1, 2000) g;";

/// The restarts each test puts its server through.
const RESTARTS: [ShutdownMode; 3] = [
    ShutdownMode::Fast,
    ShutdownMode::Immediate,
    ShutdownMode::Fast,
];

/// Longest wait for something that must happen (a guard against a hang, not a measurement).
const PATIENCE: Duration = Duration::from_secs(90);

/// A walshift child process whose stderr goes to a file; killed if still running when dropped.
struct Walshift {
    child: Child,
    log: PathBuf,
}

impl Walshift {
    fn spawn(args: &[&str], log: PathBuf) -> Walshift {
        let child = Command::new(common::cli::EXE)
            .args(args)
            .env_remove("PGCONNECT_TIMEOUT")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Walshift { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the process to exit on its own.
    async fn exit(&mut self) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "walshift still running after {PATIENCE:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM (a clean stop), then waits.
    async fn stop(&mut self) -> ExitStatus {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        self.exit().await
    }
}

impl Drop for Walshift {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until `check` says yes, failing with `what` (and `log`) if it never does.
async fn wait_for<F, Fut>(what: &str, log: impl Fn() -> String, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < PATIENCE,
            "{what}: not after {PATIENCE:?}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A SQL session to a server that may be restarting: `None` while it is away.
async fn session(conn: &str) -> Option<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Some(client)
}

/// Writes small transactions on the source until stopped, reconnecting whenever the server
/// went away (a transaction cut off by a restart may or may not have committed: the copy is
/// compared with what the source holds, not with this count). Every transaction inserts a
/// distinct `tally.n`, so one applied twice shows as a duplicate on the copy.
fn writer(
    conn: String,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let Some(client) = session(&conn).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let sql = format!(
                    "BEGIN;
                     INSERT INTO acct VALUES ({i}, {n}, 'w{n}')
                       ON CONFLICT (id) DO UPDATE SET bal = acct.bal + 1, note = excluded.note;
                     UPDATE acct SET bal = bal - 1 WHERE id = {u};
                     DELETE FROM acct WHERE id = {d};
                     INSERT INTO tally VALUES ({n}, now());
                     COMMIT;",
                    i = 1 + (n * 7) % 2500,
                    u = 1 + (n * 11) % 2500,
                    d = 1 + (n * 13) % 2500,
                );
                if client.batch_execute(&sql).await.is_err() {
                    break; // the server went away: reconnect
                }
                committed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    })
}

struct Writer {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(cluster: &Cluster) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let task = writer(
            cluster.conn_string("postgres"),
            stop.clone(),
            committed.clone(),
        );
        Writer {
            stop,
            committed,
            task,
        }
    }

    fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Waits until the writer committed `more` transactions beyond now.
    async fn wait_commits(&self, more: u64, log: impl Fn() -> String) {
        let target = self.committed() + more;
        wait_for("the writer commits on the source", log, || async {
            self.committed() >= target
        })
        .await;
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.committed.load(Ordering::Relaxed)
    }
}

/// End LSN of the last commit in the buffer, if it can be read now.
fn buffer_end(dir: &Path) -> Option<Lsn> {
    let reader = BufferReader::open(dir).ok()?;
    let (commit, _) = reader.last_commit_since(None).ok()?;
    commit.map(|c| c.end_lsn)
}

/// Waits until the command logged `n` reconnects: it is past the lost run's settling (a
/// replay's reconnect attempt may commit a batch the lost run left prepared before it is
/// applying again).
async fn wait_reconnects(what: &str, n: usize, log: impl Fn() -> String) {
    let line = format!("{what}: reconnected to host=127.0.0.1");
    wait_for(&format!("{what} reconnects {n} time(s)"), &log, || async {
        log().matches(line.as_str()).count() >= n
    })
    .await;
}

/// Waits until the buffer holds a commit past the one it ends with now: capture is streaming.
async fn wait_buffer_grows(dir: &Path, log: impl Fn() -> String) {
    let before = buffer_end(dir);
    wait_for("capture appends to the buffer", log, || async {
        buffer_end(dir) > before
    })
    .await;
}

/// Commits a last transaction on the source (the writer stopped) and waits until the buffer
/// holds it, hence everything committed before it. Returns its end LSN as the buffer has it.
async fn wait_buffer_has_all(source: &Cluster, dir: &Path, log: impl Fn() -> String) -> Lsn {
    let c = source.connect("postgres").await.unwrap();
    c.batch_execute("BEGIN; INSERT INTO tally VALUES (-1, now())")
        .await
        .unwrap();
    let before: Lsn = c
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    wait_for("the buffer holds the last transaction", log, || async {
        buffer_end(dir).is_some_and(|end| end > before)
    })
    .await;
    buffer_end(dir).unwrap()
}

/// The target's applied position (`walshift.applied`), if it can be read now.
async fn applied(target: &str) -> Option<Lsn> {
    let c = session(target).await?;
    let row = c
        .query_opt("SELECT end_lsn::text FROM walshift.applied", &[])
        .await
        .ok()??;
    row.get::<_, String>(0).parse().ok()
}

/// Waits until replay commits a batch past the target's applied position as it is now.
async fn wait_replay_applies(target: &str, log: impl Fn() -> String) {
    let started = Instant::now();
    let before = loop {
        if let Some(a) = applied(target).await {
            break a;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the target's applied position cannot be read\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    wait_for("replay applies", log, || async {
        applied(target).await.is_some_and(|a| a > before)
    })
    .await;
}

/// Row count and content digest per table.
async fn digests(cluster: &Cluster) -> Vec<(String, i64, String)> {
    let c = cluster.connect("postgres").await.unwrap();
    let mut out = Vec::new();
    for t in ["acct", "tally"] {
        let r = c
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text FROM {t} t"
                ),
                &[],
            )
            .await
            .unwrap();
        out.push((t.to_owned(), r.get(0), r.get(1)));
    }
    out
}

/// The copy equals the source, and no transaction arrived twice.
async fn assert_copy_equals_source(source: &Cluster, target: &Cluster) {
    let (s, t) = (digests(source).await, digests(target).await);
    assert!(s[1].1 > 100, "the writer wrote: {s:?}");
    assert_eq!(s, t, "copy equals source (count, digest per table)");
    let dups: i64 = target
        .connect("postgres")
        .await
        .unwrap()
        .query_one("SELECT count(*) - count(DISTINCT n) FROM tally", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dups, 0, "no transaction applied twice");
}

async fn clone_done(target: &ConnInfo) -> bool {
    matches!(
        walshift::clone::clone_state(target).await,
        Ok(Some(s)) if s.status == walshift::clone::CloneStatus::Done
    )
}

fn restart(cluster: &mut Cluster, mode: ShutdownMode) {
    tokio::task::block_in_place(|| cluster.restart(mode)).unwrap();
}

/// A source with `SCHEMA` and an empty target, a buffer directory, and their connection strings.
struct Release {
    source: Cluster,
    target: Cluster,
    dir: tempfile::TempDir,
    buffer: PathBuf,
    src: String,
    tgt: String,
    target_info: ConnInfo,
}

impl Release {
    async fn start() -> Release {
        let source = Cluster::start(ClusterOptions::default()).unwrap();
        let target = Cluster::start(ClusterOptions::default()).unwrap();
        source.execute("postgres", SCHEMA).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let buffer = dir.path().join("buffer");
        let (src, tgt) = (
            source.conn_string("postgres"),
            target.conn_string("postgres"),
        );
        let target_info = ConnInfo::parse(&tgt).unwrap();
        Release {
            source,
            target,
            dir,
            buffer,
            src,
            tgt,
            target_info,
        }
    }
}

/// `walshift capture --clone-to` into `buffer`, its stderr in `<dir>/capture.log`.
fn cloning_capture(src: &str, tgt: &str, buffer: &Path, dir: &Path) -> Walshift {
    Walshift::spawn(
        &[
            "capture",
            "--source",
            src,
            "--buffer",
            buffer.to_str().unwrap(),
            "--clone-to",
            tgt,
            "--no-progress",
        ],
        dir.join("capture.log"),
    )
}

/// `capture --clone-to` under a writer; the source restarted three times (fast, immediate,
/// fast) while capture streams; then a one-shot replay into the clone equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_survives_source_restarts_and_the_copy_equals_the_source() {
    let Release {
        mut source,
        target,
        dir,
        buffer,
        src,
        tgt,
        target_info,
    } = Release::start().await;

    let writer = Writer::start(&source);
    let mut capture = cloning_capture(&src, &tgt, &buffer, dir.path());
    let log = || std::fs::read_to_string(dir.path().join("capture.log")).unwrap_or_default();
    wait_for("the clone is done", log, || clone_done(&target_info)).await;
    for (n, mode) in RESTARTS.into_iter().enumerate() {
        wait_reconnects("capture", n, log).await;
        wait_buffer_grows(&buffer, log).await;
        restart(&mut source, mode);
        assert!(
            capture.running(),
            "capture survives a {mode:?} restart:\n{}",
            log()
        );
    }
    wait_reconnects("capture", RESTARTS.len(), log).await;
    wait_buffer_grows(&buffer, log).await;
    writer.wait_commits(50, log).await;
    writer.finish().await;
    wait_buffer_has_all(&source, &buffer, log).await;
    let status = capture.stop().await;
    let text = capture.log();
    eprintln!("capture's log:\n{text}");
    assert!(status.success(), "capture stops cleanly: {text}");
    assert!(
        text.matches("capture: reconnected to host=127.0.0.1")
            .count()
            >= RESTARTS.len(),
        "one reconnect per restart at least:\n{text}"
    );
    assert!(
        text.contains("capture: lost the replication stream (") && text.contains("attempt 1 of 10"),
        "each loss is said, with the attempt count:\n{text}"
    );

    let mut replay = Walshift::spawn(
        &[
            "replay",
            "--buffer",
            buffer.to_str().unwrap(),
            "--target",
            &tgt,
            "--no-progress",
        ],
        dir.path().join("replay.log"),
    );
    let status = replay.exit().await;
    assert!(status.success(), "replay: {}", replay.log());
    assert_copy_equals_source(&source, &target).await;
}

/// `replay --follow` while the target is restarted three times under the writer; the copy
/// equals the source afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_follow_survives_target_restarts_and_the_copy_equals_the_source() {
    let Release {
        source,
        mut target,
        dir,
        buffer,
        src,
        tgt,
        target_info,
    } = Release::start().await;

    let writer = Writer::start(&source);
    let mut capture = cloning_capture(&src, &tgt, &buffer, dir.path());
    let capture_log =
        || std::fs::read_to_string(dir.path().join("capture.log")).unwrap_or_default();
    wait_for("the clone is done", capture_log, || {
        clone_done(&target_info)
    })
    .await;
    let mut replay = Walshift::spawn(
        &[
            "replay",
            "--follow",
            "--buffer",
            buffer.to_str().unwrap(),
            "--target",
            &tgt,
            "--batch-ms",
            "20",
            "--no-progress",
        ],
        dir.path().join("replay.log"),
    );
    let log = || std::fs::read_to_string(dir.path().join("replay.log")).unwrap_or_default();
    for (n, mode) in RESTARTS.into_iter().enumerate() {
        wait_reconnects("replay", n, log).await;
        wait_replay_applies(&tgt, log).await;
        restart(&mut target, mode);
        assert!(
            replay.running(),
            "replay survives a {mode:?} restart:\n{}",
            log()
        );
    }
    wait_reconnects("replay", RESTARTS.len(), log).await;
    wait_replay_applies(&tgt, log).await;
    writer.finish().await;
    let end = wait_buffer_has_all(&source, &buffer, capture_log).await;
    wait_for("replay applies everything", log, || async {
        applied(&tgt).await.is_some_and(|a| a >= end)
    })
    .await;
    let status = replay.stop().await;
    let text = replay.log();
    eprintln!("replay's log:\n{text}");
    assert!(status.success(), "replay stops cleanly: {text}");
    assert!(
        text.matches("replay: reconnected to host=127.0.0.1")
            .count()
            >= RESTARTS.len(),
        "one reconnect per restart at least:\n{text}"
    );
    assert!(
        text.contains("replay: lost the target (") && text.contains("attempt 1 of 10"),
        "each loss is said, with the attempt count:\n{text}"
    );
    assert!(capture.stop().await.success(), "{}", capture.log());
    assert_copy_equals_source(&source, &target).await;
}

/// Starts capture on a fresh buffer of `source` (no clone) and waits until it streams.
async fn streaming_capture(source: &Cluster, dir: &Path, attempts: &str) -> Walshift {
    source.execute("postgres", SCHEMA).await.unwrap();
    let buffer = dir.join("buffer");
    let capture = Walshift::spawn(
        &[
            "capture",
            "--source",
            &source.conn_string("postgres"),
            "--buffer",
            buffer.to_str().unwrap(),
            "--reconnect-attempts",
            attempts,
            "--no-progress",
        ],
        dir.join("capture.log"),
    );
    let log = || std::fs::read_to_string(dir.join("capture.log")).unwrap_or_default();
    let c = source.connect("postgres").await.unwrap();
    c.batch_execute("INSERT INTO tally VALUES (0, now())")
        .await
        .unwrap();
    wait_for("capture streams", log, || async {
        c.batch_execute("INSERT INTO tally VALUES (0, now())")
            .await
            .unwrap();
        buffer_end(&buffer).is_some()
    })
    .await;
    capture
}

/// The source goes down and stays down: capture makes its attempts, then exits non-zero
/// saying it gave up, how often it tried and what the last attempt met.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_gives_up_when_the_source_stays_down() {
    let mut source = Cluster::start(ClusterOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut capture = streaming_capture(&source, dir.path(), "3").await;
    tokio::task::block_in_place(|| source.stop_server(ShutdownMode::Fast)).unwrap();
    let status = capture.exit().await;
    let text = capture.log();
    eprintln!("capture's log:\n{text}");
    assert!(!status.success(), "capture fails: {text}");
    for attempt in 1..=3 {
        assert!(
            text.contains(&format!("attempt {attempt} of 3")),
            "attempt {attempt} is logged:\n{text}"
        );
    }
    assert!(!text.contains("attempt 4 of"), "no fourth attempt:\n{text}");
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "error: lost the source and could not get the stream back: 3 reconnect attempt(s)"
        ),
        "the final error says it gave up: {last}"
    );
    assert!(
        last.contains(&format!(
            "cannot connect to host=127.0.0.1 port={}",
            source.port()
        )),
        "and what the last attempt met, naming the server: {last}"
    );
}

/// The slot is dropped while capture is disconnected: the attempt that finds it gone stops
/// capture at once, without further attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_stops_at_once_when_the_slot_is_gone() {
    let source = Cluster::start(ClusterOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut capture = streaming_capture(&source, dir.path(), "5").await;
    let c = source.connect("postgres").await.unwrap();
    // End the walsender, then drop the slot before capture's next attempt takes it again.
    let log = || std::fs::read_to_string(dir.path().join("capture.log")).unwrap_or_default();
    wait_for("the slot is dropped while capture is away", log, || async {
        c.batch_execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = 'walshift' AND active_pid IS NOT NULL",
        )
        .await
        .unwrap();
        c.batch_execute("SELECT pg_drop_replication_slot('walshift')")
            .await
            .is_ok()
    })
    .await;
    let status = capture.exit().await;
    let text = capture.log();
    eprintln!("capture's log:\n{text}");
    assert!(!status.success(), "capture fails: {text}");
    assert!(
        text.contains("capture: lost the replication stream"),
        "the lost connection was retried:\n{text}"
    );
    let last = text.lines().last().unwrap_or_default();
    // Found missing by the slot lookup, or (dropped a moment later) by START_REPLICATION.
    assert!(
        last.contains("slot \"walshift\" does not exist"),
        "the final error is the missing slot: {last}"
    );
    let retried_missing_slot = text
        .lines()
        .any(|l| l.contains("reconnecting, attempt") && l.contains("does not exist"));
    assert!(
        !retried_missing_slot,
        "a missing slot is never retried:\n{text}"
    );
    assert!(
        text.contains("found a problem waiting does not fix; stopping"),
        "{text}"
    );
}

/// The target comes back refusing walshift's role (pg_hba.conf): the attempt that meets the
/// authentication failure stops replay at once, without further attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_stops_at_once_when_the_target_refuses_it_after_a_restart() {
    let source = Cluster::start(ClusterOptions::default()).unwrap();
    let mut target = Cluster::start(ClusterOptions::default()).unwrap();
    target.execute("postgres", SCHEMA).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _capture = streaming_capture(&source, dir.path(), "5").await;
    let writer = Writer::start(&source);
    let tgt = target.conn_string("postgres");
    let mut replay = Walshift::spawn(
        &[
            "replay",
            "--follow",
            "--buffer",
            dir.path().join("buffer").to_str().unwrap(),
            "--target",
            &tgt,
            "--target-not-cloned-by-walshift",
            "--reconnect-attempts",
            "5",
            "--no-progress",
        ],
        dir.path().join("replay.log"),
    );
    let log = || std::fs::read_to_string(dir.path().join("replay.log")).unwrap_or_default();
    wait_replay_applies(&tgt, log).await;
    tokio::task::block_in_place(|| {
        target.stop_server(ShutdownMode::Fast)?;
        std::fs::write(
            target.data_dir().join("pg_hba.conf"),
            "local all all trust\nhost all all 0.0.0.0/0 reject\n",
        )
        .unwrap();
        target.start_server()
    })
    .unwrap();
    let status = replay.exit().await;
    writer.finish().await;
    let text = replay.log();
    eprintln!("replay's log:\n{text}");
    assert!(!status.success(), "replay fails: {text}");
    assert!(text.contains("replay: lost the target ("), "{text}");
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.contains("pg_hba.conf rejects connection"),
        "the final error is the refusal: {last}"
    );
    let retried = text
        .lines()
        .any(|l| l.contains("reconnecting, attempt") && l.contains("pg_hba.conf"));
    assert!(
        !retried,
        "an authentication failure is never retried:\n{text}"
    );
    assert!(
        text.contains("replay: reconnecting to the target found a problem waiting does not fix"),
        "{text}"
    );
}

/// A server that cannot be reached when capture or replay starts is an error at once (within
/// the connect timeout), naming it — no reconnecting before the first start succeeded: a
/// port nothing listens on, and one whose listener never accepts.
#[test]
fn an_unreachable_server_at_the_start_fails_at_once_naming_it() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // Listening, never accepting: the kernel completes the handshake, nothing answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("replay-buffer")).unwrap();
    walshift::buffer::BufferMeta::new(7, "postgres", "walshift", "walshift")
        .write(&dir.path().join("replay-buffer"))
        .unwrap();
    for (port, expect) in [
        (closed, "cannot connect to"),
        (silent_port, "timed out after 2 s"),
    ] {
        let conn =
            format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2");
        for args in [
            vec![
                "capture",
                "--source",
                &conn,
                "--buffer",
                dir.path().join("capture-buffer").to_str().unwrap(),
                "--no-progress",
            ],
            vec![
                "replay",
                "--target",
                &conn,
                "--buffer",
                dir.path().join("replay-buffer").to_str().unwrap(),
                "--no-progress",
            ],
        ] {
            let out = Command::new(common::cli::EXE)
                .args(&args)
                .env_remove("PGCONNECT_TIMEOUT")
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?}: {err}");
            assert!(err.contains(expect), "{args:?}: {err}");
            assert!(
                err.contains(&format!("host=127.0.0.1 port={port}")),
                "{args:?} names the server: {err}"
            );
            assert!(!err.contains("reconnecting"), "{args:?}: {err}");
        }
    }
    drop(silent);
}

/// `walshift run` (capture + replay in one process) while the source and then the target are
/// restarted under the writer: both halves reconnect, the run keeps going, and the copy
/// equals the source afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_survives_source_and_target_restarts_and_the_copy_equals_the_source() {
    let Release {
        mut source,
        mut target,
        dir,
        buffer,
        src,
        tgt,
        target_info,
    } = Release::start().await;

    let writer = Writer::start(&source);
    let mut run = Walshift::spawn(
        &[
            "run",
            "--source",
            &src,
            "--target",
            &tgt,
            "--buffer",
            buffer.to_str().unwrap(),
            "--batch-ms",
            "20",
            "--no-progress",
        ],
        dir.path().join("run.log"),
    );
    let log = || std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default();
    wait_for("the clone is done", log, || clone_done(&target_info)).await;
    wait_replay_applies(&tgt, log).await;

    wait_buffer_grows(&buffer, log).await;
    restart(&mut source, ShutdownMode::Fast);
    wait_reconnects("capture", 1, log).await;
    wait_buffer_grows(&buffer, log).await;
    assert!(run.running(), "run survives a source restart:\n{}", log());

    wait_replay_applies(&tgt, log).await;
    restart(&mut target, ShutdownMode::Immediate);
    wait_reconnects("replay", 1, log).await;
    wait_replay_applies(&tgt, log).await;
    assert!(run.running(), "run survives a target restart:\n{}", log());

    writer.finish().await;
    let end = wait_buffer_has_all(&source, &buffer, log).await;
    wait_for("run applies everything", log, || async {
        applied(&tgt).await.is_some_and(|a| a >= end)
    })
    .await;
    let status = run.stop().await;
    let text = run.log();
    eprintln!("run's log:\n{text}");
    assert!(status.success(), "run stops cleanly: {text}");
    assert_copy_equals_source(&source, &target).await;
}

/// The source restarts inside a cutover's window — after the fence is up, while the drain waits
/// for the marker (the `walshift run` feeding it is paused with SIGSTOP so the drain cannot
/// finish first): cutover aborts, lifts the fence on a new session (the restart kept the
/// database setting) and the source takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_aborts_and_unfences_when_the_source_restarts_in_the_window() {
    let mut source = Cluster::start(ClusterOptions::default()).unwrap();
    let target = Cluster::start(ClusterOptions::default()).unwrap();
    source.execute("postgres", SCHEMA).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let buffer = dir.path().join("buffer");
    let buf = buffer.to_str().unwrap();
    let (src, tgt) = (
        source.conn_string("postgres"),
        target.conn_string("postgres"),
    );
    let target_info = ConnInfo::parse(&tgt).unwrap();
    let mut run = Walshift::spawn(
        &[
            "run",
            "--source",
            &src,
            "--target",
            &tgt,
            "--buffer",
            buf,
            "--no-progress",
        ],
        dir.path().join("run.log"),
    );
    let run_log = || std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default();
    wait_for("the clone is done", run_log, || clone_done(&target_info)).await;
    source
        .execute(
            "postgres",
            "INSERT INTO acct VALUES (-1, 0, 'before the cutover')",
        )
        .await
        .unwrap();
    wait_for("run applies", run_log, || async {
        applied(&tgt).await.is_some()
    })
    .await;
    let pid = run.child.id() as libc::pid_t;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };

    let mut cutover = Walshift::spawn(
        &[
            "cutover",
            "--source",
            &src,
            "--target",
            &tgt,
            "--buffer",
            buf,
            // The paused run cannot bring the lag down; the drain is what must wait.
            "--max-lag",
            "1h",
            "--max-window",
            "120s",
        ],
        dir.path().join("cutover.log"),
    );
    let log = || std::fs::read_to_string(dir.path().join("cutover.log")).unwrap_or_default();
    wait_for("cutover fences the source", log, || is_fenced(&source)).await;
    // The setting is the fence's first step; its terminations, proof and the marker follow
    // within milliseconds, then the drain waits (the run is stopped, --max-window is 120 s).
    // A restart before that fails a fence statement instead of the drain: give the rest of
    // the fence phase a generous moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Immediate: a fast shutdown would wait up to wal_sender_timeout for the paused run's
    // walsender to take the last WAL.
    restart(&mut source, ShutdownMode::Immediate);
    let status = cutover.exit().await;
    let text = cutover.log();
    eprintln!("cutover's log:\n{text}");
    assert!(
        !status.success(),
        "a lost source aborts the cutover:\n{text}"
    );
    assert!(
        text.contains("ABORTED (source unfenced)"),
        "the report says the fence was lifted:\n{text}"
    );
    assert!(
        text.contains("lost the connection to the source during drain"),
        "the abort names the lost source, not the window running out:\n{text}"
    );
    assert!(
        !is_fenced(&source).await,
        "the database setting is back to what it was: {:?}",
        fence_setting(&source).await
    );
    let c = source.connect("postgres").await.unwrap();
    c.batch_execute("INSERT INTO acct VALUES (-7, 0, 'after the abort')")
        .await
        .expect("the source takes writes again");

    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    run.stop().await;
}

/// The read-only fence is up: the database's own settings say `default_transaction_read_only=on`.
async fn is_fenced(c: &Cluster) -> bool {
    fence_setting(c)
        .await
        .is_some_and(|s| s.iter().any(|v| v == "default_transaction_read_only=on"))
}

/// The source database's own settings (`ALTER DATABASE … SET`), where the fence lives.
async fn fence_setting(c: &Cluster) -> Option<Vec<String>> {
    c.connect("postgres")
        .await
        .ok()?
        .query_opt(
            "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase \
             WHERE d.datname = 'postgres' AND s.setrole = 0",
            &[],
        )
        .await
        .ok()?
        .and_then(|r| r.get(0))
}
