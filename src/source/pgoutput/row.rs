//! Insert, Update and Delete messages borrowed from their payload, for the replay hot path.
//!
//! [`decode_row`](super::decode_row) validates a whole row message once and returns a
//! [`RowRef`] of slices into the payload: no allocation, no reference counting. [`TupleValues`]
//! reads the validated values back without error paths; the owned decoder builds its
//! [`TupleData`](super::TupleData) from it too, so both decoders read tuples the same way.

use std::fmt;
use std::iter::FusedIterator;

/// Which row change a [`RowRef`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKind {
    Insert,
    Update,
    Delete,
}

/// The old image of an Update or Delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldKind {
    /// 'K': only the replica identity columns are meaningful; the others are null.
    Key,
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// An Insert, Update or Delete message borrowed from its payload, already validated.
#[derive(Clone, Copy, Debug)]
pub struct RowRef<'a> {
    pub kind: RowKind,
    pub relid: u32,
    /// `None` for an Insert and for an Update that sent no old image.
    pub old: Option<(OldKind, TupleRef<'a>)>,
    /// `None` only for a Delete.
    pub new: Option<TupleRef<'a>>,
}

/// A tuple's values as bytes of the payload, validated by [`decode_row`](super::decode_row):
/// iterating them cannot fail.
#[derive(Clone, Copy)]
pub struct TupleRef<'a> {
    /// From the first value's kind byte to the end of the last value.
    bytes: &'a [u8],
    len: usize,
}

impl<'a> TupleRef<'a> {
    /// `bytes` must be exactly `len` well-formed values.
    pub(super) fn validated(bytes: &'a [u8], len: usize) -> TupleRef<'a> {
        TupleRef { bytes, len }
    }

    /// The number of columns.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn values(&self) -> TupleValues<'a> {
        TupleValues {
            rest: self.bytes,
            left: self.len,
        }
    }
}

impl fmt::Debug for TupleRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.values()).finish()
    }
}

/// The values of a [`TupleRef`], in column order.
#[derive(Clone, Debug)]
pub struct TupleValues<'a> {
    rest: &'a [u8],
    left: usize,
}

const VALIDATED: &str = "tuple bytes were validated by decode_row";

impl<'a> Iterator for TupleValues<'a> {
    type Item = ValueRef<'a>;

    #[inline]
    fn next(&mut self) -> Option<ValueRef<'a>> {
        if self.left == 0 {
            debug_assert!(self.rest.is_empty(), "{VALIDATED}");
            return None;
        }
        self.left -= 1;
        let Some((&kind, rest)) = self.rest.split_first() else {
            unreachable!("{VALIDATED}")
        };
        let (value, rest) = match kind {
            b'n' => (ValueRef::Null, rest),
            b'u' => (ValueRef::UnchangedToast, rest),
            b't' | b'b' => {
                let Some((len, rest)) = rest.split_first_chunk::<4>() else {
                    unreachable!("{VALIDATED}")
                };
                let len = i32::from_be_bytes(*len);
                debug_assert!(len >= 0, "{VALIDATED}");
                let (bytes, rest) = rest.split_at(len as usize);
                if kind == b't' {
                    (ValueRef::Text(bytes), rest)
                } else {
                    (ValueRef::Binary(bytes), rest)
                }
            }
            _ => unreachable!("{VALIDATED}"),
        };
        self.rest = rest;
        Some(value)
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for TupleValues<'_> {}

impl FusedIterator for TupleValues<'_> {}

/// One column value, borrowed from the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueRef<'a> {
    /// 'n'
    Null,
    /// 'u': a TOASTed value the change did not touch; the previous value stands.
    UnchangedToast,
    /// 't': the type's text output.
    Text(&'a [u8]),
    /// 'b': the type's binary send format.
    Binary(&'a [u8]),
}
