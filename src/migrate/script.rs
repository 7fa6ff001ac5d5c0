//! One migration script as read from disk: its name, checksum, directive, and its statements
//! as the server will see them.
//!
//! The splitter here is not a SQL parser. On the tokens of [`crate::sql::lexer`] (comments,
//! string literals, quoted identifiers, dollar quotes) it knows exactly what it needs to find
//! where each statement starts and ends the way `psql` does — parentheses, and `BEGIN … END`
//! bodies of `CREATE [OR REPLACE] FUNCTION|PROCEDURE … BEGIN ATOMIC` — so that walshift can
//! refuse, before anything runs, a script that would end walshift's transaction itself
//! (`COMMIT`, `ROLLBACK`, …), and run a `-- walshift:no-transaction` script one statement at
//! a time.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::MigrateError;
use crate::sql::lexer::{TokenKind, tokens};

/// The first-line directive that makes a script run outside a transaction.
pub const NO_TRANSACTION_DIRECTIVE: &str = "-- walshift:no-transaction";

/// A migration script, loaded and checked, ready to run.
#[derive(Debug, Clone)]
pub struct Script {
    /// The file name (no directory): the script's identity in `walshift.migrations`.
    pub name: String,
    /// Where it was read from.
    pub path: PathBuf,
    /// The text sent to the server (the file without a leading UTF-8 byte order mark).
    pub sql: String,
    /// SHA-256 of the file's exact bytes, lowercase hex.
    pub sha256: String,
    /// The first line is [`NO_TRANSACTION_DIRECTIVE`]: run statement by statement, each
    /// committing on its own, and record the script after the last one succeeds.
    pub no_transaction: bool,
    /// The statements, in order, as byte ranges of `sql` (each including its `;` if any).
    pub statements: Vec<Statement>,
}

/// One statement of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// Byte offset in [`Script::sql`] of the statement's first token.
    pub start: usize,
    /// Byte offset just past the statement (past its `;`, or the end of the text).
    pub end: usize,
    /// 1-based line of the first token.
    pub line: u32,
    /// What the statement does to the session's transaction, if anything.
    pub txn: Option<TxnControl>,
}

/// Transaction-control statements, found by their leading keywords.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnControl {
    /// `BEGIN`, `START TRANSACTION`.
    Begin,
    /// `COMMIT`, `END`, `ROLLBACK`, `ABORT`, `PREPARE TRANSACTION` (not `ROLLBACK TO`,
    /// `COMMIT PREPARED`, `ROLLBACK PREPARED`, which do not end the current transaction).
    End,
}

impl Script {
    /// Reads and checks a script file (see [`Script::from_bytes`]).
    pub fn load(path: &Path) -> Result<Script, MigrateError> {
        let bytes = std::fs::read(path).map_err(|source| MigrateError::Read {
            path: path.to_owned(),
            source,
        })?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| MigrateError::BadName {
                path: path.to_owned(),
            })?
            .to_owned();
        Script::from_bytes(name, path.to_owned(), &bytes)
    }

    /// Builds a script from its content. Refuses, naming the line: text that is not UTF-8,
    /// a misspelt or misplaced `-- walshift:` directive, a `psql` meta-command, and — in a
    /// script that runs in walshift's transaction — any statement that would begin or end a
    /// transaction (in a no-transaction script, one left open at the end).
    pub fn from_bytes(name: String, path: PathBuf, bytes: &[u8]) -> Result<Script, MigrateError> {
        let sha256 = hex(&Sha256::digest(bytes));
        let text = std::str::from_utf8(bytes).map_err(|e| MigrateError::NotUtf8 {
            name: name.clone(),
            line: line_of(
                &String::from_utf8_lossy(&bytes[..e.valid_up_to()]),
                usize::MAX,
            ),
        })?;
        let sql = text.strip_prefix('\u{feff}').unwrap_or(text).to_owned();
        let no_transaction = directive(&name, &sql)?;
        let statements = split(&sql).map_err(|line| MigrateError::MetaCommand {
            name: name.clone(),
            line,
        })?;
        if no_transaction {
            let mut open: Option<&Statement> = None;
            for st in &statements {
                match st.txn {
                    Some(TxnControl::Begin) => open = Some(st),
                    Some(TxnControl::End) => open = None,
                    None => {}
                }
            }
            if let Some(st) = open {
                return Err(MigrateError::TransactionLeftOpen {
                    name,
                    line: st.line,
                });
            }
        } else if let Some(st) = statements.iter().find(|s| s.txn.is_some()) {
            return Err(MigrateError::TransactionControl {
                name,
                line: st.line,
                statement: first_words(&sql[st.start..st.end]),
            });
        }
        Ok(Script {
            name,
            path,
            sql,
            sha256,
            no_transaction,
            statements,
        })
    }

    /// The text of one statement.
    pub fn statement_text(&self, st: &Statement) -> &str {
        &self.sql[st.start..st.end]
    }

    /// 1-based line and the line's text for a server error position: `position` is
    /// PostgreSQL's 1-based *character* index into `sent`, which starts at byte `offset`
    /// of [`Script::sql`].
    pub fn locate(&self, offset: usize, sent: &str, position: u32) -> (u32, String) {
        let chars = (position as usize).saturating_sub(1);
        let byte_in_sent = sent
            .char_indices()
            .nth(chars)
            .map_or(sent.len(), |(i, _)| i);
        let at = (offset + byte_in_sent).min(self.sql.len());
        let line = line_of(&self.sql, at);
        let start = self.sql[..at].rfind('\n').map_or(0, |i| i + 1);
        let end = self.sql[at..].find('\n').map_or(self.sql.len(), |i| at + i);
        (line, self.sql[start..end].trim().to_owned())
    }
}

/// 1-based line number of byte offset `at` (clamped to the text).
fn line_of(text: &str, at: usize) -> u32 {
    let at = at.min(text.len());
    text.as_bytes()[..at]
        .iter()
        .filter(|&&b| b == b'\n')
        .count() as u32
        + 1
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the directive: `true` for a first line equal to [`NO_TRANSACTION_DIRECTIVE`].
/// Any other `-- walshift:` comment line (misspelt, or not on line 1) is refused: a directive
/// that silently does nothing would run the script differently from what its author meant.
fn directive(name: &str, sql: &str) -> Result<bool, MigrateError> {
    let mut no_transaction = false;
    for (i, line) in sql.lines().enumerate() {
        let l = line.trim();
        let Some(rest) = l.strip_prefix("--") else {
            continue;
        };
        if !rest.trim_start().starts_with("walshift:") {
            continue;
        }
        let canonical = rest.trim_start() == "walshift:no-transaction";
        if canonical && i == 0 {
            no_transaction = true;
        } else {
            return Err(MigrateError::BadDirective {
                name: name.to_owned(),
                line: i as u32 + 1,
                text: l.to_owned(),
            });
        }
    }
    Ok(no_transaction)
}

/// Up to three leading words of a statement, uppercased, for messages.
fn first_words(stmt: &str) -> String {
    stmt.split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty())
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
        .to_uppercase()
}

/// State of the statement being scanned.
#[derive(Default)]
struct Current {
    start: Option<usize>,
    /// Lowercased leading words (up to 4) of the statement.
    words: Vec<String>,
    paren: i32,
    /// `BEGIN … END` nesting inside `CREATE [OR REPLACE] FUNCTION|PROCEDURE` (as `psql`).
    begin_depth: i32,
}

impl Current {
    fn is_routine(&self) -> bool {
        let w: Vec<&str> = self.words.iter().map(String::as_str).collect();
        matches!(
            w.as_slice(),
            ["create", "function" | "procedure", ..]
                | ["create", "or", "replace", "function" | "procedure", ..]
        )
    }

    fn word(&mut self, w: &str) {
        let lower = w.to_ascii_lowercase();
        if self.words.len() < 4 {
            self.words.push(lower.clone());
        }
        if self.paren == 0 && self.is_routine() {
            match lower.as_str() {
                "begin" => self.begin_depth += 1,
                "case" if self.begin_depth > 0 => self.begin_depth += 1,
                "end" if self.begin_depth > 0 => self.begin_depth -= 1,
                _ => {}
            }
        }
    }

    fn txn(&self) -> Option<TxnControl> {
        let w: Vec<&str> = self.words.iter().map(String::as_str).collect();
        match w.as_slice() {
            ["begin", ..] | ["start", "transaction", ..] => Some(TxnControl::Begin),
            ["commit" | "rollback", "prepared", ..] => None,
            ["rollback", "to", ..] | ["rollback", "transaction" | "work", "to", ..] => None,
            ["commit" | "end" | "rollback" | "abort", ..] => Some(TxnControl::End),
            ["prepare", "transaction", ..] => Some(TxnControl::End),
            _ => None,
        }
    }
}

/// Splits SQL into statements. `Err(line)` for a backslash outside any literal (a `psql`
/// meta-command such as `\i` or `\set`, which the server would reject as a syntax error).
/// Unterminated literals or comments run to the end of the text (the server reports them).
pub fn split(sql: &str) -> Result<Vec<Statement>, u32> {
    let mut out = Vec::new();
    let mut cur = Current::default();
    let finish = |cur: &mut Current, end: usize, out: &mut Vec<Statement>| {
        if let Some(start) = cur.start {
            out.push(Statement {
                start,
                end,
                line: line_of(sql, start),
                txn: cur.txn(),
            });
        }
        *cur = Current::default();
    };
    for t in tokens(sql) {
        let text = t.text(sql);
        match t.kind {
            // Comments and whitespace do not start a statement.
            TokenKind::Space | TokenKind::LineComment | TokenKind::BlockComment => continue,
            TokenKind::Punct if text == ";" && cur.paren == 0 && cur.begin_depth == 0 => {
                finish(&mut cur, t.end, &mut out);
                continue;
            }
            _ => {}
        }
        cur.start.get_or_insert(t.start);
        match (t.kind, text) {
            (TokenKind::Punct, "\\") => return Err(line_of(sql, t.start)),
            (TokenKind::Punct, "(") => cur.paren += 1,
            (TokenKind::Punct, ")") => cur.paren -= 1,
            (TokenKind::Word, word) => cur.word(word),
            _ => {}
        }
    }
    finish(&mut cur, sql.len(), &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(sql: &str) -> Result<Script, MigrateError> {
        Script::from_bytes("t.sql".into(), "t.sql".into(), sql.as_bytes())
    }

    fn texts(sql: &str) -> Vec<String> {
        split(sql)
            .unwrap()
            .iter()
            .map(|s| sql[s.start..s.end].to_owned())
            .collect()
    }

    #[test]
    fn splits_like_psql() {
        let sql = "-- c; c\nCREATE TABLE t (a int); /* x; /* nested; */ y */ INSERT INTO t VALUES (1);\n\
                   SELECT 'a;b', E'it\\'s;', \"we;ird\", $$ ; $$, $f$ $$; $f$;\n\
                   DO $$ BEGIN PERFORM 1; END $$;\n\
                   CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; SELECT 2; END;\n\
                   SELECT $1 ; tail";
        let t = texts(sql);
        assert_eq!(t.len(), 7, "{t:#?}");
        assert_eq!(t[0], "CREATE TABLE t (a int);");
        assert_eq!(t[1], "INSERT INTO t VALUES (1);");
        assert!(t[2].ends_with("$f$ $$; $f$;"), "{}", t[2]);
        assert!(t[3].starts_with("DO $$"));
        assert!(t[4].ends_with("SELECT 2; END;"), "{}", t[4]);
        assert_eq!(t[5], "SELECT $1 ;");
        assert_eq!(t[6], "tail");
        assert_eq!(split(sql).unwrap()[1].line, 2);
    }

    /// Corner cases of the lexer, pinned as they behave (they follow PostgreSQL 15's lexer:
    /// a number ends where a letter starts, `1e'…'` is 1 followed by an E'…' string).
    #[test]
    fn lexer_corners() {
        assert_eq!(texts("SELECT 1e'\\';' ; x"), ["SELECT 1e'\\';' ;", "x"]);
        assert_eq!(texts("SELECT 1$a$;$a$; x"), ["SELECT 1$a$;$a$;", "x"]);
        assert_eq!(texts("SELECT $é$;$é$; x"), ["SELECT $é$;$é$;", "x"]);
        assert_eq!(texts("SELECT a$b; $1;"), ["SELECT a$b;", "$1;"]);
        assert_eq!(texts("SELECT $_1$;$_1$, $1$;"), ["SELECT $_1$;$_1$, $1$;"]);
        assert_eq!(texts("SELECT \"a\"\";\"; x"), ["SELECT \"a\"\";\";", "x"]);
        assert_eq!(texts("SELECT 'a''; '; x"), ["SELECT 'a''; ';", "x"]);
        assert_eq!(texts("SELECT e'\\\\'; x"), ["SELECT e'\\\\';", "x"]);
        assert_eq!(texts("SELECT é; -- ;\n/* ; */ x"), ["SELECT é;", "x"]);
        assert_eq!(texts("SELECT 'open; x"), ["SELECT 'open; x"]);
        assert_eq!(texts("SELECT /* open; x"), ["SELECT /* open; x"]);
        assert_eq!(texts("SELECT $t$ open; x"), ["SELECT $t$ open; x"]);
        assert_eq!(texts("SELECT e'\\"), ["SELECT e'\\"]);
        assert_eq!(texts(";;\x0b;"), ["\x0b;"]);
        assert_eq!(
            split("1 commit; 2begin;").unwrap()[0].txn,
            Some(TxnControl::End)
        );
        assert_eq!(split("2begin;").unwrap()[0].txn, Some(TxnControl::Begin));
        assert_eq!(split("SELECT 1; x\\y").unwrap_err(), 1);
        assert_eq!(split("'\\' \"\\\" $$\\$$ -- \\\n/*\\*/").unwrap().len(), 1);
    }

    #[test]
    fn transaction_control_is_refused_in_a_transactional_script() {
        for (sql, line) in [
            ("CREATE TABLE a (x int);\nBEGIN;\nCOMMIT;", 2),
            ("SELECT 1;\n\n  commit;", 3),
            ("start transaction;", 1),
            ("SELECT 1; END;", 1),
            ("ABORT", 1),
            ("PREPARE TRANSACTION 'x'", 1),
        ] {
            match script(sql) {
                Err(MigrateError::TransactionControl { line: l, .. }) => {
                    assert_eq!(l, line, "{sql}")
                }
                other => panic!("{sql}: {other:?}"),
            }
        }
        for ok in [
            "SAVEPOINT a; ROLLBACK TO SAVEPOINT a; RELEASE a;",
            "DO $$ BEGIN COMMIT; END $$;",
            "CREATE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC INSERT INTO t VALUES (1); END;",
            "SELECT 'COMMIT;'; -- BEGIN;\n",
        ] {
            script(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn directive_and_no_transaction_rules() {
        let s = script("-- walshift:no-transaction\nBEGIN; SELECT 1; COMMIT;\nVACUUM;").unwrap();
        assert!(s.no_transaction);
        assert_eq!(s.statements.len(), 4);
        assert!(matches!(
            script("-- walshift:no-transaction\nBEGIN;\nSELECT 1;"),
            Err(MigrateError::TransactionLeftOpen { line: 2, .. })
        ));
        assert!(matches!(
            script("--walshift:no-transactions\n"),
            Err(MigrateError::BadDirective { line: 1, .. })
        ));
        assert!(matches!(
            script("SELECT 1;\n-- walshift:no-transaction\n"),
            Err(MigrateError::BadDirective { line: 2, .. })
        ));
        assert!(
            !script("-- walshift is great\nSELECT 1")
                .unwrap()
                .no_transaction
        );
    }

    #[test]
    fn meta_commands_and_encoding() {
        assert!(matches!(
            script("SELECT 1;\n\\i other.sql\n"),
            Err(MigrateError::MetaCommand { line: 2, .. })
        ));
        assert!(matches!(
            Script::from_bytes("t.sql".into(), "t.sql".into(), b"SELECT 1;\nSELECT '\xff'"),
            Err(MigrateError::NotUtf8 { line: 2, .. })
        ));
    }

    #[test]
    fn checksum_and_positions() {
        let s = script("\u{feff}SELECT 'é';\nSELECT nope;\n").unwrap();
        assert_eq!(s.sha256.len(), 64);
        assert_ne!(
            s.sha256,
            script("SELECT 'é';\nSELECT nope;\n").unwrap().sha256
        );
        // PostgreSQL counts characters: "nope" is character 20 of the text (é is one).
        assert_eq!(s.locate(0, &s.sql, 20), (2, "SELECT nope;".to_owned()));
        let st = &s.statements[1];
        assert_eq!(s.locate(st.start, s.statement_text(st), 8).0, 2);
    }
}
