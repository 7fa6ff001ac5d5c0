//! `psql` and `pg_dump` as child programs. Passwords reach them only through their own
//! `PGPASSWORD` environment variable: never on a command line, never in a log line.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;
use tokio_postgres::config::Host;

use super::RehearseError;
use crate::conn::ConnInfo;

/// Where `psql` and `pg_dump` are: the installation [`crate::pgtools::PgBinaries::find`] picks (`pg_config --bindir`,
/// the newest `/usr/lib/postgresql/*/bin`), else `PATH`.
pub(crate) fn program(name: &str) -> PathBuf {
    match crate::pgtools::PgBinaries::find() {
        Ok(b) => b.program(name),
        Err(_) => PathBuf::from(name),
    }
}

fn conninfo_value(v: &str) -> String {
    let mut s = String::from("'");
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('\'');
    s
}

/// `host=… port=… user=… dbname=…` without the password.
pub(crate) fn conninfo(info: &ConnInfo) -> String {
    let host = match info.host() {
        Host::Tcp(h) => h.clone(),
        Host::Unix(p) => p.display().to_string(),
    };
    format!(
        "host={} port={} user={} dbname={} application_name='walshift-fixture'",
        conninfo_value(&host),
        info.port(),
        conninfo_value(info.user()),
        conninfo_value(info.dbname()),
    )
}

fn command(name: &str, info: &ConnInfo) -> Command {
    let mut cmd = Command::new(program(name));
    // The same TLS settings as walshift's own connections (libpq reads them from PGSSL*).
    for (k, v) in info.tls().child_env() {
        cmd.env(k, v);
    }
    cmd.env_remove("PGOPTIONS");
    if let Some(pw) = info.password() {
        cmd.env("PGPASSWORD", String::from_utf8_lossy(pw).as_ref());
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

async fn run(mut cmd: Command, name: &str, what: String) -> Result<String, RehearseError> {
    let out = cmd.output().await.map_err(|source| RehearseError::Spawn {
        program: program(name),
        source,
    })?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if !out.status.success() || stderr.lines().any(|l| l.contains("ERROR:")) {
        return Err(RehearseError::Command {
            what,
            status: out.status.to_string(),
            stderr,
        });
    }
    Ok(stderr)
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
        .arg(conninfo(target))
        .arg("--file")
        .arg(file)
        .stdout(Stdio::null());
    run(
        cmd,
        "psql",
        format!("loading {} into {}", file.display(), target.redacted()),
    )
    .await
    .map(|_| ())
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
    cmd.args([
        "--no-owner",
        "--no-privileges",
        "--no-tablespaces",
        "--no-security-labels",
        "--no-publications",
        "--no-subscriptions",
        "--no-comments",
        "--exclude-schema=walshift",
    ])
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
    cmd.arg("--dbname").arg(conninfo(source));
    run(
        cmd,
        "pg_dump",
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
    .map(|_| ())
}
