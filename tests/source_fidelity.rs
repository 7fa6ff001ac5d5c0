//! What the source holds reaches the copy exactly, or capture/clone refuse loudly: row counts
//! checked per table, tables without columns, partitioned tables, large objects, unlogged
//! tables, and preflight refusals made before anything is created on the source.

mod common;

use std::time::Duration;

use common::digest::assert_same;
use common::pair::{self, conn};
use walshift::apply::replay::ReplayConfig;
use walshift::capture::{self, CaptureConfig, CaptureError, CaptureReport};
use walshift::clone::{self, CloneError, CloneOptions, CloneStatus};
use walshift::localpg::Cluster;
use walshift::source::preflight::{PreflightError, TableRef};
use walshift::source::replication::{ReplicationConnection, SlotOptions, SnapshotAction};

async fn count(c: &Cluster, sql: &str) -> i64 {
    c.connect("postgres")
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

/// Captures what the source committed since, then replays the whole buffer into the target.
async fn sync(source: &Cluster, target: &Cluster, dir: &std::path::Path) {
    common::capture::until_now(source, dir).await;
    pair::replay(ReplayConfig::new(dir, conn(target)))
        .await
        .expect("replay");
}

/// Runs `sql` on the source, then [`sync`].
async fn sync_change(source: &Cluster, target: &Cluster, dir: &std::path::Path, sql: &str) {
    source.execute("postgres", sql).await.unwrap();
    sync(source, target, dir).await;
}

/// A slot with an exported snapshot (kept valid while the returned connection is idle).
async fn slot(source: &Cluster) -> (ReplicationConnection, String) {
    let mut repl = ReplicationConnection::connect(&conn(source)).await.unwrap();
    let slot = repl
        .create_logical_slot(
            "fidelity",
            SlotOptions {
                temporary: true,
                snapshot: SnapshotAction::Export,
            },
        )
        .await
        .unwrap();
    (repl, slot.snapshot_name.expect("exported snapshot"))
}

fn table(name: &str) -> TableRef {
    TableRef {
        oid: 0,
        schema: "public".into(),
        name: name.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_fails_naming_the_table_when_the_target_stores_fewer_rows_than_the_source_sent() {
    let (source, target) = pair::clusters();
    source
        .execute(
            "postgres",
            "CREATE TABLE t (k int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 30) g;",
        )
        .await
        .unwrap();
    // On the target, the table already exists with a trigger that fires even under
    // session_replication_role = replica and silently drops every third row.
    target
        .execute(
            "postgres",
            "CREATE TABLE t (k int PRIMARY KEY, v text);
             CREATE FUNCTION drop_some() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN IF NEW.k % 3 = 0 THEN RETURN NULL; END IF; RETURN NEW; END $$;
             CREATE TRIGGER drop_some BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION drop_some();
             ALTER TABLE t ENABLE ALWAYS TRIGGER drop_some;",
        )
        .await
        .unwrap();
    let (repl, snapshot) = slot(&source).await;
    let mut opts = CloneOptions::new(conn(&source), conn(&target));
    opts.force = true;
    let err = clone::clone_database(&opts, &snapshot, &[table("t")])
        .await
        .unwrap_err();
    match &err {
        CloneError::RowCountMismatch {
            table,
            source_rows,
            target_rows,
        } => {
            assert_eq!(table, "public.t");
            assert_eq!((*source_rows, *target_rows), (30, 20));
        }
        other => panic!("expected RowCountMismatch, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("public.t") && msg.contains("30") && msg.contains("20"),
        "{msg}"
    );
    assert!(msg.contains("trigger"), "says what to look for: {msg}");
    let state = clone::clone_state(&opts.target).await.unwrap().unwrap();
    assert_eq!(state.status, CloneStatus::Copying, "never marked done");
    drop(repl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_columns_keeps_its_rows_through_clone() {
    let (source, target) = pair::clusters();
    source
        .execute(
            "postgres",
            "CREATE TABLE nocols ();
             ALTER TABLE nocols REPLICA IDENTITY FULL;
             INSERT INTO nocols DEFAULT VALUES; INSERT INTO nocols DEFAULT VALUES;
             INSERT INTO nocols DEFAULT VALUES;
             CREATE TABLE allgen (g int GENERATED ALWAYS AS (7) STORED);
             ALTER TABLE allgen REPLICA IDENTITY FULL;
             INSERT INTO allgen DEFAULT VALUES; INSERT INTO allgen DEFAULT VALUES;",
        )
        .await
        .unwrap();
    let (repl, snapshot) = slot(&source).await;
    let opts = CloneOptions::new(conn(&source), conn(&target));
    let report = clone::clone_database(&opts, &snapshot, &[table("nocols"), table("allgen")])
        .await
        .unwrap();
    assert_eq!(
        report.tables,
        vec![
            ("public.nocols".to_string(), 3),
            ("public.allgen".to_string(), 2)
        ]
    );
    assert_eq!(count(&target, "SELECT count(*) FROM nocols").await, 3);
    assert_eq!(
        count(&target, "SELECT count(*) FROM allgen WHERE g = 7").await,
        2
    );
    drop(repl);
}

const PARTITIONED: &str = "
    CREATE TABLE m (k int, region text, v text, PRIMARY KEY (k, region)) PARTITION BY LIST (region);
    CREATE TABLE m_eu PARTITION OF m FOR VALUES IN ('eu');
    CREATE TABLE m_us PARTITION OF m FOR VALUES IN ('us') PARTITION BY RANGE (k);
    CREATE TABLE m_us_lo PARTITION OF m_us FOR VALUES FROM (MINVALUE) TO (1000);
    CREATE TABLE m_us_hi PARTITION OF m_us FOR VALUES FROM (1000) TO (MAXVALUE);
    INSERT INTO m SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 'v' || g
      FROM generate_series(1, 2000) g;";

const PARTITION_TABLES: &[&str] = &["m", "m_eu", "m_us", "m_us_lo", "m_us_hi"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_in_leaf_mode_clone_once_and_replay_inserts_moves_and_truncates() {
    let (source, target) = pair::clusters();
    source.execute("postgres", PARTITIONED).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report = common::capture::with_clone(&source, &target, dir.path())
        .await
        .expect("capture with clone");
    // The publication carries the leaves, each copied once.
    assert_eq!(
        report.tables,
        vec![
            "\"public\".\"m_eu\"".to_string(),
            "\"public\".\"m_us_hi\"".to_string(),
            "\"public\".\"m_us_lo\"".to_string()
        ]
    );
    let state = clone::clone_state(&conn(&target)).await.unwrap().unwrap();
    assert_eq!(state.rows, Some(2000));
    assert_same(&source, &target, PARTITION_TABLES).await;

    sync_change(
        &source,
        &target,
        dir.path(),
        "INSERT INTO m VALUES (5001, 'eu', 'new'), (5003, 'us', 'new'), (4, 'us', 'lo');
             UPDATE m SET region = 'eu' WHERE k = 1;              -- us_lo -> eu
             UPDATE m SET k = k + 6000 WHERE k = 3;               -- us_lo -> us_hi
             UPDATE m SET v = 'changed' WHERE k BETWEEN 10 AND 20;
             DELETE FROM m WHERE k BETWEEN 100 AND 110;",
    )
    .await;
    assert_same(&source, &target, PARTITION_TABLES).await;

    sync_change(
        &source,
        &target,
        dir.path(),
        "TRUNCATE m_us_lo; INSERT INTO m VALUES (9, 'us', 'after truncate');",
    )
    .await;
    assert_eq!(count(&target, "SELECT count(*) FROM m_us_lo").await, 1);
    assert_same(&source, &target, PARTITION_TABLES).await;

    sync_change(
        &source,
        &target,
        dir.path(),
        "TRUNCATE m; INSERT INTO m VALUES (1, 'eu', 'only'), (2, 'us', 'rows');",
    )
    .await;
    assert_eq!(count(&target, "SELECT count(*) FROM m").await, 2);
    assert_same(&source, &target, PARTITION_TABLES).await;
}

async fn publications_and_slots(c: &Cluster) -> (i64, i64) {
    (
        count(c, "SELECT count(*) FROM pg_publication").await,
        count(c, "SELECT count(*) FROM pg_replication_slots").await,
    )
}

/// Capture (no end LSN, partition checks every 200 ms) until it stops by itself or `secs` pass.
async fn capture_for(
    source: &Cluster,
    dir: &std::path::Path,
    accept: &[&str],
    secs: u64,
) -> Result<CaptureReport, CaptureError> {
    let mut cfg = CaptureConfig::new(conn(source), dir);
    cfg.partition_check_interval = Duration::from_millis(200);
    cfg.status_interval = Duration::from_millis(500);
    cfg.accept_partition_rewrite = accept.iter().map(|s| s.to_string()).collect();
    tokio::time::timeout(
        Duration::from_secs(60),
        capture::run(cfg, tokio::time::sleep(Duration::from_secs(secs))),
    )
    .await
    .expect("capture stopped in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn via_root_publications_replay_through_the_root_and_a_truncated_partition_stops_capture_and_cutover()
 {
    let (source, target) = pair::clusters();
    source.execute("postgres", PARTITIONED).await.unwrap();
    source
        .execute(
            "postgres",
            "CREATE PUBLICATION walshift FOR ALL TABLES WITH (publish_via_partition_root = true);",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report = common::capture::with_clone(&source, &target, dir.path())
        .await
        .expect("capture with clone");
    // The publication carries the root, copied once through it.
    assert_eq!(report.tables, vec!["\"public\".\"m\"".to_string()]);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("publish_via_partition_root") && w.contains("public.m")),
        "{:?}",
        report.warnings
    );
    assert_same(&source, &target, PARTITION_TABLES).await;

    sync_change(
        &source,
        &target,
        dir.path(),
        "INSERT INTO m VALUES (5001, 'eu', 'new'), (5003, 'us', 'new');
             INSERT INTO m_us_lo VALUES (4, 'us', 'through the leaf');
             UPDATE m SET region = 'eu' WHERE k = 1;              -- us_lo -> eu
             UPDATE m SET k = k + 6000 WHERE k = 3;               -- us_lo -> us_hi
             UPDATE m_eu SET v = 'changed' WHERE k BETWEEN 10 AND 20;
             DELETE FROM m WHERE k BETWEEN 100 AND 110;",
    )
    .await;
    assert_same(&source, &target, PARTITION_TABLES).await;

    // A TRUNCATE of the root is in the stream: it rewrites every leaf, and capture accepts it.
    sync_change(
        &source,
        &target,
        dir.path(),
        "TRUNCATE m; INSERT INTO m VALUES (1, 'eu', 'only'), (2, 'us', 'rows');",
    )
    .await;
    // DDL after it replaces the partitions' pg_class xmin (the TRUNCATE's transaction):
    // capture must have accepted the rewrite when it received the TRUNCATE.
    for c in [&source, &target] {
        c.execute("postgres", "ALTER TABLE m ADD COLUMN note text;")
            .await
            .unwrap();
    }
    capture_for(&source, dir.path(), &[], 6)
        .await
        .expect("a root TRUNCATE does not stop capture");
    assert_eq!(count(&target, "SELECT count(*) FROM m").await, 2);
    assert_same(&source, &target, PARTITION_TABLES).await;

    // A TRUNCATE of one partition is not: capture stops naming it.
    source
        .execute(
            "postgres",
            "INSERT INTO m VALUES (7, 'us', 'x'), (8, 'eu', 'y'); TRUNCATE m_us_lo;",
        )
        .await
        .unwrap();
    let err = capture_for(&source, dir.path(), &[], 30).await.unwrap_err();
    assert!(matches!(err, CaptureError::PartitionChanged(_)), "{err}");
    let msg = err.to_string();
    for needle in [
        "public.m_us_lo",
        "TRUNCATE",
        "walshift verify --tables public.m",
        "--accept-partition-rewrite public.m_us_lo",
    ] {
        assert!(msg.contains(needle), "{needle:?} in {msg}");
    }

    // Cutover refuses before fencing anything.
    let mut cfg = walshift::cutover::CutoverConfig::new(conn(&source), conn(&target), dir.path());
    cfg.dry_run = true;
    let err = walshift::cutover::run(cfg, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("public.m_us_lo"),
        "cutover refuses naming the partition: {err}"
    );

    // The operator makes the copy match, then accepts the partition's new state.
    pair::replay(ReplayConfig::new(dir.path(), conn(&target)))
        .await
        .expect("replay");
    target
        .execute("postgres", "TRUNCATE m_us_lo")
        .await
        .unwrap();
    capture_for(&source, dir.path(), &["public.m_us_lo"], 6)
        .await
        .expect("capture after the partition was accepted");
    sync(&source, &target, dir.path()).await;
    assert_same(&source, &target, PARTITION_TABLES).await;

    // A partition attached later (repeated on the copy) is recorded and reported.
    for c in [&source, &target] {
        c.execute(
            "postgres",
            "CREATE TABLE m_apac PARTITION OF m FOR VALUES IN ('apac');",
        )
        .await
        .unwrap();
    }
    source
        .execute(
            "postgres",
            "INSERT INTO m VALUES (9000, 'apac', 'new region');",
        )
        .await
        .unwrap();
    capture_for(&source, dir.path(), &[], 6)
        .await
        .expect("a new partition does not stop capture");
    let record = walshift::capture::partitions::PartitionRecord::read(dir.path())
        .unwrap()
        .unwrap();
    assert!(
        record
            .leaves
            .iter()
            .any(|l| l.name == "public.m_apac" && l.attached_later),
        "{record:?}"
    );
    let mut cfg = walshift::cutover::CutoverConfig::new(conn(&source), conn(&target), dir.path());
    cfg.dry_run = true;
    let report = walshift::cutover::run(cfg, std::future::pending())
        .await
        .expect("dry run");
    assert!(
        report.warnings.iter().any(|w| w.contains("public.m_apac")),
        "{:?}",
        report.warnings
    );
    let tables = ["m", "m_eu", "m_us_lo", "m_us_hi", "m_apac"];
    assert_same(&source, &target, &tables).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_refuses_every_unfaithful_table_at_once_and_creates_nothing() {
    let source = common::cluster();
    source
        .execute(
            "postgres",
            "CREATE TABLE fine (k int PRIMARY KEY);
             CREATE TABLE nothing_ri (k int PRIMARY KEY);
             ALTER TABLE nothing_ri REPLICA IDENTITY NOTHING;
             CREATE TABLE keyless (v text);
             -- A deferrable primary key is no replica identity: publishing it would make the
             -- live site's UPDATEs fail.
             CREATE TABLE deferred_pk (k int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED);
             -- FULL on the partitioned table does not reach its partitions, which are what
             -- pgoutput publishes: their UPDATEs would fail on the live site.
             CREATE TABLE parted (k int, v text) PARTITION BY RANGE (k);
             CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (10);
             ALTER TABLE parted REPLICA IDENTITY FULL;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = CaptureConfig::new(conn(&source), dir.path());
    cfg.until_lsn = Some(common::capture::current_lsn(&source).await);
    let err = capture::run(cfg, std::future::pending::<()>())
        .await
        .unwrap_err();
    let CaptureError::Preflight(PreflightError::Refused { refusals }) = &err else {
        panic!("expected a refusal, got {err}");
    };
    let objects: Vec<&str> = refusals.iter().map(|r| r.object.as_str()).collect();
    assert_eq!(
        objects,
        vec![
            "table \"public\".\"deferred_pk\"",
            "table \"public\".\"keyless\"",
            "table \"public\".\"nothing_ri\"",
            "table \"public\".\"parted_1\""
        ],
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("REPLICA IDENTITY NOTHING")
            && msg.contains("ALTER TABLE \"public\".\"nothing_ri\" REPLICA IDENTITY DEFAULT"),
        "{msg}"
    );
    assert!(msg.contains("a partition"), "{msg}");
    assert!(msg.contains("primary key is DEFERRABLE"), "{msg}");
    assert!(
        msg.contains("ALTER TABLE \"public\".\"keyless\" REPLICA IDENTITY FULL"),
        "{msg}"
    );
    assert_eq!(publications_and_slots(&source).await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_publication_that_publishes_only_part_of_the_changes_is_refused() {
    let source = common::cluster();
    source
        .execute(
            "postgres",
            "CREATE TABLE a (k int PRIMARY KEY, v text);
             CREATE TABLE b (k int PRIMARY KEY, v text, secret text);
             CREATE PUBLICATION walshift FOR TABLE a WHERE (k > 10), b (k, v)
               WITH (publish = 'insert, update');",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = CaptureConfig::new(conn(&source), dir.path());
    cfg.until_lsn = Some(common::capture::current_lsn(&source).await);
    let err = capture::run(cfg, std::future::pending::<()>())
        .await
        .unwrap_err();
    let msg = err.to_string();
    for needle in [
        "does not publish delete, truncate",
        "SET (publish = 'insert, update, delete, truncate')",
        "table \"public\".\"a\": publication \"walshift\" publishes it with a row filter",
        "table \"public\".\"b\": publication \"walshift\" publishes it with a column list",
    ] {
        assert!(msg.contains(needle), "{needle:?} in {msg}");
    }
    assert_eq!(publications_and_slots(&source).await, (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_and_unlogged_tables_are_cloned_warned_about_and_changes_detected() {
    let (source, target) = pair::clusters();
    source
        .execute(
            "postgres",
            "CREATE TABLE docs (id int PRIMARY KEY, body oid);
             INSERT INTO docs VALUES (1, lo_from_bytea(0, 'hello large object')),
               (2, lo_from_bytea(0, decode(repeat('ab', 1500000), 'hex'))),
               (3, lo_from_bytea(0, ''));
             CREATE UNLOGGED TABLE cache (k int PRIMARY KEY, v text);
             INSERT INTO cache SELECT g, 'c' || g FROM generate_series(1, 50) g;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report = common::capture::with_clone(&source, &target, dir.path())
        .await
        .expect("capture with clone");
    let warnings = report.warnings.join("\n");
    assert!(
        warnings.contains("3 large object(s)") && warnings.contains("NOT replicated"),
        "{warnings}"
    );
    assert!(
        warnings.contains("UNLOGGED") && warnings.contains("public.cache"),
        "{warnings}"
    );
    assert!(!report.tables.iter().any(|t| t.contains("cache")));

    // Same OIDs, same bytes; the unlogged table's rows as of the snapshot.
    let lo = "SELECT d.id, d.body, md5(lo_get(d.body)) FROM docs d ORDER BY d.id";
    let rows = |c: Vec<tokio_postgres::Row>| -> Vec<(i32, u32, String)> {
        c.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
    };
    let s = source.connect("postgres").await.unwrap();
    let t = target.connect("postgres").await.unwrap();
    assert_eq!(
        rows(t.query(lo, &[]).await.unwrap()),
        rows(s.query(lo, &[]).await.unwrap())
    );
    assert_same(&source, &target, &["cache"]).await;
    assert_eq!(
        count(
            &target,
            "SELECT count(*) FROM pg_class WHERE relname = 'cache' AND relpersistence = 'u'"
        )
        .await,
        1
    );

    let state = clone::clone_state(&conn(&target)).await.unwrap().unwrap();
    let recorded = state.large_objects.expect("fingerprint recorded");
    assert_eq!(recorded.count, 3);
    assert!(
        recorded.data_md5.is_some(),
        "a superuser reads pg_largeobject"
    );
    let check = clone::check_large_objects(&conn(&source), &conn(&target))
        .await
        .unwrap();
    assert!(check.unchanged(), "{check:?}");

    // A change to a large object's content during the release is detected.
    s.batch_execute("SELECT lo_put(body, 0, 'J') FROM docs WHERE id = 1")
        .await
        .unwrap();
    let check = clone::check_large_objects(&conn(&source), &conn(&target))
        .await
        .unwrap();
    assert!(!check.unchanged(), "{check:?}");
    assert_eq!(check.now.count, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_created_on_the_source_after_the_clone_stops_replay_saying_what_to_do() {
    let (source, target) = pair::clusters();
    source
        .execute(
            "postgres",
            "CREATE TABLE early (k int PRIMARY KEY); INSERT INTO early VALUES (1);",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    common::capture::with_clone(&source, &target, dir.path())
        .await
        .expect("capture with clone");
    // FOR ALL TABLES publishes a new table at once: its rows are in the stream.
    let late = "CREATE TABLE late (k int PRIMARY KEY, v text);";
    source
        .execute(
            "postgres",
            &format!(
                "{late} INSERT INTO late VALUES (1, 'a'), (2, 'b'); INSERT INTO early VALUES (2);"
            ),
        )
        .await
        .unwrap();
    common::capture::until_now(&source, dir.path()).await;
    let err = pair::replay(ReplayConfig::new(dir.path(), conn(&target)))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"public\".\"late\"") || err.contains("public.late"),
        "names the table: {err}"
    );
    assert!(
        err.contains("created on the source after the clone")
            && err.contains("pg_dump --schema-only"),
        "says what to do: {err}"
    );
    // Doing what it says makes the copy whole.
    target.execute("postgres", late).await.unwrap();
    pair::replay(ReplayConfig::new(dir.path(), conn(&target)))
        .await
        .expect("replay after creating the table on the copy");
    assert_same(&source, &target, &["early", "late"]).await;
}

/// Every reg* column of `refs`, as text (names, resolved in each cluster's own catalog).
const REFS_AS_TEXT: &str = "SELECT k, c::text, t::text, p::text, n::text, o::text, cs::text, \
    d::text, moods::text, pr::text FROM refs ORDER BY k";

async fn refs_as_text(c: &Cluster) -> Vec<Vec<Option<String>>> {
    let client = c.connect("postgres").await.unwrap();
    client
        .query(REFS_AS_TEXT, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let mut v = vec![Some(r.get::<_, i32>(0).to_string())];
            v.extend((1..r.len()).map(|i| r.get::<_, Option<String>>(i)));
            v
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reg_columns_arrays_and_domains_of_them_point_at_the_same_objects_on_the_copy() {
    let (source, target) = pair::clusters();
    source
        .execute(
            "postgres",
            // Objects created and dropped first: the source's OIDs run ahead of the copy's.
            "DO $$ BEGIN FOR i IN 1..40 LOOP
               EXECUTE format('CREATE TABLE pad%s (a int)', i);
               EXECUTE format('DROP TABLE pad%s', i);
             END LOOP; END $$;
             CREATE SCHEMA app;
             CREATE TYPE app.mood AS ENUM ('ok', 'meh');
             CREATE TABLE app.pointed (k int PRIMARY KEY);
             CREATE TABLE app.other (k int PRIMARY KEY);
             CREATE FUNCTION app.fn(int) RETURNS int LANGUAGE sql AS 'SELECT 1';
             CREATE DOMAIN app.relname AS regclass;
             CREATE TYPE app.pair AS (m app.mood, r regclass);
             CREATE TABLE refs (k int PRIMARY KEY, c regclass, t regtype, p regprocedure,
               n regnamespace, o regoperator, cs regclass[], d app.relname, moods app.mood[],
               pr app.pair);
             INSERT INTO refs VALUES
               (1, 'app.pointed', 'app.mood', 'app.fn(int)', 'app', '+(int4,int4)',
                ARRAY['app.pointed'::regclass, 'app.other'], 'app.other', '{ok,meh}',
                ROW('meh', 'app.pointed')),
               (2, 'pg_class', 'int4', 'now()', 'public', NULL, '{}', NULL, NULL, NULL);
             CREATE TABLE plain (k int PRIMARY KEY, moods app.mood[], p app.pair);
             INSERT INTO plain VALUES (1, '{ok}', ROW('ok', NULL));
             -- No binary I/O at all: text format or no copy.
             CREATE TABLE acls (k int PRIMARY KEY, a aclitem[]);
             INSERT INTO acls VALUES (1, '{postgres=arw/postgres}');",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    common::capture::with_clone(&source, &target, dir.path())
        .await
        .expect("capture with clone");
    let state = clone::clone_state(&conn(&target)).await.unwrap().unwrap();
    assert_eq!(state.rows, Some(4));
    assert_same(&source, &target, &["plain", "acls"]).await;
    let target_oid = count(&target, "SELECT 'app.pointed'::regclass::oid::int8").await;
    assert_ne!(
        target_oid,
        count(&source, "SELECT 'app.pointed'::regclass::oid::int8").await,
        "the test needs the copy's OIDs to differ from the source's"
    );
    assert_eq!(refs_as_text(&target).await, refs_as_text(&source).await);
    assert_eq!(
        count(&target, "SELECT c::oid::int8 FROM refs WHERE k = 1").await,
        target_oid
    );

    sync_change(
        &source,
        &target,
        dir.path(),
        "UPDATE refs SET c = 'app.other', cs = cs || 'app.pointed'::regclass WHERE k = 1;
             INSERT INTO refs VALUES (3, 'app.other', 'app.relname', 'app.fn(int)', 'app',
               '-(int8,int8)', ARRAY['app.other'::regclass], 'app.pointed', '{meh}',
               ROW('ok', 'app.other'));",
    )
    .await;
    assert_eq!(refs_as_text(&target).await, refs_as_text(&source).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materialized_views_populated_on_the_source_are_refreshed_in_dependency_order() {
    let (source, target) = pair::clusters();
    source
        .execute(
            "postgres",
            // a_top reads z_base through a view: refreshed in name order it would fail on the
            // copy.
            "CREATE TABLE sales (k int PRIMARY KEY, amount int);
             INSERT INTO sales SELECT g, g % 7 FROM generate_series(1, 100) g;
             CREATE MATERIALIZED VIEW z_base AS SELECT amount, count(*) AS n FROM sales GROUP BY 1;
             CREATE UNIQUE INDEX ON z_base (amount);
             CREATE VIEW m_mid AS SELECT * FROM z_base;
             CREATE MATERIALIZED VIEW a_top AS SELECT sum(n) AS total FROM m_mid;
             CREATE MATERIALIZED VIEW never AS SELECT * FROM sales WITH NO DATA;",
        )
        .await
        .unwrap();
    let (repl, snapshot) = slot(&source).await;
    let opts = CloneOptions::new(conn(&source), conn(&target));
    let report = clone::clone_database(&opts, &snapshot, &[table("sales")])
        .await
        .unwrap();
    drop(repl);
    assert_eq!(
        report.materialized_views,
        vec!["public.z_base".to_string(), "public.a_top".to_string()]
    );
    assert_same(&source, &target, &["z_base", "a_top"]).await;
    assert_eq!(count(&target, "SELECT total::int8 FROM a_top").await, 100);
    assert_eq!(
        count(
            &target,
            "SELECT count(*) FROM pg_class WHERE relname = 'never' AND NOT relispopulated"
        )
        .await,
        1,
        "a view unpopulated on the source stays unpopulated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_record_left_by_an_abandoned_stream_is_replaced_when_a_new_slot_starts() {
    let (source, target) = pair::clusters();
    source.execute("postgres", PARTITIONED).await.unwrap();
    source
        .execute(
            "postgres",
            "CREATE PUBLICATION walshift FOR ALL TABLES WITH (publish_via_partition_root = true);",
        )
        .await
        .unwrap();
    let oid = |name: &'static str| {
        let source = &source;
        async move { count(source, &format!("SELECT '{name}'::regclass::oid::int8")).await as u32 }
    };
    // What an earlier stream (e.g. an interrupted clone) recorded: another relfilenode.
    let dir = tempfile::tempdir().unwrap();
    let stale = walshift::capture::partitions::PartitionRecord {
        roots: vec![walshift::capture::partitions::Root {
            oid: oid("m").await,
            name: "public.m".into(),
        }],
        leaves: vec![walshift::capture::partitions::Leaf {
            oid: oid("m_eu").await,
            name: "public.m_eu".into(),
            root: oid("m").await,
            relfilenode: 1,
            attached_later: false,
        }],
        truncates: Default::default(),
    };
    stale.write(dir.path()).unwrap();
    common::capture::with_clone(&source, &target, dir.path())
        .await
        .expect("capture with clone");
    source
        .execute("postgres", "INSERT INTO m VALUES (9001, 'eu', 'x');")
        .await
        .unwrap();
    capture_for(&source, dir.path(), &[], 6)
        .await
        .expect("the new slot's record is the one compared");
    let record = walshift::capture::partitions::PartitionRecord::read(dir.path())
        .unwrap()
        .unwrap();
    assert_eq!(record.leaves.len(), 3, "{record:?}");
    assert!(record.leaves.iter().all(|l| l.relfilenode != 1));
}
