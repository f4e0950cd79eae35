//! The one-screen summary `fairgate check` prints for a valid policy.
//!
//! Counts rules by action and mode, lists plans with their bandwidths, operations with their
//! cost, and the shedding, response and state settings — enough to see at a glance that the
//! file says what its author meant. Long lists (plans, operations) are cut after
//! [`MAX_LISTED`] entries so the output stays on one screen even for huge policies.
//!
//! ```
//! let policy = fairgate_policies::decode::parse_policy(
//!     "version: 1\nrules: [{name: b, action: deny}]\nplans: {free: {bandwidths: [10/s burst 20]}}\n",
//!     "p.yaml",
//! ).unwrap();
//! let text = fairgate_policies::summary::summary(&policy);
//! assert!(text.contains("rules: 1 (deny 1; enforce 1)"));
//! assert!(text.contains("  free: 10/s burst 20"));
//! ```

use std::fmt::Write;

use crate::model::{
    Action, AdaptiveAlgorithm, Backend, Bandwidth, Estimator, FleetMode, HeaderMode, KeyExtractor,
    Mode, OnFailure, Policy, PostHoc, ShedLimit,
};

/// Plans and operations listed before "… and N more".
pub const MAX_LISTED: usize = 20;

/// Renders the summary, one fact per line, ending with a newline.
pub fn summary(policy: &Policy) -> String {
    let mut out = String::new();
    // Writing into a `String` cannot fail.
    let _ = write_summary(&mut out, policy);
    out
}

fn write_summary(out: &mut String, p: &Policy) -> std::fmt::Result {
    writeln!(out, "policy version {}", p.version)?;

    let id = &p.identify;
    let keys: Vec<String> = id
        .client_key
        .iter()
        .map(|k| match k {
            KeyExtractor::Header(h) => format!("header {h}"),
            KeyExtractor::Query(q) => format!("query {q}"),
            KeyExtractor::Bearer => "bearer token".to_owned(),
        })
        .collect();
    writeln!(
        out,
        "identify: client key from {}; {} trusted prox{}; ipv4 /{}, ipv6 /{}",
        if keys.is_empty() {
            "the client ip".to_owned()
        } else {
            format!("{}, else the client ip", keys.join(", "))
        },
        id.trusted_proxies.len(),
        if id.trusted_proxies.len() == 1 {
            "y"
        } else {
            "ies"
        },
        id.ipv4_prefix,
        id.ipv6_prefix,
    )?;

    let mut actions = [0usize; 4];
    let mut shadow = 0;
    for r in &p.rules {
        let i = match r.action {
            Action::Deny(_) => 0,
            Action::Allow => 1,
            Action::Limit(_) => 2,
            Action::Tag(_) => 3,
        };
        actions[i] += 1;
        if r.mode == Mode::Shadow {
            shadow += 1;
        }
    }
    let by_action: Vec<String> = ["deny", "allow", "limit", "tag"]
        .iter()
        .zip(actions)
        .filter(|(_, n)| *n > 0)
        .map(|(a, n)| format!("{a} {n}"))
        .collect();
    if p.rules.is_empty() {
        writeln!(out, "rules: none")?;
    } else {
        let mut modes = vec![format!("enforce {}", p.rules.len() - shadow)];
        if shadow > 0 {
            modes.push(format!("shadow {shadow}"));
        }
        writeln!(
            out,
            "rules: {} ({}; {})",
            p.rules.len(),
            by_action.join(", "),
            modes.join(", ")
        )?;
    }

    match &p.default_plan {
        Some(d) => writeln!(out, "plans: {} (default {d})", p.plans.len())?,
        None if p.plans.is_empty() => writeln!(out, "plans: none")?,
        None => writeln!(out, "plans: {} (no default plan)", p.plans.len())?,
    }
    for (name, plan) in p.plans.iter().take(MAX_LISTED) {
        let mut parts: Vec<String> = plan.bandwidths.iter().map(bandwidth).collect();
        if let Some(c) = plan.concurrency {
            parts.push(format!("concurrency {c}"));
        }
        if parts.is_empty() {
            parts.push("no limits".to_owned());
        }
        if plan.fixed {
            parts.push("fixed (never borrowed past)".to_owned());
        }
        if let Some(g) = &plan.growth {
            parts.push(format!(
                "grows ×{} when usage ≥ {} over {}, up to ×{}",
                1.0 + g.step,
                g.threshold,
                g.window,
                g.max_factor
            ));
        }
        writeln!(out, "  {name}: {}", parts.join(", "))?;
    }
    more(out, p.plans.len())?;

    if p.operations.is_empty() {
        writeln!(out, "operations: none (every request costs 1)")?;
    } else {
        writeln!(out, "operations: {}", p.operations.len())?;
    }
    for op in p.operations.iter().take(MAX_LISTED) {
        let post = match &op.post_hoc {
            None => String::new(),
            Some(PostHoc::Bytes(b)) => format!(", then 1 per {b} of response"),
            Some(PostHoc::Duration(d)) => format!(", then 1 per {d} of latency"),
        };
        writeln!(out, "  {}: cost {}{post}", op.name, op.cost)?;
    }
    more(out, p.operations.len())?;

    let file = match &p.overrides_file {
        Some(f) => format!(", more in {f}"),
        None => String::new(),
    };
    writeln!(out, "clients: {} inline override(s){file}", p.clients.len())?;

    if p.burst_sharing.enabled {
        writeln!(
            out,
            "burst sharing: on while utilisation is below {}",
            p.burst_sharing.below_utilization
        )?;
    } else {
        writeln!(out, "burst sharing: off")?;
    }

    if let Some(u) = &p.usage_endpoint {
        let caps = match (&u.caps_file, u.self_caps) {
            (Some(f), true) => format!(
                ", clients set their own caps (in {f}, at most {})",
                u.max_caps
            ),
            (Some(f), false) => format!(", reading only (caps in {f} enforced)"),
            (None, _) => ", reading only".to_owned(),
        };
        writeln!(out, "usage endpoint: {}{caps}", u.path)?;
    }

    match &p.shedding {
        None => writeln!(out, "shedding: off")?,
        Some(s) => {
            let limit = match &s.limit {
                ShedLimit::Static(n) => format!("static limit {n}"),
                ShedLimit::Adaptive(a) => format!(
                    "adaptive limit ({}, {}..{}{})",
                    match a.algorithm {
                        AdaptiveAlgorithm::Gradient => "gradient",
                        AdaptiveAlgorithm::Aimd => "aimd",
                    },
                    a.min,
                    a.max,
                    a.target_latency
                        .map(|t| format!(", target {t}"))
                        .unwrap_or_default()
                ),
            };
            let t = &s.thresholds;
            let delay = match &s.reject_delay {
                Some(d) => format!(
                    "; rejections delayed up to {} ({} at once)",
                    d.max, d.max_waiting
                ),
                None => String::new(),
            };
            writeln!(
                out,
                "shedding: {limit}; thresholds critical {}, normal {}, borrowed {}, sheddable {}{delay}",
                t.critical, t.normal, t.borrowed, t.sheddable
            )?;
        }
    }

    let r = &p.responses;
    writeln!(
        out,
        "responses: quota {}, shed {}, deny {}; RateLimit headers {}; shed Retry-After {}; {}",
        r.quota_status,
        r.shed_status,
        r.deny_status,
        match r.ratelimit_headers {
            HeaderMode::Never => "never",
            HeaderMode::OnReject => "on reject",
            HeaderMode::Always => "always",
        },
        r.shed_retry_after,
        if r.retry_stagger.0.is_zero() {
            "retries not staggered".to_owned()
        } else {
            format!("retries staggered up to {}", r.retry_stagger)
        }
    )?;
    write_state(out, p)
}

/// The state backend as the gateway will run it: local, or Redis with its target, mode,
/// budget and `on_failure`, and where `limit` rules keep their counts.
fn write_state(out: &mut String, p: &Policy) -> std::fmt::Result {
    let redis = p
        .state
        .redis
        .as_ref()
        .filter(|_| p.state.backend == Backend::Redis);
    let Some(r) = redis else {
        return match &p.state.growth_file {
            Some(f) => writeln!(
                out,
                "state: local, at most {} keys, growth kept in {f}",
                p.state.max_keys
            ),
            None => writeln!(out, "state: local, at most {} keys", p.state.max_keys),
        };
    };
    let mode = match r.mode {
        FleetMode::Async => format!("async mode, exchange every {}", r.sync_interval),
        FleetMode::Exact => "exact mode".to_owned(),
    };
    let on_failure = match r.on_failure {
        OnFailure::Local => "local",
        OnFailure::Open => "open",
        OnFailure::Closed => "closed",
    };
    writeln!(
        out,
        "state: redis {} ({mode}, timeout {}, on_failure {on_failure}, key prefix {}), at most {} local keys",
        r.target_redacted(),
        r.timeout,
        r.key_prefix,
        p.state.max_keys
    )?;
    let (mut shared, mut local) = (0usize, 0usize);
    for rule in &p.rules {
        if let Action::Limit(l) = &rule.action {
            match l.estimator {
                Estimator::Exact => shared += 1,
                Estimator::Sketch => local += 1,
            }
        }
    }
    if shared + local > 0 {
        writeln!(
            out,
            "  limit rules: {shared} held in redis (estimator exact), {local} per gateway (estimator sketch)"
        )?;
    }
    Ok(())
}

fn bandwidth(b: &Bandwidth) -> String {
    let burst = b.burst.unwrap_or(b.rate.count());
    let name = b
        .name
        .as_deref()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    match &b.period {
        Some(p) => format!(
            "{} per calendar {} ({}){name}",
            b.rate.count(),
            p.unit.as_str(),
            p.time_zone.as_deref().unwrap_or("UTC")
        ),
        None => format!("{} burst {burst}{name}", b.rate),
    }
}

fn more(out: &mut String, total: usize) -> std::fmt::Result {
    if total > MAX_LISTED {
        writeln!(out, "  … and {} more", total - MAX_LISTED)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::parse_policy;

    #[test]
    fn summary_of_a_full_policy() {
        let p = parse_policy(
            r#"
version: 1
identify: {client_key: [{header: x-api-key}, bearer], trusted_proxies: [10.0.0.0/8]}
rules:
  - {name: a, action: deny}
  - {name: b, mode: shadow, action: {limit: {rate: 5/min}}}
  - {name: c, action: {tag: {priority: critical}}}
plans:
  free: {bandwidths: ["10/s burst 20", 100000/day], concurrency: 4}
  pro: {}
  metered: {bandwidths: [{quota: 5000, period: month, time_zone: Europe/Paris, name: monthly}]}
default_plan: free
operations: [{name: export, cost: 20, post_hoc: {bytes: 1MiB}}]
shedding: {limit: {adaptive: {algorithm: aimd, min: 8, max: 64, target_latency: 50ms}}, reject_delay: {max: 1s}}
"#,
            "p.yaml",
        )
        .unwrap();
        let s = summary(&p);
        assert_eq!(
            s,
            "policy version 1
identify: client key from header x-api-key, bearer token, else the client ip; 1 trusted proxy; ipv4 /32, ipv6 /64
rules: 3 (deny 1, limit 1, tag 1; enforce 2, shadow 1)
plans: 3 (default free)
  free: 10/s burst 20, 100000/day burst 100000, concurrency 4
  metered: 5000 per calendar month (Europe/Paris) (monthly)
  pro: no limits
operations: 1
  export: cost 20, then 1 per 1MiB of response
clients: 0 inline override(s)
burst sharing: off
shedding: adaptive limit (aimd, 8..64, target 50ms); thresholds critical 1, normal 0.9, borrowed 0.7, sheddable 0.5; rejections delayed up to 1s (1024 at once)
responses: quota 429, shed 503, deny 403; RateLimit headers on reject; shed Retry-After 1s; retries staggered up to 1min
state: local, at most 100000 keys
"
        );
    }

    #[test]
    fn long_lists_are_cut() {
        let plans: String = (0..25).map(|i| format!("  p{i:02}: {{}}\n")).collect();
        let p = parse_policy(&format!("version: 1\nplans:\n{plans}"), "p.yaml").unwrap();
        let s = summary(&p);
        assert!(s.contains("  p19: no limits\n  … and 5 more\n"), "{s}");
        assert!(!s.contains("p20"));
    }
}
