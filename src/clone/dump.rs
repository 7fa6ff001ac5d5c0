//! Schema transfer: `pg_dump --schema-only --snapshot=…` from the source, `psql` into the target.
//!
//! Passwords reach the child programs only through their own `PGPASSWORD` environment
//! variable: never on a command line, never in a log line.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio_postgres::config::Host;

use super::CloneError;
use crate::conn::ConnInfo;
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

/// Where the PostgreSQL client programs are.
#[derive(Debug, Clone)]
pub(crate) struct Programs {
    bindir: Option<PathBuf>,
}

impl Programs {
    /// `bindir` if given, else the installation [`crate::pgtools::PgBinaries::find`] picks (`pg_config --bindir`,
    /// newest `/usr/lib/postgresql/*/bin`), else `PATH`.
    pub(crate) fn locate(bindir: Option<&Path>) -> Programs {
        let bindir = bindir
            .map(Path::to_owned)
            .or_else(|| crate::pgtools::PgBinaries::find().ok().map(|b| b.bindir));
        Programs { bindir }
    }

    fn program(&self, name: &str) -> PathBuf {
        match &self.bindir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        }
    }
}

/// A libpq conninfo value, quoted: `'it\'s'`.
fn conninfo_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('\'');
    s
}

/// `host=… port=… user=… dbname=…` for a child program; never contains the password.
pub(crate) fn conninfo_string(info: &ConnInfo) -> String {
    let host = match info.host() {
        Host::Tcp(h) => h.clone(),
        Host::Unix(p) => p.display().to_string(),
    };
    format!(
        "host={} port={} user={} dbname={} application_name={}",
        conninfo_value(&host),
        info.port(),
        conninfo_value(info.user()),
        conninfo_value(info.dbname()),
        conninfo_value("walshift-clone"),
    )
}

fn command(programs: &Programs, name: &str, info: &ConnInfo) -> Command {
    let mut cmd = Command::new(programs.program(name));
    // The same TLS settings as walshift's own connections (libpq reads them from PGSSL*).
    for (k, v) in info.tls().child_env() {
        cmd.env(k, v);
    }
    if let Some(pw) = info.password() {
        cmd.env("PGPASSWORD", String::from_utf8_lossy(pw).as_ref());
    }
    // The same bound on connecting as walshift's own connections (libpq: whole seconds, ≥ 2).
    let timeout = info.connect_timeout().as_secs_f64().ceil() as u64;
    cmd.env("PGCONNECT_TIMEOUT", timeout.to_string());
    cmd.kill_on_drop(true);
    cmd
}

/// Dumps one schema section of the whole source database as of `snapshot`.
///
/// Owners, privileges, tablespaces, security labels, publications and subscriptions are left
/// out, and so is walshift's own `walshift` schema; tables in `exclude` (kept as they are on
/// the target) are left out with everything attached to them.
pub(crate) async fn dump(
    programs: &Programs,
    source: &ConnInfo,
    snapshot: &str,
    section: Section,
    exclude: &[TableRef],
) -> Result<String, CloneError> {
    let mut cmd = command(programs, "pg_dump", source);
    cmd.args([
        "--schema-only",
        section.arg(),
        "--no-owner",
        "--no-privileges",
        "--no-tablespaces",
        "--no-security-labels",
        "--no-publications",
        "--no-subscriptions",
    ])
    .arg(format!("--snapshot={snapshot}"))
    .arg(format!("--exclude-schema={}", quote_ident("walshift")));
    for t in exclude {
        // Inside double quotes, pattern characters are literal: the quoted name is the pattern.
        cmd.arg(format!(
            "--exclude-table={}",
            quote_qualified(&t.schema, &t.name)
        ));
    }
    cmd.arg("--dbname").arg(conninfo_string(source));
    cmd.stdin(Stdio::null());
    let what = format!(
        "pg_dump {} of {}",
        section.arg().trim_start_matches("--section="),
        source.redacted()
    );
    let out = cmd.output().await.map_err(|e| CloneError::Spawn {
        program: programs.program("pg_dump"),
        source: e,
    })?;
    if !out.status.success() {
        return Err(CloneError::Command {
            what,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    String::from_utf8(out.stdout).map_err(|_| CloneError::Command {
        what,
        status: "invalid output".into(),
        stderr: "pg_dump wrote SQL that is not UTF-8".into(),
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
    programs: &Programs,
    target: &ConnInfo,
    sql: &str,
    what: &str,
    tolerant: bool,
) -> Result<(), CloneError> {
    let mut cmd = command(programs, "psql", target);
    cmd.args(["-X", "-q", "-v"]);
    if tolerant {
        cmd.arg("ON_ERROR_STOP=0");
    } else {
        cmd.arg("ON_ERROR_STOP=1").arg("--single-transaction");
    }
    cmd.arg("--dbname")
        .arg(conninfo_string(target))
        .arg("--file=-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| CloneError::Spawn {
        program: programs.program("psql"),
        source: e,
    })?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let write = async move {
        let r = stdin.write_all(sql.as_bytes()).await;
        drop(stdin);
        r
    };
    let (written, out) = tokio::join!(write, child.wait_with_output());
    let out = out.map_err(|e| CloneError::Spawn {
        program: programs.program("psql"),
        source: e,
    })?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let what = format!(
        "applying the {what} schema to {} with psql",
        target.redacted()
    );
    if !out.status.success() || written.is_err() {
        return Err(CloneError::Command {
            what,
            status: out.status.to_string(),
            stderr,
        });
    }
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("ERROR:") && !tolerated(l))
        .collect();
    if !errors.is_empty() {
        return Err(CloneError::Command {
            what,
            status: format!("{} statements failed", errors.len()),
            stderr,
        });
    }
    if !stderr.is_empty() {
        tracing::debug!("{what}: {stderr}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_quotes_values_and_never_holds_the_password() {
        let info = ConnInfo::parse(
            r"host='/tmp/so\'ck' port=5433 user='a\\b' password=s3cret dbname=shop",
        )
        .unwrap();
        let s = conninfo_string(&info);
        assert_eq!(
            s,
            "host='/tmp/so\\'ck' port=5433 user='a\\\\b' dbname='shop' application_name='walshift-clone'"
        );
        assert!(!s.contains("s3cret"));
    }
}
