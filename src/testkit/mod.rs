//! Placeholder: being written.

/// Testkit failures.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("{0}")]
    Other(String),
}
