//! Release-night safety of cutover (issue 13) on real throwaway clusters and real processes:
//! walshift killed with `kill -9` during the switch hook (the hook dies with it; a rerun never
//! unfences and never sets sequences backwards), a failed after hook (a rerun runs only that
//! hook), role settings that would defeat the read-only fence, prepared transactions on the
//! source, flags validated before any side effect, and a stalled capture that must keep the
//! fence down.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::cli::{self, json, stderr, text};
use common::cutover::{aborted, fence_entry};
use common::pair::Pair;
use walshift::conn::ConnInfo;
use walshift::cutover::{self, CutoverConfig, CutoverError, Outcome};
use walshift::localpg::{Cluster, ClusterOptions};

const SCHEMA: &str = "
    CREATE TABLE accounts (id bigserial PRIMARY KEY, owner text NOT NULL, balance bigint NOT NULL DEFAULT 0);
    CREATE TABLE notes (k text PRIMARY KEY, body text);
    CREATE SEQUENCE invoice_no START 1000;
    INSERT INTO accounts (owner, balance) SELECT 'o' || g, g FROM generate_series(1, 500) g;
    INSERT INTO notes SELECT 'k' || g, 'n' FROM generate_series(1, 50) g;
    SELECT nextval('invoice_no') FROM generate_series(1, 5);";

const SEQUENCES: [&str; 2] = ["accounts_id_seq", "invoice_no"];

struct Setup {
    source: Cluster,
    target: Cluster,
    dir: tempfile::TempDir,
    sc: String,
    tc: String,
}

impl Setup {
    fn buf(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    fn config(&self) -> CutoverConfig {
        let mut c = CutoverConfig::new(
            ConnInfo::parse(&self.sc).unwrap(),
            ConnInfo::parse(&self.tc).unwrap(),
            self.dir.path(),
        );
        c.preflight_timeout = Some(Duration::from_secs(60));
        c
    }

    /// `walshift cutover` against this setup with `extra` flags.
    fn cutover(&self, extra: &[&str]) -> Command {
        let mut c = cli::command(&[
            "cutover", "--source", &self.sc, "--target", &self.tc, "--buffer",
        ]);
        c.arg(self.buf()).args(extra);
        c
    }
}

/// Two clusters, the schema on the source, cloned into the target at a new slot's snapshot.
async fn setup(source_opts: ClusterOptions) -> Setup {
    let Pair {
        source,
        target,
        dir,
    } = Pair::cloned(source_opts, SCHEMA).await;
    let (sc, tc) = (
        source.conn_string("postgres"),
        target.conn_string("postgres"),
    );
    Setup {
        source,
        target,
        dir,
        sc,
        tc,
    }
}

async fn assert_fenced(c: &Cluster) {
    assert_eq!(
        fence_entry(c).await,
        Some(vec!["default_transaction_read_only=on".to_string()]),
        "the source must stay fenced"
    );
    let e = c
        .connect("postgres")
        .await
        .unwrap()
        .batch_execute("INSERT INTO notes VALUES ('probe', 'p')")
        .await
        .expect_err("a write on the fenced source");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "{e:?}"
    );
}

/// `last_value` of each sequence in [`SEQUENCES`].
async fn seq_values(c: &Cluster) -> Vec<i64> {
    let client = c.connect("postgres").await.unwrap();
    let mut out = Vec::new();
    for s in SEQUENCES {
        out.push(
            client
                .query_one(&format!("SELECT last_value FROM {s}"), &[])
                .await
                .unwrap()
                .get(0),
        );
    }
    out
}

/// The application takes numbers on the new primary (the target) after the switch.
async fn app_uses_the_target(t: &Cluster) -> Vec<i64> {
    t.execute(
        "postgres",
        "SELECT nextval('accounts_id_seq'), nextval('invoice_no') FROM generate_series(1, 50)",
    )
    .await
    .unwrap();
    seq_values(t).await
}

fn run(mut c: Command) -> Output {
    c.output().unwrap()
}

/// Process group of a live process, from `/proc`.
fn pgid_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(2)?.parse().ok()
}

/// Live (not zombie) processes in process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        if fields.first() != Some(&"Z") && fields.get(2).and_then(|g| g.parse().ok()) == Some(pgid)
        {
            out.push(pid);
        }
    }
    out
}

async fn wait_for_file(path: &Path, what: &str) {
    let started = Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{what} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Item 2 (a): `kill -9` of walshift while the switch hook runs. The hook dies with it (it
/// never finishes the switch unrecorded), a plain rerun refuses (exit 5) without unfencing
/// or touching sequences, and `--resume-after-switch` records the switch done with
/// sequences moved forward only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_the_switch_the_hook_dies_and_reruns_never_unfence_or_go_backwards() {
    let s = setup(ClusterOptions::default()).await;
    let marks = s.dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    let hook = format!(
        "echo $$ > {m}/hook.pid.tmp && mv {m}/hook.pid.tmp {m}/hook.pid; sleep 4; touch {m}/switched",
        m = marks.display()
    );
    let mut walshift = s
        .cutover(&["--switch", &hook, "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(s.dir.path().join("cutover1.log")).unwrap())
        .spawn()
        .unwrap();
    wait_for_file(&marks.join("hook.pid"), "the switch hook").await;
    let hook_pid: i32 = std::fs::read_to_string(marks.join("hook.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pgid = pgid_of(hook_pid).expect("the hook runs");
    walshift.kill().unwrap(); // SIGKILL
    walshift.wait().unwrap();
    let started = Instant::now();
    while !group_members(pgid).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the hook outlived walshift: {:?}",
            group_members(pgid)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !marks.join("switched").exists(),
        "the orphaned hook finished the switch after walshift died"
    );
    assert_fenced(&s.source).await;

    // Suppose traffic reached the target anyway: the new primary hands out numbers.
    let target_seqs = app_uses_the_target(&s.target).await;
    let source_seqs = seq_values(&s.source).await;
    assert!(target_seqs.iter().zip(&source_seqs).all(|(t, s)| t > s));

    // The documented recovery used to be "run cutover again": it must refuse now.
    let o = run(s.cutover(&["--json"]));
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let err = stderr(&o);
    assert!(
        err.contains("--resume-after-switch") && err.contains("traffic"),
        "{err}"
    );
    assert_fenced(&s.source).await;
    assert_eq!(seq_values(&s.target).await, target_seqs);

    let o = run(s.cutover(&["--resume-after-switch", "--json"]));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(json(&o)["outcome"], "switched", "{}", text(&o));
    assert_eq!(seq_values(&s.target).await, target_seqs, "never backwards");
    assert_fenced(&s.source).await;

    let o = run(s.cutover(&["--json"]));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(json(&o)["outcome"], "already_switched", "{}", text(&o));
    assert_fenced(&s.source).await;
}

/// Item 2 (b): `SWITCHED (after-hook failed)` exits 4; a rerun does not redo the cutover
/// (no sequence regression, never unfenced) and runs only the after hook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_after_hook_a_rerun_runs_only_that_hook() {
    let s = setup(ClusterOptions::default()).await;
    let o = run(s.cutover(&["--after", "echo broken >&2; exit 1", "--json"]));
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert_eq!(json(&o)["outcome"], "switched_after_hook_failed");
    assert_fenced(&s.source).await;
    let target_seqs = app_uses_the_target(&s.target).await;

    // A pipeline retrying on failure: nothing is redone, nothing goes backwards.
    let o = run(s.cutover(&["--json"]));
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let v = json(&o);
    assert_eq!(v["outcome"], "switched_after_hook_failed", "{v}");
    assert!(v["phases"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(seq_values(&s.target).await, target_seqs);
    assert_fenced(&s.source).await;

    let o = run(s.cutover(&["--after", "true", "--json"]));
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&o);
    assert_eq!(v["outcome"], "switched", "{v}");
    let phases: Vec<&str> = v["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["after"], "{v}");
    assert_eq!(seq_values(&s.target).await, target_seqs);
    assert_fenced(&s.source).await;
    let journal: PathBuf = s.dir.path().join("cutover-journal.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&journal).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// `kill -9` of walshift while the after hook runs: the switch stands, but the after hook's
/// result is unknown, so a rerun without `--after` exits 4 and says so (it used to say
/// "already switched, nothing left to do"), and a rerun with `--after` runs only that hook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_the_after_hook_a_rerun_finishes_it() {
    let s = setup(ClusterOptions::default()).await;
    let marks = s.dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    let hook = format!(
        "echo $$ > {m}/after.pid.tmp && mv {m}/after.pid.tmp {m}/after.pid; sleep 30; touch {m}/after.done",
        m = marks.display()
    );
    let mut walshift = s
        .cutover(&["--after", &hook, "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(s.dir.path().join("cutover1.log")).unwrap())
        .spawn()
        .unwrap();
    wait_for_file(&marks.join("after.pid"), "the after hook").await;
    walshift.kill().unwrap(); // SIGKILL
    walshift.wait().unwrap();
    assert_fenced(&s.source).await;
    let target_seqs = app_uses_the_target(&s.target).await;

    let o = run(s.cutover(&["--json"]));
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let v = json(&o);
    assert_eq!(v["outcome"], "switched_after_hook_unfinished", "{v}");
    let err = v["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("never recorded a result") && err.contains("--after"),
        "{v}"
    );
    assert!(v["phases"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(seq_values(&s.target).await, target_seqs);
    assert_fenced(&s.source).await;

    let again = format!("touch {}/after.rerun", marks.display());
    let o = run(s.cutover(&["--after", &again, "--json"]));
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&o);
    assert_eq!(v["outcome"], "switched", "{v}");
    assert!(
        marks.join("after.rerun").exists(),
        "the after hook ran again"
    );
    assert!(
        !marks.join("after.done").exists(),
        "the first hook died with walshift"
    );
    assert_eq!(seq_values(&s.target).await, target_seqs);
    assert_fenced(&s.source).await;

    let o = run(s.cutover(&["--json"]));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(json(&o)["outcome"], "already_switched", "{}", text(&o));
}

/// The roles' own settings, as `(role, database-specific, setconfig)`.
async fn role_settings(c: &Cluster) -> Vec<(String, bool, Vec<String>)> {
    c.connect("postgres")
        .await
        .unwrap()
        .query(
            "SELECT r.rolname::text, s.setdatabase <> 0, s.setconfig FROM pg_db_role_setting s \
             JOIN pg_roles r ON r.oid = s.setrole ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The catalog rows of the roles' own settings, with the transaction that last wrote each.
async fn role_setting_rows(c: &Cluster) -> Vec<(String, String)> {
    c.connect("postgres")
        .await
        .unwrap()
        .query(
            "SELECT r.rolname::text, s.xmin::text FROM pg_db_role_setting s \
             JOIN pg_roles r ON r.oid = s.setrole ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The read-only fence's state is written before the window; a `--before` hook that fails
/// aborts before the fence is raised. The abort must not "lift" a fence that was never
/// raised: that rewrote the roles' settings on the source (same values, new catalog rows) for
/// nothing. The source is untouched and the state file is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_before_hook_aborts_without_writing_to_the_source() {
    let s = setup(ClusterOptions::default()).await;
    s.source
        .execute(
            "postgres",
            "CREATE ROLE app LOGIN; \
             ALTER ROLE app IN DATABASE postgres SET default_transaction_read_only = off",
        )
        .await
        .unwrap();
    let before = role_setting_rows(&s.source).await;
    assert_eq!(before.len(), 1, "{before:?}");
    let mut c = s.config();
    c.before = Some("exit 3".into());
    let a = aborted(cutover::run(c, std::future::pending()).await);
    assert!(matches!(a.cause, CutoverError::Hook(_)), "{a}");
    assert!(a.unfenced.is_ok(), "{a}");
    assert_eq!(
        role_setting_rows(&s.source).await,
        before,
        "the source was written"
    );
    assert_eq!(fence_entry(&s.source).await, None);
    assert!(
        !s.dir.path().join("cutover-fence.json").exists(),
        "the fence state file is left"
    );
    // Nothing stands in the way of the next cutover.
    let r = cutover::run(s.config(), std::future::pending())
        .await
        .expect("cutover after the failed hook");
    assert_eq!(r.outcome, Outcome::Switched, "{r}");
}

/// Item 3: `ALTER ROLE app IN DATABASE … SET default_transaction_read_only = off` (and a
/// role-wide one) used to let `app` keep committing on the fenced source after the switch.
/// The fence removes them for the window (an abort restores them exactly) and a writer as
/// `app` is refused from the fence on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_settings_cannot_defeat_the_read_only_fence() {
    let s = setup(ClusterOptions::default()).await;
    s.source
        .execute(
            "postgres",
            "CREATE ROLE app LOGIN; CREATE ROLE app2 LOGIN; \
             GRANT ALL ON ALL TABLES IN SCHEMA public TO app, app2; \
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app, app2; \
             ALTER ROLE app IN DATABASE postgres SET default_transaction_read_only = off; \
             ALTER ROLE app2 SET default_transaction_read_only = false;",
        )
        .await
        .unwrap();
    let before = role_settings(&s.source).await;
    assert_eq!(before.len(), 2, "{before:?}");

    // An abort puts every removed setting back exactly.
    s.target
        .execute(
            "postgres",
            "INSERT INTO notes VALUES ('only-on-target', 'x')",
        )
        .await
        .unwrap();
    let a = aborted(cutover::run(s.config(), std::future::pending()).await);
    assert!(matches!(a.cause, CutoverError::VerifyFailed { .. }), "{a}");
    assert!(a.unfenced.is_ok(), "{a}");
    assert_eq!(a.report.fence_role_settings_removed.len(), 2, "{a}");
    assert_eq!(role_settings(&s.source).await, before);
    assert_eq!(fence_entry(&s.source).await, None);
    s.target
        .execute("postgres", "DELETE FROM notes WHERE k = 'only-on-target'")
        .await
        .unwrap();

    // A failed switch hook leaves them removed (in doubt, fenced); the operator's
    // --unfence-after-failed-switch puts every one back exactly.
    let mut c = s.config();
    c.switch = Some("exit 1".into());
    let e = cutover::run(c, std::future::pending()).await.unwrap_err();
    assert!(matches!(e, CutoverError::SwitchInDoubt(_)), "{e}");
    assert_fenced(&s.source).await;
    assert!(role_settings(&s.source).await.is_empty());
    let mut c = s.config();
    c.unfence_after_failed_switch = true;
    let r = cutover::run(c, std::future::pending())
        .await
        .expect("unfence after the failed switch");
    assert_eq!(r.outcome, Outcome::UnfencedAfterFailedSwitch, "{r}");
    assert_eq!(role_settings(&s.source).await, before);
    assert_eq!(fence_entry(&s.source).await, None);

    // A writer as `app` keeps committing (reconnecting when terminated) until refused.
    let conn = format!(
        "host=127.0.0.1 port={} user=app dbname=postgres",
        s.source.port()
    );
    let switched = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let after_switch = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let writer = {
        let (switched, stop, after_switch, refused, commits) = (
            switched.clone(),
            stop.clone(),
            after_switch.clone(),
            refused.clone(),
            commits.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let Ok((client, c)) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await
                else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                tokio::spawn(c);
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    match client
                        .execute(
                            "INSERT INTO notes VALUES ($1, 'app')",
                            &[&format!("app-{n}")],
                        )
                        .await
                    {
                        Ok(_) => {
                            commits.fetch_add(1, Ordering::Relaxed);
                            if switched.load(Ordering::Relaxed) {
                                after_switch.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            if e.code()
                                == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
                            {
                                refused.store(true, Ordering::Relaxed);
                            }
                            break; // terminated or refused: reconnect and try again
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let started = Instant::now();
    while commits.load(Ordering::Relaxed) < 20 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the writer never wrote"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = cutover::run(s.config(), std::future::pending())
        .await
        .expect("cutover");
    assert_eq!(report.outcome, Outcome::Switched);
    switched.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert_eq!(
        after_switch.load(Ordering::Relaxed),
        0,
        "the writer as app committed on the source after the switch"
    );
    assert!(
        refused.load(Ordering::Relaxed),
        "the writer was never refused"
    );
    let app2 = format!(
        "host=127.0.0.1 port={} user=app2 dbname=postgres",
        s.source.port()
    );
    let (client, c) = tokio_postgres::connect(&app2, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(c);
    let e = client
        .batch_execute("INSERT INTO notes VALUES ('app2', 'x')")
        .await
        .expect_err("app2 writes through the fence");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
    );
}

/// Item 4: a prepared transaction pending on the source used to survive the fence and be
/// committed there after the switch. Preflight waits (bounded) and refuses without fencing;
/// one prepared inside the window (here by the `--before` hook) aborts the cutover, unfenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_transactions_on_the_source_keep_the_cutover_from_switching() {
    let s = setup(ClusterOptions::default().setting("max_prepared_transactions", "5")).await;
    s.source
        .execute(
            "postgres",
            "BEGIN; INSERT INTO notes VALUES ('prepared', 'p'); PREPARE TRANSACTION 'pending-1'",
        )
        .await
        .unwrap();
    let mut c = s.config();
    c.max_prepared_wait = Duration::from_millis(500);
    match cutover::run(c, std::future::pending()).await {
        Err(CutoverError::PreparedTransactions { list, .. }) => {
            assert!(list.contains("pending-1"), "{list}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(fence_entry(&s.source).await, None, "nothing was fenced");

    // Prepared inside the window, after preflight's check: caught after the fence.
    s.source
        .execute("postgres", "COMMIT PREPARED 'pending-1'")
        .await
        .unwrap();
    let psql = s.source.binaries().program("psql");
    let mut c = s.config();
    c.before = Some(format!(
        "{} '{}' -c \"BEGIN; INSERT INTO notes VALUES ('late', 'l'); PREPARE TRANSACTION 'late-1';\"",
        psql.display(),
        s.sc
    ));
    let a = aborted(cutover::run(c, std::future::pending()).await);
    assert!(
        matches!(&a.cause, CutoverError::PreparedTransactions { list, .. } if list.contains("late-1")),
        "{a}"
    );
    assert!(a.unfenced.is_ok(), "{a}");
    assert_eq!(
        fence_entry(&s.source).await,
        None,
        "unfenced after the abort"
    );

    s.source
        .execute("postgres", "COMMIT PREPARED 'late-1'")
        .await
        .unwrap();
    let report = cutover::run(s.config(), std::future::pending())
        .await
        .expect("cutover once nothing is pending");
    assert_eq!(report.outcome, Outcome::Switched);
    let n: i64 = s
        .target
        .connect("postgres")
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM notes WHERE k IN ('prepared', 'late')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

/// Item 10: impossible flags are refused before anything is touched. `--max-window 0s` used to
/// fence the live database and terminate every session before aborting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_flags_are_refused_before_the_source_is_touched() {
    let s = setup(ClusterOptions::default()).await;
    let idle = s.source.connect("postgres").await.unwrap();
    for (flags, names) in [
        (&["--max-window", "0s"][..], "--max-window"),
        (&["--max-lag", "0s"][..], "--max-lag"),
        (&["--hook-timeout", "0s"][..], "--hook-timeout"),
        (&["--slot", "Bad-Slot"][..], "--slot"),
        (&["--verify", "everything"][..], "--verify"),
        (&["--max-window=-5s"][..], "--max-window"),
        (&["--fence", "hook"][..], "--before"),
    ] {
        let o = run(s.cutover(flags));
        assert!(!o.status.success(), "{flags:?} accepted: {}", text(&o));
        let err = stderr(&o);
        assert!(err.contains(names), "{flags:?}: {err}");
        assert_eq!(
            fence_entry(&s.source).await,
            None,
            "{flags:?} fenced the source"
        );
        idle.batch_execute("SELECT 1")
            .await
            .unwrap_or_else(|e| panic!("{flags:?} terminated a session: {e}"));
        assert!(
            !s.dir.path().join("cutover-journal.json").exists()
                && !s.dir.path().join("cutover-fence.json").exists(),
            "{flags:?}"
        );
    }
}

/// Item 9 (cutover half): a capture stopped with SIGSTOP keeps its slot active and the
/// walsender's flush_lag at its last small value while the source's WAL runs ahead. Preflight
/// must see what is not durable (bytes and age) and refuse to fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_capture_keeps_the_fence_down() {
    let s = setup(ClusterOptions::default()).await;
    let mut capture = cli::command(&["capture", "--source", &s.sc, "--buffer", s.buf()])
        .stderr(std::fs::File::create(s.dir.path().join("capture.log")).unwrap())
        .spawn()
        .unwrap();
    let probe = s.source.connect("postgres").await.unwrap();
    let started = Instant::now();
    loop {
        let active: Option<bool> = probe
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'walshift'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        if active == Some(true) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "capture never streamed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let conn = s.sc.clone();
        tokio::spawn(async move {
            let (client, c) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(c);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if client
                    .execute(
                        "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                        &[&(1 + n % 500_i64)],
                    )
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SAFETY: stopping our own child.
    unsafe { libc::kill(capture.id() as i32, libc::SIGSTOP) };
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let idle = s.source.connect("postgres").await.unwrap();
    let mut c = s.config();
    c.max_lag = Duration::from_secs(1);
    c.preflight_timeout = Some(Duration::from_secs(5));
    let r = cutover::run(c, std::future::pending()).await;
    // SAFETY: resuming and stopping our own child.
    unsafe {
        libc::kill(capture.id() as i32, libc::SIGCONT);
        libc::kill(capture.id() as i32, libc::SIGTERM);
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let _ = capture.wait();
    match r {
        Err(CutoverError::LagTimeout {
            unconfirmed_bytes, ..
        }) => assert!(unconfirmed_bytes > 0),
        other => panic!("expected a refusal to fence, got {other:?}"),
    }
    idle.batch_execute("SELECT 1")
        .await
        .expect("the fence went up (the session was terminated)");
    assert_eq!(fence_entry(&s.source).await, None);
}

/// A switch hook killed by `--hook-timeout` has not said it left traffic where it was: the
/// switch is in doubt (exit 5), the source stays fenced, and the journal says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_hook_killed_by_its_timeout_leaves_the_source_fenced() {
    let s = setup(ClusterOptions::default()).await;
    let o = run(s.cutover(&["--switch", "sleep 30", "--hook-timeout", "1s", "--json"]));
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert_eq!(json(&o)["outcome"], "switch_in_doubt", "{}", text(&o));
    assert_fenced(&s.source).await;
    let journal = std::fs::read_to_string(s.dir.path().join("cutover-journal.json")).unwrap();
    assert!(
        journal.contains("switch_started") && !journal.contains("switch_done"),
        "{journal}"
    );
    // And so does every rerun until the operator says where traffic points.
    let o = run(s.cutover(&["--json"]));
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert_fenced(&s.source).await;
}

/// Cutover's verify evaluates the mapping on the live source: a volatile function there
/// (`pg_terminate_backend`) is refused in preflight, naming the file line, before the fence
/// and before anything runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volatile_mapping_expression_is_refused_before_the_fence() {
    let s = setup(ClusterOptions::default()).await;
    let victim = s.source.connect("postgres").await.unwrap();
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let m = walshift::transform::Mapping::parse(
        "release.toml",
        &format!(
            "[[table]]\nsource = \"notes\"\ntarget = \"notes\"\n\n[table.columns]\n\
             body = \"CASE WHEN pg_terminate_backend({pid}) THEN body ELSE body END\"\n"
        ),
    )
    .unwrap();
    let mut c = s.config();
    c.transform = Some(Arc::new(m));
    c.verify = cutover::VerifyMode::Checksum;
    let e = cutover::run(c, std::future::pending()).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("release.toml:6: column \"body\" of public.notes")
            && text.contains("pg_terminate_backend")
            && text.contains("VOLATILE"),
        "{text}"
    );
    assert_eq!(fence_entry(&s.source).await, None, "nothing fenced");
    victim
        .batch_execute("SELECT 1")
        .await
        .expect("the session on the source is alive");
}
