//! PostgreSQL's own programs: where an installation's binaries are ([`PgBinaries`]), and
//! running its client programs (`pg_dump`, `psql`) as children ([`ClientTools`]).
//!
//! One search rule for the whole crate, so that clusters started by `localpg` and the client
//! programs that clone and rehearsal run come from the same installation by default. Other
//! installations (other major versions: docs/versions.md) are found in [`BINDIRS_ENV`] and
//! Debian's `/usr/lib/postgresql/<major>/bin`: [`PgBinaries::for_major`] picks a server of a
//! given major version, [`ClientTools::for_dump`] the `pg_dump` able to dump a given server
//! (never older than it). Passwords reach a
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

    /// No server binaries of the requested major version.
    #[error(
        "no PostgreSQL {major} server binaries found (looked at {BINDIRS_ENV}, `pg_config --bindir` \
         and /usr/lib/postgresql/*/bin; found: {found}); install PostgreSQL {major} (Debian: \
         apt-get install postgresql-{major}; or `bash .ci/run --pg-env`, which installs the \
         versions the tests use) and list its bin directory in {BINDIRS_ENV} as {major}=<dir>"
    )]
    NoServerBinariesFor {
        major: u32,
        /// The majors that were found, e.g. "15 (/usr/lib/postgresql/15/bin)", or "none".
        found: String,
    },

    /// The only `pg_dump` available is older than the server it must dump.
    #[error(
        "{} is PostgreSQL {dump_major}'s pg_dump, older than the source server (PostgreSQL \
         {server_major}): pg_dump cannot dump a server newer than itself. Install the client \
         programs of PostgreSQL {server_major} or newer (Debian: apt-get install \
         postgresql-client-{server_major}) and pass their directory as bindir, or list it in \
         {BINDIRS_ENV} as {server_major}=<dir>",
        program.display()
    )]
    DumpTooOld {
        program: PathBuf,
        dump_major: u32,
        server_major: u32,
    },

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

/// Environment variable naming more PostgreSQL installations than the default one, for other
/// major versions: `:`-separated entries, each `<major>=<bindir>` or just `<bindir>` (its major
/// version is then read from its programs' `--version`), e.g.
/// `14=/opt/pg14/bin:18=/opt/pg18/bin`. `.ci/run --pg-env` prints it for the test matrix.
pub const BINDIRS_ENV: &str = "WALSHIFT_PG_BINDIRS";

/// A PostgreSQL installation: the directory of its programs, found once and passed around.
#[derive(Clone, Debug)]
pub struct PgBinaries {
    /// Directory holding `initdb`, `postgres`, `pg_dump`, `psql`, `pg_recvlogical`, ….
    pub bindir: PathBuf,
    /// The installation's major version, when its directory says it (Debian's
    /// `/usr/lib/postgresql/<major>/bin`) or it was found by version ([`Self::for_major`],
    /// [`Self::installations`]); `None` otherwise ([`Self::probe_major`] asks the programs).
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

    /// Every installation on this machine, each once, with its major version: the entries of
    /// [`BINDIRS_ENV`] in their order, then `pg_config --bindir`, then the
    /// `/usr/lib/postgresql/<major>/bin` directories, newest first. Installations whose major
    /// version cannot be told are left out. An installation may hold only server programs
    /// (`initdb`, `postgres`) or only client programs (`pg_dump`, `psql`).
    pub fn installations() -> Vec<PgBinaries> {
        let mut dirs: Vec<(Option<u32>, PathBuf)> = Vec::new();
        if let Some(list) = std::env::var_os(BINDIRS_ENV) {
            dirs.extend(parse_bindirs(&list.to_string_lossy()));
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            dirs.push((major_of(&dir), dir));
        }
        let mut debian: Vec<(Option<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let major: u32 = e.file_name().to_str()?.parse().ok()?;
                Some((Some(major), e.path().join("bin")))
            })
            .collect();
        debian.sort_by_key(|d| std::cmp::Reverse(d.0));
        dirs.extend(debian);

        let mut seen: Vec<PathBuf> = Vec::new();
        let mut out = Vec::new();
        for (major, bindir) in dirs {
            let Ok(canonical) = fs::canonicalize(&bindir) else {
                continue; // not there
            };
            if seen.contains(&canonical) {
                continue;
            }
            seen.push(canonical);
            let mut bins = PgBinaries { bindir, major };
            bins.major = bins.major.or_else(|| bins.probe_major());
            if bins.major.is_some() {
                out.push(bins);
            }
        }
        out
    }

    /// Server binaries (`initdb` and `postgres`) of PostgreSQL `major`: the first such
    /// installation of [`Self::installations`].
    pub fn for_major(major: u32) -> Result<Self, PgToolError> {
        let all = Self::installations();
        if let Some(b) = all
            .iter()
            .find(|b| b.major == Some(major) && b.has_server())
        {
            return Ok(b.clone());
        }
        let found: Vec<String> = all
            .iter()
            .filter(|b| b.has_server())
            .map(|b| format!("{} ({})", b.major.unwrap_or(0), b.bindir.display()))
            .collect();
        Err(PgToolError::NoServerBinariesFor {
            major,
            found: if found.is_empty() {
                "none".into()
            } else {
                found.join(", ")
            },
        })
    }

    /// Whether the installation has the server programs `initdb` and `postgres`.
    pub fn has_server(&self) -> bool {
        self.program("initdb").is_file() && self.program("postgres").is_file()
    }

    /// The major version the installation's programs report (`postgres`, `pg_dump` or `psql`
    /// with `--version`), whatever its directory is called.
    pub fn probe_major(&self) -> Option<u32> {
        ["postgres", "pg_dump", "psql"].iter().find_map(|name| {
            let program = self.program(name);
            if !program.is_file() {
                return None;
            }
            let out = Command::new(program).arg("--version").output().ok()?;
            out.status.success().then_some(())?;
            parse_version_major(&String::from_utf8_lossy(&out.stdout))
        })
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

/// The entries of a [`BINDIRS_ENV`] value: `(major if given, bindir)`.
fn parse_bindirs(list: &str) -> Vec<(Option<u32>, PathBuf)> {
    list.split(':')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| match e.split_once('=') {
            Some((major, dir)) if major.trim().parse::<u32>().is_ok() => {
                (major.trim().parse().ok(), PathBuf::from(dir.trim()))
            }
            _ => (None, PathBuf::from(e)),
        })
        .collect()
}

/// The major version in a `--version` line: `pg_dump (PostgreSQL) 18.6` → 18,
/// `psql (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` → 15, `postgres (PostgreSQL) 18beta1` → 18.
fn parse_version_major(line: &str) -> Option<u32> {
    let rest = &line[line.find("(PostgreSQL) ")? + "(PostgreSQL) ".len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Of the client installations' majors, which to dump a PostgreSQL `source` server with for
/// loading into a PostgreSQL `target` server: `pg_dump` dumps servers of its own major version
/// and older, and writes SQL for its own major version (and, for what the source uses, older
/// ones). So: the newest one not newer than the target among those not older than the source
/// (the target's own version when it is there), else the oldest one newer than the target.
/// `None` if every one is older than the source.
fn choose_dump_major(available: &[u32], source: u32, target: u32) -> Option<u32> {
    let usable = available.iter().copied().filter(|&m| m >= source);
    let fitting = usable.clone().filter(|&m| m <= target).max();
    fitting.or_else(|| usable.min())
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
    /// The programs' major version, when known ([`Self::for_dump`] knows it).
    major: Option<u32>,
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
            major: None,
        }
    }

    /// Client programs able to dump a server of PostgreSQL `source_major` for loading into one
    /// of PostgreSQL `target_major` (clone's pg_dump and psql).
    ///
    /// `bindir` given: its `pg_dump`, refused ([`PgToolError::DumpTooOld`]) if it reports an
    /// older major version than the source's. Otherwise, of the installations with `pg_dump`
    /// and `psql` ([`PgBinaries::installations`], then `PATH`), the newest not newer than the
    /// target among those not older than the source, else the oldest newer than the target
    /// (its SQL may use what the target lacks: psql then fails loudly);
    /// [`PgToolError::DumpTooOld`] names the newest one found when all are older than the
    /// source. None found at all: `PATH`, and the spawn error says how to install them.
    pub fn for_dump(
        bindir: Option<&Path>,
        source_major: u32,
        target_major: u32,
        install_hint: &'static str,
    ) -> Result<ClientTools, PgToolError> {
        if let Some(dir) = bindir {
            let bins = PgBinaries::at(dir.to_owned());
            let major = bins.probe_major();
            if let Some(dump_major) = major
                && dump_major < source_major
            {
                return Err(PgToolError::DumpTooOld {
                    program: bins.program("pg_dump"),
                    dump_major,
                    server_major: source_major,
                });
            }
            return Ok(ClientTools {
                bindir: Some(dir.to_owned()),
                install_hint,
                major,
            });
        }
        let mut found: Vec<PgBinaries> = PgBinaries::installations();
        found.extend(path_installation());
        let clients: Vec<(u32, PathBuf)> = found
            .into_iter()
            .filter(|b| b.program("pg_dump").is_file() && b.program("psql").is_file())
            .filter_map(|b| Some((b.major?, b.bindir)))
            .collect();
        let majors: Vec<u32> = clients.iter().map(|c| c.0).collect();
        match choose_dump_major(&majors, source_major, target_major) {
            Some(m) => {
                let dir = clients
                    .into_iter()
                    .find(|c| c.0 == m)
                    .map(|c| c.1)
                    .expect("chosen from the list");
                tracing::info!(
                    "pg_dump and psql of PostgreSQL {m} ({}) for a PostgreSQL {source_major} source \
                     and a PostgreSQL {target_major} target",
                    dir.display()
                );
                Ok(ClientTools {
                    bindir: Some(dir),
                    install_hint,
                    major: Some(m),
                })
            }
            None => match clients.into_iter().max_by_key(|c| c.0) {
                Some((dump_major, dir)) => Err(PgToolError::DumpTooOld {
                    program: dir.join("pg_dump"),
                    dump_major,
                    server_major: source_major,
                }),
                None => Ok(ClientTools {
                    bindir: None,
                    install_hint,
                    major: None,
                }),
            },
        }
    }

    /// The programs' major version, when known: chosen by [`Self::for_dump`], or reported by
    /// the given directory's programs.
    pub fn major(&self) -> Option<u32> {
        self.major
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

/// The directory of the `pg_dump` that `PATH` finds, as an installation (major version probed).
fn path_installation() -> Option<PgBinaries> {
    let path = std::env::var_os("PATH")?;
    let dir = std::env::split_paths(&path).find(|d| d.join("pg_dump").is_file())?;
    // Debian's /usr/bin/pg_dump is a wrapper choosing a version by itself: use the real
    // installations instead.
    if fs::read_link(dir.join("pg_dump")).is_ok_and(|t| t.ends_with("pg_wrapper")) {
        return None;
    }
    let mut bins = PgBinaries::at(dir);
    bins.major = bins.major.or_else(|| bins.probe_major());
    bins.major.is_some().then_some(bins)
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

/// `host=… port=… user=… dbname=… application_name=…` for a child program's `--dbname`, plus
/// the TCP keepalive settings walshift's own connections use (so a dump of a vanished server
/// fails as soon as theirs would); never contains the password.
pub fn conninfo(conn: &ConnInfo, application_name: &str) -> String {
    let (host, tcp) = match conn.host() {
        Host::Tcp(h) => (h.clone(), true),
        Host::Unix(p) => (p.display().to_string(), false),
    };
    let mut s = format!(
        "host={} port={} user={} dbname={} application_name={}",
        conninfo_value(&host),
        conn.port(),
        conninfo_value(conn.user()),
        conninfo_value(conn.dbname()),
        conninfo_value(application_name),
    );
    if tcp {
        s.push(' ');
        s.push_str(&conn.keepalives().libpq_options());
    }
    s
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
    fn bindirs_entries_with_and_without_a_major() {
        assert_eq!(
            parse_bindirs("14=/opt/a/bin: /opt/b/bin ::18=/x"),
            vec![
                (Some(14), PathBuf::from("/opt/a/bin")),
                (None, PathBuf::from("/opt/b/bin")),
                (Some(18), PathBuf::from("/x")),
            ]
        );
        assert_eq!(parse_bindirs(""), vec![]);
    }

    #[test]
    fn major_from_version_lines() {
        assert_eq!(parse_version_major("pg_dump (PostgreSQL) 18.6\n"), Some(18));
        assert_eq!(
            parse_version_major("psql (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(
            parse_version_major("postgres (PostgreSQL) 18beta1"),
            Some(18)
        );
        assert_eq!(parse_version_major("something else 3.1"), None);
    }

    #[test]
    fn pg_dump_never_older_than_the_source_and_preferably_the_targets_version() {
        // The target's own version when there.
        assert_eq!(choose_dump_major(&[15, 18], 15, 18), Some(18));
        assert_eq!(choose_dump_major(&[15, 18], 14, 18), Some(18));
        assert_eq!(choose_dump_major(&[15, 18], 15, 15), Some(15));
        // The newest not newer than the target.
        assert_eq!(choose_dump_major(&[15, 16, 18], 14, 17), Some(16));
        // None fits under the target: the oldest newer one.
        assert_eq!(choose_dump_major(&[15, 18], 14, 14), Some(15));
        assert_eq!(choose_dump_major(&[15, 18], 16, 16), Some(18));
        // All older than the source.
        assert_eq!(choose_dump_major(&[14, 15], 16, 18), None);
        assert_eq!(choose_dump_major(&[], 15, 15), None);
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

    #[test]
    fn conninfo_over_tcp_carries_the_keepalives() {
        let info = ConnInfo::parse(
            "host=db.example port=5432 user=u dbname=d keepalives_idle=30 keepalives_count=3",
        )
        .unwrap();
        let s = conninfo(&info, "walshift-clone");
        assert!(s.starts_with("host='db.example' port=5432 "), "{s}");
        assert!(s.contains(" keepalives=1 keepalives_idle=30 "), "{s}");
        assert!(s.contains(" keepalives_count=3"), "{s}");
    }
}
