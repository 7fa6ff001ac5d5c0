//! The mapping file: a TOML document saying how each source table lands on the migrated target
//! (pure parsing, no I/O). Every value keeps the line it came from, so a compile error can point
//! the operator at the line to fix.
//!
//! ```toml
//! [[table]]
//! source = "public.customers"      # schema.table; schema defaults to public
//! target = "public.clients"        # optional: default is the source's name
//! filter = "status <> 'deleted'"   # optional: rows failing it are not on the target
//! drop = ["legacy_code"]           # optional: source columns that are not replicated
//! [table.columns]                  # target column = SQL expression over the old row
//! full_name = "first_name || ' ' || last_name"
//! ```
//!
//! Several `[[table]]` entries with the same `source` split one source table into several
//! targets. Target columns not named take the same-named source column; source tables not named
//! map to themselves.

use serde::Deserialize;
use toml::Spanned;

use super::TransformError;

/// A schema-qualified table name, unquoted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> TableName {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// Parses `table`, `schema.table`, or either part double-quoted (`"My Schema"."T"`).
    /// Unquoted parts are folded to lower case, as PostgreSQL does.
    pub fn parse(s: &str) -> Option<TableName> {
        let parts = split_ident(s.trim())?;
        match parts.as_slice() {
            [t] => Some(TableName::new("public", t.clone())),
            [s, t] => Some(TableName::new(s.clone(), t.clone())),
            _ => None,
        }
    }

    /// `"schema"."name"`.
    pub fn quoted(&self) -> String {
        crate::sql::quote_qualified(&self.schema, &self.name)
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Splits a dotted name into its parts, honouring double quotes. `None` if malformed.
fn split_ident(s: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    '"' => break,
                    c => part.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if !(c.is_alphanumeric() || c == '_' || c == '$') {
                    return None;
                }
                part.extend(c.to_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return None;
        }
        parts.push(part);
        match chars.next() {
            None => return Some(parts),
            Some('.') => continue,
            Some(_) => return None,
        }
    }
}

/// A value and the 1-based line of the mapping file it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub line: usize,
}

/// One `[[table]]` entry: one source table onto one target table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableMapping {
    pub source: Located<TableName>,
    pub target: Located<TableName>,
    /// Target column → SQL expression over the source row, in file order.
    pub columns: Vec<(Located<String>, Located<String>)>,
    /// Source columns not replicated.
    pub drop: Vec<Located<String>>,
    /// Rows for which this predicate is not true are not on the target.
    pub filter: Option<Located<String>>,
    /// Line of the `[[table]]` header's first key.
    pub line: usize,
}

/// A parsed mapping file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mapping {
    /// Where it was read from (for messages).
    pub path: String,
    pub tables: Vec<TableMapping>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    table: Vec<Spanned<RawTable>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    source: Option<Spanned<String>>,
    target: Option<Spanned<String>>,
    filter: Option<Spanned<String>>,
    #[serde(default)]
    drop: Vec<Spanned<String>>,
    #[serde(default)]
    columns: toml::value::Table,
}

impl Mapping {
    /// The identity mapping: every table onto itself.
    pub fn identity() -> Mapping {
        Mapping::default()
    }

    /// Reads and parses a mapping file.
    pub fn load(path: &std::path::Path) -> Result<Mapping, TransformError> {
        let text = std::fs::read_to_string(path).map_err(|source| TransformError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Mapping::parse(&path.display().to_string(), &text)
    }

    /// Parses a mapping file's text; `path` is only used in messages.
    pub fn parse(path: &str, text: &str) -> Result<Mapping, TransformError> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let err = |line: usize, message: String| TransformError::Mapping {
            path: path.to_owned(),
            line,
            message,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(s.start)).unwrap_or(1);
            err(line, e.message().trim().to_owned())
        })?;
        let mut tables = Vec::with_capacity(raw.table.len());
        for spanned in raw.table {
            let table_line = line_of(spanned.span().start);
            let raw = spanned.into_inner();
            let source = raw.source.ok_or_else(|| {
                err(
                    table_line,
                    "this [[table]] has no `source = \"schema.table\"`: name the source table it maps"
                        .into(),
                )
            })?;
            let source_line = line_of(source.span().start);
            let source_name = TableName::parse(source.get_ref()).ok_or_else(|| {
                err(
                    source_line,
                    format!(
                        "source {:?} is not a table name: write `table` or `schema.table` (double-quote parts with capitals or dots)",
                        source.get_ref()
                    ),
                )
            })?;
            let target = match raw.target {
                Some(t) => {
                    let line = line_of(t.span().start);
                    let name = TableName::parse(t.get_ref()).ok_or_else(|| {
                        err(
                            line,
                            format!(
                                "target {:?} is not a table name: write `table` or `schema.table`",
                                t.get_ref()
                            ),
                        )
                    })?;
                    Located { value: name, line }
                }
                None => Located {
                    value: source_name.clone(),
                    line: source_line,
                },
            };
            let filter = match raw.filter {
                Some(f) => {
                    let line = line_of(f.span().start);
                    if f.get_ref().trim().is_empty() {
                        return Err(err(
                            line,
                            "filter is empty: write a SQL predicate over the source row, or remove it"
                                .into(),
                        ));
                    }
                    Some(Located {
                        value: f.into_inner(),
                        line,
                    })
                }
                None => None,
            };
            let drop = raw
                .drop
                .into_iter()
                .map(|d| Located {
                    line: line_of(d.span().start),
                    value: d.into_inner(),
                })
                .collect();
            let mut columns = Vec::with_capacity(raw.columns.len());
            for (name, value) in raw.columns {
                // `toml::Value` keeps no spans: find the key's line in the entry's text.
                let line = find_key_line(text, table_line, &name);
                let toml::Value::String(expr) = value else {
                    return Err(err(
                        line,
                        format!(
                            "column {name:?}: the expression must be a string of SQL, e.g. {name} = \"old_column\""
                        ),
                    ));
                };
                if expr.trim().is_empty() {
                    return Err(err(
                        line,
                        format!("column {name:?}: the expression is empty"),
                    ));
                }
                columns.push((Located { value: name, line }, Located { value: expr, line }));
            }
            columns.sort_by_key(|(n, _)| n.line);
            tables.push(TableMapping {
                source: Located {
                    value: source_name,
                    line: source_line,
                },
                target,
                columns,
                drop,
                filter,
                line: table_line,
            });
        }
        Ok(Mapping {
            path: path.to_owned(),
            tables,
        })
    }

    /// The entries for one source table (several when it is split), in file order.
    pub fn for_source<'a>(
        &'a self,
        source: &'a TableName,
    ) -> impl Iterator<Item = &'a TableMapping> {
        self.tables
            .iter()
            .filter(move |t| t.source.value == *source)
    }

    /// Whether the source table has an entry (otherwise it maps onto itself).
    pub fn names(&self, source: &TableName) -> bool {
        self.for_source(source).next().is_some()
    }

    /// The target tables a source table lands on: its entries' targets, or itself.
    pub fn targets_of(&self, source: &TableName) -> Vec<TableName> {
        let named: Vec<TableName> = self
            .for_source(source)
            .map(|t| t.target.value.clone())
            .collect();
        if named.is_empty() {
            vec![source.clone()]
        } else {
            named
        }
    }
}

/// The line of `key = …` at or after `from_line` (the `columns` table of the entry that
/// starts there). Falls back to `from_line`.
fn find_key_line(text: &str, from_line: usize, key: &str) -> usize {
    for (i, line) in text.lines().enumerate().skip(from_line.saturating_sub(1)) {
        let l = line.trim_start();
        let rest = if let Some(r) = l.strip_prefix(key) {
            Some(r)
        } else {
            l.strip_prefix(&format!("\"{key}\""))
        };
        if let Some(r) = rest
            && r.trim_start().starts_with('=')
        {
            return i + 1;
        }
        // Inline tables: `columns = { a = "…", key = "…" }`.
        if l.contains(&format!(" {key} =")) || l.contains(&format!("{{{key} =")) {
            return i + 1;
        }
    }
    from_line
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
# a release
[[table]]
source = "public.customers"
target = "clients"
filter = "status <> 'deleted'"
drop = ["legacy"]
[table.columns]
full_name = "first || ' ' || last"
id = "id"

[[table]]
source = "orders"
columns = { amount_cents = "(amount * 100)::bigint" }
"#;

    #[test]
    fn parses_entries_with_lines() {
        let m = Mapping::parse("m.toml", SAMPLE).unwrap();
        assert_eq!(m.tables.len(), 2);
        let t = &m.tables[0];
        assert_eq!(t.source.value, TableName::new("public", "customers"));
        assert_eq!(t.source.line, 4);
        assert_eq!(t.target.value, TableName::new("public", "clients"));
        assert_eq!(t.filter.as_ref().unwrap().line, 6);
        assert_eq!(t.drop[0].value, "legacy");
        assert_eq!(t.columns[0].0.value, "full_name");
        assert_eq!(t.columns[0].0.line, 9);
        assert_eq!(t.columns[1].0.line, 10);
        let o = &m.tables[1];
        assert_eq!(o.target.value, TableName::new("public", "orders"));
        assert_eq!(o.columns[0].1.value, "(amount * 100)::bigint");
        assert_eq!(o.columns[0].0.line, 14);
    }

    #[test]
    fn table_names() {
        assert_eq!(TableName::parse("T"), Some(TableName::new("public", "t")));
        assert_eq!(
            TableName::parse("\"My S\".\"Tab.le\""),
            Some(TableName::new("My S", "Tab.le"))
        );
        assert_eq!(TableName::parse("a.b.c"), None);
        assert_eq!(TableName::parse("a b"), None);
        assert_eq!(TableName::parse(""), None);
    }

    #[test]
    fn errors_name_the_line() {
        let e = Mapping::parse("m.toml", "[[table]]\nsource = \"a\"\ncolums = {}\n").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("m.toml:3"), "{s}");
        assert!(s.contains("colums"), "{s}");
        let e = Mapping::parse("m.toml", "[[table]]\ntarget = \"a\"\n").unwrap_err();
        assert!(e.to_string().contains("no `source"), "{e}");
        let e = Mapping::parse(
            "m.toml",
            "[[table]]\nsource = \"a\"\n[table.columns]\nx = 3\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("m.toml:4"), "{e}");
        let e = Mapping::parse("m.toml", "[[table]]\nsource = \"a.b.c\"\n").unwrap_err();
        assert!(e.to_string().contains("m.toml:2"), "{e}");
    }
}
