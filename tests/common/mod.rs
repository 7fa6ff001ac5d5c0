//! Helpers shared by the integration tests. Each test file is its own binary and pulls this
//! module in with `mod common;`; a binary uses only some of the helpers, hence the
//! `allow(dead_code)`.
//!
//! - `cli.rs` — the `walshift` binary under test, run as an operator runs it.
//! - `capture.rs` — capture into a buffer against a cluster, and the buffer read back.
//! - `pair.rs` — a source and a target cluster with a buffer directory: started side by side,
//!   with a schema, or cloned; replay into a target the test built itself.
//! - `digest.rs` — row counts and checksums of tables, to compare a copy with its source.
//! - `load.rs` — writers and workloads committing on a source.
//! - `cutover.rs` — what the cutover tests read back: the fence's database setting, an abort.
//!
//! `conformance.rs` is the conformance harness, pulled in by `tests/conformance.rs` and
//! `tests/crash_matrix.rs` only (with `#[path]`).
#![allow(dead_code)]

pub mod capture;
pub mod cli;
pub mod cutover;
pub mod digest;
pub mod load;
pub mod pair;

use walshift::localpg::{Cluster, ClusterOptions};

/// A throwaway cluster with the default options.
pub fn cluster() -> Cluster {
    Cluster::start(ClusterOptions::default()).unwrap()
}
