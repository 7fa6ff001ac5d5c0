//! Compiling a mapping entry against the two table shapes (pure, no I/O): which target column
//! gets which expression, the target key, the filter, and every check that needs no server.
//! The server-side checks (PostgreSQL type-checks each expression) are in [`super::catalog`].

use super::TransformError;
use super::expr;
use super::mapping::{Mapping, TableMapping, TableName};

/// A source column as replay decodes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceColumn {
    pub name: String,
    /// The type to cast the text value to, as SQL (`bigint`, `"public"."mood"`, `text`).
    pub type_sql: String,
    /// Part of the replica identity: present in old-key images of updates and deletes.
    pub key: bool,
}

/// A source table's shape (from a Relation message or the source catalog).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceTable {
    pub name: TableName,
    /// In tuple order.
    pub columns: Vec<SourceColumn>,
}

/// A target column from the target catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetColumnInfo {
    pub name: String,
    /// `format_type` of the column.
    pub type_sql: String,
    pub not_null: bool,
    /// Has a default (or is an identity column): may be left out of an INSERT.
    pub has_default: bool,
    /// `GENERATED ALWAYS AS (…) STORED`: cannot be written.
    pub generated: bool,
    /// `GENERATED ALWAYS AS IDENTITY`: an INSERT writes it only with `OVERRIDING SYSTEM
    /// VALUE`, an UPDATE cannot set it at all.
    pub always_identity: bool,
    pub primary_key: bool,
}

/// A target table from the target catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetTableInfo {
    pub name: TableName,
    /// In `attnum` order.
    pub columns: Vec<TargetColumnInfo>,
    /// Primary key column names in index order.
    pub primary_key: Vec<String>,
}

/// An expression over the source row, with what it reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanExpr {
    pub sql: String,
    /// Indices of the source columns it may read (see [`expr::identifiers`]).
    pub reads: Vec<usize>,
    /// The expression is exactly this source column.
    pub passthrough: Option<usize>,
    /// Mapping file line; `None` for an implicit same-named column.
    pub line: Option<usize>,
}

/// A target column written by replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanColumn {
    pub name: String,
    pub type_sql: String,
    pub expr: PlanExpr,
    /// `GENERATED ALWAYS AS IDENTITY` on the target: updates check its value instead of
    /// setting it (a row whose value would change is not found, which the affected-row guard
    /// reports).
    pub always_identity: bool,
}

/// How one source table lands on one target table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetPlan {
    pub target: TableName,
    /// The columns written, in target order.
    pub columns: Vec<PlanColumn>,
    /// Indices into `columns` of the target's primary key, in key order.
    pub key: Vec<usize>,
    pub filter: Option<PlanExpr>,
    /// Line of the `[[table]]` entry.
    pub line: usize,
}

impl TargetPlan {
    /// Every source column this target's expressions and filter may read.
    pub fn reads(&self) -> Vec<usize> {
        let mut r: Vec<usize> = self
            .columns
            .iter()
            .map(|c| &c.expr)
            .chain(self.filter.iter())
            .flat_map(|e| e.reads.iter().copied())
            .collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    /// No expression but same-named columns, no filter: the target row is the source row.
    pub fn is_identity(&self, source: &SourceTable) -> bool {
        self.filter.is_none()
            && self.columns.iter().all(|c| {
                c.expr
                    .passthrough
                    .is_some_and(|s| source.columns[s].name == c.name)
            })
    }
}

/// Everything replay needs to write one source table's changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourcePlan {
    pub source: SourceTable,
    pub targets: Vec<TargetPlan>,
    /// The source columns identifying a row for folding and for finding target rows: those the
    /// targets' keys are computed from (all replica identity columns).
    pub key: Vec<usize>,
}

fn err(m: &Mapping, line: usize, message: String) -> TransformError {
    TransformError::Mapping {
        path: m.path.clone(),
        line,
        message,
    }
}

/// Source column indices an expression may read.
fn reads(source: &SourceTable, sql: &str) -> Vec<usize> {
    let mut out: Vec<usize> = expr::identifiers(sql)
        .iter()
        .filter_map(|id| source.columns.iter().position(|c| &c.name == id))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn plan_expr(source: &SourceTable, sql: &str, line: Option<usize>) -> PlanExpr {
    PlanExpr {
        sql: sql.to_owned(),
        reads: reads(source, sql),
        passthrough: expr::bare_column(sql)
            .and_then(|n| source.columns.iter().position(|c| c.name == n)),
        line,
    }
}

/// Checks the whole mapping for mistakes that need no catalog: one source onto the same target
/// twice, two sources onto one target.
pub fn check_mapping(m: &Mapping) -> Result<(), TransformError> {
    for (i, a) in m.tables.iter().enumerate() {
        for b in &m.tables[..i] {
            if a.target.value == b.target.value {
                let what = if a.source.value == b.source.value {
                    format!(
                        "{} is mapped onto {} twice (first at line {}): merge the two entries",
                        a.source.value, a.target.value, b.line
                    )
                } else {
                    format!(
                        "{} and {} (line {}) both map onto {}: merging tables is not supported; \
                         map each source table onto its own target",
                        a.source.value, b.source.value, b.line, a.target.value
                    )
                };
                return Err(err(m, a.line, what));
            }
        }
    }
    Ok(())
}

/// Compiles every entry for `source` (identity if it has none) against the target tables.
/// `target_of` looks a target table up in the target catalog.
pub fn compile_source(
    m: &Mapping,
    source: &SourceTable,
    target_of: &dyn Fn(&TableName) -> Option<TargetTableInfo>,
) -> Result<SourcePlan, TransformError> {
    let entries: Vec<&TableMapping> = m.for_source(&source.name).collect();
    let identity_entry;
    let entries: Vec<&TableMapping> = if entries.is_empty() {
        identity_entry = TableMapping {
            source: super::mapping::Located {
                value: source.name.clone(),
                line: 0,
            },
            target: super::mapping::Located {
                value: source.name.clone(),
                line: 0,
            },
            columns: Vec::new(),
            drop: Vec::new(),
            filter: None,
            line: 0,
        };
        vec![&identity_entry]
    } else {
        entries
    };
    // Source-wide checks: dropped columns exist; every column goes somewhere.
    let mut dropped = vec![false; source.columns.len()];
    for e in &entries {
        for d in &e.drop {
            let Some(i) = source.columns.iter().position(|c| c.name == d.value) else {
                return Err(err(
                    m,
                    d.line,
                    format!(
                        "drop names {:?}, which {} does not have (its columns: {})",
                        d.value,
                        source.name,
                        names(source.columns.iter().map(|c| &c.name))
                    ),
                ));
            };
            dropped[i] = true;
        }
    }
    let mut used = dropped.clone();
    let mut targets = Vec::new();
    for e in &entries {
        let target = target_of(&e.target.value).ok_or_else(|| {
            err(
                m,
                e.target.line,
                format!(
                    "target table {} does not exist on the target: create it in the migration, or fix the name",
                    e.target.value
                ),
            )
        })?;
        let plan = compile_entry(m, source, e, &target, &dropped)?;
        for c in &plan.columns {
            for &r in &c.expr.reads {
                used[r] = true;
            }
        }
        if let Some(f) = &plan.filter {
            for &r in &f.reads {
                used[r] = true;
            }
        }
        targets.push(plan);
    }
    if let Some(i) = used.iter().position(|u| !u) {
        let line = entries[0].line;
        return Err(err(
            m,
            line,
            format!(
                "source column {}.{} goes nowhere: no target column has its name and no expression reads it. \
                 Map it (`[table.columns] new_name = \"{}\"`) or list it in `drop = [\"{}\"]`",
                source.name, source.columns[i].name, source.columns[i].name, source.columns[i].name
            ),
        ));
    }
    let mut key: Vec<usize> = targets
        .iter()
        .flat_map(|t| t.key.iter().flat_map(|&k| t.columns[k].expr.reads.clone()))
        .collect();
    key.sort_unstable();
    key.dedup();
    if key.is_empty() {
        return Err(err(
            m,
            entries[0].line,
            format!(
                "the target key of {} reads no source column, so its rows cannot be told apart; \
                 compute the target's primary key from the source's key columns",
                source.name
            ),
        ));
    }
    Ok(SourcePlan {
        source: source.clone(),
        targets,
        key,
    })
}

fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    it.map(String::as_str).collect::<Vec<_>>().join(", ")
}

fn compile_entry(
    m: &Mapping,
    source: &SourceTable,
    e: &TableMapping,
    target: &TargetTableInfo,
    dropped: &[bool],
) -> Result<TargetPlan, TransformError> {
    let line = e.line;
    if target.primary_key.is_empty() {
        return Err(err(
            m,
            e.target.line.max(line),
            format!(
                "target table {} has no primary key; replay finds target rows by it. Add one in the migration",
                target.name
            ),
        ));
    }
    if !source.columns.iter().any(|c| c.key) {
        return Err(err(
            m,
            line.max(1),
            format!(
                "source table {} has no replica identity key (no primary key, REPLICA IDENTITY NOTHING): \
                 its updates and deletes cannot be mapped. Add a primary key on the source",
                source.name
            ),
        ));
    }
    for (name, _) in &e.columns {
        let Some(col) = target.columns.iter().find(|c| c.name == name.value) else {
            return Err(err(
                m,
                name.line,
                format!(
                    "{} has no column {:?} (its columns: {}); fix the name or add the column in the migration",
                    target.name,
                    name.value,
                    names(target.columns.iter().map(|c| &c.name))
                ),
            ));
        };
        if col.generated {
            return Err(err(
                m,
                name.line,
                format!(
                    "{}.{} is a generated column: PostgreSQL computes it, remove it from the mapping",
                    target.name, name.value
                ),
            ));
        }
    }
    let mut columns = Vec::new();
    for tc in &target.columns {
        if tc.generated {
            continue;
        }
        let explicit = e.columns.iter().find(|(n, _)| n.value == tc.name);
        let pe = match explicit {
            Some((_, x)) => plan_expr(source, &x.value, Some(x.line)),
            None => match source.columns.iter().position(|c| c.name == tc.name) {
                Some(i) if !dropped[i] => {
                    plan_expr(source, &crate::sql::quote_ident(&tc.name), None)
                }
                _ => {
                    if tc.primary_key {
                        return Err(err(
                            m,
                            line,
                            format!(
                                "primary key column {}.{} gets no value: no source column has its name. \
                                 Give it an expression over the source key, e.g. `{} = \"id\"`",
                                target.name, tc.name, tc.name
                            ),
                        ));
                    }
                    if tc.not_null && !tc.has_default {
                        return Err(err(
                            m,
                            line,
                            format!(
                                "{}.{} is NOT NULL without a default and the mapping gives it no value: \
                                 add an expression (`{} = \"…\"`) or a default in the migration",
                                target.name, tc.name, tc.name
                            ),
                        ));
                    }
                    continue;
                }
            },
        };
        if let Some(&d) = pe.reads.iter().find(|&&r| dropped[r]) {
            return Err(err(
                m,
                pe.line.unwrap_or(line),
                format!(
                    "the expression for {}.{} reads {:?}, which is listed in drop: remove it from drop or from the expression",
                    target.name, tc.name, source.columns[d].name
                ),
            ));
        }
        if tc.primary_key
            && let Some(&r) = pe.reads.iter().find(|&&r| !source.columns[r].key)
        {
            return Err(err(
                m,
                pe.line.unwrap_or(line),
                format!(
                    "primary key column {}.{} is computed from {:?}, which is not in the source's key: \
                     deletes carry only the key, so the target row could not be found. \
                     Compute it from the source key columns ({})",
                    target.name,
                    tc.name,
                    source.columns[r].name,
                    names(source.columns.iter().filter(|c| c.key).map(|c| &c.name))
                ),
            ));
        }
        columns.push(PlanColumn {
            name: tc.name.clone(),
            type_sql: tc.type_sql.clone(),
            expr: pe,
            always_identity: tc.always_identity,
        });
    }
    let key = target
        .primary_key
        .iter()
        .map(|k| {
            columns.iter().position(|c| &c.name == k).ok_or_else(|| {
                err(
                    m,
                    line,
                    format!("primary key column {}.{k} gets no value", target.name),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let filter = e
        .filter
        .as_ref()
        .map(|f| plan_expr(source, &f.value, Some(f.line)));
    if let Some(f) = &filter
        && let Some(&d) = f.reads.iter().find(|&&r| dropped[r])
    {
        return Err(err(
            m,
            f.line.unwrap_or(line),
            format!(
                "the filter reads {:?}, which is listed in drop",
                source.columns[d].name
            ),
        ));
    }
    Ok(TargetPlan {
        target: target.name.clone(),
        columns,
        key,
        filter,
        line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn accounts_source() -> SourceTable {
        let c = |n: &str, t: &str, key: bool| SourceColumn {
            name: n.into(),
            type_sql: t.into(),
            key,
        };
        SourceTable {
            name: TableName::new("public", "accounts"),
            columns: vec![
                c("id", "bigint", true),
                c("first", "text", false),
                c("last", "text", false),
                c("amount", "numeric", false),
            ],
        }
    }

    fn target(name: &str, cols: &[(&str, &str, bool, bool)]) -> TargetTableInfo {
        TargetTableInfo {
            name: TableName::new("public", name),
            columns: cols
                .iter()
                .map(|&(n, t, nn, pk)| TargetColumnInfo {
                    name: n.into(),
                    type_sql: t.into(),
                    not_null: nn || pk,
                    has_default: false,
                    generated: false,
                    always_identity: false,
                    primary_key: pk,
                })
                .collect(),
            primary_key: cols
                .iter()
                .filter(|c| c.3)
                .map(|c| c.0.to_string())
                .collect(),
        }
    }

    fn compile(toml: &str, targets: Vec<TargetTableInfo>) -> Result<SourcePlan, TransformError> {
        let m = Mapping::parse("m.toml", toml)?;
        check_mapping(&m)?;
        compile_source(&m, &accounts_source(), &|n| {
            targets.iter().find(|t| &t.name == n).cloned()
        })
    }

    #[test]
    fn identity_when_not_named() {
        let p = compile(
            "",
            vec![target(
                "accounts",
                &[
                    ("id", "bigint", true, true),
                    ("first", "text", false, false),
                    ("last", "text", false, false),
                    ("amount", "numeric", false, false),
                    ("added", "text", false, false),
                ],
            )],
        )
        .unwrap();
        assert_eq!(p.targets.len(), 1);
        assert_eq!(p.targets[0].columns.len(), 4);
        assert!(p.targets[0].is_identity(&p.source));
        assert_eq!(p.key, vec![0]);
    }

    #[test]
    fn split_with_expressions() {
        let p = compile(
            r#"
[[table]]
source = "accounts"
target = "people"
drop = ["amount"]
[table.columns]
full_name = "first || ' ' || last"

[[table]]
source = "accounts"
target = "balances"
filter = "amount > 0"
[table.columns]
account_id = "id"
cents = "(amount * 100)::bigint"
"#,
            vec![
                target(
                    "people",
                    &[
                        ("id", "bigint", true, true),
                        ("full_name", "text", true, false),
                    ],
                ),
                target(
                    "balances",
                    &[
                        ("account_id", "bigint", true, true),
                        ("cents", "bigint", false, false),
                    ],
                ),
            ],
        );
        // amount is dropped but the second entry reads it.
        let e = p.unwrap_err().to_string();
        assert!(e.contains("listed in drop"), "{e}");
    }

    #[test]
    fn mistakes_are_located() {
        let people = || {
            target(
                "people",
                &[
                    ("id", "bigint", true, true),
                    ("full_name", "text", true, false),
                ],
            )
        };
        let cases: &[(&str, &str)] = &[
            (
                "[[table]]\nsource = \"accounts\"\ntarget = \"nope\"\n",
                "m.toml:3",
            ),
            (
                "[[table]]\nsource = \"accounts\"\ntarget = \"people\"\n[table.columns]\nfull_nam = \"first\"\n",
                "no column \"full_nam\"",
            ),
            (
                "[[table]]\nsource = \"accounts\"\ntarget = \"people\"\n",
                "NOT NULL without a default",
            ),
            (
                "[[table]]\nsource = \"accounts\"\ntarget = \"people\"\n[table.columns]\nfull_name = \"first\"\nid = \"length(last)\"\n",
                "not in the source's key",
            ),
            (
                "[[table]]\nsource = \"accounts\"\ntarget = \"people\"\ndrop = [\"amont\"]\n[table.columns]\nfull_name = \"first\"\n",
                "drop names \"amont\"",
            ),
            (
                "[[table]]\nsource = \"accounts\"\ntarget = \"people\"\n[table.columns]\nfull_name = \"first || last\"\n",
                "amount goes nowhere",
            ),
        ];
        for (toml, want) in cases {
            let e = compile(toml, vec![people()]).unwrap_err().to_string();
            assert!(e.contains(want), "{toml}: {e}");
        }
    }

    #[test]
    fn duplicate_targets_are_refused() {
        let m = Mapping::parse(
            "m.toml",
            "[[table]]\nsource = \"a\"\ntarget = \"x\"\n[[table]]\nsource = \"b\"\ntarget = \"x\"\n",
        )
        .unwrap();
        assert!(
            check_mapping(&m)
                .unwrap_err()
                .to_string()
                .contains("merging")
        );
    }
}
