//! The fold's tests: unit cases, and the model test that proves the statement order
//! (`folded_batch_equals_one_by_one`): a folded batch, run as the module doc's statements
//! against a model table that refuses key collisions, leaves the same rows as the changes
//! applied one by one.

use std::collections::BTreeMap;

use bytes::Bytes;
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
fn fold(changes: Vec<Change>) -> OwnedTableBatch {
    let mut f = BatchFolder::new();
    let s = shape();
    for c in changes {
        f.push(&s, c).unwrap();
    }
    let mut out = owned(f);
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}
fn owned(f: BatchFolder) -> Vec<OwnedTableBatch> {
    let out = f.finish();
    out.tables
        .iter()
        .map(|t| t.to_owned_batch(&out.arena))
        .collect()
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
        OwnedTableBatch {
            relid: 1,
            ..OwnedTableBatch::default()
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
fn delete_then_insert_is_an_update_of_the_row_still_there() {
    let b = fold(vec![del("1"), ins("1", "a", "x")]);
    assert_eq!(b.updates, vec![(key("1"), vec![k("1"), k("a"), k("x")])]);
    assert!(b.deletes.is_empty() && b.upserts.is_empty());
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
    assert_eq!(
        b.updates,
        vec![
            (key("1"), vec![k("1"), k("b"), k("y")]),
            (key("2"), vec![k("2"), k("a"), k("x")])
        ]
    );
    assert!(b.deletes.is_empty() && b.upserts.is_empty());
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
    let b = owned(f).pop().unwrap();
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
    let out = owned(f);
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
    let b = owned(f).pop().unwrap();
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
    let mut arena = Arena::default();
    let one = arena.push(Some(b"1"));
    let new = [one, Val::NULL, Val::UNCHANGED_TOAST];
    let u = RowChange::Update {
        old: None,
        new: &new,
    };
    assert_eq!(u.check(&s), Ok(()));
    assert_eq!(
        u.to_change(&arena),
        Change::Update {
            old: None,
            new: vec![k("1"), ColumnValue::Known(None), U]
        }
    );
    assert_eq!(
        RowChange::Insert { new: &new }.check(&s),
        Err(FoldError::UnchangedToastInImage)
    );
    let old = [one, Val::NULL, Val::NULL];
    let d = RowChange::Delete { old: &old };
    assert_eq!(d.check(&s), Ok(()));
    assert_eq!(d.to_change(&arena), del("1"));
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
fn apply_batch(shape: &TableShape, t: &mut Table, b: &OwnedTableBatch) -> Result<(), String> {
    if b.ordered {
        for c in &b.original {
            apply_one(shape, t, c)?;
        }
        return Ok(());
    }
    // 1. DELETE … WHERE key IN (…): the guard wants every key to delete a row.
    for k in &b.deletes {
        if t.remove(k).is_none() {
            return Err(format!("delete: no row at {k:?} (count guard)"));
        }
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
            return Err(format!("update: no row at {ko:?} (count guard)"));
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
    // 3. A plain INSERT.
    let mut seen = std::collections::BTreeSet::new();
    for row in &b.upserts {
        let key = key_of(shape, row);
        if !seen.insert(key.clone()) {
            return Err(format!("upsert: row {key:?} affected twice"));
        }
        if t.contains_key(&key) {
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
    let b = OwnedTableBatch {
        relid: 1,
        updates: vec![
            (key("1"), vec![k("2"), U, U]),
            (key("2"), vec![k("1"), U, U]),
        ],
        ..OwnedTableBatch::default()
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
        proptest::collection::vec(proptest::option::of(any::<[u8; 2]>()), KEYS as usize).prop_map(
            move |rows| {
                let mut t = Table::new();
                for (i, r) in rows.into_iter().enumerate() {
                    if let Some([a, b]) = r {
                        let mut row = vec![val(a), val(b), val(a ^ b)];
                        row[kc] = kv(i as u8);
                        t.insert(vec![kv(i as u8)], row);
                    }
                }
                t
            },
        )
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
        let batches = owned(f);
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
