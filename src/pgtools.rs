//! PostgreSQL's own programs: where an installation's binaries are ([`PgBinaries`]), and
//! running its client programs (`pg_dump`, `psql`) as children ([`ClientTools`]).
//!
//! One search rule for the whole crate, so that clusters started by `localpg` and the client
//! programs that clone and rehearsal run come from the same installation. Passwords reach a
//! child only through its own `PGPASSWORD` environment variable: never on a command line,
//! never in a log line. One error shape for every child: what failed, its exit status and its
//! stderr ([`PgToolError::Failed`]), or that it could not be started and how to install it
//! ([`PgToolError::Spawn`]).

use std::fs;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use tokio::io::AsyncWriteExt;
use tokio_postgres::config::Host;

use crate::conn::ConnInfo;

/// Failures finding or running PostgreSQL's programs. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgToolError {
    /// No PostgreSQL server binaries on this machine.
    #[error(
        "no PostgreSQL server binaries found (looked at `pg_config --bindir` and /usr/lib/postgresql/*/bin); \
         install PostgreSQL server packages: apt-get install postgresql"
    )]
    NoServerBinaries,

    /// A client program could not be started (or waited for).
    #[error("cannot run {}: {source}; {install_hint}", program.display())]
    Spawn {
        program: PathBuf,
        /// How to get the program, in the caller's terms.
        install_hint: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// A client program ran and failed.
    #[error("{what} failed ({status}):\n{stderr}")]
    Failed {
        what: String,
        status: String,
        stderr: String,
    },
}

/// A PostgreSQL installation: the directory of its programs, found once and passed around.
#[derive(Clone, Debug)]
pub struct PgBinaries {
    /// Directory holding `initdb`, `postgres`, `pg_dump`, `psql`, `pg_recvlogical`, ….
    pub bindir: PathBuf,
    /// The installation's major version, when its directory says it (Debian's
    /// `/usr/lib/postgresql/<major>/bin`); `None` otherwise.
    pub major: Option<u32>,
}

impl PgBinaries {
    /// Finds server binaries: `pg_config --bindir` if it has `initdb` and `postgres`, else
    /// the newest `/usr/lib/postgresql/<major>/bin` that has `initdb`.
    pub fn find() -> Result<Self, PgToolError> {
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
                return Ok(PgBinaries::at(dir));
            }
        }
        let mut candidates: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let major: u32 = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").is_file().then_some((major, bin))
            })
            .collect();
        candidates.sort();
        candidates
            .pop()
            .map(|(major, bindir)| PgBinaries {
                bindir,
                major: Some(major),
            })
            .ok_or(PgToolError::NoServerBinaries)
    }

    /// The installation in `bindir`.
    pub fn at(bindir: PathBuf) -> Self {
        let major = major_of(&bindir);
        PgBinaries { bindir, major }
    }

    /// Path of one program in the installation.
    pub fn program(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }
}

/// `<major>` of a `…/<major>/bin` directory.
fn major_of(bindir: &Path) -> Option<u32> {
    if bindir.file_name()? != "bin" {
        return None;
    }
    bindir.parent()?.file_name()?.to_str()?.parse().ok()
}

/// `pg_dump` arguments for a dump loaded into another server: owners, privileges,
/// tablespaces, security labels, publications and subscriptions are left out.
pub const PORTABLE_DUMP_ARGS: [&str; 6] = [
    "--no-owner",
    "--no-privileges",
    "--no-tablespaces",
    "--no-security-labels",
    "--no-publications",
    "--no-subscriptions",
];

/// Where the client programs are, and what to tell the operator when one cannot be started.
#[derive(Clone, Debug)]
pub struct ClientTools {
    bindir: Option<PathBuf>,
    install_hint: &'static str,
}

impl ClientTools {
    /// `bindir` if given, else the installation [`PgBinaries::find`] picks, else `PATH`.
    /// `install_hint` ends the message when a program cannot be started ("install …").
    pub fn locate(bindir: Option<&Path>, install_hint: &'static str) -> ClientTools {
        let bindir = bindir
            .map(Path::to_owned)
            .or_else(|| PgBinaries::find().ok().map(|b| b.bindir));
        ClientTools {
            bindir,
            install_hint,
        }
    }

    /// Path of one program (a bare name, looked up in `PATH`, when no installation was found).
    pub fn program(&self, name: &str) -> PathBuf {
        match &self.bindir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        }
    }

    /// Program `name` set up to connect as `conn`: walshift's TLS settings (libpq reads them
    /// from `PGSSL*`) and the password in `PGPASSWORD`; stdin from `/dev/null`; killed when
    /// dropped. The caller adds the arguments, with the connection as [`conninfo`].
    pub fn command(&self, name: &str, conn: &ConnInfo) -> ToolCommand {
        let program = self.program(name);
        let mut cmd = tokio::process::Command::new(&program);
        for (k, v) in conn.tls().child_env() {
            cmd.env(k, v);
        }
        if let Some(pw) = conn.password() {
            cmd.env("PGPASSWORD", String::from_utf8_lossy(pw).as_ref());
        }
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        ToolCommand {
            cmd,
            program,
            install_hint: self.install_hint,
        }
    }
}

/// A client program ready to run; add arguments through `Deref` to the command.
#[derive(Debug)]
pub struct ToolCommand {
    cmd: tokio::process::Command,
    program: PathBuf,
    install_hint: &'static str,
}

impl Deref for ToolCommand {
    type Target = tokio::process::Command;
    fn deref(&self) -> &Self::Target {
        &self.cmd
    }
}

impl DerefMut for ToolCommand {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.cmd
    }
}

impl ToolCommand {
    /// The same bound on connecting as walshift's own connections (`PGCONNECT_TIMEOUT`; libpq
    /// takes whole seconds, at least 2).
    pub fn connect_timeout(&mut self, conn: &ConnInfo) -> &mut Self {
        let timeout = conn.connect_timeout().as_secs_f64().ceil() as u64;
        self.cmd.env("PGCONNECT_TIMEOUT", timeout.to_string());
        self
    }

    /// Runs the program to its end, collecting stdout and stderr.
    pub async fn output(mut self) -> Result<ToolOutput, PgToolError> {
        let out = self
            .cmd
            .output()
            .await
            .map_err(|source| self.spawn_error(source))?;
        Ok(ToolOutput::new(out, Ok(())))
    }

    /// Runs the program to its end with `input` on its stdin, collecting stdout and stderr.
    pub async fn output_with_input(mut self, input: &[u8]) -> Result<ToolOutput, PgToolError> {
        self.cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self
            .cmd
            .spawn()
            .map_err(|source| self.spawn_error(source))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let write = async move {
            let r = stdin.write_all(input).await;
            drop(stdin);
            r
        };
        let (written, out) = tokio::join!(write, child.wait_with_output());
        let out = out.map_err(|source| self.spawn_error(source))?;
        Ok(ToolOutput::new(out, written))
    }

    fn spawn_error(&self, source: std::io::Error) -> PgToolError {
        PgToolError::Spawn {
            program: self.program.clone(),
            install_hint: self.install_hint,
            source,
        }
    }
}

/// How a client program ended.
#[derive(Debug)]
pub struct ToolOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    /// Its stderr, trimmed (lossy UTF-8).
    pub stderr: String,
    /// Whether all of the input reached its stdin ([`ToolCommand::output_with_input`]).
    pub input: std::io::Result<()>,
}

impl ToolOutput {
    fn new(out: std::process::Output, input: std::io::Result<()>) -> Self {
        ToolOutput {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            stdout: out.stdout,
            input,
        }
    }

    /// The program exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Lines of stderr reporting a server error (`psql` goes on after one unless told to stop).
    pub fn error_lines(&self) -> impl Iterator<Item = &str> {
        self.stderr.lines().filter(|l| l.contains("ERROR:"))
    }

    /// [`PgToolError::Failed`] for this run: `what` failed, with its exit status and stderr.
    pub fn failed(&self, what: String) -> PgToolError {
        self.failed_with(what, self.status.to_string())
    }

    /// [`PgToolError::Failed`] with `status` said in other words than the exit status.
    pub fn failed_with(&self, what: String, status: String) -> PgToolError {
        PgToolError::Failed {
            what,
            status,
            stderr: self.stderr.clone(),
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

/// `host=… port=… user=… dbname=… application_name=…` for a child program's `--dbname`; never
/// contains the password.
pub fn conninfo(conn: &ConnInfo, application_name: &str) -> String {
    let host = match conn.host() {
        Host::Tcp(h) => h.clone(),
        Host::Unix(p) => p.display().to_string(),
    };
    format!(
        "host={} port={} user={} dbname={} application_name={}",
        conninfo_value(&host),
        conn.port(),
        conninfo_value(conn.user()),
        conninfo_value(conn.dbname()),
        conninfo_value(application_name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_version_from_the_directory() {
        let b = PgBinaries::at(PathBuf::from("/usr/lib/postgresql/15/bin"));
        assert_eq!(b.major, Some(15));
        assert_eq!(
            b.program("psql"),
            Path::new("/usr/lib/postgresql/15/bin/psql")
        );
        assert_eq!(PgBinaries::at(PathBuf::from("/usr/bin")).major, None);
        assert_eq!(PgBinaries::at(PathBuf::from("/opt/pg/bin")).major, None);
    }

    #[test]
    fn conninfo_quotes_values_and_never_holds_the_password() {
        let info = ConnInfo::parse(
            r"host='/tmp/so\'ck' port=5433 user='a\\b' password=s3cret dbname=shop",
        )
        .unwrap();
        let s = conninfo(&info, "walshift-clone");
        assert_eq!(
            s,
            "host='/tmp/so\\'ck' port=5433 user='a\\\\b' dbname='shop' application_name='walshift-clone'"
        );
        assert!(!s.contains("s3cret"));
    }
}
