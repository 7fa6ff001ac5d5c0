//! SQL text helpers: every identifier and literal walshift puts into SQL goes through here.

/// Quotes an identifier: `my "table"` → `"my ""table"""`.
pub fn quote_ident(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 2);
    s.push('"');
    for c in name.chars() {
        if c == '"' {
            s.push('"');
        }
        s.push(c);
    }
    s.push('"');
    s
}

/// Quotes a schema-qualified name: `("public", "t")` → `"public"."t"`.
pub fn quote_qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// Quotes a string literal: `it's` → `'it''s'`. Standard-conforming strings are assumed
/// (the default since PostgreSQL 9.1).
pub fn quote_literal(value: &str) -> String {
    let mut s = String::with_capacity(value.len() + 2);
    s.push('\'');
    for c in value.chars() {
        if c == '\'' {
            s.push('\'');
        }
        s.push(c);
    }
    s.push('\'');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("t"), "\"t\"");
        assert_eq!(quote_ident("my \"t\""), "\"my \"\"t\"\"\"");
        assert_eq!(quote_qualified("public", "Order"), "\"public\".\"Order\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
