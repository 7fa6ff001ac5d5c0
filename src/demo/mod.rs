//! `walshift demo`: the main job end to end on throwaway clusters, told as a story. A live shop
//! keeps taking orders while walshift clones it into a second cluster at the slot's snapshot,
//! the release's migration reshapes the copy (a computed column, a rename, a table split),
//! the live changes stream into a durable buffer (capture is stopped and restarted mid-stream)
//! and are replayed through the release's mapping, and then the cutover fences the live site,
//! drains the last changes, syncs sequences, verifies and switches — with its window measured.
//! The copy is finally verified against the live database through the mapping.

pub mod shop;

use std::time::{Duration, Instant};

use std::sync::Arc;

use crate::apply::replay::{self, ReplayConfig};
use crate::buffer::BufferReader;
use crate::capture::{self, CaptureConfig};
use crate::clone::{self, CloneOptions, CloneStatus};
use crate::conn::ConnInfo;
use crate::localpg::{Cluster, ClusterOptions};
use crate::lsn::Lsn;

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
    /// Changes replay applied before the cutover took over.
    pub replayed_changes: u64,
    /// The cutover's timeline.
    pub cutover: crate::cutover::CutoverReport,
    /// Tables verified equal to source + mapping after the switch.
    pub verified_tables: usize,
}

/// Demo failures.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    LocalPg(#[from] crate::localpg::LocalPgError),
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
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
    #[error(transparent)]
    Transform(#[from] crate::transform::TransformError),
    #[error(transparent)]
    Cutover(#[from] crate::cutover::CutoverError),
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
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

    say(
        "▶ migrate the copy: customers get a computed full_name, orders.amount becomes amount_eur + amount_cents, \
         shipping addresses move to their own table",
    );
    let migration = dir.path().join("001_release.sql");
    let mapping_path = dir.path().join("release.toml");
    std::fs::write(&migration, shop::MIGRATION)
        .and_then(|_| std::fs::write(&mapping_path, shop::MAPPING))
        .map_err(|e| crate::Error::io(dir.path(), e))?;
    let scripts = crate::migrate::load_scripts(std::slice::from_ref(&migration))?;
    let migrated = crate::migrate::migrate(
        &crate::migrate::MigrateOptions::new(target_conn.clone()),
        &scripts,
        |_| {},
    )
    .await?;
    say(&format!(
        "  ✓ {} applied in {:.0} ms (recorded in walshift.migrations)",
        migrated.scripts[0].name,
        migrated.scripts[0].duration_ms.unwrap_or(0.0)
    ));
    let mapping = Arc::new(crate::transform::Mapping::load(&mapping_path)?);
    say(
        "  the release's mapping: full_name = first_name || ' ' || last_name; amount_eur = amount; \
         amount_cents = (amount * 100)::bigint; orders → shipping_addresses where ship_street IS NOT NULL",
    );

    say(
        "▶ replay follows the buffer into the migrated copy, through the mapping (batched, set-based, exactly once)",
    );
    let mut replay_cfg = ReplayConfig::new(&buffer_dir, target_conn.clone());
    replay_cfg.follow = true;
    replay_cfg.transform = Some(mapping.clone());
    // The lock every replay of this buffer into this target holds: cutover sees it and
    // leaves the draining to this follower instead of starting a replay of its own.
    let meta = crate::buffer::BufferMeta::read(&buffer_dir)?
        .ok_or_else(|| DemoError::Mismatch("capture wrote no buffer.json".into()))?;
    let buffer_id = crate::apply::progress::buffer_id(meta.system_identifier, &meta.slot);
    let replay_lock =
        crate::apply::replay::lock::ReplayGuard::try_acquire(&target_conn, &buffer_id)
            .await?
            .ok_or_else(|| DemoError::Mismatch("another replay holds the target".into()))?;
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
        if follower.is_finished() {
            follower.await.expect("replay task")?;
            return Err(DemoError::Mismatch("replay stopped unexpectedly".into()));
        }
        let buffered = BufferReader::open(&buffer_dir)
            .and_then(|r| r.status())
            .ok()
            .and_then(|s| s.last_commit.map(|c| c.end_lsn))
            .unwrap_or_default();
        let applied: Lsn = crate::apply::progress::read_applied(&progress, &buffer_id)
            .await
            .ok()
            .flatten()
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
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            stop_tx = Some(tx);
            second = Some(tokio::spawn(capture::run(config.clone(), async move {
                let _ = rx.await;
            })));
        }
    }

    say(
        "▶ cutover, with the writer still placing orders: fence the live site (read-only), marker, drain, sequences, verify, switch",
    );
    let mut cut =
        crate::cutover::CutoverConfig::new(source_conn.clone(), target_conn.clone(), &buffer_dir);
    cut.transform = Some(mapping.clone());
    cut.verify = crate::cutover::VerifyMode::Counts;
    cut.switch = Some(format!(
        "echo \"switching the shop's traffic to 127.0.0.1:{}\"",
        target.port()
    ));
    cut.max_window = Duration::from_secs(10);
    let report = crate::cutover::run(cut, std::future::pending::<()>()).await?;
    for line in report.to_string().lines() {
        say(&format!("  {line}"));
    }
    let stats = writer.stop().await?;
    say(&format!(
        "  the writer committed {} transactions; its next write was refused: {}",
        stats.transactions,
        stats.refused.as_deref().unwrap_or("(it was stopped first)")
    ));

    // Capture and replay had nothing left to do: stop them.
    if let Some(tx) = stop_tx.take() {
        let _ = tx.send(());
    }
    for task in [first, second].into_iter().flatten() {
        task.await.expect("capture task")?;
    }
    let _ = replay_stop_tx.send(());
    let followed = follower.await.expect("replay task")?;
    drop(replay_lock);

    say(
        "▶ verifying the copy against the live database through the mapping (row count and checksum per table)",
    );
    let copy = target.connect("shop").await?;
    // The fence ended every other session of the live database; this one is new (and
    // read-only, which is all verify needs).
    let live = source.connect("shop").await?;
    let tables: Vec<crate::transform::TableName> = ["customers", "products", "orders"]
        .iter()
        .map(|t| crate::transform::TableName::new("public", *t))
        .collect();
    let verified = crate::verify::verify(
        &live,
        &copy,
        &mapping,
        &tables,
        &crate::verify::VerifyOptions::default(),
    )
    .await?;
    for t in &verified.tables {
        say(&format!(
            "  {} {:<28} live {:>6} rows   copy {:>6} rows   checksums {}",
            if t.equal { "✓" } else { "✗" },
            format!("{} → {}", t.source.name, t.target.name),
            t.source_rows,
            t.target_rows,
            if t.equal { "equal" } else { "differ" }
        ));
    }
    if !verified.equal() {
        return Err(DemoError::Mismatch(
            "the copy differs from the live database through the mapping".into(),
        ));
    }
    if let Some(id) = stats.last_order_id {
        let found = copy
            .query_opt("SELECT 1 FROM orders WHERE id = $1", &[&id])
            .await?
            .is_some()
            || live
                .query_opt("SELECT 1 FROM orders WHERE id = $1", &[&id])
                .await?
                .is_none(); // cancelled later by the writer itself
        if !found {
            return Err(DemoError::Mismatch(format!(
                "the writer's last committed order {id} is missing on the copy"
            )));
        }
        let next: i64 = copy
            .query_one("SELECT nextval('orders_id_seq')", &[])
            .await?
            .get(0);
        say(&format!(
            "  ✓ the last order the live site committed (#{id}) is on the copy; the copy's next order id is {next}"
        ));
    }
    say(&format!(
        "▶ done in {:.1} s; clusters and buffer are removed now",
        t0.elapsed().as_secs_f64()
    ));
    Ok(DemoReport {
        writer: stats,
        replayed_changes: followed.changes,
        verified_tables: verified.tables.len(),
        cutover: report,
    })
}
