//! walshift: near-zero-downtime PostgreSQL releases.
//!
//! The module tree follows the data flow:
//! `source` (replication connection, pgoutput decoder, preflight) → `capture` (stream into the
//! buffer, acknowledge only what is durable) → `buffer` (segmented, checksummed, fsynced log) →
//! later `transform` → `apply` → target, then cutover and rehearsal. `localpg` starts throwaway
//! local PostgreSQL clusters for tests, the demo and benches.

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
