//! Throwaway local PostgreSQL clusters for tests, the demo, benches and rehearsals (`rehearse`
//! loads a fixture into one). Product code, not a test helper: the same harness runs `walshift
//! demo` on an operator's machine.
//!
//! A [`Cluster`] is a fresh `initdb` in a temporary directory, started with
//! `wal_level=logical`, listening on a free port of 127.0.0.1 and on a socket directory inside
//! that temporary directory. Dropping it stops the server (immediate shutdown) and deletes the
//! directory, also while unwinding from a panic. The server processes are started from one
//! long-lived spawner thread with a parent-death signal, so even a test process killed with
//! SIGKILL takes its clusters down with it.
//!
//! The server is the default installation ([`PgBinaries::find`]: Debian's PostgreSQL 15 on the
//! CI machine) unless [`ClusterOptions::version`] (default: [`VERSION_ENV`]) asks for another
//! major version, found by [`PgBinaries::for_major`] (docs/versions.md).
//!
//! When run as root, the cluster belongs to an unprivileged OS user (`postgres`, created if
//! missing), because PostgreSQL refuses to run as root.
//!
//! [`pgbouncer`] runs a throwaway PgBouncer in front of clusters, with the same machinery.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{SqlContext, SqlError};
use crate::pgtools::{PgBinaries, PgToolError};

pub mod pgbouncer;
pub use pgbouncer::{PgBouncer, PoolerOptions};

/// Failures starting or driving a local throwaway cluster. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalPgError {
    /// No PostgreSQL server binaries on this machine.
    #[error(transparent)]
    Binaries(#[from] PgToolError),

    /// A helper program failed.
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },

    /// The server did not become ready.
    #[error("PostgreSQL on port {port} did not start within {secs} s; server log:\n{log}")]
    StartTimeout { port: u16, secs: u64, log: String },

    /// File system trouble in the cluster directory.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A SQL statement issued by the localpg failed.
    #[error(transparent)]
    Sql(#[from] SqlError),

    /// No PgBouncer on this machine ([`PgBouncer::find_binary`]).
    #[error(
        "pgbouncer not found on PATH nor at /usr/sbin/pgbouncer: install the Debian package \
         `pgbouncer` (apt-get install pgbouncer; .ci/run does)"
    )]
    PgBouncerNotFound,
}

type Result<T> = std::result::Result<T, LocalPgError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LocalPgError + '_ {
    move |source| LocalPgError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Environment variable choosing the PostgreSQL major version of the clusters whose options do
/// not choose one, e.g. `WALSHIFT_PG_VERSION=17` to run tests on 17; its binaries must be
/// findable ([`crate::pgtools::BINDIRS_ENV`]). Unset: the default installation.
pub const VERSION_ENV: &str = "WALSHIFT_PG_VERSION";

/// The major version [`VERSION_ENV`] asks for: `Ok(None)` when unset or empty.
fn env_version() -> Result<Option<u32>> {
    match std::env::var(VERSION_ENV) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| LocalPgError::Command {
                what: VERSION_ENV.into(),
                detail: format!("{v:?} is not a PostgreSQL major version (e.g. 17); unset it for the default installation"),
            }),
        Err(_) => Ok(None),
    }
}

/// How to build a cluster. `Default` gives a logical-replication-ready server.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` settings, applied after walshift's defaults (so they win).
    /// Default: none.
    pub settings: Vec<(String, String)>,
    /// Seconds to wait for the server to accept connections. Default: 60.
    pub start_timeout_secs: u64,
    /// Serve TLS (`ssl = on`) with these PEM files. Default: none (plain text only).
    pub tls: Option<ServerTls>,
    /// Which PostgreSQL runs the server. Default: [`ServerVersion::FromEnv`]. Trade-off:
    /// another version exercises what differs between versions, the default installation is
    /// what the whole suite is known to pass on.
    pub version: ServerVersion,
}

/// Which PostgreSQL installation a cluster runs ([`ClusterOptions::version`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerVersion {
    /// The major version [`VERSION_ENV`] names if set, else the default installation.
    #[default]
    FromEnv,
    /// The default installation ([`PgBinaries::find`]), whatever [`VERSION_ENV`] says.
    DefaultInstallation,
    /// PostgreSQL `major`, its binaries found by [`PgBinaries::for_major`] (starting fails,
    /// naming how to install them, when they are absent).
    Major(u32),
}

/// A server certificate and key, and optionally the CA that client certificates must be
/// signed by (`ssl_ca_file`, for `hostssl … cert` lines), all PEM. Tests generate them.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_ca_pem: Option<String>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls(..)")
    }
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            settings: Vec::new(),
            start_timeout_secs: 60,
            tls: None,
            version: ServerVersion::FromEnv,
        }
    }
}

impl ClusterOptions {
    /// Adds one `postgresql.conf` setting.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Serves TLS with `tls`.
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Runs PostgreSQL `major` (`None`: the default installation), whatever [`VERSION_ENV`]
    /// says.
    pub fn version(mut self, major: Option<u32>) -> Self {
        self.version = match major {
            Some(m) => ServerVersion::Major(m),
            None => ServerVersion::DefaultInstallation,
        };
        self
    }

    /// The major version to run, `None` for the default installation.
    fn major(&self) -> Result<Option<u32>> {
        match self.version {
            ServerVersion::FromEnv => env_version(),
            ServerVersion::DefaultInstallation => Ok(None),
            ServerVersion::Major(m) => Ok(Some(m)),
        }
    }
}

/// `postgresql.conf` settings that depend on the server's major version (after walshift's
/// defaults, before the caller's). Every default setting localpg writes exists with the same
/// meaning in 14–18; what differs are initdb's and the server's defaults:
/// - 18: `io_method = worker` starts 3 I/O worker processes per cluster; 1 is enough for a
///   throwaway cluster on a 2-core machine (tests start many clusters at once).
fn version_settings(major: Option<u32>) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if major.is_some_and(|m| m >= 18) {
        out.push(("io_workers", "1".to_owned()));
    }
    out
}

/// The OS identity that owns and runs a cluster.
#[derive(Clone, Copy, Debug)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// Root cannot run PostgreSQL: pick (or create) the unprivileged `postgres` user.
fn run_as() -> Result<Option<RunAs>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    if let Some(u) = lookup_user("postgres") {
        return Ok(Some(u));
    }
    let out = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "postgres",
        ])
        .output()
        .map_err(|e| LocalPgError::Command {
            what: "useradd postgres".into(),
            detail: e.to_string(),
        })?;
    // A concurrent test may have created it first; only the lookup decides.
    lookup_user("postgres")
        .map(Some)
        .ok_or_else(|| LocalPgError::Command {
            what: "useradd postgres".into(),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
}

fn lookup_user(name: &str) -> Option<RunAs> {
    let cname = CString::new(name).ok()?;
    // SAFETY: getpwnam returns a pointer into static storage or null; we copy out at once.
    // Calls are serialised by USER_LOCK because the storage is shared.
    static USER_LOCK: Mutex<()> = Mutex::new(());
    let _g = USER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Some(RunAs { uid, gid })
}

fn chown_recursive(path: &Path, who: RunAs) -> Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL");
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::chown(c.as_ptr(), who.uid, who.gid) } != 0 {
        return Err(io_err(path)(std::io::Error::last_os_error()));
    }
    if path.is_dir() {
        for entry in fs::read_dir(path).map_err(io_err(path))? {
            let entry = entry.map_err(io_err(path))?;
            chown_recursive(&entry.path(), who)?;
        }
    }
    Ok(())
}

/// A request to the spawner thread: a command to start, and where to send the child.
type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Server processes are spawned from one thread that lives as long as the process, so their
/// parent-death signal (which Linux ties to the spawning *thread*) fires only when the whole
/// test process goes away.
fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("walshift-localpg-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn localpg thread");
        Mutex::new(tx)
    })
}

fn spawn_tied_to_process(cmd: Command) -> std::io::Result<Child> {
    spawn_with_death_signal(cmd, libc::SIGQUIT)
}

/// Spawns `cmd` from the spawner thread; the child gets `signal` when the process dies.
fn spawn_with_death_signal(mut cmd: Command, signal: libc::c_int) -> std::io::Result<Child> {
    // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, tx))
        .expect("spawner alive");
    rx.recv().expect("spawner replies")
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io_err(Path::new("127.0.0.1:0")))?;
    let port = l
        .local_addr()
        .map_err(io_err(Path::new("127.0.0.1:0")))?
        .port();
    Ok(port)
}

/// A running throwaway PostgreSQL server. Dropping it stops the server and deletes its files.
pub struct Cluster {
    bins: PgBinaries,
    run_as: Option<RunAs>,
    // Declared before `dir` so the server stops before its directory is removed.
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Cluster(port={}, dir={})",
            self.port,
            self.dir.path().display()
        )
    }
}

impl Cluster {
    /// Creates and starts a cluster; blocks until it accepts connections.
    pub fn start(opts: ClusterOptions) -> Result<Cluster> {
        let bins = match opts.major()? {
            Some(major) => PgBinaries::for_major(major)?,
            None => PgBinaries::find()?,
        };
        let run_as = run_as()?;
        let dir = tempfile::Builder::new()
            .prefix("walshift-pg-")
            .tempdir_in(std::env::temp_dir())
            .map_err(io_err(&std::env::temp_dir()))?;
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        fs::create_dir(&sock).map_err(io_err(&sock))?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
            .map_err(io_err(dir.path()))?;
        if let Some(who) = run_as {
            chown_recursive(dir.path(), who)?;
        }

        let mut initdb = Command::new(bins.program("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ])
            .current_dir(dir.path())
            .stdin(Stdio::null());
        if let Some(who) = run_as {
            initdb.uid(who.uid).gid(who.gid);
        }
        let out = initdb.output().map_err(|e| LocalPgError::Command {
            what: "initdb".into(),
            detail: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(LocalPgError::Command {
                what: "initdb".into(),
                detail: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }

        let mut conf = String::from("\n# walshift localpg\n");
        let defaults = [
            ("listen_addresses", "'127.0.0.1'".to_owned()),
            ("unix_socket_directories", format!("'{}'", sock.display())),
            ("wal_level", "logical".into()),
            ("max_wal_senders", "20".into()),
            ("max_replication_slots", "20".into()),
            ("max_connections", "100".into()),
            ("max_prepared_transactions", "10".into()),
            ("shared_buffers", "128MB".into()),
            ("logging_collector", "off".into()),
            ("log_min_messages", "warning".into()),
        ];
        for (k, v) in defaults.iter().cloned().chain(version_settings(bins.major)) {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        if let Some(tls) = &opts.tls {
            let mut files = vec![
                ("ssl_cert_file", "server.crt", &tls.cert_pem),
                ("ssl_key_file", "server.key", &tls.key_pem),
            ];
            if let Some(ca) = &tls.client_ca_pem {
                files.push(("ssl_ca_file", "client-ca.crt", ca));
            }
            conf.push_str("ssl = on\n");
            for (setting, name, pem) in files {
                let path = data.join(name);
                fs::write(&path, pem).map_err(io_err(&path))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                    .map_err(io_err(&path))?;
                if let Some(who) = run_as {
                    chown_recursive(&path, who)?;
                }
                conf.push_str(&format!("{setting} = '{name}'\n"));
            }
        }
        for (k, v) in &opts.settings {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let conf_path = data.join("postgresql.auto.conf");
        let mut auto = fs::read_to_string(&conf_path).unwrap_or_default();
        auto.push_str(&conf);
        fs::write(&conf_path, auto).map_err(io_err(&conf_path))?;

        let mut cluster = Cluster {
            bins,
            run_as,
            child: None,
            dir,
            port: 0,
        };
        // Another process may take the port between probing and binding: retry with a new one.
        let mut last_err = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.launch(&opts) {
                Ok(()) => return Ok(cluster),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn launch(&mut self, opts: &ClusterOptions) -> Result<()> {
        let log_path = self.log_path();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        if let Some(who) = self.run_as {
            chown_recursive(&log_path, who)?;
        }
        let mut cmd = Command::new(self.bins.program("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err(&log_path))?)
            .stderr(log);
        if let Some(who) = self.run_as {
            cmd.uid(who.uid).gid(who.gid);
        }
        let child = spawn_tied_to_process(cmd).map_err(|e| LocalPgError::Command {
            what: "starting postgres".into(),
            detail: e.to_string(),
        })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(opts.start_timeout_secs);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(LocalPgError::Command {
                    what: "postgres".into(),
                    detail: format!(
                        "exited with {status}; server log:\n{}",
                        tail_from(&log_path, log_start)
                    ),
                });
            }
            if self.ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(LocalPgError::StartTimeout {
                    port: self.port,
                    secs: opts.start_timeout_secs,
                    log: tail_from(&log_path, log_start),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server writes "ready" into postmaster.pid once it accepts connections.
    fn ready(&self) -> bool {
        fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .map(|s| {
                s.lines()
                    .nth(7)
                    .map(|l| l.trim() == "ready")
                    .unwrap_or(false)
            })
            .unwrap_or(false)
    }

    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            // SIGQUIT = immediate shutdown: the data is thrown away anyway.
            stop_child(child, libc::SIGQUIT);
        }
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Socket directory.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// The server log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The server's major version (`server_version_num / 10000`), read from the running server.
    pub async fn major_version(&self) -> Result<u32> {
        let client = self.connect("postgres").await?;
        let v: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .sql_context("reading server_version_num")?
            .get(0);
        Ok((v / 10000) as u32)
    }

    /// The installation this cluster runs from (for `pg_dump`, `pg_recvlogical`, `pgbench`;
    /// some installations of other versions hold only the server programs).
    pub fn binaries(&self) -> &PgBinaries {
        &self.bins
    }

    /// A key=value connection string over TCP as the superuser `postgres`.
    pub fn conn_string(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        )
    }

    /// Opens a SQL session as the superuser. The connection task runs on the current runtime.
    pub async fn connect(&self, dbname: &str) -> Result<tokio_postgres::Client> {
        let (client, conn) =
            tokio_postgres::connect(&self.conn_string(dbname), tokio_postgres::NoTls)
                .await
                .with_sql_context(|| format!("connecting to test cluster on port {}", self.port))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Runs SQL (several statements allowed) as the superuser.
    pub async fn execute(&self, dbname: &str, sql: &str) -> Result<()> {
        let client = self.connect(dbname).await?;
        client
            .batch_execute(sql)
            .await
            .with_sql_context(|| format!("running {sql:?}"))?;
        Ok(())
    }

    /// Creates a database.
    pub async fn create_database(&self, name: &str) -> Result<()> {
        self.execute(
            "postgres",
            &format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")),
        )
        .await
    }

    /// Replaces `pg_hba.conf` with `lines` and reloads the configuration.
    pub fn set_hba(&self, lines: &str) -> Result<()> {
        let path = self.data_dir().join("pg_hba.conf");
        fs::write(&path, lines).map_err(io_err(&path))?;
        self.reload()
    }

    /// Sends SIGHUP so the server rereads its configuration files, then waits briefly for it.
    pub fn reload(&self) -> Result<()> {
        if let Some(child) = &self.child {
            // SAFETY: signalling our own child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGHUP);
            }
        }
        // The postmaster handles SIGHUP asynchronously; new connections see the change soon after.
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }
}

/// How [`Cluster::stop_server`] shuts the server down: PostgreSQL's shutdown modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownMode {
    /// SIGTERM: no new sessions; waits for every client to disconnect.
    Smart,
    /// SIGINT: ends every session ("terminating connection due to administrator command"),
    /// walsenders after sending what they have, then a shutdown checkpoint.
    Fast,
    /// SIGQUIT: stops at once, as a crash; the next start runs crash recovery.
    Immediate,
}

/// Stopping and starting a cluster's server under running clients, for tests of what survives
/// a restart. The cluster keeps its files and its port while stopped.
impl Cluster {
    /// Shuts the server down in `mode` and waits until it has exited (at most a minute: a
    /// smart shutdown waits for its clients). Stopping a stopped server does nothing.
    pub fn stop_server(&mut self, mode: ShutdownMode) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let signal = match mode {
            ShutdownMode::Smart => libc::SIGTERM,
            ShutdownMode::Fast => libc::SIGINT,
            ShutdownMode::Immediate => libc::SIGQUIT,
        };
        // SAFETY: sending a signal to our own child.
        unsafe {
            libc::kill(child.id() as libc::pid_t, signal);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    return Err(LocalPgError::Command {
                        what: format!("stopping postgres on port {} ({mode:?})", self.port),
                        detail: "the server did not exit within 60 s".into(),
                    });
                }
                Err(e) => {
                    return Err(LocalPgError::Command {
                        what: format!("stopping postgres on port {}", self.port),
                        detail: e.to_string(),
                    });
                }
            }
        }
        self.child = None;
        // An immediate shutdown leaves postmaster.pid (saying "ready") behind: the next start
        // must not take it for its own readiness.
        let pid_file = self.data_dir().join("postmaster.pid");
        match fs::remove_file(&pid_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&pid_file)(e)),
            _ => Ok(()),
        }
    }

    /// Starts a stopped server again, on the same port and data directory; blocks until it
    /// accepts connections (after crash recovery, following an immediate shutdown). Starting a
    /// running server does nothing.
    pub fn start_server(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        self.launch(&ClusterOptions::default())
    }

    /// [`Cluster::stop_server`] in `mode`, then [`Cluster::start_server`].
    pub fn restart(&mut self, mode: ShutdownMode) -> Result<()> {
        self.stop_server(mode)?;
        self.start_server()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail_from(path: &Path, offset: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.seek(SeekFrom::Start(offset));
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Sends `signal` to a server process of ours and waits up to 10 s for it to exit, then kills
/// it.
fn stop_child(mut child: Child, signal: libc::c_int) {
    // SAFETY: sending a signal to our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
