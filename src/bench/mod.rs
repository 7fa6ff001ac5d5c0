//! End-to-end measurements on throwaway clusters, always side by side with PostgreSQL's own
//! tools in the same run (the machines are noisy: ratios count, not absolute times).

pub mod capture;
pub mod replay;
pub mod workload;

/// Bench failures.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Testkit(#[from] crate::testkit::TestkitError),
    #[error("SQL failed during the bench: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: String,
        stderr: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A measured method left its target different from the source, or never finished: the
    /// run is void and no number is reported.
    #[error("{method}: {detail}")]
    Check { method: String, detail: String },
}
