//! Replay's apply path: turning buffered row changes into set-based statements on the target.

pub mod fold;
pub mod hold;
pub mod replay;
pub mod sql;
pub mod target;
pub mod wire;
