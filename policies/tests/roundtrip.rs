//! Valid policies round-trip: a generated policy serialised with `serde_json` (JSON is YAML)
//! parses back equal with `parse_policy`, and compiles. Also: the example file round-trips,
//! and its JSON Schema is well formed.

use std::collections::BTreeMap;
use std::time::Duration;

use fairgate_policies::compile::compile;
use fairgate_policies::decode::{parse_overrides, parse_policy};
use fairgate_policies::model::*;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;

// === strategies ===

fn rate() -> impl Strategy<Value = Rate> {
    let periods = [1, 10, 60, 3600, 86_400].map(Duration::from_secs);
    (1u64..=1000, prop::sample::select(periods.to_vec()))
        .prop_map(|(n, p)| Rate::new(n, p).expect("non-zero"))
}

fn cidr() -> impl Strategy<Value = Cidr> {
    prop_oneof![
        (any::<[u8; 4]>(), 1u8..=32).prop_map(|(a, p)| {
            let net = ipnet::Ipv4Net::new(a.into(), p)
                .expect("prefix ≤ 32")
                .trunc();
            net.to_string().parse::<Cidr>().expect("valid")
        }),
        (any::<[u16; 8]>(), 1u8..=128).prop_map(|(a, p)| {
            let net = ipnet::Ipv6Net::new(a.into(), p)
                .expect("prefix ≤ 128")
                .trunc();
            net.to_string().parse::<Cidr>().expect("valid")
        }),
    ]
}

/// Free text for literal patterns: ASCII, quotes, escapes, control characters, non-ASCII.
fn text() -> impl Strategy<Value = String> {
    "[ -~\t\n\u{0}\u{7f}\u{85}\u{a0}é\u{2028}\u{feff}\u{1F600}]{0,10}"
}

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_.-]{0,10}"
}

fn string_match() -> impl Strategy<Value = StringMatch> {
    let literal = (
        prop::sample::select(vec![
            MatchKind::Exact,
            MatchKind::Prefix,
            MatchKind::Suffix,
            MatchKind::Contains,
        ]),
        vec(text(), 1..3),
    );
    let regex =
        vec(text().prop_map(|t| regex::escape(&t)), 1..3).prop_map(|p| (MatchKind::Regex, p));
    let glob = vec("[a-z/]{0,5}\\*?[a-z.]{0,5}", 1..3).prop_map(|p| (MatchKind::Glob, p));
    (prop_oneof![literal, regex, glob], any::<bool>()).prop_map(
        |((kind, patterns), ignore_case)| StringMatch {
            kind,
            patterns,
            ignore_case,
        },
    )
}

fn header_match() -> impl Strategy<Value = HeaderMatch> {
    (
        "x-[a-z]{1,8}",
        prop_oneof![
            Just((Some(true), false)),
            Just((Some(false), false)),
            Just((None, true)),
            Just((Some(true), true)),
        ],
        string_match(),
    )
        .prop_map(|(name, (present, with_value), m)| HeaderMatch {
            name,
            present,
            value: with_value.then_some(m),
        })
}

fn leaf_condition() -> impl Strategy<Value = Condition> {
    (
        option::of(vec(cidr(), 1..3)),
        option::of(string_match()),
        option::of(string_match()),
        option::of(vec("[A-Z]{1,7}", 1..3)),
        option::of(string_match()),
        option::of(vec(header_match(), 1..3)),
        option::of(vec(name(), 1..3)),
    )
        .prop_map(
            |(ip, user_agent, path, method, host, headers, operation)| Condition {
                ip,
                user_agent,
                path,
                method,
                host,
                headers,
                operation,
                ..Condition::default()
            },
        )
        .prop_filter("a condition needs a field", |c| *c != Condition::default())
}

fn condition() -> impl Strategy<Value = Condition> {
    leaf_condition().prop_recursive(3, 12, 3, |inner| {
        (
            leaf_condition(),
            option::of(vec(inner.clone(), 1..3)),
            option::of(vec(inner.clone(), 1..3)),
            option::of(inner),
        )
            .prop_map(|(mut c, any, all, not)| {
                c.any = any;
                c.all = all;
                c.not = not.map(Box::new);
                c
            })
    })
}

fn bandwidth() -> impl Strategy<Value = Bandwidth> {
    (
        rate(),
        option::of(20u64..=10_000),
        option::of("[a-z][a-z-]{0,6}"),
    )
        .prop_map(|(rate, burst, name)| Bandwidth {
            rate,
            burst,
            name,
            period: None,
        })
        .boxed()
        .prop_union(period_bandwidth().boxed())
}

/// A quota per calendar period (quota ≥ 20, the largest cost below).
fn period_bandwidth() -> impl Strategy<Value = Bandwidth> {
    use fairgate_policies::model::{CalendarPeriod, Period};
    (
        20u64..=1_000_000,
        prop_oneof![Just(Period::Day), Just(Period::Week), Just(Period::Month)],
        option::of(prop_oneof![
            Just("Europe/Paris"),
            Just("America/New_York"),
            Just("UTC")
        ]),
        option::of("[a-z][a-z-]{0,6}"),
    )
        .prop_map(|(quota, unit, zone, name)| Bandwidth {
            rate: fairgate_policies::units::Rate::new(quota, unit.nominal()).unwrap(),
            burst: None,
            name,
            period: Some(CalendarPeriod {
                unit,
                time_zone: zone.map(str::to_owned),
            }),
        })
}

/// Bandwidths with distinct names; every effective burst is ≥ 20 (the largest cost below).
/// Whole-second UTC times from 1970 to 2096 (an override's `expires`).
fn timestamp() -> impl Strategy<Value = fairgate_policies::units::Timestamp> {
    (0u64..4_000_000_000).prop_map(fairgate_policies::units::Timestamp::from_unix_secs)
}

fn bandwidths() -> impl Strategy<Value = Vec<Bandwidth>> {
    vec(bandwidth(), 0..3).prop_map(|mut v| {
        let mut seen = std::collections::HashSet::new();
        for b in &mut v {
            if let Some(n) = &b.name {
                if !seen.insert(n.clone()) {
                    b.name = None;
                }
            }
            if b.burst.is_none() && b.rate.count() < 20 {
                b.burst = Some(20);
            }
        }
        v
    })
}

fn action(plans: Vec<String>) -> impl Strategy<Value = Action> {
    let plan = if plans.is_empty() {
        Just(None).boxed()
    } else {
        option::of(prop::sample::select(plans)).boxed()
    };
    prop_oneof![
        option::of(400u16..=599).prop_map(|status| Action::Deny(DenyAction { status })),
        Just(Action::Allow),
        (
            rate(),
            option::of(1u64..=1000),
            prop_oneof![
                Just(LimitKey::Ip),
                Just(LimitKey::Client),
                Just(LimitKey::Global),
                "x-[a-z]{1,6}".prop_map(LimitKey::Header),
            ],
            prop_oneof![Just(Estimator::Exact), Just(Estimator::Sketch)],
        )
            .prop_map(|(rate, burst, key, estimator)| Action::Limit(LimitAction {
                rate,
                burst,
                key,
                estimator,
            })),
        (
            option::of(prop_oneof![
                Just(Priority::Critical),
                Just(Priority::Normal),
                Just(Priority::Sheddable)
            ]),
            plan,
        )
            .prop_filter("tag sets something", |(p, pl)| p.is_some() || pl.is_some())
            .prop_map(|(priority, plan)| Action::Tag(TagAction { priority, plan })),
    ]
}

fn fraction() -> impl Strategy<Value = f64> {
    (1u32..=1000).prop_map(|n| f64::from(n) / 1000.0)
}

fn shedding() -> impl Strategy<Value = Shedding> {
    let limit = prop_oneof![
        (1u32..=10_000).prop_map(ShedLimit::Static),
        (
            1u32..=100,
            0u32..=1000,
            any::<bool>(),
            any::<bool>(),
            1u64..=5000
        )
            .prop_map(|(min, extra, aimd, with_initial, ms)| {
                let max = min + extra;
                ShedLimit::Adaptive(AdaptiveLimit {
                    algorithm: if aimd {
                        AdaptiveAlgorithm::Aimd
                    } else {
                        AdaptiveAlgorithm::Gradient
                    },
                    min,
                    max,
                    initial: with_initial.then_some(min + extra / 2),
                    target_latency: (aimd || ms % 2 == 0)
                        .then(|| HumanDuration(Duration::from_millis(ms))),
                })
            }),
    ];
    let thresholds = vec(fraction(), 4).prop_map(|mut v| {
        v.sort_by(|a, b| b.total_cmp(a));
        ClassThresholds {
            critical: v[0],
            normal: v[1],
            borrowed: v[2],
            sheddable: v[3],
        }
    });
    let delay = option::of(
        (1u64..=10_000, 1u32..=4096).prop_map(|(ms, w)| RejectDelay {
            max: HumanDuration(Duration::from_millis(ms)),
            max_waiting: w,
        }),
    );
    (limit, thresholds, delay).prop_map(|(limit, thresholds, reject_delay)| Shedding {
        limit,
        thresholds,
        reject_delay,
    })
}

fn extractor() -> impl Strategy<Value = KeyExtractor> {
    prop_oneof![
        "x-[a-z-]{1,8}".prop_map(KeyExtractor::Header),
        "[a-z_]{1,8}".prop_map(KeyExtractor::Query),
        Just(KeyExtractor::Bearer),
    ]
}

/// Ascending thresholds in (0, 1] (hundredths, so that they print back exactly) and a URL.
fn growth() -> impl Strategy<Value = Growth> {
    (1u32..=100, 1u64..=3600, 1u32..=100, 2u32..=10, 0u64..=3600).prop_map(
        |(threshold, window, step, max_factor, extra)| {
            let step = f64::from(step) / 100.0;
            Growth {
                threshold: f64::from(threshold) / 100.0,
                window: fairgate_policies::units::HumanDuration(std::time::Duration::from_secs(
                    window,
                )),
                step,
                max_factor: f64::from(max_factor),
                max_rise: MaxRise {
                    factor: 2.0,
                    within: fairgate_policies::units::HumanDuration(
                        std::time::Duration::from_secs(window + extra),
                    ),
                },
            }
        },
    )
}

fn alerts() -> impl Strategy<Value = Alerts> {
    (
        proptest::collection::btree_set(1u32..=100, 1..4),
        "[a-z]{1,8}",
        1u16..=65535,
        "(/[a-z0-9_-]{0,8}){0,3}",
    )
        .prop_map(|(hundredths, host, port, path)| Alerts {
            thresholds: hundredths
                .into_iter()
                .map(|h| f64::from(h) / 100.0)
                .collect(),
            webhook: format!("http://{host}:{port}{path}"),
        })
}

fn policy() -> impl Strategy<Value = Policy> {
    let plans = btree_map(
        "[a-z]{1,6}",
        (
            bandwidths(),
            option::of(1u32..=1000),
            any::<bool>(),
            option::of(alerts()),
            option::of(growth()),
        )
            .prop_map(|(bandwidths, concurrency, fixed, alerts, growth)| Plan {
                bandwidths,
                concurrency,
                fixed,
                alerts,
                // A fixed quota is never grown (the decoder refuses both).
                growth: growth.filter(|_| !fixed),
            }),
        0..4,
    );
    plans.prop_flat_map(|plans| {
        let names: Vec<String> = plans.keys().cloned().collect();
        let plan_ref = if names.is_empty() {
            Just(None).boxed()
        } else {
            option::of(prop::sample::select(names.clone())).boxed()
        };
        let rules = vec(
            (
                any::<bool>(),
                option::of(condition()),
                action(names.clone()),
            ),
            0..5,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (shadow, when, action))| Rule {
                    name: format!("rule-{i}"),
                    mode: if shadow { Mode::Shadow } else { Mode::Enforce },
                    when,
                    action,
                })
                .collect::<Vec<_>>()
        });
        let operations = vec(
            (
                option::of(condition()),
                0u64..=20,
                option::of(prop_oneof![
                    (1u64..=1 << 30).prop_map(|b| PostHoc::Bytes(ByteSize(b))),
                    (1u64..=60_000)
                        .prop_map(|ms| PostHoc::Duration(HumanDuration(Duration::from_millis(ms)))),
                ]),
            ),
            0..3,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (when, cost, post_hoc))| Operation {
                    name: format!("op-{i}"),
                    when,
                    cost,
                    post_hoc,
                })
                .collect::<Vec<_>>()
        });
        let client_plan = if names.is_empty() {
            Just(None).boxed()
        } else {
            option::of(prop::sample::select(names)).boxed()
        };
        let clients = btree_map(
            "[ -~é]{1,20}",
            (
                client_plan,
                option::of(bandwidths()),
                option::of(1u32..=100),
                option::of(timestamp()),
            )
                .prop_filter("an override sets something", |(p, b, c, _)| {
                    p.is_some() || b.is_some() || c.is_some()
                })
                .prop_map(|(plan, bandwidths, concurrency, expires)| ClientOverride {
                    plan,
                    bandwidths,
                    concurrency,
                    expires,
                    fixed: false,
                    alerts: None,
                    growth: None,
                }),
            0..3,
        );
        let identify = (
            vec(cidr(), 0..3),
            1u8..=128,
            1u8..=32,
            vec(extractor(), 0..3),
            64u32..=4096,
        )
            .prop_map(
                |(trusted_proxies, ipv6_prefix, ipv4_prefix, client_key, max_key_length)| {
                    Identify {
                        trusted_proxies,
                        ipv6_prefix,
                        ipv4_prefix,
                        client_key,
                        max_key_length,
                    }
                },
            );
        let responses = (
            400u16..=599,
            400u16..=599,
            400u16..=599,
            prop_oneof![
                Just(HeaderMode::Never),
                Just(HeaderMode::OnReject),
                Just(HeaderMode::Always)
            ],
            1u64..=120,
            0u64..=600,
        )
            .prop_map(|(q, s, d, h, r, st)| Responses {
                quota_status: q,
                shed_status: s,
                deny_status: d,
                ratelimit_headers: h,
                shed_retry_after: HumanDuration::from_secs(r),
                retry_stagger: HumanDuration::from_secs(st),
            });
        (
            (Just(plans), plan_ref, rules, operations, clients),
            (
                identify,
                option::of("[a-z]{1,8}\\.yaml"),
                (any::<bool>(), fraction()),
                option::of(shedding()),
                responses,
                1u64..=10_000_000,
                option::of((
                    "/[a-z.-]{0,12}(/[a-z]{1,6}){0,2}",
                    any::<bool>(),
                    1u32..=1_000_000,
                )),
            ),
        )
            .prop_map(
                |(
                    (plans, default_plan, rules, operations, clients),
                    (
                        identify,
                        overrides_file,
                        (enabled, below),
                        shedding,
                        responses,
                        max_keys,
                        usage,
                    ),
                )| Policy {
                    version: 1,
                    identify,
                    rules,
                    plans,
                    default_plan,
                    operations,
                    clients,
                    overrides_file,
                    burst_sharing: BurstSharing {
                        enabled,
                        below_utilization: below,
                    },
                    // `self_caps` needs a caps file; without writes one may still be named.
                    usage_endpoint: usage.map(|(path, self_caps, max_caps)| UsageEndpoint {
                        path,
                        self_caps,
                        caps_file: (self_caps || max_caps % 2 == 0).then(|| "caps.json".to_owned()),
                        max_caps,
                    }),
                    shedding,
                    responses,
                    state: State {
                        backend: Backend::Local,
                        max_keys,
                        redis: None,
                        growth_file: Some("growth.json".to_owned()),
                    },
                },
            )
    })
}

// === properties ===

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn generated_policies_round_trip_through_json_and_compile(policy in policy()) {
        let json = serde_json::to_string_pretty(&policy).expect("serialise");
        let back = match parse_policy(&json, "gen.json") {
            Ok(p) => p,
            Err(e) => panic!("generated policy did not parse:\n{e}\n{json}"),
        };
        prop_assert_eq!(&back, &policy);
        // The compact form too (one line of flow YAML).
        let compact = serde_json::to_string(&policy).expect("serialise");
        prop_assert_eq!(parse_policy(&compact, "gen.json").expect("compact parses"), policy);
        if let Err(e) = compile(back) {
            panic!("a valid policy did not compile:\n{e}\n{json}");
        }
    }

    #[test]
    fn generated_overrides_round_trip(
        clients in btree_map(
            "[ -~]{1,20}",
            (option::of("[a-z]{1,6}"), option::of(bandwidths()), option::of(1u32..=100), option::of(timestamp()), option::of(alerts()))
                .prop_filter("sets something", |(p, b, c, _, a)| p.is_some() || b.is_some() || c.is_some() || a.is_some())
                .prop_map(|(plan, bandwidths, concurrency, expires, alerts)| ClientOverride { plan, bandwidths, concurrency, expires, fixed: false, alerts, growth: None }),
            0..5,
        )
    ) {
        let json = serde_json::to_string(&clients).expect("serialise");
        let back: BTreeMap<String, ClientOverride> = parse_overrides(&json, "o.json").expect("parses");
        prop_assert_eq!(back, clients);
    }
}

#[test]
fn the_example_policy_round_trips() {
    let src = include_str!("../../examples/policy.yaml");
    let policy = parse_policy(src, "examples/policy.yaml").unwrap();
    let json = serde_json::to_string_pretty(&policy).unwrap();
    assert_eq!(parse_policy(&json, "policy.json").unwrap(), policy);
    compile(policy).unwrap();
}

#[test]
fn string_match_serialises_to_the_canonical_mapping() {
    let m = StringMatch {
        kind: MatchKind::Prefix,
        patterns: vec!["/a".into(), "/b".into()],
        ignore_case: true,
    };
    assert_eq!(
        serde_json::to_string(&m).unwrap(),
        r#"{"prefix":["/a","/b"],"ignore_case":true}"#
    );
    let exact = StringMatch {
        kind: MatchKind::Exact,
        patterns: vec!["/login".into()],
        ignore_case: false,
    };
    assert_eq!(
        serde_json::to_string(&exact).unwrap(),
        r#"{"exact":["/login"]}"#
    );
}

#[test]
fn json_schema_describes_the_syntax() {
    let schema = json_schema();
    assert_eq!(schema["title"], "fairgate policy");
    assert_eq!(schema["required"], serde_json::json!(["version"]));
    assert_eq!(schema["additionalProperties"], false);
    let defs = schema["$defs"].as_object().expect("$defs");
    for def in [
        "Rule",
        "Condition",
        "StringMatch",
        "Action",
        "Bandwidth",
        "ShedLimit",
        "Rate",
    ] {
        assert!(defs.contains_key(def), "missing $defs/{def}");
    }
    // One-or-list fields accept both shapes.
    let ip = &defs["Condition"]["properties"]["ip"];
    assert!(ip.to_string().contains("array"), "{ip}");
    // A string matcher is a string or a mapping with exactly one kind.
    let sm = defs["StringMatch"].to_string();
    assert!(sm.contains("\"oneOf\"") && sm.contains("\"regex\""), "{sm}");
    // The schema is stable JSON (what `fairgate schema` prints).
    let text = serde_json::to_string_pretty(&schema).unwrap();
    assert!(text.len() > 2000);
}
