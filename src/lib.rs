//! walshift: near-zero-downtime PostgreSQL releases.
//!
//! The module tree is the data flow, in order. No import runs back up it: `source` uses none of
//! the stages, `buffer` only pgoutput's peeks from `source`, `capture` writes the `buffer` and
//! runs `clone` at its new slot's snapshot; from `transform` on, a stage uses only the stages
//! before it (and the shared plumbing at the end).
//!
//! - [`source`]: the live database — replication connection, pgoutput decoder, slot and
//!   publication, preflight.
//! - [`capture`]: stream the slot into the buffer; confirm to the slot only what is fsynced.
//! - [`buffer`]: the segmented, checksummed, fsynced log (also the fixture format).
//! - [`clone`]: copy the source into the target at the slot's exported snapshot.
//! - [`migrate`]: run the release's migration scripts on the target.
//! - [`transform`]: the migration mapping (old rows → new schema), compiled against catalogs.
//! - [`apply`]: replay — fold, set-based statements, exactly-once progress on the target.
//! - [`verify`]: compare source and target (through the mapping), offline or online.
//! - [`cutover`]: fence, drain to a marker, sequences, verify, switch — with a journal.
//! - [`run`]: the long-running mode (capture + replay in one process, control socket).
//! - [`rehearse`], [`bench`], [`demo`]: fixtures and rehearsals, measurements, the demo.
//!
//! Shared plumbing: [`identity`] (which database is this; the refusals built on it), [`conn`]
//! and [`tls`] (connections), [`sql`] (quoting, the one SQL lexer, walshift's own objects),
//! [`pgtools`] (PostgreSQL's binaries: pg_dump, psql, initdb), [`localpg`] (throwaway local
//! clusters for tests, demo, bench and rehearsals), [`lsn`], [`error`].

pub mod apply;
pub mod bench;
pub mod buffer;
pub mod capture;
pub mod cli;
pub mod clone;
pub mod conn;
pub mod cutover;
pub mod demo;
pub mod error;
pub mod identity;
pub mod localpg;
pub mod lsn;
pub mod migrate;
pub mod pgtools;
pub mod rehearse;
pub mod run;
pub mod source;
pub mod sql;
pub mod tls;
pub mod transform;
pub mod verify;

pub use error::{Error, Result, SqlContext, SqlError};
pub use lsn::Lsn;
