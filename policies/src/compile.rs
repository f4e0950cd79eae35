//! Compiling a validated [`Policy`] into the immutable [`CompiledPolicy`] the engine matches
//! against: names resolved to indices, bandwidths turned into GCRA parameters with stable
//! ids, conditions turned into [`RuleSet`]s, and the content hash computed.
//!
//! Input is expected to be validated by [`crate::decode`] (which reports problems with file
//! positions). Compiling never panics on what slips through: anything still wrong (an
//! unknown plan, a regex set over the size limit, overflowing bucket parameters) comes back
//! as unlocated [`PolicyErrors`] with the path of the offending field. Conditions are
//! compiled first (nesting is capped at [`MAX_CONDITION_DEPTH`](crate::matcher::MAX_CONDITION_DEPTH));
//! when they fail, only their errors are reported.
//!
//! A 10,000-rule policy (5,000 user-agent regexes, 4,000 path prefixes, 1,000 CIDRs)
//! compiles in about 0.1–0.15 s (`compile` group of the `policy` bench).
//!
//! Bandwidth ids (state is carried across reloads by id):
//! - plan bandwidth: `plan:<plan>/<name>` when named, else `plan:<plan>/<index>`;
//! - client override bandwidth: `client:<key>/<name>` or `client:<key>/<index>`;
//! - `limit` rule: `rule:<rule name>`.
//!
//! Bandwidth names (for `RateLimit-Policy` and metrics): the given `name`, else
//! `<plan>-<index>` for plans, `client-<index>` for overrides (the client key stays out of
//! headers and metric labels), the rule name for `limit` rules.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::compiled::{
    ClientQuota, CompiledAction, CompiledAlerts, CompiledBandwidth, CompiledGrowth,
    CompiledIdentify, CompiledOperation, CompiledPlan, CompiledPolicy, CompiledRule, PlanId,
    PolicyHash,
};
use crate::error::{PolicyError, PolicyErrors};
use crate::matcher::{IpSet, MatcherError, RuleSet};
use crate::model::{Action, Backend, Bandwidth, ClientOverride, Condition, KeyExtractor, Policy};

/// File name used in errors by [`compile`], which is not told the real one.
const UNNAMED: &str = "policy";

/// Compiles a policy without an overrides file.
pub fn compile(policy: Policy) -> Result<CompiledPolicy, PolicyErrors> {
    compile_with_overrides(policy, BTreeMap::new(), UNNAMED)
}

/// Compiles a policy together with the entries of its overrides file, which replace inline
/// `clients` entries with the same key. `file` names the policy file in errors.
pub fn compile_with_overrides(
    policy: Policy,
    overrides: BTreeMap<String, ClientOverride>,
    file: &str,
) -> Result<CompiledPolicy, PolicyErrors> {
    let mut cx = Cx {
        file,
        errors: PolicyErrors::default(),
    };

    // Conditions first: this also bounds their nesting, which the recursive serialiser
    // behind the hash relies on.
    let rule_set = RuleSet::new(policy.rules.iter().map(|r| r.when.as_ref()))
        .map_err(|e| cx.matcher("rules", |i| format!("rules[{i}].when"), e));
    let operation_conditions: Vec<Condition> = policy
        .operations
        .iter()
        .map(|op| match &op.when {
            Some(c) => c.clone(),
            // No `when`: only requests the adapter routed to this operation by name.
            None => Condition {
                operation: Some(vec![op.name.clone()]),
                ..Condition::default()
            },
        })
        .collect();
    let operation_set = RuleSet::new(operation_conditions.iter().map(Some))
        .map_err(|e| cx.matcher("operations", |i| format!("operations[{i}].when"), e));
    let (rule_set, operation_set) = match (rule_set, operation_set) {
        (Ok(r), Ok(o)) => (r, o),
        _ => return Err(cx.errors),
    };

    let hash = match policy_hash(&policy, &overrides) {
        Ok(h) => h,
        Err(e) => {
            cx.error("", format!("cannot serialise the policy to hash it: {e}"));
            return Err(cx.errors);
        }
    };

    // Plans, in name order.
    let mut plans = Vec::with_capacity(policy.plans.len());
    let mut plan_index: HashMap<Arc<str>, PlanId> = HashMap::with_capacity(policy.plans.len());
    for (name, plan) in &policy.plans {
        let name: Arc<str> = Arc::from(name.as_str());
        let bandwidths = cx.bandwidths(
            &plan.bandwidths,
            &format!("plans.{name}.bandwidths"),
            &format!("plan:{name}/"),
            &format!("{name}-"),
        );
        plan_index.insert(name.clone(), plans.len());
        plans.push(CompiledPlan {
            name,
            bandwidths,
            concurrency: plan.concurrency,
            fixed: plan.fixed,
            alerts: plan
                .alerts
                .as_ref()
                .map(|a| Arc::new(CompiledAlerts::new(a))),
            growth: plan
                .growth
                .as_ref()
                .map(|g| Arc::new(CompiledGrowth::new(g))),
        });
    }
    let resolve = |cx: &mut Cx<'_>, name: &str, path: &str| -> Option<PlanId> {
        let found = plan_index.get(name).copied();
        if found.is_none() {
            cx.error(path, format!("plan `{name}` is not defined under `plans`"));
        }
        found
    };
    let default_plan = policy
        .default_plan
        .as_deref()
        .and_then(|p| resolve(&mut cx, p, "default_plan"));

    // Rules.
    let mut rules = Vec::with_capacity(policy.rules.len());
    for (i, rule) in policy.rules.iter().enumerate() {
        let name: Arc<str> = Arc::from(rule.name.as_str());
        let action = match &rule.action {
            Action::Deny(d) => CompiledAction::Deny {
                status: d.status.unwrap_or(policy.responses.deny_status),
            },
            Action::Allow => CompiledAction::Allow,
            Action::Limit(l) => {
                let burst = l.burst.unwrap_or(l.rate.count());
                let id: Arc<str> = Arc::from(format!("rule:{}", rule.name));
                match CompiledBandwidth::new(id, name.clone(), l.rate, burst) {
                    Some(bandwidth) => CompiledAction::Limit {
                        bandwidth,
                        key: l.key.clone(),
                        estimator: l.estimator,
                    },
                    None => {
                        cx.bad_bandwidth(&format!("rules[{i}].action.limit"));
                        CompiledAction::Allow
                    }
                }
            }
            Action::Tag(t) => CompiledAction::Tag {
                priority: t.priority,
                plan: t
                    .plan
                    .as_deref()
                    .and_then(|p| resolve(&mut cx, p, &format!("rules[{i}].action.tag.plan"))),
            },
        };
        rules.push(CompiledRule {
            name,
            mode: rule.mode,
            action,
        });
    }

    // Operations.
    let mut operation_index = HashMap::with_capacity(policy.operations.len());
    let operations: Vec<CompiledOperation> = policy
        .operations
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let name: Arc<str> = Arc::from(op.name.as_str());
            operation_index.entry(name.clone()).or_insert(i);
            CompiledOperation {
                name,
                cost: op.cost,
                post_hoc: op.post_hoc.clone(),
            }
        })
        .collect();

    // Clients: inline entries, then the overrides file's, which win.
    let mut clients = HashMap::with_capacity(policy.clients.len() + overrides.len());
    let inline = policy.clients.iter().map(|(k, o)| (k, o, "clients"));
    let from_file = overrides.iter().map(|(k, o)| (k, o, "overrides"));
    for (key, o, section) in inline.chain(from_file) {
        let path = format!("{section}.{key}");
        let plan = o
            .plan
            .as_deref()
            .and_then(|p| resolve(&mut cx, p, &format!("{path}.plan")));
        let bandwidths = o.bandwidths.as_ref().map(|b| {
            cx.bandwidths(
                b,
                &format!("{path}.bandwidths"),
                &format!("client:{key}/"),
                "client-",
            )
        });
        clients.insert(
            Arc::from(key.as_str()),
            ClientQuota {
                plan,
                bandwidths,
                concurrency: o.concurrency,
                expires_at: o.expires.map(|t| t.to_system_time()),
                fixed: o.fixed,
                alerts: o.alerts.as_ref().map(|a| Arc::new(CompiledAlerts::new(a))),
                growth: o.growth.as_ref().map(|g| Arc::new(CompiledGrowth::new(g))),
            },
        );
    }

    // A grown quota must survive a restart: it lives in Redis or in the growth file.
    let grows = policy.plans.values().any(|p| p.growth.is_some())
        || policy
            .clients
            .values()
            .chain(overrides.values())
            .any(|o| o.growth.is_some());
    if policy.state.backend == Backend::Redis && policy.state.growth_file.is_some() {
        cx.error(
            "state.growth_file",
            "`growth_file` is for `backend: local`: with `backend: redis` clients' growth is \
             kept in Redis, for the fleet"
                .to_owned(),
        );
    }
    if grows && policy.state.backend == Backend::Local && policy.state.growth_file.is_none() {
        cx.error(
            "state",
            "`growth` needs `state.growth_file` (or `backend: redis`): the file a grown quota is \
             kept in, so that it survives a restart"
                .to_owned(),
        );
    }

    let identify = CompiledIdentify {
        trusted_proxies: IpSet::new(policy.identify.trusted_proxies.iter().copied()),
        ipv4_prefix: policy.identify.ipv4_prefix.min(32),
        ipv6_prefix: policy.identify.ipv6_prefix.min(128),
        client_key: policy
            .identify
            .client_key
            .iter()
            .map(|k| match k {
                KeyExtractor::Header(h) => KeyExtractor::Header(h.to_ascii_lowercase()),
                other => other.clone(),
            })
            .collect(),
        max_key_length: usize::try_from(policy.identify.max_key_length).unwrap_or(usize::MAX),
    };

    if !cx.errors.is_empty() {
        return Err(cx.errors);
    }
    Ok(CompiledPolicy {
        version: 0,
        hash,
        identify,
        rules: rules.into(),
        rule_set,
        plans: plans.into(),
        plan_index,
        default_plan,
        operations: operations.into(),
        operation_index,
        operation_set,
        clients,
        caps: Arc::default(),
        burst_sharing: policy
            .burst_sharing
            .enabled
            .then_some(policy.burst_sharing.below_utilization),
        shedding: policy.shedding.clone(),
        responses: policy.responses.clone(),
        state: policy.state.clone(),
        source: Arc::new(policy),
    })
}

/// SHA-256 of the policy's JSON form, followed (only when there are any) by a separator and
/// the overrides' JSON form. A policy without overrides hashes as its JSON alone.
pub fn policy_hash(
    policy: &Policy,
    overrides: &BTreeMap<String, ClientOverride>,
) -> Result<PolicyHash, serde_json::Error> {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(policy)?);
    if !overrides.is_empty() {
        h.update(b"\n--- overrides ---\n");
        h.update(serde_json::to_vec(overrides)?);
    }
    Ok(PolicyHash(h.finalize().into()))
}

/// Error collection with the file name.
struct Cx<'a> {
    file: &'a str,
    errors: PolicyErrors,
}

impl Cx<'_> {
    fn error(&mut self, path: &str, message: String) {
        self.errors.push(PolicyError {
            file: self.file.to_owned(),
            line: 0,
            column: 0,
            path: path.to_owned(),
            message,
        });
    }

    fn bad_bandwidth(&mut self, path: &str) {
        self.error(
            path,
            "rate and burst give a bucket that cannot be represented (emission interval \
             rounds to 0 ns, burst is 0, or burst × interval overflows)"
                .to_owned(),
        );
    }

    /// Reports a matcher error under `section`, with `prefix(i)` the path of condition `i`.
    fn matcher(&mut self, section: &str, prefix: impl Fn(usize) -> String, e: MatcherError) {
        match e {
            MatcherError::Pattern {
                condition,
                path,
                message,
            } => self.error(&join(&prefix(condition), &path), message),
            MatcherError::TooDeep {
                condition,
                path,
                max,
            } => self.error(
                &join(&prefix(condition), &path),
                format!("conditions nest deeper than {max} levels"),
            ),
            MatcherError::Set { field, message } => {
                self.error(section, format!("`{field}` patterns: {message}"))
            }
            MatcherError::TooLarge => self.error(section, e.to_string()),
        }
    }

    fn bandwidths(
        &mut self,
        list: &[Bandwidth],
        path: &str,
        id_prefix: &str,
        name_prefix: &str,
    ) -> Arc<[CompiledBandwidth]> {
        let mut out = Vec::with_capacity(list.len());
        for (i, b) in list.iter().enumerate() {
            let suffix = b.name.clone().unwrap_or_else(|| i.to_string());
            let name: Arc<str> = match &b.name {
                Some(n) => Arc::from(n.as_str()),
                None => Arc::from(format!("{name_prefix}{i}")),
            };
            if let Some(p) = &b.period {
                // The unit is part of the id: a day's count is not a month's, and a GCRA
                // bucket's TAT is not a count.
                let id: Arc<str> = Arc::from(format!("{id_prefix}{suffix}@{}", p.unit.as_str()));
                let period = crate::period::CompiledPeriod::new(p.unit, p.time_zone.as_deref());
                match period.ok().and_then(|period| {
                    CompiledBandwidth::per_period(id, name, b.rate.count(), period)
                }) {
                    Some(c) => out.push(c),
                    None => self.bad_bandwidth(&format!("{path}[{i}]")),
                }
                continue;
            }
            let id: Arc<str> = Arc::from(format!("{id_prefix}{suffix}"));
            match CompiledBandwidth::new(id, name, b.rate, b.burst.unwrap_or(b.rate.count())) {
                Some(c) => out.push(c),
                None => self.bad_bandwidth(&format!("{path}[{i}]")),
            }
        }
        out.into()
    }
}

fn join(prefix: &str, rest: &str) -> String {
    if rest.is_empty() {
        prefix.to_owned()
    } else {
        format!("{prefix}.{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compiled::{CompiledAction, RequestView};
    use crate::decode::{parse_overrides, parse_policy};
    use crate::model::{Plan, Rule, TagAction};

    const POLICY: &str = r#"
version: 1
identify:
  trusted_proxies: [10.0.0.0/8]
  client_key: [{header: X-Api-Key}]
rules:
  - name: block-bots
    when: {user_agent: {regex: ["(?i)badbot"]}}
    action: deny
  - name: teapot
    when: {path: /teapot}
    action: {deny: {status: 418}}
  - name: login
    when: {method: POST, path: /login}
    action: {limit: {rate: 5/min, key: ip}}
  - name: partners
    when: {headers: [{name: x-partner, present: true}]}
    action: {tag: {plan: pro, priority: critical}}
plans:
  free:
    bandwidths: ["10/s burst 20", "100000/day"]
    concurrency: 4
  pro:
    bandwidths: [{rate: 100/s, name: fast}]
default_plan: free
operations:
  - {name: export, when: {path: {prefix: /export/}}, cost: 5}
  - {name: bulk, cost: 2}
clients:
  key-a: {plan: pro}
  key-b: {bandwidths: ["50/s"], concurrency: 2}
"#;

    fn policy() -> Policy {
        parse_policy(POLICY, "p.yaml").unwrap()
    }

    #[test]
    fn plans_and_bandwidths_resolve_with_stable_ids() {
        let c = compile(policy()).unwrap();
        assert_eq!(c.version, 0);
        assert_eq!(c.plans.len(), 2);
        let free = c.plan("free").unwrap();
        assert_eq!(c.default_plan, Some(c.plan_index["free"]));
        assert_eq!(free.concurrency, Some(4));
        let ids: Vec<&str> = free.bandwidths.iter().map(|b| &*b.id).collect();
        assert_eq!(ids, ["plan:free/0", "plan:free/1"]);
        let names: Vec<&str> = free.bandwidths.iter().map(|b| &*b.name).collect();
        assert_eq!(names, ["free-0", "free-1"]);
        // 10/s burst 20: T = 100 ms, C = 2 s.
        assert_eq!(free.bandwidths[0].t_ns, 100_000_000);
        assert_eq!(free.bandwidths[0].burst, 20);
        assert_eq!(free.bandwidths[0].c_ns, 2_000_000_000);
        // Default burst = the rate's count.
        assert_eq!(free.bandwidths[1].burst, 100_000);
        let pro = c.plan("pro").unwrap();
        assert_eq!(&*pro.bandwidths[0].id, "plan:pro/fast");
        assert_eq!(&*pro.bandwidths[0].name, "fast");
    }

    #[test]
    fn rules_actions_and_clients_compile() {
        let c = compile(policy()).unwrap();
        assert!(matches!(
            c.rules[0].action,
            CompiledAction::Deny { status: 403 }
        ));
        assert!(matches!(
            c.rules[1].action,
            CompiledAction::Deny { status: 418 }
        ));
        match &c.rules[2].action {
            CompiledAction::Limit { bandwidth, .. } => {
                assert_eq!(&*bandwidth.id, "rule:login");
                assert_eq!(&*bandwidth.name, "login");
                assert_eq!(bandwidth.burst, 5);
                assert_eq!(bandwidth.t_ns, 12_000_000_000);
            }
            other => panic!("{other:?}"),
        }
        match &c.rules[3].action {
            CompiledAction::Tag { plan, priority } => {
                assert_eq!(*plan, Some(c.plan_index["pro"]));
                assert_eq!(*priority, Some(crate::model::Priority::Critical));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.clients["key-a"].plan, Some(c.plan_index["pro"]));
        let b = c.clients["key-b"].bandwidths.as_ref().unwrap();
        assert_eq!(&*b[0].id, "client:key-b/0");
        assert_eq!(&*b[0].name, "client-0");
        assert_eq!(b[0].burst, 50);
        assert_eq!(c.clients["key-b"].concurrency, Some(2));
        assert!(matches!(&c.identify.client_key[0], KeyExtractor::Header(h) if h == "x-api-key"));
        assert!(c
            .identify
            .trusted_proxies
            .contains("10.1.1.1".parse().unwrap()));
        assert_eq!(c.bandwidths().count(), 2 + 1 + 1 + 1);
    }

    #[test]
    fn operations_without_when_match_only_by_name() {
        let c = compile(policy()).unwrap();
        assert_eq!(c.operation_index["bulk"], 1);
        let view = |path: &'static str, op: Option<&'static str>| RequestView {
            ip: "192.0.2.1".parse().unwrap(),
            method: "GET",
            host: "",
            path,
            user_agent: "",
            operation: op,
            headers: &(),
        };
        assert_eq!(
            c.operation_set.first_match(&view("/export/x", None), 0),
            Some(0)
        );
        assert_eq!(c.operation_set.first_match(&view("/other", None), 0), None);
        assert_eq!(
            c.operation_set
                .first_match(&view("/other", Some("bulk")), 0),
            Some(1)
        );
        assert_eq!(c.rule_set.first_match(&view("/teapot", None), 0), Some(1));
    }

    #[test]
    fn overrides_file_entries_win() {
        let overrides =
            parse_overrides("key-a: {concurrency: 9}\nkey-c: {plan: free}\n", "o.yaml").unwrap();
        let c = compile_with_overrides(policy(), overrides, "p.yaml").unwrap();
        assert_eq!(c.clients["key-a"].plan, None);
        assert_eq!(c.clients["key-a"].concurrency, Some(9));
        assert_eq!(c.clients["key-c"].plan, Some(c.plan_index["free"]));
        assert!(c.clients.contains_key("key-b"));
    }

    #[test]
    fn a_lapsed_override_counts_as_none() {
        let overrides = parse_overrides(
            "past: {plan: free, expires: '2001-01-01T00:00:00Z'}\n\
             future: {plan: free, expires: '2999-01-01T00:00:00Z'}\n\
             forever: {plan: free}\n",
            "o.yaml",
        )
        .unwrap();
        let c = compile_with_overrides(policy(), overrides, "p.yaml").unwrap();
        assert!(c.client("past").is_none(), "lapsed");
        assert!(c.client("future").is_some());
        assert!(c.client("forever").is_some());
        assert!(c.client("nobody").is_none());
        let e = parse_overrides("k: {expires: '2999-01-01T00:00:00Z'}\n", "o.yaml").unwrap_err();
        assert!(e.to_string().contains("override sets nothing"), "{e}");
        let e = parse_overrides("k: {plan: free, expires: tomorrow}\n", "o.yaml").unwrap_err();
        assert!(e.to_string().contains("o.yaml:1:"), "positioned: {e}");
    }

    #[test]
    fn hash_follows_content_not_formatting() {
        let a = compile(policy()).unwrap().hash;
        // The same policy written differently: long forms, block style, defaults spelled out.
        let rewritten = POLICY
            .replace("action: deny", "action: {deny: {}}")
            .replace(
                "when: {path: /teapot}",
                "when:\n      path: {exact: [/teapot], ignore_case: false}",
            )
            .replace("{rate: 5/min, key: ip}", "{rate: 5/min}");
        let b = compile(parse_policy(&rewritten, "x").unwrap())
            .unwrap()
            .hash;
        assert_eq!(a, b);
        let mut changed = policy();
        changed.rules[1].name = "teapot2".into();
        assert_ne!(compile(changed).unwrap().hash, a);
        // No overrides: the hash is SHA-256 of the JSON form.
        let json = serde_json::to_vec(&policy()).unwrap();
        assert_eq!(a.0, <[u8; 32]>::from(Sha256::digest(&json)));
        let with = compile_with_overrides(
            policy(),
            parse_overrides("key-z: {concurrency: 1}", "o").unwrap(),
            "p",
        )
        .unwrap();
        assert_ne!(with.hash, a);
        assert_eq!(a.to_hex().len(), 64);
    }

    #[test]
    fn leftover_problems_are_reported_not_panicked() {
        let mut p = policy();
        p.default_plan = Some("gold".into());
        p.rules.push(Rule {
            name: "bad".into(),
            mode: Default::default(),
            when: Some(Condition {
                user_agent: Some(StringMatchBuilder::regex("(oops")),
                ..Default::default()
            }),
            action: Action::Tag(TagAction {
                priority: None,
                plan: Some("silver".into()),
            }),
        });
        p.plans.insert(
            "tiny".into(),
            Plan {
                bandwidths: vec![Bandwidth {
                    rate: "1/s".parse().unwrap(),
                    burst: Some(u64::MAX),
                    name: None,
                    period: None,
                }],
                concurrency: None,
                fixed: false,
                alerts: None,
                growth: None,
            },
        );
        let errs = compile(p).unwrap_err();
        let text = errs.to_string();
        assert!(
            text.contains("policy: rules[4].when.user_agent.regex[0]: invalid pattern `(oops`"),
            "{text}"
        );
        // Condition errors stop compilation before names are resolved.
        assert_eq!(errs.len(), 1, "{text}");

        let mut p = policy();
        p.default_plan = Some("gold".into());
        p.plans.insert(
            "tiny".into(),
            Plan {
                bandwidths: vec![Bandwidth {
                    rate: "1/s".parse().unwrap(),
                    burst: Some(u64::MAX),
                    name: None,
                    period: None,
                }],
                concurrency: None,
                fixed: false,
                alerts: None,
                growth: None,
            },
        );
        let text = compile(p).unwrap_err().to_string();
        assert!(
            text.contains("policy: default_plan: plan `gold` is not defined under `plans`"),
            "{text}"
        );
        assert!(
            text.contains("policy: plans.tiny.bandwidths[0]: rate and burst"),
            "{text}"
        );
    }

    struct StringMatchBuilder;
    impl StringMatchBuilder {
        fn regex(p: &str) -> crate::model::StringMatch {
            crate::model::StringMatch {
                kind: crate::model::MatchKind::Regex,
                patterns: vec![p.into()],
                ignore_case: false,
            }
        }
    }
}
