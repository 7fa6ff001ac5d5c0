//! Connection settings for the source and target databases.
//!
//! Accepts what `psql` accepts: a libpq URL (`postgresql://user@host:5432/db`) or key=value
//! pairs (`host=… dbname=…`), completed from the `PG*` environment variables and `~/.pgpass`
//! (or `PGPASSFILE`) like libpq does. Passwords are kept out of every printed form: use
//! [`ConnInfo::redacted`] (or `Display`) in logs and messages.

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
    fn garbage_is_a_clear_error() {
        let err = ConnInfo::parse_with("host=a port=notaport", &env(&[])).unwrap_err();
        assert!(err.to_string().contains("connection string"), "{err}");
    }
}
