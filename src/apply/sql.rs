//! The set-based statements replay sends to the target, as text (no I/O).
//!
//! Every statement takes one array parameter per column and turns the arrays back into rows
//! with `unnest`; each value is cast to the target column's type. Most columns travel as
//! `text[]`, parsed by PostgreSQL's own input function (the inverse of the text output
//! pgoutput sends); integers, booleans and timestamps may travel as typed binary arrays
//! ([`super::wire`]), the cast then a no-op. So a batch of any size is a fixed handful of
//! statements per table.

use crate::sql::quote_ident;

/// A target column: its quoted-ready name and its type as `format_type` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetColumn {
    pub name: String,
    pub type_sql: String,
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

    fn key_match(&self, first_param: usize) -> String {
        self.key
            .iter()
            .enumerate()
            .map(|(j, &c)| format!("t.{} = {}", self.col(c), self.cast("u", first_param + j, c)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `DELETE … USING unnest(keys)`: parameters are the key columns, in `key` order, as
    /// arrays of the types in `arrays` (`text[]` unless [`super::wire`] says otherwise).
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
            "INSERT INTO {} AS t ({cols}) SELECT {vals} FROM {}",
            self.qualified,
            Self::unnest(arrays)
        )
    }

    /// `INSERT … SELECT FROM unnest(…) ON CONFLICT (key) DO UPDATE`: parameters are all columns
    /// in order. Rows whose key exists are overwritten with the new values.
    pub fn upsert(&self, arrays: &[&str]) -> String {
        let n = self.columns.len();
        debug_assert_eq!(arrays.len(), n);
        let cols = (0..n).map(|i| self.col(i)).collect::<Vec<_>>().join(", ");
        let vals = (0..n)
            .map(|i| self.cast("u", i + 1, i))
            .collect::<Vec<_>>()
            .join(", ");
        let key = self
            .key
            .iter()
            .map(|&i| self.col(i))
            .collect::<Vec<_>>()
            .join(", ");
        let non_key: Vec<String> = (0..n)
            .filter(|i| !self.key.contains(i))
            .map(|i| format!("{c} = EXCLUDED.{c}", c = self.col(i)))
            .collect();
        let action = if non_key.is_empty() {
            "NOTHING".to_owned()
        } else {
            format!("UPDATE SET {}", non_key.join(", "))
        };
        format!(
            "INSERT INTO {} AS t ({cols}) SELECT {vals} FROM {} ON CONFLICT ({key}) DO {action}",
            self.qualified,
            Self::unnest(arrays)
        )
    }

    /// `UPDATE … FROM unnest(…)` setting only the columns in `set` (the others keep the
    /// target's value, as an unchanged TOAST value must). Parameters: the key columns that
    /// identify the row (old key), then the `set` columns in order.
    pub fn update(&self, set: &[usize], arrays: &[&str]) -> String {
        let k = self.key.len();
        debug_assert_eq!(arrays.len(), k + set.len());
        let assignments = set
            .iter()
            .enumerate()
            .map(|(j, &c)| format!("{} = {}", self.col(c), self.cast("u", k + j + 1, c)))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "UPDATE {} AS t SET {assignments} FROM {} WHERE {}",
            self.qualified,
            Self::unnest(arrays),
            self.key_match(1)
        )
    }

    /// `$n::text::type`: parameter `n` cast to column `col`'s type (row-at-a-time statements).
    fn param(&self, n: usize, col: usize) -> String {
        format!("${n}::text::{}", self.columns[col].type_sql)
    }

    /// `"c" = $n::text::type, …` for the `set` columns, parameters numbered from `first`.
    fn assign_params(&self, set: &[usize], first: usize) -> String {
        set.iter()
            .enumerate()
            .map(|(j, &c)| format!("{} = {}", self.col(c), self.param(first + j, c)))
            .collect::<Vec<_>>()
            .join(", ")
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
    fn one_full_row(&self) -> String {
        let matches = (0..self.columns.len())
            .map(|i| {
                format!(
                    "{} IS NOT DISTINCT FROM {}",
                    self.col(i),
                    self.param(i + 1, i)
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        format!(
            "WHERE ctid = (SELECT ctid FROM {} WHERE {matches} LIMIT 1)",
            self.qualified
        )
    }

    /// `INSERT` of one row (ordered apply). Parameters: all columns.
    pub fn insert_one(&self) -> String {
        let n = self.columns.len();
        let cols = (0..n).map(|i| self.col(i)).collect::<Vec<_>>().join(", ");
        let vals = (0..n)
            .map(|i| self.param(i + 1, i))
            .collect::<Vec<_>>()
            .join(", ");
        format!("INSERT INTO {} ({cols}) VALUES ({vals})", self.qualified)
    }

    /// `UPDATE` of one row identified by its old key (ordered apply). Parameters: the key
    /// columns, then the `set` columns.
    pub fn update_one(&self, set: &[usize]) -> String {
        let assignments = self.assign_params(set, self.key.len() + 1);
        format!(
            "UPDATE {} SET {assignments} WHERE {}",
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
        let assignments = self.assign_params(set, self.columns.len() + 1);
        format!(
            "UPDATE {} SET {assignments} {}",
            self.qualified,
            self.one_full_row()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts() -> TableSql {
        let col = |n: &str, t: &str| TargetColumn {
            name: n.into(),
            type_sql: t.into(),
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
            t.upsert(&["text[]"; 3]),
            "INSERT INTO \"public\".\"accounts\" AS t (\"id\", \"owner\", \"Balance\") SELECT u.p1::bigint, u.p2::text, \
             u.p3::numeric(12,2) FROM unnest($1::text[], $2::text[], $3::text[]) AS u(p1, p2, p3) ON CONFLICT (\"id\") \
             DO UPDATE SET \"owner\" = EXCLUDED.\"owner\", \"Balance\" = EXCLUDED.\"Balance\""
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
    fn all_key_table_upsert_does_nothing_on_conflict() {
        let mut t = accounts();
        t.columns.truncate(1);
        assert!(
            t.upsert(&["text[]"])
                .ends_with("ON CONFLICT (\"id\") DO NOTHING")
        );
    }
}
