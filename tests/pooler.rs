//! Cutover with PgBouncer in front of the source (`--pooler`), against a real PgBouncer and
//! real clusters: pgbench runs through the pooler at 500 tps across the cutover and sees no
//! error (its queued transactions land on the copy), an abort resumes the pool on the source
//! with no error either, preflight refuses what cannot work before anything is paused, a pause
//! left by a dead cutover is undone first, and a switch in doubt keeps the pool paused until
//! the operator says where traffic belongs.

mod common;

use std::time::Duration;

use common::pair;
use walshift::conn::ConnInfo;
use walshift::cutover::pooler::{Admin, PauseState, PoolerError};
use walshift::cutover::{self, CutoverConfig, CutoverError, FenceMode, Outcome, PoolerConfig};
use walshift::localpg::{Cluster, ClusterOptions, PgBouncer, PoolerOptions};

const POOL: &str = "app";

struct Setup {
    source: Cluster,
    target: Cluster,
    dir: tempfile::TempDir,
    pooler: PgBouncer,
}

impl Setup {
    fn pooler_config(&self) -> PoolerConfig {
        PoolerConfig {
            admin: ConnInfo::parse(&self.pooler.admin_conn_string()).unwrap(),
            database: POOL.into(),
            databases_file: self.pooler.databases_file(),
            target_entry: None,
        }
    }

    fn config(&self) -> CutoverConfig {
        let mut c = CutoverConfig::new(
            pair::conn(&self.source),
            pair::conn(&self.target),
            self.dir.path(),
        );
        c.preflight_timeout = Some(Duration::from_secs(60));
        c.pooler = Some(self.pooler_config());
        c
    }

    async fn admin(&self) -> Admin {
        Admin::connect(&ConnInfo::parse(&self.pooler.admin_conn_string()).unwrap())
            .await
            .unwrap()
    }

    /// The port PgBouncer's entry points at, and whether the pool is paused.
    async fn pool(&self) -> (Option<u16>, bool) {
        let (_, db) = self.admin().await.database(POOL).await.unwrap();
        let db = db.expect("the pool exists");
        (db.port, db.paused)
    }
}

fn entry_for(c: &Cluster) -> String {
    format!("host=127.0.0.1 port={} dbname=postgres", c.port())
}

/// pgbench tables on the source (pgbench_history with a primary key, which replay needs),
/// cloned into the target at a new slot's snapshot, and PgBouncer in front of the source.
async fn setup() -> Setup {
    let (source, target) = pair::clusters_with(ClusterOptions::default());
    let pgbench = source.binaries().program("pgbench");
    let out = std::process::Command::new(&pgbench)
        .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-U", "postgres"])
        .args(["-p", &source.port().to_string(), "postgres"])
        .output()
        .unwrap();
    assert!(out.status.success(), "pgbench -i: {out:?}");
    source
        .execute(
            "postgres",
            "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    common::capture::with_clone(&source, &target, dir.path())
        .await
        .expect("capture with clone");
    let pooler = PgBouncer::start(
        PoolerOptions::new()
            .database(POOL, &entry_for(&source))
            .database("copy", &entry_for(&target))
            .database("elsewhere", "host=127.0.0.1 port=1 dbname=postgres")
            .database(
                "sessions",
                &format!("{} pool_mode=session", entry_for(&source)),
            ),
    )
    .expect("PgBouncer starts (Debian package pgbouncer)");
    Setup {
        source,
        target,
        dir,
        pooler,
    }
}

/// What pgbench said at the end.
struct Bench {
    processed: u64,
    failed: u64,
    stdout: String,
}

/// pgbench through the pooler at 500 tps for `secs` seconds (4 clients, simple protocol).
fn pgbench(s: &Setup, secs: u32) -> std::thread::JoinHandle<Bench> {
    let program = s.source.binaries().program("pgbench");
    let port = s.pooler.port().to_string();
    std::thread::spawn(move || {
        let out = std::process::Command::new(program)
            .args([
                "-n",
                "-R",
                "500",
                "-c",
                "4",
                "-j",
                "2",
                "-T",
                &secs.to_string(),
            ])
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", POOL])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "pgbench failed (an aborted client is a client error):\n{stdout}\n{stderr}"
        );
        let number = |prefix: &str| -> u64 {
            stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.split('/').next().unwrap().parse().ok())
                .unwrap_or_else(|| panic!("no {prefix:?} in pgbench's output:\n{stdout}"))
        };
        Bench {
            processed: number("number of transactions actually processed:"),
            failed: number("number of failed transactions:"),
            stdout,
        }
    })
}

async fn count(c: &Cluster, sql: &str) -> i64 {
    c.connect("postgres")
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_pgbouncer_sees_a_pause_not_an_error_and_every_commit_is_on_the_copy() {
    let s = setup().await;
    // Long enough that the cutover (started after 2 s) ends well before pgbench does: some
    // transactions must run on the copy after RESUME.
    let bench = pgbench(&s, 10);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = cutover::run(s.config(), std::future::pending())
        .await
        .unwrap_or_else(|e| panic!("cutover: {e}\nPgBouncer log:\n{}", s.pooler.log()));
    let at_switch = count(&s.source, "SELECT count(*) FROM pgbench_history").await;
    let bench = tokio::task::spawn_blocking(move || bench.join().unwrap())
        .await
        .unwrap();

    assert_eq!(report.outcome, Outcome::Switched, "{report}");
    let p = report.pooler.as_ref().expect("the pooler's part");
    assert!(p.resumed, "{report}");
    assert!(p.paused_secs.is_some(), "{report}");
    assert!(
        p.clients_waiting.is_some() && p.longest_client_wait_secs.is_some(),
        "SHOW POOLS read before RESUME: {report}"
    );
    eprintln!("{report}");
    assert_eq!(bench.failed, 0, "{}", bench.stdout);
    // Every transaction pgbench saw committed is on the copy: those before the pause (replayed),
    // those queued during it and those after (run there).
    let on_copy = count(&s.target, "SELECT count(*) FROM pgbench_history").await;
    assert_eq!(on_copy as u64, bench.processed, "{}", bench.stdout);
    // None on the source after the switch, and some went to the copy directly.
    let on_source = count(&s.source, "SELECT count(*) FROM pgbench_history").await;
    assert_eq!(on_source, at_switch);
    assert!(on_source < on_copy, "source {on_source}, copy {on_copy}");
    assert_eq!(s.pool().await, (Some(s.target.port()), false));
    assert!(
        !PauseState::path(s.dir.path()).exists(),
        "the pause record is removed once resumed"
    );
    let text = std::fs::read_to_string(s.pooler.databases_file()).unwrap();
    assert!(
        text.contains(&format!("port={}", s.target.port())),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_verify_resumes_the_pool_on_the_source_with_no_client_error() {
    let s = setup().await;
    // A row only the copy has: verify counts differ, the cutover aborts.
    s.target
        .execute(
            "postgres",
            "INSERT INTO pgbench_branches VALUES (99, 0, 'only on the copy')",
        )
        .await
        .unwrap();
    let bench = pgbench(&s, 6);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = cutover::run(s.config(), std::future::pending()).await;
    let a = common::cutover::aborted(r);
    assert!(matches!(a.cause, CutoverError::VerifyFailed { .. }), "{a}");
    assert!(a.unfenced.is_ok() && a.pooler_paused.is_none(), "{a}");
    assert!(a.to_string().contains("resumed on the source"), "{a}");
    let bench = tokio::task::spawn_blocking(move || bench.join().unwrap())
        .await
        .unwrap();
    assert_eq!(bench.failed, 0, "{}", bench.stdout);
    // Everything stayed on the source, which takes writes again.
    let on_source = count(&s.source, "SELECT count(*) FROM pgbench_history").await;
    assert_eq!(on_source as u64, bench.processed, "{}", bench.stdout);
    assert_eq!(s.pool().await, (Some(s.source.port()), false));
    assert!(!PauseState::path(s.dir.path()).exists());
    let text = std::fs::read_to_string(s.pooler.databases_file()).unwrap();
    assert!(
        text.contains(&format!("port={}", s.source.port())),
        "{text}"
    );
}

fn pooler_error(r: Result<cutover::CutoverReport, CutoverError>) -> PoolerError {
    match r {
        Err(CutoverError::Pooler(e)) => e,
        other => panic!("expected a pooler error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_refuses_what_cannot_work_before_anything_is_paused() {
    let s = setup().await;
    let run = |c: CutoverConfig| cutover::run(c, std::future::pending());

    // Not an admin: could not PAUSE.
    let mut c = s.config();
    c.pooler.as_mut().unwrap().admin = ConnInfo::parse(&s.pooler.stats_conn_string()).unwrap();
    let e = pooler_error(run(c).await);
    assert!(matches!(e, PoolerError::NotAdmin { .. }), "{e}");
    assert!(e.to_string().contains("admin_users"), "{e}");

    // A database the pooler does not have.
    let mut c = s.config();
    c.pooler.as_mut().unwrap().database = "nope".into();
    let e = pooler_error(run(c).await);
    assert!(
        matches!(e, PoolerError::NoDatabase { ref known, .. } if known.contains(POOL)),
        "{e}"
    );

    // Session pooling: PAUSE would wait for every client to disconnect.
    let mut c = s.config();
    c.pooler.as_mut().unwrap().database = "sessions".into();
    let e = pooler_error(run(c).await);
    assert!(matches!(e, PoolerError::PoolMode { .. }), "{e}");

    // A databases file without the entry, and one PgBouncer does not read.
    let other = s.dir.path().join("other.ini");
    std::fs::write(&other, "[databases]\n").unwrap();
    let mut c = s.config();
    c.pooler.as_mut().unwrap().databases_file = other.clone();
    let e = pooler_error(run(c).await);
    assert!(matches!(e, PoolerError::Entry { .. }), "{e}");
    std::fs::write(&other, format!("{POOL} = {}\n", entry_for(&s.source))).unwrap();
    let mut c = s.config();
    c.pooler.as_mut().unwrap().databases_file = other;
    let e = pooler_error(run(c).await);
    assert!(matches!(e, PoolerError::NotIncluded { .. }), "{e}");

    // A pool that does not point at --source, or already points at the copy.
    let mut c = s.config();
    c.pooler.as_mut().unwrap().database = "elsewhere".into();
    let e = pooler_error(run(c).await);
    assert!(matches!(e, PoolerError::NotTheSource { .. }), "{e}");
    let mut c = s.config();
    c.pooler.as_mut().unwrap().database = "copy".into();
    let e = pooler_error(run(c).await);
    assert!(matches!(e, PoolerError::AlreadyTarget { .. }), "{e}");

    // A dry run checks the same and rehearses the pooler's part without pausing it.
    let mut c = s.config();
    c.dry_run = true;
    let report = run(c).await.unwrap();
    assert_eq!(report.outcome, Outcome::DryRun, "{report}");
    assert!(
        report.pooler.as_ref().is_some_and(|p| !p.resumed),
        "{report}"
    );
    assert!(
        report.phases.iter().any(|p| p.note.contains("PgBouncer")),
        "{report}"
    );

    // Nothing was paused or rewritten by any of them.
    assert_eq!(s.pool().await, (Some(s.source.port()), false));
    assert!(!PauseState::path(s.dir.path()).exists());
    let client = ConnInfo::parse(&s.pooler.conn_string(POOL))
        .unwrap()
        .connect()
        .await
        .unwrap();
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_left_by_a_dead_cutover_is_resumed_first() {
    let s = setup().await;
    // As a cutover killed right after PAUSE leaves it: the record, and the pool paused.
    let state = PauseState {
        cutover_id: "cutover-dead".into(),
        database: POOL.into(),
        databases_file: s.pooler.databases_file(),
        entry_before: entry_for(&s.source),
        entry_after: entry_for(&s.target),
    };
    std::fs::write(
        PauseState::path(s.dir.path()),
        serde_json::to_vec(&state).unwrap(),
    )
    .unwrap();
    s.admin().await.run(&format!("PAUSE {POOL}")).await.unwrap();
    assert_eq!(s.pool().await, (Some(s.source.port()), true));
    // … and its read-only fence, raised after the pause.
    let fence = walshift::cutover::fence::FenceState {
        database: "postgres".into(),
        previous: None,
        cutover_id: "cutover-dead".into(),
        role_overrides: Vec::new(),
    };
    std::fs::write(
        walshift::cutover::fence::FenceState::path(s.dir.path()),
        serde_json::to_vec(&fence).unwrap(),
    )
    .unwrap();
    s.source
        .execute(
            "postgres",
            "ALTER DATABASE postgres SET default_transaction_read_only = on",
        )
        .await
        .unwrap();

    // Without --pooler, cutover refuses and says how to resume.
    let mut c = s.config();
    c.pooler = None;
    let e = pooler_error(cutover::run(c, std::future::pending()).await);
    assert!(
        matches!(e, PoolerError::LeftPausedWithoutPooler { .. }),
        "{e}"
    );
    assert!(e.to_string().contains(&format!("RESUME {POOL}")), "{e}");

    // With it: the fence lifted and the pool resumed first (warned), then a normal cutover.
    let mut c = s.config();
    c.fence = FenceMode::None;
    let report = cutover::run(c, std::future::pending()).await.unwrap();
    assert_eq!(common::cutover::fence_entry(&s.source).await, None);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("cutover-dead") && w.contains("fence was lifted")),
        "{report}"
    );
    assert_eq!(report.outcome, Outcome::Switched, "{report}");
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("cutover-dead") && w.contains("resumed")),
        "{report}"
    );
    assert_eq!(s.pool().await, (Some(s.target.port()), false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_in_doubt_keeps_the_pool_paused_until_the_operator_resumes_it_on_the_copy() {
    let s = setup().await;
    let mut c = s.config();
    c.switch = Some("exit 3".into());
    c.fence = FenceMode::None;
    match cutover::run(c, std::future::pending()).await {
        Err(CutoverError::SwitchInDoubt(_)) => {}
        other => panic!("expected a switch in doubt, got {other:?}"),
    }
    // Held: the entry points at the copy, the pool is paused, the record is kept.
    assert_eq!(s.pool().await, (Some(s.target.port()), true));
    assert!(PauseState::path(s.dir.path()).exists());
    // A client through the pooler waits (no error) until the operator decides: PgBouncer
    // holds its login, then its statement.
    let through = ConnInfo::parse(&s.pooler.conn_string(POOL)).unwrap();
    let waiting = tokio::spawn(async move {
        let client = through.connect().await.map_err(|e| e.to_string())?;
        client
            .simple_query("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 7, now())")
            .await
            .map_err(|e| e.to_string())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the pool is paused: the client waits"
    );

    // A rerun without the operator's word refuses; with --resume-after-switch the pool
    // resumes on the copy and the waiting client's insert lands there.
    let r = cutover::run(s.config(), std::future::pending()).await;
    assert!(matches!(r, Err(CutoverError::SwitchInDoubt(_))), "{r:?}");
    let mut c = s.config();
    c.resume_after_switch = true;
    let report = cutover::run(c, std::future::pending()).await.unwrap();
    assert_eq!(report.outcome, Outcome::Switched, "{report}");
    waiting.await.unwrap().expect("the held client's insert");
    assert_eq!(s.pool().await, (Some(s.target.port()), false));
    assert_eq!(
        count(
            &s.target,
            "SELECT count(*) FROM pgbench_history WHERE delta = 7"
        )
        .await,
        1
    );
    assert!(!PauseState::path(s.dir.path()).exists());
}
