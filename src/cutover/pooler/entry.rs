//! PgBouncer `[databases]` entries as text: find the one line for a database in a file, read
//! its `key=value` pairs, build the entry that points at the copy, and put it back with every
//! other byte of the file unchanged. No I/O: the caller reads and writes the file.
//!
//! An entry line is `name = key=value key='quoted value' …`; the name may be double-quoted;
//! `;` and `#` start comment lines; a file with section headers is searched only inside
//! `[databases]`, a file without any (an `%include`d fragment) everywhere.

use std::fmt;

/// A problem with the databases file's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    #[error(
        "has no entry for database {0:?} (a line `{0} = host=… port=… dbname=…` in [databases])"
    )]
    Missing(String),
    #[error(
        "has {count} entries for database {name:?} (lines {lines}); PgBouncer uses one: keep one line"
    )]
    Ambiguous {
        name: String,
        count: usize,
        lines: String,
    },
    #[error("line {line}: cannot read the entry of {name:?}: {why}")]
    Unreadable {
        name: String,
        line: usize,
        why: String,
    },
}

/// One `key=value` pair of an entry, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub key: String,
    pub value: String,
}

/// The entry of one database: the line it is on and its pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 1-based line number.
    pub line: usize,
    pub pairs: Vec<Pair>,
}

impl Entry {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|p| p.key.eq_ignore_ascii_case(key))
            .map(|p| p.value.as_str())
    }

    /// A copy with `key` set to `value` (replacing it in place, or appended).
    pub fn with(&self, key: &str, value: &str) -> Entry {
        let mut e = self.clone();
        match e.pairs.iter_mut().find(|p| p.key.eq_ignore_ascii_case(key)) {
            Some(p) => p.value = value.to_owned(),
            None => e.pairs.push(Pair {
                key: key.to_owned(),
                value: value.to_owned(),
            }),
        }
        e
    }

    /// The entry's text as PgBouncer reads it (values quoted where needed).
    pub fn text(&self) -> String {
        self.pairs
            .iter()
            .map(|p| format!("{}={}", p.key, quote_value(&p.value)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The entry's text with secrets (`password`) masked: what may be printed or logged.
    pub fn redacted(&self) -> String {
        self.with_secrets_masked().text()
    }

    fn with_secrets_masked(&self) -> Entry {
        let mut e = self.clone();
        for p in &mut e.pairs {
            if p.key.eq_ignore_ascii_case("password") {
                p.value = "***".into();
            }
        }
        e
    }
}

impl fmt::Display for Entry {
    /// The redacted text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

fn quote_value(v: &str) -> String {
    if !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
    {
        v.to_owned()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// Parses an entry's right-hand side: `key=value` pairs separated by white space, values
/// optionally single-quoted (with `\'` or `''` for a quote inside).
pub fn parse_pairs(text: &str) -> Result<Vec<Pair>, String> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("{key:?} has no value (expected key=value)"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(format!("the value of {key:?} has no closing quote")),
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(format!("the value of {key:?} has no closing quote")),
                    },
                    Some('\'') if chars.peek() == Some(&'\'') => {
                        chars.next();
                        value.push('\'');
                    }
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        if key.is_empty() {
            return Err("a pair has no key".into());
        }
        pairs.push(Pair { key, value });
    }
}

/// The database name a line defines, with the byte offset of its right-hand side; `None` for
/// comments, blank lines, section headers and directives.
fn line_name(line: &str) -> Option<(String, usize)> {
    let t = line.trim_start();
    if t.is_empty() || t.starts_with([';', '#', '[', '%']) {
        return None;
    }
    let eq = line.find('=')?;
    let name = line[..eq].trim();
    let name = name
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(name);
    Some((name.to_owned(), eq + 1))
}

/// Lines (0-based index) that are inside `[databases]`, or all lines when the text has no
/// section header.
fn database_lines(text: &str) -> Vec<(usize, &str)> {
    let lines: Vec<&str> = text.split('\n').collect();
    let has_sections = lines.iter().any(|l| l.trim_start().starts_with('['));
    let mut inside = !has_sections;
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim();
        if let Some(section) = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            inside = section.trim().eq_ignore_ascii_case("databases");
            continue;
        }
        if inside {
            out.push((i, *l));
        }
    }
    out
}

/// Finds the one entry of database `name` in the file's text.
pub fn find(text: &str, name: &str) -> Result<Entry, EntryError> {
    let found: Vec<(usize, &str, usize)> = database_lines(text)
        .into_iter()
        .filter_map(|(i, l)| {
            let (n, rhs) = line_name(l)?;
            (n == name).then_some((i, l, rhs))
        })
        .collect();
    match found.as_slice() {
        [] => Err(EntryError::Missing(name.to_owned())),
        [(i, l, rhs)] => {
            let pairs = parse_pairs(l[*rhs..].trim_end_matches('\r')).map_err(|why| {
                EntryError::Unreadable {
                    name: name.to_owned(),
                    line: i + 1,
                    why,
                }
            })?;
            Ok(Entry { line: i + 1, pairs })
        }
        many => Err(EntryError::Ambiguous {
            name: name.to_owned(),
            count: many.len(),
            lines: many
                .iter()
                .map(|(i, _, _)| (i + 1).to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The file's text with database `name`'s entry replaced by `entry_text`; every other byte
/// is kept (including the line's own name spelling and line ending).
pub fn replace(text: &str, name: &str, entry_text: &str) -> Result<String, EntryError> {
    let entry = find(text, name)?;
    let mut out = String::with_capacity(text.len() + entry_text.len());
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if i + 1 == entry.line {
            let (_, rhs) = line_name(line).expect("found above");
            out.push_str(&line[..rhs]);
            out.push(' ');
            out.push_str(entry_text);
            if line.ends_with('\r') {
                out.push('\r');
            }
        } else {
            out.push_str(line);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "; databases the application uses\n\
        app = host=10.0.0.5 port=5432 dbname=shop user=app password='s3cr et'\n\
        other = host=10.0.0.6 dbname=other\n";

    #[test]
    fn finds_and_reads_an_entry() {
        let e = find(FILE, "app").unwrap();
        assert_eq!(e.line, 2);
        assert_eq!(e.get("host"), Some("10.0.0.5"));
        assert_eq!(e.get("PORT"), Some("5432"));
        assert_eq!(e.get("password"), Some("s3cr et"));
        assert_eq!(
            e.redacted(),
            "host=10.0.0.5 port=5432 dbname=shop user=app password=***"
        );
        assert_eq!(find(FILE, "nope"), Err(EntryError::Missing("nope".into())));
    }

    #[test]
    fn replace_keeps_every_other_byte() {
        let e = find(FILE, "app").unwrap();
        let new = e.with("host", "10.0.0.9").with("dbname", "shop_v2");
        let out = replace(FILE, "app", &new.text()).unwrap();
        assert_eq!(
            out,
            "; databases the application uses\n\
             app = host=10.0.0.9 port=5432 dbname=shop_v2 user=app password='s3cr et'\n\
             other = host=10.0.0.6 dbname=other\n"
        );
        // Round trip: the new text reads back as the new entry.
        assert_eq!(find(&out, "app").unwrap().pairs, new.pairs);
    }

    #[test]
    fn sections_quoting_and_duplicates() {
        let ini = "[pgbouncer]\nlisten_port = 6432\napp = not-a-database\n[databases]\n\"app\" = host=a\r\n";
        let e = find(ini, "app").unwrap();
        assert_eq!(e.line, 5);
        assert_eq!(e.get("host"), Some("a"));
        let out = replace(ini, "app", "host=b").unwrap();
        assert!(out.ends_with("\"app\" = host=b\r\n"), "{out:?}");
        assert!(out.contains("app = not-a-database"));
        let dup = "app = host=a\napp = host=b\n";
        assert!(matches!(
            find(dup, "app"),
            Err(EntryError::Ambiguous { count: 2, .. })
        ));
    }

    #[test]
    fn quoted_values_round_trip() {
        let pairs = parse_pairs(r"a=1 b='x y' c='it''s' d='back\\slash\'q'").unwrap();
        let vals: Vec<&str> = pairs.iter().map(|p| p.value.as_str()).collect();
        assert_eq!(vals, ["1", "x y", "it's", r"back\slash'q"]);
        let e = Entry { line: 1, pairs };
        assert_eq!(parse_pairs(&e.text()).unwrap(), e.pairs);
        assert!(parse_pairs("a='open").is_err());
        assert!(parse_pairs("novalue").is_err());
    }
}
