//! The progress record that makes apply exactly-once: `walshift.applied` (and
//! `walshift.applied_parts`) on the target — creating it, the statements that write it, the
//! buffer id and two-phase gids that key it, settling the prepared transactions an interrupted
//! replay left, and reading it back. The only module that reads `walshift.applied`.
//!
//! **Exactly-once contract:** `walshift.applied` holds, per buffer (source system + slot), the
//! end LSN of the last source transaction applied. It is updated in the same target
//! transaction as the data it covers, so after any crash the target's data and its recorded
//! position agree, and replay resumes right after that transaction.
//!
//! **Parallel apply** (several target connections) keeps that contract with two-phase commit:
//! each connection's part of a batch is a prepared transaction (`PREPARE TRANSACTION`, gid
//! [`prepared_gid`]); the helper parts record their end LSN in `walshift.applied_parts`, the
//! main part updates `walshift.applied`. Only once every part is prepared are they committed,
//! helpers first and the main part last, so `walshift.applied` never runs ahead of any row.
//! A crash in between leaves prepared transactions behind; [`resolve_prepared`] settles them at
//! the next start. The batch was decided ("commit") if every part of it is prepared (the gid
//! carries the part count) or any part already committed (its progress record says so): then
//! the rest are committed. Otherwise the crash came before the last PREPARE, no COMMIT PREPARED
//! was ever sent, and the prepared parts are rolled back; replay redoes the batch.
//!
//! **Reading it back** goes through [`read_applied`] (or [`find_applied`], where the table may
//! not exist yet), for replay and for everyone watching it. A recorded position is read as the
//! `pg_lsn` it is stored as; one that does not read as an LSN is an error naming the row, never
//! a guess (read as zero, replay would apply the whole buffer again; read as absent, a cutover
//! would wait for a position it already has).

use tokio_postgres::error::SqlState;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, Row};

use crate::lsn::Lsn;
use crate::sql::{quote_ident, quote_literal};
use crate::{SqlContext, SqlError};

/// Creates `walshift.applied` and `walshift.applied_parts` if needed; safe against
/// concurrent creators, a killed replay's session among them
/// ([`crate::sql::create_own_objects`]).
pub async fn ensure_progress_table(client: &Client) -> Result<(), SqlError> {
    crate::sql::create_own_objects(
        client,
        "CREATE SCHEMA IF NOT EXISTS walshift;
             CREATE TABLE IF NOT EXISTS walshift.applied (
               buffer_id  text PRIMARY KEY,
               end_lsn    pg_lsn NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now()
             );
             CREATE TABLE IF NOT EXISTS walshift.applied_parts (
               buffer_id text NOT NULL,
               part      int NOT NULL,
               end_lsn   pg_lsn NOT NULL,
               PRIMARY KEY (buffer_id, part)
             );",
    )
    .await
    .sql_context("creating walshift.applied on the target")
}

/// The statement a helper connection records its part of a batch with, inside that part's
/// transaction. Parameters: buffer id, part number (int4), end LSN as text.
pub const RECORD_PART: &str = "INSERT INTO walshift.applied_parts (buffer_id, part, end_lsn) \
     VALUES ($1, $2, $3::text::pg_lsn) \
     ON CONFLICT (buffer_id, part) DO UPDATE SET end_lsn = EXCLUDED.end_lsn";

/// The global transaction id of part `part` of the batch ending at `end` (at most 200 bytes,
/// as PostgreSQL requires; the buffer id is a system identifier and a slot name).
pub fn prepared_gid(buffer_id: &str, end: Lsn, part: usize, parts: usize) -> String {
    format!("walshift {part}/{parts} {end} {buffer_id}")
}

/// A prepared part of a batch, as [`prepared_gid`] names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedPart {
    pub part: usize,
    /// How many parts the batch was prepared in.
    pub parts: usize,
    pub end: Lsn,
    pub gid: String,
}

/// Parses [`prepared_gid`]: (part, parts, end LSN, buffer id).
fn parse_gid(gid: &str) -> Option<(usize, usize, Lsn, &str)> {
    let rest = gid.strip_prefix("walshift ")?;
    let (part, rest) = rest.split_once(' ')?;
    let (part, parts) = part.split_once('/')?;
    let (end, buffer_id) = rest.split_once(' ')?;
    Some((
        part.parse().ok()?,
        parts.parse().ok()?,
        end.parse().ok()?,
        buffer_id,
    ))
}

/// What [`resolve_prepared`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Prepared parts committed (their batch had been decided).
    pub committed: usize,
    /// Prepared parts rolled back (their batch is replayed again).
    pub rolled_back: usize,
}

/// The prepared transactions of replays of `buffer_id` on the target. Normally none, or one
/// batch between its two commit phases while replay runs.
pub async fn prepared(client: &Client, buffer_id: &str) -> Result<Vec<PreparedPart>, SqlError> {
    let rows = client
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() \
             AND gid LIKE 'walshift %'",
            &[],
        )
        .await
        .sql_context("listing prepared transactions on the target")?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let gid: String = r.get(0);
            let (part, parts, end, id) = parse_gid(&gid)?;
            (id == buffer_id).then(|| PreparedPart {
                part,
                parts,
                end,
                gid: gid.clone(),
            })
        })
        .collect())
}

/// Settles the prepared transactions a replay of `buffer_id` left on the target (a crash
/// between `PREPARE TRANSACTION` and the last `COMMIT PREPARED`). Must run before the applied
/// position is read and before anything is written. See the module docs for the rule.
///
/// A killed replay's backends may still be finishing a `PREPARE TRANSACTION` or `COMMIT
/// PREPARED` (the server notices the lost client only afterwards): the state is read only once
/// no such statement is running, and read again if a transaction turns out busy or gone.
pub async fn resolve_prepared(client: &Client, buffer_id: &str) -> Result<Resolved, SqlError> {
    let mut done = Resolved::default();
    let mut attempts = 0;
    'settle: loop {
        attempts += 1;
        wait_for_two_phase_statements(client).await?;
        let mut ours = prepared(client, buffer_id).await?;
        if ours.is_empty() {
            return Ok(done);
        }
        ours.sort_by_key(|p| (p.end, std::cmp::Reverse(p.part)));
        let applied = read_applied(client, buffer_id).await?.unwrap_or(Lsn::ZERO);
        let parts = client
            .query(
                "SELECT part, end_lsn FROM walshift.applied_parts WHERE buffer_id = $1",
                &[&buffer_id],
            )
            .await
            .sql_context("reading walshift.applied_parts")?;
        let part_ends: Vec<Lsn> = parts
            .iter()
            .map(|r| {
                position(r, 1, || {
                    format!(
                        "reading walshift.applied_parts: the row of buffer {buffer_id} part {} \
                         holds no LSN",
                        r.get::<_, i32>(0)
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let all_prepared =
            |end: Lsn, parts: usize| ours.iter().filter(|p| p.end == end).count() == parts;
        let decisions: Vec<(bool, String)> = ours
            .iter()
            .map(|p| {
                let decided = applied >= p.end
                    || part_ends.iter().any(|&e| e >= p.end)
                    || all_prepared(p.end, p.parts);
                (decided, p.gid.clone())
            })
            .collect();
        for (decided, gid) in decisions {
            let verb = if decided { "COMMIT" } else { "ROLLBACK" };
            match client
                .batch_execute(&format!("{verb} PREPARED {}", quote_literal(&gid)))
                .await
            {
                Ok(()) if decided => done.committed += 1,
                Ok(()) => done.rolled_back += 1,
                Err(e)
                    if attempts < 100
                        && matches!(
                            e.code(),
                            Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
                                | Some(&SqlState::UNDEFINED_OBJECT)
                        ) =>
                {
                    // Busy (another backend is finishing it) or gone (finished): look again.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue 'settle;
                }
                Err(e) => {
                    return Err(SqlError::new(
                        format!(
                            "settling the prepared transaction {gid:?} a previous replay left on the target \
                             ({verb} PREPARED); run it by hand as a superuser or the replay role, then start replay again"
                        ),
                        e,
                    ));
                }
            }
        }
        // Settled: look once more, for a PREPARE a killed replay's backend had not read yet.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Waits (up to 30 s) until no other session of this database is running one of walshift's
/// `PREPARE TRANSACTION` / `COMMIT PREPARED` / `ROLLBACK PREPARED` statements.
async fn wait_for_two_phase_statements(client: &Client) -> Result<(), SqlError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let running: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'active' \
                   AND (query LIKE 'PREPARE TRANSACTION ''walshift %' \
                        OR query LIKE 'COMMIT PREPARED ''walshift %' \
                        OR query LIKE 'ROLLBACK PREPARED ''walshift %')",
                &[],
            )
            .await
            .sql_context("looking for replay sessions still finishing a batch")?
            .get(0);
        if running == 0 || std::time::Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The end LSN of the last transaction applied from `buffer_id`, if any. `walshift.applied`
/// must exist ([`ensure_progress_table`]); [`find_applied`] where it may not.
pub async fn read_applied(client: &Client, buffer_id: &str) -> Result<Option<Lsn>, SqlError> {
    let row = client
        .query_opt(
            "SELECT end_lsn FROM walshift.applied WHERE buffer_id = $1",
            &[&buffer_id],
        )
        .await
        .sql_context("reading walshift.applied")?;
    row.map(|r| {
        position(&r, 0, || {
            format!("reading walshift.applied: the row of buffer {buffer_id} holds no LSN")
        })
    })
    .transpose()
}

/// As [`read_applied`], on a target that may have no `walshift.applied` (nothing was ever
/// replayed into it): `None` then.
pub async fn find_applied(client: &Client, buffer_id: &str) -> Result<Option<Lsn>, SqlError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('walshift.applied') IS NOT NULL", &[])
        .await
        .sql_context("looking for walshift.applied on the target")?
        .get(0);
    if !exists {
        return Ok(None);
    }
    read_applied(client, buffer_id).await
}

/// Column `col` of a progress row as the LSN it records; an error naming the row (`what`)
/// otherwise.
fn position<C: Into<String>>(
    row: &Row,
    col: usize,
    what: impl FnOnce() -> C,
) -> Result<Lsn, SqlError> {
    row.try_get::<_, PgLsn>(col)
        .map(|l| Lsn(u64::from(l)))
        .with_sql_context(what)
}

/// The statement recording progress; run inside the batch's transaction. Parameters:
/// buffer id, end LSN as text.
pub const RECORD_PROGRESS: &str = "INSERT INTO walshift.applied (buffer_id, end_lsn, applied_at) \
     VALUES ($1, $2::text::pg_lsn, now()) \
     ON CONFLICT (buffer_id) DO UPDATE SET end_lsn = EXCLUDED.end_lsn, applied_at = EXCLUDED.applied_at";

/// Identifier of a buffer in `walshift.applied`: source system and slot.
pub fn buffer_id(system_identifier: u64, slot: &str) -> String {
    format!("{system_identifier}/{}", quote_ident(slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_gid_round_trips_and_fits() {
        let id = buffer_id(7_300_000_000_000_000_000, "walshift \"slot\" x");
        let end: Lsn = "1A/2B3C4D5E".parse().unwrap();
        let gid = prepared_gid(&id, end, 3, 4);
        assert!(gid.len() < 200);
        assert_eq!(parse_gid(&gid), Some((3, 4, end, id.as_str())));
        assert_eq!(parse_gid("walshift x/2 0/1 y"), None);
        assert_eq!(parse_gid("walshift 1 0/1 y"), None);
        assert_eq!(parse_gid("other 1/2 0/1 y"), None);
    }
}
