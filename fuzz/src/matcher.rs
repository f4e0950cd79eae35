//! Target `matcher` (SCENARIOS.md P6 (4)): the rule matcher, a generated rule set × a
//! generated request.
//!
//! Up to 6 conditions (every field, every pattern kind, `any`/`all`/`not` nested up to 4
//! deep) are compiled together with their negations, an `any` and an `all` of the first
//! two and an always-true rule, then matched against a generated request. The answers must
//! obey the algebra (`not c` = ¬c, `any` = ∨, `all` = ∧, no condition = true), a
//! condition compiled alone must answer as it does in the combined set (which shares regex
//! sets and indexes across rules), and `first_match` / `for_each_match` must agree with
//! `matches`. Nothing may panic.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::str::FromStr;

use fairgate_policies::compiled::{HeaderSource, RequestView};
use fairgate_policies::matcher::RuleSet;
use fairgate_policies::model::{Cidr, Condition, HeaderMatch, MatchKind, StringMatch};

use crate::input::Input;

const WORDS: [&str; 24] = [
    "",
    "/",
    "/api",
    "/api/v1/search",
    "/login",
    "a",
    "A",
    "bot",
    "BadBot/1.0",
    "curl",
    ".example.com",
    "api.example.com",
    "API.Example.com",
    "x",
    "*",
    "?",
    "[a-z]",
    "(?i)bot",
    "^/api/[0-9]+$",
    "é",
    "\u{0}",
    ".*",
    "/api/*/search",
    "prod",
];
const CIDRS: [&str; 7] = [
    "10.0.0.0/8",
    "192.0.2.0/24",
    "192.0.2.7",
    "0.0.0.0/0",
    "2001:db8::/32",
    "::/0",
    "::ffff:10.0.0.0/104",
];
const IPS: [&str; 6] = [
    "10.1.2.3",
    "192.0.2.7",
    "198.51.100.1",
    "2001:db8::1",
    "::1",
    "::ffff:192.0.2.7",
];
const METHODS: [&str; 6] = ["GET", "POST", "HEAD", "get", "", "DELETE"];
const HEADERS: [&str; 6] = [
    "x-api-key",
    "x-env",
    "X-Env",
    "user-agent",
    "host",
    "x-debug",
];
const OPERATIONS: [&str; 3] = ["export", "report", ""];

fn string(u: &mut Input<'_>) -> String {
    if u.flag() {
        u.pick(&WORDS).to_owned()
    } else {
        u.text(12)
    }
}

fn some<T>(u: &mut Input<'_>, max: usize, mut f: impl FnMut(&mut Input<'_>) -> T) -> Vec<T> {
    let n = 1 + u.below(max);
    (0..n).map(|_| f(u)).collect()
}

fn string_match(u: &mut Input<'_>) -> StringMatch {
    let kind = u.pick(&MatchKind::ALL);
    // Patterns compiled to automata come from the word list: random regexes mostly fail to
    // compile or take long to, which spends the fuzzer's time outside the matcher.
    let patterns = match kind {
        MatchKind::Glob | MatchKind::Regex => some(u, 3, |u| u.pick(&WORDS).to_owned()),
        _ => some(u, 3, string),
    };
    StringMatch {
        kind,
        patterns,
        ignore_case: u.flag(),
    }
}

fn condition(u: &mut Input<'_>, depth: usize) -> Condition {
    let mut c = Condition::default();
    let fields = u.byte();
    let on = |bit: u8| fields & (1 << bit) != 0;
    if on(0) {
        c.ip = Some(some(u, 3, |u| {
            Cidr::from_str(u.pick(&CIDRS)).expect("cidr")
        }));
    }
    if on(1) {
        c.user_agent = Some(string_match(u));
    }
    if on(2) {
        c.path = Some(string_match(u));
    }
    if on(3) {
        c.method = Some(some(u, 3, |u| u.pick(&METHODS).to_owned()));
    }
    if on(4) {
        c.host = Some(string_match(u));
    }
    if on(5) {
        c.headers = Some(some(u, 3, |u| {
            let name = u.pick(&HEADERS).to_owned();
            match u.below(3) {
                0 => HeaderMatch {
                    name,
                    present: Some(u.flag()),
                    value: None,
                },
                1 => HeaderMatch {
                    name,
                    present: None,
                    value: Some(string_match(u)),
                },
                _ => HeaderMatch {
                    name,
                    present: Some(true),
                    value: Some(string_match(u)),
                },
            }
        }));
    }
    if on(6) {
        c.operation = Some(some(u, 2, |u| u.pick(&OPERATIONS).to_owned()));
    }
    if on(7) && depth < 4 {
        match u.below(3) {
            0 => c.any = Some(some(u, 3, |u| condition(u, depth + 1))),
            1 => c.all = Some(some(u, 3, |u| condition(u, depth + 1))),
            _ => c.not = Some(Box::new(condition(u, depth + 1))),
        }
    }
    if c == Condition::default() {
        c.path = Some(string_match(u));
    }
    c
}

struct Headers(HashMap<String, String>);

impl HeaderSource for Headers {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// Runs one input; panics on a broken invariant.
pub fn check(data: &[u8]) {
    let mut u = Input::new(data);
    let n = 1 + u.below(6);
    let conds: Vec<Condition> = (0..n).map(|_| condition(&mut u, 0)).collect();

    let ip: IpAddr = u.pick(&IPS).parse().expect("ip");
    let method = u.pick(&METHODS);
    let host = string(&mut u).to_ascii_lowercase();
    let path = string(&mut u);
    let user_agent = string(&mut u);
    let operation = u.flag().then(|| u.pick(&OPERATIONS));
    let mut headers = HashMap::new();
    for _ in 0..u.below(4) {
        headers.insert(u.pick(&HEADERS).to_ascii_lowercase(), string(&mut u));
    }
    let headers = Headers(headers);
    let req = RequestView {
        ip,
        method,
        host: &host,
        path: &path,
        user_agent: &user_agent,
        operation,
        headers: &headers,
    };

    // c_0..c_n, ¬c_0..¬c_n, any(c_0, c_1), all(c_0, c_1), always.
    let mut all: Vec<Option<Condition>> = conds.iter().cloned().map(Some).collect();
    all.extend(conds.iter().map(|c| {
        Some(Condition {
            not: Some(Box::new(c.clone())),
            ..Condition::default()
        })
    }));
    let pair = vec![conds[0].clone(), conds[n.min(2) - 1].clone()];
    all.push(Some(Condition {
        any: Some(pair.clone()),
        ..Condition::default()
    }));
    all.push(Some(Condition {
        all: Some(pair),
        ..Condition::default()
    }));
    all.push(None);
    let Ok(set) = RuleSet::new(all.iter().map(Option::as_ref)) else {
        return;
    };
    assert_eq!(set.len(), all.len());
    let m: Vec<bool> = (0..set.len()).map(|i| set.matches(&req, i)).collect();
    for i in 0..n {
        assert_eq!(m[n + i], !m[i], "not: condition {i}: {:?}", conds[i]);
    }
    // One condition (the input picks it) compiled alone answers as in the combined set.
    let i = u.below(n);
    if let Ok(alone) = RuleSet::new([Some(&conds[i])]) {
        assert_eq!(
            alone.matches(&req, 0),
            m[i],
            "alone vs together: {:?}",
            conds[i]
        );
    }
    let (a, b) = (m[0], m[n.min(2) - 1]);
    assert_eq!(m[2 * n], a || b, "any");
    assert_eq!(m[2 * n + 1], a && b, "all");
    assert!(
        m[2 * n + 2],
        "a rule without a condition matches everything"
    );
    assert!(
        !set.matches(&req, set.len()),
        "an index out of range matches nothing"
    );
    for from in 0..=set.len() {
        let expected = (from..set.len()).find(|&i| m[i]);
        assert_eq!(
            set.first_match(&req, from),
            expected,
            "first_match from {from}"
        );
    }
    let mut seen = Vec::new();
    set.for_each_match(&req, |i| {
        seen.push(i);
        ControlFlow::Continue(())
    });
    let expected: Vec<usize> = (0..set.len()).filter(|&i| m[i]).collect();
    assert_eq!(seen, expected, "for_each_match");
    // Breaking after the first stops there.
    let mut first = None;
    set.for_each_match(&req, |i| {
        first.get_or_insert(i);
        ControlFlow::Break(())
    });
    assert_eq!(first, expected.first().copied());
}
