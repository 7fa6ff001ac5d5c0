//! What can go wrong while migrating, each with what to do about it.

use std::path::PathBuf;

/// Migration failures. Each names the script (its file name) and, where there is one, the
/// line; sources are kept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// No script was given.
    #[error("no migration scripts given; pass the release's .sql files in the order they must run")]
    NoScripts,

    /// A script file cannot be read.
    #[error("cannot read migration script {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A path without a usable (UTF-8) file name.
    #[error("{}: a migration script needs a UTF-8 file name (it is the script's name in walshift.migrations)", path.display())]
    BadName { path: PathBuf },

    /// Two scripts share a file name, which is their identity in the record.
    #[error(
        "two scripts are named \"{name}\" ({} and {}); the file name identifies a script in \
         walshift.migrations, so names must be unique: rename one",
        first.display(),
        second.display()
    )]
    DuplicateName {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },

    /// The file is not UTF-8.
    #[error("\"{name}\" line {line}: not valid UTF-8; save the script as UTF-8")]
    NotUtf8 { name: String, line: u32 },

    /// A `-- walshift:` comment that is not the one directive on line 1.
    #[error(
        "\"{name}\" line {line}: unknown or misplaced directive {text:?}; the only directive is \
         `-- walshift:no-transaction`, alone on the first line"
    )]
    BadDirective {
        name: String,
        line: u32,
        text: String,
    },

    /// A `psql` meta-command (`\i`, `\set`, …): the server does not understand them.
    #[error(
        "\"{name}\" line {line}: a backslash outside any literal (a psql meta-command such as \\i or \\set?); \
         walshift sends each script to the server as SQL: inline or remove the meta-command"
    )]
    MetaCommand { name: String, line: u32 },

    /// A script that runs in walshift's transaction begins or ends a transaction itself.
    #[error(
        "\"{name}\" line {line}: {statement} — walshift runs each script in its own transaction and records \
         it in that same transaction, so a script must not begin or end transactions itself; remove the \
         BEGIN/COMMIT (the whole script is already atomic), or, if it really needs several transactions, \
         make `-- walshift:no-transaction` its first line; nothing was run"
    )]
    TransactionControl {
        name: String,
        line: u32,
        statement: String,
    },

    /// A no-transaction script begins a transaction it never ends.
    #[error(
        "\"{name}\" line {line}: this transaction is never committed before the script ends; end it with \
         COMMIT; nothing was run"
    )]
    TransactionLeftOpen { name: String, line: u32 },

    /// The connection to the target did not complete within the connect timeout.
    #[error(transparent)]
    ConnectTimeout(#[from] crate::Error),

    /// Connecting to the target failed.
    #[error("cannot connect to the target {target}: {message}")]
    Connect {
        target: String,
        message: String,
        #[source]
        source: tokio_postgres::Error,
    },

    /// One of walshift's own statements failed.
    #[error(transparent)]
    Sql(#[from] crate::error::SqlError),

    /// Scripts already applied to the target have changed since.
    #[error(
        "{} already applied to {target} with different content: {}; an applied migration must not \
         change: restore the file as it was applied, and put the change in a new script; nothing was run",
        if changed.len() == 1 { "a script was" } else { "scripts were" },
        changed.iter().map(|c| format!(
            "\"{}\" (applied {}, recorded sha256 {}, file now {})",
            c.name, c.applied_at, short(&c.recorded), short(&c.current)
        )).collect::<Vec<_>>().join(", ")
    )]
    ChecksumMismatch {
        target: String,
        changed: Vec<ChangedScript>,
    },

    /// A script failed: in a transaction, rolled back; later scripts not run.
    #[error(
        "\"{name}\"{}: {message}; {}{}",
        at(*line, excerpt),
        if *no_transaction {
            format!(
                "it runs outside a transaction (-- walshift:no-transaction): its {committed} statement(s) \
                 before this one stay committed and it is not recorded; make it safe to rerun (IF NOT \
                 EXISTS, …) or undo them by hand, then run migrate again"
            )
        } else {
            "its transaction was rolled back: nothing of it was applied".to_owned()
        },
        later(*not_run)
    )]
    ScriptFailed {
        name: String,
        /// 1-based line in the file, when the server gave a position.
        line: Option<u32>,
        excerpt: String,
        message: String,
        no_transaction: bool,
        /// Statements of a no-transaction script that committed before the failure.
        committed: usize,
        not_run: usize,
        #[source]
        source: tokio_postgres::Error,
    },

    /// A statement that cannot run inside a transaction block (SQLSTATE 25001).
    #[error(
        "\"{name}\"{}: {message}; walshift runs each script in a transaction. Move such statements \
         (CREATE INDEX CONCURRENTLY, VACUUM, ALTER SYSTEM, CREATE DATABASE, …) into a script of their \
         own whose first line is `-- walshift:no-transaction` (it then runs statement by statement, \
         each committing on its own, and is recorded after the last succeeds), or split the script. \
         The transaction was rolled back: nothing of \"{name}\" was applied{}",
        at(*line, excerpt),
        later(*not_run)
    )]
    NeedsNoTransaction {
        name: String,
        line: Option<u32>,
        excerpt: String,
        message: String,
        not_run: usize,
        #[source]
        source: tokio_postgres::Error,
    },

    /// The script ended walshift's transaction in a way the lexer did not see.
    #[error(
        "\"{name}\" ended walshift's transaction itself (a COMMIT or ROLLBACK walshift did not recognise): \
         part of it may be committed and it was not recorded; check the target, remove the transaction \
         control from the script, then run migrate again"
    )]
    TransactionEnded { name: String },
}

/// A script whose content differs from what was applied.
#[derive(Debug, Clone)]
pub struct ChangedScript {
    pub name: String,
    /// When it was applied (`walshift.migrations.applied_at`, as text).
    pub applied_at: String,
    /// Recorded SHA-256, hex.
    pub recorded: String,
    /// SHA-256 of the file now, hex.
    pub current: String,
}

fn short(hex: &str) -> &str {
    &hex[..hex.len().min(12)]
}

fn later(not_run: usize) -> String {
    match not_run {
        0 => String::new(),
        n => format!("; {n} later script(s) not run"),
    }
}

fn at(line: Option<u32>, excerpt: &str) -> String {
    match line {
        Some(l) if excerpt.is_empty() => format!(" line {l}"),
        Some(l) => format!(" line {l} ({excerpt:?})"),
        None => String::new(),
    }
}

/// Renders a `tokio_postgres` error with the server's message, SQLSTATE, detail, hint and
/// context.
pub(crate) fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!(
                "{}: {} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            );
            if let Some(d) = db.detail() {
                s.push_str(&format!("; detail: {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            if let Some(w) = db.where_() {
                s.push_str(&format!("; context: {}", w.replace('\n', " / ")));
            }
            s
        }
        None => e.to_string(),
    }
}
