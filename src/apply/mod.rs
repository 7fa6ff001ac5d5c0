//! Replay's apply path: turning buffered row changes into set-based statements on the target.

pub mod fold;
