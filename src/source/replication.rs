//! walshift's own replication connection: a tokio socket speaking the walsender protocol
//! (`replication=database`), because `tokio-postgres` has no CopyBoth mode.
//!
//! It owns startup and authentication (trust, cleartext, MD5, SCRAM-SHA-256 without channel
//! binding), the simple-query commands of a walsender session (`IDENTIFY_SYSTEM`,
//! `CREATE_REPLICATION_SLOT`, `DROP_REPLICATION_SLOT`, plain SQL) and the replication stream
//! (XLogData, keepalives, standby status updates). All other SQL goes through `tokio-postgres`.
//! TLS follows the connection string's `sslmode` (see [`crate::tls`]): an SSLRequest on the
//! TCP socket, then the handshake on the same rustls stack as the SQL sessions.
//!
//! The stream is built to keep up with a walsender: reads land in one large buffer and every
//! `CopyData` payload is handed out as a zero-copy [`Bytes`] slice of it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::Host;

use crate::conn::ConnInfo;
use crate::lsn::Lsn;
use crate::source::protocol::{
    Authentication, BackendMessage, DbError, ProtocolError, ReplicationMessage,
    StandbyStatusUpdate, pg_now,
};

/// Bytes a read may fill at least; when less room is left, the buffer grows by
/// [`READ_BUFFER_RESERVE`] at once.
const MIN_READ: usize = 64 * 1024;
const READ_BUFFER_RESERVE: usize = 256 * 1024;

/// Why the replication connection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// The server could not be reached.
    #[error("cannot connect to {target}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },

    /// The TLS handshake failed (certificate not trusted, wrong host name, …).
    #[error("cannot connect to {target} over TLS")]
    Tls {
        target: String,
        #[source]
        source: crate::tls::TlsError,
    },

    /// The server answered the SSLRequest with "no TLS" and sslmode demands it.
    #[error(
        "{target} does not accept TLS connections (ssl = off), and sslmode={mode} demands TLS; \
         enable ssl on the server, or lower sslmode only if the network is trusted"
    )]
    TlsRefused { target: String, mode: &'static str },

    /// Connecting and authenticating took longer than the connect timeout.
    #[error("connecting to {target} timed out after {timeout:?}")]
    Timeout { target: String, timeout: Duration },

    /// Reading or writing the established connection failed.
    #[error("I/O error on the replication connection")]
    Io(#[from] io::Error),

    /// The server sent bytes that are not the protocol, or a message out of place.
    #[error("replication protocol error")]
    Protocol(#[from] ProtocolError),

    /// Authentication could not proceed on walshift's side (no password configured, method
    /// not supported, SCRAM exchange invalid). A wrong password is a [`Self::Server`] error
    /// with SQLSTATE 28P01.
    #[error("authentication failed: {message}")]
    Auth {
        message: String,
        #[source]
        source: Option<io::Error>,
    },

    /// The server reported an error (SQLSTATE, message, detail, hint).
    #[error(transparent)]
    Server(#[from] DbError),

    /// A command's result did not have the shape the protocol documents.
    #[error("unexpected result from {command}: {detail}")]
    UnexpectedResult {
        command: &'static str,
        detail: String,
    },

    /// The server closed the connection.
    #[error("the server closed the replication connection")]
    Closed,
}

impl ReplicationError {
    /// The server's error, if this is one.
    pub fn as_db_error(&self) -> Option<&DbError> {
        match self {
            ReplicationError::Server(e) => Some(e),
            _ => None,
        }
    }

    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        self.as_db_error().map(DbError::code)
    }

    /// The connection is gone or the server cannot take it yet, so another connection may
    /// succeed (see [`crate::conn::reconnect`]): it could not be reached, timed out, broke or
    /// was closed, or the server answered with a transient SQLSTATE — or 55006
    /// `object_in_use`, a replication slot still "active" for the walsender of the connection
    /// just lost (it ends within moments). Never TLS, authentication or protocol failures.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Connect { .. }
            | ReplicationError::Timeout { .. }
            | ReplicationError::Io(_)
            | ReplicationError::Closed => true,
            ReplicationError::Server(e) => {
                crate::conn::reconnect::is_transient_sqlstate(e.code()) || e.code() == "55006"
            }
            ReplicationError::Tls { .. }
            | ReplicationError::TlsRefused { .. }
            | ReplicationError::Protocol(_)
            | ReplicationError::Auth { .. }
            | ReplicationError::UnexpectedResult { .. } => false,
        }
    }
}

type Result<T, E = ReplicationError> = std::result::Result<T, E>;

enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(crate::tls::TlsStream<TcpStream>),
}

impl Socket {
    async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read_buf(buf).await,
            Socket::Unix(s) => s.read_buf(buf).await,
            Socket::Tls(s) => s.read_buf(buf).await,
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.write_all(data).await,
            Socket::Unix(s) => s.write_all(data).await,
            Socket::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
        }
    }

    fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.try_write(data),
            Socket::Unix(s) => s.try_write(data),
            // The session ends with the socket; the server sees the connection close.
            Socket::Tls(_) => Ok(0),
        }
    }
}

/// Whether a connection attempt uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    Off,
    /// Plain text if the server has no TLS.
    Try,
    Must,
}

/// One result row of a simple query: text values by column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    columns: Arc<[String]>,
    values: Vec<Option<String>>,
}

impl Row {
    /// Column names, in order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// All values; `None` is SQL NULL.
    pub fn values(&self) -> &[Option<String>] {
        &self.values
    }

    /// The value at `idx`; `None` for NULL or an index past the end.
    pub fn get(&self, idx: usize) -> Option<&str> {
        self.values.get(idx)?.as_deref()
    }

    /// The value of the column called `name`; `None` for NULL or no such column.
    pub fn get_named(&self, name: &str) -> Option<&str> {
        let idx = self.columns.iter().position(|c| c == name)?;
        self.get(idx)
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// What `IDENTIFY_SYSTEM` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    /// The cluster's unique system identifier.
    pub system_id: u64,
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// The database connected to (`None` for physical replication connections).
    pub dbname: Option<String>,
}

/// What `CREATE_REPLICATION_SLOT` does with the slot's starting snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotAction {
    /// Export it under a name other sessions can import with `SET TRANSACTION SNAPSHOT`.
    #[default]
    Export,
    /// Do not export it.
    NoExport,
    /// Use it in the current transaction of this connection (which must have run
    /// `BEGIN ISOLATION LEVEL REPEATABLE READ` before any query).
    Use,
}

/// How to create a logical slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotOptions {
    /// Drop the slot when this connection ends. Default: false (a permanent slot).
    pub temporary: bool,
    /// Default: [`SnapshotAction::Export`].
    pub snapshot: SnapshotAction,
}

/// A created slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    pub slot_name: String,
    /// The first LSN the slot will decode from: every transaction committed after it streams,
    /// everything before it is in the exported snapshot.
    pub consistent_point: Lsn,
    /// The exported snapshot's name (with [`SnapshotAction::Export`]).
    pub snapshot_name: Option<String>,
    pub output_plugin: String,
}

/// A walsender session, before replication starts.
///
/// Dropping it sends `Terminate` if the socket accepts it right away; [`Self::close`] waits
/// for that.
pub struct ReplicationConnection {
    socket: Socket,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// Socket reads that returned data, and the bytes they brought.
    reads: u64,
    read_bytes: u64,
    parameters: HashMap<String, String>,
    process_id: i32,
    target: String,
}

impl std::fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("target", &self.target)
            .field("process_id", &self.process_id)
            .finish()
    }
}

impl ReplicationConnection {
    /// Connects, starts a logical walsender session (`replication=database`) and
    /// authenticates, each attempt within the connect timeout (zero means none). TLS follows
    /// `sslmode` as [`ConnInfo::connect_raw`] describes.
    pub async fn connect(info: &ConnInfo) -> Result<Self> {
        use crate::tls::SslMode;
        if !info.is_tcp() {
            return Self::connect_bounded(info, Tls::Off).await;
        }
        match info.tls().mode() {
            SslMode::Disable => Self::connect_bounded(info, Tls::Off).await,
            SslMode::Allow => match Self::connect_bounded(info, Tls::Off).await {
                Err(ReplicationError::Server(_)) => Self::connect_bounded(info, Tls::Must).await,
                r => r,
            },
            SslMode::Prefer => match Self::connect_bounded(info, Tls::Try).await {
                Err(ReplicationError::Tls { .. }) => Self::connect_bounded(info, Tls::Off).await,
                r => r,
            },
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                Self::connect_bounded(info, Tls::Must).await
            }
        }
    }

    async fn connect_bounded(info: &ConnInfo, tls: Tls) -> Result<Self> {
        let timeout = info.connect_timeout();
        if timeout.is_zero() {
            return Self::connect_inner(info, tls).await;
        }
        match tokio::time::timeout(timeout, Self::connect_inner(info, tls)).await {
            Ok(r) => r,
            Err(_) => Err(ReplicationError::Timeout {
                target: info.redacted(),
                timeout,
            }),
        }
    }

    async fn connect_inner(info: &ConnInfo, tls: Tls) -> Result<Self> {
        let target = info.redacted();
        let connect_err = |source| ReplicationError::Connect {
            target: target.clone(),
            source,
        };
        let socket = match info.host() {
            Host::Tcp(host) => {
                let s = TcpStream::connect((host.as_str(), info.port()))
                    .await
                    .map_err(connect_err)?;
                s.set_nodelay(true).map_err(connect_err)?;
                // Keepalives: a source that vanished without closing the connection (a
                // failover that moved its address) is noticed even while nothing streams.
                info.set_tcp_options(&s).map_err(connect_err)?;
                Self::negotiate_tls(info, host, s, tls).await?
            }
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", info.port()));
                Socket::Unix(UnixStream::connect(&path).await.map_err(connect_err)?)
            }
        };
        let mut conn = ReplicationConnection {
            socket,
            read_buf: BytesMut::with_capacity(READ_BUFFER_RESERVE),
            write_buf: BytesMut::with_capacity(1024),
            reads: 0,
            read_bytes: 0,
            parameters: HashMap::new(),
            process_id: 0,
            target,
        };
        tracing::debug!(target = %conn.target, "opening replication connection");
        frontend::startup_message(
            [
                ("user", info.user()),
                ("database", info.dbname()),
                ("replication", "database"),
                ("application_name", info.application_name()),
                ("client_encoding", "UTF8"),
                // The form values are printed in, whatever the server's defaults: unambiguous
                // dates and intervals, exact floats (as native logical replication asks).
                ("DateStyle", "ISO"),
                ("IntervalStyle", "postgres"),
                ("extra_float_digits", "3"),
            ],
            &mut conn.write_buf,
        )?;
        conn.flush().await?;
        conn.authenticate(info).await?;
        conn.wait_ready("during startup").await?;
        Ok(conn)
    }

    /// SSLRequest, then the handshake if the server agrees.
    async fn negotiate_tls(
        info: &ConnInfo,
        host: &str,
        mut s: TcpStream,
        tls: Tls,
    ) -> Result<Socket> {
        if tls == Tls::Off {
            return Ok(Socket::Tcp(s));
        }
        let mut req = BytesMut::with_capacity(8);
        frontend::ssl_request(&mut req);
        s.write_all(&req).await?;
        let mut answer = [0u8];
        s.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {}
            b'N' if tls == Tls::Try => return Ok(Socket::Tcp(s)),
            b'N' => {
                return Err(ReplicationError::TlsRefused {
                    target: info.redacted(),
                    mode: info.tls().mode().as_str(),
                });
            }
            other => {
                return Err(ReplicationError::UnexpectedResult {
                    command: "SSLRequest",
                    detail: format!("answer byte {other:#04x}, expected 'S' or 'N'"),
                });
            }
        }
        let stream = info
            .tls()
            .connector()
            .handshake(host, s)
            .await
            .map_err(|source| ReplicationError::Tls {
                target: info.redacted(),
                source,
            })?;
        Ok(Socket::Tls(stream))
    }

    async fn authenticate(&mut self, info: &ConnInfo) -> Result<()> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.read_message().await? {
                BackendMessage::Authentication(auth) => match auth {
                    Authentication::Ok => return Ok(()),
                    Authentication::CleartextPassword => {
                        let pw = self.password(info)?;
                        frontend::password_message(pw, &mut self.write_buf)?;
                    }
                    Authentication::Md5Password { salt } => {
                        let pw = self.password(info)?;
                        let hash = md5_hash(info.user().as_bytes(), pw, salt);
                        frontend::password_message(hash.as_bytes(), &mut self.write_buf)?;
                    }
                    Authentication::Sasl { mechanisms } => {
                        if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                            return Err(ReplicationError::Auth {
                                message: format!(
                                    "{} offers SASL mechanisms {mechanisms:?}; walshift supports \
                                     {SCRAM_SHA_256} without channel binding",
                                    self.target
                                ),
                                source: None,
                            });
                        }
                        let s =
                            ScramSha256::new(self.password(info)?, ChannelBinding::unsupported());
                        frontend::sasl_initial_response(
                            SCRAM_SHA_256,
                            s.message(),
                            &mut self.write_buf,
                        )?;
                        scram = Some(s);
                    }
                    Authentication::SaslContinue(data) => {
                        let s = scram.as_mut().ok_or(ProtocolError::Unexpected {
                            tag: b'R',
                            during: "(SASLContinue before SASL started)",
                        })?;
                        s.update(&data).map_err(|e| scram_error(&self.target, e))?;
                        frontend::sasl_response(s.message(), &mut self.write_buf)?;
                    }
                    Authentication::SaslFinal(data) => {
                        let s = scram.as_mut().ok_or(ProtocolError::Unexpected {
                            tag: b'R',
                            during: "(SASLFinal before SASL started)",
                        })?;
                        s.finish(&data).map_err(|e| scram_error(&self.target, e))?;
                        continue;
                    }
                    Authentication::Unsupported(code) => {
                        return Err(ReplicationError::Auth {
                            message: format!(
                                "{} asks for authentication method {code} ({}); walshift supports \
                                 trust, password, md5 and scram-sha-256",
                                self.target,
                                auth_method_name(code)
                            ),
                            source: None,
                        });
                    }
                },
                BackendMessage::ErrorResponse(e) => return Err(e.into()),
                BackendMessage::NoticeResponse(n) => log_notice(&n),
                other => {
                    return Err(ProtocolError::Unexpected {
                        tag: other.tag(),
                        during: "during authentication",
                    }
                    .into());
                }
            }
            self.flush().await?;
        }
    }

    fn password<'a>(&self, info: &'a ConnInfo) -> Result<&'a [u8]> {
        info.password().ok_or_else(|| ReplicationError::Auth {
            message: format!(
                "{} asks for a password for role \"{}\" but none is configured; set PGPASSWORD, \
                 a password in the connection string, or ~/.pgpass",
                self.target,
                info.user()
            ),
            source: None,
        })
    }

    /// Reads until `ReadyForQuery`, keeping parameters and the backend key.
    async fn wait_ready(&mut self, during: &'static str) -> Result<()> {
        loop {
            match self.read_message().await? {
                BackendMessage::ReadyForQuery { .. } => return Ok(()),
                BackendMessage::BackendKeyData { process_id, .. } => self.process_id = process_id,
                BackendMessage::ErrorResponse(e) => return Err(e.into()),
                other => self.unexpected(other, during)?,
            }
        }
    }

    /// Handles the messages that may arrive at any time; anything else is a protocol error.
    fn unexpected(&mut self, msg: BackendMessage, during: &'static str) -> Result<()> {
        match msg {
            BackendMessage::ParameterStatus { name, value } => {
                self.parameters.insert(name, value);
                Ok(())
            }
            BackendMessage::NoticeResponse(n) => {
                log_notice(&n);
                Ok(())
            }
            other => Err(ProtocolError::Unexpected {
                tag: other.tag(),
                during,
            }
            .into()),
        }
    }

    /// A run-time parameter the server reported (`server_version`, `server_encoding`, …).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// The walsender's process id (for `pg_stat_replication`, `pg_terminate_backend`).
    pub fn process_id(&self) -> i32 {
        self.process_id
    }

    /// The server's major version from `server_version`, e.g. 15.
    pub fn server_major_version(&self) -> Option<u32> {
        let v = self.parameter("server_version")?;
        let end = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
        v[..end].parse().ok()
    }

    #[inline]
    async fn read_message(&mut self) -> Result<BackendMessage> {
        loop {
            if let Some(msg) = BackendMessage::parse(&mut self.read_buf)? {
                return Ok(msg);
            }
            self.fill_read_buf().await?;
        }
    }

    /// One read from the socket into the receive buffer, growing it in bulk when short.
    async fn fill_read_buf(&mut self) -> Result<()> {
        if self.read_buf.capacity() - self.read_buf.len() < MIN_READ {
            self.read_buf.reserve(READ_BUFFER_RESERVE);
        }
        let n = self.socket.read_buf(&mut self.read_buf).await?;
        if n == 0 {
            return Err(ReplicationError::Closed);
        }
        self.reads += 1;
        self.read_bytes += n as u64;
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if !self.write_buf.is_empty() {
            let r = self.socket.write_all(&self.write_buf).await;
            self.write_buf.clear();
            r?;
        }
        Ok(())
    }

    async fn send_query(&mut self, sql: &str) -> Result<()> {
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await
    }

    /// Runs one command (or several separated by `;`) with the simple query protocol and
    /// returns every row as text. In a walsender session this accepts replication commands
    /// and, with `replication=database`, plain SQL.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>> {
        self.send_query(sql).await?;
        let mut rows = Vec::new();
        let mut columns: Option<Arc<[String]>> = None;
        let mut error = None;
        loop {
            match self.read_message().await? {
                BackendMessage::RowDescription(fields) => {
                    columns = Some(fields.into_iter().map(|f| f.name).collect());
                }
                BackendMessage::DataRow(values) => {
                    let columns = columns.clone().ok_or(ProtocolError::Unexpected {
                        tag: b'D',
                        during: "before a RowDescription",
                    })?;
                    let values = values
                        .into_iter()
                        .map(|v| v.map(text).transpose())
                        .collect::<Result<Vec<_>, _>>()?;
                    rows.push(Row { columns, values });
                }
                BackendMessage::CommandComplete { .. } | BackendMessage::EmptyQueryResponse => {
                    columns = None;
                }
                BackendMessage::ErrorResponse(e) => error = Some(e),
                BackendMessage::ReadyForQuery { .. } => {
                    return match error {
                        Some(e) => Err(e.into()),
                        None => Ok(rows),
                    };
                }
                other => self.unexpected(other, "in a simple query result")?,
            }
        }
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemInfo> {
        const CMD: &str = "IDENTIFY_SYSTEM";
        let row = single_row(CMD, self.simple_query(CMD).await?)?;
        Ok(SystemInfo {
            system_id: parse_column(CMD, &row, "systemid")?,
            timeline: parse_column(CMD, &row, "timeline")?,
            xlogpos: parse_column(CMD, &row, "xlogpos")?,
            dbname: row.get_named("dbname").map(str::to_owned),
        })
    }

    /// Creates a logical slot using the `pgoutput` plugin.
    ///
    /// An exported snapshot stays valid only until this connection runs its next command (or
    /// closes): import it elsewhere with `SET TRANSACTION SNAPSHOT '<name>'` right away, and
    /// keep this connection idle until every importing transaction has started.
    pub async fn create_logical_slot(
        &mut self,
        name: &str,
        options: SlotOptions,
    ) -> Result<CreatedSlot> {
        const CMD: &str = "CREATE_REPLICATION_SLOT";
        let sql = create_slot_command(name, options, self.server_major_version().unwrap_or(15));
        let row = single_row(CMD, self.simple_query(&sql).await?)?;
        Ok(CreatedSlot {
            slot_name: required(CMD, &row, "slot_name")?.to_owned(),
            consistent_point: parse_column(CMD, &row, "consistent_point")?,
            snapshot_name: row.get_named("snapshot_name").map(str::to_owned),
            output_plugin: required(CMD, &row, "output_plugin")?.to_owned(),
        })
    }

    /// `DROP_REPLICATION_SLOT`; with `wait`, waits for a slot in use by another session to be
    /// released instead of failing.
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<()> {
        let mut sql = format!("DROP_REPLICATION_SLOT {}", quote_ident(name));
        if wait {
            sql.push_str(" WAIT");
        }
        self.simple_query(&sql).await.map(drop)
    }

    /// `START_REPLICATION SLOT … LOGICAL start (options)`: turns this session into a stream.
    ///
    /// `options` go to the output plugin as given, e.g. `("proto_version", "1")`,
    /// `("publication_names", &publication_names(&["walshift"]))`, `("messages", "true")`;
    /// names and values are quoted here.
    pub async fn start_logical_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream> {
        self.send_query(&start_replication_command(slot, start, options))
            .await?;
        loop {
            match self.read_message().await? {
                BackendMessage::CopyBothResponse(_) => {
                    return Ok(ReplicationStream {
                        conn: self,
                        server_done: false,
                        end: None,
                        last_wal_end: start,
                    });
                }
                BackendMessage::ErrorResponse(e) => {
                    self.wait_ready("after a failed START_REPLICATION").await?;
                    return Err(e.into());
                }
                other => self.unexpected(other, "in reply to START_REPLICATION")?,
            }
        }
    }

    /// Ends the session politely (`Terminate`) and closes the socket.
    pub async fn close(mut self) -> Result<()> {
        frontend::terminate(&mut self.write_buf);
        self.flush().await
    }
}

impl Drop for ReplicationConnection {
    fn drop(&mut self) {
        let mut buf = BytesMut::with_capacity(5);
        frontend::terminate(&mut buf);
        let _ = self.socket.try_write(&buf);
    }
}

/// A progress report to send with [`ReplicationStream::send_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatus {
    /// Received and written up to here.
    pub write: Lsn,
    /// Durable up to here. For a logical slot this becomes `confirmed_flush_lsn`, and the
    /// server may discard WAL before it: never report more than what is durably stored.
    pub flush: Lsn,
    /// Applied up to here.
    pub apply: Lsn,
    /// Ask the server for an immediate keepalive in return.
    pub reply_requested: bool,
}

impl StandbyStatus {
    /// Written up to `write`, durable and applied up to `flush`, no reply requested.
    pub fn new(write: Lsn, flush: Lsn) -> Self {
        StandbyStatus {
            write,
            flush,
            apply: flush,
            reply_requested: false,
        }
    }
}

/// One message from the walsender.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicationEvent {
    /// One output-plugin message (for pgoutput: Begin, Insert, Commit, …).
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        /// Server clock, microseconds since 2000-01-01 UTC.
        send_time: i64,
        data: Bytes,
    },
    /// The server is alive; if `reply_requested`, answer with
    /// [`ReplicationStream::send_status`] soon or the server may time the session out.
    Keepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
}

impl ReplicationEvent {
    /// True for a keepalive that asks for a status update now.
    pub fn reply_requested(&self) -> bool {
        matches!(
            self,
            ReplicationEvent::Keepalive {
                reply_requested: true,
                ..
            }
        )
    }

    /// The server's end of WAL when it sent this.
    pub fn wal_end(&self) -> Lsn {
        match self {
            ReplicationEvent::XLogData { wal_end, .. }
            | ReplicationEvent::Keepalive { wal_end, .. } => *wal_end,
        }
    }
}

/// What [`ReplicationStream::next_buffered`] makes of a parsed `CopyData` payload. Public so
/// the receive → append benchmark (`benches/capture_append.rs`) can turn frames into events
/// without a socket, exactly as the stream does.
impl From<ReplicationMessage> for ReplicationEvent {
    #[inline]
    fn from(msg: ReplicationMessage) -> Self {
        match msg {
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            } => ReplicationEvent::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            },
            ReplicationMessage::PrimaryKeepalive {
                wal_end,
                send_time,
                reply_requested,
            } => ReplicationEvent::Keepalive {
                wal_end,
                send_time,
                reply_requested,
            },
        }
    }
}

/// A running logical replication stream (CopyBoth mode).
#[derive(Debug)]
pub struct ReplicationStream {
    conn: ReplicationConnection,
    server_done: bool,
    /// How the server ended the stream, once it has (see [`Self::end_reason`]).
    end: Option<&'static str>,
    last_wal_end: Lsn,
}

impl ReplicationStream {
    /// The next message; `None` once the server has ended the stream (then call
    /// [`Self::stop`]).
    ///
    /// Cancel-safe: a `next()` dropped in a `tokio::select!` loses no data.
    #[inline]
    pub async fn next(&mut self) -> Result<Option<ReplicationEvent>> {
        loop {
            match self.next_buffered()? {
                Some(event) => return Ok(Some(event)),
                None if self.server_done => return Ok(None),
                None => self.conn.fill_read_buf().await?,
            }
        }
    }

    /// The next message if one has already been received, without waiting: lets a caller
    /// drain everything buffered between two `select!` rounds. `None` means "call
    /// [`Self::next`]" (or, after the server ended the stream, that it has).
    #[inline]
    pub fn next_buffered(&mut self) -> Result<Option<ReplicationEvent>> {
        if self.server_done {
            return Ok(None);
        }
        while let Some(msg) = BackendMessage::parse(&mut self.conn.read_buf)? {
            match msg {
                BackendMessage::CopyData(data) => {
                    let event = ReplicationEvent::from(ReplicationMessage::parse(data)?);
                    self.last_wal_end = self.last_wal_end.max(event.wal_end());
                    return Ok(Some(event));
                }
                BackendMessage::CopyDone => {
                    self.server_done = true;
                    self.end = Some("it sent CopyDone: the walsender is stopping");
                    return Ok(None);
                }
                // A walsender told to shut down (server fast/smart shutdown) ends the command
                // without a CopyDone.
                BackendMessage::CommandComplete { .. } => {
                    self.server_done = true;
                    self.end = Some(
                        "it completed the command mid-stream: the server is shutting down or the walsender was told to stop",
                    );
                    return Ok(None);
                }
                BackendMessage::ErrorResponse(e) => return Err(e.into()),
                other => self.conn.unexpected(other, "during replication")?,
            }
        }
        Ok(None)
    }

    /// Sends a standby status update stamped with the current time.
    ///
    /// Not cancel-safe: a cancelled send may leave a partial message on the wire.
    pub async fn send_status(&mut self, status: StandbyStatus) -> Result<()> {
        StandbyStatusUpdate {
            write: status.write,
            flush: status.flush,
            apply: status.apply,
            client_time: pg_now(),
            reply_requested: status.reply_requested,
        }
        .write_message(&mut self.conn.write_buf);
        self.conn.flush().await
    }

    /// Why the stream ended, once [`Self::next`] returned `None`; a generic reason before.
    pub fn end_reason(&self) -> &'static str {
        self.end.unwrap_or("the stream ended without a reason")
    }

    /// Socket reads that brought data since the connection opened, and their bytes in total.
    pub fn read_stats(&self) -> (u64, u64) {
        (self.conn.reads, self.conn.read_bytes)
    }

    /// The highest server end-of-WAL seen in XLogData or keepalives.
    pub fn server_wal_end(&self) -> Lsn {
        self.last_wal_end
    }

    /// A run-time parameter the server reported.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.conn.parameter(name)
    }

    /// Ends the stream (`CopyDone`) and waits for the server to finish the command, returning
    /// the session for further commands. Data still in flight is discarded: report progress
    /// with [`Self::send_status`] before stopping.
    pub async fn stop(mut self) -> Result<ReplicationConnection> {
        frontend::copy_done(&mut self.conn.write_buf);
        self.conn.flush().await?;
        loop {
            match self.conn.read_message().await? {
                BackendMessage::CopyData(_)
                | BackendMessage::CopyDone
                | BackendMessage::CommandComplete { .. } => {}
                BackendMessage::ReadyForQuery { .. } => return Ok(self.conn),
                BackendMessage::ErrorResponse(e) => return Err(e.into()),
                other => self.conn.unexpected(other, "while stopping replication")?,
            }
        }
    }
}

fn text(v: Bytes) -> Result<String, ProtocolError> {
    String::from_utf8(v.to_vec()).map_err(|_| ProtocolError::Malformed {
        tag: b'D',
        what: "text value is not UTF-8",
    })
}

fn single_row(command: &'static str, mut rows: Vec<Row>) -> Result<Row> {
    if rows.len() != 1 {
        return Err(ReplicationError::UnexpectedResult {
            command,
            detail: format!("{} rows instead of 1", rows.len()),
        });
    }
    Ok(rows.remove(0))
}

fn required<'a>(command: &'static str, row: &'a Row, column: &str) -> Result<&'a str> {
    row.get_named(column)
        .ok_or_else(|| ReplicationError::UnexpectedResult {
            command,
            detail: format!("column {column} missing or NULL"),
        })
}

fn parse_column<T: std::str::FromStr>(command: &'static str, row: &Row, column: &str) -> Result<T> {
    let v = required(command, row, column)?;
    v.parse().map_err(|_| ReplicationError::UnexpectedResult {
        command,
        detail: format!("column {column} has unparsable value {v:?}"),
    })
}

fn scram_error(target: &str, e: io::Error) -> ReplicationError {
    ReplicationError::Auth {
        message: format!("SCRAM-SHA-256 exchange with {target} failed"),
        source: Some(e),
    }
}

fn auth_method_name(code: i32) -> &'static str {
    match code {
        2 => "Kerberos V5",
        6 => "SCM credentials",
        7 | 8 => "GSSAPI",
        9 => "SSPI",
        _ => "unknown",
    }
}

fn log_notice(n: &DbError) {
    tracing::info!(
        severity = n.severity(),
        code = n.code(),
        "replication connection: {}",
        n.message()
    );
}

/// `name` as a double-quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `value` as a single-quoted SQL string literal (standard-conforming strings).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The value of pgoutput's `publication_names` option: quoted identifiers joined by commas.
pub fn publication_names(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| quote_ident(n))
        .collect::<Vec<_>>()
        .join(",")
}

fn create_slot_command(name: &str, options: SlotOptions, server_major: u32) -> String {
    let mut sql = format!("CREATE_REPLICATION_SLOT {}", quote_ident(name));
    if options.temporary {
        sql.push_str(" TEMPORARY");
    }
    sql.push_str(" LOGICAL pgoutput");
    let (new, old) = match options.snapshot {
        SnapshotAction::Export => ("export", "EXPORT_SNAPSHOT"),
        SnapshotAction::NoExport => ("nothing", "NOEXPORT_SNAPSHOT"),
        SnapshotAction::Use => ("use", "USE_SNAPSHOT"),
    };
    if server_major >= 15 {
        let _ = write!(sql, " (SNAPSHOT '{new}')");
    } else {
        let _ = write!(sql, " {old}");
    }
    sql
}

fn start_replication_command(slot: &str, start: Lsn, options: &[(&str, &str)]) -> String {
    let mut sql = format!(
        "START_REPLICATION SLOT {} LOGICAL {start}",
        quote_ident(slot)
    );
    if !options.is_empty() {
        sql.push_str(" (");
        for (i, (k, v)) in options.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            let _ = write!(sql, "{} {}", quote_ident(k), quote_literal(v));
        }
        sql.push(')');
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_quote_names_and_values() {
        assert_eq!(
            create_slot_command("walshift", SlotOptions::default(), 15),
            r#"CREATE_REPLICATION_SLOT "walshift" LOGICAL pgoutput (SNAPSHOT 'export')"#
        );
        assert_eq!(
            create_slot_command(
                "a\"b",
                SlotOptions {
                    temporary: true,
                    snapshot: SnapshotAction::NoExport
                },
                15
            ),
            r#"CREATE_REPLICATION_SLOT "a""b" TEMPORARY LOGICAL pgoutput (SNAPSHOT 'nothing')"#
        );
        assert_eq!(
            create_slot_command(
                "s",
                SlotOptions {
                    temporary: false,
                    snapshot: SnapshotAction::Use
                },
                14
            ),
            r#"CREATE_REPLICATION_SLOT "s" LOGICAL pgoutput USE_SNAPSHOT"#
        );
        let pubs = publication_names(&["walshift", "Odd\"Name"]);
        assert_eq!(pubs, r#""walshift","Odd""Name""#);
        assert_eq!(
            start_replication_command(
                "walshift",
                Lsn(0x16_B374_D848),
                &[
                    ("proto_version", "1"),
                    ("publication_names", &pubs),
                    ("x", "it's")
                ]
            ),
            r#"START_REPLICATION SLOT "walshift" LOGICAL 16/B374D848 ("proto_version" '1', "publication_names" '"walshift","Odd""Name"', "x" 'it''s')"#
        );
        assert_eq!(
            start_replication_command("s", Lsn::ZERO, &[]),
            r#"START_REPLICATION SLOT "s" LOGICAL 0/0"#
        );
    }

    #[test]
    fn rows_by_index_and_name() {
        let row = Row {
            columns: vec!["a".to_owned(), "b".to_owned()].into(),
            values: vec![Some("1".to_owned()), None],
        };
        assert_eq!(row.get(0), Some("1"));
        assert_eq!(row.get(1), None);
        assert_eq!(row.get(2), None);
        assert_eq!(row.get_named("a"), Some("1"));
        assert_eq!(row.get_named("zz"), None);
        assert_eq!(row.len(), 2);
        let err = parse_column::<u32>("X", &row, "b").unwrap_err();
        assert!(err.to_string().contains("column b"), "{err}");
    }
}
