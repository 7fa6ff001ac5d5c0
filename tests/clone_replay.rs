//! The whole first half of a release: clone at the slot's snapshot while the site writes,
//! capture what happens meanwhile, replay it — the target equals the source. And replay killed
//! with SIGKILL over and over still ends with every row exactly once.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::Rng;
use walshift::apply::replay::{self, ReplayConfig};
use walshift::capture::{self, CaptureConfig};
use walshift::clone::CloneOptions;
use walshift::conn::ConnInfo;
use walshift::localpg::{Cluster, ClusterOptions};

const SCHEMA: &str = "
    CREATE TYPE status AS ENUM ('new', 'paid', 'shipped');
    CREATE TABLE customers (id bigserial PRIMARY KEY, name text NOT NULL, profile jsonb);
    CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint REFERENCES customers(id),
                         st status NOT NULL DEFAULT 'new', amount numeric(12,2), blob bytea);
    CREATE TABLE log (at timestamptz, msg text);
    ALTER TABLE log REPLICA IDENTITY FULL;
    INSERT INTO customers (name, profile) SELECT 'c' || g, jsonb_build_object('n', g) FROM generate_series(1, 2000) g;
    INSERT INTO orders (customer_id, amount, blob) SELECT 1 + g % 2000, g * 1.5, '\\x0102'::bytea FROM generate_series(1, 20000) g;
    INSERT INTO log SELECT now(), 'seed' FROM generate_series(1, 100);";

async fn table_sums(c: &Cluster) -> Vec<(String, i64, String)> {
    let client = c.connect("postgres").await.unwrap();
    let mut out = Vec::new();
    for t in ["customers", "orders", "log"] {
        let r = client
            .query_one(&format!("SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text FROM {t} t"), &[])
            .await
            .unwrap();
        out.push((t.to_string(), r.get(0), r.get(1)));
    }
    out
}

fn writer(
    cluster_conn: tokio_postgres::Client,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            cluster_conn
                .batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO orders (customer_id, amount) VALUES ({c}, {n});
                     UPDATE orders SET st = 'paid' WHERE id = {u};
                     DELETE FROM orders WHERE id = {d};
                     UPDATE customers SET profile = profile || '{{\"seen\": {n}}}' WHERE id = {c};
                     INSERT INTO log VALUES (now(), 'w{n}');
                     COMMIT;",
                    c = 1 + n % 2000,
                    u = 1 + (n * 7) % 20000,
                    d = 1 + (n * 13) % 20000,
                ))
                .await
                .unwrap();
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_during_writes_then_replay_equals_source() {
    let source = Cluster::start(ClusterOptions::default()).unwrap();
    let target = Cluster::start(ClusterOptions::default()).unwrap();
    source.execute("postgres", SCHEMA).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source_conn = ConnInfo::parse(&source.conn_string("postgres")).unwrap();
    let target_conn = ConnInfo::parse(&target.conn_string("postgres")).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(source.connect("postgres").await.unwrap(), stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut cfg = CaptureConfig::new(source_conn.clone(), dir.path());
    cfg.clone = Some(CloneOptions::new(source_conn.clone(), target_conn.clone()));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let cap = tokio::spawn(capture::run(cfg, async move {
        let _ = rx.await;
    }));
    // Clone done (state 'done' on the target), then the site keeps writing a while.
    loop {
        if let Ok(Some(s)) = walshift::clone::clone_state(&target_conn).await
            && s.status == walshift::clone::CloneStatus::Done
        {
            break;
        }
        assert!(!cap.is_finished(), "capture ended early: {:?}", cap.await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let written = w.await.unwrap();
    assert!(
        written > 10,
        "the writer ran during the clone ({written} txns)"
    );
    let _ = tx.send(());
    cap.await.unwrap().expect("capture with clone");
    common::capture_until_now(&source, dir.path()).await;

    let cfg = ReplayConfig::new(dir.path(), target_conn.clone());
    let report = replay::run(cfg, std::future::pending::<()>())
        .await
        .expect("replay");
    assert!(report.changes > 0);
    assert_eq!(table_sums(&source).await, table_sums(&target).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_killed_with_sigkill_ten_times_ends_exactly_once() {
    let source = Cluster::start(ClusterOptions::default()).unwrap();
    let target = Cluster::start(ClusterOptions::default()).unwrap();
    let schema =
        "CREATE TABLE ev (id bigint PRIMARY KEY, v int); CREATE TABLE tally (n int, note text);
                  ALTER TABLE tally REPLICA IDENTITY FULL;";
    source.execute("postgres", schema).await.unwrap();
    target.execute("postgres", schema).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    common::capture_until_now(&source, dir.path()).await;
    let c = source.connect("postgres").await.unwrap();
    // 20 000 small transactions; the keyless `tally` would show any transaction applied twice.
    c.batch_execute(
        "CREATE PROCEDURE gen() LANGUAGE plpgsql AS $$
         BEGIN
           FOR i IN 0..19999 LOOP
             INSERT INTO ev VALUES (i, 0);
             UPDATE ev SET v = v + 1 WHERE id = i / 2;
             INSERT INTO tally VALUES (i, 't');
             COMMIT;
           END LOOP;
         END $$;
         SET synchronous_commit = off;",
    )
    .await
    .unwrap();
    c.batch_execute("CALL gen()").await.unwrap();
    common::capture_until_now(&source, dir.path()).await;
    let conn = target.conn_string("postgres");
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_walshift"))
            .args(["replay", "--buffer"])
            .arg(dir.path())
            .args(["--target", &conn, "--batch-rows", "300", "--batch-ms", "5"])
            .arg("--target-not-cloned-by-walshift")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut kills = 0;
    for _ in 0..12 {
        let mut child = spawn();
        tokio::time::sleep(Duration::from_millis(rand::thread_rng().gen_range(20..200))).await;
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    assert!(
        kills >= 10,
        "replay must be killed mid-run at least 10 times ({kills})"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walshift"))
        .args(["replay", "--buffer"])
        .arg(dir.path())
        .args(["--target", &conn, "--target-not-cloned-by-walshift"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walshift"))
        .args(["status", "--json", "--buffer"])
        .arg(dir.path())
        .args(["--target", &conn])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(v["lag_bytes"], 0, "replay caught up: {v}");
    assert_eq!(v["applied_lsn"], v["last_commit"]["end_lsn"], "{v}");
    let t = target.connect("postgres").await.unwrap();
    let (n, dups): (i64, i64) = {
        let r = t
            .query_one(
                "SELECT count(*), count(*) - count(DISTINCT n) FROM tally",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((n, dups), (20_000, 0), "every transaction exactly once");
    let s = source.connect("postgres").await.unwrap();
    let q = "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text FROM ev t";
    let a = s.query_one(q, &[]).await.unwrap();
    let b = t.query_one(q, &[]).await.unwrap();
    assert_eq!(
        (a.get::<_, i64>(0), a.get::<_, String>(1)),
        (b.get::<_, i64>(0), b.get::<_, String>(1))
    );
}
