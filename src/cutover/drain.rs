//! The drain, inside the window: the marker is written on the fenced source, then cutover waits
//! until it is durable (the slot's confirmed position passes the end of the marker's
//! transaction, found in the buffer by [`MarkerScan`]) and applied (the target's
//! `walshift.applied` passes it). Capture confirms only what the buffer has fsynced, and
//! replay records its position in the transaction it applies, so both are proofs, not guesses.

use std::path::Path;

use super::journal::Step;
use super::{Ctx, CutoverError};
use crate::SqlContext;
use crate::buffer::{BufferError, BufferReader, TxnEvent, TxnIter};
use crate::lsn::Lsn;
use crate::source::pgoutput::{self, LogicalMessage};

/// A marker scan from the target's current applied position, read up to the buffer's end.
pub(super) async fn position(ctx: &Ctx<'_>) -> Result<MarkerScan, CutoverError> {
    let applied = crate::apply::progress::read_applied(&ctx.tgt, &ctx.buffer_id)
        .await?
        .unwrap_or(Lsn::ZERO);
    let mut scan = MarkerScan::new(&ctx.config.buffer_dir, applied, &ctx.report.cutover_id)?;
    scan.poll()?;
    Ok(scan)
}

/// Writes the marker on the source: `pg_logical_emit_message(true, 'walshift', <cutover id>)`.
pub(super) async fn marker(ctx: &mut Ctx<'_>) -> Result<(), CutoverError> {
    ctx.tl.begin("marker");
    let marker: Lsn = ctx
        .src
        .query_one(
            "SELECT pg_logical_emit_message(true, $1, $2)::text",
            &[&crate::apply::replay::MARKER_PREFIX, &ctx.report.cutover_id],
        )
        .await
        .sql_context("writing the cutover marker on the source")?
        .get::<_, String>(0)
        .parse()
        .unwrap_or_default();
    ctx.report.marker_lsn = Some(marker);
    ctx.note(Step::Marker, marker.to_string());
    ctx.tl.end(&mut ctx.report, format!("at {marker}"));
    Ok(())
}

/// Waits until the marker's transaction is durable in the buffer (slot confirmed) and applied
/// on the target.
pub(super) async fn drain(ctx: &mut Ctx<'_>) -> Result<(), CutoverError> {
    let config = ctx.config;
    ctx.tl.begin("drain");
    let mut scan = ctx.scan.take().expect("positioned after preflight");
    let mut durable = false;
    let end = loop {
        ctx.deadline_check("drain")?;
        ctx.helpers.check().await?;
        // Durable: the slot is confirmed past the end of the marker's transaction (capture
        // confirms only what the buffer has fsynced).
        let found = scan.poll()?;
        if !durable && let Some(end) = found {
            durable = crate::source::slot::confirmed_flush_lsn(&ctx.src, &config.slot)
                .await
                .sql_context("reading the slot's confirmed position")?
                .is_some_and(|c| c >= end);
        }
        if durable && let Some(end) = found {
            let applied = crate::apply::progress::read_applied(&ctx.tgt, &ctx.buffer_id)
                .await?
                .unwrap_or(Lsn::ZERO);
            if applied >= end {
                break end;
            }
        }
        tokio::time::sleep(config.poll_interval).await;
    };
    ctx.report.marker_commit_end = Some(end);
    ctx.hook_ctx.marker = Some(end);
    ctx.note(Step::Drained, end.to_string());
    ctx.tl.end(&mut ctx.report, format!("applied past {end}"));
    Ok(())
}

/// What the window had to drain (from the target's applied position at the fence to the
/// marker), counted once the window is over; a warning if the buffer cannot be read.
pub(super) fn count_drained(ctx: &mut Ctx<'_>) {
    if let (Some(from), Some(to)) = (ctx.report.applied_at_fence, ctx.report.marker_commit_end) {
        match count_between(&ctx.config.buffer_dir, from, to) {
            Ok((txns, changes)) => {
                // The marker's own transaction is not a drained change.
                ctx.report.transactions_drained = txns.saturating_sub(1);
                ctx.report.changes_drained = changes;
            }
            Err(e) => ctx
                .report
                .warnings
                .push(format!("could not count the drained changes: {e}")),
        }
    }
}

/// Follows the buffer from a position, looking for the marker message of one cutover.
pub struct MarkerScan {
    iter: TxnIter,
    cutover_id: String,
    in_marker_txn: bool,
    /// End LSN of the marker's transaction, once found.
    pub found: Option<Lsn>,
}

impl MarkerScan {
    /// Scans transactions ending after `from` (positioning reads up to a segment).
    pub fn new(buffer_dir: &Path, from: Lsn, cutover_id: &str) -> Result<Self, BufferError> {
        Ok(MarkerScan {
            iter: BufferReader::open(buffer_dir)?.transactions_from(from)?,
            cutover_id: cutover_id.to_owned(),
            in_marker_txn: false,
            found: None,
        })
    }

    /// Reads what has been appended since the last call; returns the marker transaction's end
    /// LSN once seen.
    pub fn poll(&mut self) -> Result<Option<Lsn>, BufferError> {
        if self.found.is_some() {
            return Ok(self.found);
        }
        self.iter.refresh()?;
        for ev in self.iter.by_ref() {
            match ev? {
                TxnEvent::Begin(_) => self.in_marker_txn = false,
                TxnEvent::Change(r) | TxnEvent::Standalone(r) => {
                    if r.kind == b'M'
                        && let Ok(LogicalMessage::Message(m)) = pgoutput::decode(&r.payload)
                        && m.prefix == crate::apply::replay::MARKER_PREFIX
                        && m.content.as_ref() == self.cutover_id.as_bytes()
                    {
                        self.in_marker_txn = true;
                    }
                }
                TxnEvent::Commit { commit, .. } => {
                    if self.in_marker_txn {
                        self.found = Some(commit.end_lsn);
                        return Ok(self.found);
                    }
                }
            }
        }
        Ok(None)
    }
}

/// Transactions and row changes (insert, update, delete, truncate) of the transactions ending
/// after `from` and at or before `to`.
pub fn count_between(buffer_dir: &Path, from: Lsn, to: Lsn) -> Result<(u64, u64), BufferError> {
    let (mut txns, mut changes, mut pending) = (0u64, 0u64, 0u64);
    for ev in BufferReader::open(buffer_dir)?.transactions_from(from)? {
        match ev? {
            TxnEvent::Begin(_) => pending = 0,
            TxnEvent::Change(r) if matches!(r.kind, b'I' | b'U' | b'D' | b'T') => pending += 1,
            TxnEvent::Commit { commit, .. } => {
                if commit.end_lsn > to {
                    break;
                }
                txns += 1;
                changes += pending;
            }
            _ => {}
        }
    }
    Ok((txns, changes))
}
