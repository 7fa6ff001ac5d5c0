//! Capture's side of [`partitions`]: the record read (or written) at start, and the comparison
//! with the source while streaming.

use super::stream::StreamState;
use super::{CaptureConfig, CaptureError, PreparedSource, partitions};
use crate::error::SqlContext;

/// The partition record to watch, if the publication publishes via the root: a new one read in
/// the snapshot of a slot created now, else the buffer's record (or one read now, with a
/// warning, when there is none). Applies `accept_partition_rewrite`.
pub(super) async fn partition_watch(
    config: &CaptureConfig,
    prepared: &PreparedSource,
) -> Result<Option<PartitionWatch>, CaptureError> {
    let dir = &config.buffer_dir;
    // A slot created now starts a new stream: a record left by an earlier, abandoned one (an
    // interrupted clone) does not describe it.
    let existing = match prepared.snapshot {
        Some(_) => {
            let path = partitions::PartitionRecord::path(dir);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(crate::Error::io(path, e).into());
                }
                _ => None,
            }
        }
        None => partitions::PartitionRecord::read(dir)?,
    };
    if existing.is_none() && prepared.via_root.is_empty() {
        return Ok(None);
    }
    let client = config.source.connect().await?;
    let mut record = match existing {
        Some(r) => r,
        None => {
            let roots = prepared.via_root.clone();
            let record = match &prepared.snapshot {
                Some(snapshot) => {
                    let snap = config.source.connect().await?;
                    snap.batch_execute(&format!(
                        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
                        crate::sql::quote_literal(snapshot)
                    ))
                    .await
                    .sql_context("importing the slot's snapshot to record the partitions")?;
                    partitions::record(&snap, roots).await
                }
                None => {
                    tracing::warn!(
                        "no partition record in {}: recording the partitions as they are now, not \
                         as of the slot's start",
                        dir.display()
                    );
                    partitions::record(&client, roots).await
                }
            }
            .sql_context("recording the leaf partitions' relfilenodes")?;
            record.write(dir)?;
            record
        }
    };
    if !config.accept_partition_rewrite.is_empty() {
        let seen = partitions::observe(&client, &record)
            .await
            .sql_context("reading the leaf partitions on the source")?;
        for name in &config.accept_partition_rewrite {
            let name = name.trim();
            if !record.leaves.iter().any(|l| l.name == name) {
                return Err(CaptureError::UnknownPartition {
                    name: name.to_owned(),
                    known: record
                        .leaves
                        .iter()
                        .map(|l| l.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            match seen.differences.iter().find(|d| d.leaf.name == name) {
                Some(d) => {
                    tracing::warn!(partition = name, change = ?d.change, "accepted as the operator asked");
                    record.accept(d);
                }
                None => tracing::info!(partition = name, "unchanged; nothing to accept"),
            }
        }
        record.write(dir)?;
    }
    Ok(Some(PartitionWatch {
        client,
        record,
        reported: Vec::new(),
    }))
}

/// Capture's side of [`partitions`]: the record and a SQL session on the source.
pub(super) struct PartitionWatch {
    client: tokio_postgres::Client,
    pub(super) record: partitions::PartitionRecord,
    /// Differences waiting for the stream to pass the point they were seen at.
    reported: Vec<u32>,
}

impl PartitionWatch {
    /// Writes the TRUNCATEs received into the record when they changed.
    pub(super) fn save_truncates(
        &mut self,
        dir: &std::path::Path,
        state: &StreamState,
    ) -> Result<(), CaptureError> {
        if self.record.truncates != state.truncates {
            self.record.truncates = state.truncates.clone();
            self.record.write(dir)?;
        }
        Ok(())
    }

    /// Compares the source with the record; accepts what the stream explains, records new
    /// leaves, and fails on what it cannot carry. Returns true when a difference waits for
    /// the stream (the caller asks the server for its position).
    pub(super) async fn check(
        &mut self,
        dir: &std::path::Path,
        state: &mut StreamState,
    ) -> Result<bool, CaptureError> {
        let seen = partitions::observe(&self.client, &self.record)
            .await
            .sql_context("comparing the leaf partitions with the record")?;
        let mut changed = false;
        for leaf in seen.new_leaves {
            tracing::warn!(
                "partition {} was attached to {} after the clone: changes through the stream reach \
                 the copy, but rows it held before ATTACH PARTITION do not. Compare it with \
                 `walshift verify --tables {}`",
                leaf.name,
                self.record.root_name(leaf.root),
                self.record.root_name(leaf.root)
            );
            self.record.leaves.push(leaf);
            changed = true;
        }
        let decoded = state.server_wal_end.max(state.received_commit_end);
        let mut unexplained = Vec::new();
        let mut waiting = false;
        // Every TRUNCATE received so far committed before this observation: with no
        // difference left, none of them explains anything any more.
        if seen.differences.is_empty() && !state.truncates.is_empty() {
            state.truncates.clear();
        }
        if state.truncates != self.record.truncates {
            self.record.truncates = state.truncates.clone();
            changed = true;
        }
        for d in seen.differences {
            match partitions::judge(&d, seen.lsn, &state.truncates, decoded) {
                partitions::Verdict::Explained => {
                    tracing::info!(partition = %d.leaf.name, "rewritten by a TRUNCATE of its root the stream carried");
                    self.record.accept(&d);
                    changed = true;
                }
                partitions::Verdict::Wait => {
                    if !self.reported.contains(&d.leaf.oid) {
                        tracing::debug!(partition = %d.leaf.name, "changed; waiting for the stream to pass it");
                        self.reported.push(d.leaf.oid);
                    }
                    waiting = true;
                }
                partitions::Verdict::Unexplained => unexplained.push(d),
            }
        }
        if changed {
            self.record.write(dir)?;
        }
        if !unexplained.is_empty() {
            return Err(CaptureError::PartitionChanged(unexplained));
        }
        if !waiting {
            self.reported.clear();
        }
        Ok(waiting)
    }
}
