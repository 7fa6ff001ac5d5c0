//! Binary wire forms for the column types whose text input costs the target most (no I/O).
//!
//! pgoutput sends values as text; replay used to ship every column as a `text[]` and let the
//! target parse each value with the column type's input function. For integers, booleans and
//! timestamps that parsing is a large share of the target's work (a timestamp's text input is
//! several times the cost of its binary receive), so replay parses them here and sends typed
//! arrays (`int8[]`, `timestamptz[]`, …) in binary instead.
//!
//! **Contract:** a value is sent in binary only when it parses completely in the exact form
//! PostgreSQL prints it (capture asks for `DateStyle = ISO`); anything else — a BC date, an
//! unexpected spelling — makes that statement send the whole column as text, exactly as
//! before. Never a guess.

use std::error::Error;

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

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
}

/// A parameter array in binary form. `None` when some value does not parse: send the column as
/// text then.
pub fn encode(wire: Wire, values: &[Option<&str>]) -> Option<Box<dyn ToSql + Sync + Send>> {
    fn all<T: ToSql + Sync + Send + 'static>(
        values: &[Option<&str>],
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<Box<dyn ToSql + Sync + Send>> {
        let v = values
            .iter()
            .map(|v| match v {
                None => Some(None),
                Some(s) => parse(s).map(Some),
            })
            .collect::<Option<Vec<Option<T>>>>()?;
        Some(Box::new(v))
    }
    match wire {
        Wire::Text => None,
        Wire::Int8 => all(values, |s| s.parse::<i64>().ok()),
        Wire::Int4 => all(values, |s| s.parse::<i32>().ok()),
        Wire::Int2 => all(values, |s| s.parse::<i16>().ok()),
        Wire::Bool => all(values, |s| match s {
            "t" => Some(true),
            "f" => Some(false),
            _ => None,
        }),
        Wire::Timestamptz => all(values, |s| parse_timestamp(s, true).map(PgTimestamp)),
        Wire::Timestamp => all(values, |s| parse_timestamp(s, false).map(PgTimestamp)),
    }
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

/// Days from 1970-01-01 to a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
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
    let expect = |i: &mut usize, c: u8| -> Option<()> { (b.get(*i) == Some(&c)).then(|| *i += 1) };
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(encode(Wire::Int8, &[Some("1"), None, Some("-9223372036854775808")]).is_some());
        assert!(encode(Wire::Int4, &[Some("1"), Some("4294967296")]).is_none());
        assert!(encode(Wire::Bool, &[Some("t"), Some("true")]).is_none());
        assert!(encode(Wire::Timestamptz, &[Some("0001-01-01 00:00:00+00 BC")]).is_none());
        assert!(encode(Wire::Text, &[Some("x")]).is_none());
        assert_eq!(Wire::for_type("timestamp(3) with time zone"), Wire::Text);
        assert_eq!(Wire::for_type("bigint"), Wire::Int8);
    }
}
