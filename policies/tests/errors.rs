//! One test per kind of policy error: each asserts the exact `file:line:column: path: message`.
//! Plus: every error of a file is reported at once, in file order.

use fairgate_policies::decode::{
    decode_policy_in, parse_overrides, parse_overrides_for, parse_policy, Ctx, Path,
};
use fairgate_policies::yaml::{self, Limits, NodeKind};

/// The formatted errors of `src` as `p.yaml`; panics if it parses.
fn errors(src: &str) -> Vec<String> {
    match parse_policy(src, "p.yaml") {
        Ok(p) => panic!("expected errors, got {p:#?}"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

/// Asserts `src` fails with exactly `expected` (one string per error).
#[track_caller]
fn fails(src: &str, expected: &[&str]) {
    assert_eq!(errors(src), expected, "source:\n{src}");
}

/// A rule whose `when` is `cond` (flow YAML), as a complete policy.
fn with_when(cond: &str) -> String {
    format!("version: 1\nrules:\n  - name: r\n    when: {cond}\n    action: deny\n")
}

// === syntax ===

#[test]
fn yaml_syntax_error_has_its_position() {
    fails(
        "version: 1\nrules:\n\t- name: x\n",
        &["p.yaml:3:2: invalid yaml: tabs disallowed within this context (block indentation)"],
    );
    fails(
        "version: 1\nrules: [a, b\n",
        &["p.yaml:3:1: invalid yaml: while parsing a flow sequence, expected ',' or ']'"],
    );
}

#[test]
fn more_than_one_document() {
    fails(
        "version: 1\n---\nversion: 1\n",
        &["p.yaml:2:1: more than one yaml document in the file (remove the second `---`)"],
    );
}

#[test]
fn anchors_and_aliases() {
    fails(
        "version: 1\nplans:\n  free: &f {concurrency: 1}\n  pro: *f\n",
        &["p.yaml:3:12: yaml anchors (`&name`) are not supported: write the value out"],
    );
}

#[test]
fn empty_file() {
    fails(
        "# nothing yet\n",
        &["p.yaml:1:1: the policy is empty (it needs at least `version: 1`)"],
    );
}

#[test]
fn top_level_must_be_a_mapping() {
    fails(
        "- version: 1\n",
        &["p.yaml:1:1: expected a mapping, found a list"],
    );
}

// === structure ===

#[test]
fn version_must_be_1() {
    fails(
        "version: 2\n",
        &["p.yaml:1:10: version: unsupported version 2 (only version 1 exists)"],
    );
    fails("rules: []\n", &["p.yaml:1:1: missing field `version`"]);
}

#[test]
fn unknown_field_with_did_you_mean() {
    fails(
        "version: 1\nrules:\n  - nmae: x\n    action: deny\n",
        &[
            "p.yaml:3:5: rules[0]: missing field `name`",
            "p.yaml:3:5: rules[0].nmae: unknown field `nmae` (did you mean `name`?)",
        ],
    );
    fails(
        "version: 1\nshedding: {limit: 10}\ncolour: red\n",
        &[
            "p.yaml:3:1: colour: unknown field `colour` (expected one of `version`, `identify`, \
           `rules`, `plans`, `default_plan`, `operations`, `clients`, `overrides_file`, \
           `burst_sharing`, `usage_endpoint`, `shedding`, `responses`, `state`)",
        ],
    );
    fails(
        &with_when("{user_agnet: curl}"),
        &["p.yaml:4:12: rules[0].when.user_agnet: unknown field `user_agnet` (did you mean `user_agent`?)"],
    );
}

#[test]
fn duplicate_yaml_keys() {
    fails(
        "version: 1\nstate: {max_keys: 10}\nstate: {max_keys: 20}\n",
        &["p.yaml:3:1: state: duplicate key `state` (first at line 2, column 1)"],
    );
}

#[test]
fn wrong_types() {
    fails(
        "version: 1\nplans:\n  free:\n    concurrency: lots\n",
        &["p.yaml:4:18: plans.free.concurrency: expected a whole number, found `lots`"],
    );
    fails(
        "version: 1\nburst_sharing: {enabled: yes}\n",
        &["p.yaml:2:26: burst_sharing.enabled: expected `true` or `false`, found `yes`"],
    );
    fails(
        "version: 1\nplans:\n  free:\n    concurrency: \"4\"\n",
        &["p.yaml:4:18: plans.free.concurrency: expected a whole number, found the string \"4\""],
    );
}

// === names and references ===

#[test]
fn duplicate_rule_names() {
    fails(
        "version: 1\nrules:\n  - {name: a, action: deny}\n  - {name: a, action: allow}\n",
        &["p.yaml:4:12: rules[1].name: duplicate rule name `a` (first at line 3, column 12)"],
    );
}

#[test]
fn duplicate_operation_names() {
    fails(
        "version: 1\noperations:\n  - {name: export, cost: 2}\n  - {name: export, cost: 3}\n",
        &["p.yaml:4:12: operations[1].name: duplicate operation name `export` (first at line 3, column 12)"],
    );
}

#[test]
fn unknown_plans_everywhere_they_are_referenced() {
    fails(
        "version: 1
plans:
  free: {concurrency: 1}
  pro: {concurrency: 10}
default_plan: fre
rules:
  - {name: up, action: {tag: {plan: gold}}}
clients:
  k1: {plan: Pro}
",
        &[
            "p.yaml:5:15: default_plan: unknown plan `fre` (did you mean `free`?)",
            "p.yaml:7:37: rules[0].action.tag.plan: unknown plan `gold` (defined plans: `free`, `pro`)",
            "p.yaml:9:14: clients.k1.plan: unknown plan `Pro` (did you mean `pro`?)",
        ],
    );
    fails(
        "version: 1\ndefault_plan: free\n",
        &["p.yaml:2:15: default_plan: unknown plan `free` (no plans are defined)"],
    );
}

#[test]
fn empty_names_and_client_keys() {
    fails(
        "version: 1\nrules: [{name: '', action: deny}]\nclients:\n  '': {concurrency: 1}\n",
        &[
            "p.yaml:2:16: rules[0].name: name must not be empty",
            "p.yaml:4:3: clients[\"\"]: client key must not be empty",
        ],
    );
}

// === conditions ===

#[test]
fn empty_when() {
    fails(
        &with_when("{}"),
        &["p.yaml:4:11: rules[0].when: empty condition: give at least one of `ip`, `user_agent`, \
           `path`, `method`, `host`, `headers`, `operation`, `any`, `all`, `not` (or leave \
           `when` out to match every request)"],
    );
    fails(
        "version: 1\nrules:\n  - name: r\n    when:\n    action: deny\n",
        &[
            "p.yaml:4:5: rules[0].when: empty condition: give at least one of `ip`, `user_agent`, \
           `path`, `method`, `host`, `headers`, `operation`, `any`, `all`, `not` (or leave \
           `when` out to match every request)",
        ],
    );
}

#[test]
fn empty_pattern_lists() {
    fails(
        &with_when("{user_agent: {regex: []}}"),
        &["p.yaml:4:32: rules[0].when.user_agent.regex: empty list: give at least one value"],
    );
    fails(
        &with_when("{any: []}"),
        &["p.yaml:4:17: rules[0].when.any: empty list: give at least one condition"],
    );
    fails(
        &with_when("{ip: []}"),
        &["p.yaml:4:16: rules[0].when.ip: empty list: give at least one value"],
    );
}

#[test]
fn string_matcher_needs_exactly_one_kind() {
    fails(
        &with_when("{path: {prefix: /a, suffix: /b}}"),
        &[
            "p.yaml:4:31: rules[0].when.path.suffix: only one of `exact`, `prefix`, `suffix`, \
           `contains`, `glob` or `regex` per matcher, found `prefix` and `suffix` (combine kinds \
           with `any`)",
        ],
    );
    fails(
        &with_when("{path: {ignore_case: true}}"),
        &[
            "p.yaml:4:18: rules[0].when.path: missing pattern: give one of `exact`, `prefix`, \
           `suffix`, `contains`, `glob` or `regex`",
        ],
    );
    fails(
        &with_when("{path: {prefx: /a}}"),
        &["p.yaml:4:19: rules[0].when.path.prefx: unknown field `prefx` (did you mean `prefix`?)"],
    );
}

#[test]
fn bad_regexes() {
    fails(
        &with_when(r#"{user_agent: {regex: ["ok", "(unclosed"]}}"#),
        &["p.yaml:4:39: rules[0].when.user_agent.regex[1]: invalid regex `(unclosed`: unclosed group"],
    );
    fails(
        &with_when(r#"{path: {regex: "(?<=/api)/v1"}}"#),
        &[
            "p.yaml:4:26: rules[0].when.path.regex: invalid regex `(?<=/api)/v1`: look-around, \
           including look-ahead and look-behind, is not supported (linear-time regex engine)",
        ],
    );
    fails(
        &with_when(r#"{path: {regex: '(a)\1'}}"#),
        &["p.yaml:4:26: rules[0].when.path.regex: invalid regex `(a)\\1`: backreferences are not \
           supported (linear-time regex engine)"],
    );
    fails(
        &with_when(r#"{path: {regex: '\w{1000}{1000}'}}"#),
        &["p.yaml:4:26: rules[0].when.path.regex: regex `\\w{1000}{1000}` is too large once compiled (limit 1024 KiB)"],
    );
}

#[test]
fn bad_globs() {
    fails(
        &with_when(r#"{path: {glob: "/a/[b"}}"#),
        &["p.yaml:4:25: rules[0].when.path.glob: invalid glob `/a/[b`: unclosed character class `[`"],
    );
}

#[test]
fn bad_cidrs() {
    fails(
        &with_when("{ip: [10.0.0.0/8, 10.0.0.1/8, 10.0.0.0/33, 300.1.2.3]}"),
        &[
            "p.yaml:4:29: rules[0].when.ip[1]: `10.0.0.1/8` has host bits set (did you mean `10.0.0.0/8`?)",
            "p.yaml:4:41: rules[0].when.ip[2]: `10.0.0.0/33` is not a CIDR (expected e.g. `10.0.0.0/8` or `2001:db8::/32`)",
            "p.yaml:4:54: rules[0].when.ip[3]: `300.1.2.3` is not an IP address or CIDR",
        ],
    );
    fails(
        "version: 1\nidentify: {trusted_proxies: [\"2001:db8::1/32\"]}\n",
        &["p.yaml:2:30: identify.trusted_proxies[0]: `2001:db8::1/32` has host bits set (did you mean `2001:db8::/32`?)"],
    );
}

#[test]
fn methods_and_header_names() {
    fails(
        &with_when("{method: [GET, post, 'GE T']}"),
        &[
            "p.yaml:4:26: rules[0].when.method[1]: method `post` must be upper case, as on the wire (did you mean `POST`?)",
            "p.yaml:4:32: rules[0].when.method[2]: `GE T` is not an http method (expected a token like `GET` or `POST`)",
        ],
    );
    fails(
        &with_when("{headers: [{name: 'x debug', present: true}]}"),
        &["p.yaml:4:29: rules[0].when.headers[0].name: `x debug` is not a valid header name"],
    );
    fails(
        "version: 1\nidentify: {client_key: [{header: 'x:key'}]}\n",
        &["p.yaml:2:34: identify.client_key[0].header: `x:key` is not a valid header name"],
    );
}

#[test]
fn header_conditions_need_present_or_value() {
    fails(
        &with_when("{headers: [{name: x-debug}]}"),
        &["p.yaml:4:22: rules[0].when.headers[0]: header condition needs `present` or `value` (or both)"],
    );
    fails(
        &with_when("{headers: {name: x-debug, present: false, value: on}}"),
        &["p.yaml:4:46: rules[0].when.headers.present: `present: false` with a `value` can never \
           match (an absent header has no value)"],
    );
}

// === actions ===

#[test]
fn unknown_action_and_missing_parameters() {
    fails(
        "version: 1\nrules:\n  - {name: a, action: dney}\n",
        &["p.yaml:3:23: rules[0].action: unknown value `dney` (did you mean `deny`?)"],
    );
    fails(
        "version: 1\nrules:\n  - {name: a, action: limit}\n",
        &["p.yaml:3:23: rules[0].action: `limit` needs parameters, e.g. `{limit: {rate: 5/min, key: ip}}`"],
    );
    fails(
        "version: 1\nrules:\n  - {name: a, action: {tag: {}}}\n",
        &["p.yaml:3:29: rules[0].action.tag: `tag` sets nothing: give `priority`, `plan` or both"],
    );
    fails(
        "version: 1\nrules:\n  - {name: a, action: {deny: {}, allow: {}}}\n",
        &["p.yaml:3:23: rules[0].action: expected a mapping with exactly one key, found 2 keys: `deny`, `allow`"],
    );
}

#[test]
fn borrowed_priority_is_not_for_rules() {
    fails(
        "version: 1\nrules:\n  - {name: a, action: {tag: {priority: borrowed}}}\n",
        &[
            "p.yaml:3:40: rules[0].action.tag.priority: priority `borrowed` is given by burst \
           sharing, not by rules (use `critical`, `normal` or `sheddable`)",
        ],
    );
}

#[test]
fn status_codes() {
    fails(
        "version: 1\nrules:\n  - {name: a, action: {deny: {status: 700}}}\n",
        &["p.yaml:3:39: rules[0].action.deny.status: 700 is not an http status code (100 to 599)"],
    );
    fails(
        "version: 1\nresponses: {quota_status: 200, shed_status: 99}\n",
        &[
            "p.yaml:2:27: responses.quota_status: status 200 does not reject a request (use a 4xx or 5xx code)",
            "p.yaml:2:45: responses.shed_status: 99 is not an http status code (100 to 599)",
        ],
    );
}

// === rates and quotas ===

#[test]
fn bad_rates() {
    let src = "version: 1
rules:
  - {name: a, action: {limit: {rate: 0/s}}}
  - {name: b, action: {limit: {rate: -1/s}}}
  - {name: c, action: {limit: {rate: NaN/s}}}
  - {name: d, action: {limit: {rate: 1e30/s}}}
  - {name: e, action: {limit: {rate: fast}}}
  - {name: f, action: {limit: {rate: 2000000000/s}}}
  - {name: g, action: {limit: {rate: 10/fortnight}}}
  - {name: h, action: {limit: {rate: 10}}}
";
    fails(
        src,
        &[
            "p.yaml:3:38: rules[0].action.limit.rate: rate must be greater than zero",
            "p.yaml:4:38: rules[1].action.limit.rate: rate count `-1` is not a whole number",
            "p.yaml:5:38: rules[2].action.limit.rate: rate count `NaN` is not a whole number",
            "p.yaml:6:38: rules[3].action.limit.rate: rate count `1e30` is not a whole number",
            "p.yaml:7:38: rules[4].action.limit.rate: expected a rate like `100/s`, `5/min` or `100000/day`",
            "p.yaml:8:38: rules[5].action.limit.rate: rate `2000000000/s` is too fast: its interval \
             rounds to 0ns (at most 1000000000 per 1s)",
            "p.yaml:9:38: rules[6].action.limit.rate: unknown time unit `fortnight` (use ns, us, ms, s, min, h or day)",
            "p.yaml:10:38: rules[7].action.limit.rate: expected a rate like `100/s`, `5/min` or `100000/day`",
        ],
    );
}

#[test]
fn zero_and_huge_bursts() {
    fails(
        "version: 1
plans:
  free:
    bandwidths: [\"10/s burst 0\", {rate: 10/s, burst: 0}, \"1/day burst 18446744073709551615\"]
",
        &[
            "p.yaml:4:18: plans.free.bandwidths[0]: invalid bandwidth `10/s burst 0`: burst must be at least 1 (write e.g. `10/s burst 20`)",
            "p.yaml:4:54: plans.free.bandwidths[1].burst: must be at least 1",
            "p.yaml:4:58: plans.free.bandwidths[2]: invalid bandwidth `1/day burst 18446744073709551615`: \
             burst 18446744073709551615 is too large for rate `1/day`: the bucket would span more \
             than 584 years (write e.g. `10/s burst 20`)",
        ],
    );
    fails(
        "version: 1\nrules:\n  - {name: a, action: {limit: {rate: 1/s, burst: 0}}}\n",
        &["p.yaml:3:50: rules[0].action.limit.burst: must be at least 1"],
    );
}

#[test]
fn bandwidth_names() {
    fails(
        "version: 1
plans:
  free:
    bandwidths: [{rate: 1/s, name: a}, {rate: 2/s, name: a}, {rate: 3/s, name: '7'}]
",
        &[
            "p.yaml:4:58: plans.free.bandwidths[1].name: duplicate bandwidth name `a` (first at line 4, column 36)",
            "p.yaml:4:80: plans.free.bandwidths[2].name: bandwidth name `7` must not be a number \
             (unnamed bandwidths are known by their index)",
        ],
    );
}

#[test]
fn cost_exceeding_a_burst_could_never_be_admitted() {
    fails(
        "version: 1
plans:
  free: {bandwidths: [\"10/s burst 10\", 100000/day]}
  tiny: {bandwidths: [\"1/s\"]}
clients:
  k: {bandwidths: [\"5/s burst 15\"]}
operations:
  - {name: export, cost: 20}
  - {name: read, cost: 1}
",
        &["p.yaml:8:26: operations[0].cost: cost 20 exceeds burst 10 of plans.free.bandwidths[0] \
           (and 2 more bandwidths): a request to `export` could never be admitted"],
    );
}

#[test]
fn concurrency_zero() {
    fails(
        "version: 1\nplans:\n  free: {concurrency: 0}\n",
        &["p.yaml:3:23: plans.free.concurrency: must be at least 1 (leave `concurrency` out for no limit)"],
    );
}

#[test]
fn client_key_longer_than_max_key_length() {
    fails(
        "version: 1\nidentify: {max_key_length: 8}\nclients:\n  short: {concurrency: 1}\n  much-too-long: {concurrency: 1}\n",
        &["p.yaml:5:3: clients.much-too-long: client key is 13 bytes, longer than \
           identify.max_key_length (8): such keys are hashed, so this override could never match"],
    );
}

#[test]
fn empty_override() {
    fails(
        "version: 1\nclients:\n  k: {}\n",
        &["p.yaml:3:6: clients.k: override sets nothing: give `plan`, `bandwidths`, `concurrency`, `fixed`, `alerts` or `growth`"],
    );
}

#[test]
fn post_hoc_zero() {
    fails(
        "version: 1\noperations:\n  - {name: a, post_hoc: {bytes: 0}}\n  - {name: b, post_hoc: {duration: 0ms}}\n",
        &[
            "p.yaml:3:33: operations[0].post_hoc.bytes: size must be at least 1 byte",
            "p.yaml:4:36: operations[1].post_hoc.duration: duration must be longer than 0",
        ],
    );
}

// === identify, shedding, state ===

#[test]
fn prefixes() {
    fails(
        "version: 1\nidentify: {ipv4_prefix: 33, ipv6_prefix: 129}\n",
        &[
            "p.yaml:2:25: identify.ipv4_prefix: 33 is out of range (1 to 32)",
            "p.yaml:2:42: identify.ipv6_prefix: 129 is out of range (1 to 128)",
        ],
    );
    fails(
        "version: 1\nidentify: {ipv6_prefix: 0}\n",
        &["p.yaml:2:25: identify.ipv6_prefix: 0 is out of range (1 to 128)"],
    );
}

#[test]
fn thresholds() {
    fails(
        "version: 1\nshedding:\n  limit: 100\n  thresholds: {critical: 1.5, normal: 0, sheddable: .nan}\n",
        &[
            "p.yaml:4:26: shedding.thresholds.critical: 1.5 is out of range (a fraction greater than 0 and at most 1)",
            "p.yaml:4:39: shedding.thresholds.normal: 0 is out of range (a fraction greater than 0 and at most 1)",
            "p.yaml:4:53: shedding.thresholds.sheddable: NaN is out of range (a fraction greater than 0 and at most 1)",
        ],
    );
    fails(
        "version: 1\nshedding:\n  limit: 100\n  thresholds: {normal: 0.6, sheddable: 0.8}\n",
        &[
            "p.yaml:4:24: shedding.thresholds.normal: `borrowed` (0.7, the default) is greater than \
             `normal` (0.6): thresholds must not increase from `critical` down to `sheddable`",
            "p.yaml:4:40: shedding.thresholds.sheddable: `sheddable` (0.8) is greater than \
             `borrowed` (0.7, the default): thresholds must not increase from `critical` down to `sheddable`",
        ],
    );
}

#[test]
fn adaptive_limits() {
    fails(
        "version: 1\nshedding:\n  limit: {adaptive: {min: 0, max: 10}}\n",
        &["p.yaml:3:27: shedding.limit.adaptive.min: must be at least 1"],
    );
    fails(
        "version: 1\nshedding:\n  limit: {adaptive: {min: 20, max: 10, initial: 5}}\n",
        &["p.yaml:3:36: shedding.limit.adaptive.max: max 10 is less than min 20"],
    );
    fails(
        "version: 1\nshedding:\n  limit: {adaptive: {min: 2, max: 10, initial: 50}}\n",
        &["p.yaml:3:48: shedding.limit.adaptive.initial: initial 50 is outside min..max (2 to 10)"],
    );
    fails(
        "version: 1\nshedding:\n  limit: {adaptive: {algorithm: aimd, min: 2, max: 10}}\n",
        &["p.yaml:3:21: shedding.limit.adaptive: `aimd` needs `target_latency` (e.g. `50ms`)"],
    );
    fails(
        "version: 1\nshedding:\n  limit: 0\n",
        &["p.yaml:3:10: shedding.limit: must be at least 1"],
    );
}

#[test]
fn reject_delay_burst_sharing_and_state() {
    fails(
        "version: 1
shedding: {limit: 10, reject_delay: {max: 0s}}
burst_sharing: {enabled: true, below_utilization: 1.5}
state: {max_keys: 0, backend: redis}
",
        &[
            "p.yaml:2:43: shedding.reject_delay.max: duration must be longer than 0",
            "p.yaml:3:51: burst_sharing.below_utilization: 1.5 is out of range (a fraction greater than 0 and at most 1)",
            "p.yaml:4:19: state.max_keys: must be at least 1",
            "p.yaml:4:31: state.backend: `backend: redis` needs a `redis` section (at least `url`)",
        ],
    );
}

#[test]
fn redis_state_settings_are_checked() {
    fails(
        "version: 1
state:
  backend: redis
  redis: {url: 'http://u:secret@h:1', mode: eventual, timeout: 0ms, on_failure: maybe, key_prefix: 'a{b}', pool: 3}
",
        &[
            "p.yaml:4:16: state.redis.url: `http://u:***@h:1` is not a redis url (expected `redis://host:port`)",
            "p.yaml:4:45: state.redis.mode: unknown value `eventual` (expected one of `async`, `exact`)",
            "p.yaml:4:64: state.redis.timeout: duration must be longer than 0",
            "p.yaml:4:81: state.redis.on_failure: unknown value `maybe` (expected one of `local`, `open`, `closed`)",
            "p.yaml:4:100: state.redis.key_prefix: a key prefix must be non-empty, without braces or spaces",
            "p.yaml:4:108: state.redis.pool: unknown field `pool` (expected one of `url`, `cluster`, `mode`, `sync_interval`, `timeout`, `on_failure`, `key_prefix`)",
        ],
    );
    // Redis Cluster: seed nodes instead of `url`, exactly one of the two.
    fails(
        "version: 1
state:
  backend: redis
  redis: {url: 'redis://h:1', cluster: ['redis://a:1']}
",
        &["p.yaml:4:40: state.redis.cluster: set either `url` (one server) or `cluster` (seed nodes of a Redis Cluster), not both"],
    );
    fails(
        "version: 1\nstate: {backend: redis, redis: {mode: exact}}\n",
        &["p.yaml:2:32: state.redis: missing field `url` (one server) or `cluster` (seed nodes of a Redis Cluster)"],
    );
    fails(
        "version: 1\nstate: {backend: redis, redis: {cluster: []}}\n",
        &["p.yaml:2:42: state.redis.cluster: a cluster needs at least one seed node (`redis://host:port`)"],
    );
    fails(
        "version: 1\nstate: {backend: redis, redis: {cluster: ['redis://a:1', 'http://u:pw@b:2']}}\n",
        &["p.yaml:2:58: state.redis.cluster[1]: `http://u:***@b:2` is not a redis url (expected `redis://host:port`)"],
    );
    fails(
        "version: 1\nstate: {redis: {url: 'redis://127.0.0.1:6379'}}\n",
        &["p.yaml:2:16: state.redis: `redis` settings are only used with `backend: redis`"],
    );
}

// === all at once ===

#[test]
fn every_error_of_a_file_is_reported_at_once_in_file_order() {
    let src = "version: 1
identify:
  ipv4_prefix: 40
rules:
  - name: bots
    when: {user_agent: {regex: '(?=x)'}}
    action: deny
  - name: login
    when: {method: POST, path: /login}
    action: {limit: {rate: 0/min}}
plans:
  free: {bandwidths: [\"10/s burst 20\"], concurrency: 0}
default_plan: premium
";
    let e = errors(src);
    assert_eq!(e.len(), 5, "{e:#?}");
    assert_eq!(
        e,
        [
            "p.yaml:3:16: identify.ipv4_prefix: 40 is out of range (1 to 32)",
            "p.yaml:6:32: rules[0].when.user_agent.regex: invalid regex `(?=x)`: look-around, \
             including look-ahead and look-behind, is not supported (linear-time regex engine)",
            "p.yaml:10:28: rules[1].action.limit.rate: rate must be greater than zero",
            "p.yaml:12:54: plans.free.concurrency: must be at least 1 (leave `concurrency` out for no limit)",
            "p.yaml:13:15: default_plan: unknown plan `premium` (defined plans: `free`)",
        ]
    );
}

// === overrides file ===

#[test]
fn overrides_file_errors() {
    let e = parse_overrides("k1: {plan: pro}\nk2: {concurrency: 0}\n", "o.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "o.yaml:2:19: k2.concurrency: must be at least 1 (leave `concurrency` out for no limit)"
    );
    assert!(parse_overrides("", "o.yaml").unwrap().is_empty());

    let policy = parse_policy(
        "version: 1\nplans: {free: {}}\noperations: [{name: export, cost: 20}]\n",
        "p.yaml",
    )
    .unwrap();
    let e = parse_overrides_for(
        "k1: {plan: pro}\nk2: {bandwidths: [\"1/s burst 10\"]}\n",
        "o.yaml",
        &policy,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "o.yaml:1:12: k1.plan: unknown plan `pro` (defined plans: `free`)\n\
         o.yaml:2:19: k2.bandwidths[0]: burst 10 is less than the cost 20 of operation `export`: \
         a request to it could never be admitted"
    );
}

// === embedded in another document ===

#[test]
fn an_embedded_policy_reports_full_paths() {
    let src = "listen: 127.0.0.1:0\npolicy:\n  version: 1\n  rules: [{name: a, action: dney}]\n";
    let root = yaml::parse(src, "gw.yaml", &Limits::default()).unwrap();
    let NodeKind::Map(entries) = &root.kind else {
        panic!("not a mapping")
    };
    let mut ctx = Ctx::new("gw.yaml");
    let root_path = Path::Root;
    let path = root_path.key("policy");
    assert!(decode_policy_in(&mut ctx, &entries[1].1, &path).is_none());
    assert_eq!(
        ctx.finish(Some(())).unwrap_err().to_string(),
        "gw.yaml:4:29: policy.rules[0].action: unknown value `dney` (did you mean `deny`?)"
    );
}

#[test]
fn retry_stagger_is_a_duration_or_off() {
    let stagger = |v: &str| {
        let src = format!("version: 1\nresponses: {{retry_stagger: {v}}}\n");
        fairgate_policies::decode::parse_policy(&src, "p.yaml").map(|p| p.responses.retry_stagger.0)
    };
    assert_eq!(stagger("off").unwrap(), std::time::Duration::ZERO);
    assert_eq!(stagger("0s").unwrap(), std::time::Duration::ZERO);
    assert_eq!(
        stagger("2min").unwrap(),
        std::time::Duration::from_secs(120)
    );
    fails(
        "version: 1\nresponses: {retry_stagger: soon}\n",
        &["p.yaml:2:28: responses.retry_stagger: `soon` is not a duration (expected e.g. `250ms`, `5s`) (or `off`)"],
    );
}

// === usage endpoint and caps ===

#[test]
fn usage_endpoint_errors_have_their_positions() {
    fails(
        "version: 1\nusage_endpoint: {path: quota}\n",
        &["p.yaml:2:24: usage_endpoint.path: the path must start with `/`"],
    );
    fails(
        "version: 1\nusage_endpoint: {path: /q?x=1}\n",
        &["p.yaml:2:24: usage_endpoint.path: the path must be a plain path: no query, fragment, spaces or non-ASCII bytes"],
    );
    fails(
        "version: 1\nusage_endpoint: {path: /q, self_caps: true}\n",
        &["p.yaml:2:17: usage_endpoint: `self_caps: true` needs `caps_file`, the file the caps are kept in"],
    );
    fails(
        "version: 1\nusage_endpoint: {path: /q, max_caps: 0}\n",
        &["p.yaml:2:38: usage_endpoint.max_caps: 0 is out of range (1 to 1000000)"],
    );
    fails(
        "version: 1\nusage_endpoint: {path: /q, self_cap: true}\n",
        &["p.yaml:2:28: usage_endpoint.self_cap: unknown field `self_cap` (did you mean `self_caps`?)"],
    );
}

#[test]
fn caps_file_and_cap_errors_have_their_positions() {
    let errs = |src: &str| -> Vec<String> {
        match fairgate_policies::decode::parse_caps(src, "caps.json") {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    };
    assert_eq!(
        errs("{\"a\": {\"concurrency\": 0}, \"b\": {}}\n"),
        [
            "caps.json:1:23: a.concurrency: must be at least 1 (leave `concurrency` out for no limit)",
            "caps.json:1:32: b: cap sets nothing: give `bandwidths` (name → `{quota: N}`) or `concurrency`",
        ]
    );
    assert_eq!(
        errs("{\"a\": {\"bandwidths\": {\"free-0\": {\"quota\": 5, \"rate\": 1}}}}\n"),
        ["caps.json:1:46: a.bandwidths.free-0.rate: unknown field `rate` (expected one of `quota`, `burst`)"]
    );
    let cap = fairgate_policies::decode::parse_client_cap(
        br#"{"bandwidths": {"free-0": {"quota": 5, "burst": 2}}, "concurrency": 3}"#,
        "request body",
    )
    .expect("a valid cap");
    assert_eq!(cap.concurrency, Some(3));
    assert_eq!(cap.bandwidths["free-0"].quota, 5);
    assert_eq!(cap.bandwidths["free-0"].burst, Some(2));
    assert!(fairgate_policies::decode::parse_caps("", "caps.json")
        .expect("an empty file is no caps")
        .is_empty());
}

#[test]
fn alerts_thresholds_and_webhook_are_checked() {
    // Every bad value at once, each at its own position.
    fails(
        "version: 1
plans:
  free:
    alerts: {thresholds: [0.5, 1.5, 0.4, 0.4], webhook: 'https://h/x'}
  pro:
    alerts: {thresholds: [], webhook: 'ftp://h'}
  max:
    alerts: {thresholds: 0.8}
clients:
  k:
    alerts: {webhook: 'http://h:0/x'}
  j:
    alerts: {webhook: 'http://user@h/x', thresholds: [0]}
",
        &[
            "p.yaml:4:32: plans.free.alerts.thresholds[1]: 1.5 is out of range (a fraction greater than 0 and at most 1)",
            "p.yaml:4:37: plans.free.alerts.thresholds[2]: thresholds must ascend: 0.4 follows 0.5",
            "p.yaml:4:42: plans.free.alerts.thresholds[3]: thresholds must ascend: 0.4 follows 0.4",
            "p.yaml:4:57: plans.free.alerts.webhook: `https://h/x` is not a webhook URL: https is not supported (the webhook client speaks plain HTTP; relay through a local proxy for TLS)",
            "p.yaml:6:26: plans.pro.alerts.thresholds: no thresholds: give at least one (or leave `thresholds` out for [0.8, 1.0])",
            "p.yaml:6:39: plans.pro.alerts.webhook: `ftp://h` is not a webhook URL: it must start with `http://`",
            "p.yaml:8:13: plans.max.alerts: missing field `webhook`",
            "p.yaml:8:26: plans.max.alerts.thresholds: expected a list of thresholds, e.g. [0.8, 1.0], found `0.8`",
            "p.yaml:11:23: clients.k.alerts.webhook: `http://h:0/x` is not a webhook URL: the port must be a number from 1 to 65535",
            "p.yaml:13:23: clients.j.alerts.webhook: `http://user@h/x` is not a webhook URL: user information (`user@`) is not supported",
            "p.yaml:13:55: clients.j.alerts.thresholds[0]: 0 is out of range (a fraction greater than 0 and at most 1)",
        ],
    );
}

#[test]
fn alerts_decode_with_their_defaults() {
    let p = parse_policy(
        "version: 1
plans:
  free: {alerts: {webhook: 'http://127.0.0.1:9000/hook'}}
clients:
  k: {alerts: {thresholds: [0.5, 0.9, 1], webhook: 'http://[::1]:80'}}
",
        "p.yaml",
    )
    .expect("valid");
    let free = p.plans["free"].alerts.as_ref().expect("alerts");
    assert_eq!(free.thresholds, [0.8, 1.0]);
    assert_eq!(free.webhook, "http://127.0.0.1:9000/hook");
    let k = p.clients["k"].alerts.as_ref().expect("alerts");
    assert_eq!(k.thresholds, [0.5, 0.9, 1.0]);
}

#[test]
fn growth_settings() {
    let base = "version: 1\nstate: {growth_file: g.json}\nplans:\n  p:\n    bandwidths: ['10/s']\n";
    fails(
        &format!("{base}    growth: {{max_factor: 2, threshold: 1.5, window: 2d, max_rise: {{within: 0s}}}}\n"),
        &[
            "p.yaml:6:40: plans.p.growth.threshold: 1.5 is out of range (a fraction greater than 0 and at most 1)",
            "p.yaml:6:53: plans.p.growth.window: 2day is out of range (from 1s to 1day)",
            "p.yaml:6:76: plans.p.growth.max_rise.within: 0s is out of range (from 1s to 1day)",
        ],
    );
    fails(
        &format!("{base}    growth: {{threshold: 0.5}}\n"),
        &["p.yaml:6:13: plans.p.growth: missing field `max_factor`"],
    );
    fails(
        &format!("{base}    growth: {{max_factor: 2, window: 1h, max_rise: {{within: 30m}}}}\n"),
        &["p.yaml:6:51: plans.p.growth.max_rise: `max_rise.within` (30min) is shorter than `window` (1h): the quota is measured over a window, so a rise cannot be bounded over less"],
    );
    fails(
        "version: 1\nstate: {growth_file: g.json}\nplans: {p: {bandwidths: ['10/s']}}\nclients:\n  k: {fixed: true, growth: {max_factor: 2}}\n",
        &["p.yaml:5:28: clients.k.growth: a fixed quota is never grown: remove `growth` or `fixed: true`"],
    );
}

// === calendar periods ===

/// A plan `p` whose one bandwidth is `bw` (flow YAML), as a complete policy.
fn with_bandwidth(bw: &str) -> String {
    format!("version: 1\nplans:\n  p:\n    bandwidths: [{bw}]\n")
}

#[test]
fn calendar_period_errors_name_the_field() {
    fails(
        &with_bandwidth("{quota: 100, period: year}"),
        &["p.yaml:4:39: plans.p.bandwidths[0].period: unknown value `year` (expected one of `day`, `week`, `month`)"],
    );
    fails(
        &with_bandwidth("{quota: 100, period: mnth}"),
        &["p.yaml:4:39: plans.p.bandwidths[0].period: unknown value `mnth` (did you mean `month`?)"],
    );
    fails(
        &with_bandwidth("{quota: 0, period: day}"),
        &["p.yaml:4:26: plans.p.bandwidths[0].quota: must be at least 1"],
    );
    fails(
        &with_bandwidth("{quota: 100, period: day, time_zone: Europe/Pariss}"),
        &["p.yaml:4:55: plans.p.bandwidths[0].time_zone: unknown time zone `Europe/Pariss` (write an IANA name like `Europe/Paris`, or `UTC`)"],
    );
    fails(
        &with_bandwidth("{quota: 100}"),
        &["p.yaml:4:18: plans.p.bandwidths[0]: missing field `period`"],
    );
    fails(
        &with_bandwidth("{period: month}"),
        &["p.yaml:4:18: plans.p.bandwidths[0]: missing field `quota`"],
    );
}

#[test]
fn a_calendar_period_is_not_mixed_with_a_rate() {
    fails(
        &with_bandwidth("{quota: 100, period: day, rate: 5/s, burst: 10}"),
        &[
            "p.yaml:4:44: plans.p.bandwidths[0].rate: a quota per calendar period counts `quota` per `period`; it has no `rate` (write a rate as a bandwidth of its own beside it)",
            "p.yaml:4:55: plans.p.bandwidths[0].burst: a quota per calendar period has no `burst`: its whole `quota` is there from the period's start",
        ],
    );
    fails(
        &with_bandwidth("{rate: 5/s, time_zone: UTC}"),
        &["p.yaml:4:30: plans.p.bandwidths[0].time_zone: `time_zone` applies to a quota per calendar period (`{quota: 1000000, period: month, time_zone: Europe/Paris}`), not to a rate"],
    );
}

#[test]
fn a_calendar_period_compiles_with_the_unit_in_its_id() {
    let src = with_bandwidth("{quota: 1000000, period: month, time_zone: Europe/Paris}, 10/s");
    let pol = fairgate_policies::compile::compile(parse_policy(&src, "p.yaml").unwrap()).unwrap();
    let bws = &pol.plan("p").unwrap().bandwidths;
    assert_eq!(&*bws[0].id, "plan:p/0@month");
    assert_eq!(bws[0].burst, 1_000_000);
    let period = bws[0].period.as_ref().unwrap();
    assert_eq!(&*period.time_zone, "Europe/Paris");
    assert!(bws[1].period.is_none());
}
