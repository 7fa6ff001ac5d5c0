//! The whole first half of a release: clone at the slot's snapshot while the site writes,
//! capture what happens meanwhile, replay it — the target equals the source. And replay killed
//! with SIGKILL over and over still ends with every row exactly once.

mod common;

use std::time::Duration;

use common::capture::Running;
use common::cli;
use common::digest::assert_same;
use common::load::Writer;
use common::pair::{self, Pair};
use rand::Rng;
use walshift::apply::replay::ReplayConfig;
use walshift::capture::CaptureConfig;
use walshift::clone::CloneOptions;

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

/// The site's transaction number `n`: an order placed, one paid, one deleted, a customer seen,
/// a log line.
fn site_txn(n: u64) -> String {
    format!(
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
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_during_writes_then_replay_equals_source() {
    let Pair {
        source,
        target,
        dir,
    } = Pair::start();
    source.execute("postgres", SCHEMA).await.unwrap();
    let source_conn = pair::conn(&source);
    let target_conn = pair::conn(&target);

    let w = Writer::start(
        source.connect("postgres").await.unwrap(),
        Duration::ZERO,
        site_txn,
    );
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut cfg = CaptureConfig::new(source_conn.clone(), dir.path());
    cfg.clone = Some(CloneOptions::new(source_conn.clone(), target_conn.clone()));
    // Clone done (state 'done' on the target), then the site keeps writing a while.
    let cap = Running::cloned(cfg, Duration::from_secs(180)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = w.stop().await;
    assert!(
        written > 10,
        "the writer ran during the clone ({written} txns)"
    );
    cap.stop().await.expect("capture with clone");
    common::capture::until_now(&source, dir.path()).await;

    let cfg = ReplayConfig::new(dir.path(), target_conn.clone());
    let report = pair::replay(cfg).await.expect("replay");
    assert!(report.changes > 0);
    assert_same(&source, &target, &["customers", "orders", "log"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_killed_with_sigkill_ten_times_ends_exactly_once() {
    let schema =
        "CREATE TABLE ev (id bigint PRIMARY KEY, v int); CREATE TABLE tally (n int, note text);
                  ALTER TABLE tally REPLICA IDENTITY FULL;";
    let Pair {
        source,
        target,
        dir,
    } = Pair::capturing(schema, schema).await;
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
    common::capture::until_now(&source, dir.path()).await;
    let conn = target.conn_string("postgres");
    let spawn = || {
        cli::command(&["replay", "--buffer"])
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
    let out = cli::command(&["replay", "--buffer"])
        .arg(dir.path())
        .args(["--target", &conn, "--target-not-cloned-by-walshift"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", cli::stderr(&out));
    let out = cli::command(&["status", "--json", "--buffer"])
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
    assert_same(&source, &target, &["ev"]).await;
}
