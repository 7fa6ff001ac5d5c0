//! The pgoutput decoder: one XLogData payload (starting with its tag byte) in, one typed
//! [`LogicalMessage`] out.
//!
//! It is pure — no I/O, no catalog — so capture can store raw payloads and replay can decode
//! them later, and so it can be tested and fuzzed on bytes alone. Tuple values are `Bytes`
//! slices of the payload (no copy); names are small `String`s. Malformed input is a
//! [`DecodeError`] naming the message, the byte offset and what was expected, never a panic.
//!
//! [`decode_row`] is the hot-path alternative for Insert, Update and Delete: it validates the
//! message and returns a [`RowRef`] whose values borrow the payload, allocating nothing.
//!
//! [`peek_begin`] and [`peek_commit`] read a Begin's or Commit's fixed fields without a full
//! decode: capture classifies the stream with them and the buffer reads commit times. The
//! layout of each message is written once, in `decode`'s reader, which both decoders and the
//! peeks share. This module depends on nothing else in walshift but [`crate::lsn`], so the
//! buffer, which stores these messages, can read them from here without an import cycle.
//!
//! [`decode`] speaks protocol version 1. [`Decoder`] carries the protocol version and, for
//! version 2, whether the stream is inside a Stream Start / Stream Stop block (where change
//! messages carry the xid of the in-progress transaction). The [`encode`] module is the
//! inverse, for tests and benches.

mod decode;
pub mod encode;
mod row;
#[cfg(test)]
mod tests;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::lsn::Lsn;

pub use decode::{
    DecodeError, Decoder, ProtocolVersion, decode, decode_row, peek_begin, peek_commit,
};
pub use row::{OldKind, RowKind, RowRef, TupleRef, TupleValues, ValueRef};

/// The tag byte of a payload, without decoding it.
pub fn peek_tag(payload: &[u8]) -> Option<u8> {
    payload.first().copied()
}

/// A PostgreSQL `TimestampTz` as sent on the wire: microseconds since 2000-01-01 00:00 UTC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Seconds from the Unix epoch to the PostgreSQL epoch (2000-01-01).
    pub const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

    /// Microseconds since the PostgreSQL epoch (negative before it).
    pub fn micros(self) -> i64 {
        self.0
    }

    /// The wall-clock time, or `None` if it does not fit a `SystemTime` (e.g. ±infinity).
    pub fn to_system_time(self) -> Option<SystemTime> {
        let pg_epoch = UNIX_EPOCH.checked_add(Duration::from_secs(Self::PG_EPOCH_UNIX_SECS))?;
        let offset = Duration::from_micros(self.0.unsigned_abs());
        if self.0 >= 0 {
            pg_epoch.checked_add(offset)
        } else {
            pg_epoch.checked_sub(offset)
        }
    }

    /// The timestamp of a wall-clock time, or `None` outside the representable range.
    pub fn from_system_time(t: SystemTime) -> Option<PgTimestamp> {
        let pg_epoch = UNIX_EPOCH + Duration::from_secs(Self::PG_EPOCH_UNIX_SECS);
        match t.duration_since(pg_epoch) {
            Ok(d) => i64::try_from(d.as_micros()).ok().map(PgTimestamp),
            Err(e) => i64::try_from(e.duration().as_micros())
                .ok()
                .map(|m| PgTimestamp(-m)),
        }
    }
}

/// One decoded pgoutput message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogicalMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeInfo),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(DecodingMessage),
    /// Protocol version 2 only.
    StreamStart(StreamStart),
    /// Protocol version 2 only.
    StreamStop,
    /// Protocol version 2 only.
    StreamCommit(StreamCommit),
    /// Protocol version 2 only.
    StreamAbort(StreamAbort),
}

impl LogicalMessage {
    /// The wire tag byte of this message.
    pub fn tag(&self) -> u8 {
        match self {
            LogicalMessage::Begin(_) => b'B',
            LogicalMessage::Commit(_) => b'C',
            LogicalMessage::Origin(_) => b'O',
            LogicalMessage::Relation(_) => b'R',
            LogicalMessage::Type(_) => b'Y',
            LogicalMessage::Insert(_) => b'I',
            LogicalMessage::Update(_) => b'U',
            LogicalMessage::Delete(_) => b'D',
            LogicalMessage::Truncate(_) => b'T',
            LogicalMessage::Message(_) => b'M',
            LogicalMessage::StreamStart(_) => b'S',
            LogicalMessage::StreamStop => b'E',
            LogicalMessage::StreamCommit(_) => b'c',
            LogicalMessage::StreamAbort(_) => b'A',
        }
    }
}

/// Start of a transaction ('B').
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: u32,
}

/// End of a transaction ('C').
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Currently always 0; kept as sent.
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to confirm once the transaction is durable.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

/// The transaction came from another node through replication origin `name` ('O').
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Commit LSN on the origin server.
    pub commit_lsn: Lsn,
    pub name: String,
}

/// A table's shape, sent before the first change to it in a session and after it changes ('R').
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    /// Protocol 2, inside a stream block only: xid of the (sub)transaction that sent it.
    pub xid: Option<u32>,
    /// The table's OID, which change messages refer to.
    pub relid: u32,
    /// Schema name; empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    /// Columns in tuple order (generated columns are not sent).
    pub columns: Vec<Column>,
}

/// `pg_class.relreplident`: which old values Update and Delete messages carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReplicaIdentity {
    /// 'd': the primary key.
    Default,
    /// 'n': nothing.
    Nothing,
    /// 'f': the whole old row.
    Full,
    /// 'i': the columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// The `relreplident` byte.
    pub fn as_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }

    /// The setting a `relreplident` byte names.
    pub fn from_byte(b: u8) -> Option<ReplicaIdentity> {
        match b {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }
}

/// One column of a [`Relation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Bit 0 set: part of the replica identity key. Other bits are kept as sent.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`, -1 when the type has none.
    pub type_modifier: i32,
}

impl Column {
    /// Part of the replica identity key.
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// A data type's name, sent before a relation that uses a non-built-in type ('Y').
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeInfo {
    /// Protocol 2, inside a stream block only: xid of the (sub)transaction that sent it.
    pub xid: Option<u32>,
    pub oid: u32,
    /// Schema name; empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
}

/// A row inserted ('I').
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Insert {
    /// Protocol 2, inside a stream block only: xid of the (sub)transaction that sent it.
    pub xid: Option<u32>,
    pub relid: u32,
    pub new: TupleData,
}

/// A row updated ('U').
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// Protocol 2, inside a stream block only: xid of the (sub)transaction that sent it.
    pub xid: Option<u32>,
    pub relid: u32,
    /// The old key when it changed, or the whole old row under REPLICA IDENTITY FULL.
    pub old: Option<OldTuple>,
    /// The new row; values not sent because they are unchanged TOAST are
    /// [`TupleValue::UnchangedToast`].
    pub new: TupleData,
}

/// A row deleted ('D').
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delete {
    /// Protocol 2, inside a stream block only: xid of the (sub)transaction that sent it.
    pub xid: Option<u32>,
    pub relid: u32,
    pub old: OldTuple,
}

/// The old image in an Update or Delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OldTuple {
    /// 'K': only the replica identity columns are meaningful; the others are null.
    Key(TupleData),
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full(TupleData),
}

impl OldTuple {
    pub fn tuple(&self) -> &TupleData {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// Tables truncated ('T').
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncate {
    /// Protocol 2, inside a stream block only: xid of the (sub)transaction that sent it.
    pub xid: Option<u32>,
    /// Bit 0: CASCADE, bit 1: RESTART IDENTITY. Other bits are kept as sent.
    pub options: u8,
    pub relids: Vec<u32>,
}

impl Truncate {
    pub const CASCADE: u8 = 1;
    pub const RESTART_IDENTITY: u8 = 2;

    pub fn cascade(&self) -> bool {
        self.options & Self::CASCADE != 0
    }

    pub fn restart_identity(&self) -> bool {
        self.options & Self::RESTART_IDENTITY != 0
    }
}

/// A message written with `pg_logical_emit_message` ('M'); walshift's cutover marker is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodingMessage {
    /// Protocol 2, inside a stream block only: xid of the (sub)transaction that sent it.
    pub xid: Option<u32>,
    /// Bit 0: transactional. Other bits are kept as sent.
    pub flags: u8,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

impl DecodingMessage {
    /// Emitted with `transactional => true`: delivered inside its transaction, at its commit.
    pub fn is_transactional(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// Start of a block of changes of an in-progress transaction ('S', protocol 2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStart {
    /// The top-level transaction.
    pub xid: u32,
    /// The first block streamed for this xid.
    pub first_segment: bool,
}

/// A streamed transaction committed ('c', protocol 2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: u32,
    /// Currently always 0; kept as sent.
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

/// A streamed transaction, or one of its subtransactions, aborted ('A', protocol 2): the
/// changes streamed with xid `subxid` are void (all of the transaction's when `subxid == xid`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamAbort {
    /// The top-level transaction.
    pub xid: u32,
    pub subxid: u32,
}

/// The column values of one row, in the relation's column order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TupleData {
    pub values: Vec<TupleValue>,
}

impl TupleData {
    /// A row of text-format values; `None` is NULL.
    pub fn text<'a>(values: impl IntoIterator<Item = Option<&'a str>>) -> TupleData {
        TupleData {
            values: values
                .into_iter()
                .map(|v| match v {
                    Some(s) => TupleValue::Text(Bytes::copy_from_slice(s.as_bytes())),
                    None => TupleValue::Null,
                })
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// One column value of a row.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TupleValue {
    /// 'n'
    Null,
    /// 'u': a TOASTed value the change did not touch; the previous value stands.
    UnchangedToast,
    /// 't': the type's text output.
    Text(Bytes),
    /// 'b': the type's binary send format (publication option `binary`).
    Binary(Bytes),
}

impl TupleValue {
    /// The value's bytes, for text and binary values.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            TupleValue::Text(b) | TupleValue::Binary(b) => Some(b),
            TupleValue::Null | TupleValue::UnchangedToast => None,
        }
    }

    /// The text value as UTF-8, if it is a text value and valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            TupleValue::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}
