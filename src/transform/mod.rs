//! Migration transforms: how rows captured in the *old* schema land in the *migrated* target.
//!
//! A mapping file ([`mapping`]) names, per source table, the target table(s), a SQL expression
//! per target column, dropped columns and a row filter; tables it does not name map to
//! themselves. Before replay writes anything the mapping is compiled ([`plan`]) and checked
//! against the target catalog, with PostgreSQL type-checking every expression ([`catalog`]).
//! The compiled plan produces the set-based statements ([`sql`]) replay runs, so the
//! expressions are evaluated by the target, inside the batch statements.

pub mod catalog;
pub mod expr;
pub mod mapping;
pub mod plan;
pub mod sql;

pub use mapping::{Mapping, TableName};
pub use plan::{SourcePlan, SourceTable, TargetPlan};

/// A mapping that cannot be used, or a failure reading what it is checked against.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransformError {
    #[error("cannot read mapping file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A mistake in the mapping, located in the file (line 0: a table the file does not name,
    /// mapped onto itself).
    #[error("{}", located(path, *line, message))]
    Mapping {
        path: String,
        line: usize,
        message: String,
    },
    #[error(transparent)]
    Sql(#[from] crate::error::SqlError),
}

fn located(path: &str, line: usize, message: &str) -> String {
    if line == 0 {
        format!("{path} (table not in the mapping, mapped onto itself): {message}")
    } else {
        format!("{path}:{line}: {message}")
    }
}
