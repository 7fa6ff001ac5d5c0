//! `walshift migrate` against real throwaway clusters: scripts run in order, each recorded in
//! the target in the same transaction; a rerun skips them; a changed script is refused before
//! anything runs; a failing script is rolled back whole with its file and line named, and the
//! scripts after it do not run; `-- walshift:no-transaction`; two runs never interleave; and the
//! command line's output and exit codes.

mod common;

use std::path::{Path, PathBuf};

use common::cli::{self, walshift};
use walshift::conn::ConnInfo;
use walshift::localpg::Cluster;
use walshift::migrate::{self, MigrateError, MigrateOptions, MigrateReport, ScriptStatus};

fn write(dir: &Path, name: &str, sql: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, sql).unwrap();
    p
}

async fn run(
    cluster: &Cluster,
    paths: &[PathBuf],
    dry_run: bool,
) -> Result<MigrateReport, MigrateError> {
    let scripts = migrate::load_scripts(paths)?;
    let mut opts = MigrateOptions::new(common::pair::conn(cluster));
    opts.dry_run = dry_run;
    migrate::migrate(&opts, &scripts, |_| {}).await
}

async fn strings(cluster: &Cluster, sql: &str) -> Vec<String> {
    let c = cluster.connect("postgres").await.unwrap();
    c.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

fn statuses(r: &MigrateReport) -> Vec<ScriptStatus> {
    r.scripts.iter().map(|s| s.status).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_run_in_order_are_recorded_and_a_rerun_skips_them() {
    let cluster = common::cluster();
    let dir = tempfile::tempdir().unwrap();
    // Given out of alphabetical order on purpose: the order given is the order run.
    let paths = vec![
        write(
            dir.path(),
            "b_create.sql",
            "CREATE TABLE log (n serial PRIMARY KEY, what text);\nINSERT INTO log (what) VALUES ('b');",
        ),
        write(
            dir.path(),
            "a_fill.sql",
            "-- adds a row\nINSERT INTO log (what) VALUES ('a');\nDO $$ BEGIN RAISE NOTICE 'hello'; END $$;",
        ),
        write(dir.path(), "c_empty.sql", "-- nothing to do\n"),
    ];
    let report = run(&cluster, &paths, false).await.unwrap();
    assert_eq!(statuses(&report), vec![ScriptStatus::Applied; 3]);
    assert_eq!(report.applied, 3);
    assert!(report.scripts.iter().all(|s| s.duration_ms.is_some()));
    assert_eq!(
        strings(&cluster, "SELECT what FROM log ORDER BY n").await,
        ["b", "a"],
        "b_create ran before a_fill"
    );
    let recorded = strings(
        &cluster,
        // An empty script's duration may round to 0 µs; the others ran statements.
        "SELECT name || ' ' || sha256 || ' ' \
         || (duration > interval '0' OR (name = 'c_empty.sql' AND duration = interval '0')) \
         || ' ' || no_transaction \
         FROM walshift.migrations ORDER BY applied_at",
    )
    .await;
    let sha = |p: &PathBuf| migrate::Script::load(p).unwrap().sha256;
    assert_eq!(
        recorded,
        paths
            .iter()
            .map(|p| format!(
                "{} {} true false",
                p.file_name().unwrap().to_str().unwrap(),
                sha(p)
            ))
            .collect::<Vec<_>>()
    );

    // A rerun with one more script: the three are skipped, the new one runs.
    let mut more = paths.clone();
    more.push(write(
        dir.path(),
        "d_more.sql",
        "INSERT INTO log (what) VALUES ('d');",
    ));
    let report = run(&cluster, &more, false).await.unwrap();
    assert_eq!(
        statuses(&report),
        [
            ScriptStatus::Skipped,
            ScriptStatus::Skipped,
            ScriptStatus::Skipped,
            ScriptStatus::Applied
        ]
    );
    assert!(report.scripts[0].applied_at.is_some());
    assert_eq!(
        strings(&cluster, "SELECT what FROM log ORDER BY n").await,
        ["b", "a", "d"]
    );
    // Dry run: nothing left to do.
    let report = run(&cluster, &more, true).await.unwrap();
    assert_eq!(statuses(&report), vec![ScriptStatus::Skipped; 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_script_is_refused_before_anything_runs() {
    let cluster = common::cluster();
    let dir = tempfile::tempdir().unwrap();
    let one = write(dir.path(), "001_t.sql", "CREATE TABLE t (id int);");
    run(&cluster, std::slice::from_ref(&one), false)
        .await
        .unwrap();
    write(dir.path(), "001_t.sql", "CREATE TABLE t (id bigint);");
    let two = write(dir.path(), "002_u.sql", "CREATE TABLE u (id int);");
    // The changed script comes after the new one: still nothing runs.
    let err = run(&cluster, &[two.clone(), one.clone()], false)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, MigrateError::ChecksumMismatch { changed, .. } if changed[0].name == "001_t.sql"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("\"001_t.sql\"") && msg.contains("nothing was run"),
        "{msg}"
    );
    assert_eq!(
        strings(&cluster, "SELECT coalesce(to_regclass('u')::text, '-')").await,
        ["-"]
    );
    // Dry run says the same.
    assert!(matches!(
        run(&cluster, &[one, two], true).await,
        Err(MigrateError::ChecksumMismatch { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_script_is_rolled_back_names_its_line_and_stops_the_run() {
    let cluster = common::cluster();
    let dir = tempfile::tempdir().unwrap();
    let paths = vec![
        write(
            dir.path(),
            "001_ok.sql",
            "CREATE TABLE a (id int PRIMARY KEY);",
        ),
        write(
            dir.path(),
            "002_bad.sql",
            "CREATE TABLE b (id int);\nINSERT INTO b VALUES (1);\n\nSELECT id,\n       nope FROM b;\n",
        ),
        write(dir.path(), "003_later.sql", "CREATE TABLE c (id int);"),
    ];
    let err = run(&cluster, &paths, false).await.unwrap_err();
    match &err {
        MigrateError::ScriptFailed {
            name,
            line,
            not_run,
            ..
        } => {
            assert_eq!(
                (name.as_str(), *line, *not_run),
                ("002_bad.sql", Some(5), 1)
            );
        }
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("\"002_bad.sql\" line 5")
            && msg.contains("column \"nope\" does not exist")
            && msg.contains("rolled back"),
        "{msg}"
    );
    assert_eq!(
        strings(
            &cluster,
            "SELECT coalesce(to_regclass('a')::text, '-') || coalesce(to_regclass('b')::text, '-') \
             || coalesce(to_regclass('c')::text, '-')"
        )
        .await,
        ["a--"],
        "001 applied, 002 rolled back, 003 not run"
    );
    assert_eq!(
        strings(&cluster, "SELECT name FROM walshift.migrations").await,
        ["001_ok.sql"]
    );

    // An error without a position (a key violation) names the failing statement's line.
    let dup = write(
        dir.path(),
        "004_dup.sql",
        "INSERT INTO a VALUES (1);\n-- again\nINSERT INTO a\n  VALUES (1);",
    );
    let err = run(&cluster, &[paths[0].clone(), dup], false)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, MigrateError::ScriptFailed { line: Some(3), .. }),
        "{err:?}"
    );
    assert_eq!(
        strings(&cluster, "SELECT count(*)::text FROM a").await,
        ["0"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_that_cannot_run_in_a_transaction_and_the_no_transaction_directive() {
    let cluster = common::cluster();
    cluster
        .execute(
            "postgres",
            "CREATE TABLE t (id int, v text); INSERT INTO t SELECT g, 'x' FROM generate_series(1, 100) g;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cic = "ALTER TABLE t ADD COLUMN w int;\nCREATE INDEX CONCURRENTLY t_v ON t (v);\n";
    let plain = write(dir.path(), "001_idx.sql", cic);
    let err = run(&cluster, std::slice::from_ref(&plain), false)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, MigrateError::NeedsNoTransaction { line: Some(2), .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("-- walshift:no-transaction") && msg.contains("rolled back"),
        "{msg}"
    );
    assert_eq!(
        strings(
            &cluster,
            "SELECT count(*)::text FROM information_schema.columns WHERE table_name = 't' AND column_name = 'w'"
        )
        .await,
        ["0"],
        "the ALTER before it was rolled back"
    );

    // Its own BEGIN/COMMIT: refused before anything runs, even the scripts before it.
    let first = write(dir.path(), "000_first.sql", "CREATE TABLE first (id int);");
    let txn = write(
        dir.path(),
        "002_txn.sql",
        "UPDATE t SET v = 'y';\nBEGIN;\nUPDATE t SET v = 'z';\nCOMMIT;\n",
    );
    let err = run(&cluster, &[first.clone(), txn], false)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, MigrateError::TransactionControl { line: 2, .. }),
        "{err:?}"
    );
    assert_eq!(
        strings(&cluster, "SELECT coalesce(to_regclass('first')::text, '-')").await,
        ["-"]
    );

    // With the directive: statement by statement, its own transactions allowed, recorded after.
    let nt = write(
        dir.path(),
        "003_idx.sql",
        &format!(
            "-- walshift:no-transaction\n{cic}BEGIN;\nUPDATE t SET w = id;\nCOMMIT;\nVACUUM (ANALYZE) t;\n"
        ),
    );
    let report = run(&cluster, &[first, nt.clone()], false).await.unwrap();
    assert!(report.scripts[1].no_transaction);
    assert_eq!(
        strings(
            &cluster,
            "SELECT indisvalid::text FROM pg_index WHERE indexrelid = 't_v'::regclass \
             UNION ALL SELECT sum(w)::text FROM t \
             UNION ALL SELECT no_transaction::text FROM walshift.migrations WHERE name = '003_idx.sql'"
        )
        .await,
        ["true", "5050", "true"]
    );

    // A failing no-transaction script: earlier statements stay, the script is not recorded.
    let nt_bad = write(
        dir.path(),
        "004_bad.sql",
        "-- walshift:no-transaction\nCREATE TABLE kept (id int);\nCREATE INDEX CONCURRENTLY ON nowhere (id);\n",
    );
    let err = run(&cluster, &[nt_bad], false).await.unwrap_err();
    assert!(
        matches!(
            &err,
            MigrateError::ScriptFailed {
                line: Some(3),
                no_transaction: true,
                committed: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("stay committed"), "{err}");
    assert_eq!(
        strings(
            &cluster,
            "SELECT coalesce(to_regclass('kept')::text, '-') UNION ALL \
             SELECT count(*)::text FROM walshift.migrations WHERE name = '004_bad.sql'"
        )
        .await,
        ["kept", "0"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_at_once_do_not_interleave() {
    let cluster = common::cluster();
    cluster
        .execute("postgres", "CREATE TABLE hits (at timestamptz)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let paths = vec![write(
        dir.path(),
        "001_slow.sql",
        "INSERT INTO hits VALUES (clock_timestamp());\nSELECT pg_sleep(0.7);",
    )];
    let conn = ConnInfo::parse(&cluster.conn_string("postgres")).unwrap();
    let scripts = migrate::load_scripts(&paths).unwrap();
    let go = |waited: std::sync::Arc<std::sync::atomic::AtomicBool>| {
        let opts = MigrateOptions::new(conn.clone());
        let scripts = scripts.clone();
        tokio::spawn(async move {
            migrate::migrate(&opts, &scripts, |p| {
                if matches!(p, migrate::Progress::WaitingForLock) {
                    waited.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            })
            .await
        })
    };
    let flags: Vec<_> = (0..2)
        .map(|_| std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)))
        .collect();
    let a = go(flags[0].clone());
    let b = go(flags[1].clone());
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    let mut got = vec![a.scripts[0].status, b.scripts[0].status];
    got.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(got, [ScriptStatus::Applied, ScriptStatus::Skipped]);
    assert!(
        flags
            .iter()
            .any(|f| f.load(std::sync::atomic::Ordering::SeqCst)),
        "one run waited for the other"
    );
    assert_eq!(
        strings(&cluster, "SELECT count(*)::text FROM hits").await,
        ["1"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_output_json_dry_run_and_exit_codes() {
    let cluster = common::cluster();
    let conn = cluster.conn_string("postgres");
    let dir = tempfile::tempdir().unwrap();
    let one = write(dir.path(), "001_a.sql", "CREATE TABLE a (id int);");
    let two = write(
        dir.path(),
        "002_b.sql",
        "-- walshift:no-transaction\nCREATE INDEX CONCURRENTLY a_id ON a (id);",
    );
    let (one, two) = (one.to_str().unwrap(), two.to_str().unwrap());

    let out = walshift(&["migrate", "--target", &conn, "--dry-run", one, two]);
    let stdout = cli::stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("would run  001_a.sql") && stdout.contains("002_b.sql (no transaction)"),
        "{stdout}"
    );
    assert_eq!(
        strings(
            &cluster,
            "SELECT coalesce(to_regclass('walshift.migrations')::text, '-')"
        )
        .await,
        ["-"],
        "a dry run creates nothing"
    );

    let out = walshift(&["migrate", "--target", &conn, one, two]);
    let stdout = cli::stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("applied    001_a.sql")
            && stdout.contains(" ms")
            && stdout.contains("2 applied"),
        "{stdout}"
    );

    let out = walshift(&["migrate", "--target", &conn, "--json", one, two]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["skipped"], 2);
    assert_eq!(v["scripts"][1]["status"], "skipped");
    assert_eq!(v["scripts"][1]["no_transaction"], true);

    let bad = write(
        dir.path(),
        "003_bad.sql",
        "SELECT 1;\n\nSELECT * FROM missing;\n",
    );
    let later = write(dir.path(), "004_later.sql", "CREATE TABLE later (id int);");
    let out = walshift(&[
        "migrate",
        "--target",
        &conn,
        "--json",
        one,
        bad.to_str().unwrap(),
        later.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = cli::stderr(&out);
    assert!(
        stderr.contains("\"003_bad.sql\" line 3")
            && stderr.contains("relation \"missing\" does not exist")
            && stderr.contains("1 later script(s) not run"),
        "{stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["scripts"].as_array().unwrap().len(), 1, "{v}");
    assert!(v["error"].as_str().unwrap().contains("003_bad.sql"));

    // Usage and file errors: non-zero, clear.
    let out = walshift(&["migrate", "--target", &conn]);
    assert!(!out.status.success());
    let out = walshift(&["migrate", "--target", &conn, "/nonexistent/x.sql"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(cli::stderr(&out).contains("/nonexistent/x.sql"));
    // Passwords never printed.
    let out = walshift(&[
        "migrate",
        "--target",
        "host=127.0.0.1 port=1 user=u password=s3cret dbname=d connect_timeout=2",
        one,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = cli::stderr(&out);
    assert!(
        stderr.contains("cannot connect") && !stderr.contains("s3cret"),
        "{stderr}"
    );
}
