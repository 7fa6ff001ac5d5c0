//! Statements on one target connection: a folded table written set-based (deletes, updates,
//! inserts, in the fold's order), and the strict-order fallback, one statement per change.
//!
//! Invariant (the affected-row guard, [`crate::apply`]): every statement's row count is
//! checked; a count other than the one expected is a [`WriteError::Mismatch`] (the batch is
//! retried in strict order), and in strict order a change that still misses its row is
//! [`ReplayError::Diverged`].

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::dest::Dest;
use super::error::ReplayError;
use crate::apply::catalog::MappedTable;
use crate::apply::fold::TableBatch;
use crate::apply::params::{self, EncodedArray, Wire};
use crate::apply::row::{Arena, Change, ColumnValue, Val, Value};
use crate::lsn::Lsn;

/// A set-based write that failed.
pub(super) enum WriteError {
    /// The server refused a statement: the batch is retried in strict source order.
    Db(tokio_postgres::Error),
    /// A statement affected another number of rows than the batch says it must (the
    /// affected-row guard, see [`crate::apply`]): the batch is retried in strict source order,
    /// where a single change that still misses is [`ReplayError::Diverged`].
    Mismatch(Mismatch),
    /// The change cannot be written through the mapping, in any order.
    Fatal(ReplayError),
}

impl From<tokio_postgres::Error> for WriteError {
    fn from(e: tokio_postgres::Error) -> Self {
        WriteError::Db(e)
    }
}

/// A statement's row count that is not the one expected.
#[derive(Debug)]
pub(super) struct Mismatch {
    pub(super) table: String,
    /// The statement, e.g. `set-based UPDATE`.
    pub(super) statement: &'static str,
    pub(super) expected: u64,
    pub(super) found: u64,
}

/// The affected-row guard: `found` (the command tag's count) must be `expected`.
pub(super) fn expect_rows(
    table: &str,
    statement: &'static str,
    expected: usize,
    found: u64,
) -> Result<(), WriteError> {
    if found == expected as u64 {
        return Ok(());
    }
    Err(WriteError::Mismatch(Mismatch {
        table: table.to_owned(),
        statement,
        expected: expected as u64,
        found,
    }))
}

impl WriteError {
    /// The error a change applied on its own (strict order) fails with.
    pub(super) fn for_change(self, dest: &Dest, change: &Change, lsn: Lsn) -> ReplayError {
        match self {
            WriteError::Db(e) => ReplayError::Apply {
                lsn,
                table: dest.name(),
                what: describe_change(dest, change),
                source: e,
            },
            WriteError::Mismatch(m) => ReplayError::Diverged {
                lsn,
                table: match dest {
                    Dest::Same(_) => m.table,
                    Dest::Mapped(_) => format!("{} (mapped from {})", m.table, dest.name()),
                },
                what: describe_change(dest, change),
                expected: m.expected,
                found: m.found,
            },
            WriteError::Fatal(e) => e,
        }
    }
}

/// A target connection and its prepared statements (keyed by their text).
pub(super) struct Conn {
    pub(super) client: Arc<Client>,
    pub(super) statements: HashMap<String, tokio_postgres::Statement>,
}

/// One statement parameter: column `col` of `sql`'s table holding `values`, in its binary
/// form ([`crate::apply::params`]) when every value has one, else as text. Returns the array type the
/// statement declares for it, and the array.
fn param<'a>(
    sql: &crate::apply::sql::TableSql,
    col: usize,
    values: impl Iterator<Item = Option<&'a [u8]>> + Clone,
) -> (&'static str, EncodedArray) {
    let wire = Wire::for_type(&sql.columns[col].type_sql);
    match params::encode_array(wire, values.clone()) {
        Some(a) => (wire.array_type(), a),
        None => (Wire::Text.array_type(), params::encode_text(values)),
    }
}

/// Text parameters (statements through a mapping declare every parameter `text[]`).
pub(super) fn text_params<'a, I>(columns: impl Iterator<Item = I>) -> Vec<EncodedArray>
where
    I: Iterator<Item = Option<&'a [u8]>> + Clone,
{
    columns.map(params::encode_text).collect()
}

impl Conn {
    pub(super) async fn statement(
        &mut self,
        text: String,
    ) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.get(&text) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(&text).await?;
        self.statements.insert(text, s.clone());
        Ok(s)
    }

    /// Writes a folded table with the fold's statements, each checked to affect exactly the
    /// rows it names (see [`crate::apply`]).
    pub(super) async fn write_table(
        &mut self,
        table: &MappedTable,
        tb: &TableBatch,
        arena: &Arena,
    ) -> Result<(), WriteError> {
        if tb.ordered {
            for c in &tb.original {
                self.apply_one_same(table, c).await?;
            }
            return Ok(());
        }
        let sql = &table.sql;
        let key_cols = &sql.key;
        if !tb.deletes.is_empty() {
            let rows = in_key_order(sql, arena, (0..tb.delete_count()).collect(), |n| {
                tb.delete(n)[0]
            });
            let params: Vec<(&str, EncodedArray)> = (0..key_cols.len())
                .map(|j| {
                    param(
                        sql,
                        key_cols[j],
                        rows.iter().map(|&n| arena.get(tb.delete(n)[j])),
                    )
                })
                .collect();
            let found = self.write(sql.delete(&types(&params)), &params).await?;
            expect_rows(&table.name, "set-based DELETE", rows.len(), found)?;
        }
        // Partial updates, grouped by which columns they know.
        let mut groups: HashMap<Vec<usize>, Vec<usize>> = HashMap::new();
        let mut set: Vec<usize> = Vec::new();
        for (n, (old_key, row)) in tb.updates().enumerate() {
            // Key columns are set only when the row moves: rewriting an unchanged key would
            // only cost index work.
            let moved = key_cols
                .iter()
                .zip(old_key)
                .any(|(&c, &k)| !(row[c].is_known() && arena.same(row[c], k)));
            set.clear();
            set.extend(
                (0..row.len()).filter(|&i| row[i].is_known() && (moved || !key_cols.contains(&i))),
            );
            match groups.get_mut(set.as_slice()) {
                Some(members) => members.push(n),
                None => {
                    groups.insert(set.clone(), vec![n]);
                }
            }
        }
        for (set, members) in groups {
            // An empty `set` (nothing but an unchanged key) still runs: the row must be there.
            let members = in_key_order(sql, arena, members, |n| tb.update_key(n)[0]);
            let mut params: Vec<(&str, EncodedArray)> = Vec::new();
            for (j, &c) in key_cols.iter().enumerate() {
                let values = members.iter().map(|&n| arena.get(tb.update_key(n)[j]));
                params.push(param(sql, c, values));
            }
            for &c in &set {
                let values = members.iter().map(|&n| arena.get(tb.update_row(n)[c]));
                params.push(param(sql, c, values));
            }
            let found = self
                .write(sql.update(&set, &types(&params)), &params)
                .await?;
            expect_rows(&table.name, "set-based UPDATE", members.len(), found)?;
        }
        // Rows whose key is free at this point: a plain INSERT (no speculative insertion).
        if tb.upsert_count() > 0 {
            let rows = in_key_order(sql, arena, (0..tb.upsert_count()).collect(), |n| {
                tb.upsert(n)[key_cols[0]]
            });
            let params: Vec<(&str, EncodedArray)> = (0..sql.columns.len())
                .map(|c| param(sql, c, rows.iter().map(|&n| arena.get(tb.upsert(n)[c]))))
                .collect();
            let found = self.write(sql.insert(&types(&params)), &params).await?;
            expect_rows(&table.name, "set-based INSERT", rows.len(), found)?;
        }
        Ok(())
    }

    /// Prepares (once per text) and executes a set-based statement.
    pub(super) async fn write(
        &mut self,
        text: String,
        params: &[(&str, EncodedArray)],
    ) -> Result<u64, tokio_postgres::Error> {
        let stmt = self.statement(text).await?;
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|(_, a)| a as &(dyn ToSql + Sync))
            .collect();
        self.client.execute(&stmt, &refs).await
    }

    /// Executes with every parameter given as an encoded array.
    pub(super) async fn execute_arrays(
        &self,
        stmt: &tokio_postgres::Statement,
        params: &[EncodedArray],
    ) -> Result<u64, tokio_postgres::Error> {
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        self.client.execute(stmt, &refs).await
    }

    /// One change, in source order (strict mode, and tables that cannot be folded).
    pub(super) async fn apply_one(
        &mut self,
        dest: &Dest,
        change: &Change,
        lsn: Lsn,
    ) -> Result<(), WriteError> {
        match dest {
            Dest::Same(t) => self.apply_one_same(t, change).await,
            Dest::Mapped(p) => self.apply_one_mapped(p, change, lsn).await,
        }
    }

    /// One change, one statement, onto the same-named table; the statement must affect
    /// exactly one row.
    pub(super) async fn apply_one_same(
        &mut self,
        table: &MappedTable,
        change: &Change,
    ) -> Result<(), WriteError> {
        let key_of = |row: &[Value]| -> Vec<Option<String>> {
            table
                .sql
                .key
                .iter()
                .map(|&k| text(&row[k]).map(str::to_owned))
                .collect()
        };
        match change {
            Change::Insert { new } => {
                let stmt = self.statement(table.sql.insert_one()).await?;
                let vals: Vec<Option<&str>> = new.iter().map(text).collect();
                let params: Vec<&(dyn ToSql + Sync)> =
                    vals.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                let found = self.client.execute(&stmt, &params).await?;
                expect_rows(&table.name, "INSERT", 1, found)?;
            }
            Change::Delete { old } => {
                let (stmt, vals): (_, Vec<Option<String>>) = if table.full_row_identity {
                    (
                        self.statement(table.sql.delete_one_full_row()).await?,
                        old.iter().map(|v| text(v).map(str::to_owned)).collect(),
                    )
                } else {
                    (self.statement(table.sql.delete_one()).await?, key_of(old))
                };
                let params: Vec<&(dyn ToSql + Sync)> =
                    vals.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                let found = self.client.execute(&stmt, &params).await?;
                expect_rows(&table.name, "DELETE", 1, found)?;
            }
            Change::Update { old, new } => {
                let set: Vec<usize> = new
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| matches!(v, ColumnValue::Known(_)))
                    .map(|(i, _)| i)
                    .collect();
                let mut vals: Vec<Option<String>> = if table.full_row_identity {
                    old.as_ref()
                        .map(|o| o.iter().map(|v| text(v).map(str::to_owned)).collect())
                        .unwrap_or_default()
                } else {
                    match old {
                        Some(o) => key_of(o),
                        None => table
                            .sql
                            .key
                            .iter()
                            .map(|&k| match &new[k] {
                                ColumnValue::Known(v) => text(v).map(str::to_owned),
                                ColumnValue::UnchangedToast => None,
                            })
                            .collect(),
                    }
                };
                vals.extend(set.iter().map(|&c| match &new[c] {
                    ColumnValue::Known(v) => text(v).map(str::to_owned),
                    ColumnValue::UnchangedToast => None,
                }));
                let stmt = if table.full_row_identity {
                    self.statement(table.sql.update_one_full_row(&set)).await?
                } else {
                    self.statement(table.sql.update_one(&set)).await?
                };
                let params: Vec<&(dyn ToSql + Sync)> =
                    vals.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                let found = self.client.execute(&stmt, &params).await?;
                expect_rows(&table.name, "UPDATE", 1, found)?;
            }
        }
        Ok(())
    }
}

/// `rows` (indices into a batch list) in the order a statement should visit them: by key
/// (`key(n)`: row `n`'s key value) when the key is one integer column, so the target walks its index and heap pages in order
/// instead of at random; as folded otherwise. Any order is correct (the fold's contract).
fn in_key_order(
    sql: &crate::apply::sql::TableSql,
    arena: &Arena,
    mut rows: Vec<usize>,
    key: impl Fn(usize) -> Val,
) -> Vec<usize> {
    let [k] = sql.key[..] else {
        return rows;
    };
    if !matches!(
        Wire::for_type(&sql.columns[k].type_sql),
        Wire::Int8 | Wire::Int4 | Wire::Int2
    ) {
        return rows;
    }
    let number = |n: usize| {
        arena
            .get(key(n))
            .and_then(params::parse_int)
            .unwrap_or(i64::MAX)
    };
    let mut keyed: Vec<(i64, usize)> = rows.iter().map(|&n| (number(n), n)).collect();
    keyed.sort_unstable();
    rows.clear();
    rows.extend(keyed.into_iter().map(|(_, n)| n));
    rows
}

/// The array types the statement declares, one per parameter.
pub(super) fn types(params: &[(&'static str, EncodedArray)]) -> Vec<&'static str> {
    params.iter().map(|(t, _)| *t).collect()
}

/// A value as the text parameter it travels as. Checked to be UTF-8 when it was decoded.
pub(super) fn text(v: &Value) -> Option<&str> {
    v.as_ref()
        .map(|b| std::str::from_utf8(b).expect("checked in intern_row"))
}

fn describe_change(dest: &Dest, change: &Change) -> String {
    let (names, key_cols): (Vec<&str>, &[usize]) = match dest {
        Dest::Same(t) => (
            t.sql.columns.iter().map(|c| c.name.as_str()).collect(),
            &t.sql.key,
        ),
        Dest::Mapped(p) => (
            p.source.columns.iter().map(|c| c.name.as_str()).collect(),
            &p.key,
        ),
    };
    // A table without a key is described by its whole row.
    let all: Vec<usize> = (0..names.len()).collect();
    let (what, key_cols) = if key_cols.is_empty() {
        ("row", &all[..])
    } else {
        ("key", key_cols)
    };
    let key = |row: &[Value]| {
        key_cols
            .iter()
            .map(|&k| format!("{}={}", names[k], text(&row[k]).unwrap_or("NULL")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let new_key = |new: &[ColumnValue]| {
        key_cols
            .iter()
            .map(|&k| match &new[k] {
                ColumnValue::Known(v) => format!("{}={}", names[k], text(v).unwrap_or("NULL")),
                ColumnValue::UnchangedToast => format!("{}=(unchanged)", names[k]),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match change {
        Change::Insert { new } => format!("INSERT of {what} ({})", key(new)),
        Change::Delete { old } => format!("DELETE of {what} ({})", key(old)),
        Change::Update { old: Some(o), .. } => format!("UPDATE of {what} ({})", key(o)),
        Change::Update { old: None, new } => format!("UPDATE of {what} ({})", new_key(new)),
    }
}
