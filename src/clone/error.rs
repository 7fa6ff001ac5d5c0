//! What can go wrong while cloning, each with what to do about it.

/// Clone failures. Messages name the object and say how to proceed; sources are kept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CloneError {
    /// The options are unusable (e.g. `parallel = 0`).
    #[error("invalid clone options: {0}")]
    Options(String),

    /// The target already holds some of the tables to clone, and no clone state says why.
    #[error(
        "target {target} already has {} of the tables to clone ({}); clone into an empty database. \
         --force would TRUNCATE those tables on the target (every row they hold there is deleted) \
         and load the source's rows into their existing definitions: use it only if that data is \
         disposable",
        tables.len(),
        tables.join(", ")
    )]
    TargetNotEmpty { target: String, tables: Vec<String> },

    /// A previous clone into this target started but never finished.
    #[error(
        "target {target} holds an interrupted clone (snapshot {snapshot}, state 'copying'): its tables \
         are incomplete. --force drops the tables that clone created (DROP TABLE … CASCADE: their \
         rows and the views and foreign keys depending on them) and clones again"
    )]
    Interrupted { target: String, snapshot: String },

    /// This target was already cloned.
    #[error(
        "target {target} was already cloned (snapshot {snapshot}, state 'done'); replay into it instead. \
         --force would drop its cloned tables (DROP TABLE … CASCADE: every row replayed into them \
         and whatever the release changed there is lost) and clone again"
    )]
    AlreadyCloned { target: String, snapshot: String },

    /// The exported snapshot cannot be imported on the source.
    #[error(
        "cannot import snapshot {snapshot:?} on the source {source_db}: {message}; the snapshot lives only \
         while the replication connection that exported it stays open and idle"
    )]
    Snapshot {
        snapshot: String,
        source_db: String,
        message: String,
        #[source]
        source: tokio_postgres::Error,
    },

    /// `pg_dump` / `psql` could not be started, or ran and failed.
    #[error(transparent)]
    Tool(#[from] crate::pgtools::PgToolError),

    /// The rows the target stored differ from the rows the source sent for a table.
    #[error(
        "copying {table}: the source has {source_rows} rows in the snapshot but the target stored \
         {target_rows}; something on the target drops or adds rows during COPY (a trigger enabled \
         ALWAYS or REPLICA fires even with session_replication_role = replica). Fix: disable it on \
         the target (ALTER TABLE … DISABLE TRIGGER …, re-enable after the clone), then clone again \
         with --force (which drops the tables of this clone on the target and copies them anew)"
    )]
    RowCountMismatch {
        table: String,
        source_rows: u64,
        target_rows: u64,
    },

    /// The source's binary COPY data could not be read.
    #[error("copying {table}: {what}; the source's COPY stream is not what PostgreSQL sends")]
    CopyStream { table: String, what: String },

    /// The target is the source itself (never overridden), or cannot be identified.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),

    /// Connecting to the source or the target failed.
    #[error("{context}: {source}")]
    Connect {
        context: String,
        #[source]
        source: crate::error::Error,
    },

    /// One of walshift's own SQL statements failed.
    #[error(transparent)]
    Sql(#[from] crate::error::SqlError),
}

/// Renders a `tokio_postgres` error with the server's message, detail and hint.
pub(crate) fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; detail: {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => e.to_string(),
    }
}
