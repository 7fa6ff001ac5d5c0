//! The target database as replay sees it: table shapes from its catalog, matched against the
//! source's Relation messages, and the progress row that makes apply exactly-once.
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
//! **Nothing of a previous replay still running.** One replay of a buffer into a target runs
//! at a time (the advisory lock of [`crate::cutover::coord::ReplayGuard`], held by a session of
//! its own). A killed replay's lock session ends at once, but its writing sessions may still be
//! running a statement the server has not noticed the lost client for — a `CREATE`, a batch's
//! `COMMIT`, a `COMMIT PREPARED` — and could commit a batch after a rerun read the applied
//! position, which would then apply it twice (a keyless table gets the rows twice, silently).
//! So every session replay writes through carries [`replay_application_name`], and a replay,
//! once it holds the lock and before it settles prepared transactions or reads its position,
//! waits until no other session with that name is left on the target database
//! ([`wait_for_previous_replay`]): idle ones (they can no longer commit anything) are
//! terminated at once, running ones after a grace period, and if any is still there after
//! [`PREVIOUS_REPLAY_WAIT`] replay stops with [`TargetError::PreviousReplayRunning`].

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::sql::{TableSql, TargetColumn};
use crate::lsn::Lsn;
use crate::source::pgoutput::Relation;
use crate::sql::{quote_ident, quote_literal, quote_qualified};

/// Target-side failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error(
        "table {table} is in the source's changes but not on the target. If it was created on the \
         source after the clone (FOR ALL TABLES publishes new tables at once), create it on the copy \
         with the same definition (pg_dump --schema-only --table='{table}' <source> | psql <target>) \
         and run replay again: its rows arrive through the stream (if it was added to the \
         publication with rows already in it, copy those rows too). Or stop publishing it"
    )]
    MissingTable { table: String },

    #[error(
        "schema drift on {table}: source column {column:?} does not exist on the target (target columns: {target:?}). \
         Add the column on the target, or map it with a transform"
    )]
    MissingColumn {
        table: String,
        column: String,
        target: Vec<String>,
    },

    #[error(
        "table {table} on the target has no primary key or unique index on exactly the source's key \
         columns ({key:?}), and the source sends no full old rows for it; add a primary key (or a \
         unique, non-partial index) on those columns on the target"
    )]
    NoKey { table: String, key: Vec<String> },

    #[error(
        "{count} session(s) of a previous replay of this buffer are still on the target after \
         {secs} s (pids {pids:?}; running: {running}); one of them could still commit a batch \
         this replay would then apply again. End them as a superuser or the replay role \
         (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = \
         '{application_name}') and run replay again",
        count = pids.len()
    )]
    PreviousReplayRunning {
        pids: Vec<i32>,
        application_name: String,
        secs: u64,
        running: String,
    },

    #[error("{context}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

fn sql(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> TargetError {
    let context = context.into();
    move |source| TargetError::Sql { context, source }
}

/// Creates `walshift.applied` and `walshift.applied_parts` if needed; safe against
/// concurrent creators, a killed replay's session among them
/// ([`crate::sql::create_own_objects`]).
pub async fn ensure_progress_table(client: &Client) -> Result<(), TargetError> {
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
    .map_err(sql("creating walshift.applied on the target"))
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
pub async fn prepared(client: &Client, buffer_id: &str) -> Result<Vec<PreparedPart>, TargetError> {
    let rows = client
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() \
             AND gid LIKE 'walshift %'",
            &[],
        )
        .await
        .map_err(sql("listing prepared transactions on the target"))?;
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
pub async fn resolve_prepared(client: &Client, buffer_id: &str) -> Result<Resolved, TargetError> {
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
        let applied = applied_lsn(client, buffer_id).await?.unwrap_or(Lsn::ZERO);
        let parts = client
            .query(
                "SELECT end_lsn::text FROM walshift.applied_parts WHERE buffer_id = $1",
                &[&buffer_id],
            )
            .await
            .map_err(sql("reading walshift.applied_parts"))?;
        let part_ends: Vec<Lsn> = parts
            .iter()
            .filter_map(|r| r.get::<_, String>(0).parse().ok())
            .collect();
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
                    return Err(sql(format!(
                        "settling the prepared transaction {gid:?} a previous replay left on the target \
                         ({verb} PREPARED); run it by hand as a superuser or the replay role, then start replay again"
                    ))(e));
                }
            }
        }
        // Settled: look once more, for a PREPARE a killed replay's backend had not read yet.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Waits (up to 30 s) until no other session of this database is running one of walshift's
/// `PREPARE TRANSACTION` / `COMMIT PREPARED` / `ROLLBACK PREPARED` statements.
async fn wait_for_two_phase_statements(client: &Client) -> Result<(), TargetError> {
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
            .map_err(sql("looking for replay sessions still finishing a batch"))?
            .get(0);
        if running == 0 || std::time::Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

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
/// `client` of this replay connected, before [`resolve_prepared`] and [`applied_lsn`].
/// Returns how many sessions it terminated.
pub async fn wait_for_previous_replay(
    client: &Client,
    buffer_id: &str,
) -> Result<usize, TargetError> {
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
            .map_err(sql(
                "looking for sessions of a previous replay on the target",
            ))?;
        if rows.is_empty() {
            return Ok(terminated.len());
        }
        let sessions: Vec<(i32, String, String)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        if started.elapsed() >= limit {
            return Err(TargetError::PreviousReplayRunning {
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

/// The end LSN of the last transaction applied from `buffer_id`, if any.
pub async fn applied_lsn(client: &Client, buffer_id: &str) -> Result<Option<Lsn>, TargetError> {
    let row = client
        .query_opt(
            "SELECT end_lsn::text FROM walshift.applied WHERE buffer_id = $1",
            &[&buffer_id],
        )
        .await
        .map_err(sql("reading walshift.applied"))?;
    Ok(row.map(|r| r.get::<_, String>(0).parse().unwrap_or(Lsn::ZERO)))
}

/// The statement recording progress; run inside the batch's transaction. Parameters:
/// buffer id, end LSN as text.
pub const RECORD_PROGRESS: &str = "INSERT INTO walshift.applied (buffer_id, end_lsn, applied_at) \
     VALUES ($1, $2::text::pg_lsn, now()) \
     ON CONFLICT (buffer_id) DO UPDATE SET end_lsn = EXCLUDED.end_lsn, applied_at = EXCLUDED.applied_at";

/// How a source relation lands on the target (identity mapping: same schema, table and column
/// names).
#[derive(Clone, Debug)]
pub struct MappedTable {
    pub sql: TableSql,
    /// Display name.
    pub name: String,
    /// No key on either side: rows are matched by their whole old image (REPLICA IDENTITY FULL).
    pub full_row_identity: bool,
}

/// A unique index of a target table that can serve as its key.
struct KeyIndex {
    primary: bool,
    /// Key columns (not INCLUDE columns), in index order.
    columns: Vec<String>,
    not_null: bool,
}

/// Whether a column of type `a.atttypid` can be compared with `=`: its type (or, for an array,
/// its element type; domains by their base type) has a default btree operator class, or is an
/// enum or a range. Otherwise (`json`, `point`, `xml`, composites, …) it is compared by text.
const HAS_EQUALITY: &str = "EXISTS (SELECT 1 FROM pg_type t \
       JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
       JOIN pg_type et ON et.oid = CASE WHEN bt.typcategory = 'A' AND bt.typelem <> 0 THEN bt.typelem ELSE bt.oid END \
       JOIN pg_type x ON x.oid = CASE WHEN et.typtype = 'd' THEN et.typbasetype ELSE et.oid END \
       WHERE t.oid = a.atttypid AND (x.typtype IN ('e', 'r', 'm') OR EXISTS ( \
         SELECT 1 FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod \
         WHERE am.amname = 'btree' AND oc.opcdefault AND oc.opcintype = x.oid)))";

/// Looks a source relation up on the target and checks the columns match (schema drift is an
/// error before anything is written). Column order follows the source's tuples.
///
/// The target key: for a source sending a key (primary key or `REPLICA IDENTITY USING
/// INDEX`), a unique, valid, immediate, non-partial, non-expression index of the target whose
/// key columns (INCLUDE columns are not part of it) are exactly the source's key columns, the
/// primary key preferred. For `REPLICA IDENTITY FULL`, the target's primary key, else such a
/// unique index on NOT NULL columns, else none (rows are matched by their whole old image).
pub async fn map_relation(client: &Client, rel: &Relation) -> Result<MappedTable, TargetError> {
    let schema = if rel.namespace.is_empty() {
        "pg_catalog"
    } else {
        rel.namespace.as_str()
    };
    let name = quote_qualified(schema, &rel.name);
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &rel.name],
        )
        .await
        .map_err(sql(format!("looking up {name} on the target")))?;
    if exists.is_none() {
        return Err(TargetError::MissingTable { table: name });
    }
    let rows = client
        .query(
            &format!(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
                        a.attidentity = 'a', {HAS_EQUALITY} \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') \
                 ORDER BY a.attnum"
            ),
            &[&schema, &rel.name],
        )
        .await
        .map_err(sql(format!("reading the shape of {name} on the target")))?;
    let target: Vec<(String, String, bool, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let mut columns = Vec::with_capacity(rel.columns.len());
    for c in &rel.columns {
        let Some((_, ty, always, eq)) = target.iter().find(|t| t.0 == c.name) else {
            return Err(TargetError::MissingColumn {
                table: name,
                column: c.name.clone(),
                target: target.iter().map(|t| t.0.clone()).collect(),
            });
        };
        columns.push(TargetColumn {
            name: c.name.clone(),
            type_sql: ty.clone(),
            always_identity: *always,
            compare_as_text: !*eq,
        });
    }
    let indexes: Vec<KeyIndex> = client
        .query(
            "SELECT i.indisprimary, \
                    array(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n) \
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                          WHERE k.n <= i.indnkeyatts ORDER BY k.n), \
                    NOT EXISTS (SELECT 1 FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n) \
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                          WHERE k.n <= i.indnkeyatts AND NOT a.attnotnull) \
             FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique AND i.indisvalid \
               AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL \
             ORDER BY i.indisprimary DESC, i.indisreplident DESC, i.indexrelid",
            &[&schema, &rel.name],
        )
        .await
        .map_err(sql(format!("reading the unique indexes of {name} on the target")))?
        .iter()
        .map(|r| KeyIndex {
            primary: r.get(0),
            columns: r.get(1),
            not_null: r.get(2),
        })
        .collect();
    let source_key: Vec<&str> = rel
        .columns
        .iter()
        .filter(|c| c.is_key())
        .map(|c| c.name.as_str())
        .collect();
    let full_identity = rel.replica_identity == crate::source::pgoutput::ReplicaIdentity::Full;
    let position = |col: &String| rel.columns.iter().position(|c| c.name == *col);
    let chosen = indexes.iter().find(|ix| {
        let sent = ix.columns.iter().all(|c| position(c).is_some());
        if full_identity {
            sent && (ix.primary || ix.not_null)
        } else {
            sent && ix.columns.len() == source_key.len()
                && ix.columns.iter().all(|c| source_key.contains(&c.as_str()))
        }
    });
    let Some(index) = chosen else {
        if full_identity {
            return Ok(MappedTable {
                sql: TableSql {
                    qualified: name.clone(),
                    columns,
                    key: Vec::new(),
                },
                name,
                full_row_identity: true,
            });
        }
        return Err(TargetError::NoKey {
            table: name,
            key: source_key.iter().map(|s| s.to_string()).collect(),
        });
    };
    let mut key: Vec<usize> = index.columns.iter().filter_map(position).collect();
    key.sort_unstable();
    Ok(MappedTable {
        sql: TableSql {
            qualified: name.clone(),
            columns,
            key,
        },
        name,
        full_row_identity: false,
    })
}

/// `TRUNCATE` of target tables (already quoted).
pub fn truncate_sql(tables: &[String], cascade: bool, restart_identity: bool) -> String {
    format!(
        "TRUNCATE {}{}{}",
        tables.join(", "),
        if restart_identity {
            " RESTART IDENTITY"
        } else {
            ""
        },
        if cascade { " CASCADE" } else { "" }
    )
}

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
