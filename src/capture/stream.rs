//! The stream state loop: receive → append → flush → acknowledge.
//!
//! Every received pgoutput message is appended, unchanged, to the buffer (a memory copy; the
//! buffer's sync thread writes and fsyncs groups in the background). Every `flush_interval` the
//! appended group is handed to the sync thread; when a group is on disk the buffer's durable
//! LSN advances, and only then is it reported to the server as the slot's flush position.
//!
//! **Contract (kept in [`StreamState::sendable`]): confirmed only after fsync.** The flush
//! position sent to the source never passes what the buffer has fsynced — except that, while
//! no transaction is open and every appended record is durable, the server's own keepalive
//! position may be confirmed (no commit can lie before it unsent), once it is recorded in the
//! buffer's [`SlotProgress`]. So after any crash the slot resends every transaction the buffer
//! does not hold; a transaction the buffer already holds is recognised by its commit LSN and
//! dropped. Each committed transaction is stored exactly once, in commit order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::partition_watch::PartitionWatch;
use super::{CaptureConfig, CaptureError, CaptureReport, progress};
use crate::buffer::{BufferWriter, SlotProgress};
use crate::lsn::Lsn;
use crate::source::pgoutput;
use crate::source::replication::{ReplicationEvent, ReplicationStream, StandbyStatus};

/// Events handled per `select!` round before timers and shutdown are checked again.
const DRAIN_BATCH: usize = 4096;

/// A drain batch smaller than this is followed by a `read_coalesce` pause.
const COALESCE_BELOW: usize = 64;

/// Where streaming starts and what the buffer already covers.
pub(super) struct Resume {
    /// Commits ending at or before this are already in the buffer (or before the slot).
    pub(super) from: Lsn,
    /// The highest position already recorded as confirmed for this buffer.
    pub(super) covered: Lsn,
    /// See [`CaptureConfig::stream_timeout`] (resolved; zero = off).
    pub(super) stream_timeout: Duration,
}

/// Records (fsynced) that the slot is about to be confirmed up to `confirmed`.
pub(super) fn record_progress(
    config: &CaptureConfig,
    confirmed: Lsn,
    durable: Lsn,
) -> Result<(), CaptureError> {
    SlotProgress {
        slot: config.slot.clone(),
        confirmed_lsn: confirmed,
        durable_lsn: durable,
        updated_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    }
    .write_with(&config.buffer_dir, config.buffer.fs.as_ref())?;
    Ok(())
}

/// Records the confirmable position when it passed the recorded one (or `always`), so the
/// slot is never confirmed past what [`SlotProgress`] says the buffer covers.
fn record(
    config: &CaptureConfig,
    state: &mut StreamState,
    always: bool,
) -> Result<(), CaptureError> {
    let confirmable = state.confirmable();
    if always || confirmable > state.recorded || state.buffer_durable > state.recorded_durable {
        record_progress(config, confirmable, state.buffer_durable)?;
        state.recorded = state.recorded.max(confirmable);
        state.recorded_durable = state.buffer_durable;
        state.recorded_at = Since(Instant::now());
    }
    Ok(())
}

/// The streaming loop. See the module contract.
pub(super) async fn stream_into(
    config: &CaptureConfig,
    mut stream: ReplicationStream,
    mut writer: BufferWriter,
    resume: Resume,
    mut watch: Option<PartitionWatch>,
    shutdown: impl std::future::Future<Output = ()>,
    totals: &mut CaptureReport,
) -> Result<(), CaptureError> {
    let started = Instant::now();
    let reads_before = stream.read_stats();
    let syncs_before = writer.syncs();
    let resume_from = resume.from;
    let mut state = StreamState {
        resume_from,
        durable: resume_from,
        track_truncates: watch.is_some(),
        truncates: watch
            .as_ref()
            .map(|w| w.record.truncates.clone())
            .unwrap_or_default(),
        recorded: resume.covered,
        buffer_durable: writer.durable_lsn(),
        recorded_durable: writer.durable_lsn(),
        recorded_at: Since(started),
        last_received: Since(started),
        ..Default::default()
    };
    let mut partition_tick = tokio::time::interval(config.partition_check_interval);
    partition_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut progress = progress::Progress::new(config.progress, started);

    // Half the flush interval: a group handed over at one tick is usually seen durable at the next.
    let mut flush_tick =
        tokio::time::interval((config.flush_interval / 2).max(Duration::from_millis(1)));
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status_tick = tokio::time::interval(config.status_interval);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut progress_tick = tokio::time::interval(Duration::from_secs(1));
    let mut stall_tick = tokio::time::interval(
        (resume.stream_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)),
    );
    stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // While a cutover marker's transaction is on its way to disk: looked at every millisecond,
    // so the cutover waiting for it sees it confirmed as soon as it is durable.
    let mut marker_tick = tokio::time::interval(Duration::from_millis(1));
    marker_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut marker_pending: Option<Lsn> = None;
    let mut last_submit = Instant::now();
    let mut reported = Lsn::ZERO;
    tokio::pin!(shutdown);

    let outcome: Result<(), CaptureError> = async {
        loop {
            if config
                .until_lsn
                .is_some_and(|until| state.confirmable() >= until)
            {
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = &mut shutdown => return Ok(()),
                _ = flush_tick.tick() => {
                    if state.unsubmitted && last_submit.elapsed() >= config.flush_interval {
                        writer.submit()?;
                        state.unsubmitted = false;
                        last_submit = Instant::now();
                    }
                    state.set_durable(writer.poll()?);
                    // An idle position beyond the recorded one is recorded at most once a second.
                    if state.confirmable() > state.recorded
                        && state.recorded_at.0.elapsed() >= Duration::from_secs(1)
                    {
                        record(config, &mut state, false)?;
                    }
                    if state.sendable() > reported {
                        reported = state.sendable();
                        send_status(&mut stream, &state, false).await?;
                    }
                }
                _ = marker_tick.tick(), if marker_pending.is_some() => {
                    state.set_durable(writer.poll()?);
                    if marker_pending.is_some_and(|end| state.durable >= end) {
                        marker_pending = None;
                    }
                    if state.sendable() > reported {
                        reported = state.sendable();
                        send_status(&mut stream, &state, false).await?;
                    }
                }
                _ = status_tick.tick() => {
                    // Rewritten whenever the source was heard from: its time shows liveness.
                    let heard = state.last_received.0 > state.recorded_at.0;
                    record(config, &mut state, heard)?;
                    // Asking for a reply makes a live server answer: silence means a stall.
                    send_status(&mut stream, &state, true).await?;
                }
                _ = partition_tick.tick(), if watch.is_some() => {
                    let w = watch.as_mut().expect("guarded");
                    if w.check(&config.buffer_dir, &mut state).await? {
                        // Ask for the server's decoded position now rather than at its leisure.
                        send_status(&mut stream, &state, true).await?;
                    }
                }
                _ = progress_tick.tick() => progress.update(&state),
                _ = stall_tick.tick() => {
                    let silent = state.last_received.0.elapsed();
                    if !resume.stream_timeout.is_zero() && silent > resume.stream_timeout {
                        return Err(CaptureError::StreamStalled {
                            slot: config.slot.clone(),
                            silent,
                            timeout: resume.stream_timeout,
                            last_lsn: state.server_wal_end,
                            durable: state.sendable(),
                        });
                    }
                }
                event = stream.next() => {
                    let Some(event) = event? else {
                        return Err(CaptureError::StreamEnded { reason: stream.end_reason() });
                    };
                    state.last_received = Since(Instant::now());
                    // Handle what has already arrived before the next select round (bounded,
                    // so timers and shutdown are still served under a constant stream).
                    let mut handled = 0;
                    let mut next = Some(event);
                    while let Some(ev) = next {
                        if state.handle(ev, &mut writer)? {
                            send_status(&mut stream, &state, false).await?;
                        }
                        handled += 1;
                        next = if handled < DRAIN_BATCH { stream.next_buffered()? } else { None };
                    }
                    if let Some(end) = state.marker_commit.take() {
                        writer.submit()?;
                        state.unsubmitted = false;
                        last_submit = Instant::now();
                        marker_pending = Some(end);
                    }
                    // Before the slot may confirm a TRUNCATE, the record holds it: the slot
                    // will not send it again, and it explains the partitions it rewrote. Look
                    // at the partitions right away, while their pg_class rows still carry the
                    // TRUNCATE's transaction id (a later ALTER TABLE would replace it).
                    if let Some(w) = &mut watch {
                        w.save_truncates(&config.buffer_dir, &state)?;
                        if std::mem::take(&mut state.truncate_received)
                            && w.check(&config.buffer_dir, &mut state).await?
                        {
                            send_status(&mut stream, &state, true).await?;
                        }
                    }
                    // A trickle of small reads costs a wakeup and several syscalls per message,
                    // CPU the walsender (capture's real bottleneck) then lacks on a busy host.
                    // Letting the socket fill for a moment turns them into a few large reads.
                    // The thread sleeps outside the event loop: an awaited timer would park in
                    // epoll_wait, which every message the walsender sends meanwhile wakes.
                    if handled < COALESCE_BELOW && !config.read_coalesce.is_zero() {
                        std::thread::sleep(config.read_coalesce);
                    }
                }
            }
        }
    }
    .await;

    if let Some(w) = &mut watch
        && let Err(e) = w.save_truncates(&config.buffer_dir, &state)
    {
        tracing::error!("{e}");
    }
    // Whatever happened, make what was received durable; confirm it only on a clean stop.
    let flushed = writer.flush();
    if let Ok(durable) = &flushed {
        state.set_durable(*durable);
        state.unsubmitted = false;
    }
    progress.finish(&state);
    // Counted whatever the outcome: a stream lost and resumed adds up over its runs.
    let (socket_reads, socket_read_bytes) = stream.read_stats();
    totals.durable_lsn = totals.durable_lsn.max(state.sendable());
    totals.transactions += state.transactions;
    totals.changes += state.changes;
    totals.bytes += state.bytes;
    totals.elapsed += started.elapsed();
    totals.socket_reads += socket_reads - reads_before.0;
    totals.socket_read_bytes += socket_read_bytes - reads_before.1;
    totals.fsyncs += writer.syncs() - syncs_before;
    outcome?;
    flushed?;
    record(config, &mut state, false)?;
    send_status(&mut stream, &state, false).await?;
    let _ = stream.stop().await;
    Ok(())
}

async fn send_status(
    stream: &mut ReplicationStream,
    state: &StreamState,
    reply: bool,
) -> Result<(), CaptureError> {
    let flush = state.sendable();
    let write = flush.max(state.received_commit_end);
    stream
        .send_status(StandbyStatus {
            write,
            flush,
            apply: flush,
            reply_requested: reply,
        })
        .await
        .map_err(CaptureError::from)
}

/// An instant, defaulting to now.
#[derive(Clone, Copy)]
pub(super) struct Since(pub(super) Instant);

impl Default for Since {
    fn default() -> Self {
        Since(Instant::now())
    }
}

/// The stream as capture sees it: transaction boundaries, duplicates, what is durable.
///
/// Public only for the receive → append benchmark (`benches/capture_append.rs`), which feeds
/// frames through [`StreamState::handle`] as the stream loop does; capture itself builds it in
/// the stream loop. A default state appends everything (nothing to drop on resume).
#[derive(Default)]
pub struct StreamState {
    /// Confirmed position recorded in the buffer's [`SlotProgress`]; nothing beyond the
    /// durable commit is sent to the slot unless recorded first.
    recorded: Lsn,
    /// The buffer's own durable LSN (end of its last fsynced commit; `durable` may start
    /// higher, at a new slot's consistent point).
    buffer_durable: Lsn,
    /// `buffer_durable` as recorded.
    recorded_durable: Lsn,
    recorded_at: Since,
    /// When the last message (XLogData or keepalive) arrived.
    pub(super) last_received: Since,
    /// Commits ending at or before this are already in the buffer (or before the slot).
    resume_from: Lsn,
    /// The buffer's durable LSN (end of the last fsynced commit).
    durable: Lsn,
    in_transaction: bool,
    /// True while dropping a transaction the buffer already holds.
    skipping: bool,
    /// Records appended since the last submit to the sync thread.
    unsubmitted: bool,
    /// End LSN of the last commit appended.
    last_appended_commit: Lsn,
    /// Records appended after the last commit (standalone messages): their durability is not
    /// visible through the durable LSN, so they hold back keepalive confirmation.
    appended_since_commit: u64,
    /// End LSN of the last commit received (appended or skipped).
    pub(super) received_commit_end: Lsn,
    /// Server position from keepalives while nothing was pending.
    idle_position: Lsn,
    pub(super) server_wal_end: Lsn,
    pub(super) last_commit_time: Option<i64>,
    /// Record the TRUNCATEs received (a via-root publication is watched).
    track_truncates: bool,
    /// Transaction id of the open transaction (from its Begin).
    xid: u32,
    /// TRUNCATEs received: transaction id → relation OIDs truncated.
    pub(super) truncates: HashMap<u32, Vec<u32>>,
    /// A TRUNCATE arrived since the partitions were last compared.
    truncate_received: bool,
    /// The open transaction holds a cutover marker (a `walshift` logical message).
    marker_open: bool,
    /// End of a marker's transaction just appended: a cutover is waiting for it, so it is
    /// handed to the sync thread at once rather than at the next flush tick.
    pub(super) marker_commit: Option<Lsn>,
    pub(super) transactions: u64,
    pub(super) changes: u64,
    pub(super) bytes: u64,
}

impl StreamState {
    /// The position that may be confirmed to the slot. Never passes the durable commit unless
    /// nothing is pending and no transaction is open (then the keepalive position is safe).
    fn confirmable(&self) -> Lsn {
        if self.all_durable() {
            self.durable.max(self.idle_position)
        } else {
            self.durable
        }
    }

    /// Nothing open, nothing appended after the last commit, and that commit is on disk.
    fn all_durable(&self) -> bool {
        !self.in_transaction
            && self.appended_since_commit == 0
            && self.durable >= self.last_appended_commit
    }

    /// The position sent to the slot: [`Self::confirmable`], with an idle position only as far
    /// as it is recorded.
    pub(super) fn sendable(&self) -> Lsn {
        if self.all_durable() {
            self.durable.max(self.idle_position.min(self.recorded))
        } else {
            self.durable
        }
    }

    fn set_durable(&mut self, durable: Lsn) {
        self.buffer_durable = self.buffer_durable.max(durable);
        self.durable = self.durable.max(durable);
    }

    /// Applies one event: appends a message to the buffer or notes a keepalive. Returns
    /// true when the server asked for a status update now.
    ///
    /// This is all of capture's per-message work between the frame parser and
    /// [`BufferWriter::append`] (no I/O: appends are memory copies until a submit).
    pub fn handle(
        &mut self,
        event: ReplicationEvent,
        writer: &mut BufferWriter,
    ) -> Result<bool, CaptureError> {
        match event {
            ReplicationEvent::XLogData {
                wal_start,
                wal_end,
                data,
                ..
            } => {
                self.server_wal_end = self.server_wal_end.max(wal_end);
                if let Some((lsn, kind, payload)) = self.accept(wal_start, data) {
                    writer.append(lsn, kind, &payload)?;
                    self.unsubmitted = true;
                }
                Ok(false)
            }
            ReplicationEvent::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.server_wal_end = self.server_wal_end.max(wal_end);
                self.keepalive(wal_end);
                Ok(reply_requested)
            }
        }
    }

    fn keepalive(&mut self, wal_end: Lsn) {
        if self.all_durable() {
            self.idle_position = self.idle_position.max(wal_end);
        }
    }

    /// Classifies one pgoutput message; returns `(lsn, kind, payload)` to append, if any.
    fn accept(&mut self, wal_start: Lsn, data: Bytes) -> Option<(Lsn, u8, Bytes)> {
        self.bytes += data.len() as u64;
        let tag = *data.first()?;
        match tag {
            b'B' => {
                self.in_transaction = true;
                self.marker_open = false;
                let begin = pgoutput::peek_begin(&data);
                self.xid = begin.as_ref().map_or(0, |b| b.xid);
                // final_lsn: the commit record's start.
                let final_lsn = begin.map(|b| b.final_lsn);
                self.skipping = final_lsn.is_some_and(|f| f < self.resume_from);
                if self.skipping {
                    tracing::debug!(?final_lsn, resume_from = %self.resume_from, "dropping a transaction the buffer already holds");
                    return None;
                }
                Some((wal_start, tag, data))
            }
            b'C' => {
                self.in_transaction = false;
                let commit = pgoutput::peek_commit(&data);
                let end = commit.as_ref().map_or(wal_start, |c| c.end_lsn);
                self.received_commit_end = self.received_commit_end.max(end);
                if std::mem::take(&mut self.skipping) {
                    return None;
                }
                self.transactions += 1;
                if std::mem::take(&mut self.marker_open) {
                    self.marker_commit = Some(end);
                }
                self.last_appended_commit = end;
                self.appended_since_commit = 0;
                self.last_commit_time = commit.map(|c| c.commit_time.micros());
                Some((end, tag, data))
            }
            b'T' if self.track_truncates => {
                // Truncate: relation count (4), options (1), relation OIDs (4 each). Noted even
                // when the buffer already holds the transaction: the rewrite it explains is real.
                let n = data
                    .get(1..5)
                    .map_or(0, |b| i32::from_be_bytes(b.try_into().expect("4 bytes")));
                let rels = (0..n.max(0) as usize)
                    .filter_map(|i| data.get(6 + 4 * i..10 + 4 * i))
                    .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
                self.truncates.entry(self.xid).or_default().extend(rels);
                self.truncate_received = true;
                if self.skipping {
                    return None;
                }
                if !self.in_transaction {
                    self.appended_since_commit += 1;
                }
                Some((wal_start, tag, data))
            }
            _ if self.skipping => None,
            b'I' | b'U' | b'D' => {
                self.changes += 1;
                Some((wal_start, tag, data))
            }
            _ => {
                if !self.in_transaction {
                    self.appended_since_commit += 1;
                } else if tag == b'M' && is_cutover_marker(&data) {
                    self.marker_open = true;
                }
                Some((wal_start, tag, data))
            }
        }
    }
}

/// A logical message with cutover's prefix ([`crate::apply::replay::MARKER_PREFIX`]).
fn is_cutover_marker(data: &Bytes) -> bool {
    matches!(
        pgoutput::decode(data),
        Ok(pgoutput::LogicalMessage::Message(m)) if m.prefix == crate::apply::replay::MARKER_PREFIX
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin(final_lsn: u64) -> Bytes {
        let mut b = vec![b'B'];
        b.extend(final_lsn.to_be_bytes());
        b.extend(0i64.to_be_bytes());
        b.extend(7u32.to_be_bytes());
        b.into()
    }

    fn message(prefix: &str) -> Bytes {
        let mut b = vec![b'M', 1];
        b.extend(0u64.to_be_bytes());
        b.extend(prefix.as_bytes());
        b.push(0);
        b.extend(2u32.to_be_bytes());
        b.extend(b"id");
        b.into()
    }

    fn commit(lsn: u64, end: u64) -> Bytes {
        let mut b = vec![b'C', 0];
        b.extend(lsn.to_be_bytes());
        b.extend(end.to_be_bytes());
        b.extend(0i64.to_be_bytes());
        b.into()
    }

    /// A transaction holding cutover's marker is flagged at its commit (for an immediate
    /// fsync); one holding another message, or a later plain transaction, is not.
    #[test]
    fn a_marker_transaction_is_flagged_at_its_commit() {
        let mut state = StreamState::default();
        let run = |state: &mut StreamState, prefix: Option<&str>, end: u64| {
            state.accept(Lsn(end - 30), begin(end - 10));
            if let Some(p) = prefix {
                state.accept(Lsn(end - 20), message(p));
            }
            state.accept(Lsn(end - 10), commit(end - 10, end));
            state.marker_commit.take()
        };
        assert_eq!(run(&mut state, Some("walshift"), 100), Some(Lsn(100)));
        assert_eq!(run(&mut state, Some("walshift-verify"), 200), None);
        assert_eq!(run(&mut state, None, 300), None);
        assert_eq!(run(&mut state, Some("walshift"), 400), Some(Lsn(400)));
    }
}
