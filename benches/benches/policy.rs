//! Cost of the policy's compiled form: compiling a 10,000-rule policy, matching rule sets
//! of 10, 1,000 and 10,000 rules on the same request mix (and a naive one-rule-at-a-time
//! loop beside it), CIDR lookups in `IpSet` beside a binary prefix trie, and
//! `PolicyStore::load`.
//!
//! Rule mix at every size N (as in scenario L2): N/2 user-agent regexes, 2N/5 path
//! prefixes (each with `method: POST`), N/10 CIDRs. The request mix is the same at every
//! size and matches the same rules (the first few of each kind exist at every size).
//!
//! Run: `cargo bench -p fairgate-benches --bench policy -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use fairgate_policies::compile::compile;
use fairgate_policies::compiled::RequestView;
use fairgate_policies::decode::parse_policy;
use fairgate_policies::matcher::{IpSet, RuleSet};
use fairgate_policies::model::{Action, Cidr, Condition, DenyAction, MatchKind, Rule, StringMatch};
use fairgate_policies::{Policy, PolicyStore};

// === inputs ===

fn string_match(kind: MatchKind, pattern: String) -> StringMatch {
    StringMatch {
        kind,
        patterns: vec![pattern],
        ignore_case: false,
    }
}

fn cidr(i: usize) -> Cidr {
    format!("10.{}.{}.0/24", (i / 256) % 256, i % 256)
        .parse()
        .expect("valid CIDR")
}

/// A policy with `n` deny rules in the L2 mix.
fn policy(n: usize) -> Policy {
    let mut p = parse_policy("version: 1", "bench.yaml").expect("valid policy");
    let (ua, paths) = (n / 2, n * 2 / 5);
    for i in 0..n {
        let when = if i < ua {
            // Alternate two shapes of bot signature.
            let re = if i % 2 == 0 {
                format!("bot{i}/[0-9]+")
            } else {
                format!("(?i)scanner-{i}\\b")
            };
            Condition {
                user_agent: Some(string_match(MatchKind::Regex, re)),
                ..Condition::default()
            }
        } else if i < ua + paths {
            Condition {
                path: Some(string_match(
                    MatchKind::Prefix,
                    format!("/api/p{}/", i - ua),
                )),
                method: Some(vec!["POST".into()]),
                ..Condition::default()
            }
        } else {
            Condition {
                ip: Some(vec![cidr(i - ua - paths)]),
                ..Condition::default()
            }
        };
        p.rules.push(Rule {
            name: format!("rule-{i}"),
            mode: Default::default(),
            when: Some(when),
            action: Action::Deny(DenyAction::default()),
        });
    }
    p
}

struct Req {
    ip: IpAddr,
    method: &'static str,
    path: &'static str,
    ua: &'static str,
}

/// Mostly ordinary traffic, some requests matching a rule of each kind.
fn requests() -> Vec<Req> {
    let browser = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36";
    let r = |ip: &str, method, path, ua| Req {
        ip: ip.parse().expect("valid IP"),
        method,
        path,
        ua,
    };
    vec![
        r("192.0.2.10", "GET", "/", browser),
        r("192.0.2.11", "GET", "/api/users/42", browser),
        r("198.51.100.7", "POST", "/api/orders", "curl/8.5.0"),
        r("192.0.2.12", "GET", "/static/app.js", browser),
        r(
            "192.0.2.13",
            "GET",
            "/",
            "bot2/17 (+https://example.com/bot)",
        ),
        r("192.0.2.14", "POST", "/api/p1/items", browser),
        r("10.0.0.5", "GET", "/", "python-requests/2.31"),
        r("2001:db8::1", "GET", "/healthz", "kube-probe/1.29"),
    ]
}

fn view(r: &Req) -> RequestView<'_> {
    RequestView {
        ip: r.ip,
        method: r.method,
        host: "api.example.com",
        path: r.path,
        user_agent: r.ua,
        operation: None,
        headers: &(),
    }
}

// === compile ===

fn bench_compile(c: &mut Criterion) {
    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    for n in [1_000, 10_000] {
        let p = policy(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &p, |b, p| {
            b.iter_batched(
                || p.clone(),
                |p| compile(p).expect("compiles"),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

// === rule matching ===

/// What matching costs without the shared automata and the index: one single-rule
/// matcher per rule, every rule tried for every request.
struct Naive {
    rules: Vec<RuleSet>,
}

impl Naive {
    fn new(p: &Policy) -> Naive {
        let rules = p
            .rules
            .iter()
            .map(|r| RuleSet::new([r.when.as_ref()]).expect("compiles"))
            .collect();
        Naive { rules }
    }

    fn count(&self, r: &Req) -> usize {
        let v = view(r);
        self.rules.iter().filter(|set| set.matches(&v, 0)).count()
    }
}

fn bench_rules(c: &mut Criterion) {
    let reqs = requests();
    let mut g = c.benchmark_group("rules");
    g.throughput(Throughput::Elements(reqs.len() as u64));
    let mut expected = None;
    for n in [10, 1_000, 10_000] {
        let p = policy(n);
        let naive = Naive::new(&p);
        let compiled = compile(p).expect("compiles");
        let set = &compiled.rule_set;
        // Same request mix, same matches at every size.
        let counts: Vec<usize> = reqs.iter().map(|r| naive.count(r)).collect();
        let mut got = Vec::new();
        for r in &reqs {
            let mut k = 0;
            set.for_each_match(&view(r), |_| {
                k += 1;
                ControlFlow::Continue(())
            });
            got.push(k);
        }
        assert_eq!(got, counts, "rule set and naive loop disagree at {n} rules");
        assert_eq!(
            *expected.get_or_insert(counts.clone()),
            counts,
            "the mix must match alike at every size"
        );

        g.bench_with_input(BenchmarkId::new("for_each_match", n), &reqs, |b, reqs| {
            b.iter(|| {
                let mut k = 0usize;
                for r in reqs {
                    set.for_each_match(&view(r), |i| {
                        k += i;
                        ControlFlow::Continue(())
                    });
                }
                black_box(k)
            })
        });
        g.bench_with_input(BenchmarkId::new("first_match", n), &reqs, |b, reqs| {
            b.iter(|| {
                let mut k = 0usize;
                for r in reqs {
                    k += set.first_match(&view(r), 0).unwrap_or(0);
                }
                black_box(k)
            })
        });
        g.bench_with_input(BenchmarkId::new("naive_loop", n), &reqs, |b, reqs| {
            b.iter(|| reqs.iter().map(|r| naive.count(r)).sum::<usize>())
        });
    }
    g.finish();
}

// === CIDR sets ===

/// The alternative to `IpSet`'s sorted ranges: a binary trie over the prefix bits (IPv4
/// only here, which is the favourable case for a trie: at most 32 levels).
#[derive(Default)]
struct BinaryTrie {
    /// Node → [child for bit 0, child for bit 1]; 0 = none (the root is node 0).
    kids: Vec<[u32; 2]>,
    terminal: Vec<bool>,
}

impl BinaryTrie {
    fn new(cidrs: &[Cidr]) -> BinaryTrie {
        let mut t = BinaryTrie {
            kids: vec![[0, 0]],
            terminal: vec![false],
        };
        for c in cidrs {
            let text = c.to_string();
            let Some((addr, len)) = text.split_once('/') else {
                continue;
            };
            let (Ok(addr), Ok(len)) = (addr.parse::<std::net::Ipv4Addr>(), len.parse::<u8>())
            else {
                continue;
            };
            let bits = u32::from(addr);
            let mut node = 0usize;
            for depth in 0..len {
                let bit = ((bits >> (31 - depth)) & 1) as usize;
                if t.kids[node][bit] == 0 {
                    t.kids.push([0, 0]);
                    t.terminal.push(false);
                    t.kids[node][bit] = (t.kids.len() - 1) as u32;
                }
                node = t.kids[node][bit] as usize;
            }
            t.terminal[node] = true;
        }
        t
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let IpAddr::V4(v4) = ip.to_canonical() else {
            return false;
        };
        let bits = u32::from(v4);
        let mut node = 0usize;
        for depth in 0..32 {
            if self.terminal[node] {
                return true;
            }
            let next = self.kids[node][((bits >> (31 - depth)) & 1) as usize];
            if next == 0 {
                return false;
            }
            node = next as usize;
        }
        self.terminal[node]
    }
}

fn bench_ipset(c: &mut Criterion) {
    let mut g = c.benchmark_group("ipset");
    // Probe addresses spread over the covered and uncovered space.
    let probes: Vec<IpAddr> = (0..64u32)
        .map(|i| {
            IpAddr::from(std::net::Ipv4Addr::from(
                0x0A00_0000u32.wrapping_add(i.wrapping_mul(0x0009_7F31)),
            ))
        })
        .collect();
    g.throughput(Throughput::Elements(probes.len() as u64));
    for n in [10, 10_000] {
        // Scattered /24s and /32s (no merging into a few ranges).
        let cidrs: Vec<Cidr> = (0..n)
            .map(|i| {
                let a = (i as u32).wrapping_mul(2_654_435_761) & 0x00FF_FFFF;
                let s = if i % 2 == 0 {
                    format!("10.{}.{}.0/24", a >> 16, (a >> 8) & 255)
                } else {
                    format!("10.{}.{}.{}", a >> 16, (a >> 8) & 255, a & 255)
                };
                s.parse().expect("valid CIDR")
            })
            .collect();
        let set = IpSet::new(cidrs.iter().copied());
        let trie = BinaryTrie::new(&cidrs);
        for ip in &probes {
            assert_eq!(set.contains(*ip), trie.contains(*ip));
        }
        g.bench_with_input(
            BenchmarkId::new("sorted_ranges", n),
            &probes,
            |b, probes| b.iter(|| probes.iter().filter(|ip| set.contains(**ip)).count()),
        );
        g.bench_with_input(BenchmarkId::new("binary_trie", n), &probes, |b, probes| {
            b.iter(|| probes.iter().filter(|ip| trie.contains(**ip)).count())
        });
    }
    g.finish();
}

// === store ===

fn bench_store(c: &mut Criterion) {
    let store = PolicyStore::for_test(policy(10));
    let mut g = c.benchmark_group("store");
    g.bench_function("load", |b| b.iter(|| black_box(store.load().version)));
    g.bench_function("load_full", |b| {
        b.iter(|| black_box(store.load_full().version))
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default().measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_rules, bench_ipset, bench_store, bench_compile
}
criterion_main!(benches);
