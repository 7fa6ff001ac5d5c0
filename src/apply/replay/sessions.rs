//! Replay's sessions on the target: the `application_name` every one of them carries, and
//! waiting out a previous replay's sessions before this one reads its position.
//!
//! **Nothing of a previous replay still running.** One replay of a buffer into a target runs
//! at a time (the advisory lock of [`crate::apply::replay::lock::ReplayGuard`], held by a session of
//! its own). A killed replay's lock session ends at once, but its writing sessions may still be
//! running a statement the server has not noticed the lost client for — a `CREATE`, a batch's
//! `COMMIT`, a `COMMIT PREPARED` — and could commit a batch after a rerun read the applied
//! position, which would then apply it twice (a keyless table gets the rows twice, silently).
//! So every session replay writes through carries [`replay_application_name`], and a replay,
//! once it holds the lock and before it settles prepared transactions or reads its position,
//! waits until no other session with that name is left on the target database
//! ([`wait_for_previous_replay`]): idle ones (they can no longer commit anything) are
//! terminated at once, running ones after a grace period, and if any is still there after
//! [`PREVIOUS_REPLAY_WAIT`] replay stops with [`ReplayError::PreviousReplayRunning`].

use tokio_postgres::Client;

use super::ReplayError;
use crate::SqlContext;

/// The `application_name` of every session replay of `buffer_id` writes through (it replaces
/// one the connection string sets): `walshift replay <slot, up to 28 characters> <16 hex
/// digits of the SHA-256 of the buffer id>`, at most 61 bytes (PostgreSQL keeps 63).
pub fn replay_application_name(buffer_id: &str) -> String {
    use sha2::Digest;
    let slot: String = buffer_id
        .split_once('/')
        .map_or(buffer_id, |(_, s)| s)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(28)
        .collect();
    let digest = sha2::Sha256::digest(buffer_id.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("walshift replay {slot} {hex}")
}

/// How long [`wait_for_previous_replay`] waits at most.
pub const PREVIOUS_REPLAY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a running statement of a previous replay is given to finish before its session
/// is terminated.
const PREVIOUS_REPLAY_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits until no session of a previous replay of `buffer_id` (other than `client`'s own) is
/// left on the target database; see the module docs. Call with the replay lock held and only
/// `client` of this replay connected, before
/// [`resolve_prepared`](crate::apply::progress::resolve_prepared) and
/// [`read_applied`](crate::apply::progress::read_applied). Returns how many sessions it
/// terminated.
pub async fn wait_for_previous_replay(
    client: &Client,
    buffer_id: &str,
) -> Result<usize, ReplayError> {
    let (grace, limit) = (PREVIOUS_REPLAY_GRACE, PREVIOUS_REPLAY_WAIT);
    let name = replay_application_name(buffer_id);
    let started = std::time::Instant::now();
    let mut terminated = std::collections::BTreeSet::new();
    loop {
        let rows = client
            .query(
                "SELECT pid, coalesce(state, ''), left(coalesce(query, ''), 80) \
                 FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = $1 \
                   AND pid <> pg_backend_pid()",
                &[&name],
            )
            .await
            .sql_context("looking for sessions of a previous replay on the target")?;
        if rows.is_empty() {
            return Ok(terminated.len());
        }
        let sessions: Vec<(i32, String, String)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        if started.elapsed() >= limit {
            return Err(ReplayError::PreviousReplayRunning {
                pids: sessions.iter().map(|s| s.0).collect(),
                application_name: name,
                secs: limit.as_secs(),
                running: sessions
                    .iter()
                    .map(|(pid, state, query)| format!("{pid} {state}: {query}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        let past_grace = started.elapsed() >= grace;
        for (pid, state, query) in &sessions {
            if (state != "active" || past_grace) && !terminated.contains(pid) {
                // Denied (another role's session without pg_signal_backend): keep waiting.
                let ended = client
                    .query_one("SELECT pg_terminate_backend($1)", &[pid])
                    .await
                    .ok()
                    .is_some_and(|r| r.get::<_, bool>(0));
                if ended {
                    tracing::warn!(
                        "terminated session {pid} of a previous replay of this buffer on the target \
                         ({state}: {query})"
                    );
                    terminated.insert(*pid);
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::progress::buffer_id;

    #[test]
    fn replay_application_name_fits_and_tells_buffers_apart() {
        let long = buffer_id(7_300_000_000_000_000_000, &"s".repeat(63));
        let name = replay_application_name(&long);
        assert!(name.len() <= 63 && name.is_ascii(), "{name}");
        assert!(name.starts_with("walshift replay ssss"), "{name}");
        let a = replay_application_name(&buffer_id(1, "walshift"));
        assert_eq!(a, replay_application_name(&buffer_id(1, "walshift")));
        assert_ne!(a, replay_application_name(&buffer_id(2, "walshift")));
        assert_ne!(
            replay_application_name(&buffer_id(1, &format!("{}a", "s".repeat(40)))),
            replay_application_name(&buffer_id(1, &format!("{}b", "s".repeat(40))))
        );
    }
}
