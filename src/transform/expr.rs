//! What a mapping expression reads (pure, no I/O): the identifiers it mentions and the
//! functions it names, read from the tokens of [`crate::sql::lexer`] (string literals, dollar
//! quotes, comments and numbers skipped).
//!
//! PostgreSQL itself type-checks the expressions (the compiler prepares them on the target);
//! this module only answers "which source columns could this expression read?", which replay
//! needs when an update does not carry a TOASTed value. The answer is conservative: a function
//! or type spelled like a column counts as a read, which can only make replay ask for a value
//! it did not need, never use a value it did not have.

use crate::sql::lexer::{self, TokenKind};

/// The identifiers in `expr`, unquoted ones folded to lower case, in order of appearance
/// (duplicates kept).
pub fn identifiers(expr: &str) -> Vec<String> {
    tokens(expr)
        .into_iter()
        .filter_map(|t| match t {
            Token::Ident(name) => Some(name),
            _ => None,
        })
        .collect()
}

/// A function named in an expression: `name(` or `schema.name(`, names as PostgreSQL folds
/// them (unquoted lower-cased).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionCall {
    pub schema: Option<String>,
    pub name: String,
}

/// Every identifier directly followed by `(` (comments and whitespace between allowed), with
/// its schema when qualified. Conservative: SQL keywords with parentheses (`in (`, `any (`)
/// and type modifiers (`numeric(10, 2)`) come out too; resolving the names against `pg_proc`
/// sorts them out (a keyword is no function). Calls made through operators, casts or inside
/// other functions are not visible here.
pub fn function_calls(expr: &str) -> Vec<FunctionCall> {
    let t = tokens(expr);
    let mut out = Vec::new();
    for i in 0..t.len() {
        let (Token::Ident(name), Some(Token::Open)) = (&t[i], t.get(i + 1)) else {
            continue;
        };
        let schema = match (
            i.checked_sub(2).map(|j| &t[j]),
            i.checked_sub(1).map(|j| &t[j]),
        ) {
            (Some(Token::Ident(schema)), Some(Token::Dot)) => Some(schema.clone()),
            _ => None,
        };
        out.push(FunctionCall {
            schema,
            name: name.clone(),
        });
    }
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Ident(String),
    Dot,
    Open,
    Other,
}

/// `expr` as tokens: identifiers (unquoted folded to lower case), `.`, `(`, and everything else
/// (literals, numbers, operators) as [`Token::Other`]; whitespace and comments dropped.
///
/// Two readings differ from PostgreSQL's and are kept as they were before the lexers were
/// merged: a number runs on through letters, digits, `.` and `_` (`1abc` is one token), and a
/// `$` right after a letter or digit, or before a dollar-quote tag with a non-ASCII character,
/// is an operator rather than the opening of a dollar quote.
fn tokens(expr: &str) -> Vec<Token> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let t = lexer::token_at(expr, i);
        i = t.end;
        match t.kind {
            TokenKind::Space | TokenKind::LineComment | TokenKind::BlockComment => {}
            TokenKind::Word => out.push(Token::Ident(t.text(expr).to_lowercase())),
            TokenKind::QuotedIdent => out.push(Token::Ident(lexer::unquote_ident(t.text(expr)))),
            TokenKind::Digits => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_')
                {
                    i += 1;
                }
                out.push(Token::Other);
            }
            TokenKind::DollarQuoted => {
                let tag = t.text(expr)[1..].split('$').next().unwrap_or_default();
                if prev_is_word(b, t.start) || !tag.is_ascii() {
                    // The `$` alone, as an operator.
                    i = t.start + 1;
                }
                out.push(Token::Other);
            }
            TokenKind::Punct if b[t.start] == b'.' => out.push(Token::Dot),
            TokenKind::Punct if b[t.start] == b'(' => out.push(Token::Open),
            TokenKind::String | TokenKind::Punct => out.push(Token::Other),
        }
    }
    out
}

fn prev_is_word(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] >= 0x80)
}

/// If `expr` is nothing but one column reference (`amount`, `"Amount"`), that name.
pub fn bare_column(expr: &str) -> Option<String> {
    let e = expr.trim();
    if let Some(inner) = e.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        if inner.contains('"') && !inner.contains("\"\"") {
            return None;
        }
        return Some(inner.replace("\"\"", "\""));
    }
    let ok = e
        .chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
        && e.chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '$');
    ok.then(|| e.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_identifiers_outside_literals_and_comments() {
        assert_eq!(
            identifiers("first || ' ' || \"Last\" -- last\n /* x */ || E'it\\'s y' || $q$z$q$"),
            vec!["first", "Last"]
        );
        assert_eq!(
            identifiers("(amount * 100.5e3)::bigint + $1"),
            vec!["amount", "bigint"]
        );
        assert_eq!(
            identifiers("coalesce(note, 'x''y')"),
            vec!["coalesce", "note"]
        );
        assert_eq!(identifiers("name"), vec!["name"]);
        assert_eq!(identifiers("e'x' || e"), vec!["e"]);
    }

    /// Corner cases of the lexer, pinned as they behave.
    #[test]
    fn lexer_corners() {
        // A number runs on through letters, digits, `.` and `_`; a `$` right after it is an
        // operator, not a dollar quote.
        assert_eq!(identifiers("1abc + x"), ["x"]);
        assert_eq!(identifiers("1e'a\\' || z"), ["z"]);
        assert_eq!(identifiers("1_000.5e3x y"), ["y"]);
        assert_eq!(identifiers("1$a$ b $a$"), ["a$", "b"]);
        assert_eq!(identifiers("1.$a$ b $a$ c"), ["c"]);
        // Dollar-quote tags are ASCII letters, digits and `_`, not starting with a digit.
        assert_eq!(identifiers("$é$ x $é$"), ["é$", "x", "é$"]);
        assert_eq!(identifiers("$_1$ x $_1$ y $1 z"), ["y", "z"]);
        assert_eq!(identifiers("$$ x"), Vec::<String>::new());
        assert_eq!(identifiers("\"a\"\"b\" + \"open"), ["a\"b", "open"]);
        assert_eq!(identifiers("\"a\"\""), ["a\""]);
        assert_eq!(identifiers("Ä + ÉCOLE_x$1"), ["ä", "école_x$1"]);
        assert_eq!(
            identifiers("x -- y\n z /* a /* b */ c */ d"),
            ["x", "z", "d"]
        );
        assert_eq!(identifiers("e'\\' x' y E'' z"), ["y", "z"]);
        assert_eq!(identifiers("'open x"), Vec::<String>::new());
        assert_eq!(identifiers("e'\\"), Vec::<String>::new());
        assert_eq!(identifiers("a\x0bb"), ["a", "b"]);
        assert_eq!(
            function_calls("f /* ( */ -- (\n (1) + \"G\" . h(2) + 3(4) + $$ x $$ (5)"),
            vec![
                FunctionCall {
                    schema: None,
                    name: "f".into()
                },
                FunctionCall {
                    schema: Some("G".into()),
                    name: "h".into()
                },
            ]
        );
    }

    #[test]
    fn finds_function_calls() {
        let call = |schema: Option<&str>, name: &str| FunctionCall {
            schema: schema.map(str::to_owned),
            name: name.into(),
        };
        assert_eq!(
            function_calls(
                "pg_catalog.pg_terminate_backend (id) + Random() * \"My Fn\"(x)::numeric(10, 2) \
                 || 'f(x)' || s.col /* g( */ || public . h ( 1 ) || 1.5"
            ),
            vec![
                call(Some("pg_catalog"), "pg_terminate_backend"),
                call(None, "random"),
                call(None, "My Fn"),
                call(None, "numeric"),
                call(Some("public"), "h"),
            ]
        );
        assert_eq!(function_calls("amount * 2"), vec![]);
    }

    #[test]
    fn bare_columns() {
        assert_eq!(bare_column(" Amount "), Some("amount".into()));
        assert_eq!(bare_column("\"Amount\""), Some("Amount".into()));
        assert_eq!(bare_column("amount + 1"), None);
        assert_eq!(bare_column("1"), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in ".{0,64}") {
            let _ = identifiers(&s);
            let _ = function_calls(&s);
            let _ = bare_column(&s);
        }
    }
}
