//! Schema transfer: `pg_dump --schema-only --snapshot=…` from the source, `psql` into the target.
//!
//! The children run through [`crate::pgtools`] (password in their environment only), bounded
//! by the connection's connect timeout like walshift's own sessions.

use std::collections::HashSet;
use std::path::Path;

use tokio_postgres::Client;

use super::CloneError;
use crate::conn::ConnInfo;
use crate::error::SqlContext;
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

/// The client programs of a clone, and what their SQL needs to load into the target.
pub(crate) struct Tools {
    client: ClientTools,
    target_major: u32,
    /// The target's run-time parameters (`pg_settings`), read when `pg_dump` is newer than the
    /// target: its preamble may set parameters the target does not have.
    target_settings: Option<HashSet<String>>,
}

/// The `pg_dump` and `psql` for dumping a server of `source_version` (`server_version_num`)
/// into `target`: never a `pg_dump` older than the source (it cannot dump a newer server),
/// preferably the target's own version ([`ClientTools::for_dump`]; a major-version upgrade
/// clones with the newer `pg_dump`).
pub(crate) async fn tools(
    bindir: Option<&Path>,
    source_version: i32,
    target: &Client,
) -> Result<Tools, CloneError> {
    let target_version: i32 = target
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .sql_context("reading the target's server version")?
        .get(0);
    let major = |v: i32| (v / 10000) as u32;
    let target_major = major(target_version);
    let client = ClientTools::for_dump(bindir, major(source_version), target_major, INSTALL_HINT)?;
    let target_settings = match client.major() {
        Some(m) if m > target_major => Some(
            target
                .query("SELECT name::text FROM pg_settings", &[])
                .await
                .sql_context("reading the target's run-time parameters")?
                .iter()
                .map(|r| r.get::<_, String>(0).to_ascii_lowercase())
                .collect(),
        ),
        _ => None,
    };
    Ok(Tools {
        client,
        target_major,
        target_settings,
    })
}

/// `sql` (a `pg_dump` script) without the `SET` lines of its preamble (the session settings
/// before the first object) that name a run-time parameter `known` lacks, and those names.
///
/// A `pg_dump` newer than the target writes settings the target may not have: `pg_dump` 17+
/// writes `SET transaction_timeout = 0;`, which PostgreSQL 14–16 reject ("unrecognized
/// configuration parameter"). Such a setting only turns off what the target does not have;
/// nothing after the preamble is touched.
fn drop_unknown_settings(sql: &str, known: &HashSet<String>) -> (String, Vec<String>) {
    let mut out = String::with_capacity(sql.len());
    let mut dropped = Vec::new();
    let mut preamble = true;
    for line in sql.split_inclusive('\n') {
        let l = line.trim_end();
        if preamble {
            if let Some(rest) = l.strip_prefix("SET ")
                && let Some((name, _)) = rest.split_once(" = ")
                && l.ends_with(';')
            {
                let name = name.trim().to_ascii_lowercase();
                if !known.contains(&name) {
                    dropped.push(name);
                    continue;
                }
            } else if !(l.is_empty()
                || l.starts_with("--")
                || l.starts_with('\\')
                || l.starts_with("SELECT pg_catalog.set_config("))
            {
                preamble = false;
            }
        }
        out.push_str(line);
    }
    (out, dropped)
}

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
    tools: &Tools,
    source: &ConnInfo,
    snapshot: &str,
    section: Section,
    exclude: &[TableRef],
) -> Result<String, CloneError> {
    let mut cmd = command(&tools.client, "pg_dump", source);
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
    let sql = String::from_utf8(out.stdout).map_err(|_| PgToolError::Failed {
        what,
        status: "invalid output".into(),
        stderr: "pg_dump wrote SQL that is not UTF-8".into(),
    })?;
    let Some(known) = &tools.target_settings else {
        return Ok(sql);
    };
    let (sql, dropped) = drop_unknown_settings(&sql, known);
    if !dropped.is_empty() {
        tracing::info!(
            "pg_dump {} writes settings PostgreSQL {} does not have; left out: {}",
            tools.client.major().unwrap_or(0),
            tools.target_major,
            dropped.join(", ")
        );
    }
    Ok(sql)
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
    tools: &Tools,
    target: &ConnInfo,
    sql: &str,
    what: &str,
    tolerant: bool,
) -> Result<(), CloneError> {
    let mut cmd = command(&tools.client, "psql", target);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_the_target_lacks_are_left_out_of_the_preamble_only() {
        let sql = "--\n-- PostgreSQL database dump\n--\n\\restrict abc\n\n\
                   SET statement_timeout = 0;\nSET transaction_timeout = 0;\n\
                   SELECT pg_catalog.set_config('search_path', '', false);\n\
                   SET row_security = off;\n\nCREATE TABLE t (id int);\n\
                   SET transaction_timeout = 0;\n";
        let known: HashSet<String> = ["statement_timeout", "row_security"]
            .into_iter()
            .map(String::from)
            .collect();
        let (out, dropped) = drop_unknown_settings(sql, &known);
        assert_eq!(dropped, vec!["transaction_timeout".to_owned()]);
        assert_eq!(
            out,
            "--\n-- PostgreSQL database dump\n--\n\\restrict abc\n\n\
             SET statement_timeout = 0;\n\
             SELECT pg_catalog.set_config('search_path', '', false);\n\
             SET row_security = off;\n\nCREATE TABLE t (id int);\n\
             SET transaction_timeout = 0;\n"
        );
        let all: HashSet<String> = ["statement_timeout", "row_security", "transaction_timeout"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(drop_unknown_settings(sql, &all), (sql.to_owned(), vec![]));
    }
}
