//! The set-based statements that write source rows through a [`TargetPlan`] (text, no I/O).
//!
//! Every statement receives the source values as one `text[]` parameter per source column,
//! turns them back into typed source rows with `unnest` (alias `s`, source column names), and
//! evaluates the mapping's expressions over those rows inside the statement: PostgreSQL runs
//! the transform, per batch, not per row. Expressions are evaluated in a subquery whose only
//! table is `s`, so a bare column name always means the *source* column, even when the target
//! has a column of the same name.

use super::plan::{PlanExpr, SourcePlan, TargetPlan};
use crate::sql::quote_ident;

/// Prefix of helper names in generated statements (kept distinct from user columns).
const P: &str = "walshift_";

/// `(SELECT u.p1::type AS "col", … FROM unnest($1::text[], …) AS u(p1, …)) AS s` over the
/// given source columns, parameters numbered from `first`. `old_key` adds the old key values
/// (parameters before the columns) as `walshift_old_N`.
fn source_rows(plan: &SourcePlan, cols: &[usize], first: usize, old_key: bool) -> String {
    let mut exprs = Vec::new();
    let mut n = first;
    if old_key {
        for (j, &k) in plan.key.iter().enumerate() {
            exprs.push(format!(
                "u.p{n}::{} AS {P}old_{j}",
                plan.source.columns[k].type_sql
            ));
            n += 1;
        }
    }
    for &c in cols {
        let col = &plan.source.columns[c];
        exprs.push(format!(
            "u.p{n}::{} AS {}",
            col.type_sql,
            quote_ident(&col.name)
        ));
        n += 1;
    }
    let arrays = (first..n)
        .map(|i| format!("${i}::text[]"))
        .collect::<Vec<_>>()
        .join(", ");
    let names = (first..n)
        .map(|i| format!("p{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "(SELECT {} FROM unnest({arrays}) AS u({names})) AS s",
        exprs.join(", ")
    )
}

fn cast(e: &PlanExpr, type_sql: &str) -> String {
    format!("({})::{type_sql}", e.sql)
}

/// `coalesce((filter), false)`: a NULL predicate does not pass, as in a WHERE clause.
fn pass(f: &PlanExpr) -> String {
    format!("coalesce(({}), false) AS {P}pass", f.sql)
}

/// The target key computed from the old key values (`walshift_old_N`), in a scope where the
/// source key columns carry their names.
fn key_from_old(plan: &SourcePlan, t: &TargetPlan, k: usize) -> String {
    let col = &t.columns[t.key[k]];
    let renames = plan
        .key
        .iter()
        .enumerate()
        .map(|(j, &c)| {
            format!(
                "s.{P}old_{j} AS {}",
                quote_ident(&plan.source.columns[c].name)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "(SELECT {} FROM (SELECT {renames}) AS o)",
        cast(&col.expr, &col.type_sql)
    )
}

fn key_match(t: &TargetPlan, alias: &str) -> String {
    t.key
        .iter()
        .enumerate()
        .map(|(j, &c)| format!("t.{} = {alias}.{P}k{j}", quote_ident(&t.columns[c].name)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

fn key_outputs(t: &TargetPlan) -> String {
    t.key
        .iter()
        .enumerate()
        .map(|(j, &c)| {
            let col = &t.columns[c];
            format!("{} AS {P}k{j}", cast(&col.expr, &col.type_sql))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `DELETE` of the target rows whose keys derive from the given source keys. Parameters: the
/// source key columns ([`SourcePlan::key`] order).
pub fn delete(plan: &SourcePlan, t: &TargetPlan) -> String {
    format!(
        "DELETE FROM {} AS t USING (SELECT {} FROM {}) AS v WHERE {}",
        t.target.quoted(),
        key_outputs(t),
        source_rows(plan, &plan.key, 1, false),
        key_match(t, "v")
    )
}

fn all_columns(plan: &SourcePlan) -> Vec<usize> {
    (0..plan.source.columns.len()).collect()
}

/// `INSERT INTO … (columns) OVERRIDING SYSTEM VALUE`: a `GENERATED ALWAYS AS IDENTITY` column
/// takes the source's value (the clause is accepted, and without effect, on other tables).
fn insert_head(t: &TargetPlan) -> String {
    format!(
        "INSERT INTO {} AS t ({}) OVERRIDING SYSTEM VALUE",
        t.target.quoted(),
        t.columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `ON CONFLICT (key) DO UPDATE SET …`: every written column but the key and the `GENERATED
/// ALWAYS AS IDENTITY` ones (which cannot be updated) takes the new value; identity columns
/// must already hold it (`WHERE t.c = EXCLUDED.c`), or the row is left alone and not counted.
/// With nothing else to set, a key column is set to itself (the conflict found it equal), so
/// an existing row still counts.
fn on_conflict(t: &TargetPlan) -> String {
    let q = |i: usize| quote_ident(&t.columns[i].name);
    let key = t.key.iter().map(|&c| q(c)).collect::<Vec<_>>().join(", ");
    let assignable = |i: &usize| !t.columns[*i].always_identity;
    let mut set: Vec<usize> = (0..t.columns.len())
        .filter(|i| !t.key.contains(i))
        .filter(assignable)
        .collect();
    if set.is_empty() {
        set.extend(t.key.iter().copied().find(assignable));
    }
    if set.is_empty() {
        return format!(" ON CONFLICT ({key}) DO NOTHING");
    }
    let set = set
        .iter()
        .map(|&i| format!("{c} = EXCLUDED.{c}", c = q(i)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        " ON CONFLICT ({key}) DO UPDATE SET {set}{}",
        where_clause(&identity_checks(t, "EXCLUDED", q))
    )
}

/// `t.c = <alias>.<name(c)>` for each written non-key `GENERATED ALWAYS AS IDENTITY` column.
fn identity_checks(t: &TargetPlan, alias: &str, name: impl Fn(usize) -> String) -> Vec<String> {
    (0..t.columns.len())
        .filter(|i| t.columns[*i].always_identity && !t.key.contains(i))
        .map(|i| {
            format!(
                "t.{} = {alias}.{}",
                quote_ident(&t.columns[i].name),
                name(i)
            )
        })
        .collect()
}

fn where_clause(conditions: &[String]) -> String {
    if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    }
}

/// Inserts full source rows (all source columns as parameters); for keys known to be free.
/// With a filter, rows that do not pass are not written. The statement's row count is the
/// rows inserted.
pub fn insert(plan: &SourcePlan, t: &TargetPlan) -> String {
    let rows = source_rows(plan, &all_columns(plan), 1, false);
    match &t.filter {
        None => format!(
            "{} SELECT {} FROM {rows}",
            insert_head(t),
            t.columns
                .iter()
                .map(|c| cast(&c.expr, &c.type_sql))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(_) => format!(
            "WITH v AS ({}) {} SELECT {} FROM v WHERE v.{P}pass",
            values_of(t, &rows),
            insert_head(t),
            value_columns(t)
        ),
    }
}

/// `SELECT <every written column as walshift_cI>, <walshift_pass> FROM <rows>`.
fn values_of(t: &TargetPlan, rows: &str) -> String {
    let pass_sql = t
        .filter
        .as_ref()
        .map(pass)
        .unwrap_or_else(|| format!("true AS {P}pass"));
    let outputs = t
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} AS {P}c{i}", cast(&c.expr, &c.type_sql)))
        .chain(std::iter::once(pass_sql))
        .collect::<Vec<_>>()
        .join(", ");
    format!("SELECT {outputs} FROM {rows}")
}

fn value_columns(t: &TargetPlan) -> String {
    (0..t.columns.len())
        .map(|i| format!("v.{P}c{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes full source rows whether or not their target key exists (all source columns as
/// parameters): a row whose key exists is overwritten in the mapped columns (unmapped target
/// columns keep their value). With a filter, a row that does not pass is not written and its
/// target key is deleted (a row that stops passing leaves the target). Returns one row of two
/// counts: the rows that had to be written (those passing the filter) and the rows written;
/// they differ only when an existing row was not overwritten (a `GENERATED ALWAYS AS
/// IDENTITY` column whose value would change), which the caller reports.
pub fn upsert(plan: &SourcePlan, t: &TargetPlan) -> String {
    let rows = source_rows(plan, &all_columns(plan), 1, false);
    let vcol = |i: usize| format!("{P}c{i}");
    let key_match = t
        .key
        .iter()
        .map(|&c| format!("t.{} = v.{}", quote_ident(&t.columns[c].name), vcol(c)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let gone = if t.filter.is_some() {
        format!(
            ", {P}gone AS (DELETE FROM {} AS t USING v WHERE NOT v.{P}pass AND {key_match})",
            t.target.quoted()
        )
    } else {
        String::new()
    };
    let conflict = on_conflict(t);
    // DO NOTHING (every written column is an ALWAYS identity column): an existing row
    // holding the same values counts as written.
    let kept = if conflict.ends_with("DO NOTHING") {
        let checks = identity_checks(t, "v", vcol)
            .into_iter()
            .map(|c| format!(" AND {c}"))
            .collect::<String>();
        format!(
            " + (SELECT count(*) FROM {} AS t, v WHERE v.{P}pass AND {key_match}{checks})",
            t.target.quoted()
        )
    } else {
        String::new()
    };
    format!(
        "WITH v AS ({}){gone}, {P}ins AS ({} SELECT {} FROM v WHERE v.{P}pass{conflict} RETURNING 1) \
         SELECT (SELECT count(*) FROM v WHERE v.{P}pass), (SELECT count(*) FROM {P}ins){kept}",
        values_of(t, &rows),
        insert_head(t),
        value_columns(t)
    )
}

/// Which target columns an update sets when only the `known` source columns are available.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateShape {
    /// Indices into the target plan's columns.
    pub set: Vec<usize>,
    /// The filter is evaluated (rows that stop passing are deleted). False when the table has
    /// none, or when it reads only values the update left unchanged: then whether the row
    /// passes cannot have changed.
    pub filter: bool,
}

/// A target column whose expression needs a source value the change did not carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingValue {
    pub target_column: String,
    pub source_column: String,
}

/// What an update can compute from the `known` source columns. An unknown value is one the
/// update left unchanged (TOAST), so an expression reading only unknown columns — a plain copy
/// of one, say — keeps its target value; one reading known *and* unknown columns cannot be
/// computed, and neither can a filter that does. Key columns are set only when the row `moved`.
pub fn update_shape(
    plan: &SourcePlan,
    t: &TargetPlan,
    known: &[usize],
    moved: bool,
) -> Result<UpdateShape, MissingValue> {
    enum Reads {
        Known,
        Unchanged,
        Mixed(usize),
    }
    let classify = |e: &PlanExpr| {
        let unknown = e.reads.iter().copied().find(|r| !known.contains(r));
        match unknown {
            None => Reads::Known,
            Some(_) if e.reads.iter().all(|r| !known.contains(r)) => Reads::Unchanged,
            Some(r) => Reads::Mixed(r),
        }
    };
    let mut set = Vec::new();
    for (i, c) in t.columns.iter().enumerate() {
        if t.key.contains(&i) && !moved {
            continue;
        }
        match classify(&c.expr) {
            Reads::Known => set.push(i),
            Reads::Unchanged => {}
            Reads::Mixed(r) => {
                return Err(MissingValue {
                    target_column: format!("{}.{}", t.target, c.name),
                    source_column: plan.source.columns[r].name.clone(),
                });
            }
        }
    }
    let filter = match t.filter.as_ref().map(classify) {
        None | Some(Reads::Unchanged) => false,
        Some(Reads::Known) => true,
        Some(Reads::Mixed(r)) => {
            return Err(MissingValue {
                target_column: format!("the filter of {}", t.target),
                source_column: plan.source.columns[r].name.clone(),
            });
        }
    };
    Ok(UpdateShape { set, filter })
}

/// `UPDATE` of existing target rows from the `known` source columns. Parameters: with `moved`,
/// the old source key ([`SourcePlan::key`] order) first; then the `known` columns in order.
/// The row is found by the target key computed from the old key (`moved`) or from the new
/// values (in place). A `GENERATED ALWAYS AS IDENTITY` column in `shape.set` is checked, not
/// set (PostgreSQL refuses to update it), so a row whose value would change is not found.
/// Without `shape.filter` the statement's row count is the rows found (with nothing left to
/// set it is a `SELECT` of them). With `shape.filter`, rows that
/// do not pass are deleted, and the statement returns one number: rows that pass but were not
/// on the target (they would need the whole row to be inserted; the caller reports them).
pub fn update(
    plan: &SourcePlan,
    t: &TargetPlan,
    known: &[usize],
    shape: &UpdateShape,
    moved: bool,
) -> String {
    let rows = source_rows(plan, known, 1, moved);
    let keys = if moved {
        (0..t.key.len())
            .map(|j| format!("{} AS {P}k{j}", key_from_old(plan, t, j)))
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        key_outputs(t)
    };
    let outputs = shape
        .set
        .iter()
        .map(|&i| {
            let c = &t.columns[i];
            format!("{} AS {P}c{i}", cast(&c.expr, &c.type_sql))
        })
        .chain(t.filter.iter().filter(|_| shape.filter).map(pass))
        .fold(keys, |acc, x| format!("{acc}, {x}"));
    let (assign, check): (Vec<usize>, Vec<usize>) = shape
        .set
        .iter()
        .partition(|&&i| !t.columns[i].always_identity);
    let assignments = assign
        .iter()
        .map(|&i| format!("{} = v.{P}c{i}", quote_ident(&t.columns[i].name)))
        .collect::<Vec<_>>()
        .join(", ");
    let m = key_match(t, "v")
        + &check
            .iter()
            .map(|&i| format!(" AND t.{} = v.{P}c{i}", quote_ident(&t.columns[i].name)))
            .collect::<String>();
    let table = t.target.quoted();
    match shape.filter {
        false if assign.is_empty() => {
            format!("SELECT 1 FROM {table} AS t, (SELECT {outputs} FROM {rows}) AS v WHERE {m}")
        }
        false => format!(
            "UPDATE {table} AS t SET {assignments} FROM (SELECT {outputs} FROM {rows}) AS v WHERE {m}"
        ),
        true => {
            let update = if assign.is_empty() {
                format!("SELECT 1 FROM {table} AS t, v WHERE v.{P}pass AND {m}")
            } else {
                format!(
                    "UPDATE {table} AS t SET {assignments} FROM v WHERE v.{P}pass AND {m} RETURNING 1"
                )
            };
            format!(
                "WITH v AS (SELECT {outputs} FROM {rows}), {P}up AS ({update}), \
                 {P}gone AS (DELETE FROM {table} AS t USING v WHERE NOT v.{P}pass AND {m}) \
                 SELECT (SELECT count(*) FROM v WHERE v.{P}pass) - (SELECT count(*) FROM {P}up)"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::mapping::{Mapping, TableName};
    use super::super::plan::{self, *};
    use super::*;

    fn plan_for(toml: &str) -> SourcePlan {
        let c = |n: &str, t: &str, key: bool| SourceColumn {
            name: n.into(),
            type_sql: t.into(),
            key,
        };
        let source = SourceTable {
            name: TableName::new("public", "accounts"),
            columns: vec![
                c("id", "bigint", true),
                c("first", "text", false),
                c("amount", "numeric", false),
            ],
        };
        let target = TargetTableInfo {
            name: TableName::new("public", "people"),
            columns: vec![
                TargetColumnInfo {
                    name: "pid".into(),
                    type_sql: "bigint".into(),
                    not_null: true,
                    has_default: false,
                    generated: false,
                    always_identity: false,
                    primary_key: true,
                },
                TargetColumnInfo {
                    name: "first".into(),
                    type_sql: "text".into(),
                    not_null: false,
                    has_default: false,
                    generated: false,
                    always_identity: false,
                    primary_key: false,
                },
                TargetColumnInfo {
                    name: "cents".into(),
                    type_sql: "bigint".into(),
                    not_null: false,
                    has_default: false,
                    generated: false,
                    always_identity: false,
                    primary_key: false,
                },
            ],
            primary_key: vec!["pid".into()],
        };
        let m = Mapping::parse("m.toml", toml).unwrap();
        plan::compile_source(&m, &source, &|_| Some(target.clone())).unwrap()
    }

    const MAP: &str = "[[table]]\nsource = \"accounts\"\ntarget = \"people\"\n[table.columns]\npid = \"id\"\ncents = \"(amount * 100)::bigint\"\n";

    #[test]
    fn statements_evaluate_expressions_over_source_rows() {
        let p = plan_for(MAP);
        let t = &p.targets[0];
        assert_eq!(
            delete(&p, t),
            "DELETE FROM \"public\".\"people\" AS t USING (SELECT (id)::bigint AS walshift_k0 FROM \
             (SELECT u.p1::bigint AS \"id\" FROM unnest($1::text[]) AS u(p1)) AS s) AS v WHERE t.\"pid\" = v.walshift_k0"
        );
        assert_eq!(
            insert(&p, t),
            "INSERT INTO \"public\".\"people\" AS t (\"pid\", \"first\", \"cents\") OVERRIDING SYSTEM VALUE SELECT (id)::bigint, (\"first\")::text, \
             ((amount * 100)::bigint)::bigint FROM (SELECT u.p1::bigint AS \"id\", u.p2::text AS \"first\", \
             u.p3::numeric AS \"amount\" FROM unnest($1::text[], $2::text[], $3::text[]) AS u(p1, p2, p3)) AS s"
        );
        assert!(
            upsert(&p, t).contains(
                " ON CONFLICT (\"pid\") DO UPDATE SET \"first\" = EXCLUDED.\"first\", \"cents\" = EXCLUDED.\"cents\" RETURNING 1) \
                 SELECT (SELECT count(*) FROM v WHERE v.walshift_pass), (SELECT count(*) FROM walshift_ins)"
            ),
            "{}",
            upsert(&p, t)
        );
    }

    #[test]
    fn unknown_values_keep_passthrough_columns_and_refuse_computed_ones() {
        let p = plan_for(MAP);
        let t = &p.targets[0];
        // amount unknown: cents cannot be computed.
        let s = update_shape(&p, t, &[0, 1], false).unwrap();
        assert_eq!(
            s.set,
            vec![1],
            "cents reads only the unchanged amount: kept"
        );
        // first unknown: it keeps its target value.
        let s = update_shape(&p, t, &[0, 2], false).unwrap();
        assert_eq!(s.set, vec![2]);
        let sql = update(&p, t, &[0, 2], &s, true);
        assert!(
            sql.contains(
                "(SELECT (id)::bigint FROM (SELECT s.walshift_old_0 AS \"id\") AS o) AS walshift_k0"
            ),
            "{sql}"
        );
        assert!(
            sql.starts_with("UPDATE \"public\".\"people\" AS t SET \"cents\" = v.walshift_c2 FROM"),
            "{sql}"
        );
    }

    const MAP_FILTERED: &str = "[[table]]\nsource = \"accounts\"\ntarget = \"people\"\nfilter = \"amount > 0\"\n[table.columns]\npid = \"id\"\ncents = \"(amount * 100)::bigint\"\n";

    #[test]
    fn filtered_statements_delete_rows_that_stop_passing() {
        let p = plan_for(MAP_FILTERED);
        let t = &p.targets[0];
        assert!(t.filter.is_some());
        let sql = upsert(&p, t);
        assert!(sql.contains("walshift_gone AS (DELETE FROM \"public\".\"people\" AS t USING v WHERE NOT v.walshift_pass"), "{sql}");
        assert!(sql.contains("WHERE v.walshift_pass ON CONFLICT"), "{sql}");
        let s = update_shape(&p, t, &[0, 1, 2], false).unwrap();
        let sql = update(&p, t, &[0, 1, 2], &s, false);
        assert!(sql.ends_with("SELECT (SELECT count(*) FROM v WHERE v.walshift_pass) - (SELECT count(*) FROM walshift_up)"), "{sql}");
    }

    #[test]
    fn always_identity_columns_are_checked_not_set() {
        let mut p = plan_for(MAP);
        p.targets[0].columns[2].always_identity = true;
        let t = &p.targets[0];
        let s = update_shape(&p, t, &[0, 1, 2], false).unwrap();
        let sql = update(&p, t, &[0, 1, 2], &s, false);
        assert!(
            sql.starts_with("UPDATE \"public\".\"people\" AS t SET \"first\" = v.walshift_c1 FROM"),
            "{sql}"
        );
        assert!(
            sql.ends_with("WHERE t.\"pid\" = v.walshift_k0 AND t.\"cents\" = v.walshift_c2"),
            "{sql}"
        );
        // Only the identity column changed: the rows are found, nothing is written.
        let s = update_shape(&p, t, &[0, 2], false).unwrap();
        let sql = update(&p, t, &[0, 2], &s, false);
        assert!(
            sql.starts_with("SELECT 1 FROM \"public\".\"people\" AS t, (SELECT"),
            "{sql}"
        );
        let sql = upsert(&p, t);
        assert!(
            sql.contains("DO UPDATE SET \"first\" = EXCLUDED.\"first\" WHERE t.\"cents\" = EXCLUDED.\"cents\" RETURNING 1"),
            "{sql}"
        );
    }
}
