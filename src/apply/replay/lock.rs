//! The replay lock: a replay of one buffer into one target holds a session-level advisory lock
//! on the target, keyed by the buffer, for its whole life. `walshift replay`, `walshift run`,
//! cutover's in-process replay, online verify and the demo all take it, so two replays of one
//! buffer into one target never run at once, and cutover can tell that a replay is running
//! elsewhere without timing guesses.

use std::time::Duration;

use tokio_postgres::Client;

use std::sync::Arc;

use super::{ReplayError, TargetLock};
use crate::SqlContext;
use crate::conn::ConnInfo;

/// The advisory lock a replay of one buffer into one target holds for its lifetime (a
/// session of its own on the target; dropping the guard closes it and releases the lock).
pub struct ReplayGuard {
    _client: Client,
}

impl ReplayGuard {
    /// Takes the lock for `buffer_id` (see [`crate::apply::progress::buffer_id`]) on `target`;
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

/// How long a replay waits for the buffer's replay lock (a replay that was just killed holds it
/// until its server session notices).
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The replay lock as a reconnecting replay holds it ([`super::ReplayConfig::lock`]): taken
/// again after the target came back, since its session died with the target.
pub struct RetakenLock {
    target: ConnInfo,
    buffer_id: String,
    guard: tokio::sync::Mutex<Option<ReplayGuard>>,
}

impl RetakenLock {
    /// Wraps a lock already taken for `buffer_id` on `target`.
    pub fn shared(target: ConnInfo, buffer_id: String, guard: ReplayGuard) -> Arc<dyn TargetLock> {
        Arc::new(RetakenLock {
            target,
            buffer_id,
            guard: tokio::sync::Mutex::new(Some(guard)),
        })
    }
}

impl TargetLock for RetakenLock {
    fn retake(&self) -> futures_util::future::BoxFuture<'_, Result<(), ReplayError>> {
        Box::pin(async move {
            let mut guard = self.guard.lock().await;
            // Closes the old session if it is still there (a dropped connection, not a
            // restart), which releases the lock for the new one.
            guard.take();
            match ReplayGuard::acquire_within(&self.target, &self.buffer_id, LOCK_WAIT).await? {
                Some(g) => {
                    *guard = Some(g);
                    Ok(())
                }
                None => Err(ReplayError::LockTaken),
            }
        })
    }
}
