//! Verify evaluates the mapping's expressions on the live source (issue 13, hygiene): an
//! expression or filter naming a volatile function (`pg_terminate_backend`, `nextval`,
//! `random`) is refused before anything is read, with the file line and the column; the reads
//! that do run are read-only (a write through a function fails and writes nothing) and
//! limited by a statement timeout. The source and the target are two databases of one cluster.

mod common;

use std::time::Duration;

use walshift::localpg::Cluster;
use walshift::transform::{Mapping, TableName};
use walshift::verify::{self, VerifyError, VerifyOptions};

const SOURCE: &str = "
CREATE TABLE orders (id int PRIMARY KEY, amount int NOT NULL);
INSERT INTO orders SELECT g, g FROM generate_series(1, 50) g;
CREATE TABLE audit (at timestamptz DEFAULT now());
CREATE SEQUENCE ticket;
-- A write hidden behind a function that claims to be STABLE.
CREATE FUNCTION log_read() RETURNS int VOLATILE LANGUAGE sql AS 'INSERT INTO audit DEFAULT VALUES RETURNING 1';
CREATE FUNCTION audited(v int) RETURNS int STABLE LANGUAGE plpgsql AS $$ BEGIN PERFORM log_read(); RETURN v; END $$;
";

const TARGET: &str = "
CREATE TABLE orders (id int PRIMARY KEY, amount_cents bigint NOT NULL);
INSERT INTO orders SELECT g, g * 100 FROM generate_series(1, 50) g;
CREATE SEQUENCE ticket;
CREATE FUNCTION audited(v int) RETURNS int STABLE LANGUAGE sql AS 'SELECT v';
";

fn mapping(expr: &str, filter: Option<&str>) -> String {
    format!(
        "[[table]]\nsource = \"orders\"\ntarget = \"orders\"\n{}drop = []\n\n[table.columns]\namount_cents = \"{expr}\"\n",
        filter
            .map(|f| format!("filter = \"{f}\"\n"))
            .unwrap_or_default()
    )
}

async fn setup() -> Cluster {
    common::pair::two_databases(SOURCE, TARGET).await
}

fn refused(r: Result<verify::VerifyReport, VerifyError>) -> String {
    match r {
        Err(e @ VerifyError::VolatileExpression { .. }) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_functions_in_mapping_expressions_are_refused_on_the_source() {
    let cluster = setup().await;
    let source = cluster.connect("src").await.unwrap();
    let target = cluster.connect("dst").await.unwrap();
    let tables = vec![TableName::new("public", "orders")];
    let opts = VerifyOptions::default();

    // A session on the source that a mapping tries to kill.
    let victim = cluster.connect("src").await.unwrap();
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let text = mapping(
        &format!("CASE WHEN pg_terminate_backend({pid}) THEN amount * 100 ELSE amount * 100 END"),
        None,
    );
    let m = Mapping::parse("release.toml", &text).unwrap();
    let e = refused(verify::verify(&source, &target, &m, &tables, &opts).await);
    assert!(
        e.contains("release.toml:7:")
            && e.contains("column \"amount_cents\" of public.orders")
            && e.contains("pg_catalog.pg_terminate_backend(")
            && e.contains("VOLATILE"),
        "{e}"
    );
    victim
        .batch_execute("SELECT 1")
        .await
        .expect("the session on the source is alive");

    // nextval and random, qualified or not; a volatile filter is refused even for counts.
    let m = Mapping::parse(
        "release.toml",
        &mapping("amount * 100 + 0 * pg_catalog.nextval('ticket')", None),
    )
    .unwrap();
    let e = refused(verify::verify(&source, &target, &m, &tables, &opts).await);
    assert!(e.contains("pg_catalog.nextval(regclass)"), "{e}");
    let counts = VerifyOptions {
        checksums: false,
        max_keys: 0,
        ..VerifyOptions::default()
    };
    let m = Mapping::parse(
        "release.toml",
        &mapping("amount * 100", Some("random() < 2")),
    )
    .unwrap();
    let e = refused(verify::verify(&source, &target, &m, &tables, &counts).await);
    assert!(
        e.contains(
            "release.toml:4: the filter of public.orders (random() < 2) calls pg_catalog.random()"
        ),
        "{e}"
    );
    // Counts only evaluate no column expression: nextval there is never run, so allowed.
    let m = Mapping::parse(
        "release.toml",
        &mapping("amount * 100 + 0 * nextval('ticket')", None),
    )
    .unwrap();
    let report = verify::verify(&source, &target, &m, &tables, &counts)
        .await
        .unwrap();
    assert!(report.equal(), "{report:#?}");
    let last: i64 = source
        .query_one("SELECT last_value FROM ticket", &[])
        .await
        .unwrap()
        .get(0);
    let called: bool = source
        .query_one("SELECT is_called FROM ticket", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        (last, called),
        (1, false),
        "the source's sequence never moved"
    );

    // The command says the same, with the file's path.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("release.toml");
    std::fs::write(&file, mapping("amount * 100 + 0 * nextval('ticket')", None)).unwrap();
    let out = common::cli::command(&["verify", "--source", &cluster.conn_string("src")])
        .args([
            "--target",
            &cluster.conn_string("dst"),
            "--tables",
            "orders",
        ])
        .arg("--transform")
        .arg(&file)
        .output()
        .unwrap();
    let err = common::cli::stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{}:7: column \"amount_cents\"", file.display()))
            && err.contains("nextval"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_reads_are_read_only_and_time_limited() {
    let cluster = setup().await;
    let source = cluster.connect("src").await.unwrap();
    let target = cluster.connect("dst").await.unwrap();
    let tables = vec![TableName::new("public", "orders")];

    // A STABLE function writing through a volatile one it calls: not caught by name, stopped
    // by the read-only transaction.
    let m = Mapping::parse("release.toml", &mapping("audited(amount) * 100", None)).unwrap();
    let e = verify::verify(&source, &target, &m, &tables, &VerifyOptions::default())
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("read-only transaction"), "{e:?}");
    let written: i64 = source
        .query_one("SELECT count(*) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(written, 0, "nothing was written on the source");

    // A runaway expression is cancelled by the source's statement timeout.
    let m = Mapping::parse(
        "release.toml",
        &mapping(
            "amount * 100 + 0 * (SELECT count(*) FROM generate_series(1, 200000000))",
            None,
        ),
    )
    .unwrap();
    let opts = VerifyOptions {
        source_statement_timeout: Some(Duration::from_millis(300)),
        ..VerifyOptions::default()
    };
    let started = std::time::Instant::now();
    let e = verify::verify(&source, &target, &m, &tables, &opts)
        .await
        .unwrap_err();
    assert!(
        format!("{e:?}").contains("statement timeout") && e.to_string().contains("300ms"),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    // The session is usable afterwards, without the limit.
    let timeout: String = source
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "0");
}
