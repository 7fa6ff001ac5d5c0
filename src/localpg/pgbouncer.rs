//! A throwaway PgBouncer in front of localpg clusters, for the pooler-mode cutover tests,
//! `walshift demo` and `walshift bench cutover --pooler`.
//!
//! A [`PgBouncer`] is the installed `pgbouncer` program (Debian's package) run in the
//! foreground with its own `pgbouncer.ini` in a temporary directory: listening on a free port
//! of 127.0.0.1 and on a socket in that directory, with its pidfile and log there too; the
//! system's `/etc/pgbouncer` and its service are never used. The `[databases]` entries live in a
//! separate file that `pgbouncer.ini` `%include`s ([`PgBouncer::databases_file`]), so a cutover
//! can rewrite only them (temporary file + rename in the same directory) and `RELOAD`.
//!
//! Authentication is `trust` against an `auth_file` naming three users: `postgres` (clients,
//! forwarded as is to the clusters, which trust it on loopback), [`ADMIN_USER`] (the admin
//! console: `PAUSE`, `RELOAD`, `RESUME`) and [`STATS_USER`] (the console's `SHOW` commands only).
//!
//! Like a [`super::Cluster`], the process runs as the unprivileged `postgres` OS user when the
//! caller is root (PgBouncer refuses to run as root), is started from localpg's spawner thread
//! with a parent-death signal, and is stopped (its directory deleted) on drop, also while
//! unwinding from a panic.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{LocalPgError, Result, RunAs, io_err};

/// The admin console user ([`PgBouncer::admin_conn_string`]).
pub const ADMIN_USER: &str = "walshift_admin";
/// The stats-only console user ([`PgBouncer::stats_conn_string`]): `SHOW …` works, `PAUSE`
/// and the other admin commands fail with "admin access needed".
pub const STATS_USER: &str = "walshift_stats";
/// The user clients connect as through the pooler, forwarded to the clusters.
pub const CLIENT_USER: &str = "postgres";

/// Where [`PgBouncer::find_binary`] looks when `pgbouncer` is not on `PATH` (Debian installs
/// it in `/usr/sbin`, which an unprivileged user's `PATH` often lacks).
const DEBIAN_BINARY: &str = "/usr/sbin/pgbouncer";

/// How to configure a [`PgBouncer`]. `new()` gives transaction pooling and no databases.
#[derive(Clone, Debug)]
pub struct PoolerOptions {
    /// Pooler database name -> backend entry text, e.g. `("app", "host=127.0.0.1 port=5433
    /// dbname=postgres")`, written as `app = host=…` lines of the databases file. Default: none.
    pub databases: Vec<(String, String)>,
    /// `pool_mode`. Default `"transaction"`: what a cutover's `PAUSE` is fastest with (it
    /// waits for transactions, not sessions); `"session"` keeps session state (prepared
    /// statements, `SET`) but makes `PAUSE` wait for every client to disconnect.
    pub pool_mode: String,
    /// `default_pool_size`: server connections per database and user. Default 20. Larger pools
    /// serve more concurrent transactions but cost backend connections (localpg's clusters
    /// allow 100).
    pub default_pool_size: u32,
    /// `max_client_conn`. Default 200: enough for pgbench and the tests; each client costs
    /// PgBouncer a file descriptor.
    pub max_client_conn: u32,
    /// `server_login_retry` in seconds: how long PgBouncer waits after a failed backend login
    /// before trying again. Default 1 (PgBouncer's own is 15): tests that stop or move a
    /// backend recover within a second; a real deployment would rather not hammer a backend
    /// that is down.
    pub server_login_retry_secs: u32,
    /// Extra `[pgbouncer]` settings, written after walshift's (so they win). Default: none.
    pub settings: Vec<(String, String)>,
    /// Seconds to wait for PgBouncer to listen. Default 30.
    pub start_timeout_secs: u64,
}

impl Default for PoolerOptions {
    fn default() -> Self {
        PoolerOptions {
            databases: Vec::new(),
            pool_mode: "transaction".into(),
            default_pool_size: 20,
            max_client_conn: 200,
            server_login_retry_secs: 1,
            settings: Vec::new(),
            start_timeout_secs: 30,
        }
    }
}

impl PoolerOptions {
    /// Transaction pooling, no databases.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a `[databases]` entry: clients connecting to database `name` are sent to `entry`
    /// (libpq-style `key=value` text PgBouncer understands: `host`, `port`, `dbname`, …).
    pub fn database(mut self, name: &str, entry: &str) -> Self {
        self.databases.push((name.to_owned(), entry.to_owned()));
        self
    }

    /// Sets `pool_mode` (`session`, `transaction` or `statement`).
    pub fn pool_mode(mut self, mode: &str) -> Self {
        self.pool_mode = mode.to_owned();
        self
    }

    /// Sets `default_pool_size`.
    pub fn default_pool_size(mut self, size: u32) -> Self {
        self.default_pool_size = size;
        self
    }

    /// Adds one `[pgbouncer]` setting.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// A running throwaway PgBouncer. Dropping it stops the process and deletes its files.
pub struct PgBouncer {
    binary: PathBuf,
    run_as: Option<RunAs>,
    // Declared before `dir` so the process stops before its directory is removed.
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

impl std::fmt::Debug for PgBouncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PgBouncer(port={}, dir={})",
            self.port,
            self.dir.path().display()
        )
    }
}

impl PgBouncer {
    /// The `pgbouncer` program: on `PATH`, else Debian's `/usr/sbin/pgbouncer`.
    pub fn find_binary() -> Result<PathBuf> {
        let on_path = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|dir| dir.join("pgbouncer"));
        on_path
            .chain(std::iter::once(PathBuf::from(DEBIAN_BINARY)))
            .find(|p| is_executable(p))
            .ok_or(LocalPgError::PgBouncerNotFound)
    }

    /// Whether PgBouncer is installed (the demo falls back to direct connections without it).
    pub fn available() -> bool {
        Self::find_binary().is_ok()
    }

    /// Writes the configuration and starts PgBouncer; blocks until it listens on its port.
    pub fn start(opts: PoolerOptions) -> Result<PgBouncer> {
        let binary = Self::find_binary()?;
        let databases = databases_text(&opts.databases)?;
        let run_as = super::run_as()?;
        let dir = tempfile::Builder::new()
            .prefix("walshift-pgbouncer-")
            .tempdir_in(std::env::temp_dir())
            .map_err(io_err(&std::env::temp_dir()))?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
            .map_err(io_err(dir.path()))?;
        let mut bouncer = PgBouncer {
            binary,
            run_as,
            child: None,
            dir,
            port: 0,
        };
        write_readable(&bouncer.databases_file(), &databases)?;
        let users: String = [CLIENT_USER, ADMIN_USER, STATS_USER]
            .iter()
            .map(|u| format!("\"{u}\" \"\"\n"))
            .collect();
        write_readable(&bouncer.auth_file(), &users)?;
        if let Some(who) = run_as {
            super::chown_recursive(bouncer.dir.path(), who)?;
        }

        // Another process may take the port between probing and binding: retry with a new one.
        let mut last_err = None;
        for _ in 0..5 {
            bouncer.port = super::free_port()?;
            let config = bouncer.config_text(&opts);
            write_readable(&bouncer.config_path(), &config)?;
            if let Some(who) = run_as {
                super::chown_recursive(&bouncer.config_path(), who)?;
            }
            match bouncer.launch(opts.start_timeout_secs) {
                Ok(()) => return Ok(bouncer),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn config_text(&self, opts: &PoolerOptions) -> String {
        let dir = self.dir.path();
        let settings = [
            ("listen_addr", "127.0.0.1".to_owned()),
            ("listen_port", self.port.to_string()),
            ("unix_socket_dir", dir.display().to_string()),
            ("pidfile", dir.join("pgbouncer.pid").display().to_string()),
            ("logfile", self.log_path().display().to_string()),
            ("auth_type", "trust".into()),
            ("auth_file", self.auth_file().display().to_string()),
            ("admin_users", ADMIN_USER.into()),
            ("stats_users", STATS_USER.into()),
            ("pool_mode", opts.pool_mode.clone()),
            ("default_pool_size", opts.default_pool_size.to_string()),
            ("max_client_conn", opts.max_client_conn.to_string()),
            (
                "server_login_retry",
                opts.server_login_retry_secs.to_string(),
            ),
            // pgjdbc and pg_dump send extra_float_digits; `options` carries -c settings that
            // PgBouncer cannot apply per transaction. Both would otherwise refuse the login.
            (
                "ignore_startup_parameters",
                "extra_float_digits,options".into(),
            ),
        ];
        let mut text = format!(
            "; walshift localpg pgbouncer\n[databases]\n%include {}\n\n[pgbouncer]\n",
            self.databases_file().display()
        );
        for (k, v) in settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .chain(opts.settings.iter().cloned())
        {
            text.push_str(&format!("{k} = {v}\n"));
        }
        text
    }

    fn launch(&mut self, timeout_secs: u64) -> Result<()> {
        let console = self.console_path();
        let out = fs::File::create(&console).map_err(io_err(&console))?;
        let log_start = fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(&self.binary);
        cmd.arg(self.config_path())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(io_err(&console))?)
            .stderr(out);
        if let Some(who) = self.run_as {
            cmd.uid(who.uid).gid(who.gid);
        }
        // SIGTERM is PgBouncer's immediate shutdown.
        let child = super::spawn_with_death_signal(cmd, libc::SIGTERM).map_err(|e| {
            LocalPgError::Command {
                what: format!("starting {}", self.binary.display()),
                detail: e.to_string(),
            }
        })?;
        self.child = Some(child);
        let listening = format!("listening on 127.0.0.1:{}", self.port);
        let socket = self.socket_dir().join(format!(".s.PGSQL.{}", self.port));
        let deadline = Instant::now() + Duration::from_secs(timeout_secs);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(LocalPgError::Command {
                    what: format!("pgbouncer on port {}", self.port),
                    detail: format!("exited with {status}; {}", self.failure_output(log_start)),
                });
            }
            // The unix socket is created after the TCP listener; PgBouncer keeps running with
            // the socket alone if the TCP port was taken meanwhile, hence the log line too.
            if socket.exists() {
                let log = super::tail_from(&self.log_path(), log_start);
                if log.contains(&listening) {
                    return Ok(());
                }
                self.stop();
                return Err(LocalPgError::Command {
                    what: format!("pgbouncer on port {}", self.port),
                    detail: format!("did not listen on TCP; {}", self.failure_output(log_start)),
                });
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(LocalPgError::Command {
                    what: format!("pgbouncer on port {}", self.port),
                    detail: format!(
                        "did not listen within {timeout_secs} s; {}",
                        self.failure_output(log_start)
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn failure_output(&self, log_start: u64) -> String {
        format!(
            "output:\n{}\nlog ({}):\n{}",
            super::tail_from(&self.console_path(), 0),
            self.log_path().display(),
            super::tail_from(&self.log_path(), log_start)
        )
    }

    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            // SIGTERM: PgBouncer's immediate shutdown.
            super::stop_child(child, libc::SIGTERM);
        }
    }

    /// Replaces the databases file with `databases` (temporary file in the same directory,
    /// then rename, as a cutover does) without reloading: send `RELOAD` on the admin console.
    pub fn set_databases(&self, databases: &[(String, String)]) -> Result<()> {
        let text = databases_text(databases)?;
        let path = self.databases_file();
        let tmp = self.dir.path().join("databases.ini.tmp");
        write_readable(&tmp, &text)?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Directory of the unix socket `.s.PGSQL.<port>`.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// `pgbouncer.ini`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("pgbouncer.ini")
    }

    /// The file `pgbouncer.ini` `%include`s under `[databases]`: one `name = entry` line each.
    /// Its directory is writable by the caller, so it can be replaced by a rename; the new file
    /// must be readable by the pooler's OS user (mode 0644 does) before `RELOAD`.
    pub fn databases_file(&self) -> PathBuf {
        self.dir.path().join("databases.ini")
    }

    fn auth_file(&self) -> PathBuf {
        self.dir.path().join("userlist.txt")
    }

    fn console_path(&self) -> PathBuf {
        self.dir.path().join("console.out")
    }

    /// The admin console, as [`ADMIN_USER`]. It speaks the simple query protocol only
    /// (`simple_query`, not `query`).
    pub fn admin_conn_string(&self) -> String {
        self.console_conn_string(ADMIN_USER)
    }

    /// The console as [`STATS_USER`], who may `SHOW` but not run admin commands.
    pub fn stats_conn_string(&self) -> String {
        self.console_conn_string(STATS_USER)
    }

    fn console_conn_string(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=pgbouncer",
            self.port
        )
    }

    /// A client connection through the pooler to its database `db`, as [`CLIENT_USER`].
    pub fn conn_string(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={CLIENT_USER} dbname={db}",
            self.port
        )
    }

    /// PgBouncer's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("pgbouncer.log")
    }

    /// The log's contents (empty if unreadable), for test failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The databases file's text; rejects what would not parse as one `name = entry` line.
fn databases_text(databases: &[(String, String)]) -> Result<String> {
    let mut text = String::new();
    for (name, entry) in databases {
        let bad_name = name.is_empty()
            || name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || "=;#[]\"'".contains(c));
        if bad_name {
            return Err(LocalPgError::Command {
                what: "pgbouncer [databases] entry".into(),
                detail: format!(
                    "database name {name:?} cannot be written unquoted in pgbouncer.ini: use letters, digits, _ . -"
                ),
            });
        }
        if entry.chars().any(|c| c == '\n' || c == '\r') {
            return Err(LocalPgError::Command {
                what: "pgbouncer [databases] entry".into(),
                detail: format!("the entry for {name:?} must be one line"),
            });
        }
        text.push_str(&format!("{name} = {entry}\n"));
    }
    Ok(text)
}

/// Writes `text` to `path`, readable by everyone (the pooler may run as another OS user).
fn write_readable(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(io_err(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(io_err(path))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
