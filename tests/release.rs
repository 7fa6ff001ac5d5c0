//! A real release, end to end, on throwaway clusters: `pgbench -i` tables on the live source,
//! `pgbench` writing to it the whole time, clone at the slot's snapshot, the release's migration
//! on the copy (a renamed column, a computed column, a table split), replay through the
//! release's mapping while pgbench keeps writing, then — once pgbench stops and everything is
//! captured and replayed — `verify` through the mapping (library and CLI) and direct queries.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::capture::Running;
use walshift::apply::replay::{self, ReplayConfig};
use walshift::buffer::BufferReader;
use walshift::capture::CaptureConfig;
use walshift::clone::CloneOptions;
use walshift::localpg::Cluster;
use walshift::lsn::Lsn;
use walshift::migrate::{self, MigrateOptions};
use walshift::transform::Mapping;
use walshift::verify::{self, VerifyOptions};

/// The release's migration, run on the copy after the clone: `abalance` becomes `balance`,
/// `balance_cents` is computed from it (for every row already cloned, and kept by a CHECK so
/// a wrong replay could not slip through), and `filler` moves to its own table.
const MIGRATION: &str = "
ALTER TABLE pgbench_accounts RENAME COLUMN abalance TO balance;
ALTER TABLE pgbench_accounts ADD COLUMN balance_cents bigint;
UPDATE pgbench_accounts SET balance_cents = balance::bigint * 100;
ALTER TABLE pgbench_accounts ALTER COLUMN balance_cents SET NOT NULL,
    ADD CONSTRAINT balance_cents_matches CHECK (balance_cents = balance::bigint * 100);
CREATE TABLE pgbench_account_notes (aid int PRIMARY KEY, filler character(84));
INSERT INTO pgbench_account_notes (aid, filler) SELECT aid, filler FROM pgbench_accounts;
ALTER TABLE pgbench_accounts DROP COLUMN filler;
";

/// How the live site's (old-schema) changes land in the migrated copy. `pgbench_branches`,
/// `pgbench_tellers` and `pgbench_history` are not named: they map onto themselves.
const MAPPING: &str = r#"
# pgbench_accounts keeps its name: abalance is renamed, balance_cents computed from it.
[[table]]
source = "pgbench_accounts"
[table.columns]
balance       = "abalance"
balance_cents = "abalance::bigint * 100"

# ... and its filler goes to pgbench_account_notes (same key, same-named columns).
[[table]]
source = "pgbench_accounts"
target = "pgbench_account_notes"
"#;

/// pgbench running against the source; killed when dropped (also on a failing assert).
struct Pgbench {
    child: Child,
}

impl Pgbench {
    fn start(cluster: &Cluster, log: &Path) -> Pgbench {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(cluster.binaries().program("pgbench"))
            .args(pg_args(cluster))
            // -n: no vacuum (and no truncate of pgbench_history) before the run. -T is only a
            // safety net: the test stops pgbench itself.
            .args(["-n", "-c", "2", "-j", "2", "-T", "300", "--rate", "150"])
            .arg("postgres")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start pgbench");
        Pgbench { child }
    }

    /// Still running (it aborts on any error of its clients).
    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Pgbench {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pg_args(cluster: &Cluster) -> Vec<String> {
    vec![
        "-h".into(),
        "127.0.0.1".into(),
        "-p".into(),
        cluster.port().to_string(),
        "-U".into(),
        "postgres".into(),
    ]
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn applied_lsn(target: &tokio_postgres::Client) -> Lsn {
    target
        .query_opt("SELECT end_lsn::text FROM walshift.applied", &[])
        .await
        .unwrap()
        .map(|r| r.get::<_, String>(0).parse().unwrap())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_release_rename_computed_column_split_under_load() {
    let t0 = Instant::now();
    let (source, target) = common::pair::clusters();
    let dir = tempfile::tempdir().unwrap();
    let buffer = dir.path().join("buffer");
    let source_conn = common::pair::conn(&source);
    let target_conn = common::pair::conn(&target);
    let src = source.connect("postgres").await.unwrap();
    let dst = target.connect("postgres").await.unwrap();

    // The live site: pgbench's tables, 100,000 accounts.
    let init = Command::new(source.binaries().program("pgbench"))
        .args(pg_args(&source))
        .args(["-i", "-s", "1", "-q", "postgres"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    // pgbench_history has no key. It is an append-only log (pgbench never updates or deletes
    // it), so the operator does not change the live application's schema for the release:
    // REPLICA IDENTITY FULL costs nothing on an insert-only table, and it maps onto itself.
    src.batch_execute("ALTER TABLE pgbench_history REPLICA IDENTITY FULL")
        .await
        .unwrap();

    let pgbench_log = dir.path().join("pgbench.log");
    let mut pgbench = Pgbench::start(&source, &pgbench_log);
    let pgbench_output = || std::fs::read_to_string(&pgbench_log).unwrap_or_default();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let history_before_clone = count(&src, "SELECT count(*) FROM pgbench_history").await;

    // Capture (publication, slot, clone at the slot's snapshot, then stream) in the background.
    let mut cfg = CaptureConfig::new(source_conn.clone(), &buffer);
    cfg.clone = Some(CloneOptions::new(source_conn.clone(), target_conn.clone()));
    let cap = Running::cloned(cfg, Duration::from_secs(60)).await;
    let history_after_clone = count(&src, "SELECT count(*) FROM pgbench_history").await;
    assert!(
        history_after_clone > history_before_clone,
        "pgbench wrote during the clone ({history_before_clone} → {history_after_clone}): {}",
        pgbench_output()
    );
    eprintln!("clone done at {:.1} s", t0.elapsed().as_secs_f64());

    // The release's migration on the copy, while pgbench keeps writing to the source.
    let migration = dir.path().join("001_release.sql");
    let mapping_path = dir.path().join("release.toml");
    std::fs::write(&migration, MIGRATION).unwrap();
    std::fs::write(&mapping_path, MAPPING).unwrap();
    let scripts = migrate::load_scripts(std::slice::from_ref(&migration)).unwrap();
    let migrated = migrate::migrate(&MigrateOptions::new(target_conn.clone()), &scripts, |_| {})
        .await
        .expect("migration");
    assert_eq!(migrated.applied, 1);
    let mapping = Arc::new(Mapping::load(&mapping_path).unwrap());

    // Replay follows the buffer into the migrated copy, through the mapping, while pgbench
    // keeps writing for a few seconds more.
    let history_at_replay = count(&src, "SELECT count(*) FROM pgbench_history").await;
    let mut rcfg = ReplayConfig::new(&buffer, target_conn.clone());
    rcfg.follow = true;
    rcfg.transform = Some(mapping.clone());
    let (replay_stop, replay_stopped) = tokio::sync::oneshot::channel::<()>();
    let follower = tokio::spawn(replay::run(rcfg, async move {
        let _ = replay_stopped.await;
    }));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !follower.is_finished(),
        "replay stopped: {:?}",
        follower.await
    );
    assert!(
        !cap.is_finished(),
        "capture stopped: {:?}",
        cap.stop().await
    );
    assert!(
        pgbench.running(),
        "pgbench kept running throughout: {}",
        pgbench_output()
    );
    assert!(
        !applied_lsn(&dst).await.is_zero(),
        "replay applied live changes while pgbench ran"
    );

    // Stop the site's writes, and wait until none of its sessions is left (a killed client's
    // last transaction must be committed or rolled back before the end of WAL is taken).
    drop(pgbench);
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(
        &src,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench'",
    )
    .await
        > 0
    {
        assert!(Instant::now() < deadline, "pgbench sessions did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let history_end = count(&src, "SELECT count(*) FROM pgbench_history").await;
    assert!(
        history_end > history_at_replay,
        "pgbench wrote during replay ({history_at_replay} → {history_end})"
    );

    // Capture to the source's end of WAL (stop the streaming run, then a run up to the current
    // LSN: a restart on the same slot and buffer), and let the follower apply all of it.
    cap.stop().await.expect("capture with clone");
    common::capture::until_now(&source, &buffer).await;
    let last = BufferReader::open(&buffer)
        .unwrap()
        .status()
        .unwrap()
        .last_commit
        .expect("the buffer holds transactions")
        .end_lsn;
    let deadline = Instant::now() + Duration::from_secs(30);
    while applied_lsn(&dst).await < last {
        assert!(
            !follower.is_finished(),
            "replay stopped: {:?}",
            follower.await
        );
        assert!(
            Instant::now() < deadline,
            "replay did not reach {last} in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = replay_stop.send(());
    let report = follower.await.unwrap().expect("replay");
    assert_eq!(report.applied_lsn, last);
    assert!(report.changes > 0, "{report:?}");
    eprintln!(
        "replayed {} changes in {} transactions; caught up at {:.1} s",
        report.changes,
        report.transactions,
        t0.elapsed().as_secs_f64()
    );

    // verify, through the mapping: every table of the publication, the split one twice.
    let tables = verify::published_tables(&src, "walshift").await.unwrap();
    let verified = verify::verify(&src, &dst, &mapping, &tables, &VerifyOptions::default())
        .await
        .expect("verify runs");
    let lines: Vec<String> = verified
        .tables
        .iter()
        .map(|t| {
            format!(
                "{} → {}: {} / {} rows, {}",
                t.source.name,
                t.target.name,
                t.source_rows,
                t.target_rows,
                if t.equal {
                    "equal".to_owned()
                } else {
                    format!("differ {:?}", t.differences)
                }
            )
        })
        .collect();
    assert!(verified.equal(), "verify: {lines:#?}");
    let mut pairs: Vec<(String, String)> = verified
        .tables
        .iter()
        .map(|t| (t.source.name.clone(), t.target.name.clone()))
        .collect();
    pairs.sort();
    let pair = |s: &str, t: &str| (s.to_owned(), t.to_owned());
    assert_eq!(
        pairs,
        vec![
            pair("pgbench_accounts", "pgbench_account_notes"),
            pair("pgbench_accounts", "pgbench_accounts"),
            pair("pgbench_branches", "pgbench_branches"),
            pair("pgbench_history", "pgbench_history"),
            pair("pgbench_tellers", "pgbench_tellers"),
        ],
        "{lines:#?}"
    );
    let notes = verified
        .tables
        .iter()
        .find(|t| t.target.name == "pgbench_account_notes")
        .unwrap();
    assert_eq!(notes.target_rows, 100_000);
    let accounts = verified
        .tables
        .iter()
        .find(|t| t.target.name == "pgbench_accounts")
        .unwrap();
    assert!(
        accounts.columns.iter().any(|c| c == "balance_cents"),
        "the computed column is compared: {:?}",
        accounts.columns
    );

    // Direct queries. The money adds up on both sides, the computed column is right on every
    // row, the split is one-to-one, and the copy has the new shape.
    let src_sums = src
        .query_one(
            "SELECT count(*), sum(abalance), count(*) FILTER (WHERE abalance <> 0) FROM pgbench_accounts",
            &[],
        )
        .await
        .unwrap();
    let dst_sums = dst
        .query_one(
            "SELECT count(*), sum(balance), count(*) FILTER (WHERE balance <> 0),
                    count(*) FILTER (WHERE balance_cents IS DISTINCT FROM balance::bigint * 100)
             FROM pgbench_accounts",
            &[],
        )
        .await
        .unwrap();
    let (n, sum, touched): (i64, i64, i64) = (src_sums.get(0), src_sums.get(1), src_sums.get(2));
    assert_eq!(n, 100_000);
    assert!(touched > 100, "pgbench changed accounts ({touched})");
    assert_eq!(
        (dst_sums.get::<_, i64>(0), dst_sums.get::<_, i64>(1)),
        (n, sum),
        "sum(balance) on the copy = sum(abalance) on the source"
    );
    assert_eq!(dst_sums.get::<_, i64>(2), touched);
    assert_eq!(
        dst_sums.get::<_, i64>(3),
        0,
        "balance_cents = balance * 100 on every row"
    );
    // pgbench's invariant, on the copy: every transaction moved the same delta through an
    // account, a teller, a branch and the history — so the copy holds whole transactions.
    let inv = dst
        .query_one(
            "SELECT (SELECT sum(balance) FROM pgbench_accounts),
                    (SELECT sum(tbalance)::bigint FROM pgbench_tellers),
                    (SELECT sum(bbalance)::bigint FROM pgbench_branches),
                    (SELECT sum(delta)::bigint FROM pgbench_history),
                    (SELECT count(*) FROM pgbench_history)",
            &[],
        )
        .await
        .unwrap();
    let inv: Vec<i64> = (0..5).map(|i| inv.get(i)).collect();
    assert_eq!(inv[..4], [sum, sum, sum, sum], "pgbench invariant: {inv:?}");
    assert_eq!(inv[4], history_end);
    assert_eq!(
        count(
            &dst,
            "SELECT count(*) FROM pgbench_accounts a FULL JOIN pgbench_account_notes n USING (aid)
             WHERE a.aid IS NULL OR n.aid IS NULL OR n.filler IS NULL",
        )
        .await,
        0,
        "every account has its note, and no note is orphaned"
    );
    let columns: Vec<String> = dst
        .query(
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_name = 'pgbench_accounts' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(columns, ["aid", "bid", "balance", "balance_cents"]);

    // The operator's form: `walshift verify … --transform release.toml` exits 0.
    let out = common::cli::command(&["verify", "--source", &source.conn_string("postgres")])
        .args(["--target", &target.conn_string("postgres")])
        .arg("--transform")
        .arg(&mapping_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "walshift verify: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("pgbench_account_notes"),
        "the split table is verified: {stdout}"
    );
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}
