//! Replay end to end: capture a mixed workload, replay the buffer into a target that started
//! with the same schema and rows, and the target equals the source.

mod common;

use common::digest::{assert_same, digests};
use common::pair::{self, Pair};
use walshift::apply::replay;
use walshift::localpg::{Cluster, ClusterOptions};

const SCHEMA: &str = "
    CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance bigint, note text, tags text[]);
    CREATE TABLE nokey (a int, b text);
    ALTER TABLE nokey REPLICA IDENTITY FULL;
    CREATE TABLE docs (id int PRIMARY KEY, body text, rev int);
    ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;";

/// Captures what the source committed so far, then replays the buffer into the target.
async fn replay_all(
    source: &Cluster,
    target: &Cluster,
    dir: &std::path::Path,
    batch_rows: usize,
) -> replay::ReplayReport {
    common::capture::until_now(source, dir).await;
    let mut cfg = pair::replay_config(target, dir);
    cfg.batch_rows = batch_rows;
    pair::replay(cfg).await.expect("replay")
}

/// Source and target with their schemas, each of `changes` committed on the source as its own
/// transaction and captured; the error replay stops with.
async fn replay_error(source_sql: &str, target_sql: &str, changes: &[&str]) -> (Pair, String) {
    let p = Pair::capturing(source_sql, target_sql).await;
    for sql in changes {
        p.source.execute("postgres", sql).await.unwrap();
    }
    common::capture::until_now(&p.source, p.dir.path()).await;
    let err = pair::replay(pair::replay_config(&p.target, p.dir.path()))
        .await
        .unwrap_err()
        .to_string();
    (p, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_target_equals_source() {
    let Pair {
        source,
        target,
        dir,
    } = Pair::capturing(SCHEMA, SCHEMA).await;

    source
        .execute(
            "postgres",
            "INSERT INTO accounts SELECT g, 'owner ' || g, g * 10, NULL, ARRAY['a', 'b''c'] FROM generate_series(1, 3000) g;
             INSERT INTO docs SELECT g, repeat(md5(g::text), 4000), 1 FROM generate_series(1, 20) g;
             INSERT INTO nokey VALUES (1, 'x'), (1, 'x'), (2, 'y');",
        )
        .await
        .unwrap();
    // Many small transactions mixing every kind of change, including key moves, TOAST
    // untouched, delete + re-insert of the same key, and duplicates in a keyless table.
    let client = source.connect("postgres").await.unwrap();
    for i in 0..300 {
        client
            .batch_execute(&format!(
                "BEGIN;
                 UPDATE accounts SET balance = balance + 1, note = 'n{i}' WHERE id = {a};
                 DELETE FROM accounts WHERE id = {d};
                 INSERT INTO accounts VALUES ({d}, 'again {i}', 0, E'line\\nbreak', '{{}}');
                 UPDATE accounts SET id = {m} WHERE id = {mf};
                 UPDATE docs SET rev = rev + 1 WHERE id = {doc};
                 COMMIT;",
                a = 1 + i * 7 % 3000,
                d = 1 + i * 13 % 3000,
                m = 10_000 + i,
                mf = 2000 + i,
                doc = 1 + i % 20,
            ))
            .await
            .unwrap();
    }
    client
        .batch_execute("DELETE FROM nokey WHERE a = 1 AND ctid = (SELECT min(ctid) FROM nokey WHERE a = 1); UPDATE nokey SET b = 'z' WHERE a = 2;")
        .await
        .unwrap();
    let report = replay_all(&source, &target, dir.path(), 500).await;
    assert!(report.batches >= 2, "several batches: {report:?}");
    assert_same(&source, &target, &["accounts", "docs", "nokey"]).await;

    // Running again applies nothing twice.
    let again = replay_all(&source, &target, dir.path(), 500).await;
    assert_eq!(again.changes, 0, "{again:?}");
    assert_same(&source, &target, &["accounts", "docs", "nokey"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_and_a_big_transaction_in_bounded_batches() {
    let Pair {
        source,
        target,
        dir,
    } = Pair::capturing(SCHEMA, SCHEMA).await;
    source
        .execute("postgres", "INSERT INTO accounts SELECT g, 'o', g, NULL, NULL FROM generate_series(1, 500) g; TRUNCATE accounts;")
        .await
        .unwrap();
    source
        .execute("postgres", "INSERT INTO accounts SELECT g, 'big', g, md5(g::text), NULL FROM generate_series(1, 50000) g")
        .await
        .unwrap();
    let report = replay_all(&source, &target, dir.path(), 2000).await;
    assert_eq!(report.changes, 50_500, "{report:?}");
    assert_same(&source, &target, &["accounts"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_drift_is_a_clear_error_and_applies_nothing() {
    let (p, err) = replay_error(
        "CREATE TABLE t (id int PRIMARY KEY, extra text)",
        "CREATE TABLE t (id int PRIMARY KEY)",
        &["INSERT INTO t VALUES (1, 'x')"],
    )
    .await;
    assert!(
        err.contains("schema drift") && err.contains("extra"),
        "{err}"
    );
    assert_eq!(digests(&p.target, &["t"]).await[0].1, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constraint_conflict_in_a_batch_is_retried_in_source_order() {
    let schema = "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL UNIQUE)";
    let Pair {
        source,
        target,
        dir,
    } = Pair::capturing(schema, schema).await;
    let c = source.connect("postgres").await.unwrap();
    c.batch_execute("INSERT INTO users VALUES (1, 'a'), (2, 'b')")
        .await
        .unwrap();
    replay_all(&source, &target, dir.path(), 10_000).await;
    // A swap through a temporary value: folded, it is one statement that collides on the
    // unique email whatever the row order — the batch must fall back to source order.
    c.batch_execute("UPDATE users SET email = 'tmp' WHERE id = 1")
        .await
        .unwrap();
    c.batch_execute("UPDATE users SET email = 'a' WHERE id = 2")
        .await
        .unwrap();
    c.batch_execute("UPDATE users SET email = 'b' WHERE id = 1")
        .await
        .unwrap();
    let report = replay_all(&source, &target, dir.path(), 10_000).await;
    assert!(report.retried_in_order >= 1, "{report:?}");
    assert_same(&source, &target, &["users"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_target_rejects_stops_replay_with_table_key_and_lsn() {
    let (p, err) = replay_error(
        "CREATE TABLE items (id int PRIMARY KEY, qty int)",
        "CREATE TABLE items (id int PRIMARY KEY, qty int CHECK (qty >= 0))",
        &[
            "INSERT INTO items VALUES (1, 5)",
            "INSERT INTO items VALUES (2, -1)",
        ],
    )
    .await;
    assert!(
        err.contains("\"public\".\"items\"") && err.contains("id=2") && err.contains("LSN"),
        "{err}"
    );
    // The good transaction before it is applied; the bad one is not, not even partly.
    let t = p.target.connect("postgres").await.unwrap();
    let ids: Vec<i32> = t
        .query("SELECT id FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1]);
}

/// A transaction holding only a cutover marker is recorded as applied: cutover waits for the
/// target's applied position to pass the marker, and a fenced source sends nothing after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marker_only_transaction_is_recorded_as_applied() {
    let Pair {
        source,
        target,
        dir,
    } = Pair::capturing(SCHEMA, SCHEMA).await;
    source
        .execute(
            "postgres",
            "INSERT INTO accounts VALUES (1, 'a', 1, NULL, NULL)",
        )
        .await
        .unwrap();
    let client = source.connect("postgres").await.unwrap();
    let marker: String = client
        .query_one(
            "SELECT pg_logical_emit_message(true, 'walshift', 'cutover-42')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let marker: walshift::Lsn = marker.parse().unwrap();
    let report = replay_all(&source, &target, dir.path(), 1000).await;
    assert_eq!(report.last_marker.as_deref(), Some("cutover-42"));
    assert!(
        report.applied_lsn > marker,
        "applied {} must pass the marker at {marker}",
        report.applied_lsn
    );
    let applied: String = target
        .connect("postgres")
        .await
        .unwrap()
        .query_one("SELECT max(end_lsn)::text FROM walshift.applied", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        applied.parse::<walshift::Lsn>().unwrap(),
        report.applied_lsn
    );
}

/// A column added on the source mid-stream (and on the target, as a release would): the
/// batch holding changes of both shapes is written in two parts, with statements for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_changing_shape_inside_a_batch_is_replayed() {
    let Pair {
        source,
        target,
        dir,
    } = Pair::with_schema(SCHEMA).await;
    target
        .execute("postgres", "ALTER TABLE accounts ADD COLUMN extra int")
        .await
        .unwrap();
    common::capture::until_now(&source, dir.path()).await;
    source
        .execute(
            "postgres",
            "INSERT INTO accounts SELECT g, 'o' || g, g, NULL, NULL FROM generate_series(1, 500) g;
             ALTER TABLE accounts ADD COLUMN extra int;
             INSERT INTO accounts SELECT g, 'p' || g, g, NULL, NULL, g FROM generate_series(501, 900) g;
             UPDATE accounts SET extra = id * 2, balance = balance + 1 WHERE id % 3 = 0;
             DELETE FROM accounts WHERE id % 7 = 0;",
        )
        .await
        .unwrap();
    let report = replay_all(&source, &target, dir.path(), 100_000).await;
    assert_eq!(report.changes, 1328, "{report:?}");
    assert_same(&source, &target, &["accounts"]).await;
}

/// Integers, booleans and timestamps travel in binary (`apply::wire`), everything else as
/// text; odd values (BC, infinity, five-digit years, historical offsets with seconds, type
/// limits) and servers whose time zone and DateStyle differ from each other all replay exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_values_replay_exactly_across_time_zones_and_date_styles() {
    let source = Cluster::start(ClusterOptions {
        settings: vec![
            ("timezone".into(), "'Asia/Kolkata'".into()),
            ("datestyle".into(), "'SQL, DMY'".into()),
        ],
        ..Default::default()
    })
    .unwrap();
    let target = Cluster::start(ClusterOptions {
        settings: vec![
            ("timezone".into(), "'America/St_Johns'".into()),
            ("datestyle".into(), "'ISO, MDY'".into()),
        ],
        ..Default::default()
    })
    .unwrap();
    let schema = "CREATE TABLE typed (id bigint PRIMARY KEY, i4 int, i2 smallint, b boolean, ts timestamp, \
                  tstz timestamptz, d date, iv interval, f float8, ts3 timestamp(3) with time zone)";
    source.execute("postgres", schema).await.unwrap();
    target.execute("postgres", schema).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    common::capture::until_now(&source, dir.path()).await;
    source
        .execute(
            "postgres",
            "INSERT INTO typed VALUES
               (1, 2147483647, 32767, true, '2000-01-01 00:00:00', '2000-01-01 00:00:00+00', '2024-02-29', '1 year 2 mons -3 days 04:05:06.789', 0.1, now()),
               (2, -2147483648, -32768, false, '1970-01-01 00:00:00.000001', '1999-12-31 23:59:59.999999+00', 'infinity', '-1 day', 1e308, '2024-02-29 12:34:56.789+05:30'),
               (3, 0, 0, NULL, 'infinity', 'infinity', '0044-03-15 BC', NULL, 'NaN', NULL),
               (4, NULL, NULL, true, '-infinity', '-infinity', NULL, '00:00:00.000001', '-Infinity', '-infinity'),
               (5, 7, 7, false, '0001-01-01 00:00:00 BC', '0044-03-15 12:00:00+00 BC', '2000-01-01', '0', -0.0, '1900-01-01 00:00:00+00'),
               (6, 8, 8, true, '294276-12-31 23:59:59', '12345-06-07 08:09:10+00', '5874897-12-31', '178000000 years', 5e-324, '2024-02-29 23:59:59.9995+00'),
               (7, 9, 9, false, '2024-02-29 12:34:56.5', '1900-01-01 00:00:00+00', '1900-01-01', '1 mon', 1.5, now()),
               (8, 10, 10, true, '1999-12-31 23:59:59.999999', '2024-02-29 12:34:56.5+05:30', '1999-12-31', '-1 mon', 2.5, now());
             UPDATE typed SET tstz = tstz + interval '1 microsecond', b = NOT b WHERE id IN (1, 2, 7, 8);
             UPDATE typed SET i4 = i4 - 1, ts = '1582-10-15 00:00:00' WHERE id = 7;
             DELETE FROM typed WHERE id = 8;",
        )
        .await
        .unwrap();
    let report = replay_all(&source, &target, dir.path(), 500).await;
    assert_eq!(report.changes, 14, "{report:?}");
    let dump = |c: &Cluster| {
        let c = c.conn_string("postgres");
        async move {
            let (client, conn) = tokio_postgres::connect(&c, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client
                .batch_execute(
                    "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET extra_float_digits = 3",
                )
                .await
                .unwrap();
            client
                .query_one(
                    "SELECT string_agg(t::text, E'\\n' ORDER BY id) FROM typed t",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    let (s, t) = (dump(&source).await, dump(&target).await);
    assert_eq!(s, t);
    assert!(s.contains("0044-03-15 12:00:00+00 BC"), "{s}");
}
