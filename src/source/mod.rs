//! The live database: the replication connection that streams its WAL, the pgoutput decoder
//! that turns the stream into typed messages, and the preflight and slot / publication
//! management that prepare it.
//!
//! - `protocol`: the backend half of the wire protocol a replication session needs, no I/O.
//! - `replication`: walshift's own replication connection (startup, authentication, TLS,
//!   `IDENTIFY_SYSTEM`, creating a slot, `START_REPLICATION`, the stream).
//! - `pgoutput`: the pure pgoutput decoder (and encoder, for tests), and the peeks at a
//!   Begin's or Commit's fields that capture and the buffer use.
//! - `slot`: the slot and the publication over regular SQL: default names, a slot's row of
//!   `pg_replication_slots`, dropping, the publication's existence, creation and removal.
//! - `preflight`: can the source feed walshift, and what does the publication carry; every
//!   check runs before anything is created.
//!
//! Which database a connection reaches (and the refusals built on it) is not here but in
//! [`crate::identity`]: those checks read the buffer's record and the target's progress rows,
//! later stages of the flow, and every stage uses them.

pub mod pgoutput;
pub mod preflight;
pub mod protocol;
pub mod replication;
pub mod slot;
