//! The replication connection against real throwaway clusters: every authentication method,
//! the walsender commands, the exported snapshot, and a pgoutput stream whose confirmed flush
//! position advances only when walshift reports it.

mod common;

use std::time::{Duration, Instant};

use common::cluster;
use walshift::Lsn;
use walshift::conn::{ConnInfo, Env};
use walshift::localpg::Cluster;
use walshift::source::replication::{
    ReplicationConnection, ReplicationError, ReplicationEvent, ReplicationStream, SlotOptions,
    SnapshotAction, StandbyStatus, publication_names,
};

/// No `PG*` variables, no pgpass: what the test's connection string says is all there is.
struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _key: &str) -> Option<String> {
        None
    }
}

fn info(s: &str) -> ConnInfo {
    ConnInfo::parse_with(s, &NoEnv).unwrap()
}

async fn connect(c: &Cluster) -> ReplicationConnection {
    ReplicationConnection::connect(&info(&c.conn_string("postgres")))
        .await
        .unwrap()
}

fn pgoutput_options() -> Vec<(&'static str, String)> {
    vec![
        ("proto_version", "1".to_owned()),
        ("publication_names", publication_names(&["walshift"])),
        ("messages", "true".to_owned()),
    ]
}

async fn start(
    conn: ReplicationConnection,
    slot: &str,
    from: Lsn,
) -> Result<ReplicationStream, ReplicationError> {
    let opts = pgoutput_options();
    let opts: Vec<(&str, &str)> = opts.iter().map(|(k, v)| (*k, v.as_str())).collect();
    conn.start_logical_replication(slot, from, &opts).await
}

/// Reads the stream until `done` says so, answering keepalives that ask for a reply with
/// `ack`. Returns every XLogData payload with its `wal_start`.
async fn read_until(
    stream: &mut ReplicationStream,
    ack: Lsn,
    mut done: impl FnMut(&[(Lsn, bytes::Bytes)]) -> bool,
) -> Vec<(Lsn, bytes::Bytes)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(&got) {
        assert!(Instant::now() < deadline, "timed out; got {got:?}");
        let event = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("stream stalled")
            .unwrap()
            .expect("server ended the stream");
        if event.reply_requested() {
            stream
                .send_status(StandbyStatus::new(ack, ack))
                .await
                .unwrap();
        }
        if let ReplicationEvent::XLogData {
            wal_start, data, ..
        } = event
        {
            got.push((wal_start, data));
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_auth_method_in_pg_hba_conf() {
    let c = cluster();
    c.execute(
        "postgres",
        "SET password_encryption = 'md5';
         CREATE ROLE md5user LOGIN REPLICATION PASSWORD 'md5 secret';
         SET password_encryption = 'scram-sha-256';
         CREATE ROLE scramuser LOGIN REPLICATION PASSWORD 'scr@m ''secret''';
         CREATE ROLE clearuser LOGIN REPLICATION PASSWORD 'clear secret';",
    )
    .await
    .unwrap();
    let stored: String = c
        .connect("postgres")
        .await
        .unwrap()
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'md5user'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored.starts_with("md5"), "md5user must have an MD5 hash");
    c.set_hba(
        "local all all trust
         host all postgres 127.0.0.1/32 trust
         host all clearuser 127.0.0.1/32 password
         host all md5user 127.0.0.1/32 md5
         host all scramuser 127.0.0.1/32 scram-sha-256
         ",
    )
    .unwrap();
    let port = c.port();
    let conn_str = |user: &str, password: Option<&str>| {
        let mut s = format!("host=127.0.0.1 port={port} user={user} dbname=postgres");
        if let Some(p) = password {
            s.push_str(&format!(
                " password='{}'",
                p.replace('\\', "\\\\").replace('\'', "\\'")
            ));
        }
        s
    };

    for (user, password) in [
        ("postgres", None),
        ("clearuser", Some("clear secret")),
        ("md5user", Some("md5 secret")),
        ("scramuser", Some("scr@m 'secret'")),
    ] {
        let mut conn = ReplicationConnection::connect(&info(&conn_str(user, password)))
            .await
            .unwrap_or_else(|e| panic!("{user}: {e:?}"));
        let sys = conn.identify_system().await.unwrap();
        assert_eq!(sys.dbname.as_deref(), Some("postgres"), "{user}");
        let rows = conn.simple_query("SELECT current_user").await.unwrap();
        assert_eq!(rows[0].get(0), Some(user));
        conn.close().await.unwrap();
    }

    for user in ["clearuser", "md5user", "scramuser"] {
        let err = ReplicationConnection::connect(&info(&conn_str(user, Some("wrong"))))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("28P01"), "{user}: {err:?}");
        assert!(
            err.to_string().contains("password authentication failed"),
            "{err}"
        );

        let err = ReplicationConnection::connect(&info(&conn_str(user, None)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ReplicationError::Auth { .. }),
            "{user}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("PGPASSWORD") && msg.contains(user), "{msg}");
    }

    let mut unix = ReplicationConnection::connect(&info(&format!(
        "host={} port={port} user=postgres dbname=postgres",
        c.socket_dir().display()
    )))
    .await
    .unwrap();
    assert_eq!(unix.identify_system().await.unwrap().timeline, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_system_matches_the_control_file() {
    let c = cluster();
    let mut conn = connect(&c).await;
    let sys = conn.identify_system().await.unwrap();
    let client = c.connect("postgres").await.unwrap();
    let row = client
        .query_one(
            "SELECT system_identifier::text, pg_current_wal_flush_lsn()::text \
             FROM pg_control_system()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(sys.system_id.to_string(), row.get::<_, String>(0));
    let now: Lsn = row.get::<_, String>(1).parse().unwrap();
    assert!(!sys.xlogpos.is_zero() && sys.xlogpos <= now);
    assert_eq!(sys.timeline, 1);
    assert_eq!(sys.dbname.as_deref(), Some("postgres"));
    assert!(conn.server_major_version().unwrap() >= 10);
    assert!(conn.process_id() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_snapshot_and_stream_meet_exactly_at_the_slot() {
    let c = cluster();
    c.execute(
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t VALUES (1, 'before');
         CREATE PUBLICATION walshift FOR TABLE t;",
    )
    .await
    .unwrap();
    let mut conn = connect(&c).await;
    let slot = conn
        .create_logical_slot("walshift", SlotOptions::default())
        .await
        .unwrap();
    assert_eq!(slot.slot_name, "walshift");
    assert_eq!(slot.output_plugin, "pgoutput");
    let snapshot = slot.snapshot_name.clone().expect("exported snapshot");

    let writer = c.connect("postgres").await.unwrap();
    writer
        .batch_execute("INSERT INTO t VALUES (2, 'after')")
        .await
        .unwrap();

    let mut reader = c.connect("postgres").await.unwrap();
    let tx = reader
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    tx.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'"))
        .await
        .unwrap();
    let ids: Vec<i32> = tx
        .query("SELECT id FROM t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1], "the snapshot sees exactly what precedes the slot");
    tx.commit().await.unwrap();

    let mut stream = start(conn, "walshift", slot.consistent_point)
        .await
        .unwrap();
    let got = read_until(&mut stream, slot.consistent_point, |got| {
        got.iter().any(|(_, d)| d[0] == b'C')
    })
    .await;
    let tags: Vec<u8> = got.iter().map(|(_, d)| d[0]).collect();
    assert_eq!(tags, b"BRIC", "the change after the slot streams once");
    assert!(got[2].1.windows(5).any(|w| w == b"after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_changes_and_confirm_flush() {
    let c = cluster();
    c.execute(
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE PUBLICATION walshift FOR TABLE t;",
    )
    .await
    .unwrap();
    let mut conn = connect(&c).await;
    let slot = conn
        .create_logical_slot(
            "s1",
            SlotOptions {
                temporary: false,
                snapshot: SnapshotAction::NoExport,
            },
        )
        .await
        .unwrap();
    assert_eq!(slot.snapshot_name, None);
    let mut stream = start(conn, "s1", slot.consistent_point).await.unwrap();

    let sql = c.connect("postgres").await.unwrap();
    sql.batch_execute(
        "BEGIN;
         INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g;
         UPDATE t SET v = 'changed' WHERE id <= 10;
         DELETE FROM t WHERE id > 90;
         COMMIT;
         SELECT pg_logical_emit_message(false, 'walshift', 'marker');",
    )
    .await
    .unwrap();

    let got = read_until(&mut stream, slot.consistent_point, |got| {
        got.iter().any(|(_, d)| d[0] == b'M')
    })
    .await;
    let tags: Vec<u8> = got.iter().map(|(_, d)| d[0]).collect();
    assert_eq!(tags.first(), Some(&b'B'));
    let commit_at = tags.iter().position(|&t| t == b'C').expect("commit");
    let count = |tag: u8| tags[..commit_at].iter().filter(|&&t| t == tag).count();
    assert_eq!((count(b'I'), count(b'U'), count(b'D')), (100, 10, 10));
    assert_eq!(count(b'R'), 1);
    assert_eq!(tags.last(), Some(&b'M'));
    let marker = &got.last().unwrap().1;
    assert!(
        marker.ends_with(b"walshift\0\0\0\0\x06marker"),
        "{marker:?}"
    );

    // Commit: 'C', flags, commit LSN, end LSN, timestamp.
    let commit = &got[commit_at].1;
    let end_lsn = Lsn(u64::from_be_bytes(commit[10..18].try_into().unwrap()));
    assert!(end_lsn > slot.consistent_point);

    let confirmed = || async {
        let s: Option<String> = sql
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots \
                 WHERE slot_name = 's1'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        s.unwrap().parse::<Lsn>().unwrap()
    };
    assert!(confirmed().await < end_lsn, "nothing confirmed yet");
    stream
        .send_status(StandbyStatus {
            write: end_lsn,
            flush: end_lsn,
            apply: end_lsn,
            reply_requested: true,
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if confirmed().await >= end_lsn {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "confirmed_flush_lsn did not advance"
        );
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(100), stream.next()).await {
            r.unwrap();
        }
    }
    assert_eq!(confirmed().await, end_lsn);
    assert!(stream.server_wal_end() >= end_lsn);

    let mut conn = stream.stop().await.unwrap();
    conn.identify_system().await.unwrap();
    conn.drop_slot("s1", false).await.unwrap();
    let left = sql
        .query("SELECT 1 FROM pg_replication_slots", &[])
        .await
        .unwrap();
    assert!(left.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_carry_sqlstate_and_message() {
    let c = cluster();
    let mut conn = connect(&c).await;
    let err = conn.simple_query("SELECT 1/0").await.unwrap_err();
    let db = err.as_db_error().expect("server error");
    assert_eq!((db.code(), db.message()), ("22012", "division by zero"));
    assert_eq!(db.severity(), "ERROR");
    let rows = conn
        .simple_query("SELECT 'still' AS a, NULL AS b")
        .await
        .unwrap();
    assert_eq!(rows[0].columns(), ["a", "b"]);
    assert_eq!(
        (rows[0].get_named("a"), rows[0].get(1)),
        (Some("still"), None)
    );

    conn.create_logical_slot("dup", SlotOptions::default())
        .await
        .unwrap();
    let err = conn
        .create_logical_slot("dup", SlotOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("42710"), "{err:?}");

    let err = start(conn, "missing", Lsn::ZERO).await.unwrap_err();
    assert_eq!(err.code(), Some("42704"), "{err:?}");
    assert!(
        err.to_string()
            .contains("replication slot \"missing\" does not exist"),
        "{err}"
    );

    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = ReplicationConnection::connect(&info(&format!(
        "host=127.0.0.1 port={closed_port} user=postgres dbname=postgres connect_timeout=5"
    )))
    .await
    .unwrap_err();
    assert!(
        matches!(refused, ReplicationError::Connect { .. }),
        "{refused:?}"
    );
}

/// How fast the stream reads a large transaction, and how much of a core the reader used:
/// `cargo test --release --test replication -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run on demand"]
async fn stream_throughput() {
    const ROWS: usize = 500_000;
    let c = cluster();
    c.execute(
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY, v int);
         CREATE PUBLICATION walshift FOR TABLE t;",
    )
    .await
    .unwrap();
    let mut conn = connect(&c).await;
    let slot = conn
        .create_logical_slot(
            "bench",
            SlotOptions {
                temporary: true,
                snapshot: SnapshotAction::NoExport,
            },
        )
        .await
        .unwrap();
    c.execute(
        "postgres",
        &format!("INSERT INTO t SELECT g, g FROM generate_series(1, {ROWS}) g"),
    )
    .await
    .unwrap();
    let mut stream = start(conn, "bench", slot.consistent_point).await.unwrap();
    let cpu = || {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage fills the struct we own.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(ru.ru_utime) + t(ru.ru_stime)
    };
    let (t0, cpu0) = (Instant::now(), cpu());
    let mut messages = 0usize;
    let mut bytes = 0usize;
    loop {
        let event = stream.next().await.unwrap().unwrap();
        if event.reply_requested() {
            stream
                .send_status(StandbyStatus::new(
                    slot.consistent_point,
                    slot.consistent_point,
                ))
                .await
                .unwrap();
        }
        if let ReplicationEvent::XLogData { data, .. } = event {
            messages += 1;
            bytes += data.len();
            if data[0] == b'C' {
                break;
            }
        }
    }
    let (secs, cpu_secs) = (t0.elapsed().as_secs_f64(), cpu() - cpu0);
    assert_eq!(messages, ROWS + 3);
    println!(
        "{messages} messages ({bytes} bytes) in {secs:.2}s: {:.0} messages/s; reader CPU {cpu_secs:.2}s \
         ({:.0} messages per CPU-second)",
        messages as f64 / secs,
        messages as f64 / cpu_secs
    );
}
