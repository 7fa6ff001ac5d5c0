//! Writing a batch through the migration mapping ([`crate::transform`]): the same fold, the
//! same statement order (deletes, updates, upserts; see [`crate::apply::fold`]), one set of
//! statements per target table, with the mapping's expressions evaluated by the target inside
//! them.
//!
//! The affected-row guard holds where the mapping lets the target's rows be known: without a
//! filter every delete and update must find its row (one per source key: the mapped key is
//! assumed injective, as a target key computed from the source key must be) and every insert
//! must insert. With a filter, a source row may legitimately have no target row, so a delete
//! (which carries only the old key) is not counted; an update rewritten as an upsert must write
//! every row that passes, and an in-place update reports rows that pass the filter but were not
//! found. A `GENERATED ALWAYS AS IDENTITY` target column is never set by an update or upsert
//! (PostgreSQL refuses); its value is checked instead, so a change to it is a guard mismatch.
//!
//! Two cases differ from the same-named path. An update whose image lacks a value (unchanged
//! TOAST) can keep a target column that is a plain copy of it, but cannot compute an
//! expression reading it: that is a clear error, never a guessed value. With a filter, an
//! update that carries every value the target reads is written as an upsert (and a delete of
//! its old key if it moved), so a row that starts passing the filter is inserted and one that
//! stops passing is deleted.

use std::collections::HashMap;
use std::sync::Arc;

use super::error::ReplayError;
use super::statements::{Conn, WriteError, expect_rows, text_params};
use crate::apply::fold::TableBatch;
use crate::apply::params::EncodedArray;
use crate::apply::row::{Arena, Change, ColumnValue, Val};
use crate::lsn::Lsn;
use crate::transform::SourcePlan;
use crate::transform::sql as tsql;
use tokio_postgres::types::ToSql;

impl Conn {
    /// The folded batch of one source table, through its plan.
    pub(super) async fn write_mapped(
        &mut self,
        plan: &Arc<SourcePlan>,
        tb: &TableBatch,
        arena: &Arena,
        lsn: Lsn,
    ) -> Result<(), WriteError> {
        if tb.ordered {
            for c in &tb.original {
                self.apply_one_mapped(plan, c, lsn).await?;
            }
            return Ok(());
        }
        let ncols = plan.source.columns.len();
        for (ti, t) in plan.targets.iter().enumerate() {
            let filtered = t.filter.is_some();
            let needs = t.reads();
            let mut extra_deletes: Vec<&[Val]> = Vec::new();
            // Updates written as upserts; their unknown values (which the target does not
            // read) travel as NULL.
            let mut extra_upserts: Vec<&[Val]> = Vec::new();
            let mut groups: HashMap<(Vec<usize>, bool), Vec<usize>> = HashMap::new();
            for (n, (old_key, row)) in tb.updates().enumerate() {
                let known: Vec<usize> = (0..ncols).filter(|&i| row[i].is_known()).collect();
                let moved = moved(plan, arena, old_key, row);
                if filtered && needs.iter().all(|r| known.contains(r)) {
                    if moved {
                        extra_deletes.push(old_key);
                    }
                    extra_upserts.push(row);
                } else {
                    groups.entry((known, moved)).or_default().push(n);
                }
            }
            let target_q = t.target.quoted();
            if !tb.deletes.is_empty() || !extra_deletes.is_empty() {
                let stmt = self.statement(tsql::delete(plan, t)).await?;
                let params = text_params((0..plan.key.len()).map(|j| {
                    tb.deletes()
                        .chain(extra_deletes.iter().copied())
                        .map(move |k| arena.get(k[j]))
                }));
                let found = self.execute_arrays(&stmt, &params).await?;
                if !filtered {
                    expect_rows(&target_q, "set-based DELETE", tb.delete_count(), found)?;
                }
            }
            for ((known, moved), members) in groups {
                let rows: Vec<(&[Val], &[Val])> = members
                    .iter()
                    .map(|&n| (tb.update_key(n), tb.update_row(n)))
                    .collect();
                self.update_mapped(plan, ti, &known, moved, &rows, arena, lsn)
                    .await?;
            }
            // The fold's rows have free keys: a plain INSERT. Updates through a filter overwrite.
            let fresh: Vec<&[Val]> = tb.upserts().collect();
            if !fresh.is_empty() {
                let stmt = self.statement(tsql::insert(plan, t)).await?;
                let rows = &fresh;
                let params =
                    text_params((0..ncols).map(|c| rows.iter().map(move |r| arena.get(r[c]))));
                let found = self.execute_arrays(&stmt, &params).await?;
                if !filtered {
                    expect_rows(&target_q, "set-based INSERT", rows.len(), found)?;
                }
            }
            if !extra_upserts.is_empty() {
                let rows = &extra_upserts;
                self.upsert_mapped(
                    plan,
                    ti,
                    text_params((0..ncols).map(|c| rows.iter().map(move |r| arena.get(r[c])))),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Updates of existing rows that know the same source columns: (key before the batch,
    /// image) pairs.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn update_mapped(
        &mut self,
        plan: &Arc<SourcePlan>,
        ti: usize,
        known: &[usize],
        moved: bool,
        rows: &[(&[Val], &[Val])],
        arena: &Arena,
        lsn: Lsn,
    ) -> Result<(), WriteError> {
        let t = &plan.targets[ti];
        let mut shape = tsql::update_shape(plan, t, known, moved).map_err(|m| {
            WriteError::Fatal(ReplayError::MissingValue {
                lsn,
                table: plan.source.name.to_string(),
                source_column: m.source_column,
                target_column: m.target_column,
            })
        })?;
        if shape.set.is_empty() && !shape.filter {
            // Nothing computable changed, but the row must be there: set its key to itself.
            shape.set = t.key.clone();
        }
        let stmt = self
            .statement(tsql::update(plan, t, known, &shape, moved))
            .await?;
        let key_params = (0..plan.key.len())
            .filter(|_| moved)
            .map(|j| rows.iter().map(move |(k, _)| arena.get(k[j])));
        let mut params = text_params(key_params);
        params.extend(text_params(
            known
                .iter()
                .map(|&c| rows.iter().map(move |(_, r)| arena.get(r[c]))),
        ));
        if !shape.filter {
            let found = self.execute_arrays(&stmt, &params).await?;
            return expect_rows(&t.target.quoted(), "UPDATE", rows.len(), found);
        }
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        let missing: i64 = self.client.query_one(&stmt, &refs).await?.get(0);
        if missing > 0 {
            return Err(WriteError::Fatal(ReplayError::FilteredRowIncomplete {
                lsn,
                table: plan.source.name.to_string(),
                target: t.target.to_string(),
                rows: missing,
            }));
        }
        Ok(())
    }

    /// One change in source order, through the plan: the set-based statements with one row.
    pub(super) async fn apply_one_mapped(
        &mut self,
        plan: &Arc<SourcePlan>,
        change: &Change,
        lsn: Lsn,
    ) -> Result<(), WriteError> {
        let mut arena = Arena::default();
        let image = |values: &mut dyn Iterator<Item = Val>| values.collect::<Vec<Val>>();
        let (old, new): (Option<Vec<Val>>, Option<Vec<Val>>) = match change {
            Change::Insert { new } => (
                None,
                Some(image(&mut new.iter().map(|v| arena.push(v.as_deref())))),
            ),
            Change::Delete { old } => (
                Some(image(&mut old.iter().map(|v| arena.push(v.as_deref())))),
                None,
            ),
            Change::Update { old, new } => {
                let old = old
                    .as_ref()
                    .map(|o| image(&mut o.iter().map(|v| arena.push(v.as_deref()))));
                let new = image(&mut new.iter().map(|v| match v {
                    ColumnValue::Known(v) => arena.push(v.as_deref()),
                    ColumnValue::UnchangedToast => Val::UNCHANGED_TOAST,
                }));
                (old, Some(new))
            }
        };
        let arena = &arena;
        for (ti, t) in plan.targets.iter().enumerate() {
            let insert = matches!(change, Change::Insert { .. });
            match (&old, &new) {
                (None, Some(new)) if insert => {
                    let stmt = self.statement(tsql::insert(plan, t)).await?;
                    let params = text_params(new.iter().map(|&v| std::iter::once(arena.get(v))));
                    let found = self.execute_arrays(&stmt, &params).await?;
                    if t.filter.is_none() {
                        expect_rows(&t.target.quoted(), "INSERT", 1, found)?;
                    }
                }
                (Some(old), None) => {
                    let key: Vec<Val> = plan.key.iter().map(|&k| old[k]).collect();
                    self.delete_key_mapped(plan, ti, &key, arena).await?;
                }
                (old, Some(new)) => {
                    let src = old.as_deref().unwrap_or(new);
                    let old_key: Vec<Val> = plan.key.iter().map(|&k| src[k]).collect();
                    let known: Vec<usize> = (0..new.len()).filter(|&i| new[i].is_known()).collect();
                    let moved = moved(plan, arena, &old_key, new);
                    if t.filter.is_some() && t.reads().iter().all(|r| known.contains(r)) {
                        if moved {
                            self.delete_key_mapped(plan, ti, &old_key, arena).await?;
                        }
                        let params =
                            text_params(new.iter().map(|&v| std::iter::once(arena.get(v))));
                        self.upsert_mapped(plan, ti, params).await?;
                    } else {
                        self.update_mapped(plan, ti, &known, moved, &[(&old_key, new)], arena, lsn)
                            .await?;
                    }
                }
                (None, None) => unreachable!("a change has an image"),
            }
        }
        Ok(())
    }

    /// Writes whole rows through [`tsql::upsert`]; every row passing the filter must be
    /// written (see there).
    async fn upsert_mapped(
        &mut self,
        plan: &Arc<SourcePlan>,
        ti: usize,
        params: Vec<EncodedArray>,
    ) -> Result<(), WriteError> {
        let t = &plan.targets[ti];
        let stmt = self.statement(tsql::upsert(plan, t)).await?;
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        let row = self.client.query_one(&stmt, &refs).await?;
        let (expected, written): (i64, i64) = (row.get(0), row.get(1));
        expect_rows(
            &t.target.quoted(),
            "upsert",
            expected as usize,
            written as u64,
        )
    }

    async fn delete_key_mapped(
        &mut self,
        plan: &Arc<SourcePlan>,
        ti: usize,
        key: &[Val],
        arena: &Arena,
    ) -> Result<(), WriteError> {
        let t = &plan.targets[ti];
        let stmt = self.statement(tsql::delete(plan, t)).await?;
        let params = text_params(key.iter().map(|&v| std::iter::once(arena.get(v))));
        let found = self.execute_arrays(&stmt, &params).await?;
        if t.filter.is_none() {
            expect_rows(&t.target.quoted(), "DELETE", 1, found)?;
        }
        Ok(())
    }
}

/// The row's key columns differ from its key before the batch.
fn moved(plan: &SourcePlan, arena: &Arena, old_key: &[Val], row: &[Val]) -> bool {
    plan.key
        .iter()
        .zip(old_key)
        .any(|(&c, &k)| !(row[c].is_known() && arena.same(row[c], k)))
}
