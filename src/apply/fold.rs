//! Net-effect folding of a batch of row changes, per table and per key (pure logic, no I/O).
//!
//! Replay groups consecutive source transactions into one target transaction and writes each
//! table's share with a few set-based statements instead of one statement per change. This
//! module owns the step in between: it reduces the changes of a batch to their net effect per
//! key and decides, per table, whether that reduction can be written set-based *safely*; when
//! it cannot be proven safe it hands the table's changes back in source order instead.
//!
//! # Statement order (the contract with the applier)
//!
//! For a [`TableBatch`] with `ordered == false` the applier runs, in the same target
//! transaction and in this order:
//!
//! 1. **deletes** — `DELETE … WHERE key IN (deletes)`. Afterwards no row with these keys exists
//!    (a key absent from the target is not an error).
//! 2. **updates** — one `UPDATE t SET … FROM (values) WHERE t.key = v.old_key`. Each entry
//!    names the row by its key *before the batch* and gives its new image; an
//!    [`ColumnValue::UnchangedToast`] column keeps the target's current value, and the image's
//!    key columns may differ from the old key (a key move).
//! 3. **upserts** — one `INSERT … ON CONFLICT (key) DO UPDATE SET <all columns> = EXCLUDED.…`;
//!    rows marked [`TableBatch::fresh`] (no row had their key before the batch) may go through
//!    a plain `INSERT` instead.
//!    Afterwards the row with the image's key has exactly these values.
//!
//! The updates may also be run as several UPDATE statements (e.g. grouped by which columns are
//! known), in any order between steps 1 and 3: the argument below holds for each subset.
//!
//! Why this is safe (no primary-key collision inside a statement, whatever row order
//! PostgreSQL processes a statement in), with `k0` the key of a row before the batch:
//!
//! * Every key appears at most once per list (keys of the fold map are distinct; each row
//!   before the batch has at most one descendant), so no `UPDATE … FROM` row is matched twice
//!   and no `ON CONFLICT DO UPDATE` affects a row twice.
//! * An update is emitted only for a row that descends from the row at `k0` before the batch:
//!   either it still sits at `k0` (all values known: a plain `UPDATE`, cheaper on the target
//!   than an upsert), or a value is unknown. The update needs that row, so `k0` is never in
//!   `deletes`, and nothing before step 2 changes it, so "keep the current value" reads the
//!   pre-batch value. A row that stays at `k0` is nobody's move target (that entry holds it).
//! * A key move `k0 → k1` in step 2 needs `k1` free while the statement runs, in any row order:
//!   `k1` is not the old key of any update in the statement (checked; otherwise — swaps,
//!   cycles, chains onto a key whose row moves away — the table goes `ordered`), not the new key
//!   of another update (map keys are distinct), and if a row might be at `k1` before the batch
//!   `k1` is in `deletes` (step 1). Upserts, which create rows, come after.
//! * Upserts never change a key and resolve conflicts on the key, so they cannot collide; a
//!   key whose pre-batch row moves away in step 2 may be re-filled by an upsert in step 3.
//! * Keys untouched by the batch are touched by no statement.
//!
//! Only the key's uniqueness is reasoned about: another unique constraint on the target can
//! still make a set-based statement fail where the source order would not; the applier then
//! retries the batch in strict source order (the brief's rule).
//!
//! # When a table is `ordered`
//!
//! The fold gives up on a table, and returns its changes as pushed in `original`, when:
//! the table has no key (including REPLICA IDENTITY FULL without a primary key: rows may be
//! duplicates), a key value is NULL, the stream is inconsistent with itself (an insert of a key
//! the batch knows to exist, an update or delete of a key it knows to be absent), or the key
//! moves cannot be ordered safely (above). See [`OrderedReason`].
//!
//! # Assumptions
//!
//! The changes are those of consecutive committed source transactions in commit order, so
//! they are consistent with the source table: the first change of a batch to a key that is an
//! insert (or a key move onto it) means no row had that key before the batch. Keys are
//! compared as bytes (text-format values of a type with one text form per value, which holds
//! for key types in practice). A batch does not cross a TRUNCATE or a Relation change of the
//! table (the applier finishes the batch there).

use std::collections::HashMap;

use bytes::Bytes;
use thiserror::Error;

use crate::source::pgoutput::{LogicalMessage, OldTuple, Relation, TupleData, TupleValue};

/// Seeded per process (collisions cannot be planted through key values), and several times
/// faster than SipHash on short keys.
type FastHash = foldhash::fast::RandomState;

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

impl From<TupleValue> for ColumnValue {
    /// Text and binary values alike become bytes (moved, not shared); the batch does not
    /// record the format.
    fn from(v: TupleValue) -> ColumnValue {
        match v {
            TupleValue::Null => ColumnValue::Known(None),
            TupleValue::UnchangedToast => ColumnValue::UnchangedToast,
            TupleValue::Text(b) | TupleValue::Binary(b) => ColumnValue::Known(Some(b)),
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

/// One row change, as decoded (see the `from_*` constructors).
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

/// A whole row image; an unchanged-TOAST marker in it is an error.
fn known_tuple(t: TupleData) -> Result<Vec<Value>, FoldError> {
    t.values
        .into_iter()
        .map(|v| match ColumnValue::from(v) {
            ColumnValue::Known(v) => Ok(v),
            ColumnValue::UnchangedToast => Err(FoldError::UnchangedToastInImage),
        })
        .collect()
}

impl Change {
    /// The change an Insert, Update or Delete message makes, taking its values out of the
    /// message (no copy). `None` for other messages; an error if an image that must be whole
    /// (a new row inserted, an old row) holds an unchanged-TOAST marker.
    pub fn from_message(m: LogicalMessage) -> Option<Result<Change, FoldError>> {
        Some(match m {
            LogicalMessage::Insert(i) => known_tuple(i.new).map(|new| Change::Insert { new }),
            LogicalMessage::Update(u) => u
                .old
                .map(|o| match o {
                    OldTuple::Key(t) | OldTuple::Full(t) => known_tuple(t),
                })
                .transpose()
                .map(|old| Change::Update {
                    old,
                    new: u.new.values.into_iter().map(ColumnValue::from).collect(),
                }),
            LogicalMessage::Delete(d) => match d.old {
                OldTuple::Key(t) | OldTuple::Full(t) => known_tuple(t),
            }
            .map(|old| Change::Delete { old }),
            _ => return None,
        })
    }
}

/// A change the fold cannot take. [`BatchFolder::push`] leaves the folder unchanged on error.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FoldError {
    #[error("table {relid}: a tuple has {got} columns, the relation has {expected}")]
    WidthMismatch {
        relid: u32,
        expected: usize,
        got: usize,
    },
    #[error(
        "table {relid}: its shape changed inside a batch (finish the batch on a Relation change)"
    )]
    ShapeChanged { relid: u32 },
    #[error(
        "table {relid}: an update without an old key has an unchanged-TOAST key column; the row cannot be identified"
    )]
    UnknownKey { relid: u32 },
    #[error("an old or inserted row image holds an unchanged-TOAST marker")]
    UnchangedToastInImage,
}

/// Why a table's batch is returned in source order instead of folded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderedReason {
    /// The table has no key columns (REPLICA IDENTITY FULL without key, or NOTHING).
    NoKey,
    /// A key column value is NULL.
    NullKey,
    /// The changes contradict each other (insert of a key known to exist, update or delete of
    /// a key known to be absent); applying them in order lets the target report the error.
    Inconsistent,
    /// A key move's target key is also the old key of an update in the same statement (swap,
    /// cycle, or a chain onto a key whose row moves away), which one UPDATE cannot do safely.
    KeyMoveConflict,
}

/// The net effect of a batch on one table. See the module doc for the statement order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableBatch {
    pub relid: u32,
    /// Apply `original` one change at a time, in order; the other lists are empty.
    pub ordered: bool,
    /// Set when `ordered`.
    pub reason: Option<OrderedReason>,
    /// Step 1: keys to delete.
    pub deletes: Vec<Key>,
    /// Step 2: (key before the batch, new image): rows that existed before the batch and
    /// either still sit at their key (an `UPDATE`, cheaper than an upsert) or have an unknown
    /// value (unchanged TOAST; such a row may also move to a new key).
    pub updates: Vec<(Key, Vec<ColumnValue>)>,
    /// Step 3: full rows to insert or overwrite by key.
    pub upserts: Vec<Vec<Value>>,
    /// Parallel to `upserts`: no row had this key before the batch (its first change in the
    /// batch was an insert or a key move onto it), and steps 1 and 2 put none there, so a
    /// plain `INSERT` cannot conflict — cheaper on the target than `ON CONFLICT`.
    pub fresh: Vec<bool>,
    /// The changes as pushed, only when `ordered`.
    pub original: Vec<Change>,
}

/// The state of one key of one table, relative to the start of the batch.
#[derive(Debug)]
struct Entry {
    /// A row might have had this key before the batch (the first change to the key was an
    /// update or delete of it).
    pre: bool,
    /// The net state at this key now.
    cur: Cur,
}

#[derive(Debug)]
enum Cur {
    Absent,
    Row {
        /// Index of the entry whose pre-batch row this row descends from, if it does; the
        /// image's unknown values are that row's values.
        origin: Option<u32>,
        /// Key columns are always known.
        values: Vec<ColumnValue>,
    },
}

#[derive(Debug)]
struct TableState {
    shape: TableShape,
    /// Set once the table is given up on; folding stops.
    ordered: Option<OrderedReason>,
    /// Every change pushed, in order (needed if the table turns out `ordered`).
    log: Vec<Change>,
    index: HashMap<Key, u32, FastHash>,
    entries: Vec<Entry>,
}

/// Folds the changes of a batch; see the module doc.
#[derive(Debug, Default)]
pub struct BatchFolder {
    tables: Vec<TableState>,
    by_relid: HashMap<u32, usize, FastHash>,
    len: usize,
    scratch_old: Key,
    scratch_new: Key,
}

impl BatchFolder {
    pub fn new() -> BatchFolder {
        BatchFolder::default()
    }

    /// Changes pushed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds the next change of the batch (source order) to table `shape.relid`.
    ///
    /// Errors (the folder is unchanged): a tuple of the wrong width, a shape different from
    /// the one this table had earlier in the batch, an update whose key cannot be determined.
    pub fn push(&mut self, shape: &TableShape, change: Change) -> Result<(), FoldError> {
        let relid = shape.relid;
        let check = |got: usize| {
            if got == shape.columns {
                Ok(())
            } else {
                Err(FoldError::WidthMismatch {
                    relid,
                    expected: shape.columns,
                    got,
                })
            }
        };
        match &change {
            Change::Insert { new } => check(new.len())?,
            Change::Delete { old } => check(old.len())?,
            Change::Update { old, new } => {
                check(new.len())?;
                if let Some(old) = old {
                    check(old.len())?;
                } else if shape.key.iter().any(|&c| !new[c].is_known()) {
                    return Err(FoldError::UnknownKey { relid });
                }
            }
        }
        if let Some(&c) = shape.key.iter().find(|&&c| c >= shape.columns) {
            return Err(FoldError::WidthMismatch {
                relid,
                expected: shape.columns,
                got: c + 1,
            });
        }
        let t = match self.by_relid.get(&relid) {
            Some(&t) => {
                if self.tables[t].shape != *shape {
                    return Err(FoldError::ShapeChanged { relid });
                }
                t
            }
            None => {
                let ordered = if shape.identity_full_without_key || shape.key.is_empty() {
                    Some(OrderedReason::NoKey)
                } else {
                    None
                };
                self.tables.push(TableState {
                    shape: shape.clone(),
                    ordered,
                    log: Vec::new(),
                    index: HashMap::default(),
                    entries: Vec::new(),
                });
                self.by_relid.insert(relid, self.tables.len() - 1);
                self.tables.len() - 1
            }
        };
        let table = &mut self.tables[t];
        if table.ordered.is_none()
            && let Err(reason) = table.fold(&change, &mut self.scratch_old, &mut self.scratch_new)
        {
            table.ordered = Some(reason);
            table.index = HashMap::default();
            table.entries = Vec::new();
        }
        table.log.push(change);
        self.len += 1;
        Ok(())
    }

    /// The net effect per table, tables in first-seen order.
    pub fn finish(self) -> Vec<TableBatch> {
        self.tables.into_iter().map(TableState::finish).collect()
    }
}

/// Fills `out` with the key columns of `row`; `Err` if one is NULL.
fn gather_key(
    key: &[usize],
    out: &mut Key,
    mut col: impl FnMut(usize) -> Value,
) -> Result<(), OrderedReason> {
    out.clear();
    for &c in key {
        let v = col(c);
        if v.is_none() {
            return Err(OrderedReason::NullKey);
        }
        out.push(v);
    }
    Ok(())
}

impl TableState {
    /// Looks `key` up, creating an entry with `make` if absent. Returns (index, created).
    fn entry(&mut self, key: &Key, make: impl FnOnce() -> Entry) -> u32 {
        if let Some(&i) = self.index.get(key.as_slice()) {
            return i;
        }
        let i = self.entries.len() as u32;
        self.entries.push(make());
        self.index.insert(key.clone(), i);
        i
    }

    fn fold(&mut self, change: &Change, ko: &mut Key, kn: &mut Key) -> Result<(), OrderedReason> {
        let key_cols = std::mem::take(&mut self.shape.key);
        let r = self.fold_inner(&key_cols, change, ko, kn);
        self.shape.key = key_cols;
        r
    }

    fn fold_inner(
        &mut self,
        key_cols: &[usize],
        change: &Change,
        ko: &mut Key,
        kn: &mut Key,
    ) -> Result<(), OrderedReason> {
        match change {
            Change::Insert { new } => {
                gather_key(key_cols, kn, |c| new[c].clone())?;
                let image = || new.iter().cloned().map(ColumnValue::Known).collect();
                let mut created = false;
                let i = self.entry(kn, || {
                    created = true;
                    Entry {
                        pre: false,
                        cur: Cur::Row {
                            origin: None,
                            values: image(),
                        },
                    }
                });
                if !created {
                    let e = &mut self.entries[i as usize];
                    match e.cur {
                        Cur::Absent => {
                            e.cur = Cur::Row {
                                origin: None,
                                values: image(),
                            }
                        }
                        Cur::Row { .. } => return Err(OrderedReason::Inconsistent),
                    }
                }
            }
            Change::Delete { old } => {
                gather_key(key_cols, ko, |c| old[c].clone())?;
                let mut created = false;
                let i = self.entry(ko, || {
                    created = true;
                    Entry {
                        pre: true,
                        cur: Cur::Absent,
                    }
                });
                if !created {
                    let e = &mut self.entries[i as usize];
                    match e.cur {
                        Cur::Absent => return Err(OrderedReason::Inconsistent),
                        Cur::Row { .. } => e.cur = Cur::Absent,
                    }
                }
            }
            Change::Update { old, new } => {
                match old {
                    Some(old) => gather_key(key_cols, ko, |c| old[c].clone())?,
                    // push() checked the key columns are known.
                    None => gather_key(key_cols, ko, |c| match &new[c] {
                        ColumnValue::Known(v) => v.clone(),
                        ColumnValue::UnchangedToast => None,
                    })?,
                }
                // An unchanged-TOAST key column keeps the old key's value.
                let mut k = 0;
                gather_key(key_cols, kn, |c| {
                    k += 1;
                    match &new[c] {
                        ColumnValue::Known(v) => v.clone(),
                        ColumnValue::UnchangedToast => ko[k - 1].clone(),
                    }
                })?;
                let columns = self.shape.columns;
                let i = self.entry(ko, || Entry {
                    pre: true,
                    cur: Cur::Row {
                        origin: None, // fixed below: the entry's own index
                        values: Vec::new(),
                    },
                });
                let e = &mut self.entries[i as usize];
                let (origin, mut values) = match &mut e.cur {
                    Cur::Absent => return Err(OrderedReason::Inconsistent),
                    Cur::Row { origin, values } => {
                        if values.is_empty() {
                            // Fresh entry: the pre-batch row at `ko`, only its key known.
                            *origin = Some(i);
                            values.resize(columns, ColumnValue::UnchangedToast);
                            for (&c, v) in key_cols.iter().zip(ko.iter()) {
                                values[c] = ColumnValue::Known(v.clone());
                            }
                        }
                        (*origin, std::mem::take(values))
                    }
                };
                for (dst, src) in values.iter_mut().zip(new) {
                    if let ColumnValue::Known(v) = src {
                        *dst = ColumnValue::Known(v.clone());
                    }
                }
                if ko == kn {
                    e.cur = Cur::Row { origin, values };
                    return Ok(());
                }
                e.cur = Cur::Absent;
                let mut slot = Some(values);
                let j = self.entry(kn, || Entry {
                    pre: false,
                    cur: Cur::Row {
                        origin,
                        values: slot.take().expect("taken once"),
                    },
                });
                if let Some(values) = slot {
                    let e = &mut self.entries[j as usize];
                    match e.cur {
                        Cur::Absent => e.cur = Cur::Row { origin, values },
                        Cur::Row { .. } => return Err(OrderedReason::Inconsistent),
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(self) -> TableBatch {
        let relid = self.shape.relid;
        let ordered = |log: Vec<Change>, reason| TableBatch {
            relid,
            ordered: true,
            reason: Some(reason),
            original: log,
            ..TableBatch::default()
        };
        if let Some(reason) = self.ordered {
            return ordered(self.log, reason);
        }
        let n = self.entries.len();
        let mut update_origin = vec![false; n];
        let mut move_target = vec![false; n];
        for (i, e) in self.entries.iter().enumerate() {
            if let Cur::Row { origin, values } = &e.cur
                && !values.iter().all(ColumnValue::is_known)
            {
                let Some(o) = *origin else {
                    // Unreachable: rows born in the batch are fully known. Stay safe anyway.
                    debug_assert!(false, "unknown value in a row inserted in the batch");
                    return ordered(self.log, OrderedReason::Inconsistent);
                };
                update_origin[o as usize] = true;
                if o as usize != i {
                    move_target[i] = true;
                }
            }
        }
        if (0..n).any(|i| move_target[i] && update_origin[i]) {
            return ordered(self.log, OrderedReason::KeyMoveConflict);
        }
        let mut keys: Vec<Option<Key>> = vec![None; n];
        for (k, i) in self.index {
            keys[i as usize] = Some(k);
        }
        let mut batch = TableBatch {
            relid,
            ..TableBatch::default()
        };
        for (i, e) in self.entries.into_iter().enumerate() {
            match e.cur {
                Cur::Absent => {
                    if e.pre && !update_origin[i] {
                        batch
                            .deletes
                            .push(keys[i].take().expect("every entry has a key"));
                    }
                }
                Cur::Row { origin, values } => {
                    // A row that existed at this key before the batch and still does is an
                    // UPDATE: cheaper on the target than an INSERT … ON CONFLICT.
                    let stayed = origin == Some(i as u32);
                    if values.iter().all(ColumnValue::is_known) && !stayed {
                        batch.fresh.push(!e.pre);
                        batch.upserts.push(
                            values
                                .into_iter()
                                .map(|v| match v {
                                    ColumnValue::Known(v) => v,
                                    ColumnValue::UnchangedToast => unreachable!(),
                                })
                                .collect(),
                        );
                    } else {
                        let o = origin.expect("an update descends from a pre-batch row") as usize;
                        if move_target[i] && e.pre {
                            batch
                                .deletes
                                .push(keys[i].clone().expect("every entry has a key"));
                        }
                        // An origin has one descendant, so its key is used once.
                        let old_key = keys[o].take().expect("every entry has a key");
                        batch.updates.push((old_key, values));
                    }
                }
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    // ---- helpers -------------------------------------------------------------------------

    fn v(s: &str) -> Value {
        Some(Bytes::copy_from_slice(s.as_bytes()))
    }
    fn k(s: &str) -> ColumnValue {
        ColumnValue::Known(v(s))
    }
    const U: ColumnValue = ColumnValue::UnchangedToast;

    /// 3 columns, key = column 0.
    fn shape() -> TableShape {
        TableShape {
            relid: 1,
            columns: 3,
            key: vec![0],
            identity_full_without_key: false,
        }
    }
    fn ins(a: &str, b: &str, c: &str) -> Change {
        Change::Insert {
            new: vec![v(a), v(b), v(c)],
        }
    }
    fn upd(new: [ColumnValue; 3]) -> Change {
        Change::Update {
            old: None,
            new: new.to_vec(),
        }
    }
    fn mv(from: &str, new: [ColumnValue; 3]) -> Change {
        Change::Update {
            old: Some(vec![v(from), None, None]),
            new: new.to_vec(),
        }
    }
    fn del(key: &str) -> Change {
        Change::Delete {
            old: vec![v(key), None, None],
        }
    }
    fn fold(changes: Vec<Change>) -> TableBatch {
        let mut f = BatchFolder::new();
        let s = shape();
        for c in changes {
            f.push(&s, c).unwrap();
        }
        let mut out = f.finish();
        assert_eq!(out.len(), 1);
        out.pop().unwrap()
    }
    fn key(s: &str) -> Key {
        vec![v(s)]
    }
    fn row(a: &str, b: &str, c: &str) -> Vec<Value> {
        vec![v(a), v(b), v(c)]
    }

    // ---- unit tests, one per rule --------------------------------------------------------

    #[test]
    fn insert_then_update_is_one_upsert_with_toast_filled() {
        let b = fold(vec![ins("1", "a", "big"), upd([k("1"), k("b"), U])]);
        assert!(!b.ordered);
        assert_eq!(b.upserts, vec![row("1", "b", "big")]);
        assert!(b.deletes.is_empty() && b.updates.is_empty());
    }

    #[test]
    fn insert_then_delete_is_nothing() {
        let b = fold(vec![ins("1", "a", "x"), del("1")]);
        assert_eq!(
            b,
            TableBatch {
                relid: 1,
                ..TableBatch::default()
            }
        );
    }

    #[test]
    fn delete_insert_delete_is_a_delete() {
        let b = fold(vec![del("1"), ins("1", "a", "x"), del("1")]);
        assert_eq!(b.deletes, vec![key("1")]);
        assert!(b.upserts.is_empty() && b.updates.is_empty());
    }

    #[test]
    fn delete_then_insert_is_an_upsert() {
        let b = fold(vec![del("1"), ins("1", "a", "x")]);
        assert_eq!(b.upserts, vec![row("1", "a", "x")]);
        assert!(b.deletes.is_empty());
    }

    #[test]
    fn update_then_update_merges_later_known_values() {
        let b = fold(vec![upd([k("1"), k("a"), U]), upd([k("1"), U, k("c")])]);
        assert_eq!(b.updates, vec![(key("1"), vec![k("1"), k("a"), k("c")])]);
        let b = fold(vec![upd([k("1"), k("a"), U]), upd([k("1"), k("b"), U])]);
        assert!(b.upserts.is_empty());
        assert_eq!(b.updates, vec![(key("1"), vec![k("1"), k("b"), U])]);
    }

    #[test]
    fn update_with_all_values_known_stays_an_update_of_the_existing_row() {
        let b = fold(vec![upd([k("1"), k("a"), k("x")])]);
        assert_eq!(b.updates, vec![(key("1"), vec![k("1"), k("a"), k("x")])]);
        assert!(b.upserts.is_empty() && b.deletes.is_empty());
    }

    #[test]
    fn key_move_with_known_values_is_delete_and_upsert() {
        let b = fold(vec![mv("1", [k("2"), k("a"), k("x")])]);
        assert_eq!(b.deletes, vec![key("1")]);
        assert_eq!(b.upserts, vec![row("2", "a", "x")]);
    }

    #[test]
    fn key_move_with_unknown_value_is_an_update_of_the_old_key() {
        let b = fold(vec![mv("1", [k("2"), k("a"), U])]);
        assert!(!b.ordered);
        assert!(b.deletes.is_empty(), "the update moves the row away itself");
        assert_eq!(b.updates, vec![(key("1"), vec![k("2"), k("a"), U])]);
    }

    #[test]
    fn key_move_chain_k1_k2_k3() {
        let b = fold(vec![
            mv("1", [k("2"), k("a"), U]),
            mv("2", [k("3"), U, U]),
            upd([k("3"), U, U]),
        ]);
        assert!(!b.ordered);
        assert_eq!(b.updates, vec![(key("1"), vec![k("3"), k("a"), U])]);
        assert!(b.deletes.is_empty() && b.upserts.is_empty());
    }

    #[test]
    fn key_move_onto_a_deleted_key_deletes_it_first() {
        let b = fold(vec![del("2"), mv("1", [k("2"), k("a"), U])]);
        assert!(!b.ordered);
        assert_eq!(b.deletes, vec![key("2")]);
        assert_eq!(b.updates, vec![(key("1"), vec![k("2"), k("a"), U])]);
    }

    #[test]
    fn moved_away_key_refilled_by_insert() {
        let b = fold(vec![mv("1", [k("2"), k("a"), U]), ins("1", "n", "m")]);
        assert!(!b.ordered);
        assert_eq!(b.updates, vec![(key("1"), vec![k("2"), k("a"), U])]);
        assert_eq!(b.upserts, vec![row("1", "n", "m")]);
        assert!(b.deletes.is_empty());
    }

    #[test]
    fn swap_with_unknown_values_is_ordered() {
        // 1 → 9, 2 → 1, 9 → 2 (a swap through a temporary key).
        let changes = vec![
            mv("1", [k("9"), U, U]),
            mv("2", [k("1"), U, U]),
            mv("9", [k("2"), U, U]),
        ];
        let b = fold(changes.clone());
        assert!(b.ordered);
        assert_eq!(b.reason, Some(OrderedReason::KeyMoveConflict));
        assert_eq!(b.original, changes);
        assert!(b.deletes.is_empty() && b.updates.is_empty() && b.upserts.is_empty());
    }

    #[test]
    fn move_onto_a_key_whose_row_moves_away_is_ordered() {
        let b = fold(vec![mv("2", [k("3"), U, U]), mv("1", [k("2"), U, U])]);
        assert_eq!(b.reason, Some(OrderedReason::KeyMoveConflict));
    }

    #[test]
    fn swap_with_known_values_folds() {
        let b = fold(vec![
            mv("1", [k("9"), k("a"), k("x")]),
            mv("2", [k("1"), k("b"), k("y")]),
            mv("9", [k("2"), k("a"), k("x")]),
        ]);
        assert!(!b.ordered);
        assert_eq!(b.upserts, vec![row("1", "b", "y"), row("2", "a", "x")]);
        assert!(b.deletes.is_empty() && b.updates.is_empty());
    }

    #[test]
    fn identity_full_without_key_is_ordered() {
        let s = TableShape {
            relid: 7,
            columns: 2,
            key: vec![],
            identity_full_without_key: true,
        };
        let mut f = BatchFolder::new();
        let c = Change::Delete {
            old: vec![v("a"), v("b")],
        };
        f.push(&s, c.clone()).unwrap();
        let b = f.finish().pop().unwrap();
        assert!(b.ordered);
        assert_eq!(b.reason, Some(OrderedReason::NoKey));
        assert_eq!(b.original, vec![c]);
    }

    #[test]
    fn inconsistent_stream_is_ordered() {
        let b = fold(vec![ins("1", "a", "x"), ins("1", "a", "x")]);
        assert_eq!(b.reason, Some(OrderedReason::Inconsistent));
        assert_eq!(b.original.len(), 2);
        let b = fold(vec![del("1"), upd([k("1"), U, U])]);
        assert_eq!(b.reason, Some(OrderedReason::Inconsistent));
    }

    #[test]
    fn null_key_is_ordered() {
        let b = fold(vec![Change::Insert {
            new: vec![None, v("a"), v("b")],
        }]);
        assert_eq!(b.reason, Some(OrderedReason::NullKey));
    }

    #[test]
    fn errors_leave_the_folder_unchanged() {
        let mut f = BatchFolder::new();
        let s = shape();
        assert_eq!(
            f.push(&s, Change::Insert { new: vec![v("1")] }),
            Err(FoldError::WidthMismatch {
                relid: 1,
                expected: 3,
                got: 1
            })
        );
        assert_eq!(
            f.push(&s, upd([U, k("a"), k("b")])),
            Err(FoldError::UnknownKey { relid: 1 })
        );
        assert!(f.is_empty());
        f.push(&s, ins("1", "a", "b")).unwrap();
        let mut s2 = s.clone();
        s2.key = vec![1];
        assert_eq!(
            f.push(&s2, ins("2", "a", "b")),
            Err(FoldError::ShapeChanged { relid: 1 })
        );
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn tables_in_first_seen_order() {
        let mut f = BatchFolder::new();
        let (mut a, mut b) = (shape(), shape());
        a.relid = 20;
        b.relid = 10;
        f.push(&a, ins("1", "a", "b")).unwrap();
        f.push(&b, ins("1", "a", "b")).unwrap();
        f.push(&a, ins("2", "a", "b")).unwrap();
        let out = f.finish();
        assert_eq!(
            out.iter().map(|t| t.relid).collect::<Vec<_>>(),
            vec![20, 10]
        );
        assert_eq!(out[0].upserts.len(), 2);
    }

    #[test]
    fn unchanged_toast_in_a_key_column_keeps_the_old_key_value() {
        // Composite key (0, 1); the update moves column 0 and leaves column 1 unchanged-TOAST.
        let s = TableShape {
            relid: 1,
            columns: 3,
            key: vec![0, 1],
            identity_full_without_key: false,
        };
        let mut f = BatchFolder::new();
        f.push(&s, ins("1", "big", "x")).unwrap();
        f.push(
            &s,
            Change::Update {
                old: Some(vec![v("1"), v("big"), None]),
                new: vec![k("2"), U, k("y")],
            },
        )
        .unwrap();
        let b = f.finish().pop().unwrap();
        assert_eq!(b.upserts, vec![row("2", "big", "y")]);
        assert!(
            b.deletes.is_empty(),
            "key (1, big) was inserted in the batch"
        );
    }

    #[test]
    fn conversions_from_pgoutput() {
        use crate::source::pgoutput as pg;
        let rel = pg::Relation {
            xid: None,
            relid: 5,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: pg::ReplicaIdentity::Default,
            columns: ["id", "a", "b"]
                .iter()
                .enumerate()
                .map(|(i, n)| pg::Column {
                    flags: u8::from(i == 0),
                    name: (*n).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        };
        let s = TableShape::from_relation(&rel);
        assert_eq!((s.relid, s.columns, s.key.clone()), (5, 3, vec![0]));
        assert!(!s.identity_full_without_key);
        let mut new = pg::TupleData::text([Some("1"), None, Some("x")]);
        new.values[2] = pg::TupleValue::UnchangedToast;
        let u = pg::Update {
            xid: None,
            relid: 5,
            old: None,
            new: new.clone(),
        };
        assert_eq!(
            Change::from_message(pg::LogicalMessage::Update(u))
                .unwrap()
                .unwrap(),
            Change::Update {
                old: None,
                new: vec![k("1"), ColumnValue::Known(None), U]
            }
        );
        let i = pg::Insert {
            xid: None,
            relid: 5,
            new,
        };
        assert_eq!(
            Change::from_message(pg::LogicalMessage::Insert(i)).unwrap(),
            Err(FoldError::UnchangedToastInImage)
        );
        let d = pg::Delete {
            xid: None,
            relid: 5,
            old: pg::OldTuple::Key(pg::TupleData::text([Some("1"), None, None])),
        };
        assert_eq!(
            Change::from_message(pg::LogicalMessage::Delete(d))
                .unwrap()
                .unwrap(),
            del("1")
        );
    }

    // ---- the oracle ----------------------------------------------------------------------

    /// A target table: key → row, with a non-deferrable primary key.
    type Table = BTreeMap<Key, Vec<Value>>;

    fn key_of(shape: &TableShape, row: &[Value]) -> Key {
        shape.key.iter().map(|&c| row[c].clone()).collect()
    }

    fn merge(cur: &[Value], new: &[ColumnValue]) -> Vec<Value> {
        cur.iter()
            .zip(new)
            .map(|(c, n)| match n {
                ColumnValue::Known(v) => v.clone(),
                ColumnValue::UnchangedToast => c.clone(),
            })
            .collect()
    }

    /// Applies one change as the target would in source order. Errors on a missing row or a
    /// duplicate key.
    fn apply_one(shape: &TableShape, t: &mut Table, c: &Change) -> Result<(), String> {
        match c {
            Change::Insert { new } => {
                let key = key_of(shape, new);
                if t.insert(key.clone(), new.clone()).is_some() {
                    return Err(format!("insert: duplicate key {key:?}"));
                }
            }
            Change::Delete { old } => {
                let key = key_of(shape, old);
                t.remove(&key).ok_or(format!("delete: no row {key:?}"))?;
            }
            Change::Update { old, new } => {
                let ko = match old {
                    Some(o) => key_of(shape, o),
                    None => shape
                        .key
                        .iter()
                        .map(|&c| match &new[c] {
                            ColumnValue::Known(v) => v.clone(),
                            ColumnValue::UnchangedToast => panic!("unknown key"),
                        })
                        .collect(),
                };
                let cur = t.remove(&ko).ok_or(format!("update: no row {ko:?}"))?;
                let row = merge(&cur, new);
                let kn = key_of(shape, &row);
                if t.insert(kn.clone(), row).is_some() {
                    return Err(format!("update: duplicate key {kn:?}"));
                }
            }
        }
        Ok(())
    }

    /// Applies a folded batch with the statements' semantics, in the documented order. A
    /// statement fails like PostgreSQL's would with a non-deferrable key checked per row, in
    /// *any* row order: an UPDATE moving a row onto a key that holds a row when the statement
    /// starts (even one the same statement moves away) or onto another updated row's key, an
    /// UPDATE … FROM matching a row twice, an upsert affecting a row twice.
    fn apply_batch(shape: &TableShape, t: &mut Table, b: &TableBatch) -> Result<(), String> {
        if b.ordered {
            for c in &b.original {
                apply_one(shape, t, c)?;
            }
            return Ok(());
        }
        // 1. DELETE … WHERE key IN (…)
        for k in &b.deletes {
            t.remove(k);
        }
        // 2. UPDATE … FROM (…) WHERE t.key = v.old_key
        let mut olds = std::collections::BTreeSet::new();
        let mut news = std::collections::BTreeSet::new();
        let mut moved = Vec::new();
        for (ko, img) in &b.updates {
            if !olds.insert(ko.clone()) {
                return Err(format!("update: row {ko:?} matched twice"));
            }
            let kn: Key = shape
                .key
                .iter()
                .map(|&c| match &img[c] {
                    ColumnValue::Known(v) => v.clone(),
                    ColumnValue::UnchangedToast => panic!("update image with unknown key"),
                })
                .collect();
            if !news.insert(kn.clone()) {
                return Err(format!("update: two rows moved to {kn:?}"));
            }
            let Some(cur) = t.get(ko) else {
                continue; // matches no row: PostgreSQL updates nothing
            };
            if kn != *ko && t.contains_key(&kn) {
                return Err(format!("update: key move {ko:?} → {kn:?} may collide"));
            }
            moved.push((ko.clone(), merge(cur, img)));
        }
        for (ko, _) in &moved {
            t.remove(ko);
        }
        for (_, row) in moved {
            t.insert(key_of(shape, &row), row);
        }
        // 3. INSERT … ON CONFLICT (key) DO UPDATE, or a plain INSERT for fresh keys.
        let mut seen = std::collections::BTreeSet::new();
        assert_eq!(b.fresh.len(), b.upserts.len());
        for (row, fresh) in b.upserts.iter().zip(&b.fresh) {
            let key = key_of(shape, row);
            if !seen.insert(key.clone()) {
                return Err(format!("upsert: row {key:?} affected twice"));
            }
            if *fresh && t.contains_key(&key) {
                return Err(format!("insert: key {key:?} already exists"));
            }
            t.insert(key, row.clone());
        }
        Ok(())
    }

    #[test]
    fn oracle_detects_a_swap_in_one_update() {
        let s = shape();
        let mut t: Table = [
            (key("1"), row("1", "a", "x")),
            (key("2"), row("2", "b", "y")),
        ]
        .into_iter()
        .collect();
        let b = TableBatch {
            relid: 1,
            updates: vec![
                (key("1"), vec![k("2"), U, U]),
                (key("2"), vec![k("1"), U, U]),
            ],
            ..TableBatch::default()
        };
        assert!(apply_batch(&s, &mut t, &b).unwrap_err().contains("collide"));
    }

    // ---- property: folded batch == changes one by one ------------------------------------

    const KEYS: u8 = 6;

    /// Two tables: relid 1 keyed on column 0, relid 2 keyed on column 1 with REPLICA
    /// IDENTITY FULL (every update and delete carries the whole old row).
    fn shapes() -> [TableShape; 2] {
        [
            shape(),
            TableShape {
                relid: 2,
                columns: 3,
                key: vec![1],
                identity_full_without_key: false,
            },
        ]
    }

    fn val(x: u8) -> Value {
        // A small domain with NULL, so merges are visible and values repeat.
        match x % 5 {
            0 => None,
            n => v(&format!("v{n}")),
        }
    }

    /// One op's random choices; `simulate` turns it into a change valid against the model.
    #[derive(Clone, Debug)]
    struct Op {
        table: bool,
        kind: u8,
        k1: u8,
        k2: u8,
        vals: [u8; 2],
        toast: [bool; 2],
        moves: bool,
    }

    fn op() -> impl Strategy<Value = Op> {
        (
            any::<bool>(),
            0u8..10,
            0..KEYS,
            0..KEYS,
            any::<[u8; 2]>(),
            any::<[bool; 2]>(),
            any::<bool>(),
        )
            .prop_map(|(table, kind, k1, k2, vals, toast, moves)| Op {
                table,
                kind,
                k1,
                k2,
                vals,
                toast,
                moves,
            })
    }

    fn kv(i: u8) -> Value {
        v(&i.to_string())
    }

    /// The first key from `start` (cyclically) that is present (or absent) in `t`.
    fn find(t: &Table, start: u8, present: bool) -> Option<u8> {
        (0..KEYS)
            .map(|d| (start + d) % KEYS)
            .find(|&i| t.contains_key(&vec![kv(i)]) == present)
    }

    /// Turns random ops into changes a source would send, tracking the source table.
    fn simulate(shapes: &[TableShape; 2], mut src: [Table; 2], ops: &[Op]) -> Vec<(usize, Change)> {
        let mut out = Vec::new();
        for o in ops {
            let ti = usize::from(o.table);
            let s = &shapes[ti];
            let kc = s.key[0];
            let t = &mut src[ti];
            let others: Vec<usize> = (0..3).filter(|&c| c != kc).collect();
            // 0-2 insert, 3-7 update, 8-9 delete; fall back when impossible.
            let want = match o.kind {
                0..=2 => 0,
                3..=7 => 1,
                _ => 2,
            };
            let existing = find(t, o.k1, true);
            let absent = find(t, o.k1, false);
            let kind = match (want, existing, absent) {
                (0, _, Some(_)) => 0,
                (_, Some(_), _) if want != 0 => want,
                (_, None, _) => 0,
                _ => 1,
            };
            let change = match kind {
                0 => {
                    let mut new = vec![None; 3];
                    new[kc] = kv(absent.unwrap());
                    for (j, &c) in others.iter().enumerate() {
                        new[c] = val(o.vals[j]);
                    }
                    Change::Insert { new }
                }
                1 => {
                    let ko = vec![kv(existing.unwrap())];
                    let cur = t[&ko].clone();
                    let kn = if o.moves {
                        find(t, o.k2, false).map(kv).unwrap_or(ko[0].clone())
                    } else {
                        ko[0].clone()
                    };
                    let mut new = vec![ColumnValue::Known(kn.clone()); 3];
                    for (j, &c) in others.iter().enumerate() {
                        // Unchanged TOAST: the value stays, the stream does not carry it.
                        new[c] = if o.toast[j] {
                            ColumnValue::UnchangedToast
                        } else {
                            ColumnValue::Known(val(o.vals[j]))
                        };
                    }
                    let old = if ti == 1 {
                        Some(cur.clone())
                    } else if kn != ko[0] {
                        let mut old = vec![None; 3];
                        old[kc] = ko[0].clone();
                        Some(old)
                    } else {
                        None
                    };
                    Change::Update { old, new }
                }
                _ => {
                    let ko = kv(existing.unwrap());
                    let old = if ti == 1 {
                        t[&vec![ko]].clone()
                    } else {
                        let mut old = vec![None; 3];
                        old[kc] = ko;
                        old
                    };
                    Change::Delete { old }
                }
            };
            apply_one(s, t, &change).expect("the simulated source is consistent");
            out.push((ti, change));
        }
        out
    }

    fn initial() -> impl Strategy<Value = [Table; 2]> {
        let table = |kc: usize| {
            proptest::collection::vec(proptest::option::of(any::<[u8; 2]>()), KEYS as usize)
                .prop_map(move |rows| {
                    let mut t = Table::new();
                    for (i, r) in rows.into_iter().enumerate() {
                        if let Some([a, b]) = r {
                            let mut row = vec![val(a), val(b), val(a ^ b)];
                            row[kc] = kv(i as u8);
                            t.insert(vec![kv(i as u8)], row);
                        }
                    }
                    t
                })
        };
        (table(0), table(1)).prop_map(|(a, b)| [a, b])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn folded_batch_equals_one_by_one(init in initial(), ops in proptest::collection::vec(op(), 0..40)) {
            let shapes = shapes();
            let changes = simulate(&shapes, init.clone(), &ops);

            let mut expected = init.clone();
            for (ti, c) in &changes {
                apply_one(&shapes[*ti], &mut expected[*ti], c).unwrap();
            }

            let mut f = BatchFolder::new();
            for (ti, c) in &changes {
                f.push(&shapes[*ti], c.clone()).unwrap();
            }
            prop_assert_eq!(f.len(), changes.len());
            let batches = f.finish();
            let mut got = init;
            for b in &batches {
                let ti = usize::from(b.relid == 2);
                prop_assert!(b.ordered == b.reason.is_some());
                prop_assert!(b.ordered || b.original.is_empty());
                // Only a key-move conflict may make these consistent streams ordered.
                prop_assert!(!b.ordered || b.reason == Some(OrderedReason::KeyMoveConflict));
                // A fully known update never moves its row (moves of known rows are upserts).
                let key_cols = &shapes[ti].key;
                prop_assert!(b.updates.iter().all(|(k, r)| !r.iter().all(ColumnValue::is_known)
                    || key_cols.iter().zip(k).all(|(&c, kv)| r[c] == ColumnValue::Known(kv.clone()))));
                apply_batch(&shapes[ti], &mut got[ti], b).map_err(TestCaseError::fail)?;
            }
            prop_assert_eq!(got, expected);
        }
    }
}
