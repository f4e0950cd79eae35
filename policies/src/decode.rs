//! Decoding YAML nodes into typed values, reporting every error at once with its position.
//!
//! serde's derived deserialisers stop at the first error and know no positions, so the policy
//! (and the gateway's own config file) is decoded by hand from the spanned tree of
//! [`crate::yaml`], with the small toolkit in this module:
//!
//! - [`Ctx`] collects [`PolicyError`]s (`file:line:column: path: message`);
//! - [`Path`] is the dotted path of the node being decoded (`rules[2].when.user_agent`),
//!   built on the stack and only rendered when an error is reported;
//! - [`Decode`] decodes leaf types (numbers, booleans, strings, units, lists, maps);
//! - [`MapReader`] reads a mapping field by field, then [`MapReader::finish`] reports every key
//!   nobody asked for as `unknown field` with a "did you mean" hint;
//! - [`variant`], [`choice`], [`one_or_many`] and [`list`] cover the remaining YAML shapes.
//!
//! A decoder returns `Option<T>`: `None` means "an error was reported, there is no value".
//! Decoders keep going after an error so that siblings are still checked; the caller turns
//! the result into `Result` with [`Ctx::finish`], which fails if *any* error was reported.
//!
//! Decoders are generic over `C: AsMut<Ctx>`, so a caller can carry its own state (the policy
//! decoder collects names and references for cross-checks) next to the [`Ctx`].
//!
//! ```
//! use fairgate_policies::decode::{Ctx, Decode, MapReader, Path};
//! use fairgate_policies::yaml::{parse, Limits};
//!
//! let root = parse("listen: 8080\nworkers: -1\nlog: json\n", "gw.yaml", &Limits::default()).unwrap();
//! let mut ctx = Ctx::new("gw.yaml");
//! let mut m = MapReader::new(&mut ctx, &root, &Path::Root).unwrap();
//! let listen: Option<u16> = m.required(&mut ctx, "listen");
//! let workers: Option<u32> = m.optional(&mut ctx, "workers");
//! m.finish(&mut ctx);
//! assert_eq!(listen, Some(8080));
//! assert_eq!(workers, None);
//! let errors = ctx.finish(Some(())).unwrap_err();
//! assert_eq!(errors.to_string(), "\
//! gw.yaml:2:10: workers: expected a whole number, found `-1` (it must not be negative)
//! gw.yaml:3:1: log: unknown field `log` (expected one of `listen`, `workers`)");
//! ```
//!
//! The policy itself is read with [`parse_policy`]; the overrides file with
//! [`parse_overrides`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use crate::error::{PolicyError, PolicyErrors};
use crate::units::{ByteSize, Cidr, HumanDuration, Rate};
use crate::yaml::{Limits, Mark, Node, NodeKind};

mod policy;

pub use policy::{
    decode_overrides, decode_policy, decode_policy_in, parse_caps, parse_client_cap,
    parse_overrides, parse_overrides_for, parse_policy, parse_policy_bytes,
};

// === Path ===

/// The path of a node from the document root: `rules[2].when.ip[0]`.
///
/// A linked list on the stack: each level borrows its parent, so building a path allocates
/// nothing. Keys that are not plain identifiers are quoted: `clients["a.b"].plan`.
#[derive(Debug, Clone, Copy)]
pub enum Path<'a> {
    /// The document root (renders as the empty string).
    Root,
    /// A mapping key under a parent.
    Key(&'a Path<'a>, &'a str),
    /// A list index under a parent.
    Index(&'a Path<'a>, usize),
}

impl<'a> Path<'a> {
    /// The path of `key` under this one.
    pub fn key<'b>(&'b self, key: &'b str) -> Path<'b> {
        Path::Key(self, key)
    }

    /// The path of element `index` under this one.
    pub fn index(&self, index: usize) -> Path<'_> {
        Path::Index(self, index)
    }
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Key(parent, key) => {
                parent.fmt(f)?;
                let plain = !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if plain {
                    if !matches!(parent, Path::Root) {
                        f.write_str(".")?;
                    }
                    f.write_str(key)
                } else {
                    write!(f, "[{key:?}]")
                }
            }
            Path::Index(parent, i) => {
                parent.fmt(f)?;
                write!(f, "[{i}]")
            }
        }
    }
}

// === Ctx ===

/// Collects the errors of one file.
#[derive(Debug, Clone)]
pub struct Ctx {
    file: String,
    errors: Vec<PolicyError>,
}

impl Ctx {
    /// A context for errors in `file` (the name shown in messages).
    pub fn new(file: impl Into<String>) -> Ctx {
        Ctx {
            file: file.into(),
            errors: Vec::new(),
        }
    }

    /// The file name errors are reported against.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Reports `message` at `node`'s position.
    pub fn error(&mut self, node: &Node, path: &Path<'_>, message: impl Into<String>) {
        self.error_at(node.mark, path, message);
    }

    /// Reports `message` at `mark`.
    pub fn error_at(&mut self, mark: Mark, path: &Path<'_>, message: impl Into<String>) {
        self.push(mark, path.to_string(), message.into());
    }

    /// Reports `message` at `mark` for an already rendered path.
    pub fn push(&mut self, mark: Mark, path: String, message: String) {
        self.errors.push(PolicyError {
            file: self.file.clone(),
            line: mark.line,
            column: mark.column,
            path,
            message,
        });
    }

    /// True once anything was reported.
    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// The errors so far, in report order.
    pub fn errors(&self) -> &[PolicyError] {
        &self.errors
    }

    /// `Ok(value)` when nothing was reported, else every error sorted by position.
    pub fn finish<T>(self, value: Option<T>) -> Result<T, PolicyErrors> {
        match value {
            Some(v) if self.errors.is_empty() => Ok(v),
            _ => {
                let mut errors = PolicyErrors(self.errors);
                if errors.is_empty() {
                    // A decoder returned `None` without saying why: a bug, but still no panic.
                    errors = PolicyErrors::unlocated(self.file, "invalid document");
                }
                errors.sort();
                Err(errors)
            }
        }
    }
}

impl AsMut<Ctx> for Ctx {
    fn as_mut(&mut self) -> &mut Ctx {
        self
    }
}

// === Decode ===

/// A type that can be decoded from a node.
pub trait Decode: Sized {
    /// Decodes `node` (at `path`); `None` after reporting into `ctx`.
    fn decode(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Self>;
}

/// Reports "expected `what`, found …" at `node`.
pub fn expected(ctx: &mut Ctx, node: &Node, path: &Path<'_>, what: &str) {
    ctx.error(
        node,
        path,
        format!("expected {what}, found {}", node.describe()),
    );
}

/// The text of a scalar of any style; reports "expected `what`" for anything else.
pub fn scalar<'n>(ctx: &mut Ctx, node: &'n Node, path: &Path<'_>, what: &str) -> Option<&'n str> {
    match node.as_str() {
        Some(s) => Some(s),
        None => {
            expected(ctx, node, path, what);
            None
        }
    }
}

impl Decode for String {
    /// Any scalar: `5`, `true` and `abc` are all strings where a string is wanted.
    fn decode(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Self> {
        scalar(ctx, node, path, "a string").map(str::to_owned)
    }
}

impl Decode for bool {
    fn decode(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Self> {
        match node.as_plain() {
            Some("true" | "True" | "TRUE") => Some(true),
            Some("false" | "False" | "FALSE") => Some(false),
            _ => {
                expected(ctx, node, path, "`true` or `false`");
                None
            }
        }
    }
}

/// Decodes a plain non-negative decimal integer no greater than `max`.
pub fn uint(ctx: &mut Ctx, node: &Node, path: &Path<'_>, max: u64) -> Option<u64> {
    let Some(text) = node.as_plain() else {
        expected(ctx, node, path, "a whole number");
        return None;
    };
    let digits = text.strip_prefix('+').unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return match digits.parse::<u64>() {
            Ok(n) if n <= max => Some(n),
            _ => {
                ctx.error(node, path, format!("`{text}` is too large (at most {max})"));
                None
            }
        };
    }
    let negative = text
        .strip_prefix('-')
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    if negative {
        ctx.error(
            node,
            path,
            format!(
                "expected a whole number, found {} (it must not be negative)",
                node.describe()
            ),
        );
    } else {
        expected(ctx, node, path, "a whole number");
    }
    None
}

macro_rules! decode_uint {
    ($($t:ty),*) => {$(
        impl Decode for $t {
            fn decode(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Self> {
                // The bound makes the conversion infallible; `ok()` keeps it panic-free.
                uint(ctx, node, path, <$t>::MAX as u64).and_then(|n| <$t>::try_from(n).ok())
            }
        }
    )*};
}
decode_uint!(u8, u16, u32, u64, usize);

impl Decode for f64 {
    /// A plain YAML number (`0.7`, `1`, `5e-1`, `.inf`, `.nan`).
    fn decode(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Self> {
        let parsed = node.as_plain().and_then(|t| match t {
            ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => Some(f64::INFINITY),
            "-.inf" | "-.Inf" | "-.INF" => Some(f64::NEG_INFINITY),
            ".nan" | ".NaN" | ".NAN" => Some(f64::NAN),
            t if t.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '.' | '+' | '-')) => {
                t.parse().ok()
            }
            _ => None,
        });
        if parsed.is_none() {
            expected(ctx, node, path, "a number");
        }
        parsed
    }
}

/// Decodes a scalar with `FromStr`, reporting the parse error's message.
pub fn from_str<T>(ctx: &mut Ctx, node: &Node, path: &Path<'_>, what: &str) -> Option<T>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    let text = scalar(ctx, node, path, what)?;
    match text.parse() {
        Ok(v) => Some(v),
        Err(e) => {
            ctx.error(node, path, e.to_string());
            None
        }
    }
}

impl Decode for Rate {
    /// `100/s`, `5/min`, `3/10s`. The emission interval (period / count) must be at least 1ns.
    fn decode(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Self> {
        let rate: Rate = from_str(ctx, node, path, "a rate like `100/s` or `5/min`")?;
        match check_rate(&rate) {
            Ok(()) => Some(rate),
            Err(msg) => {
                ctx.error(node, path, msg);
                None
            }
        }
    }
}

/// A rate is usable when its emission interval (period / count) is at least 1ns.
pub(crate) fn check_rate(rate: &Rate) -> Result<(), String> {
    if rate.period_ns() / rate.count() == 0 {
        return Err(format!(
            "rate `{rate}` is too fast: its interval rounds to 0ns (at most {} per {})",
            rate.period_ns(),
            HumanDuration(rate.period()),
        ));
    }
    Ok(())
}

impl Decode for HumanDuration {
    fn decode(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Self> {
        from_str(ctx, node, path, "a duration like `250ms` or `5s`")
    }
}

impl Decode for crate::units::Timestamp {
    fn decode(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Self> {
        from_str(ctx, node, path, "a UTC time like `2026-12-06T09:30:00Z`")
    }
}

impl Decode for ByteSize {
    fn decode(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Self> {
        from_str(ctx, node, path, "a size like `512`, `64KiB` or `1MiB`")
    }
}

impl Decode for Cidr {
    fn decode(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Self> {
        from_str(ctx, node, path, "an ip address or cidr like `10.0.0.0/8`")
    }
}

impl<T: Decode> Decode for Option<T> {
    /// Null is `None`.
    fn decode(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Self> {
        if node.is_null() {
            Some(None)
        } else {
            T::decode(ctx, node, path).map(Some)
        }
    }
}

impl<T: Decode> Decode for Vec<T> {
    /// A YAML list; see [`one_or_many`] for fields that also take a single value.
    fn decode(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Self> {
        list(ctx, node, path, T::decode)
    }
}

impl<T: Decode> Decode for BTreeMap<String, T> {
    /// A mapping with string keys (duplicates reported).
    fn decode(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Self> {
        let entries = map_entries(ctx, node, path)?;
        let mut out = BTreeMap::new();
        let mut ok = true;
        for e in entries {
            let p = path.key(e.key);
            match T::decode(ctx, e.value, &p) {
                Some(v) => {
                    out.insert(e.key.to_owned(), v);
                }
                None => ok = false,
            }
        }
        ok.then_some(out)
    }
}

// === shapes ===

/// Decodes a YAML list element by element (paths `…[i]`); every element is checked.
pub fn list<'n, C, T>(
    c: &mut C,
    node: &'n Node,
    path: &Path<'_>,
    mut f: impl FnMut(&mut C, &'n Node, &Path<'_>) -> Option<T>,
) -> Option<Vec<T>>
where
    C: AsMut<Ctx>,
{
    let NodeKind::Seq(items) = &node.kind else {
        expected(c.as_mut(), node, path, "a list");
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match f(c, item, &path.index(i)) {
            Some(v) => out.push(v),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// Decodes either a list (paths `…[i]`) or a single value (path unchanged) into a `Vec`.
pub fn one_or_many<'n, C, T>(
    c: &mut C,
    node: &'n Node,
    path: &Path<'_>,
    mut f: impl FnMut(&mut C, &'n Node, &Path<'_>) -> Option<T>,
) -> Option<Vec<T>>
where
    C: AsMut<Ctx>,
{
    if matches!(node.kind, NodeKind::Seq(_)) {
        list(c, node, path, f)
    } else {
        f(c, node, path).map(|v| vec![v])
    }
}

/// One key of a mapping, with its nodes.
#[derive(Debug, Clone, Copy)]
pub struct MapEntry<'n> {
    /// The key text.
    pub key: &'n str,
    /// The key node (where "unknown field" and "duplicate key" point).
    pub key_node: &'n Node,
    /// The value node.
    pub value: &'n Node,
}

/// The entries of a mapping with string keys, in source order. Reports a non-mapping, keys
/// that are not scalars, and duplicate keys (only the first of duplicates is returned).
pub fn map_entries<'n>(
    ctx: &mut Ctx,
    node: &'n Node,
    path: &Path<'_>,
) -> Option<Vec<MapEntry<'n>>> {
    let NodeKind::Map(pairs) = &node.kind else {
        expected(ctx, node, path, "a mapping");
        return None;
    };
    let mut seen: HashMap<&str, Mark> = HashMap::with_capacity(pairs.len());
    let mut out = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        let Some(key) = k.as_str() else {
            ctx.error(
                k,
                path,
                format!("mapping keys must be strings, found {}", k.describe()),
            );
            continue;
        };
        if let Some(first) = seen.get(key) {
            ctx.error(
                k,
                &path.key(key),
                format!(
                    "duplicate key `{}` (first at line {}, column {})",
                    crate::yaml::shorten(key),
                    first.line,
                    first.column
                ),
            );
            continue;
        }
        seen.insert(key, k.mark);
        out.push(MapEntry {
            key,
            key_node: k,
            value: v,
        });
    }
    Some(out)
}

/// Reads a mapping with known fields, then reports the unknown ones.
///
/// Every key asked for through [`MapReader::required`], [`MapReader::optional`] (and their
/// `_with` forms) or [`MapReader::entry`] counts as known; [`MapReader::finish`] reports the
/// rest, suggesting the closest known key.
#[derive(Debug)]
pub struct MapReader<'n, 'p> {
    node: &'n Node,
    path: Path<'p>,
    entries: Vec<MapEntry<'n>>,
    used: Vec<bool>,
    known: Vec<&'static str>,
}

impl<'n, 'p> MapReader<'n, 'p> {
    /// Starts reading `node`, which must be a mapping (see [`map_entries`]).
    pub fn new<C: AsMut<Ctx>>(c: &mut C, node: &'n Node, path: &Path<'p>) -> Option<Self> {
        let entries = map_entries(c.as_mut(), node, path)?;
        Some(MapReader {
            node,
            path: *path,
            used: vec![false; entries.len()],
            entries,
            known: Vec::new(),
        })
    }

    /// The mapping node.
    pub fn node(&self) -> &'n Node {
        self.node
    }

    /// The mapping's path.
    pub fn path(&self) -> Path<'p> {
        self.path
    }

    /// True when the mapping has no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry for `key`, if present (null values included); marks it known and used.
    pub fn entry(&mut self, key: &'static str) -> Option<MapEntry<'n>> {
        if !self.known.contains(&key) {
            self.known.push(key);
        }
        let i = self.entries.iter().position(|e| e.key == key)?;
        self.used[i] = true;
        Some(self.entries[i])
    }

    /// Decodes required field `key` with `f`; reports it missing at the mapping.
    pub fn required_with<C, T>(
        &mut self,
        c: &mut C,
        key: &'static str,
        f: impl FnOnce(&mut C, &'n Node, &Path<'_>) -> Option<T>,
    ) -> Option<T>
    where
        C: AsMut<Ctx>,
    {
        match self.entry(key) {
            Some(e) => {
                let parent = self.path;
                f(c, e.value, &parent.key(key))
            }
            None => {
                c.as_mut()
                    .error(self.node, &self.path, format!("missing field `{key}`"));
                None
            }
        }
    }

    /// Decodes optional field `key` with `f`. Absent or null (`key:`, `key: ~`) is `None`;
    /// so is a value that failed to decode (after reporting it).
    pub fn optional_with<C, T>(
        &mut self,
        c: &mut C,
        key: &'static str,
        f: impl FnOnce(&mut C, &'n Node, &Path<'_>) -> Option<T>,
    ) -> Option<T>
    where
        C: AsMut<Ctx>,
    {
        let e = self.entry(key)?;
        if e.value.is_null() {
            return None;
        }
        let parent = self.path;
        f(c, e.value, &parent.key(key))
    }

    /// [`MapReader::required_with`] for a [`Decode`] type.
    pub fn required<C: AsMut<Ctx>, T: Decode>(
        &mut self,
        c: &mut C,
        key: &'static str,
    ) -> Option<T> {
        self.required_with(c, key, |c, n, p| T::decode(c.as_mut(), n, p))
    }

    /// [`MapReader::optional_with`] for a [`Decode`] type.
    pub fn optional<C: AsMut<Ctx>, T: Decode>(
        &mut self,
        c: &mut C,
        key: &'static str,
    ) -> Option<T> {
        self.optional_with(c, key, |c, n, p| T::decode(c.as_mut(), n, p))
    }

    /// Decodes field `key` with `f` if present, passing a null value on to `f` (which usually
    /// reports it): for fields where an empty value is a mistake rather than "absent".
    pub fn present_with<C, T>(
        &mut self,
        c: &mut C,
        key: &'static str,
        f: impl FnOnce(&mut C, &'n Node, &Path<'_>) -> Option<T>,
    ) -> Option<T>
    where
        C: AsMut<Ctx>,
    {
        let e = self.entry(key)?;
        let parent = self.path;
        f(c, e.value, &parent.key(key))
    }

    /// Reports every key that was not asked for as an unknown field; returns how many.
    pub fn finish<C: AsMut<Ctx>>(self, c: &mut C) -> usize {
        let ctx = c.as_mut();
        let mut unknown = 0;
        for (e, used) in self.entries.iter().zip(&self.used) {
            if *used {
                continue;
            }
            unknown += 1;
            let hint = match did_you_mean(e.key, self.known.iter().copied()) {
                Some(s) => format!(" (did you mean `{s}`?)"),
                None if self.known.is_empty() => " (no fields are allowed here)".to_owned(),
                None => format!(" (expected one of {})", quote_list(&self.known)),
            };
            ctx.error(
                e.key_node,
                &self.path.key(e.key),
                format!("unknown field `{}`{hint}", crate::yaml::shorten(e.key)),
            );
        }
        unknown
    }
}

/// A tagged value: a bare name (`deny`) or a mapping with one key (`{deny: {status: 451}}`).
#[derive(Debug, Clone, Copy)]
pub struct Variant<'n> {
    /// The tag.
    pub name: &'n str,
    /// Where the tag is written.
    pub name_node: &'n Node,
    /// The value under the tag, if written as a mapping.
    pub value: Option<&'n Node>,
}

/// Reads a [`Variant`]; `what` names the accepted forms for the error message.
pub fn variant<'n>(
    ctx: &mut Ctx,
    node: &'n Node,
    path: &Path<'_>,
    what: &str,
) -> Option<Variant<'n>> {
    match &node.kind {
        NodeKind::Scalar(name, _) => Some(Variant {
            name,
            name_node: node,
            value: None,
        }),
        NodeKind::Map(pairs) if pairs.len() == 1 => {
            let (k, v) = &pairs[0];
            match k.as_str() {
                Some(name) => Some(Variant {
                    name,
                    name_node: k,
                    value: Some(v),
                }),
                None => {
                    expected(ctx, k, path, "a name");
                    None
                }
            }
        }
        NodeKind::Map(pairs) if !pairs.is_empty() => {
            let keys: Vec<&str> = pairs.iter().filter_map(|(k, _)| k.as_str()).collect();
            ctx.error(
                node,
                path,
                format!(
                    "expected a mapping with exactly one key, found {} keys: {}",
                    pairs.len(),
                    quote_list(&keys)
                ),
            );
            None
        }
        _ => {
            expected(ctx, node, path, what);
            None
        }
    }
}

/// Reports an unknown variant name with a hint.
pub fn unknown_variant(ctx: &mut Ctx, v: &Variant<'_>, path: &Path<'_>, known: &[&str]) {
    unknown_name(ctx, v.name_node, path, v.name, known);
}

/// Reports `name` at `node` as not one of `known`.
fn unknown_name(ctx: &mut Ctx, node: &Node, path: &Path<'_>, name: &str, known: &[&str]) {
    let hint = match did_you_mean(name, known.iter().copied()) {
        Some(s) => format!("did you mean `{s}`?"),
        None => format!("expected one of {}", quote_list(known)),
    };
    ctx.error(
        node,
        path,
        format!("unknown value `{}` ({hint})", crate::yaml::shorten(name)),
    );
}

/// Decodes one of a fixed set of names (`enforce`, `shadow`).
pub fn choice<T: Copy>(
    ctx: &mut Ctx,
    node: &Node,
    path: &Path<'_>,
    choices: &[(&str, T)],
) -> Option<T> {
    let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
    let Some(text) = node.as_str() else {
        expected(ctx, node, path, &format!("one of {}", quote_list(&names)));
        return None;
    };
    match choices.iter().find(|(n, _)| *n == text) {
        Some((_, v)) => Some(*v),
        None => {
            unknown_name(ctx, node, path, text, &names);
            None
        }
    }
}

/// `` `a`, `b`, `c` ``
pub fn quote_list(items: &[&str]) -> String {
    let mut out = String::new();
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push('`');
        out.push_str(s);
        out.push('`');
    }
    out
}

/// The candidate closest to `word`, if it is close enough to be a plausible typo
/// (edit distance at most a third of the length, at least 1; case differences are free).
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = word.to_lowercase();
    let mut best: Option<(usize, &'a str)> = None;
    for cand in candidates {
        let d = edit_distance(&lower, &cand.to_lowercase());
        let len = cand.chars().count();
        let limit = (len / 3).max(1);
        // `d < len`: replacing every letter of a short key is not a typo.
        if d <= limit && d < len && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, cand));
        }
    }
    best.map(|(_, c)| c)
}

/// Optimal-string-alignment distance (Levenshtein plus adjacent transpositions).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Long inputs are never typos of our short keys; keep this O(n·m) bounded.
    if a.len() > 64 || b.len() > 64 {
        return usize::MAX;
    }
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

/// Checks raw bytes before parsing: size first (so a 50 MiB file costs nothing), then UTF-8,
/// reporting the line and column where the first invalid byte sits.
pub fn source_from_bytes<'b>(
    bytes: &'b [u8],
    file: &str,
    limits: &Limits,
) -> Result<&'b str, PolicyErrors> {
    if bytes.len() > limits.max_bytes {
        return Err(PolicyErrors::unlocated(
            file,
            format!(
                "file is {} bytes, more than the limit of {} bytes",
                bytes.len(),
                limits.max_bytes
            ),
        ));
    }
    std::str::from_utf8(bytes).map_err(|e| {
        let good = e.valid_up_to();
        // The prefix is valid UTF-8 by definition; `unwrap_or` keeps this panic-free anyway.
        let prefix = std::str::from_utf8(&bytes[..good]).unwrap_or("");
        let line = prefix.matches('\n').count() + 1;
        let line_start = prefix.rfind('\n').map_or(0, |i| i + 1);
        let column = prefix[line_start..].chars().count() + 1;
        PolicyErrors(vec![PolicyError {
            file: file.to_owned(),
            line,
            column,
            path: String::new(),
            message: format!("invalid utf-8 at byte offset {good} (the file must be utf-8 text)"),
        }])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse;

    fn root(src: &str) -> Node {
        parse(src, "t.yaml", &Limits::default()).unwrap()
    }

    #[test]
    fn paths_render_like_the_docs() {
        let root_path = Path::Root;
        let rules = root_path.key("rules");
        let r2 = rules.index(2);
        let when = r2.key("when");
        let ua = when.key("user_agent");
        let re = ua.key("regex");
        assert_eq!(re.index(0).to_string(), "rules[2].when.user_agent.regex[0]");
        let clients = root_path.key("clients");
        assert_eq!(clients.key("a.b").to_string(), "clients[\"a.b\"]");
        assert_eq!(clients.key("key-abc").to_string(), "clients.key-abc");
        assert_eq!(root_path.to_string(), "");
    }

    #[test]
    fn did_you_mean_finds_typos_only() {
        let keys = ["name", "mode", "when", "action"];
        assert_eq!(did_you_mean("nmae", keys), Some("name"));
        assert_eq!(did_you_mean("Action", keys), Some("action"));
        assert_eq!(did_you_mean("actoin", keys), Some("action"));
        assert_eq!(did_you_mean("color", keys), None);
        assert_eq!(
            did_you_mean("user_agnet", ["user_agent", "path"]),
            Some("user_agent")
        );
    }

    #[test]
    fn numbers_are_strict() {
        let n = root("[5, '5', -3, 99999999999, 1.5, +7, abc]");
        let NodeKind::Seq(items) = &n.kind else {
            panic!()
        };
        let mut ctx = Ctx::new("t.yaml");
        let p = Path::Root;
        let got: Vec<Option<u32>> = items.iter().map(|i| u32::decode(&mut ctx, i, &p)).collect();
        assert_eq!(got, [Some(5), None, None, None, None, Some(7), None]);
        let msgs: Vec<&str> = ctx.errors().iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            msgs,
            [
                "expected a whole number, found the string \"5\"",
                "expected a whole number, found `-3` (it must not be negative)",
                "`99999999999` is too large (at most 4294967295)",
                "expected a whole number, found `1.5`",
                "expected a whole number, found `abc`",
            ]
        );
    }

    #[test]
    fn duplicate_and_unknown_keys_are_reported_together() {
        let n = root("a: 1\nb: 2\na: 3\nc: 4\n");
        let mut ctx = Ctx::new("t.yaml");
        let mut m = MapReader::new(&mut ctx, &n, &Path::Root).unwrap();
        assert_eq!(m.required::<_, u8>(&mut ctx, "a"), Some(1));
        assert_eq!(m.optional::<_, u8>(&mut ctx, "b"), Some(2));
        assert_eq!(m.optional::<_, u8>(&mut ctx, "d"), None);
        m.finish(&mut ctx);
        let e = ctx.finish(Some(())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.yaml:3:1: a: duplicate key `a` (first at line 1, column 1)\n\
             t.yaml:4:1: c: unknown field `c` (expected one of `a`, `b`, `d`)"
        );
    }

    #[test]
    fn missing_field_points_at_the_mapping() {
        let n = root("x:\n  b: 1\n");
        let mut ctx = Ctx::new("t.yaml");
        let mut m = MapReader::new(&mut ctx, &n, &Path::Root).unwrap();
        let inner = m.required_with(&mut ctx, "x", |ctx, n, p| {
            let mut m = MapReader::new(ctx, n, p)?;
            let a: Option<u8> = m.required(ctx, "a");
            let b: Option<u8> = m.optional(ctx, "b");
            m.finish(ctx);
            Some((a?, b))
        });
        m.finish(&mut ctx);
        assert!(inner.is_none());
        assert_eq!(
            ctx.finish(inner).unwrap_err().to_string(),
            "t.yaml:2:3: x: missing field `a`"
        );
    }

    #[test]
    fn variants_and_choices() {
        let n = root("[deny, {limit: 1}, {a: 1, b: 2}, [x], shadw]");
        let NodeKind::Seq(items) = &n.kind else {
            panic!()
        };
        let mut ctx = Ctx::new("t.yaml");
        let p = Path::Root;
        let v = variant(&mut ctx, &items[0], &p, "an action").unwrap();
        assert_eq!((v.name, v.value.is_none()), ("deny", true));
        let v = variant(&mut ctx, &items[1], &p, "an action").unwrap();
        assert_eq!(v.name, "limit");
        assert!(variant(&mut ctx, &items[2], &p, "an action").is_none());
        assert!(variant(&mut ctx, &items[3], &p, "an action").is_none());
        let modes = [("enforce", 0), ("shadow", 1)];
        assert_eq!(choice(&mut ctx, &items[4], &p, &modes), None);
        let msgs: Vec<&str> = ctx.errors().iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            msgs,
            [
                "expected a mapping with exactly one key, found 2 keys: `a`, `b`",
                "expected an action, found a list",
                "unknown value `shadw` (did you mean `shadow`?)",
            ]
        );
    }

    #[test]
    fn invalid_utf8_position() {
        let e = source_from_bytes(b"a: 1\nbc: \xff\n", "t.yaml", &Limits::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.yaml:2:5: invalid utf-8 at byte offset 9 (the file must be utf-8 text)"
        );
        let big = vec![b' '; 5 << 20];
        let e = source_from_bytes(&big, "t.yaml", &Limits::default()).unwrap_err();
        assert_eq!(e.0[0].line, 0);
    }
}
