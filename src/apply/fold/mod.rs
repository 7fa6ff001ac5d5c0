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
//! 1. **deletes** — `DELETE … WHERE key IN (deletes)`. Every key names a row that exists on
//!    the target at that point: the statement deletes exactly as many rows as there are keys.
//! 2. **updates** — one `UPDATE t SET … FROM (values) WHERE t.key = v.old_key`. Each entry
//!    names the row by its key *before the batch* and gives its new image; an
//!    [`ColumnValue::UnchangedToast`] column keeps the target's current value, and the image's
//!    key columns may differ from the old key (a key move). Every entry matches exactly one row.
//! 3. **upserts** — a plain `INSERT` of full rows: no row has their key at that point (no row
//!    had it before the batch, or step 1 or 2 took it away), so each row is inserted.
//!    Afterwards the row with the image's key has exactly these values.
//!
//! So every statement's expected row count is exact (rows deleted, updated, inserted = entries
//! given), which is the affected-row guard's contract ([`crate::apply`]). A row replaced in
//! the batch (deleted, or moved away, then re-inserted at its key) is an *update* of the row
//! still there, not an upsert: that keeps its count exact too.
//!
//! The updates may also be run as several UPDATE statements (e.g. grouped by which columns are
//! known), in any order between steps 1 and 3: the argument below holds for each subset.
//!
//! Why this is safe (no primary-key collision inside a statement, whatever row order
//! PostgreSQL processes a statement in), with `k0` the key of a row before the batch:
//!
//! * Every key appears at most once per list (keys of the fold map are distinct; each row
//!   before the batch has at most one descendant), so no `UPDATE … FROM` row is matched twice.
//! * An update is emitted only for a row at `k0` before the batch that no step-1 or other
//!   step-2 statement touches: either a descendant of it (still at `k0` with all values
//!   known — a plain `UPDATE`, cheaper on the target than an upsert — or with a value
//!   unknown), or a row replacing it at `k0` (all values known, the old row neither deleted
//!   nor moved by step 2, so nobody's move source or target). The update needs that row, so `k0` is never in
//!   `deletes`, and nothing before step 2 changes it, so "keep the current value" reads the
//!   pre-batch value. A row that stays at `k0` is nobody's move target (that entry holds it).
//! * A key move `k0 → k1` in step 2 needs `k1` free while the statement runs, in any row order:
//!   `k1` is not the old key of any update in the statement (checked; otherwise — swaps,
//!   cycles, chains onto a key whose row moves away — the table goes `ordered`), not the new key
//!   of another update (map keys are distinct), and if a row might be at `k1` before the batch
//!   `k1` is in `deletes` (step 1). Upserts, which create rows, come after.
//! * Inserts never change a key: a key had no row before the batch (its first change was an
//!   insert or a move onto it), or its pre-batch row left in step 1 or 2 (deleted, or moved
//!   away by an update), so the key is free; a key is inserted at most once.
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
use std::hash::{BuildHasher, Hasher};

use hashbrown::HashTable;
use thiserror::Error;

use super::row::{Arena, Change, ColumnValue, Key, RowChange, TableShape, Val, Value};

/// Seeded per process (collisions cannot be planted through key values), and several times
/// faster than SipHash on short keys.
type FastHash = foldhash::fast::RandomState;

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

impl RowChange<'_> {
    /// Checks the change fits `shape`: tuple widths, a determinable key, and whole images
    /// where they must be (a new row inserted, an old row).
    pub fn check(&self, shape: &TableShape) -> Result<(), FoldError> {
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
        let whole = |image: &[Val]| {
            if image.iter().all(|v| v.is_known()) {
                Ok(())
            } else {
                Err(FoldError::UnchangedToastInImage)
            }
        };
        match *self {
            RowChange::Insert { new } => {
                check(new.len())?;
                whole(new)?;
            }
            RowChange::Delete { old } => {
                check(old.len())?;
                whole(old)?;
            }
            RowChange::Update { old, new } => {
                check(new.len())?;
                if let Some(old) = old {
                    check(old.len())?;
                    whole(old)?;
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
        Ok(())
    }
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

/// The net effect of a batch on one table, its values in the batch's [`Arena`]. Lists are
/// flat: `key_width` values per key, `columns` per image. See the module doc for the
/// statement order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableBatch {
    pub relid: u32,
    /// Apply `original` one change at a time, in order; the other lists are empty.
    pub ordered: bool,
    /// Set when `ordered`.
    pub reason: Option<OrderedReason>,
    /// Values per key (the table's key columns).
    pub key_width: usize,
    /// Values per image.
    pub columns: usize,
    /// Step 1: keys to delete.
    pub deletes: Vec<Val>,
    /// Step 2, parallel to `update_rows`: the key of each row before the batch.
    pub update_keys: Vec<Val>,
    /// Step 2: the new images of rows that existed before the batch and either still sit at
    /// their key (an `UPDATE`, cheaper than an upsert) or have an unknown value (unchanged
    /// TOAST; such a row may also move to a new key).
    pub update_rows: Vec<Val>,
    /// Step 3: full rows to insert; no row has their key when step 3 runs.
    pub upserts: Vec<Val>,
    /// The changes as pushed, only when `ordered`.
    pub original: Vec<Change>,
}

impl TableBatch {
    /// An empty batch for the same table and widths.
    pub fn empty_like(&self) -> TableBatch {
        TableBatch {
            relid: self.relid,
            key_width: self.key_width,
            columns: self.columns,
            ..TableBatch::default()
        }
    }

    pub fn deletes(&self) -> std::slice::ChunksExact<'_, Val> {
        self.deletes.chunks_exact(self.key_width.max(1))
    }

    /// (key before the batch, new image) pairs.
    pub fn updates(&self) -> impl ExactSizeIterator<Item = (&[Val], &[Val])> + Clone {
        self.update_keys
            .chunks_exact(self.key_width.max(1))
            .zip(self.update_rows.chunks_exact(self.columns.max(1)))
    }

    pub fn upserts(&self) -> std::slice::ChunksExact<'_, Val> {
        self.upserts.chunks_exact(self.columns.max(1))
    }

    pub fn delete(&self, n: usize) -> &[Val] {
        &self.deletes[n * self.key_width..(n + 1) * self.key_width]
    }

    /// Update `n`'s key before the batch.
    pub fn update_key(&self, n: usize) -> &[Val] {
        &self.update_keys[n * self.key_width..(n + 1) * self.key_width]
    }

    /// Update `n`'s new image.
    pub fn update_row(&self, n: usize) -> &[Val] {
        &self.update_rows[n * self.columns..(n + 1) * self.columns]
    }

    pub fn upsert(&self, n: usize) -> &[Val] {
        &self.upserts[n * self.columns..(n + 1) * self.columns]
    }

    pub fn delete_count(&self) -> usize {
        self.deletes.len() / self.key_width.max(1)
    }

    pub fn update_count(&self) -> usize {
        self.update_rows.len() / self.columns.max(1)
    }

    pub fn upsert_count(&self) -> usize {
        self.upserts.len() / self.columns.max(1)
    }

    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.deletes.is_empty()
            && self.update_rows.is_empty()
            && self.upserts.is_empty()
            && self.original.is_empty()
    }

    /// The same batch with owned values (tests and diagnostics).
    pub fn to_owned_batch(&self, arena: &Arena) -> OwnedTableBatch {
        OwnedTableBatch {
            relid: self.relid,
            ordered: self.ordered,
            reason: self.reason,
            deletes: self
                .deletes()
                .map(|k| k.iter().map(|&v| arena.value(v)).collect())
                .collect(),
            updates: self
                .updates()
                .map(|(k, r)| {
                    (
                        k.iter().map(|&v| arena.value(v)).collect(),
                        r.iter().map(|&v| arena.column(v)).collect(),
                    )
                })
                .collect(),
            upserts: self
                .upserts()
                .map(|r| r.iter().map(|&v| arena.value(v)).collect())
                .collect(),
            original: self.original.clone(),
        }
    }
}

/// A [`TableBatch`] with owned values ([`TableBatch::to_owned_batch`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnedTableBatch {
    pub relid: u32,
    pub ordered: bool,
    pub reason: Option<OrderedReason>,
    pub deletes: Vec<Key>,
    pub updates: Vec<(Key, Vec<ColumnValue>)>,
    pub upserts: Vec<Vec<Value>>,
    pub original: Vec<Change>,
}

/// A finished batch: every table's net effect and the bytes their values point into.
#[derive(Debug, Default)]
pub struct Folded {
    pub arena: Arena,
    pub tables: Vec<TableBatch>,
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

#[derive(Debug, Clone, Copy)]
enum Cur {
    Absent,
    Row {
        /// Index of the entry whose pre-batch row this row descends from, if it does; the
        /// image's unknown values are that row's values.
        origin: Option<u32>,
        /// The image: `rows[row * columns..]`. Key columns are always known.
        row: u32,
    },
}

/// One logged change: where its images start in `log_vals`.
#[derive(Debug, Clone, Copy)]
struct Logged {
    kind: u8,
    old: Option<u32>,
    new: Option<u32>,
}

#[derive(Debug)]
struct TableState {
    shape: TableShape,
    /// Set once the table is given up on; folding stops.
    ordered: Option<OrderedReason>,
    /// Every change pushed, in order (needed if the table turns out `ordered`).
    log: Vec<Logged>,
    log_vals: Vec<Val>,
    /// Entry indices by key, with their hash.
    index: HashTable<(u64, u32)>,
    entries: Vec<Entry>,
    /// `key.len()` values per entry.
    entry_keys: Vec<Val>,
    /// `columns` values per image slot.
    rows: Vec<Val>,
}

/// Folds the changes of a batch; see the module doc.
#[derive(Debug, Default)]
pub struct BatchFolder {
    arena: Arena,
    tables: Vec<TableState>,
    by_relid: HashMap<u32, usize, FastHash>,
    len: usize,
    hasher: FastHash,
    scratch_old: Vec<Val>,
    scratch_new: Vec<Val>,
}

const INSERT: u8 = b'I';
const UPDATE: u8 = b'U';
const DELETE: u8 = b'D';

impl BatchFolder {
    pub fn new() -> BatchFolder {
        BatchFolder::default()
    }

    /// A folder whose arena reuses `arena`'s allocation (emptied first).
    pub fn with_arena(mut arena: Arena) -> BatchFolder {
        arena.clear();
        BatchFolder {
            arena,
            ..BatchFolder::default()
        }
    }

    /// Changes pushed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where a change's values go before [`push_row`](Self::push_row).
    pub fn arena(&mut self) -> &mut Arena {
        &mut self.arena
    }

    /// Bytes held by the batch's values.
    pub fn bytes(&self) -> usize {
        self.arena.len()
    }

    /// Adds an owned change (copying its values into the arena). See [`push_row`](Self::push_row).
    pub fn push(&mut self, shape: &TableShape, change: Change) -> Result<(), FoldError> {
        let mut old = Vec::new();
        let mut new = Vec::new();
        let a = &mut self.arena;
        let row = match &change {
            Change::Insert { new: n } => {
                new.extend(n.iter().map(|v| a.intern(v)));
                RowChange::Insert { new: &new }
            }
            Change::Update { old: o, new: n } => {
                if let Some(o) = o {
                    old.extend(o.iter().map(|v| a.intern(v)));
                }
                new.extend(n.iter().map(|v| a.intern_column(v)));
                RowChange::Update {
                    old: o.as_ref().map(|_| old.as_slice()),
                    new: &new,
                }
            }
            Change::Delete { old: o } => {
                old.extend(o.iter().map(|v| a.intern(v)));
                RowChange::Delete { old: &old }
            }
        };
        self.push_row(shape, row)
    }

    /// Adds the next change of the batch (source order) to table `shape.relid`; its values
    /// are already in [`arena`](Self::arena).
    ///
    /// Errors (the folder is unchanged): a tuple of the wrong width, a shape different from
    /// the one this table had earlier in the batch, an update whose key cannot be determined,
    /// an unchanged-TOAST marker in an image that must be whole.
    pub fn push_row(&mut self, shape: &TableShape, change: RowChange<'_>) -> Result<(), FoldError> {
        change.check(shape)?;
        let relid = shape.relid;
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
                    log_vals: Vec::new(),
                    index: HashTable::new(),
                    entries: Vec::new(),
                    entry_keys: Vec::new(),
                    rows: Vec::new(),
                });
                self.by_relid.insert(relid, self.tables.len() - 1);
                self.tables.len() - 1
            }
        };
        let table = &mut self.tables[t];
        if table.ordered.is_none() {
            let mut f = Fold {
                arena: &self.arena,
                hasher: &self.hasher,
                ko: &mut self.scratch_old,
                kn: &mut self.scratch_new,
            };
            if let Err(reason) = f.fold(table, change) {
                table.ordered = Some(reason);
                table.index = HashTable::new();
                table.entries = Vec::new();
                table.entry_keys = Vec::new();
                table.rows = Vec::new();
            }
        }
        table.log(change);
        self.len += 1;
        Ok(())
    }

    /// The net effect per table, tables in first-seen order.
    pub fn finish(self) -> Folded {
        let arena = self.arena;
        let tables = self.tables.into_iter().map(|t| t.finish(&arena)).collect();
        Folded { arena, tables }
    }
}

/// The folding of one change: what it reads besides the table.
struct Fold<'a> {
    arena: &'a Arena,
    hasher: &'a FastHash,
    ko: &'a mut Vec<Val>,
    kn: &'a mut Vec<Val>,
}

/// Fills `out` with the key columns of `row`; `Err` if one is NULL.
fn gather_key(
    key: &[usize],
    out: &mut Vec<Val>,
    mut col: impl FnMut(usize, usize) -> Val,
) -> Result<(), OrderedReason> {
    out.clear();
    for (j, &c) in key.iter().enumerate() {
        let v = col(j, c);
        if v.is_null() {
            return Err(OrderedReason::NullKey);
        }
        out.push(v);
    }
    Ok(())
}

impl Fold<'_> {
    fn hash(&self, key: &[Val]) -> u64 {
        let mut h = self.hasher.build_hasher();
        for &v in key {
            let b = self.arena.get(v).unwrap_or_default();
            h.write_usize(b.len());
            h.write(b);
        }
        h.finish()
    }

    fn same_key(&self, a: &[Val], b: &[Val]) -> bool {
        a.iter().zip(b).all(|(&x, &y)| self.arena.same(x, y))
    }

    /// The entry for `key`, created with `make` (given its index) if absent.
    fn entry(
        &self,
        t: &mut TableState,
        key: &[Val],
        make: impl FnOnce(u32, &mut Vec<Val>) -> Entry,
    ) -> (u32, bool) {
        let hash = self.hash(key);
        let w = key.len();
        let TableState {
            index,
            entry_keys,
            entries,
            rows,
            ..
        } = t;
        if let Some(&(_, i)) = index.find(hash, |&(h, i)| {
            h == hash && self.same_key(&entry_keys[i as usize * w..(i as usize + 1) * w], key)
        }) {
            return (i, false);
        }
        let i = entries.len() as u32;
        entries.push(make(i, rows));
        entry_keys.extend_from_slice(key);
        index.insert_unique(hash, (hash, i), |&(h, _)| h);
        (i, true)
    }

    fn fold(&mut self, t: &mut TableState, change: RowChange<'_>) -> Result<(), OrderedReason> {
        let key_cols = std::mem::take(&mut t.shape.key);
        let r = self.fold_inner(t, &key_cols, change);
        t.shape.key = key_cols;
        r
    }

    fn fold_inner(
        &mut self,
        t: &mut TableState,
        key_cols: &[usize],
        change: RowChange<'_>,
    ) -> Result<(), OrderedReason> {
        let columns = t.shape.columns;
        let new_slot = |rows: &mut Vec<Val>, image: &[Val]| {
            let slot = (rows.len() / columns.max(1)) as u32;
            rows.extend_from_slice(image);
            slot
        };
        match change {
            RowChange::Insert { new } => {
                gather_key(key_cols, self.kn, |_, c| new[c])?;
                let kn = std::mem::take(self.kn);
                let (i, created) = self.entry(t, &kn, |_, rows| Entry {
                    pre: false,
                    cur: Cur::Row {
                        origin: None,
                        row: new_slot(rows, new),
                    },
                });
                *self.kn = kn;
                if !created {
                    match t.entries[i as usize].cur {
                        Cur::Absent => {
                            let row = new_slot(&mut t.rows, new);
                            t.entries[i as usize].cur = Cur::Row { origin: None, row };
                        }
                        Cur::Row { .. } => return Err(OrderedReason::Inconsistent),
                    }
                }
            }
            RowChange::Delete { old } => {
                gather_key(key_cols, self.ko, |_, c| old[c])?;
                let ko = std::mem::take(self.ko);
                let (i, created) = self.entry(t, &ko, |_, _| Entry {
                    pre: true,
                    cur: Cur::Absent,
                });
                *self.ko = ko;
                if !created {
                    let e = &mut t.entries[i as usize];
                    match e.cur {
                        Cur::Absent => return Err(OrderedReason::Inconsistent),
                        Cur::Row { .. } => e.cur = Cur::Absent,
                    }
                }
            }
            RowChange::Update { old, new } => {
                match old {
                    Some(old) => gather_key(key_cols, self.ko, |_, c| old[c])?,
                    // push_row() checked the key columns are known.
                    None => gather_key(key_cols, self.ko, |_, c| new[c])?,
                }
                // An unchanged-TOAST key column keeps the old key's value.
                let ko = std::mem::take(self.ko);
                gather_key(key_cols, self.kn, |j, c| {
                    if new[c].is_known() { new[c] } else { ko[j] }
                })?;
                let (i, _) = self.entry(t, &ko, |i, rows| {
                    // The pre-batch row at `ko`: only its key known so far.
                    let slot = (rows.len() / columns.max(1)) as u32;
                    let start = rows.len();
                    rows.resize(start + columns, Val::UNCHANGED_TOAST);
                    for (&c, &v) in key_cols.iter().zip(ko.iter()) {
                        rows[start + c] = v;
                    }
                    Entry {
                        pre: true,
                        cur: Cur::Row {
                            origin: Some(i),
                            row: slot,
                        },
                    }
                });
                let (origin, row) = match t.entries[i as usize].cur {
                    Cur::Absent => {
                        *self.ko = ko;
                        return Err(OrderedReason::Inconsistent);
                    }
                    Cur::Row { origin, row } => (origin, row),
                };
                let image = &mut t.rows[row as usize * columns..(row as usize + 1) * columns];
                for (dst, &src) in image.iter_mut().zip(new) {
                    if src.is_known() {
                        *dst = src;
                    }
                }
                let moved = !self.same_key(&ko, self.kn);
                *self.ko = ko;
                if !moved {
                    return Ok(());
                }
                t.entries[i as usize].cur = Cur::Absent;
                let kn = std::mem::take(self.kn);
                let (j, created) = self.entry(t, &kn, |_, _| Entry {
                    pre: false,
                    cur: Cur::Row { origin, row },
                });
                *self.kn = kn;
                if !created {
                    let e = &mut t.entries[j as usize];
                    match e.cur {
                        Cur::Absent => e.cur = Cur::Row { origin, row },
                        Cur::Row { .. } => return Err(OrderedReason::Inconsistent),
                    }
                }
            }
        }
        Ok(())
    }
}

impl TableState {
    fn log(&mut self, change: RowChange<'_>) {
        let mut put = |image: &[Val]| {
            let at = self.log_vals.len() as u32;
            self.log_vals.extend_from_slice(image);
            at
        };
        let logged = match change {
            RowChange::Insert { new } => Logged {
                kind: INSERT,
                old: None,
                new: Some(put(new)),
            },
            RowChange::Update { old, new } => Logged {
                kind: UPDATE,
                old: old.map(&mut put),
                new: Some(put(new)),
            },
            RowChange::Delete { old } => Logged {
                kind: DELETE,
                old: Some(put(old)),
                new: None,
            },
        };
        self.log.push(logged);
    }

    /// The logged changes with owned values.
    fn original(&self, arena: &Arena) -> Vec<Change> {
        let n = self.shape.columns;
        let image = |at: u32| &self.log_vals[at as usize..][..n];
        self.log
            .iter()
            .map(|l| {
                match (l.kind, l.old, l.new) {
                    (INSERT, _, Some(new)) => RowChange::Insert { new: image(new) },
                    (UPDATE, old, Some(new)) => RowChange::Update {
                        old: old.map(image),
                        new: image(new),
                    },
                    (_, Some(old), _) => RowChange::Delete { old: image(old) },
                    _ => unreachable!("every logged change has an image"),
                }
                .to_change(arena)
            })
            .collect()
    }

    fn finish(self, arena: &Arena) -> TableBatch {
        let relid = self.shape.relid;
        let columns = self.shape.columns;
        let w = self.shape.key.len();
        let ordered = |t: &TableState, reason| TableBatch {
            relid,
            ordered: true,
            reason: Some(reason),
            key_width: w,
            columns,
            original: t.original(arena),
            ..TableBatch::default()
        };
        if let Some(reason) = self.ordered {
            return ordered(&self, reason);
        }
        let image = |row: u32| &self.rows[row as usize * columns..(row as usize + 1) * columns];
        let key = |i: usize| &self.entry_keys[i * w..(i + 1) * w];
        let n = self.entries.len();
        let mut update_origin = vec![false; n];
        let mut move_target = vec![false; n];
        for (i, e) in self.entries.iter().enumerate() {
            if let Cur::Row { origin, row } = e.cur
                && !image(row).iter().all(|v| v.is_known())
            {
                let Some(o) = origin else {
                    // Unreachable: rows born in the batch are fully known. Stay safe anyway.
                    debug_assert!(false, "unknown value in a row inserted in the batch");
                    return ordered(&self, OrderedReason::Inconsistent);
                };
                update_origin[o as usize] = true;
                if o as usize != i {
                    move_target[i] = true;
                }
            }
        }
        if (0..n).any(|i| move_target[i] && update_origin[i]) {
            return ordered(&self, OrderedReason::KeyMoveConflict);
        }
        let mut batch = TableBatch {
            relid,
            key_width: w,
            columns,
            ..TableBatch::default()
        };
        for (i, e) in self.entries.iter().enumerate() {
            match e.cur {
                Cur::Absent => {
                    if e.pre && !update_origin[i] {
                        batch.deletes.extend_from_slice(key(i));
                    }
                }
                Cur::Row { origin, row } => {
                    // A row that existed at this key before the batch and still does is an
                    // UPDATE: cheaper on the target than an INSERT … ON CONFLICT.
                    let stayed = origin == Some(i as u32);
                    let values = image(row);
                    // A pre-batch row still sits at this key when step 2 runs unless step 2
                    // moves it away: then the row replacing it is an UPDATE of it (so its
                    // count is exact), else the key is free by step 3 and a plain INSERT fits.
                    let replaces = e.pre && !update_origin[i];
                    if values.iter().all(|v| v.is_known()) && !stayed && !replaces {
                        batch.upserts.extend_from_slice(values);
                    } else if values.iter().all(|v| v.is_known()) && !stayed {
                        batch.update_keys.extend_from_slice(key(i));
                        batch.update_rows.extend_from_slice(values);
                    } else {
                        let o = origin.expect("an update descends from a pre-batch row") as usize;
                        if move_target[i] && e.pre {
                            batch.deletes.extend_from_slice(key(i));
                        }
                        // An origin has one descendant, so its key is used once.
                        batch.update_keys.extend_from_slice(key(o));
                        batch.update_rows.extend_from_slice(values);
                    }
                }
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests;
