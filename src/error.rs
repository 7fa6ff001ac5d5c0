//! The library's error type. Each module owns a typed error for its own failures; this enum
//! carries them (as sources, not flattened into strings) to the command line, which adds the
//! operator-facing context.

use std::path::PathBuf;

/// Any failure walshift's library code reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A connection string, option or environment setting is unusable.
    #[error("configuration error: {0}")]
    Config(String),

    /// A regular (non-replication) SQL session failed.
    #[error("{context}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },

    /// A connection attempt (TCP connect, startup, authentication) did not finish in time.
    #[error(
        "connecting to {target} timed out after {} s: the server did not complete the connection \
         startup (a wrong host or port, a server that accepts connections but does not answer, or \
         a hung proxy). Check the address; the limit is connect_timeout in the connection string \
         or PGCONNECT_TIMEOUT (default 30 s)",
        timeout.as_secs_f64()
    )]
    ConnectTimeout {
        target: String,
        timeout: std::time::Duration,
    },

    /// File system I/O outside the buffer (which has its own error type).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Throwaway test clusters.
    #[error(transparent)]
    Testkit(#[from] crate::testkit::TestkitError),
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps a `tokio_postgres` error with what walshift was doing.
    pub fn sql(context: impl Into<String>, source: tokio_postgres::Error) -> Self {
        Error::Sql {
            context: context.into(),
            source,
        }
    }

    /// Wraps an I/O error with the path it concerned.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
