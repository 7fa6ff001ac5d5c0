//! The writer: batches written in the background over one or several target connections,
//! the rows split by a hash of their key ([`partition`]), committed with two-phase commit when
//! more than one connection took part (the progress row's contract: [`crate::apply::progress`]).
//!
//! Invariant: one job at a time, in submission order (see [`Job`]); no two connections write
//! the same key; the main connection's part, which carries `walshift.applied`, commits last.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use super::ReplayConfig;
use super::dest::Dest;
use super::error::ReplayError;
use super::statements::{Conn, WriteError};
use crate::apply::fold::TableBatch;
use crate::apply::progress;
use crate::apply::row::{Arena, Val};
use crate::conn::ConnInfo;
use crate::lsn::Lsn;
use crate::sql::quote_literal;
use crate::{SqlContext, SqlError};

/// Every target session replay writes through. Generic plans: a custom plan sees the batch's
/// thousands of keys and picks a sequential scan plus hash join over the whole table; the
/// generic plan looks each key up through the primary key index, which is what a batch of
/// changes wants. Values are parsed (and, for columns compared by text, printed) with the
/// output settings capture reads them with.
pub(super) const SESSION_SETUP: &str = "SET session_replication_role = replica; SET synchronous_commit = on; \
     SET plan_cache_mode = force_generic_plan; SET DateStyle = ISO; SET IntervalStyle = postgres; \
     SET extra_float_digits = 3";

/// How long a part of a parallel batch waits for a row lock. Parts write disjoint keys, so a
/// wait means two parts met on something else (a secondary unique index, a key move, a
/// non-injective mapped key) and may be waiting for each other through walshift, a cycle
/// PostgreSQL cannot see: the wait turns into an error and the batch is retried in strict
/// order on one connection.
const PART_LOCK_TIMEOUT: &str = "SET lock_timeout = '1s'";

/// The main connection plus the helpers [`ReplayConfig::apply_connections`] asks for, if the
/// target allows prepared transactions for them.
pub(super) async fn connect_parts(
    config: &ReplayConfig,
    writers: &ConnInfo,
    main: Arc<Client>,
) -> Result<Vec<Conn>, ReplayError> {
    let wanted = config.apply_connections;
    let mut conns = vec![Conn {
        client: main,
        statements: HashMap::new(),
    }];
    if wanted == 1 {
        return Ok(conns);
    }
    let allowed: i64 = conns[0]
        .client
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'max_prepared_transactions'",
            &[],
        )
        .await
        .sql_context("reading max_prepared_transactions on the target")?
        .get(0);
    if allowed < wanted as i64 {
        tracing::warn!(
            "the target allows {allowed} prepared transactions: replaying over one connection. \
             Set max_prepared_transactions = {wanted} (or more) on the target and restart it to \
             write each batch over {wanted} connections"
        );
        return Ok(conns);
    }
    conns[0]
        .client
        .batch_execute(PART_LOCK_TIMEOUT)
        .await
        .sql_context("preparing the target session")?;
    for _ in 1..wanted {
        let client = writers.connect().await?;
        client
            .batch_execute(&format!("{SESSION_SETUP}; {PART_LOCK_TIMEOUT}"))
            .await
            .sql_context("preparing a target session")?;
        conns.push(Conn {
            client: Arc::new(client),
            statements: HashMap::new(),
        });
    }
    Ok(conns)
}

/// The target connections a batch is written over: `conns[0]` is the main one (BEGIN at the
/// batch's start, the progress row, strict order, TRUNCATE); the others take their share of
/// the rows. Owned by the applier when idle, or by the background task running one [`Job`].
pub(super) struct Writer {
    pub(super) conns: Vec<Conn>,
    /// Which helper connections (index ≥ 1) have BEGIN in the open target transaction; the
    /// main one's is tracked by the batch, and `open[0]` is unused.
    pub(super) open: Vec<bool>,
}

/// One slice (or the end) of the open target transaction, written in the background.
///
/// Ordering contract: one job at a time, in submission order; the applier sends nothing else
/// to the target while a job runs. Within a job each connection writes its own share of the
/// keys in the order a synchronous applier would (deletes, updates, upserts per table), and
/// no two connections write the same key; a failure on any connection is noticed before the
/// next job (nothing after a failed job is sent, and the whole target transaction is rolled
/// back on every connection).
pub(super) struct Job {
    /// Send BEGIN first (the batch's first slice).
    pub(super) begin: bool,
    /// The bytes the folded tables' values point into.
    pub(super) arena: Arc<Arena>,
    /// The folded tables, one list per connection ([`partition`]).
    pub(super) parts: Vec<Vec<(Dest, TableBatch)>>,
    /// Record progress and COMMIT after the tables.
    pub(super) commit: Option<Committed>,
    /// A failure is retried in strict source order up to here.
    pub(super) until: Lsn,
}

/// What a committed batch covered; accounted for once the target confirmed the COMMIT.
#[derive(Clone, Copy, Debug)]
pub(super) struct Committed {
    pub(super) end: Lsn,
    /// Row changes it held.
    pub(super) changes: u64,
    pub(super) transactions: u64,
    pub(super) commit_us: Option<i64>,
}

type JobOutcome = Result<Option<Committed>, (WriteError, Lsn)>;

pub(super) enum Slot {
    Idle(Writer),
    Busy(tokio::task::JoinHandle<(Writer, JobOutcome, Duration, Option<Arena>)>),
    /// Only while switching between the two.
    Gone,
}

impl Writer {
    pub(super) fn main(&mut self) -> &mut Conn {
        &mut self.conns[0]
    }

    /// A connection other than the main one has part of the open target transaction.
    pub(super) fn helpers_open(&self) -> bool {
        self.open.iter().skip(1).any(|&o| o)
    }

    /// Ends the open target transaction on every connection without committing (a failed
    /// statement already aborted it; the server then only warns).
    pub(super) async fn rollback(&mut self) {
        for (k, (conn, open)) in self.conns.iter().zip(self.open.iter_mut()).enumerate() {
            if k == 0 || *open {
                let _ = conn.client.batch_execute("ROLLBACK").await;
            }
            *open = false;
        }
    }

    /// Writes one job: every connection's share at once, then (with `commit`) the progress
    /// row and COMMIT — two-phase over every connection that took part, the main one last.
    pub(super) async fn run(&mut self, job: &Job, buffer_id: &str) -> Result<(), WriteError> {
        if job.begin {
            self.conns[0].client.batch_execute("BEGIN").await?;
        }
        let until = job.until;
        let arena = &*job.arena;
        let mut writes = Vec::new();
        for (k, (conn, tables)) in self.conns.iter_mut().zip(&job.parts).enumerate() {
            if tables.is_empty() {
                continue;
            }
            let begin = k > 0 && !self.open[k];
            if k > 0 {
                self.open[k] = true;
            }
            writes.push(async move {
                if begin {
                    conn.client.batch_execute("BEGIN").await?;
                }
                for (dest, tb) in tables {
                    match dest {
                        Dest::Same(t) => conn.write_table(t, tb, arena).await?,
                        Dest::Mapped(p) => conn.write_mapped(p, tb, arena, until).await?,
                    }
                }
                Ok::<(), WriteError>(())
            });
        }
        first_error(futures_util::future::join_all(writes).await)?;
        let Some(c) = &job.commit else {
            return Ok(());
        };
        let end = c.end.to_string();
        if !self.helpers_open() {
            let main = &self.conns[0].client;
            main.execute(progress::RECORD_PROGRESS, &[&buffer_id, &end])
                .await?;
            main.batch_execute("COMMIT").await?;
            return Ok(());
        }
        // Phase one: every part prepared, each with its progress record. The main connection
        // always has the transaction open here (its BEGIN came with the batch's first job or
        // from `begin_now`).
        let parts: Vec<usize> = (0..self.conns.len())
            .filter(|&k| k == 0 || self.open[k])
            .collect();
        let gids: Vec<String> = parts
            .iter()
            .map(|&k| progress::prepared_gid(buffer_id, c.end, k, parts.len()))
            .collect();
        let prepares = parts.iter().zip(&gids).map(|(&k, gid)| {
            let client = &self.conns[k].client;
            let end = &end;
            async move {
                if k == 0 {
                    client
                        .execute(progress::RECORD_PROGRESS, &[&buffer_id, end])
                        .await?;
                } else {
                    let part = k as i32;
                    client
                        .execute(progress::RECORD_PART, &[&buffer_id, &part, end])
                        .await?;
                }
                client
                    .batch_execute(&format!("PREPARE TRANSACTION {}", quote_literal(gid)))
                    .await
            }
        });
        let prepared = futures_util::future::join_all(prepares).await;
        if prepared.iter().any(Result::is_err) {
            for ((&k, gid), outcome) in parts.iter().zip(&gids).zip(&prepared) {
                let client = &self.conns[k].client;
                let _ = match outcome {
                    Ok(()) => {
                        client
                            .batch_execute(&format!("ROLLBACK PREPARED {}", quote_literal(gid)))
                            .await
                    }
                    Err(_) => client.batch_execute("ROLLBACK").await,
                };
                self.open[k] = false;
            }
            let e = prepared
                .into_iter()
                .find_map(Result::err)
                .expect("one failed");
            return Err(WriteError::Db(e));
        }
        self.open.iter_mut().for_each(|o| *o = false);
        // Phase two: decided. Helpers first, the main part (walshift.applied) last.
        let commits = parts
            .iter()
            .zip(&gids)
            .filter(|(k, _)| **k != 0)
            .map(|(&k, gid)| {
                let client = &self.conns[k].client;
                async move {
                    client
                        .batch_execute(&format!("COMMIT PREPARED {}", quote_literal(gid)))
                        .await
                }
            });
        let mut outcomes = futures_util::future::join_all(commits).await;
        outcomes.push(
            self.conns[0]
                .client
                .batch_execute(&format!("COMMIT PREPARED {}", quote_literal(&gids[0])))
                .await,
        );
        if let Some(e) = outcomes.into_iter().find_map(Result::err) {
            return Err(WriteError::Fatal(
                SqlError::new(
                    format!(
                        "COMMIT PREPARED of the batch ending at {} failed after every part was \
                         prepared; the batch is decided: start replay again and it commits what is \
                         left (prepared transactions \"walshift … {}\" on the target)",
                        c.end, buffer_id
                    ),
                    e,
                )
                .into(),
            ));
        }
        Ok(())
    }
}

/// The first failure of a set of parts, a fatal one before a server error.
fn first_error(outcomes: Vec<Result<(), WriteError>>) -> Result<(), WriteError> {
    let mut db = None;
    for o in outcomes {
        match o {
            Ok(()) => {}
            Err(WriteError::Fatal(e)) => return Err(WriteError::Fatal(e)),
            Err(e) => db = db.or(Some(e)),
        }
    }
    db.map_or(Ok(()), Err)
}

/// Splits folded tables over `n` connections by a hash of each row's key (a row's delete,
/// update and upsert all land on the same connection, so parts write disjoint keys). Tables
/// replayed in order and tables without a key go whole to the main connection.
pub(super) fn partition(
    tables: Vec<(Dest, TableBatch)>,
    n: usize,
    arena: &Arena,
) -> Vec<Vec<(Dest, TableBatch)>> {
    let mut parts: Vec<Vec<(Dest, TableBatch)>> = (0..n.max(1)).map(|_| Vec::new()).collect();
    for (dest, tb) in tables {
        let shape = dest.shape(tb.relid);
        if n <= 1 || tb.ordered || shape.identity_full_without_key || shape.key.is_empty() {
            parts[0].push((dest, tb));
            continue;
        }
        let mut split: Vec<TableBatch> = (0..n).map(|_| tb.empty_like()).collect();
        for k in tb.deletes() {
            split[part_of(arena, k.iter().copied(), n)]
                .deletes
                .extend_from_slice(k);
        }
        for (k, row) in tb.updates() {
            let t = &mut split[part_of(arena, k.iter().copied(), n)];
            t.update_keys.extend_from_slice(k);
            t.update_rows.extend_from_slice(row);
        }
        for row in tb.upserts() {
            let t = &mut split[part_of(arena, shape.key.iter().map(|&i| row[i]), n)];
            t.upserts.extend_from_slice(row);
        }
        for (p, t) in split.into_iter().enumerate() {
            if !t.is_empty() {
                parts[p].push((dest.clone(), t));
            }
        }
    }
    parts
}

/// Which of `n` connections writes the row with this key (FNV-1a over the key's values).
fn part_of(arena: &Arena, key: impl Iterator<Item = Val>, n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in key {
        let (tag, bytes): (u8, &[u8]) = match arena.get(v) {
            Some(b) => (1, b),
            None => (0, &[]),
        };
        for &b in std::iter::once(&tag).chain(bytes) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::catalog::MappedTable;
    use crate::apply::sql::{TableSql, TargetColumn};
    use proptest::prelude::*;

    fn table() -> Dest {
        let col = |name: &str| TargetColumn {
            name: name.into(),
            type_sql: "text".into(),
            always_identity: false,
            compare_as_text: false,
        };
        Dest::Same(MappedTable {
            sql: TableSql {
                qualified: "\"public\".\"t\"".into(),
                columns: vec![col("a"), col("k"), col("v")],
                key: vec![1],
            },
            name: "public.t".into(),
            full_row_identity: false,
        })
    }

    proptest! {
        /// Every row lands on exactly one connection, and a key's delete, update and upsert
        /// land on the same one.
        #[test]
        fn partition_keeps_every_row_and_each_key_on_one_connection(
            deletes in proptest::collection::vec(0u16..300, 0..60),
            updates in proptest::collection::vec(0u16..300, 0..60),
            upserts in proptest::collection::vec(0u16..300, 0..60),
            n in 1usize..4,
        ) {
            let mut arena = Arena::default();
            let mut key = |k: u16| arena.push(Some(k.to_string().as_bytes()));
            let mut tb = TableBatch {
                relid: 1,
                key_width: 1,
                columns: 3,
                ..TableBatch::default()
            };
            for &k in &deletes {
                tb.deletes.push(key(k));
            }
            for &k in &updates {
                let kv = key(k);
                tb.update_keys.push(kv);
                tb.update_rows.extend([Val::NULL, kv, Val::UNCHANGED_TOAST]);
            }
            for &k in &upserts {
                let kv = key(k);
                tb.upserts.extend([Val::NULL, kv, key(7)]);
            }
            let parts = partition(vec![(table(), tb.clone())], n, &arena);
            prop_assert_eq!(parts.len(), n);
            let bytes = |v: Val| arena.get(v).unwrap().to_vec();
            let mut home: HashMap<Vec<u8>, usize> = HashMap::new();
            let (mut d, mut u, mut i) = (0, 0, 0);
            for (p, tables) in parts.iter().enumerate() {
                for (_, t) in tables {
                    prop_assert_eq!(t.update_keys.len(), t.update_count());
                    let keys = t.deletes().map(|k| bytes(k[0]))
                        .chain(t.updates().map(|(k, r)| {
                            assert_eq!(k[0], r[1]);
                            bytes(k[0])
                        }))
                        .chain(t.upserts().map(|r| bytes(r[1])));
                    for k in keys {
                        prop_assert_eq!(*home.entry(k).or_insert(p), p);
                    }
                    d += t.delete_count();
                    u += t.update_count();
                    i += t.upsert_count();
                }
            }
            prop_assert_eq!((d, u, i), (tb.delete_count(), tb.update_count(), tb.upsert_count()));
        }
    }

    #[test]
    fn ordered_and_keyless_tables_stay_on_the_main_connection() {
        let tb = TableBatch {
            relid: 1,
            ordered: true,
            ..TableBatch::default()
        };
        let parts = partition(vec![(table(), tb)], 3, &Arena::default());
        assert_eq!(parts[0].len(), 1);
        assert!(parts[1].is_empty() && parts[2].is_empty());
    }
}
