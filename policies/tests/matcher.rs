//! Behaviour of the compiled matchers (`IpSet`, `RuleSet`), and a property test that the
//! rule set agrees with a naive one-condition-at-a-time evaluator.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::ControlFlow;

use fairgate_policies::compiled::{HeaderSource, RequestView};
use fairgate_policies::matcher::{glob_to_regex, IpSet, MatcherError, RuleSet};
use fairgate_policies::model::{Cidr, Condition, HeaderMatch, MatchKind, StringMatch};
use proptest::prelude::*;

// === helpers ===

#[derive(Debug, Clone, Default)]
struct Headers(HashMap<String, String>);

impl HeaderSource for Headers {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

#[derive(Debug, Clone)]
struct Req {
    ip: IpAddr,
    method: String,
    host: String,
    path: String,
    user_agent: String,
    operation: Option<String>,
    headers: Headers,
}

impl Default for Req {
    fn default() -> Self {
        Req {
            ip: "192.0.2.1".parse().unwrap(),
            method: "GET".into(),
            host: "api.example.com".into(),
            path: "/".into(),
            user_agent: String::new(),
            operation: None,
            headers: Headers::default(),
        }
    }
}

impl Req {
    fn view(&self) -> RequestView<'_> {
        RequestView {
            ip: self.ip,
            method: &self.method,
            host: &self.host,
            path: &self.path,
            user_agent: &self.user_agent,
            operation: self.operation.as_deref(),
            headers: &self.headers,
        }
    }
}

fn sm(kind: MatchKind, patterns: &[&str]) -> StringMatch {
    StringMatch {
        kind,
        patterns: patterns.iter().map(|s| s.to_string()).collect(),
        ignore_case: false,
    }
}

fn ci(mut s: StringMatch) -> StringMatch {
    s.ignore_case = true;
    s
}

fn cidrs(list: &[&str]) -> Vec<Cidr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn all_matches(set: &RuleSet, r: &Req) -> Vec<usize> {
    let mut out = Vec::new();
    set.for_each_match(&r.view(), |i| {
        out.push(i);
        ControlFlow::Continue(())
    });
    out
}

fn set(conds: &[Option<Condition>]) -> RuleSet {
    RuleSet::new(conds.iter().map(Option::as_ref)).unwrap()
}

// === IpSet ===

#[test]
fn ipset_scales_to_ten_thousand_networks() {
    let nets: Vec<Cidr> = (0..10_000u32)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap())
        .collect();
    let set = IpSet::new(nets);
    // 10.0.0.0 – 10.39.15.255 are all covered and merge into one range.
    assert_eq!(set.range_count(), 1);
    assert!(set.contains("10.39.15.255".parse().unwrap()));
    assert!(!set.contains("10.39.16.0".parse().unwrap()));
    let sparse: Vec<Cidr> = (0..10_000u32)
        .map(|i| {
            format!("{}.{}.{}.0/24", 1 + i / 4096, (i / 16) % 256, (i % 16) * 16)
                .parse()
                .unwrap()
        })
        .collect();
    let set = IpSet::new(sparse);
    assert_eq!(set.range_count(), 10_000);
    assert!(set.contains("1.0.0.7".parse().unwrap()));
    assert!(set.contains("3.112.240.255".parse().unwrap()));
    assert!(!set.contains("3.113.0.0".parse().unwrap()));
    assert!(!set.contains("1.0.1.0".parse().unwrap()));
}

// === RuleSet: semantics ===

#[test]
fn literal_kinds_and_ignore_case() {
    let conds = [
        Some(Condition {
            path: Some(sm(MatchKind::Exact, &["/login"])),
            ..Default::default()
        }),
        Some(Condition {
            path: Some(sm(MatchKind::Prefix, &["/api/", "/v2/"])),
            ..Default::default()
        }),
        Some(Condition {
            path: Some(sm(MatchKind::Suffix, &[".php"])),
            ..Default::default()
        }),
        Some(Condition {
            path: Some(sm(MatchKind::Contains, &["admin"])),
            ..Default::default()
        }),
        Some(Condition {
            path: Some(ci(sm(MatchKind::Prefix, &["/API/"]))),
            ..Default::default()
        }),
        Some(Condition {
            user_agent: Some(ci(sm(MatchKind::Exact, &["CURL"]))),
            ..Default::default()
        }),
    ];
    let s = set(&conds);
    let path = |p: &str| Req {
        path: p.into(),
        ..Req::default()
    };
    assert_eq!(all_matches(&s, &path("/login")), vec![0]);
    assert_eq!(all_matches(&s, &path("/login/")), Vec::<usize>::new());
    assert_eq!(all_matches(&s, &path("/api/admin.php")), vec![1, 2, 3, 4]);
    assert_eq!(all_matches(&s, &path("/Api/x")), vec![4]);
    assert_eq!(all_matches(&s, &path("/x.php.bak")), Vec::<usize>::new());
    let ua = Req {
        user_agent: "curl".into(),
        ..Req::default()
    };
    assert_eq!(all_matches(&s, &ua), vec![5]);
    let ua = Req {
        user_agent: "curl/8".into(),
        ..Req::default()
    };
    assert_eq!(all_matches(&s, &ua), Vec::<usize>::new());
}

#[test]
fn regex_is_unanchored_and_glob_is_whole_value() {
    let s = set(&[
        Some(Condition {
            user_agent: Some(sm(MatchKind::Regex, &["bot"])),
            ..Default::default()
        }),
        Some(Condition {
            user_agent: Some(sm(MatchKind::Regex, &["^bot$"])),
            ..Default::default()
        }),
        Some(Condition {
            user_agent: Some(sm(MatchKind::Glob, &["*bot"])),
            ..Default::default()
        }),
        Some(Condition {
            user_agent: Some(ci(sm(MatchKind::Regex, &["SQLMAP"]))),
            ..Default::default()
        }),
        Some(Condition {
            user_agent: Some(ci(sm(MatchKind::Glob, &["Python-*"]))),
            ..Default::default()
        }),
        // Unicode word boundaries on non-ASCII input take the engine's fallback path.
        Some(Condition {
            user_agent: Some(sm(MatchKind::Regex, &[r"\bcafé\b", "x"])),
            ..Default::default()
        }),
    ]);
    let ua = |u: &str| Req {
        user_agent: u.into(),
        ..Req::default()
    };
    assert_eq!(all_matches(&s, &ua("mybot/1.0")), vec![0]);
    assert_eq!(all_matches(&s, &ua("bot")), vec![0, 1, 2]);
    assert_eq!(all_matches(&s, &ua("goodbot")), vec![0, 2]);
    assert_eq!(all_matches(&s, &ua("sqlmap/1.5")), vec![3]);
    assert_eq!(all_matches(&s, &ua("python-requests/2")), vec![4]);
    assert_eq!(all_matches(&s, &ua("")), Vec::<usize>::new());
    assert_eq!(all_matches(&s, &ua("un café noir")), vec![5]);
    assert_eq!(all_matches(&s, &ua("cafés")), Vec::<usize>::new());
    assert_eq!(all_matches(&s, &ua("bot café")), vec![0, 5]);
}

#[test]
fn host_is_always_case_insensitive() {
    let s = set(&[Some(Condition {
        host: Some(sm(MatchKind::Suffix, &[".Example.COM"])),
        ..Default::default()
    })]);
    let r = Req {
        host: "api.example.com".into(),
        ..Req::default()
    };
    assert_eq!(all_matches(&s, &r), vec![0]);
}

#[test]
fn methods_operations_headers_and_ips() {
    let s = set(&[
        Some(Condition {
            method: Some(vec!["POST".into(), "PUT".into()]),
            ..Default::default()
        }),
        Some(Condition {
            operation: Some(vec!["export".into()]),
            ..Default::default()
        }),
        Some(Condition {
            headers: Some(vec![HeaderMatch {
                name: "X-Debug".into(),
                present: Some(true),
                value: None,
            }]),
            ..Default::default()
        }),
        Some(Condition {
            headers: Some(vec![HeaderMatch {
                name: "x-debug".into(),
                present: Some(false),
                value: None,
            }]),
            ..Default::default()
        }),
        Some(Condition {
            headers: Some(vec![HeaderMatch {
                name: "x-env".into(),
                present: None,
                value: Some(sm(MatchKind::Exact, &["prod"])),
            }]),
            ..Default::default()
        }),
        Some(Condition {
            ip: Some(cidrs(&["10.0.0.0/8", "2001:db8::/32"])),
            ..Default::default()
        }),
        Some(Condition {
            headers: Some(vec![HeaderMatch {
                name: "x-debug".into(),
                present: None,
                value: None,
            }]),
            ..Default::default()
        }),
    ]);
    let base = Req::default();
    assert_eq!(all_matches(&s, &base), vec![3]);
    let r = Req {
        method: "POST".into(),
        operation: Some("export".into()),
        ..Req::default()
    };
    assert_eq!(all_matches(&s, &r), vec![0, 1, 3]);
    let mut r = Req::default();
    r.headers.0.insert("x-debug".into(), "1".into());
    r.headers.0.insert("x-env".into(), "prod".into());
    assert_eq!(all_matches(&s, &r), vec![2, 4, 6]);
    let r = Req {
        ip: "::ffff:10.1.2.3".parse().unwrap(),
        ..Req::default()
    };
    assert_eq!(all_matches(&s, &r), vec![3, 5]);
    let r = Req {
        ip: "2001:db8::5".parse().unwrap(),
        ..Req::default()
    };
    assert_eq!(all_matches(&s, &r), vec![3, 5]);
}

#[test]
fn any_all_not_and_always() {
    let post = || Condition {
        method: Some(vec!["POST".into()]),
        ..Default::default()
    };
    let login = || Condition {
        path: Some(sm(MatchKind::Exact, &["/login"])),
        ..Default::default()
    };
    let s = set(&[
        None,
        Some(Condition {
            not: Some(Box::new(post())),
            ..Default::default()
        }),
        Some(Condition {
            all: Some(vec![post(), login()]),
            ..Default::default()
        }),
        Some(Condition {
            any: Some(vec![post(), login()]),
            ..Default::default()
        }),
        Some(Condition {
            any: Some(vec![]),
            ..Default::default()
        }),
        Some(Condition {
            all: Some(vec![]),
            ..Default::default()
        }),
        Some(Condition {
            method: Some(vec!["POST".into()]),
            path: Some(sm(MatchKind::Exact, &["/login"])),
            ..Default::default()
        }),
    ]);
    let get_login = Req {
        path: "/login".into(),
        ..Req::default()
    };
    assert_eq!(all_matches(&s, &get_login), vec![0, 1, 3, 5]);
    let post_login = Req {
        method: "POST".into(),
        path: "/login".into(),
        ..Req::default()
    };
    assert_eq!(all_matches(&s, &post_login), vec![0, 2, 3, 5, 6]);
    assert_eq!(s.first_match(&post_login.view(), 0), Some(0));
    assert_eq!(s.first_match(&post_login.view(), 1), Some(2));
    assert_eq!(s.first_match(&post_login.view(), 6), Some(6));
    assert_eq!(s.first_match(&post_login.view(), 7), None);
    assert!(s.matches(&post_login.view(), 6));
    assert!(!s.matches(&get_login.view(), 6));
    assert!(!s.matches(&get_login.view(), 99));
    // Break stops the walk.
    let mut seen = Vec::new();
    s.for_each_match(&post_login.view(), |i| {
        seen.push(i);
        if i == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    assert_eq!(seen, vec![0, 2]);
}

#[test]
fn nested_matching_from_a_callback_works() {
    let outer = set(&[None, None]);
    let inner = set(&[Some(Condition {
        method: Some(vec!["GET".into()]),
        ..Default::default()
    })]);
    let r = Req::default();
    let mut pairs = Vec::new();
    outer.for_each_match(&r.view(), |i| {
        pairs.push((i, inner.first_match(&r.view(), 0)));
        ControlFlow::Continue(())
    });
    assert_eq!(pairs, vec![(0, Some(0)), (1, Some(0))]);
}

#[test]
fn empty_set_matches_nothing() {
    let s = RuleSet::empty();
    assert!(s.is_empty());
    assert_eq!(s.first_match(&Req::default().view(), 0), None);
    assert_eq!(all_matches(&s, &Req::default()), Vec::<usize>::new());
}

#[test]
fn errors_name_the_condition_and_path() {
    let bad = Condition {
        any: Some(vec![Condition {
            user_agent: Some(sm(MatchKind::Regex, &["ok", "(unclosed"])),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let err = RuleSet::new([None, Some(&bad)]).unwrap_err();
    match err {
        MatcherError::Pattern {
            condition,
            path,
            message,
        } => {
            assert_eq!(condition, 1);
            assert_eq!(path, "any[0].user_agent.regex[1]");
            assert!(message.contains("(unclosed"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let glob = Condition {
        path: Some(sm(MatchKind::Glob, &["[a"])),
        ..Default::default()
    };
    let err = RuleSet::new([Some(&glob)]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "condition 0: path.glob[0]: invalid glob `[a`: unclosed character class `[`"
    );
    let mut deep = Condition {
        method: Some(vec!["GET".into()]),
        ..Default::default()
    };
    for _ in 0..100 {
        deep = Condition {
            not: Some(Box::new(deep)),
            ..Default::default()
        };
    }
    assert!(matches!(
        RuleSet::new([Some(&deep)]),
        Err(MatcherError::TooDeep { condition: 0, .. })
    ));
}

#[test]
fn ten_thousand_rules_match_exactly_the_right_ones() {
    let mut conds = Vec::new();
    for i in 0..5000 {
        conds.push(Some(Condition {
            user_agent: Some(sm(MatchKind::Regex, &[&format!("bot{i}/[0-9]+")])),
            ..Default::default()
        }));
    }
    for i in 0..4000 {
        conds.push(Some(Condition {
            path: Some(sm(MatchKind::Prefix, &[&format!("/p{i}/")])),
            method: Some(vec!["POST".into()]),
            ..Default::default()
        }));
    }
    for i in 0..1000u32 {
        conds.push(Some(Condition {
            ip: Some(cidrs(&[&format!("10.{}.{}.0/24", i / 256, i % 256)])),
            ..Default::default()
        }));
    }
    let s = set(&conds);
    let r = Req {
        user_agent: "bot42/7 bot4999/1".into(),
        path: "/p17/x".into(),
        method: "POST".into(),
        ip: "10.3.5.9".parse().unwrap(),
        ..Req::default()
    };
    assert_eq!(
        all_matches(&s, &r),
        vec![42, 4999, 5017, 9000 + 3 * 256 + 5]
    );
    let r = Req {
        path: "/p17/x".into(),
        ..Req::default()
    };
    assert_eq!(all_matches(&s, &r), Vec::<usize>::new());
}

#[test]
fn glob_to_regex_is_public_for_validation() {
    assert!(glob_to_regex("*.example.com", false).is_ok());
    assert!(glob_to_regex("{a,b", false).is_err());
}

// === property test against a naive evaluator ===

/// Shell-glob match, written independently of the translator: expand `{…}`, then match
/// `*`, `?`, classes and escapes by backtracking.
fn naive_glob(glob: &str, value: &str, ignore_case: bool) -> bool {
    fn expand(p: &[char]) -> Vec<Vec<char>> {
        // Find the first top-level `{` (not escaped, not in a class).
        let mut i = 0;
        let mut in_class = false;
        while i < p.len() {
            match p[i] {
                '\\' => i += 1,
                '[' if !in_class => in_class = true,
                ']' if in_class => in_class = false,
                '{' if !in_class => {
                    let (mut depth, mut j, mut parts, mut start) = (0, i + 1, Vec::new(), i + 1);
                    while j < p.len() {
                        match p[j] {
                            '\\' => j += 1,
                            '{' => depth += 1,
                            '}' if depth == 0 => break,
                            '}' => depth -= 1,
                            ',' if depth == 0 => {
                                parts.push(p[start..j].to_vec());
                                start = j + 1;
                            }
                            _ => {}
                        }
                        j += 1;
                    }
                    parts.push(p[start..j].to_vec());
                    let mut out = Vec::new();
                    for part in parts {
                        let mut v = p[..i].to_vec();
                        v.extend(part);
                        v.extend_from_slice(&p[j + 1..]);
                        out.extend(expand(&v));
                    }
                    return out;
                }
                _ => {}
            }
            i += 1;
        }
        vec![p.to_vec()]
    }
    fn eq(a: char, b: char, ic: bool) -> bool {
        if ic {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    }
    fn m(p: &[char], v: &[char], ic: bool) -> bool {
        match p.first() {
            None => v.is_empty(),
            Some('*') => (0..=v.len()).any(|k| m(&p[1..], &v[k..], ic)),
            Some('?') => !v.is_empty() && m(&p[1..], &v[1..], ic),
            Some('\\') => !v.is_empty() && eq(p[1], v[0], ic) && m(&p[2..], &v[1..], ic),
            Some('[') => {
                let Some(&c) = v.first() else { return false };
                let mut i = 1;
                let neg = matches!(p.get(1), Some('!') | Some('^'));
                if neg {
                    i += 1;
                }
                let mut hit = false;
                let mut first = true;
                while p[i] != ']' || first {
                    first = false;
                    let lo = p[i];
                    if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|&c| c != ']') {
                        let hi = p[i + 2];
                        let in_range = |x: char| lo <= x && x <= hi;
                        if in_range(c)
                            || (ic
                                && (in_range(c.to_ascii_lowercase())
                                    || in_range(c.to_ascii_uppercase())))
                        {
                            hit = true;
                        }
                        i += 3;
                    } else {
                        if eq(lo, c, ic) {
                            hit = true;
                        }
                        i += 1;
                    }
                }
                hit != neg && m(&p[i + 1..], &v[1..], ic)
            }
            Some(&c) => !v.is_empty() && eq(c, v[0], ic) && m(&p[1..], &v[1..], ic),
        }
    }
    let v: Vec<char> = value.chars().collect();
    let p: Vec<char> = glob.chars().collect();
    expand(&p).iter().any(|p| m(p, &v, ignore_case))
}

fn naive_sm(s: &StringMatch, value: &str, force_ci: bool) -> bool {
    let ic = s.ignore_case || force_ci;
    let (v, low) = (value, value.to_ascii_lowercase());
    s.patterns.iter().any(|p| {
        let (pv, vv) = if ic {
            (p.to_ascii_lowercase(), low.clone())
        } else {
            (p.clone(), v.to_owned())
        };
        match s.kind {
            MatchKind::Exact => vv == pv,
            MatchKind::Prefix => vv.starts_with(&pv),
            MatchKind::Suffix => vv.ends_with(&pv),
            MatchKind::Contains => vv.contains(&pv),
            MatchKind::Glob => naive_glob(p, value, ic),
            MatchKind::Regex => {
                let src = if ic { format!("(?i){p}") } else { p.clone() };
                regex::Regex::new(&src).unwrap().is_match(value)
            }
        }
    })
}

fn naive(c: &Condition, r: &Req) -> bool {
    let ip = r.ip.to_canonical();
    c.ip.as_ref()
        .is_none_or(|l| l.iter().any(|n| n.0.contains(&ip)))
        && c.user_agent
            .as_ref()
            .is_none_or(|s| naive_sm(s, &r.user_agent, false))
        && c.path.as_ref().is_none_or(|s| naive_sm(s, &r.path, false))
        && c.host.as_ref().is_none_or(|s| naive_sm(s, &r.host, true))
        && c.method.as_ref().is_none_or(|l| l.contains(&r.method))
        && c.operation
            .as_ref()
            .is_none_or(|l| r.operation.as_ref().is_some_and(|o| l.contains(o)))
        && c.headers.as_ref().is_none_or(|hs| {
            hs.iter().all(|h| {
                let v = r.headers.0.get(&h.name.to_ascii_lowercase());
                let presence = match (h.present, &h.value) {
                    (Some(p), _) => v.is_some() == p,
                    (None, None) => v.is_some(),
                    (None, Some(_)) => true,
                };
                presence
                    && h.value
                        .as_ref()
                        .is_none_or(|s| v.is_some_and(|v| naive_sm(s, v, false)))
            })
        })
        && c.any.as_ref().is_none_or(|l| l.iter().any(|c| naive(c, r)))
        && c.all.as_ref().is_none_or(|l| l.iter().all(|c| naive(c, r)))
        && c.not.as_ref().is_none_or(|c| !naive(c, r))
}

const ALPHA: &[&str] = &["a", "b", "A", "B", "/", ".", "-", "ab", "/a", "é"];

fn text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(ALPHA), 0..max).prop_map(|v| v.concat())
}

fn glob_pat() -> impl Strategy<Value = String> {
    let tok = prop::sample::select(
        &[
            "a", "b", "A", "/", ".", "é", "*", "?", "[ab]", "[!a]", "[a-b]", "{a,b}", "{a,}",
            "\\*", "[A-B]",
        ][..],
    );
    prop::collection::vec(tok, 0..5).prop_map(|v| v.concat())
}

fn regex_pat() -> impl Strategy<Value = String> {
    let tok = prop::sample::select(
        &[
            "a", "b", "A", "/", "\\.", ".", "[ab]", "(a|b)", "b+", "a*", "é", "\\bb", "a\\b",
        ][..],
    );
    (
        any::<bool>(),
        prop::collection::vec(tok, 1..4),
        any::<bool>(),
    )
        .prop_map(|(s, v, e)| {
            format!(
                "{}{}{}",
                if s { "^" } else { "" },
                v.concat(),
                if e { "$" } else { "" }
            )
        })
}

fn string_match() -> impl Strategy<Value = StringMatch> {
    let kind = prop::sample::select(
        &[
            MatchKind::Exact,
            MatchKind::Prefix,
            MatchKind::Suffix,
            MatchKind::Contains,
            MatchKind::Glob,
            MatchKind::Regex,
        ][..],
    );
    (kind, any::<bool>(), 1..3usize).prop_flat_map(|(kind, ignore_case, n)| {
        let pat: BoxedStrategy<String> = match kind {
            MatchKind::Glob => glob_pat().boxed(),
            MatchKind::Regex => regex_pat().boxed(),
            _ => text(3).boxed(),
        };
        prop::collection::vec(pat, n).prop_map(move |patterns| StringMatch {
            kind,
            patterns,
            ignore_case,
        })
    })
}

const NETS: &[&str] = &[
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "192.0.2.0/24",
    "2001:db8::/32",
    "::/0",
    "0.0.0.0/0",
    "10.1.2.3",
];
const IPS: &[&str] = &[
    "10.1.2.3",
    "10.1.3.1",
    "10.9.9.9",
    "192.0.2.1",
    "198.51.100.1",
    "2001:db8::1",
    "::ffff:10.1.2.3",
    "2001:db9::1",
];
const METHODS: &[&str] = &["GET", "POST", "PUT"];
const OPS: &[&str] = &["export", "read"];
const HEADERS: &[&str] = &["x-a", "X-B"];

fn header_match() -> impl Strategy<Value = HeaderMatch> {
    (
        prop::sample::select(HEADERS),
        prop::option::of(any::<bool>()),
        prop::option::of(string_match()),
    )
        .prop_map(|(name, present, value)| HeaderMatch {
            name: name.to_string(),
            present,
            value,
        })
}

fn leaf_condition() -> impl Strategy<Value = Condition> {
    let list = |items: &'static [&'static str]| {
        prop::option::of(
            prop::sample::subsequence(items, 0..=2)
                .prop_map(|v| v.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
        )
    };
    (
        prop::option::of(
            prop::sample::subsequence(NETS, 1..=2)
                .prop_map(|v| v.iter().map(|s| s.parse().unwrap()).collect::<Vec<Cidr>>()),
        ),
        prop::option::of(string_match()),
        prop::option::of(string_match()),
        prop::option::of(string_match()),
        list(METHODS),
        list(OPS),
        prop::option::of(prop::collection::vec(header_match(), 1..3)),
        0..7usize,
    )
        .prop_map(|(ip, ua, path, host, method, operation, headers, keep)| {
            // One field per leaf condition; combinations come from `any`/`all`/`not`.
            let mut c = Condition::default();
            match keep {
                0 => c.ip = ip,
                1 => c.user_agent = ua,
                2 => c.path = path,
                3 => c.host = host,
                4 => c.method = method,
                5 => c.operation = operation,
                _ => c.headers = headers,
            }
            c
        })
}

fn condition() -> impl Strategy<Value = Condition> {
    leaf_condition().prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(|v| Condition {
                any: Some(v),
                ..Default::default()
            }),
            prop::collection::vec(inner.clone(), 0..3).prop_map(|v| Condition {
                all: Some(v),
                ..Default::default()
            }),
            inner.clone().prop_map(|c| Condition {
                not: Some(Box::new(c)),
                ..Default::default()
            }),
            (leaf_condition(), inner).prop_map(|(mut a, b)| {
                a.not = Some(Box::new(b));
                a
            }),
        ]
    })
}

fn request() -> impl Strategy<Value = Req> {
    (
        prop::sample::select(IPS),
        prop::sample::select(METHODS),
        text(4),
        text(5),
        text(5),
        prop::option::of(prop::sample::select(OPS)),
        prop::option::of(text(3)),
        prop::option::of(text(3)),
    )
        .prop_map(|(ip, method, host, path, ua, op, xa, xb)| {
            let mut headers = Headers::default();
            if let Some(v) = xa {
                headers.0.insert("x-a".into(), v);
            }
            if let Some(v) = xb {
                headers.0.insert("x-b".into(), v);
            }
            Req {
                ip: ip.parse().unwrap(),
                method: method.into(),
                host: host.to_ascii_lowercase(),
                path,
                user_agent: ua,
                operation: op.map(String::from),
                headers,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn rule_set_agrees_with_naive_evaluation(
        conds in prop::collection::vec(prop::option::weighted(0.9, condition()), 1..12),
        reqs in prop::collection::vec(request(), 1..8),
        from in 0..12usize,
    ) {
        let set = RuleSet::new(conds.iter().map(Option::as_ref)).unwrap();
        for r in &reqs {
            let expected: Vec<usize> = conds
                .iter()
                .enumerate()
                .filter(|(_, c)| c.as_ref().is_none_or(|c| naive(c, r)))
                .map(|(i, _)| i)
                .collect();
            prop_assert_eq!(&all_matches(&set, r), &expected, "request {:?}", r);
            let first = expected.iter().copied().find(|&i| i >= from);
            prop_assert_eq!(set.first_match(&r.view(), from), first);
            for (i, _) in conds.iter().enumerate() {
                prop_assert_eq!(set.matches(&r.view(), i), expected.contains(&i));
            }
        }
    }

    #[test]
    fn glob_translation_agrees_with_naive_glob(g in glob_pat(), v in text(5), ic in any::<bool>()) {
        let re = regex::Regex::new(&glob_to_regex(&g, ic).unwrap()).unwrap();
        prop_assert_eq!(re.is_match(&v), naive_glob(&g, &v, ic), "glob {:?} value {:?}", g, v);
    }

    #[test]
    fn ipset_agrees_with_naive_containment(
        nets in prop::collection::vec((any::<u32>(), 0u8..=32), 0..40),
        nets6 in prop::collection::vec((any::<u128>(), 0u8..=128), 0..10),
        probes in prop::collection::vec(any::<u32>(), 1..40),
    ) {
        let cidrs: Vec<Cidr> = nets
            .iter()
            .map(|&(a, l)| format!("{}/{}", std::net::Ipv4Addr::from(a & u32::MAX.checked_shl(32 - u32::from(l)).unwrap_or(0)), l))
            .chain(nets6.iter().map(|&(a, l)| format!("{}/{}", std::net::Ipv6Addr::from(a & u128::MAX.checked_shl(128 - u32::from(l)).unwrap_or(0)), l)))
            .map(|s| s.parse().unwrap())
            .collect();
        let set = IpSet::new(cidrs.iter().copied());
        // Probe random addresses and the edges of every network.
        let mut ips: Vec<IpAddr> = probes.iter().map(|&p| IpAddr::from(std::net::Ipv4Addr::from(p))).collect();
        for c in &cidrs {
            for a in [c.0.network(), c.0.broadcast()] {
                ips.push(a);
                if let IpAddr::V4(v4) = a {
                    ips.push(IpAddr::from(std::net::Ipv4Addr::from(u32::from(v4).wrapping_add(1))));
                    ips.push(IpAddr::from(std::net::Ipv4Addr::from(u32::from(v4).wrapping_sub(1))));
                    ips.push(IpAddr::from(v4.to_ipv6_mapped()));
                }
            }
        }
        for ip in ips {
            let canon = ip.to_canonical();
            let expected = cidrs.iter().any(|c| c.0.contains(&canon));
            prop_assert_eq!(set.contains(ip), expected, "{}", ip);
        }
    }
}
