//! Fixtures are written field by field from the documented message formats ("Logical
//! Replication Message Formats" in the PostgreSQL protocol chapter), independently of the
//! encoder; round trips and no-panic properties follow.

use bytes::Bytes;
use proptest::prelude::*;

use super::encode::encode;
use super::*;

/// Concatenates big-endian fields into one payload.
fn wire(parts: &[&[u8]]) -> Bytes {
    Bytes::from(parts.concat())
}

const LSN: u64 = 0x0000_0001_6AB0_0028;
const END_LSN: u64 = 0x0000_0001_6AB0_0058;
// 2024-05-01 12:00:00 UTC in microseconds since 2000-01-01
const TS: i64 = 767_880_000_000_000;

#[test]
fn begin() {
    let p = wire(&[
        b"B",
        &LSN.to_be_bytes(),
        &TS.to_be_bytes(),
        &748u32.to_be_bytes(),
    ]);
    assert_eq!(
        decode(&p).unwrap(),
        LogicalMessage::Begin(Begin {
            final_lsn: Lsn(LSN),
            commit_time: PgTimestamp(TS),
            xid: 748,
        })
    );
}

#[test]
fn commit() {
    let p = wire(&[
        b"C",
        &[0],
        &LSN.to_be_bytes(),
        &END_LSN.to_be_bytes(),
        &TS.to_be_bytes(),
    ]);
    assert_eq!(
        decode(&p).unwrap(),
        LogicalMessage::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(LSN),
            end_lsn: Lsn(END_LSN),
            commit_time: PgTimestamp(TS),
        })
    );
}

#[test]
fn origin() {
    let p = wire(&[b"O", &LSN.to_be_bytes(), b"pg_16389\0"]);
    assert_eq!(
        decode(&p).unwrap(),
        LogicalMessage::Origin(Origin {
            commit_lsn: Lsn(LSN),
            name: "pg_16389".into(),
        })
    );
}

#[test]
fn relation() {
    let p = wire(&[
        b"R",
        &16385u32.to_be_bytes(),
        b"public\0",
        b"accounts\0",
        b"d",
        &3i16.to_be_bytes(),
        // id bigint, key
        &[1],
        b"id\0",
        &20u32.to_be_bytes(),
        &(-1i32).to_be_bytes(),
        // owner varchar(40): typmod = 40 + VARHDRSZ
        &[0],
        b"owner\0",
        &1043u32.to_be_bytes(),
        &44i32.to_be_bytes(),
        // note text
        &[0],
        b"note\0",
        &25u32.to_be_bytes(),
        &(-1i32).to_be_bytes(),
    ]);
    let LogicalMessage::Relation(r) = decode(&p).unwrap() else {
        panic!("not a Relation")
    };
    assert_eq!(r.xid, None);
    assert_eq!(r.relid, 16385);
    assert_eq!(r.namespace, "public");
    assert_eq!(r.name, "accounts");
    assert_eq!(r.replica_identity, ReplicaIdentity::Default);
    let cols: Vec<_> = r
        .columns
        .iter()
        .map(|c| (c.is_key(), c.name.as_str(), c.type_oid, c.type_modifier))
        .collect();
    assert_eq!(
        cols,
        [
            (true, "id", 20, -1),
            (false, "owner", 1043, 44),
            (false, "note", 25, -1)
        ]
    );
}

#[test]
fn relation_replica_identities_and_no_columns() {
    for (b, ri) in [
        (b'd', ReplicaIdentity::Default),
        (b'n', ReplicaIdentity::Nothing),
        (b'f', ReplicaIdentity::Full),
        (b'i', ReplicaIdentity::Index),
    ] {
        let p = wire(&[
            b"R",
            &7u32.to_be_bytes(),
            b"\0t\0",
            &[b],
            &0i16.to_be_bytes(),
        ]);
        let LogicalMessage::Relation(r) = decode(&p).unwrap() else {
            panic!()
        };
        assert_eq!((r.replica_identity, r.namespace.as_str()), (ri, ""));
        assert!(r.columns.is_empty());
    }
    let p = wire(&[
        b"R",
        &7u32.to_be_bytes(),
        b"\0t\0",
        b"x",
        &0i16.to_be_bytes(),
    ]);
    let e = decode(&p).unwrap_err();
    assert_eq!((e.tag(), e.offset()), (Some(b'R'), 8));
    assert!(e.to_string().contains("replica identity"), "{e}");
}

#[test]
fn type_message() {
    let p = wire(&[b"Y", &16390u32.to_be_bytes(), b"public\0", b"mood\0"]);
    assert_eq!(
        decode(&p).unwrap(),
        LogicalMessage::Type(TypeInfo {
            xid: None,
            oid: 16390,
            namespace: "public".into(),
            name: "mood".into(),
        })
    );
}

#[test]
fn insert_with_every_value_kind() {
    let p = wire(&[
        b"I",
        &16385u32.to_be_bytes(),
        b"N",
        &5i16.to_be_bytes(),
        b"t",
        &2i32.to_be_bytes(),
        b"42",
        b"n",
        b"u",
        b"b",
        &8i32.to_be_bytes(),
        &42i64.to_be_bytes(),
        b"t",
        &0i32.to_be_bytes(),
    ]);
    let msg = decode(&p).unwrap();
    assert_eq!(
        msg,
        LogicalMessage::Insert(Insert {
            xid: None,
            relid: 16385,
            new: TupleData {
                values: vec![
                    TupleValue::Text(Bytes::from_static(b"42")),
                    TupleValue::Null,
                    TupleValue::UnchangedToast,
                    TupleValue::Binary(Bytes::copy_from_slice(&42i64.to_be_bytes())),
                    TupleValue::Text(Bytes::new()),
                ]
            },
        })
    );
    // zero-copy: the value is a slice of the payload
    let LogicalMessage::Insert(ins) = msg else {
        unreachable!()
    };
    let v = ins.new.values[0].as_bytes().unwrap();
    assert_eq!(v.as_ptr(), p[13..].as_ptr());
}

#[test]
fn update_without_old_tuple() {
    let p = wire(&[
        b"U",
        &16385u32.to_be_bytes(),
        b"N",
        &2i16.to_be_bytes(),
        b"t",
        &1i32.to_be_bytes(),
        b"1",
        b"u",
    ]);
    assert_eq!(
        decode(&p).unwrap(),
        LogicalMessage::Update(Update {
            xid: None,
            relid: 16385,
            old: None,
            new: TupleData {
                values: vec![
                    TupleValue::Text(Bytes::from_static(b"1")),
                    TupleValue::UnchangedToast
                ]
            },
        })
    );
}

#[test]
fn update_with_key_and_with_full_old_tuple() {
    for (sub, want) in [
        (b"K", OldTuple::Key as fn(TupleData) -> OldTuple),
        (b"O", OldTuple::Full),
    ] {
        let p = wire(&[
            b"U",
            &16385u32.to_be_bytes(),
            sub,
            &2i16.to_be_bytes(),
            b"t",
            &1i32.to_be_bytes(),
            b"1",
            b"n",
            b"N",
            &2i16.to_be_bytes(),
            b"t",
            &1i32.to_be_bytes(),
            b"2",
            b"t",
            &3i32.to_be_bytes(),
            "é!".as_bytes(),
        ]);
        assert_eq!(
            decode(&p).unwrap(),
            LogicalMessage::Update(Update {
                xid: None,
                relid: 16385,
                old: Some(want(TupleData::text([Some("1"), None]))),
                new: TupleData::text([Some("2"), Some("é!")]),
            })
        );
    }
}

#[test]
fn delete_with_key_and_with_full_old_tuple() {
    for (sub, want) in [
        (b"K", OldTuple::Key as fn(TupleData) -> OldTuple),
        (b"O", OldTuple::Full),
    ] {
        let p = wire(&[
            b"D",
            &16385u32.to_be_bytes(),
            sub,
            &1i16.to_be_bytes(),
            b"t",
            &3i32.to_be_bytes(),
            b"123",
        ]);
        assert_eq!(
            decode(&p).unwrap(),
            LogicalMessage::Delete(Delete {
                xid: None,
                relid: 16385,
                old: want(TupleData::text([Some("123")])),
            })
        );
    }
    let p = wire(&[b"D", &16385u32.to_be_bytes(), b"N", &0i16.to_be_bytes()]);
    let e = decode(&p).unwrap_err();
    assert_eq!(e.offset(), 5);
    assert!(
        matches!(e, DecodeError::Unexpected { found: b'N', .. }),
        "{e}"
    );
}

#[test]
fn truncate() {
    let p = wire(&[
        b"T",
        &2i32.to_be_bytes(),
        &[3],
        &16385u32.to_be_bytes(),
        &16390u32.to_be_bytes(),
    ]);
    let LogicalMessage::Truncate(t) = decode(&p).unwrap() else {
        panic!()
    };
    assert_eq!(t.relids, [16385, 16390]);
    assert!(t.cascade() && t.restart_identity());
    let p = wire(&[b"T", &1i32.to_be_bytes(), &[0], &16385u32.to_be_bytes()]);
    let LogicalMessage::Truncate(t) = decode(&p).unwrap() else {
        panic!()
    };
    assert!(!t.cascade() && !t.restart_identity());
}

#[test]
fn logical_decoding_message() {
    let p = wire(&[
        b"M",
        &[1],
        &LSN.to_be_bytes(),
        b"walshift\0",
        &7i32.to_be_bytes(),
        b"cutover",
    ]);
    let LogicalMessage::Message(m) = decode(&p).unwrap() else {
        panic!()
    };
    assert!(m.is_transactional());
    assert_eq!(
        (m.lsn, m.prefix.as_str(), &m.content[..]),
        (Lsn(LSN), "walshift", &b"cutover"[..])
    );
    let p = wire(&[b"M", &[0], &LSN.to_be_bytes(), b"p\0", &0i32.to_be_bytes()]);
    let LogicalMessage::Message(m) = decode(&p).unwrap() else {
        panic!()
    };
    assert!(!m.is_transactional() && m.content.is_empty());
}

#[test]
fn peek_tag_is_first_byte() {
    assert_eq!(peek_tag(b"Ixyz"), Some(b'I'));
    assert_eq!(peek_tag(b""), None);
}

#[test]
fn timestamps_convert_from_the_postgres_epoch() {
    let unix = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
    assert_eq!(PgTimestamp(0).to_system_time(), Some(unix(946_684_800)));
    assert_eq!(
        PgTimestamp(TS).to_system_time(),
        Some(unix(1_714_564_800)),
        "2024-05-01T12:00:00Z"
    );
    assert_eq!(
        PgTimestamp(-1_000_000).to_system_time(),
        Some(unix(946_684_799))
    );
    assert_eq!(
        PgTimestamp::from_system_time(unix(1_714_564_800)),
        Some(PgTimestamp(TS))
    );
    assert_eq!(
        PgTimestamp::from_system_time(UNIX_EPOCH),
        Some(PgTimestamp(-946_684_800_000_000))
    );
}

// ---- errors ----

#[test]
fn error_names_message_offset_and_expectation() {
    // Insert, relid, 'N', 1 column, 't', then only 2 of the 4 length bytes.
    let p = wire(&[
        b"I",
        &1u32.to_be_bytes(),
        b"N",
        &1i16.to_be_bytes(),
        b"t",
        &[0, 0],
    ]);
    let e = decode(&p).unwrap_err();
    assert_eq!((e.tag(), e.offset()), (Some(b'I'), 9));
    assert_eq!(
        e.to_string(),
        "truncated Insert message at offset 9: expected 4-byte column length (4 bytes, 2 left)"
    );
}

#[test]
fn empty_unknown_and_trailing() {
    assert_eq!(decode(&Bytes::new()).unwrap_err(), DecodeError::Empty);
    let e = decode(&Bytes::from_static(b"Zabc")).unwrap_err();
    assert!(
        matches!(e, DecodeError::UnknownTag { tag: b'Z', .. }),
        "{e}"
    );
    assert!(e.to_string().contains("'Z'"), "{e}");
    // stream messages are not part of protocol 1
    assert!(matches!(
        decode(&Bytes::from_static(b"E")).unwrap_err(),
        DecodeError::UnknownTag { tag: b'E', .. }
    ));
    let p = wire(&[b"A", &[0; 8]]);
    assert!(decode(&p).is_err());

    let p = wire(&[
        b"B",
        &LSN.to_be_bytes(),
        &TS.to_be_bytes(),
        &1u32.to_be_bytes(),
        b"xx",
    ]);
    let e = decode(&p).unwrap_err();
    assert_eq!(
        e,
        DecodeError::TrailingBytes {
            tag: b'B',
            offset: 21,
            count: 2
        }
    );
}

#[test]
fn negative_and_huge_lengths_are_errors_not_allocations() {
    let p = wire(&[
        b"I",
        &1u32.to_be_bytes(),
        b"N",
        &1i16.to_be_bytes(),
        b"t",
        &(-5i32).to_be_bytes(),
    ]);
    let e = decode(&p).unwrap_err();
    assert!(
        matches!(
            e,
            DecodeError::InvalidLength {
                value: -5,
                offset: 9,
                ..
            }
        ),
        "{e}"
    );

    let p = wire(&[
        b"I",
        &1u32.to_be_bytes(),
        b"N",
        &1i16.to_be_bytes(),
        b"t",
        &i32::MAX.to_be_bytes(),
        b"abc",
    ]);
    let e = decode(&p).unwrap_err();
    assert!(
        matches!(
            e,
            DecodeError::Truncated {
                offset: 13,
                needed: 2147483647,
                available: 3,
                ..
            }
        ),
        "{e}"
    );

    let p = wire(&[b"I", &1u32.to_be_bytes(), b"N", &(-1i16).to_be_bytes()]);
    assert!(matches!(
        decode(&p).unwrap_err(),
        DecodeError::InvalidLength { value: -1, .. }
    ));

    // a column count that the remaining bytes cannot hold is rejected before allocating
    let p = wire(&[
        b"I",
        &1u32.to_be_bytes(),
        b"N",
        &i16::MAX.to_be_bytes(),
        b"n",
    ]);
    assert!(matches!(
        decode(&p).unwrap_err(),
        DecodeError::InvalidLength {
            value: 32767,
            offset: 6,
            ..
        }
    ));

    let p = wire(&[b"T", &i32::MAX.to_be_bytes(), &[0], &1u32.to_be_bytes()]);
    assert!(matches!(
        decode(&p).unwrap_err(),
        DecodeError::InvalidLength { .. }
    ));
    let p = wire(&[b"T", &i32::MIN.to_be_bytes(), &[0]]);
    assert!(matches!(
        decode(&p).unwrap_err(),
        DecodeError::InvalidLength { .. }
    ));

    let p = wire(&[
        b"M",
        &[0],
        &LSN.to_be_bytes(),
        b"p\0",
        &(-1i32).to_be_bytes(),
    ]);
    assert!(matches!(
        decode(&p).unwrap_err(),
        DecodeError::InvalidLength { offset: 12, .. }
    ));
}

#[test]
fn invalid_utf8_and_missing_nul() {
    let p = wire(&[b"Y", &1u32.to_be_bytes(), b"pub\xFFlic\0", b"t\0"]);
    let e = decode(&p).unwrap_err();
    assert!(
        matches!(
            e,
            DecodeError::InvalidUtf8 {
                offset: 5,
                field: "namespace",
                ..
            }
        ),
        "{e}"
    );
    assert!(std::error::Error::source(&e).is_some());

    let p = wire(&[b"Y", &1u32.to_be_bytes(), b"public\0", b"mood"]);
    let e = decode(&p).unwrap_err();
    assert!(
        matches!(
            e,
            DecodeError::Unterminated {
                offset: 12,
                field: "type name",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn bad_tuple_submessages() {
    let p = wire(&[b"I", &1u32.to_be_bytes(), b"K", &0i16.to_be_bytes()]);
    assert!(matches!(
        decode(&p).unwrap_err(),
        DecodeError::Unexpected {
            offset: 5,
            found: b'K',
            ..
        }
    ));
    let p = wire(&[
        b"U",
        &1u32.to_be_bytes(),
        b"K",
        &0i16.to_be_bytes(),
        b"O",
        &0i16.to_be_bytes(),
    ]);
    assert!(matches!(
        decode(&p).unwrap_err(),
        DecodeError::Unexpected {
            offset: 8,
            found: b'O',
            ..
        }
    ));
    let p = wire(&[b"I", &1u32.to_be_bytes(), b"N", &1i16.to_be_bytes(), b"x"]);
    let e = decode(&p).unwrap_err();
    assert!(
        matches!(
            e,
            DecodeError::Unexpected {
                offset: 8,
                found: b'x',
                ..
            }
        ),
        "{e}"
    );
}

// ---- protocol 2 ----

#[test]
fn v2_stream_block_carries_xids() {
    let mut d = Decoder::new(ProtocolVersion::V2);
    let start = wire(&[b"S", &900u32.to_be_bytes(), &[1]]);
    assert_eq!(
        d.decode(&start).unwrap(),
        LogicalMessage::StreamStart(StreamStart {
            xid: 900,
            first_segment: true
        })
    );
    assert!(d.in_stream());

    let ins = wire(&[
        b"I",
        &900u32.to_be_bytes(),
        &16385u32.to_be_bytes(),
        b"N",
        &1i16.to_be_bytes(),
        b"n",
    ]);
    let LogicalMessage::Insert(i) = d.decode(&ins).unwrap() else {
        panic!()
    };
    assert_eq!((i.xid, i.relid), (Some(900), 16385));

    let rel = wire(&[
        b"R",
        &900u32.to_be_bytes(),
        &7u32.to_be_bytes(),
        b"s\0t\0f",
        &0i16.to_be_bytes(),
    ]);
    let LogicalMessage::Relation(r) = d.decode(&rel).unwrap() else {
        panic!()
    };
    assert_eq!((r.xid, r.relid, r.name.as_str()), (Some(900), 7, "t"));

    // the same Insert bytes outside a stream block have 4 trailing bytes
    let mut outside = Decoder::new(ProtocolVersion::V2);
    assert!(outside.decode(&ins).is_err());

    assert_eq!(
        d.decode(&Bytes::from_static(b"E")).unwrap(),
        LogicalMessage::StreamStop
    );
    assert!(!d.in_stream());

    let commit = wire(&[
        b"c",
        &900u32.to_be_bytes(),
        &[0],
        &LSN.to_be_bytes(),
        &END_LSN.to_be_bytes(),
        &TS.to_be_bytes(),
    ]);
    assert_eq!(
        d.decode(&commit).unwrap(),
        LogicalMessage::StreamCommit(StreamCommit {
            xid: 900,
            flags: 0,
            commit_lsn: Lsn(LSN),
            end_lsn: Lsn(END_LSN),
            commit_time: PgTimestamp(TS),
        })
    );
    let abort = wire(&[b"A", &900u32.to_be_bytes(), &901u32.to_be_bytes()]);
    assert_eq!(
        d.decode(&abort).unwrap(),
        LogicalMessage::StreamAbort(StreamAbort {
            xid: 900,
            subxid: 901
        })
    );
}

#[test]
fn decoder_state_is_unchanged_by_errors() {
    let mut d = Decoder::new(ProtocolVersion::V2);
    assert!(d.decode(&wire(&[b"S", &1u32.to_be_bytes(), &[2]])).is_err());
    assert!(!d.in_stream());
}

// ---- properties ----

fn text_bytes() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        "[ -~]{0,12}".prop_map(|s| Bytes::from(s.into_bytes())),
        ".{0,8}".prop_map(|s| Bytes::from(s.into_bytes())),
    ]
}

fn tuple_value() -> impl Strategy<Value = TupleValue> {
    prop_oneof![
        Just(TupleValue::Null),
        Just(TupleValue::UnchangedToast),
        text_bytes().prop_map(TupleValue::Text),
        proptest::collection::vec(any::<u8>(), 0..16).prop_map(|v| TupleValue::Binary(v.into())),
    ]
}

fn tuple() -> impl Strategy<Value = TupleData> {
    proptest::collection::vec(tuple_value(), 0..8).prop_map(|values| TupleData { values })
}

fn name() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,10}"
}

fn old_tuple() -> impl Strategy<Value = OldTuple> {
    prop_oneof![
        tuple().prop_map(OldTuple::Key),
        tuple().prop_map(OldTuple::Full)
    ]
}

fn replica_identity() -> impl Strategy<Value = ReplicaIdentity> {
    prop_oneof![
        Just(ReplicaIdentity::Default),
        Just(ReplicaIdentity::Nothing),
        Just(ReplicaIdentity::Full),
        Just(ReplicaIdentity::Index),
    ]
}

/// Messages valid for a decoder whose stream state is `in_stream` (xids present exactly then).
fn message(streaming: bool) -> BoxedStrategy<LogicalMessage> {
    let xid = move || {
        if streaming {
            any::<u32>().prop_map(Some).boxed()
        } else {
            Just(None).boxed()
        }
    };
    let ts = || any::<i64>().prop_map(PgTimestamp);
    let lsn = || any::<u64>().prop_map(Lsn);
    let column = (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| Column {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    );
    let changes = prop_oneof![
        (
            xid(),
            any::<u32>(),
            name(),
            name(),
            replica_identity(),
            proptest::collection::vec(column, 0..6)
        )
            .prop_map(|(xid, relid, namespace, name, replica_identity, columns)| {
                LogicalMessage::Relation(Relation {
                    xid,
                    relid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            }),
        (xid(), any::<u32>(), name(), name()).prop_map(|(xid, oid, namespace, name)| {
            LogicalMessage::Type(TypeInfo {
                xid,
                oid,
                namespace,
                name,
            })
        }),
        (xid(), any::<u32>(), tuple())
            .prop_map(|(xid, relid, new)| LogicalMessage::Insert(Insert { xid, relid, new })),
        (
            xid(),
            any::<u32>(),
            proptest::option::of(old_tuple()),
            tuple()
        )
            .prop_map(|(xid, relid, old, new)| LogicalMessage::Update(Update {
                xid,
                relid,
                old,
                new
            })),
        (xid(), any::<u32>(), old_tuple())
            .prop_map(|(xid, relid, old)| LogicalMessage::Delete(Delete { xid, relid, old })),
        (
            xid(),
            any::<u8>(),
            proptest::collection::vec(any::<u32>(), 0..5)
        )
            .prop_map(|(xid, options, relids)| LogicalMessage::Truncate(Truncate {
                xid,
                options,
                relids
            })),
        (
            xid(),
            any::<u8>(),
            lsn(),
            name(),
            proptest::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(
                |(xid, flags, lsn, prefix, content)| LogicalMessage::Message(DecodingMessage {
                    xid,
                    flags,
                    lsn,
                    prefix,
                    content: content.into()
                })
            ),
    ];
    if streaming {
        prop_oneof![
            changes,
            (any::<u32>(), any::<bool>()).prop_map(|(xid, first_segment)| {
                LogicalMessage::StreamStart(StreamStart { xid, first_segment })
            }),
            Just(LogicalMessage::StreamStop),
        ]
        .boxed()
    } else {
        prop_oneof![
            changes,
            (lsn(), ts(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
                LogicalMessage::Begin(Begin {
                    final_lsn,
                    commit_time,
                    xid,
                })
            }),
            (any::<u8>(), lsn(), lsn(), ts()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_time)| {
                    LogicalMessage::Commit(Commit {
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time,
                    })
                }
            ),
            (lsn(), name())
                .prop_map(|(commit_lsn, name)| LogicalMessage::Origin(Origin { commit_lsn, name })),
            (any::<u32>(), any::<u8>(), lsn(), lsn(), ts()).prop_map(
                |(xid, flags, commit_lsn, end_lsn, commit_time)| LogicalMessage::StreamCommit(
                    StreamCommit {
                        xid,
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time
                    }
                )
            ),
            (any::<u32>(), any::<u32>())
                .prop_map(|(xid, subxid)| LogicalMessage::StreamAbort(StreamAbort { xid, subxid })),
        ]
        .boxed()
    }
}

fn is_v1(msg: &LogicalMessage) -> bool {
    !matches!(
        msg,
        LogicalMessage::StreamStart(_)
            | LogicalMessage::StreamStop
            | LogicalMessage::StreamCommit(_)
            | LogicalMessage::StreamAbort(_)
    )
}

fn decode_in(payload: &Bytes, in_stream: bool) -> Result<LogicalMessage, DecodeError> {
    let mut d = Decoder::new(ProtocolVersion::V2);
    d.set_in_stream(in_stream);
    d.decode(payload)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn roundtrip_v1(msg in message(false).prop_filter("v1 only", is_v1)) {
        prop_assert_eq!(decode(&encode(&msg)).unwrap(), msg);
    }

    #[test]
    fn peeks_agree_with_decode(msg in message(false).prop_filter("v1 only", is_v1)) {
        let full = encode(&msg);
        let (begin, commit) = match &msg {
            LogicalMessage::Begin(b) => (Some(b.clone()), None),
            LogicalMessage::Commit(c) => (None, Some(c.clone())),
            _ => (None, None),
        };
        prop_assert_eq!(peek_begin(&full), begin);
        prop_assert_eq!(peek_commit(&full), commit);
        for len in 0..full.len() {
            prop_assert_eq!(peek_begin(&full[..len]), None);
            prop_assert_eq!(peek_commit(&full[..len]), None);
        }
    }

    #[test]
    fn roundtrip_v2(
        (streaming, msg) in any::<bool>().prop_flat_map(|s| (Just(s), message(s)))
    ) {
        prop_assert_eq!(decode_in(&encode(&msg), streaming).unwrap(), msg);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        tag in prop_oneof![Just(b'B'), Just(b'C'), Just(b'O'), Just(b'R'), Just(b'Y'), Just(b'I'),
            Just(b'U'), Just(b'D'), Just(b'T'), Just(b'M'), Just(b'S'), Just(b'E'), Just(b'c'),
            Just(b'A'), any::<u8>()],
        body in proptest::collection::vec(any::<u8>(), 0..96),
        in_stream in any::<bool>(),
    ) {
        let mut p = vec![tag];
        p.extend_from_slice(&body);
        let p = Bytes::from(p);
        for result in [decode(&p), decode_in(&p, in_stream)] {
            if let Err(e) = result {
                prop_assert!(e.offset() <= p.len());
                let _ = e.to_string();
            }
        }
    }

    #[test]
    fn every_strict_prefix_is_an_error(msg in message(false).prop_filter("v1 only", is_v1)) {
        let full = encode(&msg);
        for len in 0..full.len() {
            let e = decode(&full.slice(..len)).unwrap_err();
            prop_assert!(e.offset() <= len, "{} at {}", e, len);
        }
    }

    #[test]
    fn flipped_bytes_never_panic(
        (streaming, msg) in any::<bool>().prop_flat_map(|s| (Just(s), message(s))),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = encode(&msg).to_vec();
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= b;
        }
        let p = Bytes::from(bytes);
        for result in [decode(&p), decode_in(&p, streaming), decode_in(&p, !streaming)] {
            if let Err(e) = result {
                prop_assert!(e.offset() <= p.len());
            }
        }
    }

    #[test]
    fn truncated_v2_messages_are_errors(
        (streaming, msg) in any::<bool>().prop_flat_map(|s| (Just(s), message(s)))
    ) {
        let full = encode(&msg);
        for len in 0..full.len() {
            prop_assert!(decode_in(&full.slice(..len), streaming).is_err());
        }
    }
}

// ---- payloads captured from PostgreSQL 15 (see testdata/README.md) ----

struct Captured {
    lsn: Lsn,
    xid: u32,
    payload: Bytes,
}

fn captured(text: &str) -> Vec<Captured> {
    text.lines()
        .map(|line| {
            let mut f = line.split('|');
            let (lsn, xid, hex) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
            let payload = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect::<Vec<u8>>();
            Captured {
                lsn: lsn.parse().unwrap(),
                xid: xid.parse().unwrap(),
                payload: payload.into(),
            }
        })
        .collect()
}

const PG15_V1_TEXT: &str = include_str!("testdata/pg15_v1_text.txt");
const PG15_V1_BINARY: &str = include_str!("testdata/pg15_v1_binary.txt");
const PG15_V2_STREAM: &str = include_str!("testdata/pg15_v2_stream.txt");

fn decode_all(text: &str) -> Vec<(Captured, LogicalMessage)> {
    captured(text)
        .into_iter()
        .map(|c| {
            let msg =
                decode(&c.payload).unwrap_or_else(|e| panic!("{} (xid {}): {e}", c.lsn, c.xid));
            assert_eq!(encode(&msg), c.payload, "re-encoding differs at {}", c.lsn);
            (c, msg)
        })
        .collect()
}

fn texts(t: &TupleData) -> Vec<Option<&str>> {
    t.values
        .iter()
        .map(|v| match v {
            TupleValue::Text(_) => Some(v.as_str().unwrap()),
            TupleValue::Null => None,
            TupleValue::UnchangedToast => Some("<unchanged toast>"),
            other => panic!("not text: {other:?}"),
        })
        .collect()
}

#[test]
fn pg15_v1_text_capture() {
    let msgs = decode_all(PG15_V1_TEXT);
    let only = |tag: u8| {
        msgs.iter()
            .filter(move |(_, m)| m.tag() == tag)
            .map(|(_, m)| m)
    };

    // every transaction is Begin … Commit with matching LSNs; Commit's end LSN is the row's LSN
    let mut open: Option<&Begin> = None;
    for (c, m) in &msgs {
        match m {
            LogicalMessage::Begin(b) => {
                assert!(open.is_none());
                assert_eq!(b.xid, c.xid);
                open = Some(b);
            }
            LogicalMessage::Commit(commit) => {
                let b = open.take().expect("Commit without Begin");
                assert_eq!(commit.commit_lsn, b.final_lsn);
                assert_eq!(commit.commit_time, b.commit_time);
                assert_eq!(commit.end_lsn, c.lsn);
            }
            LogicalMessage::Message(dm) if !dm.is_transactional() => assert!(open.is_none()),
            _ => assert!(open.is_some(), "{m:?} outside a transaction"),
        }
    }

    let Some(LogicalMessage::Type(mood)) = only(b'Y').next() else {
        panic!("no Type message")
    };
    assert_eq!(
        (mood.namespace.as_str(), mood.name.as_str()),
        ("public", "mood")
    );

    let Some(LogicalMessage::Relation(accounts)) = only(b'R').next() else {
        panic!()
    };
    assert_eq!(accounts.name, "accounts");
    assert_eq!(accounts.replica_identity, ReplicaIdentity::Default);
    let cols: Vec<_> = accounts
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.is_key(), c.type_oid))
        .collect();
    assert_eq!(
        cols,
        [
            ("id", true, 20),
            ("owner", false, 25),
            ("balance", false, 20),
            ("note", false, 25),
            ("updated_at", false, 1184),
            ("mood", false, mood.oid),
        ]
    );

    let inserts: Vec<_> = only(b'I').collect();
    let LogicalMessage::Insert(first) = inserts[0] else {
        unreachable!()
    };
    assert_eq!(first.relid, accounts.relid);
    assert_eq!(
        texts(&first.new),
        [
            Some("1"),
            Some("O'Brien \"quoted\""),
            Some("100"),
            Some("line1\nline2 ünïcødé ✓"),
            Some("2024-05-01 12:00:00.123456+00"),
            Some("happy"),
        ]
    );

    let updates: Vec<&Update> = only(b'U')
        .map(|m| match m {
            LogicalMessage::Update(u) => u,
            _ => unreachable!(),
        })
        .collect();
    // balance += 1 on the row whose note is TOASTed: note is not sent
    assert_eq!(updates[0].old, None);
    assert_eq!(
        texts(&updates[0].new),
        [
            Some("2"),
            Some("toast"),
            Some("6"),
            Some("<unchanged toast>"),
            Some("2024-05-01 12:00:00+00"),
            None
        ]
    );
    // id 1 → 3: the old key is sent, the other old columns are null
    let Some(OldTuple::Key(k)) = &updates[1].old else {
        panic!("{:?}", updates[1].old)
    };
    assert_eq!(texts(k), [Some("1"), None, None, None, None, None]);
    assert_eq!(texts(&updates[1].new)[0], Some("3"));
    // REPLICA IDENTITY FULL: the whole old row
    let Some(OldTuple::Full(old)) = &updates[2].old else {
        panic!()
    };
    assert_eq!(texts(old)[3], Some("12.50"));
    assert_eq!(texts(&updates[2].new)[3], Some("13.00"));

    let deletes: Vec<&Delete> = only(b'D')
        .map(|m| match m {
            LogicalMessage::Delete(d) => d,
            _ => unreachable!(),
        })
        .collect();
    assert!(matches!(&deletes[0].old, OldTuple::Key(k) if texts(k)[0] == Some("3")));
    let OldTuple::Full(row) = &deletes[1].old else {
        panic!()
    };
    assert_eq!(
        texts(row)[3..],
        [
            Some("13.00"),
            Some("{a,\"b c\"}"),
            Some("{\"k\": [1, null]}"),
            Some("\\x00ff10"),
            Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        ]
    );

    let audit = only(b'R')
        .find_map(|m| match m {
            LogicalMessage::Relation(r) if r.name == "audit" => Some(r),
            _ => None,
        })
        .unwrap();
    assert_eq!(audit.replica_identity, ReplicaIdentity::Full);
    assert_eq!(audit.columns[3].type_modifier, (12 << 16 | 2) + 4);

    let truncates: Vec<_> = only(b'T').collect();
    let LogicalMessage::Truncate(t) = truncates[0] else {
        unreachable!()
    };
    assert!(t.cascade() && t.restart_identity());
    assert_eq!(t.relids.len(), 2);
    assert_eq!(t.relids[0], accounts.relid);
    let LogicalMessage::Truncate(t) = truncates[1] else {
        unreachable!()
    };
    assert_eq!((t.options, t.relids.len()), (0, 1));

    let dms: Vec<_> = only(b'M').collect();
    let LogicalMessage::Message(m) = dms[0] else {
        unreachable!()
    };
    assert!(m.is_transactional());
    assert_eq!(
        (m.prefix.as_str(), &m.content[..]),
        ("walshift", &b"cutover marker"[..])
    );
    let LogicalMessage::Message(m) = dms[1] else {
        unreachable!()
    };
    assert!(!m.is_transactional());
    assert_eq!(
        (m.prefix.as_str(), &m.content[..]),
        ("walshift.nt", &[0u8, 1][..])
    );

    let Some(LogicalMessage::Origin(o)) = only(b'O').next() else {
        panic!()
    };
    assert_eq!(
        (o.name.as_str(), o.commit_lsn),
        ("upstream", "0/AB12CD34".parse().unwrap())
    );
    // that transaction's commit time was set to 2024-05-01 12:00:00+00
    let begins: Vec<_> = only(b'B').collect();
    let LogicalMessage::Begin(b) = begins[begins.len() - 1] else {
        unreachable!()
    };
    assert_eq!(
        b.commit_time.to_system_time(),
        Some(UNIX_EPOCH + Duration::from_secs(1_714_564_800))
    );
}

#[test]
fn pg15_v1_binary_capture() {
    let msgs = decode_all(PG15_V1_BINARY);
    let first = msgs
        .iter()
        .find_map(|(_, m)| match m {
            LogicalMessage::Insert(i) => Some(i),
            _ => None,
        })
        .unwrap();
    let v = &first.new.values;
    assert_eq!(
        v[0],
        TupleValue::Binary(Bytes::copy_from_slice(&1i64.to_be_bytes()))
    );
    assert_eq!(
        v[1],
        TupleValue::Binary(Bytes::from_static(b"O'Brien \"quoted\""))
    );
    // timestamptz binary: microseconds since 2000-01-01
    let micros = (TS_2024_05_01_NOON + 123_456).to_be_bytes();
    assert_eq!(v[4], TupleValue::Binary(Bytes::copy_from_slice(&micros)));
    let update = msgs
        .iter()
        .find_map(|(_, m)| match m {
            LogicalMessage::Update(u) => Some(u),
            _ => None,
        })
        .unwrap();
    assert_eq!(update.new.values[3], TupleValue::UnchangedToast);
    assert_eq!(update.new.values[5], TupleValue::Null);
}

const TS_2024_05_01_NOON: i64 = TS;

#[test]
fn pg15_v2_stream_capture() {
    let caps = captured(PG15_V2_STREAM);
    let mut d = Decoder::new(ProtocolVersion::V2);
    let mut stream_starts = 0;
    let mut seen_xids = std::collections::HashSet::new();
    let mut streamed_changes = 0;
    for c in &caps {
        let in_stream_before = d.in_stream();
        let msg = d
            .decode(&c.payload)
            .unwrap_or_else(|e| panic!("{} (xid {}): {e}", c.lsn, c.xid));
        {
            let mut again = Decoder::new(ProtocolVersion::V2);
            again.set_in_stream(in_stream_before);
            let msg2 = again.decode(&encode(&msg)).unwrap();
            assert_eq!(msg2, msg);
            assert_eq!(encode(&msg), c.payload);
        }
        match &msg {
            LogicalMessage::StreamStart(s) => {
                assert_eq!(s.xid, c.xid);
                assert_eq!(s.first_segment, seen_xids.insert(s.xid));
                stream_starts += 1;
            }
            LogicalMessage::Insert(Insert { xid, .. })
            | LogicalMessage::Delete(Delete { xid, .. }) => {
                // the (sub)transaction that made the change: the DELETEs after
                // ROLLBACK TO SAVEPOINT run in a subtransaction
                assert_eq!(xid.is_some(), in_stream_before);
                if let Some(xid) = xid {
                    assert!(*xid >= c.xid);
                    streamed_changes += 1;
                }
            }
            LogicalMessage::Relation(r) => assert_eq!(r.xid, in_stream_before.then_some(c.xid)),
            LogicalMessage::StreamCommit(sc) => {
                assert!(!in_stream_before);
                assert_eq!((sc.xid, sc.end_lsn), (c.xid, c.lsn));
            }
            LogicalMessage::StreamAbort(a) => {
                assert!(!in_stream_before);
                assert_eq!((a.xid, a.subxid), (c.xid, c.xid));
            }
            _ => {}
        }
    }
    assert_eq!(stream_starts, 3);
    assert!(streamed_changes > 10);
    assert!(!d.in_stream());
    // protocol 1 does not know Stream Start
    assert!(matches!(
        decode(&caps[0].payload),
        Err(DecodeError::UnknownTag { tag: b'S', .. })
    ));
}

// ---- decode_row: the borrowed Insert/Update/Delete decoder ----

/// `row` as `decode` would return it, built by copying the borrowed values.
fn owned(row: RowRef<'_>) -> LogicalMessage {
    let tuple = |t: TupleRef<'_>| TupleData {
        values: t
            .values()
            .map(|v| match v {
                ValueRef::Null => TupleValue::Null,
                ValueRef::UnchangedToast => TupleValue::UnchangedToast,
                ValueRef::Text(b) => TupleValue::Text(Bytes::copy_from_slice(b)),
                ValueRef::Binary(b) => TupleValue::Binary(Bytes::copy_from_slice(b)),
            })
            .collect(),
    };
    let old = row.old.map(|(kind, t)| match kind {
        OldKind::Key => OldTuple::Key(tuple(t)),
        OldKind::Full => OldTuple::Full(tuple(t)),
    });
    let relid = row.relid;
    match row.kind {
        RowKind::Insert => {
            assert!(old.is_none());
            LogicalMessage::Insert(Insert {
                xid: None,
                relid,
                new: tuple(row.new.unwrap()),
            })
        }
        RowKind::Update => LogicalMessage::Update(Update {
            xid: None,
            relid,
            old,
            new: tuple(row.new.unwrap()),
        }),
        RowKind::Delete => {
            assert!(row.new.is_none());
            LogicalMessage::Delete(Delete {
                xid: None,
                relid,
                old: old.unwrap(),
            })
        }
    }
}

fn row(p: &[u8]) -> RowRef<'_> {
    decode_row(p).unwrap().expect("a row message")
}

fn values<'a>(t: &TupleRef<'a>) -> Vec<ValueRef<'a>> {
    t.values().collect()
}

#[test]
fn decode_row_insert_with_every_value_kind() {
    let p = wire(&[
        b"I",
        &16385u32.to_be_bytes(),
        b"N",
        &5i16.to_be_bytes(),
        b"t",
        &2i32.to_be_bytes(),
        b"42",
        b"n",
        b"u",
        b"b",
        &8i32.to_be_bytes(),
        &42i64.to_be_bytes(),
        b"t",
        &0i32.to_be_bytes(),
    ]);
    let r = row(&p);
    assert_eq!((r.kind, r.relid), (RowKind::Insert, 16385));
    assert!(r.old.is_none());
    let new = r.new.unwrap();
    assert_eq!((new.len(), new.is_empty()), (5, false));
    let bin = 42i64.to_be_bytes();
    assert_eq!(
        values(&new),
        [
            ValueRef::Text(b"42"),
            ValueRef::Null,
            ValueRef::UnchangedToast,
            ValueRef::Binary(&bin),
            ValueRef::Text(b""),
        ]
    );
    let ValueRef::Text(v) = new.values().next().unwrap() else {
        unreachable!()
    };
    assert_eq!(v.as_ptr(), p[13..].as_ptr(), "borrowed from the payload");
    assert_eq!(owned(r), decode(&p).unwrap());

    let mut it = new.values();
    assert_eq!(it.len(), 5);
    it.nth(3);
    assert_eq!(
        (it.len(), it.next(), it.len()),
        (1, Some(ValueRef::Text(b"")), 0)
    );
    assert_eq!((it.next(), it.next()), (None, None));
}

#[test]
fn decode_row_update_without_old_and_with_key_or_full_old() {
    let p = wire(&[
        b"U",
        &16385u32.to_be_bytes(),
        b"N",
        &2i16.to_be_bytes(),
        b"t",
        &1i32.to_be_bytes(),
        b"1",
        b"u",
    ]);
    let r = row(&p);
    assert_eq!((r.kind, r.relid), (RowKind::Update, 16385));
    assert!(r.old.is_none());
    assert_eq!(
        values(&r.new.unwrap()),
        [ValueRef::Text(b"1"), ValueRef::UnchangedToast]
    );
    assert_eq!(owned(r), decode(&p).unwrap());

    for (sub, want) in [(b"K", OldKind::Key), (b"O", OldKind::Full)] {
        let p = wire(&[
            b"U",
            &16385u32.to_be_bytes(),
            sub,
            &2i16.to_be_bytes(),
            b"t",
            &1i32.to_be_bytes(),
            b"1",
            b"n",
            b"N",
            &2i16.to_be_bytes(),
            b"t",
            &1i32.to_be_bytes(),
            b"2",
            b"t",
            &3i32.to_be_bytes(),
            "é!".as_bytes(),
        ]);
        let r = row(&p);
        let (kind, old) = r.old.unwrap();
        assert_eq!(kind, want);
        assert_eq!(values(&old), [ValueRef::Text(b"1"), ValueRef::Null]);
        assert_eq!(
            values(&r.new.unwrap()),
            [ValueRef::Text(b"2"), ValueRef::Text("é!".as_bytes())]
        );
        assert_eq!(owned(r), decode(&p).unwrap());
    }
}

#[test]
fn decode_row_delete_with_key_or_full_old() {
    for (sub, want) in [(b"K", OldKind::Key), (b"O", OldKind::Full)] {
        let p = wire(&[
            b"D",
            &16385u32.to_be_bytes(),
            sub,
            &2i16.to_be_bytes(),
            b"t",
            &3i32.to_be_bytes(),
            b"123",
            b"b",
            &1i32.to_be_bytes(),
            &[0xFF],
        ]);
        let r = row(&p);
        assert_eq!((r.kind, r.relid), (RowKind::Delete, 16385));
        assert!(r.new.is_none());
        let (kind, old) = r.old.unwrap();
        assert_eq!(kind, want);
        assert_eq!(
            values(&old),
            [ValueRef::Text(b"123"), ValueRef::Binary(&[0xFF])]
        );
        assert_eq!(owned(r), decode(&p).unwrap());
    }
}

#[test]
fn decode_row_zero_column_tuple() {
    let p = wire(&[b"I", &7u32.to_be_bytes(), b"N", &0i16.to_be_bytes()]);
    let new = row(&p).new.unwrap();
    assert!(new.is_empty());
    assert_eq!(new.values().next(), None);
}

#[test]
fn decode_row_is_none_for_other_messages() {
    let begin = wire(&[
        b"B",
        &LSN.to_be_bytes(),
        &TS.to_be_bytes(),
        &748u32.to_be_bytes(),
    ]);
    let truncate = wire(&[b"T", &1i32.to_be_bytes(), &[0], &16385u32.to_be_bytes()]);
    for p in [&begin[..], &truncate[..], b"", b"Zabc", b"i", b"E", b"T"] {
        assert!(decode_row(p).unwrap().is_none(), "{p:?}");
    }
}

#[test]
fn decode_row_errors_equal_decode_errors() {
    let cases = [
        // truncated column length, negative length, length past the end
        wire(&[
            b"I",
            &1u32.to_be_bytes(),
            b"N",
            &1i16.to_be_bytes(),
            b"t",
            &[0, 0],
        ]),
        wire(&[
            b"I",
            &1u32.to_be_bytes(),
            b"N",
            &1i16.to_be_bytes(),
            b"t",
            &(-5i32).to_be_bytes(),
        ]),
        wire(&[
            b"U",
            &1u32.to_be_bytes(),
            b"N",
            &1i16.to_be_bytes(),
            b"b",
            &i32::MAX.to_be_bytes(),
            b"abc",
        ]),
        // negative and oversized column counts
        wire(&[b"I", &1u32.to_be_bytes(), b"N", &(-1i16).to_be_bytes()]),
        wire(&[
            b"D",
            &1u32.to_be_bytes(),
            b"K",
            &i16::MAX.to_be_bytes(),
            b"n",
        ]),
        // bad submessage and value kind bytes
        wire(&[b"I", &1u32.to_be_bytes(), b"K", &0i16.to_be_bytes()]),
        wire(&[
            b"U",
            &1u32.to_be_bytes(),
            b"K",
            &0i16.to_be_bytes(),
            b"O",
            &0i16.to_be_bytes(),
        ]),
        wire(&[b"U", &1u32.to_be_bytes(), b"x"]),
        wire(&[b"D", &16385u32.to_be_bytes(), b"N", &0i16.to_be_bytes()]),
        wire(&[b"I", &1u32.to_be_bytes(), b"N", &1i16.to_be_bytes(), b"x"]),
        // missing tuples, trailing bytes
        wire(&[b"U", &1u32.to_be_bytes(), b"O", &0i16.to_be_bytes()]),
        wire(&[b"D", &1u32.to_be_bytes()]),
        wire(&[b"I", &1u32.to_be_bytes(), b"N", &0i16.to_be_bytes(), b"xy"]),
        wire(&[b"I"]),
    ];
    for p in &cases {
        let want = decode(p).unwrap_err();
        assert_eq!(decode_row(p).unwrap_err(), want, "{p:?}");
    }
}

fn row_message() -> impl Strategy<Value = LogicalMessage> {
    prop_oneof![
        (any::<u32>(), tuple()).prop_map(|(relid, new)| LogicalMessage::Insert(Insert {
            xid: None,
            relid,
            new
        })),
        (any::<u32>(), proptest::option::of(old_tuple()), tuple()).prop_map(|(relid, old, new)| {
            LogicalMessage::Update(Update {
                xid: None,
                relid,
                old,
                new,
            })
        }),
        (any::<u32>(), old_tuple()).prop_map(|(relid, old)| LogicalMessage::Delete(Delete {
            xid: None,
            relid,
            old
        })),
    ]
}

/// `decode_row` and `decode` agree on `p`: equal values, equal errors, or not a row message.
fn agrees_with_decode(p: &Bytes) -> Result<(), TestCaseError> {
    match (decode_row(p), decode(p)) {
        (Ok(Some(r)), Ok(msg)) => prop_assert_eq!(owned(r), msg),
        (Err(e), Err(want)) => prop_assert_eq!(e, want),
        (Ok(None), result) => {
            prop_assert!(!matches!(peek_tag(p), Some(b'I' | b'U' | b'D')));
            prop_assert!(!matches!(
                result,
                Ok(LogicalMessage::Insert(_)
                    | LogicalMessage::Update(_)
                    | LogicalMessage::Delete(_))
            ));
        }
        (r, msg) => prop_assert!(false, "decode_row: {:?}, decode: {:?}", r, msg),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decode_row_yields_the_values_decode_yields(msg in row_message()) {
        let p = encode(&msg);
        let r = decode_row(&p).unwrap().unwrap();
        for t in r.old.map(|(_, t)| t).into_iter().chain(r.new) {
            for v in t.values() {
                if let ValueRef::Text(b) | ValueRef::Binary(b) = v {
                    prop_assert!(p.as_ptr_range().contains(&b.as_ptr()) || b.is_empty());
                }
            }
        }
        prop_assert_eq!(owned(r), decode(&p).unwrap());
        prop_assert_eq!(decode(&p).unwrap(), msg);
    }

    #[test]
    fn decode_row_agrees_with_decode_on_mangled_bytes(
        msg in row_message(),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        appended in proptest::collection::vec(any::<u8>(), 0..3),
    ) {
        let mut bytes = encode(&msg).to_vec();
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= b;
        }
        bytes.extend_from_slice(&appended);
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        agrees_with_decode(&Bytes::from(bytes))?;
    }

    #[test]
    fn decode_row_agrees_with_decode_on_every_prefix(msg in row_message()) {
        let full = encode(&msg);
        for len in 0..=full.len() {
            agrees_with_decode(&full.slice(..len))?;
        }
    }
}
