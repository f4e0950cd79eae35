//! [`RuleSet`]: many conditions compiled into per-field automata plus boolean trees over
//! their results, evaluated with an index so that only rules a request could satisfy are
//! looked at. See the [module docs](super) for the matching semantics.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::ControlFlow;

use ipnet::IpNet;
use regex_automata::PatternSet;

use super::field::{LitKind, Origin, StrField, StrFieldBuilder};
use super::glob::glob_to_regex;
use super::ip::CidrMap;
use super::MatcherError;
use crate::model::{Condition, MatchKind, StringMatch};
use crate::request::RequestView;

/// Deepest nesting of `any`/`all`/`not` accepted in one condition.
pub const MAX_CONDITION_DEPTH: usize = 64;

/// What part of the request a field reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Source {
    Ip,
    Method,
    Host,
    Path,
    UserAgent,
    Operation,
    /// A header, by lower-case name.
    Header(Box<str>),
}

impl Source {
    fn name(&self) -> String {
        match self {
            Source::Ip => "ip".into(),
            Source::Method => "method".into(),
            Source::Host => "host".into(),
            Source::Path => "path".into(),
            Source::UserAgent => "user_agent".into(),
            Source::Operation => "operation".into(),
            Source::Header(h) => format!("headers[{h}]"),
        }
    }
}

/// A node of a compiled condition tree. Children live in `RuleSet::kids`.
#[derive(Debug, Clone, Copy)]
enum Node {
    True,
    False,
    Leaf(u32),
    All(u32, u32),
    Any(u32, u32),
    Not(u32),
}

enum Matcher {
    Ip(CidrMap),
    Str {
        field: Box<StrField>,
        /// Leaves that hold when the value is present (`headers: [{name, present: true}]`).
        present: Box<[u32]>,
        /// Leaves that hold when the value is absent (`present: false`).
        absent: Box<[u32]>,
    },
}

struct Field {
    source: Source,
    /// Leaf id of local leaf 0; a multiple of 64 so each field owns whole bitset words.
    base: u32,
    words: std::ops::Range<usize>,
    matcher: Matcher,
}

/// Conditions compiled for fast matching against a [`RequestView`].
///
/// Built from one optional condition per rule (or operation); `None` holds for every
/// request. Index `i` of the results is the `i`-th condition given to [`RuleSet::new`].
/// Cheap to share (`Send + Sync`); matching allocates nothing once a thread has warmed up
/// its scratch space.
pub struct RuleSet {
    len: usize,
    nodes: Box<[Node]>,
    kids: Box<[u32]>,
    /// Root node per condition.
    roots: Box<[u32]>,
    fields: Box<[Field]>,
    /// Field index per leaf id (padding ids included).
    leaf_field: Box<[u32]>,
    words: usize,
    /// `anchor_rules[anchor_off[l]..anchor_off[l + 1]]`: conditions anchored on leaf `l`.
    anchor_off: Box<[u32]>,
    anchor_rules: Box<[u32]>,
    /// Fields holding at least one anchor leaf, evaluated for every request.
    eager: Box<[u32]>,
    /// Conditions that can hold with no leaf matched (no `when`, a top-level `not`, …).
    always: Box<[u32]>,
    /// Largest regex pattern count of a field.
    max_regex: usize,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field("conditions", &self.len)
            .field(
                "fields",
                &self
                    .fields
                    .iter()
                    .map(|f| f.source.name())
                    .collect::<Vec<_>>(),
            )
            .field("always_checked", &self.always.len())
            .finish_non_exhaustive()
    }
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet::empty()
    }
}

impl RuleSet {
    /// A set with no conditions: nothing ever matches.
    pub fn empty() -> RuleSet {
        RuleSet {
            len: 0,
            nodes: Box::new([]),
            kids: Box::new([]),
            roots: Box::new([]),
            fields: Box::new([]),
            leaf_field: Box::new([]),
            words: 0,
            anchor_off: Box::new([0]),
            anchor_rules: Box::new([]),
            eager: Box::new([]),
            always: Box::new([]),
            max_regex: 0,
        }
    }

    /// Compiles the conditions, one per rule in order; `None` means "every request".
    ///
    /// Errors name the condition index and the path inside it; the caller adds the rest of
    /// the path (`rules[3].when.` …).
    pub fn new<'a, I>(conditions: I) -> Result<RuleSet, MatcherError>
    where
        I: IntoIterator<Item = Option<&'a Condition>>,
    {
        let mut b = Builder::default();
        let mut roots = Vec::new();
        for (i, c) in conditions.into_iter().enumerate() {
            let root = match c {
                None => b.node(BNode::True),
                Some(c) => b.condition(c, i, &mut String::new(), 1)?,
            };
            roots.push(root);
        }
        b.finish(roots)
    }

    /// Number of conditions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no conditions.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The index of the first condition at or after `from` that holds for `req`.
    pub fn first_match(&self, req: &RequestView<'_>, from: usize) -> Option<usize> {
        let mut found = None;
        self.run(req, from, &mut |i| {
            found = Some(i);
            ControlFlow::Break(())
        });
        found
    }

    /// Calls `f` with the index of every condition that holds for `req`, in index order,
    /// until `f` breaks.
    ///
    /// `f` may match against other rule sets (a nested call uses fresh scratch space, which
    /// allocates); it must not expect the fields of `req` to be read again.
    pub fn for_each_match(
        &self,
        req: &RequestView<'_>,
        mut f: impl FnMut(usize) -> ControlFlow<()>,
    ) {
        self.run(req, 0, &mut f);
    }

    /// True when condition `index` holds for `req` (false for an index out of range).
    pub fn matches(&self, req: &RequestView<'_>, index: usize) -> bool {
        if index >= self.len {
            return false;
        }
        let mut held = false;
        with_scratch(&mut |s| {
            s.begin(self);
            held = self.holds(self.roots[index], req, s);
        });
        held
    }

    fn run(&self, req: &RequestView<'_>, from: usize, f: &mut dyn FnMut(usize) -> ControlFlow<()>) {
        if from >= self.len {
            return;
        }
        with_scratch(&mut |s| {
            s.begin(self);
            for &fi in self.eager.iter() {
                self.eval_field(fi as usize, req, s);
            }
            s.cands.sort_unstable();
            s.cands.dedup();
            // Merge the anchored candidates with the always-checked list, both sorted.
            let from = u32::try_from(from).unwrap_or(u32::MAX);
            let mut i = s.cands.partition_point(|&r| r < from);
            let mut j = self.always.partition_point(|&r| r < from);
            loop {
                let a = s.cands.get(i).copied();
                let b = self.always.get(j).copied();
                let r = match (a, b) {
                    (None, None) => break,
                    (Some(a), Some(b)) if a == b => {
                        i += 1;
                        j += 1;
                        a
                    }
                    (Some(a), Some(b)) if a < b => {
                        i += 1;
                        a
                    }
                    (Some(a), None) => {
                        i += 1;
                        a
                    }
                    (_, Some(b)) => {
                        j += 1;
                        b
                    }
                };
                if self.holds(self.roots[r as usize], req, s) && f(r as usize).is_break() {
                    break;
                }
            }
        });
    }

    fn holds(&self, node: u32, req: &RequestView<'_>, s: &mut Scratch) -> bool {
        match self.nodes[node as usize] {
            Node::True => true,
            Node::False => false,
            Node::Leaf(l) => {
                let fi = self.leaf_field[l as usize] as usize;
                if s.epochs[fi] != s.epoch {
                    self.eval_field(fi, req, s);
                }
                s.bits[(l >> 6) as usize] >> (l & 63) & 1 == 1
            }
            Node::All(at, n) => self.kids[at as usize..(at + n) as usize]
                .iter()
                .all(|&k| self.holds(k, req, s)),
            Node::Any(at, n) => self.kids[at as usize..(at + n) as usize]
                .iter()
                .any(|&k| self.holds(k, req, s)),
            Node::Not(k) => !self.holds(k, req, s),
        }
    }

    /// Evaluates field `fi` once: sets the bits of its matched leaves and queues the
    /// conditions anchored on them.
    fn eval_field(&self, fi: usize, req: &RequestView<'_>, s: &mut Scratch) {
        let field = &self.fields[fi];
        s.epochs[fi] = s.epoch;
        let Scratch {
            bits,
            cands,
            patset,
            ..
        } = s;
        // Usually one word: a store, not a call to `memset`.
        let words = field.words.clone();
        if words.len() == 1 {
            bits[words.start] = 0;
        } else {
            bits[words].fill(0);
        }
        let (anchor_off, anchor_rules) = (&self.anchor_off, &self.anchor_rules);
        let base = field.base;
        let mut hit = |local: u32| {
            let l = base + local;
            let (w, m) = ((l >> 6) as usize, 1u64 << (l & 63));
            if bits[w] & m == 0 {
                bits[w] |= m;
                let (a, b) = (anchor_off[l as usize], anchor_off[l as usize + 1]);
                cands.extend_from_slice(&anchor_rules[a as usize..b as usize]);
            }
        };
        match &field.matcher {
            Matcher::Ip(map) => map.for_each_containing(req.ip, hit),
            Matcher::Str {
                field: strf,
                present,
                absent,
            } => {
                let value = match &field.source {
                    Source::UserAgent => Some(req.user_agent),
                    Source::Path => Some(req.path),
                    Source::Host => Some(req.host),
                    Source::Method => Some(req.method),
                    Source::Operation => req.operation,
                    Source::Header(name) => req.headers.header(name),
                    Source::Ip => None,
                };
                match value {
                    Some(v) => {
                        for &l in present.iter() {
                            hit(l);
                        }
                        strf.eval(v, patset, &mut hit);
                    }
                    None => {
                        for &l in absent.iter() {
                            hit(l);
                        }
                    }
                }
            }
        }
    }
}

// === scratch ===

/// Per-thread working memory of a match, reused across requests.
struct Scratch {
    /// Matched-leaf bitset; a field's words are valid only when its epoch is current.
    bits: Vec<u64>,
    /// Per field: the epoch in which it was evaluated.
    epochs: Vec<u32>,
    epoch: u32,
    /// Conditions anchored on matched leaves.
    cands: Vec<u32>,
    patset: PatternSet,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            bits: Vec::new(),
            epochs: Vec::new(),
            epoch: 0,
            cands: Vec::new(),
            patset: PatternSet::new(0),
        }
    }

    /// Starts a match against `rs`: invalidates every field, sizes the buffers.
    fn begin(&mut self, rs: &RuleSet) {
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.epochs.fill(0);
            self.epoch = 1;
        }
        if self.bits.len() < rs.words {
            self.bits.resize(rs.words, 0);
        }
        if self.epochs.len() < rs.fields.len() {
            self.epochs.resize(rs.fields.len(), 0);
        }
        if self.patset.capacity() < rs.max_regex {
            self.patset = PatternSet::new(rs.max_regex);
        }
        self.cands.clear();
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::new());
}

/// Runs `f` with this thread's scratch, or with a fresh one when it is already in use
/// (a rule set matched from inside another's callback) or the thread is shutting down.
fn with_scratch(f: &mut dyn FnMut(&mut Scratch)) {
    let done = SCRATCH
        .try_with(|cell| match cell.try_borrow_mut() {
            Ok(mut s) => {
                f(&mut s);
                true
            }
            Err(_) => false,
        })
        .unwrap_or(false);
    if !done {
        f(&mut Scratch::new());
    }
}

// === builder ===

enum BNode {
    True,
    False,
    /// A leaf handle: index into `Builder::leaves`.
    Leaf(u32),
    All(Vec<u32>),
    Any(Vec<u32>),
    Not(u32),
}

struct LeafInfo {
    field: u32,
    local: u32,
    /// Holds for many requests (a method, a header's presence): a poor anchor.
    weak: bool,
}

enum FieldKind {
    Ip(Vec<(IpNet, u32)>),
    Str {
        builder: StrFieldBuilder,
        present: Vec<u32>,
        absent: Vec<u32>,
    },
}

struct FieldBuilder {
    source: Source,
    kind: FieldKind,
    leaves: u32,
}

/// Identity of a leaf, so conditions repeating a test (4,000 rules saying `method: POST`)
/// share one leaf instead of each making the field report a match.
#[derive(PartialEq, Eq, Hash)]
enum LeafKey {
    Ip(Vec<crate::units::Cidr>),
    Str {
        field: usize,
        kind: &'static str,
        ignore_case: bool,
        patterns: Vec<String>,
    },
    Presence {
        field: usize,
        present: bool,
    },
}

#[derive(Default)]
struct Builder {
    nodes: Vec<BNode>,
    leaves: Vec<LeafInfo>,
    fields: Vec<FieldBuilder>,
    index: HashMap<Source, usize>,
    /// Leaf node by identity.
    known: HashMap<LeafKey, u32>,
}

fn id(n: usize) -> Result<u32, MatcherError> {
    u32::try_from(n).map_err(|_| MatcherError::TooLarge)
}

impl Builder {
    fn node(&mut self, n: BNode) -> u32 {
        self.nodes.push(n);
        (self.nodes.len() - 1) as u32
    }

    fn field(&mut self, source: Source) -> usize {
        if let Some(&i) = self.index.get(&source) {
            return i;
        }
        let kind = match source {
            Source::Ip => FieldKind::Ip(Vec::new()),
            _ => FieldKind::Str {
                builder: StrFieldBuilder::default(),
                present: Vec::new(),
                absent: Vec::new(),
            },
        };
        self.fields.push(FieldBuilder {
            source: source.clone(),
            kind,
            leaves: 0,
        });
        self.index.insert(source, self.fields.len() - 1);
        self.fields.len() - 1
    }

    /// A new leaf of field `fi`: (node, local id).
    fn leaf(&mut self, fi: usize, weak: bool) -> Result<(u32, u32), MatcherError> {
        let local = self.fields[fi].leaves;
        self.fields[fi].leaves = local.checked_add(1).ok_or(MatcherError::TooLarge)?;
        self.leaves.push(LeafInfo {
            field: id(fi)?,
            local,
            weak,
        });
        let handle = id(self.leaves.len() - 1)?;
        Ok((self.node(BNode::Leaf(handle)), local))
    }

    fn condition(
        &mut self,
        c: &Condition,
        index: usize,
        path: &mut String,
        depth: usize,
    ) -> Result<u32, MatcherError> {
        if depth > MAX_CONDITION_DEPTH {
            return Err(MatcherError::TooDeep {
                condition: index,
                path: path.trim_end_matches('.').to_owned(),
                max: MAX_CONDITION_DEPTH,
            });
        }
        let mut parts = Vec::new();
        if let Some(cidrs) = &c.ip {
            let key = LeafKey::Ip(cidrs.clone());
            let node = match self.known.get(&key) {
                Some(&n) => n,
                None => {
                    let fi = self.field(Source::Ip);
                    let (node, local) = self.leaf(fi, false)?;
                    if let FieldKind::Ip(entries) = &mut self.fields[fi].kind {
                        entries.extend(cidrs.iter().map(|c| (c.0, local)));
                    }
                    self.known.insert(key, node);
                    node
                }
            };
            parts.push(node);
        }
        if let Some(sm) = &c.user_agent {
            parts.push(self.string_leaf(
                Source::UserAgent,
                sm,
                false,
                index,
                path,
                "user_agent",
            )?);
        }
        if let Some(sm) = &c.path {
            parts.push(self.string_leaf(Source::Path, sm, false, index, path, "path")?);
        }
        if let Some(methods) = &c.method {
            parts.push(self.exact_leaf(Source::Method, methods, true)?);
        }
        if let Some(sm) = &c.host {
            parts.push(self.string_leaf(Source::Host, sm, true, index, path, "host")?);
        }
        if let Some(headers) = &c.headers {
            for (k, h) in headers.iter().enumerate() {
                let source = Source::Header(h.name.to_ascii_lowercase().into_boxed_str());
                let node = match (h.present, &h.value) {
                    (Some(false), Some(_)) => self.node(BNode::False),
                    (Some(false), None) => self.presence_leaf(source, false)?,
                    (_, None) => self.presence_leaf(source, true)?,
                    (_, Some(sm)) => {
                        let at = format!("headers[{k}].value");
                        self.string_leaf(source, sm, false, index, path, &at)?
                    }
                };
                parts.push(node);
            }
        }
        if let Some(ops) = &c.operation {
            parts.push(self.exact_leaf(Source::Operation, ops, false)?);
        }
        if let Some(any) = &c.any {
            let kids = self.children(any, "any", index, path, depth)?;
            parts.push(self.node(BNode::Any(kids)));
        }
        if let Some(all) = &c.all {
            let kids = self.children(all, "all", index, path, depth)?;
            parts.push(self.node(BNode::All(kids)));
        }
        if let Some(not) = &c.not {
            let len = path.len();
            path.push_str("not.");
            let kid = self.condition(not, index, path, depth + 1)?;
            path.truncate(len);
            parts.push(self.node(BNode::Not(kid)));
        }
        Ok(match parts.len() {
            1 => parts[0],
            _ => self.node(BNode::All(parts)),
        })
    }

    fn children(
        &mut self,
        conds: &[Condition],
        key: &str,
        index: usize,
        path: &mut String,
        depth: usize,
    ) -> Result<Vec<u32>, MatcherError> {
        let mut kids = Vec::with_capacity(conds.len());
        for (k, c) in conds.iter().enumerate() {
            let len = path.len();
            path.push_str(&format!("{key}[{k}]."));
            kids.push(self.condition(c, index, path, depth + 1)?);
            path.truncate(len);
        }
        Ok(kids)
    }

    fn presence_leaf(&mut self, source: Source, present: bool) -> Result<u32, MatcherError> {
        let fi = self.field(source);
        let key = LeafKey::Presence { field: fi, present };
        if let Some(&n) = self.known.get(&key) {
            return Ok(n);
        }
        let (node, local) = self.leaf(fi, true)?;
        self.known.insert(key, node);
        if let FieldKind::Str {
            present: p,
            absent: a,
            ..
        } = &mut self.fields[fi].kind
        {
            if present { p } else { a }.push(local);
        }
        Ok(node)
    }

    fn exact_leaf(
        &mut self,
        source: Source,
        values: &[String],
        weak: bool,
    ) -> Result<u32, MatcherError> {
        let fi = self.field(source);
        let key = LeafKey::Str {
            field: fi,
            kind: "one_of",
            ignore_case: false,
            patterns: values.to_vec(),
        };
        if let Some(&n) = self.known.get(&key) {
            return Ok(n);
        }
        let (node, local) = self.leaf(fi, weak)?;
        self.known.insert(key, node);
        if let FieldKind::Str { builder, .. } = &mut self.fields[fi].kind {
            for v in values {
                builder.literal(v, LitKind::Exact, false, local);
            }
        }
        Ok(node)
    }

    fn string_leaf(
        &mut self,
        source: Source,
        sm: &StringMatch,
        force_ignore_case: bool,
        index: usize,
        path: &str,
        key: &str,
    ) -> Result<u32, MatcherError> {
        let ignore_case = sm.ignore_case || force_ignore_case;
        let fi = self.field(source);
        let leaf_key = LeafKey::Str {
            field: fi,
            kind: kind_name(sm.kind),
            ignore_case,
            patterns: sm.patterns.clone(),
        };
        if let Some(&n) = self.known.get(&leaf_key) {
            return Ok(n);
        }
        let (node, local) = self.leaf(fi, false)?;
        self.known.insert(leaf_key, node);
        let FieldKind::Str { builder, .. } = &mut self.fields[fi].kind else {
            return Ok(node);
        };
        let kind = match sm.kind {
            MatchKind::Exact => Some(LitKind::Exact),
            MatchKind::Prefix => Some(LitKind::Prefix),
            MatchKind::Suffix => Some(LitKind::Suffix),
            MatchKind::Contains => Some(LitKind::Contains),
            MatchKind::Glob | MatchKind::Regex => None,
        };
        for (j, p) in sm.patterns.iter().enumerate() {
            if let Some(kind) = kind {
                builder.literal(p, kind, ignore_case, local);
                continue;
            }
            let origin = || Origin {
                condition: index,
                path: format!("{path}{key}.{}[{j}]", kind_name(sm.kind)),
            };
            let re = if sm.kind == MatchKind::Glob {
                glob_to_regex(p, ignore_case).map_err(|e| {
                    let o = origin();
                    MatcherError::Pattern {
                        condition: o.condition,
                        path: o.path,
                        message: format!("invalid glob `{p}`: {e}"),
                    }
                })?
            } else if ignore_case {
                format!("(?i){p}")
            } else {
                p.clone()
            };
            builder.regex(re, local, origin());
        }
        Ok(node)
    }

    /// Finalises leaf ids, builds the automata and the anchor index.
    fn finish(self, roots: Vec<u32>) -> Result<RuleSet, MatcherError> {
        let Builder {
            nodes: bnodes,
            leaves,
            fields: fbuilders,
            ..
        } = self;
        // Leaf ids: each field gets a block aligned to 64.
        let mut bases = Vec::with_capacity(fbuilders.len());
        let mut next: u64 = 0;
        for f in &fbuilders {
            bases.push(next);
            next += u64::from(f.leaves).div_ceil(64) * 64;
        }
        let total = u32::try_from(next).map_err(|_| MatcherError::TooLarge)?;
        let words = (total / 64) as usize;
        let global = |h: u32| -> u32 {
            let l = &leaves[h as usize];
            bases[l.field as usize] as u32 + l.local
        };

        let mut leaf_field = vec![0u32; total as usize];
        let mut fields = Vec::with_capacity(fbuilders.len());
        let mut max_regex = 0;
        for (fi, f) in fbuilders.into_iter().enumerate() {
            let base = bases[fi] as u32;
            let span = f.leaves.div_ceil(64) * 64;
            leaf_field[base as usize..(base + span) as usize].fill(fi as u32);
            let name = f.source.name();
            let matcher = match f.kind {
                FieldKind::Ip(entries) => Matcher::Ip(CidrMap::new(entries)),
                FieldKind::Str {
                    builder,
                    present,
                    absent,
                } => {
                    let field = builder.build(&name)?;
                    max_regex = max_regex.max(field.regex_len());
                    Matcher::Str {
                        field: Box::new(field),
                        present: present.into_boxed_slice(),
                        absent: absent.into_boxed_slice(),
                    }
                }
            };
            fields.push(Field {
                source: f.source,
                base,
                words: (base / 64) as usize..((base + span) / 64) as usize,
                matcher,
            });
        }

        // Anchors per root, before flattening (they are computed on the builder tree).
        let mut anchored: Vec<Vec<u32>> = vec![Vec::new(); total as usize];
        let mut always = Vec::new();
        for (r, &root) in roots.iter().enumerate() {
            match anchors(&bnodes, &leaves, root) {
                None => always.push(r as u32),
                Some((set, _)) => {
                    for h in set {
                        anchored[global(h) as usize].push(r as u32);
                    }
                }
            }
        }
        let mut anchor_off = Vec::with_capacity(total as usize + 1);
        let mut anchor_rules = Vec::new();
        anchor_off.push(0u32);
        let mut eager = vec![false; fields.len()];
        for (l, rules) in anchored.iter().enumerate() {
            if !rules.is_empty() {
                eager[leaf_field[l] as usize] = true;
            }
            anchor_rules.extend_from_slice(rules);
            anchor_off.push(id(anchor_rules.len())?);
        }

        // Flatten the trees.
        let mut nodes = Vec::with_capacity(bnodes.len());
        let mut kids = Vec::new();
        for n in &bnodes {
            nodes.push(match n {
                BNode::True => Node::True,
                BNode::False => Node::False,
                BNode::Leaf(h) => Node::Leaf(global(*h)),
                BNode::All(k) | BNode::Any(k) => {
                    let at = id(kids.len())?;
                    kids.extend_from_slice(k);
                    let len = id(k.len())?;
                    if matches!(n, BNode::All(_)) {
                        Node::All(at, len)
                    } else {
                        Node::Any(at, len)
                    }
                }
                BNode::Not(k) => Node::Not(*k),
            });
        }

        Ok(RuleSet {
            len: roots.len(),
            nodes: nodes.into_boxed_slice(),
            kids: kids.into_boxed_slice(),
            roots: roots.into_boxed_slice(),
            fields: fields.into_boxed_slice(),
            leaf_field: leaf_field.into_boxed_slice(),
            words,
            anchor_off: anchor_off.into_boxed_slice(),
            anchor_rules: anchor_rules.into_boxed_slice(),
            eager: eager
                .iter()
                .enumerate()
                .filter(|(_, &e)| e)
                .map(|(i, _)| i as u32)
                .collect(),
            always: always.into_boxed_slice(),
            max_regex,
        })
    }
}

fn kind_name(k: MatchKind) -> &'static str {
    match k {
        MatchKind::Exact => "exact",
        MatchKind::Prefix => "prefix",
        MatchKind::Suffix => "suffix",
        MatchKind::Contains => "contains",
        MatchKind::Glob => "glob",
        MatchKind::Regex => "regex",
    }
}

/// A set of leaves at least one of which holds whenever `node` holds, with its quality
/// (higher is better); `None` when the node can hold with no leaf holding.
fn anchors(nodes: &[BNode], leaves: &[LeafInfo], node: u32) -> Option<(Vec<u32>, u8)> {
    match &nodes[node as usize] {
        BNode::True | BNode::Not(_) => None,
        // Never holds: no request needs to look at it.
        BNode::False => Some((Vec::new(), 3)),
        BNode::Leaf(h) => Some((vec![*h], if leaves[*h as usize].weak { 1 } else { 2 })),
        BNode::Any(kids) => {
            let mut set = Vec::new();
            let mut quality = 3;
            for &k in kids {
                let (s, q) = anchors(nodes, leaves, k)?;
                set.extend(s);
                quality = quality.min(q);
            }
            set.sort_unstable();
            set.dedup();
            Some((set, quality))
        }
        // Every child must hold, so any child's anchors will do: take the best.
        BNode::All(kids) => kids
            .iter()
            .filter_map(|&k| anchors(nodes, leaves, k))
            .max_by_key(|(set, q)| (*q, std::cmp::Reverse(set.len()))),
    }
}
