//! Replay fidelity on real schema patterns (issue 14): the affected-row guard stops replay
//! loudly when the target has diverged, and the schema shapes that used to be dropped or
//! refused replay exactly. Each case replays one buffer into two targets, over one and over
//! two apply connections.

mod common;

use common::pair::{self, Pair};
use walshift::apply::replay::{ReplayError, ReplayReport};
use walshift::localpg::Cluster;
use walshift::transform::Mapping;

use std::sync::Arc;

/// A source and two targets that start with the same schema and rows, and a buffer whose
/// slot starts right there.
struct Setup {
    source: Cluster,
    targets: [Cluster; 2],
    dir: tempfile::TempDir,
    mapping: Option<Arc<Mapping>>,
}

async fn setup(schema_and_rows: &str) -> Setup {
    setup_pair(schema_and_rows, schema_and_rows, None).await
}

/// As [`setup`], with a different target schema and a mapping between the two.
async fn setup_pair(source_sql: &str, target_sql: &str, mapping: Option<&str>) -> Setup {
    let Pair {
        source,
        target: first,
        dir,
    } = Pair::capturing(source_sql, target_sql).await;
    let second = common::cluster();
    second.execute("postgres", target_sql).await.unwrap();
    Setup {
        targets: [first, second],
        source,
        dir,
        mapping: mapping.map(|m| Arc::new(Mapping::parse("release.toml", m).unwrap())),
    }
}

impl Setup {
    /// Captures what the source committed so far, then replays it into target `i` over
    /// `i + 1` connections.
    async fn replay(&self, i: usize) -> Result<ReplayReport, ReplayError> {
        common::capture::until_now(&self.source, self.dir.path()).await;
        // The targets are built by the test with the source's schema and rows.
        let mut cfg = pair::replay_config(&self.targets[i], self.dir.path());
        cfg.apply_connections = i + 1;
        cfg.transform = self.mapping.clone();
        pair::replay(cfg).await
    }

    async fn on_targets(&self, sql: &str) {
        for t in &self.targets {
            t.execute("postgres", sql).await.unwrap();
        }
    }

    /// Replays into both targets and checks every listed table equals the source's.
    async fn replay_and_compare(&self, tables: &[&str]) {
        for i in 0..2 {
            let report = self
                .replay(i)
                .await
                .unwrap_or_else(|e| panic!("replay over {} connection(s): {e}", i + 1));
            for t in tables {
                assert_eq!(
                    rows(&self.source, t).await,
                    rows(&self.targets[i], t).await,
                    "table {t} after replay over {} connection(s): {report:?}",
                    i + 1
                );
            }
        }
    }
}

/// Every row of `table` as text, sorted (an independent comparison, not walshift's verify).
async fn rows(c: &Cluster, table: &str) -> Vec<String> {
    let client = c.connect("postgres").await.unwrap();
    client
        .query(
            &format!("SELECT t::text AS r FROM {table} t ORDER BY t::text COLLATE \"C\""),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Once `change` commits on the source, replay into both targets must stop with
/// [`ReplayError::Diverged`] on `table` whose message names every string of `mentions`; the
/// target keeps what it had.
async fn expect_diverged(s: &Setup, change: &str, table: &str, mentions: &[&str]) {
    s.source.execute("postgres", change).await.unwrap();
    for i in 0..2 {
        let before = rows(&s.targets[i], table).await;
        let err = s
            .replay(i)
            .await
            .expect_err("replay must stop on a diverged target");
        let message = err.to_string();
        assert!(
            matches!(err, ReplayError::Diverged { .. }),
            "over {} connection(s): {message} ({err:?})",
            i + 1
        );
        for m in mentions {
            assert!(message.contains(m), "{message:?} names {m:?}");
        }
        assert!(message.contains("LSN"), "{message}");
        assert!(message.contains("Re-clone"), "{message}");
        assert_eq!(
            rows(&s.targets[i], table).await,
            before,
            "nothing of the failed transaction is committed"
        );
    }
}

const GUARDED: &str = "
    CREATE TABLE g (id int PRIMARY KEY, v text);
    INSERT INTO g SELECT i, 'v' || i FROM generate_series(1, 20) i;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_of_a_row_missing_on_the_target_stops_replay() {
    let s = setup(GUARDED).await;
    s.on_targets("DELETE FROM g WHERE id = 3").await;
    expect_diverged(
        &s,
        "UPDATE g SET v = 'changed' WHERE id IN (2, 3, 4); INSERT INTO g VALUES (100, 'new')",
        "g",
        &[
            "\"public\".\"g\"",
            "UPDATE",
            "id=3",
            "should have affected 1",
            "affected 0",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_of_a_row_missing_on_the_target_stops_replay() {
    let s = setup(GUARDED).await;
    s.on_targets("DELETE FROM g WHERE id = 5").await;
    expect_diverged(
        &s,
        "DELETE FROM g WHERE id BETWEEN 4 AND 6",
        "g",
        &["\"public\".\"g\"", "DELETE", "id=5"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_replaced_on_the_source_but_missing_on_the_target_stops_replay() {
    // Delete + re-insert of the same key folds into an update of the row that must be there.
    let s = setup(GUARDED).await;
    s.on_targets("DELETE FROM g WHERE id = 7").await;
    expect_diverged(
        &s,
        "BEGIN; DELETE FROM g WHERE id = 7; INSERT INTO g VALUES (7, 'again'); COMMIT;",
        "g",
        &["DELETE", "id=7"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_row_missing_on_the_target_stops_replay() {
    let s = setup(
        "CREATE TABLE nk (a int, b text); ALTER TABLE nk REPLICA IDENTITY FULL;
         INSERT INTO nk VALUES (1, 'x'), (2, 'y');",
    )
    .await;
    s.on_targets("UPDATE nk SET b = 'drift' WHERE a = 2").await;
    expect_diverged(
        &s,
        "UPDATE nk SET b = 'z' WHERE a = 2",
        "nk",
        &["\"public\".\"nk\"", "UPDATE of row", "a=2", "b=y"],
    )
    .await;
}

/// Finding 1: the key of a primary key with INCLUDE columns is its first `indnkeyatts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_key_with_include_columns() {
    let s = setup(
        "CREATE TABLE inc_b (a int, b text, PRIMARY KEY (a) INCLUDE (b));
         INSERT INTO inc_b VALUES (1, 'x'), (2, 'y'), (3, 'z');",
    )
    .await;
    s.source
        .execute(
            "postgres",
            "UPDATE inc_b SET b = 'y2' WHERE a = 2; DELETE FROM inc_b WHERE a = 3; UPDATE inc_b SET a = 10 WHERE a = 1;",
        )
        .await
        .unwrap();
    s.replay_and_compare(&["inc_b"]).await;
    assert_eq!(rows(&s.targets[0], "inc_b").await, ["(10,x)", "(2,y2)"]);
}

/// Finding 3: a table keyed only by its replica identity index (and a REPLICA IDENTITY FULL
/// table whose target has only a unique index on NOT NULL columns).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_index_is_the_key() {
    let s = setup(
        "CREATE TABLE ri (a int NOT NULL, b text, c int);
         CREATE UNIQUE INDEX ri_a ON ri (a);
         CREATE UNIQUE INDEX ri_c_partial ON ri (c) WHERE c > 0;
         ALTER TABLE ri REPLICA IDENTITY USING INDEX ri_a;
         INSERT INTO ri SELECT i, 'b' || i, i FROM generate_series(1, 50) i;
         CREATE TABLE fu (a int NOT NULL, b text);
         CREATE UNIQUE INDEX fu_a ON fu (a);
         ALTER TABLE fu REPLICA IDENTITY FULL;
         INSERT INTO fu SELECT i, 'b' || i FROM generate_series(1, 50) i;",
    )
    .await;
    for t in ["ri", "fu"] {
        s.source
            .execute(
                "postgres",
                &format!(
                    "UPDATE {t} SET b = 'u' WHERE a % 5 = 0;
                     DELETE FROM {t} WHERE a % 7 = 0;
                     UPDATE {t} SET a = a + 1000 WHERE a % 11 = 0;
                     BEGIN; DELETE FROM {t} WHERE a = 1; INSERT INTO {t} (a, b) VALUES (1, 'again'); COMMIT;
                     INSERT INTO {t} (a, b) VALUES (500, 'new');"
                ),
            )
            .await
            .unwrap();
    }
    s.replay_and_compare(&["ri", "fu"]).await;
}

/// Finding 2: identity columns (ALWAYS and BY DEFAULT) and stored generated columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_generated_columns() {
    let s = setup(
        "CREATE TABLE idt (pk int PRIMARY KEY, id_col int GENERATED ALWAYS AS IDENTITY, name text);
         CREATE TABLE idk (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text);
         CREATE TABLE idd (pk int PRIMARY KEY, id_col int GENERATED BY DEFAULT AS IDENTITY, name text);
         CREATE TABLE gen (id int PRIMARY KEY, a int, doubled int GENERATED ALWAYS AS (a * 2) STORED);
         INSERT INTO idt (pk, name) SELECT i, 'n' || i FROM generate_series(1, 10) i;
         INSERT INTO idk (name) SELECT 'n' || i FROM generate_series(1, 10) i;
         INSERT INTO idd (pk, name) SELECT i, 'n' || i FROM generate_series(1, 10) i;
         INSERT INTO gen (id, a) SELECT i, i FROM generate_series(1, 10) i;",
    )
    .await;
    s.source
        .execute(
            "postgres",
            "INSERT INTO idt (pk, name) VALUES (11, 'new'), (12, 'new');
             UPDATE idt SET name = 'renamed' WHERE pk IN (1, 11);
             UPDATE idt SET pk = 100 WHERE pk = 2;
             DELETE FROM idt WHERE pk = 3;
             BEGIN; DELETE FROM idt WHERE pk = 5; INSERT INTO idt (pk, name) VALUES (5, 'again'); COMMIT;
             INSERT INTO idk (name) VALUES ('new');
             UPDATE idk SET name = 'renamed' WHERE id = 4;
             DELETE FROM idk WHERE id = 5;
             INSERT INTO idd (pk, name) VALUES (11, 'new');
             INSERT INTO idd (pk, id_col, name) VALUES (12, 500, 'explicit');
             UPDATE idd SET id_col = 77, name = 'moved id' WHERE pk = 6;
             INSERT INTO gen (id, a) VALUES (11, 11);
             UPDATE gen SET a = 100 WHERE id = 1;
             DELETE FROM gen WHERE id = 2;",
        )
        .await
        .unwrap();
    s.replay_and_compare(&["idt", "idk", "idd", "gen"]).await;
}

/// An ALWAYS identity value cannot be written by an update: a change of it is a loud stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_always_identity_value_stops_replay() {
    let s = setup(
        "CREATE TABLE idt (pk int PRIMARY KEY, id_col int GENERATED ALWAYS AS IDENTITY, name text);
         INSERT INTO idt (pk, name) SELECT i, 'n' || i FROM generate_series(1, 5) i;",
    )
    .await;
    expect_diverged(
        &s,
        "UPDATE idt SET id_col = DEFAULT WHERE pk = 2",
        "idt",
        &["\"public\".\"idt\"", "UPDATE", "pk=2"],
    )
    .await;
}

/// Finding 5 (replay half): a table with no columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_without_columns() {
    let s = setup(
        "CREATE TABLE nocols (); ALTER TABLE nocols REPLICA IDENTITY FULL;
         INSERT INTO nocols DEFAULT VALUES; INSERT INTO nocols DEFAULT VALUES;",
    )
    .await;
    s.source
        .execute(
            "postgres",
            "INSERT INTO nocols DEFAULT VALUES; INSERT INTO nocols DEFAULT VALUES; INSERT INTO nocols DEFAULT VALUES;
             DELETE FROM nocols WHERE ctid = (SELECT min(ctid) FROM nocols);",
        )
        .await
        .unwrap();
    s.replay_and_compare(&["nocols"]).await;
    assert_eq!(rows(&s.targets[1], "nocols").await.len(), 4);
}

/// Finding 6: REPLICA IDENTITY FULL rows holding types without an equality operator (and
/// `box`, whose `=` compares areas: two boxes of one area are told apart by text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_identity_with_types_without_equality() {
    let s = setup(
        "CREATE TABLE fj (n int, j json, p point, x xml, js json[], b box);
         ALTER TABLE fj REPLICA IDENTITY FULL;
         INSERT INTO fj VALUES
           (1, '{\"a\": 1,  \"b\": [1, 2]}', '(1.5,2.25)', '<a>1</a>', ARRAY['{\"k\": 1}']::json[], '(1,1),(0,0)'),
           (2, '{\"a\": 2}', '(0.1,-3)', '<b/>', NULL, '(2,2),(0,0)'),
           (3, NULL, NULL, NULL, NULL, NULL),
           (4, NULL, NULL, NULL, NULL, '(1,1),(0,0)'),
           (4, NULL, NULL, NULL, NULL, '(2,1),(1,0)');",
    )
    .await;
    s.source
        .execute(
            "postgres",
            "UPDATE fj SET n = 10 WHERE n = 1; DELETE FROM fj WHERE n = 2; UPDATE fj SET j = '[]' WHERE n = 3;
             DELETE FROM fj WHERE n = 4 AND b ~= '(2,1),(1,0)';",
        )
        .await
        .unwrap();
    s.replay_and_compare(&["fj"]).await;
}

const MAPPED_SOURCE: &str = "
    CREATE TABLE acct (id int PRIMARY KEY, name text, seq int);
    INSERT INTO acct SELECT i, 'n' || i, i FROM generate_series(1, 20) i;";
const MAPPED_TARGET: &str = "
    CREATE TABLE people (pid int PRIMARY KEY, name text, seq int GENERATED BY DEFAULT AS IDENTITY, note text);
    INSERT INTO people (pid, name, seq) SELECT i, 'n' || i, i FROM generate_series(1, 20) i;";
const MAPPING: &str =
    "[[table]]\nsource = \"acct\"\ntarget = \"people\"\n[table.columns]\npid = \"id\"\n";

/// (key, name, seq) of each row, in the query's order.
async fn triples(c: &Cluster, sql: &str) -> Vec<(i32, String, i32)> {
    c.connect("postgres")
        .await
        .unwrap()
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Through a mapping (onto an identity column): inserts, updates, deletes and a row replaced
/// at its key (folded into an update that must find the row) equal the source's rows mapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapped_replay_with_a_replaced_row() {
    let s = setup_pair(MAPPED_SOURCE, MAPPED_TARGET, Some(MAPPING)).await;
    s.source
        .execute(
            "postgres",
            "INSERT INTO acct VALUES (21, 'new', 21), (22, 'new', 22);
             UPDATE acct SET name = 'renamed' WHERE id IN (1, 21);
             DELETE FROM acct WHERE id = 2;
             BEGIN; DELETE FROM acct WHERE id = 4; INSERT INTO acct VALUES (4, 'again', 4); COMMIT;",
        )
        .await
        .unwrap();
    for i in 0..2 {
        s.replay(i).await.unwrap();
        let got = triples(
            &s.targets[i],
            "SELECT pid, name, seq FROM people ORDER BY pid",
        )
        .await;
        let want = triples(&s.source, "SELECT id, name, seq FROM acct ORDER BY id").await;
        assert_eq!(got, want);
    }
}

/// The guard through a mapping: a row missing on the target stops replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapped_update_of_a_row_missing_on_the_target_stops_replay() {
    let s = setup_pair(MAPPED_SOURCE, MAPPED_TARGET, Some(MAPPING)).await;
    s.on_targets("DELETE FROM people WHERE pid IN (3, 8)").await;
    expect_diverged(
        &s,
        "UPDATE acct SET name = 'changed' WHERE id BETWEEN 2 AND 4",
        "people",
        &[
            "\"public\".\"people\" (mapped from \"public\".\"acct\")",
            "UPDATE",
            "id=3",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapped_delete_of_a_row_missing_on_the_target_stops_replay() {
    let s = setup_pair(MAPPED_SOURCE, MAPPED_TARGET, Some(MAPPING)).await;
    s.on_targets("DELETE FROM people WHERE pid = 8").await;
    expect_diverged(
        &s,
        "DELETE FROM acct WHERE id IN (7, 8, 9)",
        "people",
        &["DELETE", "id=8"],
    )
    .await;
}

/// Through a mapping, the target key is the primary key's key columns (not its INCLUDE
/// columns), or the replica identity index of a target without a primary key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapped_target_keyed_by_include_primary_key_or_replica_identity_index() {
    let source = "
        CREATE TABLE a1 (id int PRIMARY KEY, name text);
        CREATE TABLE a2 (id int PRIMARY KEY, name text);
        INSERT INTO a1 SELECT i, 'n' || i FROM generate_series(1, 10) i;
        INSERT INTO a2 SELECT i, 'n' || i FROM generate_series(1, 10) i;";
    let target = "
        CREATE TABLE p1 (pid int, name text, PRIMARY KEY (pid) INCLUDE (name));
        CREATE TABLE p2 (pid int NOT NULL, name text);
        CREATE UNIQUE INDEX p2_pid ON p2 (pid);
        ALTER TABLE p2 REPLICA IDENTITY USING INDEX p2_pid;
        INSERT INTO p1 SELECT i, 'n' || i FROM generate_series(1, 10) i;
        INSERT INTO p2 SELECT i, 'n' || i FROM generate_series(1, 10) i;";
    let mapping = "[[table]]\nsource = \"a1\"\ntarget = \"p1\"\n[table.columns]\npid = \"id\"\n\n\
                   [[table]]\nsource = \"a2\"\ntarget = \"p2\"\n[table.columns]\npid = \"id\"\n";
    let s = setup_pair(source, target, Some(mapping)).await;
    for t in ["a1", "a2"] {
        s.source
            .execute(
                "postgres",
                &format!(
                    "UPDATE {t} SET name = 'u' WHERE id = 2; DELETE FROM {t} WHERE id = 3;
                     UPDATE {t} SET id = 100 WHERE id = 1; INSERT INTO {t} VALUES (50, 'new');"
                ),
            )
            .await
            .unwrap();
    }
    for i in 0..2 {
        s.replay(i)
            .await
            .unwrap_or_else(|e| panic!("replay over {} connection(s): {e}", i + 1));
        for (src, dst) in [("a1", "p1"), ("a2", "p2")] {
            assert_eq!(
                rows(&s.source, src).await,
                rows(&s.targets[i], dst).await,
                "{dst} over {} connection(s)",
                i + 1
            );
        }
    }
}

const ALWAYS_SOURCE: &str = "
    CREATE TABLE acct (id int PRIMARY KEY, name text, seq int);
    INSERT INTO acct SELECT i, 'n' || i, i FROM generate_series(1, 20) i;";
const ALWAYS_TARGET: &str = "
    CREATE TABLE people (pid int PRIMARY KEY, name text, seq int GENERATED ALWAYS AS IDENTITY, note text);
    INSERT INTO people (pid, name, seq) OVERRIDING SYSTEM VALUE
        SELECT i, 'n' || i, i FROM generate_series(1, 20) i;";
const ALWAYS_FILTERED: &str = "[[table]]\nsource = \"acct\"\ntarget = \"people\"\n\
    filter = \"name <> 'hidden'\"\n[table.columns]\npid = \"id\"\n";

async fn mapped_people(c: &Cluster) -> Vec<String> {
    rows_of(c, "SELECT format('%s|%s|%s', pid, name, seq) FROM people").await
}

async fn mapped_acct(c: &Cluster, filter: &str) -> Vec<String> {
    rows_of(
        c,
        &format!("SELECT format('%s|%s|%s', id, name, seq) FROM acct WHERE {filter}"),
    )
    .await
}

async fn rows_of(c: &Cluster, sql: &str) -> Vec<String> {
    let mut v: Vec<String> = c
        .connect("postgres")
        .await
        .unwrap()
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    v.sort();
    v
}

/// Issue 14 finding 2 through a mapping: a mapped update onto a `GENERATED ALWAYS AS
/// IDENTITY` target column does not set it (PostgreSQL refuses) but checks it; with and
/// without a filter (a filtered update is written as an upsert), in place and moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapped_update_onto_an_always_identity_column() {
    for (mapping, filter) in [(MAPPING, "true"), (ALWAYS_FILTERED, "name <> 'hidden'")] {
        let s = setup_pair(ALWAYS_SOURCE, ALWAYS_TARGET, Some(mapping)).await;
        s.source
            .execute(
                "postgres",
                "UPDATE acct SET name = 'renamed' WHERE id IN (1, 2, 3);
                 UPDATE acct SET id = 100 WHERE id = 4;
                 UPDATE acct SET name = 'hidden' WHERE id = 5;
                 BEGIN; UPDATE acct SET name = 'x' WHERE id = 6; UPDATE acct SET name = 'y' WHERE id = 6; COMMIT;
                 INSERT INTO acct VALUES (50, 'new', 50);
                 UPDATE acct SET name = 'again' WHERE id = 50;",
            )
            .await
            .unwrap();
        for i in 0..2 {
            s.replay(i)
                .await
                .unwrap_or_else(|e| panic!("{filter}, over {} connection(s): {e}", i + 1));
            assert_eq!(
                mapped_acct(&s.source, filter).await,
                mapped_people(&s.targets[i]).await,
                "{filter}, over {} connection(s)",
                i + 1
            );
        }
    }
}

/// A mapped update that changes the value of an ALWAYS identity target column cannot be
/// written: replay stops, naming the table and the key, with or without a filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapped_change_of_an_always_identity_value_stops_replay() {
    for mapping in [MAPPING, ALWAYS_FILTERED] {
        let s = setup_pair(ALWAYS_SOURCE, ALWAYS_TARGET, Some(mapping)).await;
        expect_diverged(
            &s,
            "UPDATE acct SET name = 'ok' WHERE id = 2; UPDATE acct SET seq = 99 WHERE id = 7",
            "people",
            &["\"public\".\"people\"", "id=7"],
        )
        .await;
    }
}
