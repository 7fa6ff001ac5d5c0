//! The row model replay works in (no I/O): column values, the arena a batch's values live in,
//! row changes (owned, and as arena slices), and a table's shape as the fold sees it.
//!
//! Values are the bytes pgoutput sent (text format), never parsed here. A batch copies each
//! value once into its [`Arena`] and moves 8-byte [`Val`] handles around; the arena is shared
//! read-only with the writer once the batch is handed over, then dropped or reused whole.

use bytes::Bytes;

use crate::source::pgoutput::Relation;

/// One column value in text (or binary) format; `None` is SQL NULL.
pub type Value = Option<Bytes>;

/// The values of a table's key columns, in [`TableShape::key`] order.
pub type Key = Vec<Value>;

/// A column of a new-row image in an update.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ColumnValue {
    /// The value (or NULL).
    Known(Value),
    /// pgoutput's 'u': a TOASTed value the update did not change; the stream does not carry it.
    /// In an [`Update`](Change::Update) statement: keep the target row's current value.
    UnchangedToast,
}

impl ColumnValue {
    pub fn is_known(&self) -> bool {
        matches!(self, ColumnValue::Known(_))
    }
}

/// A value held in a batch's [`Arena`]: a range of its bytes, SQL NULL, or an unchanged-TOAST
/// marker. Eight bytes, `Copy`: the fold moves these around, never the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Val {
    off: u32,
    len: u32,
}

impl Val {
    const NULL_LEN: u32 = u32::MAX;
    const TOAST_LEN: u32 = u32::MAX - 1;
    pub const NULL: Val = Val {
        off: 0,
        len: Val::NULL_LEN,
    };
    /// pgoutput's 'u' (see [`ColumnValue::UnchangedToast`]).
    pub const UNCHANGED_TOAST: Val = Val {
        off: 0,
        len: Val::TOAST_LEN,
    };

    pub fn is_null(self) -> bool {
        self.len == Val::NULL_LEN
    }

    /// A value or NULL (not an unchanged-TOAST marker).
    pub fn is_known(self) -> bool {
        self.len != Val::TOAST_LEN
    }
}

/// The bytes of every value of one batch, appended in arrival order and shared read-only with
/// the writer once the batch is handed over. Values are copied in once (no per-value
/// allocation or reference count); the arena is dropped, or reused, as a whole.
///
/// Offsets are 32-bit: replay hands a batch over long before it holds 4 GiB (the slice rule
/// bounds it by bytes as well as rows, and one pgoutput message is under 1 GiB).
#[derive(Clone, Debug, Default)]
pub struct Arena {
    bytes: Vec<u8>,
}

impl Arena {
    /// Bytes held.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Copies a value in (`None` = NULL).
    pub fn push(&mut self, value: Option<&[u8]>) -> Val {
        let Some(b) = value else {
            return Val::NULL;
        };
        let off = self.bytes.len();
        let end = off + b.len();
        assert!(
            end < Val::TOAST_LEN as usize,
            "a replay batch outgrew 4 GiB; the slice rule hands batches over long before"
        );
        self.bytes.extend_from_slice(b);
        Val {
            off: off as u32,
            len: b.len() as u32,
        }
    }

    /// A value's bytes; `None` for NULL and for an unchanged-TOAST marker.
    pub fn get(&self, v: Val) -> Option<&[u8]> {
        if v.is_null() || !v.is_known() {
            return None;
        }
        Some(&self.bytes[v.off as usize..(v.off + v.len) as usize])
    }

    /// Two values are the same value (NULL equals NULL, a marker equals a marker).
    pub fn same(&self, a: Val, b: Val) -> bool {
        match (a.is_known(), b.is_known()) {
            (true, true) => self.get(a) == self.get(b),
            (false, false) => true,
            _ => false,
        }
    }

    /// Empties the arena, keeping its allocation.
    pub fn clear(&mut self) {
        self.bytes.clear();
    }

    pub(super) fn value(&self, v: Val) -> Value {
        self.get(v).map(Bytes::copy_from_slice)
    }

    pub(super) fn column(&self, v: Val) -> ColumnValue {
        if v.is_known() {
            ColumnValue::Known(self.value(v))
        } else {
            ColumnValue::UnchangedToast
        }
    }

    pub(super) fn intern(&mut self, v: &Value) -> Val {
        self.push(v.as_deref())
    }

    pub(super) fn intern_column(&mut self, v: &ColumnValue) -> Val {
        match v {
            ColumnValue::Known(v) => self.intern(v),
            ColumnValue::UnchangedToast => Val::UNCHANGED_TOAST,
        }
    }
}

/// What the fold needs to know about a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableShape {
    pub relid: u32,
    /// Number of columns in a tuple.
    pub columns: usize,
    /// Indices of the key columns (replica identity key flags of the Relation), ascending.
    pub key: Vec<usize>,
    /// REPLICA IDENTITY FULL on a table without a key: rows are identified by their whole old
    /// image and may be duplicates, so the table is never folded.
    pub identity_full_without_key: bool,
}

impl TableShape {
    /// The shape a Relation message describes.
    pub fn from_relation(rel: &Relation) -> TableShape {
        let key: Vec<usize> = rel
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key())
            .map(|(i, _)| i)
            .collect();
        TableShape {
            relid: rel.relid,
            columns: rel.columns.len(),
            identity_full_without_key: key.is_empty()
                && rel.replica_identity == crate::source::pgoutput::ReplicaIdentity::Full,
            key,
        }
    }
}

/// One row change with owned values (strict-order replay, tables replayed in order, tests).
///
/// Old images are full-width tuples in column order as pgoutput sends them: for a key image
/// ('K') only the key columns are meaningful (the others are NULL); for REPLICA IDENTITY FULL
/// ('O') it is the whole old row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Insert {
        new: Vec<Value>,
    },
    /// `old` is present when the key changed or under REPLICA IDENTITY FULL; without it the
    /// key is read from `new`'s key columns.
    Update {
        old: Option<Vec<Value>>,
        new: Vec<ColumnValue>,
    },
    Delete {
        old: Vec<Value>,
    },
}

/// A row change whose values are in the folder's [`Arena`] ([`super::fold::BatchFolder::arena`]); the
/// same layout as [`Change`], with [`Val::UNCHANGED_TOAST`] for an unchanged value.
#[derive(Clone, Copy, Debug)]
pub enum RowChange<'a> {
    Insert {
        new: &'a [Val],
    },
    Update {
        old: Option<&'a [Val]>,
        new: &'a [Val],
    },
    Delete {
        old: &'a [Val],
    },
}

impl RowChange<'_> {
    /// The same change with owned values (strict-order replay, tables replayed in order).
    pub fn to_change(&self, arena: &Arena) -> Change {
        let values = |image: &[Val]| image.iter().map(|&v| arena.value(v)).collect();
        match *self {
            RowChange::Insert { new } => Change::Insert { new: values(new) },
            RowChange::Update { old, new } => Change::Update {
                old: old.map(values),
                new: new.iter().map(|&v| arena.column(v)).collect(),
            },
            RowChange::Delete { old } => Change::Delete { old: values(old) },
        }
    }
}
