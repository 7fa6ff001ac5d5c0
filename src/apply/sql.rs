//! The statements replay sends to the target, as text (no I/O): set-based writes, the
//! one-row writes of strict order, and `TRUNCATE`.
//!
//! Every statement takes one array parameter per column and turns the arrays back into rows
//! with `unnest`; each value is cast to the target column's type. Most columns travel as
//! `text[]`, parsed by PostgreSQL's own input function (the inverse of the text output
//! pgoutput sends); integers, booleans and timestamps may travel as typed binary arrays
//! ([`super::params`]), the cast then a no-op. So a batch of any size is a fixed handful of
//! statements per table.

use crate::sql::quote_ident;

/// A target column: its quoted-ready name and its type as `format_type` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetColumn {
    pub name: String,
    pub type_sql: String,
    /// `GENERATED ALWAYS AS IDENTITY`: inserts say `OVERRIDING SYSTEM VALUE`; an update cannot
    /// set it, so its new value is *checked* instead (the row must already hold it), and a
    /// changed value makes the statement miss the row, which the affected-row guard reports.
    pub always_identity: bool,
    /// The type has no equality operator (`json`, `point`, …): whole-row matching compares
    /// the column's text form, both sides rendered by the target.
    pub compare_as_text: bool,
}

/// What the statements need to know about a target table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSql {
    /// `"schema"."table"`, already quoted.
    pub qualified: String,
    pub columns: Vec<TargetColumn>,
    /// Indices into `columns` of the primary key (or replica identity) columns.
    pub key: Vec<usize>,
}

impl TableSql {
    fn col(&self, i: usize) -> String {
        quote_ident(&self.columns[i].name)
    }

    fn cast(&self, alias: &str, param: usize, col: usize) -> String {
        format!("{alias}.p{param}::{}", self.columns[col].type_sql)
    }

    /// `unnest($1::text[], $2::int8[], …) AS u(p1, p2, …)`: one parameter per array type.
    fn unnest(arrays: &[&str]) -> String {
        let n = arrays.len();
        let arrays = arrays
            .iter()
            .enumerate()
            .map(|(i, t)| format!("${}::{t}", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        let names = (1..=n)
            .map(|i| format!("p{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!("unnest({arrays}) AS u({names})")
    }

    /// `OVERRIDING SYSTEM VALUE ` when the table has a `GENERATED ALWAYS AS IDENTITY` column.
    fn overriding(&self) -> &'static str {
        if self.columns.iter().any(|c| c.always_identity) {
            "OVERRIDING SYSTEM VALUE "
        } else {
            ""
        }
    }

    /// Splits the written columns `set` (with their values at `value(j)` for the `j`-th) into
    /// assignments and, for `GENERATED ALWAYS AS IDENTITY` columns, checks (`AND t.c = …`).
    /// With no assignment left, the first key column is set to itself, so the statement still
    /// finds (and counts) its row.
    fn assign_and_check(
        &self,
        set: &[usize],
        target: &str,
        value: impl Fn(usize, usize) -> String,
    ) -> (String, String) {
        let mut assign = Vec::new();
        let mut check = String::new();
        for (j, &c) in set.iter().enumerate() {
            if self.columns[c].always_identity {
                check.push_str(&format!(" AND {target}{} = {}", self.col(c), value(j, c)));
            } else {
                assign.push(format!("{} = {}", self.col(c), value(j, c)));
            }
        }
        if assign.is_empty() {
            let k = self.col(self.key.first().copied().unwrap_or(0));
            assign.push(format!("{k} = {target}{k}"));
        }
        (assign.join(", "), check)
    }

    fn key_match(&self, first_param: usize) -> String {
        self.key
            .iter()
            .enumerate()
            .map(|(j, &c)| format!("t.{} = {}", self.col(c), self.cast("u", first_param + j, c)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `DELETE … USING unnest(keys)`: parameters are the key columns, in `key` order, as
    /// arrays of the types in `arrays` (`text[]` unless [`super::params`] says otherwise).
    pub fn delete(&self, arrays: &[&str]) -> String {
        debug_assert_eq!(arrays.len(), self.key.len());
        format!(
            "DELETE FROM {} AS t USING {} WHERE {}",
            self.qualified,
            Self::unnest(arrays),
            self.key_match(1)
        )
    }

    /// `INSERT … SELECT FROM unnest(…)`: parameters are all columns in order. For keys known
    /// to be free (a conflict is an error).
    pub fn insert(&self, arrays: &[&str]) -> String {
        let n = self.columns.len();
        debug_assert_eq!(arrays.len(), n);
        let cols = (0..n).map(|i| self.col(i)).collect::<Vec<_>>().join(", ");
        let vals = (0..n)
            .map(|i| self.cast("u", i + 1, i))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "INSERT INTO {} AS t ({cols}) {}SELECT {vals} FROM {}",
            self.qualified,
            self.overriding(),
            Self::unnest(arrays)
        )
    }

    /// `UPDATE … FROM unnest(…)` setting only the columns in `set` (the others keep the
    /// target's value, as an unchanged TOAST value must). Parameters: the key columns that
    /// identify the row (old key), then the `set` columns in order. A `GENERATED ALWAYS AS
    /// IDENTITY` column in `set` is checked, not set (see [`TargetColumn::always_identity`]).
    /// Each parameter row updates at most one row: the count is the rows found.
    pub fn update(&self, set: &[usize], arrays: &[&str]) -> String {
        let k = self.key.len();
        debug_assert_eq!(arrays.len(), k + set.len());
        let (assignments, check) =
            self.assign_and_check(set, "t.", |j, c| self.cast("u", k + j + 1, c));
        format!(
            "UPDATE {} AS t SET {assignments} FROM {} WHERE {}{check}",
            self.qualified,
            Self::unnest(arrays),
            self.key_match(1)
        )
    }

    /// `$n::text::type`: parameter `n` cast to column `col`'s type (row-at-a-time statements).
    fn param(&self, n: usize, col: usize) -> String {
        format!("${n}::text::{}", self.columns[col].type_sql)
    }

    /// The key columns equal to parameters `$1…`.
    fn key_where_params(&self) -> String {
        self.key
            .iter()
            .enumerate()
            .map(|(j, &c)| format!("{} = {}", self.col(c), self.param(j + 1, c)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `WHERE ctid = (… LIMIT 1)` picking one row equal to parameters `$1…$n` (all columns):
    /// for tables without a key, where duplicates are possible and exactly one must change.
    /// Columns without an equality operator compare their text forms, both rendered by the
    /// target (the parameter through the column's type first).
    fn one_full_row(&self) -> String {
        let matches = (0..self.columns.len())
            .map(|i| {
                if self.columns[i].compare_as_text {
                    format!(
                        "{}::text IS NOT DISTINCT FROM ({})::text",
                        self.col(i),
                        self.param(i + 1, i)
                    )
                } else {
                    format!(
                        "{} IS NOT DISTINCT FROM {}",
                        self.col(i),
                        self.param(i + 1, i)
                    )
                }
            })
            .chain(self.columns.is_empty().then(|| "true".to_owned()))
            .collect::<Vec<_>>()
            .join(" AND ");
        format!(
            "WHERE ctid = (SELECT ctid FROM {} WHERE {matches} LIMIT 1)",
            self.qualified
        )
    }

    /// `INSERT` of one row (ordered apply). Parameters: all columns. A table without columns
    /// takes `DEFAULT VALUES`.
    pub fn insert_one(&self) -> String {
        let n = self.columns.len();
        if n == 0 {
            return format!("INSERT INTO {} DEFAULT VALUES", self.qualified);
        }
        let cols = (0..n).map(|i| self.col(i)).collect::<Vec<_>>().join(", ");
        let vals = (0..n)
            .map(|i| self.param(i + 1, i))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "INSERT INTO {} ({cols}) {}VALUES ({vals})",
            self.qualified,
            self.overriding()
        )
    }

    /// `UPDATE` of one row identified by its old key (ordered apply). Parameters: the key
    /// columns, then the `set` columns (identity columns checked, as in [`update`](Self::update)).
    pub fn update_one(&self, set: &[usize]) -> String {
        let first = self.key.len() + 1;
        let (assignments, check) = self.assign_and_check(set, "", |j, c| self.param(first + j, c));
        format!(
            "UPDATE {} SET {assignments} WHERE {}{check}",
            self.qualified,
            self.key_where_params()
        )
    }

    /// `DELETE` of one row by key (ordered apply). Parameters: the key columns.
    pub fn delete_one(&self) -> String {
        format!(
            "DELETE FROM {} WHERE {}",
            self.qualified,
            self.key_where_params()
        )
    }

    /// Deletes one row equal to a whole old row (REPLICA IDENTITY FULL, no key). Parameters:
    /// all columns.
    pub fn delete_one_full_row(&self) -> String {
        format!("DELETE FROM {} {}", self.qualified, self.one_full_row())
    }

    /// Updates one row equal to a whole old row (REPLICA IDENTITY FULL, no key). Parameters:
    /// all columns of the old row, then the `set` columns.
    pub fn update_one_full_row(&self, set: &[usize]) -> String {
        let first = self.columns.len() + 1;
        let (assignments, check) = self.assign_and_check(set, "", |j, c| self.param(first + j, c));
        format!(
            "UPDATE {} SET {assignments} {}{check}",
            self.qualified,
            self.one_full_row()
        )
    }
}

/// `TRUNCATE` of target tables (already quoted).
pub fn truncate_sql(tables: &[String], cascade: bool, restart_identity: bool) -> String {
    format!(
        "TRUNCATE {}{}{}",
        tables.join(", "),
        if restart_identity {
            " RESTART IDENTITY"
        } else {
            ""
        },
        if cascade { " CASCADE" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts() -> TableSql {
        let col = |n: &str, t: &str| TargetColumn {
            name: n.into(),
            type_sql: t.into(),
            always_identity: false,
            compare_as_text: false,
        };
        TableSql {
            qualified: "\"public\".\"accounts\"".into(),
            columns: vec![
                col("id", "bigint"),
                col("owner", "text"),
                col("Balance", "numeric(12,2)"),
            ],
            key: vec![0],
        }
    }

    #[test]
    fn statements_are_set_based_and_quoted() {
        let t = accounts();
        assert_eq!(
            t.delete(&["text[]"]),
            "DELETE FROM \"public\".\"accounts\" AS t USING unnest($1::text[]) AS u(p1) WHERE t.\"id\" = u.p1::bigint"
        );
        assert_eq!(
            t.update(&[0, 2], &["text[]"; 3]),
            "UPDATE \"public\".\"accounts\" AS t SET \"id\" = u.p2::bigint, \"Balance\" = u.p3::numeric(12,2) FROM \
             unnest($1::text[], $2::text[], $3::text[]) AS u(p1, p2, p3) WHERE t.\"id\" = u.p1::bigint"
        );
        assert_eq!(
            t.delete_one(),
            "DELETE FROM \"public\".\"accounts\" WHERE \"id\" = $1::text::bigint"
        );
    }

    #[test]
    fn typed_arrays_are_declared_per_parameter() {
        let t = accounts();
        assert_eq!(
            t.delete(&["int8[]"]),
            "DELETE FROM \"public\".\"accounts\" AS t USING unnest($1::int8[]) AS u(p1) WHERE t.\"id\" = u.p1::bigint"
        );
        assert!(
            t.insert(&["int8[]", "text[]", "text[]"])
                .contains("FROM unnest($1::int8[], $2::text[], $3::text[]) AS u(p1, p2, p3)")
        );
    }

    #[test]
    fn identity_columns_are_checked_not_set_and_inserts_override() {
        let mut t = accounts();
        t.columns[1].always_identity = true;
        assert!(
            t.insert(&["text[]"; 3])
                .contains("(\"id\", \"owner\", \"Balance\") OVERRIDING SYSTEM VALUE SELECT")
        );
        assert_eq!(
            t.update(&[1, 2], &["text[]"; 3]),
            "UPDATE \"public\".\"accounts\" AS t SET \"Balance\" = u.p3::numeric(12,2) FROM \
             unnest($1::text[], $2::text[], $3::text[]) AS u(p1, p2, p3) WHERE t.\"id\" = u.p1::bigint \
             AND t.\"owner\" = u.p2::text"
        );
        assert_eq!(
            t.update_one(&[1]),
            "UPDATE \"public\".\"accounts\" SET \"id\" = \"id\" WHERE \"id\" = $1::text::bigint \
             AND \"owner\" = $2::text::text"
        );
    }

    #[test]
    fn columns_without_equality_match_by_text_and_empty_tables_work() {
        let mut t = accounts();
        t.key.clear();
        t.columns[1].compare_as_text = true;
        let d = t.delete_one_full_row();
        assert!(
            d.contains("\"owner\"::text IS NOT DISTINCT FROM ($2::text::text)::text"),
            "{d}"
        );
        assert!(
            d.contains("\"id\" IS NOT DISTINCT FROM $1::text::bigint"),
            "{d}"
        );
        t.columns.clear();
        assert_eq!(
            t.insert_one(),
            "INSERT INTO \"public\".\"accounts\" DEFAULT VALUES"
        );
        assert_eq!(
            t.delete_one_full_row(),
            "DELETE FROM \"public\".\"accounts\" WHERE ctid = (SELECT ctid FROM \"public\".\"accounts\" WHERE true LIMIT 1)"
        );
    }
}
