//! Payload bytes → [`LogicalMessage`], and Insert/Update/Delete payloads → a borrowed
//! [`RowRef`]. Every read is bounds-checked through [`Reader`]; lengths and counts from the wire
//! are validated against the bytes that remain before anything is allocated or sliced. Both
//! decoders validate row messages with [`Reader::row`] and read tuples with
//! [`TupleValues`](super::TupleValues), so they accept the same bytes and fail with the same
//! errors.

use std::str::Utf8Error;

use bytes::Bytes;

use super::row::{OldKind, RowKind, RowRef, TupleRef, ValueRef};
use super::{
    Begin, Column, Commit, DecodingMessage, Delete, Insert, LogicalMessage, OldTuple, Origin,
    PgTimestamp, Relation, ReplicaIdentity, StreamAbort, StreamCommit, StreamStart, Truncate,
    TupleData, TupleValue, TypeInfo, Update,
};
use crate::lsn::Lsn;

/// The `proto_version` requested in `START_REPLICATION`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum ProtocolVersion {
    /// PostgreSQL 10+: whole transactions, sent at commit.
    #[default]
    V1,
    /// PostgreSQL 14+: adds streaming of large in-progress transactions (`streaming 'on'`).
    V2,
}

impl ProtocolVersion {
    /// The number to pass as `proto_version`.
    pub fn as_u32(self) -> u32 {
        match self {
            ProtocolVersion::V1 => 1,
            ProtocolVersion::V2 => 2,
        }
    }
}

/// Decodes a sequence of payloads from one replication stream.
///
/// Under protocol 2, change, Relation, Type and Message payloads between Stream Start and
/// Stream Stop carry an extra xid; the decoder follows those markers to know. A reader resuming
/// in the middle of a stream block sets that state with [`Decoder::set_in_stream`].
#[derive(Clone, Debug, Default)]
pub struct Decoder {
    version: ProtocolVersion,
    in_stream: bool,
}

impl Decoder {
    pub fn new(version: ProtocolVersion) -> Decoder {
        Decoder {
            version,
            in_stream: false,
        }
    }

    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// Between a Stream Start and its Stream Stop.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    pub fn set_in_stream(&mut self, in_stream: bool) {
        self.in_stream = in_stream;
    }

    /// Decodes one payload. On error the stream state is unchanged.
    pub fn decode(&mut self, payload: &Bytes) -> Result<LogicalMessage, DecodeError> {
        let msg = decode_with(payload, self.version, self.in_stream)?;
        match msg {
            LogicalMessage::StreamStart(_) => self.in_stream = true,
            LogicalMessage::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(msg)
    }
}

/// Decodes one protocol version 1 payload.
pub fn decode(payload: &Bytes) -> Result<LogicalMessage, DecodeError> {
    decode_with(payload, ProtocolVersion::V1, false)
}

/// Decodes a protocol version 1 Insert, Update or Delete payload without copying or allocating:
/// the message is validated in full, and its tuples borrow `payload`.
///
/// `Ok(None)` when the payload is empty or its tag is not 'I', 'U' or 'D'. A malformed row
/// message fails with exactly the [`DecodeError`] that [`decode`] returns for the same bytes.
pub fn decode_row(payload: &[u8]) -> Result<Option<RowRef<'_>>, DecodeError> {
    let Some(&tag) = payload.first() else {
        return Ok(None);
    };
    let kind = match tag {
        b'I' => RowKind::Insert,
        b'U' => RowKind::Update,
        b'D' => RowKind::Delete,
        _ => return Ok(None),
    };
    let mut r = Reader::new(payload, tag);
    let row = r.row(kind)?;
    r.finish()?;
    Ok(Some(row))
}

/// The fields of a Begin payload (`'B' | final_lsn u64 | commit time i64 | xid u32`), read
/// without a full decode; `None` when it is not a whole Begin. Bytes after the fields are not
/// looked at ([`decode`] refuses them).
pub fn peek_begin(payload: &[u8]) -> Option<Begin> {
    (payload.first() == Some(&b'B'))
        .then(|| Reader::new(payload, b'B').begin().ok())
        .flatten()
}

/// The fields of a Commit payload (`'C' | flags u8 | commit_lsn u64 | end_lsn u64 | commit
/// time i64`), read without a full decode: capture takes the end LSN to append and confirm,
/// the buffer the commit time. `None` when it is not a whole Commit. Bytes after the fields
/// are not looked at ([`decode`] refuses them).
pub fn peek_commit(payload: &[u8]) -> Option<Commit> {
    (payload.first() == Some(&b'C'))
        .then(|| Reader::new(payload, b'C').commit().ok())
        .flatten()
}

/// Why a payload is not a valid pgoutput message. Offsets count from the tag byte (offset 0).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,

    #[error("unknown pgoutput message tag {:?} (0x{tag:02X}) for protocol version {}", char::from(*.tag), .version.as_u32())]
    UnknownTag { tag: u8, version: ProtocolVersion },

    #[error("truncated {} message at offset {offset}: expected {expected} ({needed} bytes, {available} left)", message_name(*.tag))]
    Truncated {
        tag: u8,
        offset: usize,
        expected: &'static str,
        needed: usize,
        available: usize,
    },

    #[error("truncated {} message at offset {offset}: {field} has no NUL terminator", message_name(*.tag))]
    Unterminated {
        tag: u8,
        offset: usize,
        field: &'static str,
    },

    #[error("invalid UTF-8 in {field} of {} message at offset {offset}", message_name(*.tag))]
    InvalidUtf8 {
        tag: u8,
        offset: usize,
        field: &'static str,
        #[source]
        source: Utf8Error,
    },

    #[error("invalid {} message at offset {offset}: {field} is {value}", message_name(*.tag))]
    InvalidLength {
        tag: u8,
        offset: usize,
        field: &'static str,
        value: i64,
    },

    #[error("invalid {} message at offset {offset}: expected {expected}, found {:?} (0x{found:02X})", message_name(*.tag), char::from(*.found))]
    Unexpected {
        tag: u8,
        offset: usize,
        expected: &'static str,
        found: u8,
    },

    #[error("{} message has {count} unexpected trailing bytes at offset {offset}", message_name(*.tag))]
    TrailingBytes {
        tag: u8,
        offset: usize,
        count: usize,
    },
}

impl DecodeError {
    /// The tag byte of the message that failed; `None` for an empty payload.
    pub fn tag(&self) -> Option<u8> {
        match self {
            DecodeError::Empty => None,
            DecodeError::UnknownTag { tag, .. }
            | DecodeError::Truncated { tag, .. }
            | DecodeError::Unterminated { tag, .. }
            | DecodeError::InvalidUtf8 { tag, .. }
            | DecodeError::InvalidLength { tag, .. }
            | DecodeError::Unexpected { tag, .. }
            | DecodeError::TrailingBytes { tag, .. } => Some(*tag),
        }
    }

    /// Byte offset in the payload where decoding failed.
    pub fn offset(&self) -> usize {
        match self {
            DecodeError::Empty | DecodeError::UnknownTag { .. } => 0,
            DecodeError::Truncated { offset, .. }
            | DecodeError::Unterminated { offset, .. }
            | DecodeError::InvalidUtf8 { offset, .. }
            | DecodeError::InvalidLength { offset, .. }
            | DecodeError::Unexpected { offset, .. }
            | DecodeError::TrailingBytes { offset, .. } => *offset,
        }
    }
}

fn message_name(tag: u8) -> &'static str {
    match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        _ => "unknown",
    }
}

fn decode_with(
    payload: &Bytes,
    version: ProtocolVersion,
    in_stream: bool,
) -> Result<LogicalMessage, DecodeError> {
    let &tag = payload.first().ok_or(DecodeError::Empty)?;
    let mut r = Reader::new(payload, tag);
    let streamed = version >= ProtocolVersion::V2 && in_stream;
    let msg = match tag {
        b'B' => LogicalMessage::Begin(r.begin()?),
        b'C' => LogicalMessage::Commit(r.commit()?),
        b'O' => LogicalMessage::Origin(Origin {
            commit_lsn: r.lsn("8-byte origin commit LSN")?,
            name: r.cstring("origin name")?,
        }),
        b'R' => LogicalMessage::Relation(r.relation(streamed)?),
        b'Y' => LogicalMessage::Type(TypeInfo {
            xid: r.stream_xid(streamed)?,
            oid: r.u32("4-byte type OID")?,
            namespace: r.cstring("namespace")?,
            name: r.cstring("type name")?,
        }),
        b'I' => owned_row(payload, r.stream_xid(streamed)?, r.row(RowKind::Insert)?),
        b'U' => owned_row(payload, r.stream_xid(streamed)?, r.row(RowKind::Update)?),
        b'D' => owned_row(payload, r.stream_xid(streamed)?, r.row(RowKind::Delete)?),
        b'T' => {
            let xid = r.stream_xid(streamed)?;
            let count = r.count_i32("4-byte relation count", "relation count", 4)?;
            let options = r.u8("1-byte option bits")?;
            let mut relids = Vec::with_capacity(count);
            for _ in 0..count {
                relids.push(r.u32("4-byte relation OID")?);
            }
            LogicalMessage::Truncate(Truncate {
                xid,
                options,
                relids,
            })
        }
        b'M' => {
            let xid = r.stream_xid(streamed)?;
            let flags = r.u8("1-byte flags")?;
            let lsn = r.lsn("8-byte message LSN")?;
            let prefix = r.cstring("prefix")?;
            let len = r.len_i32("4-byte content length", "content length")?;
            let content = payload.slice_ref(r.take(len, "message content")?);
            LogicalMessage::Message(DecodingMessage {
                xid,
                flags,
                lsn,
                prefix,
                content,
            })
        }
        b'S' if version >= ProtocolVersion::V2 => {
            let xid = r.u32("4-byte xid")?;
            let offset = r.pos();
            let first_segment = match r.u8("1-byte first-segment flag")? {
                0 => false,
                1 => true,
                found => return Err(r.unexpected(offset, "first-segment flag 0 or 1", found)),
            };
            LogicalMessage::StreamStart(StreamStart { xid, first_segment })
        }
        b'E' if version >= ProtocolVersion::V2 => LogicalMessage::StreamStop,
        b'c' if version >= ProtocolVersion::V2 => LogicalMessage::StreamCommit(StreamCommit {
            xid: r.u32("4-byte xid")?,
            flags: r.u8("1-byte flags")?,
            commit_lsn: r.lsn("8-byte commit LSN")?,
            end_lsn: r.lsn("8-byte end LSN")?,
            commit_time: r.timestamp("8-byte commit timestamp")?,
        }),
        b'A' if version >= ProtocolVersion::V2 => LogicalMessage::StreamAbort(StreamAbort {
            xid: r.u32("4-byte xid")?,
            subxid: r.u32("4-byte subtransaction xid")?,
        }),
        _ => return Err(DecodeError::UnknownTag { tag, version }),
    };
    r.finish()?;
    Ok(msg)
}

/// The owned form of a validated row message: values are `Bytes` slices of `payload`.
fn owned_row(payload: &Bytes, xid: Option<u32>, row: RowRef<'_>) -> LogicalMessage {
    let tuple = |t: TupleRef<'_>| {
        let mut values = Vec::with_capacity(t.len());
        for v in t.values() {
            values.push(owned_value(payload, v));
        }
        TupleData { values }
    };
    let old = row.old.map(|(kind, t)| match kind {
        OldKind::Key => OldTuple::Key(tuple(t)),
        OldKind::Full => OldTuple::Full(tuple(t)),
    });
    let relid = row.relid;
    match (row.kind, old, row.new) {
        (RowKind::Insert, None, Some(new)) => LogicalMessage::Insert(Insert {
            xid,
            relid,
            new: tuple(new),
        }),
        (RowKind::Update, old, Some(new)) => LogicalMessage::Update(Update {
            xid,
            relid,
            old,
            new: tuple(new),
        }),
        (RowKind::Delete, Some(old), None) => LogicalMessage::Delete(Delete { xid, relid, old }),
        _ => unreachable!("Reader::row returns the tuples its kind has"),
    }
}

fn owned_value(payload: &Bytes, v: ValueRef<'_>) -> TupleValue {
    match v {
        ValueRef::Null => TupleValue::Null,
        ValueRef::UnchangedToast => TupleValue::UnchangedToast,
        ValueRef::Text(b) => TupleValue::Text(slice_of(payload, b)),
        ValueRef::Binary(b) => TupleValue::Binary(slice_of(payload, b)),
    }
}

/// `part`, a slice of `payload`, as a `Bytes` sharing `payload`'s buffer.
fn slice_of(payload: &Bytes, part: &[u8]) -> Bytes {
    let start = (part.as_ptr() as usize).wrapping_sub(payload.as_ptr() as usize);
    payload.slice(start..start + part.len())
}

/// A bounds-checked cursor over one payload.
struct Reader<'a> {
    buf: &'a [u8],
    /// The unread end of `buf`.
    rest: &'a [u8],
    tag: u8,
}

impl<'a> Reader<'a> {
    /// Positioned after the tag byte.
    fn new(buf: &'a [u8], tag: u8) -> Reader<'a> {
        Reader {
            buf,
            rest: buf.get(1..).unwrap_or_default(),
            tag,
        }
    }

    fn pos(&self) -> usize {
        self.buf.len() - self.rest.len()
    }

    fn remaining(&self) -> usize {
        self.rest.len()
    }

    #[cold]
    fn truncated(&self, expected: &'static str, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            tag: self.tag,
            offset: self.pos(),
            expected,
            needed,
            available: self.remaining(),
        }
    }

    #[cold]
    fn unexpected(&self, offset: usize, expected: &'static str, found: u8) -> DecodeError {
        DecodeError::Unexpected {
            tag: self.tag,
            offset,
            expected,
            found,
        }
    }

    fn array<const N: usize>(&mut self, expected: &'static str) -> Result<[u8; N], DecodeError> {
        let Some((&bytes, rest)) = self.rest.split_first_chunk::<N>() else {
            return Err(self.truncated(expected, N));
        };
        self.rest = rest;
        Ok(bytes)
    }

    fn u8(&mut self, expected: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(expected).map(|[b]| b)
    }

    fn i16(&mut self, expected: &'static str) -> Result<i16, DecodeError> {
        self.array(expected).map(i16::from_be_bytes)
    }

    fn i32(&mut self, expected: &'static str) -> Result<i32, DecodeError> {
        self.array(expected).map(i32::from_be_bytes)
    }

    fn u32(&mut self, expected: &'static str) -> Result<u32, DecodeError> {
        self.array(expected).map(u32::from_be_bytes)
    }

    fn lsn(&mut self, expected: &'static str) -> Result<Lsn, DecodeError> {
        self.array(expected).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    fn timestamp(&mut self, expected: &'static str) -> Result<PgTimestamp, DecodeError> {
        self.array(expected)
            .map(|b| PgTimestamp(i64::from_be_bytes(b)))
    }

    /// A Begin's fields: the one place their layout is written ([`peek_begin`], [`decode`]).
    fn begin(&mut self) -> Result<Begin, DecodeError> {
        Ok(Begin {
            final_lsn: self.lsn("8-byte final LSN")?,
            commit_time: self.timestamp("8-byte commit timestamp")?,
            xid: self.u32("4-byte xid")?,
        })
    }

    /// A Commit's fields: the one place their layout is written ([`peek_commit`], [`decode`]).
    fn commit(&mut self) -> Result<Commit, DecodeError> {
        Ok(Commit {
            flags: self.u8("1-byte flags")?,
            commit_lsn: self.lsn("8-byte commit LSN")?,
            end_lsn: self.lsn("8-byte end LSN")?,
            commit_time: self.timestamp("8-byte commit timestamp")?,
        })
    }

    fn stream_xid(&mut self, streamed: bool) -> Result<Option<u32>, DecodeError> {
        if streamed {
            self.u32("4-byte xid of the streamed transaction").map(Some)
        } else {
            Ok(None)
        }
    }

    fn expect_byte(&mut self, want: u8, expected: &'static str) -> Result<(), DecodeError> {
        let offset = self.pos();
        match self.u8(expected)? {
            b if b == want => Ok(()),
            found => Err(self.unexpected(offset, expected, found)),
        }
    }

    /// A signed 32-bit length; negative is an error.
    fn len_i32(
        &mut self,
        expected: &'static str,
        field: &'static str,
    ) -> Result<usize, DecodeError> {
        let offset = self.pos();
        let v = self.i32(expected)?;
        usize::try_from(v).map_err(|_| DecodeError::InvalidLength {
            tag: self.tag,
            offset,
            field,
            value: v.into(),
        })
    }

    /// A signed 32-bit element count, each element at least `min_elem_size` bytes: negative or
    /// more elements than the remaining bytes can hold is an error, so the count is safe to
    /// allocate for.
    fn count_i32(
        &mut self,
        expected: &'static str,
        field: &'static str,
        min_elem_size: usize,
    ) -> Result<usize, DecodeError> {
        let offset = self.pos();
        let v = self.i32(expected)?;
        self.check_count(offset, field, v.into(), min_elem_size)
    }

    fn count_i16(
        &mut self,
        expected: &'static str,
        field: &'static str,
        min_elem_size: usize,
    ) -> Result<usize, DecodeError> {
        let offset = self.pos();
        let v = self.i16(expected)?;
        self.check_count(offset, field, v.into(), min_elem_size)
    }

    fn check_count(
        &self,
        offset: usize,
        field: &'static str,
        value: i64,
        min_elem_size: usize,
    ) -> Result<usize, DecodeError> {
        let invalid = || DecodeError::InvalidLength {
            tag: self.tag,
            offset,
            field,
            value,
        };
        let n = usize::try_from(value).map_err(|_| invalid())?;
        match n.checked_mul(min_elem_size) {
            Some(bytes) if bytes <= self.remaining() => Ok(n),
            _ => Err(invalid()),
        }
    }

    fn take(&mut self, len: usize, expected: &'static str) -> Result<&'a [u8], DecodeError> {
        if len > self.remaining() {
            return Err(self.truncated(expected, len));
        }
        let (out, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(out)
    }

    fn cstring(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let rest = self.rest;
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Unterminated {
                tag: self.tag,
                offset: self.pos(),
                field,
            })?;
        let s = std::str::from_utf8(&rest[..nul]).map_err(|source| DecodeError::InvalidUtf8 {
            tag: self.tag,
            offset: self.pos(),
            field,
            source,
        })?;
        let s = s.to_owned();
        self.rest = &rest[nul + 1..];
        Ok(s)
    }

    fn relation(&mut self, streamed: bool) -> Result<Relation, DecodeError> {
        let xid = self.stream_xid(streamed)?;
        let relid = self.u32("4-byte relation OID")?;
        let namespace = self.cstring("namespace")?;
        let name = self.cstring("relation name")?;
        let offset = self.pos();
        let ri = self.u8("1-byte replica identity")?;
        let replica_identity = ReplicaIdentity::from_byte(ri)
            .ok_or_else(|| self.unexpected(offset, "replica identity 'd', 'n', 'f' or 'i'", ri))?;
        // flags, name NUL, type OID, typmod
        let ncols = self.count_i16("2-byte column count", "column count", 10)?;
        let mut columns = Vec::with_capacity(ncols);
        for _ in 0..ncols {
            columns.push(Column {
                flags: self.u8("1-byte column flags")?,
                name: self.cstring("column name")?,
                type_oid: self.u32("4-byte column type OID")?,
                type_modifier: self.i32("4-byte column type modifier")?,
            });
        }
        Ok(Relation {
            xid,
            relid,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    /// An Insert, Update or Delete after the tag (and any streamed xid), from the relation OID
    /// on.
    fn row(&mut self, kind: RowKind) -> Result<RowRef<'a>, DecodeError> {
        let relid = self.u32("4-byte relation OID")?;
        let (old, new) = match kind {
            RowKind::Insert => {
                self.expect_byte(b'N', "'N' (new tuple)")?;
                (None, Some(self.tuple()?))
            }
            RowKind::Update => {
                let offset = self.pos();
                let old = match self.u8("1-byte 'K', 'O' or 'N'")? {
                    b'N' => None,
                    found => match old_kind(found) {
                        Some(k) => Some((k, self.tuple()?)),
                        None => return Err(self.unexpected(offset, "'K', 'O' or 'N'", found)),
                    },
                };
                if old.is_some() {
                    self.expect_byte(b'N', "'N' (new tuple)")?;
                }
                (old, Some(self.tuple()?))
            }
            RowKind::Delete => {
                let offset = self.pos();
                let found = self.u8("1-byte 'K' or 'O'")?;
                let k =
                    old_kind(found).ok_or_else(|| self.unexpected(offset, "'K' or 'O'", found))?;
                (Some((k, self.tuple()?)), None)
            }
        };
        Ok(RowRef {
            kind,
            relid,
            old,
            new,
        })
    }

    /// Validates a tuple: its column count, then each value's kind and length.
    fn tuple(&mut self) -> Result<TupleRef<'a>, DecodeError> {
        let ncols = self.count_i16("2-byte column count", "tuple column count", 1)?;
        let start = self.rest;
        for _ in 0..ncols {
            let offset = self.pos();
            match self.u8("1-byte value kind")? {
                b'n' | b'u' => {}
                b't' | b'b' => {
                    let len = self.len_i32("4-byte column length", "column length")?;
                    self.take(len, "column value")?;
                }
                found => {
                    return Err(self.unexpected(offset, "value kind 'n', 'u', 't' or 'b'", found));
                }
            }
        }
        let len = start.len() - self.rest.len();
        Ok(TupleRef::validated(&start[..len], ncols))
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                tag: self.tag,
                offset: self.pos(),
                count,
            }),
        }
    }
}

fn old_kind(b: u8) -> Option<OldKind> {
    match b {
        b'K' => Some(OldKind::Key),
        b'O' => Some(OldKind::Full),
        _ => None,
    }
}
