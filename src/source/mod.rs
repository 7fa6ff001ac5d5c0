//! The live database: the replication connection that streams its WAL, the pgoutput decoder
//! that turns the stream into typed messages, and the preflight and slot / publication
//! management that prepare it.

pub mod identity;
pub mod pgoutput;
pub mod preflight;
pub mod protocol;
pub mod replication;
pub mod slot;
