//! Writing a batch through the migration mapping ([`crate::transform`]): the same fold, the
//! same statement order (deletes, updates, upserts; see [`crate::apply::fold`]), one set of
//! statements per target table, with the mapping's expressions evaluated by the target inside
//! them.
//!
//! Two cases differ from the same-named path. An update whose image lacks a value (unchanged
//! TOAST) can keep a target column that is a plain copy of it, but cannot compute an
//! expression reading it: that is a clear error, never a guessed value. With a filter, an
//! update that carries every value the target reads is written as an upsert (and a delete of
//! its old key if it moved), so a row that starts passing the filter is inserted and one that
//! stops passing is deleted.

use super::*;
use crate::transform::sql as tsql;

impl Conn {
    /// The folded batch of one source table, through its plan.
    pub(super) async fn write_mapped(
        &mut self,
        plan: &Arc<SourcePlan>,
        tb: &TableBatch,
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
            let mut extra_deletes: Vec<&Key> = Vec::new();
            let mut extra_upserts: Vec<Vec<Value>> = Vec::new();
            let mut groups: HashMap<(Vec<usize>, bool), Vec<usize>> = HashMap::new();
            for (n, (old_key, row)) in tb.updates.iter().enumerate() {
                let known: Vec<usize> = (0..ncols).filter(|&i| row[i].is_known()).collect();
                let moved = moved(plan, old_key, row);
                if filtered && needs.iter().all(|r| known.contains(r)) {
                    if moved {
                        extra_deletes.push(old_key);
                    }
                    extra_upserts.push(known_row(row));
                } else {
                    groups.entry((known, moved)).or_default().push(n);
                }
            }
            if !tb.deletes.is_empty() || !extra_deletes.is_empty() {
                let stmt = self.statement(tsql::delete(plan, t)).await?;
                let cols: Vec<Vec<Option<&str>>> = (0..plan.key.len())
                    .map(|j| {
                        tb.deletes
                            .iter()
                            .chain(extra_deletes.iter().copied())
                            .map(|k| text(&k[j]))
                            .collect()
                    })
                    .collect();
                self.execute(&stmt, &cols).await?;
            }
            for ((known, moved), members) in groups {
                let rows: Vec<(&Key, &Vec<ColumnValue>)> = members
                    .iter()
                    .map(|&n| (&tb.updates[n].0, &tb.updates[n].1))
                    .collect();
                self.update_mapped(plan, ti, &known, moved, &rows, lsn)
                    .await?;
            }
            // Fresh keys (no row before the batch) take a plain INSERT; the rest overwrite.
            let fresh: Vec<&Vec<Value>> = tb
                .upserts
                .iter()
                .zip(&tb.fresh)
                .filter(|(_, f)| **f)
                .map(|(r, _)| r)
                .collect();
            let rest: Vec<&Vec<Value>> = tb
                .upserts
                .iter()
                .zip(&tb.fresh)
                .filter(|(_, f)| !**f)
                .map(|(r, _)| r)
                .chain(extra_upserts.iter())
                .collect();
            for (rows, upsert) in [(fresh, false), (rest, true)] {
                if rows.is_empty() {
                    continue;
                }
                let stmt = self.statement(tsql::insert(plan, t, upsert)).await?;
                let cols: Vec<Vec<Option<&str>>> = (0..ncols)
                    .map(|c| rows.iter().map(|r| text(&r[c])).collect())
                    .collect();
                self.execute(&stmt, &cols).await?;
            }
        }
        Ok(())
    }

    /// Updates of existing rows that know the same source columns.
    async fn update_mapped(
        &mut self,
        plan: &Arc<SourcePlan>,
        ti: usize,
        known: &[usize],
        moved: bool,
        rows: &[(&Key, &Vec<ColumnValue>)],
        lsn: Lsn,
    ) -> Result<(), WriteError> {
        let t = &plan.targets[ti];
        let shape = tsql::update_shape(plan, t, known, moved).map_err(|m| {
            WriteError::Fatal(ReplayError::MissingValue {
                lsn,
                table: plan.source.name.to_string(),
                source_column: m.source_column,
                target_column: m.target_column,
            })
        })?;
        if shape.set.is_empty() && !shape.filter {
            return Ok(()); // nothing computable changed: the target row is already right
        }
        let stmt = self
            .statement(tsql::update(plan, t, known, &shape, moved))
            .await?;
        let mut cols: Vec<Vec<Option<&str>>> = Vec::new();
        if moved {
            for j in 0..plan.key.len() {
                cols.push(rows.iter().map(|(k, _)| text(&k[j])).collect());
            }
        }
        for &c in known {
            cols.push(
                rows.iter()
                    .map(|(_, r)| match &r[c] {
                        ColumnValue::Known(v) => text(v),
                        ColumnValue::UnchangedToast => None,
                    })
                    .collect(),
            );
        }
        if !shape.filter {
            self.execute(&stmt, &cols).await?;
            return Ok(());
        }
        let params: Vec<&(dyn ToSql + Sync)> =
            cols.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let missing: i64 = self.client.query_one(&stmt, &params).await?.get(0);
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
        for (ti, t) in plan.targets.iter().enumerate() {
            match change {
                Change::Insert { new } => {
                    let stmt = self.statement(tsql::insert(plan, t, false)).await?;
                    let cols: Vec<Vec<Option<&str>>> = new.iter().map(one).collect();
                    self.execute(&stmt, &cols).await?;
                }
                Change::Delete { old } => {
                    let key: Key = plan.key.iter().map(|&k| old[k].clone()).collect();
                    self.delete_key_mapped(plan, ti, &key).await?;
                }
                Change::Update { old, new } => {
                    let old_key: Key = match old {
                        Some(o) => plan.key.iter().map(|&k| o[k].clone()).collect(),
                        None => plan
                            .key
                            .iter()
                            .map(|&k| match &new[k] {
                                ColumnValue::Known(v) => v.clone(),
                                ColumnValue::UnchangedToast => None,
                            })
                            .collect(),
                    };
                    let known: Vec<usize> = (0..new.len()).filter(|&i| new[i].is_known()).collect();
                    let moved = moved(plan, &old_key, new);
                    if t.filter.is_some() && t.reads().iter().all(|r| known.contains(r)) {
                        if moved {
                            self.delete_key_mapped(plan, ti, &old_key).await?;
                        }
                        let stmt = self.statement(tsql::insert(plan, t, true)).await?;
                        let row = known_row(new);
                        let cols: Vec<Vec<Option<&str>>> = row.iter().map(one).collect();
                        self.execute(&stmt, &cols).await?;
                    } else {
                        self.update_mapped(plan, ti, &known, moved, &[(&old_key, new)], lsn)
                            .await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn delete_key_mapped(
        &mut self,
        plan: &Arc<SourcePlan>,
        ti: usize,
        key: &Key,
    ) -> Result<(), WriteError> {
        let t = &plan.targets[ti];
        let stmt = self.statement(tsql::delete(plan, t)).await?;
        let cols: Vec<Vec<Option<&str>>> = key.iter().map(|v| vec![text(v)]).collect();
        self.execute(&stmt, &cols).await?;
        Ok(())
    }
}

fn one(v: &Value) -> Vec<Option<&str>> {
    vec![text(v)]
}

/// The row's key columns differ from its key before the batch.
fn moved(plan: &SourcePlan, old_key: &Key, row: &[ColumnValue]) -> bool {
    plan.key
        .iter()
        .zip(old_key)
        .any(|(&c, k)| !matches!(&row[c], ColumnValue::Known(v) if v == k))
}

/// An image as plain values; unknown ones (which the target does not read) become NULL.
fn known_row(row: &[ColumnValue]) -> Vec<Value> {
    row.iter()
        .map(|v| match v {
            ColumnValue::Known(v) => v.clone(),
            ColumnValue::UnchangedToast => None,
        })
        .collect()
}
