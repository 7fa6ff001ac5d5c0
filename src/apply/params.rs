//! Statement parameters: one array per batch column, in binary wire form for the column types
//! whose text input costs the target most (no I/O).
//!
//! pgoutput sends values as text; replay used to ship every column as a `text[]` and let the
//! target parse each value with the column type's input function. For integers, booleans and
//! timestamps that parsing is a large share of the target's work (a timestamp's text input is
//! several times the cost of its binary receive), so replay parses them here and sends typed
//! arrays (`int8[]`, `timestamptz[]`, …) in binary instead.
//!
//! Each column of a batch is encoded once, straight from the batch's bytes, into PostgreSQL's
//! binary array format ([`encode_array`], [`encode_text`]); the resulting [`EncodedArray`] is
//! copied into the statement's parameters as it is.
//!
//! **Contract:** a value is sent in binary only when it parses completely in the exact form
//! PostgreSQL prints it (capture asks for `DateStyle = ISO`); anything else — a BC date, an
//! unexpected spelling — makes that statement send the whole column as text, exactly as
//! before. Never a guess.

use std::error::Error;

use bytes::{BufMut, Bytes, BytesMut};
use tokio_postgres::types::{IsNull, ToSql, Type, WrongType, to_sql_checked};

/// How a column's values travel to the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// `text[]`, cast by the target (every type).
    Text,
    Int8,
    Int4,
    Int2,
    Bool,
    /// `timestamp with time zone`: microseconds since 2000-01-01 00:00 UTC.
    Timestamptz,
    /// `timestamp without time zone`: microseconds since 2000-01-01 00:00.
    Timestamp,
}

impl Wire {
    /// The wire form for a target column type as `format_type` prints it.
    pub fn for_type(type_sql: &str) -> Wire {
        match type_sql {
            "bigint" => Wire::Int8,
            "integer" => Wire::Int4,
            "smallint" => Wire::Int2,
            "boolean" => Wire::Bool,
            "timestamp with time zone" => Wire::Timestamptz,
            "timestamp without time zone" => Wire::Timestamp,
            _ => Wire::Text,
        }
    }

    /// The array type the statement declares for a parameter of this form.
    pub fn array_type(self) -> &'static str {
        match self {
            Wire::Text => "text[]",
            Wire::Int8 => "int8[]",
            Wire::Int4 => "int4[]",
            Wire::Int2 => "int2[]",
            Wire::Bool => "bool[]",
            Wire::Timestamptz => "timestamptz[]",
            Wire::Timestamp => "timestamp[]",
        }
    }

    fn element_type(self) -> Type {
        match self {
            Wire::Text => Type::TEXT,
            Wire::Int8 => Type::INT8,
            Wire::Int4 => Type::INT4,
            Wire::Int2 => Type::INT2,
            Wire::Bool => Type::BOOL,
            Wire::Timestamptz => Type::TIMESTAMPTZ,
            Wire::Timestamp => Type::TIMESTAMP,
        }
    }

    fn pg_array_type(self) -> Type {
        match self {
            Wire::Text => Type::TEXT_ARRAY,
            Wire::Int8 => Type::INT8_ARRAY,
            Wire::Int4 => Type::INT4_ARRAY,
            Wire::Int2 => Type::INT2_ARRAY,
            Wire::Bool => Type::BOOL_ARRAY,
            Wire::Timestamptz => Type::TIMESTAMPTZ_ARRAY,
            Wire::Timestamp => Type::TIMESTAMP_ARRAY,
        }
    }
}

const WIRES: [Wire; 7] = [
    Wire::Text,
    Wire::Int8,
    Wire::Int4,
    Wire::Int2,
    Wire::Bool,
    Wire::Timestamptz,
    Wire::Timestamp,
];

/// One statement parameter already in PostgreSQL's binary array format (one dimension, lower
/// bound 1), for the parameter type [`Wire::array_type`] of its element form.
#[derive(Clone)]
pub struct EncodedArray {
    wire: Wire,
    len: usize,
    bytes: Bytes,
}

impl EncodedArray {
    pub fn wire(&self) -> Wire {
        self.wire
    }

    /// Elements, NULLs included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for EncodedArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodedArray")
            .field("wire", &self.wire)
            .field("len", &self.len)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl ToSql for EncodedArray {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.extend_from_slice(&self.bytes);
        Ok(IsNull::No)
    }

    /// Any array type some [`Wire`] declares; [`ToSql::to_sql_checked`] then insists on the
    /// one of this array's element form.
    fn accepts(ty: &Type) -> bool {
        WIRES.iter().any(|w| w.pg_array_type() == *ty)
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        if *ty != self.wire.pg_array_type() {
            return Err(Box::new(WrongType::new::<Self>(ty.clone())));
        }
        self.to_sql(ty, out)
    }
}

/// ndim, flags, element OID, then the one dimension's length and lower bound.
const HEADER_LEN: usize = 20;
const FLAGS_AT: usize = 4;
const DIM_LEN_AT: usize = 12;

/// An empty column is still sent with one dimension of length 0, as `postgres-types` sends an
/// empty slice (the target's `array_recv` reads it as the empty array).
fn start(wire: Wire, payload: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + payload);
    buf.put_i32(1);
    buf.put_i32(0);
    buf.put_u32(wire.element_type().oid());
    buf.put_i32(0);
    buf.put_i32(1);
    buf
}

fn finish(wire: Wire, mut buf: BytesMut, len: usize, has_null: bool) -> EncodedArray {
    buf[FLAGS_AT..FLAGS_AT + 4].copy_from_slice(&i32::from(has_null).to_be_bytes());
    buf[DIM_LEN_AT..DIM_LEN_AT + 4].copy_from_slice(&wire_len(len).to_be_bytes());
    EncodedArray {
        wire,
        len,
        bytes: buf.freeze(),
    }
}

/// PostgreSQL caps a value at 1 GB and a batch holds far fewer than 2³¹ values.
#[inline]
fn wire_len(n: usize) -> i32 {
    i32::try_from(n).expect("array or element length exceeds PostgreSQL's limit")
}

/// Encodes a column in the binary form of `wire`: `None` when some non-NULL value does not
/// parse (send the column with [`encode_text`] then). Always `Some` for [`Wire::Text`].
pub fn encode_array<'a>(
    wire: Wire,
    values: impl Iterator<Item = Option<&'a [u8]>> + Clone,
) -> Option<EncodedArray> {
    match wire {
        Wire::Text => Some(encode_text(values)),
        Wire::Int8 => fixed(wire, values, |b| parse_int(b).map(i64::to_be_bytes)),
        Wire::Int4 => fixed(wire, values, |b| {
            parse_int(b)
                .and_then(|v| i32::try_from(v).ok())
                .map(i32::to_be_bytes)
        }),
        Wire::Int2 => fixed(wire, values, |b| {
            parse_int(b)
                .and_then(|v| i16::try_from(v).ok())
                .map(i16::to_be_bytes)
        }),
        Wire::Bool => fixed(wire, values, |b| match b {
            b"t" => Some([1]),
            b"f" => Some([0]),
            _ => None,
        }),
        Wire::Timestamptz => fixed(wire, values, |b| {
            parse_timestamp_bytes(b, true).map(i64::to_be_bytes)
        }),
        Wire::Timestamp => fixed(wire, values, |b| {
            parse_timestamp_bytes(b, false).map(i64::to_be_bytes)
        }),
    }
}

/// Encodes a column as `text[]`, every value as it is.
pub fn encode_text<'a>(values: impl Iterator<Item = Option<&'a [u8]>> + Clone) -> EncodedArray {
    let payload = values.clone().map(|v| 4 + v.map_or(0, <[u8]>::len)).sum();
    let mut buf = start(Wire::Text, payload);
    let (mut len, mut has_null) = (0, false);
    for v in values {
        len += 1;
        match v {
            None => {
                has_null = true;
                buf.put_i32(-1);
            }
            Some(b) => {
                buf.put_i32(wire_len(b.len()));
                buf.put_slice(b);
            }
        }
    }
    finish(Wire::Text, buf, len, has_null)
}

fn fixed<'a, const W: usize>(
    wire: Wire,
    values: impl Iterator<Item = Option<&'a [u8]>>,
    parse: impl Fn(&[u8]) -> Option<[u8; W]>,
) -> Option<EncodedArray> {
    let mut buf = start(wire, values.size_hint().0 * (4 + W));
    let (mut len, mut has_null) = (0, false);
    for v in values {
        len += 1;
        match v {
            None => {
                has_null = true;
                buf.put_i32(-1);
            }
            Some(b) => {
                buf.put_i32(W as i32);
                buf.put_slice(&parse(b)?);
            }
        }
    }
    Some(finish(wire, buf, len, has_null))
}

/// Accepts exactly what `str::parse::<i64>` accepts: an optional sign, then ASCII digits.
#[inline]
pub fn parse_int(b: &[u8]) -> Option<i64> {
    let (negative, digits) = match b {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, b),
    };
    if digits.is_empty() {
        return None;
    }
    let zeros = digits.iter().take_while(|&&c| c == b'0').count();
    let magnitude = short_decimal(&digits[zeros..])?;
    if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
}

/// Up to 19 ASCII digits (which cannot overflow a `u64`), eight at a time; an empty slice is 0.
#[inline]
fn short_decimal(digits: &[u8]) -> Option<u64> {
    if digits.len() > 19 {
        return None;
    }
    let (head, octets) = digits.split_at(digits.len() % 8);
    let mut v = 0;
    for &c in head {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v = v * 10 + u64::from(d);
    }
    for o in octets.chunks_exact(8) {
        v = v * 100_000_000 + eight_digits(o.try_into().ok()?)?;
    }
    Some(v)
}

/// Eight ASCII digits, combined pairwise within one `u64` (first digit in the lowest byte).
#[inline]
fn eight_digits(digits: [u8; 8]) -> Option<u64> {
    const HIGH_NIBBLES: u64 = 0xF0F0_F0F0_F0F0_F0F0;
    const ZEROS: u64 = 0x3030_3030_3030_3030;
    let v = u64::from_le_bytes(digits);
    if v & HIGH_NIBBLES != ZEROS || v.wrapping_add(0x0606_0606_0606_0606) & HIGH_NIBBLES != ZEROS {
        return None;
    }
    let v = v - ZEROS;
    let v = (v * 10 + (v >> 8)) & 0x00FF_00FF_00FF_00FF;
    let v = (v * 100 + (v >> 16)) & 0x0000_FFFF_0000_FFFF;
    Some((v * 10_000 + (v >> 32)) & 0xFFFF_FFFF)
}

/// A timestamp in PostgreSQL's binary form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PgTimestamp(pub i64);

impl ToSql for PgTimestamp {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_i64(self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ || *ty == Type::TIMESTAMP
    }

    to_sql_checked!();
}

/// The number in the ASCII digits `b` starts with (at most `max` of them, `max` ≤ 18), and how
/// many digits that is.
#[inline]
fn leading_decimal(b: &[u8], max: usize) -> (i64, usize) {
    let (mut v, mut n) = (0, 0);
    while n < max && n < b.len() {
        let d = b[n].wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        v = v * 10 + i64::from(d);
        n += 1;
    }
    (v, n)
}

#[inline]
fn two_digits(a: u8, b: u8) -> Option<i64> {
    let (a, b) = (a.wrapping_sub(b'0'), b.wrapping_sub(b'0'));
    if a <= 9 && b <= 9 {
        Some(i64::from(a * 10 + b))
    } else {
        None
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date.
#[inline]
const fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Parses a timestamp as PostgreSQL prints it with `DateStyle = ISO`
/// (`2026-11-26 23:53:49.123456+05:30`; no offset without `tz`; `infinity`, `-infinity`)
/// into microseconds since 2000-01-01 00:00 (UTC with `tz`). `None` for anything else,
/// including BC dates.
pub fn parse_timestamp(s: &str, tz: bool) -> Option<i64> {
    parse_timestamp_bytes(s.as_bytes(), tz)
}

fn parse_timestamp_bytes(b: &[u8], tz: bool) -> Option<i64> {
    match b {
        b"infinity" => return Some(i64::MAX),
        b"-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (year, year_len) = leading_decimal(b, 6);
    if year_len < 4 {
        return None;
    }
    let [
        b'-',
        m0,
        m1,
        b'-',
        d0,
        d1,
        b' ',
        h0,
        h1,
        b':',
        n0,
        n1,
        b':',
        s0,
        s1,
        ref rest @ ..,
    ] = b[year_len..]
    else {
        return None;
    };
    let (month, day) = (two_digits(m0, m1)?, two_digits(d0, d1)?);
    let (hour, minute, second) = (
        two_digits(h0, h1)?,
        two_digits(n0, n1)?,
        two_digits(s0, s1)?,
    );
    let mut rest = rest;
    let mut micros = 0;
    if let [b'.', frac @ ..] = rest {
        let (f, n) = leading_decimal(frac, 6);
        if n == 0 {
            return None;
        }
        const SCALE: [i64; 7] = [0, 100_000, 10_000, 1_000, 100, 10, 1];
        micros = f * SCALE[n];
        rest = &frac[n..];
    }
    let mut offset = 0;
    if tz {
        let (sign, tail) = match rest {
            [b'+', tail @ ..] => (1, tail),
            [b'-', tail @ ..] => (-1, tail),
            _ => return None,
        };
        let (oh, om, os, tail) = match *tail {
            [a, b, b':', c, d, b':', e, f, ref t @ ..] => {
                (two_digits(a, b)?, two_digits(c, d)?, two_digits(e, f)?, t)
            }
            [a, b, b':', c, d, ref t @ ..] => (two_digits(a, b)?, two_digits(c, d)?, 0, t),
            [a, b, ref t @ ..] => (two_digits(a, b)?, 0, 0, t),
            _ => return None,
        };
        if oh > 15 || om > 59 || os > 59 {
            return None;
        }
        offset = sign * (oh * 3600 + om * 60 + os);
        rest = tail;
    }
    if !rest.is_empty()
        || !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
        || year > 294_276
    {
        return None;
    }
    const DAYS_TO_2000: i64 = days_from_civil(2000, 1, 1);
    let days = days_from_civil(year, month, day) - DAYS_TO_2000;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(secs * 1_000_000 + micros)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::types as pg;
    use proptest::prelude::*;
    use tokio_postgres::fallible_iterator::FallibleIterator;

    fn raw<'a>(
        values: &'a [Option<&'a str>],
    ) -> impl Iterator<Item = Option<&'a [u8]>> + Clone + 'a {
        values.iter().map(|v| v.map(str::as_bytes))
    }

    fn sent(a: &EncodedArray) -> BytesMut {
        let mut out = BytesMut::new();
        a.to_sql_checked(&a.wire().pg_array_type(), &mut out)
            .unwrap();
        out
    }

    fn by_tokio_postgres<T: ToSql>(ty: &Type, values: Vec<Option<T>>) -> BytesMut {
        let mut out = BytesMut::new();
        values.to_sql_checked(ty, &mut out).unwrap();
        out
    }

    /// Decodes a one-dimensional array (none for an empty one), checking its header.
    fn decoded<T>(
        a: &EncodedArray,
        element: impl Fn(&[u8]) -> Result<T, Box<dyn Error + Sync + Send>>,
    ) -> Vec<Option<T>> {
        let bytes = sent(a);
        let array = pg::array_from_sql(&bytes).unwrap();
        assert_eq!(array.element_type(), a.wire().element_type().oid());
        let dims: Vec<_> = array.dimensions().collect().unwrap();
        assert_eq!(dims.len(), 1);
        assert_eq!((dims[0].len, dims[0].lower_bound), (a.len() as i32, 1));
        let values: Vec<Option<T>> = array
            .values()
            .map(|v| v.map(&element).transpose())
            .collect()
            .unwrap();
        assert_eq!(array.has_nulls(), values.iter().any(Option::is_none));
        assert_eq!(values.len(), a.len());
        values
    }

    fn parsed<T>(values: &[Option<&str>], parse: impl Fn(&str) -> T) -> Vec<Option<T>> {
        values.iter().map(|v| v.map(&parse)).collect()
    }

    #[test]
    fn text_round_trips_byte_for_byte() {
        let values = [
            Some("plain"),
            None,
            Some(""),
            Some("grüße, 日本語, 🦀"),
            Some("with\ttab\nnewline, \"quotes\", {braces}"),
            None,
        ];
        for a in [
            encode_text(raw(&values)),
            encode_array(Wire::Text, raw(&values)).unwrap(),
        ] {
            assert_eq!((a.wire(), a.len()), (Wire::Text, values.len()));
            assert_eq!(
                decoded(&a, |b| pg::text_from_sql(b).map(str::to_owned)),
                parsed(&values, str::to_owned)
            );
            assert_eq!(
                sent(&a),
                by_tokio_postgres(&Type::TEXT_ARRAY, values.to_vec())
            );
        }
    }

    #[test]
    fn integers_round_trip_as_tokio_postgres_sends_them() {
        let i8s = [
            Some("0"),
            None,
            Some("-9223372036854775808"),
            Some("9223372036854775807"),
            Some("+17"),
            Some("-0"),
            Some("000123"),
        ];
        let a = encode_array(Wire::Int8, raw(&i8s)).unwrap();
        let want = parsed(&i8s, |s| s.parse::<i64>().unwrap());
        assert_eq!(decoded(&a, pg::int8_from_sql), want);
        assert_eq!(sent(&a), by_tokio_postgres(&Type::INT8_ARRAY, want));

        let i4s = [Some("-2147483648"), Some("2147483647"), None, Some("42")];
        let a = encode_array(Wire::Int4, raw(&i4s)).unwrap();
        let want = parsed(&i4s, |s| s.parse::<i32>().unwrap());
        assert_eq!(decoded(&a, pg::int4_from_sql), want);
        assert_eq!(sent(&a), by_tokio_postgres(&Type::INT4_ARRAY, want));

        let i2s = [Some("-32768"), None, Some("32767"), Some("7")];
        let a = encode_array(Wire::Int2, raw(&i2s)).unwrap();
        let want = parsed(&i2s, |s| s.parse::<i16>().unwrap());
        assert_eq!(decoded(&a, pg::int2_from_sql), want);
        assert_eq!(sent(&a), by_tokio_postgres(&Type::INT2_ARRAY, want));
    }

    #[test]
    fn integers_of_every_length_parse() {
        for s in [
            "7",
            "12345678",
            "-87654321",
            "123456789",
            "1234567890123456789",
            "-1234567890123456789",
            "0000000000000000000000000042",
            "-00000000000000000000009223372036854775808",
            "+0",
        ] {
            assert_eq!(parse_int(s.as_bytes()), s.parse().ok(), "{s}");
            assert!(parse_int(s.as_bytes()).is_some(), "{s}");
        }
        for s in [
            "12345678901234567890",
            "1234567a",
            "123456789012345678x",
            "9223372036854775808",
            "-9223372036854775809",
            "+-1",
            "1_000",
        ] {
            assert_eq!(parse_int(s.as_bytes()), None, "{s}");
        }
    }

    #[test]
    fn booleans_round_trip_as_tokio_postgres_sends_them() {
        let values = [Some("t"), Some("f"), None, Some("t")];
        let a = encode_array(Wire::Bool, raw(&values)).unwrap();
        let want = parsed(&values, |s| s == "t");
        assert_eq!(decoded(&a, pg::bool_from_sql), want);
        assert_eq!(sent(&a), by_tokio_postgres(&Type::BOOL_ARRAY, want));
    }

    #[test]
    fn timestamps_round_trip_as_tokio_postgres_sends_them() {
        let with_tz = [
            Some("2026-11-26 23:53:49.123456+05:30"),
            None,
            Some("infinity"),
            Some("-infinity"),
            Some("1970-01-01 00:00:00+00"),
        ];
        let a = encode_array(Wire::Timestamptz, raw(&with_tz)).unwrap();
        let want = parsed(&with_tz, |s| parse_timestamp(s, true).unwrap());
        assert_eq!(want[2..4], [Some(i64::MAX), Some(i64::MIN)]);
        assert_eq!(decoded(&a, pg::timestamp_from_sql), want);
        let as_pg = want.iter().map(|v| v.map(PgTimestamp)).collect();
        assert_eq!(sent(&a), by_tokio_postgres(&Type::TIMESTAMPTZ_ARRAY, as_pg));

        let without = [
            Some("2000-01-01 00:00:00"),
            Some("12345-06-07 08:09:10.5"),
            None,
            Some("infinity"),
        ];
        let a = encode_array(Wire::Timestamp, raw(&without)).unwrap();
        let want = parsed(&without, |s| parse_timestamp(s, false).unwrap());
        assert_eq!(decoded(&a, pg::timestamp_from_sql), want);
        let as_pg = want.iter().map(|v| v.map(PgTimestamp)).collect();
        assert_eq!(sent(&a), by_tokio_postgres(&Type::TIMESTAMP_ARRAY, as_pg));
    }

    #[test]
    fn columns_of_nulls_and_empty_columns_match_tokio_postgres() {
        for wire in WIRES {
            let empty = encode_array(wire, raw(&[])).unwrap();
            assert!(empty.is_empty());
            let want = by_tokio_postgres::<&str>(&Type::TEXT_ARRAY, vec![]);
            assert_eq!(sent(&empty)[..8], want[..8]);
            assert_eq!(sent(&empty)[12..], want[12..]);
            assert_eq!(
                pg::array_from_sql(&sent(&empty))
                    .unwrap()
                    .values()
                    .count()
                    .unwrap(),
                0
            );

            let nulls = encode_array(wire, raw(&[None, None])).unwrap();
            let want = by_tokio_postgres::<&str>(&Type::TEXT_ARRAY, vec![None, None]);
            assert_eq!(sent(&nulls)[..8], want[..8]);
            assert_eq!(sent(&nulls)[12..], want[12..]);
            assert_eq!(
                &sent(&nulls)[8..12],
                &wire.element_type().oid().to_be_bytes()
            );
        }
    }

    #[test]
    fn a_typed_column_with_one_unparsable_value_is_not_encoded() {
        let none = |wire, values: &[Option<&str>]| encode_array(wire, raw(values)).is_none();
        assert!(none(
            Wire::Int8,
            &[Some("1"), None, Some("9223372036854775808")]
        ));
        assert!(none(Wire::Int8, &[Some(" 1")]));
        assert!(none(Wire::Int8, &[Some("-")]));
        assert!(none(Wire::Int8, &[Some("")]));
        assert!(none(Wire::Int4, &[Some("1"), Some("2147483648")]));
        assert!(none(Wire::Int2, &[Some("-32769")]));
        assert!(none(Wire::Int2, &[Some("1.0")]));
        assert!(none(Wire::Bool, &[Some("t"), Some("true")]));
        assert!(none(
            Wire::Timestamptz,
            &[Some("0001-01-01 00:00:00+00 BC")]
        ));
        assert!(none(Wire::Timestamp, &[Some("2023-01-01 00:00:00+00")]));
    }

    #[test]
    fn only_the_array_type_of_its_element_is_accepted() {
        for wire in WIRES {
            assert!(<EncodedArray as ToSql>::accepts(&wire.pg_array_type()));
            assert!(!<EncodedArray as ToSql>::accepts(&wire.element_type()));
            let a = encode_array(wire, raw(&[None])).unwrap();
            for other in WIRES {
                let mut out = BytesMut::new();
                let ok = a.to_sql_checked(&other.pg_array_type(), &mut out).is_ok();
                assert_eq!(ok, other == wire, "{wire:?} as {other:?}");
            }
        }
        for ty in [
            Type::VARCHAR_ARRAY,
            Type::NUMERIC_ARRAY,
            Type::TEXT,
            Type::INT8,
        ] {
            assert!(!<EncodedArray as ToSql>::accepts(&ty), "{ty}");
        }
        let a = encode_text(raw(&[Some("x")]));
        assert!(
            a.to_sql_checked(&Type::VARCHAR_ARRAY, &mut BytesMut::new())
                .is_err()
        );
    }

    /// `parse_timestamp` as it was before it read bytes, to hold the rewrite to it.
    fn parse_timestamp_as_before(s: &str, tz: bool) -> Option<i64> {
        match s {
            "infinity" => return Some(i64::MAX),
            "-infinity" => return Some(i64::MIN),
            _ => {}
        }
        let b = s.as_bytes();
        let mut i = 0;
        let digits = |i: &mut usize, min: usize, max: usize| -> Option<i64> {
            let start = *i;
            while *i < b.len() && *i - start < max && b[*i].is_ascii_digit() {
                *i += 1;
            }
            if *i - start < min {
                return None;
            }
            s[start..*i].parse().ok()
        };
        let expect =
            |i: &mut usize, c: u8| -> Option<()> { (b.get(*i) == Some(&c)).then(|| *i += 1) };
        let year = digits(&mut i, 4, 6)?;
        expect(&mut i, b'-')?;
        let month = digits(&mut i, 2, 2)?;
        expect(&mut i, b'-')?;
        let day = digits(&mut i, 2, 2)?;
        expect(&mut i, b' ')?;
        let hour = digits(&mut i, 2, 2)?;
        expect(&mut i, b':')?;
        let minute = digits(&mut i, 2, 2)?;
        expect(&mut i, b':')?;
        let second = digits(&mut i, 2, 2)?;
        let mut micros = 0;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            let frac = digits(&mut i, 1, 6)?;
            micros = frac * 10i64.pow((6 - (i - start)) as u32);
        }
        let mut offset = 0;
        if tz {
            let sign = match b.get(i) {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return None,
            };
            i += 1;
            let oh = digits(&mut i, 2, 2)?;
            let mut om = 0;
            let mut os = 0;
            if b.get(i) == Some(&b':') {
                i += 1;
                om = digits(&mut i, 2, 2)?;
                if b.get(i) == Some(&b':') {
                    i += 1;
                    os = digits(&mut i, 2, 2)?;
                }
            }
            if oh > 15 || om > 59 || os > 59 {
                return None;
            }
            offset = sign * (oh * 3600 + om * 60 + os);
        }
        if i != b.len()
            || !(1..=12).contains(&month)
            || day < 1
            || day > days_in_month(year, month)
            || hour > 23
            || minute > 59
            || second > 59
            || year > 294_276
        {
            return None;
        }
        let days = days_from_civil(year, month, day) - days_from_civil(2000, 1, 1);
        let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
        Some(secs * 1_000_000 + micros)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn int8_columns_match_tokio_postgres(
            values in proptest::collection::vec(proptest::option::of(any::<i64>()), 0..64)
        ) {
            let text: Vec<Option<String>> =
                values.iter().map(|v| v.map(|v| v.to_string())).collect();
            let a = encode_array(Wire::Int8, text.iter().map(|v| v.as_deref().map(str::as_bytes)))
                .unwrap();
            prop_assert_eq!(sent(&a), by_tokio_postgres(&Type::INT8_ARRAY, values));
        }

        #[test]
        fn text_columns_match_tokio_postgres(
            values in proptest::collection::vec(proptest::option::of(".*"), 0..64)
        ) {
            let a = encode_text(values.iter().map(|v| v.as_deref().map(str::as_bytes)));
            let want: Vec<Option<&str>> = values.iter().map(Option::as_deref).collect();
            prop_assert_eq!(sent(&a), by_tokio_postgres(&Type::TEXT_ARRAY, want));
        }

        #[test]
        fn timestamps_parse_as_before(
            s in "[0-9]{3,7}-(0[1-9]|1[0-2]|[0-9]{1,3})-[0-3][0-9] [0-2][0-9]:[0-6][0-9]:[0-6][0-9](\\.[0-9]{0,8})?([+-][0-9]{1,3}(:[0-9]{0,3}(:[0-9]{0,3})?)?)?.?",
            tz in any::<bool>(),
        ) {
            prop_assert_eq!(parse_timestamp(&s, tz), parse_timestamp_as_before(&s, tz));
        }

        #[test]
        fn integers_parse_exactly_as_str_parse_does(s in "[+-]{0,2}0{0,3}[0-9]{0,21}|[+-]?[0-9/:]{1,20}|.{0,10}") {
            let b = s.as_bytes();
            prop_assert_eq!(parse_int(b), s.parse::<i64>().ok());
            prop_assert_eq!(
                parse_int(b).and_then(|v| i32::try_from(v).ok()),
                s.parse::<i32>().ok()
            );
            prop_assert_eq!(
                parse_int(b).and_then(|v| i16::try_from(v).ok()),
                s.parse::<i16>().ok()
            );
        }
    }

    #[test]
    fn timestamps_parse_as_postgres_prints_them() {
        assert_eq!(parse_timestamp("2000-01-01 00:00:00", false), Some(0));
        assert_eq!(parse_timestamp("2000-01-01 00:00:00+00", true), Some(0));
        assert_eq!(
            parse_timestamp("2000-01-01 00:00:01.5", false),
            Some(1_500_000)
        );
        assert_eq!(
            parse_timestamp("2000-01-01 05:30:00+05:30", true),
            Some(0),
            "local time minus the offset"
        );
        assert_eq!(
            parse_timestamp("1999-12-31 20:29:59.999999-03:30", true),
            Some(-1)
        );
        // 1970-01-01 is 10957 days before 2000-01-01.
        assert_eq!(
            parse_timestamp("1970-01-01 00:00:00+00", true),
            Some(-10_957 * 86_400 * 1_000_000)
        );
        // A leap day and a far year (five digits).
        assert_eq!(
            parse_timestamp("2024-02-29 12:00:00.000001+12:45", true),
            Some(
                ((days_from_civil(2024, 2, 29) - days_from_civil(2000, 1, 1)) * 86_400 + 12 * 3600
                    - (12 * 3600 + 45 * 60))
                    * 1_000_000
                    + 1
            )
        );
        assert!(parse_timestamp("12345-06-07 08:09:10", false).is_some());
        assert_eq!(
            parse_timestamp("1900-01-01 00:00:00+00:00:15", true).map(|v| v % 1_000_000),
            Some(0)
        );
        assert_eq!(parse_timestamp("infinity", true), Some(i64::MAX));
        assert_eq!(parse_timestamp("-infinity", false), Some(i64::MIN));
    }

    #[test]
    fn anything_else_is_left_to_the_server() {
        for s in [
            "0044-03-15 12:00:00 BC",
            "2023-02-29 00:00:00",
            "2023-13-01 00:00:00",
            "2023-01-01 24:00:00",
            "2023-01-01T00:00:00",
            "2023-01-01 00:00:00.1234567",
            "2023-01-01 00:00",
            "01/02/2023 00:00:00",
            "2023-01-01 00:00:00 PST",
            "",
        ] {
            assert_eq!(parse_timestamp(s, false), None, "{s}");
        }
        assert_eq!(
            parse_timestamp("2023-01-01 00:00:00", true),
            None,
            "no offset"
        );
        assert_eq!(
            parse_timestamp("2023-01-01 00:00:00+00", false),
            None,
            "offset"
        );
    }

    #[test]
    fn a_column_with_one_unparsable_value_goes_as_text() {
        let col = |w: Wire, vals: &[Option<&'static str>]| {
            encode_array(w, vals.iter().map(|v| v.map(str::as_bytes))).map(|a| a.wire())
        };
        assert_eq!(
            col(Wire::Int8, &[Some("1"), None, Some("-9223372036854775808")]),
            Some(Wire::Int8)
        );
        assert_eq!(col(Wire::Int4, &[Some("1"), Some("4294967296")]), None);
        assert_eq!(col(Wire::Bool, &[Some("t"), Some("true")]), None);
        assert_eq!(
            col(Wire::Timestamptz, &[Some("0001-01-01 00:00:00+00 BC")]),
            None
        );
        assert_eq!(col(Wire::Text, &[Some("x")]), Some(Wire::Text));
        assert_eq!(Wire::for_type("timestamp(3) with time zone"), Wire::Text);
        assert_eq!(Wire::for_type("bigint"), Wire::Int8);
    }
}
