//! Replay over several target connections: the same result as one connection, a fallback
//! when the target allows no prepared transactions, and the prepared transactions an
//! interrupted replay leaves settled by the rule in `apply::progress` (commit when any part of
//! the batch committed, else roll back and replay).

mod common;

use common::digest::digests;
use common::pair::{self, Pair};
use walshift::apply::progress;
use walshift::apply::replay::{self, ReplayReport};
use walshift::buffer::BufferMeta;
use walshift::localpg::{Cluster, ClusterOptions};

const SCHEMA: &str = "
    CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance bigint, email text UNIQUE);
    CREATE TABLE events (id bigint PRIMARY KEY, account bigint, kind text);";

async fn fingerprint(c: &Cluster) -> Vec<(String, i64, String)> {
    digests(c, &["accounts", "events"]).await
}

/// What a replay's part `part` of 2 of the batch ending at `end` leaves when killed right
/// after its PREPARE: the rows `SELECT g … FROM <rows>` inserted, its progress record, the
/// transaction prepared under replay's gid (returned).
async fn prepare_part(
    c: &tokio_postgres::Client,
    id: &str,
    end: walshift::lsn::Lsn,
    part: usize,
    rows: &str,
) -> String {
    c.batch_execute(&format!(
        "BEGIN; INSERT INTO accounts SELECT g, 'o' || g, g, NULL FROM {rows}"
    ))
    .await
    .unwrap();
    let end_text = end.to_string();
    if part == 0 {
        c.execute(progress::RECORD_PROGRESS, &[&id, &end_text])
            .await
            .unwrap();
    } else {
        c.execute(progress::RECORD_PART, &[&id, &(part as i32), &end_text])
            .await
            .unwrap();
    }
    let gid = progress::prepared_gid(id, end, part, 2);
    c.batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
        .await
        .unwrap();
    gid
}

async fn replay_with(target: &Cluster, dir: &std::path::Path, connections: usize) -> ReplayReport {
    let mut cfg = pair::replay_config(target, dir);
    cfg.batch_rows = 700;
    cfg.apply_connections = connections;
    pair::replay(cfg).await.expect("replay")
}

/// Many small transactions of inserts, updates, deletes, key moves and unique-email swaps.
async fn workload(source: &Cluster) {
    let client = source.connect("postgres").await.unwrap();
    client
        .batch_execute(
            "INSERT INTO accounts SELECT g, 'o' || g, g, 'e' || g FROM generate_series(1, 2000) g;",
        )
        .await
        .unwrap();
    common::load::each(&client, 0..400, |i| {
        let a = 1 + i * 7 % 2000;
        let b = 1 + (i * 13 + 5) % 2000;
        let d = 1 + (i * 31 + 11) % 2000;
        format!(
            "BEGIN;
                 UPDATE accounts SET balance = balance + 1 WHERE id = {a};
                 INSERT INTO events VALUES ({i}, {a}, 'credit');
                 DELETE FROM accounts WHERE id = {d};
                 INSERT INTO accounts VALUES ({d}, 'again', 0, 'again{i}');
                 UPDATE accounts SET id = {m} WHERE id = {mv};
                 UPDATE accounts SET email = NULL WHERE id = {b};
                 UPDATE accounts SET email = 'swap{i}' WHERE id = {a};
                 COMMIT;",
            m = 100_000 + i,
            mv = 3000 + i,
        )
    })
    .await;
    client
        .batch_execute("DELETE FROM events WHERE id % 3 = 0; TRUNCATE events; INSERT INTO events VALUES (1, 1, 'after truncate');")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_give_the_same_target_as_one_and_fall_back_without_2pc() {
    let (source, parallel) = pair::clusters();
    let no_2pc = Cluster::start(ClusterOptions {
        settings: vec![("max_prepared_transactions".into(), "0".into())],
        ..Default::default()
    })
    .unwrap();
    for c in [&source, &parallel, &no_2pc] {
        c.execute("postgres", SCHEMA).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    common::capture::until_now(&source, dir.path()).await;
    workload(&source).await;
    common::capture::until_now(&source, dir.path()).await;
    let expected = fingerprint(&source).await;

    let report = replay_with(&parallel, dir.path(), 2).await;
    assert_eq!(report.apply_connections, 2, "{report:?}");
    assert!(report.batches >= 3, "{report:?}");
    assert!(report.serial_batches >= 1, "the TRUNCATE batch: {report:?}");
    assert_eq!(fingerprint(&parallel).await, expected);
    let client = parallel.connect("postgres").await.unwrap();
    let left: i64 = client
        .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "no prepared transaction left behind");
    let again = replay_with(&parallel, dir.path(), 2).await;
    assert_eq!(again.changes, 0, "{again:?}");

    let report = replay_with(&no_2pc, dir.path(), 2).await;
    assert_eq!(report.apply_connections, 1, "fell back: {report:?}");
    assert_eq!(fingerprint(&no_2pc).await, expected);
}

/// The states a crash around the two phases leaves, made by hand on real targets: part 1
/// committed and part 0 (with `walshift.applied`) prepared; both prepared; only part 0
/// prepared. The first two were decided and are committed, the last is rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_parts_left_by_a_crash_are_committed_or_rolled_back() {
    let (source, decided) = pair::clusters();
    let (undecided, all_prepared) = pair::clusters();
    for c in [&source, &decided, &undecided, &all_prepared] {
        c.execute("postgres", SCHEMA).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    common::capture::until_now(&source, dir.path()).await;
    source
        .execute(
            "postgres",
            "INSERT INTO accounts SELECT g, 'o' || g, g, NULL FROM generate_series(1, 100) g",
        )
        .await
        .unwrap();
    let first = common::capture::until_now(&source, dir.path()).await;
    let end = first.transactions.last().unwrap().end_lsn;
    source
        .execute(
            "postgres",
            "UPDATE accounts SET balance = -balance WHERE id <= 10",
        )
        .await
        .unwrap();
    common::capture::until_now(&source, dir.path()).await;
    let meta = BufferMeta::read(dir.path()).unwrap().unwrap();
    let id = progress::buffer_id(meta.system_identifier, &meta.slot);

    // Decided: part 1 (ids 51..100) committed, part 0 (ids 1..50 + progress) prepared.
    let c0 = decided.connect("postgres").await.unwrap();
    let c1 = decided.connect("postgres").await.unwrap();
    progress::ensure_progress_table(&c0).await.unwrap();
    let gid1 = prepare_part(&c1, &id, end, 1, "generate_series(51, 100) g").await;
    c1.batch_execute(&format!("COMMIT PREPARED '{gid1}'"))
        .await
        .unwrap();
    prepare_part(&c0, &id, end, 0, "generate_series(1, 50) g").await;
    drop((c0, c1));
    let status = common::cli::command(&["status", "--json", "--buffer"])
        .arg(dir.path())
        .args(["--target", &decided.conn_string("postgres")])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["prepared_transactions"], 1, "{status}");
    let report = replay_with(&decided, dir.path(), 2).await;
    assert_eq!(report.prepared_committed, 1, "{report:?}");
    assert_eq!(report.prepared_rolled_back, 0, "{report:?}");
    assert_eq!(report.start_lsn, end, "resumed after the decided batch");
    assert_eq!(report.changes, 10, "only the update after it: {report:?}");
    assert_eq!(fingerprint(&decided).await, fingerprint(&source).await);

    // Every part prepared, none committed yet (killed just before phase two): decided too,
    // both are committed.
    let c0 = all_prepared.connect("postgres").await.unwrap();
    let c1 = all_prepared.connect("postgres").await.unwrap();
    progress::ensure_progress_table(&c0).await.unwrap();
    prepare_part(&c0, &id, end, 0, "generate_series(1, 50) g").await;
    prepare_part(&c1, &id, end, 1, "generate_series(51, 100) g").await;
    drop((c0, c1));
    let report = replay_with(&all_prepared, dir.path(), 2).await;
    assert_eq!(report.prepared_committed, 2, "{report:?}");
    assert_eq!(report.start_lsn, end, "{report:?}");
    assert_eq!(report.changes, 10, "{report:?}");
    assert_eq!(fingerprint(&all_prepared).await, fingerprint(&source).await);

    // Undecided: part 0 of 2 prepared (with a row the batch never had), part 1 never got to
    // PREPARE (its session died): no COMMIT PREPARED was ever sent, so part 0 is rolled back
    // and the whole buffer is replayed.
    let c0 = undecided.connect("postgres").await.unwrap();
    let c1 = undecided.connect("postgres").await.unwrap();
    progress::ensure_progress_table(&c0).await.unwrap();
    prepare_part(&c0, &id, end, 0, "(VALUES (900)) v(g)").await;
    c1.batch_execute("BEGIN; INSERT INTO accounts VALUES (901, 'never', 0, NULL)")
        .await
        .unwrap();
    drop((c0, c1));
    let report = replay_with(&undecided, dir.path(), 2).await;
    assert_eq!(report.prepared_rolled_back, 1, "{report:?}");
    assert_eq!(report.prepared_committed, 0, "{report:?}");
    assert_eq!(report.changes, 110, "everything replayed: {report:?}");
    assert_eq!(fingerprint(&undecided).await, fingerprint(&source).await);
}

async fn ledger(c: &Cluster) -> Vec<(String, i64, String)> {
    digests(c, &["ledger"]).await
}

/// The sessions a killed replay leaves on the target, made by hand under replay's
/// `application_name`: one still running its batch's last statement before COMMIT (it
/// commits 2 s later), then one idle in its batch's transaction forever (a half-open
/// connection). The rerun must not read the applied position before the first has finished
/// (it would apply the batch again: the keyless table would get its rows twice), and must
/// not wait forever for the second (it can never commit: it is ended and the batch redone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_waits_for_the_sessions_a_killed_replay_left_running() {
    let schema = format!(
        "{SCHEMA} CREATE TABLE ledger (k bigint NOT NULL, note text); \
         ALTER TABLE ledger REPLICA IDENTITY FULL;"
    );
    let Pair {
        source,
        target,
        dir,
    } = Pair::capturing(&schema, &schema).await;
    let meta = BufferMeta::read(dir.path()).unwrap().unwrap();
    let id = progress::buffer_id(meta.system_identifier, &meta.slot);
    let info =
        pair::conn(&target).with_application_name(&replay::sessions::replay_application_name(&id));
    let batch = |rows: &str, end: walshift::lsn::Lsn| {
        format!(
            "BEGIN; INSERT INTO ledger VALUES {rows}; \
             INSERT INTO walshift.applied (buffer_id, end_lsn) VALUES ('{id}', '{end}') \
             ON CONFLICT (buffer_id) DO UPDATE SET end_lsn = EXCLUDED.end_lsn"
        )
    };
    let monitor = target.connect("postgres").await.unwrap();

    source
        .execute(
            "postgres",
            "INSERT INTO ledger VALUES (1, 'one'), (2, 'two')",
        )
        .await
        .unwrap();
    let end = common::capture::until_now(&source, dir.path())
        .await
        .transactions
        .last()
        .unwrap()
        .end_lsn;
    let previous = info.connect().await.unwrap();
    progress::ensure_progress_table(&previous).await.unwrap();
    let last_statement = format!(
        "{}; SELECT pg_sleep(2); COMMIT",
        batch("(1, 'one'), (2, 'two')", end)
    );
    let committing = tokio::spawn(async move { previous.batch_execute(&last_statement).await });
    while monitor
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'walshift replay %' \
             AND query LIKE '%pg_sleep%'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let report = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        replay_with(&target, dir.path(), 2),
    )
    .await
    .expect("replay finished");
    committing
        .await
        .unwrap()
        .expect("the previous batch committed");
    assert_eq!(report.start_lsn, end, "{report:?}");
    assert_eq!(report.changes, 0, "{report:?}");
    assert_eq!(ledger(&target).await, ledger(&source).await, "applied once");

    source
        .execute("postgres", "INSERT INTO ledger VALUES (3, 'three')")
        .await
        .unwrap();
    let end2 = common::capture::until_now(&source, dir.path())
        .await
        .transactions
        .last()
        .unwrap()
        .end_lsn;
    let stuck = info.connect().await.unwrap();
    stuck
        .batch_execute(&batch("(3, 'three')", end2))
        .await
        .unwrap();
    let report = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        replay_with(&target, dir.path(), 2),
    )
    .await
    .expect("replay did not wait forever for an idle session");
    assert_eq!(report.start_lsn, end, "the idle batch never committed");
    assert_eq!(report.changes, 1, "{report:?}");
    assert_eq!(ledger(&target).await, ledger(&source).await);
    assert!(
        stuck.simple_query("SELECT 1").await.is_err(),
        "the idle session was ended"
    );
}
