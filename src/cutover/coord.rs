//! How cutover finds out where capture and replay are — without timing guesses.
//!
//! - **Is capture running elsewhere?** A capture holds the buffer's writer lock
//!   (`<buffer>/writer.lock`, `flock`); [`capture_running`] tries to take it and lets go.
//! - **Is replay running elsewhere?** A replay into a target from a buffer holds a
//!   session-level advisory lock on the target, keyed by the buffer ([`ReplayGuard`]);
//!   `walshift replay`, `walshift run` and cutover's own in-process replay all take it, so two
//!   replays of one buffer into one target never run at once.
//! - **Is the marker durable?** Capture confirms to the slot only what the buffer has fsynced:
//!   the slot's `confirmed_flush_lsn` passing the marker's position is the proof.
//! - **Is the marker applied?** The target's `walshift.applied` passing the end LSN of the
//!   marker's transaction, found in the buffer by [`MarkerScan`].

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, SystemTime};

use tokio_postgres::Client;

use crate::buffer::{BufferError, BufferReader, LOCK_FILE, TxnEvent, TxnIter};
use crate::conn::ConnInfo;
use crate::lsn::Lsn;
use crate::source::pgoutput::{self, LogicalMessage};

/// True if another process (or another open file in this one) holds the buffer's writer lock,
/// that is, a capture is appending to it.
pub fn capture_running(buffer_dir: &Path) -> std::io::Result<bool> {
    let path = buffer_dir.join(LOCK_FILE);
    let f = match std::fs::OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    // SAFETY: flock on a descriptor we own; closing the file releases our lock.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(false);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(true)
    } else {
        Err(err)
    }
}

/// The advisory lock a replay of one buffer into one target holds for its lifetime (a
/// session of its own on the target; dropping the guard closes it and releases the lock).
pub struct ReplayGuard {
    _client: Client,
}

impl ReplayGuard {
    /// Takes the lock for `buffer_id` (see [`crate::apply::target::buffer_id`]) on `target`;
    /// `None` if another replay holds it.
    pub async fn try_acquire(
        target: &ConnInfo,
        buffer_id: &str,
    ) -> Result<Option<ReplayGuard>, crate::Error> {
        let client = target.connect().await?;
        let got: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('walshift replay'), hashtext($1))",
                &[&buffer_id],
            )
            .await
            .map_err(|e| crate::Error::sql("taking the replay lock on the target", e))?
            .get(0);
        Ok(got.then_some(ReplayGuard { _client: client }))
    }

    /// As [`ReplayGuard::try_acquire`], retrying for up to `wait` (a replay that was just
    /// killed holds the lock until its server session notices).
    pub async fn acquire_within(
        target: &ConnInfo,
        buffer_id: &str,
        wait: Duration,
    ) -> Result<Option<ReplayGuard>, crate::Error> {
        let started = std::time::Instant::now();
        loop {
            if let Some(g) = Self::try_acquire(target, buffer_id).await? {
                return Ok(Some(g));
            }
            if started.elapsed() >= wait {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The slot's confirmed flush position (what capture has made durable), if the slot exists.
pub async fn slot_confirmed(
    source: &Client,
    slot: &str,
) -> Result<Option<Lsn>, tokio_postgres::Error> {
    let row = source
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<String>>(0))
        .and_then(|s| s.parse().ok()))
}

/// The target's applied LSN for a buffer (`None`: nothing applied yet or no progress table).
pub async fn applied(
    target: &Client,
    buffer_id: &str,
) -> Result<Option<Lsn>, tokio_postgres::Error> {
    let row = target
        .query_opt(
            "SELECT end_lsn::text FROM walshift.applied WHERE buffer_id = $1",
            &[&buffer_id],
        )
        .await?;
    Ok(row.and_then(|r| r.get::<_, String>(0).parse().ok()))
}

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
            .await?;
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
    #[error("measuring the lag on the source: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Buffer(#[from] BufferError),
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
