//! `walshift demo`: the main job end to end on throwaway clusters, told as a story. So far it
//! covers capture: a live shop keeps taking orders while walshift streams its changes into a
//! durable buffer, is stopped and restarted mid-stream, and the buffer is checked against what
//! the shop committed.

pub mod shop;

use std::time::{Duration, Instant};

use crate::buffer::{BufferReader, TxnEvent};
use crate::capture::{self, CaptureConfig};
use crate::conn::ConnInfo;
use crate::lsn::Lsn;
use crate::source::pgoutput::{self, LogicalMessage};
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
    pub captured_transactions: u64,
    pub captured_orders_inserted: u64,
    pub captured_orders_updated: u64,
    pub captured_orders_deleted: u64,
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
    Decode(#[from] pgoutput::DecodeError),
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
        "▶ starting a throwaway PostgreSQL cluster for the live site (wal_level=logical, 127.0.0.1)",
    );
    let source = Cluster::start(ClusterOptions::default())?;
    source.create_database("shop").await?;
    let admin = source.connect("shop").await?;
    admin.batch_execute(shop::SCHEMA).await?;
    shop::seed(&admin, 2_000, 10_000).await?;
    say(&format!(
        "  shop ready on port {}: 2,000 customers, 50 products, 10,000 orders",
        source.port()
    ));

    let dir = tempfile::Builder::new()
        .prefix("walshift-demo-")
        .tempdir()
        .map_err(|e| crate::Error::io(std::env::temp_dir(), e))?;
    let buffer_dir = dir.path().join("buffer");
    let conn = ConnInfo::parse(&source.conn_string("shop"))?;
    let config = CaptureConfig::new(conn.clone(), &buffer_dir);

    say(
        "▶ capture: preflight, publication, replication slot, then streaming into a durable buffer",
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn(capture::run(config.clone(), async move {
        let _ = stop_rx.await;
    }));
    // The slot exists once capture has written the buffer's metadata; from then on every
    // commit is captured (what came before is what a clone copies).
    while !crate::buffer::BufferMeta::path(&buffer_dir).exists() {
        if first.is_finished() {
            first.await.expect("capture task")?;
            return Err(DemoError::Mismatch(
                "capture stopped before streaming".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    say("▶ the site stays live: a writer places, ships and cancels orders");
    let writer = shop::Writer::start(source.connect("shop").await?, 2_000, opts.tps);
    for s in 1..=opts.seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let status = BufferReader::open(&buffer_dir).and_then(|r| r.status());
        let (txns, durable) = status
            .map(|s| {
                (
                    s.transactions,
                    s.last_commit.map(|c| c.end_lsn).unwrap_or_default(),
                )
            })
            .unwrap_or_default();
        say(&format!(
            "  {s:>2}s  site committed {:>5} transactions | buffer holds {txns:>5}, durable to {durable}",
            writer.committed()
        ));
        if s == opts.seconds / 2 {
            say("  ✂ stopping capture mid-stream (as a crash or a redeploy would) …");
            let _ = stop_tx.send(());
            let r = first.await.expect("capture task")?;
            say(&format!(
                "    stopped at {} after {} transactions; the site keeps writing",
                r.durable_lsn, r.transactions
            ));
            break;
        }
    }
    say("  ↻ capture restarted: it resumes exactly after the last durable transaction");
    let second = tokio::spawn(capture::run(config.clone(), std::future::pending::<()>()));
    tokio::time::sleep(Duration::from_secs(opts.seconds - opts.seconds / 2)).await;
    let stats = writer.stop().await?;
    let end: String = admin
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let end_lsn: Lsn = end
        .parse()
        .map_err(|e| crate::Error::Config(format!("{e}")))?;
    second.abort();
    let _ = second.await;
    say(&format!(
        "▶ the writer stopped after {} transactions; draining capture to the source's end of WAL {end_lsn}",
        stats.transactions
    ));
    let mut drain = config.clone();
    drain.until_lsn = Some(end_lsn);
    let r = capture::run(drain, std::future::pending::<()>()).await?;
    say(&format!(
        "  durable and confirmed to the slot up to {}",
        r.durable_lsn
    ));

    say("▶ checking the buffer against what the site committed");
    let mut report = DemoReport {
        writer: stats.clone(),
        captured_transactions: 0,
        captured_orders_inserted: 0,
        captured_orders_updated: 0,
        captured_orders_deleted: 0,
        end_lsn,
    };
    let mut orders_relid = None;
    let mut last_end = Lsn::ZERO;
    for ev in BufferReader::open(&buffer_dir)?.transactions_from(Lsn::ZERO)? {
        match ev? {
            TxnEvent::Commit { commit, .. } => {
                if commit.end_lsn <= last_end {
                    return Err(DemoError::Mismatch(format!(
                        "commit {} out of order after {last_end}",
                        commit.end_lsn
                    )));
                }
                last_end = commit.end_lsn;
                report.captured_transactions += 1;
            }
            TxnEvent::Change(rec) | TxnEvent::Standalone(rec) => {
                match pgoutput::decode(&rec.payload)? {
                    LogicalMessage::Relation(r) if r.name == "orders" => {
                        orders_relid = Some(r.relid)
                    }
                    LogicalMessage::Insert(i) if Some(i.relid) == orders_relid => {
                        report.captured_orders_inserted += 1
                    }
                    LogicalMessage::Update(u) if Some(u.relid) == orders_relid => {
                        report.captured_orders_updated += 1
                    }
                    LogicalMessage::Delete(d) if Some(d.relid) == orders_relid => {
                        report.captured_orders_deleted += 1
                    }
                    _ => {}
                }
            }
            TxnEvent::Begin(_) => {}
        }
    }
    let checks = [
        (
            "transactions",
            stats.transactions,
            report.captured_transactions,
        ),
        (
            "orders placed",
            stats.orders_placed,
            report.captured_orders_inserted,
        ),
        (
            "orders shipped",
            stats.orders_shipped,
            report.captured_orders_updated,
        ),
        (
            "orders cancelled",
            stats.orders_cancelled,
            report.captured_orders_deleted,
        ),
    ];
    for (what, site, buffer) in checks {
        let mark = if site == buffer { "✓" } else { "✗" };
        say(&format!(
            "  {mark} {what:<17} site {site:>6}   buffer {buffer:>6}"
        ));
        if site != buffer {
            return Err(DemoError::Mismatch(format!(
                "{what}: the site committed {site}, the buffer holds {buffer}"
            )));
        }
    }
    say("  ✓ every committed transaction is in the buffer exactly once, in commit order");
    say(&format!(
        "▶ done in {:.1} s; clusters and buffer are removed now",
        t0.elapsed().as_secs_f64()
    ));
    say("  (replay into a migrated copy and cutover come next in walshift's roadmap)");
    Ok(report)
}
