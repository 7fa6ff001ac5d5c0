//! The backend half of the PostgreSQL wire protocol that a replication session needs, without
//! I/O: framing of backend messages out of a receive buffer, the replication sub-messages
//! carried in `CopyData` (XLogData, primary keepalive) and the standby status update.
//!
//! `tokio-postgres` has no CopyBoth mode, so walshift frames the backend side itself; frontend
//! messages come from [`postgres_protocol::message::frontend`]. Payloads are zero-copy
//! [`Bytes`] slices of the receive buffer, so a `CopyData` costs no allocation or copy.
//!
//! Formats: PostgreSQL documentation, "Message Formats" and "Streaming Replication Protocol".

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::frontend;

use crate::lsn::Lsn;

/// Largest message accepted for the types that carry data (row descriptions, data rows,
/// `CopyData`, errors, notices, notifications): the server's own allocation limit, 1 GiB.
pub const MAX_DATA_MESSAGE_LEN: usize = 0x4000_0000;

/// Largest message accepted for every other type. Like libpq, a longer length on a small
/// message type is taken as a corrupt stream rather than something to allocate for.
pub const MAX_CONTROL_MESSAGE_LEN: usize = 65_536;

/// Microseconds between the Unix epoch and PostgreSQL's epoch, 2000-01-01 00:00:00 UTC.
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Why bytes from the server are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A length field smaller than the length field itself.
    #[error("message {} has invalid length {len}", Tag(*tag))]
    InvalidLength { tag: u8, len: u32 },

    /// A length field beyond what this message type may carry: the stream is corrupt or not
    /// PostgreSQL.
    #[error("message {} claims {len} bytes, more than the {limit} allowed", Tag(*tag))]
    TooLong { tag: u8, len: u32, limit: usize },

    /// The body does not match the documented layout.
    #[error("malformed message {}: {what}", Tag(*tag))]
    Malformed { tag: u8, what: &'static str },

    /// A well-formed message that has no place at this point of the session.
    #[error("unexpected message {} {during}", Tag(*tag))]
    Unexpected { tag: u8, during: &'static str },

    /// A `CopyData` payload during replication that is neither XLogData nor keepalive.
    #[error("unknown replication message {} in CopyData", Tag(*tag))]
    UnknownReplicationMessage { tag: u8 },
}

/// Displays a message type byte as `'X'`.
struct Tag(u8);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}'", std::ascii::escape_default(self.0))
    }
}

/// A message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendMessage {
    /// `R`: a step of authentication.
    Authentication(Authentication),
    /// `S`: a run-time parameter's current value.
    ParameterStatus { name: String, value: String },
    /// `K`: what a cancel request would need.
    BackendKeyData { process_id: i32, secret_key: i32 },
    /// `Z`: the server waits for the next query; `status` is `I`dle, in `T`ransaction or
    /// in a failed transaction (`E`).
    ReadyForQuery { status: u8 },
    /// `T`: the columns of the rows that follow.
    RowDescription(Vec<FieldDescription>),
    /// `D`: one row; values are slices of the received frame, `None` for NULL.
    DataRow(Vec<Option<Bytes>>),
    /// `C`: a command finished; its tag, e.g. `SELECT 1`.
    CommandComplete { tag: String },
    /// `I`: the query string was empty.
    EmptyQueryResponse,
    /// `E`: the command failed.
    ErrorResponse(DbError),
    /// `N`: a warning or notice; the command goes on.
    NoticeResponse(DbError),
    /// `W`: copy in both directions started (START_REPLICATION).
    CopyBothResponse(CopyResponse),
    /// `H`: copy out started.
    CopyOutResponse(CopyResponse),
    /// `d`: a chunk of copy data (during replication: XLogData or keepalive).
    CopyData(Bytes),
    /// `c`: the server ends its copy stream.
    CopyDone,
    /// Any other message type, kept whole so the session can name it.
    Other { tag: u8, body: Bytes },
}

/// An authentication request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Authentication {
    /// Authenticated.
    Ok,
    /// Send the password in clear text.
    CleartextPassword,
    /// Send the MD5 hash of the password with this salt.
    Md5Password { salt: [u8; 4] },
    /// Start SASL with one of these mechanisms (server preference order).
    Sasl { mechanisms: Vec<String> },
    /// SASL challenge data.
    SaslContinue(Bytes),
    /// SASL outcome data (e.g. the SCRAM server signature).
    SaslFinal(Bytes),
    /// A method walshift does not implement (Kerberos, GSSAPI, SSPI, SCM); the request code.
    Unsupported(i32),
}

/// One column of a `RowDescription`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    pub name: String,
    pub table_oid: u32,
    pub column_id: i16,
    pub type_oid: u32,
    pub type_size: i16,
    pub type_modifier: i32,
    /// 0 text, 1 binary.
    pub format: i16,
}

/// Body of `CopyBothResponse` / `CopyOutResponse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyResponse {
    /// 0 text, 1 binary.
    pub format: u8,
    pub column_formats: Vec<i16>,
}

/// The fields of an `ErrorResponse` or `NoticeResponse`. Boxed, so messages and results
/// that may carry one stay small.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DbError(Box<DbErrorFields>);

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct DbErrorFields {
    severity: String,
    code: String,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
    position: Option<String>,
    where_: Option<String>,
    schema: Option<String>,
    table: Option<String>,
    column: Option<String>,
    datatype: Option<String>,
    constraint: Option<String>,
    file: Option<String>,
    line: Option<String>,
    routine: Option<String>,
}

impl DbError {
    /// `ERROR`, `FATAL`, `PANIC`, `WARNING`, `NOTICE`, … (not localized when the server
    /// sends the non-localized form).
    pub fn severity(&self) -> &str {
        &self.0.severity
    }
    /// The SQLSTATE, e.g. `28P01` for a wrong password.
    pub fn code(&self) -> &str {
        &self.0.code
    }
    /// The primary message.
    pub fn message(&self) -> &str {
        &self.0.message
    }
    pub fn detail(&self) -> Option<&str> {
        self.0.detail.as_deref()
    }
    pub fn hint(&self) -> Option<&str> {
        self.0.hint.as_deref()
    }
    /// Cursor position in the query string (1-based characters), as sent.
    pub fn position(&self) -> Option<&str> {
        self.0.position.as_deref()
    }
    /// The context (call stack) the error occurred in.
    pub fn where_(&self) -> Option<&str> {
        self.0.where_.as_deref()
    }
    pub fn schema(&self) -> Option<&str> {
        self.0.schema.as_deref()
    }
    pub fn table(&self) -> Option<&str> {
        self.0.table.as_deref()
    }
    pub fn column(&self) -> Option<&str> {
        self.0.column.as_deref()
    }
    pub fn datatype(&self) -> Option<&str> {
        self.0.datatype.as_deref()
    }
    pub fn constraint(&self) -> Option<&str> {
        self.0.constraint.as_deref()
    }
    /// Server source file, line and routine that reported it.
    pub fn file(&self) -> Option<&str> {
        self.0.file.as_deref()
    }
    pub fn line(&self) -> Option<&str> {
        self.0.line.as_deref()
    }
    pub fn routine(&self) -> Option<&str> {
        self.0.routine.as_deref()
    }

    fn parse(tag: u8, mut body: Bytes) -> Result<DbError, ProtocolError> {
        let mut e = DbErrorFields::default();
        let mut localized_severity = None;
        loop {
            let field = read_u8(tag, &mut body)?;
            if field == 0 {
                break;
            }
            let value = read_cstr(tag, &mut body)?;
            match field {
                b'S' => localized_severity = Some(value),
                b'V' => e.severity = value,
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                b'P' => e.position = Some(value),
                b'W' => e.where_ = Some(value),
                b's' => e.schema = Some(value),
                b't' => e.table = Some(value),
                b'c' => e.column = Some(value),
                b'd' => e.datatype = Some(value),
                b'n' => e.constraint = Some(value),
                b'F' => e.file = Some(value),
                b'L' => e.line = Some(value),
                b'R' => e.routine = Some(value),
                _ => {}
            }
        }
        expect_end(tag, &body)?;
        if e.severity.is_empty() {
            e.severity = localized_severity.ok_or(ProtocolError::Malformed {
                tag,
                what: "no severity field",
            })?;
        }
        if e.code.is_empty() {
            return Err(ProtocolError::Malformed {
                tag,
                what: "no SQLSTATE field",
            });
        }
        Ok(DbError(Box::new(e)))
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.0.severity, self.0.message, self.0.code
        )?;
        if let Some(d) = &self.0.detail {
            write!(f, "\nDETAIL: {d}")?;
        }
        if let Some(h) = &self.0.hint {
            write!(f, "\nHINT: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DbError {}

impl BackendMessage {
    /// Takes one complete message off the front of `buf`.
    ///
    /// Returns `Ok(None)`, leaving `buf` untouched apart from reserving room for the rest of
    /// the frame, when `buf` does not yet hold a whole message. A corrupt length is an error;
    /// after any error the stream cannot be resynchronised and the connection must be closed.
    #[inline]
    pub fn parse(buf: &mut BytesMut) -> Result<Option<BackendMessage>, ProtocolError> {
        if buf.len() < 5 {
            return Ok(None);
        }
        let tag = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        if len < 4 {
            return Err(ProtocolError::InvalidLength { tag, len });
        }
        let limit = match tag {
            b'd' | b'D' | b'T' | b'E' | b'N' | b'A' => MAX_DATA_MESSAGE_LEN,
            _ => MAX_CONTROL_MESSAGE_LEN,
        };
        if len as usize > limit {
            return Err(ProtocolError::TooLong { tag, len, limit });
        }
        let total = len as usize + 1;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(5);
        let body = buf.split_to(total - 5).freeze();
        Self::parse_body(tag, body).map(Some)
    }

    fn parse_body(tag: u8, mut body: Bytes) -> Result<BackendMessage, ProtocolError> {
        let msg = match tag {
            b'd' => return Ok(BackendMessage::CopyData(body)),
            b'R' => BackendMessage::Authentication(parse_authentication(&mut body)?),
            b'S' => BackendMessage::ParameterStatus {
                name: read_cstr(tag, &mut body)?,
                value: read_cstr(tag, &mut body)?,
            },
            b'K' => BackendMessage::BackendKeyData {
                process_id: read_i32(tag, &mut body)?,
                secret_key: read_i32(tag, &mut body)?,
            },
            b'Z' => BackendMessage::ReadyForQuery {
                status: read_u8(tag, &mut body)?,
            },
            b'T' => {
                let n = read_i16(tag, &mut body)?;
                let n = usize::try_from(n).map_err(|_| ProtocolError::Malformed {
                    tag,
                    what: "negative column count",
                })?;
                let mut fields = Vec::with_capacity(n.min(body.len() / 19));
                for _ in 0..n {
                    fields.push(FieldDescription {
                        name: read_cstr(tag, &mut body)?,
                        table_oid: read_i32(tag, &mut body)? as u32,
                        column_id: read_i16(tag, &mut body)?,
                        type_oid: read_i32(tag, &mut body)? as u32,
                        type_size: read_i16(tag, &mut body)?,
                        type_modifier: read_i32(tag, &mut body)?,
                        format: read_i16(tag, &mut body)?,
                    });
                }
                BackendMessage::RowDescription(fields)
            }
            b'D' => {
                let n = read_i16(tag, &mut body)?;
                let n = usize::try_from(n).map_err(|_| ProtocolError::Malformed {
                    tag,
                    what: "negative column count",
                })?;
                let mut values = Vec::with_capacity(n.min(body.len() / 4));
                for _ in 0..n {
                    let len = read_i32(tag, &mut body)?;
                    if len == -1 {
                        values.push(None);
                        continue;
                    }
                    let len = usize::try_from(len).map_err(|_| ProtocolError::Malformed {
                        tag,
                        what: "negative value length",
                    })?;
                    if body.len() < len {
                        return Err(ProtocolError::Malformed {
                            tag,
                            what: "value longer than the message",
                        });
                    }
                    values.push(Some(body.split_to(len)));
                }
                BackendMessage::DataRow(values)
            }
            b'C' => BackendMessage::CommandComplete {
                tag: read_cstr(tag, &mut body)?,
            },
            b'I' => BackendMessage::EmptyQueryResponse,
            b'E' => return DbError::parse(tag, body).map(BackendMessage::ErrorResponse),
            b'N' => return DbError::parse(tag, body).map(BackendMessage::NoticeResponse),
            b'W' => BackendMessage::CopyBothResponse(parse_copy_response(tag, &mut body)?),
            b'H' => BackendMessage::CopyOutResponse(parse_copy_response(tag, &mut body)?),
            b'c' => BackendMessage::CopyDone,
            _ => return Ok(BackendMessage::Other { tag, body }),
        };
        expect_end(tag, &body)?;
        Ok(msg)
    }

    /// The message's type byte, for error messages.
    pub fn tag(&self) -> u8 {
        match self {
            BackendMessage::Authentication(_) => b'R',
            BackendMessage::ParameterStatus { .. } => b'S',
            BackendMessage::BackendKeyData { .. } => b'K',
            BackendMessage::ReadyForQuery { .. } => b'Z',
            BackendMessage::RowDescription(_) => b'T',
            BackendMessage::DataRow(_) => b'D',
            BackendMessage::CommandComplete { .. } => b'C',
            BackendMessage::EmptyQueryResponse => b'I',
            BackendMessage::ErrorResponse(_) => b'E',
            BackendMessage::NoticeResponse(_) => b'N',
            BackendMessage::CopyBothResponse(_) => b'W',
            BackendMessage::CopyOutResponse(_) => b'H',
            BackendMessage::CopyData(_) => b'd',
            BackendMessage::CopyDone => b'c',
            BackendMessage::Other { tag, .. } => *tag,
        }
    }
}

fn parse_authentication(body: &mut Bytes) -> Result<Authentication, ProtocolError> {
    const TAG: u8 = b'R';
    let auth = match read_i32(TAG, body)? {
        0 => Authentication::Ok,
        3 => Authentication::CleartextPassword,
        5 => {
            if body.len() < 4 {
                return Err(ProtocolError::Malformed {
                    tag: TAG,
                    what: "MD5 salt shorter than 4 bytes",
                });
            }
            let mut salt = [0; 4];
            body.copy_to_slice(&mut salt);
            Authentication::Md5Password { salt }
        }
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = read_cstr(TAG, body)?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m);
            }
            Authentication::Sasl { mechanisms }
        }
        11 => Authentication::SaslContinue(std::mem::take(body)),
        12 => Authentication::SaslFinal(std::mem::take(body)),
        other => {
            body.clear();
            Authentication::Unsupported(other)
        }
    };
    Ok(auth)
}

fn parse_copy_response(tag: u8, body: &mut Bytes) -> Result<CopyResponse, ProtocolError> {
    let format = read_u8(tag, body)?;
    let n = read_i16(tag, body)?;
    let n = usize::try_from(n).map_err(|_| ProtocolError::Malformed {
        tag,
        what: "negative column count",
    })?;
    let mut column_formats = Vec::with_capacity(n.min(body.len() / 2));
    for _ in 0..n {
        column_formats.push(read_i16(tag, body)?);
    }
    Ok(CopyResponse {
        format,
        column_formats,
    })
}

fn short(tag: u8) -> ProtocolError {
    ProtocolError::Malformed {
        tag,
        what: "body shorter than its fields",
    }
}

fn read_u8(tag: u8, body: &mut Bytes) -> Result<u8, ProtocolError> {
    if body.is_empty() {
        return Err(short(tag));
    }
    Ok(body.get_u8())
}

fn read_i16(tag: u8, body: &mut Bytes) -> Result<i16, ProtocolError> {
    body.try_get_i16().map_err(|_| short(tag))
}

fn read_i32(tag: u8, body: &mut Bytes) -> Result<i32, ProtocolError> {
    body.try_get_i32().map_err(|_| short(tag))
}

fn read_u64(tag: u8, body: &mut Bytes) -> Result<u64, ProtocolError> {
    body.try_get_u64().map_err(|_| short(tag))
}

fn read_cstr(tag: u8, body: &mut Bytes) -> Result<String, ProtocolError> {
    let end = body
        .iter()
        .position(|&b| b == 0)
        .ok_or(ProtocolError::Malformed {
            tag,
            what: "string without terminating NUL",
        })?;
    let s = std::str::from_utf8(&body[..end])
        .map_err(|_| ProtocolError::Malformed {
            tag,
            what: "string is not UTF-8",
        })?
        .to_owned();
    body.advance(end + 1);
    Ok(s)
}

fn expect_end(tag: u8, body: &Bytes) -> Result<(), ProtocolError> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(ProtocolError::Malformed {
            tag,
            what: "trailing bytes after the last field",
        })
    }
}

/// A message the walsender sends inside `CopyData` once streaming has started.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicationMessage {
    /// `w`: WAL data; for logical replication one output-plugin message (pgoutput).
    XLogData {
        /// Where the data starts in the WAL (for pgoutput: the record's LSN, or the commit's
        /// end for a commit message).
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Server clock, microseconds since 2000-01-01 UTC.
        send_time: i64,
        /// The payload, a slice of the received frame.
        data: Bytes,
    },
    /// `k`: primary keepalive.
    PrimaryKeepalive {
        wal_end: Lsn,
        /// Server clock, microseconds since 2000-01-01 UTC.
        send_time: i64,
        /// The server wants a standby status update now, or it may time the session out.
        reply_requested: bool,
    },
}

impl ReplicationMessage {
    /// Parses the payload of one `CopyData` received during replication.
    #[inline]
    pub fn parse(mut data: Bytes) -> Result<ReplicationMessage, ProtocolError> {
        const XLOG: u8 = b'w';
        const KEEPALIVE: u8 = b'k';
        let Some(&tag) = data.first() else {
            return Err(ProtocolError::Malformed {
                tag: b'd',
                what: "empty CopyData",
            });
        };
        data.advance(1);
        match tag {
            XLOG => {
                if data.len() < 24 {
                    return Err(short(XLOG));
                }
                let wal_start = Lsn(read_u64(XLOG, &mut data)?);
                let wal_end = Lsn(read_u64(XLOG, &mut data)?);
                let send_time = read_u64(XLOG, &mut data)? as i64;
                Ok(ReplicationMessage::XLogData {
                    wal_start,
                    wal_end,
                    send_time,
                    data,
                })
            }
            KEEPALIVE => {
                let wal_end = Lsn(read_u64(KEEPALIVE, &mut data)?);
                let send_time = read_u64(KEEPALIVE, &mut data)? as i64;
                let reply = read_u8(KEEPALIVE, &mut data)?;
                expect_end(KEEPALIVE, &data)?;
                Ok(ReplicationMessage::PrimaryKeepalive {
                    wal_end,
                    send_time,
                    reply_requested: reply != 0,
                })
            }
            tag => Err(ProtocolError::UnknownReplicationMessage { tag }),
        }
    }
}

/// The standby status update (`r`) a client sends to report its progress.
///
/// The server treats `flush` as "safe to forget": for a logical slot it becomes
/// `confirmed_flush_lsn`, and WAL before it may be recycled. Report there only what is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatusUpdate {
    /// Last WAL byte + 1 received and written.
    pub write: Lsn,
    /// Last WAL byte + 1 durably stored.
    pub flush: Lsn,
    /// Last WAL byte + 1 applied.
    pub apply: Lsn,
    /// Client clock, microseconds since 2000-01-01 UTC.
    pub client_time: i64,
    /// Ask the server to answer with a keepalive right away.
    pub reply_requested: bool,
}

impl StandbyStatusUpdate {
    /// Length of the `CopyData` payload.
    pub const PAYLOAD_LEN: usize = 34;

    /// The `CopyData` payload: `r`, three LSNs, the clock and the reply flag.
    pub fn encode(&self) -> [u8; Self::PAYLOAD_LEN] {
        let mut out = [0u8; Self::PAYLOAD_LEN];
        let mut w = &mut out[..];
        w.put_u8(b'r');
        w.put_u64(self.write.0);
        w.put_u64(self.flush.0);
        w.put_u64(self.apply.0);
        w.put_i64(self.client_time);
        w.put_u8(u8::from(self.reply_requested));
        out
    }

    /// Appends the whole frontend `CopyData` message to `out`.
    pub fn write_message(&self, out: &mut BytesMut) {
        let payload = self.encode();
        frontend::CopyData::new(&payload[..])
            .expect("34 bytes fit a message")
            .write(out);
    }
}

/// `t` as microseconds since 2000-01-01 UTC, PostgreSQL's `TimestampTz` epoch.
pub fn pg_timestamp(t: SystemTime) -> i64 {
    let unix = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    };
    unix.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

/// The current time as microseconds since 2000-01-01 UTC.
pub fn pg_now() -> i64 {
    pg_timestamp(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Parses `bytes` fed in two pieces at every split point, checking that no prefix yields
    /// a message or consumes input, then that the whole frame yields exactly one message.
    fn parse_all_splits(bytes: &[u8]) -> BackendMessage {
        for k in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..k]);
            assert_eq!(BackendMessage::parse(&mut buf).unwrap(), None, "split {k}");
            assert_eq!(&buf[..], &bytes[..k], "split {k} consumed input");
            buf.extend_from_slice(&bytes[k..]);
            let m = BackendMessage::parse(&mut buf).unwrap().expect("complete");
            assert!(buf.is_empty());
            assert_eq!(m, parse_one(bytes));
        }
        parse_one(bytes)
    }

    fn parse_one(bytes: &[u8]) -> BackendMessage {
        let mut buf = BytesMut::from(bytes);
        let m = BackendMessage::parse(&mut buf).unwrap().expect("complete");
        assert!(buf.is_empty(), "{} bytes left", buf.len());
        m
    }

    fn cstrs(parts: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        for p in parts {
            v.extend_from_slice(p.as_bytes());
            v.push(0);
        }
        v
    }

    #[test]
    fn authentication_requests() {
        let m = parse_all_splits(&frame(b'R', &0i32.to_be_bytes()));
        assert_eq!(m, BackendMessage::Authentication(Authentication::Ok));
        let m = parse_all_splits(&frame(b'R', &3i32.to_be_bytes()));
        assert_eq!(
            m,
            BackendMessage::Authentication(Authentication::CleartextPassword)
        );
        let m = parse_all_splits(&frame(b'R', &[0, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef]));
        assert_eq!(
            m,
            BackendMessage::Authentication(Authentication::Md5Password {
                salt: [0xde, 0xad, 0xbe, 0xef]
            })
        );
        let mut body = 10i32.to_be_bytes().to_vec();
        body.extend(cstrs(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", ""]));
        let m = parse_all_splits(&frame(b'R', &body));
        assert_eq!(
            m,
            BackendMessage::Authentication(Authentication::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()]
            })
        );
        let mut body = 11i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"r=abc,s=c2FsdA==,i=4096");
        let m = parse_all_splits(&frame(b'R', &body));
        assert_eq!(
            m,
            BackendMessage::Authentication(Authentication::SaslContinue(Bytes::from_static(
                b"r=abc,s=c2FsdA==,i=4096"
            )))
        );
        let mut body = 12i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"v=sig");
        let m = parse_all_splits(&frame(b'R', &body));
        assert_eq!(
            m,
            BackendMessage::Authentication(Authentication::SaslFinal(Bytes::from_static(b"v=sig")))
        );
        let m = parse_one(&frame(b'R', &7i32.to_be_bytes()));
        assert_eq!(
            m,
            BackendMessage::Authentication(Authentication::Unsupported(7))
        );
        let err = BackendMessage::parse(&mut BytesMut::from(&frame(b'R', &[0, 0, 0, 5, 1])[..]))
            .unwrap_err();
        assert!(matches!(err, ProtocolError::Malformed { tag: b'R', .. }));
    }

    #[test]
    fn session_messages() {
        let m = parse_all_splits(&frame(b'S', &cstrs(&["server_version", "15.6"])));
        assert_eq!(
            m,
            BackendMessage::ParameterStatus {
                name: "server_version".into(),
                value: "15.6".into()
            }
        );
        let mut body = 4242i32.to_be_bytes().to_vec();
        body.extend_from_slice(&(-7i32).to_be_bytes());
        let m = parse_all_splits(&frame(b'K', &body));
        assert_eq!(
            m,
            BackendMessage::BackendKeyData {
                process_id: 4242,
                secret_key: -7
            }
        );
        let m = parse_all_splits(&frame(b'Z', b"I"));
        assert_eq!(m, BackendMessage::ReadyForQuery { status: b'I' });
        let m = parse_all_splits(&frame(b'C', &cstrs(&["CREATE_REPLICATION_SLOT"])));
        assert_eq!(
            m,
            BackendMessage::CommandComplete {
                tag: "CREATE_REPLICATION_SLOT".into()
            }
        );
        assert_eq!(
            parse_all_splits(&frame(b'I', b"")),
            BackendMessage::EmptyQueryResponse
        );
        assert_eq!(
            parse_all_splits(&frame(b'A', b"xyz")),
            BackendMessage::Other {
                tag: b'A',
                body: Bytes::from_static(b"xyz")
            }
        );
    }

    #[test]
    fn rows() {
        let mut body = 2i16.to_be_bytes().to_vec();
        for (name, typ) in [("systemid", 25u32), ("timeline", 23)] {
            body.extend(cstrs(&[name]));
            body.extend_from_slice(&0u32.to_be_bytes());
            body.extend_from_slice(&0i16.to_be_bytes());
            body.extend_from_slice(&typ.to_be_bytes());
            body.extend_from_slice(&(-1i16).to_be_bytes());
            body.extend_from_slice(&(-1i32).to_be_bytes());
            body.extend_from_slice(&0i16.to_be_bytes());
        }
        let BackendMessage::RowDescription(fields) = parse_all_splits(&frame(b'T', &body)) else {
            panic!()
        };
        assert_eq!(fields.len(), 2);
        assert_eq!(fields[0].name, "systemid");
        assert_eq!(fields[1].type_oid, 23);
        assert_eq!(fields[1].type_size, -1);

        let mut body = 3i16.to_be_bytes().to_vec();
        body.extend_from_slice(&5i32.to_be_bytes());
        body.extend_from_slice(b"hello");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i32.to_be_bytes());
        let m = parse_all_splits(&frame(b'D', &body));
        assert_eq!(
            m,
            BackendMessage::DataRow(vec![
                Some(Bytes::from_static(b"hello")),
                None,
                Some(Bytes::new())
            ])
        );

        let mut bad = 1i16.to_be_bytes().to_vec();
        bad.extend_from_slice(&10i32.to_be_bytes());
        bad.extend_from_slice(b"short");
        let err = BackendMessage::parse(&mut BytesMut::from(&frame(b'D', &bad)[..])).unwrap_err();
        assert!(matches!(err, ProtocolError::Malformed { tag: b'D', .. }));
    }

    #[test]
    fn errors_and_notices() {
        let mut body = Vec::new();
        for (f, v) in [
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', "28P01"),
            (b'M', "password authentication failed for user \"app\""),
            (b'D', "some detail"),
            (b'H', "some hint"),
            (b'F', "auth.c"),
            (b'L', "330"),
            (b'R', "auth_failed"),
            (b'Z', "unknown field type is skipped"),
        ] {
            body.push(f);
            body.extend(cstrs(&[v]));
        }
        body.push(0);
        let BackendMessage::ErrorResponse(e) = parse_all_splits(&frame(b'E', &body)) else {
            panic!()
        };
        assert_eq!(e.severity(), "FATAL");
        assert_eq!(e.code(), "28P01");
        assert_eq!(
            e.message(),
            "password authentication failed for user \"app\""
        );
        assert_eq!(e.detail(), Some("some detail"));
        assert_eq!(e.hint(), Some("some hint"));
        assert_eq!(e.routine(), Some("auth_failed"));
        assert_eq!(e.table(), None);
        let shown = e.to_string();
        assert!(
            shown.contains("28P01") && shown.contains("HINT: some hint"),
            "{shown}"
        );

        let mut body = Vec::new();
        for (f, v) in [(b'S', "WARNING"), (b'C', "01000"), (b'M', "careful")] {
            body.push(f);
            body.extend(cstrs(&[v]));
        }
        body.push(0);
        let BackendMessage::NoticeResponse(n) = parse_all_splits(&frame(b'N', &body)) else {
            panic!()
        };
        assert_eq!(
            (n.severity(), n.code(), n.message()),
            ("WARNING", "01000", "careful")
        );

        let err = BackendMessage::parse(&mut BytesMut::from(
            &frame(b'E', b"SERROR\0Mno code\0\0")[..],
        ))
        .unwrap_err();
        assert!(matches!(err, ProtocolError::Malformed { tag: b'E', .. }));
    }

    #[test]
    fn copy_messages() {
        let m = parse_all_splits(&frame(b'W', &[0, 0, 0]));
        assert_eq!(
            m,
            BackendMessage::CopyBothResponse(CopyResponse {
                format: 0,
                column_formats: vec![]
            })
        );
        let m = parse_all_splits(&frame(b'H', &[1, 0, 2, 0, 1, 0, 1]));
        assert_eq!(
            m,
            BackendMessage::CopyOutResponse(CopyResponse {
                format: 1,
                column_formats: vec![1, 1]
            })
        );
        let m = parse_all_splits(&frame(b'd', b"w payload"));
        assert_eq!(
            m,
            BackendMessage::CopyData(Bytes::from_static(b"w payload"))
        );
        assert_eq!(
            parse_all_splits(&frame(b'c', b"")),
            BackendMessage::CopyDone
        );
        let err = BackendMessage::parse(&mut BytesMut::from(&frame(b'c', b"x")[..])).unwrap_err();
        assert!(matches!(err, ProtocolError::Malformed { tag: b'c', .. }));
    }

    #[test]
    fn copy_data_is_a_slice_of_the_receive_buffer() {
        let mut buf = BytesMut::with_capacity(1024);
        buf.extend_from_slice(&frame(b'd', b"abcdef"));
        buf.extend_from_slice(&frame(b'd', b"ghi"));
        let base = buf.as_ptr() as usize;
        let Some(BackendMessage::CopyData(a)) = BackendMessage::parse(&mut buf).unwrap() else {
            panic!()
        };
        let Some(BackendMessage::CopyData(b)) = BackendMessage::parse(&mut buf).unwrap() else {
            panic!()
        };
        assert_eq!((&a[..], &b[..]), (&b"abcdef"[..], &b"ghi"[..]));
        assert_eq!(a.as_ptr() as usize, base + 5);
        assert_eq!(b.as_ptr() as usize, base + 5 + 6 + 5);
        assert_eq!(BackendMessage::parse(&mut buf).unwrap(), None);
    }

    #[test]
    fn several_messages_in_one_buffer_come_out_in_order() {
        let mut bytes = frame(b'C', &cstrs(&["SELECT 1"]));
        bytes.extend(frame(b'Z', b"I"));
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(matches!(
            BackendMessage::parse(&mut buf).unwrap(),
            Some(BackendMessage::CommandComplete { .. })
        ));
        assert!(matches!(
            BackendMessage::parse(&mut buf).unwrap(),
            Some(BackendMessage::ReadyForQuery { status: b'I' })
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn absurd_lengths_are_rejected_before_buffering() {
        let err = BackendMessage::parse(&mut BytesMut::from(&[b'Z', 0, 0, 0, 3][..])).unwrap_err();
        assert_eq!(err, ProtocolError::InvalidLength { tag: b'Z', len: 3 });
        let err = BackendMessage::parse(&mut BytesMut::from(&[b'd', 0x7f, 0xff, 0xff, 0xff][..]))
            .unwrap_err();
        assert!(matches!(err, ProtocolError::TooLong { tag: b'd', .. }));
        let err = BackendMessage::parse(&mut BytesMut::from(&[b'Z', 0, 1, 0, 1][..])).unwrap_err();
        assert!(matches!(err, ProtocolError::TooLong { tag: b'Z', .. }));
        let mut ok = BytesMut::from(&[b'd', 0x00, 0x10, 0x00, 0x00][..]);
        assert_eq!(BackendMessage::parse(&mut ok).unwrap(), None);
        assert!(
            ok.capacity() >= 0x10_0001,
            "reserves room for the whole frame"
        );
        assert!(err.to_string().contains("'Z'"), "{err}");
    }

    #[test]
    fn xlogdata_and_keepalive() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&0x0000_0001_0000_0010u64.to_be_bytes());
        w.extend_from_slice(&0x0000_0001_0000_0080u64.to_be_bytes());
        w.extend_from_slice(&771_234_567_890_123i64.to_be_bytes());
        w.extend_from_slice(b"B\x00\x01");
        let m = ReplicationMessage::parse(Bytes::from(w)).unwrap();
        assert_eq!(
            m,
            ReplicationMessage::XLogData {
                wal_start: "1/10".parse().unwrap(),
                wal_end: "1/80".parse().unwrap(),
                send_time: 771_234_567_890_123,
                data: Bytes::from_static(b"B\x00\x01"),
            }
        );
        let mut empty = vec![b'w'];
        empty.extend_from_slice(&[0; 24]);
        assert!(matches!(
            ReplicationMessage::parse(Bytes::from(empty)).unwrap(),
            ReplicationMessage::XLogData { data, .. } if data.is_empty()
        ));

        for (flag, want) in [(0u8, false), (1, true)] {
            let mut k = vec![b'k'];
            k.extend_from_slice(&0x0000_0002_0000_0000u64.to_be_bytes());
            k.extend_from_slice(&5i64.to_be_bytes());
            k.push(flag);
            assert_eq!(
                ReplicationMessage::parse(Bytes::from(k)).unwrap(),
                ReplicationMessage::PrimaryKeepalive {
                    wal_end: "2/0".parse().unwrap(),
                    send_time: 5,
                    reply_requested: want
                }
            );
        }

        for bad in [
            &b""[..],
            b"w\0\0\0",
            b"k\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            b"x",
        ] {
            assert!(ReplicationMessage::parse(Bytes::copy_from_slice(bad)).is_err());
        }
        let mut long = vec![b'k'];
        long.extend_from_slice(&[0; 18]);
        assert!(ReplicationMessage::parse(Bytes::from(long)).is_err());
    }

    #[test]
    fn standby_status_update_encoding() {
        let s = StandbyStatusUpdate {
            write: Lsn(0x0000_0003_0000_0100),
            flush: Lsn(0x0000_0003_0000_00f0),
            apply: Lsn(0x0000_0003_0000_00e0),
            client_time: 0x0102_0304_0506_0708,
            reply_requested: true,
        };
        let mut want = vec![b'r'];
        want.extend_from_slice(&[0, 0, 0, 3, 0, 0, 1, 0]);
        want.extend_from_slice(&[0, 0, 0, 3, 0, 0, 0, 0xf0]);
        want.extend_from_slice(&[0, 0, 0, 3, 0, 0, 0, 0xe0]);
        want.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        want.push(1);
        assert_eq!(&s.encode()[..], &want[..]);

        let mut out = BytesMut::new();
        s.write_message(&mut out);
        assert_eq!(&out[..], &frame(b'd', &want)[..]);
    }

    #[test]
    fn postgres_epoch() {
        let y2k = UNIX_EPOCH + std::time::Duration::from_secs(946_684_800);
        assert_eq!(pg_timestamp(y2k), 0);
        assert_eq!(
            pg_timestamp(y2k + std::time::Duration::from_micros(1_500_000)),
            1_500_000
        );
        assert_eq!(pg_timestamp(UNIX_EPOCH), -PG_EPOCH_OFFSET_MICROS);
        assert!(pg_now() > 700_000_000_000_000);
    }
}
