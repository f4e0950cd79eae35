//! Decoding an upstream pool's `outbound:` block (see [`crate::proxy::outbound`] and
//! `docs/gateway.md`, "Outbound layers"). Every bad value is reported at its position, with
//! the others, like the rest of the file.

use std::time::Duration;

use fairgate_middleware::outbound::KeyBy;
use fairgate_policies::decode::{
    expected, one_or_many, scalar, uint, Ctx, Decode, MapReader, Path,
};
use fairgate_policies::model::{ByteSize, HumanDuration};
use fairgate_policies::units::Rate;
use fairgate_policies::yaml::{Node, NodeKind};
use http::header::HeaderName;
use http::StatusCode;

use super::{duration, positive_duration};
use crate::config::{
    AdaptiveSettings, CacheSettings, CoalesceSettings, FleetRedis, FleetSettings, OutboundConfig,
    QueueSettings, RateSettings, RetrySettings,
};

/// The `outbound:` map.
pub(super) fn outbound(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<OutboundConfig> {
    let d = OutboundConfig::default();
    let mut m = MapReader::new(ctx, node, path)?;
    let coalesce = m.optional_with(ctx, "coalesce", coalesce);
    let cache = m.optional_with(ctx, "cache", cache);
    let rate = m.optional_with(ctx, "rate", rate);
    let concurrency = m.optional_with(ctx, "concurrency", |c, n, p| {
        let v = uint(c, n, p, 1_000_000)?;
        if v == 0 {
            c.error(n, p, "must be at least 1");
            return None;
        }
        Some(v as u32)
    });
    let queue = m.optional_with(ctx, "queue", queue);
    let retry = m.optional_with(ctx, "retry", retry);
    let throttle_status = m.optional_with(ctx, "throttle_status", |c, n, p| {
        match uint(c, n, p, 999)? {
            429 => Some(StatusCode::TOO_MANY_REQUESTS),
            503 => Some(StatusCode::SERVICE_UNAVAILABLE),
            v => {
                c.error(n, p, format!("`{v}` must be 429 or 503"));
                None
            }
        }
    });
    let fleet_at = m.entry("fleet").map(|e| e.key_node.mark);
    let fleet = m.optional_with(ctx, "fleet", fleet);
    if let Some(at) = fleet_at {
        if rate.is_none() && concurrency.is_none() && cache.is_none() {
            ctx.error_at(
                at,
                &path.key("fleet"),
                "`fleet` holds `rate`, `concurrency` and `cache` for the fleet: set at least one of them",
            );
        }
    }
    m.finish(ctx);
    Some(OutboundConfig {
        fleet,
        coalesce: coalesce.flatten(),
        cache,
        rate,
        concurrency,
        queue: queue.unwrap_or(d.queue),
        retry,
        throttle_status: throttle_status.unwrap_or(d.throttle_status),
    })
}

/// A value as an error shows it: passwords hidden, at most 60 characters.
fn shown(s: &str) -> String {
    let s = fairgate_policies::model::redact_url(s);
    if s.chars().count() <= 60 {
        return s;
    }
    let mut out: String = s.chars().take(57).collect();
    out.push('…');
    out
}

/// A key prefix or a name in Redis: non-empty, no braces (hash tags) or spaces.
fn redis_word(ctx: &mut Ctx, node: &Node, path: &Path<'_>, what: &str) -> Option<String> {
    let s = scalar(ctx, node, path, what)?;
    if s.is_empty() || s.contains(['{', '}']) || s.chars().any(char::is_whitespace) {
        ctx.error(
            node,
            path,
            format!("{what} must be non-empty, without braces or spaces"),
        );
        return None;
    }
    Some(s.to_owned())
}

/// `fleet: {redis: state | {url, timeout, key_prefix}, name, lease, max_wait}`.
fn fleet(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<FleetSettings> {
    let mut m = MapReader::new(ctx, node, path)?;
    let redis = m.required_with(ctx, "redis", |c, n, p| {
        if !matches!(n.kind, NodeKind::Map(_)) {
            let s = scalar(c, n, p, "`state` or a map {url, timeout, key_prefix}")?;
            if s == "state" {
                return Some(FleetRedis::State);
            }
            c.error(
                n,
                p,
                format!(
                    "`{}` must be `state` (the policy's `state.redis`) or a map {{url, timeout, key_prefix}}",
                    shown(s)
                ),
            );
            return None;
        }
        let mut r = MapReader::new(c, n, p)?;
        let url = r.required_with(c, "url", |c, n, p| {
            let s = scalar(c, n, p, "a redis url")?;
            if !s.starts_with("redis://") {
                c.error(
                    n,
                    p,
                    format!(
                        "`{}` is not a redis url (expected `redis://host:port`)",
                        shown(s)
                    ),
                );
                return None;
            }
            Some(s.to_owned())
        });
        let timeout = r.optional_with(c, "timeout", positive_duration);
        let key_prefix =
            r.optional_with(c, "key_prefix", |c, n, p| redis_word(c, n, p, "a key prefix"));
        r.finish(c);
        Some(FleetRedis::Own(fairgate_policies::model::RedisState {
            url: Some(url?),
            cluster: Vec::new(),
            mode: fairgate_policies::model::FleetMode::default(),
            sync_interval: fairgate_policies::model::default_sync_interval(),
            timeout: timeout.map_or_else(fairgate_policies::model::default_redis_timeout, HumanDuration),
            on_failure: fairgate_policies::model::OnFailure::default(),
            key_prefix: key_prefix.unwrap_or_else(fairgate_policies::model::default_key_prefix),
        }))
    });
    let name = m.optional_with(ctx, "name", |c, n, p| redis_word(c, n, p, "a name"));
    let lease = m.optional_with(ctx, "lease", positive_duration);
    let max_wait = m.optional_with(ctx, "max_wait", positive_duration);
    m.finish(ctx);
    Some(FleetSettings {
        redis: redis?,
        name,
        lease: lease.unwrap_or(Duration::from_secs(2)),
        max_wait: max_wait.unwrap_or(Duration::from_secs(5)),
    })
}

fn header_name(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<HeaderName> {
    let s = scalar(ctx, node, path, "a header name")?;
    match HeaderName::from_bytes(s.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            ctx.error(node, path, format!("`{s}` is not a valid header name"));
            None
        }
    }
}

fn size(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<u64> {
    let b = ByteSize::decode(ctx, node, path)?.0;
    if b == 0 {
        ctx.error(node, path, "must be greater than zero");
        return None;
    }
    Some(b)
}

fn at_least_one(ctx: &mut Ctx, node: &Node, path: &Path<'_>, max: u64) -> Option<u64> {
    let v = uint(ctx, node, path, max)?;
    if v == 0 {
        ctx.error(node, path, "must be at least 1");
        return None;
    }
    Some(v)
}

/// `coalesce: true|false` or `{headers: [..], max_body: SIZE}`.
fn coalesce(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Option<CoalesceSettings>> {
    if !matches!(node.kind, NodeKind::Map(_)) {
        let on = bool::decode(ctx, node, path)?;
        return Some(on.then(CoalesceSettings::default));
    }
    let mut m = MapReader::new(ctx, node, path)?;
    let headers = m.optional_with(ctx, "headers", |c, n, p| one_or_many(c, n, p, header_name));
    let max_body = m.optional_with(ctx, "max_body", size);
    m.finish(ctx);
    Some(Some(CoalesceSettings {
        headers: headers.unwrap_or_default(),
        max_body,
    }))
}

fn cache(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<CacheSettings> {
    let d = CacheSettings::default();
    let mut m = MapReader::new(ctx, node, path)?;
    let ttl = m.optional_with(ctx, "ttl", positive_duration);
    let routes = m.optional_with(ctx, "routes", |c, n, p| {
        let entries = fairgate_policies::decode::map_entries(c, n, p)?;
        let mut out = Vec::new();
        for e in entries {
            let p = p.key(e.key);
            if !e.key.starts_with('/') {
                c.error(e.key_node, &p, format!("`{}` must start with `/`", e.key));
                continue;
            }
            if let Some(t) = duration(c, e.value, &p) {
                out.push((e.key.to_owned(), t));
            }
        }
        Some(out)
    });
    let max_entries = m.optional_with(ctx, "max_entries", |c, n, p| {
        at_least_one(c, n, p, 100_000_000)
    });
    let max_bytes = m.optional_with(ctx, "max_bytes", size);
    let max_entry_bytes = m.optional_with(ctx, "max_entry_bytes", size);
    let honour_cache_control: Option<bool> = m.optional(ctx, "honour_cache_control");
    let vary = m.optional_with(ctx, "vary", |c, n, p| one_or_many(c, n, p, header_name));
    let warm_up = m.optional_with(ctx, "warm_up", |c, n, p| {
        one_or_many(c, n, p, |c, n, p| {
            let s = scalar(c, n, p, "a path like `/status`")?;
            if !s.starts_with('/') || http::uri::PathAndQuery::try_from(s).is_err() {
                c.error(n, p, format!("`{s}` is not a path starting with `/`"));
                return None;
            }
            Some(s.to_owned())
        })
    });
    m.finish(ctx);
    Some(CacheSettings {
        ttl: ttl.unwrap_or(d.ttl),
        routes: routes.unwrap_or_default(),
        max_entries: max_entries.unwrap_or(d.max_entries),
        max_bytes: max_bytes.unwrap_or(d.max_bytes),
        max_entry_bytes: max_entry_bytes.unwrap_or(d.max_entry_bytes),
        honour_cache_control: honour_cache_control.unwrap_or(d.honour_cache_control),
        vary: vary.unwrap_or_default(),
        warm_up: warm_up.unwrap_or_default(),
    })
}

/// `rate: 100/s` or `{rate: 100/s, burst: 20, key: upstream | {header: NAME}}`.
fn rate(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<RateSettings> {
    if !matches!(node.kind, NodeKind::Map(_)) {
        return Some(RateSettings {
            rate: Rate::decode(ctx, node, path)?,
            burst: None,
            key: KeyBy::Upstream,
        });
    }
    let mut m = MapReader::new(ctx, node, path)?;
    let rate: Option<Rate> = m.required(ctx, "rate");
    let burst = m.optional_with(ctx, "burst", |c, n, p| at_least_one(c, n, p, 1_000_000_000));
    let key = m.optional_with(ctx, "key", |c, n, p| {
        Some(match super::word_or_header(c, n, p, "upstream")? {
            None => KeyBy::Upstream,
            Some(h) => KeyBy::Header(h),
        })
    });
    m.finish(ctx);
    Some(RateSettings {
        rate: rate?,
        burst,
        key: key.unwrap_or_default(),
    })
}

fn queue(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<QueueSettings> {
    let d = QueueSettings::default();
    let mut m = MapReader::new(ctx, node, path)?;
    let max = m.optional_with(ctx, "max", |c, n, p| uint(c, n, p, 100_000_000));
    let timeout = m.optional_with(ctx, "timeout", duration);
    m.finish(ctx);
    Some(QueueSettings {
        max: max.unwrap_or(d.max),
        timeout: timeout.unwrap_or(d.timeout),
    })
}

fn retry(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<RetrySettings> {
    let d = RetrySettings::default();
    let mut m = MapReader::new(ctx, node, path)?;
    let on = m.optional_with(ctx, "on", |c, n, p| {
        one_or_many(c, n, p, |c, n, p| {
            let s = scalar(c, n, p, "a status like `503` or `connect`")?;
            if s == "connect" {
                return Some(None);
            }
            match s.parse::<u16>() {
                Ok(v @ 400..=599) => StatusCode::from_u16(v).ok().map(Some),
                _ => {
                    c.error(
                        n,
                        p,
                        format!("`{s}` is not `connect` or a 4xx/5xx status like `503`"),
                    );
                    None
                }
            }
        })
    });
    let max_attempts = m.optional_with(ctx, "max_attempts", |c, n, p| at_least_one(c, n, p, 10));
    let base = m.optional_with(ctx, "base", positive_duration);
    let max_backoff_node = m.entry("max_backoff").map(|e| e.value);
    let max_backoff = m.optional_with(ctx, "max_backoff", positive_duration);
    let max_retry_after = m.optional_with(ctx, "max_retry_after", duration);
    let budget = m.optional_with(ctx, "budget", budget);
    let min_per_sec = m.optional_with(ctx, "min_per_sec", |c, n, p| uint(c, n, p, 1_000_000));
    let non_idempotent: Option<bool> = m.optional(ctx, "non_idempotent");
    let adaptive = m.optional_with(ctx, "adaptive", adaptive);
    m.finish(ctx);
    let base = base.unwrap_or(d.base);
    let max_backoff = max_backoff.unwrap_or(d.max_backoff);
    if max_backoff < base {
        ctx.error(
            max_backoff_node.unwrap_or(node),
            &path.key("max_backoff"),
            format!(
                "`{}` is less than `base` ({})",
                HumanDuration(max_backoff),
                HumanDuration(base)
            ),
        );
        return None;
    }
    let (statuses, connect) = match on {
        Some(items) => {
            let statuses: Vec<StatusCode> = items.iter().flatten().copied().collect();
            (statuses, items.iter().any(Option::is_none))
        }
        None => (d.statuses, d.connect),
    };
    Some(RetrySettings {
        statuses,
        connect,
        max_attempts: max_attempts.map_or(d.max_attempts, |v| v as u32),
        base,
        max_backoff,
        max_retry_after: max_retry_after.unwrap_or(d.max_retry_after),
        budget: budget.unwrap_or(d.budget),
        min_per_sec: min_per_sec.map_or(d.min_per_sec, |v| v as u32),
        non_idempotent: non_idempotent.unwrap_or(d.non_idempotent),
        adaptive: adaptive.flatten(),
    })
}

/// `10%` or a fraction like `0.1`; at most 1000 %.
fn budget(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<f32> {
    let what = "a percentage like `10%` or a fraction like `0.1`";
    let s = scalar(ctx, node, path, what)?;
    let value = match s.trim().strip_suffix('%') {
        Some(p) => p.trim().parse::<f32>().ok().map(|v| v / 100.0),
        None => s.trim().parse::<f32>().ok(),
    };
    match value {
        Some(v) if v.is_finite() && (0.0..=10.0).contains(&v) => Some(v),
        Some(_) => {
            ctx.error(node, path, format!("`{s}` must be between 0% and 1000%"));
            None
        }
        None => {
            expected(ctx, node, path, what);
            None
        }
    }
}

/// `adaptive: true|false` or `{k: 2, window: 60s}`.
fn adaptive(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Option<AdaptiveSettings>> {
    let d = AdaptiveSettings::default();
    if !matches!(node.kind, NodeKind::Map(_)) {
        let on = bool::decode(ctx, node, path)?;
        return Some(on.then_some(d));
    }
    let mut m = MapReader::new(ctx, node, path)?;
    let k = m.optional_with(ctx, "k", |c, n, p| {
        let v = f64::decode(c, n, p)?;
        if !(1.0..=100.0).contains(&v) {
            c.error(n, p, format!("`{v}` must be between 1 and 100"));
            return None;
        }
        Some(v)
    });
    let window = m.optional_with(ctx, "window", |c, n, p| {
        let w = positive_duration(c, n, p)?;
        if w < Duration::from_secs(1) {
            c.error(n, p, "must be at least 1s");
            return None;
        }
        Some(w)
    });
    m.finish(ctx);
    Some(Some(AdaptiveSettings {
        k: k.unwrap_or(d.k),
        window: window.unwrap_or(d.window),
    }))
}

#[cfg(test)]
mod tests {
    use std::path::Path as FsPath;

    use crate::config::parse;
    use crate::config::OutboundConfig;

    fn with(outbound: &str) -> Result<OutboundConfig, String> {
        let src = format!(
            "listen: 127.0.0.1:8080\nroutes: [{{upstream: api}}]\nupstreams:\n  api:\n    targets: [127.0.0.1:9000]\n    outbound:\n{outbound}\n"
        );
        parse(&src, "gw.yaml", FsPath::new("/tmp/gw.yaml"))
            .map(|c| {
                c.config.upstreams["api"]
                    .outbound
                    .clone()
                    .expect("an outbound block")
            })
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_documented_block_decodes() {
        let o = with(
            "      coalesce: true
      cache: { ttl: 1s, max_entries: 10000, max_bytes: 64MiB, honour_cache_control: true, routes: {/quotas/: 30s}, warm_up: [/status] }
      rate: { rate: 100/s, burst: 20, key: {header: x-region} }
      concurrency: 32
      queue: { max: 1000, timeout: 2s }
      retry: { on: [429, 503, connect], max_attempts: 3, base: 50ms, max_backoff: 2s, budget: 10%, adaptive: {k: 2, window: 30s} }
      throttle_status: 429",
        )
        .unwrap();
        assert!(o.coalesce.is_some());
        let cache = o.cache.unwrap();
        assert_eq!(cache.max_bytes, 64 << 20);
        assert_eq!(
            cache.routes,
            [("/quotas/".to_owned(), std::time::Duration::from_secs(30))]
        );
        assert!(cache.honour_cache_control);
        let rate = o.rate.unwrap();
        assert_eq!((rate.rate.count(), rate.burst), (100, Some(20)));
        assert_eq!(
            rate.key,
            fairgate_middleware::outbound::KeyBy::Header(http::HeaderName::from_static("x-region"))
        );
        assert_eq!(o.concurrency, Some(32));
        let retry = o.retry.unwrap();
        assert!(retry.connect);
        assert_eq!(retry.statuses.len(), 2);
        assert!((retry.budget - 0.1).abs() < 1e-6);
        assert_eq!(
            retry.adaptive.unwrap().window,
            std::time::Duration::from_secs(30)
        );
        assert_eq!(o.throttle_status, http::StatusCode::TOO_MANY_REQUESTS);

        let short = with("      rate: 5/s\n      coalesce: false").unwrap();
        assert!(short.coalesce.is_none());
        assert_eq!(short.rate.unwrap().rate.count(), 5);
        assert_eq!(short.queue.max, 1000);
    }

    #[test]
    fn bad_values_are_reported_with_their_positions() {
        let err = with(
            "      coalesce: maybe
      cache: {ttl: 0s, max_bytes: 0, warm_up: [status]}
      rate: {rate: 100/s, key: region}
      concurrency: 0
      retry: {on: [200, connect, soon], budget: 2000%, base: 1s, max_backoff: 10ms}
      throttle_status: 500
      coalesc: true",
        )
        .unwrap_err();
        for want in [
            "gw.yaml:7:17: upstreams.api.outbound.coalesce:",
            "gw.yaml:8:20: upstreams.api.outbound.cache.ttl: must be greater than zero",
            "upstreams.api.outbound.cache.max_bytes: must be greater than zero",
            "upstreams.api.outbound.cache.warm_up[0]: `status` is not a path starting with `/`",
            "upstreams.api.outbound.rate.key: unknown value `region` (expected one of `upstream`, `header`)",
            "upstreams.api.outbound.concurrency: must be at least 1",
            "upstreams.api.outbound.retry.on[0]: `200` is not `connect` or a 4xx/5xx status",
            "upstreams.api.outbound.retry.on[2]: `soon` is not `connect`",
            "upstreams.api.outbound.retry.budget: `2000%` must be between 0% and 1000%",
            "upstreams.api.outbound.throttle_status: `500` must be 429 or 503",
            "upstreams.api.outbound.coalesc: unknown field `coalesc` (did you mean `coalesce`?)",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
        // The policy's way of naming a header key, not a prefix of its own.
        let err = with("      rate: {rate: 100/s, key: header:x-region}").unwrap_err();
        assert!(
            err.contains(
                "upstreams.api.outbound.rate.key: write a header key as `{header: x-region}`"
            ),
            "{err}"
        );
        let err = with("      retry: {base: 1s, max_backoff: 10ms}").unwrap_err();
        assert!(
            err.contains(
                "upstreams.api.outbound.retry.max_backoff: `10ms` is less than `base` (1s)"
            ),
            "{err}"
        );
    }
}
