//! Crash safety: `walshift capture` killed with SIGKILL at random moments while the source
//! keeps committing; after restarts the buffer holds every committed change exactly once, in
//! commit order.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use rand::Rng;
use walshift::source::pgoutput::{LogicalMessage, TupleValue};

const ROWS_PER_TXN: i64 = 3;

fn spawn_capture(conn: &str, dir: &std::path::Path, extra: &[String]) -> std::process::Child {
    common::cli::command(&["capture", "--source", conn, "--buffer"])
        .arg(dir)
        .args(["--no-progress", "--flush-ms", "5", "--segment-mib", "1"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start walshift capture")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    let cluster = common::cluster();
    cluster
        .execute(
            "postgres",
            "CREATE TABLE events (id bigint PRIMARY KEY, txn bigint, pad text)",
        )
        .await
        .unwrap();
    let conn = cluster.conn_string("postgres");
    let dir = tempfile::tempdir().unwrap();

    // First start creates publication and slot; the writer begins only after that.
    let mut first = spawn_capture(&conn, dir.path(), &[]);
    while !walshift::buffer::BufferMeta::path(dir.path()).exists() {
        assert!(first.try_wait().unwrap().is_none(), "capture exited early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Writer: transaction k inserts ids 3k, 3k+1, 3k+2 and commits; `committed` counts them.
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicI64::new(0));
    let client = cluster.connect("postgres").await.unwrap();
    let writer = {
        let (stop, committed) = (stop.clone(), committed.clone());
        tokio::spawn(async move {
            let mut k: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                client
                    .batch_execute(&format!(
                        "BEGIN; INSERT INTO events SELECT {k} * {ROWS_PER_TXN} + g, {k}, repeat('p', 200) \
                         FROM generate_series(0, {}) g; COMMIT;",
                        ROWS_PER_TXN - 1
                    ))
                    .await
                    .unwrap();
                k += 1;
                committed.store(k, Ordering::Relaxed);
                if k % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
    };

    let mut child = first;
    let mut kills = 0;
    for _ in 0..12 {
        let wait_ms = rand::thread_rng().gen_range(50..600);
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("capture exited by itself ({status}): {err}");
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        child = spawn_capture(&conn, dir.path(), &[]);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(kills >= 10);
    let total = committed.load(Ordering::Relaxed);
    assert!(
        total > 100,
        "the writer should have committed a fair amount ({total})"
    );

    // Drain to the end and check.
    let end = common::capture::current_lsn(&cluster).await;
    let out = common::cli::command(&["capture", "--source", &conn, "--buffer"])
        .arg(dir.path())
        .args(["--no-progress", "--until-lsn", &end.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "final capture failed: {}",
        common::cli::stderr(&out)
    );

    let captured = common::capture::read_buffer(dir.path());
    let mut ids = Vec::new();
    let mut last_end = walshift::lsn::Lsn::ZERO;
    for t in &captured.transactions {
        assert!(
            t.end_lsn > last_end,
            "commits out of order: {} after {last_end}",
            t.end_lsn
        );
        last_end = t.end_lsn;
        for m in &t.messages {
            if let LogicalMessage::Insert(i) = m {
                let TupleValue::Text(b) = &i.new.values[0] else {
                    panic!("text id")
                };
                ids.push(std::str::from_utf8(b).unwrap().parse::<i64>().unwrap());
            }
        }
    }
    let expected: Vec<i64> = (0..total * ROWS_PER_TXN).collect();
    if ids != expected {
        let dups = ids.windows(2).filter(|w| w[0] >= w[1]).count();
        panic!(
            "buffer holds {} ids, expected {} (committed transactions {total}); out-of-order/duplicate pairs: {dups}",
            ids.len(),
            expected.len()
        );
    }
    assert_eq!(
        captured
            .transactions
            .iter()
            .filter(|t| t.changes() > 0)
            .count() as i64,
        total
    );
}
