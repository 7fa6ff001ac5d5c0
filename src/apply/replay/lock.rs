//! The replay lock: a replay of one buffer into one target holds a session-level advisory lock
//! on the target, keyed by the buffer, for its whole life. `walshift replay`, `walshift run`,
//! cutover's in-process replay, online verify and the demo all take it, so two replays of one
//! buffer into one target never run at once, and cutover can tell that a replay is running
//! elsewhere without timing guesses.

use std::time::Duration;

use tokio_postgres::Client;

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
