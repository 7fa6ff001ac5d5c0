//! The one SQL lexer: where comments, string literals, quoted identifiers and dollar quotes
//! begin and end, so that a `;`, `(`, `--` or keyword inside one is never taken for SQL.
//!
//! Not a parser. Its readers are migrate's statement splitter (`migrate::script`) and
//! transform's expression reader (`transform::expr`); each decides what the tokens mean.
//! The rules are PostgreSQL's: `--` and nested `/* */` comments, `'…'` with `''`, `E'…'` with
//! backslash escapes too, `"…"` with `""`, `$tag$…$tag$` (a tag is letters, digits, `_` and
//! non-ASCII characters, not starting with a digit; `$1` is a parameter), identifiers that
//! may hold digits and `$`. Unterminated comments, literals and quotes run to the end of the
//! text (the server reports them). Positions are byte offsets, always on character boundaries.

/// What a token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// A run of ASCII whitespace (space, tab, newline, carriage return, form feed).
    Space,
    /// `-- …` up to, not including, the end of the line.
    LineComment,
    /// `/* … */`, nested.
    BlockComment,
    /// `'…'`, or `E'…'` (either case of `E`).
    String,
    /// `"…"`.
    QuotedIdent,
    /// `$tag$…$tag$` (the tag may be empty: `$$…$$`).
    DollarQuoted,
    /// An unquoted identifier or keyword.
    Word,
    /// A run of ASCII digits.
    Digits,
    /// Any other single character: operators, punctuation, the `$` of a parameter `$1`.
    Punct,
}

/// One token: its kind and byte range in the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub kind: TokenKind,
    pub start: usize,
    pub end: usize,
}

impl Token {
    /// The token's text in `sql`, the text it was read from.
    pub fn text<'a>(&self, sql: &'a str) -> &'a str {
        &sql[self.start..self.end]
    }
}

/// `sql` as tokens, in order; together they cover every byte.
pub fn tokens(sql: &str) -> impl Iterator<Item = Token> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let t = (at < sql.len()).then(|| token_at(sql, at))?;
        at = t.end;
        Some(t)
    })
}

/// A byte that may start an unquoted identifier (any byte of a non-ASCII character does).
pub fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

/// A byte that may continue an unquoted identifier.
pub fn is_ident_char(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

/// The token that starts at byte `at` of `sql` (a character boundary before its end).
pub fn token_at(sql: &str, at: usize) -> Token {
    let b = sql.as_bytes();
    let n = b.len();
    let next = |i: usize| b.get(i).copied();
    let run = |mut i: usize, f: fn(u8) -> bool| {
        while i < n && f(b[i]) {
            i += 1;
        }
        i
    };
    let (kind, end) = match b[at] {
        c if c.is_ascii_whitespace() => (TokenKind::Space, run(at, |c| c.is_ascii_whitespace())),
        b'-' if next(at + 1) == Some(b'-') => (
            TokenKind::LineComment,
            sql[at..].find('\n').map_or(n, |k| at + k),
        ),
        b'/' if next(at + 1) == Some(b'*') => (TokenKind::BlockComment, block_comment_end(b, at)),
        b'\'' => (TokenKind::String, string_end(b, at + 1, false)),
        b'E' | b'e' if next(at + 1) == Some(b'\'') => {
            (TokenKind::String, string_end(b, at + 2, true))
        }
        b'"' => (TokenKind::QuotedIdent, quoted_end(b, at + 1)),
        b'$' => match dollar_tag_end(b, at) {
            Some(tag_end) => {
                let tag = &sql[at..tag_end];
                let end = sql[tag_end..]
                    .find(tag)
                    .map_or(n, |k| tag_end + k + tag.len());
                (TokenKind::DollarQuoted, end)
            }
            None => (TokenKind::Punct, at + 1),
        },
        c if is_ident_start(c) => (TokenKind::Word, run(at, is_ident_char)),
        c if c.is_ascii_digit() => (TokenKind::Digits, run(at, |c| c.is_ascii_digit())),
        _ => {
            let len = sql[at..].chars().next().map_or(1, char::len_utf8);
            (TokenKind::Punct, at + len)
        }
    };
    Token {
        kind,
        start: at,
        end,
    }
}

/// The end of the opening `$tag$` at `at`, if a dollar quote opens there.
pub fn dollar_tag_end(b: &[u8], at: usize) -> Option<usize> {
    if b.get(at + 1).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let mut j = at + 1;
    while j < b.len() && (b[j] == b'_' || b[j].is_ascii_alphanumeric() || b[j] >= 0x80) {
        j += 1;
    }
    (b.get(j) == Some(&b'$')).then_some(j + 1)
}

/// The end of the nested `/* … */` comment at `at`.
fn block_comment_end(b: &[u8], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// The end of a `'…'` literal whose body starts at `i` (`''` is a quote; with `backslash`,
/// a backslash escapes the next byte).
fn string_end(b: &[u8], mut i: usize, backslash: bool) -> usize {
    while i < b.len() {
        match b[i] {
            b'\\' if backslash => i += 2,
            b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// The end of a `"…"` identifier whose body starts at `i` (`""` is a quote).
fn quoted_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        if b[i] == b'"' {
            if b.get(i + 1) == Some(&b'"') {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// The name a [`TokenKind::QuotedIdent`] token's text stands for: without its quotes, `""`
/// read as `"` (an unterminated one: everything after its opening quote).
pub fn unquote_ident(text: &str) -> String {
    let mut name = String::with_capacity(text.len());
    let mut chars = text.strip_prefix('"').unwrap_or(text).chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' {
            if chars.peek() != Some(&'"') {
                break;
            }
            chars.next();
        }
        name.push(c);
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use TokenKind::*;

    fn kinds(sql: &str) -> Vec<(TokenKind, &str)> {
        tokens(sql).map(|t| (t.kind, t.text(sql))).collect()
    }

    #[test]
    fn reads_each_kind() {
        assert_eq!(
            kinds("a1$ -- c;\n/* x /* y */ z */'it''s'E'\\''\"q\"\"\"$t$ $ $t$$1 12.é;"),
            vec![
                (Word, "a1$"),
                (Space, " "),
                (LineComment, "-- c;"),
                (Space, "\n"),
                (BlockComment, "/* x /* y */ z */"),
                (String, "'it''s'"),
                (String, "E'\\''"),
                (QuotedIdent, "\"q\"\"\""),
                (DollarQuoted, "$t$ $ $t$"),
                (Punct, "$"),
                (Digits, "1"),
                (Space, " "),
                (Digits, "12"),
                (Punct, "."),
                (Word, "é"),
                (Punct, ";"),
            ]
        );
    }

    #[test]
    fn unterminated_runs_to_the_end() {
        for sql in ["'a", "e'\\", "\"a\"\"", "$x$ a $x", "/* /* */", "-- a"] {
            assert_eq!(kinds(sql).len(), 1, "{sql}");
        }
        assert_eq!(kinds("$1$a$")[0], (Punct, "$"));
        assert_eq!(kinds("$é$ x $é$"), vec![(DollarQuoted, "$é$ x $é$")]);
    }

    #[test]
    fn unquotes_identifiers() {
        assert_eq!(unquote_ident("\"My \"\"T\"\"\""), "My \"T\"");
        assert_eq!(unquote_ident("\"a\"\""), "a\"");
        assert_eq!(unquote_ident("\"open"), "open");
        assert_eq!(unquote_ident("\"\""), "");
    }

    proptest::proptest! {
        #[test]
        fn tokens_cover_the_text_on_char_boundaries(s in "[-/*'\"$eE0-9a_;() \n.é\\\\]{0,48}") {
            let mut at = 0;
            for t in tokens(&s) {
                proptest::prop_assert_eq!(t.start, at);
                proptest::prop_assert!(t.end > t.start && s.is_char_boundary(t.end));
                at = t.end;
            }
            proptest::prop_assert_eq!(at, s.len());
        }
    }
}
