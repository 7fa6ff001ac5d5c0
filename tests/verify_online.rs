//! `walshift verify --online` while a writer keeps changing the source: equal when equal
//! (a running `walshift run` held at each point, or a replay verify runs itself next to a
//! running capture), a corrupted and a missing target row found by key, replay going on
//! afterwards, a stale hold (a killed verify) expiring, and a clear error without capture.

mod common;

use std::path::Path;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use common::cli::{self, json, stderr};
use common::load::Writer;
use walshift::localpg::Cluster;

const SCHEMA: &str = "
    CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL, note text);
    CREATE TABLE pairs (a text, b int, val text, PRIMARY KEY (a, b));
    CREATE TABLE bag (x int, y text);
    ALTER TABLE bag REPLICA IDENTITY FULL;
    CREATE UNLOGGED TABLE scratch (k int);
    INSERT INTO items SELECT g, g, 'n' || g FROM generate_series(1, 3000) g;
    INSERT INTO pairs SELECT 'k' || (g % 37), g, 'p' FROM generate_series(1, 600) g;
    INSERT INTO bag SELECT g % 5, 'b' FROM generate_series(1, 50) g;";

/// The clusters with the schema on the source, a work directory, the buffer in it.
struct Setup {
    source: Cluster,
    target: Cluster,
    dir: tempfile::TempDir,
    buf: std::path::PathBuf,
    buf_s: String,
    sc: String,
    tc: String,
}

async fn setup() -> Setup {
    let (source, target) = common::pair::clusters();
    source.execute("postgres", SCHEMA).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let buf = dir.path().join("buf");
    let buf_s = buf.to_str().unwrap().to_owned();
    let (sc, tc) = (
        source.conn_string("postgres"),
        target.conn_string("postgres"),
    );
    Setup {
        source,
        target,
        dir,
        buf,
        buf_s,
        sc,
        tc,
    }
}

/// Starts a long-running walshift command (stderr to `log`) and waits until the target's
/// clone is done and `walshift.applied` exists.
async fn start(args: &[&str], log: &Path, target: &Cluster) -> Child {
    let child = cli::command(args)
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let t = target.connect("postgres").await.unwrap();
    let started = Instant::now();
    loop {
        let done = t
            .query_opt(
                "SELECT 1 FROM pg_tables WHERE schemaname = 'walshift' AND tablename = 'clone_state'",
                &[],
            )
            .await
            .unwrap()
            .is_some()
            && t.query_opt(
                "SELECT 1 FROM walshift.clone_state WHERE state = 'done'",
                &[],
            )
            .await
            .map(|r| r.is_some())
            .unwrap_or(false);
        if done {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "clone never finished: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child
}

/// Updates, inserts and deletes on the source until stopped: items with id > 100 and new ids
/// from 100 000, pairs' values, bag rows. Never touches items 1..=100.
async fn writer(source: &Cluster) -> Writer {
    let client = source.connect("postgres").await.unwrap();
    Writer::start(client, Duration::from_millis(3), |n| {
        let id = 101 + (n * 7919) % 2900;
        format!(
            "BEGIN;
                     UPDATE items SET v = v + 1, note = 'w{n}' WHERE id = {id};
                     INSERT INTO items VALUES ({}, {n}, 'new');
                     DELETE FROM items WHERE id = {};
                     UPDATE pairs SET val = 'v{n}' WHERE a = 'k{}' AND b = {};
                     INSERT INTO bag VALUES ({}, 'w');
                     COMMIT;",
            100_000 + n,
            101 + (n * 104_729) % 2900,
            n % 37,
            1 + (n * 31) % 600,
            n % 5
        )
    })
}

async fn verify_online(sc: &str, tc: &str, buf: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "verify",
        "--online",
        "--source",
        sc,
        "--target",
        tc,
        "--buffer",
        buf,
        "--tables",
        "public.items,public.pairs,public.bag",
        "--chunk-rows",
        "700",
        "--json",
    ];
    args.extend_from_slice(extra);
    let mut cmd = cli::command(&args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn table<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == name)
        .unwrap_or_else(|| panic!("{name} not in {v}"))
}

async fn wait_for(target: &Cluster, sql: &str, what: &str) {
    let t = target.connect("postgres").await.unwrap();
    let started = Instant::now();
    loop {
        if t.query_opt(sql, &[]).await.unwrap().is_some() {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stop_child(dir: &Path, mut child: Child) {
    if walshift::run::control::request(dir, "stop").await.is_err() {
        let _ = child.kill();
    }
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_verify_under_a_writer_with_walshift_run() {
    let Setup {
        source,
        target,
        dir,
        buf,
        buf_s,
        sc,
        tc,
    } = setup().await;
    let run = start(
        &[
            "run",
            "--source",
            &sc,
            "--target",
            &tc,
            "--buffer",
            &buf_s,
            "--no-progress",
        ],
        &dir.path().join("run.log"),
        &target,
    )
    .await;
    // `run`'s replay has started (it creates walshift.hold when it starts following).
    wait_for(
        &target,
        "SELECT 1 WHERE to_regclass('walshift.hold') IS NOT NULL",
        "replay never started",
    )
    .await;
    let w = writer(&source).await;

    // Equal while the writer runs: every chunk at its own point.
    let out = verify_online(&sc, &tc, &buf_s, &[]).await;
    let v = json(&out);
    assert_eq!(out.status.code(), Some(0), "{v}\n{}", stderr(&out));
    assert!(
        table(&v, "public.items")["chunks"].as_u64().unwrap() >= 4,
        "{v}"
    );
    assert_eq!(v["online"]["replay"], "external", "{v}");
    let notes = v["not_checked"].to_string();
    assert!(
        notes.contains("public.bag") && notes.contains("multiset"),
        "{notes}"
    );
    assert!(
        notes.contains("public.scratch") && notes.contains("unlogged"),
        "{notes}"
    );
    let during = w.commits();

    // A row changed and a row deleted directly on the target: found by key.
    target
        .execute(
            "postgres",
            "UPDATE items SET v = -1 WHERE id = 7; DELETE FROM items WHERE id = 42; \
             UPDATE pairs SET val = 'bad' WHERE a = 'k3' AND b = 3",
        )
        .await
        .unwrap();
    let out = verify_online(&sc, &tc, &buf_s, &[]).await;
    let v = json(&out);
    assert_eq!(out.status.code(), Some(3), "{v}\n{}", stderr(&out));
    let items = table(&v, "public.items");
    assert_eq!(items["equal"], false);
    let mut diffs: Vec<(String, String)> = items["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["key"].as_str().unwrap().to_owned(),
                d["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    diffs.sort();
    assert_eq!(
        diffs,
        [
            ("42".into(), "missing_on_target".into()),
            ("7".into(), "different".into())
        ],
        "{items}"
    );
    let pairs = table(&v, "public.pairs");
    assert_eq!(pairs["differences"][0]["key"], "(k3,3)", "{pairs}");
    assert_eq!(pairs["differences"][0]["kind"], "different", "{pairs}");
    assert_eq!(table(&v, "public.bag")["equal"], true, "{v}");
    assert!(w.commits() > during, "the writer kept writing");

    // Replay goes on after verify: no hold left, a new row arrives.
    w.stop().await;
    source
        .execute("postgres", "INSERT INTO items VALUES (999999, 1, 'after')")
        .await
        .unwrap();
    wait_for(
        &target,
        "SELECT 1 FROM items WHERE id = 999999",
        "replay did not go on after verify",
    )
    .await;
    let t = target.connect("postgres").await.unwrap();
    let holds: i64 = t
        .query_one("SELECT count(*) FROM walshift.hold", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(holds, 0);

    // A stale hold (a verify killed while holding) stops replay only until it expires.
    let now = common::capture::current_lsn(&source).await.to_string();
    t.execute(
        "INSERT INTO walshift.hold (buffer_id, holder, generation, hold_lsn, expires_at) \
         SELECT buffer_id, 'killed verify', nextval('walshift.hold_generation'), $1::text::pg_lsn, \
                now() + interval '3 seconds' FROM walshift.applied",
        &[&now],
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    source
        .execute("postgres", "INSERT INTO items VALUES (1000000, 1, 'held')")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = t
        .query_opt("SELECT 1 FROM items WHERE id = 1000000", &[])
        .await
        .unwrap();
    assert!(held.is_none(), "replay applied past a live hold");
    wait_for(
        &target,
        "SELECT 1 FROM items WHERE id = 1000000",
        "an expired hold still blocks replay",
    )
    .await;

    stop_child(&buf, run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_verify_runs_replay_itself_next_to_capture_and_says_when_capture_is_missing() {
    let Setup {
        source,
        target,
        dir,
        buf: _,
        buf_s,
        sc,
        tc,
    } = setup().await;
    let capture = start(
        &[
            "capture",
            "--source",
            &sc,
            "--buffer",
            &buf_s,
            "--clone-to",
            &tc,
        ],
        &dir.path().join("capture.log"),
        &target,
    )
    .await;
    let w = writer(&source).await;
    // The clone holds the rows at the slot's snapshot; the writer's changes are only in the
    // buffer: verify replays them itself up to each point.
    let out = verify_online(&sc, &tc, &buf_s, &[]).await;
    let v = json(&out);
    assert_eq!(out.status.code(), Some(0), "{v}\n{}", stderr(&out));
    assert_eq!(v["online"]["replay"], "in-process", "{v}");
    w.stop().await;

    // Without capture the point never becomes durable: a clear error naming what to start.
    let mut capture = capture;
    nix_term(&capture);
    let _ = tokio::task::spawn_blocking(move || capture.wait()).await;
    let out = verify_online(&sc, &tc, &buf_s, &["--stall-timeout", "2"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("walshift capture") && err.contains("durable"),
        "{err}"
    );
}

fn nix_term(child: &Child) {
    // SAFETY: signalling a child process we started and have not waited for.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}
