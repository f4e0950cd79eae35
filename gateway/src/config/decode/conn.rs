//! Decoding the slow-client and per-source keys of `limits:` (see [`crate::server::conn_limits`]
//! and `docs/gateway.md`, "Slow clients").

use std::num::NonZeroU32;

use fairgate_policies::decode::{uint, Ctx, Decode, MapReader, Path};
use fairgate_policies::model::ByteSize;
use fairgate_policies::yaml::Node;

use super::positive_duration;
use crate::config::{BodyMinRate, NO_SOURCE_CAP};

/// `max_connections_per_source`: `off` ([`NO_SOURCE_CAP`]) or a positive integer, at most
/// 1,000,000.
pub(super) fn per_source(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<NonZeroU32> {
    if node.as_str() == Some("off") {
        return Some(NO_SOURCE_CAP);
    }
    let v = uint(ctx, node, path, 1_000_000)?;
    match u32::try_from(v).ok().and_then(NonZeroU32::new) {
        Some(n) => Some(n),
        None => {
            ctx.error(node, path, "must be at least 1");
            None
        }
    }
}

/// `body_min_rate`: `off`, or `{bytes: SIZE, per: DURATION}` (both required).
pub(super) fn body_min_rate(
    ctx: &mut Ctx,
    node: &Node,
    path: &Path<'_>,
) -> Option<Option<BodyMinRate>> {
    if let Some(word) = node.as_str() {
        if word == "off" {
            return Some(None);
        }
        ctx.error(
            node,
            path,
            format!("unknown value `{word}` (expected `off` or `{{bytes: SIZE, per: DURATION}}`)"),
        );
        return None;
    }
    let mut m = MapReader::new(ctx, node, path)?;
    let bytes = m.required_with(ctx, "bytes", |c, n, p| {
        let b = ByteSize::decode(c, n, p)?.0;
        if b == 0 {
            c.error(n, p, "must be at least 1 byte");
            return None;
        }
        Some(b)
    });
    let per = m.required_with(ctx, "per", positive_duration);
    m.finish(ctx);
    Some(Some(BodyMinRate {
        bytes: bytes?,
        per: per?,
    }))
}

#[cfg(test)]
mod tests {
    use std::path::Path as FsPath;
    use std::time::Duration;

    use crate::config::{parse, BodyMinRate, Limits};

    fn limits(yaml: &str) -> Result<Limits, String> {
        let src = format!(
            "listen: 127.0.0.1:0\nlimits: {yaml}\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: [127.0.0.1:1]}}}}\n"
        );
        parse(&src, "gw.yaml", FsPath::new("/etc/fairgate/gw.yaml"))
            .map(|c| c.config.limits)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn slow_client_keys_decode_with_defaults() {
        let d = limits("{}").unwrap();
        assert_eq!(d.max_connections_per_source, crate::config::NO_SOURCE_CAP);
        assert_eq!(
            d.body_min_rate,
            Some(BodyMinRate {
                bytes: 10 * 1024,
                per: Duration::from_secs(10)
            })
        );
        assert_eq!(d.write_timeout, Duration::from_secs(30));
        let l = limits(
            "{max_connections_per_source: 7, body_min_rate: {bytes: 1KiB, per: 2s}, write_timeout: 500ms}",
        )
        .unwrap();
        assert_eq!(l.max_connections_per_source.get(), 7);
        assert_eq!(
            l.body_min_rate,
            Some(BodyMinRate {
                bytes: 1024,
                per: Duration::from_secs(2)
            })
        );
        assert_eq!(l.write_timeout, Duration::from_millis(500));
        assert_eq!(limits("{body_min_rate: off}").unwrap().body_min_rate, None);
        assert_eq!(
            limits("{max_connections_per_source: off}")
                .unwrap()
                .max_connections_per_source,
            crate::config::NO_SOURCE_CAP
        );
    }

    #[test]
    fn bad_slow_client_values_are_refused_with_their_position() {
        for (yaml, want) in [
            (
                "{max_connections_per_source: 0}",
                "gw.yaml:2:38: limits.max_connections_per_source: must be at least 1",
            ),
            (
                "{max_connections_per_source: -3}",
                "limits.max_connections_per_source:",
            ),
            (
                "{max_conections_per_source: 5}",
                "unknown field `max_conections_per_source` (did you mean `max_connections_per_source`?)",
            ),
            (
                "{body_min_rate: {bytes: 0, per: 1s}}",
                "limits.body_min_rate.bytes: must be at least 1 byte",
            ),
            (
                "{body_min_rate: {bytes: 1KiB}}",
                "limits.body_min_rate: missing field `per`",
            ),
            (
                "{body_min_rate: {bytes: 1KiB, per: 0s}}",
                "limits.body_min_rate.per: must be greater than zero",
            ),
            (
                "{body_min_rate: {bytes: 1KiB, per: 1s, burst: 3}}",
                "unknown field `burst`",
            ),
            (
                "{body_min_rate: slow}",
                "limits.body_min_rate: unknown value `slow` (expected `off` or `{bytes: SIZE, per: DURATION}`)",
            ),
            ("{write_timeout: 0s}", "limits.write_timeout: must be greater than zero"),
            ("{write_timeout: soon}", "limits.write_timeout:"),
        ] {
            let err = limits(yaml).expect_err(yaml);
            assert!(err.contains(want), "{yaml}: {err}");
        }
    }
}
