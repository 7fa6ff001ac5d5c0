//! `walshift demo`: the main job end to end on throwaway clusters, told as a story. A live shop
//! keeps taking orders while walshift clones it into a second cluster at the slot's snapshot,
//! streams its changes into a durable buffer (stopped and restarted mid-stream), and replays
//! them into the copy, which ends equal to the live database, table by table. Migration
//! transforms and cutover come with later stages.

pub mod shop;

use std::time::{Duration, Instant};

use crate::apply::replay::{self, ReplayConfig};
use crate::buffer::BufferReader;
use crate::capture::{self, CaptureConfig};
use crate::clone::{self, CloneOptions, CloneStatus};
use crate::conn::ConnInfo;
use crate::lsn::Lsn;
use crate::testkit::{Cluster, ClusterOptions};

/// Demo settings.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Seconds the shop keeps writing. Default 6.
    pub seconds: u64,
    /// Writer transactions per second. Default 150.
    pub tps: u32,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            seconds: 6,
            tps: 150,
        }
    }
}

/// What the demo showed.
#[derive(Clone, Debug)]
pub struct DemoReport {
    pub writer: shop::WriterStats,
    pub replayed_changes: u64,
    pub end_lsn: Lsn,
}

/// Demo failures.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Testkit(#[from] crate::testkit::TestkitError),
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
    #[error(transparent)]
    Buffer(#[from] crate::buffer::BufferError),
    #[error(transparent)]
    Replay(#[from] crate::apply::replay::ReplayError),
    #[error(transparent)]
    Lib(#[from] crate::Error),
    #[error("SQL failed in the demo: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error("verification failed: {0}")]
    Mismatch(String),
}

/// Runs the demo, printing the story through `say`.
pub async fn run(opts: DemoOptions, say: impl Fn(&str)) -> Result<DemoReport, DemoError> {
    let t0 = Instant::now();
    say(
        "▶ starting two throwaway PostgreSQL clusters on 127.0.0.1: the live site and its future copy",
    );
    let source = Cluster::start(ClusterOptions::default())?;
    let target = Cluster::start(ClusterOptions::default())?;
    source.create_database("shop").await?;
    target.create_database("shop").await?;
    let admin = source.connect("shop").await?;
    admin.batch_execute(shop::SCHEMA).await?;
    shop::seed(&admin, 2_000, 10_000).await?;
    say(&format!(
        "  live shop on port {}: 2,000 customers, 50 products, 10,000 orders; empty copy on port {}",
        source.port(),
        target.port()
    ));

    let dir = tempfile::Builder::new()
        .prefix("walshift-demo-")
        .tempdir()
        .map_err(|e| crate::Error::io(std::env::temp_dir(), e))?;
    let buffer_dir = dir.path().join("buffer");
    let source_conn = ConnInfo::parse(&source.conn_string("shop"))?;
    let target_conn = ConnInfo::parse(&target.conn_string("shop"))?;

    say("▶ the site stays live: a writer places, ships and cancels orders from now on");
    let writer = shop::Writer::start(source.connect("shop").await?, 2_000, opts.tps);

    say(
        "▶ capture: preflight, publication, slot with an exported snapshot, clone at that snapshot, then stream",
    );
    let mut config = CaptureConfig::new(source_conn.clone(), &buffer_dir);
    config.clone = Some(CloneOptions::new(source_conn.clone(), target_conn.clone()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn(capture::run(config.clone(), async move {
        let _ = stop_rx.await;
    }));
    let clone_started = Instant::now();
    loop {
        if let Ok(Some(s)) = clone::clone_state(&target_conn).await
            && s.status == CloneStatus::Done
        {
            say(&format!(
                "  ✓ clone done in {:.1} s: {} rows, while the site kept writing ({} transactions so far)",
                clone_started.elapsed().as_secs_f64(),
                s.rows.unwrap_or(0),
                writer.committed()
            ));
            break;
        }
        if first.is_finished() {
            first.await.expect("capture task")?;
            return Err(DemoError::Mismatch(
                "capture stopped before the clone finished".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    say("▶ replay follows the buffer into the copy (batched, set-based, exactly once)");
    let mut replay_cfg = ReplayConfig::new(&buffer_dir, target_conn.clone());
    replay_cfg.follow = true;
    let (replay_stop_tx, replay_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let follower = tokio::spawn(replay::run(replay_cfg, async move {
        let _ = replay_stop_rx.await;
    }));
    let progress = target.connect("shop").await?;
    let mut second = None;
    let mut stop_tx = Some(stop_tx);
    let mut first = Some(first);
    for s in 1..=opts.seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let buffered = BufferReader::open(&buffer_dir)
            .and_then(|r| r.status())
            .ok()
            .and_then(|s| s.last_commit.map(|c| c.end_lsn))
            .unwrap_or_default();
        let applied: Lsn = progress
            .query_opt("SELECT end_lsn::text FROM walshift.applied", &[])
            .await
            .ok()
            .flatten()
            .and_then(|r| r.get::<_, String>(0).parse().ok())
            .unwrap_or_default();
        say(&format!(
            "  {s:>2}s  site committed {:>5} txns | buffer durable to {buffered} | copy applied to {applied} (lag {} bytes)",
            writer.committed(),
            buffered.bytes_since(applied)
        ));
        if s == opts.seconds / 2 {
            say(
                "  ✂ stopping capture mid-stream (as a crash or a redeploy would) … and starting it again",
            );
            if let (Some(tx), Some(task)) = (stop_tx.take(), first.take()) {
                let _ = tx.send(());
                task.await.expect("capture task")?;
            }
            second = Some(tokio::spawn(capture::run(
                config.clone(),
                std::future::pending::<()>(),
            )));
        }
    }
    let stats = writer.stop().await?;
    let end: String = admin
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let end_lsn: Lsn = end
        .parse()
        .map_err(|e| crate::Error::Config(format!("{e}")))?;
    if let Some(task) = second {
        task.abort();
        let _ = task.await;
    }
    say(&format!(
        "▶ the writer stopped after {} transactions; draining capture and replay to the source's end of WAL {end_lsn}",
        stats.transactions
    ));
    let mut drain = config.clone();
    drain.clone = None;
    drain.until_lsn = Some(end_lsn);
    capture::run(drain, std::future::pending::<()>()).await?;
    let _ = replay_stop_tx.send(());
    let followed = follower.await.expect("replay task")?;
    let rest = replay::run(
        ReplayConfig::new(&buffer_dir, target_conn.clone()),
        std::future::pending::<()>(),
    )
    .await?;
    say(&format!(
        "  replay applied {} changes in {} target commits; copy at {}",
        followed.changes + rest.changes,
        followed.batches + rest.batches,
        rest.applied_lsn
    ));

    say("▶ verifying: every table of the copy against the live database (row count and checksum)");
    let copy = target.connect("shop").await?;
    for table in ["customers", "products", "orders"] {
        let q = format!(
            "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text FROM {table} t"
        );
        let a = admin.query_one(&q, &[]).await?;
        let b = copy.query_one(&q, &[]).await?;
        let (ac, asum): (i64, String) = (a.get(0), a.get(1));
        let (bc, bsum): (i64, String) = (b.get(0), b.get(1));
        let ok = ac == bc && asum == bsum;
        say(&format!(
            "  {} {table:<10} live {ac:>6} rows   copy {bc:>6} rows   checksums {}",
            if ok { "✓" } else { "✗" },
            if ok { "equal" } else { "differ" }
        ));
        if !ok {
            return Err(DemoError::Mismatch(format!(
                "{table}: the copy differs from the live database"
            )));
        }
    }
    say(&format!(
        "▶ done in {:.1} s; clusters and buffer are removed now",
        t0.elapsed().as_secs_f64()
    ));
    say("  (migration transforms and the measured cutover come next in walshift's roadmap)");
    Ok(DemoReport {
        writer: stats,
        replayed_changes: followed.changes + rest.changes,
        end_lsn,
    })
}
