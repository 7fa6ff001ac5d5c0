//! PgBouncer as the fence and the switch (`--pooler`): clients see a pause, not an error.
//!
//! walshift talks to PgBouncer's admin console (`dbname=pgbouncer`, a user in `admin_users`):
//! - **preflight** ([`check`]): the user is an admin; the pooler's database entry exists, uses
//!   transaction (or statement) pooling, is not paused, and points at the source (host, port
//!   and database as `SHOW DATABASES` reports them); the databases file holds exactly one entry
//!   for it, matching what PgBouncer runs, is writable, and is what PgBouncer reads
//!   (`pgbouncer.ini` itself or a file it `%include`s). Nothing is paused until all of it passes.
//! - **fence** ([`Pooler::pause`]): `PAUSE <db>` — PgBouncer waits for the transactions in
//!   flight, then queues every new one. The read-only fence may still follow, for clients that
//!   bypass the pooler (its terminations hit only idle server connections by then).
//! - **switch** ([`Pooler::repoint`], then [`Pooler::resume`]): the entry is rewritten to point
//!   at the copy (temporary file + rename, owner and mode kept, every other line untouched),
//!   `RELOAD`, `SHOW DATABASES` must show the copy, server connections still open to the source
//!   are closed (`RECONNECT <db>`), then `RESUME <db>`: the queued transactions run on the copy.
//! - **abort** before the switch ([`resume_after_abort`]): `RESUME <db>` on the unchanged entry.
//!
//! **Contract:** before `PAUSE` is sent, `<buffer>/cutover-pooler.json` ([`PauseState`]) records
//! the database, the file and both entries, durably; it is removed only once `RESUME` was
//! acknowledged. A cutover that died with it present is undone by the next one before anything
//! else ([`leftover`]: `RESUME`, the entry untouched) when its switch never started; after a
//! started switch the operator's word decides, as for the read-only fence (`--resume-after-switch`
//! points the entry at the copy and resumes; `--unfence-after-failed-switch` puts the recorded
//! entry back and resumes).

pub mod entry;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::conn::ConnInfo;
use entry::{Entry, EntryError};

/// Name of the pause record in the buffer directory.
pub const STATE_FILE: &str = "cutover-pooler.json";

/// How cutover reaches and drives PgBouncer. Every field is required unless it says otherwise.
#[derive(Clone, Debug)]
pub struct PoolerConfig {
    /// PgBouncer's admin console: `dbname=pgbouncer` as a user listed in `admin_users`.
    pub admin: ConnInfo,
    /// The pooler's name for the database: the `[databases]` entry the application connects to.
    pub database: String,
    /// The file holding that entry: `pgbouncer.ini` itself or a file it `%include`s. Rewritten
    /// at the switch; walshift (or the user it runs as) must be able to write it and its
    /// directory.
    pub databases_file: PathBuf,
    /// The entry written at the switch. Default: the current entry with the target's host,
    /// port and dbname (its user, password, pool_size, … kept). Set it when the copy needs
    /// other credentials or pool settings.
    pub target_entry: Option<String>,
}

/// Pooler failures. Each says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolerError {
    #[error(
        "cannot reach PgBouncer's admin console ({target}): {source}. Check --pooler (dbname=pgbouncer, a user in admin_users)"
    )]
    Connect {
        target: String,
        #[source]
        source: Box<crate::Error>,
    },
    #[error(
        "PgBouncer's admin console ({target}) refused {command:?}: {source}. PgBouncer's log says why; \
         SHOW DATABASES in the admin console shows where the pool points and whether it is paused"
    )]
    Command {
        target: String,
        command: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "user {user:?} is not a PgBouncer admin (admin_users = {admin_users:?}): it could not PAUSE or RESUME. \
         Add it to admin_users and RELOAD, or connect --pooler as an admin user"
    )]
    NotAdmin { user: String, admin_users: String },
    #[error(
        "PgBouncer has no database {name:?} (it has: {known}). Pass the pooler's name for the database with --pooler-database"
    )]
    NoDatabase { name: String, known: String },
    #[error(
        "PgBouncer's database {name:?} uses {mode} pooling: PAUSE would wait for every client to disconnect. \
         The pooler mode needs pool_mode = transaction (or statement) for it"
    )]
    PoolMode { name: String, mode: String },
    #[error(
        "PgBouncer's database {name:?} is already paused, and no cutover of this buffer paused it: someone else \
         holds its clients. RESUME {name} in the admin console once that is over, then run cutover again"
    )]
    AlreadyPaused { name: String },
    #[error(
        "PgBouncer's database {name:?} points at {pooler}, not at the source ({source_db}): refusing to pause traffic \
         that does not go to the source. Check --pooler-database and --source"
    )]
    NotTheSource {
        name: String,
        pooler: String,
        source_db: String,
    },
    #[error(
        "PgBouncer's database {name:?} already points at the target ({target}): the switch was done already \
         (by a previous cutover or by hand). Check where traffic goes; the journal in the buffer says what walshift did"
    )]
    AlreadyTarget { name: String, target: String },
    #[error("{path}: {what}: {source}")]
    File {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} {source}")]
    Entry {
        path: PathBuf,
        #[source]
        source: EntryError,
    },
    #[error(
        "{path}: its entry for {name:?} ({file}) is not what PgBouncer runs ({running}): RELOAD PgBouncer after \
         editing it, or point --pooler-databases-file at the file PgBouncer reads"
    )]
    FileNotRunning {
        path: PathBuf,
        name: String,
        file: String,
        running: String,
    },
    #[error(
        "{path} is not read by PgBouncer: its configuration {conffile} neither is that file nor %includes it. \
         Point --pooler-databases-file at the file holding the [databases] entry"
    )]
    NotIncluded { path: PathBuf, conffile: String },
    #[error("--pooler-target-entry: {0}")]
    TargetEntry(String),
    #[error(
        "PAUSE {name} did not complete within {waited:?}: a client transaction through the pooler is still \
         running. Find it (SHOW CLIENTS / pg_stat_activity); cutover resumed the pool and aborted"
    )]
    PauseTimeout { name: String, waited: Duration },
    #[error(
        "after RELOAD, PgBouncer's database {name:?} points at {shows}, not at the target ({target}): the file \
         change did not take. Nothing was resumed: the pool is still paused"
    )]
    NotRepointed {
        name: String,
        shows: String,
        target: String,
    },
    #[error(
        "this buffer's cutover {cutover_id} left PgBouncer's database {name:?} paused ({STATE_FILE}), and this run has \
         no --pooler: run it with the same --pooler flags (it resumes the pool first), or RESUME {name} in the \
         admin console and remove {STATE_FILE}"
    )]
    LeftPausedWithoutPooler { cutover_id: String, name: String },
}

type Result<T> = std::result::Result<T, PoolerError>;

/// What `SHOW DATABASES` says about one database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolerDatabase {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub database: Option<String>,
    /// The entry's own pool_mode (none: the global one).
    pub pool_mode: Option<String>,
    pub paused: bool,
}

impl PoolerDatabase {
    /// Where an entry's text points (host, port, dbname; the rest unknown).
    fn from_entry(e: &Entry) -> PoolerDatabase {
        PoolerDatabase {
            host: e.get("host").map(str::to_owned),
            port: e.get("port").and_then(|p| p.parse().ok()),
            database: e.get("dbname").map(str::to_owned),
            pool_mode: None,
            paused: false,
        }
    }

    fn describe(&self) -> String {
        format!(
            "host={} port={} dbname={}",
            self.host.as_deref().unwrap_or("(default)"),
            self.port.map_or("(default)".into(), |p| p.to_string()),
            self.database.as_deref().unwrap_or("(default)")
        )
    }
}

/// A session on PgBouncer's admin console (simple query protocol only, as it requires).
pub struct Admin {
    client: Client,
    target: String,
}

type AdminRow = Vec<(String, Option<String>)>;

impl Admin {
    pub async fn connect(info: &ConnInfo) -> Result<Admin> {
        let target = info.redacted();
        let client = info
            .with_application_name("walshift-cutover")
            .connect()
            .await
            .map_err(|e| PoolerError::Connect {
                target: target.clone(),
                source: Box::new(e),
            })?;
        Ok(Admin { client, target })
    }

    async fn query(&self, command: &str) -> Result<Vec<AdminRow>> {
        let messages =
            self.client
                .simple_query(command)
                .await
                .map_err(|source| PoolerError::Command {
                    target: self.target.clone(),
                    command: command.to_owned(),
                    source,
                })?;
        Ok(messages
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(
                    r.columns()
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (c.name().to_owned(), r.get(i).map(str::to_owned)))
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }

    /// Runs an admin command (`PAUSE`, `RESUME`, `RELOAD`, `RECONNECT`).
    pub async fn run(&self, command: &str) -> Result<()> {
        self.query(command).await.map(drop)
    }

    /// `SHOW CONFIG`'s value of `key`.
    pub async fn config(&self, key: &str) -> Result<Option<String>> {
        let rows = self.query("SHOW CONFIG").await?;
        Ok(rows.into_iter().find_map(|r| {
            let is_key = field(&r, "key").is_some_and(|k| k == key);
            is_key
                .then(|| field(&r, "value").map(str::to_owned))
                .flatten()
        }))
    }

    /// `SHOW DATABASES`: every database name, and the row of `name`.
    pub async fn database(&self, name: &str) -> Result<(Vec<String>, Option<PoolerDatabase>)> {
        let rows = self.query("SHOW DATABASES").await?;
        let names = rows
            .iter()
            .filter_map(|r| field(r, "name").map(str::to_owned))
            .collect();
        let db = rows
            .iter()
            .find(|r| field(r, "name") == Some(name))
            .map(|r| PoolerDatabase {
                host: field(r, "host")
                    .filter(|h| !h.is_empty())
                    .map(str::to_owned),
                port: field(r, "port").and_then(|p| p.parse().ok()),
                database: field(r, "database").map(str::to_owned),
                pool_mode: field(r, "pool_mode")
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned),
                paused: field(r, "paused").is_some_and(|p| p == "1"),
            });
        Ok((names, db))
    }

    /// `SHOW POOLS` for `name`: clients waiting for a server connection, and the longest
    /// any of them has waited (`maxwait` + `maxwait_us`).
    pub async fn waiting(&self, name: &str) -> Result<(u64, Duration)> {
        let rows = self.query("SHOW POOLS").await?;
        let num = |r: &AdminRow, c: &str| field(r, c).and_then(|v| v.parse::<u64>().ok());
        let mut clients = 0;
        let mut longest = Duration::ZERO;
        for r in rows.iter().filter(|r| field(r, "database") == Some(name)) {
            clients += num(r, "cl_waiting").unwrap_or(0);
            let wait = Duration::from_secs(num(r, "maxwait").unwrap_or(0))
                + Duration::from_micros(num(r, "maxwait_us").unwrap_or(0));
            longest = longest.max(wait);
        }
        Ok((clients, longest))
    }

    /// Server connections PgBouncer holds for `name` to `host:port`.
    pub async fn servers_to(&self, name: &str, host: &str, port: u16) -> Result<usize> {
        let rows = self.query("SHOW SERVERS").await?;
        Ok(rows
            .iter()
            .filter(|r| {
                field(r, "database") == Some(name)
                    && field(r, "addr") == Some(host)
                    && field(r, "port").and_then(|p| p.parse::<u16>().ok()) == Some(port)
            })
            .count())
    }
}

fn field<'a>(row: &'a AdminRow, name: &str) -> Option<&'a str> {
    row.iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.as_deref())
}

/// A database name as the admin console parses it: bare when lower-case letters, digits and
/// underscores, double-quoted otherwise.
pub fn admin_ident(name: &str) -> String {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        name.to_owned()
    } else {
        crate::sql::quote_ident(name)
    }
}

/// Where a connection string points, as the pooler's entries say it: (host, port, dbname).
fn endpoint(info: &ConnInfo) -> (String, u16, String) {
    let host = match info.host() {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
    };
    (host, info.port(), info.dbname().to_owned())
}

/// Whether two host spellings are the same server: equal, or resolving to a common address.
async fn same_host(a: &str, b: &str, port: u16) -> bool {
    if a.eq_ignore_ascii_case(b) {
        return true;
    }
    if a.starts_with('/') || b.starts_with('/') {
        return false;
    }
    let resolve = |h: &str| {
        let h = h.to_owned();
        async move {
            tokio::net::lookup_host((h.as_str(), port))
                .await
                .map(|it| it.map(|s| s.ip()).collect::<Vec<_>>())
                .unwrap_or_default()
        }
    };
    let (ra, rb) = (resolve(a).await, resolve(b).await);
    ra.iter().any(|x| rb.contains(x))
}

/// Whether the pooler's row points at `info`.
async fn points_at(db: &PoolerDatabase, name: &str, info: &ConnInfo) -> bool {
    let (host, port, dbname) = endpoint(info);
    db.port.unwrap_or(5432) == port
        && db.database.as_deref().unwrap_or(name) == dbname
        && same_host(db.host.as_deref().unwrap_or("localhost"), &host, port).await
}

/// The pause record: what undoing or completing a pause needs, durable before `PAUSE`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PauseState {
    pub cutover_id: String,
    /// The pooler's database name.
    pub database: String,
    pub databases_file: PathBuf,
    /// The entry's text before the switch (what `--unfence-after-failed-switch` puts back).
    pub entry_before: String,
    /// The entry's text the switch writes.
    pub entry_after: String,
}

impl PauseState {
    pub fn path(buffer_dir: &Path) -> PathBuf {
        buffer_dir.join(STATE_FILE)
    }

    pub fn read(buffer_dir: &Path) -> Result<Option<PauseState>> {
        let path = Self::path(buffer_dir);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| PoolerError::File {
                    path,
                    what: "unreadable pause record (it says which pool a cutover paused; RESUME it by hand and move the file aside)",
                    source: std::io::Error::other(e),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(PoolerError::File {
                path,
                what: "reading the pause record",
                source,
            }),
        }
    }

    fn write(&self, buffer_dir: &Path) -> Result<()> {
        let path = Self::path(buffer_dir);
        let body = serde_json::to_vec_pretty(self).expect("serializable");
        super::journal::write_durable(&path, &body).map_err(|source| PoolerError::File {
            path,
            what: "writing the pause record",
            source,
        })
    }

    pub fn remove(buffer_dir: &Path) -> Result<()> {
        let path = Self::path(buffer_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(PoolerError::File {
                path,
                what: "removing the pause record",
                source,
            }),
        }
    }
}

/// What preflight found: the admin session and both entries. Drives the window.
pub struct Pooler {
    admin: Admin,
    config: PoolerConfig,
    before: Entry,
    after: Entry,
    /// When `PAUSE` was acknowledged.
    paused_at: Option<Instant>,
}

/// What [`Pooler::resume`] saw.
#[derive(Clone, Copy, Debug)]
pub struct Resumed {
    /// From `PAUSE` sent to `RESUME` acknowledged.
    pub paused: Option<Duration>,
    /// Clients queued just before `RESUME` (`SHOW POOLS` cl_waiting; none if it failed).
    pub clients_waiting: Option<u64>,
    /// The longest any of them had waited by then (`SHOW POOLS` maxwait).
    pub longest_wait: Option<Duration>,
}

/// What the report says about the pooler.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PoolerReport {
    /// The pooler's database name.
    pub database: String,
    /// The entry before the switch (password masked).
    pub entry_before: String,
    /// The entry the switch wrote (password masked).
    pub entry_after: String,
    /// How long `PAUSE` waited for the transactions in flight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_wait_secs: Option<f64>,
    /// From `PAUSE` sent to `RESUME` acknowledged: the longest a client could have waited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused_secs: Option<f64>,
    /// Clients PgBouncer held in its queue just before `RESUME`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients_waiting: Option<u64>,
    /// The longest any held client had waited just before `RESUME` (`SHOW POOLS` maxwait):
    /// the client-visible stall PgBouncer measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub longest_client_wait_secs: Option<f64>,
    /// Whether the pool was resumed (on the copy after a switch, on the source after an abort).
    pub resumed: bool,
}

fn file_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> PoolerError + 'a {
    move |source| PoolerError::File {
        path: path.to_owned(),
        what,
        source,
    }
}

/// Preflight: every requirement of the pooler mode, checked with nothing paused.
/// `warnings` gets what could not be checked.
pub async fn check(
    config: &PoolerConfig,
    source: &ConnInfo,
    target: &ConnInfo,
    warnings: &mut Vec<String>,
) -> Result<Pooler> {
    let admin = Admin::connect(&config.admin).await?;
    let user = config.admin.user().to_owned();
    let admin_users = admin.config("admin_users").await?.unwrap_or_default();
    if !admin_users
        .split([',', ' '])
        .any(|u| !u.is_empty() && u == user)
    {
        return Err(PoolerError::NotAdmin { user, admin_users });
    }
    let name = &config.database;
    let (names, db) = admin.database(name).await?;
    let Some(db) = db else {
        return Err(PoolerError::NoDatabase {
            name: name.clone(),
            known: names
                .into_iter()
                .filter(|n| n != "pgbouncer")
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let mode = match &db.pool_mode {
        Some(m) => m.clone(),
        None => admin
            .config("pool_mode")
            .await?
            .unwrap_or_else(|| "session".into()),
    };
    if mode == "session" {
        return Err(PoolerError::PoolMode {
            name: name.clone(),
            mode,
        });
    }
    let at_source = points_at(&db, name, source).await;
    if !at_source && points_at(&db, name, target).await {
        return Err(PoolerError::AlreadyTarget {
            name: name.clone(),
            target: target.redacted(),
        });
    }
    if !at_source {
        return Err(PoolerError::NotTheSource {
            name: name.clone(),
            pooler: db.describe(),
            source_db: source.redacted(),
        });
    }
    if db.paused {
        return Err(PoolerError::AlreadyPaused { name: name.clone() });
    }

    let path = &config.databases_file;
    let text =
        std::fs::read_to_string(path).map_err(file_err(path, "reading the databases file"))?;
    let before = entry::find(&text, name).map_err(|source| PoolerError::Entry {
        path: path.clone(),
        source,
    })?;
    if !points_at(&PoolerDatabase::from_entry(&before), name, source).await {
        return Err(PoolerError::FileNotRunning {
            path: path.clone(),
            name: name.clone(),
            file: before.redacted(),
            running: db.describe(),
        });
    }
    // Writable: the file (opened for append, nothing written) and its directory (a probe file).
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(file_err(
            path,
            "cannot write the databases file (the switch rewrites its entry)",
        ))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    tempfile::NamedTempFile::new_in(dir).map_err(file_err(
        dir,
        "cannot create a file in the databases file's directory (the switch writes a new file and renames it)",
    ))?;
    match admin.config("conffile").await? {
        Some(conffile) => included(path, Path::new(&conffile), warnings)?,
        None => warnings.push(
            "PgBouncer did not say which configuration file it read (SHOW CONFIG conffile): not checked that it reads the databases file".into(),
        ),
    }
    let after = match &config.target_entry {
        Some(text) => Entry {
            line: before.line,
            pairs: entry::parse_pairs(text).map_err(PoolerError::TargetEntry)?,
        },
        None => {
            let (host, port, dbname) = endpoint(target);
            before
                .with("host", &host)
                .with("port", &port.to_string())
                .with("dbname", &dbname)
        }
    };
    Ok(Pooler {
        admin,
        config: config.clone(),
        before,
        after,
        paused_at: None,
    })
}

/// Refuses a databases file PgBouncer does not read: it must be the configuration file or
/// named by one of its `%include` lines. An unreadable configuration file is a warning.
fn included(path: &Path, conffile: &Path, warnings: &mut Vec<String>) -> Result<()> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    let want = canon(path);
    if canon(conffile) == want {
        return Ok(());
    }
    let text = match std::fs::read_to_string(conffile) {
        Ok(t) => t,
        Err(e) => {
            warnings.push(format!(
                "could not read PgBouncer's configuration {} ({e}): not checked that it includes {}",
                conffile.display(),
                path.display()
            ));
            return Ok(());
        }
    };
    let base = conffile.parent().unwrap_or(Path::new("/"));
    let found = text.lines().any(|l| {
        l.trim()
            .strip_prefix("%include")
            .map(|rest| base.join(rest.trim()))
            .is_some_and(|p| canon(&p) == want)
    });
    if found {
        Ok(())
    } else {
        Err(PoolerError::NotIncluded {
            path: path.to_owned(),
            conffile: conffile.display().to_string(),
        })
    }
}

impl Pooler {
    pub fn report(&self) -> PoolerReport {
        PoolerReport {
            database: self.config.database.clone(),
            entry_before: self.before.redacted(),
            entry_after: self.after.redacted(),
            ..Default::default()
        }
    }

    fn state(&self, cutover_id: &str) -> PauseState {
        PauseState {
            cutover_id: cutover_id.to_owned(),
            database: self.config.database.clone(),
            databases_file: self.config.databases_file.clone(),
            entry_before: self.before.text(),
            entry_after: self.after.text(),
        }
    }

    /// Records the pause (durably), then `PAUSE <db>`, waiting at most `within` for the
    /// transactions in flight. Returns how long PAUSE waited. On a timeout the caller aborts,
    /// which resumes over a new session ([`resume_after_abort`]): this one is still busy.
    pub async fn pause(
        &mut self,
        buffer_dir: &Path,
        cutover_id: &str,
        within: Duration,
    ) -> Result<Duration> {
        self.state(cutover_id).write(buffer_dir)?;
        let t0 = Instant::now();
        let cmd = format!("PAUSE {}", admin_ident(&self.config.database));
        match tokio::time::timeout(within, self.admin.run(&cmd)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(PoolerError::PauseTimeout {
                    name: self.config.database.clone(),
                    waited: within,
                });
            }
        }
        self.paused_at = Some(t0);
        Ok(t0.elapsed())
    }

    /// The switch's pooler half: the entry rewritten to point at the copy, `RELOAD`, checked,
    /// server connections to the source closed. The pool stays paused.
    pub async fn repoint(&self, target: &ConnInfo) -> Result<()> {
        write_entry(
            &self.config.databases_file,
            &self.config.database,
            &self.after.text(),
        )?;
        self.admin.run("RELOAD").await?;
        let name = &self.config.database;
        let (_, db) = self.admin.database(name).await?;
        let shows = db.as_ref().map_or("nothing".into(), |d| d.describe());
        let ok = match &db {
            Some(d) if self.config.target_entry.is_none() => points_at(d, name, target).await,
            // An entry the operator wrote may name the copy differently (a DNS name, a proxy):
            // it must at least be what PgBouncer now runs.
            Some(d) => {
                let written = PoolerDatabase::from_entry(&self.after);
                d.port.unwrap_or(5432) == written.port.unwrap_or(5432)
                    && d.database.as_deref().unwrap_or(name)
                        == written.database.as_deref().unwrap_or(name)
                    && d.host == written.host
            }
            None => false,
        };
        if !ok {
            return Err(PoolerError::NotRepointed {
                name: name.clone(),
                shows,
                target: self.after.redacted(),
            });
        }
        // PAUSE closes the pool's server connections and RELOAD of a changed entry retires the
        // rest; RECONNECT makes sure none to the source is reused after RESUME.
        self.admin
            .run(&format!("RECONNECT {}", admin_ident(name)))
            .await?;
        Ok(())
    }

    /// `RESUME <db>`; removes the pause record. Returns how long the pool was paused, and
    /// what `SHOW POOLS` said just before: the clients queued and the longest any had waited.
    pub async fn resume(&self, buffer_dir: &Path) -> Result<Resumed> {
        let queue = self.admin.waiting(&self.config.database).await.ok();
        self.admin
            .run(&format!("RESUME {}", admin_ident(&self.config.database)))
            .await?;
        PauseState::remove(buffer_dir)?;
        Ok(Resumed {
            paused: self.paused_at.map(|t| t.elapsed()),
            clients_waiting: queue.map(|q| q.0),
            longest_wait: queue.map(|q| q.1),
        })
    }

    /// A dry run's stand-in for the pooler's part of the window (nothing paused, nothing
    /// rewritten): the pause record and the rewritten databases file as the same durable
    /// writes into `scratch`, and the admin round trips of the real window — PAUSE, RELOAD,
    /// SHOW DATABASES, RECONNECT, SHOW POOLS, RESUME — as harmless ones.
    pub async fn rehearse(&self, scratch: &Path, cutover_id: &str) -> Result<()> {
        self.state(cutover_id).write(scratch)?;
        let copy = scratch.join("databases.ini");
        std::fs::copy(&self.config.databases_file, &copy).map_err(file_err(
            &copy,
            "copying the databases file for the dry run",
        ))?;
        write_entry(&copy, &self.config.database, &self.after.text())?;
        for _ in 0..4 {
            self.admin.run("SHOW VERSION").await?;
        }
        self.admin.database(&self.config.database).await?;
        self.admin.waiting(&self.config.database).await?;
        Ok(())
    }
}

/// Writes `entry_text` as database `name`'s entry: a new file beside the old one (same owner
/// and mode), fsynced, renamed over it, the directory fsynced.
pub fn write_entry(path: &Path, name: &str, entry_text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let text =
        std::fs::read_to_string(path).map_err(file_err(path, "reading the databases file"))?;
    let new = entry::replace(&text, name, entry_text).map_err(|source| PoolerError::Entry {
        path: path.to_owned(),
        source,
    })?;
    let meta = std::fs::metadata(path).map_err(file_err(path, "reading the databases file"))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(file_err(dir, "writing the new databases file"))?;
    let werr = file_err(path, "writing the new databases file");
    tmp.write_all(new.as_bytes())
        .and_then(|_| tmp.as_file().set_permissions(meta.permissions()))
        .and_then(|_| {
            std::os::unix::fs::fchown(tmp.as_file(), Some(meta.uid()), Some(meta.gid())).or_else(
                |e| {
                    // Not root: the new file is ours; fine when PgBouncer can still read it.
                    if e.kind() == std::io::ErrorKind::PermissionDenied {
                        Ok(())
                    } else {
                        Err(e)
                    }
                },
            )
        })
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(werr)?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .map_err(file_err(path, "replacing the databases file"))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(file_err(dir, "syncing the databases file's directory"))?;
    Ok(())
}

/// Abort before the switch: `RESUME` over a new admin session (the window's may be stuck in a
/// `PAUSE` that timed out), the entry untouched; removes the pause record.
pub async fn resume_after_abort(config: &PoolerConfig, buffer_dir: &Path) -> Result<()> {
    let admin = Admin::connect(&config.admin).await?;
    admin
        .run(&format!("RESUME {}", admin_ident(&config.database)))
        .await
        .or_else(not_paused_is_fine)?;
    PauseState::remove(buffer_dir)
}

/// `RESUME` of a database that is not paused is an error in PgBouncer; for walshift it means
/// the work is done.
fn not_paused_is_fine(e: PoolerError) -> Result<()> {
    match &e {
        PoolerError::Command { source, .. }
            if source
                .as_db_error()
                .is_some_and(|d| d.message().contains("not paused")) =>
        {
            Ok(())
        }
        _ => Err(e),
    }
}

/// A pause left by a cutover that died before its switch started: resumed on the unchanged
/// entry before anything else, so clients are not held while this cutover's preflight waits.
/// Returns the warning to report, if there was one.
pub async fn leftover(config: Option<&PoolerConfig>, buffer_dir: &Path) -> Result<Option<String>> {
    let Some(state) = PauseState::read(buffer_dir)? else {
        return Ok(None);
    };
    let Some(config) = config.filter(|c| c.database == state.database) else {
        return Err(PoolerError::LeftPausedWithoutPooler {
            cutover_id: state.cutover_id,
            name: state.database,
        });
    };
    resume_after_abort(config, buffer_dir).await?;
    Ok(Some(format!(
        "cutover {} died with PgBouncer's database {:?} paused; it was resumed (entry unchanged) before this cutover started",
        state.cutover_id, state.database
    )))
}

/// After a switch in doubt, on the operator's word: point the entry where `state` says
/// (`to_target`: the copy; otherwise back to the source), `RELOAD`, `RESUME`, remove the
/// record.
pub async fn settle(
    config: &PoolerConfig,
    buffer_dir: &Path,
    state: &PauseState,
    to_target: bool,
) -> Result<String> {
    let admin = Admin::connect(&config.admin).await?;
    let text = if to_target {
        &state.entry_after
    } else {
        &state.entry_before
    };
    write_entry(&state.databases_file, &state.database, text)?;
    admin.run("RELOAD").await?;
    admin
        .run(&format!("RECONNECT {}", admin_ident(&state.database)))
        .await?;
    admin
        .run(&format!("RESUME {}", admin_ident(&state.database)))
        .await
        .or_else(not_paused_is_fine)?;
    PauseState::remove(buffer_dir)?;
    let shown = match entry::parse_pairs(text) {
        Ok(pairs) => Entry { line: 0, pairs }.redacted(),
        Err(_) => "the recorded entry".into(),
    };
    Ok(format!(
        "PgBouncer's database {:?} points at {shown} and was resumed",
        state.database
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_names_are_bare_only_when_safe() {
        assert_eq!(admin_ident("app_1"), "app_1");
        assert_eq!(admin_ident("App"), "\"App\"");
        assert_eq!(admin_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn included_follows_relative_includes() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("databases.ini");
        std::fs::write(&db, "app = host=a\n").unwrap();
        let conf = dir.path().join("pgbouncer.ini");
        std::fs::write(&conf, "[databases]\n%include databases.ini\n").unwrap();
        let mut w = Vec::new();
        included(&db, &conf, &mut w).unwrap();
        included(&conf, &conf, &mut w).unwrap();
        std::fs::write(&conf, "[databases]\n").unwrap();
        assert!(matches!(
            included(&db, &conf, &mut w),
            Err(PoolerError::NotIncluded { .. })
        ));
        included(&db, &dir.path().join("missing.ini"), &mut w).unwrap();
        assert_eq!(w.len(), 1, "{w:?}");
    }

    #[test]
    fn write_entry_keeps_the_rest_and_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("databases.ini");
        std::fs::write(&db, "; mine\napp = host=a port=1\nb = host=c\n").unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_entry(&db, "app", "host=z port=2").unwrap();
        assert_eq!(
            std::fs::read_to_string(&db).unwrap(),
            "; mine\napp = host=z port=2\nb = host=c\n"
        );
        let mode = std::fs::metadata(&db).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        assert!(matches!(
            write_entry(&db, "nope", "host=x"),
            Err(PoolerError::Entry { .. })
        ));
    }
}
