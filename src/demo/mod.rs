//! `walshift demo`: the main job end to end on throwaway clusters, told as a story. A live shop
//! keeps taking orders while walshift clones it into a second cluster at the slot's snapshot,
//! the release's migration reshapes the copy (a computed column, a rename, a table split),
//! the live changes stream into a durable buffer (capture is stopped and restarted mid-stream)
//! and are replayed through the release's mapping, and then the cutover fences the live site,
//! drains the last changes, syncs sequences, verifies and switches — with its window measured.
//! The copy is finally verified against the live database through the mapping.
//!
//! With PgBouncer installed (and [`DemoOptions::pooler`] on, the default), the writer goes
//! through a throwaway PgBouncer in front of the live site and the cutover runs in pooler mode:
//! the fence pauses the pool, the switch repoints it to the copy and resumes, so the writer
//! never sees an error — its transactions wait during the window and then run on the copy.
//! The copy then takes writes the live site never sees, so the comparison that counts is the
//! cutover's checksum verify inside the window; the demo checks the writer's last order and the
//! copy's order ids instead. Without PgBouncer the writer connects directly and the read-only
//! fence refuses it, as a maintenance page would.

pub mod shop;

use std::time::{Duration, Instant};

use std::sync::Arc;

use crate::apply::replay::{self, ReplayConfig};
use crate::buffer::BufferReader;
use crate::capture::{self, CaptureConfig};
use crate::clone::{self, CloneOptions, CloneStatus};
use crate::conn::ConnInfo;
use crate::localpg::{Cluster, ClusterOptions, PgBouncer, PoolerOptions};
use crate::lsn::Lsn;

/// Demo settings.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Seconds the shop keeps writing. Default 6.
    pub seconds: u64,
    /// Writer transactions per second. Default 150.
    pub tps: u32,
    /// Put PgBouncer in front of the live site when it is installed, and cut over in pooler
    /// mode. Default true: the writer is held during the window instead of refused. False (or
    /// PgBouncer missing) shows the read-only fence refusing a direct writer.
    pub pooler: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            seconds: 6,
            tps: 150,
            pooler: true,
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
    /// Tables verified equal to source + mapping: after the switch (direct), or inside the
    /// window by the cutover's checksum verify (through PgBouncer).
    pub verified_tables: usize,
    /// Whether the writer went through PgBouncer and the cutover ran in pooler mode.
    pub pooler: bool,
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
    #[error(transparent)]
    Writer(#[from] shop::WriterError),
    #[error("{source}\nPgBouncer's log (last lines):\n{log}")]
    PooledWriter {
        source: shop::WriterError,
        log: String,
    },
    #[error("verification failed: {0}")]
    Mismatch(String),
}

/// The last lines of PgBouncer's log, for a failure message.
fn log_tail(bouncer: &PgBouncer) -> String {
    let log = bouncer.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Stops the writer; through PgBouncer, a failure carries the pooler's log.
async fn stop_writer(
    writer: shop::Writer,
    bouncer: Option<&PgBouncer>,
) -> Result<shop::WriterStats, DemoError> {
    writer.stop().await.map_err(|source| match bouncer {
        Some(b) => DemoError::PooledWriter {
            source,
            log: log_tail(b),
        },
        None => DemoError::Writer(source),
    })
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

    let bouncer = if !opts.pooler {
        say(
            "  without PgBouncer (--no-pooler): the writer connects directly, and the fence will refuse its writes",
        );
        None
    } else if !PgBouncer::available() {
        say(
            "  without PgBouncer (not installed; `apt install pgbouncer` shows clients held instead of refused): \
             the writer connects directly, and the fence will refuse its writes",
        );
        None
    } else {
        let b = PgBouncer::start(PoolerOptions::new().database(
            "shop",
            &format!("host=127.0.0.1 port={} dbname=shop", source.port()),
        ))?;
        say(&format!(
            "  PgBouncer on port {} in front of the live shop (transaction pooling): the writer goes through it, \
             and the cutover will pause it instead of refusing the writer",
            b.port()
        ));
        Some(b)
    };

    let writer = match &bouncer {
        Some(b) => {
            say(
                "▶ the site stays live: a writer places, ships and cancels orders through PgBouncer from now on \
                 (each transaction asks which server it is on and speaks that server's schema)",
            );
            let client = ConnInfo::parse(&b.conn_string("shop"))?.connect().await?;
            shop::Writer::start_pooled(client, 2_000, opts.tps, source.port(), target.port())
        }
        None => {
            say("▶ the site stays live: a writer places, ships and cancels orders from now on");
            shop::Writer::start(source.connect("shop").await?, 2_000, opts.tps)
        }
    };

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
        if bouncer.is_some() && writer.is_finished() {
            stop_writer(writer, bouncer.as_ref()).await?;
            return Err(DemoError::Mismatch(
                "the writer stopped before the cutover".into(),
            ));
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

    let mut cut =
        crate::cutover::CutoverConfig::new(source_conn.clone(), target_conn.clone(), &buffer_dir);
    cut.transform = Some(mapping.clone());
    cut.max_window = Duration::from_secs(10);
    match &bouncer {
        Some(b) => {
            say(
                "▶ cutover, with the writer still placing orders through PgBouncer: PAUSE the pool (the writer's next \
                 transaction waits), fence the live site (read-only, for anything around the pooler), marker, drain, \
                 sequences, verify with checksums, repoint PgBouncer to the copy, RESUME",
            );
            cut.pooler = Some(crate::cutover::PoolerConfig {
                admin: ConnInfo::parse(&b.admin_conn_string())?,
                database: "shop".into(),
                databases_file: b.databases_file(),
                target_entry: None,
            });
            // The copy takes the writer's orders from RESUME on, so only a verify inside the
            // window compares like with like: make it the thorough one.
            cut.verify = crate::cutover::VerifyMode::Checksum;
        }
        None => {
            say(
                "▶ cutover, with the writer still placing orders: fence the live site (read-only), marker, drain, sequences, verify, switch",
            );
            cut.verify = crate::cutover::VerifyMode::Counts;
            cut.switch = Some(format!(
                "echo \"switching the shop's traffic to 127.0.0.1:{}\"",
                target.port()
            ));
        }
    }
    let report = match crate::cutover::run(cut, std::future::pending::<()>()).await {
        Ok(r) => r,
        Err(e) => {
            // The writer's own failure, if it has one, says more than the cutover's.
            if let Some(b) = &bouncer
                && writer.is_finished()
            {
                stop_writer(writer, Some(b)).await?;
            }
            return Err(e.into());
        }
    };
    for line in report.to_string().lines() {
        say(&format!("  {line}"));
    }
    let stats = if bouncer.is_some() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stats = stop_writer(writer, bouncer.as_ref()).await?;
        say(&format!(
            "  the writer never saw an error: {} transactions ({} on the live site, {} on the copy after the switch); \
             longest transaction {:.0} ms (held by PgBouncer during the window)",
            stats.transactions, stats.on_live, stats.on_copy, stats.longest_txn_ms
        ));
        stats
    } else {
        let stats = stop_writer(writer, None).await?;
        say(&format!(
            "  the writer committed {} transactions; its next write was refused: {}",
            stats.transactions,
            stats.refused.as_deref().unwrap_or("(it was stopped first)")
        ));
        stats
    };

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

    let verified_tables = match &bouncer {
        Some(_) => check_pooled(&source, &target, &report, &stats, &say).await?,
        None => verify_direct(&source, &target, &mapping, &stats, &say).await?,
    };
    say(&format!(
        "▶ done in {:.1} s; clusters and buffer are removed now",
        t0.elapsed().as_secs_f64()
    ));
    Ok(DemoReport {
        writer: stats,
        replayed_changes: followed.changes,
        verified_tables,
        cutover: report,
        pooler: bouncer.is_some(),
    })
}

/// Direct route: the live site stays as the fence left it, so the copy must equal it through
/// the mapping. Returns the number of tables compared.
async fn verify_direct(
    source: &Cluster,
    target: &Cluster,
    mapping: &crate::transform::Mapping,
    stats: &shop::WriterStats,
    say: &dyn Fn(&str),
) -> Result<usize, DemoError> {
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
        mapping,
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
    Ok(verified.tables.len())
}

/// Through PgBouncer: the copy has taken the writer's orders since RESUME, so it differs from
/// the fenced live site by design; the comparison is the cutover's checksum verify inside the
/// window. Checks instead that the writer's last order is on the copy and that the copy hands
/// out order ids past every one the live site did. Returns the number of tables the window's
/// verify compared.
async fn check_pooled(
    source: &Cluster,
    target: &Cluster,
    report: &crate::cutover::CutoverReport,
    stats: &shop::WriterStats,
    say: &dyn Fn(&str),
) -> Result<usize, DemoError> {
    let equal = report.verified.iter().filter(|t| t.equal).count();
    say(&format!(
        "▶ no comparison with the live database now: the copy has taken the writer's orders since RESUME and the live \
         site has not, so they differ by design. The comparison that counts is the cutover's {} verify above, made \
         inside the window with the pool paused and the live site fenced: {equal} of {} tables equal through the mapping",
        report.verify_mode,
        report.verified.len()
    ));
    if report.verify_mode != crate::cutover::VerifyMode::Checksum.as_str()
        || report.verified.is_empty()
        || equal != report.verified.len()
    {
        return Err(DemoError::Mismatch(format!(
            "the window's verify ({}) did not find every table equal: {equal} of {}",
            report.verify_mode,
            report.verified.len()
        )));
    }
    let copy = target.connect("shop").await?;
    let live = source.connect("shop").await?;
    let Some(id) = stats.last_order_id else {
        return Err(DemoError::Mismatch(
            "the writer committed no order that it kept".into(),
        ));
    };
    if stats.last_order_side != Some(shop::Side::Copy) {
        return Err(DemoError::Mismatch(format!(
            "the writer's last order #{id} was written on the live site, not on the copy: PgBouncer was not repointed"
        )));
    }
    if copy
        .query_opt("SELECT 1 FROM orders WHERE id = $1", &[&id])
        .await?
        .is_none()
    {
        return Err(DemoError::Mismatch(format!(
            "the writer's last committed order #{id} is missing on the copy"
        )));
    }
    let live_last: i64 = live
        .query_one("SELECT last_value FROM orders_id_seq", &[])
        .await?
        .get(0);
    let next: i64 = copy
        .query_one("SELECT nextval('orders_id_seq')", &[])
        .await?
        .get(0);
    let first_on_copy = stats.first_copy_order_id.unwrap_or(next);
    if next <= live_last || first_on_copy <= live_last {
        return Err(DemoError::Mismatch(format!(
            "the copy hands out order ids the live site already used: the live site reached #{live_last}, \
             the copy's first order for the writer was #{first_on_copy} and its next is #{next}"
        )));
    }
    say(&format!(
        "  ✓ the writer's last order (#{id}) is on the copy; the live site handed out ids up to #{live_last}, \
         the copy's first order after the switch was #{first_on_copy} and its next order id is {next}"
    ));
    Ok(report.verified.len())
}
