//! The engine against an independent textbook GCRA (u128 arithmetic): SCENARIOS O2 and
//! property tests.

mod common;

use common::*;
use proptest::prelude::*;

/// Textbook GCRA, written independently of `fairgate_middleware::gcra`.
struct Model {
    t: u128,
    tau: u128,
    tat: u128,
}

impl Model {
    fn new(count: u128, period_ns: u128, burst: u128) -> Model {
        let t = period_ns / count;
        Model {
            t,
            tau: burst * t,
            tat: 0,
        }
    }

    fn arrive(&mut self, now: u128, cost: u128) -> bool {
        let tat = self.tat.max(now);
        let new_tat = tat + cost * self.t;
        if new_tat - now <= self.tau {
            self.tat = new_tat;
            true
        } else {
            false
        }
    }
}

fn policy(count: u64, period: &str, burst: u64) -> String {
    format!(
        "version: 1
plans:
  p:
    bandwidths: ['{count}/{period} burst {burst}']
default_plan: p
"
    )
}

#[test]
fn o2_5000_arrivals_over_10_virtual_seconds_match_the_model_exactly() {
    let (e, clock, _) = engine(&policy(100, "s", 20));
    let start = 1000 * S;
    let mut model = Model::new(100, S as u128, 20);
    let r = Req::from("192.0.2.1");
    let mut admitted = 0;
    let mut model_admitted = 0;
    // 5,000 arrivals, every 2 ms, with a 0.7 ms phase offset.
    for i in 0..5000u64 {
        let at = start + 700_000 + i * 2_000_000;
        clock.set(at);
        let ours = admit(&e, &r);
        let theirs = model.arrive(at as u128, 1);
        assert_eq!(ours, theirs, "arrival {i}");
        admitted += usize::from(ours);
        model_admitted += usize::from(theirs);
    }
    assert_eq!(admitted, model_admitted);
    // The arrivals span 9.998 s: burst + floor(9.998 s × 100/s) = 20 + 999.
    assert_eq!(admitted, 1019);
    // After 10 s idle the burst is back to exactly 20, not more.
    clock.advance(std::time::Duration::from_secs(10));
    assert_eq!(admit_n(&e, &r, 100), 20);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// For one key and any arrival sequence: the engine admits exactly what the model
    /// admits, and admitted cost in any window ≤ rate × window + burst.
    #[test]
    fn engine_matches_the_textbook_model(
        count in 1u64..50,
        period_ms in prop::sample::select(vec![1000u64, 60_000]),
        burst in 1u64..30,
        gaps in prop::collection::vec(0u64..200_000_000, 1..200),
    ) {
        let period = if period_ms == 1000 { "s" } else { "min" };
        let (e, clock, _) = engine(&policy(count, period, burst));
        let mut model = Model::new(u128::from(count), u128::from(period_ms) * 1_000_000, u128::from(burst));
        let r = Req::from("192.0.2.1");
        let mut now = 1000 * S;
        let mut admitted_at = Vec::new();
        for gap in gaps {
            now += gap;
            clock.set(now);
            let ours = admit(&e, &r);
            prop_assert_eq!(ours, model.arrive(u128::from(now), 1));
            if ours {
                admitted_at.push(now);
            }
        }
        // Any window [admitted_at[i], admitted_at[j]]: j − i + 1 ≤ rate × len + burst.
        let period_ns = period_ms as f64 * 1e6;
        for i in 0..admitted_at.len() {
            for j in i..admitted_at.len() {
                let len = (admitted_at[j] - admitted_at[i]) as f64;
                let allowed = count as f64 * len / period_ns + burst as f64;
                prop_assert!((j - i + 1) as f64 <= allowed + 1e-9);
            }
        }
    }

    /// The pure GCRA with random costs agrees with the model.
    #[test]
    fn gcra_with_costs_matches_the_model(
        count in 1u64..1000,
        burst in 1u64..100,
        steps in prop::collection::vec((0u64..50_000_000, 0u64..20), 1..300),
    ) {
        use fairgate_middleware::gcra::{check, Params, Verdict};
        let p = Params::new(count, S, burst).unwrap();
        let mut model = Model::new(u128::from(count), u128::from(S), u128::from(burst));
        let mut tat = 0u64;
        let mut now = 1000 * S;
        for (gap, cost) in steps {
            now += gap;
            let ours = match check(tat, now, p, cost) {
                Verdict::Admit { tat: t } => { tat = t; true }
                Verdict::Reject { wait } => {
                    // After waiting exactly `wait`, it fits (unless cost > burst).
                    if cost <= burst {
                        let fits = matches!(check(tat, now + wait, p, cost), Verdict::Admit { .. });
                        prop_assert!(fits, "fits after wait");
                        let early = wait == 0 || matches!(check(tat, now + wait - 1, p, cost), Verdict::Reject { .. });
                        prop_assert!(early, "not before");
                    }
                    false
                }
            };
            prop_assert_eq!(ours, model.arrive(u128::from(now), u128::from(cost)));
        }
    }
}
