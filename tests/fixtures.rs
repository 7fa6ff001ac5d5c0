//! Fixtures and rehearsal: every shipped fixture (`fixtures/<case>/`) rehearses to its
//! expectation, twice with the same result; a damaged fixture is reported as corruption; a
//! fixture recorded from a throwaway source rehearses to that source's final state.
//!
//! `fixtures/make.sh` regenerates the shipped fixtures with the ignored test
//! `regenerate_shipped_fixtures` below.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use walshift::conn::ConnInfo;
use walshift::localpg::{Cluster, ClusterOptions};
use walshift::rehearse::record::{ExpectMode, RecordOptions};
use walshift::rehearse::{
    self, ExpectFrom, Fixture, RehearseError, RehearseOptions, RehearseReport, Scratch,
};

const SHIPPED: [&str; 3] = ["shop-release", "pgbench", "toast-bigtxn"];

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn start_cluster() -> Cluster {
    Cluster::start(ClusterOptions::default().setting("fsync", "off")).expect("cluster starts")
}

async fn rehearse_into(
    cluster: &Cluster,
    db: &str,
    fixture: &Fixture,
    opts: &RehearseOptions,
) -> Result<RehearseReport, RehearseError> {
    cluster.create_database(db).await.unwrap();
    let scratch = Scratch::given(ConnInfo::parse(&cluster.conn_string(db)).unwrap());
    rehearse::rehearse(fixture, &scratch, opts).await
}

fn final_state(r: &RehearseReport) -> Vec<(String, String, i64, String)> {
    r.tables
        .iter()
        .map(|t| {
            (
                t.source.clone(),
                t.target.clone(),
                t.rows,
                t.checksum.clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_fixtures_rehearse_to_their_expectation_twice() {
    let cluster = start_cluster();
    for name in SHIPPED {
        let fixture = Fixture::open(shipped(name)).expect("shipped fixture opens");
        let expect = fixture.expect().unwrap().expect("shipped with expect.json");
        assert_eq!(
            expect.expect_from,
            ExpectFrom::Source,
            "{name}: shipped fixtures carry an expectation computed on the source"
        );
        let opts = RehearseOptions {
            window_of: Duration::from_secs(3),
            ..RehearseOptions::default()
        };
        let first = rehearse_into(&cluster, &format!("{name}_1"), &fixture, &opts)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for t in &first.tables {
            assert!(t.equal, "{name}: {t:?}");
        }
        assert!(first.equal());
        assert_eq!(first.tables.len(), expect.tables.len(), "{name}");
        assert_eq!(
            first.replay.changes, fixture.manifest.buffer.changes,
            "{name}: every captured change replayed"
        );
        assert!(first.replay.changes > 0 && first.window.tail_transactions > 0);
        assert!(
            !first.window.split_lsn.is_zero(),
            "{name}: spans more than the 3 s window, so replay is split before the tail"
        );
        let second = rehearse_into(&cluster, &format!("{name}_2"), &fixture, &opts)
            .await
            .unwrap();
        assert_eq!(
            final_state(&first),
            final_state(&second),
            "{name}: deterministic"
        );
        eprintln!(
            "{name}: {} changes, {:.0} changes/s, drain of the last {} s ({} txns): {:.3} s",
            first.replay.changes,
            first.replay.changes_per_sec,
            first.window.of_secs,
            first.window.tail_transactions,
            first.window.drain_secs
        );
    }
}

/// Copies a fixture directory (one level plus `buffer/`).
fn copy_fixture(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("buffer")).unwrap();
    for dir in [PathBuf::new(), PathBuf::from("buffer")] {
        for e in std::fs::read_dir(from.join(&dir)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), to.join(&dir).join(e.file_name())).unwrap();
            }
        }
    }
}

/// The segment files of a fixture's buffer.
fn segments(dir: &Path) -> Vec<PathBuf> {
    common::capture::segments(&dir.join("buffer"))
}

fn flip(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn a_corrupted_fixture_is_reported_as_corruption() {
    let src = shipped("shop-release");
    // Nothing is written to the target before the buffer is checked: a target that does not
    // exist proves it.
    let nowhere = Scratch::given(
        ConnInfo::parse("host=127.0.0.1 port=1 user=nobody dbname=nothing").unwrap(),
    );
    let opts = RehearseOptions::default();

    // A byte in the middle of the first segment: the record's CRC fails, the reader names
    // the segment and the offset.
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture(&src, tmp.path());
    let segs = segments(tmp.path());
    assert!(
        segs.len() >= 2,
        "the fixture spans several segments: {segs:?}"
    );
    let len = std::fs::metadata(&segs[0]).unwrap().len();
    flip(&segs[0], len / 2);
    let fixture = Fixture::open(tmp.path()).unwrap();
    let err = rehearse::rehearse(&fixture, &nowhere, &opts)
        .await
        .expect_err("a damaged buffer is not rehearsed");
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            RehearseError::Buffer(_) | RehearseError::Corrupt { .. }
        ),
        "{err:?}"
    );
    assert!(msg.contains("corrupt"), "{msg}");
    assert!(msg.contains("0000000000000001.wseg"), "{msg}");

    // The last byte of the last segment: to the buffer reader that looks like a torn write (a
    // crash mid-append), which it would skip; the fixture's manifest does not let it pass.
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture(&src, tmp.path());
    let last = segments(tmp.path()).pop().unwrap();
    let len = std::fs::metadata(&last).unwrap().len();
    flip(&last, len - 1);
    let fixture = Fixture::open(tmp.path()).unwrap();
    let err = rehearse::rehearse(&fixture, &nowhere, &opts)
        .await
        .expect_err("a damaged tail is not skipped");
    assert!(matches!(err, RehearseError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("corrupt"), "{err}");

    // A byte of the header area of a later segment.
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture(&src, tmp.path());
    let segs = segments(tmp.path());
    flip(&segs[1], 20);
    let fixture = Fixture::open(tmp.path()).unwrap();
    let err = rehearse::rehearse(&fixture, &nowhere, &opts)
        .await
        .expect_err("a damaged header is not skipped");
    assert!(err.to_string().contains("corrupt"), "{err}");
}

const RT_SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL, note text);
INSERT INTO items SELECT g, 'item ' || g, g * 1.5, CASE WHEN g % 3 = 0 THEN 'note ' || g END
  FROM generate_series(1, 500) g;
";
const RT_MIGRATION: &str = "
ALTER TABLE items RENAME TO products;
ALTER TABLE products RENAME COLUMN name TO title;
ALTER TABLE products ADD COLUMN price_cents bigint;
UPDATE products SET price_cents = (price * 100)::bigint;
CREATE TABLE product_notes (product_id int PRIMARY KEY, note text NOT NULL);
INSERT INTO product_notes SELECT id, note FROM products WHERE note IS NOT NULL;
ALTER TABLE products DROP COLUMN note;
";
const RT_MAPPING: &str = r#"
[[table]]
source = "items"
target = "products"
[table.columns]
title = "name"
price_cents = "(price * 100)::bigint"

[[table]]
source = "items"
target = "product_notes"
filter = "note IS NOT NULL"
[table.columns]
product_id = "id"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_then_rehearse_round_trip() {
    let source = start_cluster();
    source.execute("postgres", RT_SCHEMA).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (migration, mapping) = (tmp.path().join("001.sql"), tmp.path().join("m.toml"));
    std::fs::write(&migration, RT_MIGRATION).unwrap();
    std::fs::write(&mapping, RT_MAPPING).unwrap();
    let out = tmp.path().join("rt");
    let mut opts = RecordOptions::new(
        ConnInfo::parse(&source.conn_string("postgres")).unwrap(),
        &out,
    );
    opts.description = "round trip".into();
    opts.mapping = Some(mapping);
    opts.migration = vec![migration];
    opts.expect = ExpectMode::Source;
    let client = source.connect("postgres").await.unwrap();
    // The traffic is the stop future: it runs once the snapshot is dumped and streaming runs.
    let traffic = async {
        for i in 1..=40 {
            client
                .batch_execute(&format!(
                    "BEGIN;
                     UPDATE items SET price = price + 1, note = CASE WHEN {i} % 2 = 0 THEN NULL ELSE 'n{i}' END WHERE id = {i};
                     INSERT INTO items VALUES (1000 + {i}, 'new {i}', {i}, 'fresh');
                     DELETE FROM items WHERE id = 400 + {i};
                     COMMIT;"
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    let report = rehearse::record(&opts, traffic).await.expect("recorded");
    assert_eq!(report.expect_from, ExpectFrom::Source);
    assert_eq!(report.transactions, 40);
    assert_eq!(report.changes, 120);
    let check = report.rehearsal.expect("checked by a rehearsal");
    assert!(check.equal(), "{check:?}");
    assert_eq!(check.tables.len(), 2);

    // Nothing left behind on the source.
    let left: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "slot and publication dropped");

    // The expectation is the source's final state through the mapping; a rehearsal of the
    // recorded fixture matches it.
    let fixture = Fixture::open(&out).unwrap();
    let expect = fixture.expect().unwrap().unwrap();
    let products = expect
        .tables
        .iter()
        .find(|t| t.target == "public.products")
        .unwrap();
    assert_eq!(products.rows, 500);
    let notes = expect
        .tables
        .iter()
        .find(|t| t.target == "public.product_notes")
        .unwrap();
    let want_notes: i64 = client
        .query_one("SELECT count(*) FROM items WHERE note IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(notes.rows, want_notes);

    // Tampering with the expectation makes the rehearsal fail with a per-table difference.
    let mut wrong = expect.clone();
    wrong.tables[0].rows += 1;
    fixture.write_expect(&wrong).unwrap();
    let again = rehearse_into(&source, "again", &fixture, &RehearseOptions::default())
        .await
        .unwrap();
    assert!(!again.equal());
    assert_eq!(again.tables.iter().filter(|t| !t.equal).count(), 1);
}

// ---- regeneration of the shipped fixtures (fixtures/make.sh) ----

async fn record_shipped(opts: RecordOptions, traffic: impl std::future::Future<Output = ()>) {
    let report = rehearse::record(&opts, traffic).await.expect("recorded");
    assert_eq!(
        report.expect_from,
        ExpectFrom::Source,
        "{:?}",
        report.expect_note
    );
    let r = report.rehearsal.expect("checked");
    assert!(r.equal());
    eprintln!(
        "{}: {} txns, {} changes, buffer {} bytes, {:.0} changes/s",
        opts.out.display(),
        report.transactions,
        report.changes,
        report.buffer_bytes,
        r.replay.changes_per_sec
    );
}

fn fresh(name: &str) -> PathBuf {
    let dir = shipped(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    dir
}

fn release_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text.trim_start()).unwrap();
    p
}

const TOAST_SCHEMA: &str = "
CREATE TABLE documents (id int PRIMARY KEY, title text NOT NULL, version int NOT NULL, doc jsonb NOT NULL);
CREATE TABLE events (id bigint PRIMARY KEY, doc_id int NOT NULL, n int NOT NULL);
CREATE FUNCTION big_doc(i int, rev int) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_build_object('id', i, 'rev', rev,
           'parts', (SELECT jsonb_agg(md5(i || '-' || rev || '-' || g)) FROM generate_series(1, 300) g))
$$;
INSERT INTO documents SELECT g, 'doc ' || g, 1, big_doc(g, 0) FROM generate_series(1, 100) g;
";
const TOAST_MIGRATION: &str = "
ALTER TABLE documents RENAME COLUMN doc TO body;
";
const TOAST_MAPPING: &str = r#"
# The document moves to a renamed column. An update that leaves the TOASTed jsonb unchanged
# does not carry it: the target keeps its value.
[[table]]
source = "documents"
[table.columns]
body = "doc"
"#;

/// pgbench -i -s 1 with server-side generation (`-I dtGvp`) produces exactly these rows.
const PGBENCH_GENERATE: &str = "
INSERT INTO pgbench_branches (bid, bbalance) SELECT bid, 0 FROM generate_series(1, 1) AS bid;
INSERT INTO pgbench_tellers (tid, bid, tbalance) SELECT tid, (tid - 1) / 10 + 1, 0 FROM generate_series(1, 10) AS tid;
INSERT INTO pgbench_accounts (aid, bid, abalance, filler) SELECT aid, (aid - 1) / 100000 + 1, 0, '' FROM generate_series(1, 100000) AS aid;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "regenerates fixtures/ (fixtures/make.sh)"]
async fn regenerate_shipped_fixtures() {
    let only = std::env::var("FIXTURE").ok();
    let want = |n: &str| only.as_deref().is_none_or(|o| o == n);
    let work = tempfile::tempdir().unwrap();

    if want("shop-release") {
        use walshift::demo::shop;
        let source = start_cluster();
        source.execute("postgres", shop::SCHEMA).await.unwrap();
        let c = source.connect("postgres").await.unwrap();
        shop::seed(&c, 200, 1000).await.unwrap();
        let mut opts = RecordOptions::new(
            ConnInfo::parse(&source.conn_string("postgres")).unwrap(),
            fresh("shop-release"),
        );
        opts.description = "A small shop (customers, products, orders) taking orders for 12 s at about 50 \
            transactions/s; the release computes customers.full_name, renames orders.amount to amount_eur \
            with a computed amount_cents, and splits the shipping address into shipping_addresses."
            .into();
        opts.exercises = [
            "rename",
            "computed-column",
            "split",
            "filter",
            "delete",
            "foreign-keys",
        ]
        .map(String::from)
        .to_vec();
        opts.migration = vec![release_file(
            work.path(),
            "001_release.sql",
            shop::MIGRATION,
        )];
        opts.mapping = Some(release_file(work.path(), "mapping.toml", shop::MAPPING));
        // Small segments: the fixture spans several (the corruption test damages the first).
        opts.segment_size = 64 << 10;
        let writer_client = source.connect("postgres").await.unwrap();
        record_shipped(opts, async move {
            let w = shop::Writer::start(writer_client, 200, 50);
            tokio::time::sleep(Duration::from_secs(12)).await;
            w.stop().await.unwrap();
        })
        .await;
    }

    if want("pgbench") {
        let source = start_cluster();
        let bench = source.binaries().program("pgbench");
        let port = source.port().to_string();
        let status = std::process::Command::new(&bench)
            .args([
                "-i",
                "-s",
                "1",
                "-I",
                "dtGvp",
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "postgres",
            ])
            .status()
            .unwrap();
        assert!(status.success());
        // pgbench only ever INSERTs into pgbench_history, which has no key: REPLICA IDENTITY
        // FULL costs nothing extra in WAL for inserts and keeps pgbench's own schema (and
        // verify compares the table as a multiset of rows).
        source
            .execute(
                "postgres",
                "ALTER TABLE pgbench_history REPLICA IDENTITY FULL",
            )
            .await
            .unwrap();
        let mut opts = RecordOptions::new(
            ConnInfo::parse(&source.conn_string("postgres")).unwrap(),
            fresh("pgbench"),
        );
        opts.description =
            "pgbench -i -s 1 (rows from generate.sql) and 12 s of the TPC-B-like pgbench \
            script at 100 transactions/s on 2 clients; no migration (the identity release). \
            pgbench_history has no key: REPLICA IDENTITY FULL."
                .into();
        opts.exercises = ["no-migration", "hot-rows", "keyless-table", "generate-sql"]
            .map(String::from)
            .to_vec();
        opts.generate = Some(release_file(work.path(), "generate.sql", PGBENCH_GENERATE));
        record_shipped(opts, async move {
            let status = tokio::process::Command::new(&bench)
                .args([
                    "-n",
                    "-c",
                    "2",
                    "-j",
                    "2",
                    "-T",
                    "12",
                    "-R",
                    "100",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "postgres",
                ])
                .stdout(std::process::Stdio::null())
                .status()
                .await
                .unwrap();
            assert!(status.success());
        })
        .await;
    }

    if want("toast-bigtxn") {
        let source = start_cluster();
        source.execute("postgres", TOAST_SCHEMA).await.unwrap();
        let mut opts = RecordOptions::new(
            ConnInfo::parse(&source.conn_string("postgres")).unwrap(),
            fresh("toast-bigtxn"),
        );
        opts.description = "100 jsonb documents of about 10 kB each (stored out of line): updates that \
            leave the document unchanged (the stream carries no value for it) and updates that change it, \
            inserts and deletes of documents, then one transaction inserting 50,000 events and touching \
            every document; the release renames the document column."
            .into();
        opts.exercises = [
            "toast-unchanged",
            "toast-changed",
            "big-transaction",
            "rename-column",
        ]
        .map(String::from)
        .to_vec();
        opts.migration = vec![release_file(
            work.path(),
            "001_rename_doc.sql",
            TOAST_MIGRATION,
        )];
        opts.mapping = Some(release_file(work.path(), "mapping.toml", TOAST_MAPPING));
        let c = source.connect("postgres").await.unwrap();
        record_shipped(opts, async move {
            let pause = || tokio::time::sleep(Duration::from_millis(100));
            for i in 1..=40 {
                // Unchanged TOAST: title and version only.
                c.batch_execute(&format!(
                    "UPDATE documents SET title = title || '.', version = version + 1 WHERE id = {i}"
                ))
                .await
                .unwrap();
                pause().await;
            }
            for i in 41..=60 {
                // Changed TOAST: a new document value.
                c.batch_execute(&format!(
                    "UPDATE documents SET doc = big_doc(id, {i}), version = version + 1 WHERE id = {i}"
                ))
                .await
                .unwrap();
                pause().await;
            }
            c.batch_execute(
                "INSERT INTO documents SELECT g, 'doc ' || g, 1, big_doc(g, 0) FROM generate_series(101, 110) g;
                 DELETE FROM documents WHERE id BETWEEN 91 AND 95;",
            )
            .await
            .unwrap();
            pause().await;
            // One big transaction.
            c.batch_execute(
                "BEGIN;
                 INSERT INTO events SELECT g, 1 + g % 100, g FROM generate_series(1, 50000) g;
                 UPDATE documents SET version = version + 1;
                 COMMIT;",
            )
            .await
            .unwrap();
            for i in 1..=30 {
                pause().await;
                c.batch_execute(&format!(
                    "UPDATE documents SET version = version + 1 WHERE id = {i};
                     UPDATE documents SET doc = jsonb_set(doc, '{{rev}}', to_jsonb({i})) WHERE id = 60 + {i};
                     DELETE FROM events WHERE id = {i}"
                ))
                .await
                .unwrap();
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_record_then_rehearse() {
    let source = start_cluster();
    source
        .execute(
            "postgres",
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g;",
        )
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cli");
    let exe = common::cli::EXE;
    let mut child = tokio::process::Command::new(exe)
        .args([
            "fixture",
            "record",
            "--no-check",
            "--seconds",
            "3",
            "--source",
        ])
        .arg(source.conn_string("postgres"))
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Write once the slot exists (changes before it are in data.sql, after it in the buffer).
    let c = source.connect("postgres").await.unwrap();
    for _ in 0..100 {
        let n: i64 = c
            .query_one("SELECT count(*) FROM pg_replication_slots", &[])
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.batch_execute("UPDATE t SET v = v || '!' WHERE id <= 10; DELETE FROM t WHERE id > 95; INSERT INTO t VALUES (200, 'x')")
        .await
        .unwrap();
    let status = child.wait().await.unwrap();
    assert!(status.success());
    let fixture = Fixture::open(&out).unwrap();
    assert_eq!(
        fixture.manifest.buffer.transactions, 1,
        "one simple query, one transaction"
    );
    assert_eq!(fixture.manifest.buffer.changes, 16);
    assert_eq!(
        fixture.expect().unwrap().unwrap().expect_from,
        ExpectFrom::Source
    );
    let slots: i64 = c
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);

    source.create_database("cli_target").await.unwrap();
    let r = tokio::process::Command::new(exe)
        .args(["rehearse", "--json", "--fixture"])
        .arg(&out)
        .arg("--target")
        .arg(source.conn_string("cli_target"))
        .output()
        .await
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let report: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(report["replay"]["changes"], 16);
    assert_eq!(report["tables"][0]["rows"], 96);
    assert_eq!(report["tables"][0]["equal"], true);
}
