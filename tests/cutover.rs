//! Cutover against real throwaway clusters: under concurrent writes (everything committed
//! before the fence reaches the target, the source refuses writes afterwards), the abort paths
//! (failing verify, a backlog larger than --max-window — each leaves the source writable
//! exactly as before, with nothing lost), a failing switch hook (in doubt: fenced until the
//! operator unfences), a dry run that fences nothing, and
//! `walshift run` + `walshift cutover` as separate processes.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::cli::{self, stderr, stdout};
use common::cutover::{aborted, fence_entry};
use common::digest::assert_same;
use common::pair::{self, Pair};
use walshift::conn::ConnInfo;
use walshift::cutover::{self, CutoverConfig, CutoverError, Outcome, VerifyMode};
use walshift::localpg::{Cluster, ClusterOptions};

const SCHEMA: &str = "
    CREATE TABLE accounts (id bigserial PRIMARY KEY, owner text NOT NULL, balance bigint NOT NULL DEFAULT 0);
    CREATE TABLE events (id bigserial PRIMARY KEY, account_id bigint, amount bigint, at timestamptz DEFAULT now());
    CREATE TABLE notes (k text PRIMARY KEY, body text);
    CREATE SEQUENCE invoice_no START 1000;
    INSERT INTO accounts (owner, balance) SELECT 'o' || g, g FROM generate_series(1, 2000) g;
    INSERT INTO notes SELECT 'k' || g, 'n' FROM generate_series(1, 100) g;
    SELECT nextval('invoice_no') FROM generate_series(1, 5);";

const TABLES: [&str; 3] = ["accounts", "events", "notes"];

struct Setup {
    source: Cluster,
    target: Cluster,
    dir: tempfile::TempDir,
    src: ConnInfo,
    tgt: ConnInfo,
}

impl Setup {
    fn config(&self) -> CutoverConfig {
        let mut c = CutoverConfig::new(self.src.clone(), self.tgt.clone(), self.dir.path());
        c.preflight_timeout = Some(Duration::from_secs(60));
        c
    }
}

/// Two clusters, the schema on the source, cloned into the target at a new slot's snapshot.
async fn setup() -> Setup {
    let Pair {
        source,
        target,
        dir,
    } = Pair::cloned(ClusterOptions::default(), SCHEMA).await;
    let (src, tgt) = (pair::conn(&source), pair::conn(&target));
    Setup {
        source,
        target,
        dir,
        src,
        tgt,
    }
}

/// The database-wide setting entry and what a new session sees.
async fn read_only_state(c: &Cluster) -> (Option<Vec<String>>, String) {
    let entry = fence_entry(c).await;
    let client = c.connect("postgres").await.unwrap();
    let show: String = client
        .query_one("SHOW default_transaction_read_only", &[])
        .await
        .unwrap()
        .get(0);
    (entry, show)
}

/// A write in a new session on the source.
async fn source_write(c: &Cluster) -> Result<(), tokio_postgres::Error> {
    let client = c.connect("postgres").await.unwrap();
    client
        .batch_execute("INSERT INTO notes VALUES ('probe-' || gen_random_uuid(), 'p')")
        .await
}

/// What a writer saw.
#[derive(Debug, Default)]
struct Written {
    /// Last event id whose transaction committed (COMMIT answered).
    last_committed: Option<i64>,
    commits: u64,
    /// The writer met a read-only error (the fence).
    fenced: bool,
    other_errors: u64,
}

/// Hammers the source until it is refused as read-only (or `stop`): each transaction inserts
/// an event, moves a balance and takes an invoice number. Reconnects when its session is
/// terminated.
fn writer(conn: String, seed: i64, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Written> {
    tokio::spawn(async move {
        let mut w = Written::default();
        let mut n = seed;
        let deadline = Instant::now() + Duration::from_secs(45);
        'outer: while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let Ok((client, conn)) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await
            else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            tokio::spawn(conn);
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let r = async {
                    client.batch_execute("BEGIN").await?;
                    let id: i64 = client
                        .query_one(
                            "INSERT INTO events (account_id, amount) VALUES ($1, $2) RETURNING id",
                            &[&(1 + n % 2000), &n],
                        )
                        .await?
                        .get(0);
                    client
                        .execute(
                            "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                            &[&(1 + (n * 7) % 2000)],
                        )
                        .await?;
                    client
                        .query_one("SELECT nextval('invoice_no')", &[])
                        .await?;
                    client.batch_execute("COMMIT").await?;
                    Ok::<i64, tokio_postgres::Error>(id)
                }
                .await;
                match r {
                    Ok(id) => {
                        w.last_committed = Some(id);
                        w.commits += 1;
                    }
                    Err(e) => {
                        if e.code()
                            == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
                        {
                            w.fenced = true;
                            break 'outer;
                        }
                        w.other_errors += 1;
                        continue 'outer; // terminated: reconnect
                    }
                }
            }
        }
        w
    })
}

async fn seq_values(c: &Cluster) -> Vec<(String, i64)> {
    let client = c.connect("postgres").await.unwrap();
    let mut out = Vec::new();
    for s in ["accounts_id_seq", "events_id_seq", "invoice_no"] {
        let v: i64 = client
            .query_one(&format!("SELECT last_value FROM {s}"), &[])
            .await
            .unwrap()
            .get(0);
        out.push((s.to_string(), v));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_under_concurrent_writes_loses_nothing_and_fences_the_source() {
    let s = setup().await;
    let stop = Arc::new(AtomicBool::new(false));
    let conn = s.source.conn_string("postgres");
    let writers: Vec<_> = (0..2)
        .map(|i| writer(conn.clone(), i * 1_000_000, stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let marker_file = s.dir.path().join("switched");
    let mut cfg = s.config();
    cfg.verify = VerifyMode::Checksum;
    cfg.switch = Some(format!(
        "echo \"$WALSHIFT_CUTOVER_ID $WALSHIFT_MARKER_LSN $WALSHIFT_SOURCE\" > {}",
        marker_file.display()
    ));
    let report = cutover::run(cfg, std::future::pending())
        .await
        .expect("cutover");
    eprint!("{report}");
    assert_eq!(report.outcome, Outcome::Switched, "{report}");
    assert_eq!(
        (report.capture.as_str(), report.replay.as_str()),
        ("in-process", "in-process")
    );
    assert!(report.sessions_terminated >= 2, "{report}");

    let mut last = Vec::new();
    for w in writers {
        let w = tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("writers stop at the fence")
            .unwrap();
        assert!(w.fenced, "the writer ended on a read-only error: {w:?}");
        assert!(w.commits > 10, "the writer wrote before the fence: {w:?}");
        last.push(w.last_committed.unwrap());
    }

    // The target equals the source, table by table, and holds each writer's last commit.
    assert_same(&s.source, &s.target, &TABLES).await;
    let t = s.target.connect("postgres").await.unwrap();
    for id in last {
        let n: i64 = t
            .query_one("SELECT count(*) FROM events WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "last committed event {id} is on the target");
    }
    // Sequences: the target continues at or past the source.
    for ((name, sv), (_, tv)) in seq_values(&s.source)
        .await
        .into_iter()
        .zip(seq_values(&s.target).await)
    {
        assert!(tv >= sv, "{name}: target {tv} < source {sv}");
    }
    assert!(report.sequences.len() >= 3, "{report}");
    // The source refuses writes; the switch hook saw the marker and names without a password.
    let e = source_write(&s.source).await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
    );
    let hook = std::fs::read_to_string(&marker_file).unwrap();
    let end = report.marker_commit_end.unwrap();
    assert_eq!(
        hook.trim(),
        format!("{} {end} {}", report.cutover_id, s.src.redacted())
    );
    assert!(
        report.window().unwrap() < Duration::from_secs(10),
        "{report}"
    );
    assert!(
        !s.dir
            .path()
            .join(walshift::cutover::fence::STATE_FILE)
            .exists()
    );
    for p in ["fence", "marker", "drain", "sequences", "verify", "switch"] {
        assert!(report.phase(p).is_some(), "phase {p} in {report}");
    }
}

/// The abort left the database's setting as it was before and the source writable.
async fn assert_unfenced(s: &Setup, expected_entry: Option<Vec<String>>) {
    let (entry, show) = read_only_state(&s.source).await;
    assert_eq!(entry, expected_entry);
    assert_eq!(show, "off");
    source_write(&s.source)
        .await
        .expect("the source takes writes again");
    assert!(
        !s.dir
            .path()
            .join(walshift::cutover::fence::STATE_FILE)
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_verify_aborts_unfenced_and_a_rerun_after_the_fix_succeeds() {
    let s = setup().await;
    // An explicit previous setting: unfencing must restore exactly it.
    s.source
        .execute(
            "postgres",
            "ALTER DATABASE postgres SET default_transaction_read_only = off",
        )
        .await
        .unwrap();
    s.target
        .execute(
            "postgres",
            "INSERT INTO notes VALUES ('only-on-target', 'x')",
        )
        .await
        .unwrap();
    s.source
        .execute(
            "postgres",
            "INSERT INTO notes VALUES ('before-cutover', 'y')",
        )
        .await
        .unwrap();
    let a = aborted(cutover::run(s.config(), std::future::pending()).await);
    assert!(matches!(a.cause, CutoverError::VerifyFailed { .. }), "{a}");
    assert!(a.unfenced.is_ok());
    assert_eq!(a.report.outcome, Outcome::Aborted);
    let msg = a.to_string();
    assert!(
        msg.contains("notes") && msg.contains("writable again"),
        "{msg}"
    );
    assert_unfenced(&s, Some(vec!["default_transaction_read_only=off".into()])).await;

    // Nothing lost: fix the target, write more, cut over again.
    s.target
        .execute("postgres", "DELETE FROM notes WHERE k = 'only-on-target'")
        .await
        .unwrap();
    s.source
        .execute("postgres", "INSERT INTO notes VALUES ('after-abort', 'z')")
        .await
        .unwrap();
    let report = cutover::run(s.config(), std::future::pending())
        .await
        .expect("second cutover");
    assert_eq!(report.outcome, Outcome::Switched);
    assert_same(&s.source, &s.target, &TABLES).await;
}

/// A switch hook that exits non-zero may have moved part of the traffic before failing: the
/// switch is in doubt, the source stays fenced (every rerun refuses), and only the operator's
/// `unfence_after_failed_switch` lifts the fence — exactly as it was — after which a new
/// cutover runs normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_switch_hook_leaves_the_switch_in_doubt_until_the_operator_unfences() {
    let s = setup().await;
    let mut cfg = s.config();
    cfg.switch = Some("echo repointing failed >&2; exit 1".into());
    // A target whose clone is still being copied is refused before anything is fenced.
    s.target
        .execute(
            "postgres",
            "UPDATE walshift.clone_state SET state = 'copying'",
        )
        .await
        .unwrap();
    let e = cutover::run(cfg.clone(), std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(e, CutoverError::CloneUnfinished), "{e}");
    s.target
        .execute("postgres", "UPDATE walshift.clone_state SET state = 'done'")
        .await
        .unwrap();
    let doubt = match cutover::run(cfg.clone(), std::future::pending()).await {
        Err(CutoverError::SwitchInDoubt(d)) => d,
        other => panic!("expected a switch in doubt, got {other:?}"),
    };
    let text = doubt.to_string();
    assert!(text.contains("repointing failed"), "{text}");
    assert!(
        text.contains("--unfence-after-failed-switch") && text.contains("--resume-after-switch"),
        "{text}"
    );
    let report = doubt.report.as_ref().expect("this run's report");
    assert_eq!(report.outcome, Outcome::SwitchInDoubt);
    assert_eq!(report.hooks.len(), 1);
    assert_eq!(report.hooks[0].exit_code, Some(1));
    let (entry, _) = read_only_state(&s.source).await;
    assert_eq!(
        entry,
        Some(vec!["default_transaction_read_only=on".to_string()])
    );
    source_write(&s.source)
        .await
        .expect_err("the source stays fenced");
    let journal = std::fs::read_to_string(s.dir.path().join("cutover-journal.json")).unwrap();
    assert!(journal.contains("switch_failed"), "{journal}");

    // A plain rerun refuses; so does a fresh cutover with a working hook.
    let mut fixed = s.config();
    fixed.switch = Some("true".into());
    let e = cutover::run(fixed.clone(), std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(e, CutoverError::SwitchInDoubt(_)), "{e}");
    source_write(&s.source).await.expect_err("still fenced");

    let mut unfence = s.config();
    unfence.unfence_after_failed_switch = true;
    let report = cutover::run(unfence.clone(), std::future::pending())
        .await
        .expect("unfence on the operator's word");
    assert_eq!(
        report.outcome,
        Outcome::UnfencedAfterFailedSwitch,
        "{report}"
    );
    assert_eq!(report.cutover_id, doubt.cutover_id);
    assert_unfenced(&s, None).await;
    let journal = std::fs::read_to_string(s.dir.path().join("cutover-journal.json")).unwrap();
    assert!(
        journal.contains("unfenced_after_failed_switch"),
        "{journal}"
    );
    // Nothing left to unfence now.
    let e = cutover::run(unfence, std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(e, CutoverError::NothingToUnfence { .. }), "{e}");

    let report = cutover::run(fixed, std::future::pending())
        .await
        .expect("a new cutover once the switch is fixed");
    assert_eq!(report.outcome, Outcome::Switched, "{report}");
    assert_same(&s.source, &s.target, &TABLES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_beyond_max_window_aborts_then_drains_on_a_rerun() {
    let s = setup().await;
    // A backlog capture has not even read yet: 60 000 changes.
    s.source
        .execute(
            "postgres",
            "INSERT INTO events (account_id, amount) SELECT g % 2000, g FROM generate_series(1, 60000) g;
             UPDATE accounts SET balance = balance + 1;",
        )
        .await
        .unwrap();
    let mut cfg = s.config();
    cfg.max_lag = Duration::from_secs(3600);
    cfg.max_window = Duration::from_millis(30);
    let a = aborted(cutover::run(cfg, std::future::pending()).await);
    assert!(matches!(a.cause, CutoverError::MaxWindow { .. }), "{a}");
    assert!(a.to_string().contains("--max-window"), "{a}");
    assert_unfenced(&s, None).await;

    let report = cutover::run(s.config(), std::future::pending())
        .await
        .expect("a rerun with the default window");
    assert_eq!(report.outcome, Outcome::Switched, "{report}");
    assert_same(&s.source, &s.target, &TABLES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_fences_nothing_and_projects_the_window() {
    let s = setup().await;
    let idle = s.source.connect("postgres").await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(s.source.conn_string("postgres"), 0, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut cfg = s.config();
    cfg.dry_run = true;
    cfg.switch = Some("exit 1".into()); // never run in a dry run
    let report = cutover::run(cfg, std::future::pending())
        .await
        .expect("dry run");
    assert_eq!(report.outcome, Outcome::DryRun, "{report}");
    assert!(report.window().is_some());
    assert!(report.phase("switch").is_none() && report.hooks.is_empty());
    assert!(report.marker_commit_end.is_some());
    // The projection counts what the real window does besides (journal, the fence's proof and
    // its terminating, the switch's shell), rehearsed on scratch files it removes.
    let rehearse = report
        .phase("rehearse")
        .expect("rehearsal in the projection");
    assert!(report.window().unwrap() >= rehearse);
    let scratch: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".cutover-dry-run-")
        })
        .collect();
    assert!(scratch.is_empty(), "scratch left behind: {scratch:?}");
    assert!(
        !s.dir
            .path()
            .join(walshift::cutover::journal::JOURNAL_FILE)
            .exists(),
        "a dry run keeps no journal"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let w = w.await.unwrap();
    assert!(
        !w.fenced && w.other_errors == 0,
        "the writer was never disturbed: {w:?}"
    );
    idle.batch_execute("SELECT 1")
        .await
        .expect("sessions were not terminated");
    assert_unfenced(&s, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_against_a_running_walshift_run() {
    let Pair {
        source,
        target,
        dir,
    } = Pair::start();
    source.execute("postgres", SCHEMA).await.unwrap();
    let buf = dir.path().to_str().unwrap().to_owned();
    let (sc, tc) = (
        source.conn_string("postgres"),
        target.conn_string("postgres"),
    );
    let mut run = cli::command(&[
        "run",
        "--source",
        &sc,
        "--target",
        &tc,
        "--buffer",
        &buf,
        "--no-progress",
    ])
    .stderr(std::fs::File::create(dir.path().join("run.log")).unwrap())
    .spawn()
    .unwrap();
    // Streaming once the control socket says so.
    let started = Instant::now();
    loop {
        if let Ok(Some(v)) = walshift::run::control::request(dir.path(), "status").await
            && v["phase"] == "streaming"
            && v["applied_lsn"].is_string()
        {
            break;
        }
        assert!(
            run.try_wait().unwrap().is_none(),
            "walshift run exited early"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "run never started streaming"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = cli::walshift(&["status", "--buffer", &buf]);
    assert!(
        stdout(&out).contains("walshift run  running"),
        "{}",
        stdout(&out)
    );
    source
        .execute(
            "postgres",
            "INSERT INTO notes SELECT 'live' || g, 'l' FROM generate_series(1, 500) g",
        )
        .await
        .unwrap();
    // A failing switch hook through the CLI: exit 5, the report (outcome switch_in_doubt) on
    // stdout, the instructions on stderr, the source still fenced.
    let out = cli::walshift(&[
        "cutover", "--source", &sc, "--target", &tc, "--buffer", &buf, "--json", "--switch",
        "exit 1",
    ]);
    assert_eq!(out.status.code(), Some(5));
    let v = cli::json(&out);
    assert_eq!(v["outcome"], "switch_in_doubt", "{v}");
    let err = stderr(&out);
    assert!(err.contains("--unfence-after-failed-switch"), "{err}");
    source_write(&source)
        .await
        .expect_err("fenced while the switch is in doubt");
    // The operator checked: traffic never left the source.
    let out = cli::walshift(&[
        "cutover",
        "--source",
        &sc,
        "--target",
        &tc,
        "--buffer",
        &buf,
        "--json",
        "--unfence-after-failed-switch",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = cli::json(&out);
    assert_eq!(v["outcome"], "unfenced_after_failed_switch", "{v}");
    source_write(&source)
        .await
        .expect("writable after the operator's unfence");

    let out = cli::walshift(&[
        "cutover", "--source", &sc, "--target", &tc, "--buffer", &buf, "--json", "--verify",
        "checksum",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = cli::json(&out);
    assert_eq!(v["outcome"], "switched", "{v}");
    assert_eq!(
        (v["capture"].as_str(), v["replay"].as_str()),
        (Some("external"), Some("external"))
    );
    assert!(v["window_secs"].as_f64().unwrap() > 0.0);
    assert_same(&source, &target, &TABLES).await;
    let v = walshift::run::control::request(dir.path(), "stop")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v["ok"], true);
    let status = tokio::task::spawn_blocking(move || run.wait().unwrap())
        .await
        .unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default()
    );
    assert!(!Path::new(&buf).join("control.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_left_by_a_crash_is_lifted_to_the_recorded_previous_setting() {
    use walshift::cutover::fence::{self, FenceState};
    let c = common::cluster();
    c.execute(
        "postgres",
        "ALTER DATABASE postgres SET default_transaction_read_only = off",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let other = c.connect("postgres").await.unwrap();
    let client = c.connect("postgres").await.unwrap();
    let state = fence::prepare(&client, dir.path(), "c1", None)
        .await
        .unwrap();
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        fence::raise(&client, &state, &[pid], 5000).await.unwrap(),
        1
    );
    assert!(other.batch_execute("SELECT 1").await.is_err(), "terminated");
    drop(client); // walshift "dies" while fenced

    let (entry, show) = read_only_state(&c).await;
    assert_eq!(
        (entry, show.as_str()),
        (Some(vec!["default_transaction_read_only=on".into()]), "on")
    );
    // The next run takes the previous value from the state file, not from the catalog, and
    // lifts the fence over a session that starts read-only.
    let leftover = FenceState::read_leftover(dir.path()).unwrap().unwrap();
    let fresh = c.connect("postgres").await.unwrap();
    let state = fence::prepare(&fresh, dir.path(), "c2", Some(leftover))
        .await
        .unwrap();
    assert_eq!(state.previous.as_deref(), Some("off"));
    fence::lift(&fresh, dir.path(), &state).await.unwrap();
    let (entry, show) = read_only_state(&c).await;
    assert_eq!(
        (entry, show.as_str()),
        (
            Some(vec!["default_transaction_read_only=off".into()]),
            "off"
        )
    );
    assert!(FenceState::read_leftover(dir.path()).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_through_a_mapping_follows_renames_for_sequences_and_verify() {
    let s = setup().await;
    // The release renames events → ledger and stores amounts in cents.
    s.target
        .execute(
            "postgres",
            "ALTER TABLE events RENAME TO ledger;
             ALTER TABLE ledger RENAME COLUMN amount TO amount_cents;
             ALTER SEQUENCE events_id_seq RENAME TO ledger_id_seq;
             DROP SEQUENCE invoice_no;",
        )
        .await
        .unwrap();
    let mapping = s.dir.path().join("release.toml");
    std::fs::write(
        &mapping,
        "[[table]]\nsource = \"events\"\ntarget = \"ledger\"\n[table.columns]\namount_cents = \"amount * 100\"\n",
    )
    .unwrap();
    s.source
        .execute(
            "postgres",
            "INSERT INTO events (account_id, amount) SELECT g, g FROM generate_series(1, 300) g",
        )
        .await
        .unwrap();
    let mut cfg = s.config();
    cfg.transform = Some(Arc::new(
        walshift::transform::Mapping::load(&mapping).unwrap(),
    ));
    cfg.verify = VerifyMode::Checksum;
    let report = cutover::run(cfg, std::future::pending())
        .await
        .expect("cutover through the mapping");
    assert_eq!(report.outcome, Outcome::Switched, "{report}");
    let ledger = report
        .verified
        .iter()
        .find(|c| c.target == "\"public\".\"ledger\"")
        .unwrap_or_else(|| panic!("ledger verified: {report}"));
    assert!(ledger.equal && ledger.source_rows == 300 && ledger.source_checksum.is_some());
    let seq = report
        .sequences
        .iter()
        .find(|q| q.source == "\"public\".\"events_id_seq\"")
        .expect("events_id_seq synced");
    assert_eq!(seq.target, "public.ledger_id_seq");
    assert_eq!(
        report.sequences_skipped,
        vec!["\"public\".\"invoice_no\"".to_string()]
    );
    let t = s.target.connect("postgres").await.unwrap();
    let (n, cents, last): (i64, i64, i64) = {
        let r = t
            .query_one(
                "SELECT count(*), sum(amount_cents)::int8, (SELECT last_value FROM ledger_id_seq) FROM ledger",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!((n, cents, last), (300, 100 * 300 * 301 / 2, 300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postpone_file_holds_the_cutover_back_until_it_goes() {
    let s = setup().await;
    let postpone = s.dir.path().join(cutover::POSTPONE_FILE);
    std::fs::write(&postpone, "release manager says wait").unwrap();
    let said = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut cfg = s.config();
    let sink = said.clone();
    cfg.say = Some(Arc::new(move |l: &str| {
        sink.lock().unwrap().push(l.to_owned())
    }));
    let task = tokio::spawn(cutover::run(cfg, std::future::pending()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!task.is_finished());
    assert_eq!(read_only_state(&s.source).await, (None, "off".to_string()));
    source_write(&s.source)
        .await
        .expect("not fenced while postponed");
    assert!(
        said.lock().unwrap().iter().any(|l| l.contains("postponed")),
        "{:?}",
        said.lock().unwrap()
    );
    std::fs::remove_file(&postpone).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("cutover proceeds once the file is gone")
        .unwrap()
        .expect("cutover");
    assert_eq!(report.outcome, Outcome::Switched);
    assert!(report.phase("postpone").unwrap() >= Duration::from_millis(1400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_fence_runs_before_and_leaves_the_database_setting_alone() {
    let s = setup().await;
    let stopped = s.dir.path().join("app-stopped");
    let mut cfg = s.config();
    cfg.fence = cutover::FenceMode::Hook;
    cfg.before = Some(format!(
        "test \"$WALSHIFT_HOOK\" = before && test -z \"$WALSHIFT_MARKER_LSN\" && touch {}",
        stopped.display()
    ));
    cfg.after = Some("exit 4".into());
    let report = cutover::run(cfg, std::future::pending())
        .await
        .expect("cutover");
    assert!(stopped.exists(), "the before hook ran: {report}");
    // The switch stands although the after hook failed.
    assert_eq!(report.outcome, Outcome::SwitchedAfterHookFailed, "{report}");
    assert_eq!(report.sessions_terminated, 0);
    assert_eq!(read_only_state(&s.source).await, (None, "off".to_string()));
    let mut cfg = s.config();
    cfg.fence = cutover::FenceMode::Hook;
    assert!(matches!(
        cutover::run(cfg, std::future::pending()).await,
        Err(CutoverError::HookModeWithoutBefore)
    ));
}

/// verify's sessions (`application_name` [`walshift::cutover::verify::APPLICATION_NAME`]) still
/// open on a cluster.
async fn verify_sessions(c: &Cluster) -> i64 {
    c.connect("postgres")
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&walshift::cutover::verify::APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until a cluster has none of verify's sessions left (closed sessions exit
/// asynchronously); panics with the count if some stay.
async fn assert_verify_sessions_closed(c: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = verify_sessions(c).await;
        if n == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{n} verify session(s) stay open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// verify reads the tables over several sessions per side (one shared snapshot each): a table
/// that differs is still named with both counts, the others are still compared, the cutover
/// aborts unfenced, and verify's sessions are closed; with checksum, a changed value at the
/// same count is found the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_verify_names_the_table_that_differs_and_closes_its_sessions() {
    let s = setup().await;
    s.target
        .execute(
            "postgres",
            "INSERT INTO events (account_id, amount) VALUES (1, 1), (2, 2)",
        )
        .await
        .unwrap();
    let a = aborted(cutover::run(s.config(), std::future::pending()).await);
    assert!(matches!(a.cause, CutoverError::VerifyFailed { .. }), "{a}");
    let msg = a.to_string();
    assert!(msg.contains("\"events\": 0 vs 2 rows"), "{msg}");
    assert!(!msg.contains("accounts") && !msg.contains("notes"), "{msg}");
    let by_table = |name: &str| {
        a.report
            .verified
            .iter()
            .find(|c| c.source.ends_with(&format!("\"{name}\"")))
            .unwrap_or_else(|| panic!("{name} compared: {:?}", a.report.verified))
            .clone()
    };
    let accounts = by_table("accounts");
    assert!(accounts.equal && accounts.source_rows == 2000 && accounts.target_rows == 2000);
    let events = by_table("events");
    assert!(!events.equal && (events.source_rows, events.target_rows) == (0, 2));
    assert!(by_table("notes").equal);
    assert_unfenced(&s, None).await;
    assert_verify_sessions_closed(&s.source).await;
    assert_verify_sessions_closed(&s.target).await;

    s.target
        .execute(
            "postgres",
            "DELETE FROM events; UPDATE notes SET body = 'changed' WHERE k = 'k7'",
        )
        .await
        .unwrap();
    let mut cfg = s.config();
    cfg.verify = VerifyMode::Checksum;
    let a = aborted(cutover::run(cfg, std::future::pending()).await);
    assert!(matches!(a.cause, CutoverError::VerifyFailed { .. }), "{a}");
    let msg = a.to_string();
    assert!(
        msg.contains("\"notes\": ") && !msg.contains("events"),
        "{msg}"
    );
    let notes = a
        .report
        .verified
        .iter()
        .find(|c| c.source.ends_with("\"notes\""))
        .unwrap();
    assert_eq!(notes.source_rows, notes.target_rows, "the same count");
    assert!(notes.source_checksum.is_some() && notes.source_checksum != notes.target_checksum);
    assert_unfenced(&s, None).await;
    assert_verify_sessions_closed(&s.source).await;
    assert_verify_sessions_closed(&s.target).await;
}

/// The sequences are planned before the fence and only read and set inside the window: a
/// plan the source's catalog moved past (a sequence created, or renamed) is refused by the
/// same statement that reads the values, and a fresh sync sets everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_plan_the_catalog_moved_past_is_planned_again() {
    use walshift::cutover::sequences::{self, TableMap};
    let schema = "CREATE TABLE t (id bigserial PRIMARY KEY); CREATE SEQUENCE s1;";
    let cluster = pair::two_databases(schema, schema).await;
    let (src, tgt) = (
        cluster.connect("src").await.unwrap(),
        cluster.connect("dst").await.unwrap(),
    );
    src.batch_execute("SELECT setval('t_id_seq', 40); SELECT setval('s1', 7)")
        .await
        .unwrap();
    let map = TableMap::identity();

    // Unchanged catalog: applied from the plan.
    let plan = sequences::plan(&src, &tgt, &map).await.unwrap();
    assert_eq!(plan.len(), 2);
    let done = sequences::apply(&src, &tgt, plan)
        .await
        .unwrap()
        .expect("fresh plan");
    assert_eq!(done.set.len(), 2);

    // A sequence created after the plan: refused, not silently left out.
    let plan = sequences::plan(&src, &tgt, &map).await.unwrap();
    src.batch_execute("CREATE SEQUENCE s2; SELECT setval('s2', 5)")
        .await
        .unwrap();
    tgt.batch_execute("CREATE SEQUENCE s2").await.unwrap();
    assert!(sequences::apply(&src, &tgt, plan).await.unwrap().is_none());
    // A sequence renamed after the plan: refused too.
    let plan = sequences::plan(&src, &tgt, &map).await.unwrap();
    src.batch_execute("ALTER SEQUENCE s1 RENAME TO s1_old")
        .await
        .unwrap();
    assert!(sequences::apply(&src, &tgt, plan).await.unwrap().is_none());
    // Planned again, everything is set.
    let done = sequences::sync(&src, &tgt, &map).await.unwrap();
    assert_eq!(done.skipped, ["\"public\".\"s1_old\""], "{done:?}");
    let s2: i64 = tgt
        .query_one("SELECT last_value FROM s2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(s2, 5);
}

/// A table of 8 MiB or more is read in page ranges, one per verify session (`ctid` ranges, the
/// last open-ended): its count and checksum are those of one read of the whole table, however
/// many sessions cut it — here one (read whole, in the dry run), three (the cutover) and a
/// single statement on the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_table_read_in_page_ranges_counts_and_sums_as_one_read() {
    let s = setup().await;
    let ddl = "CREATE TABLE big (id bigint PRIMARY KEY, pad text NOT NULL)";
    s.target.execute("postgres", ddl).await.unwrap();
    s.source
        .execute(
            "postgres",
            &format!(
                "{ddl}; INSERT INTO big SELECT g, repeat(md5(g::text), 2) \
                 FROM generate_series(1, 120000) g"
            ),
        )
        .await
        .unwrap();
    let src = s.source.connect("postgres").await.unwrap();
    let pages: i64 = src
        .query_one(
            "SELECT pg_relation_size('big') / current_setting('block_size')::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        pages >= cutover::verify::SPLIT_PAGES,
        "big enough to be cut: {pages} pages"
    );
    let whole = walshift::verify::table_summary_sql(
        &walshift::transform::TableName::new("public", "big"),
        &["id".to_owned(), "pad".to_owned()],
        true,
    );
    let row = src.query_one(whole.as_str(), &[]).await.unwrap();
    let (rows, sum): (i64, String) = (row.get(0), row.get(1));
    let big = |report: &cutover::CutoverReport| {
        report
            .verified
            .iter()
            .find(|c| c.source.ends_with("\"big\""))
            .unwrap_or_else(|| panic!("big compared: {report}"))
            .clone()
    };

    let mut cfg = s.config();
    cfg.verify = VerifyMode::Checksum;
    cfg.verify_sessions = 1;
    cfg.dry_run = true;
    let dry = cutover::run(cfg, std::future::pending())
        .await
        .expect("dry run");
    let b = big(&dry);
    assert!(b.equal, "{dry}");
    assert_eq!(
        (b.source_rows, b.source_checksum.as_deref()),
        (rows, Some(sum.as_str()))
    );

    let mut cfg = s.config();
    cfg.verify = VerifyMode::Checksum;
    cfg.verify_sessions = 3;
    let report = cutover::run(cfg, std::future::pending())
        .await
        .expect("cutover");
    assert_eq!(report.outcome, Outcome::Switched, "{report}");
    let b = big(&report);
    assert!(b.equal, "{report}");
    assert_eq!((b.source_rows, b.target_rows), (rows, rows));
    assert_eq!(b.source_checksum.as_deref(), Some(sum.as_str()));
    assert_eq!(b.target_checksum.as_deref(), Some(sum.as_str()));
    assert_verify_sessions_closed(&s.source).await;
    assert_verify_sessions_closed(&s.target).await;
}
