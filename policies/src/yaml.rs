//! YAML with exact positions: a small spanned node tree built from `yaml-rust2`'s pull parser.
//!
//! Why not serde: `serde_yaml` is deprecated and, like most serde formats, reports only the
//! first error and has no positions for values. `yaml-rust2` is maintained, YAML 1.2
//! compliant, and its pull parser ([`yaml_rust2::parser::Parser::next_token`]) yields every
//! event with a [`yaml_rust2::scanner::Marker`] (line, column). [`parse`] turns those events
//! into a [`Node`] tree where every node keeps the position where it starts; the decoders in
//! [`crate::decode`] then walk the tree and report every problem at once, each at its node.
//!
//! The tree is deliberately untyped: a scalar is its text plus its [`ScalarStyle`], and the
//! decoder decides what it means (`5` is a number where a number is wanted, a string where a
//! name is wanted; a quoted `"5"` is always a string). Plain `~`, `null`, `Null`, `NULL` and an
//! empty value are [`NodeKind::Null`].
//!
//! Hostile input is refused before it costs much ([`Limits`]): files over 4 MiB are rejected
//! before parsing, nesting deeper than 64 levels and more than a million nodes stop the parse,
//! and anchors, aliases and tags are refused outright (so an alias bomb — "billion laughs" —
//! fails at its first anchor instead of expanding). A stream with more than one document is an
//! error. Syntax errors (tabs in indentation, unclosed brackets, …) carry `yaml-rust2`'s
//! message and position.
//!
//! ```
//! use fairgate_policies::yaml::{parse, Limits, NodeKind};
//!
//! let root = parse("rules:\n  - name: a\n", "p.yaml", &Limits::default()).unwrap();
//! let NodeKind::Map(entries) = &root.kind else { panic!() };
//! let (_, rules) = &entries[0];
//! assert_eq!((rules.mark.line, rules.mark.column), (2, 3));
//! ```

use std::fmt;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::error::{PolicyError, PolicyErrors};

/// A position in the source: 1-based line and column (columns count characters, not bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mark {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl Mark {
    /// A mark at `line:column` (both 1-based).
    pub const fn new(line: usize, column: usize) -> Mark {
        Mark { line, column }
    }

    fn from_marker(m: &Marker) -> Mark {
        // yaml-rust2 lines are 1-based, columns 0-based.
        Mark {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// How a scalar was written. Only plain scalars can be numbers, booleans or null.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScalarStyle {
    /// Unquoted.
    Plain,
    /// `'single quoted'`.
    SingleQuoted,
    /// `"double quoted"`.
    DoubleQuoted,
    /// A `|` literal block.
    Literal,
    /// A `>` folded block.
    Folded,
}

impl ScalarStyle {
    fn from_yaml(s: TScalarStyle) -> ScalarStyle {
        match s {
            TScalarStyle::Plain => ScalarStyle::Plain,
            TScalarStyle::SingleQuoted => ScalarStyle::SingleQuoted,
            TScalarStyle::DoubleQuoted => ScalarStyle::DoubleQuoted,
            TScalarStyle::Literal => ScalarStyle::Literal,
            TScalarStyle::Folded => ScalarStyle::Folded,
        }
    }
}

/// One YAML node with the position where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// What the node is.
    pub kind: NodeKind,
    /// Where it starts. For a block mapping, the position of its first key; for a null
    /// mapping value (`key:` with nothing after it, `key: ~`), the position of the key.
    pub mark: Mark,
}

/// The kinds of node.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// `~`, `null`, `Null`, `NULL` or nothing at all (plain scalars only).
    Null,
    /// Any other scalar, as written (after YAML unescaping), with its style.
    Scalar(String, ScalarStyle),
    /// A sequence (`- a` or `[a, b]`).
    Seq(Vec<Node>),
    /// A mapping in source order, duplicates included (the decoder reports them).
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The scalar text, if this is a scalar (of any style).
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar(s, _) => Some(s),
            _ => None,
        }
    }

    /// The scalar text if this is an unquoted scalar (the only kind that can be a number,
    /// boolean or null).
    pub fn as_plain(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar(s, ScalarStyle::Plain) => Some(s),
            _ => None,
        }
    }

    /// True for [`NodeKind::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self.kind, NodeKind::Null)
    }

    /// A short description for "found …" in error messages: `` `text` ``, `a list`, …
    pub fn describe(&self) -> String {
        match &self.kind {
            NodeKind::Null => "nothing".to_owned(),
            NodeKind::Scalar(s, ScalarStyle::Plain) => format!("`{}`", shorten(s)),
            NodeKind::Scalar(s, _) => format!("the string \"{}\"", shorten(s)),
            NodeKind::Seq(_) => "a list".to_owned(),
            NodeKind::Map(_) => "a mapping".to_owned(),
        }
    }
}

/// Cuts long text for error messages.
pub(crate) fn shorten(s: &str) -> String {
    const MAX: usize = 60;
    let mut out: String = s.chars().take(MAX).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out.replace('\n', "\\n")
}

/// Bounds on what [`parse`] accepts, against hostile or runaway input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest source accepted, in bytes (default 4 MiB). Checked before parsing.
    pub max_bytes: usize,
    /// Deepest nesting of lists and mappings (default 64).
    pub max_depth: usize,
    /// Most nodes in the document (default 1,000,000; a 10,000-rule policy needs ~200,000).
    pub max_nodes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 4 << 20,
            max_depth: 64,
            max_nodes: 1_000_000,
        }
    }
}

/// Parses one YAML document into a [`Node`] tree.
///
/// An empty document is a [`NodeKind::Null`] root at `1:1`. Errors are fatal here (the first
/// syntax error ends the parse): syntax, size, depth, node count, anchors/aliases, tags and a
/// second document. A leading byte-order mark is skipped.
pub fn parse(source: &str, file: &str, limits: &Limits) -> Result<Node, PolicyErrors> {
    if source.len() > limits.max_bytes {
        return Err(PolicyErrors::unlocated(
            file,
            format!(
                "file is {} bytes, more than the limit of {} bytes",
                source.len(),
                limits.max_bytes
            ),
        ));
    }
    let source = source.strip_prefix('\u{feff}').unwrap_or(source);
    Builder {
        parser: Parser::new_from_str(source),
        file,
        limits,
        nodes: 0,
    }
    .run()
}

/// A container being built.
enum Frame {
    Seq(Mark, Vec<Node>),
    Map(Mark, Vec<(Node, Node)>, Option<Node>),
}

struct Builder<'a, 's> {
    parser: Parser<std::str::Chars<'s>>,
    file: &'a str,
    limits: &'a Limits,
    nodes: usize,
}

impl Builder<'_, '_> {
    fn fail(&self, mark: Mark, message: impl Into<String>) -> PolicyErrors {
        PolicyErrors(vec![PolicyError {
            file: self.file.to_owned(),
            line: mark.line,
            column: mark.column,
            path: String::new(),
            message: message.into(),
        }])
    }

    fn next(&mut self) -> Result<(Event, Mark), PolicyErrors> {
        match self.parser.next_token() {
            Ok((ev, m)) => Ok((ev, Mark::from_marker(&m))),
            Err(e) => Err(self.fail(
                Mark::from_marker(e.marker()),
                format!("invalid yaml: {}", e.info()),
            )),
        }
    }

    fn run(mut self) -> Result<Node, PolicyErrors> {
        let mut root: Option<Node> = None;
        let mut stack: Vec<Frame> = Vec::new();
        let mut documents = 0usize;
        loop {
            let (event, mark) = self.next()?;
            let done = match event {
                Event::StreamStart | Event::Nothing | Event::DocumentEnd => None,
                Event::StreamEnd => break,
                Event::DocumentStart => {
                    documents += 1;
                    if documents > 1 {
                        return Err(self.fail(
                            mark,
                            "more than one yaml document in the file (remove the second `---`)",
                        ));
                    }
                    None
                }
                Event::Alias(_) => {
                    return Err(self.fail(
                        mark,
                        "yaml aliases (`*name`) are not supported: write the value out",
                    ))
                }
                Event::Scalar(value, style, anchor, tag) => {
                    self.check_node(mark, anchor, tag.is_some())?;
                    let style = ScalarStyle::from_yaml(style);
                    let null = style == ScalarStyle::Plain
                        && matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL");
                    let kind = if null {
                        NodeKind::Null
                    } else {
                        NodeKind::Scalar(value, style)
                    };
                    Some(Node { kind, mark })
                }
                Event::SequenceStart(anchor, tag) => {
                    self.check_node(mark, anchor, tag.is_some())?;
                    self.check_depth(mark, stack.len())?;
                    stack.push(Frame::Seq(mark, Vec::new()));
                    None
                }
                Event::MappingStart(anchor, tag) => {
                    self.check_node(mark, anchor, tag.is_some())?;
                    self.check_depth(mark, stack.len())?;
                    stack.push(Frame::Map(mark, Vec::new(), None));
                    None
                }
                Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                    Some(Frame::Seq(mark, items)) => Some(Node {
                        kind: NodeKind::Seq(items),
                        mark,
                    }),
                    Some(Frame::Map(mut mark, entries, _)) => {
                        // A block mapping's start event comes after its first key: point at
                        // the key instead, which is where the mapping visibly starts.
                        if let Some((k, _)) = entries.first() {
                            mark = mark.min(k.mark);
                        }
                        Some(Node {
                            kind: NodeKind::Map(entries),
                            mark,
                        })
                    }
                    None => return Err(self.fail(mark, "invalid yaml: unbalanced end of node")),
                },
            };
            let Some(node) = done else { continue };
            match stack.last_mut() {
                None => root = Some(node),
                Some(Frame::Seq(_, items)) => items.push(node),
                Some(Frame::Map(_, entries, pending)) => match pending.take() {
                    None => *pending = Some(node),
                    Some(key) => {
                        let mut value = node;
                        // `key:` with nothing after it: the empty scalar's event sits on the
                        // next line; the key is where the user looks (for `key: ~` too).
                        if value.is_null() && value.mark > key.mark {
                            value.mark = key.mark;
                        }
                        entries.push((key, value));
                    }
                },
            }
        }
        Ok(root.unwrap_or(Node {
            kind: NodeKind::Null,
            mark: Mark::new(1, 1),
        }))
    }

    fn check_node(&mut self, mark: Mark, anchor: usize, tagged: bool) -> Result<(), PolicyErrors> {
        if anchor != 0 {
            return Err(self.fail(
                mark,
                "yaml anchors (`&name`) are not supported: write the value out",
            ));
        }
        if tagged {
            return Err(self.fail(mark, "yaml tags (`!tag`) are not supported"));
        }
        self.nodes += 1;
        if self.nodes > self.limits.max_nodes {
            return Err(self.fail(
                mark,
                format!("more than {} yaml nodes", self.limits.max_nodes),
            ));
        }
        Ok(())
    }

    fn check_depth(&self, mark: Mark, open: usize) -> Result<(), PolicyErrors> {
        if open >= self.limits.max_depth {
            return Err(self.fail(
                mark,
                format!("nesting deeper than {} levels", self.limits.max_depth),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(src: &str) -> Result<Node, PolicyErrors> {
        parse(src, "t.yaml", &Limits::default())
    }

    fn map(n: &Node) -> &[(Node, Node)] {
        match &n.kind {
            NodeKind::Map(e) => e,
            other => panic!("not a map: {other:?}"),
        }
    }

    #[test]
    fn marks_are_one_based_and_point_at_the_node() {
        let root = p("a: 1\nb:\n  - x\n  - 'y'\nc: {d: e}\n").unwrap();
        assert_eq!(root.mark, Mark::new(1, 1));
        let e = map(&root);
        assert_eq!(e[0].0.mark, Mark::new(1, 1));
        assert_eq!(e[0].1.mark, Mark::new(1, 4));
        let NodeKind::Seq(items) = &e[1].1.kind else {
            panic!()
        };
        assert_eq!(items[0].mark, Mark::new(3, 5));
        assert_eq!(
            items[1].kind,
            NodeKind::Scalar("y".into(), ScalarStyle::SingleQuoted)
        );
        assert_eq!(e[2].1.mark, Mark::new(5, 4));
        assert_eq!(map(&e[2].1)[0].1.mark, Mark::new(5, 8));
    }

    #[test]
    fn block_mapping_in_a_list_starts_at_its_first_key() {
        let root = p("rules:\n  - name: a\n    action: deny\n").unwrap();
        let NodeKind::Seq(items) = &map(&root)[0].1.kind else {
            panic!()
        };
        assert_eq!(items[0].mark, Mark::new(2, 5));
    }

    #[test]
    fn nulls_and_empty_values_point_at_the_key() {
        let root = p("a:\nb: ~\nc: null\nd: 'null'\n").unwrap();
        let e = map(&root);
        assert!(e[0].1.is_null());
        assert_eq!(e[0].1.mark, Mark::new(1, 1));
        assert!(e[1].1.is_null());
        assert!(e[2].1.is_null());
        assert_eq!(e[3].1.as_str(), Some("null"));
    }

    #[test]
    fn columns_count_characters_and_bom_is_skipped() {
        let root = p("\u{feff}k: [é, b]\n").unwrap();
        let e = map(&root);
        assert_eq!(e[0].0.as_str(), Some("k"));
        let NodeKind::Seq(items) = &e[0].1.kind else {
            panic!()
        };
        assert_eq!(items[1].mark, Mark::new(1, 8));
    }

    #[test]
    fn empty_document_is_null() {
        assert!(p("").unwrap().is_null());
        assert!(p("# only a comment\n").unwrap().is_null());
        assert!(p("---\n").unwrap().is_null());
    }

    #[test]
    fn syntax_error_has_yaml_rust2_position() {
        let e = p("a:\n\t- b\n").unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!((e.0[0].line, e.0[0].column), (2, 2));
        assert!(e.0[0].message.starts_with("invalid yaml: tabs"), "{e}");
    }

    #[test]
    fn second_document_is_an_error() {
        let e = p("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.yaml:2:1: more than one yaml document in the file (remove the second `---`)"
        );
    }

    #[test]
    fn anchors_aliases_and_tags_are_refused() {
        let e = p("a: &x 1\nb: *x\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.yaml:1:7: yaml anchors (`&name`) are not supported: write the value out"
        );
        // An alias needs an anchor, which is refused first; a dangling one is a syntax error.
        let e = p("a: *x\n").unwrap_err();
        assert!(e.to_string().contains("unknown anchor"), "{e}");
        let e = p("a: !!str 5\n").unwrap_err();
        assert!(e.to_string().contains("tags"), "{e}");
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits {
            max_bytes: 10,
            ..Limits::default()
        };
        let e = parse("a: 12345678901", "t.yaml", &limits).unwrap_err();
        assert_eq!(e.0[0].line, 0);
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        let e = p(&deep).unwrap_err();
        assert_eq!(e.0[0].message, "nesting deeper than 64 levels");
        assert_eq!((e.0[0].line, e.0[0].column), (1, 65));
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(p(&ok).is_ok());
        let limits = Limits {
            max_nodes: 3,
            ..Limits::default()
        };
        assert!(parse("[1, 2, 3]", "t.yaml", &limits).is_err());
        assert!(parse("[1, 2]", "t.yaml", &limits).is_ok());
    }
}
