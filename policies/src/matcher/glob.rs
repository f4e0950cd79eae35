//! Glob patterns, translated to `regex` syntax so they join a field's one multi-pattern
//! regex automaton.
//!
//! Syntax (a glob always matches the whole value):
//! - `*` any run of characters, `/` included (`**` is the same as `*`);
//! - `?` exactly one character;
//! - `[abc]`, `[a-z]` one character of the class; `[!a-z]` or `[^a-z]` one character not in
//!   it; `]` first in a class and `-` first or last are literal;
//! - `{a,b,c}` one of the alternatives, which are globs themselves (they may nest);
//! - `\c` the character `c` literally; every other character matches itself.
//!
//! With `ignore_case`, ASCII letters match either case (also inside classes); other
//! characters are compared exactly, like the literal pattern kinds.

/// Why a glob pattern is invalid. Lower case, no full stop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    /// A `[` without its `]`.
    #[error("unclosed character class `[`")]
    UnclosedClass,
    /// A `{` without its `}`.
    #[error("unclosed alternation `{{`")]
    UnclosedAlternation,
    /// A `}` without a `{`.
    #[error("unmatched `}}`")]
    UnmatchedBrace,
    /// A range like `[z-a]`.
    #[error("invalid range `{0}-{1}` in character class")]
    BadRange(char, char),
    /// The pattern ends with a lone `\`.
    #[error("dangling escape `\\` at the end of the pattern")]
    DanglingEscape,
    /// `{` nested too deep.
    #[error("alternations nested deeper than {0} levels")]
    TooDeep(usize),
}

/// Deepest `{…}` nesting accepted.
const MAX_BRACE_DEPTH: usize = 32;

/// Translates a glob to an equivalent `regex` crate pattern anchored at both ends.
///
/// Use it to validate globs ahead of compiling: the rule set compiles exactly this output.
pub fn glob_to_regex(glob: &str, ignore_case: bool) -> Result<String, GlobError> {
    let mut out = String::with_capacity(glob.len() * 2 + 8);
    out.push_str("^(?s:");
    let mut chars = glob.chars().peekable();
    let mut depth = 0usize;
    while let Some(c) = chars.next() {
        match c {
            '*' => {
                while chars.peek() == Some(&'*') {
                    chars.next();
                }
                out.push_str(".*");
            }
            '?' => out.push('.'),
            '[' => class(&mut chars, ignore_case, &mut out)?,
            '{' => {
                depth += 1;
                if depth > MAX_BRACE_DEPTH {
                    return Err(GlobError::TooDeep(MAX_BRACE_DEPTH));
                }
                out.push_str("(?:");
            }
            ',' if depth > 0 => out.push('|'),
            '}' => {
                if depth == 0 {
                    return Err(GlobError::UnmatchedBrace);
                }
                depth -= 1;
                out.push(')');
            }
            '\\' => match chars.next() {
                Some(e) => literal(e, ignore_case, &mut out),
                None => return Err(GlobError::DanglingEscape),
            },
            c => literal(c, ignore_case, &mut out),
        }
    }
    if depth > 0 {
        return Err(GlobError::UnclosedAlternation);
    }
    out.push_str(")$");
    Ok(out)
}

fn literal(c: char, ignore_case: bool, out: &mut String) {
    if ignore_case && c.is_ascii_alphabetic() {
        out.push('[');
        out.push(c.to_ascii_lowercase());
        out.push(c.to_ascii_uppercase());
        out.push(']');
    } else {
        push_escaped(c, out);
    }
}

/// Writes `c` in a form that is literal both inside and outside a class.
fn push_escaped(c: char, out: &mut String) {
    if c.is_ascii_alphanumeric() {
        out.push(c);
    } else {
        use std::fmt::Write;
        let _ = write!(out, "\\x{{{:x}}}", u32::from(c));
    }
}

/// Parses a class after its `[` and writes the regex class.
fn class(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    ignore_case: bool,
    out: &mut String,
) -> Result<(), GlobError> {
    let negated = matches!(chars.peek(), Some('!') | Some('^'));
    if negated {
        chars.next();
    }
    let mut ranges: Vec<(char, char)> = Vec::new();
    let mut first = true;
    loop {
        let c = chars.next().ok_or(GlobError::UnclosedClass)?;
        if c == ']' && !first {
            break;
        }
        first = false;
        let lo = if c == '\\' {
            chars.next().ok_or(GlobError::UnclosedClass)?
        } else {
            c
        };
        // `a-z`, but a `-` before the closing `]` is literal.
        let mut ahead = chars.clone();
        if ahead.next() == Some('-') && !matches!(ahead.peek(), Some(']') | None) {
            chars.next();
            let mut hi = chars.next().ok_or(GlobError::UnclosedClass)?;
            if hi == '\\' {
                hi = chars.next().ok_or(GlobError::UnclosedClass)?;
            }
            if hi < lo {
                return Err(GlobError::BadRange(lo, hi));
            }
            ranges.push((lo, hi));
        } else {
            ranges.push((lo, lo));
        }
    }
    if ignore_case {
        let mut extra = Vec::new();
        for &(lo, hi) in &ranges {
            for (from, to, shift) in [('a', 'z', -32i32), ('A', 'Z', 32)] {
                let (l, h) = (lo.max(from), hi.min(to));
                if l <= h {
                    let m = |c: char| char::from_u32((c as i32 + shift) as u32).unwrap_or(c);
                    extra.push((m(l), m(h)));
                }
            }
        }
        ranges.extend(extra);
    }
    out.push('[');
    if negated {
        out.push('^');
    }
    for (lo, hi) in ranges {
        push_escaped(lo, out);
        if hi != lo {
            out.push('-');
            push_escaped(hi, out);
        }
    }
    out.push(']');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_match(glob: &str, ic: bool, value: &str) -> bool {
        let re = regex::Regex::new(&glob_to_regex(glob, ic).unwrap()).unwrap();
        re.is_match(value)
    }

    #[test]
    fn globs_match_whole_values() {
        assert!(is_match("*.example.com", false, "api.example.com"));
        assert!(!is_match("*.example.com", false, "api.example.com.evil"));
        assert!(is_match("/api/*/users", false, "/api/v1/x/users"));
        assert!(is_match("/a/**/b", false, "/a/x/y/b"));
        assert!(is_match("h?llo", false, "héllo"));
        assert!(!is_match("h?llo", false, "hllo"));
        assert!(is_match("[a-c]x", false, "bx"));
        assert!(!is_match("[!a-c]x", false, "bx"));
        assert!(is_match("[^a-c]x", false, "dx"));
        assert!(is_match("[]]", false, "]"));
        assert!(is_match("[a-]", false, "-"));
        assert!(is_match("{foo,ba{r,z}}.txt", false, "baz.txt"));
        assert!(!is_match("{foo,bar}.txt", false, "foo,bar.txt"));
        assert!(is_match("a,b", false, "a,b"));
        assert!(is_match(r"\*\?\[", false, "*?["));
        assert!(is_match("x.y+(z)$^|", false, "x.y+(z)$^|"));
        assert!(!is_match("x.y", false, "xzy"));
        assert!(is_match("", false, ""));
        assert!(!is_match("", false, "a"));
        assert!(is_match("*", false, "multi\nline"));
    }

    #[test]
    fn ignore_case_folds_ascii_only() {
        assert!(is_match("CURL/*", true, "curl/8.0"));
        assert!(is_match("[a-c]", true, "B"));
        assert!(!is_match("[!a-c]", true, "B"));
        assert!(!is_match("k", true, "\u{212a}"));
        assert!(!is_match("CURL/*", false, "curl/8.0"));
    }

    #[test]
    fn invalid_globs_are_errors() {
        assert_eq!(glob_to_regex("[a", false), Err(GlobError::UnclosedClass));
        assert_eq!(
            glob_to_regex("{a,b", false),
            Err(GlobError::UnclosedAlternation)
        );
        assert_eq!(glob_to_regex("a}", false), Err(GlobError::UnmatchedBrace));
        assert_eq!(
            glob_to_regex("[z-a]", false),
            Err(GlobError::BadRange('z', 'a'))
        );
        assert_eq!(glob_to_regex("a\\", false), Err(GlobError::DanglingEscape));
        let deep = "{".repeat(40);
        assert_eq!(glob_to_regex(&deep, false), Err(GlobError::TooDeep(32)));
    }
}
