//! Fast matchers the compiled policy is built from: [`IpSet`] for CIDR sets and [`RuleSet`]
//! for many rule (or operation) conditions at once.
//!
//! # How a rule set matches
//!
//! Conditions are not evaluated one by one. Each request field (user agent, path, host,
//! method, operation name, each header by name, the client IP) gets **one** matcher for all
//! patterns of all conditions on it: literal patterns in Aho-Corasick automata, regexes and
//! globs in one multi-pattern regex automaton, CIDRs in a sorted range table. A field is
//! scanned at most once per request, and only when some condition needs it; the result is a
//! bitset of the atomic tests ("leaves") that hold. The `any`/`all`/`not` trees are then
//! evaluated over that bitset.
//!
//! Every condition is indexed by its **anchor** leaves: a set of leaves at least one of
//! which must hold for the condition to hold (for `all`, the most selective child's
//! anchors; for `any`, the union of its children's). A request only looks at conditions
//! anchored on a leaf that matched, plus those that can hold with no leaf matched (no
//! `when`, or a top-level `not`), which are always checked. So matching cost follows the
//! fields scanned and the rules that could match, not the number of rules.
//!
//! # Matching semantics
//!
//! - A condition holds when every field present in it holds (an implicit `all`); a pattern
//!   list holds when any pattern matches. `None` (no `when`) holds for every request, an
//!   empty `any` for none, an empty `all` for every request.
//! - `exact`/`prefix`/`suffix`/`contains` compare bytes; with `ignore_case`, ASCII letters
//!   compare case-insensitively (other characters exactly).
//! - `regex`: the `regex` crate's syntax, **unanchored** (`bot` matches `mybot/1.0`) unless
//!   the pattern anchors itself with `^`/`$`. With `ignore_case` the pattern is compiled
//!   with `(?i)`, which folds case per Unicode simple case folding.
//! - `glob`: matches the **whole** value; syntax in [`glob_to_regex`] (`*` crosses `/`).
//! - `host`: the adapter passes the host lower-cased without port, and host patterns always
//!   compare case-insensitively (DNS names are case-insensitive), as if `ignore_case` were set.
//! - `user_agent`: a missing header is the empty string. `path`: without the query.
//! - `method`: exact, case-sensitive (methods are upper case on the wire).
//! - `operation`: exact; a request with no resolved operation matches no operation list.
//! - `headers`: names are case-insensitive. `present: true` holds when the header is there,
//!   `present: false` when it is not; `value` holds when the header is there and its first
//!   value matches (a header that is not valid UTF-8 counts as absent). An entry with
//!   neither `present` nor `value` means `present: true`; `present: false` together with a
//!   `value` never holds.
//! - `ip`: the client IP is in one of the CIDRs; IPv4-mapped IPv6 addresses (and networks)
//!   are treated as IPv4.
//!
//! # Cost
//!
//! Matching allocates nothing once a thread has warmed up: working memory (the leaf bitset,
//! the candidate list) is a reusable per-thread scratch (tested with a counting allocator).
//! The `policy` criterion bench measures 10, 1,000 and 10,000 rules on the same request
//! mix; 10,000 rules cost about as much as 10, because a field's automaton is scanned once
//! however many patterns it holds and only rules anchored on a matched leaf are evaluated.
//!
//! One slow path: a regex with a Unicode word boundary (`\b`, `\B`) makes the
//! lazy DFA give up on values containing non-ASCII bytes, and the field's patterns are then
//! run by a slower NFA engine (which also allocates). Write `(?-u:\b)` for an ASCII word
//! boundary in user-agent and path patterns to stay on the fast path.
//!
//! # Example
//!
//! ```
//! use std::ops::ControlFlow;
//! use fairgate_policies::compiled::RequestView;
//! use fairgate_policies::matcher::RuleSet;
//! use fairgate_policies::model::{Condition, MatchKind, StringMatch};
//!
//! let bots = Condition {
//!     user_agent: Some(StringMatch {
//!         kind: MatchKind::Regex,
//!         patterns: vec!["(?i)badbot".into(), "sqlmap".into()],
//!         ignore_case: false,
//!     }),
//!     ..Condition::default()
//! };
//! let login = Condition { method: Some(vec!["POST".into()]), ..Condition::default() };
//! let set = RuleSet::new([Some(&bots), Some(&login), None]).unwrap();
//!
//! let req = RequestView {
//!     ip: "192.0.2.1".parse().unwrap(),
//!     method: "POST",
//!     host: "api.example.com",
//!     path: "/login",
//!     user_agent: "BadBot/2.0",
//!     operation: None,
//!     headers: &(),
//! };
//! assert_eq!(set.first_match(&req, 0), Some(0));
//! assert_eq!(set.first_match(&req, 1), Some(1));
//! let mut all = Vec::new();
//! set.for_each_match(&req, |i| {
//!     all.push(i);
//!     ControlFlow::Continue(())
//! });
//! assert_eq!(all, [0, 1, 2]);
//! ```

mod field;
mod glob;
mod ip;
mod rules;

pub use glob::{glob_to_regex, GlobError};
pub use ip::IpSet;
pub use rules::{RuleSet, MAX_CONDITION_DEPTH};

/// Why a set of conditions does not compile. Lower case, no full stop.
///
/// Validation catches these with file positions first; compiling reports what is left
/// (for example a regex set that only exceeds the size limit once merged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatcherError {
    /// One pattern is invalid.
    #[error("condition {condition}: {path}: {message}")]
    Pattern {
        /// Index of the condition.
        condition: usize,
        /// Path inside the condition, e.g. `any[0].user_agent.regex[1]`.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The patterns of one field do not compile together.
    #[error("{field}: {message}")]
    Set {
        /// The field, e.g. `user_agent` or `headers[x-api-key]`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// `any`/`all`/`not` nest too deep.
    #[error("condition {condition}: {path}: nested deeper than {max} levels")]
    TooDeep {
        /// Index of the condition.
        condition: usize,
        /// Path inside the condition where the limit was hit.
        path: String,
        /// The limit.
        max: usize,
    },
    /// More than 2³² leaves or conditions.
    #[error("too many conditions or patterns")]
    TooLarge,
}
