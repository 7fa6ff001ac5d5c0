//! The `walshift` binary as an operator meets it: preflight refusals, clean stop on a signal,
//! and the buffer commands' output. Every refusal must say what is wrong and how to fix it,
//! exit non-zero, and leave nothing half-created.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::cli::{stderr, stdout, walshift};
use walshift::localpg::{Cluster, ClusterOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_without_key_is_refused_before_anything_is_created() {
    let cluster = common::cluster();
    cluster
        .execute(
            "postgres",
            "CREATE TABLE good (id int PRIMARY KEY); CREATE TABLE \"Log Lines\" (line text);",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let buf = dir.path().join("buf");
    let out = walshift(&[
        "capture",
        "--source",
        &cluster.conn_string("postgres"),
        "--buffer",
        buf.to_str().unwrap(),
        "--no-progress",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("\"public\".\"Log Lines\""),
        "names the table: {err}"
    );
    assert!(
        err.contains("REPLICA IDENTITY FULL") && err.contains("PRIMARY KEY"),
        "gives the fix: {err}"
    );
    let client = cluster.connect("postgres").await.unwrap();
    let pubs: i64 = client
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    let slots: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((pubs, slots), (0, 0), "no publication or slot left behind");

    // Publishing only the good table works.
    let end = common::capture::current_lsn(&cluster).await.to_string();
    let out = walshift(&[
        "capture",
        "--source",
        &cluster.conn_string("postgres"),
        "--buffer",
        buf.to_str().unwrap(),
        "--tables",
        "good",
        "--until-lsn",
        &end,
        "--no-progress",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_a_clear_error() {
    let cluster =
        Cluster::start(ClusterOptions::default().setting("wal_level", "replica")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = walshift(&[
        "capture",
        "--source",
        &cluster.conn_string("postgres"),
        "--buffer",
        dir.path().to_str().unwrap(),
        "--no-progress",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("wal_level=replica") && err.contains("ALTER SYSTEM SET wal_level = logical"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_flushes_and_exits_cleanly_then_resumes_and_buffer_commands_show_it() {
    let cluster = common::cluster();
    cluster
        .execute("postgres", "CREATE TABLE t (id int PRIMARY KEY, note text)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let buf = dir.path().join("buf");
    let conn = cluster.conn_string("postgres");
    let child = common::cli::command(&[
        "capture",
        "--source",
        &conn,
        "--buffer",
        buf.to_str().unwrap(),
        "--no-progress",
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    while !walshift::buffer::BufferMeta::path(&buf).exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster
        .execute(
            "postgres",
            "INSERT INTO t VALUES (1, 'it''s one'); INSERT INTO t VALUES (2, NULL);",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "Ctrl-C is a clean stop: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("capture stopped"), "{}", stderr(&out));

    // Resume: more changes, then capture to the end of WAL.
    cluster
        .execute(
            "postgres",
            "UPDATE t SET note = 'two' WHERE id = 2; DELETE FROM t WHERE id = 1;",
        )
        .await
        .unwrap();
    let end = common::capture::current_lsn(&cluster).await.to_string();
    let out = walshift(&[
        "capture",
        "--source",
        &conn,
        "--buffer",
        buf.to_str().unwrap(),
        "--until-lsn",
        &end,
        "--no-progress",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = walshift(&["inspect", "--buffer", buf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for want in [
        "INSERT public.t: id='1' note='it''s one'",
        "INSERT public.t: id='2' note=NULL",
        "UPDATE public.t: id='2' note='two'",
        "DELETE public.t: id='1'",
    ] {
        assert!(text.contains(want), "inspect shows {want:?}:\n{text}");
    }
    assert_eq!(
        text.matches("commit ").count(),
        2,
        "two transactions (one per multi-statement batch), each once:\n{text}"
    );

    let out = walshift(&[
        "inspect",
        "--buffer",
        buf.to_str().unwrap(),
        "--json",
        "--limit",
        "1",
    ]);
    let line = stdout(&out);
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
    assert_eq!(v["changes"][0]["op"], "insert");
    assert_eq!(v["changes"][0]["new"]["note"], "it's one");

    let out = walshift(&["status", "--buffer", buf.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["transactions"], 2);
    assert_eq!(v["meta"]["slot"], "walshift");

    let out = walshift(&["buffer", "verify", "--buffer", buf.to_str().unwrap()]);
    assert!(out.status.success() && stdout(&out).contains("2 transactions"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_from_another_source_is_refused() {
    let (a, b) = common::pair::clusters();
    for c in [&a, &b] {
        c.execute("postgres", "CREATE TABLE t (id int PRIMARY KEY)")
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    common::capture::until_now(&a, dir.path()).await;
    let end = common::capture::current_lsn(&b).await.to_string();
    let out = walshift(&[
        "capture",
        "--source",
        &b.conn_string("postgres"),
        "--buffer",
        dir.path().to_str().unwrap(),
        "--until-lsn",
        &end,
        "--no-progress",
    ]);
    assert!(!out.status.success());
    let client = b.connect("postgres").await.unwrap();
    let created: i64 = client
        .query_one("SELECT (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_replication_slots)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(created, 0, "nothing is created on the wrong source");
    assert!(
        stderr(&out).contains("captured from another source"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["inspect", "--buffer", "/nonexistent/walshift-buffer"],
            "does not exist",
        ),
        (
            &["inspect", "--buffer", "/tmp", "--from", "zz/1"],
            "invalid LSN",
        ),
        (
            &[
                "capture",
                "--source",
                "host=127.0.0.1 port=notaport",
                "--buffer",
                "/tmp/x",
            ],
            "connection string",
        ),
    ];
    for (args, want) in cases {
        let out = walshift(args);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
}
