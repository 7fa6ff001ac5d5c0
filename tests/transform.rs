//! Replay through a migration mapping, against real clusters: every mapping feature (rename,
//! computed columns, split, dropped columns, filters, key derivation, unchanged TOAST, key
//! moves, TRUNCATE) lands as the mapping says, and bad mappings stop replay before anything is
//! written.

mod common;

use std::sync::Arc;

use common::cli::{self, stderr, stdout};
use common::pair::{self, Pair};
use walshift::apply::replay::{ReplayConfig, ReplayError};
use walshift::localpg::Cluster;
use walshift::transform::Mapping;

const SOURCE: &str = "
    CREATE TABLE customers (id bigint PRIMARY KEY, first text NOT NULL, last text NOT NULL, email text,
                            legacy int, status text NOT NULL DEFAULT 'active', bio text);
    ALTER TABLE customers ALTER COLUMN bio SET STORAGE EXTERNAL;
    CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint, amount numeric(12,2), state text);
    CREATE TABLE untouched (id int PRIMARY KEY, v text);";

/// The release's migration, run on the target.
const MIGRATION: &str = "
    CREATE TABLE clients (id bigint PRIMARY KEY, full_name text NOT NULL, email text, status text NOT NULL,
                          created_at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE client_bios (client_id bigint PRIMARY KEY, bio text NOT NULL);
    CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint, amount_cents bigint NOT NULL, state text);
    CREATE TABLE untouched (id int PRIMARY KEY, v text, extra int DEFAULT 7);";

const MAPPING: &str = r#"
[[table]]
source = "customers"
target = "clients"
drop = ["legacy"]
filter = "status <> 'deleted'"
[table.columns]
full_name = "first || ' ' || last"

[[table]]
source = "customers"
target = "client_bios"
filter = "bio IS NOT NULL"
[table.columns]
client_id = "id"

[[table]]
source = "orders"
filter = "state IS DISTINCT FROM 'cancelled'"
[table.columns]
amount_cents = "(amount * 100)::bigint"
"#;

/// What the target must hold, computed on the source with the mapping's own expressions.
const EXPECTED: &[(&str, &str, &str)] = &[
    (
        "SELECT id, first || ' ' || last, email, status FROM customers WHERE status <> 'deleted'",
        "SELECT id, full_name, email, status FROM clients",
        "clients",
    ),
    (
        "SELECT id, bio FROM customers WHERE bio IS NOT NULL",
        "SELECT client_id, bio FROM client_bios",
        "client_bios",
    ),
    (
        "SELECT id, customer_id, (amount * 100)::bigint, state FROM orders WHERE state IS DISTINCT FROM 'cancelled'",
        "SELECT id, customer_id, amount_cents, state FROM orders",
        "orders",
    ),
    (
        "SELECT id, v, 7 FROM untouched",
        "SELECT id, v, extra FROM untouched",
        "untouched",
    ),
];

/// The query's rows digested (the result of a query, compared between source and target).
async fn digest(c: &Cluster, query: &str) -> (i64, String) {
    let client = c.connect("postgres").await.unwrap();
    common::digest::digest(&client, &format!("({query})")).await
}

fn config(
    target: &Cluster,
    dir: &std::path::Path,
    mapping: &str,
    batch_rows: usize,
) -> ReplayConfig {
    let mut cfg = pair::replay_config(target, dir);
    cfg.batch_rows = batch_rows;
    cfg.transform = Some(Arc::new(Mapping::parse("release.toml", mapping).unwrap()));
    cfg
}

async fn workload(source: &Cluster) {
    source
        .execute(
            "postgres",
            "INSERT INTO customers SELECT g, 'F' || g, 'L' || g, 'c' || g || '@x', g, 'active',
                    CASE WHEN g % 3 = 0 THEN repeat(md5(g::text), 300) END FROM generate_series(1, 400) g;
             INSERT INTO orders SELECT g, 1 + g % 400, g * 1.25, 'new' FROM generate_series(1, 2000) g;
             INSERT INTO untouched SELECT g, 'v' || g FROM generate_series(1, 50) g;",
        )
        .await
        .unwrap();
    let client = source.connect("postgres").await.unwrap();
    common::load::each(&client, 0..200, |i| {
        format!(
                "BEGIN;
                 UPDATE customers SET email = 'e{i}@x' WHERE id = {a};          -- bio untouched (TOAST)
                 UPDATE customers SET status = 'deleted' WHERE id = {d};        -- leaves clients
                 UPDATE customers SET status = 'active' WHERE id = {r};         -- comes back
                 UPDATE customers SET bio = CASE WHEN bio IS NULL THEN repeat('b{i}', 900) END WHERE id = {b};
                 UPDATE customers SET id = {moved} WHERE id = {m};              -- key move
                 UPDATE orders SET amount = amount + 1, state = 'paid' WHERE id = {o};
                 UPDATE orders SET state = 'cancelled' WHERE id = {c};          -- leaves orders
                 UPDATE orders SET state = 'new' WHERE id = {c2};               -- may come back
                 DELETE FROM orders WHERE id = {del};
                 INSERT INTO orders VALUES ({new_o}, 1, 9.99, NULL);
                 UPDATE untouched SET v = 'w{i}' WHERE id = {u};
                 COMMIT;",
                a = 1 + i % 400,
                d = 1 + (i * 7) % 400,
                r = 1 + (i * 11) % 400,
                b = 1 + (i * 13) % 400,
                moved = 10_000 + i,
                m = 201 + i % 150,
                o = 1 + (i * 3) % 2000,
                c = 1 + (i * 17) % 2000,
                c2 = 1 + (i * 19) % 2000,
                del = 1 + (i * 23) % 2000,
                new_o = 5000 + i,
                u = 1 + i % 50,
            )
    })
    .await;
}

async fn assert_mapped(source: &Cluster, target: &Cluster) {
    for (s, t, name) in EXPECTED {
        let want = digest(source, s).await;
        let got = digest(target, t).await;
        assert_eq!(got, want, "{name} differs from source + mapping");
        assert!(
            want.0 > 0,
            "{name}: the workload must leave rows to compare"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mapping_feature_lands_as_the_mapping_says() {
    let Pair {
        source,
        target,
        dir,
    } = Pair::capturing(SOURCE, MIGRATION).await;
    workload(&source).await;
    common::capture::until_now(&source, dir.path()).await;

    // Small batches: folded set-based writes, slices inside one source transaction.
    let report = pair::replay(config(&target, dir.path(), MAPPING, 300))
        .await
        .expect("replay through the mapping");
    assert!(report.changes > 4000, "{report:?}");
    assert_mapped(&source, &target).await;

    // TRUNCATE goes to every target of the source table.
    source.execute("postgres", "TRUNCATE orders").await.unwrap();
    source
        .execute("postgres", "INSERT INTO orders VALUES (1, 1, 1.5, 'x')")
        .await
        .unwrap();
    common::capture::until_now(&source, dir.path()).await;
    pair::replay(config(&target, dir.path(), MAPPING, 300))
        .await
        .unwrap();
    assert_mapped(&source, &target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_order_retry_goes_through_the_mapping() {
    let Pair {
        source,
        target,
        dir,
    } = Pair::capturing(
        SOURCE,
        // A unique constraint the fold does not know about: a batch swapping emails fails
        // set-based and must be retried in source order, through the mapping.
        &format!("{MIGRATION} ALTER TABLE clients ADD UNIQUE (email);"),
    )
    .await;
    workload(&source).await;
    source
        .execute(
            "postgres",
            "BEGIN; UPDATE customers SET email = 'tmp' WHERE id = 2; UPDATE customers SET email = 'c2@x-swapped' WHERE id = 3;
             UPDATE customers SET email = (SELECT 'c3' || '@x-old') WHERE id = 2; COMMIT;",
        )
        .await
        .unwrap();
    common::capture::until_now(&source, dir.path()).await;
    let report = pair::replay(config(&target, dir.path(), MAPPING, 100_000))
        .await
        .expect("replay");
    assert_mapped(&source, &target).await;
    let _ = report;
}

/// Each bad mapping stops replay with its message, before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mappings_are_refused_before_anything_is_applied() {
    let Pair {
        source,
        target,
        dir,
    } = Pair::capturing(
        SOURCE,
        &format!("{MIGRATION} CREATE TABLE nopk (id bigint, x text); CREATE TABLE gen (id bigint PRIMARY KEY, g int GENERATED ALWAYS AS (1) STORED);"),
    )
    .await;
    workload(&source).await;
    common::capture::until_now(&source, dir.path()).await;

    let head =
        "[[table]]\nsource = \"customers\"\ntarget = \"clients\"\ndrop = [\"legacy\", \"bio\"]\n";
    let ok_cols = "[table.columns]\nfull_name = \"first || ' ' || last\"\n";
    let cases: Vec<(String, &str)> = vec![
        ("[[table]\nsource = 1".into(), "release.toml:1"),
        (format!("{head}colums = {{}}\n"), "unknown field `colums`"),
        ("[[table]]\ntarget = \"clients\"\n".into(), "no `source"),
        ("[[table]]\nsource = \"a.b.c\"\n".into(), "is not a table name"),
        (format!("[[table]]\nsource = \"customers\"\ntarget = \"client\"\n{ok_cols}"), "release.toml:3: target table public.client does not exist"),
        (format!("{head}{ok_cols}ful_name = \"first\"\n"), "has no column \"ful_name\""),
        (format!("{head}{ok_cols}email = \"email || mail\"\n"), "release.toml:7: the expression for public.clients.email"),
        (format!("{head}[table.columns]\nfull_name = \"first + last\"\n"), "operator does not exist"),
        (format!("{head}{ok_cols}created_at = \"status = ''\"\n"), "cannot cast type boolean to timestamp with time zone"),
        (format!("{head}{ok_cols}id = \"length(first)\"\n"), "not in the source's key"),
        ("[[table]]\nsource = \"customers\"\ntarget = \"client_bios\"\ndrop = [\"first\", \"last\", \"email\", \"legacy\", \"status\"]\n".to_string(), "primary key column public.client_bios.client_id gets no value"),
        (head.to_string(), "clients.full_name is NOT NULL without a default"),
        ("[[table]]\nsource = \"customers\"\ntarget = \"clients\"\ndrop = [\"legacy\", \"bi\"]\n".into(), "drop names \"bi\""),
        (format!("[[table]]\nsource = \"customers\"\ntarget = \"clients\"\ndrop = [\"legacy\"]\n{ok_cols}"), "bio goes nowhere"),
        (format!("{head}filter = \"status\"\n{ok_cols}"), "the filter of public.clients"),
        (format!("{head}{ok_cols}[[table]]\nsource = \"orders\"\ntarget = \"clients\"\n"), "merging tables is not supported"),
        (format!("{MAPPING}[[table]]\nsource = \"untouched\"\ntarget = \"nopk\"\n[table.columns]\nid = \"id\"\nx = \"v\"\n"), "has no primary key"),
        (format!("{MAPPING}[[table]]\nsource = \"untouched\"\ntarget = \"gen\"\ndrop = [\"v\"]\n[table.columns]\ng = \"id\"\n"), "generated column"),
        (format!("{head}full_name = \"first\"\n"), "expected"),
        (format!("{head}filter = \"\"\n{ok_cols}"), "filter is empty"),
        (format!("{head}{ok_cols}email = \"legacy::text\"\n"), "listed in drop"),
    ];
    assert!(cases.len() >= 15);
    for (toml, want) in &cases {
        let mapping = match Mapping::parse("release.toml", toml) {
            Ok(m) => m,
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(want),
                    "mapping:\n{toml}\nerror: {msg}\nwanted: {want}"
                );
                continue;
            }
        };
        let mut cfg = pair::replay_config(&target, dir.path());
        cfg.transform = Some(Arc::new(mapping));
        let err = pair::replay(cfg).await.expect_err(toml);
        let msg = err.to_string();
        assert!(matches!(err, ReplayError::Transform(_)), "{msg}");
        assert!(
            msg.contains(want),
            "mapping:\n{toml}\nerror: {msg}\nwanted: {want}"
        );
        let c = target.connect("postgres").await.unwrap();
        for t in ["clients", "client_bios", "orders", "untouched"] {
            let n: i64 = c
                .query_one(&format!("SELECT count(*) FROM {t}"), &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 0, "{t} was written despite a bad mapping:\n{toml}");
        }
        let applied: i64 = c
            .query_one("SELECT count(*) FROM walshift.applied", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(applied, 0);
    }
}

/// `walshift transform check`: prints the compiled SQL and exits 0 for a good mapping; names
/// the file and line and exits non-zero for a bad one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transform_check_command() {
    let Pair {
        source,
        target,
        dir,
    } = Pair::with_schemas(SOURCE, MIGRATION).await;
    let good = dir.path().join("release.toml");
    std::fs::write(&good, MAPPING).unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        MAPPING.replace("(amount * 100)::bigint", "amount * 'x'"),
    )
    .unwrap();
    let run = |file: &std::path::Path, with_source: bool| {
        let mut c = cli::command(&["transform", "check", "--transform"]);
        c.arg(file)
            .arg("--target")
            .arg(target.conn_string("postgres"));
        if with_source {
            c.arg("--source").arg(source.conn_string("postgres"));
        }
        c.output().unwrap()
    };
    let ok = run(&good, true);
    let out = stdout(&ok);
    assert!(ok.status.success(), "{out}\n{}", stderr(&ok));
    assert!(out.contains("OK — 2 source table(s) compiled"), "{out}");
    assert!(
        out.contains("INSERT INTO \"public\".\"client_bios\""),
        "{out}"
    );
    assert!(
        out.contains("full_name text = first || ' ' || last"),
        "{out}"
    );

    let failed = run(&bad, true);
    let err = stderr(&failed);
    assert!(!failed.status.success());
    assert!(err.contains("bad.toml:21:"), "{err}");
    assert!(err.contains("public.orders.amount_cents"), "{err}");

    // Without the source's shapes only the target side is checked, and it says so.
    let partial = run(&good, false);
    let out = stdout(&partial);
    assert!(partial.status.success(), "{out}");
    assert!(out.contains("not type-checked"), "{out}");
}
