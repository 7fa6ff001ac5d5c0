//! Schema transfer: `pg_dump --schema-only --snapshot=…` from the source, `psql` into the target.
//!
//! The children run through [`crate::pgtools`] (password in their environment only), bounded
//! by the connection's connect timeout like walshift's own sessions.

use super::CloneError;
use crate::conn::ConnInfo;
use crate::pgtools::{ClientTools, PORTABLE_DUMP_ARGS, PgToolError, ToolCommand, conninfo};
use crate::source::preflight::TableRef;
use crate::sql::{quote_ident, quote_qualified};

/// Which part of the schema: before the rows (types, tables, sequences) or after (indexes,
/// constraints, triggers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    PreData,
    PostData,
}

impl Section {
    fn arg(self) -> &'static str {
        match self {
            Section::PreData => "--section=pre-data",
            Section::PostData => "--section=post-data",
        }
    }
}

/// How to install the client programs, for the message when one cannot be started.
pub(crate) const INSTALL_HINT: &str = "install the PostgreSQL client programs (pg_dump, psql) of at least \
     the source's major version, or pass their directory as bindir";

/// The application name the children connect with.
const APPLICATION_NAME: &str = "walshift-clone";

fn command(tools: &ClientTools, name: &str, info: &ConnInfo) -> ToolCommand {
    let mut cmd = tools.command(name, info);
    cmd.connect_timeout(info);
    cmd
}

/// Dumps one schema section of the whole source database as of `snapshot`.
///
/// Owners, privileges, tablespaces, security labels, publications and subscriptions are left
/// out, and so is walshift's own `walshift` schema; tables in `exclude` (kept as they are on
/// the target) are left out with everything attached to them.
pub(crate) async fn dump(
    tools: &ClientTools,
    source: &ConnInfo,
    snapshot: &str,
    section: Section,
    exclude: &[TableRef],
) -> Result<String, CloneError> {
    let mut cmd = command(tools, "pg_dump", source);
    cmd.args(["--schema-only", section.arg()])
        .args(PORTABLE_DUMP_ARGS)
        .arg(format!("--snapshot={snapshot}"))
        .arg(format!("--exclude-schema={}", quote_ident("walshift")));
    for t in exclude {
        // Inside double quotes, pattern characters are literal: the quoted name is the pattern.
        cmd.arg(format!(
            "--exclude-table={}",
            quote_qualified(&t.schema, &t.name)
        ));
    }
    cmd.arg("--dbname").arg(conninfo(source, APPLICATION_NAME));
    let what = format!(
        "pg_dump {} of {}",
        section.arg().trim_start_matches("--section="),
        source.redacted()
    );
    let out = cmd.output().await?;
    if !out.success() {
        return Err(out.failed(what).into());
    }
    String::from_utf8(out.stdout).map_err(|_| {
        PgToolError::Failed {
            what,
            status: "invalid output".into(),
            stderr: "pg_dump wrote SQL that is not UTF-8".into(),
        }
        .into()
    })
}

/// Error lines of `psql` that a forced clone accepts: the object is already there.
fn tolerated(line: &str) -> bool {
    line.contains("already exists") || line.contains("multiple primary keys for table")
}

/// Runs `sql` (a `pg_dump` script) on the target with `psql -X -q`.
///
/// Strict (`tolerant = false`): one transaction, `ON_ERROR_STOP`, any error fails and nothing
/// is applied. Tolerant (forced clones): statement by statement; errors saying the object
/// already exists are accepted, any other error fails (after the script ran).
pub(crate) async fn apply(
    tools: &ClientTools,
    target: &ConnInfo,
    sql: &str,
    what: &str,
    tolerant: bool,
) -> Result<(), CloneError> {
    let mut cmd = command(tools, "psql", target);
    cmd.args(["-X", "-q", "-v"]);
    if tolerant {
        cmd.arg("ON_ERROR_STOP=0");
    } else {
        cmd.arg("ON_ERROR_STOP=1").arg("--single-transaction");
    }
    cmd.arg("--dbname")
        .arg(conninfo(target, APPLICATION_NAME))
        .arg("--file=-");
    let out = cmd.output_with_input(sql.as_bytes()).await?;
    let what = format!(
        "applying the {what} schema to {} with psql",
        target.redacted()
    );
    if !out.success() || out.input.is_err() {
        return Err(out.failed(what).into());
    }
    let errors = out.error_lines().filter(|l| !tolerated(l)).count();
    if errors > 0 {
        return Err(out
            .failed_with(what, format!("{errors} statements failed"))
            .into());
    }
    if !out.stderr.is_empty() {
        tracing::debug!("{what}: {}", out.stderr);
    }
    Ok(())
}
