//! Capture against a localpg cluster (in process, up to the source's current end of WAL, with
//! or without a clone), and a buffer read back: decoded transactions, segment files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use walshift::buffer::format::SEGMENT_SUFFIX;
use walshift::buffer::{BufferReader, TxnEvent};
use walshift::capture::{self, CaptureConfig, CaptureError, CaptureReport};
use walshift::clone::CloneOptions;
use walshift::localpg::Cluster;
use walshift::lsn::Lsn;
use walshift::source::pgoutput::{self, LogicalMessage, Relation};

/// One complete transaction from the buffer, decoded.
#[derive(Debug)]
pub struct Txn {
    pub end_lsn: Lsn,
    pub messages: Vec<LogicalMessage>,
}

impl Txn {
    /// Row changes (insert, update, delete) in the transaction.
    pub fn changes(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| {
                matches!(
                    m,
                    LogicalMessage::Insert(_)
                        | LogicalMessage::Update(_)
                        | LogicalMessage::Delete(_)
                )
            })
            .count()
    }
}

/// A buffer's content, decoded.
#[derive(Debug, Default)]
pub struct Captured {
    pub transactions: Vec<Txn>,
    /// Every Relation message seen (originals and preamble copies).
    pub relations: Vec<Relation>,
}

/// Reads every complete transaction of a buffer.
pub fn read_buffer(dir: &Path) -> Captured {
    let mut out = Captured::default();
    let mut current: Vec<LogicalMessage> = Vec::new();
    for ev in BufferReader::open(dir)
        .unwrap()
        .transactions_from(Lsn::ZERO)
        .unwrap()
    {
        match ev.unwrap() {
            TxnEvent::Begin(_) => current.clear(),
            TxnEvent::Change(r) | TxnEvent::Standalone(r) => {
                let m = pgoutput::decode(&r.payload).unwrap();
                if let LogicalMessage::Relation(rel) = &m {
                    out.relations.push(rel.clone());
                }
                current.push(m);
            }
            TxnEvent::Commit { commit, .. } => {
                out.transactions.push(Txn {
                    end_lsn: commit.end_lsn,
                    messages: std::mem::take(&mut current),
                });
            }
        }
    }
    out
}

/// The source's current end of WAL.
pub async fn current_lsn(cluster: &Cluster) -> Lsn {
    let c = cluster.connect("postgres").await.unwrap();
    let s: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    s.parse().unwrap()
}

/// Capture config for a test cluster's `postgres` database.
pub fn config(cluster: &Cluster, dir: &Path) -> CaptureConfig {
    CaptureConfig::new(super::pair::conn(cluster), dir)
}

/// Runs capture (in process), its config changed by `tweak`, until everything committed so far
/// is durable in `dir`.
pub async fn try_until_now(
    cluster: &Cluster,
    dir: &Path,
    tweak: impl FnOnce(&mut CaptureConfig),
) -> Result<CaptureReport, CaptureError> {
    let mut cfg = config(cluster, dir);
    cfg.until_lsn = Some(current_lsn(cluster).await);
    tweak(&mut cfg);
    tokio::time::timeout(
        Duration::from_secs(120),
        capture::run(cfg, std::future::pending::<()>()),
    )
    .await
    .expect("capture reached the end of WAL in time")
}

/// Runs capture (in process) until everything committed so far is durable in `dir`.
pub async fn until_now_report(cluster: &Cluster, dir: &Path) -> CaptureReport {
    try_until_now(cluster, dir, |_| {})
        .await
        .expect("capture succeeded")
}

/// As [`until_now_report`], then reads the whole buffer back.
pub async fn until_now(cluster: &Cluster, dir: &Path) -> Captured {
    until_now_report(cluster, dir).await;
    read_buffer(dir)
}

/// A cluster holding `schema` (and its rows), and a buffer directory whose first capture has
/// created the slot and the publication: the buffer starts right after the schema.
pub async fn source_with_buffer(schema: &str) -> (Cluster, TempDir) {
    let cluster = super::cluster();
    cluster.execute("postgres", schema).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    until_now(&cluster, dir.path()).await;
    (cluster, dir)
}

/// Capture with a clone of `source` into `target` (`--clone-to`) until everything committed
/// so far is in the buffer.
pub async fn with_clone(
    source: &Cluster,
    target: &Cluster,
    dir: &Path,
) -> Result<CaptureReport, CaptureError> {
    let mut cfg = config(source, dir);
    cfg.clone = Some(CloneOptions::new(
        super::pair::conn(source),
        super::pair::conn(target),
    ));
    cfg.until_lsn = Some(current_lsn(source).await);
    tokio::time::timeout(
        Duration::from_secs(180),
        capture::run(cfg, std::future::pending::<()>()),
    )
    .await
    .expect("capture finished in time")
}

/// Capture running in the background, its clone done, until stopped.
pub struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<CaptureReport, CaptureError>>,
}

impl Running {
    /// Starts capture with its clone (`cfg.clone`) and returns once the target's clone state
    /// says done; panics if capture ends before, or if the clone takes longer than `limit`.
    pub async fn cloned(cfg: CaptureConfig, limit: Duration) -> Running {
        let deadline = std::time::Instant::now() + limit;
        let target = cfg.clone.as_ref().expect("a clone").target.clone();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(capture::run(cfg, async move {
            let _ = rx.await;
        }));
        loop {
            if let Ok(Some(s)) = walshift::clone::clone_state(&target).await
                && s.status == walshift::clone::CloneStatus::Done
            {
                break;
            }
            assert!(!task.is_finished(), "capture ended early: {:?}", task.await);
            assert!(
                std::time::Instant::now() < deadline,
                "clone did not finish in {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Running { stop, task }
    }

    /// Whether capture has ended (it should not before it is stopped).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops capture (as Ctrl-C would) and returns how it ended.
    pub async fn stop(self) -> Result<CaptureReport, CaptureError> {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

/// The segment files of a buffer directory, oldest first.
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(SEGMENT_SUFFIX))
        .collect();
    v.sort();
    v
}
