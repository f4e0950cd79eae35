//! The policy as the user writes it: the serde model of the YAML file.
//!
//! This is stage one of three (model → [`crate::compiled`] → runtime state in
//! `fairgate-middleware`). Values here are already parsed into typed units (rates, durations,
//! sizes, CIDRs), but nothing is resolved yet: plan names are strings, rules are a list.
//! Decoding from YAML (with exact positions for every error) lives in [`crate::decode`];
//! these types only derive `Serialize` (so a policy can be printed back, e.g. by the admin
//! API, and round-trip) and `JsonSchema` (for `fairgate schema`).
//!
//! Field names here are the YAML keys. Keep them, the decoder, `docs/policy.md` and
//! `examples/policy.yaml` in step: a test validates every YAML block of the docs.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::marker::PhantomData;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

pub use crate::units::{ByteSize, Cidr, HumanDuration, Rate};

/// The JSON Schema of the policy file (what `fairgate schema` prints), for editors that
/// validate YAML against a schema (e.g. the YAML language server's
/// `# yaml-language-server: $schema=…` comment).
pub fn json_schema() -> serde_json::Value {
    let mut schema = schemars::schema_for!(Policy);
    schema.insert(
        "title".to_owned(),
        serde_json::Value::String("fairgate policy".to_owned()),
    );
    schema.to_value()
}

/// The whole policy file.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Format version. Only `1` exists.
    #[schemars(range(min = 1, max = 1))]
    pub version: u32,
    /// How a request is attributed to a client.
    #[serde(default)]
    pub identify: Identify,
    /// Reactive (WAF-style) rules, evaluated in order.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Quota plans by name. A client is on exactly one plan.
    #[serde(default)]
    pub plans: BTreeMap<String, Plan>,
    /// The plan of a client that no override or `tag` rule puts elsewhere.
    /// `None` means clients without a plan have no per-client quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_plan: Option<String>,
    /// Named operations with their cost; the first match wins, unmatched requests cost 1.
    #[serde(default)]
    pub operations: Vec<Operation>,
    /// Per-client overrides keyed by client key (API key, or the IP for keyless clients).
    #[serde(default)]
    pub clients: BTreeMap<String, ClientOverride>,
    /// A YAML file holding more client overrides in the same shape as `clients`
    /// (written by the admin API). Relative to the policy file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides_file: Option<String>,
    /// Letting clients over their quota borrow capacity others leave unused.
    #[serde(default)]
    pub burst_sharing: BurstSharing,
    /// The usage endpoint on the data port: a client reads its own quota there (and, with
    /// `self_caps`, sets its own lower caps). Absent: no endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_endpoint: Option<UsageEndpoint>,
    /// Global load shedding. Absent: no global limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shedding: Option<Shedding>,
    /// Status codes and headers of responses.
    #[serde(default)]
    pub responses: Responses,
    /// Where and how much per-key state is kept.
    #[serde(default)]
    pub state: State,
}

// === identify ===

/// Client identification.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Identify {
    /// Peers whose `X-Forwarded-For` / `Forwarded` headers are believed. Empty: none.
    #[serde(default)]
    #[schemars(with = "OneOrMany<Cidr>")]
    pub trusted_proxies: Vec<Cidr>,
    /// IPv6 clients are aggregated to this prefix length (default 64).
    #[serde(default = "default_ipv6_prefix")]
    #[schemars(range(min = 1, max = 128))]
    pub ipv6_prefix: u8,
    /// IPv4 clients are aggregated to this prefix length (default 32).
    #[serde(default = "default_ipv4_prefix")]
    #[schemars(range(min = 1, max = 32))]
    pub ipv4_prefix: u8,
    /// Client key extractors, tried in order; the first that yields a non-empty value wins.
    /// When none does, the client key is the (aggregated) IP.
    #[serde(default)]
    #[schemars(with = "OneOrMany<KeyExtractor>")]
    pub client_key: Vec<KeyExtractor>,
    /// Keys longer than this many bytes are replaced by a hash of themselves (still counted).
    #[serde(default = "default_max_key_length")]
    #[schemars(range(min = 1))]
    pub max_key_length: u32,
}

impl Default for Identify {
    fn default() -> Self {
        Identify {
            trusted_proxies: Vec::new(),
            ipv6_prefix: default_ipv6_prefix(),
            ipv4_prefix: default_ipv4_prefix(),
            client_key: Vec::new(),
            max_key_length: default_max_key_length(),
        }
    }
}

/// Default IPv6 aggregation prefix.
pub fn default_ipv6_prefix() -> u8 {
    64
}
/// Default IPv4 aggregation prefix.
pub fn default_ipv4_prefix() -> u8 {
    32
}
/// Default maximum key length before hashing.
pub fn default_max_key_length() -> u32 {
    256
}

/// Where a client key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KeyExtractor {
    /// The value of a request header, e.g. `x-api-key`.
    Header(String),
    /// The value of a query-string parameter.
    Query(String),
    /// The token of an `Authorization: Bearer <token>` header (YAML: `- bearer`).
    Bearer,
}

// === rules ===

/// One reactive rule.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique rule name; used in metrics, logs and to carry a `limit` rule's state across reloads.
    pub name: String,
    /// `enforce` (default) or `shadow` (evaluate and log, never act).
    #[serde(default)]
    pub mode: Mode,
    /// When the rule applies. Absent: every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Condition>,
    /// What the rule does when it applies.
    pub action: Action,
}

/// Whether a rule acts or only reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The rule acts.
    #[default]
    Enforce,
    /// The rule is evaluated, counted and logged, but never acts.
    Shadow,
}

/// A condition over the request. All present fields must hold (an implicit `all`).
/// At least one field must be present.
#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The client IP (after trusted-proxy resolution) is in one of these CIDRs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<OneOrMany<Cidr>>")]
    pub ip: Option<Vec<Cidr>>,
    /// The `User-Agent` header matches (a missing header is the empty string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<StringMatch>,
    /// The URI path (without query) matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<StringMatch>,
    /// The method is one of these (upper case, e.g. `POST`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<OneOrMany<String>>")]
    pub method: Option<Vec<String>>,
    /// The host (`Host` header or URI authority, without port) matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<StringMatch>,
    /// Every listed header condition holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<OneOrMany<HeaderMatch>>")]
    pub headers: Option<Vec<HeaderMatch>>,
    /// The route/operation name the request was resolved to is one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<OneOrMany<String>>")]
    pub operation: Option<Vec<String>>,
    /// At least one sub-condition holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any: Option<Vec<Condition>>,
    /// Every sub-condition holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<Vec<Condition>>,
    /// The sub-condition does not hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<Condition>>,
}

/// A string matcher: exactly one of the pattern kinds, each with one or more patterns
/// (any of them matching is a match).
///
/// YAML: a plain string is one exact pattern (`path: /login`); otherwise a mapping with one
/// kind key and an optional `ignore_case` (`host: {suffix: .example.com, ignore_case: true}`,
/// `user_agent: {regex: ["(?i)badbot", sqlmap]}`). Serialises to the mapping form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StringMatch {
    /// How the patterns match.
    pub kind: MatchKind,
    /// The patterns; any one matching is a match. Never empty.
    pub patterns: Vec<String>,
    /// Compare ASCII case-insensitively (default false).
    pub ignore_case: bool,
}

impl Serialize for StringMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1 + usize::from(self.ignore_case)))?;
        m.serialize_entry(self.kind.as_str(), &self.patterns)?;
        if self.ignore_case {
            m.serialize_entry("ignore_case", &true)?;
        }
        m.end()
    }
}

impl JsonSchema for StringMatch {
    fn schema_name() -> Cow<'static, str> {
        "StringMatch".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let patterns = generator.subschema_for::<OneOrMany<String>>();
        let kinds = MatchKind::ALL.map(|k| k.as_str());
        let mut properties = serde_json::Map::new();
        for k in kinds {
            properties.insert(k.to_owned(), patterns.clone().to_value());
        }
        properties.insert(
            "ignore_case".to_owned(),
            json_schema!({"type": "boolean", "default": false}).to_value(),
        );
        let one_kind: Vec<serde_json::Value> = kinds
            .iter()
            .map(|k| serde_json::json!({"required": [k]}))
            .collect();
        json_schema!({
            "description": "a plain string (exact match) or a mapping with exactly one of \
                `exact`, `prefix`, `suffix`, `contains`, `glob`, `regex` (one pattern or a \
                list; any matching is a match) and optional `ignore_case`",
            "anyOf": [
                {"type": "string"},
                {
                    "type": "object",
                    "properties": properties,
                    "additionalProperties": false,
                    "oneOf": one_kind,
                }
            ]
        })
    }
}

/// The kinds of string pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MatchKind {
    /// The whole value equals the pattern.
    Exact,
    /// The value starts with the pattern.
    Prefix,
    /// The value ends with the pattern.
    Suffix,
    /// The value contains the pattern.
    Contains,
    /// Shell-style glob over the whole value (`*` any run, `?` one char, `[a-z]`).
    Glob,
    /// A `regex` crate expression (linear time; no look-around or backreferences),
    /// unanchored unless it anchors itself.
    Regex,
}

impl MatchKind {
    /// Every kind, in the order the docs list them.
    pub const ALL: [MatchKind; 6] = [
        MatchKind::Exact,
        MatchKind::Prefix,
        MatchKind::Suffix,
        MatchKind::Contains,
        MatchKind::Glob,
        MatchKind::Regex,
    ];

    /// The YAML key of this kind (`exact`, `prefix`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            MatchKind::Exact => "exact",
            MatchKind::Prefix => "prefix",
            MatchKind::Suffix => "suffix",
            MatchKind::Contains => "contains",
            MatchKind::Glob => "glob",
            MatchKind::Regex => "regex",
        }
    }
}

/// A condition on one request header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name (case-insensitive).
    pub name: String,
    /// `Some(true)`: the header must be present; `Some(false)`: it must be absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    /// The header's value must match (a missing header never matches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<StringMatch>,
}

/// What a rule does.
///
/// YAML: `deny`, `{deny: {status: 451}}`, `allow`, `{limit: {rate: 5/min, …}}`,
/// `{tag: {priority: critical, plan: pro}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Reject the request (status from `responses.deny` unless given).
    Deny(DenyAction),
    /// Admit the request, bypassing quotas and later rules (not shedding).
    Allow,
    /// A rule-scoped rate limit; requests over it are rejected like a quota.
    Limit(LimitAction),
    /// Set the request's priority class and/or plan, then go on to the next rule.
    Tag(TagAction),
}

impl JsonSchema for Action {
    fn schema_name() -> Cow<'static, str> {
        "Action".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let deny = generator.subschema_for::<DenyAction>();
        let limit = generator.subschema_for::<LimitAction>();
        let tag = generator.subschema_for::<TagAction>();
        json_schema!({
            "description": "`deny`, `{deny: {status: 451}}`, `allow`, `{limit: {rate: 5/min}}` \
                or `{tag: {priority: critical, plan: pro}}`",
            "oneOf": [
                {"type": "string", "enum": ["deny", "allow"]},
                tagged("deny", json_schema!({"anyOf": [deny, {"type": "null"}]})),
                tagged("allow", json_schema!({"anyOf": [
                    {"type": "null"},
                    {"type": "object", "maxProperties": 0}
                ]})),
                tagged("limit", limit),
                tagged("tag", tag),
            ]
        })
    }
}

/// `{name: <schema>}` with no other key.
fn tagged(name: &str, inner: Schema) -> Schema {
    json_schema!({
        "type": "object",
        "properties": {name: inner},
        "required": [name],
        "additionalProperties": false
    })
}

/// Schema of a field that takes one value or a list of them.
struct OneOrMany<T>(PhantomData<T>);

impl<T: JsonSchema> JsonSchema for OneOrMany<T> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        format!("OneOrMany_{}", T::schema_name()).into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let one = generator.subschema_for::<T>();
        json_schema!({
            "anyOf": [one, {"type": "array", "items": one}]
        })
    }
}

/// Parameters of `deny`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DenyAction {
    /// Status code to answer with (default `responses.deny_status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 400, max = 599))]
    pub status: Option<u16>,
}

/// Parameters of `limit`.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitAction {
    /// The rate, e.g. `5/min`.
    pub rate: Rate,
    /// Burst in requests (default: the rate's count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u64>,
    /// What the limit is counted per (default `ip`).
    #[serde(default)]
    pub key: LimitKey,
    /// `exact` per-key buckets (default) or a fixed-memory `sketch` estimator
    /// for huge key spaces (approximate: may over-count, never under-counts).
    #[serde(default)]
    pub estimator: Estimator,
}

/// What a rule-scoped limit is counted per.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LimitKey {
    /// The client IP (aggregated to its prefix).
    #[default]
    Ip,
    /// The client key.
    Client,
    /// The value of this header (a missing header counts under the empty value).
    Header(String),
    /// One bucket for all requests the rule matches.
    Global,
}

/// How a rule-scoped limit stores its counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// One exact bucket per key, subject to `state.max_keys`.
    #[default]
    Exact,
    /// A count-min sketch of fixed size (pingora-limits).
    Sketch,
}

/// Parameters of `tag`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TagAction {
    /// Priority class for shedding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Plan to apply to this request (overrides the client's default plan, not an override).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

/// Priority classes, highest first. Lower classes are shed first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Shed only when nothing else is left to shed.
    Critical,
    /// The default class.
    #[default]
    Normal,
    /// Requests admitted over quota through burst sharing (set by the engine, not by rules).
    Borrowed,
    /// Shed first.
    Sheddable,
}

// === quotas ===

/// A quota plan.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Bandwidths; a request is admitted only if every one admits it (and then charges all).
    #[serde(default)]
    #[schemars(with = "OneOrMany<Bandwidth>")]
    pub bandwidths: Vec<Bandwidth>,
    /// Maximum requests in flight per client. Absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub concurrency: Option<u32>,
    /// A fixed quota (cost control): its clients are never admitted past it on spare
    /// capacity, whatever `burst_sharing` says.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fixed: bool,
    /// Usage alerts of the plan's clients. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<Alerts>,
    /// Adaptive growth of the plan's clients' quotas. Absent: quotas never grow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub growth: Option<Growth>,
}

/// Adaptive growth (opt-in): when a client's usage of its quota over a `window` stays at or
/// above `threshold`, each of its bandwidths (rate and burst) grows by `step`; the growth
/// factor never exceeds `max_factor` of the base quota, rises at most `max_rise.factor`
/// within any `max_rise.within`, and never rises while the service is shedding. A client's
/// growth is kept in `state.growth_file` (or in Redis with `backend: redis`), so it survives
/// reloads and restarts; it applies to whatever the policy makes the base quota.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Growth {
    /// Usage over a window (admitted cost ÷ what the quota allows in that window) at or above
    /// which the quota grows; a fraction in (0, 1] (default 0.8).
    #[serde(default = "default_growth_threshold")]
    pub threshold: f64,
    /// The window usage is measured over (default 10m, at least 1s).
    #[serde(default = "default_growth_window")]
    pub window: HumanDuration,
    /// How much one growth step adds: the factor is multiplied by `1 + step`; a fraction in
    /// (0, 1] (default 0.1).
    #[serde(default = "default_growth_step")]
    pub step: f64,
    /// The growth factor never exceeds this (an absolute bound: the quota is never above
    /// `max_factor` × the base quota); greater than 1, at most 100. Required.
    pub max_factor: f64,
    /// At most this much rise in any period (default: ×2 within 30m).
    #[serde(default)]
    pub max_rise: MaxRise,
}

/// `growth.max_rise`: the factor rises at most `factor` times within any `within`.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MaxRise {
    /// Greater than 1 (default 2).
    pub factor: f64,
    /// At least the growth window (default 30m).
    pub within: HumanDuration,
}

impl Default for MaxRise {
    fn default() -> Self {
        MaxRise {
            factor: 2.0,
            within: HumanDuration(std::time::Duration::from_secs(30 * 60)),
        }
    }
}

/// `growth.threshold` when absent.
pub fn default_growth_threshold() -> f64 {
    0.8
}

/// `growth.window` when absent.
pub fn default_growth_window() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10 * 60))
}

/// `growth.step` when absent.
pub fn default_growth_step() -> f64 {
    0.1
}

/// Usage alerts: when a client's usage of a bandwidth (the used share of its bucket,
/// `1 − remaining / burst`) reaches a threshold, an alert event is POSTed to `webhook`, once
/// per crossing (re-armed when usage falls back below the threshold).
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Alerts {
    /// Usage thresholds, each in (0, 1], ascending (default `[0.8, 1.0]`).
    #[serde(default = "default_alert_thresholds")]
    pub thresholds: Vec<f64>,
    /// Where alert events are POSTed: an `http://host[:port][/path]` URL.
    pub webhook: String,
}

/// `alerts.thresholds` when absent: 80 % and 100 % of a bandwidth.
pub fn default_alert_thresholds() -> Vec<f64> {
    vec![0.8, 1.0]
}

/// One bandwidth: `rate` with a `burst`. YAML also accepts the short string form
/// `"10/s burst 20"`. Or a quota per calendar period: `{quota: 1000000, period: month}`
/// (then `period` is set, `rate` is the quota per the period's nominal length and `burst`
/// is `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bandwidth {
    /// Sustained rate; for a calendar-period bandwidth `quota` per the period's nominal
    /// length ([`Period::nominal`]).
    pub rate: Rate,
    /// Burst capacity in cost units (default: the rate's count).
    pub burst: Option<u64>,
    /// Name used in `RateLimit-Policy` and metrics (default: derived from plan and index).
    pub name: Option<String>,
    /// A quota per calendar period instead of a rate: `rate.count()` units from the
    /// period's start, all of them again at the next period's start.
    pub period: Option<CalendarPeriod>,
}

/// The calendar period of a quota and the time zone its periods start in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalendarPeriod {
    /// Day, week (from Monday) or month (from the 1st).
    pub unit: Period,
    /// IANA time zone name; `None` is UTC.
    pub time_zone: Option<String>,
}

/// A calendar period: each starts at local midnight in its time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// From midnight to midnight.
    Day,
    /// From Monday's midnight (ISO 8601 weeks).
    Week,
    /// From the 1st's midnight.
    Month,
}

impl Period {
    /// The word written in the policy.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// The nominal length, for a `RateLimit-Policy` window: a day, 7 days, 30 days.
    pub fn nominal(self) -> std::time::Duration {
        std::time::Duration::from_secs(match self {
            Period::Day => 86_400,
            Period::Week => 7 * 86_400,
            Period::Month => 30 * 86_400,
        })
    }
}

impl Serialize for Bandwidth {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        match &self.period {
            None => {
                m.serialize_entry("rate", &self.rate)?;
                if let Some(b) = self.burst {
                    m.serialize_entry("burst", &b)?;
                }
            }
            Some(p) => {
                m.serialize_entry("quota", &self.rate.count())?;
                m.serialize_entry("period", &p.unit)?;
                if let Some(z) = &p.time_zone {
                    m.serialize_entry("time_zone", z)?;
                }
            }
        }
        if let Some(n) = &self.name {
            m.serialize_entry("name", n)?;
        }
        m.end()
    }
}

impl JsonSchema for Bandwidth {
    fn schema_name() -> Cow<'static, str> {
        "Bandwidth".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let rate = generator.subschema_for::<Rate>();
        json_schema!({
            "description": "a rate with a burst: `10/s burst 20`, `100000/day`, or \
                `{rate: 1/s, burst: 5, name: slow}` (the burst defaults to the rate's count); \
                or a quota per calendar period: `{quota: 1000000, period: month, \
                time_zone: Europe/Paris}`",
            "anyOf": [
                {
                    "type": "string",
                    "pattern": r"^\s*[0-9]+\s*/\s*[0-9]*\s*[a-z]+\s*(burst\s*[0-9]+\s*)?$"
                },
                {
                    "type": "object",
                    "properties": {
                        "rate": rate,
                        "burst": {"type": "integer", "minimum": 1},
                        "name": {"type": "string", "minLength": 1}
                    },
                    "required": ["rate"],
                    "additionalProperties": false
                },
                {
                    "type": "object",
                    "properties": {
                        "quota": {"type": "integer", "minimum": 1, "maximum": MAX_PERIOD_QUOTA},
                        "period": {"enum": ["day", "week", "month"]},
                        "time_zone": {"type": "string", "minLength": 1},
                        "name": {"type": "string", "minLength": 1}
                    },
                    "required": ["quota", "period"],
                    "additionalProperties": false
                }
            ]
        })
    }
}

/// The largest quota of a calendar-period bandwidth (10¹²): a period's count is kept in
/// nanosecond units of the engine's clock, which must stay below a day's length.
pub const MAX_PERIOD_QUOTA: u64 = 1_000_000_000_000;

/// A named operation with its cost.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// Operation name (a gateway route may name it directly).
    pub name: String,
    /// Which requests are this operation (absent: only requests the gateway routes to it by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Condition>,
    /// Cost charged up front, in quota units (default 1).
    #[serde(default = "default_cost")]
    pub cost: u64,
    /// Cost charged after the response, as debt repaid before the next admit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_hoc: Option<PostHoc>,
}

/// Default operation cost.
pub fn default_cost() -> u64 {
    1
}

/// Post-hoc cost: one unit per `bytes` of response body, or per `duration` of latency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PostHoc {
    /// One unit per this many response-body bytes (rounded down).
    Bytes(ByteSize),
    /// One unit per this much request latency (rounded down).
    Duration(HumanDuration),
}

/// A per-client override: a different plan, or own bandwidths/concurrency.
#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientOverride {
    /// Put the client on this plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// Replace the plan's bandwidths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<OneOrMany<Bandwidth>>")]
    pub bandwidths: Option<Vec<Bandwidth>>,
    /// Replace the plan's concurrency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub concurrency: Option<u32>,
    /// Replace the plan's usage alerts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<Alerts>,
    /// The override lapses at this time (UTC): from then on the client is on what the
    /// policy gives it without the override, as if the entry were gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<crate::units::Timestamp>,
    /// This client's quota is fixed (cost control), whatever its plan says: never
    /// admitted past it on spare capacity, never grown.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fixed: bool,
    /// Replace the plan's adaptive growth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub growth: Option<Growth>,
}

/// The usage endpoint (`usage_endpoint`): a path on the data port where a client reads its
/// own quota and usage, and, with `self_caps`, sets its own lower caps.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageEndpoint {
    /// The request path it answers on, e.g. `/.well-known/fairgate/quota` (exact match).
    pub path: String,
    /// Whether clients may set and lift their own caps there (`PUT`, `DELETE`). Off by
    /// default; needs `caps_file`.
    #[serde(default)]
    pub self_caps: bool,
    /// The file the caps are kept in (JSON, written by fairgate), relative to the policy
    /// file. Its caps are enforced whenever it is named, even with `self_caps: false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caps_file: Option<String>,
    /// At most this many clients hold a cap (default 10,000); more are refused.
    #[serde(default = "default_max_caps")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_caps: u32,
}

/// Default bound on stored caps.
pub fn default_max_caps() -> u32 {
    10_000
}

/// A client's self-set cap (`caps_file`, the usage endpoint's `PUT`): lower limits on
/// bandwidths of its quota, by name, and on its concurrency. Never above its quota: the
/// engine enforces the lower of the two.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientCap {
    /// Bandwidth name (as in `RateLimit-Policy`) → its cap.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bandwidths: BTreeMap<String, BandwidthCap>,
    /// At most this many requests in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub concurrency: Option<u32>,
}

/// A cap on one bandwidth: `quota` units per the bandwidth's window (`q` per `w` of its
/// `RateLimit-Policy` item), and optionally a lower burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BandwidthCap {
    /// Units per the bandwidth's window, at least 1.
    #[schemars(range(min = 1))]
    pub quota: u64,
    /// Burst; default: the bandwidth's burst scaled by `quota / q` (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u64>,
}

/// Burst sharing settings.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BurstSharing {
    /// Off by default.
    #[serde(default)]
    pub enabled: bool,
    /// Borrowing is allowed while global utilisation (in flight / shedding limit) is below this
    /// fraction (default 0.9, the `normal` threshold's default). Without a shedding limit
    /// nobody borrows. A borrowed request must also fit under the `borrowed` threshold
    /// (default 0.7): between the two it is shed (503), above this it gets the quota's 429.
    #[serde(default = "default_borrow_below")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub below_utilization: f64,
}

impl Default for BurstSharing {
    fn default() -> Self {
        BurstSharing {
            enabled: false,
            below_utilization: default_borrow_below(),
        }
    }
}

/// Default burst-sharing utilisation threshold: above the default `borrowed` shedding
/// threshold (0.7), so that borrowed requests are admitted while there is room and are the
/// first shed as load rises, instead of borrowing stopping where their shedding would start.
pub fn default_borrow_below() -> f64 {
    0.9
}

// === shedding ===

/// Global load shedding.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Shedding {
    /// The in-flight limit.
    pub limit: ShedLimit,
    /// Fraction of the limit each class may fill before it is shed.
    #[serde(default)]
    pub thresholds: ClassThresholds,
    /// Delay rejections to about the recent success latency. Absent: reject at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject_delay: Option<RejectDelay>,
}

/// A static or adaptive in-flight limit. YAML: `512`, `{static: 512}` or
/// `{adaptive: {min: 8, max: 1024}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ShedLimit {
    /// A fixed number of requests in flight.
    Static(u32),
    /// A limit that follows latency.
    Adaptive(AdaptiveLimit),
}

impl JsonSchema for ShedLimit {
    fn schema_name() -> Cow<'static, str> {
        "ShedLimit".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let adaptive = generator.subschema_for::<AdaptiveLimit>();
        let count = || json_schema!({"type": "integer", "minimum": 1, "maximum": u32::MAX});
        json_schema!({
            "description": "requests in flight: `512`, `{static: 512}` or `{adaptive: {…}}`",
            "oneOf": [
                count(),
                tagged("static", count()),
                tagged("adaptive", adaptive),
            ]
        })
    }
}

/// An adaptive concurrency limit.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveLimit {
    /// `gradient` (default) or `aimd`.
    #[serde(default)]
    pub algorithm: AdaptiveAlgorithm,
    /// Lower bound of the limit.
    #[schemars(range(min = 1))]
    pub min: u32,
    /// Upper bound of the limit.
    pub max: u32,
    /// Starting limit (default `min`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial: Option<u32>,
    /// Latency above which `aimd` backs off (required for `aimd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_latency: Option<HumanDuration>,
}

/// Adaptive limit algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AdaptiveAlgorithm {
    /// Netflix-style gradient: limit × (min RTT / recent RTT) + queue allowance.
    #[default]
    Gradient,
    /// Additive increase, multiplicative decrease on latency over `target_latency`.
    Aimd,
}

/// Per-class fill thresholds, as fractions of the in-flight limit, in (0, 1].
/// Must not increase from `critical` down to `sheddable`.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassThresholds {
    /// Default 1.0.
    #[serde(default = "one")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub critical: f64,
    /// Default 0.9.
    #[serde(default = "point_nine")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub normal: f64,
    /// Default 0.7.
    #[serde(default = "point_seven")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub borrowed: f64,
    /// Default 0.5.
    #[serde(default = "half")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sheddable: f64,
}

impl Default for ClassThresholds {
    fn default() -> Self {
        ClassThresholds {
            critical: one(),
            normal: point_nine(),
            borrowed: point_seven(),
            sheddable: half(),
        }
    }
}

fn one() -> f64 {
    1.0
}
fn point_nine() -> f64 {
    0.9
}
fn point_seven() -> f64 {
    0.7
}
fn half() -> f64 {
    0.5
}

/// Delaying rejections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectDelay {
    /// Upper bound of a delay.
    pub max: HumanDuration,
    /// At most this many delayed rejections wait at once; beyond, reject at once (default 1024).
    #[serde(default = "default_max_waiting")]
    #[schemars(range(min = 1))]
    pub max_waiting: u32,
}

/// Default cap on waiting delayed rejections.
pub fn default_max_waiting() -> u32 {
    1024
}

// === responses ===

/// Response settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Responses {
    /// Status for quota and `limit` rejections (default 429).
    #[serde(default = "default_quota_status")]
    #[schemars(range(min = 400, max = 599))]
    pub quota_status: u16,
    /// Status for shedding (default 503).
    #[serde(default = "default_shed_status")]
    #[schemars(range(min = 400, max = 599))]
    pub shed_status: u16,
    /// Status for `deny` (default 403).
    #[serde(default = "default_deny_status")]
    #[schemars(range(min = 400, max = 599))]
    pub deny_status: u16,
    /// When to send `RateLimit` / `RateLimit-Policy` headers (default `on_reject`).
    #[serde(default)]
    pub ratelimit_headers: HeaderMode,
    /// `Retry-After` for shed responses (default 1s).
    #[serde(default = "default_shed_retry_after")]
    pub shed_retry_after: HumanDuration,
    /// Spread the retries of clients rejected together by one bucket: each is told the
    /// time its turn comes at the refill rate, never earlier than the bucket's own reset, at
    /// most this much later (default 60s; `off` or `0s`: everyone is told the reset).
    #[serde(default = "default_retry_stagger")]
    pub retry_stagger: HumanDuration,
}

impl Default for Responses {
    fn default() -> Self {
        Responses {
            quota_status: default_quota_status(),
            shed_status: default_shed_status(),
            deny_status: default_deny_status(),
            ratelimit_headers: HeaderMode::default(),
            shed_retry_after: default_shed_retry_after(),
            retry_stagger: default_retry_stagger(),
        }
    }
}

/// Default quota status.
pub fn default_quota_status() -> u16 {
    429
}
/// Default shed status.
pub fn default_shed_status() -> u16 {
    503
}
/// Default deny status.
pub fn default_deny_status() -> u16 {
    403
}
/// Default shed `Retry-After`.
pub fn default_shed_retry_after() -> HumanDuration {
    HumanDuration::from_secs(1)
}
/// Default retry stagger.
pub fn default_retry_stagger() -> HumanDuration {
    HumanDuration::from_secs(60)
}

/// When RateLimit headers are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HeaderMode {
    /// Never.
    Never,
    /// On quota rejections only.
    #[default]
    OnReject,
    /// On every response that passed a quota.
    Always,
}

// === state ===

/// Per-key state settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// `local` (default): state in this process; `redis`: fleet-wide quotas (`redis` below).
    #[serde(default)]
    pub backend: Backend,
    /// Upper bound on tracked keys (default 100000).
    #[serde(default = "default_max_keys")]
    #[schemars(range(min = 1))]
    pub max_keys: u64,
    /// Redis settings; required with `backend: redis`, refused otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisState>,
    /// The file grown quotas are kept in with `backend: local` (JSON, written by fairgate),
    /// relative to the policy file; required when a plan or override has `growth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub growth_file: Option<String>,
}

impl Default for State {
    fn default() -> Self {
        State {
            backend: Backend::Local,
            max_keys: default_max_keys(),
            redis: None,
            growth_file: None,
        }
    }
}

/// Default key cap.
pub fn default_max_keys() -> u64 {
    100_000
}

/// State backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// In-process state.
    #[default]
    Local,
    /// Fleet-wide quotas on Redis (`state.redis`).
    Redis,
}

/// The Redis backend: where, how decisions use it, and what happens when it fails.
///
/// Exactly one of `url` (one server) and `cluster` (seed nodes of a Redis Cluster) is set
/// (the decoder refuses both or neither). `Debug` hides their passwords.
#[derive(Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisState {
    /// `redis://[user:password@]host:port[/db]` of one server. Serialised (the admin API's
    /// `/policy`, the canonical form) with the password replaced by `***`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_redacted_opt_url"
    )]
    pub url: Option<String>,
    /// Seed nodes of a Redis Cluster (`redis://[user:password@]host:port` each); the rest of
    /// the cluster is discovered from them. Serialised with passwords replaced by `***`.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_redacted_urls"
    )]
    pub cluster: Vec<String>,
    /// `async` (default) or `exact`.
    #[serde(default)]
    pub mode: FleetMode,
    /// How often `async` mode exchanges usage with Redis (default 20ms).
    #[serde(default = "default_sync_interval")]
    pub sync_interval: HumanDuration,
    /// Budget of one Redis call (default 25ms); a request never waits longer on Redis. An
    /// `async` exchange, off the request path, gets at least 50 ms.
    #[serde(default = "default_redis_timeout")]
    pub timeout: HumanDuration,
    /// What decisions do while Redis is unreachable (default `local`).
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Prefix of every key (default `fairgate`).
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

impl std::fmt::Debug for RedisState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisState")
            .field("url", &self.url.as_deref().map(redact_url))
            .field(
                "cluster",
                &self
                    .cluster
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("mode", &self.mode)
            .field("sync_interval", &self.sync_interval)
            .field("timeout", &self.timeout)
            .field("on_failure", &self.on_failure)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// `url` with any password replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(parts) => parts,
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://***@{host}"),
    }
}

impl RedisState {
    /// Where Redis is, for logs: the redacted `url`, or the redacted seed nodes of the
    /// cluster (`cluster[a, b]`).
    pub fn target_redacted(&self) -> String {
        match &self.url {
            Some(url) => redact_url(url),
            None => {
                let nodes: Vec<String> = self.cluster.iter().map(|u| redact_url(u)).collect();
                format!("cluster[{}]", nodes.join(", "))
            }
        }
    }
}

fn serialize_redacted_opt_url<S: serde::Serializer>(
    url: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => s.serialize_some(&redact_url(url)),
        None => s.serialize_none(),
    }
}

fn serialize_redacted_urls<S: serde::Serializer>(urls: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(urls.iter().map(|u| redact_url(u)))
}

/// Default `state.redis.sync_interval`.
pub fn default_sync_interval() -> HumanDuration {
    HumanDuration(std::time::Duration::from_millis(20))
}

/// Default `state.redis.timeout`.
pub fn default_redis_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_millis(25))
}

/// Default `state.redis.key_prefix`.
pub fn default_key_prefix() -> String {
    "fairgate".to_owned()
}

/// How decisions use Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FleetMode {
    /// Decide locally; exchange usage with Redis every `sync_interval`.
    #[default]
    Async,
    /// One atomic Redis script per decision (the request waits for it, within `timeout`).
    Exact,
}

/// What decisions do while Redis is unreachable or slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Local limits scaled by 1/N, N the gateways last seen registered in Redis.
    #[default]
    Local,
    /// Admit what the local limits admit, without fleet accounting (counted).
    Open,
    /// Reject requests that have a quota with 503.
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_password_never_leaves_through_serialisation_or_debug() {
        let r = RedisState {
            url: Some("redis://app:s3cret@127.0.0.1:6379/0".to_owned()),
            cluster: Vec::new(),
            mode: FleetMode::default(),
            sync_interval: default_sync_interval(),
            timeout: default_redis_timeout(),
            on_failure: OnFailure::default(),
            key_prefix: default_key_prefix(),
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("s3cret"), "{json}");
        assert!(json.contains("redis://app:***@127.0.0.1:6379/0"), "{json}");
        assert!(!format!("{r:?}").contains("s3cret"));
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("redis://:pw@h:1"), "redis://:***@h:1");
    }

    #[test]
    fn a_cluster_is_decoded_from_its_seed_nodes() {
        let p = crate::decode::parse_policy(
            "version: 1
state:
  backend: redis
  redis: {cluster: ['redis://127.0.0.1:7000', 'redis://127.0.0.1:7001'], mode: exact}
",
            "p.yaml",
        )
        .unwrap();
        let r = p.state.redis.unwrap();
        assert_eq!(r.url, None);
        assert_eq!(
            r.cluster,
            ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        assert_eq!(r.mode, FleetMode::Exact);
        let p = crate::decode::parse_policy(
            "version: 1\nstate: {backend: redis, redis: {url: 'redis://h:1'}}\n",
            "p.yaml",
        )
        .unwrap();
        let r = p.state.redis.unwrap();
        assert_eq!(
            (r.url.as_deref(), r.cluster.len()),
            (Some("redis://h:1"), 0)
        );
    }

    #[test]
    fn cluster_passwords_never_leave_through_serialisation_or_debug() {
        let r = RedisState {
            url: None,
            cluster: vec![
                "redis://app:s3cret@10.0.0.1:7000".to_owned(),
                "redis://:hunter2@10.0.0.2:7000".to_owned(),
            ],
            mode: FleetMode::default(),
            sync_interval: default_sync_interval(),
            timeout: default_redis_timeout(),
            on_failure: OnFailure::default(),
            key_prefix: default_key_prefix(),
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            !json.contains("s3cret") && !json.contains("hunter2"),
            "{json}"
        );
        assert!(
            json.contains(
                r#""cluster":["redis://app:***@10.0.0.1:7000","redis://:***@10.0.0.2:7000"]"#
            ),
            "{json}"
        );
        assert!(!json.contains("\"url\""), "{json}");
        let debug = format!("{r:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("hunter2"),
            "{debug}"
        );
        assert_eq!(
            r.target_redacted(),
            "cluster[redis://app:***@10.0.0.1:7000, redis://:***@10.0.0.2:7000]"
        );
    }
}
