//! The two client-program runs of rehearsal, through [`crate::pgtools`]: loading a fixture's
//! SQL with `psql` and recording one with `pg_dump`. Unlike clone's, these children do not get
//! walshift's connect timeout, and never inherit the caller's `PGOPTIONS`.

use std::path::Path;
use std::process::Stdio;

use super::RehearseError;
use crate::conn::ConnInfo;
use crate::pgtools::{ClientTools, PORTABLE_DUMP_ARGS, ToolCommand, conninfo};

/// How to install the client programs, for the message when one cannot be started.
const INSTALL_HINT: &str = "install the PostgreSQL client programs (psql, pg_dump)";

/// The application name the children connect with.
const APPLICATION_NAME: &str = "walshift-fixture";

fn command(name: &str, info: &ConnInfo) -> ToolCommand {
    let mut cmd = ClientTools::locate(None, INSTALL_HINT).command(name, info);
    cmd.env_remove("PGOPTIONS");
    cmd
}

/// Runs `cmd`; a non-zero exit or an `ERROR:` line on stderr fails it as `what`.
async fn run(cmd: ToolCommand, what: String) -> Result<(), RehearseError> {
    let out = cmd.output().await?;
    if !out.success() || out.error_lines().next().is_some() {
        return Err(out.failed(what).into());
    }
    Ok(())
}

/// Runs a SQL file on `target` with `psql`: one transaction, stop at the first error.
/// `replica` loads with `session_replication_role = replica` (no triggers, no foreign-key
/// checks), as clone and replay do.
pub(crate) async fn psql_file(
    target: &ConnInfo,
    file: &Path,
    replica: bool,
) -> Result<(), RehearseError> {
    let mut cmd = command("psql", target);
    if replica {
        cmd.env("PGOPTIONS", "-c session_replication_role=replica");
    }
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction"])
        .arg("--dbname")
        .arg(conninfo(target, APPLICATION_NAME))
        .arg("--file")
        .arg(file)
        .stdout(Stdio::null());
    run(
        cmd,
        format!("loading {} into {}", file.display(), target.redacted()),
    )
    .await
}

/// `pg_dump` of the source as of `snapshot` into `out`: the whole database's schema
/// (`schema_only`) or the rows of `tables` (data only).
pub(crate) async fn pg_dump(
    source: &ConnInfo,
    snapshot: &str,
    out: &Path,
    schema_only: bool,
    tables: &[String],
) -> Result<(), RehearseError> {
    let mut cmd = command("pg_dump", source);
    cmd.args(PORTABLE_DUMP_ARGS)
        .args(["--no-comments", "--exclude-schema=walshift"])
        .arg(format!("--snapshot={snapshot}"))
        .arg("--file")
        .arg(out);
    if schema_only {
        cmd.arg("--schema-only");
    } else {
        cmd.arg("--data-only");
        for t in tables {
            cmd.arg(format!("--table={t}"));
        }
    }
    cmd.arg("--dbname").arg(conninfo(source, APPLICATION_NAME));
    run(
        cmd,
        format!(
            "pg_dump --{} of {}",
            if schema_only {
                "schema-only"
            } else {
                "data-only"
            },
            source.redacted()
        ),
    )
    .await
}
