//! Capture end to end against real throwaway clusters: what is committed on the source comes
//! back out of the buffer, decoded, exactly.

mod common;

use common::capture::Captured;
use walshift::source::pgoutput::{LogicalMessage, OldTuple, TupleValue};

fn text(v: &TupleValue) -> Option<String> {
    match v {
        TupleValue::Text(b) => Some(String::from_utf8(b.to_vec()).expect("utf8")),
        TupleValue::Null => None,
        other => panic!("unexpected tuple value {other:?}"),
    }
}

fn changes(c: &Captured) -> Vec<&LogicalMessage> {
    c.transactions
        .iter()
        .flat_map(|t| t.messages.iter())
        .filter(|m| {
            matches!(
                m,
                LogicalMessage::Insert(_)
                    | LogicalMessage::Update(_)
                    | LogicalMessage::Delete(_)
                    | LogicalMessage::Truncate(_)
            )
        })
        .collect()
}

const MATRIX: &str = "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
             CREATE TABLE matrix (
               id int PRIMARY KEY, i2 smallint, i8 bigint, num numeric, f8 float8, t text, b bytea,
               j json, jb jsonb, arr int[], tarr text[], ts timestamptz, u uuid, e mood, n text, big text);
             ALTER TABLE matrix ALTER COLUMN big SET STORAGE EXTERNAL;";

const MATRIX_COLUMNS: &str = "id, i2, i8, num, f8, t, b, j, jb, arr, tarr, ts, u, e, n, big";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_matrix_round_trips_through_the_buffer() {
    // First capture creates slot and publication; the rows below come after it.
    let (cluster, dir) = common::capture::source_with_buffer(MATRIX).await;

    let client = cluster.connect("postgres").await.unwrap();
    client
        .batch_execute(
            r#"INSERT INTO matrix VALUES
               (1, -32768, 9223372036854775807, 12345678901234567890.000000001, 1.5e-300,
                E'quotes '' " and\nnewlines\ttabs \\ backslash', '\x00ff10'::bytea,
                '{"a": [1, 2, {"b": null}]}', '{"z": 1, "a": "é"}', '{1,NULL,3}', '{"x y","with \"quote\"",NULL}',
                '2026-11-26 12:34:56.789012+00', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy', NULL, repeat('x', 100000)),
               (2, 0, 0, 'NaN', '-Infinity', 'unicode: 日本語 🐘 ñ', ''::bytea, 'null', '[]', '{}', '{}',
                'infinity', '00000000-0000-0000-0000-000000000000', 'sad', NULL, NULL),
               (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '');
             UPDATE matrix SET i8 = 42 WHERE id = 1;"#,
        )
        .await
        .unwrap();
    let expected: Vec<Vec<Option<String>>> = {
        // The server's own text output of every value, which pgoutput sends.
        let rows = client
            .query(
                &format!(
                    "SELECT {} FROM (VALUES (1),(2),(3)) v(k) JOIN matrix m ON m.id = v.k ORDER BY m.id",
                    MATRIX_COLUMNS.split(", ").map(|c| format!("m.{c}::text")).collect::<Vec<_>>().join(", ")
                ),
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| (0..16).map(|i| r.get::<_, Option<String>>(i)).collect())
            .collect()
    };
    let captured = common::capture::until_now(&cluster, dir.path()).await;
    let ch = changes(&captured);
    assert_eq!(ch.len(), 4, "three inserts and one update: {ch:#?}");

    // Inserts carry every value exactly as the server prints it — except row 1's i8, updated later.
    for (n, msg) in ch[..3].iter().enumerate() {
        let LogicalMessage::Insert(ins) = msg else {
            panic!("expected insert, got {msg:?}")
        };
        let got: Vec<Option<String>> = ins.new.values.iter().map(text).collect();
        let mut want = expected[n].clone();
        if n == 0 {
            want[2] = Some("9223372036854775807".into());
        }
        assert_eq!(got, want, "row {}", n + 1);
    }
    // The update did not touch the TOASTed column: pgoutput sends it as unchanged.
    let LogicalMessage::Update(up) = ch[3] else {
        panic!("expected update")
    };
    assert!(up.old.is_none(), "key unchanged: no old tuple");
    assert_eq!(up.new.values[15], TupleValue::UnchangedToast);
    assert_eq!(text(&up.new.values[2]).as_deref(), Some("42"));

    // The relation and the enum type were described in the stream.
    let all: Vec<&LogicalMessage> = captured
        .transactions
        .iter()
        .flat_map(|t| t.messages.iter())
        .collect();
    assert!(
        all.iter()
            .any(|m| matches!(m, LogicalMessage::Type(t) if t.name == "mood"))
    );
    assert!(
        captured
            .relations
            .iter()
            .any(|r| r.name == "matrix" && r.columns.len() == 16)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_updates_deletes_truncate_and_replica_identity_full() {
    let (cluster, dir) = common::capture::source_with_buffer(
        "CREATE TABLE keyed (id int PRIMARY KEY, v text);
             CREATE TABLE fulltab (a int, b text);
             ALTER TABLE fulltab REPLICA IDENTITY FULL;",
    )
    .await;
    cluster
        .execute(
            "postgres",
            "INSERT INTO keyed VALUES (1, 'one'), (2, 'two');
             UPDATE keyed SET id = 10 WHERE id = 1;
             DELETE FROM keyed WHERE id = 2;
             INSERT INTO fulltab VALUES (1, 'x');
             UPDATE fulltab SET b = 'y' WHERE a = 1;
             DELETE FROM fulltab WHERE a = 1;
             TRUNCATE keyed;",
        )
        .await
        .unwrap();
    let captured = common::capture::until_now(&cluster, dir.path()).await;
    let ch = changes(&captured);
    assert_eq!(ch.len(), 8, "{ch:#?}");
    match ch[2] {
        LogicalMessage::Update(u) => {
            let Some(OldTuple::Key(k)) = &u.old else {
                panic!("key change must carry the old key: {u:?}")
            };
            assert_eq!(text(&k.values[0]).as_deref(), Some("1"));
            assert_eq!(text(&u.new.values[0]).as_deref(), Some("10"));
        }
        other => panic!("expected update, got {other:?}"),
    }
    match ch[3] {
        LogicalMessage::Delete(d) => {
            let OldTuple::Key(k) = &d.old else {
                panic!("default identity deletes carry the key")
            };
            assert_eq!(text(&k.values[0]).as_deref(), Some("2"));
        }
        other => panic!("expected delete, got {other:?}"),
    }
    match ch[5] {
        LogicalMessage::Update(u) => {
            let Some(OldTuple::Full(o)) = &u.old else {
                panic!("REPLICA IDENTITY FULL sends the old row: {u:?}")
            };
            assert_eq!(text(&o.values[1]).as_deref(), Some("x"));
            assert_eq!(text(&u.new.values[1]).as_deref(), Some("y"));
        }
        other => panic!("expected update, got {other:?}"),
    }
    match ch[6] {
        LogicalMessage::Delete(d) => assert!(matches!(d.old, OldTuple::Full(_))),
        other => panic!("expected delete, got {other:?}"),
    }
    match ch[7] {
        LogicalMessage::Truncate(t) => {
            let keyed = captured
                .relations
                .iter()
                .find(|r| r.name == "keyed")
                .unwrap();
            assert_eq!(t.relids, vec![keyed.relid]);
        }
        other => panic!("expected truncate, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200k_row_transaction_is_captured_whole() {
    let (cluster, dir) =
        common::capture::source_with_buffer("CREATE TABLE big (id int PRIMARY KEY, v text)").await;
    cluster
        .execute(
            "postgres",
            "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 200000) g",
        )
        .await
        .unwrap();
    let captured = common::capture::until_now(&cluster, dir.path()).await;
    let txns: Vec<_> = captured
        .transactions
        .iter()
        .filter(|t| t.changes() > 0)
        .collect();
    assert_eq!(txns.len(), 1, "one source transaction");
    assert_eq!(txns[0].changes(), 200_000);
    let ids: Vec<i64> = txns[0]
        .messages
        .iter()
        .filter_map(|m| match m {
            LogicalMessage::Insert(i) => text(&i.new.values[0]).map(|s| s.parse().unwrap()),
            _ => None,
        })
        .collect();
    assert_eq!(ids, (1..=200_000).collect::<Vec<i64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_counts_socket_reads_and_fsyncs() {
    let (cluster, dir) =
        common::capture::source_with_buffer("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    cluster
        .execute(
            "postgres",
            "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g",
        )
        .await
        .unwrap();
    let report = common::capture::until_now_report(&cluster, dir.path()).await;
    assert_eq!(report.changes, 20_000);
    // Wire framing comes on top of the pgoutput bytes.
    assert!(
        report.socket_read_bytes > report.bytes,
        "{} socket bytes for {} pgoutput bytes",
        report.socket_read_bytes,
        report.bytes
    );
    assert!(report.socket_reads >= 1 && report.socket_reads <= report.socket_read_bytes);
    assert!(report.fsyncs >= 1, "the transaction was fsynced");
}
