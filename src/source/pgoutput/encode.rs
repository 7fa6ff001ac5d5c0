//! [`LogicalMessage`] → payload bytes, the inverse of the decoder.
//!
//! A test and bench aid: it builds realistic payloads for decoder round trips, buffer and
//! replay tests and benchmarks. walshift never sends these messages. `xid` fields that are
//! `Some` are written, as a protocol 2 server does inside a stream block.
//!
//! Panics on values the wire format cannot carry: a NUL inside a string, a value or content
//! longer than `i32::MAX` bytes, more than `i16::MAX` columns or `i32::MAX` relations.

use bytes::{BufMut, Bytes, BytesMut};

use super::{LogicalMessage, OldTuple, TupleData, TupleValue};

/// Encodes one message into a new buffer.
pub fn encode(msg: &LogicalMessage) -> Bytes {
    let mut out = BytesMut::new();
    encode_into(msg, &mut out);
    out.freeze()
}

/// Appends one message to `out`.
pub fn encode_into(msg: &LogicalMessage, out: &mut BytesMut) {
    out.put_u8(msg.tag());
    match msg {
        LogicalMessage::Begin(m) => {
            out.put_u64(m.final_lsn.0);
            out.put_i64(m.commit_time.0);
            out.put_u32(m.xid);
        }
        LogicalMessage::Commit(m) => {
            out.put_u8(m.flags);
            out.put_u64(m.commit_lsn.0);
            out.put_u64(m.end_lsn.0);
            out.put_i64(m.commit_time.0);
        }
        LogicalMessage::Origin(m) => {
            out.put_u64(m.commit_lsn.0);
            put_cstring(out, &m.name);
        }
        LogicalMessage::Relation(m) => {
            put_xid(out, m.xid);
            out.put_u32(m.relid);
            put_cstring(out, &m.namespace);
            put_cstring(out, &m.name);
            out.put_u8(m.replica_identity.as_byte());
            out.put_i16(i16::try_from(m.columns.len()).expect("more than i16::MAX columns"));
            for c in &m.columns {
                out.put_u8(c.flags);
                put_cstring(out, &c.name);
                out.put_u32(c.type_oid);
                out.put_i32(c.type_modifier);
            }
        }
        LogicalMessage::Type(m) => {
            put_xid(out, m.xid);
            out.put_u32(m.oid);
            put_cstring(out, &m.namespace);
            put_cstring(out, &m.name);
        }
        LogicalMessage::Insert(m) => {
            put_xid(out, m.xid);
            out.put_u32(m.relid);
            out.put_u8(b'N');
            put_tuple(out, &m.new);
        }
        LogicalMessage::Update(m) => {
            put_xid(out, m.xid);
            out.put_u32(m.relid);
            if let Some(old) = &m.old {
                put_old(out, old);
            }
            out.put_u8(b'N');
            put_tuple(out, &m.new);
        }
        LogicalMessage::Delete(m) => {
            put_xid(out, m.xid);
            out.put_u32(m.relid);
            put_old(out, &m.old);
        }
        LogicalMessage::Truncate(m) => {
            put_xid(out, m.xid);
            out.put_i32(i32::try_from(m.relids.len()).expect("more than i32::MAX relations"));
            out.put_u8(m.options);
            for &relid in &m.relids {
                out.put_u32(relid);
            }
        }
        LogicalMessage::Message(m) => {
            put_xid(out, m.xid);
            out.put_u8(m.flags);
            out.put_u64(m.lsn.0);
            put_cstring(out, &m.prefix);
            put_len(out, m.content.len());
            out.put_slice(&m.content);
        }
        LogicalMessage::StreamStart(m) => {
            out.put_u32(m.xid);
            out.put_u8(u8::from(m.first_segment));
        }
        LogicalMessage::StreamStop => {}
        LogicalMessage::StreamCommit(m) => {
            out.put_u32(m.xid);
            out.put_u8(m.flags);
            out.put_u64(m.commit_lsn.0);
            out.put_u64(m.end_lsn.0);
            out.put_i64(m.commit_time.0);
        }
        LogicalMessage::StreamAbort(m) => {
            out.put_u32(m.xid);
            out.put_u32(m.subxid);
        }
    }
}

fn put_xid(out: &mut BytesMut, xid: Option<u32>) {
    if let Some(xid) = xid {
        out.put_u32(xid);
    }
}

fn put_cstring(out: &mut BytesMut, s: &str) {
    assert!(!s.contains('\0'), "string {s:?} contains NUL");
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

fn put_len(out: &mut BytesMut, len: usize) {
    out.put_i32(i32::try_from(len).expect("value longer than i32::MAX bytes"));
}

fn put_old(out: &mut BytesMut, old: &OldTuple) {
    match old {
        OldTuple::Key(t) => {
            out.put_u8(b'K');
            put_tuple(out, t);
        }
        OldTuple::Full(t) => {
            out.put_u8(b'O');
            put_tuple(out, t);
        }
    }
}

fn put_tuple(out: &mut BytesMut, t: &TupleData) {
    out.put_i16(i16::try_from(t.values.len()).expect("more than i16::MAX columns"));
    for v in &t.values {
        match v {
            TupleValue::Null => out.put_u8(b'n'),
            TupleValue::UnchangedToast => out.put_u8(b'u'),
            TupleValue::Text(b) => {
                out.put_u8(b't');
                put_len(out, b.len());
                out.put_slice(b);
            }
            TupleValue::Binary(b) => {
                out.put_u8(b'b');
                put_len(out, b.len());
                out.put_slice(b);
            }
        }
    }
}
