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
//! 3. **upserts** — one `INSERT … ON CONFLICT (key) DO UPDATE SET <all columns> = EXCLUDED.…`.
//!    Afterwards the row with the image's key has exactly these values.
//!
//! Why this is safe (no primary-key collision inside a statement, whatever row order
//! PostgreSQL processes a statement in), with `k0` the key of a row before the batch:
//!
//! * Every key appears at most once per list (keys of the fold map are distinct; each row
//!   before the batch has at most one descendant), so no `UPDATE … FROM` row is matched twice
//!   and no `ON CONFLICT DO UPDATE` affects a row twice.
//! * An update is emitted only when a value is unknown, i.e. the row descends from the row at
//!   `k0` before the batch; the update needs that row, so `k0` is never in `deletes`, and
//!   nothing before step 2 changes it, so "keep the current value" reads the pre-batch value.
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

use crate::source::pgoutput::{Delete, Insert, OldTuple, Relation, TupleData, TupleValue, Update};

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

impl From<&TupleValue> for ColumnValue {
    /// Text and binary values alike become bytes; the batch does not record the format.
    fn from(v: &TupleValue) -> ColumnValue {
        match v {
            TupleValue::Null => ColumnValue::Known(None),
            TupleValue::UnchangedToast => ColumnValue::UnchangedToast,
            TupleValue::Text(b) | TupleValue::Binary(b) => ColumnValue::Known(Some(b.clone())),
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

fn known_tuple(t: &TupleData) -> Result<Vec<Value>, FoldError> {
    t.values
        .iter()
        .map(|v| match ColumnValue::from(v) {
            ColumnValue::Known(v) => Ok(v),
            ColumnValue::UnchangedToast => Err(FoldError::UnchangedToastInImage),
        })
        .collect()
}

impl Change {
    /// An Insert message's change. Fails if the new row holds an unchanged-TOAST marker.
    pub fn from_insert(m: &Insert) -> Result<Change, FoldError> {
        Ok(Change::Insert {
            new: known_tuple(&m.new)?,
        })
    }

    /// An Update message's change. Fails if the old image holds an unchanged-TOAST marker.
    pub fn from_update(m: &Update) -> Result<Change, FoldError> {
        Ok(Change::Update {
            old: m.old.as_ref().map(|o| known_tuple(o.tuple())).transpose()?,
            new: m.new.values.iter().map(ColumnValue::from).collect(),
        })
    }

    /// A Delete message's change. Fails if the old image holds an unchanged-TOAST marker.
    pub fn from_delete(m: &Delete) -> Result<Change, FoldError> {
        let old = match &m.old {
            OldTuple::Key(t) | OldTuple::Full(t) => known_tuple(t)?,
        };
        Ok(Change::Delete { old })
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
    #[error("table {relid}: its shape changed inside a batch (finish the batch on a Relation change)")]
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
    /// Step 2: (key before the batch, new image). Only for images with an unknown value.
    pub updates: Vec<(Key, Vec<ColumnValue>)>,
    /// Step 3: full rows to insert or overwrite by key.
    pub upserts: Vec<Vec<Value>>,
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
    index: HashMap<Key, u32>,
    entries: Vec<Entry>,
}

/// Folds the changes of a batch; see the module doc.
#[derive(Debug, Default)]
pub struct BatchFolder {
    tables: Vec<TableState>,
    by_relid: HashMap<u32, usize>,
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
                    index: HashMap::new(),
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
            table.index = HashMap::new();
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
                        batch.deletes.push(keys[i].take().expect("every entry has a key"));
                    }
                }
                Cur::Row { origin, values } => {
                    if values.iter().all(ColumnValue::is_known) {
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
                        let o = origin.expect("checked above") as usize;
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
