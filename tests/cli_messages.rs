//! Messages of the command line (issue 13, hygiene): each cause said once in an error chain,
//! a misspelt column in a mapping named as such (not as another column that "goes nowhere"),
//! and table names with commas in `--tables`, quoted as SQL identifiers.

mod common;

use common::cli::{stderr, stdout, walshift};

/// The line walshift prints its error on.
fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"))
}

#[test]
fn an_error_chain_says_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let buf = dir.path().join("buf");
    // Nothing listens on port 1: the clone's connection to the target is refused.
    let o = walshift(&[
        "run",
        "--source",
        "postgresql://nobody@127.0.0.1:1/x?connect_timeout=2",
        "--target",
        "postgresql://nobody@127.0.0.1:1/y?connect_timeout=2",
        "--buffer",
        buf.to_str().unwrap(),
        "--no-progress",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let line = error_line(&err);
    for part in [
        "cannot connect to host=127.0.0.1 port=1",
        "Connection refused",
    ] {
        assert_eq!(line.matches(part).count(), 1, "{part:?} repeated: {line}");
    }
}

/// A refused connection to `walshift run`'s target is labelled as what failed — the clone
/// target — not as a capture failure (the source was fine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_names_the_clone_target_when_it_cannot_connect() {
    let source = common::cluster();
    let dir = tempfile::tempdir().unwrap();
    let buf = dir.path().join("buf");
    let o = walshift(&[
        "run",
        "--source",
        &source.conn_string("postgres"),
        "--target",
        "postgresql://nobody@127.0.0.1:1/y?connect_timeout=2",
        "--buffer",
        buf.to_str().unwrap(),
        "--no-progress",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let line = error_line(&err);
    assert!(
        line.contains("clone target") && line.contains("port=1"),
        "{line}"
    );
    assert!(!line.contains("capture failed"), "{line}");
    let slots: i64 = source
        .connect("postgres")
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "nothing created on the source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misspelt_mapping_columns_and_quoted_table_names() {
    let both = "CREATE TABLE \"a,b\" (id int PRIMARY KEY, v text);
                CREATE TABLE c (id int PRIMARY KEY);
                INSERT INTO \"a,b\" SELECT g, 'v' || g FROM generate_series(1, 10) g;
                INSERT INTO c SELECT generate_series(1, 5);";
    let cluster = common::pair::two_databases(
        &format!("{both} CREATE TABLE customers (id int PRIMARY KEY, first text, last text);"),
        &format!("{both} CREATE TABLE clients (id int PRIMARY KEY, full_name text);"),
    )
    .await;
    let (src, dst) = (cluster.conn_string("src"), cluster.conn_string("dst"));

    let o = walshift(&[
        "verify",
        "--source",
        &src,
        "--target",
        &dst,
        "--tables",
        "\"a,b\", public.c",
    ]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(
        out.contains("public.a,b") && out.contains("public.c") && out.contains("2 tables equal"),
        "{out}"
    );
    let o = walshift(&[
        "verify", "--source", &src, "--target", &dst, "--tables", "\"a,b",
    ]);
    assert!(
        stderr(&o).contains("unterminated double quote"),
        "{}",
        stderr(&o)
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("release.toml");
    std::fs::write(
        &file,
        "[[table]]\nsource = \"customers\"\ntarget = \"clients\"\n\n[table.columns]\n\
         full_name = \"first || ' ' || lst\"\n",
    )
    .unwrap();
    let o = walshift(&[
        "transform",
        "check",
        "--transform",
        file.to_str().unwrap(),
        "--target",
        &dst,
        "--source",
        &src,
    ]);
    let err = stderr(&o);
    assert_ne!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!("{}:6:", file.display()))
            && err.contains("reads a column the source table public.customers does not have")
            && err.contains("column \"lst\" does not exist")
            && err.contains("Its columns: id, first, last")
            && !err.contains("goes nowhere"),
        "{err}"
    );
}
