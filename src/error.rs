//! The crate-wide error pieces.
//!
//! Each module owns a typed error enum for its own failures (what went wrong there, in the
//! operator's terms, with the fix). Two things are shared instead of restated per module:
//! - [`SqlError`]: one of walshift's own SQL statements failed. It carries what walshift was
//!   doing (`context`) and the driver's error as its `source`, never formatted into the
//!   message: the command line prints the chain once (`cli::render_error`), and callers can
//!   still ask for the SQLSTATE ([`SqlError::code`]). A module's enum holds it as
//!   `#[error(transparent)] Sql(#[from] SqlError)`, and call sites write
//!   `.sql_context("reading the slot")?` ([`SqlContext`]).
//! - [`Error`]: what the library's cross-module entry points return.

use std::path::PathBuf;

/// Any failure walshift's library code reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A connection string, option or environment setting is unusable.
    #[error("configuration error: {0}")]
    Config(String),

    /// A regular (non-replication) SQL session failed.
    #[error(transparent)]
    Sql(#[from] SqlError),

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
}

/// One of walshift's own SQL statements failed: what walshift was doing, and the driver's
/// error (with the server's message, detail and hint) as the source.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct SqlError {
    /// What walshift was doing, in the operator's terms ("reading the slot's position").
    pub context: String,
    /// The driver's error; for a server error its source is the `DbError`.
    #[source]
    pub source: tokio_postgres::Error,
}

impl SqlError {
    /// Wraps a driver error with what walshift was doing.
    pub fn new(context: impl Into<String>, source: tokio_postgres::Error) -> Self {
        SqlError {
            context: context.into(),
            source,
        }
    }

    /// The server's SQLSTATE, when the server reported the error.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        self.source.code()
    }

    /// The server's error, when the server reported one.
    pub fn as_db_error(&self) -> Option<&tokio_postgres::error::DbError> {
        self.source.as_db_error()
    }
}

/// `.sql_context("…")` on a driver result: the one way a SQL failure gets its context.
pub trait SqlContext<T> {
    /// Wraps the error with what walshift was doing.
    fn sql_context(self, context: impl Into<String>) -> std::result::Result<T, SqlError>;
    /// As [`SqlContext::sql_context`], the context built only on failure.
    fn with_sql_context<C: Into<String>>(
        self,
        context: impl FnOnce() -> C,
    ) -> std::result::Result<T, SqlError>;
}

impl<T> SqlContext<T> for std::result::Result<T, tokio_postgres::Error> {
    fn sql_context(self, context: impl Into<String>) -> std::result::Result<T, SqlError> {
        self.map_err(|e| SqlError::new(context, e))
    }

    fn with_sql_context<C: Into<String>>(
        self,
        context: impl FnOnce() -> C,
    ) -> std::result::Result<T, SqlError> {
        self.map_err(|e| SqlError::new(context(), e))
    }
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerned.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// An error and its causes on one line, `: `-separated, each said once: a cause whose text an
/// outer error already includes (`#[error("…: {0}")]` over a `#[source]`) is not repeated.
/// How the command line prints an error, and what a report or journal keeps of one (so a
/// failed statement keeps the server's message next to what walshift was doing).
///
/// A server error reads `ERROR: message (SQLSTATE code)` with its DETAIL and HINT lines; the
/// driver's bare "db error" above it is left out.
pub fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        let db = cause.downcast_ref::<tokio_postgres::error::DbError>();
        let wraps_db = cause
            .downcast_ref::<tokio_postgres::Error>()
            .is_some_and(|e| e.as_db_error().is_some());
        let msg = match db {
            Some(db) => server_error_text(db),
            None if wraps_db => String::new(),
            None => cause.to_string(),
        };
        if !msg.is_empty() && !out.contains(&msg) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&msg);
        }
        next = cause.source();
    }
    out
}

/// `ERROR: message (SQLSTATE code)`, then `DETAIL:` and `HINT:` lines when the server sent them.
fn server_error_text(db: &tokio_postgres::error::DbError) -> String {
    let mut s = format!(
        "{}: {} (SQLSTATE {})",
        db.severity(),
        db.message(),
        db.code().code()
    );
    if let Some(detail) = db.detail() {
        s.push_str("\nDETAIL: ");
        s.push_str(detail);
    }
    if let Some(hint) = db.hint() {
        s.push_str("\nHINT: ");
        s.push_str(hint);
    }
    s
}
