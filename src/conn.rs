//! Connection settings for the source and target databases.
//!
//! Accepts what `psql` accepts: a libpq URL (`postgresql://user@host:5432/db`) or key=value
//! pairs (`host=… dbname=…`), completed from the `PG*` environment variables and `~/.pgpass`
//! (or `PGPASSFILE`) like libpq does. Passwords are kept out of every printed form: use
//! [`ConnInfo::redacted`] (or `Display`) in logs and messages.
//!
//! **Dead servers are noticed.** Every connection attempt is bounded by `connect_timeout`
//! ([`ConnInfo::connect_timeout`]), and every TCP socket walshift opens — the SQL sessions and
//! the replication connection alike — carries TCP keepalives and `tcp_user_timeout` as libpq
//! names them ([`ConnInfo::keepalives`]), so a server that vanished (a failover that moved
//! its address, a cut network) is an error after minutes, not a connection that hangs for
//! hours. [`reconnect`] is what the long-running commands do about such errors.

pub mod reconnect;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::config::Host;
use tokio_postgres::config::SslMode as PgSslMode;

use crate::error::{Error, Result, SqlContext};
use crate::tls::{SslMode, TlsError, TlsSettings};

/// Where and as whom to connect, and with which TLS settings. Cheap to clone.
#[derive(Clone)]
pub struct ConnInfo {
    config: tokio_postgres::Config,
    tls: TlsSettings,
}

/// The connection half of a SQL session ([`ConnInfo::connect_raw`]); poll or spawn it.
pub type PgConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    crate::tls::TlsStream<tokio_postgres::Socket>,
>;

/// The environment lookups `ConnInfo::parse` uses; injectable for tests.
pub trait Env {
    /// The value of an environment variable, if set and non-empty.
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

impl ConnInfo {
    /// Parses a connection string and completes it from the process environment and pgpass.
    pub fn parse(s: &str) -> Result<Self> {
        Self::parse_with(s, &ProcessEnv)
    }

    /// As [`ConnInfo::parse`], reading the environment from `env`.
    pub fn parse_with(s: &str, env: &dyn Env) -> Result<Self> {
        let (rest, tls_options) = crate::tls::split_options(s);
        let (rest, tcp_options) = crate::tls::split_options_named(&rest, TCP_KEYS);
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e| {
            Error::Config(format!(
                "cannot parse connection string ({e}); use a URL like postgresql://user@host:5432/dbname \
                 or key=value pairs like \"host=db1 port=5432 user=app dbname=shop\""
            ))
        })?;
        if config.get_hosts().is_empty() {
            match env.var("PGHOST") {
                Some(h) => {
                    for part in h.split(',') {
                        config.host(part);
                    }
                }
                None => {
                    let sock = Path::new("/var/run/postgresql");
                    if sock.is_dir() {
                        config.host_path(sock);
                    } else {
                        config.host("localhost");
                    }
                }
            }
        }
        if config.get_ports().is_empty() {
            let port = match env.var("PGPORT") {
                Some(p) => p.parse::<u16>().map_err(|_| {
                    Error::Config(format!(
                        "PGPORT={p:?} is not a port number; set it to e.g. 5432"
                    ))
                })?,
                None => 5432,
            };
            config.port(port);
        }
        if config.get_user().is_none() {
            let user = env
                .var("PGUSER")
                .or_else(|| env.var("USER"))
                .unwrap_or_else(|| "postgres".to_owned());
            config.user(&user);
        }
        if config.get_dbname().is_none() {
            let db = env
                .var("PGDATABASE")
                .unwrap_or_else(|| config.get_user().unwrap_or("postgres").to_owned());
            config.dbname(&db);
        }
        if config.get_application_name().is_none() {
            config.application_name(
                env.var("PGAPPNAME")
                    .unwrap_or_else(|| "walshift".to_owned()),
            );
        }
        if config.get_connect_timeout().is_none() {
            let secs = env
                .var("PGCONNECT_TIMEOUT")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(30);
            config.connect_timeout(Duration::from_secs(secs));
        }
        Keepalives::resolve(&tcp_options)?.set(&mut config);
        let tls = TlsSettings::resolve(&tls_options, env)?;
        let mut info = ConnInfo { config, tls };
        if info.config.get_password().is_none() {
            if let Some(pw) = env.var("PGPASSWORD") {
                info.config.password(pw);
            } else if let Some(pw) = info.pgpass_lookup(env) {
                info.config.password(pw);
            }
        }
        Ok(info)
    }

    fn pgpass_lookup(&self, env: &dyn Env) -> Option<String> {
        let path = env
            .var("PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| env.var("HOME").map(|h| Path::new(&h).join(".pgpass")))?;
        if !pgpass_is_private(&path) {
            return None;
        }
        let text = std::fs::read_to_string(&path).ok()?;
        let host = match self.config.get_hosts().first()? {
            Host::Tcp(h) => h.clone(),
            // libpq matches socket connections against "localhost".
            Host::Unix(_) => "localhost".to_owned(),
        };
        pgpass_match(&text, &host, self.port(), self.dbname(), self.user())
    }

    /// The underlying `tokio_postgres` configuration.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The TLS settings (`sslmode` and friends).
    pub fn tls(&self) -> &TlsSettings {
        &self.tls
    }

    /// Whether connections go over TCP (TLS applies) rather than a Unix socket (never TLS,
    /// as with libpq).
    pub fn is_tcp(&self) -> bool {
        matches!(self.host(), Host::Tcp(_))
    }

    /// First host: a TCP host name or a Unix socket directory.
    pub fn host(&self) -> &Host {
        &self.config.get_hosts()[0]
    }

    /// First port.
    pub fn port(&self) -> u16 {
        self.config.get_ports()[0]
    }

    /// Role name.
    pub fn user(&self) -> &str {
        self.config.get_user().unwrap_or("postgres")
    }

    /// Database name.
    pub fn dbname(&self) -> &str {
        self.config.get_dbname().unwrap_or("postgres")
    }

    /// The password, if one was given or found. Never print it.
    pub fn password(&self) -> Option<&[u8]> {
        self.config.get_password()
    }

    /// `application_name` sent at startup.
    pub fn application_name(&self) -> &str {
        self.config.get_application_name().unwrap_or("walshift")
    }

    /// Connect timeout: `connect_timeout` of the connection string, else `PGCONNECT_TIMEOUT`,
    /// else 30 s; zero means none. It bounds the whole connection attempt — TCP connect,
    /// startup and authentication — of every connection walshift opens ([`ConnInfo::bounded`]),
    /// so a server that accepts the connection and never answers is an error, not a hang.
    pub fn connect_timeout(&self) -> Duration {
        self.config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(30))
    }

    /// The TCP keepalive settings and `tcp_user_timeout` every TCP connection carries.
    pub fn keepalives(&self) -> Keepalives {
        Keepalives {
            enabled: self.config.get_keepalives(),
            idle: self.config.get_keepalives_idle(),
            interval: self.config.get_keepalives_interval(),
            count: self.config.get_keepalives_retries(),
            user_timeout: self.config.get_tcp_user_timeout().copied(),
        }
    }

    /// Sets [`ConnInfo::keepalives`] on a TCP socket this connection opened outside
    /// tokio-postgres (the replication connection).
    pub fn set_tcp_options(&self, stream: &tokio::net::TcpStream) -> std::io::Result<()> {
        self.keepalives().apply(stream)
    }

    /// A copy connecting to another database on the same server as the same role.
    pub fn with_dbname(&self, db: &str) -> Self {
        let mut c = self.clone();
        c.config.dbname(db);
        c
    }

    /// A copy whose sessions carry `name` as their `application_name`.
    pub fn with_application_name(&self, name: &str) -> Self {
        let mut c = self.clone();
        c.config.application_name(name);
        c
    }

    /// A printable description without secrets: `host=… port=… user=… dbname=…`.
    pub fn redacted(&self) -> String {
        let host = match self.host() {
            Host::Tcp(h) => h.clone(),
            Host::Unix(p) => p.display().to_string(),
        };
        format!(
            "host={host} port={} user={} dbname={}",
            self.port(),
            self.user(),
            self.dbname()
        )
    }

    /// Runs a connection attempt within [`ConnInfo::connect_timeout`]: [`Error::ConnectTimeout`]
    /// when it runs out (the attempt is dropped, closing its socket).
    pub async fn bounded<T>(&self, attempt: impl std::future::Future<Output = T>) -> Result<T> {
        let timeout = self.connect_timeout();
        if timeout.is_zero() {
            return Ok(attempt.await);
        }
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| Error::ConnectTimeout {
                target: self.redacted(),
                timeout,
            })
    }

    /// Opens a regular SQL session, within the connect timeout. The connection task runs on
    /// the current tokio runtime.
    pub async fn connect(&self) -> Result<Client> {
        let (client, connection) = self
            .connect_raw()
            .await?
            .with_sql_context(|| format!("cannot connect to {}", self.redacted()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection closed: {e}");
            }
        });
        Ok(client)
    }
}

impl ConnInfo {
    /// Opens a SQL session honouring `sslmode` as libpq does, each attempt within the connect
    /// timeout: the outer error is a timeout, the inner one the server's or TLS's answer.
    /// `allow` tries plain text, then TLS if the server refuses; `prefer` tries TLS, then
    /// plain text if the server has no TLS or the handshake fails; `require` and stricter
    /// never send a query in plain text.
    pub async fn connect_raw(
        &self,
    ) -> Result<std::result::Result<(Client, PgConnection), tokio_postgres::Error>> {
        if !self.is_tcp() {
            return self.attempt(PgSslMode::Disable).await;
        }
        match self.tls.mode() {
            SslMode::Disable => self.attempt(PgSslMode::Disable).await,
            SslMode::Allow => match self.attempt(PgSslMode::Disable).await? {
                Err(e) if e.as_db_error().is_some() => {
                    tracing::debug!(target = %self, "plain-text connection refused ({e}); trying TLS (sslmode=allow)");
                    self.attempt(PgSslMode::Require).await
                }
                r => Ok(r),
            },
            SslMode::Prefer => match self.attempt(PgSslMode::Prefer).await? {
                Err(e) if tls_failed(&e) => {
                    tracing::debug!(target = %self, "TLS failed ({e}); trying plain text (sslmode=prefer)");
                    self.attempt(PgSslMode::Disable).await
                }
                r => Ok(r),
            },
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                self.attempt(PgSslMode::Require).await
            }
        }
    }

    async fn attempt(
        &self,
        mode: PgSslMode,
    ) -> Result<std::result::Result<(Client, PgConnection), tokio_postgres::Error>> {
        let mut config = self.config.clone();
        config.ssl_mode(mode);
        self.bounded(config.connect(self.tls.connector())).await
    }
}

/// Connection-string keys set on the TCP socket itself, by their libpq names (taken out
/// before tokio-postgres parses the rest: it does not know `keepalives_count`, and reads
/// `tcp_user_timeout` as seconds where libpq means milliseconds). `keepalives_retries`,
/// tokio-postgres's name for `keepalives_count`, is accepted too.
const TCP_KEYS: &[&str] = &[
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "keepalives_retries",
    "tcp_user_timeout",
];

/// [`Keepalives::idle`]'s default when the connection string does not set `keepalives_idle`.
pub const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(60);
/// [`Keepalives::interval`]'s default when the connection string does not set
/// `keepalives_interval`.
pub const DEFAULT_KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
/// [`Keepalives::count`]'s default when the connection string does not set `keepalives_count`.
pub const DEFAULT_KEEPALIVES_COUNT: u32 = 6;
/// The idle time `keepalives_idle=0` ("the system default", as libpq says) stands for: Linux's
/// default `tcp_keepalive_time`.
const SYSTEM_KEEPALIVES_IDLE: Duration = Duration::from_secs(7200);

/// TCP keepalives and the TCP user timeout of a connection, from the connection string's
/// libpq settings. walshift's defaults differ from libpq's (which leaves idle time, interval
/// and count to the operating system: 2 h, 75 s, 9 probes on Linux): a release runs for
/// hours, and a server that vanished without closing the connection (a failover that moved
/// its address, a network cut) should be noticed in minutes, not after two hours and more.
/// Keepalive probes are a few bytes a minute on an idle connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalives {
    /// `keepalives`: 0 turns probes off. Default on.
    pub enabled: bool,
    /// `keepalives_idle` (seconds): silence before the first probe. Default 60 s
    /// ([`DEFAULT_KEEPALIVES_IDLE`]); 0 = the system's (2 h on Linux). Shorter notices a dead
    /// peer sooner, at a few bytes per probe.
    pub idle: Duration,
    /// `keepalives_interval` (seconds): between unanswered probes. Default 10 s
    /// ([`DEFAULT_KEEPALIVES_INTERVAL`]); 0 = the system's. `None`: the system's.
    pub interval: Option<Duration>,
    /// `keepalives_count`: unanswered probes before the connection counts as dead. Default 6
    /// ([`DEFAULT_KEEPALIVES_COUNT`]); 0 = the system's. With the defaults an idle connection
    /// to a vanished server fails after about 2 minutes.
    pub count: Option<u32>,
    /// `tcp_user_timeout` (milliseconds, as in libpq): how long sent data may stay
    /// unacknowledged before the connection fails — what notices a dead server while a
    /// statement is being sent (keepalives only probe an idle connection). Default none (the
    /// system's retransmission limit, about 15 minutes on Linux). Set it above the longest
    /// pause the network may have, or a slow link fails spuriously.
    pub user_timeout: Option<Duration>,
}

impl Keepalives {
    /// The settings from the TCP options of a connection string (walshift's defaults for the
    /// ones not given). A value that is not a whole number is an error naming the option.
    fn resolve(options: &[(String, String)]) -> Result<Keepalives> {
        let mut k = Keepalives {
            enabled: true,
            idle: DEFAULT_KEEPALIVES_IDLE,
            interval: Some(DEFAULT_KEEPALIVES_INTERVAL),
            count: Some(DEFAULT_KEEPALIVES_COUNT),
            user_timeout: None,
        };
        for (key, value) in options {
            let n: u32 = value.trim().parse().map_err(|_| {
                Error::Config(format!(
                    "{key}={value:?} is not a whole number of {}; see libpq's connection parameters",
                    match key.as_str() {
                        "keepalives" => "0 (off) or 1 (on)",
                        "keepalives_count" | "keepalives_retries" => "probes",
                        "tcp_user_timeout" => "milliseconds",
                        _ => "seconds",
                    }
                ))
            })?;
            let secs = Duration::from_secs(u64::from(n));
            match key.as_str() {
                "keepalives" => k.enabled = n != 0,
                "keepalives_idle" if n == 0 => k.idle = SYSTEM_KEEPALIVES_IDLE,
                "keepalives_idle" => k.idle = secs,
                "keepalives_interval" => k.interval = (n > 0).then_some(secs),
                "keepalives_count" | "keepalives_retries" => k.count = (n > 0).then_some(n),
                "tcp_user_timeout" => {
                    k.user_timeout = (n > 0).then(|| Duration::from_millis(u64::from(n)))
                }
                _ => unreachable!("only TCP_KEYS are taken out"),
            }
        }
        Ok(k)
    }

    /// Hands the settings to tokio-postgres, which sets them on the sockets of SQL sessions.
    fn set(&self, config: &mut tokio_postgres::Config) {
        config.keepalives(self.enabled);
        config.keepalives_idle(self.idle);
        if let Some(i) = self.interval {
            config.keepalives_interval(i);
        }
        if let Some(c) = self.count {
            config.keepalives_retries(c);
        }
        if let Some(t) = self.user_timeout {
            config.tcp_user_timeout(t);
        }
    }

    /// The settings as libpq connection-string parameters, for the PostgreSQL client
    /// programs walshift runs (`pg_dump`, `psql`), so their connections carry the same
    /// keepalives.
    pub fn libpq_options(&self) -> String {
        let mut out = format!("keepalives={}", u8::from(self.enabled));
        if self.enabled {
            out.push_str(&format!(" keepalives_idle={}", self.idle.as_secs()));
            if let Some(i) = self.interval {
                out.push_str(&format!(" keepalives_interval={}", i.as_secs()));
            }
            if let Some(c) = self.count {
                out.push_str(&format!(" keepalives_count={c}"));
            }
        }
        if let Some(t) = self.user_timeout {
            out.push_str(&format!(" tcp_user_timeout={}", t.as_millis()));
        }
        out
    }

    /// Sets them on a socket, as tokio-postgres does on its own.
    pub fn apply(&self, stream: &tokio::net::TcpStream) -> std::io::Result<()> {
        let sock = socket2::SockRef::from(stream);
        if self.enabled {
            let mut ka = socket2::TcpKeepalive::new().with_time(self.idle);
            if let Some(i) = self.interval {
                ka = ka.with_interval(i);
            }
            if let Some(c) = self.count {
                ka = ka.with_retries(c);
            }
            sock.set_tcp_keepalive(&ka)?;
        }
        if let Some(t) = self.user_timeout {
            sock.set_tcp_user_timeout(Some(t))?;
        }
        Ok(())
    }
}

fn tls_failed(e: &tokio_postgres::Error) -> bool {
    std::error::Error::source(e).is_some_and(|s| s.is::<TlsError>())
}

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnInfo({})", self.redacted())
    }
}

/// As libpq: a password file that is not a regular file, or that group or others may access,
/// is ignored with a warning.
fn pgpass_is_private(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() {
        tracing::warn!(path = %path.display(), "password file is not a plain file: ignored");
        return false;
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "password file has group or world access: ignored; permissions should be u=rw (0600) or less"
        );
        return false;
    }
    true
}

/// Finds the password for (host, port, db, user) in pgpass text: the first matching line wins,
/// `*` matches anything, `\:` and `\\` escape.
fn pgpass_match(text: &str, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass(line);
        if fields.len() != 5 {
            continue;
        }
        let ok = |pat: &str, val: &str| pat == "*" || pat == val;
        if ok(&fields[0], host)
            && ok(&fields[1], &port)
            && ok(&fields[2], db)
            && ok(&fields[3], user)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

fn split_pgpass(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.last_mut().unwrap().push(n);
                }
            }
            ':' if out.len() < 5 => out.push(String::new()),
            _ => out.last_mut().unwrap().push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct MapEnv(HashMap<&'static str, String>);
    impl Env for MapEnv {
        fn var(&self, key: &str) -> Option<String> {
            self.0.get(key).cloned()
        }
    }

    fn env(pairs: &[(&'static str, &str)]) -> MapEnv {
        MapEnv(pairs.iter().map(|(k, v)| (*k, v.to_string())).collect())
    }

    #[test]
    fn url_and_keyvalue_forms() {
        let e = env(&[]);
        let a = ConnInfo::parse_with("postgresql://app:s3cret@db1:6543/shop", &e).unwrap();
        assert_eq!((a.port(), a.user(), a.dbname()), (6543, "app", "shop"));
        assert_eq!(a.password(), Some(&b"s3cret"[..]));
        let b = ConnInfo::parse_with(
            "host=db1 port=6543 user=app password=s3cret dbname=shop",
            &e,
        )
        .unwrap();
        assert_eq!(a.redacted(), b.redacted());
        assert!(!a.redacted().contains("s3cret"));
        assert!(!format!("{a:?} {a}").contains("s3cret"));
    }

    #[test]
    fn environment_fills_gaps_but_never_overrides() {
        let e = env(&[
            ("PGHOST", "10.0.0.9"),
            ("PGPORT", "5555"),
            ("PGUSER", "ops"),
            ("PGPASSWORD", "pw"),
        ]);
        let c = ConnInfo::parse_with("dbname=shop", &e).unwrap();
        assert_eq!(c.redacted(), "host=10.0.0.9 port=5555 user=ops dbname=shop");
        assert_eq!(c.password(), Some(&b"pw"[..]));
        let c = ConnInfo::parse_with("host=h port=1 user=u dbname=d", &e).unwrap();
        assert_eq!(c.redacted(), "host=h port=1 user=u dbname=d");
        let bad = ConnInfo::parse_with("dbname=x", &env(&[("PGPORT", "abc")])).unwrap_err();
        assert!(bad.to_string().contains("PGPORT"));
    }

    #[test]
    fn pgpass_lookup_matches_first_line_with_wildcards_and_escapes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(
            &path,
            "# comment\nother:5432:*:*:nope\ndb1:*:shop:app:pa\\:ss\\\\word\ndb1:*:*:*:fallback\n",
        )
        .unwrap();
        let e = env(&[("PGPASSFILE", path.to_str().unwrap())]);
        // Readable by others: ignored, as libpq does.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = ConnInfo::parse_with("host=db1 user=app dbname=shop", &e).unwrap();
        assert_eq!(c.password(), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = ConnInfo::parse_with("host=db1 user=app dbname=shop", &e).unwrap();
        assert_eq!(c.password(), Some(&b"pa:ss\\word"[..]));
        let c = ConnInfo::parse_with("host=db1 user=x dbname=y", &e).unwrap();
        assert_eq!(c.password(), Some(&b"fallback"[..]));
        let c = ConnInfo::parse_with("host=db2 user=x dbname=y", &e).unwrap();
        assert_eq!(c.password(), None);
    }

    #[test]
    fn keepalives_by_their_libpq_names_with_walshift_defaults() {
        let e = env(&[]);
        let d = ConnInfo::parse_with("host=db1 dbname=shop", &e).unwrap();
        let k = d.keepalives();
        assert!(k.enabled);
        assert_eq!(k.idle, DEFAULT_KEEPALIVES_IDLE);
        assert_eq!(k.interval, Some(DEFAULT_KEEPALIVES_INTERVAL));
        assert_eq!(k.count, Some(DEFAULT_KEEPALIVES_COUNT));
        assert_eq!(k.user_timeout, None);
        let kv = ConnInfo::parse_with(
            "host=db1 keepalives_idle=5 keepalives_interval=2 keepalives_count=3 \
             tcp_user_timeout=1500 dbname=shop password='keepalives_count=9'",
            &e,
        )
        .unwrap();
        let url = ConnInfo::parse_with(
            "postgresql://db1/shop?keepalives_idle=5&keepalives_interval=2&keepalives_count=3&tcp_user_timeout=1500",
            &e,
        )
        .unwrap();
        for c in [&kv, &url] {
            let k = c.keepalives();
            assert_eq!(
                (k.enabled, k.idle, k.interval, k.count, k.user_timeout),
                (
                    true,
                    Duration::from_secs(5),
                    Some(Duration::from_secs(2)),
                    Some(3),
                    Some(Duration::from_millis(1500))
                )
            );
            assert_eq!(c.dbname(), "shop");
        }
        assert_eq!(kv.password(), Some(&b"keepalives_count=9"[..]));
        assert_eq!(
            kv.keepalives().libpq_options(),
            "keepalives=1 keepalives_idle=5 keepalives_interval=2 keepalives_count=3 tcp_user_timeout=1500"
        );
        let off = ConnInfo::parse_with("host=db1 keepalives=0 keepalives_interval=0", &e).unwrap();
        assert!(!off.keepalives().enabled);
        assert_eq!(off.keepalives().interval, None);
        let bad = ConnInfo::parse_with("host=db1 keepalives_idle=soon", &e).unwrap_err();
        assert!(bad.to_string().contains("keepalives_idle"), "{bad}");
    }

    #[tokio::test]
    async fn keepalives_are_set_on_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let c = ConnInfo::parse_with(
            "host=127.0.0.1 keepalives_idle=7 keepalives_interval=3 keepalives_count=4 tcp_user_timeout=2500",
            &env(&[]),
        )
        .unwrap();
        c.set_tcp_options(&stream).unwrap();
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(3)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(2500))
        );
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let err = ConnInfo::parse_with("host=a port=notaport", &env(&[])).unwrap_err();
        assert!(err.to_string().contains("connection string"), "{err}");
    }
}
