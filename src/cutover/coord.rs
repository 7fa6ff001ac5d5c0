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
//!   marker's transaction, found in the buffer by the drain's `MarkerScan`.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use tokio_postgres::Client;

use crate::SqlContext;
use crate::buffer::LOCK_FILE;
use crate::conn::ConnInfo;
use crate::lsn::Lsn;

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
            .sql_context("taking the replay lock on the target")?
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
