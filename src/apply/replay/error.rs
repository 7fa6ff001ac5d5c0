//! What stops replay ([`ReplayError`]): each failure says where (the source LSN, the table)
//! and what the operator does next; a rerun resumes after the last committed batch.

use std::path::PathBuf;

use crate::SqlError;
use crate::apply::catalog::CatalogError;
use crate::buffer::BufferError;
use crate::identity::IdentityError;
use crate::lsn::Lsn;
use crate::source::pgoutput;
use crate::transform::TransformError;

/// Replay failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    #[error(transparent)]
    Buffer(#[from] BufferError),
    /// The target's tables do not fit the source's (a missing table, column or key).
    #[error(transparent)]
    Target(#[from] CatalogError),
    #[error(transparent)]
    Connect(#[from] crate::Error),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("buffer {0} has no buffer.json: it was not written by walshift capture")]
    NotABuffer(PathBuf),
    #[error("undecodable message in the buffer at LSN {lsn}: {source}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: pgoutput::DecodeError,
    },
    #[error(
        "a change refers to relation {relid}, but the buffer holds no Relation message for it before LSN {lsn}"
    )]
    UnknownRelation { relid: u32, lsn: Lsn },
    #[error(
        "applying the source change at LSN {lsn} failed on {table} ({what}), even in strict source order: {}. \
         Its transaction was rolled back; the target is consistent up to the previous source transaction. \
         Fix the target (or the transform) and run replay again: it resumes there",
        crate::transform::catalog::db_message(.source)
    )]
    Apply {
        lsn: Lsn,
        table: String,
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "the change at LSN {lsn} to {table} carries a value of column {column:?} that is not UTF-8: \
         walshift replays text values and needs a UTF8 source database (check `SHOW server_encoding`)"
    )]
    Encoding {
        lsn: Lsn,
        table: String,
        column: String,
    },
    #[error(
        "the target has diverged from the source at LSN {lsn}: the {what} on {table} should have \
         affected {expected} row(s) but affected {found}. The target does not hold the row as the \
         source had it before this change (it was changed or removed on the target outside replay, \
         or copied wrong). The transaction was rolled back; the target is consistent up to the \
         previous source transaction. Re-clone the target, or make the row on the target equal to \
         the source's row before this change by hand and run replay again: it resumes here"
    )]
    Diverged {
        lsn: Lsn,
        table: String,
        what: String,
        expected: u64,
        found: u64,
    },
    #[error("cannot fold the change at LSN {lsn}: {source}")]
    Fold {
        lsn: Lsn,
        #[source]
        source: crate::apply::fold::FoldError,
    },
    #[error(transparent)]
    Transform(#[from] TransformError),
    #[error("the background writer stopped unexpectedly: {0}")]
    Writer(String),
    #[error(
        "the update at LSN {lsn} to {table} left column {source_column:?} unchanged (a TOASTed value the \
         source does not resend), but {target_column} is computed from it. walshift cannot compute it: \
         set `ALTER TABLE {table} REPLICA IDENTITY FULL` on the source (old rows then carry the value) \
         and capture again, or map the column without reading {source_column:?}"
    )]
    MissingValue {
        lsn: Lsn,
        table: String,
        source_column: String,
        target_column: String,
    },
    #[error(
        "{rows} row(s) of {table} started passing the mapping's filter for {target} in an update that left a \
         TOASTed value unchanged (transactions up to LSN {lsn}): the whole row is not in the stream, so it \
         cannot be inserted. Set `ALTER TABLE {table} REPLICA IDENTITY FULL` on the source and capture again. \
         Nothing of this batch was committed"
    )]
    FilteredRowIncomplete {
        lsn: Lsn,
        table: String,
        target: String,
        rows: i64,
    },
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
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error(
        "another walshift replay (or walshift run, or a cutover) took this buffer's replay lock on \
         the target while this replay was reconnecting; this one stops so that only one applies it"
    )]
    LockTaken,
    #[error(
        "lost the target and could not get back to it: {attempts} reconnect attempt(s) over {} failed \
         (--reconnect-attempts). Everything committed on the target is recorded in walshift.applied; \
         run replay again once the target is back to resume there. The last attempt",
        crate::conn::reconnect::human(*.over)
    )]
    GaveUp {
        attempts: u32,
        /// Since the target was lost.
        over: std::time::Duration,
        #[source]
        last: Box<ReplayError>,
    },
}

impl ReplayError {
    /// The target is gone for now (restarting, failing over, a connection dropped) and another
    /// start may succeed: replay reconnects after these ([`crate::conn::reconnect`]). Never a
    /// statement the target refused for its content (a constraint, a type, a permission), a
    /// divergence, the buffer, or authentication: those stop replay at once.
    pub fn is_transient(&self) -> bool {
        use crate::conn::reconnect::{
            is_transient, is_transient_identity, is_transient_pg, is_transient_sql,
        };
        match self {
            ReplayError::Connect(e) => is_transient(e),
            ReplayError::Identity(e) => is_transient_identity(e),
            ReplayError::Sql(e)
            | ReplayError::Target(CatalogError::Sql(e))
            | ReplayError::Transform(TransformError::Sql(e)) => is_transient_sql(e),
            ReplayError::Apply { source, .. } => is_transient_pg(source),
            _ => false,
        }
    }
}
