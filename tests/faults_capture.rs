//! Capture and buffer faults from issue 13 (items 5, 6, 9 and hygiene): a slot feeds one
//! buffer, a buffer missing confirmed data is data loss, a silent stream is noticed, a server
//! shutdown is named, buffer files are private.

mod common;

use std::path::Path;
use std::time::Duration;

use common::capture::try_until_now;
use common::cli;
use walshift::buffer::{BufferError, SlotProgress};
use walshift::capture::{self, CaptureConfig, CaptureError};
use walshift::localpg::Cluster;

async fn setup() -> Cluster {
    let cluster = common::cluster();
    cluster
        .execute("postgres", "CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    cluster
}

async fn insert(cluster: &Cluster, from: i64, n: i64) {
    cluster
        .execute(
            "postgres",
            &format!(
                "INSERT INTO t SELECT g, 'row ' || g FROM generate_series({from}, {}) g",
                from + n - 1
            ),
        )
        .await
        .unwrap();
}

/// Whether `walshift <args>` succeeded, and everything it printed.
fn walshift(args: &[&str]) -> (bool, String) {
    let out = cli::walshift(args);
    (out.status.success(), cli::printed(&out))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// Item 5: a second buffer directory on the same slot (e.g. a relative --buffer run from
/// another directory) is refused; adopting it explicitly works, and then the first buffer,
/// which the second one took transactions from, is refused.
#[tokio::test]
async fn a_second_buffer_on_the_same_slot_is_refused() {
    let cluster = setup().await;
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    try_until_now(&cluster, a.path(), |_| {}).await.unwrap();
    insert(&cluster, 1, 10).await;

    let err = try_until_now(&cluster, b.path(), |_| {}).await.unwrap_err();
    assert!(matches!(err, CaptureError::SlotNotOwned { .. }), "{err}");
    assert!(err.to_string().contains("--adopt-slot"), "{err}");
    assert!(
        !b.path().join(walshift::buffer::META_FILE).exists(),
        "a refused buffer is not claimed"
    );
    // The same through the CLI: a relative --buffer resolved from another directory.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = cli::command(&[
        "capture",
        "--no-progress",
        "--buffer",
        "buffer",
        "--until-lsn",
        "FFFF/0",
    ])
    .current_dir(elsewhere.path())
    .args(["--source", &cluster.conn_string("postgres")])
    .output()
    .unwrap();
    let stderr = cli::stderr(&out);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("already exists") && stderr.contains("relative"),
        "{stderr}"
    );

    // Explicitly adopted: B takes the 10 rows, so A can never get them.
    let report = try_until_now(&cluster, b.path(), |c| c.adopt_slot = true)
        .await
        .unwrap();
    assert_eq!(report.changes, 10);
    let err = try_until_now(&cluster, a.path(), |_| {}).await.unwrap_err();
    assert!(matches!(err, CaptureError::SlotAhead { .. }), "{err}");
}

/// Item 5: a slot dropped and re-created under the same name between two runs: the rows
/// written in the gap are not in the new slot, so resuming is refused.
#[tokio::test]
async fn a_slot_dropped_and_recreated_is_refused() {
    let cluster = setup().await;
    let dir = tempfile::tempdir().unwrap();
    insert(&cluster, 1, 5).await;
    try_until_now(&cluster, dir.path(), |_| {}).await.unwrap();
    cluster
        .execute("postgres", "SELECT pg_drop_replication_slot('walshift')")
        .await
        .unwrap();
    insert(&cluster, 100, 5).await; // the gap
    cluster
        .execute(
            "postgres",
            "SELECT pg_create_logical_replication_slot('walshift', 'pgoutput')",
        )
        .await
        .unwrap();
    insert(&cluster, 200, 5).await;
    let err = try_until_now(&cluster, dir.path(), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, CaptureError::SlotAhead { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("re-created") && msg.contains("--clone-to"),
        "{msg}"
    );
}

/// Item 5: a capture on a slot another capture is streaming from gets a clear refusal.
#[tokio::test]
async fn a_slot_in_use_is_named() {
    let cluster = setup().await;
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    try_until_now(&cluster, a.path(), |_| {}).await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(capture::run(
        common::capture::config(&cluster, a.path()),
        async {
            let _ = stop_rx.await;
        },
    ));
    let client = cluster.connect("postgres").await.unwrap();
    for _ in 0..200 {
        let active: bool = client
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'walshift'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = try_until_now(&cluster, b.path(), |c| c.adopt_slot = true)
        .await
        .unwrap_err();
    assert!(matches!(err, CaptureError::SlotInUse { .. }), "{err}");
    let _ = stop_tx.send(());
    running.await.unwrap().unwrap();
}

/// Item 6: cutting bytes off the end of the last segment loses a confirmed transaction:
/// `buffer verify` and capture both stop with a hard error naming both positions.
#[tokio::test]
async fn a_buffer_cut_short_is_data_loss_not_a_torn_tail() {
    let cluster = setup().await;
    let dir = tempfile::tempdir().unwrap();
    try_until_now(&cluster, dir.path(), |_| {}).await.unwrap();
    for k in 0..5 {
        insert(&cluster, k * 10, 10).await;
    }
    let report = try_until_now(&cluster, dir.path(), |_| {}).await.unwrap();
    let recorded = SlotProgress::read(dir.path()).unwrap().unwrap();
    assert!(recorded.durable_lsn >= report.start_lsn, "{recorded:?}");

    let seg = common::capture::segments(dir.path())
        .pop()
        .expect("a segment");
    let len = std::fs::metadata(&seg).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 30)
        .unwrap();

    let d = dir.path().to_str().unwrap();
    let (ok, out) = walshift(&["buffer", "verify", "--buffer", d]);
    assert!(
        !ok,
        "verify accepted a buffer missing confirmed data: {out}"
    );
    assert!(
        out.contains("data loss") && out.contains(&recorded.durable_lsn.to_string()),
        "{out}"
    );
    assert!(!out.contains("restore"), "{out}");

    let err = try_until_now(&cluster, dir.path(), |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CaptureError::Buffer(BufferError::BehindConfirmed { .. })
        ),
        "{err}"
    );
}

/// Item 6: a buffer directory put back from an older copy misses what the slot confirmed
/// since: capture and `buffer verify --source` refuse it.
#[tokio::test]
async fn a_buffer_restored_from_an_older_copy_is_refused() {
    let cluster = setup().await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("buffer");
    let old = work.path().join("copy");
    insert(&cluster, 1, 5).await;
    try_until_now(&cluster, &dir, |_| {}).await.unwrap();
    copy_dir(&dir, &old);
    insert(&cluster, 100, 5).await;
    try_until_now(&cluster, &dir, |_| {}).await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::rename(&old, &dir).unwrap();

    let conn = cluster.conn_string("postgres");
    let d = dir.to_str().unwrap();
    let (ok, out) = walshift(&["buffer", "verify", "--buffer", d, "--source", &conn]);
    assert!(!ok, "verify --source accepted an old copy: {out}");
    assert!(
        out.contains("slot \"walshift\" was confirmed up to"),
        "{out}"
    );

    let err = try_until_now(&cluster, &dir, |_| {}).await.unwrap_err();
    assert!(matches!(err, CaptureError::SlotAhead { .. }), "{err}");
}

/// Item 9: a walsender that stops answering (SIGSTOP) is noticed within the stream timeout.
#[tokio::test]
async fn a_stalled_stream_is_an_error() {
    let cluster = setup().await;
    let dir = tempfile::tempdir().unwrap();
    try_until_now(&cluster, dir.path(), |_| {}).await.unwrap();
    let mut cfg = common::capture::config(&cluster, dir.path());
    cfg.stream_timeout = Some(Duration::from_secs(2));
    cfg.status_interval = Duration::from_millis(500);
    let running = tokio::spawn(capture::run(cfg, std::future::pending::<()>()));
    let client = cluster.connect("postgres").await.unwrap();
    let mut pid = None;
    for _ in 0..200 {
        pid = client
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'walshift'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, Option<i32>>(0);
        if pid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = pid.expect("the walsender started");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SAFETY: signalling a backend of the cluster this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let outcome = tokio::time::timeout(Duration::from_secs(20), running).await;
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let err = outcome
        .expect("capture noticed the stalled stream")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, CaptureError::StreamStalled { .. }), "{err}");
    assert!(err.to_string().contains("went silent"), "{err}");
}

/// Item 9: a fast shutdown of the source ends the stream with a message that says so, not a
/// doubled "replication protocol error".
#[tokio::test]
async fn a_source_shutdown_is_named() {
    let cluster = setup().await;
    let dir = tempfile::tempdir().unwrap();
    try_until_now(&cluster, dir.path(), |_| {}).await.unwrap();
    let running = tokio::spawn(capture::run(
        common::capture::config(&cluster, dir.path()),
        std::future::pending::<()>(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid: i32 = std::fs::read_to_string(cluster.data_dir().join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: SIGINT (fast shutdown) to the postmaster this test started.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let err = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("capture ended")
        .unwrap()
        .unwrap_err();
    let chain = format!("{:#}", anyhow::Error::from(err));
    assert!(chain.contains("shutting down"), "{chain}");
    assert!(
        chain.matches("replication protocol error").count() <= 1,
        "{chain}"
    );
}

/// Hygiene: the buffer directory is 0700 and its files 0600; a looser existing one is
/// tightened.
#[tokio::test]
async fn buffer_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = setup().await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("buffer");
    insert(&cluster, 1, 3).await;
    try_until_now(&cluster, &dir, |_| {}).await.unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(files.len() >= 3, "{files:?}");
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&files[0], std::fs::Permissions::from_mode(0o644)).unwrap();
    try_until_now(&cluster, &dir, |_| {}).await.unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&files[0]), 0o600);
}

/// Hygiene: `run` creates its buffer directory 0700 itself, before anything else touches it
/// (here the control socket cannot be bound, a path too long for a Unix socket, so `run`
/// stops before capture opens the buffer).
#[tokio::test]
async fn live_run_creates_its_buffer_directory_private() {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("b".repeat(120));
    let conn = walshift::conn::ConnInfo::parse("host=127.0.0.1 port=1 dbname=x user=x").unwrap();
    let config = walshift::run::LiveConfig::new(conn.clone(), conn, &dir);
    let result = walshift::run::run(config, std::future::pending()).await;
    assert!(result.is_err(), "the control socket cannot be bound");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{result:?}");
}

/// Hygiene: `status` on a regular file says so; a garbage `--log` filter is an error, a real
/// one is accepted.
#[test]
fn status_on_a_file_and_garbage_log_filters_are_named() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("not-a-buffer");
    std::fs::write(&file, "x").unwrap();
    let f = file.to_str().unwrap();
    let (ok, out) = walshift(&["status", "--buffer", f]);
    assert!(!ok);
    assert!(out.contains("is not a directory"), "{out}");
    assert!(!out.contains("does not exist"), "{out}");

    let missing = work.path().join("missing");
    let m = missing.to_str().unwrap();
    for bad in ["garbage", "walshift=lots", "info,verbose"] {
        let (ok, out) = walshift(&["--log", bad, "status", "--buffer", m]);
        assert!(!ok);
        assert!(out.contains("invalid log filter"), "{bad}: {out}");
    }
    for good in ["debug", "walshift=debug,tokio_postgres=warn", "off"] {
        let (_, out) = walshift(&["--log", good, "status", "--buffer", m]);
        assert!(!out.contains("invalid log filter"), "{good}: {out}");
        assert!(out.contains("does not exist"), "{good}: {out}");
    }
}

/// A start killed between claiming a new buffer directory and creating the slot (or right
/// after creating it) is resumed by the next start, not refused as someone else's slot.
#[tokio::test]
async fn a_start_interrupted_around_slot_creation_resumes() {
    let cluster = setup().await;
    let client = cluster.connect("postgres").await.unwrap();
    let system: String = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let claimed = |dir: &Path, slot: &str| {
        std::fs::create_dir_all(dir).unwrap();
        walshift::buffer::BufferMeta::new(system.parse().unwrap(), "postgres", slot, "walshift")
            .write(dir)
            .unwrap();
    };
    let work = tempfile::tempdir().unwrap();

    // A buffer.json that never recorded a slot position (an empty buffer from before
    // slot_start_lsn existed) and no slot: started normally.
    let before = work.path().join("before");
    claimed(&before, "walshift");
    insert(&cluster, 1, 3).await;
    try_until_now(&cluster, &before, |_| {}).await.unwrap();
    let meta = walshift::buffer::BufferMeta::read(&before)
        .unwrap()
        .unwrap();
    assert!(meta.slot_start_lsn.is_some(), "{meta:?}");

    // Killed after the slot was created, before buffer.json recorded it: only the claim.
    let after = work.path().join("after");
    std::fs::create_dir_all(&after).unwrap();
    std::fs::write(
        after.join(capture::CLAIM_FILE),
        format!(r#"{{"system_identifier": "{system}", "slot": "second"}}"#),
    )
    .unwrap();
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('second', 'pgoutput')")
        .await
        .unwrap();
    insert(&cluster, 10, 4).await;
    let report = try_until_now(&cluster, &after, |c| c.slot = "second".into())
        .await
        .unwrap();
    assert_eq!(report.changes, 4);
    assert!(!after.join(capture::CLAIM_FILE).exists());
    // From then on the slot is this buffer's: a second buffer is refused.
    let other = work.path().join("other");
    let err = try_until_now(&cluster, &other, |c| c.slot = "second".into())
        .await
        .unwrap_err();
    assert!(matches!(err, CaptureError::SlotNotOwned { .. }), "{err}");
}

/// A buffer whose slot was confirmed past its consistent point while it held no commit yet
/// (only WAL without published changes) is no data loss: it resumes.
#[tokio::test]
async fn an_empty_buffer_confirmed_while_idle_resumes() {
    let cluster = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::capture::config(&cluster, dir.path());
    cfg.status_interval = Duration::from_millis(100);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(capture::run(cfg, async {
        let _ = stop_rx.await;
    }));
    while !dir.path().join(walshift::buffer::META_FILE).exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start = walshift::buffer::BufferMeta::read(dir.path())
        .unwrap()
        .unwrap()
        .slot_start_lsn
        .unwrap();
    // WAL without published changes, then wait until capture recorded an idle position.
    cluster
        .execute("postgres", "CREATE TABLE other (id int); DROP TABLE other")
        .await
        .unwrap();
    for _ in 0..100 {
        if SlotProgress::read(dir.path())
            .unwrap()
            .is_some_and(|p| p.confirmed_lsn > start)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(());
    running.await.unwrap().unwrap();
    let p = SlotProgress::read(dir.path()).unwrap().unwrap();
    assert!(p.confirmed_lsn > start, "{p:?}");
    assert!(p.durable_lsn.is_zero(), "no commit is in the buffer: {p:?}");
    insert(&cluster, 1, 2).await;
    let report = try_until_now(&cluster, dir.path(), |_| {}).await.unwrap();
    assert_eq!(report.changes, 2);
}

/// Interrupted clones are redone by a plain rerun, never needing `--force`, and never at the
/// cost of a target that is not this buffer's clone: (1) a start killed right after its slot
/// was created (only the claim file) clones from a new slot; (2) a redo killed after it
/// removed `buffer.json`, before its new slot existed, still knows its target's unfinished
/// clone; (3) another buffer's unfinished clone is refused, its rows untouched.
#[tokio::test]
async fn interrupted_clones_are_redone_and_only_this_buffers() {
    use walshift::clone::{self, CloneError, CloneOptions, CloneStatus};
    use walshift::conn::ConnInfo;
    let cluster = setup().await;
    insert(&cluster, 1, 3).await;
    for db in ["a", "c", "d"] {
        cluster.create_database(db).await.unwrap();
    }
    let client = cluster.connect("postgres").await.unwrap();
    let system: String = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let conn = |db: &str| ConnInfo::parse(&cluster.conn_string(db)).unwrap();
    let source = conn("postgres");
    let cloning = |slot: &'static str, target: &str| {
        let opts = CloneOptions::new(source.clone(), conn(target));
        move |c: &mut CaptureConfig| {
            c.slot = slot.into();
            c.clone = Some(opts);
        }
    };
    let rows = |db: &'static str| {
        let cluster = &cluster;
        async move {
            let c = cluster.connect(db).await.unwrap();
            let n: i64 = c
                .query_one("SELECT count(*) FROM t", &[])
                .await
                .unwrap()
                .get(0);
            n
        }
    };
    let interrupt = |db: &'static str| {
        let cluster = &cluster;
        async move {
            cluster
                .execute(db, "UPDATE walshift.clone_state SET state = 'copying'")
                .await
                .unwrap();
        }
    };
    let claim = |dir: &Path, slot: &str| {
        std::fs::write(
            dir.join(capture::CLAIM_FILE),
            format!(r#"{{"system_identifier": "{system}", "slot": "{slot}"}}"#),
        )
        .unwrap();
    };
    let work = tempfile::tempdir().unwrap();

    // (1) Killed right after the slot was created: the claim and the slot, nothing else.
    let a = work.path().join("a");
    std::fs::create_dir_all(&a).unwrap();
    claim(&a, "a");
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('a', 'pgoutput')")
        .await
        .unwrap();
    try_until_now(&cluster, &a, cloning("a", "a"))
        .await
        .unwrap();
    assert_eq!(rows("a").await, 3);

    // Buffer d cloned into d, the clone then "interrupted"; c's clone into c likewise.
    let (c, d) = (work.path().join("c"), work.path().join("d"));
    try_until_now(&cluster, &c, cloning("c", "c"))
        .await
        .unwrap();
    try_until_now(&cluster, &d, cloning("d", "d"))
        .await
        .unwrap();
    interrupt("c").await;
    interrupt("d").await;
    cluster
        .execute("c", "INSERT INTO t VALUES (100, 'only in c')")
        .await
        .unwrap();

    // (3) Buffer d pointed at c by mistake: c holds another buffer's clone, refused untouched.
    let err = try_until_now(&cluster, &d, cloning("d", "c"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CaptureError::Clone(CloneError::Interrupted { .. })),
        "{err}"
    );
    assert_eq!(rows("c").await, 4);

    // (2) A redo of d killed after it removed buffer.json, while its new slot was being
    // created (the slot dies with the connection that was creating it): the claim only.
    client
        .batch_execute("SELECT pg_drop_replication_slot('d')")
        .await
        .unwrap();
    for f in [walshift::buffer::META_FILE, walshift::buffer::PROGRESS_FILE] {
        let _ = std::fs::remove_file(d.join(f));
    }
    claim(&d, "d");
    insert(&cluster, 4, 2).await;
    try_until_now(&cluster, &d, cloning("d", "d"))
        .await
        .unwrap();
    assert_eq!(rows("d").await, 5);
    let state = clone::clone_state(&conn("d")).await.unwrap().unwrap();
    assert_eq!(state.status, CloneStatus::Done);
}

/// Issue 13, item 10: an invalid `--slot` name is refused before anything is created (it used
/// to leave the publication behind on the source).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_slot_name_creates_nothing() {
    let cluster = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let err = try_until_now(&cluster, &dir.path().join("buf"), |c| {
        c.slot = "Bad-Name".into()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, CaptureError::InvalidSlotName { .. }), "{err}");
    assert!(err.to_string().contains("nothing was created"), "{err}");
    let client = cluster.connect("postgres").await.unwrap();
    let created: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_replication_slots)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(created, 0, "a publication or slot was left behind");
    assert!(
        !dir.path().join("buf").exists(),
        "the buffer directory was created"
    );
}
