//! The policy decoder: YAML nodes → [`Policy`], with every semantic check at its node.
//!
//! Local checks (ranges, regex and glob syntax, CIDRs, rates) happen while decoding a value.
//! Checks that need the whole file (duplicate names, plan references, operation cost against
//! every burst) are collected in [`Refs`] while decoding and run once at the end, still with
//! the position of the offending node.

use std::collections::{BTreeMap, HashMap};

use crate::error::PolicyErrors;
use crate::model::{
    Action, AdaptiveAlgorithm, AdaptiveLimit, Alerts, Backend, Bandwidth, BandwidthCap,
    BurstSharing, CalendarPeriod, ClassThresholds, ClientCap, ClientOverride, Condition,
    DenyAction, Estimator, Growth, HeaderMatch, HeaderMode, Identify, KeyExtractor, LimitAction,
    LimitKey, MatchKind, MaxRise, Mode, Operation, Period, Plan, Policy, PostHoc, Priority,
    RejectDelay, Responses, Rule, ShedLimit, Shedding, State, StringMatch, TagAction,
    UsageEndpoint,
};
use crate::model::{FleetMode, OnFailure, RedisState};
use crate::units::{ByteSize, Cidr, HumanDuration, Rate};
use crate::yaml::{self, Limits, Mark, Node, NodeKind};

use super::{
    choice, expected, list, map_entries, one_or_many, quote_list, scalar, source_from_bytes,
    unknown_variant, variant, Ctx, Decode, MapReader, Path,
};

/// Compiled size limit for one regex (the `regex` crate's `size_limit`).
pub(crate) const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Lazy-DFA cache limit for one regex (the `regex` crate's `dfa_size_limit`).
pub(crate) const REGEX_DFA_SIZE_LIMIT: usize = 1 << 20;
/// Longest rule, plan, operation or bandwidth name.
const MAX_NAME_LEN: usize = 256;

// === entry points ===

/// Reads a policy file: YAML syntax, decoding and semantic validation, reporting every
/// problem of the file at once, sorted by position.
pub fn parse_policy(source: &str, file: &str) -> Result<Policy, PolicyErrors> {
    let root = yaml::parse(source, file, &Limits::default())?;
    decode_policy(&root, file)
}

/// [`parse_policy`] for raw bytes: refuses files over 4 MiB before looking at them, and
/// reports invalid UTF-8 at the line and column of the first bad byte.
pub fn parse_policy_bytes(source: &[u8], file: &str) -> Result<Policy, PolicyErrors> {
    let text = source_from_bytes(source, file, &Limits::default())?;
    parse_policy(text, file)
}

/// Decodes and validates an already parsed policy document.
pub fn decode_policy(root: &Node, file: &str) -> Result<Policy, PolicyErrors> {
    let mut ctx = Ctx::new(file);
    let policy = decode_policy_in(&mut ctx, root, &Path::Root);
    ctx.finish(policy)
}

/// Decodes and validates a policy embedded at `path` of a larger document (e.g. the `policy`
/// section of a gateway config), reporting into `ctx` with full paths (`policy.rules[0].name`).
/// `None` when an error was reported (this call may also report errors and return `Some`
/// only if the caller's `ctx` already had errors: check [`Ctx::has_errors`]).
pub fn decode_policy_in(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Policy> {
    let before = ctx.errors().len();
    let mut d = Dec::new(ctx);
    let policy = policy(&mut d, node, path);
    d.cross_check(Against::Itself);
    policy.filter(|_| ctx.errors().len() == before)
}

/// Reads an overrides file (the shape of the policy's `clients`: client key → override).
/// An empty file is no overrides. Plan names are not checked (there is no policy here);
/// [`parse_overrides_for`] checks them.
pub fn parse_overrides(
    source: &str,
    file: &str,
) -> Result<BTreeMap<String, ClientOverride>, PolicyErrors> {
    let root = yaml::parse(source, file, &Limits::default())?;
    decode_overrides(&root, file, None)
}

/// [`parse_overrides`], also checking each override against `policy`: referenced plans must
/// exist and every bandwidth's burst must admit the policy's most expensive operation.
pub fn parse_overrides_for(
    source: &str,
    file: &str,
    policy: &Policy,
) -> Result<BTreeMap<String, ClientOverride>, PolicyErrors> {
    let root = yaml::parse(source, file, &Limits::default())?;
    decode_overrides(&root, file, Some(policy))
}

/// Decodes an already parsed overrides document; see [`parse_overrides_for`].
pub fn decode_overrides(
    root: &Node,
    file: &str,
    policy: Option<&Policy>,
) -> Result<BTreeMap<String, ClientOverride>, PolicyErrors> {
    let mut ctx = Ctx::new(file);
    let mut d = Dec::new(&mut ctx);
    let out = if root.is_null() {
        Some(BTreeMap::new())
    } else {
        clients(&mut d, root, &Path::Root)
    };
    d.cross_check(policy.map_or(Against::Nothing, Against::Policy));
    ctx.finish(out)
}

/// Reads a caps file (client key → [`ClientCap`], as the usage endpoint writes it). An
/// empty file is no caps.
pub fn parse_caps(source: &str, file: &str) -> Result<BTreeMap<String, ClientCap>, PolicyErrors> {
    let root = yaml::parse(source, file, &Limits::default())?;
    let mut ctx = Ctx::new(file);
    let out = if root.is_null() {
        Some(BTreeMap::new())
    } else {
        caps(&mut ctx, &root, &Path::Root)
    };
    ctx.finish(out)
}

/// Reads one client's cap (the usage endpoint's `PUT` body, JSON or YAML), e.g.
/// `{"bandwidths": {"free-0": {"quota": 5}}, "concurrency": 2}`.
pub fn parse_client_cap(source: &[u8], file: &str) -> Result<ClientCap, PolicyErrors> {
    let text = source_from_bytes(source, file, &Limits::default())?;
    let root = yaml::parse(text, file, &Limits::default())?;
    let mut ctx = Ctx::new(file);
    let out = client_cap(&mut ctx, &root, &Path::Root);
    ctx.finish(out)
}

// === cross-checks ===

/// A name as written, for duplicate and reference checks.
struct NameAt {
    name: String,
    mark: Mark,
    path: String,
}

/// What whole-file checks need, collected while decoding.
#[derive(Default)]
struct Refs {
    /// Every key of `plans`, even those whose value failed to decode.
    plans: Vec<String>,
    /// References to plans (`default_plan`, `tag.plan`, `clients.*.plan`).
    plan_refs: Vec<NameAt>,
    rule_names: Vec<NameAt>,
    operation_names: Vec<NameAt>,
    /// Effective burst of every bandwidth of a plan or client override, with its position.
    bursts: Vec<(u64, Mark, String)>,
    /// Cost of every operation (name, cost, position of `cost`).
    costs: Vec<(String, u64, Mark, String)>,
    /// Byte length of every client key of `clients`, with its position.
    client_keys: Vec<(usize, Mark, String)>,
    /// The policy's `identify.max_key_length`, once decoded.
    max_key_length: Option<u32>,
}

/// The policy decoder's state: the error context plus the cross-check collections.
struct Dec<'c> {
    ctx: &'c mut Ctx,
    refs: Refs,
}

impl AsMut<Ctx> for Dec<'_> {
    fn as_mut(&mut self) -> &mut Ctx {
        self.ctx
    }
}

impl<'c> Dec<'c> {
    fn new(ctx: &'c mut Ctx) -> Dec<'c> {
        Dec {
            ctx,
            refs: Refs::default(),
        }
    }

    fn name_at(node: &Node, path: &Path<'_>, name: &str) -> NameAt {
        NameAt {
            name: name.to_owned(),
            mark: node.mark,
            path: path.to_string(),
        }
    }

    /// Runs the whole-file checks against `against`.
    fn cross_check(&mut self, against: Against<'_>) {
        let refs = std::mem::take(&mut self.refs);
        duplicates(self.ctx, &refs.rule_names, "rule name");
        duplicates(self.ctx, &refs.operation_names, "operation name");

        let max_key_length = match against {
            Against::Itself => refs.max_key_length,
            Against::Policy(p) => Some(p.identify.max_key_length),
            Against::Nothing => None,
        };
        if let Some(max) = max_key_length {
            for (len, mark, path) in &refs.client_keys {
                if *len > max as usize {
                    self.ctx.push(
                        *mark,
                        path.clone(),
                        format!(
                            "client key is {len} bytes, longer than identify.max_key_length \
                             ({max}): such keys are hashed, so this override could never match"
                        ),
                    );
                }
            }
        }

        let plans: Vec<&str> = match against {
            Against::Itself => refs.plans.iter().map(String::as_str).collect(),
            Against::Policy(p) => p.plans.keys().map(String::as_str).collect(),
            // A bare overrides file: plan names cannot be checked.
            Against::Nothing => return,
        };
        for r in &refs.plan_refs {
            if plans.contains(&r.name.as_str()) {
                continue;
            }
            let hint = match super::did_you_mean(&r.name, plans.iter().copied()) {
                Some(s) => format!(" (did you mean `{s}`?)"),
                None if plans.is_empty() => " (no plans are defined)".to_owned(),
                None => format!(" (defined plans: {})", quote_list(&plans)),
            };
            self.ctx.push(
                r.mark,
                r.path.clone(),
                format!("unknown plan `{}`{hint}", yaml::shorten(&r.name)),
            );
        }

        match against {
            Against::Itself => {
                for (op, cost, mark, path) in &refs.costs {
                    let mut over = refs.bursts.iter().filter(|(b, _, _)| b < cost);
                    let Some((burst, _, bw)) = over.next() else {
                        continue;
                    };
                    let more = match over.count() {
                        0 => String::new(),
                        1 => " (and 1 more bandwidth)".to_owned(),
                        n => format!(" (and {n} more bandwidths)"),
                    };
                    self.ctx.push(
                        *mark,
                        path.clone(),
                        format!(
                            "cost {cost} exceeds burst {burst} of {bw}{more}: a request to \
                             `{op}` could never be admitted"
                        ),
                    );
                }
            }
            Against::Policy(policy) => {
                let Some(op) = policy.operations.iter().max_by_key(|o| o.cost) else {
                    return;
                };
                for (burst, mark, path) in &refs.bursts {
                    if *burst < op.cost {
                        self.ctx.push(
                            *mark,
                            path.clone(),
                            format!(
                                "burst {burst} is less than the cost {} of operation `{}`: \
                                 a request to it could never be admitted",
                                op.cost, op.name
                            ),
                        );
                    }
                }
            }
            Against::Nothing => {}
        }
    }
}

/// What cross-checks compare against.
#[derive(Clone, Copy)]
enum Against<'a> {
    /// The policy being decoded (its own plans and operations).
    Itself,
    /// Nothing: a bare overrides file.
    Nothing,
    /// The policy an overrides file belongs to.
    Policy(&'a Policy),
}

fn duplicates(ctx: &mut Ctx, names: &[NameAt], what: &str) {
    let mut first: HashMap<&str, Mark> = HashMap::with_capacity(names.len());
    for n in names {
        match first.get(n.name.as_str()) {
            Some(m) => ctx.push(
                n.mark,
                n.path.clone(),
                format!(
                    "duplicate {what} `{}` (first at line {}, column {})",
                    yaml::shorten(&n.name),
                    m.line,
                    m.column
                ),
            ),
            None => {
                first.insert(&n.name, n.mark);
            }
        }
    }
}
// === shared checks ===

/// A rule, plan, operation or bandwidth name: non-empty, printable, at most 256 bytes.
fn name(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<String> {
    let s = scalar(ctx, node, path, "a name")?;
    check_name(ctx, node, path, s).then(|| s.to_owned())
}

fn check_name(ctx: &mut Ctx, node: &Node, path: &Path<'_>, s: &str) -> bool {
    let problem = if s.is_empty() {
        "name must not be empty"
    } else if s.chars().any(char::is_control) {
        "name must not contain control characters"
    } else if s.len() > MAX_NAME_LEN {
        "name is longer than 256 bytes"
    } else {
        return true;
    };
    ctx.error(node, path, problem);
    false
}

/// A non-empty string.
fn non_empty(ctx: &mut Ctx, node: &Node, path: &Path<'_>, what: &str) -> Option<String> {
    let s = scalar(ctx, node, path, what)?;
    if s.is_empty() {
        ctx.error(
            node,
            path,
            format!("expected {what}, found an empty string"),
        );
        return None;
    }
    Some(s.to_owned())
}

/// `one_or_many`, refusing an empty list.
fn non_empty_list<'n, T>(
    ctx: &mut Ctx,
    node: &'n Node,
    path: &Path<'_>,
    f: impl FnMut(&mut Ctx, &'n Node, &Path<'_>) -> Option<T>,
) -> Option<Vec<T>> {
    let v = one_or_many(ctx, node, path, f)?;
    if v.is_empty() {
        ctx.error(node, path, "empty list: give at least one value");
        return None;
    }
    Some(v)
}

/// A whole number of at least 1.
fn at_least_one(ctx: &mut Ctx, node: &Node, path: &Path<'_>, max: u64, hint: &str) -> Option<u64> {
    let n = super::uint(ctx, node, path, max)?;
    if n == 0 {
        ctx.error(node, path, format!("must be at least 1{hint}"));
        return None;
    }
    Some(n)
}

fn positive_u32(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<u32> {
    at_least_one(ctx, node, path, u64::from(u32::MAX), "").and_then(|n| u32::try_from(n).ok())
}

/// A whole number in `lo..=hi`.
fn in_range(ctx: &mut Ctx, node: &Node, path: &Path<'_>, lo: u64, hi: u64) -> Option<u64> {
    let n = super::uint(ctx, node, path, u64::MAX)?;
    if n < lo || n > hi {
        ctx.error(node, path, format!("{n} is out of range ({lo} to {hi})"));
        return None;
    }
    Some(n)
}

/// A fraction in (0, 1].
fn fraction(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<f64> {
    let v = f64::decode(ctx, node, path)?;
    if !(v > 0.0 && v <= 1.0) {
        ctx.error(
            node,
            path,
            format!("{v} is out of range (a fraction greater than 0 and at most 1)"),
        );
        return None;
    }
    Some(v)
}

/// A duration longer than zero.
fn positive_duration(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<HumanDuration> {
    let d = HumanDuration::decode(ctx, node, path)?;
    if d.0.is_zero() {
        ctx.error(node, path, "duration must be longer than 0");
        return None;
    }
    Some(d)
}

/// An error status code: 400 to 599.
fn status(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<u16> {
    let v = u16::decode(ctx, node, path)?;
    if !(100..=599).contains(&v) {
        ctx.error(
            node,
            path,
            format!("{v} is not an http status code (100 to 599)"),
        );
        return None;
    }
    if v < 400 {
        ctx.error(
            node,
            path,
            format!("status {v} does not reject a request (use a 4xx or 5xx code)"),
        );
        return None;
    }
    Some(v)
}

/// HTTP `tchar`: what a method or header name may contain.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn header_name(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<String> {
    let s = scalar(ctx, node, path, "a header name")?;
    if !is_token(s) {
        ctx.error(
            node,
            path,
            format!("`{}` is not a valid header name", yaml::shorten(s)),
        );
        return None;
    }
    Some(s.to_owned())
}

fn method(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<String> {
    let s = scalar(ctx, node, path, "an http method like `GET`")?;
    if !is_token(s) {
        ctx.error(
            node,
            path,
            format!(
                "`{}` is not an http method (expected a token like `GET` or `POST`)",
                yaml::shorten(s)
            ),
        );
        return None;
    }
    if s.bytes().any(|b| b.is_ascii_lowercase()) {
        ctx.error(
            node,
            path,
            format!(
                "method `{s}` must be upper case, as on the wire (did you mean `{}`?)",
                s.to_ascii_uppercase()
            ),
        );
        return None;
    }
    Some(s.to_owned())
}

/// Checks one regex the way the matcher will build it (size-limited, linear time).
pub(crate) fn check_regex(pattern: &str, ignore_case: bool) -> Result<(), String> {
    let built = regex::RegexBuilder::new(pattern)
        .case_insensitive(ignore_case)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_SIZE_LIMIT)
        .build();
    match built {
        Ok(_) => Ok(()),
        Err(regex::Error::Syntax(text)) => {
            // The message is a multi-line diagram ending in `error: <what>`.
            let detail = text
                .lines()
                .rev()
                .find_map(|l| l.trim().strip_prefix("error: "))
                .unwrap_or("syntax error");
            let engine = if detail.contains("look-around") || detail.contains("backreferences") {
                " (linear-time regex engine)"
            } else {
                ""
            };
            Err(format!(
                "invalid regex `{}`: {detail}{engine}",
                yaml::shorten(pattern)
            ))
        }
        Err(regex::Error::CompiledTooBig(limit)) => Err(format!(
            "regex `{}` is too large once compiled (limit {} KiB)",
            yaml::shorten(pattern),
            limit / 1024
        )),
        Err(e) => Err(format!("invalid regex `{}`: {e}", yaml::shorten(pattern))),
    }
}

/// Checks one glob (`*` any run, `?` one character, `[a-z]`, `{a,b}`), whole-value, with the
/// same translation the matcher compiles ([`crate::matcher::glob_to_regex`]), so a glob that
/// validates is exactly a glob that compiles.
pub(crate) fn check_glob(pattern: &str) -> Result<(), String> {
    let re = crate::matcher::glob_to_regex(pattern, false)
        .map_err(|e| format!("invalid glob `{}`: {e}", yaml::shorten(pattern)))?;
    check_regex(&re, false).map_err(|_| {
        format!(
            "glob `{}` is too large once compiled",
            yaml::shorten(pattern)
        )
    })
}

/// Checks that `burst` units at `rate` fit the bucket arithmetic (`C = burst · T` in u64 ns).
fn check_capacity(rate: &Rate, burst: u64) -> Result<(), String> {
    let t = rate.period_ns() / rate.count().max(1);
    if burst.checked_mul(t).is_none() {
        return Err(format!(
            "burst {burst} is too large for rate `{rate}`: the bucket would span more than 584 years"
        ));
    }
    Ok(())
}

// === policy ===

const SECTIONS_HINT: &str = "the policy is empty (it needs at least `version: 1`)";

fn policy(d: &mut Dec<'_>, root: &Node, path: &Path<'_>) -> Option<Policy> {
    if root.is_null() {
        d.ctx.error(root, path, SECTIONS_HINT);
        return None;
    }
    let mut m = MapReader::new(d, root, path)?;
    let version = m.required_with(d, "version", |d, n, p| {
        let v = u32::decode(&mut *d.ctx, n, p)?;
        if v != 1 {
            d.ctx.error(
                n,
                p,
                format!("unsupported version {v} (only version 1 exists)"),
            );
            return None;
        }
        Some(v)
    });
    let identify = m
        .optional_with(d, "identify", |d, n, p| identify(&mut *d.ctx, n, p))
        .unwrap_or_default();
    d.refs.max_key_length = Some(identify.max_key_length);
    let rules = m
        .optional_with(d, "rules", |d, n, p| list(d, n, p, rule))
        .unwrap_or_default();
    let plans = m.optional_with(d, "plans", plans).unwrap_or_default();
    let default_plan = m.optional_with(d, "default_plan", plan_ref);
    let operations = m
        .optional_with(d, "operations", |d, n, p| list(d, n, p, operation))
        .unwrap_or_default();
    let clients = m.optional_with(d, "clients", clients).unwrap_or_default();
    let overrides_file = m.optional_with(d, "overrides_file", |d, n, p| {
        non_empty(&mut *d.ctx, n, p, "a file name")
    });
    let burst_sharing = m
        .optional_with(d, "burst_sharing", |d, n, p| {
            burst_sharing(&mut *d.ctx, n, p)
        })
        .unwrap_or_default();
    let usage_endpoint = m.optional_with(d, "usage_endpoint", |d, n, p| {
        usage_endpoint(&mut *d.ctx, n, p)
    });
    let shedding = m.optional_with(d, "shedding", |d, n, p| shedding(&mut *d.ctx, n, p));
    let responses = m
        .optional_with(d, "responses", |d, n, p| responses(&mut *d.ctx, n, p))
        .unwrap_or_default();
    let state = m
        .optional_with(d, "state", |d, n, p| state(&mut *d.ctx, n, p))
        .unwrap_or_default();
    m.finish(d);
    Some(Policy {
        version: version?,
        identify,
        rules,
        plans,
        default_plan,
        operations,
        clients,
        overrides_file,
        burst_sharing,
        usage_endpoint,
        shedding,
        responses,
        state,
    })
}

// === identify ===

fn identify(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Identify> {
    let mut m = MapReader::new(ctx, node, path)?;
    let defaults = Identify::default();
    let trusted_proxies = m
        .optional_with(ctx, "trusted_proxies", |c, n, p| {
            one_or_many(c, n, p, Cidr::decode)
        })
        .unwrap_or_default();
    let ipv6_prefix = m
        .optional_with(ctx, "ipv6_prefix", |c, n, p| in_range(c, n, p, 1, 128))
        .and_then(|v| u8::try_from(v).ok())
        .unwrap_or(defaults.ipv6_prefix);
    let ipv4_prefix = m
        .optional_with(ctx, "ipv4_prefix", |c, n, p| in_range(c, n, p, 1, 32))
        .and_then(|v| u8::try_from(v).ok())
        .unwrap_or(defaults.ipv4_prefix);
    let client_key = m
        .optional_with(ctx, "client_key", |c, n, p| {
            one_or_many(c, n, p, key_extractor)
        })
        .unwrap_or_default();
    let max_key_length = m
        .optional_with(ctx, "max_key_length", positive_u32)
        .unwrap_or(defaults.max_key_length);
    m.finish(ctx);
    Some(Identify {
        trusted_proxies,
        ipv6_prefix,
        ipv4_prefix,
        client_key,
        max_key_length,
    })
}

const EXTRACTORS: [&str; 3] = ["header", "query", "bearer"];

fn key_extractor(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<KeyExtractor> {
    let v = variant(
        ctx,
        node,
        path,
        "`bearer`, `{header: NAME}` or `{query: NAME}`",
    )?;
    let vp = path.key(v.name);
    let value = v.value.filter(|n| !n.is_null());
    match (v.name, value) {
        ("bearer", None) => Some(KeyExtractor::Bearer),
        ("bearer", Some(n)) => {
            ctx.error(n, &vp, "`bearer` takes no value");
            None
        }
        ("header", Some(n)) => header_name(ctx, n, &vp).map(KeyExtractor::Header),
        ("query", Some(n)) => {
            non_empty(ctx, n, &vp, "a query parameter name").map(KeyExtractor::Query)
        }
        ("header" | "query", None) => {
            ctx.error(
                node,
                path,
                format!("`{0}` needs a name, e.g. `{{{0}: api_key}}`", v.name),
            );
            None
        }
        _ => {
            unknown_variant(ctx, &v, path, &EXTRACTORS);
            None
        }
    }
}

// === rules ===

fn rule(d: &mut Dec<'_>, node: &Node, path: &Path<'_>) -> Option<Rule> {
    let mut m = MapReader::new(d, node, path)?;
    let name = m.required_with(d, "name", |d, n, p| {
        let s = name(&mut *d.ctx, n, p)?;
        d.refs.rule_names.push(Dec::name_at(n, p, &s));
        Some(s)
    });
    let mode = m
        .optional_with(d, "mode", |d, n, p| {
            choice(
                &mut *d.ctx,
                n,
                p,
                &[("enforce", Mode::Enforce), ("shadow", Mode::Shadow)],
            )
        })
        .unwrap_or_default();
    let when = when(d, &mut m);
    let action = m.required_with(d, "action", action);
    m.finish(d);
    Some(Rule {
        name: name?,
        mode,
        when: when?,
        action: action?,
    })
}

/// `when`: absent is `Some(None)`; present but empty or invalid is an error (`None`).
fn when(d: &mut Dec<'_>, m: &mut MapReader<'_, '_>) -> Option<Option<Condition>> {
    if m.entry("when").is_none() {
        return Some(None);
    }
    m.present_with(d, "when", |d, n, p| condition(&mut *d.ctx, n, p))
        .map(Some)
}

const CONDITION_FIELDS: [&str; 10] = [
    "ip",
    "user_agent",
    "path",
    "method",
    "host",
    "headers",
    "operation",
    "any",
    "all",
    "not",
];

fn condition(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Condition> {
    let empty = match &node.kind {
        NodeKind::Null => true,
        NodeKind::Map(e) => e.is_empty(),
        _ => false,
    };
    if empty {
        ctx.error(
            node,
            path,
            format!(
                "empty condition: give at least one of {} (or leave `when` out to match every request)",
                quote_list(&CONDITION_FIELDS)
            ),
        );
        return None;
    }
    let mut m = MapReader::new(ctx, node, path)?;
    let ip = m.present_with(ctx, "ip", |c, n, p| non_empty_list(c, n, p, Cidr::decode));
    let user_agent = m.present_with(ctx, "user_agent", string_match);
    let path_match = m.present_with(ctx, "path", string_match);
    let method = m.present_with(ctx, "method", |c, n, p| non_empty_list(c, n, p, method));
    let host = m.present_with(ctx, "host", string_match);
    let headers = m.present_with(ctx, "headers", |c, n, p| {
        non_empty_list(c, n, p, header_match)
    });
    let operation = m.present_with(ctx, "operation", |c, n, p| non_empty_list(c, n, p, name));
    let any = m.present_with(ctx, "any", sub_conditions);
    let all = m.present_with(ctx, "all", sub_conditions);
    let not = m.present_with(ctx, "not", condition).map(Box::new);
    m.finish(ctx);
    Some(Condition {
        ip,
        user_agent,
        path: path_match,
        method,
        host,
        headers,
        operation,
        any,
        all,
        not,
    })
}

fn sub_conditions(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Vec<Condition>> {
    let v = list(ctx, node, path, condition)?;
    if v.is_empty() {
        ctx.error(node, path, "empty list: give at least one condition");
        return None;
    }
    Some(v)
}

const MATCH_KINDS: [(&str, MatchKind); 6] = [
    ("exact", MatchKind::Exact),
    ("prefix", MatchKind::Prefix),
    ("suffix", MatchKind::Suffix),
    ("contains", MatchKind::Contains),
    ("glob", MatchKind::Glob),
    ("regex", MatchKind::Regex),
];

const KINDS_TEXT: &str = "`exact`, `prefix`, `suffix`, `contains`, `glob` or `regex`";

/// A string matcher: a plain string (exact) or `{KIND: PATTERN | [PATTERN…], ignore_case}`.
fn string_match(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<StringMatch> {
    if let Some(s) = node.as_str() {
        return Some(StringMatch {
            kind: MatchKind::Exact,
            patterns: vec![s.to_owned()],
            ignore_case: false,
        });
    }
    if !matches!(node.kind, NodeKind::Map(_)) {
        super::expected(
            ctx,
            node,
            path,
            "a string or a mapping like `{prefix: /api}`",
        );
        return None;
    }
    let mut m = MapReader::new(ctx, node, path)?;
    let ignore_case = m.optional::<_, bool>(ctx, "ignore_case").unwrap_or(false);
    let mut first: Option<&str> = None;
    let mut found: Option<(MatchKind, Vec<String>)> = None;
    let mut ok = true;
    for (key, kind) in MATCH_KINDS {
        let Some(e) = m.entry(key) else { continue };
        let base = m.path();
        let kp = base.key(key);
        if let Some(f) = first {
            ctx.error(
                e.key_node,
                &kp,
                format!(
                    "only one of {KINDS_TEXT} per matcher, found `{f}` and `{key}` (combine kinds with `any`)"
                ),
            );
            ok = false;
            continue;
        }
        first = Some(key);
        let patterns = non_empty_list(ctx, e.value, &kp, |c, n, p| {
            pattern(c, n, p, kind, ignore_case)
        });
        match patterns {
            Some(v) => found = Some((kind, v)),
            None => ok = false,
        }
    }
    let unknown = m.finish(ctx);
    if first.is_none() && unknown == 0 {
        ctx.error(
            node,
            path,
            format!("missing pattern: give one of {KINDS_TEXT}"),
        );
    }
    let (kind, patterns) = found.filter(|_| ok)?;
    Some(StringMatch {
        kind,
        patterns,
        ignore_case,
    })
}

fn pattern(
    ctx: &mut Ctx,
    node: &Node,
    path: &Path<'_>,
    kind: MatchKind,
    ignore_case: bool,
) -> Option<String> {
    let s = scalar(ctx, node, path, "a pattern string")?;
    let checked = match kind {
        MatchKind::Regex => check_regex(s, ignore_case),
        MatchKind::Glob => check_glob(s),
        _ => Ok(()),
    };
    match checked {
        Ok(()) => Some(s.to_owned()),
        Err(msg) => {
            ctx.error(node, path, msg);
            None
        }
    }
}

fn header_match(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<HeaderMatch> {
    let mut m = MapReader::new(ctx, node, path)?;
    let name = m.required_with(ctx, "name", header_name);
    let present_node = m.entry("present").map(|e| e.value);
    let present = m.optional::<_, bool>(ctx, "present");
    let has_value = m.entry("value").is_some_and(|e| !e.value.is_null());
    let value = m.optional_with(ctx, "value", string_match);
    let unknown = m.finish(ctx);
    if present.is_none() && !has_value && present_node.is_none_or(Node::is_null) && unknown == 0 {
        ctx.error(
            node,
            path,
            "header condition needs `present` or `value` (or both)",
        );
        return None;
    }
    if let (Some(false), true, Some(pn)) = (present, has_value, present_node) {
        ctx.error(
            pn,
            &path.key("present"),
            "`present: false` with a `value` can never match (an absent header has no value)",
        );
        return None;
    }
    Some(HeaderMatch {
        name: name?,
        present,
        value,
    })
}

const ACTIONS: [&str; 4] = ["deny", "allow", "limit", "tag"];

fn action(d: &mut Dec<'_>, node: &Node, path: &Path<'_>) -> Option<Action> {
    let v = variant(
        &mut *d.ctx,
        node,
        path,
        "an action: `deny`, `allow`, `{limit: …}` or `{tag: …}`",
    )?;
    let vp = path.key(v.name);
    let value = v.value.filter(|n| !n.is_null());
    match v.name {
        "deny" => match value {
            None => Some(Action::Deny(DenyAction::default())),
            Some(n) => deny(&mut *d.ctx, n, &vp).map(Action::Deny),
        },
        "allow" => match value {
            None => Some(Action::Allow),
            Some(n) if matches!(&n.kind, NodeKind::Map(e) if e.is_empty()) => Some(Action::Allow),
            Some(n) => {
                d.ctx.error(n, &vp, "`allow` takes no parameters");
                None
            }
        },
        "limit" => match value {
            None => {
                d.ctx.error(
                    node,
                    path,
                    "`limit` needs parameters, e.g. `{limit: {rate: 5/min, key: ip}}`",
                );
                None
            }
            Some(n) => limit(&mut *d.ctx, n, &vp).map(Action::Limit),
        },
        "tag" => match value {
            None => {
                d.ctx.error(
                    node,
                    path,
                    "`tag` needs parameters, e.g. `{tag: {priority: critical}}`",
                );
                None
            }
            Some(n) => tag(d, n, &vp).map(Action::Tag),
        },
        _ => {
            unknown_variant(&mut *d.ctx, &v, path, &ACTIONS);
            None
        }
    }
}

fn deny(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<DenyAction> {
    let mut m = MapReader::new(ctx, node, path)?;
    let status = m.optional_with(ctx, "status", status);
    m.finish(ctx);
    Some(DenyAction { status })
}

fn limit(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<LimitAction> {
    let mut m = MapReader::new(ctx, node, path)?;
    let rate = m.required::<_, Rate>(ctx, "rate");
    let burst = m.optional_with(ctx, "burst", burst);
    let key = m.optional_with(ctx, "key", limit_key).unwrap_or_default();
    let estimator = m
        .optional_with(ctx, "estimator", |c, n, p| {
            choice(
                c,
                n,
                p,
                &[("exact", Estimator::Exact), ("sketch", Estimator::Sketch)],
            )
        })
        .unwrap_or_default();
    if let (Some(r), Some(b), Some(e)) = (&rate, burst, m.entry("burst")) {
        if let Err(msg) = check_capacity(r, b) {
            let base = m.path();
            ctx.error(e.value, &base.key("burst"), msg);
        }
    }
    m.finish(ctx);
    Some(LimitAction {
        rate: rate?,
        burst,
        key,
        estimator,
    })
}

fn burst(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<u64> {
    at_least_one(ctx, node, path, u64::MAX, "")
}

const LIMIT_KEYS: [&str; 4] = ["ip", "client", "global", "header"];

fn limit_key(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<LimitKey> {
    let v = variant(
        ctx,
        node,
        path,
        "`ip`, `client`, `global` or `{header: NAME}`",
    )?;
    let value = v.value.filter(|n| !n.is_null());
    match (v.name, value) {
        ("ip", None) => Some(LimitKey::Ip),
        ("client", None) => Some(LimitKey::Client),
        ("global", None) => Some(LimitKey::Global),
        ("header", Some(n)) => header_name(ctx, n, &path.key("header")).map(LimitKey::Header),
        ("header", None) => {
            ctx.error(
                node,
                path,
                "`header` needs a name, e.g. `{header: x-tenant}`",
            );
            None
        }
        ("ip" | "client" | "global", Some(n)) => {
            ctx.error(n, &path.key(v.name), format!("`{}` takes no value", v.name));
            None
        }
        _ => {
            unknown_variant(ctx, &v, path, &LIMIT_KEYS);
            None
        }
    }
}

fn tag(d: &mut Dec<'_>, node: &Node, path: &Path<'_>) -> Option<TagAction> {
    let mut m = MapReader::new(d, node, path)?;
    let priority = m.optional_with(d, "priority", |d, n, p| priority(&mut *d.ctx, n, p));
    let plan = m.optional_with(d, "plan", plan_ref);
    let set = m.entry("priority").is_some() || m.entry("plan").is_some();
    let unknown = m.finish(d);
    if !set && unknown == 0 {
        d.ctx.error(
            node,
            path,
            "`tag` sets nothing: give `priority`, `plan` or both",
        );
        return None;
    }
    Some(TagAction { priority, plan })
}

fn priority(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Priority> {
    if node.as_str() == Some("borrowed") {
        ctx.error(
            node,
            path,
            "priority `borrowed` is given by burst sharing, not by rules (use `critical`, `normal` or `sheddable`)",
        );
        return None;
    }
    choice(
        ctx,
        node,
        path,
        &[
            ("critical", Priority::Critical),
            ("normal", Priority::Normal),
            ("sheddable", Priority::Sheddable),
        ],
    )
}

/// A plan name referenced somewhere; checked against `plans` at the end.
fn plan_ref(d: &mut Dec<'_>, node: &Node, path: &Path<'_>) -> Option<String> {
    let s = name(&mut *d.ctx, node, path)?;
    d.refs.plan_refs.push(Dec::name_at(node, path, &s));
    Some(s)
}

// === quotas ===

fn plans(d: &mut Dec<'_>, node: &Node, path: &Path<'_>) -> Option<BTreeMap<String, Plan>> {
    let entries = map_entries(&mut *d.ctx, node, path)?;
    let mut out = BTreeMap::new();
    let mut ok = true;
    for e in entries {
        let kp = path.key(e.key);
        d.refs.plans.push(e.key.to_owned());
        ok &= check_name(&mut *d.ctx, e.key_node, &kp, e.key);
        match plan(d, e.value, &kp) {
            Some(p) => {
                out.insert(e.key.to_owned(), p);
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn plan(d: &mut Dec<'_>, node: &Node, path: &Path<'_>) -> Option<Plan> {
    let mut m = MapReader::new(d, node, path)?;
    let bandwidths = m
        .optional_with(d, "bandwidths", bandwidths)
        .unwrap_or_default();
    let concurrency = m.optional_with(d, "concurrency", |d, n, p| concurrency(&mut *d.ctx, n, p));
    let fixed = m.optional::<_, bool>(d, "fixed").unwrap_or(false);
    let alerts = m.optional_with(d, "alerts", |d, n, p| alerts(&mut *d.ctx, n, p));
    let growth_at = m.entry("growth").map(|e| e.value.mark);
    let growth = m.optional_with(d, "growth", |d, n, p| growth(&mut *d.ctx, n, p));
    m.finish(d);
    if let (true, Some(at)) = (fixed, growth_at) {
        d.ctx.error_at(
            at,
            &path.key("growth"),
            "a fixed quota is never grown: remove `growth` or `fixed: true`",
        );
        return None;
    }
    Some(Plan {
        bandwidths,
        concurrency,
        fixed,
        alerts,
        growth,
    })
}

/// Longest growth window and `max_rise.within`: a day.
const MAX_GROWTH_WINDOW: std::time::Duration = std::time::Duration::from_secs(86_400);

/// `growth: {threshold, window, step, max_factor, max_rise: {factor, within}}`.
fn growth(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Growth> {
    let before = ctx.errors().len();
    let mut m = MapReader::new(ctx, node, path)?;
    let threshold = m.optional_with(ctx, "threshold", fraction);
    let window = m.optional_with(ctx, "window", |c, n, p| {
        duration_between(
            c,
            n,
            p,
            std::time::Duration::from_secs(1),
            MAX_GROWTH_WINDOW,
        )
    });
    let step = m.optional_with(ctx, "step", fraction);
    let max_factor = m.required_with(ctx, "max_factor", |c, n, p| factor_between(c, n, p, 100.0));
    let rise_at = m.entry("max_rise").map(|e| e.value.mark);
    let max_rise = m.optional_with(ctx, "max_rise", max_rise);
    m.finish(ctx);
    let bad = ctx.errors().len() > before;
    let g = Growth {
        threshold: threshold.unwrap_or_else(crate::model::default_growth_threshold),
        window: window.unwrap_or_else(crate::model::default_growth_window),
        step: step.unwrap_or_else(crate::model::default_growth_step),
        max_factor: max_factor?,
        max_rise: max_rise.unwrap_or_default(),
    };
    if bad {
        return None;
    }
    let at = rise_at.unwrap_or(node.mark);
    let rise_path = path.key("max_rise");
    if g.max_rise.within.0 < g.window.0 {
        ctx.error_at(
            at,
            &rise_path,
            format!(
                "`max_rise.within` ({}) is shorter than `window` ({}): the quota is measured \
                 over a window, so a rise cannot be bounded over less",
                g.max_rise.within, g.window
            ),
        );
        return None;
    }
    if g.max_rise.factor + 1e-9 < 1.0 + g.step {
        ctx.error_at(
            at,
            &rise_path,
            format!(
                "`max_rise.factor` {} is below one step (×{}): the quota could never grow",
                g.max_rise.factor,
                1.0 + g.step
            ),
        );
        return None;
    }
    Some(g)
}

/// `max_rise: {factor, within}`.
fn max_rise(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<MaxRise> {
    let before = ctx.errors().len();
    let mut m = MapReader::new(ctx, node, path)?;
    let defaults = MaxRise::default();
    let factor = m.optional_with(ctx, "factor", |c, n, p| factor_between(c, n, p, 100.0));
    let within = m.optional_with(ctx, "within", |c, n, p| {
        duration_between(
            c,
            n,
            p,
            std::time::Duration::from_secs(1),
            MAX_GROWTH_WINDOW,
        )
    });
    m.finish(ctx);
    let bad = ctx.errors().len() > before;
    if bad {
        return None;
    }
    Some(MaxRise {
        factor: factor.unwrap_or(defaults.factor),
        within: within.unwrap_or(defaults.within),
    })
}

/// A number greater than 1 and at most `max`.
fn factor_between(ctx: &mut Ctx, node: &Node, path: &Path<'_>, max: f64) -> Option<f64> {
    let v = f64::decode(ctx, node, path)?;
    if !(v > 1.0 && v <= max) {
        ctx.error(
            node,
            path,
            format!("{v} is out of range (a factor greater than 1 and at most {max})"),
        );
        return None;
    }
    Some(v)
}

/// A duration in `[min, max]`.
fn duration_between(
    ctx: &mut Ctx,
    node: &Node,
    path: &Path<'_>,
    min: std::time::Duration,
    max: std::time::Duration,
) -> Option<HumanDuration> {
    let d = HumanDuration::decode(ctx, node, path)?;
    if d.0 < min || d.0 > max {
        ctx.error(
            node,
            path,
            format!(
                "{d} is out of range (from {} to {})",
                HumanDuration(min),
                HumanDuration(max)
            ),
        );
        return None;
    }
    Some(d)
}

/// `alerts: {thresholds: [..], webhook: URL}`.
fn alerts(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Alerts> {
    let mut m = MapReader::new(ctx, node, path)?;
    let thresholds = m.optional_with(ctx, "thresholds", alert_thresholds);
    let webhook = m.required_with(ctx, "webhook", webhook_url);
    m.finish(ctx);
    Some(Alerts {
        thresholds: thresholds.unwrap_or_else(crate::model::default_alert_thresholds),
        webhook: webhook?,
    })
}

/// A non-empty list of fractions in (0, 1], strictly ascending.
fn alert_thresholds(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Vec<f64>> {
    let NodeKind::Seq(items) = &node.kind else {
        expected(ctx, node, path, "a list of thresholds, e.g. [0.8, 1.0]");
        return None;
    };
    if items.is_empty() {
        ctx.error(
            node,
            path,
            "no thresholds: give at least one (or leave `thresholds` out for [0.8, 1.0])",
        );
        return None;
    }
    let mut out: Vec<f64> = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let p = path.index(i);
        let Some(v) = fraction(ctx, item, &p) else {
            ok = false;
            continue;
        };
        if let Some(&prev) = out.last() {
            if v <= prev {
                ctx.error(
                    item,
                    &p,
                    format!("thresholds must ascend: {v} follows {prev}"),
                );
                ok = false;
            }
        }
        out.push(v);
    }
    ok.then_some(out)
}

/// An `http://host[:port][/path]` URL (plain HTTP: the webhook client has no TLS).
fn webhook_url(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<String> {
    let s = String::decode(ctx, node, path)?;
    match check_webhook_url(&s) {
        Ok(()) => Some(s),
        Err(why) => {
            ctx.error(node, path, format!("`{s}` is not a webhook URL: {why}"));
            None
        }
    }
}

/// Why `s` is not an `http://host[:port][/path]` URL, if it is not.
fn check_webhook_url(s: &str) -> Result<(), &'static str> {
    let Some(rest) = s.strip_prefix("http://") else {
        return Err(if s.starts_with("https://") {
            "https is not supported (the webhook client speaks plain HTTP; relay through a local proxy for TLS)"
        } else {
            "it must start with `http://`"
        });
    };
    if !s.bytes().all(|b| b.is_ascii_graphic()) || s.contains('#') {
        return Err("only printable ASCII without spaces or a `#fragment`");
    }
    let (authority, _path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err("user information (`user@`) is not supported");
    }
    // `[v6]`, `[v6]:port`, `host`, `host:port`.
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (addr, after) = v6.split_once(']').ok_or("an IPv6 host needs its `]`")?;
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return Err("the host is not an IPv6 address");
            }
            match after {
                "" => (addr, None),
                _ => (
                    addr,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or("`]` must be followed by `:port`")?,
                    ),
                ),
            }
        }
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err("no host");
    }
    if !authority.starts_with('[')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
    {
        return Err("the host may hold only letters, digits, `.`, `-` and `_`");
    }
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |p| p == 0) {
            return Err("the port must be a number from 1 to 65535");
        }
    }
    Ok(())
}

fn concurrency(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<u32> {
    at_least_one(
        ctx,
        node,
        path,
        u64::from(u32::MAX),
        " (leave `concurrency` out for no limit)",
    )
    .and_then(|n| u32::try_from(n).ok())
}

fn bandwidths(d: &mut Dec<'_>, node: &Node, path: &Path<'_>) -> Option<Vec<Bandwidth>> {
    let mut names: HashMap<String, Mark> = HashMap::new();
    one_or_many(d, node, path, |d, n, p| bandwidth(d, n, p, &mut names))
}

fn bandwidth(
    d: &mut Dec<'_>,
    node: &Node,
    path: &Path<'_>,
    names: &mut HashMap<String, Mark>,
) -> Option<Bandwidth> {
    let bw = match &node.kind {
        NodeKind::Scalar(s, _) => short_bandwidth(&mut *d.ctx, node, path, s)?,
        NodeKind::Map(pairs)
            if pairs
                .iter()
                .any(|(k, _)| matches!(k.as_str(), Some("quota" | "period"))) =>
        {
            period_bandwidth(&mut *d.ctx, node, path, names)?
        }
        NodeKind::Map(_) => {
            let ctx = &mut *d.ctx;
            let mut m = MapReader::new(ctx, node, path)?;
            if let Some(e) = m.entry("time_zone") {
                let base = m.path();
                ctx.error(
                    e.key_node,
                    &base.key("time_zone"),
                    "`time_zone` applies to a quota per calendar period \
                     (`{quota: 1000000, period: month, time_zone: Europe/Paris}`), not to a rate",
                );
            }
            let rate = m.required::<_, Rate>(ctx, "rate");
            let burst = m.optional_with(ctx, "burst", burst);
            let name = m.optional_with(ctx, "name", |c, n, p| bandwidth_name(c, n, p, names));
            if let (Some(r), Some(b), Some(e)) = (&rate, burst, m.entry("burst")) {
                if let Err(msg) = check_capacity(r, b) {
                    let base = m.path();
                    ctx.error(e.value, &base.key("burst"), msg);
                }
            }
            m.finish(ctx);
            Bandwidth {
                rate: rate?,
                burst,
                name,
                period: None,
            }
        }
        _ => {
            expected(
                &mut *d.ctx,
                node,
                path,
                "a bandwidth like `10/s burst 20` or `{rate: 10/s, burst: 20}`",
            );
            return None;
        }
    };
    let effective = bw.burst.unwrap_or(bw.rate.count());
    d.refs.bursts.push((effective, node.mark, path.to_string()));
    Some(bw)
}

/// `"10/s"` or `"10/s burst 20"`.
fn short_bandwidth(ctx: &mut Ctx, node: &Node, path: &Path<'_>, s: &str) -> Option<Bandwidth> {
    let (rate_text, burst_text) = match s.split_once("burst") {
        Some((r, b)) => (r, Some(b.trim())),
        None => (s, None),
    };
    let fail = |ctx: &mut Ctx, why: String| {
        ctx.error(
            node,
            path,
            format!(
                "invalid bandwidth `{}`: {why} (write e.g. `10/s burst 20`)",
                yaml::shorten(s)
            ),
        );
    };
    let rate: Rate = match rate_text.parse() {
        Ok(r) => r,
        Err(e) => {
            fail(ctx, crate::units::UnitError::to_string(&e));
            return None;
        }
    };
    if let Err(msg) = super::check_rate(&rate) {
        fail(ctx, msg);
        return None;
    }
    let burst = match burst_text {
        None => None,
        Some(b) => match b.parse::<u64>() {
            Ok(0) => {
                fail(ctx, "burst must be at least 1".to_owned());
                return None;
            }
            Ok(n) => Some(n),
            Err(_) => {
                fail(ctx, format!("burst `{b}` is not a whole number"));
                return None;
            }
        },
    };
    if let Some(b) = burst {
        if let Err(msg) = check_capacity(&rate, b) {
            fail(ctx, msg);
            return None;
        }
    }
    Some(Bandwidth {
        rate,
        burst,
        name: None,
        period: None,
    })
}

/// `{quota: 1000000, period: month, time_zone: Europe/Paris, name: monthly}`.
fn period_bandwidth(
    ctx: &mut Ctx,
    node: &Node,
    path: &Path<'_>,
    names: &mut HashMap<String, Mark>,
) -> Option<Bandwidth> {
    let mut m = MapReader::new(ctx, node, path)?;
    let base = m.path();
    for (key, why) in [
        ("rate", "counts `quota` per `period`; it has no `rate` (write a rate as a bandwidth of its own beside it)"),
        ("burst", "has no `burst`: its whole `quota` is there from the period's start"),
    ] {
        if let Some(e) = m.entry(key) {
            ctx.error(
                e.key_node,
                &base.key(key),
                format!("a quota per calendar period {why}"),
            );
        }
    }
    let quota = m.required_with(ctx, "quota", |c, n, p| {
        at_least_one(c, n, p, crate::model::MAX_PERIOD_QUOTA, "")
    });
    let unit = m.required_with(ctx, "period", |c, n, p| {
        choice(
            c,
            n,
            p,
            &[
                ("day", Period::Day),
                ("week", Period::Week),
                ("month", Period::Month),
            ],
        )
    });
    let time_zone = m.optional_with(ctx, "time_zone", |c, n, p| {
        let z = scalar(c, n, p, "an IANA time zone name like `Europe/Paris`")?;
        match crate::period::CompiledPeriod::new(Period::Day, Some(z)) {
            Ok(_) => Some(z.to_owned()),
            Err(_) => {
                let shown = crate::period::UnknownTimeZone(yaml::shorten(z));
                c.error(n, p, shown.to_string());
                None
            }
        }
    });
    let zone_ok = m.entry("time_zone").is_none_or(|e| e.value.is_null()) || time_zone.is_some();
    let name = m.optional_with(ctx, "name", |c, n, p| bandwidth_name(c, n, p, names));
    m.finish(ctx);
    let (quota, unit) = (quota?, unit?);
    if !zone_ok {
        return None;
    }
    Some(Bandwidth {
        rate: Rate::new(quota, unit.nominal())?,
        burst: None,
        name,
        period: Some(CalendarPeriod { unit, time_zone }),
    })
}

fn bandwidth_name(
    ctx: &mut Ctx,
    node: &Node,
    path: &Path<'_>,
    names: &mut HashMap<String, Mark>,
) -> Option<String> {
    let s = name(ctx, node, path)?;
    if s.bytes().all(|b| b.is_ascii_digit()) {
        ctx.error(
            node,
            path,
            format!("bandwidth name `{s}` must not be a number (unnamed bandwidths are known by their index)"),
        );
        return None;
    }
    if let Some(first) = names.get(&s) {
        ctx.error(
            node,
            path,
            format!(
                "duplicate bandwidth name `{s}` (first at line {}, column {})",
                first.line, first.column
            ),
        );
        return None;
    }
    names.insert(s.clone(), node.mark);
    Some(s)
}

fn operation(d: &mut Dec<'_>, node: &Node, path: &Path<'_>) -> Option<Operation> {
    let mut m = MapReader::new(d, node, path)?;
    let name = m.required_with(d, "name", |d, n, p| {
        let s = name(&mut *d.ctx, n, p)?;
        d.refs.operation_names.push(Dec::name_at(n, p, &s));
        Some(s)
    });
    let when = when(d, &mut m);
    let cost = m.optional_with(d, "cost", |d, n, p| {
        super::uint(&mut *d.ctx, n, p, u64::from(u32::MAX))
    });
    let post_hoc = m.optional_with(d, "post_hoc", |d, n, p| post_hoc(&mut *d.ctx, n, p));
    if let (Some(name), Some(cost), Some(e)) = (&name, cost, m.entry("cost")) {
        let base = m.path();
        d.refs.costs.push((
            name.clone(),
            cost,
            e.value.mark,
            base.key("cost").to_string(),
        ));
    }
    m.finish(d);
    Some(Operation {
        name: name?,
        when: when?,
        cost: cost.unwrap_or_else(crate::model::default_cost),
        post_hoc,
    })
}

fn post_hoc(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<PostHoc> {
    let v = variant(ctx, node, path, "`{bytes: SIZE}` or `{duration: DURATION}`")?;
    let vp = path.key(v.name);
    match (v.name, v.value) {
        ("bytes", Some(n)) => {
            let size = ByteSize::decode(ctx, n, &vp)?;
            if size.0 == 0 {
                ctx.error(n, &vp, "size must be at least 1 byte");
                return None;
            }
            Some(PostHoc::Bytes(size))
        }
        ("duration", Some(n)) => positive_duration(ctx, n, &vp).map(PostHoc::Duration),
        ("bytes" | "duration", None) => {
            ctx.error(
                node,
                path,
                format!("`{}` needs a value, e.g. `{{bytes: 1MiB}}`", v.name),
            );
            None
        }
        _ => {
            unknown_variant(ctx, &v, path, &["bytes", "duration"]);
            None
        }
    }
}

fn clients(
    d: &mut Dec<'_>,
    node: &Node,
    path: &Path<'_>,
) -> Option<BTreeMap<String, ClientOverride>> {
    let entries = map_entries(&mut *d.ctx, node, path)?;
    let mut out = BTreeMap::new();
    let mut ok = true;
    for e in entries {
        let kp = path.key(e.key);
        if e.key.is_empty() {
            d.ctx.error(e.key_node, &kp, "client key must not be empty");
            ok = false;
        }
        d.refs
            .client_keys
            .push((e.key.len(), e.key_node.mark, kp.to_string()));
        match client_override(d, e.value, &kp) {
            Some(o) => {
                out.insert(e.key.to_owned(), o);
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn client_override(d: &mut Dec<'_>, node: &Node, path: &Path<'_>) -> Option<ClientOverride> {
    let mut m = MapReader::new(d, node, path)?;
    let empty = m.is_empty();
    let plan = m.optional_with(d, "plan", plan_ref);
    let bandwidths = m.optional_with(d, "bandwidths", bandwidths);
    let concurrency = m.optional_with(d, "concurrency", |d, n, p| concurrency(&mut *d.ctx, n, p));
    let alerts = m.optional_with(d, "alerts", |d, n, p| alerts(&mut *d.ctx, n, p));
    let expires = m.optional::<_, crate::units::Timestamp>(d, "expires");
    let fixed = m.optional::<_, bool>(d, "fixed").unwrap_or(false);
    let growth_at = m.entry("growth").map(|e| e.value.mark);
    let growth = m.optional_with(d, "growth", |d, n, p| growth(&mut *d.ctx, n, p));
    // `expires` alone changes nothing (a key given but invalid was reported already).
    let sets = [
        "plan",
        "bandwidths",
        "concurrency",
        "fixed",
        "alerts",
        "growth",
    ]
    .iter()
    .any(|k| m.entry(k).is_some());
    m.finish(d);
    if empty || !sets {
        d.ctx.error(
            node,
            path,
            "override sets nothing: give `plan`, `bandwidths`, `concurrency`, `fixed`, `alerts` or `growth`",
        );
        return None;
    }
    if let (true, Some(at)) = (fixed, growth_at) {
        d.ctx.error_at(
            at,
            &path.key("growth"),
            "a fixed quota is never grown: remove `growth` or `fixed: true`",
        );
        return None;
    }
    Some(ClientOverride {
        plan,
        bandwidths,
        concurrency,
        alerts,
        expires,
        fixed,
        growth,
    })
}

// === usage endpoint and caps ===

/// Longest usage endpoint path.
const MAX_USAGE_PATH_LEN: usize = 1024;

fn usage_endpoint(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<UsageEndpoint> {
    let mut m = MapReader::new(ctx, node, path)?;
    let upath = m.required_with(ctx, "path", |c, n, p| {
        let s = non_empty(c, n, p, "a request path like `/.well-known/fairgate/quota`")?;
        let problem = if !s.starts_with('/') {
            "the path must start with `/`"
        } else if s.len() > MAX_USAGE_PATH_LEN {
            "the path is longer than 1024 bytes"
        } else if s.contains(['?', '#']) || s.bytes().any(|b| b <= b' ' || b >= 0x7f) {
            "the path must be a plain path: no query, fragment, spaces or non-ASCII bytes"
        } else {
            return Some(s);
        };
        c.error(n, p, problem);
        None
    });
    let self_caps = m.optional::<_, bool>(ctx, "self_caps").unwrap_or(false);
    let caps_file = m.optional_with(ctx, "caps_file", |c, n, p| {
        non_empty(c, n, p, "a file name")
    });
    let max_caps = m
        .optional_with(ctx, "max_caps", |c, n, p| in_range(c, n, p, 1, 1_000_000))
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or_else(crate::model::default_max_caps);
    if self_caps && caps_file.is_none() {
        ctx.error(
            node,
            path,
            "`self_caps: true` needs `caps_file`, the file the caps are kept in",
        );
        m.finish(ctx);
        return None;
    }
    m.finish(ctx);
    Some(UsageEndpoint {
        path: upath?,
        self_caps,
        caps_file,
        max_caps,
    })
}

fn caps(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<BTreeMap<String, ClientCap>> {
    let entries = map_entries(ctx, node, path)?;
    let mut out = BTreeMap::new();
    let mut ok = true;
    for e in entries {
        let kp = path.key(e.key);
        if e.key.is_empty() {
            ctx.error(e.key_node, &kp, "client key must not be empty");
            ok = false;
        }
        match client_cap(ctx, e.value, &kp) {
            Some(c) => {
                out.insert(e.key.to_owned(), c);
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn client_cap(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<ClientCap> {
    let mut m = MapReader::new(ctx, node, path)?;
    let empty = m.is_empty();
    let bandwidths = m.optional_with(ctx, "bandwidths", |c, n, p| {
        let entries = map_entries(c, n, p)?;
        let mut out = BTreeMap::new();
        let mut ok = true;
        for e in entries {
            let kp = p.key(e.key);
            if !check_name(c, e.key_node, &kp, e.key) {
                ok = false;
            }
            match bandwidth_cap(c, e.value, &kp) {
                Some(b) => {
                    out.insert(e.key.to_owned(), b);
                }
                None => ok = false,
            }
        }
        ok.then_some(out)
    });
    let concurrency = m.optional_with(ctx, "concurrency", concurrency);
    m.finish(ctx);
    if empty {
        ctx.error(
            node,
            path,
            "cap sets nothing: give `bandwidths` (name → `{quota: N}`) or `concurrency`",
        );
        return None;
    }
    Some(ClientCap {
        bandwidths: bandwidths.unwrap_or_default(),
        concurrency,
    })
}

fn bandwidth_cap(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<BandwidthCap> {
    let mut m = MapReader::new(ctx, node, path)?;
    let quota = m.required_with(ctx, "quota", |c, n, p| at_least_one(c, n, p, u64::MAX, ""));
    let burst = m.optional_with(ctx, "burst", |c, n, p| at_least_one(c, n, p, u64::MAX, ""));
    m.finish(ctx);
    Some(BandwidthCap {
        quota: quota?,
        burst,
    })
}

fn burst_sharing(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<BurstSharing> {
    let mut m = MapReader::new(ctx, node, path)?;
    let defaults = BurstSharing::default();
    let enabled = m
        .optional::<_, bool>(ctx, "enabled")
        .unwrap_or(defaults.enabled);
    let below_utilization = m
        .optional_with(ctx, "below_utilization", fraction)
        .unwrap_or(defaults.below_utilization);
    m.finish(ctx);
    Some(BurstSharing {
        enabled,
        below_utilization,
    })
}

// === shedding ===

fn shedding(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Shedding> {
    let mut m = MapReader::new(ctx, node, path)?;
    let limit = m.required_with(ctx, "limit", shed_limit);
    let thresholds = m
        .optional_with(ctx, "thresholds", thresholds)
        .unwrap_or_default();
    let reject_delay = m.optional_with(ctx, "reject_delay", reject_delay);
    m.finish(ctx);
    Some(Shedding {
        limit: limit?,
        thresholds,
        reject_delay,
    })
}

fn shed_limit(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<ShedLimit> {
    if node
        .as_plain()
        .is_some_and(|s| s.starts_with(|c: char| c.is_ascii_digit() || c == '-'))
    {
        return positive_u32(ctx, node, path).map(ShedLimit::Static);
    }
    let v = variant(
        ctx,
        node,
        path,
        "a number, `{static: N}` or `{adaptive: {…}}`",
    )?;
    let vp = path.key(v.name);
    match (v.name, v.value) {
        ("static", Some(n)) => positive_u32(ctx, n, &vp).map(ShedLimit::Static),
        ("adaptive", Some(n)) => adaptive(ctx, n, &vp).map(ShedLimit::Adaptive),
        ("static" | "adaptive", None) => {
            ctx.error(
                node,
                path,
                format!("`{}` needs parameters, e.g. `{{static: 512}}`", v.name),
            );
            None
        }
        _ => {
            unknown_variant(ctx, &v, path, &["static", "adaptive"]);
            None
        }
    }
}

fn adaptive(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<AdaptiveLimit> {
    let mut m = MapReader::new(ctx, node, path)?;
    let algorithm = m
        .optional_with(ctx, "algorithm", |c, n, p| {
            choice(
                c,
                n,
                p,
                &[
                    ("gradient", AdaptiveAlgorithm::Gradient),
                    ("aimd", AdaptiveAlgorithm::Aimd),
                ],
            )
        })
        .unwrap_or_default();
    let min = m.required_with(ctx, "min", positive_u32);
    let max = m.required::<_, u32>(ctx, "max");
    let initial = m.optional::<_, u32>(ctx, "initial");
    let target_latency = m.optional_with(ctx, "target_latency", positive_duration);
    let base = m.path();
    if let (Some(lo), Some(hi), Some(e)) = (min, max, m.entry("max")) {
        if hi < lo {
            ctx.error(
                e.value,
                &base.key("max"),
                format!("max {hi} is less than min {lo}"),
            );
        }
    }
    if let (Some(lo), Some(hi), Some(i), Some(e)) = (min, max, initial, m.entry("initial")) {
        if lo <= hi && !(lo..=hi).contains(&i) {
            ctx.error(
                e.value,
                &base.key("initial"),
                format!("initial {i} is outside min..max ({lo} to {hi})"),
            );
        }
    }
    let has_latency = m
        .entry("target_latency")
        .is_some_and(|e| !e.value.is_null());
    if algorithm == AdaptiveAlgorithm::Aimd && !has_latency {
        ctx.error(node, path, "`aimd` needs `target_latency` (e.g. `50ms`)");
    }
    m.finish(ctx);
    Some(AdaptiveLimit {
        algorithm,
        min: min?,
        max: max?,
        initial,
        target_latency,
    })
}

fn thresholds(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<ClassThresholds> {
    let mut m = MapReader::new(ctx, node, path)?;
    let defaults = ClassThresholds::default();
    let read = |m: &mut MapReader<'_, '_>, ctx: &mut Ctx, key: &'static str, default: f64| {
        let at = m
            .entry(key)
            .filter(|e| !e.value.is_null())
            .map(|e| e.value.mark);
        let v = m.optional_with(ctx, key, fraction);
        (key, v.unwrap_or(default), at)
    };
    let classes = [
        read(&mut m, ctx, "critical", defaults.critical),
        read(&mut m, ctx, "normal", defaults.normal),
        read(&mut m, ctx, "borrowed", defaults.borrowed),
        read(&mut m, ctx, "sheddable", defaults.sheddable),
    ];
    let base = m.path();
    for pair in classes.windows(2) {
        let (hk, hv, hat) = pair[0];
        let (lk, lv, lat) = pair[1];
        if lv <= hv {
            continue;
        }
        // Point at the value the user wrote: the lower class if set, else the higher one.
        let (at, key) = match (lat, hat) {
            (Some(at), _) => (at, lk),
            (None, Some(at)) => (at, hk),
            (None, None) => continue,
        };
        let note = |set: Option<Mark>| if set.is_some() { "" } else { ", the default" };
        ctx.error_at(
            at,
            &base.key(key),
            format!(
                "`{lk}` ({lv}{}) is greater than `{hk}` ({hv}{}): thresholds must not increase from `critical` down to `sheddable`",
                note(lat),
                note(hat)
            ),
        );
    }
    m.finish(ctx);
    Some(ClassThresholds {
        critical: classes[0].1,
        normal: classes[1].1,
        borrowed: classes[2].1,
        sheddable: classes[3].1,
    })
}

fn reject_delay(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<RejectDelay> {
    let mut m = MapReader::new(ctx, node, path)?;
    let max = m.required_with(ctx, "max", positive_duration);
    let max_waiting = m
        .optional_with(ctx, "max_waiting", positive_u32)
        .unwrap_or_else(crate::model::default_max_waiting);
    m.finish(ctx);
    Some(RejectDelay {
        max: max?,
        max_waiting,
    })
}

// === responses and state ===

fn responses(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Responses> {
    let mut m = MapReader::new(ctx, node, path)?;
    let defaults = Responses::default();
    let quota_status = m.optional_with(ctx, "quota_status", status);
    let shed_status = m.optional_with(ctx, "shed_status", status);
    let deny_status = m.optional_with(ctx, "deny_status", status);
    let ratelimit_headers = m.optional_with(ctx, "ratelimit_headers", |c, n, p| {
        choice(
            c,
            n,
            p,
            &[
                ("never", HeaderMode::Never),
                ("on_reject", HeaderMode::OnReject),
                ("always", HeaderMode::Always),
            ],
        )
    });
    let shed_retry_after = m.optional_with(ctx, "shed_retry_after", positive_duration);
    let retry_stagger = m.optional_with(ctx, "retry_stagger", |c, n, p| {
        let text = scalar(c, n, p, "a duration like `60s`, or `off`")?;
        if text == "off" {
            return Some(HumanDuration::from_secs(0));
        }
        match text.parse::<HumanDuration>() {
            Ok(d) => Some(d),
            Err(e) => {
                c.error(n, p, format!("{} (or `off`)", e.0));
                None
            }
        }
    });
    m.finish(ctx);
    Some(Responses {
        quota_status: quota_status.unwrap_or(defaults.quota_status),
        shed_status: shed_status.unwrap_or(defaults.shed_status),
        deny_status: deny_status.unwrap_or(defaults.deny_status),
        ratelimit_headers: ratelimit_headers.unwrap_or(defaults.ratelimit_headers),
        shed_retry_after: shed_retry_after.unwrap_or(defaults.shed_retry_after),
        retry_stagger: retry_stagger.unwrap_or(defaults.retry_stagger),
    })
}

fn state(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<State> {
    let mut m = MapReader::new(ctx, node, path)?;
    let defaults = State::default();
    let backend_at = m.entry("backend").map(|e| e.value.mark);
    let backend = m
        .optional_with(ctx, "backend", |c, n, p| {
            choice(
                c,
                n,
                p,
                &[("local", Backend::Local), ("redis", Backend::Redis)],
            )
        })
        .unwrap_or(defaults.backend);
    let max_keys = m
        .optional_with(ctx, "max_keys", |c, n, p| {
            at_least_one(c, n, p, u64::MAX, "")
        })
        .unwrap_or(defaults.max_keys);
    let redis_at = m.entry("redis").map(|e| e.value.mark);
    let redis = m.optional_with(ctx, "redis", redis_state);
    let growth_file = m.optional_with(ctx, "growth_file", |c, n, p| {
        non_empty(c, n, p, "a file name")
    });
    m.finish(ctx);
    match (backend, redis_at, backend_at) {
        (Backend::Redis, None, Some(at)) => ctx.error_at(
            at,
            &path.key("backend"),
            "`backend: redis` needs a `redis` section (at least `url`)",
        ),
        (Backend::Local, Some(at), _) => ctx.error_at(
            at,
            &path.key("redis"),
            "`redis` settings are only used with `backend: redis`",
        ),
        _ => {}
    }
    Some(State {
        backend,
        max_keys,
        redis,
        growth_file,
    })
}

/// One `redis://` url (of `url` or of a `cluster` seed node).
fn redis_url(c: &mut Ctx, n: &Node, p: &Path<'_>) -> Option<String> {
    let s = scalar(c, n, p, "a redis url")?;
    if !s.starts_with("redis://") {
        c.error(
            n,
            p,
            format!(
                "`{}` is not a redis url (expected `redis://host:port`)",
                crate::yaml::shorten(&crate::model::redact_url(s))
            ),
        );
        return None;
    }
    Some(s.to_owned())
}

fn redis_state(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<RedisState> {
    let mut m = MapReader::new(ctx, node, path)?;
    // Exactly one of `url` (one server) and `cluster` (seed nodes of a Redis Cluster).
    let url_given = m.entry("url").is_some();
    let url = m.present_with(ctx, "url", redis_url);
    let cluster_at = m.entry("cluster").map(|e| e.value.mark);
    let cluster = m.present_with(ctx, "cluster", |c, n, p| {
        let nodes = list(c, n, p, redis_url)?;
        if nodes.is_empty() {
            c.error(
                n,
                p,
                "a cluster needs at least one seed node (`redis://host:port`)",
            );
            return None;
        }
        Some(nodes)
    });
    match (url_given, cluster_at) {
        (true, Some(at)) => ctx.error_at(
            at,
            &path.key("cluster"),
            "set either `url` (one server) or `cluster` (seed nodes of a Redis Cluster), not both",
        ),
        (false, None) => ctx.error(
            node,
            path,
            "missing field `url` (one server) or `cluster` (seed nodes of a Redis Cluster)",
        ),
        _ => {}
    }
    let mode = m.optional_with(ctx, "mode", |c, n, p| {
        choice(
            c,
            n,
            p,
            &[("async", FleetMode::Async), ("exact", FleetMode::Exact)],
        )
    });
    let sync_interval = m.optional_with(ctx, "sync_interval", positive_duration);
    let timeout = m.optional_with(ctx, "timeout", positive_duration);
    let on_failure = m.optional_with(ctx, "on_failure", |c, n, p| {
        choice(
            c,
            n,
            p,
            &[
                ("local", OnFailure::Local),
                ("open", OnFailure::Open),
                ("closed", OnFailure::Closed),
            ],
        )
    });
    let key_prefix = m.optional_with(ctx, "key_prefix", |c, n, p| {
        let s = scalar(c, n, p, "a key prefix")?;
        if s.is_empty() || s.contains(['{', '}']) || s.chars().any(char::is_whitespace) {
            c.error(
                n,
                p,
                "a key prefix must be non-empty, without braces or spaces",
            );
            return None;
        }
        Some(s.to_owned())
    });
    m.finish(ctx);
    if url.is_none() && cluster.is_none() {
        return None;
    }
    Some(RedisState {
        url,
        cluster: cluster.unwrap_or_default(),
        mode: mode.unwrap_or_default(),
        sync_interval: sync_interval.unwrap_or_else(crate::model::default_sync_interval),
        timeout: timeout.unwrap_or_else(crate::model::default_redis_timeout),
        on_failure: on_failure.unwrap_or_default(),
        key_prefix: key_prefix.unwrap_or_else(crate::model::default_key_prefix),
    })
}
