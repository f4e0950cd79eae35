//! One string field of a rule set (user agent, path, host, a header, the method, the
//! operation name): every pattern of every condition on that field merged into at most four
//! Aho-Corasick automata (anchored or not, case-sensitive or ASCII-case-insensitive) and one
//! multi-pattern regex, so the field is scanned a fixed number of times however many rules
//! use it.

use aho_corasick::automaton::OverlappingState;
use aho_corasick::{AhoCorasick, Anchored, Input as AcInput, MatchKind as AcMatchKind, StartKind};
use regex_automata::hybrid::dfa::{Cache as DfaCache, OverlappingState as DfaState, DFA};
use regex_automata::nfa::thompson::{self, WhichCaptures};
use regex_automata::util::pool::Pool;
use regex_automata::{hybrid, meta, util::syntax, Input, MatchKind, PatternSet};

use super::MatcherError;

/// Upper bound of the NFA of one field's merged regexes. Each pattern is checked against a
/// much smaller limit when the policy is validated; this bounds the whole set.
const SET_NFA_LIMIT: usize = 256 << 20;
/// Lazy DFA cache per field and thread (allocated as states are built). Larger than
/// `regex`'s 2 MiB default because one automaton here serves thousands of patterns: with
/// 5,000 user-agent regexes a 2 MiB cache keeps filling up and searches drop to the NFA
/// simulation (about 1 ms per value instead of 0.2 µs, measured).
const HYBRID_CACHE: usize = 16 << 20;
/// Up to this many patterns, let the engine extract literal prefilters. Extraction grows
/// much faster than linearly with the pattern count (5,000 patterns: 13 s instead of
/// 66 ms to build, measured), while a warm lazy DFA over a big set is as fast per byte as
/// over a small one.
const PREFILTER_MAX_PATTERNS: usize = 64;
/// A literal group of at most this many `exact`/`prefix`/`suffix` patterns (of one
/// anchoring and case mode, each at most [`DIRECT_MAX_LEN`] bytes) is also kept as a plain
/// list and compared directly: each is one length check and one compare at a fixed
/// position, cheaper than starting an Aho-Corasick search for the few patterns a typical
/// policy puts on a field (callgrind, `benches/src/bin/admit_profile.rs`).
const DIRECT_MAX_PATTERNS: usize = 16;
/// Longest pattern of a directly compared group.
const DIRECT_MAX_LEN: usize = 64;

/// How a literal pattern must sit in the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LitKind {
    /// The whole value.
    Exact,
    /// At the start.
    Prefix,
    /// At the end.
    Suffix,
    /// Anywhere.
    Contains,
}

/// Where a regex pattern came from, for error messages.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    /// Index of the condition (rule or operation).
    pub(crate) condition: usize,
    /// Path inside the condition, e.g. `any[1].user_agent.regex[0]`.
    pub(crate) path: String,
}

/// Collects the patterns of one field.
#[derive(Default)]
pub(crate) struct StrFieldBuilder {
    /// `[anchored][ignore_case]`: literal, leaf, kind.
    lits: [[Vec<(String, u32, LitKind)>; 2]; 2],
    /// Regex (globs already translated), leaf, origin.
    regexes: Vec<(String, u32, Origin)>,
    /// Leaves with an empty prefix/suffix/contains pattern: hold for every value.
    always: Vec<u32>,
    /// Leaves with an empty exact pattern: hold for the empty value.
    empty_value: Vec<u32>,
}

impl StrFieldBuilder {
    /// Adds a literal pattern for `leaf`.
    pub(crate) fn literal(&mut self, pattern: &str, kind: LitKind, ignore_case: bool, leaf: u32) {
        // Empty patterns need no automaton (and anchored overlapping searches report empty
        // matches past the start).
        if pattern.is_empty() {
            match kind {
                LitKind::Exact => self.empty_value.push(leaf),
                _ => self.always.push(leaf),
            }
            return;
        }
        let anchored = matches!(kind, LitKind::Exact | LitKind::Prefix);
        self.lits[usize::from(anchored)][usize::from(ignore_case)].push((
            pattern.to_owned(),
            leaf,
            kind,
        ));
    }

    /// Adds a regex for `leaf` (unanchored unless it anchors itself).
    pub(crate) fn regex(&mut self, pattern: String, leaf: u32, origin: Origin) {
        self.regexes.push((pattern, leaf, origin));
    }

    /// Builds the automata. `name` names the field in errors.
    pub(crate) fn build(self, name: &str) -> Result<StrField, MatcherError> {
        let mut lits = Vec::new();
        for (anchored, by_case) in self.lits.into_iter().enumerate() {
            for (ci, entries) in by_case.into_iter().enumerate() {
                if entries.is_empty() {
                    continue;
                }
                let ac = AhoCorasick::builder()
                    .match_kind(AcMatchKind::Standard)
                    .start_kind(if anchored == 1 {
                        StartKind::Anchored
                    } else {
                        StartKind::Unanchored
                    })
                    .ascii_case_insensitive(ci == 1)
                    .build(entries.iter().map(|e| e.0.as_bytes()))
                    .map_err(|e| MatcherError::Set {
                        field: name.to_owned(),
                        message: format!("literal patterns do not fit one automaton: {e}"),
                    })?;
                // `contains` stays with the automaton: its prefilter finds candidates faster
                // than a naive scan even on short values (measured), and it is linear.
                let direct = (entries.len() <= DIRECT_MAX_PATTERNS
                    && entries
                        .iter()
                        .all(|e| e.0.len() <= DIRECT_MAX_LEN && e.2 != LitKind::Contains))
                .then(|| {
                    entries
                        .iter()
                        .map(|(p, l, k)| (p.as_bytes().into(), *l, *k))
                        .collect::<Box<[_]>>()
                });
                lits.push(LitSet {
                    ac,
                    anchored: anchored == 1,
                    pats: entries.into_iter().map(|(_, l, k)| (l, k)).collect(),
                    direct,
                    ignore_case: ci == 1,
                });
            }
        }
        let regex = if self.regexes.is_empty() {
            None
        } else {
            Some(build_regex(self.regexes, name)?)
        };
        Ok(StrField {
            lits,
            regex,
            always: self.always.into_boxed_slice(),
            empty_value: self.empty_value.into_boxed_slice(),
        })
    }
}

fn build_regex(pats: Vec<(String, u32, Origin)>, name: &str) -> Result<RegexGroup, MatcherError> {
    let config = meta::Config::new()
        .match_kind(MatchKind::All)
        .utf8_empty(true)
        .which_captures(WhichCaptures::None)
        .nfa_size_limit(Some(SET_NFA_LIMIT))
        .hybrid_cache_capacity(HYBRID_CACHE)
        .auto_prefilter(pats.len() <= PREFILTER_MAX_PATTERNS);
    let sources: Vec<&str> = pats.iter().map(|p| p.0.as_str()).collect();
    let syntax = syntax::Config::new().utf8(true);
    let built = meta::Builder::new()
        .configure(config)
        .syntax(syntax)
        .build_many(&sources);
    match built {
        Ok(re) => {
            // The same patterns as a bare lazy DFA, to list which ones matched in time
            // proportional to the matches (see `RegexGroup::which`).
            let dfa = hybrid::dfa::Builder::new()
                .configure(
                    DFA::config()
                        .match_kind(MatchKind::All)
                        .cache_capacity(HYBRID_CACHE)
                        .unicode_word_boundary(true),
                )
                .syntax(syntax)
                .thompson(
                    thompson::Config::new()
                        .which_captures(WhichCaptures::None)
                        .nfa_size_limit(Some(SET_NFA_LIMIT)),
                )
                .build_many(&sources)
                .map_err(|e| MatcherError::Set {
                    field: name.to_owned(),
                    message: format!("regex and glob patterns do not compile together: {e}"),
                })?;
            let ascii_only = dfa.get_config().get_quit(0x80);
            let for_caches = dfa.clone();
            let make: CacheFn = Box::new(move || for_caches.create_cache());
            Ok(RegexGroup {
                re,
                dfa,
                caches: Pool::new(make),
                ascii_only,
                leaves: pats.iter().map(|p| p.1).collect(),
            })
        }
        Err(e) => {
            if let Some(pid) = e.pattern() {
                if let Some((pattern, _, origin)) = pats.get(pid.as_usize()) {
                    return Err(MatcherError::Pattern {
                        condition: origin.condition,
                        path: origin.path.clone(),
                        message: format!("invalid pattern `{pattern}`: {e}"),
                    });
                }
            }
            let message = match e.size_limit() {
                Some(limit) => format!(
                    "the {} regex and glob patterns together exceed the size limit of {} MiB",
                    pats.len(),
                    limit >> 20
                ),
                None => format!("regex and glob patterns do not compile together: {e}"),
            };
            Err(MatcherError::Set {
                field: name.to_owned(),
                message,
            })
        }
    }
}

/// The compiled matchers of one string field.
pub(crate) struct StrField {
    lits: Vec<LitSet>,
    regex: Option<RegexGroup>,
    always: Box<[u32]>,
    empty_value: Box<[u32]>,
}

struct LitSet {
    ac: AhoCorasick,
    anchored: bool,
    /// Pattern id → (leaf, kind).
    pats: Box<[(u32, LitKind)]>,
    /// The same patterns as a plain list, when the group is small (see
    /// [`DIRECT_MAX_PATTERNS`]).
    direct: Option<Box<[DirectPattern]>>,
    /// ASCII case-insensitive group.
    ignore_case: bool,
}

/// A directly compared literal: its bytes, leaf and kind.
type DirectPattern = (Box<[u8]>, u32, LitKind);

impl LitSet {
    /// Calls `hit` with the leaf of every pattern of the plain list matching `value`; false
    /// (nothing called) when the automaton should answer instead.
    #[inline]
    fn eval_direct(&self, value: &[u8], hit: &mut impl FnMut(u32)) -> bool {
        let Some(direct) = &self.direct else {
            return false;
        };
        let ci = self.ignore_case;
        let eq = |a: &[u8], b: &[u8]| {
            if ci {
                a.eq_ignore_ascii_case(b)
            } else {
                a == b
            }
        };
        for (p, leaf, kind) in direct.iter() {
            let n = p.len();
            let ok = match kind {
                LitKind::Exact => value.len() == n && eq(value, p),
                LitKind::Prefix => value.len() >= n && eq(&value[..n], p),
                LitKind::Suffix => value.len() >= n && eq(&value[value.len() - n..], p),
                // Not in a direct list (see `StrFieldBuilder::build`).
                LitKind::Contains => false,
            };
            if ok {
                hit(*leaf);
            }
        }
        true
    }
}

/// Unwind-safe like `regex`'s own pools, so a compiled policy stays `RefUnwindSafe`.
type CacheFn =
    Box<dyn Fn() -> DfaCache + Send + Sync + std::panic::UnwindSafe + std::panic::RefUnwindSafe>;

struct RegexGroup {
    /// Answers "does any pattern match", with all of the engine's fallbacks.
    re: meta::Regex,
    /// Lists the matching patterns.
    dfa: DFA,
    /// One lazy DFA cache per thread (the pool hands the owner thread its own lock-free).
    caches: Pool<DfaCache, CacheFn>,
    /// The lazy DFA stops at non-ASCII bytes (some pattern has a Unicode `\b`): send
    /// non-ASCII values straight to the meta engine rather than fail (and allocate the
    /// error) first.
    ascii_only: bool,
    /// Pattern id → leaf.
    leaves: Box<[u32]>,
}

impl RegexGroup {
    /// Calls `hit` with the leaf of every pattern matching `input`.
    ///
    /// `meta::Regex::which_overlapping_matches` fills a `PatternSet`, and walking one costs
    /// a step per pattern of the set (5 µs for 5,000 patterns, measured), however few
    /// matched. An overlapping search of the lazy DFA reports only what matched. When the
    /// lazy DFA cannot answer (its cache keeps filling, or a Unicode `\b` meets non-ASCII
    /// input), the meta engine does.
    fn which(&self, input: &Input<'_>, patset: &mut PatternSet, hit: &mut impl FnMut(u32)) {
        let dfa_can = !self.ascii_only || input.haystack().is_ascii();
        if dfa_can && self.which_dfa(input, hit) {
            return;
        }
        // A search that gave up half-way may have reported some leaves: `hit` tolerates
        // seeing them again.
        self.which_meta(input, patset, hit);
    }

    /// The lazy DFA's overlapping search; false when it gave up.
    fn which_dfa(&self, input: &Input<'_>, hit: &mut impl FnMut(u32)) -> bool {
        let mut cache = self.caches.get();
        let mut state = DfaState::start();
        while self
            .dfa
            .try_search_overlapping_fwd(&mut cache, input, &mut state)
            .is_ok()
        {
            match state.get_match() {
                Some(m) => hit(self.leaves[m.pattern().as_usize()]),
                None => return true,
            }
        }
        false
    }

    fn which_meta(&self, input: &Input<'_>, patset: &mut PatternSet, hit: &mut impl FnMut(u32)) {
        self.re.which_overlapping_matches(input, patset);
        for pid in patset.iter() {
            hit(self.leaves[pid.as_usize()]);
        }
        patset.clear();
    }
}

impl std::fmt::Debug for StrField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StrField")
            .field(
                "literals",
                &self.lits.iter().map(|l| l.pats.len()).sum::<usize>(),
            )
            .field(
                "regexes",
                &self.regex.as_ref().map_or(0, |r| r.leaves.len()),
            )
            .finish()
    }
}

impl StrField {
    /// Number of regex patterns (the size a [`PatternSet`] needs).
    pub(crate) fn regex_len(&self) -> usize {
        self.regex.as_ref().map_or(0, |r| r.leaves.len())
    }

    /// Calls `hit(leaf)` for every leaf with a pattern matching `value` (leaves may repeat).
    /// `patset` must be empty with capacity ≥ [`regex_len`](Self::regex_len); it is left empty.
    #[inline]
    pub(crate) fn eval(&self, value: &str, patset: &mut PatternSet, hit: &mut impl FnMut(u32)) {
        let len = value.len();
        for &leaf in self.always.iter() {
            hit(leaf);
        }
        if len == 0 {
            for &leaf in self.empty_value.iter() {
                hit(leaf);
            }
        }
        for set in &self.lits {
            if set.eval_direct(value.as_bytes(), hit) {
                continue;
            }
            let input = AcInput::new(value).anchored(if set.anchored {
                Anchored::Yes
            } else {
                Anchored::No
            });
            let mut state = OverlappingState::start();
            loop {
                // Cannot fail: every automaton supports the search kind it is asked for.
                if set
                    .ac
                    .try_find_overlapping(input.clone(), &mut state)
                    .is_err()
                {
                    break;
                }
                let Some(m) = state.get_match() else { break };
                let (leaf, kind) = set.pats[m.pattern().as_usize()];
                if set.anchored && m.start() != 0 {
                    continue;
                }
                let ok = match kind {
                    LitKind::Exact | LitKind::Suffix => m.end() == len,
                    LitKind::Prefix | LitKind::Contains => true,
                };
                if ok {
                    hit(leaf);
                }
            }
        }
        if let Some(group) = &self.regex {
            let input = Input::new(value);
            // Most values match none of the patterns: the plain test can stop early and use
            // the literal prefilters; only then ask which ones.
            if group.re.is_match(input.clone()) {
                group.which(&input, patset, hit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The leaves `field` reports for `value`, sorted and deduplicated.
    fn leaves(field: &StrField, value: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut patset = PatternSet::new(field.regex_len().max(1));
        field.eval(value, &mut patset, &mut |l| out.push(l));
        out.sort_unstable();
        out.dedup();
        out
    }

    fn field(pats: &[(&str, LitKind, bool)]) -> StrField {
        let mut b = StrFieldBuilder::default();
        for (i, &(p, kind, ci)) in pats.iter().enumerate() {
            b.literal(p, kind, ci, i as u32);
        }
        b.build("test").unwrap()
    }

    #[test]
    fn small_groups_are_compared_directly_with_the_automaton_semantics() {
        let f = field(&[
            ("/login", LitKind::Exact, false),
            ("/admin", LitKind::Prefix, false),
            (".php", LitKind::Suffix, false),
            ("Legacy/", LitKind::Prefix, true),
            ("x", LitKind::Suffix, true),
            ("/LOGOUT", LitKind::Exact, true),
        ]);
        assert!(f.lits.iter().all(|s| s.direct.is_some()));
        assert_eq!(leaves(&f, "/login"), [0]);
        assert!(leaves(&f, "/login/").is_empty());
        assert!(leaves(&f, "/Login").is_empty());
        assert_eq!(leaves(&f, "/logout"), [5]);
        assert_eq!(leaves(&f, "/admin/x.php"), [1, 2]);
        assert_eq!(leaves(&f, "/admin/x.PHP.x"), [1, 4]);
        assert_eq!(leaves(&f, "legacy/BOT.X"), [3, 4]);
        assert!(leaves(&f, "").is_empty());
        assert!(leaves(&f, ".ph").is_empty());
    }

    #[test]
    fn contains_and_large_groups_use_the_automaton() {
        let f = field(&[
            ("bot", LitKind::Contains, true),
            ("zz", LitKind::Suffix, true),
        ]);
        assert!(f.lits.iter().all(|s| s.direct.is_none()));
        assert_eq!(leaves(&f, "xBoTzZ"), [0, 1]);
        assert!(leaves(&f, "bo").is_empty());
        let pats: Vec<String> = (0..=DIRECT_MAX_PATTERNS)
            .map(|i| format!("p{i}-"))
            .collect();
        let spec: Vec<(&str, LitKind, bool)> = pats
            .iter()
            .map(|p| (p.as_str(), LitKind::Prefix, false))
            .collect();
        let f = field(&spec);
        assert!(f.lits.iter().all(|s| s.direct.is_none()));
        assert_eq!(leaves(&f, "p3-x"), [3]);
    }
}
