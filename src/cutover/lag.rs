//! Lag: how far the target is behind the source — WAL not yet durable in the buffer, buffered
//! transactions not yet applied, and how old the oldest of them is. Preflight waits on it
//! before the fence; `walshift run` shows it in its status.

use std::path::Path;
use std::time::{Duration, SystemTime};

use tokio_postgres::Client;

use crate::buffer::{BufferError, BufferReader, TxnEvent, TxnIter};
use crate::lsn::Lsn;
use crate::{SqlContext, SqlError};

/// How far behind the source the target is.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Lag {
    /// A capture is streaming from the slot (it is active).
    pub streaming: bool,
    /// Source WAL end minus what capture has made durable.
    pub capture_bytes: u64,
    /// From the target's applied LSN (before anything is applied: from the start of the first
    /// buffered transaction) to the end of the first buffered transaction it does not have yet
    /// (0: replay has everything the buffer holds).
    pub replay_bytes: u64,
    /// How long ago the oldest change not yet durable or applied was committed: the largest
    /// of the walsender's `flush_lag`, how long the source's WAL has been past the slot's
    /// confirmed position (watched across calls), how long ago capture last replied to the
    /// walsender (while WAL is unconfirmed), and the age of the first unapplied transaction in
    /// the buffer; zero when nothing is behind.
    pub secs: f64,
    /// Seconds since capture last replied to the walsender (`pg_stat_replication.reply_time`);
    /// `None` when no walsender serves the slot.
    pub reply_age_secs: Option<f64>,
    /// Whether `secs` can be trusted to cover what is not durable: false while WAL is
    /// unconfirmed and the meter has not yet seen the slot confirm anything it watched (the
    /// unconfirmed WAL may be older than the meter's first look).
    pub settled: bool,
}

/// Measures the lag, following the buffer forward between calls (positioning once, then
/// reading only what is appended), so it can be called every fraction of a second.
pub struct LagMeter {
    buffer_dir: std::path::PathBuf,
    iter: Option<TxnIter>,
    /// Start of the transaction being read, and the first commit past the applied LSN seen.
    begin: Lsn,
    next_unapplied: Option<(Lsn, crate::buffer::CommitInfo)>,
    /// The source's WAL position at each call whose WAL the slot has not confirmed yet,
    /// oldest first, with when it was seen; `first` is the meter's first look.
    unconfirmed: std::collections::VecDeque<(std::time::Instant, Lsn)>,
    first: Option<std::time::Instant>,
}

impl LagMeter {
    pub fn new(buffer_dir: &Path) -> Self {
        LagMeter {
            buffer_dir: buffer_dir.to_path_buf(),
            iter: None,
            begin: Lsn::ZERO,
            next_unapplied: None,
            unconfirmed: std::collections::VecDeque::new(),
            first: None,
        }
    }

    /// The first buffered transaction ending after `applied`: (its begin, its commit).
    fn first_unapplied(
        &mut self,
        applied: Lsn,
    ) -> Result<Option<(Lsn, crate::buffer::CommitInfo)>, BufferError> {
        if let Some((_, c)) = &self.next_unapplied {
            if c.end_lsn > applied {
                return Ok(self.next_unapplied);
            }
            self.next_unapplied = None;
        }
        let iter = match &mut self.iter {
            Some(it) => {
                it.refresh()?;
                it
            }
            None => self
                .iter
                .insert(BufferReader::open(&self.buffer_dir)?.transactions_from(applied)?),
        };
        for ev in iter.by_ref() {
            match ev? {
                TxnEvent::Begin(r) => self.begin = r.lsn,
                TxnEvent::Commit { commit, .. } if commit.end_lsn > applied => {
                    self.next_unapplied = Some((self.begin, commit));
                    break;
                }
                _ => {}
            }
        }
        Ok(self.next_unapplied)
    }

    /// Measures the lag. `applied` is the target's applied LSN (it only moves forward).
    pub async fn measure(
        &mut self,
        source: &Client,
        slot: &str,
        applied: Lsn,
    ) -> Result<Lag, LagError> {
        let row = source
            .query_one(
                "SELECT pg_current_wal_lsn()::text, \
                        (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1), \
                        (SELECT extract(epoch FROM r.flush_lag)::float8 FROM pg_stat_replication r \
                           JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1), \
                        (SELECT active_pid IS NOT NULL AND active FROM pg_replication_slots WHERE slot_name = $1), \
                        (SELECT extract(epoch FROM now() - r.reply_time)::float8 FROM pg_stat_replication r \
                           JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1)",
                &[&slot],
            )
            .await
            .sql_context("measuring the lag on the source")?;
        let wal: Lsn = row.get::<_, String>(0).parse().unwrap_or_default();
        let confirmed: Lsn = row
            .get::<_, Option<String>>(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_default();
        let flush_lag: Option<f64> = row.get(2);
        let now = std::time::Instant::now();
        let mut out = Lag {
            streaming: row.get::<_, Option<bool>>(3).unwrap_or(false),
            capture_bytes: wal.bytes_since(confirmed),
            reply_age_secs: row.get(4),
            settled: true,
            ..Default::default()
        };
        // A stalled stream (capture stopped, the walsender stuck) keeps the slot active and
        // flush_lag at its last value; what is not durable keeps ageing, and that is measured.
        let first = *self.first.get_or_insert(now);
        while self
            .unconfirmed
            .front()
            .is_some_and(|(_, l)| *l <= confirmed)
        {
            self.unconfirmed.pop_front();
        }
        if out.capture_bytes > 0 {
            if self.unconfirmed.back().is_none_or(|(_, l)| *l < wal) {
                self.unconfirmed.push_back((now, wal));
            }
            let (since, _) = self.unconfirmed.front().copied().expect("just pushed");
            out.settled = since > first;
            out.secs = flush_lag
                .unwrap_or(0.0)
                .max(now.duration_since(since).as_secs_f64())
                .max(out.reply_age_secs.unwrap_or(0.0));
        }
        if let Some((begin, commit)) = self.first_unapplied(applied)? {
            // Nothing applied yet: count from the first transaction's start.
            let base = if applied.is_zero() { begin } else { applied };
            out.replay_bytes = commit.end_lsn.bytes_since(base);
            if let Some(t) = commit.commit_time() {
                let age = SystemTime::now()
                    .duration_since(t)
                    .unwrap_or(Duration::ZERO);
                out.secs = out.secs.max(age.as_secs_f64());
            }
        }
        Ok(out)
    }
}

/// Lag measurement failures.
#[derive(Debug, thiserror::Error)]
pub enum LagError {
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error(transparent)]
    Buffer(#[from] BufferError),
}
