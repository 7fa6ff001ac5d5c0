//! `walshift verify` against real throwaway clusters: the source and the target are two
//! databases of one cluster, the target built by hand to be what the mapping says.

mod common;

use common::cli::{stderr, stdout, walshift};
use common::pair::two_databases;
use walshift::transform::{Mapping, TableName};
use walshift::verify::{self, DifferenceKind, KeyDifference, VerifyOptions};

/// Tables of every interesting type, filled identically on both sides.
const IDENTITY_SCHEMA: &str = "
CREATE TABLE items (
  id bigint PRIMARY KEY, name text, price numeric(10,2), ratio float8, seen timestamptz,
  day date, blob bytea, doc jsonb, tags text[], span interval, flag boolean);
CREATE TABLE line_items (order_id int, line int, sku text, qty int, PRIMARY KEY (order_id, line));
CREATE TABLE \"Odd \"\"Name\"\"\" (\"Key\" int PRIMARY KEY, \"v,al\" text);
";

const IDENTITY_DATA: &str = "
INSERT INTO items
SELECT g, CASE WHEN g % 7 = 0 THEN NULL WHEN g % 11 = 0 THEN '' ELSE 'it''s, \"item\" ' || g END,
       g * 1.25, g / 3.0, timestamptz '2026-01-01 00:00:00+00' + g * interval '1 hour',
       date '2026-01-01' + g, decode(md5(g::text), 'hex'), jsonb_build_object('g', g, 'h', 'x'),
       ARRAY['a' || g, NULL, 'b,c'], g * interval '1 minute', g % 2 = 0
FROM generate_series(1, 300) g;
INSERT INTO line_items SELECT o, l, 'sku-' || o || '-' || l, o * l
FROM generate_series(1, 20) o, generate_series(1, 4) l;
INSERT INTO \"Odd \"\"Name\"\"\" VALUES (1, 'a'), (2, NULL), (3, '');
";

fn names(list: &[&str]) -> Vec<TableName> {
    list.iter().map(|t| TableName::parse(t).unwrap()).collect()
}

fn diff(key: &str, kind: DifferenceKind) -> KeyDifference {
    KeyDifference {
        key: key.into(),
        kind,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_equal_then_differences_are_reported_by_key() {
    let cluster = two_databases(
        &format!("{IDENTITY_SCHEMA}{IDENTITY_DATA} CREATE PUBLICATION walshift FOR ALL TABLES;"),
        // The target's server default time zone differs from UTC: both sides must use the same.
        &format!(
            "ALTER DATABASE dst SET TimeZone = 'Asia/Kolkata'; {IDENTITY_SCHEMA}{IDENTITY_DATA}"
        ),
    )
    .await;
    let source = cluster.connect("src").await.unwrap();
    let target = cluster.connect("dst").await.unwrap();
    let tables = verify::published_tables(&source, "walshift").await.unwrap();
    assert_eq!(
        tables,
        vec![
            TableName::new("public", "Odd \"Name\""),
            TableName::new("public", "items"),
            TableName::new("public", "line_items"),
        ]
    );
    let opts = VerifyOptions::default();
    let report = verify::verify(&source, &target, &Mapping::identity(), &tables, &opts)
        .await
        .unwrap();
    assert!(report.equal(), "{report:#?}");
    let items = &report.tables[1];
    assert_eq!((items.source_rows, items.target_rows), (300, 300));
    assert_eq!(items.source_checksum, items.target_checksum);
    assert_eq!(items.columns.len(), 11);
    assert!(items.differences.is_empty());

    // The sessions are left as they were: no open transaction, no changed setting.
    let tz: String = target
        .query_one("SELECT current_setting('TimeZone')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tz, "Asia/Kolkata");
    target.batch_execute("BEGIN; COMMIT").await.unwrap();

    // One changed row, one deleted, one added, one changed in a composite-key table.
    cluster
        .execute(
            "dst",
            "UPDATE items SET doc = doc || '{\"h\": \"y\"}' WHERE id = 42;
             DELETE FROM items WHERE id = 100;
             INSERT INTO items (id, name) VALUES (1000, 'new');
             UPDATE line_items SET qty = 0 WHERE order_id = 3 AND line = 2;
             UPDATE \"Odd \"\"Name\"\"\" SET \"v,al\" = NULL WHERE \"Key\" = 3;",
        )
        .await
        .unwrap();
    let report = verify::verify(&source, &target, &Mapping::identity(), &tables, &opts)
        .await
        .unwrap();
    assert!(!report.equal());
    // Key order is the key's text, bytewise: "100" < "1000" < "42".
    assert_eq!(
        report.tables[1].differences,
        vec![
            diff("100", DifferenceKind::MissingOnTarget),
            diff("1000", DifferenceKind::ExtraOnTarget),
            diff("42", DifferenceKind::Different),
        ]
    );
    assert_eq!(
        (report.tables[1].source_rows, report.tables[1].target_rows),
        (300, 300)
    );
    assert_eq!(
        report.tables[2].differences,
        vec![diff("(3,2)", DifferenceKind::Different)]
    );
    assert_eq!(report.tables[2].key, vec!["order_id", "line"]);
    // NULL and the empty string are told apart.
    assert_eq!(
        report.tables[0].differences,
        vec![diff("3", DifferenceKind::Different)]
    );

    // max_keys bounds the list; 0 compares counts and checksums only.
    let few = VerifyOptions {
        max_keys: 2,
        fetch_rows: 7,
        ..VerifyOptions::default()
    };
    let report = verify::verify(&source, &target, &Mapping::identity(), &tables, &few)
        .await
        .unwrap();
    assert_eq!(report.tables[1].differences.len(), 2);
    let none = VerifyOptions {
        max_keys: 0,
        ..VerifyOptions::default()
    };
    let report = verify::verify(&source, &target, &Mapping::identity(), &tables, &none)
        .await
        .unwrap();
    assert!(!report.equal() && report.tables.iter().all(|t| t.differences.is_empty()));

    // A table that is not on the source is a clear error, and leaves no transaction open.
    let err = verify::verify(
        &source,
        &target,
        &Mapping::identity(),
        &names(&["nope"]),
        &opts,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("public.nope"), "{err}");
    let err = verify::published_tables(&source, "other")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--tables"), "{err}");
}

/// The release: `customers` becomes `clients` (renamed key, computed name and cents, an enum
/// that exists only on the target, deleted customers filtered out, a defaulted new column) plus
/// `client_contacts` (split off); `orders` stays as it is.
const SOURCE: &str = "
CREATE TABLE customers (id int PRIMARY KEY, first text, last text, email text, status text,
                        amount numeric(10,2));
INSERT INTO customers
SELECT g, 'First' || g, 'Last' || g, 'E' || g || '@Example.COM',
       CASE WHEN g % 5 = 0 THEN 'deleted' ELSE 'active' END, g * 1.25
FROM generate_series(1, 500) g;
CREATE TABLE orders (id int PRIMARY KEY, customer_id int, total numeric);
INSERT INTO orders SELECT g, g % 500 + 1, g * 0.5 FROM generate_series(1, 200) g;
";

const TARGET: &str = "
CREATE TYPE tier AS ENUM ('low', 'high');
CREATE TABLE clients (client_id int PRIMARY KEY, full_name text NOT NULL, amount_cents bigint,
                      tier tier, created_at timestamptz NOT NULL DEFAULT now());
INSERT INTO clients (client_id, full_name, amount_cents, tier)
SELECT g, 'First' || g || ' Last' || g, (g * 1.25 * 100)::bigint,
       CASE WHEN g * 1.25 > 100 THEN 'high' ELSE 'low' END::tier
FROM generate_series(1, 500) g WHERE g % 5 <> 0;
CREATE TABLE client_contacts (client_id int PRIMARY KEY, email text);
INSERT INTO client_contacts SELECT g, lower('E' || g || '@Example.COM') FROM generate_series(1, 500) g;
CREATE TABLE orders (id int PRIMARY KEY, customer_id int, total numeric);
INSERT INTO orders SELECT g, g % 500 + 1, g * 0.5 FROM generate_series(1, 200) g;
";

const MAPPING: &str = r#"
[[table]]
source = "customers"
target = "clients"
filter = "status <> 'deleted'"
[table.columns]
client_id = "id"
full_name = "first || ' ' || last"
amount_cents = "(amount * 100)::bigint"
tier = "CASE WHEN amount > 100 THEN 'high' ELSE 'low' END"

[[table]]
source = "customers"
target = "client_contacts"
[table.columns]
client_id = "id"
email = "lower(email)"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_mapping_library_and_cli() {
    let cluster = two_databases(SOURCE, TARGET).await;
    let source = cluster.connect("src").await.unwrap();
    let target = cluster.connect("dst").await.unwrap();
    let mapping = Mapping::parse("release.toml", MAPPING).unwrap();
    let tables = names(&["customers", "orders"]);
    let opts = VerifyOptions::default();
    let report = verify::verify(&source, &target, &mapping, &tables, &opts)
        .await
        .unwrap();
    assert!(report.equal(), "{report:#?}");
    let targets: Vec<String> = report.tables.iter().map(|t| t.target.to_string()).collect();
    assert_eq!(
        targets,
        ["public.clients", "public.client_contacts", "public.orders"]
    );
    let clients = &report.tables[0];
    assert_eq!((clients.source_rows, clients.target_rows), (400, 400));
    assert_eq!(
        clients.columns,
        ["client_id", "full_name", "amount_cents", "tier"],
        "the defaulted column is not compared"
    );
    assert_eq!(report.tables[1].source_rows, 500);
    // Counts only: the source still applies the filter.
    let counts = VerifyOptions {
        checksums: false,
        ..VerifyOptions::default()
    };
    let report = verify::verify(&source, &target, &mapping, &tables, &counts)
        .await
        .unwrap();
    assert!(report.equal(), "{report:#?}");
    assert_eq!(report.tables[0].source_rows, 400);
    assert_eq!(report.tables[0].source_checksum, "");

    // Without the mapping the same target is not what the source says.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("release.toml");
    std::fs::write(&file, MAPPING).unwrap();
    let src = cluster.conn_string("src");
    let dst = cluster.conn_string("dst");
    let base = ["verify", "--source", &src, "--target", &dst];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        walshift(&args)
    };
    let ok = run(&[
        "--transform",
        file.to_str().unwrap(),
        "--tables",
        "customers,orders",
    ]);
    let out = stdout(&ok);
    assert_eq!(ok.status.code(), Some(0), "{out}{}", stderr(&ok));
    assert!(
        out.contains("public.customers → public.clients") && out.contains("3 tables equal"),
        "{out}"
    );

    // Change one row, delete one, add one that the filter keeps out of the target.
    cluster
        .execute(
            "dst",
            "UPDATE clients SET full_name = 'Someone Else' WHERE client_id = 7;
             DELETE FROM clients WHERE client_id = 8;
             INSERT INTO clients (client_id, full_name) VALUES (5, 'First5 Last5');",
        )
        .await
        .unwrap();
    let report = verify::verify(&source, &target, &mapping, &tables, &opts)
        .await
        .unwrap();
    assert!(!report.equal());
    let clients = &report.tables[0];
    assert!(!clients.equal);
    assert_eq!(clients.target_rows, 400);
    let got: Vec<(&str, DifferenceKind)> = clients
        .differences
        .iter()
        .map(|d| (d.key.as_str(), d.kind))
        .collect();
    assert_eq!(
        got,
        [
            ("5", DifferenceKind::ExtraOnTarget),
            ("7", DifferenceKind::Different),
            ("8", DifferenceKind::MissingOnTarget),
        ]
    );
    assert!(report.tables[1].equal && report.tables[2].equal);
    // Counts only sees one row deleted and one added as equal: that is what checksums are for.
    let report = verify::verify(&source, &target, &mapping, &tables, &counts)
        .await
        .unwrap();
    assert!(report.equal());

    let differs = run(&[
        "--transform",
        file.to_str().unwrap(),
        "--tables",
        "customers,orders",
    ]);
    let out = stdout(&differs);
    assert_eq!(differs.status.code(), Some(3), "{out}");
    assert!(out.contains("extra on target"), "{out}");
    assert!(out.contains("(client_id) = 8"), "{out}");
    assert!(out.contains("1 of 3 tables differ"), "{out}");

    let json = run(&[
        "--transform",
        file.to_str().unwrap(),
        "--tables",
        "customers",
        "--json",
    ]);
    assert_eq!(json.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["tables"][0]["target"], "public.clients");
    assert_eq!(v["tables"][0]["equal"], false);
    assert_eq!(
        v["tables"][0]["differences"][2]["kind"],
        "missing_on_target"
    );
    assert_eq!(v["tables"][1]["equal"], true);

    // Could not verify: no publication, a mapping that does not compile. Exit 1, clear message.
    let e = run(&[]);
    assert_eq!(e.status.code(), Some(1));
    let err = stderr(&e);
    assert!(
        err.contains("publication \"walshift\" does not exist"),
        "{err}"
    );
    std::fs::write(&file, MAPPING.replace("lower(email)", "lower(emial)")).unwrap();
    let e = run(&[
        "--transform",
        file.to_str().unwrap(),
        "--tables",
        "customers",
    ]);
    assert_eq!(e.status.code(), Some(1));
    let err = stderr(&e);
    assert!(err.contains("release.toml:"), "{err}");
}

/// A keyless table (REPLICA IDENTITY FULL, no primary key — replay copies it onto itself) is
/// compared as a multiset of whole rows, with or without a mapping naming other tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_table_is_compared_as_rows() {
    let schema = "CREATE TABLE log (at int, msg text); ALTER TABLE log REPLICA IDENTITY FULL;
                  CREATE TABLE acc (id int PRIMARY KEY, v int);
                  INSERT INTO log VALUES (1, 'a'), (1, 'a'), (2, NULL), (3, 'c');
                  INSERT INTO acc VALUES (1, 10);";
    let cluster = two_databases(
        schema,
        &format!("{schema} ALTER TABLE acc RENAME COLUMN v TO w; ALTER TABLE log ADD COLUMN note text DEFAULT 'x';"),
    )
    .await;
    let source = cluster.connect("src").await.unwrap();
    let target = cluster.connect("dst").await.unwrap();
    let mapping = Mapping::parse(
        "release.toml",
        "[[table]]\nsource = \"acc\"\n[table.columns]\nw = \"v\"\n",
    )
    .unwrap();
    let tables = names(&["log", "acc"]);
    let opts = VerifyOptions::default();
    let report = verify::verify(&source, &target, &mapping, &tables, &opts)
        .await
        .unwrap();
    assert!(report.equal(), "{report:#?}");
    let log = &report.tables[0];
    assert_eq!(log.target, TableName::new("public", "log"));
    assert_eq!((log.source_rows, log.target_rows), (4, 4));
    assert_eq!(
        log.columns,
        ["at", "msg"],
        "the added column is not compared"
    );
    assert!(log.key.is_empty());

    // One duplicate gone, one row changed: named by their whole text.
    cluster
        .execute(
            "dst",
            "DELETE FROM log WHERE ctid = (SELECT min(ctid) FROM log WHERE at = 1);
             UPDATE log SET msg = 'C' WHERE at = 3;",
        )
        .await
        .unwrap();
    let report = verify::verify(
        &source,
        &target,
        &Mapping::identity(),
        &names(&["log"]),
        &opts,
    )
    .await
    .unwrap();
    assert!(!report.equal());
    assert_eq!(
        report.tables[0].differences,
        vec![
            diff("(1,a)", DifferenceKind::MissingOnTarget),
            diff("(3,C)", DifferenceKind::ExtraOnTarget),
            diff("(3,c)", DifferenceKind::MissingOnTarget),
        ]
    );

    // A column the target lacks is an error naming it.
    cluster
        .execute("dst", "ALTER TABLE log DROP COLUMN msg")
        .await
        .unwrap();
    let err = verify::verify(
        &source,
        &target,
        &Mapping::identity(),
        &names(&["log"]),
        &opts,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("public.log") && err.contains("\"msg\""),
        "{err}"
    );
}
