//! Helpers shared by the integration tests: run capture against a localpg cluster and read a
//! buffer back as decoded transactions.
#![allow(dead_code)]

use std::path::Path;

use walshift::buffer::{BufferReader, TxnEvent};
use walshift::capture::{self, CaptureConfig, CaptureReport};
use walshift::conn::ConnInfo;
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
    CaptureConfig::new(
        ConnInfo::parse(&cluster.conn_string("postgres")).unwrap(),
        dir,
    )
}

/// Runs capture (in process) until everything committed so far is durable in `dir`.
pub async fn capture_until_now_report(cluster: &Cluster, dir: &Path) -> CaptureReport {
    let mut cfg = config(cluster, dir);
    cfg.until_lsn = Some(current_lsn(cluster).await);
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        capture::run(cfg, std::future::pending::<()>()),
    )
    .await
    .expect("capture reached the end of WAL in time")
    .expect("capture succeeded")
}

/// As [`capture_until_now_report`], then reads the whole buffer back.
pub async fn capture_until_now(cluster: &Cluster, dir: &Path) -> Captured {
    capture_until_now_report(cluster, dir).await;
    read_buffer(dir)
}
